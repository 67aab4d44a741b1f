//! The NATS sink (cargo feature `nats`): records published with async-nats, confirmed on
//! their JetStream PubAcks.

mod config;

pub use config::NatsConfig;

use crate::{Sink, SinkError};

/// Builds the NATS sink, or explains that this build has none.
pub async fn build(_config: &NatsConfig) -> Result<Box<dyn Sink>, SinkError> {
    #[cfg(not(feature = "nats"))]
    {
        Err(SinkError::permanent(
            "nats support not compiled in; rebuild with `--features nats`",
        ))
    }
    #[cfg(feature = "nats")]
    {
        Err(SinkError::permanent("the nats sink is being written (issue 5)"))
    }
}
