//! The `[sink]` settings of the stdout sink.

use serde::Deserialize;

/// Settings of the stdout sink (it has none).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutConfig {}
