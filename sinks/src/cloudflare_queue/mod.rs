//! The `cloudflare_queue` sink (cargo feature `cloudflare_queue`): records published into
//! a Cloudflare queue over the HTTP API, each confirmed only when the batch call that
//! carried it answered `success: true`. For replaying archives, redriving a dead-letter
//! queue into its main queue, and moving queues between accounts or jurisdictions.
//!
//! - [`config`](CloudflareQueueConfig): the `[sink]` settings, parsed and validated in
//!   every build, and the token (from a file or a named environment variable);
//! - `batch`: records to messages (`text` as a string, `json` embedded raw, `bytes` by
//!   [`BytesPolicy`], `v8` never), calls within the API's limits (100 messages, 256 KB;
//!   128 KB a message), the counters ([`PublishStats`]) and [`plan`] for dry runs;
//! - `sink`: [`CloudflareQueue`], the rate limiter, the calls with their retries, and the
//!   rejects file.
//!
//! Without the `cloudflare_queue` feature only the settings, [`plan`] and the counters
//! exist, and building the sink answers "cloudflare_queue support not compiled in".

// Without the feature only `plan` and the counters' reading side are used.
#[cfg_attr(not(feature = "cloudflare_queue"), allow(dead_code))]
mod batch;
mod config;
#[cfg(feature = "cloudflare_queue")]
mod sink;

pub use batch::{plan, PublishSnapshot, PublishStats, SkipReason};
pub use config::{
    BytesPolicy, CloudflareQueueConfig, DEFAULT_API_BASE_URL, DEFAULT_MAX_MESSAGES_PER_SECOND,
    DEFAULT_MAX_RETRIES, DEFAULT_REQUEST_TIMEOUT_MS, DEFAULT_TOKEN_ENV, MAX_DELAY_SECONDS,
};
#[cfg(feature = "cloudflare_queue")]
pub use sink::CloudflareQueue;

use crate::{Sink, SinkError};

/// Metadata entry added to a record written to `rejects_path`: why it was not published
/// (`bytes_policy`, `v8`, `too_large`, `invalid_body` or `refused`, then a sentence).
pub const REJECT_REASON_KEY: &str = "cfq-reject-reason";

/// The error message of a build without the `cloudflare_queue` feature.
pub const NOT_COMPILED_IN: &str =
    "cloudflare_queue support not compiled in; rebuild with `--features cloudflare_queue`";

/// Builds the `cloudflare_queue` sink, or explains that this build has none. Goes through
/// [`crate::registry::build`], like every sink.
pub async fn build(config: &CloudflareQueueConfig) -> Result<Box<dyn Sink>, SinkError> {
    crate::registry::build("cloudflare_queue", config).await
}

/// Opens the sink behind the registry (settings already checked).
fn open_boxed(config: &CloudflareQueueConfig) -> Result<Box<dyn Sink>, SinkError> {
    #[cfg(not(feature = "cloudflare_queue"))]
    {
        let _ = config;
        Err(SinkError::permanent(NOT_COMPILED_IN))
    }
    #[cfg(feature = "cloudflare_queue")]
    {
        Ok(Box::new(CloudflareQueue::open(config)?))
    }
}

#[cfg(test)]
mod tests {
    #[cfg(not(feature = "cloudflare_queue"))]
    #[tokio::test]
    async fn build_without_the_feature_says_how_to_rebuild() {
        let config: super::CloudflareQueueConfig =
            toml::from_str("account_id = \"a\"\nqueue_id = \"q\"\n").unwrap();
        let error = super::build(&config).await.err().expect("build must fail");
        assert_eq!(error.message, super::NOT_COMPILED_IN);
    }
}
