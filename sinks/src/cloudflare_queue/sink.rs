//! [`CloudflareQueue`]: publishing batches of records into a Cloudflare queue.
//!
//! A batch of records becomes calls of at most 100 messages and 256 KB, sent one after
//! the other, each after the rate limiter granted its messages. A call's records are
//! [`Outcome::Confirmed`] only when the call answered `success: true`. A 429 is waited out
//! (`Retry-After`) and the call sent again; a server error, a malformed answer or a
//! transport error is retried with exponential back-off a bounded number of times, then
//! the call's records (and those of the calls not yet sent) fail as transient, and the
//! pipeline pauses until [`Sink::ready`] answers again. A bad token or a missing queue
//! fails them as permanent. A retried call may have been applied the first time:
//! duplicates are possible, loss is not.
//!
//! Records that cannot be published (see [`super::SkipReason`]) are written whole to the
//! rejects file, through the JSONL sink (fsynced), and only then answered
//! [`Outcome::DeadLettered`]; without a rejects file, or when the record could not be
//! written there whole, they fail as permanent and stay at their source.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use cfq_cloudflare::{
    ApiError, Client, ClientOptions, PublishBatchRequest, MAX_PUBLISH_BATCH_MESSAGES,
};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use secrecy::SecretString;
use serde_json::Value;
use tracing::{debug, warn};

use super::batch::{prepare, split, PublishStats, Skip, SkipReason};
use super::{BytesPolicy, CloudflareQueueConfig, REJECT_REASON_KEY};
use crate::jsonl::{JsonlConfig, JsonlSink};
use crate::{CheckContext, Outcome, Record, Sink, SinkError};

/// The wait after a 429 that came without a `Retry-After` header.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest `Retry-After` waited out within one delivery; a longer one fails the
/// call as transient, and the pipeline pauses instead (its lease deadlines apply).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Most 429s one call waits out before its records fail as transient.
const MAX_RATE_LIMITED_WAITS: u32 = 30;
/// First back-off after a server or transport error; it doubles up to the maximum.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest back-off between two tries of a call.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Largest publish answer read (a publish answer is a small envelope).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Keep-alive connections kept to the API.
const POOL_SIZE: usize = 16;

/// Publishes records into one Cloudflare queue. See the module documentation.
pub struct CloudflareQueue {
    client: Client,
    account_id: String,
    queue_id: String,
    plain_http: bool,
    /// Grants messages at `max_messages_per_second`, in bursts of at most one call.
    limiter: DefaultDirectRateLimiter,
    /// Most messages in one call: 100, or the rate when it is lower (so a call never
    /// needs more than the limiter's burst).
    call_messages: usize,
    delay_seconds: Option<u64>,
    bytes_policy: BytesPolicy,
    max_retries: usize,
    /// Where records that cannot be published are kept, whole, when configured.
    rejects: Option<Rejects>,
    stats: Arc<PublishStats>,
}

impl std::fmt::Debug for CloudflareQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudflareQueue")
            .field("account_id", &self.account_id)
            .field("queue_id", &self.queue_id)
            .field("call_messages", &self.call_messages)
            .field("bytes_policy", &self.bytes_policy)
            .field("rejects", &self.rejects)
            .finish_non_exhaustive()
    }
}

/// Why a call did not publish its messages.
enum CallError {
    /// Retrying later may work (the destination is unavailable or overloaded).
    Transient(String),
    /// No call to this queue can work: the token is refused or the queue is missing.
    Fatal(String),
    /// The API refused what the call carried (a 4xx other than 401, 403, 404, 429).
    Refused(String),
}

/// The rejects file, opened (created and locked) when the first record is rejected, so
/// that a run that rejects nothing leaves no file behind.
struct Rejects {
    config: JsonlConfig,
    file: tokio::sync::OnceCell<JsonlSink>,
}

impl std::fmt::Debug for Rejects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rejects")
            .field("path", &self.config.path)
            .field("open", &self.file.initialized())
            .finish()
    }
}

impl Rejects {
    /// The open file, opening it on first use.
    async fn file(&self) -> Result<&JsonlSink, SinkError> {
        self.file
            .get_or_try_init(|| async { JsonlSink::open(&self.config) })
            .await
    }
}

impl CloudflareQueue {
    /// Checks the settings, reads the token (see [`CloudflareQueueConfig::token`]), builds
    /// the client. Makes no API call; the rejects file is opened when first needed.
    pub fn open(config: &CloudflareQueueConfig) -> Result<Self, SinkError> {
        config.check()?;
        let token = config.token()?;
        Self::open_with_token(config, &token)
    }

