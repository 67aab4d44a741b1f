//! Pull loops: wait for room in the in-flight bound and a healthy sink, pull a batch,
//! decode it, hand it to the pipeline. Empty pulls and API errors back off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::acker::{Pending, Settled};
use super::decode::{self, DecodeError};
use super::tuner::PullSeen;
use super::CloudflareSource;
use crate::bump;
use crate::cloudflare::{ApiError, PullRequest, PullResult};
use crate::pipeline::backoff::Backoff;
use crate::pipeline::{Feed, InFlight, Retry, SourceBatch};

/// One pull loop. Returns when the pipeline stops reading.
pub(crate) async fn run(source: Arc<CloudflareSource>, feed: Feed<String>, index: u32) {
    let cfg = &source.cfg;
    let mut empty_backoff = Backoff::new(
        Duration::from_millis(cfg.empty_backoff_min_ms),
        Duration::from_millis(cfg.empty_backoff_max_ms),
    );
    let mut error_backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut paused_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let request = PullRequest {
        batch_size: cfg.batch_size,
        visibility_timeout_ms: cfg.visibility_timeout_ms,
    };
    let stop = feed.stopping();

    loop {
        // Wait for this loop's turn (the tuner may have parked it), a healthy sink and
        // room for a whole batch.
        if !source.tuner.wait_turn(index, stop).await {
            return;
        }
        let Some(room) = feed.reserve(cfg.batch_size).await else {
            return;
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = source.respect_rate_limit() => {}
        }
        // A pull that has been sent is allowed to complete: its messages are leased to us
        // either way, and releasing them is better than letting them wait out the lease.
        let pulled_at = Instant::now();
        let result = source.client.pull(request).await;
        let took = pulled_at.elapsed();
        source.stats.pull_took(took);
        match result {
            Ok(result) => {
                error_backoff.reset();
                paused_backoff.reset();
                source.stats.api_ok();
                source
                    .stats
                    .gauges
                    .set_queue(result.backlog, result.oldest_message_timestamp_ms);
                let received = result.messages.len() + result.broken.len();
                bump!(source.stats, pulls);
                bump!(source.stats, pulled, received);
                let redelivered = result.messages.iter().filter(|m| m.attempts > 1).count();
                bump!(source.stats, redelivered, redelivered);
                // Keep room for each leased message; settling them returns it.
                let in_flight = room.take(received);
                source.tuner.pulled(PullSeen {
                    received,
                    batch_size: cfg.batch_size,
                    backlog: result.backlog,
                    in_flight: feed.flow().outstanding(),
                    max_in_flight: cfg.max_in_flight,
                    took,
                });
                if result.unreleasable > 0 {
                    bump!(source.stats, malformed_responses);
                    tracing::warn!(
                        queue_id = %source.queue_id,
                        puller = index,
                        entries = result.unreleasable,
                        "pull response had entries without a usable lease_id; they will be redelivered when their lease expires"
                    );
                }
                if received == 0 {
                    bump!(source.stats, empty_pulls);
                    if source.until_empty && is_drained(&feed, &result) {
                        tracing::info!(
                            queue_id = %source.queue_id,
                            puller = index,
                            "queue drained: backlog 0 and nothing in flight"
                        );
                        feed.exhausted();
                        return;
                    }
                    let delay = empty_backoff.next_delay();
                    tracing::trace!(puller = index, delay_ms = delay.as_millis() as u64, backlog = ?result.backlog, "empty pull");
                    // When draining and only our own unsettled messages are left, look
                    // again as soon as they settle rather than after a full back-off.
                    let idle = feed.flow().idle();
                    let only_ours = source.until_empty
                        && result.backlog.unwrap_or(0) <= feed.flow().outstanding();
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                        () = idle, if only_ours => {}
                    }
                    continue;
                }
                empty_backoff.reset();
                let deadline = pulled_at + Duration::from_millis(cfg.visibility_timeout_ms);
                tracing::debug!(queue_id = %source.queue_id, puller = index, count = received, backlog = ?result.backlog, "pulled batch");
                let Some(batch) = decode_batch(&source, result, in_flight, deadline) else {
                    continue;
                };
                if stop.is_cancelled() {
                    // Pulled while stopping: give the messages straight back.
                    bump!(source.stats, shutdown_releases, batch.tickets.len());
                    let items = batch
                        .tickets
                        .into_iter()
                        .map(|ticket| {
                            Pending::retry(Retry {
                                ticket,
                                delay_secs: 0,
                                reason: None,
                            })
                        })
                        .collect();
                    source.to_acker(Settled {
                        items,
                        in_flight: batch.in_flight,
                    });
                    return;
                }
                feed.deliver(batch);
            }
            Err(error) => {
                drop(room);
                source.stats.api_error(&error);
                if error.is_fatal() {
                    feed.fail(error);
                    return;
                }
                let delay = on_pull_error(
                    &source,
                    index,
                    &error,
                    &mut error_backoff,
                    &mut paused_backoff,
                );
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Logs a retryable pull error (already counted) and returns how long to wait.
fn on_pull_error(
    source: &CloudflareSource,
    index: u32,
    error: &ApiError,
    error_backoff: &mut Backoff,
    paused_backoff: &mut Backoff,
) -> Duration {
    match error {
        ApiError::RateLimited { retry_after } => {
            source.tuner.rate_limited();
            let delay = retry_after.unwrap_or_else(|| error_backoff.next_delay());
            source.rate_limited(delay);
            tracing::warn!(
                puller = index,
                delay_ms = delay.as_millis() as u64,
                "pull rate limited (429); waiting as told"
            );
            delay
        }
        ApiError::Paused { .. } => {
            let delay = paused_backoff.next_delay();
            tracing::warn!(puller = index, error = %error, delay_ms = delay.as_millis() as u64, "queue is paused; waiting");
            delay
        }
        ApiError::Malformed { .. } => {
            let delay = error_backoff.next_delay();
            tracing::warn!(puller = index, error = %error, delay_ms = delay.as_millis() as u64, "malformed pull response; retrying");
            delay
        }
        _ => {
            let delay = error_backoff.next_delay();
            tracing::warn!(puller = index, error = %error, delay_ms = delay.as_millis() as u64, "pull failed; retrying");
            delay
        }
    }
}

/// True when `--until-empty` may stop: this pull was empty, the backlog is 0 (or not
/// reported), and no message is leased and unsettled.
fn is_drained(feed: &Feed<String>, result: &PullResult) -> bool {
    result.backlog.unwrap_or(0) == 0 && feed.flow().outstanding() == 0
}

/// Decodes a batch. Messages that cannot be decoded are released right away (with the
/// failure delay, so Cloudflare's `max_retries` and dead-letter queue take over), logged
/// and counted; they never reach the sink. `None` when nothing is left to deliver.
fn decode_batch(
    source: &CloudflareSource,
    result: PullResult,
    mut in_flight: InFlight,
    deadline: Instant,
) -> Option<SourceBatch<String>> {
    let options = &source.options;
    let mut released = Vec::new();
    for broken in result.broken {
        bump!(source.stats, malformed_responses);
        tracing::warn!(
            queue_id = %source.queue_id,
            message_id = broken.id.as_deref().unwrap_or("?"),
            problem = %broken.problem,
            "pulled message is malformed; releasing it for retry"
        );
        released.push(Pending::retry(Retry {
            ticket: broken.lease_id,
            delay_secs: options.failure_delay(1),
            reason: None,
        }));
    }
    let mut tickets = Vec::with_capacity(result.messages.len());
    let mut records = Vec::with_capacity(result.messages.len());
    for mut message in result.messages {
        let lease_id = std::mem::take(&mut message.lease_id);
        let attempts = message.attempts;
        match decode::decode(message, &source.queue_id, source.cfg.v8_policy) {
            Ok(record) => {
                tickets.push(lease_id);
                records.push(record);
            }
            Err((error, id)) => {
                match &error {
                    DecodeError::V8 => bump!(source.stats, v8_released),
                    DecodeError::Oversized(_) => bump!(source.stats, oversized),
                    DecodeError::BadBase64 { .. } => {
                        bump!(source.stats, decode_errors);
                        bump!(source.stats, decode_errors_base64);
                    }
                    DecodeError::InvalidJson(_) => {
                        bump!(source.stats, decode_errors);
                        bump!(source.stats, decode_errors_json);
                    }
                    DecodeError::MissingContentType | DecodeError::UnknownContentType(_) => {
                        bump!(source.stats, decode_errors);
                        bump!(source.stats, decode_errors_content_type);
                    }
                }
                let delay = options.failure_delay(attempts);
                tracing::warn!(
                    queue_id = %source.queue_id,
                    message_id = %id,
                    attempts,
                    kind = error.kind(),
                    error = %error,
                    retry_delay_s = delay,
                    "message not forwarded: released for retry (Cloudflare's max_retries / dead-letter queue apply)"
                );
                released.push(Pending::retry(Retry {
                    ticket: lease_id,
                    delay_secs: delay,
                    reason: None,
                }));
            }
        }
    }
    let held = in_flight.split(released.len() as u64);
    source.to_acker(Settled {
        items: released,
        in_flight: held,
    });
    if records.is_empty() {
        return None;
    }
    Some(SourceBatch {
        records,
        tickets,
        deadline: Some(deadline),
        in_flight,
    })
}
