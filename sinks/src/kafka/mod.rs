//! The Kafka sink (cargo feature `kafka`): records produced with rdkafka, confirmed on
//! their delivery reports.

mod config;

pub use config::KafkaConfig;

use crate::{Sink, SinkError};

/// Builds the Kafka sink, or explains that this build has none.
pub async fn build(_config: &KafkaConfig) -> Result<Box<dyn Sink>, SinkError> {
    #[cfg(not(feature = "kafka"))]
    {
        Err(SinkError::permanent(
            "kafka support not compiled in; rebuild with `--features kafka`",
        ))
    }
    #[cfg(feature = "kafka")]
    {
        Err(SinkError::permanent("the kafka sink is being written (issue 4)"))
    }
}
