//! Pull loops: wait for room in the in-flight bound and a healthy sink, pull a batch,
//! decode it, hand it to a delivery task. Empty pulls and API errors back off.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::task::TaskTracker;

use super::backoff::Backoff;
use super::delivery::{self, Leased};
use super::{Settlement, Shared};
use crate::bump;
use crate::cloudflare::{ApiError, PullRequest, PullResult};
use crate::decode::{self, DecodeError};

/// One pull loop. Returns when the pipeline stops pulling.
pub(crate) async fn run(shared: Arc<Shared>, index: u32, deliveries: TaskTracker) {
    let cfg = &shared.cfg;
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
    let batch = cfg.batch_size as usize;
    let mut health = shared.sink_healthy.subscribe();

    loop {
        // Wait for a healthy sink: no point leasing what cannot be delivered.
        tokio::select! {
            biased;
            () = shared.stop.cancelled() => return,
            r = health.wait_for(|healthy| *healthy) => if r.is_err() { return },
        }
        // Wait for room for a whole batch.
        let permits = tokio::select! {
            biased;
            () = shared.stop.cancelled() => return,
            p = Arc::clone(&shared.inflight).acquire_many_owned(batch as u32) => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        tokio::select! {
            biased;
            () = shared.stop.cancelled() => return,
            () = shared.respect_rate_limit() => {}
        }
        // A pull that has been sent is allowed to complete: its messages are leased to us
        // either way, and releasing them is better than letting them wait out the lease.
        let pulled_at = Instant::now();
        let result = shared.client.pull(request).await;
        match result {
            Ok(result) => {
                error_backoff.reset();
                paused_backoff.reset();
                let received = result.messages.len() + result.broken.len();
                bump!(shared.stats, pulls);
                bump!(shared.stats, pulled, received);
                // Keep one permit per leased message; the acker returns them.
                permits.forget();
                if received <= batch {
                    shared.inflight.add_permits(batch - received);
                } else {
                    // More messages than asked for: hold a permit for each of them too, or
                    // the acker would return more permits than were taken.
                    let extra = received - batch;
                    let taken = shared.inflight.forget_permits(extra);
                    if taken < extra {
                        tracing::warn!(received, batch_size = batch, "pull returned more messages than asked for; the in-flight bound is exceeded until they settle");
                        shared
                            .excess_permits
                            .fetch_add((extra - taken) as u64, Ordering::AcqRel);
                    }
                }
                shared
                    .outstanding
                    .fetch_add(received as u64, Ordering::AcqRel);
                if result.unreleasable > 0 {
                    bump!(shared.stats, malformed_responses);
                    tracing::warn!(
                        puller = index,
                        entries = result.unreleasable,
                        "pull response had entries without a usable lease_id; they will be redelivered when their lease expires"
                    );
                }
                if received == 0 {
                    bump!(shared.stats, empty_pulls);
                    if shared.until_empty && is_drained(&shared, &result) {
                        tracing::info!(
                            puller = index,
                            "queue drained: backlog 0 and nothing in flight"
                        );
                        shared.drained.cancel();
                        shared.stop.cancel();
                        return;
                    }
                    let delay = empty_backoff.next_delay();
                    tracing::trace!(puller = index, delay_ms = delay.as_millis() as u64, backlog = ?result.backlog, "empty pull");
                    // When draining and only our own unsettled messages are left, look
                    // again as soon as they settle rather than after a full back-off.
                    let idle = shared.idle.notified();
                    let only_ours =
                        shared.until_empty && result.backlog.unwrap_or(0) <= shared.outstanding();
                    tokio::select! {
                        () = shared.stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                        () = idle, if only_ours => {}
                    }
                    continue;
                }
                empty_backoff.reset();
                let deadline = pulled_at + Duration::from_millis(cfg.visibility_timeout_ms);
                tracing::debug!(puller = index, count = received, backlog = ?result.backlog, "pulled batch");
                let leased = decode_batch(&shared, result);
                if leased.is_empty() {
                    continue;
                }
                if shared.stop.is_cancelled() {
                    // Pulled while stopping: give the messages straight back.
                    bump!(shared.stats, shutdown_releases, leased.len());
                    shared.release_all(leased.into_iter().map(|l| l.lease_id), 0);
                    return;
                }
                deliveries.spawn(delivery::run(Arc::clone(&shared), leased, deadline));
            }
            Err(error) => {
                drop(permits);
                if error.is_fatal() {
                    shared.fail(error);
                    return;
                }
                let delay = on_pull_error(
                    &shared,
                    index,
                    &error,
                    &mut error_backoff,
                    &mut paused_backoff,
                );
                tokio::select! {
                    () = shared.stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Logs and counts a retryable pull error and returns how long to wait.
fn on_pull_error(
    shared: &Shared,
    index: u32,
    error: &ApiError,
    error_backoff: &mut Backoff,
    paused_backoff: &mut Backoff,
) -> Duration {
    match error {
        ApiError::RateLimited { retry_after } => {
            bump!(shared.stats, rate_limited);
            let delay = retry_after.unwrap_or_else(|| error_backoff.next_delay());
            shared.rate_limited(delay);
            tracing::warn!(
                puller = index,
                delay_ms = delay.as_millis() as u64,
                "pull rate limited (429); waiting as told"
            );
            delay
        }
        ApiError::Paused { .. } => {
            bump!(shared.stats, paused);
            let delay = paused_backoff.next_delay();
            tracing::warn!(puller = index, error = %error, delay_ms = delay.as_millis() as u64, "queue is paused; waiting");
            delay
        }
        ApiError::Malformed { .. } => {
            bump!(shared.stats, malformed_responses);
            let delay = error_backoff.next_delay();
            tracing::warn!(puller = index, error = %error, delay_ms = delay.as_millis() as u64, "malformed pull response; retrying");
            delay
        }
        _ => {
            bump!(shared.stats, server_errors);
            let delay = error_backoff.next_delay();
            tracing::warn!(puller = index, error = %error, delay_ms = delay.as_millis() as u64, "pull failed; retrying");
            delay
        }
    }
}

/// True when `--until-empty` may stop: this pull was empty, the backlog is 0 (or not
/// reported), and no message is leased and unsettled.
fn is_drained(shared: &Shared, result: &PullResult) -> bool {
    result.backlog.unwrap_or(0) == 0 && shared.outstanding() == 0
}

/// Decodes a batch. Messages that cannot be decoded are released right away (with the
/// failure delay, so Cloudflare's `max_retries` and dead-letter queue take over), logged
/// and counted; they never reach the sink.
fn decode_batch(shared: &Shared, result: PullResult) -> Vec<Leased> {
    let mut released = Vec::new();
    for broken in result.broken {
        bump!(shared.stats, malformed_responses);
        tracing::warn!(
            message_id = broken.id.as_deref().unwrap_or("?"),
            problem = %broken.problem,
            "pulled message is malformed; releasing it for retry"
        );
        released.push(Settlement::retry(broken.lease_id, shared.failure_delay(1)));
    }
    let mut leased = Vec::with_capacity(result.messages.len());
    for mut message in result.messages {
        let lease_id = std::mem::take(&mut message.lease_id);
        let attempts = message.attempts;
        match decode::decode(message, &shared.queue_id, shared.cfg.v8_policy) {
            Ok(record) => leased.push(Leased { lease_id, record }),
            Err((error, id)) => {
                match &error {
                    DecodeError::V8 => bump!(shared.stats, v8_released),
                    DecodeError::Oversized(_) => bump!(shared.stats, oversized),
                    _ => bump!(shared.stats, decode_errors),
                }
                let delay = shared.failure_delay(attempts);
                tracing::warn!(
                    message_id = %id,
                    attempts,
                    kind = error.kind(),
                    error = %error,
                    retry_delay_s = delay,
                    "message not forwarded: released for retry (Cloudflare's max_retries / dead-letter queue apply)"
                );
                released.push(Settlement::retry(lease_id, delay));
            }
        }
    }
    shared.settle_all(released);
    leased
}
