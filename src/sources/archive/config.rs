//! The `[archive]` table: which archive files to read, which of their records to replay,
//! and where to keep the checkpoint.

use std::path::PathBuf;

use cfq_sinks::ContentType;
use serde::{Deserialize, Deserializer};

/// The `[archive]` table: JSONL archives (plain, `.gz` or `.zst`) to read back into a sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// Archive files or glob patterns (`archive/*.jsonl.gz`). Every match is read once, all
    /// of them in name order (byte order of the path: `part-10` sorts before `part-2`). A
    /// pattern that matches no file, or a file that does not exist, is an error naming it.
    pub paths: Vec<String>,
    /// Optional checkpoint file: how far the records read are settled (confirmed by the
    /// sink, or skipped), and the input files it belongs to. A restart with the same inputs
    /// resumes after it. Without one, every run reads from the start.
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    /// Only records with `timestamp_ms` at or after this, in milliseconds since the Unix
    /// epoch.
    #[serde(default)]
    pub since_ms: Option<u64>,
    /// Only records with `timestamp_ms` before this (exclusive), in milliseconds since the
    /// Unix epoch.
    #[serde(default)]
    pub until_ms: Option<u64>,
    /// Only records of these content types (`text`, `json`, `bytes`, `v8`). Absent: all.
    #[serde(default, deserialize_with = "content_types")]
    pub content_types: Option<Vec<ContentType>>,
    /// Records per batch handed to the sink.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Most records read and not yet settled (delivering, waiting for a retry, or
    /// confirmed but not yet recorded in the checkpoint). Reading waits while it is
    /// reached; it also bounds the duplicates a crash can cause.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// How many times a record the sink refuses for good is offered before the run stops
    /// with an error naming its file and line. The source never skips such a record.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wait before offering a refused record again, in seconds, for a record whose
    /// `attempts` field is 1; the pipeline doubles it for each further attempt the record
    /// had at Cloudflare (the field is replayed as is, so the wait does not grow between
    /// offers).
    #[serde(default = "default_retry_base_delay_secs")]
    pub retry_base_delay_secs: u64,
    /// Longest such wait, in seconds.
    #[serde(default = "default_retry_max_delay_secs")]
    pub retry_max_delay_secs: u64,
    /// On shutdown, how long deliveries may take to finish, in milliseconds. What is not
    /// confirmed by then is not checkpointed, and is read again on the next run.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
}

fn default_batch_size() -> u32 {
    100
}
fn default_max_in_flight() -> u32 {
    1000
}
fn default_max_attempts() -> u32 {
    5
}
fn default_retry_base_delay_secs() -> u64 {
    1
}
fn default_retry_max_delay_secs() -> u64 {
    60
}
fn default_shutdown_grace_ms() -> u64 {
    30_000
}