    /// [`CloudflareQueue::open`] with a token the caller already holds.
    pub fn open_with_token(
        config: &CloudflareQueueConfig,
        token: &SecretString,
    ) -> Result<Self, SinkError> {
        config.check()?;
        let plain_http = config.api_base_url.starts_with("http://");
        if plain_http {
            warn!(
                url = %config.api_base_url,
                "sink.api_base_url is plain http: the token travels unencrypted (fine for a local emulator only)"
            );
        }
        let client = Client::new(ClientOptions {
            base_url: &config.api_base_url,
            account_id: &config.account_id,
            queue_id: &config.queue_id,
            token,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            max_response_bytes: MAX_RESPONSE_BYTES,
            pool_size: POOL_SIZE,
        shared_pool: None,
        })
        .map_err(|e| SinkError::permanent(format!("cloudflare_queue sink: {e}")))?;
        let invalid_rate = || {
            SinkError::permanent(format!(
                "sink.max_messages_per_second must be at least 1, got {}",
                config.max_messages_per_second
            ))
        };
        let rate = NonZeroU32::new(config.max_messages_per_second).ok_or_else(invalid_rate)?;
        let call = config
            .max_messages_per_second
            .min(MAX_PUBLISH_BATCH_MESSAGES as u32);
        let burst = NonZeroU32::new(call).ok_or_else(invalid_rate)?;
        let limiter = RateLimiter::direct(Quota::per_second(rate).allow_burst(burst));
        let rejects = config.rejects_path.as_ref().map(|path| Rejects {
            config: JsonlConfig::file(path.clone()),
            file: tokio::sync::OnceCell::new(),
        });
        Ok(CloudflareQueue {
            client,
            account_id: config.account_id.clone(),
            queue_id: config.queue_id.clone(),
            plain_http,
            limiter,
            call_messages: call as usize,
            delay_seconds: (config.delay_seconds > 0).then_some(config.delay_seconds),
            bytes_policy: config.bytes_policy,
            max_retries: config.max_retries as usize,
            rejects,
            stats: Arc::new(PublishStats::default()),
        })
    }

    /// The sink's counters: published, calls, 429s, server errors, records skipped by
    /// reason. Shared: they keep counting after this returns.
    pub fn stats(&self) -> Arc<PublishStats> {
        Arc::clone(&self.stats)
    }

    /// What to tell an operator about a token or queue the API refused.
    fn describe_fatal(&self, error: &ApiError) -> String {
        match error {
            ApiError::Auth { status, message } => format!(
                "the destination queue {} refused the API token (HTTP {status}): {message}. \
                 Check the token named by sink.api_token_env (default CLOUDFLARE_API_TOKEN) or \
                 in sink.api_token_file: it needs Queues write permission on account {}",
                self.queue_id, self.account_id
            ),
            ApiError::NotFound { message } => format!(
                "the destination queue {} of account {} was not found (HTTP 404): {message}. \
                 Check sink.account_id and sink.queue_id (the queue id, not its name)",
                self.queue_id, self.account_id
            ),
            other => format!("the destination queue {}: {other}", self.queue_id),
        }
    }

    /// Sends one call, waiting out 429s and retrying server and transport errors with
    /// back-off. `Ok` only when the API answered `success: true`.
    async fn publish(&self, request: &PublishBatchRequest<'_>) -> Result<(), CallError> {
        let count = request.messages.len();
        // A call holds at least one message and at most the limiter's burst.
        let permits = NonZeroU32::new(count as u32).unwrap_or(NonZeroU32::MIN);
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(MIN_BACKOFF)
            .with_max_delay(MAX_BACKOFF)
            .with_max_times(self.max_retries)
            .with_jitter()
            .build();
        let mut rate_limited = 0u32;
        loop {
            if self.limiter.until_n_ready(permits).await.is_err() {
                return Err(CallError::Transient(format!(
                    "internal error: a call of {count} messages exceeds the rate limiter's burst"
                )));
            }
            self.stats.add_call();
            let error = match self.client.publish_batch(request).await {
                Ok(_) => {
                    self.stats.add_published(count);
                    return Ok(());
                }
                Err(error) => error,
            };
            let wait = match &error {
                ApiError::RateLimited { retry_after } => {
                    self.stats.add_rate_limited();
                    rate_limited += 1;
                    let wait = retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
                    (rate_limited <= MAX_RATE_LIMITED_WAITS && wait <= MAX_RETRY_AFTER)
                        .then_some(wait)
                }
                ApiError::Auth { .. } | ApiError::NotFound { .. } => {
                    return Err(CallError::Fatal(self.describe_fatal(&error)));
                }
                ApiError::Rejected { .. } => return Err(CallError::Refused(error.to_string())),
                ApiError::Transport(_) => {
                    self.stats.add_transport_error();
                    backoff.next()
                }
                ApiError::Server { .. } | ApiError::Malformed { .. } | ApiError::Paused { .. } => {
                    self.stats.add_server_error();
                    backoff.next()
                }
            };
            match wait {
                Some(delay) => {
                    warn!(
                        queue_id = %self.queue_id,
                        messages = count,
                        error = %error,
                        retry_in_ms = delay.as_millis() as u64,
                        "publish call failed; sending it again"
                    );
                    tokio::time::sleep(delay).await;
                }
                None => {
                    return Err(CallError::Transient(format!(
                        "publishing {count} messages to queue {} failed, retries exhausted: {error}",
                        self.queue_id
                    )));
                }
            }
        }
    }

