//! What a source sees of the pipeline: a [`Feed`] to hand batches in, with the in-flight
//! bound, the sink's health and the stop signals.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use cfq_sinks::Record;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::flow::{Flow, InFlight, Reservation};

/// A fatal error reported by a source (a bad token, a journal that cannot be written).
pub type FatalError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Records read together, each with the ticket its source settles it by.
#[derive(Debug)]
pub struct SourceBatch<T> {
    /// The records, in the order read.
    pub records: Vec<Record>,
    /// One ticket per record, same order: what the source needs to settle it (a lease
    /// id, a file offset).
    pub tickets: Vec<T>,
    /// When the records stop being ours (the end of a lease), if they ever do. A record
    /// that cannot reach the sink well before this is released instead of delivered.
    pub deadline: Option<Instant>,
    /// The records' room in the in-flight bound.
    pub in_flight: InFlight,
}

/// Stop signals and shared state of one pipeline run.
#[derive(Debug)]
pub(crate) struct Control {
    /// Stop reading: shutdown, the source is exhausted, or a fatal error.
    pub(crate) stop: CancellationToken,
    /// The grace period is over: deliveries give up and release what they hold.
    pub(crate) hard_stop: CancellationToken,
    /// Set when the source reported it has nothing more to read.
    pub(crate) exhausted: CancellationToken,
    /// `true` while the sink is healthy; readers wait while it is `false`.
    pub(crate) sink_healthy: watch::Sender<bool>,
    /// The first fatal error, if any.
    pub(crate) fatal: Mutex<Option<FatalError>>,
}

impl Control {
    pub(crate) fn new() -> Control {
        Control {
            stop: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            exhausted: CancellationToken::new(),
            sink_healthy: watch::channel(true).0,
            fatal: Mutex::new(None),
        }
    }
}

/// Hands one batch to a delivery task.
pub(crate) type Dispatch<T> = Arc<dyn Fn(SourceBatch<T>) + Send + Sync>;

/// A source's handle on the pipeline it feeds.
pub struct Feed<T> {
    pub(crate) flow: Arc<Flow>,
    pub(crate) control: Arc<Control>,
    pub(crate) dispatch: Dispatch<T>,
}

impl<T> Clone for Feed<T> {
    fn clone(&self) -> Self {
        Feed {
            flow: Arc::clone(&self.flow),
            control: Arc::clone(&self.control),
            dispatch: Arc::clone(&self.dispatch),
        }
    }
}

impl<T> std::fmt::Debug for Feed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("outstanding", &self.flow.outstanding())
            .field("stopping", &self.control.stop.is_cancelled())
            .finish()
    }
}

impl<T> Feed<T> {
    /// Waits until the sink is healthy and there is room for `n` more records. `None`
    /// when the pipeline is stopping: read nothing more.
    pub async fn reserve(&self, n: u32) -> Option<Reservation> {
        let mut health = self.control.sink_healthy.subscribe();
        // No point reading what cannot be delivered.
        tokio::select! {
            biased;
            () = self.control.stop.cancelled() => return None,
            r = health.wait_for(|healthy| *healthy) => r.ok()?,
        };
        tokio::select! {
            biased;
            () = self.control.stop.cancelled() => None,
            r = self.flow.reserve(n) => Some(r),
        }
    }

    /// Hands a batch to a delivery task.
    pub fn deliver(&self, batch: SourceBatch<T>) {
        (self.dispatch)(batch);
    }

    /// Cancelled when the source must stop reading.
    pub fn stopping(&self) -> &CancellationToken {
        &self.control.stop
    }

    /// The source has nothing more to read (a drained queue, the end of an archive): the
    /// pipeline finishes what is in flight and stops.
    pub fn exhausted(&self) {
        self.control.exhausted.cancel();
        self.control.stop.cancel();
    }

    /// A fatal error: the pipeline stops and returns it (the first one wins).
    pub fn fail(&self, error: impl Into<FatalError>) {
        let error = error.into();
        // The command reports the error once, when the pipeline returns it.
        tracing::debug!(error = %error, "fatal error; stopping");
        let mut fatal = self.control.fatal.lock().unwrap_or_else(|e| e.into_inner());
        if fatal.is_none() {
            *fatal = Some(error);
        }
        self.control.stop.cancel();
    }

    /// The in-flight bound.
    pub fn flow(&self) -> &Arc<Flow> {
        &self.flow
    }
}
