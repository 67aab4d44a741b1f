//! The bridge's configuration: a TOML file with `${ENV}` interpolation.
//!
//! Loading happens in three steps, kept apart so each can be tested alone:
//! 1. [`interpolate`] replaces `${NAME}` with the environment variable `NAME` (`$$` is a
//!    literal `$`); a missing variable is an error naming it;
//! 2. parsing into `deny_unknown_fields` structs, where an unknown key is an error naming
//!    its full path (`queue.batchsize`);
//! 3. [`Config::validate`]: I/O-free range and consistency checks, naming the key.
//!
//! Reaching the API and the sink is `cfq-bridge check`'s job, not this module's.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

pub use cfq_sinks::SinkConfig;

/// Cloudflare's API base URL.
pub const DEFAULT_API_BASE_URL: &str = "https://api.cloudflare.com/client/v4";
/// The environment variable holding the API token (the official SDKs' convention).
pub const TOKEN_ENV: &str = "CLOUDFLARE_API_TOKEN";
/// Cloudflare's largest visibility timeout and retry delay: 12 hours.
pub const MAX_VISIBILITY_TIMEOUT_MS: u64 = 43_200_000;
/// Cloudflare's largest retry delay, in seconds.
pub const MAX_RETRY_DELAY_SECS: u64 = 43_200;

/// A configuration error, with the key or file it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `${NAME}` named a variable that is not set.
    #[error("config refers to environment variable ${{{0}}}, which is not set")]
    MissingEnv(String),
    /// `${` without a closing `}`.
    #[error("config has an unterminated `${{` on line {0}")]
    BadInterpolation(usize),
    /// TOML syntax or a type error, or an unknown key.
    #[error("invalid config at `{path}`: {message}")]
    Parse {
        /// The key path (`queue.batch_size`), or `.` for the document.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A value out of range or inconsistent with another.
    #[error("invalid config: {0}")]
    Invalid(String),
    /// No token in the environment and no `api_token_file`, or an unreadable token file.
    #[error("{0}")]
    Token(String),
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where to pull from and how.
    pub queue: QueueConfig,
    /// Where records go.
    pub sink: SinkConfig,
    /// Prometheus metrics exporter (off unless `listen` is set).
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// What to do with a `v8` message, which no pull consumer can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum V8Policy {
    /// Do not forward it: release it with a retry delay so Cloudflare's `max_retries` and
    /// dead-letter queue take it (the default). Logged and counted.
    #[default]
    Release,
    /// Forward the opaque payload as is, labelled `content_type = "v8"` (base64 in JSONL),
    /// for archives that keep everything.
    ForwardRaw,
}

/// The `[queue]` table: the Cloudflare queue and the pipeline's settings.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Cloudflare account id (required).
    pub account_id: String,
    /// Queue id (required; the id, not the name).
    pub queue_id: String,
    /// API base URL. Point it at `cfq-bridge emulator` for local work. `http://` URLs are
    /// accepted with a warning.
    #[serde(default = "default_api_base_url")]
    pub api_base_url: String,
    /// A file holding the API token. When absent the token comes from the environment
    /// variable `CLOUDFLARE_API_TOKEN`. The token is never accepted on the command line.
    #[serde(default)]
    pub api_token_file: Option<PathBuf>,
    /// Messages per pull, 1..=100.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// How long pulled messages are leased to the bridge, in milliseconds (≤ 12 h).
    #[serde(default = "default_visibility_timeout_ms")]
    pub visibility_timeout_ms: u64,
    /// Concurrent pull loops.
    #[serde(default = "default_pullers")]
    pub pullers: u32,
    /// Most messages leased but not yet acknowledged or released, across all pullers.
    /// Pullers wait while it is reached.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// A record whose lease has less than this left when it would reach the sink is
    /// released (retry, delay 0) instead of delivered late, in milliseconds.
    #[serde(default = "default_lease_margin_ms")]
    pub lease_margin_ms: u64,
    /// First back-off after an empty pull, in milliseconds (doubles, with jitter).
    #[serde(default = "default_empty_backoff_min_ms")]
    pub empty_backoff_min_ms: u64,
    /// Longest back-off after empty pulls, in milliseconds.
    #[serde(default = "default_empty_backoff_max_ms")]
    pub empty_backoff_max_ms: u64,
    /// Most leases per ack call.
    #[serde(default = "default_ack_batch_size")]
    pub ack_batch_size: u32,
    /// Longest time a confirmation waits to be grouped with others, in milliseconds.
    #[serde(default = "default_ack_interval_ms")]
    pub ack_interval_ms: u64,
    /// Ack calls in flight at once.
    #[serde(default = "default_ack_concurrency")]
    pub ack_concurrency: u32,
    /// Retry delay for a failed record on its first attempt, in seconds; it doubles with
    /// each further attempt.
    #[serde(default = "default_retry_base_delay_secs")]
    pub retry_base_delay_secs: u64,
    /// Longest retry delay, in seconds (≤ 43,200).
    #[serde(default = "default_retry_max_delay_secs")]
    pub retry_max_delay_secs: u64,
    /// What to do with `v8` messages: `release` (default) or `forward_raw`.
    #[serde(default)]
    pub v8_policy: V8Policy,
    /// Timeout of one API call, in milliseconds (covers slow or stalled responses).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Largest pull response accepted, in bytes; a larger one is an error, not an
    /// allocation.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// On SIGINT/SIGTERM, how long in-flight deliveries may take to finish, in
    /// milliseconds. What is not confirmed by then is released.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Optional crash-safe ack journal: confirmed leases are appended (and synced) here
    /// before they are acknowledged, and acknowledged first thing after a restart.
    #[serde(default)]
    pub ack_journal: Option<PathBuf>,
}

