//! Delivery: hand a batch to the sink, and settle each record by its outcome.
//!
//! **This is where the invariant lives, for every source.** A record is settled as done
//! only through a [`Confirmed`] value, and [`Confirmed::new`] is called in one place only:
//! [`settle_outcomes`] below, for a record whose sink outcome was
//! [`cfq_sinks::Outcome::is_confirmed`]. Everything else goes back to its source as a
//! [`Retry`]:
//! - permanent failure: retry with a delay that grows with `attempts`;
//! - transient failure: pause reading, retry in place while the deadline allows, then
//!   give back with delay 0 (a sink outage does not burn the record's attempts);
//! - deadline too close before delivery: give back with delay 0, counted;
//! - grace period over at shutdown: give back with delay 0, counted.
//!
//! A source may keep what `Confirmed` proved beyond this call (the Cloudflare source's
//! ack journal stores confirmed leases and acknowledges them after a crash); it may never
//! make a `Confirmed` of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cfq_sinks::{Outcome, Record, Sink, SinkError};

use super::backoff::Backoff;
use super::feed::{Control, SourceBatch};
use super::flow::InFlight;
use super::options::PipelineOptions;
use super::source::{Confirmed, Retry, Settlement, Source};
use crate::bump;
use crate::stats::Stats;

/// What a delivery task needs: the source to settle with, the sink, and the run's state.
pub(crate) struct Delivery<S: Source> {
    pub(crate) source: Arc<S>,
    pub(crate) sink: Arc<dyn Sink>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) control: Arc<Control>,
    pub(crate) options: PipelineOptions,
}

