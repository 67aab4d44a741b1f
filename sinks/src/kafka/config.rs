//! Settings of the Kafka sink. They parse in every build.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The `[sink]` table for `type = "kafka"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma separated (`host:port,host:port`).
    pub brokers: String,
    /// Destination topic; may use `{queue_id}` and `{metadata.NAME}`.
    pub topic: String,
    /// Raw librdkafka options, passed through unchanged.
    #[serde(default)]
    pub librdkafka_options: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// I/O-free checks; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.brokers.trim().is_empty() {
            return Err("sink.brokers must not be empty".into());
        }
        Ok(())
    }
}
