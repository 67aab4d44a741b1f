//! The `[sink]` table of the bridge's configuration.
//!
//! Every sink's settings parse in every build, so a config naming a sink that was compiled
//! out still parses and then fails with a message saying how to rebuild.

use serde::Deserialize;

pub use crate::jsonl::JsonlConfig;
pub use crate::kafka::KafkaConfig;
pub use crate::nats::NatsConfig;
pub use crate::stdout::StdoutConfig;

/// Which sink to use, chosen by `type`, with that sink's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    /// One JSON line per record on standard output, flushed before confirming.
    Stdout(StdoutConfig),
    /// One JSON line per record appended to a file, fsynced per batch before confirming.
    Jsonl(JsonlConfig),
    /// Records produced to Kafka, confirmed on the delivery report.
    Kafka(KafkaConfig),
    /// Records published to NATS (JetStream by default), confirmed on the `PubAck`.
    Nats(NatsConfig),
}

impl SinkConfig {
    /// The sink's `type` name.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Stdout(_) => "stdout",
            SinkConfig::Jsonl(_) => "jsonl",
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Nats(_) => "nats",
        }
    }

    /// Checks the settings without touching the network or the disk. The error names the
    /// offending key.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            SinkConfig::Stdout(_) => Ok(()),
            SinkConfig::Jsonl(cfg) => {
                if cfg.path.as_os_str().is_empty() {
                    Err("sink.path must not be empty".into())
                } else {
                    Ok(())
                }
            }
            SinkConfig::Kafka(cfg) => cfg.validate(),
            SinkConfig::Nats(cfg) => cfg.validate(),
        }
    }
}