impl<S: Source> Delivery<S> {
    /// Delivers one batch until every record is settled.
    pub(crate) async fn run(self: Arc<Self>, batch: SourceBatch<S::Ticket>) {
        let SourceBatch {
            mut records,
            mut tickets,
            deadline,
            mut in_flight,
        } = batch;
        let mut retry_backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
        loop {
            if deadline.is_some_and(|d| Instant::now() + self.options.deadline_margin >= d) {
                bump!(self.stats, lease_expired_releases, tickets.len());
                tracing::warn!(
                    records = tickets.len(),
                    "lease about to expire before delivery; releasing instead of delivering late"
                );
                self.give_back(tickets, deadline, in_flight).await;
                return;
            }
            let outcomes = tokio::select! {
                biased;
                () = self.control.hard_stop.cancelled() => {
                    bump!(self.stats, shutdown_releases, tickets.len());
                    self.give_back(tickets, deadline, in_flight).await;
                    return;
                }
                outcomes = timed(&self.stats, self.sink.deliver(&records)) => outcomes,
            };
            let outcomes = self.checked(outcomes, records.len());
            let (retry_tickets, retry_records) = self
                .settle_outcomes(tickets, records, outcomes, deadline, &mut in_flight)
                .await;
            if retry_tickets.is_empty() {
                return;
            }
            if self
                .control
                .sink_healthy
                .send_if_modified(|healthy| std::mem::replace(healthy, false))
            {
                tracing::warn!(
                    sink = self.sink.kind(),
                    "sink unavailable; pausing reads until it is back"
                );
            }
            tickets = retry_tickets;
            records = retry_records;
            let delay = retry_backoff.next_delay();
            tokio::select! {
                biased;
                () = self.control.hard_stop.cancelled() => {
                    bump!(self.stats, shutdown_releases, tickets.len());
                    self.give_back(tickets, deadline, in_flight).await;
                    return;
                }
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One outcome per record, or the whole batch failed (a sink bug must not ack).
    fn checked(&self, outcomes: Vec<Outcome>, records: usize) -> Vec<Outcome> {
        if outcomes.len() == records {
            return outcomes;
        }
        tracing::error!(
            sink = self.sink.kind(),
            records,
            outcomes = outcomes.len(),
            "sink returned the wrong number of outcomes; treating the batch as failed"
        );
        vec![
            Outcome::Failed(SinkError::transient(
                "sink returned the wrong number of outcomes"
            ));
            records
        ]
    }

    /// Settles what the outcomes decide: confirmed records as done, refused ones as
    /// retries with a delay. Returns the transiently failed records, still held.
    async fn settle_outcomes(
        &self,
        tickets: Vec<S::Ticket>,
        records: Vec<Record>,
        outcomes: Vec<Outcome>,
        deadline: Option<Instant>,
        in_flight: &mut InFlight,
    ) -> (Vec<S::Ticket>, Vec<Record>) {
        let mut done = Vec::with_capacity(tickets.len());
        let mut refused = Vec::new();
        let now_ms = crate::stats::now_ms();
        let mut again = (Vec::new(), Vec::new());
        let (mut duplicates, mut dead_lettered) = (0usize, 0usize);
        for ((ticket, record), outcome) in tickets.into_iter().zip(records).zip(outcomes) {
            if outcome.is_confirmed() {
                self.stats.confirmed_at(now_ms, record.timestamp_ms);
            }
            match outcome {
                Outcome::Confirmed => done.push(Confirmed::new(ticket)),
                Outcome::Duplicate => {
                    duplicates += 1;
                    done.push(Confirmed::new(ticket));
                }
                Outcome::DeadLettered { reason } => {
                    dead_lettered += 1;
                    tracing::warn!(queue_id = %record.queue_id, message_id = %record.id, reason = %reason, "record stored at the sink's dead-letter destination");
                    done.push(Confirmed::new(ticket));
                }
                Outcome::Failed(error) if error.is_transient() => {
                    tracing::debug!(queue_id = %record.queue_id, message_id = %record.id, error = %error, "transient sink failure");
                    again.0.push(ticket);
                    again.1.push(record);
                }
                Outcome::Failed(error) => {
                    let delay_secs = self.options.failure_delay(record.attempts);
                    tracing::warn!(
                        queue_id = %record.queue_id,
                        message_id = %record.id,
                        attempts = record.attempts,
                        error = %error,
                        retry_delay_s = delay_secs,
                        "sink refused the record; releasing it with a delay (Cloudflare's max_retries / dead-letter queue apply)"
                    );
                    refused.push(Retry {
                        ticket,
                        delay_secs,
                        reason: Some(error.message),
                    });
                }
            }
        }
        // Counted once per batch, not per record: the counters are shared by every task.
        bump!(self.stats, confirmed, done.len());
        bump!(self.stats, duplicates, duplicates);
        bump!(self.stats, sink_dead_lettered, dead_lettered);
        bump!(self.stats, sink_transient_failures, again.0.len());
        bump!(self.stats, sink_permanent_failures, refused.len());
        if !done.is_empty() {
            self.control
                .sink_healthy
                .send_if_modified(|healthy| !std::mem::replace(healthy, true));
        }
        let settled = (done.len() + refused.len()) as u64;
        if settled > 0 {
            self.source
                .settle(Settlement {
                    done,
                    retry: refused,
                    deadline,
                    in_flight: in_flight.split(settled),
                })
                .await;
        }
        again
    }

    /// Gives records back undelivered, with delay 0.
    async fn give_back(
        &self,
        tickets: Vec<S::Ticket>,
        deadline: Option<Instant>,
        in_flight: InFlight,
    ) {
        let retry = tickets
            .into_iter()
            .map(|ticket| Retry {
                ticket,
                delay_secs: 0,
                reason: None,
            })
            .collect();
        self.source
            .settle(Settlement {
                done: Vec::new(),
                retry,
                deadline,
                in_flight,
            })
            .await;
    }
}

/// Runs a sink call and records how long it took.
async fn timed<T>(stats: &Stats, call: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let out = call.await;
    stats.sink_took(started.elapsed());
    out
}

/// While the sink is marked unhealthy, asks it whether it is ready again, with back-off,
/// and resumes reading when it is.
pub(crate) async fn probe_sink(sink: Arc<dyn Sink>, control: Arc<Control>) {
    let mut health = control.sink_healthy.subscribe();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        if health.wait_for(|healthy| !*healthy).await.is_err() {
            return;
        }
        tokio::time::sleep(backoff.next_delay()).await;
        if *control.sink_healthy.borrow() {
            backoff.reset();
            continue;
        }
        match sink.ready().await {
            Ok(()) => {
                if control
                    .sink_healthy
                    .send_if_modified(|healthy| !std::mem::replace(healthy, true))
                {
                    tracing::info!(
                        sink = sink.kind(),
                        "sink is reachable again; resuming reads"
                    );
                }
                backoff.reset();
            }
            Err(error) => tracing::debug!(error = %error, "sink still unavailable"),
        }
    }
}