    /// Handles the records that will not be published: counted and logged, then written
    /// whole to the rejects file (and dead-lettered) or failed as permanent.
    async fn reject(
        &self,
        records: &[Record],
        skipped: Vec<(usize, Skip)>,
        outcomes: &mut [Option<Outcome>],
    ) {
        let mut to_file = Vec::with_capacity(skipped.len());
        for (index, skip) in skipped {
            self.stats.add_skipped(skip.reason);
            warn!(
                queue_id = %self.queue_id,
                message_id = %records[index].id,
                reason = skip.reason.as_str(),
                detail = %skip.detail,
                "record not published"
            );
            // A body that is not valid text or JSON cannot be written as a JSON line
            // whole (it would be altered or break the line): it stays at its source.
            if self.rejects.is_some() && skip.reason != SkipReason::InvalidBody {
                to_file.push((index, skip));
            } else {
                let hint = if self.rejects.is_none() {
                    "; set sink.rejects_path to keep such records in a file"
                } else {
                    ""
                };
                outcomes[index] = Some(Outcome::Failed(SinkError::permanent(format!(
                    "not published ({}): {}{hint}",
                    skip.reason, skip.detail
                ))));
            }
        }
        let Some(rejects) = &self.rejects else {
            return;
        };
        if to_file.is_empty() {
            return;
        }
        let copies: Vec<Record> = to_file
            .iter()
            .map(|(index, skip)| with_reject_reason(&records[*index], skip))
            .collect();
        let written = match rejects.file().await {
            Ok(file) => file.deliver(&copies).await,
            Err(error) => vec![Outcome::Failed(error); copies.len()],
        };
        for ((index, skip), outcome) in to_file.into_iter().zip(written) {
            outcomes[index] = Some(match outcome {
                Outcome::Failed(error) => Outcome::Failed(SinkError {
                    class: error.class,
                    message: format!(
                        "not published ({}: {}), and writing it to sink.rejects_path failed: {}",
                        skip.reason, skip.detail, error.message
                    ),
                }),
                _ => {
                    self.stats.add_dead_lettered();
                    Outcome::DeadLettered {
                        reason: format!("{}: {}", skip.reason, skip.detail),
                    }
                }
            });
        }
    }
}

/// A copy of `record` with the reason it was not published in its metadata, under
/// `cfq-reject-reason` (or `cfq-reject-reason.N` when the record already has that entry,
/// which is kept: the copy must be whole).
fn with_reject_reason(record: &Record, skip: &Skip) -> Record {
    let mut copy = record.clone();
    let mut key = REJECT_REASON_KEY.to_owned();
    let mut n = 1;
    while copy.metadata.contains_key(&key) {
        key = format!("{REJECT_REASON_KEY}.{n}");
        n += 1;
    }
    copy.metadata.insert(
        key,
        Value::String(format!("{}: {}", skip.reason, skip.detail)),
    );
    copy
}

/// Gives `error` as the outcome of every record in `indices`.
fn fail(outcomes: &mut [Option<Outcome>], indices: &[usize], error: &SinkError) {
    for index in indices {
        outcomes[*index] = Some(Outcome::Failed(error.clone()));
    }
}

impl CallError {
    /// The outcome error of the call's records, and the one for the calls after it that
    /// are not sent.
    fn into_errors(self) -> (SinkError, SinkError) {
        match self {
            CallError::Transient(message) => (
                SinkError::transient(message.clone()),
                SinkError::transient(format!("not sent: an earlier call failed: {message}")),
            ),
            CallError::Fatal(message) | CallError::Refused(message) => (
                SinkError::permanent(message.clone()),
                SinkError::permanent(format!("not sent: an earlier call failed: {message}")),
            ),
        }
    }
}

