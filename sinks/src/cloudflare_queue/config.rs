//! The `[sink]` settings of the `cloudflare_queue` sink, their validation and the token.

use std::path::PathBuf;

use async_trait::async_trait;
use secrecy::SecretString;
use serde::Deserialize;

use crate::registry::{SinkConfigError, SinkSettings};
use crate::{Sink, SinkError};

pub use cfq_cloudflare::{DEFAULT_API_BASE_URL, MAX_DELAY_SECONDS};
/// The environment variable the token is read from by default (the convention of
/// Cloudflare's own SDKs).
pub const DEFAULT_TOKEN_ENV: &str = "CLOUDFLARE_API_TOKEN";
/// Default of [`CloudflareQueueConfig::max_messages_per_second`]: Cloudflare's per-queue
/// throughput cap.
pub const DEFAULT_MAX_MESSAGES_PER_SECOND: u32 = 5_000;
/// Default of [`CloudflareQueueConfig::request_timeout_ms`].
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Default of [`CloudflareQueueConfig::max_retries`].
pub const DEFAULT_MAX_RETRIES: u32 = 5;

/// What to do with a `bytes` record, which the HTTP API cannot publish as bytes (it takes
/// only `text` and `json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BytesPolicy {
    /// Do not publish it (the default): the record goes to `rejects_path` when set, and
    /// is otherwise left at its source (Cloudflare's retries and dead-letter queue).
    #[default]
    Refuse,
    /// Publish the standard padded base64 of the bytes as a `text` message. Consumers of
    /// the destination queue must know to decode it.
    Base64Text,
}

/// The `[sink]` table for `type = "cloudflare_queue"`: publish records into a Cloudflare
/// queue (replay an archive, redrive a dead-letter queue, move a queue to another account
/// or jurisdiction).
///
/// What a published message keeps: its body and content type (`text` or `json`). The
/// HTTP API takes no metadata, so the destination gives the message a new id, timestamp
/// and `attempts` count, and the source's metadata is not carried over.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudflareQueueConfig {
    /// Account id of the destination queue (required).
    pub account_id: String,
    /// Id (not name) of the destination queue (required).
    pub queue_id: String,
    /// API base URL. Point it at `cfq-bridge emulator` for local work; a plain `http://`
    /// URL is accepted with a warning (the token would travel unencrypted).
    #[serde(default = "default_api_base_url")]
    pub api_base_url: String,
    /// A file holding the API token (e.g. a mounted secret). Exclusive with
    /// `api_token_env`.
    #[serde(default)]
    pub api_token_file: Option<PathBuf>,
    /// The NAME of the environment variable holding the API token (default
    /// `CLOUDFLARE_API_TOKEN`), so that the source and the destination can use different
    /// tokens. The token itself is never a config value.
    #[serde(default)]
    pub api_token_env: Option<String>,
    /// Most messages published per second, 1..=5,000 (Cloudflare's per-queue cap, the
    /// default). At most one call's worth (100 messages, or this rate when lower) goes out
    /// in a burst.
    #[serde(default = "default_max_messages_per_second")]
    pub max_messages_per_second: u32,
    /// Seconds before published messages may be delivered, 0..=43,200 (default 0).
    #[serde(default)]
    pub delay_seconds: u64,
    /// What to do with `bytes` records: `"refuse"` (default) or `"base64_text"`.
    #[serde(default)]
    pub bytes_policy: BytesPolicy,
    /// A JSONL file for records that cannot be published (a `bytes` record under
    /// `refuse`, any `v8` record, a body over 128 KB, a body that is not valid text or
    /// JSON, a message the API refuses). Each is written whole, with the metadata entry
    /// `cfq-reject-reason` saying why, and fsynced before it counts as handled. Without
    /// it such records fail and stay at their source.
    #[serde(default)]
    pub rejects_path: Option<PathBuf>,
    /// Timeout of one publish call, in milliseconds (1..=600,000, default 30,000).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Retries of a call after a server error (5xx), a malformed answer or a transport
    /// error, with exponential back-off, before its records fail as transient (0..=100,
    /// default 5). A 429 is waited out (its `Retry-After`) and does not count here.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
}

