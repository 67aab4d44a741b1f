//! The acker: groups settlements from many batches into few ack calls, retries failed
//! calls, and releases the records' room in the in-flight bound once a call went through.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::CloudflareSource;
use crate::bump;
use crate::cloudflare::{AckItem, AckRequest, ApiError, RetryItem};
use crate::pipeline::backoff::Backoff;
use crate::pipeline::{Confirmed, Feed, InFlight, Retry};

/// What to do with one lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    lease_id: String,
    /// `None`: acknowledge. `Some(d)`: release for redelivery after `d` seconds.
    retry_delay: Option<u64>,
    /// When the lease ends, as the bridge tracked it (acks after it are counted as late).
    deadline: Option<std::time::Instant>,
}

impl Pending {
    /// Acknowledge a record its sink confirmed.
    pub(crate) fn ack(
        confirmed: Confirmed<String>,
        deadline: Option<std::time::Instant>,
    ) -> Pending {
        Pending {
            lease_id: confirmed.into_ticket(),
            retry_delay: None,
            deadline,
        }
    }

    /// Acknowledge a lease the ack journal recorded as confirmed before a crash. The
    /// journal's entries come only from [`Confirmed`] values (see
    /// `CloudflareSource::settle`): this is the second, and last, way into `acks`.
    fn recovered(lease_id: String) -> Pending {
        Pending {
            lease_id,
            retry_delay: None,
            deadline: None,
        }
    }

    /// Release for redelivery after the retry's delay.
    pub(crate) fn retry(retry: Retry<String>) -> Pending {
        Pending {
            lease_id: retry.ticket,
            retry_delay: Some(retry.delay_secs.min(super::config::MAX_RETRY_DELAY_SECS)),
            deadline: None,
        }
    }
}

/// Settlements of one batch and the room they hold in the in-flight bound.
#[derive(Debug)]
pub struct Settled {
    /// One per lease.
    pub(crate) items: Vec<Pending>,
    /// Released once the items' ack call went through.
    pub(crate) in_flight: InFlight,
}

/// Runs until `done` is cancelled and everything received was sent. Returns how many
/// confirmed leases could not be acknowledged.
pub(crate) async fn run(
    source: Arc<CloudflareSource>,
    feed: Feed<String>,
    mut rx: mpsc::UnboundedReceiver<Settled>,
    done: CancellationToken,
) -> u64 {
    let cfg = &source.cfg;
    let calls = source.tuner.ack_calls();
    let tracker = TaskTracker::new();
    let max = cfg.ack_batch_size as usize;
    let interval = Duration::from_millis(cfg.ack_interval_ms);
    let unacked = Arc::new(AtomicU64::new(0));

    let new_call = |recovered: bool| Call {
        source: Arc::clone(&source),
        feed: feed.clone(),
        unacked: Arc::clone(&unacked),
        recovered,
    };
    // Acks the journal says were confirmed but never acknowledged (an earlier crash).
    if let Some(journal) = &source.journal {
        bump!(source.stats, journal_skipped_lines, journal.skipped_lines());
        let recovered = journal.pending();
        if !recovered.is_empty() {
            tracing::info!(
                queue_id = %source.queue_id,
                leases = recovered.len(),
                "acknowledging leases the ack journal recorded as confirmed before a crash"
            );
            for chunk in recovered.chunks(max) {
                let items = chunk.iter().cloned().map(Pending::recovered).collect();
                let held = InFlight::none(feed.flow());
                dispatch(&source, &calls, &tracker, new_call(true), items, held).await;
            }
        }
    }

    let mut buffer: Vec<Pending> = Vec::with_capacity(max);
    let mut held = InFlight::none(feed.flow());
    let mut first_at: Option<Instant> = None;
    loop {
        let flush_at = first_at.map(|t| t + interval);
        tokio::select! {
            biased;
            message = rx.recv() => match message {
                Some(settled) => {
                    buffer.extend(settled.items);
                    held.merge(settled.in_flight);
                    first_at.get_or_insert_with(Instant::now);
                    while buffer.len() >= max {
                        let rest = buffer.split_off(max);
                        let items = std::mem::replace(&mut buffer, rest);
                        let part = held.split(items.len() as u64);
                        dispatch(&source, &calls, &tracker, new_call(false), items, part).await;
                    }
                    if buffer.is_empty() {
                        first_at = None;
                    }
                }
                None => break,
            },
            () = sleep_until_opt(flush_at) => {
                let items = std::mem::replace(&mut buffer, Vec::with_capacity(max));
                first_at = None;
                let part = held.split(items.len() as u64);
                dispatch(&source, &calls, &tracker, new_call(false), items, part).await;
            }
            () = done.cancelled() => break,
        }
    }
    // Nothing new can arrive once `done` is cancelled (every delivery task has finished),
    // but take whatever is still queued.
    while let Ok(settled) = rx.try_recv() {
        buffer.extend(settled.items);
        held.merge(settled.in_flight);
    }
    for chunk in buffer.chunks(max) {
        let part = held.split(chunk.len() as u64);
        dispatch(
            &source,
            &calls,
            &tracker,
            new_call(false),
            chunk.to_vec(),
            part,
        )
        .await;
    }
    tracker.close();
    tracker.wait().await;
    unacked.load(Ordering::Acquire)
}