#[async_trait]
impl Sink for CloudflareQueue {
    fn kind(&self) -> &'static str {
        "cloudflare_queue"
    }

    async fn deliver(&self, records: &[Record]) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; records.len()];
        let mut skipped = Vec::new();
        let mut messages = Vec::with_capacity(records.len());
        for (index, record) in records.iter().enumerate() {
            match prepare(record, self.bytes_policy) {
                Ok(message) => messages.push((index, message)),
                Err(skip) => skipped.push((index, skip)),
            }
        }
        // After a call fails for good, the calls after it are not sent: they would fail
        // the same way, each after its own retries.
        let mut stopped: Option<SinkError> = None;
        for call in split(messages, self.call_messages) {
            let (indices, messages): (Vec<usize>, Vec<_>) = call.into_iter().unzip();
            if let Some(error) = &stopped {
                fail(&mut outcomes, &indices, error);
                continue;
            }
            let request = PublishBatchRequest {
                messages,
                delay_seconds: self.delay_seconds,
            };
            match self.publish(&request).await {
                Ok(()) => {
                    for index in indices {
                        outcomes[index] = Some(Outcome::Confirmed);
                    }
                }
                Err(CallError::Refused(reason)) if indices.len() > 1 => {
                    // One message may spoil the call: send them one by one to publish the
                    // others and find the refused ones.
                    debug!(queue_id = %self.queue_id, messages = indices.len(), %reason, "a call was refused; sending its messages one by one");
                    for (index, message) in indices.into_iter().zip(request.messages) {
                        if let Some(error) = &stopped {
                            fail(&mut outcomes, &[index], error);
                            continue;
                        }
                        let single = PublishBatchRequest {
                            messages: vec![message],
                            delay_seconds: self.delay_seconds,
                        };
                        match self.publish(&single).await {
                            Ok(()) => outcomes[index] = Some(Outcome::Confirmed),
                            Err(CallError::Refused(reason)) => skipped.push((
                                index,
                                Skip {
                                    reason: SkipReason::Refused,
                                    detail: reason,
                                },
                            )),
                            Err(other) => {
                                let (now, later) = other.into_errors();
                                fail(&mut outcomes, &[index], &now);
                                stopped = Some(later);
                            }
                        }
                    }
                }
                Err(CallError::Refused(reason)) => {
                    for index in indices {
                        skipped.push((
                            index,
                            Skip {
                                reason: SkipReason::Refused,
                                detail: reason.clone(),
                            },
                        ));
                    }
                }
                Err(other) => {
                    let (now, later) = other.into_errors();
                    fail(&mut outcomes, &indices, &now);
                    stopped = Some(later);
                }
            }
        }
        if !skipped.is_empty() {
            self.reject(records, skipped, &mut outcomes).await;
        }
        outcomes
            .into_iter()
            .map(|outcome| {
                // Every record gets exactly one outcome above; this only keeps a slip from
                // ever becoming an acknowledgement.
                outcome.unwrap_or_else(|| {
                    Outcome::Failed(SinkError::transient(
                        "internal error: record left without an outcome",
                    ))
                })
            })
            .collect()
    }

    async fn ready(&self) -> Result<(), SinkError> {
        if let Some(file) = self.rejects.as_ref().and_then(|r| r.file.get()) {
            file.ready().await?;
        }
        match self.client.queue_details().await {
            Ok(_) => Ok(()),
            Err(error) if error.is_fatal() => Err(SinkError::permanent(self.describe_fatal(&error))),
            Err(error) => Err(SinkError::transient(format!(
                "the destination queue {} is not reachable: {error}",
                self.queue_id
            ))),
        }
    }

    async fn check(&self, _ctx: &CheckContext) -> Result<Vec<String>, SinkError> {
        self.ready().await?;
        let mut warnings = Vec::new();
        if self.plain_http {
            warnings.push(
                "sink.api_base_url is plain http: the token travels unencrypted (fine for a local emulator only)"
                    .to_owned(),
            );
        }
        if self.rejects.is_none() {
            warnings.push(format!(
                "records that cannot be published (v8{}, over 128 KB) are left at their source; \
                 set sink.rejects_path to keep them in a file instead",
                if self.bytes_policy == BytesPolicy::Refuse { ", bytes" } else { "" }
            ));
        }
        Ok(warnings)
    }

    async fn close(&self) -> Result<(), SinkError> {
        match self.rejects.as_ref().and_then(|r| r.file.get()) {
            Some(file) => file.close().await,
            None => Ok(()),
        }
    }
}
