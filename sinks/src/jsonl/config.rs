//! The `[sink]` settings of the JSONL file sink, and its registration.
//!
//! Two modes, chosen by which key is given (exactly one of them):
//! - `path`: one archive file that grows for ever;
//! - `directory`: rotating segments, optionally compressed ([`super::segments`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::compress::Compression;

/// Default size of a segment before it is closed: 128 MiB of uncompressed lines.
pub const DEFAULT_ROTATE_BYTES: u64 = 128 << 20;

/// Default age of a segment before it is closed: one hour.
pub const DEFAULT_ROTATE_SECS: u64 = 3600;

/// Settings of the JSONL file sink.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// One archive file. Records are appended; missing parent directories are created (and
    /// synced into their parents). A torn last line left by a crash is cut off when the
    /// file is opened. The file is locked through `<path>.lock` while the sink is open: one
    /// bridge per archive. Give this or `directory`, not both.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A directory of rotating segments,
    /// `<queue_id>-<UTC start, YYYYMMDDTHHMMSSZ>-<sequence>.jsonl[.gz|.zst]`. The open
    /// segment ends in `.partial` and is renamed when closed. The directory is locked
    /// through `<directory>/.lock` while the sink is open. Give this or `path`, not both.
    #[serde(default)]
    pub directory: Option<PathBuf>,
    /// Directory mode: a segment is closed once it holds this many bytes of lines, counted
    /// before compression, in bytes. Default 134217728 (128 MiB). A group commit is never
    /// split, so a segment can exceed it by one group.
    #[serde(default)]
    pub rotate_bytes: Option<u64>,
    /// Directory mode: a segment is closed once it has been open this long, in seconds,
    /// whether or not records keep arriving. Default 3600.
    #[serde(default)]
    pub rotate_secs: Option<u64>,
    /// Directory mode: `none`, `gzip` (one member per group commit) or `zstd` (one frame
    /// per group commit). Default `none`.
    #[serde(default)]
    pub compression: Option<Compression>,
}

/// Where and how the sink writes, once the settings are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonlMode<'a> {
    /// One file.
    File(&'a Path),
    /// Rotating segments in a directory.
    Segments(SegmentSettings<'a>),
}

/// The settings of the directory mode, with their defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSettings<'a> {
    /// The directory holding the segments.
    pub directory: &'a Path,
    /// Uncompressed bytes after which a segment is closed.
    pub rotate_bytes: u64,
    /// Age after which a segment is closed.
    pub rotate_after: Duration,
    /// How each group commit is encoded.
    pub compression: Compression,
}

impl JsonlConfig {
    /// Settings for one archive file at `path` (the single-file mode).
    pub fn file(path: impl Into<PathBuf>) -> JsonlConfig {
        JsonlConfig {
            path: Some(path.into()),
            ..JsonlConfig::default()
        }
    }

    /// Settings for rotating segments in `directory`, with the default rotation and no
    /// compression.
    pub fn directory(directory: impl Into<PathBuf>) -> JsonlConfig {
        JsonlConfig {
            directory: Some(directory.into()),
            ..JsonlConfig::default()
        }
    }

    /// The mode these settings select, or the error [`validate`] would give.
    ///
    /// [`validate`]: crate::registry::SinkSettings::validate
    pub fn mode(&self) -> Result<JsonlMode<'_>, String> {
        match (&self.path, &self.directory) {
            (Some(_), Some(_)) => {
                Err("sink.path and sink.directory exclude each other: give one of them".into())
            }
            (None, None) => Err(
                "the jsonl sink needs sink.path (one file) or sink.directory (rotating segments)"
                    .into(),
            ),
            (Some(path), None) => {
                if path.as_os_str().is_empty() {
                    return Err("sink.path must not be empty".into());
                }
                for (key, set) in [
                    ("rotate_bytes", self.rotate_bytes.is_some()),
                    ("rotate_secs", self.rotate_secs.is_some()),
                    ("compression", self.compression.is_some()),
                ] {
                    if set {
                        return Err(format!(
                            "sink.{key} applies to sink.directory only; sink.path is one plain file"
                        ));
                    }
                }
                Ok(JsonlMode::File(path))
            }
            (None, Some(directory)) => {
                if directory.as_os_str().is_empty() {
                    return Err("sink.directory must not be empty".into());
                }
                let rotate_bytes = self.rotate_bytes.unwrap_or(DEFAULT_ROTATE_BYTES);
                if rotate_bytes == 0 {
                    return Err("sink.rotate_bytes must be at least 1".into());
                }
                let rotate_secs = self.rotate_secs.unwrap_or(DEFAULT_ROTATE_SECS);
                if rotate_secs == 0 {
                    return Err("sink.rotate_secs must be at least 1".into());
                }
                Ok(JsonlMode::Segments(SegmentSettings {
                    directory,
                    rotate_bytes,
                    rotate_after: Duration::from_secs(rotate_secs),
                    compression: self.compression.unwrap_or_default(),
                }))
            }
        }
    }
}

#[async_trait::async_trait]
impl crate::registry::SinkSettings for JsonlConfig {
    fn validate(&self) -> Result<(), crate::registry::SinkConfigError> {
        self.mode().map(drop).map_err(Into::into)
    }

    async fn open(&self) -> Result<Box<dyn crate::Sink>, crate::SinkError> {
        Ok(Box::new(super::JsonlSink::open(self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> JsonlConfig {
        toml::from_str(text).expect("a valid jsonl table")
    }

    #[test]
    fn the_directory_mode_takes_its_defaults() {
        let config = parse("directory = \"archive\"\n");
        let JsonlMode::Segments(settings) = config.mode().unwrap() else {
            panic!("not the directory mode")
        };
        assert_eq!(settings.directory, Path::new("archive"));
        assert_eq!(settings.rotate_bytes, 134_217_728);
        assert_eq!(settings.rotate_after, Duration::from_secs(3600));
        assert_eq!(settings.compression, Compression::None);

        let config = parse(
            "directory = \"a\"\nrotate_bytes = 10\nrotate_secs = 2\ncompression = \"zstd\"\n",
        );
        let JsonlMode::Segments(settings) = config.mode().unwrap() else {
            panic!("not the directory mode")
        };
        assert_eq!(settings.rotate_bytes, 10);
        assert_eq!(settings.rotate_after, Duration::from_secs(2));
        assert_eq!(settings.compression, Compression::Zstd);
    }

    #[test]
    fn each_invalid_combination_names_its_key() {
        let cases = [
            ("path = \"a\"\ndirectory = \"b\"\n", "sink.path and sink.directory"),
            ("", "sink.path (one file) or sink.directory"),
            ("path = \"\"\n", "sink.path must not be empty"),
            ("directory = \"\"\n", "sink.directory must not be empty"),
            ("path = \"a\"\nrotate_bytes = 5\n", "sink.rotate_bytes applies"),
            ("path = \"a\"\nrotate_secs = 5\n", "sink.rotate_secs applies"),
            ("path = \"a\"\ncompression = \"gzip\"\n", "sink.compression applies"),
            ("directory = \"a\"\nrotate_bytes = 0\n", "sink.rotate_bytes must be"),
            ("directory = \"a\"\nrotate_secs = 0\n", "sink.rotate_secs must be"),
        ];
        for (text, expected) in cases {
            let error = parse(text).mode().unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        let error = toml::from_str::<JsonlConfig>("directory = \"a\"\ncompression = \"lz4\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("lz4"), "{error}");
    }
}