/// Waits for a free ack-call slot, then sends `items` in a call of its own. Having to
/// wait tells the tuner that more calls would help.
async fn dispatch(
    source: &CloudflareSource,
    calls: &Arc<Semaphore>,
    tracker: &TaskTracker,
    call: Call,
    items: Vec<Pending>,
    held: InFlight,
) {
    if items.is_empty() {
        return;
    }
    if calls.available_permits() == 0 {
        source.tuner.ack_calls_saturated();
    }
    // The semaphore is never closed; `None` would only mean unbounded calls.
    let permit = Arc::clone(calls).acquire_owned().await.ok();
    tracker.spawn(call.send(items, held, permit));
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One ack call and its retries.
struct Call {
    source: Arc<CloudflareSource>,
    feed: Feed<String>,
    unacked: Arc<AtomicU64>,
    /// Leases recovered from the journal: they hold no in-flight room and were counted
    /// as acked by the run that confirmed them.
    recovered: bool,
}

impl Call {
    async fn send(self, items: Vec<Pending>, held: InFlight, _slot: Option<OwnedSemaphorePermit>) {
        let source = &self.source;
        let settled = items.len();
        let now = std::time::Instant::now();
        let mut late = 0usize;
        let mut request = AckRequest::default();
        for p in items {
            match p.retry_delay {
                None => {
                    if p.deadline.is_some_and(|d| d <= now) {
                        late += 1;
                    }
                    request.acks.push(AckItem {
                        lease_id: p.lease_id,
                    })
                }
                Some(delay_seconds) => request.retries.push(RetryItem {
                    lease_id: p.lease_id,
                    delay_seconds,
                }),
            }
        }
        if late > 0 {
            bump!(source.stats, late_acks, late);
            tracing::warn!(queue_id = %source.queue_id, leases = late, "acking after the lease deadline the bridge tracked (the lease may have expired: a duplicate is possible)");
        }
        let answered = if self.recovered {
            self.send_recovered(request.acks).await
        } else {
            match self.call(&request, settled).await {
                Ok(()) => {
                    self.mark_done(request.acks).await;
                    Ok(())
                }
                Err(error) => Err((error, request.acks.len() as u64)),
            }
        };
        if let Err((error, unacked)) = answered {
            self.unacked.fetch_add(unacked, Ordering::AcqRel);
            self.feed.fail(error);
            return;
        }
        // The call went through: the records' room returns to the in-flight bound.
        drop(held);
    }

    /// Sends one ack call, retrying what can be retried. Returns the first fatal error.
    async fn call(&self, request: &AckRequest, settled: usize) -> Result<(), ApiError> {
        let source = &self.source;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            source.respect_rate_limit().await;
            let started = std::time::Instant::now();
            let answer = source.client.ack(request).await;
            source.stats.ack_took(started.elapsed());
            match answer {
                Ok(result) => {
                    source.stats.api_ok();
                    bump!(source.stats, ack_calls);
                    if self.recovered {
                        bump!(source.stats, journal_recovered, request.acks.len());
                    } else {
                        bump!(source.stats, acked, request.acks.len());
                        bump!(source.stats, released, request.retries.len());
                    }
                    if !result.warnings.is_empty() {
                        bump!(source.stats, ack_warnings, result.warnings.len());
                        for (lease_id, warning) in result.warnings.iter().take(3) {
                            tracing::warn!(queue_id = %source.queue_id, lease_id = %lease_id, warning = %warning, "ack call answered with a warning");
                        }
                    }
                    return Ok(());
                }
                Err(error) if error.is_fatal() => {
                    source.stats.api_error(&error);
                    return Err(error);
                }
                Err(error) => {
                    source.stats.api_error(&error);
                    bump!(source.stats, ack_call_failures);
                    if matches!(error, ApiError::RateLimited { .. }) {
                        source.tuner.rate_limited();
                    }
                    let delay = match &error {
                        ApiError::RateLimited {
                            retry_after: Some(d),
                        } => {
                            source.rate_limited(*d);
                            *d
                        }
                        _ => backoff.next_delay(),
                    };
                    tracing::warn!(queue_id = %source.queue_id, error = %error, leases = settled, delay_ms = delay.as_millis() as u64, "ack call failed; retrying (acks are idempotent)");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Acks leases recovered from the journal. A 400 means the API refuses something in
    /// the call for good (a lease id it cannot take, however often it is sent): the call is
    /// split in halves until each refused lease stands alone, and that one is logged,
    /// counted and marked done in the journal, so it cannot stop every restart. Dropping it
    /// loses nothing: the journal only saves duplicates, and a message whose ack did not go
    /// through is delivered again. Other fatal errors (token, queue) still stop the run.
    async fn send_recovered(&self, acks: Vec<AckItem>) -> Result<(), (ApiError, u64)> {
        let mut parts = vec![acks];
        while let Some(part) = parts.pop() {
            let request = AckRequest {
                acks: part,
                retries: Vec::new(),
            };
            match self.call(&request, request.acks.len()).await {
                Ok(()) => self.mark_done(request.acks).await,
                Err(ApiError::Rejected { status: 400, .. }) if request.acks.len() > 1 => {
                    let mut first = request.acks;
                    let second = first.split_off(first.len() / 2);
                    // Depth first, in journal order.
                    parts.push(second);
                    parts.push(first);
                }
                Err(error @ ApiError::Rejected { status: 400, .. }) => {
                    bump!(self.source.stats, journal_dropped, request.acks.len());
                    for item in &request.acks {
                        tracing::warn!(lease_id = %item.lease_id, queue_id = %self.source.queue_id, error = %error, "the API refused a lease from the ack journal for good; dropped from the journal (its message is redelivered if still queued: a duplicate, no loss)");
                    }
                    self.mark_done(request.acks).await;
                }
                Err(error) => return Err((error, 0)),
            }
        }
        Ok(())
    }

    /// Marks leases done in the journal (acked, or dropped for good).
    async fn mark_done(&self, acks: Vec<AckItem>) {
        if let Some(journal) = &self.source.journal {
            let done: Vec<String> = acks.into_iter().map(|a| a.lease_id).collect();
            if let Err(e) = journal.record_acked(&done).await {
                tracing::warn!(queue_id = %self.source.queue_id, error = %e, "updating the ack journal failed");
            }
        }
    }
}
