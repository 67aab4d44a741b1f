//! The pipeline: pull → decode → deliver → acknowledge.
//!
//! ```text
//!  pullers (N)            delivery tasks              acker
//!  pull a batch ──────▶  sink.deliver(batch)  ──────▶  ack calls
//!  decode bodies          per-record outcome           acks: confirmed leases
//!  lease deadline         transient: retry in place    retries: failed leases (+delay)
//!       ▲                                                    │
//!       └──── in-flight bound: permits return after the ack call ◀┘
//! ```
//!
//! **The invariant.** A lease id enters the `acks` of an ack call only through
//! [`Settlement::ack`], and the only caller of that is the delivery task, after the sink
//! answered [`cfq_sinks::Outcome::is_confirmed`] for that very record. Everything else
//! (failures, undecodable bodies, leases about to expire, shutdown) becomes a retry.
//!
//! Modules: [`puller`] (pull loops, back-off, until-empty), [`delivery`] (sink calls,
//! leases, transient retries), [`acker`] (grouping, ack calls, their retries),
//! [`journal`] (the optional crash-safe ack journal), [`backoff`].

pub mod acker;
pub mod backoff;
pub mod delivery;
pub mod journal;
pub mod puller;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cfq_sinks::Sink;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cloudflare::{ApiError, Client};
use crate::config::QueueConfig;
use crate::stats::{Snapshot, Stats};

pub use acker::Settlement;

/// Options of one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Stop (exit 0) once the queue is drained: a pull came back empty, the backlog is 0
    /// and nothing is in flight.
    pub until_empty: bool,
}

/// Why a run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGINT/SIGTERM (or the test's trigger).
    Signal,
    /// `--until-empty` found the queue drained.
    Drained,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Why it stopped.
    pub reason: StopReason,
    /// Counters at the end.
    pub stats: Snapshot,
    /// Wall time.
    pub elapsed: Duration,
    /// Leases confirmed by the sink whose ack call never succeeded before exit. They will
    /// be redelivered (duplicates, not loss); with an ack journal they are acked at the
    /// next start.
    pub unacked_confirmed: u64,
}

/// A run that had to stop on an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The API refused the bridge in a way retrying cannot fix (bad token, no such queue).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The ack journal could not be opened: locked by another process, of another queue,
    /// unreadable.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
}

/// State shared by the pipeline's tasks.
pub(crate) struct Shared {
    pub(crate) cfg: QueueConfig,
    pub(crate) client: Client,
    pub(crate) sink: Arc<dyn Sink>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) queue_id: Arc<str>,
    /// One permit per message that may be leased and not yet settled.
    pub(crate) inflight: Arc<Semaphore>,
    /// Messages leased and not yet settled by a successful ack call.
    pub(crate) outstanding: AtomicU64,
    /// Permits owed to the in-flight bound: a pull that returned more messages than asked
    /// for could not take a permit for each; returned permits pay this down first.
    pub(crate) excess_permits: AtomicU64,
    /// Notified whenever the last unsettled message settles (`outstanding` reaches 0).
    pub(crate) idle: tokio::sync::Notify,
    /// To the acker.
    pub(crate) settle: mpsc::UnboundedSender<Vec<Settlement>>,
    /// The ack journal, when configured: delivery tasks record confirmed leases in it
    /// (synced) before handing them to the acker, which marks them acked.
    pub(crate) journal: Option<Arc<journal::Journal>>,
    /// `true` while the sink is healthy; pullers wait while it is `false`.
    pub(crate) sink_healthy: watch::Sender<bool>,
    /// No API call before this instant (a 429's `Retry-After` applies to every task).
    pub(crate) not_before: Mutex<Instant>,
    /// Stop pulling: shutdown, drained, or fatal error.
    pub(crate) stop: CancellationToken,
    /// The grace period is over: deliveries give up and release what they hold.
    pub(crate) hard_stop: CancellationToken,
    /// Set when `--until-empty` found the queue drained.
    pub(crate) drained: CancellationToken,
    /// The first fatal error, if any.
    pub(crate) fatal: Mutex<Option<ApiError>>,
    pub(crate) until_empty: bool,
}

impl Shared {
    /// Records a fatal error (the first one wins) and stops the pipeline.
    pub(crate) fn fail(&self, error: ApiError) {
        tracing::error!(error = %error, "fatal API error; stopping");
        let mut fatal = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        if fatal.is_none() {
            *fatal = Some(error);
        }
        self.stop.cancel();
    }

    /// Waits out a rate limit shared by every task.
    pub(crate) async fn respect_rate_limit(&self) {
        let until = *self.not_before.lock().unwrap_or_else(|e| e.into_inner());
        if until > Instant::now() {
            tokio::time::sleep_until(until.into()).await;
        }
    }

    /// Pushes the shared rate limit to at least `now + delay`.
    pub(crate) fn rate_limited(&self, delay: Duration) {
        let mut until = self.not_before.lock().unwrap_or_else(|e| e.into_inner());
        let candidate = Instant::now() + delay;
        if candidate > *until {
            *until = candidate;
        }
    }

    /// Queues settlements for the acker, in one message. The acker outlives every sender,
    /// so a send only fails after a hard exit, when nothing can be done anyway.
    pub(crate) fn settle_all(&self, settlements: Vec<Settlement>) {
        if settlements.is_empty() {
            return;
        }
        if self.settle.send(settlements).is_err() {
            tracing::error!("the acker has stopped; settlements were dropped (their leases will expire and be redelivered)");
        }
    }