impl fmt::Debug for QueueConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No secret lives here (the token file's path is not secret), but the struct is
        // large: show what identifies the queue.
        f.debug_struct("QueueConfig")
            .field("account_id", &self.account_id)
            .field("queue_id", &self.queue_id)
            .field("api_base_url", &self.api_base_url)
            .field("batch_size", &self.batch_size)
            .field("visibility_timeout_ms", &self.visibility_timeout_ms)
            .field("pullers", &self.pullers)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

/// The `[metrics]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address for a Prometheus `/metrics` endpoint, e.g. `127.0.0.1:9464`. Off when absent.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

fn default_api_base_url() -> String {
    DEFAULT_API_BASE_URL.to_string()
}
fn default_batch_size() -> u32 {
    100
}
fn default_visibility_timeout_ms() -> u64 {
    60_000
}
fn default_pullers() -> u32 {
    4
}
fn default_max_in_flight() -> u32 {
    2000
}
fn default_lease_margin_ms() -> u64 {
    2_000
}
fn default_empty_backoff_min_ms() -> u64 {
    100
}
fn default_empty_backoff_max_ms() -> u64 {
    5_000
}
fn default_ack_batch_size() -> u32 {
    100
}
fn default_ack_interval_ms() -> u64 {
    20
}
fn default_ack_concurrency() -> u32 {
    4
}
fn default_retry_base_delay_secs() -> u64 {
    5
}
fn default_retry_max_delay_secs() -> u64 {
    3_600
}
fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_max_response_bytes() -> usize {
    // 100 messages of at most 128 KB, base64-inflated, plus envelope: well under 32 MiB.
    32 * 1024 * 1024
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}

impl Config {
    /// Reads, interpolates, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, |name| std::env::var(name).ok())
    }

    /// Interpolates with `lookup`, parses and validates config text.
    pub fn from_toml(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = interpolate(text, lookup)?;
        let deserializer = toml::Deserializer::new(&text);
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            ConfigError::Parse {
                path,
                message: inner.message().to_string(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// I/O-free checks of ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let q = &self.queue;
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if q.account_id.trim().is_empty() {
            return invalid("queue.account_id must not be empty".into());
        }
        if q.queue_id.trim().is_empty() {
            return invalid("queue.queue_id must not be empty".into());
        }
        if q.account_id.len() > 32 || q.queue_id.len() > 32 {
            return invalid("queue.account_id and queue.queue_id are ids of at most 32 characters (use the queue id, not its name)".into());
        }
        match reqwest::Url::parse(&q.api_base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => {}
            _ => {
                return invalid(format!(
                    "queue.api_base_url must be an http(s) URL, got {:?}",
                    q.api_base_url
                ))
            }
        }
        if !(1..=100).contains(&q.batch_size) {
            return invalid(format!(
                "queue.batch_size must be 1..=100, got {}",
                q.batch_size
            ));
        }
        if !(1..=MAX_VISIBILITY_TIMEOUT_MS).contains(&q.visibility_timeout_ms) {
            return invalid(format!(
                "queue.visibility_timeout_ms must be 1..=43200000 (12 h), got {}",
                q.visibility_timeout_ms
            ));
        }
        if !(1..=64).contains(&q.pullers) {
            return invalid(format!("queue.pullers must be 1..=64, got {}", q.pullers));
        }
        if q.max_in_flight < q.batch_size {
            return invalid(format!(
                "queue.max_in_flight ({}) must be at least queue.batch_size ({})",
                q.max_in_flight, q.batch_size
            ));
        }
        if q.lease_margin_ms >= q.visibility_timeout_ms {
            return invalid(format!(
                "queue.lease_margin_ms ({}) must be less than queue.visibility_timeout_ms ({})",
                q.lease_margin_ms, q.visibility_timeout_ms
            ));
        }
        if q.empty_backoff_min_ms == 0 || q.empty_backoff_min_ms > q.empty_backoff_max_ms {
            return invalid(
                "queue.empty_backoff_min_ms must be > 0 and ≤ queue.empty_backoff_max_ms".into(),
            );
        }
        if !(1..=1000).contains(&q.ack_batch_size) {
            return invalid(format!(
                "queue.ack_batch_size must be 1..=1000, got {}",
                q.ack_batch_size
            ));
        }
        if !(1..=64).contains(&q.ack_concurrency) {
            return invalid(format!(
                "queue.ack_concurrency must be 1..=64, got {}",
                q.ack_concurrency
            ));
        }
        if q.retry_max_delay_secs > MAX_RETRY_DELAY_SECS {
            return invalid(format!(
                "queue.retry_max_delay_secs must be ≤ 43200 (12 h), got {}",
                q.retry_max_delay_secs
            ));
        }
        if q.retry_base_delay_secs > q.retry_max_delay_secs {
            return invalid(
                "queue.retry_base_delay_secs must be ≤ queue.retry_max_delay_secs".into(),
            );
        }
        if q.request_timeout_ms < 100 {
            return invalid("queue.request_timeout_ms must be at least 100".into());
        }
        if q.max_response_bytes < 64 * 1024 {
            return invalid("queue.max_response_bytes must be at least 65536".into());
        }
        self.sink
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// Reads the API token: the file named by `api_token_file`, else `CLOUDFLARE_API_TOKEN`.
    pub fn api_token(&self) -> Result<SecretString, ConfigError> {
        read_token(self.queue.api_token_file.as_deref(), |n| {
            std::env::var(n).ok()
        })
    }
}

/// Reads the token from `file` when given, else from the environment via `lookup`.
pub fn read_token(
    file: Option<&Path>,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<SecretString, ConfigError> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            ConfigError::Token(format!(
                "cannot read queue.api_token_file {}: {e}",
                path.display()
            ))
        })?,
        None => lookup(TOKEN_ENV).ok_or_else(|| {
            ConfigError::Token(format!(
                "no API token: set the environment variable {TOKEN_ENV} or queue.api_token_file \
                 (a Cloudflare API token with Queues read and write)"
            ))
        })?,
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(ConfigError::Token("the API token is empty".into()));
    }
    let secret = SecretString::from(token);
    debug_assert!(!secret.expose_secret().is_empty());
    Ok(secret)
}

