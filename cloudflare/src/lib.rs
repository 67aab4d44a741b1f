//! Cloudflare Queues over HTTP, as the bridge's sources, sinks and tools use it: one
//! client for the Cloudflare source (pull, ack) and the `cloudflare_queue` sink (publish).
//!
//! - [`client`]: the HTTP client for one queue (pull, ack, publish, queue details);
//! - [`wire`]: request and response bodies, and their tolerant parsers;
//! - [`error`]: [`ApiError`] and how an HTTP answer is classified into one;
//! - [`queue_details`]: the queue details (consumers, settings), read leniently.
//!
//! Every request matches Cloudflare's OpenAPI schema (`visibility_timeout_ms`, never
//! `visibility_timeout`). Every answer is classified into an [`ApiError`] that says what
//! the caller should do: stop (bad token, unknown queue), wait (`Retry-After`, paused
//! queue), or back off and retry (5xx, transport errors, malformed answers). Nothing here
//! panics on what the network sends.

pub mod client;
pub mod error;
pub mod queue_details;
pub mod wire;

/// Cloudflare's API base URL.
pub const DEFAULT_API_BASE_URL: &str = "https://api.cloudflare.com/client/v4";
/// The longest delay Cloudflare accepts, for a retry as for a publish: 12 hours, in
/// seconds.
pub const MAX_DELAY_SECONDS: u64 = 43_200;

pub use client::{Client, ClientOptions};
pub use error::{classify_answer, ApiError};
pub use queue_details::{Consumer, ConsumerSettings, QueueDetails, QueueSettings};
pub use wire::{
    parse_ack_response, parse_ack_result, parse_publish_response, parse_pull_response,
    parse_pull_result, AckItem, AckRequest, AckResult, BrokenMessage, PublishBatchRequest,
    PublishBody, PublishContentType, PublishMessage, PublishResult, PullRequest, PullResult,
    PulledMessage, RetryItem, MAX_PUBLISH_BATCH_BYTES, MAX_PUBLISH_BATCH_MESSAGES,
    MAX_PUBLISH_DELAY_SECONDS, MAX_PUBLISH_MESSAGE_BYTES,
};
