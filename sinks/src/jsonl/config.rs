//! The `[sink]` settings of the JSONL file sink, and its registration.

use std::path::PathBuf;

use serde::Deserialize;

/// Settings of the JSONL file sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// The archive file. Records are appended; missing parent directories are created (and
    /// synced into their parents). A torn last line left by a crash is cut off when the
    /// file is opened. The file is locked through `<path>.lock` while the sink is open: one
    /// bridge per archive.
    pub path: PathBuf,
}

#[async_trait::async_trait]
impl crate::registry::SinkSettings for JsonlConfig {
    fn validate(&self) -> Result<(), crate::registry::SinkConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err("sink.path must not be empty".to_owned().into());
        }
        Ok(())
    }

    async fn open(&self) -> Result<Box<dyn crate::Sink>, crate::SinkError> {
        Ok(Box::new(super::JsonlSink::open(self)?))
    }
}
