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
            release_all(&shared, leases, 0);
            return;
        }
        let outcomes = tokio::select! {
            biased;
            () = shared.hard_stop.cancelled() => {
                bump!(shared.stats, shutdown_releases, leases.len());
                release_all(&shared, leases, 0);
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

        let mut confirmed_any = false;
        let mut retry_leases = Vec::new();
        let mut retry_records = Vec::new();
        for ((lease_id, record), outcome) in leases.into_iter().zip(records).zip(outcomes) {
            match outcome {
                Outcome::Confirmed => {
                    confirmed_any = true;
                    bump!(shared.stats, confirmed);
                    shared.settle(Settlement::ack(lease_id));
                }
                Outcome::Duplicate => {
                    confirmed_any = true;
                    bump!(shared.stats, confirmed);
                    bump!(shared.stats, duplicates);
                    shared.settle(Settlement::ack(lease_id));
                }
                Outcome::DeadLettered { reason } => {
                    confirmed_any = true;
                    bump!(shared.stats, confirmed);
                    bump!(shared.stats, sink_dead_lettered);
                    tracing::warn!(message_id = %record.id, reason = %reason, "record stored at the sink's dead-letter destination");
                    shared.settle(Settlement::ack(lease_id));
                }
                Outcome::Failed(error) if error.is_transient() => {
                    bump!(shared.stats, sink_transient_failures);
                    tracing::debug!(message_id = %record.id, error = %error, "transient sink failure");
                    retry_leases.push(lease_id);
                    retry_records.push(record);
                }
                Outcome::Failed(error) => {
                    bump!(shared.stats, sink_permanent_failures);
                    let delay = shared.failure_delay(record.attempts);
                    tracing::warn!(
                        message_id = %record.id,
                        attempts = record.attempts,
                        error = %error,
                        retry_delay_s = delay,
                        "sink refused the record; releasing it with a delay (Cloudflare's max_retries / dead-letter queue apply)"
                    );
                    shared.release(lease_id, delay);
                }
            }
        }
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
                release_all(&shared, leases, 0);
                return;
            }
            () = tokio::time::sleep(delay) => {}
        }
    }
}

fn release_all(shared: &Shared, leases: Vec<String>, delay_seconds: u64) {
    for lease_id in leases {
        shared.release(lease_id, delay_seconds);
    }
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
