//! Delivery tasks: hand a decoded batch to the sink and settle each record by its outcome.
//!
//! - confirmed (also duplicate, dead-lettered by the sink): ack — the only path to an ack;
//! - permanent failure: release with a delay that grows with `attempts`;
//! - transient failure: pause pulling, retry in place while the lease allows, then release
//!   with delay 0 (so a sink outage does not burn the message's delivery attempts);
//! - lease too close to its end before delivery: release with delay 0, counted;
//! - grace period over at shutdown: release with delay 0, counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cfq_sinks::{Outcome, Record};

use super::acker::Settlement;
use super::backoff::Backoff;
use super::Shared;
use crate::bump;

/// A decoded record and the lease it was delivered under.
#[derive(Debug)]
pub(crate) struct Leased {
    pub(crate) lease_id: String,
    pub(crate) record: Record,
}

/// Delivers one pulled batch. `deadline` is when the batch's leases end (measured from
/// when the pull was sent, so it errs early).
pub(crate) async fn run(shared: Arc<Shared>, batch: Vec<Leased>, deadline: Instant) {
    let margin = Duration::from_millis(shared.cfg.lease_margin_ms);
    let (mut leases, mut records): (Vec<String>, Vec<Record>) =
        batch.into_iter().map(|l| (l.lease_id, l.record)).unzip();
    let mut retry_backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        if Instant::now() + margin >= deadline {
            bump!(shared.stats, lease_expired_releases, leases.len());
            tracing::warn!(
                records = leases.len(),
                "lease about to expire before delivery; releasing instead of delivering late"
            );
            shared.release_all(leases, 0);
            return;
        }
        let outcomes = tokio::select! {
            biased;
            () = shared.hard_stop.cancelled() => {
                bump!(shared.stats, shutdown_releases, leases.len());
                shared.release_all(leases, 0);
                return;
            }
            outcomes = shared.sink.deliver(&records) => outcomes,
        };
        let outcomes = if outcomes.len() == records.len() {
            outcomes
        } else {
            tracing::error!(
                sink = shared.sink.kind(),
                records = records.len(),
                outcomes = outcomes.len(),
                "sink returned the wrong number of outcomes; treating the batch as failed"
            );
            vec![
                Outcome::Failed(cfq_sinks::SinkError::transient(
                    "sink returned the wrong number of outcomes"
                ));
                records.len()
            ]
        };

        let mut confirmed = Vec::with_capacity(leases.len());
        let mut retry_leases = Vec::new();
        let mut retry_records = Vec::new();
        let mut refused = Vec::new();
        let (mut duplicates, mut dead_lettered) = (0usize, 0usize);
        for ((lease_id, record), outcome) in leases.into_iter().zip(records).zip(outcomes) {
            match outcome {
                Outcome::Confirmed => confirmed.push(lease_id),
                Outcome::Duplicate => {
                    duplicates += 1;
                    confirmed.push(lease_id);
                }
                Outcome::DeadLettered { reason } => {
                    dead_lettered += 1;
                    tracing::warn!(message_id = %record.id, reason = %reason, "record stored at the sink's dead-letter destination");
                    confirmed.push(lease_id);
                }
                Outcome::Failed(error) if error.is_transient() => {
                    tracing::debug!(message_id = %record.id, error = %error, "transient sink failure");
                    retry_leases.push(lease_id);
                    retry_records.push(record);
                }
                Outcome::Failed(error) => {
                    let delay = shared.failure_delay(record.attempts);
                    tracing::warn!(
                        message_id = %record.id,
                        attempts = record.attempts,
                        error = %error,
                        retry_delay_s = delay,
                        "sink refused the record; releasing it with a delay (Cloudflare's max_retries / dead-letter queue apply)"
                    );
                    refused.push(Settlement::retry(lease_id, delay));
                }
            }
        }
        // Counted once per batch, not per record: the counters are shared by every task.
        bump!(shared.stats, confirmed, confirmed.len());
        bump!(shared.stats, duplicates, duplicates);
        bump!(shared.stats, sink_dead_lettered, dead_lettered);
        bump!(shared.stats, sink_transient_failures, retry_leases.len());
        bump!(shared.stats, sink_permanent_failures, refused.len());
        shared.settle_all(refused);
        let confirmed_any = !confirmed.is_empty();
        settle_confirmed(&shared, confirmed).await;
        if confirmed_any {
            shared
                .sink_healthy
                .send_if_modified(|healthy| !std::mem::replace(healthy, true));
        }
        if retry_leases.is_empty() {
            return;
        }
        if shared
            .sink_healthy
            .send_if_modified(|healthy| std::mem::replace(healthy, false))
        {
            tracing::warn!(
                sink = shared.sink.kind(),
                "sink unavailable; pausing pulls until it is back"
            );
        }
        leases = retry_leases;
        records = retry_records;
        let delay = retry_backoff.next_delay();
        tokio::select! {
            biased;
            () = shared.hard_stop.cancelled() => {
                bump!(shared.stats, shutdown_releases, leases.len());
                shared.release_all(leases, 0);
                return;
            }
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Hands the leases of confirmed records to the acker, after recording them (synced) in
/// the ack journal when one is configured. Journaling here, as soon as the sink
/// confirmed, rather than when the ack call is sent, leaves the smallest window in which a
/// crash turns a confirmed record into a duplicate: confirmations waiting for a free ack
/// call are already safe.
async fn settle_confirmed(shared: &Shared, confirmed: Vec<String>) {
    if confirmed.is_empty() {
        return;
    }
    if let Some(journal) = &shared.journal {
        if let Err(error) = journal.record_confirmed(&confirmed).await {
            tracing::error!(%error, "writing the ack journal failed; acking anyway (a crash now could cause duplicates)");
        }
    }
    shared.settle_all(confirmed.into_iter().map(Settlement::ack).collect());
}

/// While the sink is marked unhealthy, asks it whether it is ready again, with back-off,
/// and resumes pulling when it is.
pub(crate) async fn probe_sink(shared: Arc<Shared>) {
    let mut health = shared.sink_healthy.subscribe();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        if health.wait_for(|healthy| !*healthy).await.is_err() {
            return;
        }
        tokio::time::sleep(backoff.next_delay()).await;
        if *shared.sink_healthy.borrow() {
            backoff.reset();
            continue;
        }
        match shared.sink.ready().await {
            Ok(()) => {
                if shared
                    .sink_healthy
                    .send_if_modified(|healthy| !std::mem::replace(healthy, true))
                {
                    tracing::info!(
                        sink = shared.sink.kind(),
                        "sink is reachable again; resuming pulls"
                    );
                }
                backoff.reset();
            }
            Err(error) => tracing::debug!(error = %error, "sink still unavailable"),
        }
    }
}