/// Replaces `${NAME}` with `lookup(NAME)`; `$$` stands for a literal `$`. Comments are
/// left alone, so a commented-out `${NAME}` needs no variable.
pub fn interpolate(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    for (start, end) in comment_spans(text) {
        interpolate_code(text, done, start, &lookup, &mut out)?;
        out.push_str(&text[start..end]);
        done = end;
    }
    interpolate_code(text, done, text.len(), &lookup, &mut out)?;
    Ok(out)
}

/// Interpolates `text[from..to]`, which holds no comment, into `out`.
fn interpolate_code(
    text: &str,
    from: usize,
    to: usize,
    lookup: &impl Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), ConfigError> {
    let mut rest = &text[from..to];
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let offset = to - rest.len() + pos;
            let line = text[..offset].matches('\n').count() + 1;
            let end = tail
                .find(['}', '\n'])
                .filter(|&i| tail.as_bytes()[i] == b'}')
                .ok_or(ConfigError::BadInterpolation(line))?;
            let name = &tail[..end];
            let value = lookup(name).ok_or_else(|| ConfigError::MissingEnv(name.to_string()))?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(())
}

/// Byte ranges of TOML comments (from `#` to the end of its line), skipping `#` inside
/// basic, literal and multi-line strings.
fn comment_spans(text: &str) -> Vec<(usize, usize)> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Code,
        Basic,
        Literal,
        MultiBasic,
        MultiLiteral,
    }
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut state = State::Code;
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        match state {
            State::Code => match bytes[i] {
                b'#' => {
                    let end = text[i..].find('\n').map_or(text.len(), |n| i + n);
                    spans.push((i, end));
                    i = end;
                    continue;
                }
                b'"' if rest.starts_with(b"\"\"\"") => {
                    state = State::MultiBasic;
                    i += 3;
                    continue;
                }
                b'\'' if rest.starts_with(b"'''") => {
                    state = State::MultiLiteral;
                    i += 3;
                    continue;
                }
                b'"' => state = State::Basic,
                b'\'' => state = State::Literal,
                _ => {}
            },
            State::Basic => match bytes[i] {
                b'\\' => i += 1,
                b'"' | b'\n' => state = State::Code,
                _ => {}
            },
            State::Literal => {
                if matches!(bytes[i], b'\'' | b'\n') {
                    state = State::Code;
                }
            }
            State::MultiBasic => match bytes[i] {
                b'\\' => i += 1,
                b'"' if rest.starts_with(b"\"\"\"") => {
                    state = State::Code;
                    i += 3;
                    continue;
                }
                _ => {}
            },
            State::MultiLiteral => {
                if rest.starts_with(b"'''") {
                    state = State::Code;
                    i += 3;
                    continue;
                }
            }
        }
        i += 1;
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[queue]
account_id = "acc"
queue_id = "q"
[sink]
type = "stdout"
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MINIMAL, no_env).unwrap();
        assert_eq!(c.queue.batch_size, 100);
        assert_eq!(c.queue.visibility_timeout_ms, 60_000);
        assert_eq!(c.queue.pullers, 4);
        assert_eq!(c.queue.max_in_flight, 2000);
        assert_eq!(c.queue.api_base_url, DEFAULT_API_BASE_URL);
        assert_eq!(c.queue.v8_policy, V8Policy::Release);
    }

    #[test]
    fn unknown_key_names_its_path() {
        let text = MINIMAL.replace("queue_id = \"q\"", "queue_id = \"q\"\nbatchsize = 5");
        let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
        assert!(err.contains("queue.batchsize"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
        let text = MINIMAL.replace(
            "type = \"stdout\"",
            "type = \"jsonl\"\npath = \"x\"\npth = 1",
        );
        let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
        assert!(err.contains("pth"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        for (key, value) in [
            ("batch_size", "101"),
            ("batch_size", "0"),
            ("visibility_timeout_ms", "43200001"),
            ("pullers", "0"),
            ("retry_max_delay_secs", "50000"),
        ] {
            let text = MINIMAL.replace(
                "queue_id = \"q\"",
                &format!("queue_id = \"q\"\n{key} = {value}"),
            );
            let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
            assert!(
                err.contains(&format!("queue.{key}")),
                "{key}={value}: {err}"
            );
        }
    }

    #[test]
    fn missing_required_key_is_named() {
        let text = MINIMAL.replace("account_id = \"acc\"\n", "");
        let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
        assert!(err.contains("account_id"), "{err}");
        let err = Config::from_toml("[queue]\naccount_id='a'\nqueue_id='q'\n", no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sink"), "{err}");
    }

    #[test]
    fn env_interpolation() {
        let text = MINIMAL.replace("\"acc\"", "\"${ACC}\"");
        let c = Config::from_toml(&text, |n| (n == "ACC").then(|| "from-env".to_string())).unwrap();
        assert_eq!(c.queue.account_id, "from-env");
        let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
        assert!(err.contains("${ACC}"), "{err}");
        assert_eq!(interpolate("a$$b$c", no_env).unwrap(), "a$b$c");
        // Comments are not interpolated; `#` inside strings does not start one.
        let text = "# password = \"${UNSET}\"\nkey = \"a#${X}\" # ${UNSET}\nm = '''\n#${X}'''\n";
        let x = |n: &str| (n == "X").then(|| "x".to_string());
        assert_eq!(
            interpolate(text, x).unwrap(),
            "# password = \"${UNSET}\"\nkey = \"a#x\" # ${UNSET}\nm = '''\n#x'''\n"
        );
        assert!(matches!(
            interpolate("x\n${OPEN", no_env),
            Err(ConfigError::BadInterpolation(2))
        ));
    }

    #[test]
    fn unknown_sink_type_is_an_error() {
        let text = MINIMAL.replace("\"stdout\"", "\"s3\"");
        let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
        assert!(err.contains("sink"), "{err}");
    }

    #[test]
    fn token_comes_from_file_or_env_and_never_prints() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tok");
        std::fs::write(&file, "s3cr3t-token\n").unwrap();
        let t = read_token(Some(&file), no_env).unwrap();
        assert_eq!(t.expose_secret(), "s3cr3t-token");
        assert!(!format!("{t:?}").contains("s3cr3t"));
        let t = read_token(None, |n| (n == TOKEN_ENV).then(|| "envtok".into())).unwrap();
        assert_eq!(t.expose_secret(), "envtok");
        let err = read_token(None, no_env).unwrap_err().to_string();
        assert!(err.contains(TOKEN_ENV), "{err}");
    }
}
