//! The Cloudflare source: pull batches over the HTTP pull-consumer API, decode them, and
//! settle each record with an ack call (done) or a retry (given back).
//!
//! - [`config`]: the `[queue]` table;
//! - [`puller`]: the pull loops, their back-off, rate limits and `--until-empty`;
//! - [`decode`]: turns a pulled message into a [`cfq_sinks::Record`] by `CF-Content-Type`;
//! - [`acker`]: groups settlements into few ack calls and retries failed calls;
//! - [`journal`]: the optional crash-safe ack journal;
//! - [`tuner`]: `pullers = "auto"` and `ack_concurrency = "auto"`.
//!
//! A record's ticket is its lease id. "Done" is an ack: a lease id enters `acks` only
//! from a [`Confirmed`](crate::pipeline::Confirmed) value (or from the journal, which
//! stores only those), so the pipeline's invariant holds here by construction.

pub mod acker;
pub mod config;
pub mod decode;
pub mod journal;
pub mod puller;
pub mod tuner;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cloudflare::Client;
use crate::pipeline::{Feed, PipelineOptions, Settlement, Source};
use crate::stats::Stats;
use config::QueueConfig;

use acker::{Pending, Settled};
use journal::Journal;

/// Options of the Cloudflare source that are not in its config.
#[derive(Debug, Clone, Copy, Default)]
pub struct SourceOptions {
    /// Report the source exhausted once the queue is drained: a pull came back empty, the
    /// backlog is 0 and nothing is in flight.
    pub until_empty: bool,
}

/// Pulls from one Cloudflare queue.
pub struct CloudflareSource {
    pub(crate) cfg: QueueConfig,
    pub(crate) client: Client,
    pub(crate) stats: Arc<Stats>,
    pub(crate) queue_id: Arc<str>,
    pub(crate) until_empty: bool,
    /// The pipeline settings `cfg` asks for, derived once (the failure delays are used per
    /// undecodable message).
    pub(crate) options: PipelineOptions,
    /// How many pull loops run and ack calls fly, tuned or fixed.
    pub(crate) tuner: tuner::Tuner,
    /// The ack journal, when configured: confirmed leases are recorded in it (synced)
    /// before the acker sees them, and marked acked after their call went through.
    pub(crate) journal: Option<Arc<Journal>>,
    /// No API call before this instant (a 429's `Retry-After` applies to every task).
    pub(crate) not_before: Mutex<Instant>,
    /// To the acker.
    pub(crate) settle_tx: mpsc::UnboundedSender<Settled>,
    /// The acker's end, taken when it starts.
    settle_rx: Mutex<Option<mpsc::UnboundedReceiver<Settled>>>,
    /// The running acker and the token that tells it no more settlements will come.
    acker: Mutex<Option<(JoinHandle<u64>, CancellationToken)>>,
    /// The pipeline's handle while running: a dead acker or pull loop is fatal. Cleared
    /// by `finish`, since the feed holds the source in turn.
    feed: Mutex<Option<Feed<String>>>,
}

impl std::fmt::Debug for CloudflareSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudflareSource")
            .field("queue", &self.cfg)
            .field("until_empty", &self.until_empty)
            .finish_non_exhaustive()
    }
}

impl CloudflareSource {
    /// A source for the queue of `cfg`, calling the API through `client`. Opens the ack
    /// journal when one is configured.
    pub fn new(
        cfg: QueueConfig,
        client: Client,
        stats: Arc<Stats>,
        options: SourceOptions,
    ) -> Result<CloudflareSource, journal::JournalError> {
        let journal = match &cfg.ack_journal {
            Some(path) => Some(Arc::new(Journal::open(
                path,
                &cfg.account_id,
                &cfg.queue_id,
            )?)),
            None => None,
        };
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        Ok(CloudflareSource {
            tuner: tuner::Tuner::new(&cfg, Arc::clone(&stats)),
            options: pipeline_options(&cfg),
            queue_id: Arc::from(cfg.queue_id.as_str()),
            until_empty: options.until_empty,
            journal,
            not_before: Mutex::new(Instant::now()),
            settle_tx,
            settle_rx: Mutex::new(Some(settle_rx)),
            acker: Mutex::new(None),
            feed: Mutex::new(None),
            cfg,
            client,
            stats,
        })
    }

