//! Settings of the NATS sink. They parse in every build.

use serde::Deserialize;

/// The `[sink]` table for `type = "nats"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), for example `nats://127.0.0.1:4222`.
    pub url: String,
    /// Destination subject; may use `{queue_id}` and `{metadata.NAME}`.
    pub subject: String,
    /// Publish through JetStream and confirm on the PubAck (default). `false` uses core
    /// NATS, which the server does not confirm.
    #[serde(default = "default_true")]
    pub jetstream: bool,
}

fn default_true() -> bool {
    true
}

impl NatsConfig {
    /// I/O-free checks; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.url.trim().is_empty() {
            return Err("sink.url must not be empty".into());
        }
        Ok(())
    }
}
