//! The acker: groups settlements from many batches into few ack calls, retries failed
//! calls, and returns in-flight permits once a call went through.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::backoff::Backoff;
use super::journal::Journal;
use super::Shared;
use crate::bump;
use crate::cloudflare::{AckItem, AckRequest, ApiError, RetryItem};

/// What to do with one lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    lease_id: String,
    /// `None`: acknowledge. `Some(d)`: release for redelivery after `d` seconds.
    retry_delay: Option<u64>,
}

impl Settlement {
    /// Acknowledge: only for a record its sink confirmed (see the module docs of
    /// [`crate::pipeline`]).
    pub(crate) fn ack(lease_id: String) -> Settlement {
        Settlement {
            lease_id,
            retry_delay: None,
        }
    }

    /// Release for redelivery after `delay_seconds`.
    pub(crate) fn retry(lease_id: String, delay_seconds: u64) -> Settlement {
        Settlement {
            lease_id,
            retry_delay: Some(delay_seconds.min(crate::config::MAX_RETRY_DELAY_SECS)),
        }
    }
}

/// Runs until `done` is cancelled and everything received was sent. Returns how many
/// confirmed leases could not be acknowledged.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Vec<Settlement>>,
    journal: Option<Arc<Journal>>,
    done: CancellationToken,
) -> u64 {
    let calls = Arc::new(Semaphore::new(shared.cfg.ack_concurrency as usize));
    let tracker = TaskTracker::new();
    let max = shared.cfg.ack_batch_size as usize;
    let interval = Duration::from_millis(shared.cfg.ack_interval_ms);
    let unacked = Arc::new(std::sync::atomic::AtomicU64::new(0));

    let new_call = |recovered: bool| Call {
        shared: Arc::clone(&shared),
        journal: journal.clone(),
        unacked: Arc::clone(&unacked),
        recovered,
    };
    if let Some(journal) = &journal {
        bump!(shared.stats, journal_skipped_lines, journal.skipped_lines());
        let recovered = journal.pending();
        if !recovered.is_empty() {
            tracing::info!(
                leases = recovered.len(),
                "acknowledging leases the ack journal recorded as confirmed before a crash"
            );
            for chunk in recovered.chunks(max) {
                let items = chunk.iter().cloned().map(Settlement::ack).collect();
                dispatch(&calls, &tracker, new_call(true), items).await;
            }
        }
    }

    let mut buffer: Vec<Settlement> = Vec::with_capacity(max);
    let mut first_at: Option<Instant> = None;
    loop {
        let flush_at = first_at.map(|t| t + interval);
        tokio::select! {
            biased;
            message = rx.recv() => match message {
                Some(batch) => {
                    buffer.extend(batch);
                    first_at.get_or_insert_with(Instant::now);
                    while buffer.len() >= max {
                        let rest = buffer.split_off(max);
                        let items = std::mem::replace(&mut buffer, rest);
                        dispatch(&calls, &tracker, new_call(false), items).await;
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
                dispatch(&calls, &tracker, new_call(false), items).await;
            }
            () = done.cancelled() => break,
        }
    }
    // Nothing new can arrive once `done` is cancelled (every delivery task has finished),
    // but take whatever is still queued.
    while let Ok(batch) = rx.try_recv() {
        buffer.extend(batch);
    }
    for chunk in buffer.chunks(max) {
        dispatch(&calls, &tracker, new_call(false), chunk.to_vec()).await;
    }
    tracker.close();
    tracker.wait().await;
    unacked.load(Ordering::Acquire)
}

/// Waits for a free ack-call slot, then sends `items` in a call of its own.
async fn dispatch(
    calls: &Arc<Semaphore>,
    tracker: &TaskTracker,
    call: Call,
    items: Vec<Settlement>,
) {
    let permit = acquire(calls).await;
    tracker.spawn(call.send(items, permit));
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn acquire(calls: &Arc<Semaphore>) -> Option<tokio::sync::OwnedSemaphorePermit> {
    // The semaphore is never closed; `None` would only mean unbounded calls.
    Arc::clone(calls).acquire_owned().await.ok()
}

/// One ack call and its retries.
struct Call {
    shared: Arc<Shared>,
    journal: Option<Arc<Journal>>,
    unacked: Arc<std::sync::atomic::AtomicU64>,
    /// Leases recovered from the journal: they hold no in-flight permit.
    recovered: bool,
}

impl Call {
    async fn send(
        self,
        items: Vec<Settlement>,
        _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let shared = &self.shared;
        let settled = items.len() as u64;
        let mut request = AckRequest::default();
        for s in items {
            match s.retry_delay {
                None => request.acks.push(AckItem {
                    lease_id: s.lease_id,
                }),
                Some(delay_seconds) => request.retries.push(RetryItem {
                    lease_id: s.lease_id,
                    delay_seconds,
                }),
            }
        }
        // The delivery tasks recorded these leases in the journal when the sink
        // confirmed them (see `delivery::settle_confirmed`); here they are only marked
        // acked once the call went through.
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
            shared.fail(error);
            return;
        }
        if !self.recovered {
            shared.settled(settled);
        }
    }

    /// Sends one ack call, retrying what can be retried. Returns the first fatal error.
    async fn call(&self, request: &AckRequest, settled: u64) -> Result<(), ApiError> {
        let shared = &self.shared;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            shared.respect_rate_limit().await;
            match shared.client.ack(request).await {
                Ok(result) => {
                    bump!(shared.stats, ack_calls);
                    if self.recovered {
                        bump!(shared.stats, journal_recovered, request.acks.len());
                    } else {
                        bump!(shared.stats, acked, request.acks.len());
                        bump!(shared.stats, released, request.retries.len());
                    }
                    if !result.warnings.is_empty() {
                        bump!(shared.stats, ack_warnings, result.warnings.len());
                        for (lease_id, warning) in result.warnings.iter().take(3) {
                            tracing::warn!(lease_id = %lease_id, warning = %warning, "ack call answered with a warning");
                        }
                    }
                    return Ok(());
                }
                Err(error) if error.is_fatal() => return Err(error),
                Err(error) => {
                    bump!(shared.stats, ack_call_failures);
                    let delay = match &error {
                        ApiError::RateLimited {
                            retry_after: Some(d),
                        } => {
                            shared.rate_limited(*d);
                            *d
                        }
                        _ => backoff.next_delay(),
                    };
                    tracing::warn!(error = %error, leases = settled, delay_ms = delay.as_millis() as u64, "ack call failed; retrying (acks are idempotent)");
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
            match self.call(&request, request.acks.len() as u64).await {
                Ok(()) => self.mark_done(request.acks).await,
                Err(ApiError::Rejected { status: 400, .. }) if request.acks.len() > 1 => {
                    let mut first = request.acks;
                    let second = first.split_off(first.len() / 2);
                    // Depth first, in journal order.
                    parts.push(second);
                    parts.push(first);
                }
                Err(error @ ApiError::Rejected { status: 400, .. }) => {
                    bump!(self.shared.stats, journal_dropped, request.acks.len());
                    for item in &request.acks {
                        tracing::warn!(lease_id = %item.lease_id, queue_id = %self.shared.queue_id, error = %error, "the API refused a lease from the ack journal for good; dropped from the journal (its message is redelivered if still queued: a duplicate, no loss)");
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
        if let Some(journal) = &self.journal {
            let done: Vec<String> = acks.into_iter().map(|a| a.lease_id).collect();
            if let Err(e) = journal.record_acked(&done).await {
                tracing::warn!(error = %e, "updating the ack journal failed");
            }
        }
    }
}