    /// The pipeline settings this queue's config asks for.
    pub fn pipeline_options(&self) -> PipelineOptions {
        self.options.clone()
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

    /// Hands settlements to the acker. The acker outlives every sender, so a send only
    /// fails after a hard exit, when nothing can be done anyway.
    pub(crate) fn to_acker(&self, settled: Settled) {
        if settled.items.is_empty() {
            return;
        }
        if self.settle_tx.send(settled).is_err() {
            tracing::error!(queue_id = %self.queue_id, "the acker has stopped; settlements were dropped (their leases will expire and be redelivered)");
            // Nothing more can be acked: stop, so that a supervisor restarts the bridge
            // rather than leave it pulling what it can never settle.
            if let Some(feed) = &*self.feed.lock().unwrap_or_else(|e| e.into_inner()) {
                feed.fail("the acker stopped unexpectedly");
            }
        }
    }
}

#[async_trait]
impl Source for CloudflareSource {
    type Ticket = String;

    fn uses_api(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "cloudflare"
    }

    async fn run(self: Arc<Self>, feed: Feed<String>) {
        let receiver = self
            .settle_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(receiver) = receiver else {
            feed.fail("the Cloudflare source was run twice");
            return;
        };
        *self.feed.lock().unwrap_or_else(|e| e.into_inner()) = Some(feed.clone());
        let done = CancellationToken::new();
        let acker = tokio::spawn(acker::run(
            Arc::clone(&self),
            feed.clone(),
            receiver,
            done.clone(),
        ));
        *self.acker.lock().unwrap_or_else(|e| e.into_inner()) = Some((acker, done));

        let mut pullers = tokio::task::JoinSet::new();
        for index in 0..self.tuner.most_pullers() {
            pullers.spawn(puller::run(Arc::clone(&self), feed.clone(), index));
        }
        while let Some(joined) = pullers.join_next().await {
            if let Err(error) = joined {
                // A pull loop that died cannot pull again: stop rather than run on with
                // fewer loops, or none, while looking alive.
                feed.fail(format!("a pull loop stopped unexpectedly: {error}"));
            }
        }
        self.stats.gauges.set_pullers(0);
    }

    async fn settle(&self, settlement: Settlement<String>) {
        let Settlement {
            done,
            retry,
            deadline,
            in_flight,
        } = settlement;
        if !done.is_empty() {
            if let Some(journal) = &self.journal {
                // Journaled as soon as the sink confirmed, rather than when the ack call
                // is sent: confirmations waiting for a free ack call are already safe.
                let leases: Vec<String> = done.iter().map(|c| c.ticket().clone()).collect();
                if let Err(error) = journal.record_confirmed(&leases).await {
                    tracing::error!(queue_id = %self.queue_id, %error, "writing the ack journal failed; acking anyway (a crash now could cause duplicates)");
                }
            }
        }
        let mut items = Vec::with_capacity(done.len() + retry.len());
        items.extend(retry.into_iter().map(Pending::retry));
        items.extend(done.into_iter().map(|c| Pending::ack(c, deadline)));
        self.to_acker(Settled { items, in_flight });
    }

    async fn finish(&self, feed: &Feed<String>) -> u64 {
        self.feed.lock().unwrap_or_else(|e| e.into_inner()).take();
        let acker = self.acker.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some((acker, done)) = acker else {
            return 0;
        };
        done.cancel();
        let ack_wait = Duration::from_millis(self.cfg.request_timeout_ms.saturating_mul(3));
        match tokio::time::timeout(ack_wait, acker).await {
            Ok(Ok(left)) => left,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the acker task failed");
                feed.flow().outstanding()
            }
            Err(_) => {
                tracing::error!(
                    queue_id = %self.queue_id,
                    "ack calls still failing at exit; unacknowledged leases will be redelivered"
                );
                feed.flow().outstanding()
            }
        }
    }
}

/// The pipeline settings a `[queue]` table asks for.
fn pipeline_options(cfg: &QueueConfig) -> PipelineOptions {
    PipelineOptions {
        max_in_flight: cfg.max_in_flight,
        deadline_margin: Duration::from_millis(cfg.lease_margin_ms),
        shutdown_grace: Duration::from_millis(cfg.shutdown_grace_ms),
        retry_base_delay_secs: cfg.retry_base_delay_secs,
        retry_max_delay_secs: cfg.retry_max_delay_secs,
    }
}