fn default_api_base_url() -> String {
    DEFAULT_API_BASE_URL.to_owned()
}

fn default_max_messages_per_second() -> u32 {
    DEFAULT_MAX_MESSAGES_PER_SECOND
}

fn default_request_timeout_ms() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_MS
}

fn default_max_retries() -> u32 {
    DEFAULT_MAX_RETRIES
}

impl CloudflareQueueConfig {
    /// I/O-free checks; the error names the key (`sink.<key>`).
    pub fn check(&self) -> Result<(), SinkConfigError> {
        let invalid = |message: String| Err(SinkConfigError::Invalid(message));
        if self.account_id.trim().is_empty() {
            return invalid("sink.account_id must not be empty".into());
        }
        if self.queue_id.trim().is_empty() {
            return invalid("sink.queue_id must not be empty (the queue id, not its name)".into());
        }
        if !(self.api_base_url.starts_with("https://") || self.api_base_url.starts_with("http://"))
        {
            return invalid(format!(
                "sink.api_base_url must be an https:// (or, for an emulator, http://) URL, got {:?}",
                self.api_base_url
            ));
        }
        if self.api_token_file.is_some() && self.api_token_env.is_some() {
            return invalid("set only one of sink.api_token_file and sink.api_token_env".into());
        }
        if self
            .api_token_env
            .as_deref()
            .is_some_and(|name| name.trim().is_empty() || name.contains('='))
        {
            return invalid(
                "sink.api_token_env must be the name of an environment variable (not the token)"
                    .into(),
            );
        }
        if self
            .api_token_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return invalid("sink.api_token_file must not be empty".into());
        }
        if !(1..=DEFAULT_MAX_MESSAGES_PER_SECOND).contains(&self.max_messages_per_second) {
            return invalid(format!(
                "sink.max_messages_per_second must be from 1 to {DEFAULT_MAX_MESSAGES_PER_SECOND} \
                 (Cloudflare's per-queue cap), got {}",
                self.max_messages_per_second
            ));
        }
        if self.delay_seconds > MAX_DELAY_SECONDS {
            return invalid(format!(
                "sink.delay_seconds must be at most {MAX_DELAY_SECONDS} (12 h), got {}",
                self.delay_seconds
            ));
        }
        if self
            .rejects_path
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return invalid("sink.rejects_path must not be empty".into());
        }
        if !(1..=600_000).contains(&self.request_timeout_ms) {
            return invalid(format!(
                "sink.request_timeout_ms must be from 1 to 600000, got {}",
                self.request_timeout_ms
            ));
        }
        if self.max_retries > 100 {
            return invalid(format!(
                "sink.max_retries must be at most 100, got {}",
                self.max_retries
            ));
        }
        Ok(())
    }

    /// Reads the API token: from `api_token_file` when set, else from the environment
    /// variable named by `api_token_env` (default `CLOUDFLARE_API_TOKEN`). Surrounding
    /// whitespace is trimmed; an empty token is an error. Errors never quote the token.
    pub fn token(&self) -> Result<SecretString, SinkError> {
        self.token_from(|name| std::env::var(name).ok())
    }

    /// [`CloudflareQueueConfig::token`] with the environment given by `lookup`.
    pub fn token_from(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<SecretString, SinkError> {
        let (token, from) = match &self.api_token_file {
            Some(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    SinkError::permanent(format!(
                        "cannot read sink.api_token_file {}: {e}",
                        path.display()
                    ))
                })?;
                (token, format!("sink.api_token_file {}", path.display()))
            }
            None => {
                let name = self.api_token_env.as_deref().unwrap_or(DEFAULT_TOKEN_ENV);
                let token = lookup(name).ok_or_else(|| {
                    SinkError::permanent(format!(
                        "no API token for the cloudflare_queue sink: set the environment \
                         variable {name} (named by sink.api_token_env), or sink.api_token_file \
                         (a Cloudflare API token with Queues write permission on the \
                         destination account)"
                    ))
                })?;
                (token, format!("the environment variable {name}"))
            }
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(SinkError::permanent(format!(
                "the API token in {from} is empty"
            )));
        }
        Ok(SecretString::from(token.to_owned()))
    }
}