    /// Releases leases for redelivery after `delay_seconds`, in one message to the acker.
    pub(crate) fn release_all(&self, leases: impl IntoIterator<Item = String>, delay_seconds: u64) {
        self.settle_all(
            leases
                .into_iter()
                .map(|lease_id| Settlement::retry(lease_id, delay_seconds))
                .collect(),
        );
    }

    /// The retry delay for a failed record on attempt `attempts`.
    pub(crate) fn failure_delay(&self, attempts: u32) -> u64 {
        backoff::retry_delay_secs(
            attempts,
            self.cfg.retry_base_delay_secs,
            self.cfg.retry_max_delay_secs,
        )
    }

    /// `n` messages are settled: they leave the in-flight count and give their permits
    /// back (minus any owed, see `excess_permits`).
    pub(crate) fn settled(&self, n: u64) {
        if self.outstanding.fetch_sub(n, Ordering::AcqRel) == n {
            self.idle.notify_waiters();
        }
        let owed = self
            .excess_permits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| {
                Some(e.saturating_sub(n))
            })
            .unwrap_or(0);
        self.inflight.add_permits((n - owed.min(n)) as usize);
    }

    pub(crate) fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Acquire)
    }
}

/// Runs the bridge until `shutdown` resolves, the queue is drained (`until_empty`), or a
/// fatal error.
///
/// Shutdown: stop pulling; let deliveries finish within `shutdown_grace_ms`; release what
/// is still unconfirmed (retry, delay 0); ack what was confirmed; close the sink.
pub async fn run(
    cfg: QueueConfig,
    client: Client,
    sink: Arc<dyn Sink>,
    stats: Arc<Stats>,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, PipelineError> {
    let started = Instant::now();
    let journal = match &cfg.ack_journal {
        Some(path) => Some(Arc::new(journal::Journal::open(
            path,
            &cfg.account_id,
            &cfg.queue_id,
        )?)),
        None => None,
    };
    let (settle_tx, settle_rx) = mpsc::unbounded_channel();
    let (healthy_tx, _) = watch::channel(true);
    let shared = Arc::new(Shared {
        queue_id: Arc::from(cfg.queue_id.as_str()),
        inflight: Arc::new(Semaphore::new(cfg.max_in_flight as usize)),
        outstanding: AtomicU64::new(0),
        excess_permits: AtomicU64::new(0),
        idle: tokio::sync::Notify::new(),
        settle: settle_tx,
        journal: journal.clone(),
        sink_healthy: healthy_tx,
        not_before: Mutex::new(Instant::now()),
        stop: CancellationToken::new(),
        hard_stop: CancellationToken::new(),
        drained: CancellationToken::new(),
        fatal: Mutex::new(None),
        until_empty: options.until_empty,
        cfg,
        client,
        sink,
        stats,
    });

    // Acks the journal says were confirmed but never acknowledged (an earlier crash).
    let acker_done = CancellationToken::new();
    let acker = tokio::spawn(acker::run(
        Arc::clone(&shared),
        settle_rx,
        journal,
        acker_done.clone(),
    ));

    let deliveries = TaskTracker::new();
    let mut pullers = tokio::task::JoinSet::new();
    for index in 0..shared.cfg.pullers {
        pullers.spawn(puller::run(Arc::clone(&shared), index, deliveries.clone()));
    }
    let prober = tokio::spawn(delivery::probe_sink(Arc::clone(&shared)));

    let reason = tokio::select! {
        () = shutdown => {
            tracing::info!("shutdown requested: no more pulls; finishing in-flight deliveries");
            StopReason::Signal
        }
        () = shared.stop.cancelled() => {
            if shared.drained.is_cancelled() { StopReason::Drained } else { StopReason::Signal }
        }
    };
    shared.stop.cancel();
    while pullers.join_next().await.is_some() {}

    deliveries.close();
    let grace = Duration::from_millis(shared.cfg.shutdown_grace_ms);
    if tokio::time::timeout(grace, deliveries.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = shared.cfg.shutdown_grace_ms,
            "grace period over: releasing records the sink has not confirmed"
        );
        shared.hard_stop.cancel();
        deliveries.wait().await;
    }
    prober.abort();

    // Every delivery has settled its records; let the acker send the rest.
    acker_done.cancel();
    let ack_wait = Duration::from_millis(shared.cfg.request_timeout_ms.saturating_mul(3));
    let unacked_confirmed = match tokio::time::timeout(ack_wait, acker).await {
        Ok(Ok(left)) => left,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the acker task failed");
            shared.outstanding()
        }
        Err(_) => {
            tracing::error!(
                "ack calls still failing at exit; unacknowledged leases will be redelivered"
            );
            shared.outstanding()
        }
    };
    if unacked_confirmed > 0 {
        tracing::warn!(
            leases = unacked_confirmed,
            "confirmed records whose ack did not go through; Cloudflare will redeliver them (duplicates, no loss)"
        );
    }
    if let Err(e) = shared.sink.close().await {
        tracing::warn!(error = %e, "closing the sink failed");
    }

    let fatal = shared
        .fatal
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(error) = fatal {
        return Err(PipelineError::Api(error));
    }
    Ok(Summary {
        reason,
        stats: shared.stats.snapshot(),
        elapsed: started.elapsed(),
        unacked_confirmed,
    })
}