/// Reads `content_types` as content type names, refusing an unknown one by name.
fn content_types<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<ContentType>>, D::Error> {
    let names = Vec::<String>::deserialize(deserializer)?;
    names
        .iter()
        .map(|name| {
            ContentType::parse(name).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "unknown content type {name:?} (expected text, json, bytes or v8)"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

impl ArchiveConfig {
    /// Settings that read `paths` with every other key at its default (no checkpoint, no
    /// filter).
    pub fn new(paths: Vec<String>) -> ArchiveConfig {
        ArchiveConfig {
            paths,
            checkpoint: None,
            since_ms: None,
            until_ms: None,
            content_types: None,
            batch_size: default_batch_size(),
            max_in_flight: default_max_in_flight(),
            max_attempts: default_max_attempts(),
            retry_base_delay_secs: default_retry_base_delay_secs(),
            retry_max_delay_secs: default_retry_max_delay_secs(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
        }
    }

    /// Checks the settings without touching the file system. Each error names its key
    /// (`archive.batch_size must be at least 1`).
    pub fn validate(&self) -> Result<(), String> {
        if self.paths.is_empty() {
            return Err("archive.paths must list at least one file or glob pattern".into());
        }
        for (i, path) in self.paths.iter().enumerate() {
            if path.trim().is_empty() {
                return Err(format!("archive.paths[{i}] must not be empty"));
            }
            if let Err(e) = glob::Pattern::new(path) {
                return Err(format!(
                    "archive.paths[{i}] ({path:?}) is not a valid glob pattern: {e}"
                ));
            }
        }
        if self
            .checkpoint
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err("archive.checkpoint must not be empty (leave it out for none)".into());
        }
        if let (Some(since), Some(until)) = (self.since_ms, self.until_ms) {
            if since >= until {
                return Err(format!(
                    "archive.since_ms ({since}) must be less than archive.until_ms ({until})"
                ));
            }
        }
        if self.content_types.as_ref().is_some_and(Vec::is_empty) {
            return Err(
                "archive.content_types must not be empty (leave it out to read every type)".into(),
            );
        }
        if self.batch_size == 0 {
            return Err("archive.batch_size must be at least 1".into());
        }
        if self.max_in_flight < self.batch_size {
            return Err(format!(
                "archive.max_in_flight ({}) must be at least archive.batch_size ({})",
                self.max_in_flight, self.batch_size
            ));
        }
        if self.max_attempts == 0 {
            return Err("archive.max_attempts must be at least 1".into());
        }
        if self.retry_max_delay_secs < self.retry_base_delay_secs {
            return Err(format!(
                "archive.retry_max_delay_secs ({}) must be at least archive.retry_base_delay_secs ({})",
                self.retry_max_delay_secs, self.retry_base_delay_secs
            ));
        }
        Ok(())
    }

    /// Whether a record passes the `since_ms`, `until_ms` and `content_types` filters.
    pub fn selects(&self, timestamp_ms: u64, content_type: ContentType) -> bool {
        self.since_ms.is_none_or(|since| timestamp_ms >= since)
            && self.until_ms.is_none_or(|until| timestamp_ms < until)
            && self
                .content_types
                .as_ref()
                .is_none_or(|types| types.contains(&content_type))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ArchiveConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_every_key() {
        let c = parse(r#"paths = ["a.jsonl"]"#).unwrap();
        assert_eq!(
            (c.batch_size, c.max_in_flight, c.max_attempts),
            (100, 1000, 5)
        );
        assert!(c.checkpoint.is_none() && c.content_types.is_none());
        c.validate().unwrap();
        let c = parse(
            r#"
            paths = ["a/*.jsonl.gz", "b.zst"]
            checkpoint = "state/replay.checkpoint"
            since_ms = 10
            until_ms = 20
            content_types = ["json", "text"]
            batch_size = 10
            max_in_flight = 50
            max_attempts = 2
            retry_base_delay_secs = 2
            retry_max_delay_secs = 8
            shutdown_grace_ms = 100
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.content_types,
            Some(vec![ContentType::Json, ContentType::Text])
        );
        assert!(c.selects(10, ContentType::Json));
        assert!(!c.selects(20, ContentType::Json), "until is exclusive");
        assert!(!c.selects(9, ContentType::Json), "since is inclusive");
        assert!(!c.selects(15, ContentType::Bytes));
    }

    #[test]
    fn unknown_keys_and_content_types_are_refused() {
        let e = parse("paths = [\"a\"]\nbatch = 3").unwrap_err();
        assert!(e.contains("unknown field `batch`"), "{e}");
        let e = parse("paths = [\"a\"]\ncontent_types = [\"xml\"]").unwrap_err();
        assert!(e.contains("unknown content type \"xml\""), "{e}");
    }

    #[test]
    fn validation_names_the_key() {
        let base = || parse(r#"paths = ["a.jsonl"]"#).unwrap();
        type Change = Box<dyn Fn(&mut ArchiveConfig)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|c| c.paths.clear()), "archive.paths must list"),
            (Box::new(|c| c.paths.push(" ".into())), "archive.paths[1]"),
            (Box::new(|c| c.paths.push("a[".into())), "archive.paths[1]"),
            (
                Box::new(|c| c.checkpoint = Some("".into())),
                "archive.checkpoint",
            ),
            (
                Box::new(|c| {
                    c.since_ms = Some(5);
                    c.until_ms = Some(5)
                }),
                "archive.since_ms (5) must be less than archive.until_ms (5)",
            ),
            (
                Box::new(|c| c.content_types = Some(vec![])),
                "archive.content_types",
            ),
            (Box::new(|c| c.batch_size = 0), "archive.batch_size"),
            (
                Box::new(|c| c.max_in_flight = 99),
                "archive.max_in_flight (99)",
            ),
            (Box::new(|c| c.max_attempts = 0), "archive.max_attempts"),
            (
                Box::new(|c| c.retry_max_delay_secs = 0),
                "archive.retry_max_delay_secs",
            ),
        ];
        for (change, expected) in cases {
            let mut c = base();
            change(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.contains(expected), "{e:?} should contain {expected:?}");
        }
    }
}
