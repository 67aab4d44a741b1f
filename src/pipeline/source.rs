//! The [`Source`] contract: where records come from, and what settling them means.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::feed::Feed;
use super::flow::InFlight;

/// A record the sink confirmed as durable. Only the delivery task can make one (the
/// constructor is private to [`crate::pipeline`]), so a source that settles records as
/// done from `Confirmed` values cannot settle anything its sink did not confirm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed<T>(T);

impl<T> Confirmed<T> {
    /// Only the delivery task calls this, after its sink's outcome for this very record.
    pub(in crate::pipeline) fn new(ticket: T) -> Confirmed<T> {
        Confirmed(ticket)
    }

    /// The ticket, for reading.
    pub fn ticket(&self) -> &T {
        &self.0
    }

    /// The ticket, to settle it by.
    pub fn into_ticket(self) -> T {
        self.0
    }
}

/// A record to give back for another attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry<T> {
    /// Its ticket.
    pub ticket: T,
    /// How long its source should wait before offering it again, in seconds. 0 when the
    /// record itself is fine (the sink was down, the lease ran short, shutdown).
    pub delay_secs: u64,
    /// Why the sink refused it, when it did (for the source's own reports).
    pub reason: Option<String>,
}

/// How a batch's records ended, handed to [`Source::settle`].
#[derive(Debug)]
pub struct Settlement<T> {
    /// Records the sink confirmed: settle them as done.
    pub done: Vec<Confirmed<T>>,
    /// Records that were not confirmed: give them back.
    pub retry: Vec<Retry<T>>,
    /// The batch's deadline, for counting settlements that come too late.
    pub deadline: Option<Instant>,
    /// The records' room in the in-flight bound: drop it once they are settled.
    pub in_flight: InFlight,
}

/// Where records come from.
///
/// A source reads batches in [`Source::run`] and hands them to the [`Feed`]; the pipeline
/// delivers them to the sink and calls [`Source::settle`] with the outcome. What "done"
/// means belongs to the source: an ack for Cloudflare, a checkpoint for a file.
#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// What the source needs to settle one record.
    type Ticket: Send + Sync + 'static;

    /// A short name for logs (`"cloudflare"`, `"archive"`).
    fn kind(&self) -> &'static str;

    /// Whether the source calls the Cloudflare API, so that `/ready` asks whether a call
    /// succeeded recently.
    fn uses_api(&self) -> bool {
        false
    }

    /// Reads batches until `feed.stopping()` is cancelled, or until there is nothing more
    /// to read (then call [`Feed::exhausted`]). Fatal errors go to [`Feed::fail`].
    async fn run(self: Arc<Self>, feed: Feed<Self::Ticket>);

    /// Settles a batch's records. `done` holds only records the sink confirmed.
    async fn settle(&self, settlement: Settlement<Self::Ticket>);

    /// Called once, after `run` returned and every delivery settled: finish settling what
    /// is pending. Returns how many confirmed records could not be settled as done (they
    /// will be redelivered: duplicates, never loss).
    async fn finish(&self, feed: &Feed<Self::Ticket>) -> u64;
}
