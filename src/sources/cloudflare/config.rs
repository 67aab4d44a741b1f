//! The `[queue]` table: which Cloudflare queue to pull from, and how.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

pub use cfq_cloudflare::DEFAULT_API_BASE_URL;
/// Cloudflare's largest visibility timeout and retry delay: 12 hours.
pub const MAX_VISIBILITY_TIMEOUT_MS: u64 = 43_200_000;
/// Cloudflare's largest retry delay, in seconds.
pub const MAX_RETRY_DELAY_SECS: u64 = cfq_cloudflare::MAX_DELAY_SECONDS;

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
    /// Concurrent pull loops: `"auto"` (the default) tunes their number between
    /// `min_pullers` and `max_pullers` (see `tuner.rs`); a number fixes it.
    #[serde(default)]
    pub pullers: Concurrency,
    /// Fewest pull loops under `pullers = "auto"` (an idle queue costs one pull per
    /// back-off period per loop).
    #[serde(default = "default_min_pullers")]
    pub min_pullers: u32,
    /// Most pull loops under `pullers = "auto"`.
    #[serde(default = "default_max_pullers")]
    pub max_pullers: u32,
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
    /// Ack calls in flight at once: `"auto"` (the default) starts at 4 and grows while
    /// confirmations wait for a free call, up to `max_ack_concurrency`, halving on 429; a
    /// number fixes it.
    #[serde(default)]
    pub ack_concurrency: Concurrency,
    /// Most ack calls in flight under `ack_concurrency = "auto"`.
    #[serde(default = "default_max_ack_concurrency")]
    pub max_ack_concurrency: u32,
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
    /// before they are acknowledged, and acknowledged first thing after a restart. The
    /// file records the account and queue it belongs to, and is held under an exclusive
    /// lock (`<path>.lock`, holding the owner's pid): one bridge per journal.
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

impl QueueConfig {
    /// I/O-free range and consistency checks. The error names the key.
    pub fn validate(&self) -> Result<(), String> {
        let q = self;
        let invalid = |m: String| Err(m);
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
        if let Concurrency::Fixed(n) = q.pullers {
            if !(1..=64).contains(&n) {
                return invalid(format!("queue.pullers must be \"auto\" or 1..=64, got {n}"));
            }
        }
        if !(1..=64).contains(&q.min_pullers)
            || !(1..=64).contains(&q.max_pullers)
            || q.min_pullers > q.max_pullers
        {
            return invalid(format!(
                "queue.min_pullers ({}) and queue.max_pullers ({}) must be 1..=64, min ≤ max",
                q.min_pullers, q.max_pullers
            ));
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
        if let Concurrency::Fixed(n) = q.ack_concurrency {
            if !(1..=64).contains(&n) {
                return invalid(format!(
                    "queue.ack_concurrency must be \"auto\" or 1..=64, got {n}"
                ));
            }
        }
        if !(1..=64).contains(&q.max_ack_concurrency) {
            return invalid(format!(
                "queue.max_ack_concurrency must be 1..=64, got {}",
                q.max_ack_concurrency
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
        Ok(())
    }
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
fn default_min_pullers() -> u32 {
    1
}
fn default_max_pullers() -> u32 {
    16
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
fn default_max_ack_concurrency() -> u32 {
    32
}

/// A number of concurrent loops or calls: tuned at run time, or fixed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Concurrency {
    /// Tuned between bounds (`"auto"`).
    #[default]
    Auto,
    /// Exactly this many.
    Fixed(u32),
}

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u32),
            Word(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(Concurrency::Fixed(n)),
            Raw::Word(word) if word == "auto" => Ok(Concurrency::Auto),
            Raw::Word(word) => Err(serde::de::Error::custom(format!(
                "expected \"auto\" or a number, got {word:?}"
            ))),
        }
    }
}

impl std::fmt::Display for Concurrency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Concurrency::Auto => f.write_str("auto"),
            Concurrency::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl QueueConfig {
    /// The most pull loops this config can run at once.
    pub fn most_pullers(&self) -> u32 {
        match self.pullers {
            Concurrency::Auto => self.max_pullers,
            Concurrency::Fixed(n) => n,
        }
    }

    /// The most ack calls this config can have in flight at once.
    pub fn most_ack_calls(&self) -> u32 {
        match self.ack_concurrency {
            Concurrency::Auto => self.max_ack_concurrency,
            Concurrency::Fixed(n) => n,
        }
    }
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
