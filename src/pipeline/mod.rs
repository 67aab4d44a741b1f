//! The pipeline: a [`Source`] feeds batches, a sink delivers them, the source settles
//! each record by its outcome. It knows nothing of Cloudflare or files; sources live in
//! [`crate::sources`].
//!
//! ```text
//!  source readers             delivery tasks                source settlement
//!  reserve room, read ──────▶ sink.deliver(batch) ───────▶  done:  Confirmed records
//!  a batch (+ tickets,        per-record outcome            retry: the rest (+ delay)
//!  deadline, in-flight)       transient: retry in place     (Cloudflare: ack calls;
//!        ▲                                                   a file: its checkpoint)
//!        └──── in-flight bound: room returns when records are settled ◀─┘
//! ```
//!
//! **The invariant.** Nothing is settled as done before its sink confirmed it. It holds
//! in one place for every source: [`delivery`], the only maker of [`Confirmed`] values,
//! which are the only way a source is told to settle a record as done. (A source may
//! keep them: the Cloudflare source's ack journal stores confirmed leases and acks them
//! after a crash, a second path into `acks` that is still fed only by `Confirmed` values.)
//!
//! Modules: [`source`] (the contract a source implements), [`feed`] (a source's handle on
//! the pipeline), [`flow`] (the in-flight bound), [`delivery`] (sink calls and the
//! invariant), [`options`], [`backoff`].

pub mod backoff;
pub mod delivery;
pub mod feed;
pub mod flow;
pub mod options;
pub mod source;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cfq_sinks::Sink;
use tokio_util::task::TaskTracker;

use crate::stats::{Snapshot, Stats};

pub use feed::{FatalError, Feed, SourceBatch};
pub use flow::{Flow, InFlight, Reservation};
pub use options::PipelineOptions;
pub use source::{Confirmed, Retry, Settlement, Source};

use delivery::Delivery;
use feed::Control;

/// Why a run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGINT/SIGTERM (or the test's trigger).
    Signal,
    /// The source had nothing more to read (`--until-empty` found the queue drained).
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
    /// Records the sink confirmed that the source could not settle as done before exit.
    /// They will be redelivered (duplicates, not loss); with an ack journal they are
    /// acked at the next start.
    pub unacked_confirmed: u64,
}

/// A run that had to stop on an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The source failed in a way retrying cannot fix (a bad token, no such queue, a
    /// journal that cannot be written).
    #[error(transparent)]
    Source(FatalError),
}

/// Runs `source` into `sink` until `shutdown` resolves, the source is exhausted, or a
/// fatal error.
///
/// Shutdown: stop reading; let deliveries finish within `shutdown_grace`; give back what
/// is still unconfirmed (retry, delay 0); let the source settle what was confirmed; close
/// the sink.
pub async fn run<S: Source>(
    source: Arc<S>,
    sink: Arc<dyn Sink>,
    stats: Arc<Stats>,
    options: PipelineOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, PipelineError> {
    let started = Instant::now();
    let control = Arc::new(Control::new());
    let flow = Flow::new(options.max_in_flight);
    let grace = options.shutdown_grace;
    let delivery = Arc::new(Delivery {
        source: Arc::clone(&source),
        sink: Arc::clone(&sink),
        stats: Arc::clone(&stats),
        control: Arc::clone(&control),
        options,
    });
    let deliveries = TaskTracker::new();
    let feed = Feed {
        flow,
        control: Arc::clone(&control),
        dispatch: {
            let deliveries = deliveries.clone();
            Arc::new(move |batch| {
                deliveries.spawn(Arc::clone(&delivery).run(batch));
            })
        },
    };

    let mut reader = tokio::spawn(Arc::clone(&source).run(feed.clone()));
    let prober = tokio::spawn(delivery::probe_sink(
        Arc::clone(&sink),
        Arc::clone(&control),
    ));
    let sampler = tokio::spawn(sample_gauges(Arc::clone(&stats), Arc::clone(&feed.flow)));
    let registration = crate::metrics::register_route(
        Arc::clone(&stats),
        Arc::clone(&sink),
        control.sink_healthy.subscribe(),
        source.uses_api(),
    );

    let reason = tokio::select! {
        () = shutdown => {
            tracing::info!("shutdown requested: no more reads; finishing in-flight deliveries");
            StopReason::Signal
        }
        () = control.stop.cancelled() => {
            if control.exhausted.is_cancelled() { StopReason::Drained } else { StopReason::Signal }
        }
        _ = &mut reader => {
            if control.exhausted.is_cancelled() { StopReason::Drained } else { StopReason::Signal }
        }
    };
    control.stop.cancel();
    if !reader.is_finished() {
        if let Err(e) = reader.await {
            tracing::error!(error = %e, "the source's reader task failed");
        }
    }

    deliveries.close();
    if tokio::time::timeout(grace, deliveries.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "grace period over: releasing records the sink has not confirmed"
        );
        control.hard_stop.cancel();
        deliveries.wait().await;
    }
    prober.abort();
    sampler.abort();
    drop(registration);

    // Every delivery has settled its records; let the source finish settling.
    let unacked_confirmed = source.finish(&feed).await;
    if unacked_confirmed > 0 {
        tracing::warn!(
            records = unacked_confirmed,
            "confirmed records that could not be settled as done; they will be redelivered (duplicates, no loss)"
        );
    }
    if let Err(e) = sink.close().await {
        tracing::warn!(error = %e, "closing the sink failed");
    }

    let fatal = control
        .fatal
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(error) = fatal {
        return Err(PipelineError::Source(error));
    }
    stats.gauges.sample(feed.flow.outstanding());
    Ok(Summary {
        reason,
        stats: stats.snapshot(),
        elapsed: started.elapsed(),
        unacked_confirmed,
    })
}

/// Refreshes the gauges that change by themselves (records in flight, the oldest
/// message's age) once a second.
async fn sample_gauges(stats: Arc<Stats>, flow: Arc<Flow>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        stats.gauges.sample(flow.outstanding());
    }
}
