//! The `[sink]` settings of the JSONL file sink.

use std::path::PathBuf;

use serde::Deserialize;

/// Settings of the JSONL file sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// The archive file. Records are appended; missing parent directories are created. A
    /// torn last line left by a crash is cut off when the file is opened.
    pub path: PathBuf,
}
