//! The `[sink]` settings of the stdout sink, and its registration.

use async_trait::async_trait;
use serde::Deserialize;

use crate::registry::{SinkConfigError, SinkSettings};
use crate::{Sink, SinkError};

/// Settings of the stdout sink (it has none).
///
/// Standard output is for piping into another program and for debugging. A record counts
/// as delivered once it is written and flushed to the pipe or file behind it, which is not
/// synced to disk: redirecting it to a file is not a durable export (use the `jsonl` sink).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutConfig {}

#[async_trait]
impl SinkSettings for StdoutConfig {
    fn validate(&self) -> Result<(), SinkConfigError> {
        Ok(())
    }

    async fn open(&self) -> Result<Box<dyn Sink>, SinkError> {
        Ok(Box::new(super::StdoutSink::new()))
    }
}