#[async_trait]
impl SinkSettings for CloudflareQueueConfig {
    fn validate(&self) -> Result<(), SinkConfigError> {
        self.check()
    }

    async fn open(&self) -> Result<Box<dyn Sink>, SinkError> {
        super::open_boxed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> CloudflareQueueConfig {
        toml::from_str(&format!("account_id = \"a\"\nqueue_id = \"q\"\n{extra}")).unwrap()
    }

    #[test]
    fn defaults_follow_cloudflare() {
        let c = config("");
        assert_eq!(c.api_base_url, DEFAULT_API_BASE_URL);
        assert_eq!(c.max_messages_per_second, 5_000);
        assert_eq!(c.delay_seconds, 0);
        assert_eq!(c.bytes_policy, BytesPolicy::Refuse);
        assert!(c.rejects_path.is_none());
        c.check().unwrap();
        assert_eq!(
            config("bytes_policy = \"base64_text\"").bytes_policy,
            BytesPolicy::Base64Text
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (extra, key) in [
            ("max_messages_per_second = 0", "sink.max_messages_per_second"),
            ("max_messages_per_second = 5001", "sink.max_messages_per_second"),
            ("delay_seconds = 43201", "sink.delay_seconds"),
            ("api_base_url = \"ftp://x\"", "sink.api_base_url"),
            ("api_token_env = \"\"", "sink.api_token_env"),
            ("api_token_env = \"A\"\napi_token_file = \"t\"", "sink.api_token_file"),
            ("rejects_path = \"\"", "sink.rejects_path"),
            ("request_timeout_ms = 0", "sink.request_timeout_ms"),
            ("max_retries = 101", "sink.max_retries"),
        ] {
            let error = config(extra).check().unwrap_err().to_string();
            assert!(error.contains(key), "{extra}: {error}");
        }
        let error = toml::from_str::<CloudflareQueueConfig>("account_id = \"\"\nqueue_id = \"q\"")
            .unwrap()
            .check()
            .unwrap_err();
        assert!(error.to_string().contains("sink.account_id"), "{error}");
        // The token is not a config value.
        assert!(toml::from_str::<CloudflareQueueConfig>(
            "account_id = \"a\"\nqueue_id = \"q\"\napi_token = \"secret\""
        )
        .is_err());
    }

    #[test]
    fn the_token_comes_from_the_named_variable_or_a_file() {
        use secrecy::ExposeSecret as _;
        let lookup = |name: &str| match name {
            "CLOUDFLARE_API_TOKEN" => Some(" default-token \n".to_owned()),
            "DEST_TOKEN" => Some("dest-token".to_owned()),
            "EMPTY" => Some("  ".to_owned()),
            _ => None,
        };
        let token = config("").token_from(lookup).unwrap();
        assert_eq!(token.expose_secret(), "default-token");
        let token = config("api_token_env = \"DEST_TOKEN\"")
            .token_from(lookup)
            .unwrap();
        assert_eq!(token.expose_secret(), "dest-token");
        let error = config("api_token_env = \"MISSING\"")
            .token_from(lookup)
            .unwrap_err();
        assert!(error.message.contains("MISSING"), "{error}");
        let error = config("api_token_env = \"EMPTY\"")
            .token_from(lookup)
            .unwrap_err();
        assert!(error.message.contains("empty"), "{error}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "file-token\n").unwrap();
        let c = config(&format!(
            "api_token_file = {}",
            toml::Value::String(path.display().to_string())
        ));
        assert_eq!(c.token_from(lookup).unwrap().expose_secret(), "file-token");
        // Debug output of the settings carries no token (there is none to carry).
        assert!(!format!("{c:?}").contains("file-token"));
    }
}
