//! The invariant, tested in-process against the emulator with a scripted sink: a lease is
//! acknowledged only after the sink confirmed its record; failed, delayed-past-shutdown and
//! transiently failing records are never acknowledged, and confirmed ones always are.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cfq_bridge::app::{api_client, run_cloudflare};
use cfq_bridge::pipeline;
use cfq_bridge::sources::cloudflare::SourceOptions;
use cfq_bridge::stats::Stats;
use cfq_emulator::{ContentType, SeedSpec};
use cfq_sinks::{Outcome, Record, Sink, SinkError};
use common::*;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

/// A sink whose answer per record is chosen by the test.
#[derive(Default)]
struct ScriptedSink {
    /// Ids refused permanently.
    permanent: HashSet<String>,
    /// Ids answered only after this long.
    slow: HashMap<String, Duration>,
    /// Ids that never get an answer (the call hangs).
    hang: HashSet<String>,
    /// While set, every record fails transiently.
    down: AtomicBool,
    /// Ids confirmed, in order.
    confirmed: Mutex<Vec<String>>,
    /// Deliver calls made while `down`.
    calls_while_down: AtomicUsize,
}

#[async_trait]
impl Sink for ScriptedSink {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    async fn deliver(&self, records: &[Record]) -> Vec<Outcome> {
        if self.down.load(Ordering::SeqCst) {
            self.calls_while_down.fetch_add(1, Ordering::SeqCst);
            return vec![Outcome::Failed(SinkError::transient("down")); records.len()];
        }
        if records.iter().any(|r| self.hang.contains(&r.id)) {
            std::future::pending::<()>().await;
        }
        let wait = records
            .iter()
            .filter_map(|r| self.slow.get(&r.id))
            .max()
            .copied();
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
        records
            .iter()
            .map(|r| {
                if self.permanent.contains(&r.id) {
                    Outcome::Failed(SinkError::permanent("refused by test"))
                } else {
                    self.confirmed.lock().unwrap().push(r.id.clone());
                    Outcome::Confirmed
                }
            })
            .collect()
    }

    async fn ready(&self) -> Result<(), SinkError> {
        if self.down.load(Ordering::SeqCst) {
            Err(SinkError::transient("down"))
        } else {
            Ok(())
        }
    }
}

struct Run {
    emulator: cfq_emulator::Emulator,
    queue: String,
    ids: Vec<String>,
}

async fn seeded(tag: &str, count: usize) -> Run {
    let emulator = start_emulator().await;
    let queue = queue_name(tag);
    let ids = emulator.seed(
        ACCOUNT,
        &queue,
        &SeedSpec {
            count,
            body_size: 64,
            content_type: ContentType::Text,
        },
    );
    assert_eq!(ids.len(), count);
    Run {
        emulator,
        queue,
        ids,
    }
}

/// Runs the pipeline on `run`'s queue into `sink` until `stop` is cancelled.
async fn run_pipeline(
    run: &Run,
    sink: Arc<ScriptedSink>,
    queue_extra: &str,
    stop: CancellationToken,
) -> pipeline::Summary {
    let config = config(&run.emulator, &run.queue, queue_extra, "type = \"stdout\"");
    let token = SecretString::from(TOKEN.to_string());
    let client = api_client(config.queue().unwrap(), &token).unwrap();
    run_cloudflare(
        config.queue().unwrap().clone(),
        client,
        sink,
        Arc::new(Stats::default()),
        SourceOptions::default(),
        async move { stop.cancelled().await },
    )
    .await
    .expect("pipeline run")
}

/// Every lease id sent in `acks`, across all recorded ack calls.
fn acked_lease_count(run: &Run) -> usize {
    run.emulator
        .recorded_requests()
        .iter()
        .filter(|r| r.path.ends_with("/messages/ack"))
        .map(|r| {
            r.body.as_ref().expect("ack body")["acks"]
                .as_array()
                .map_or(0, Vec::len)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_slow_records_partial_batches() {
    let run = seeded("invariant", 400).await;
    let permanent: HashSet<String> = run.ids.iter().step_by(7).cloned().collect();
    let slow: HashMap<String, Duration> = run
        .ids
        .iter()
        .skip(3)
        .step_by(11)
        .map(|id| (id.clone(), Duration::from_millis(150)))
        .collect();
    let sink = Arc::new(ScriptedSink {
        permanent: permanent.clone(),
        slow,
        ..ScriptedSink::default()
    });
    let expected = run.ids.len() - permanent.len();
    let stop = CancellationToken::new();
    // Stops the run once every good record is confirmed (beside the pipeline, in this task).
    let watcher = async {
        wait_until(
            "all good records confirmed",
            Duration::from_secs(60),
            async || sink.confirmed.lock().unwrap().len() >= expected,
        )
        .await;
        stop.cancel();
    };
    // Refused records are released with an hour's delay: they must stay unacknowledged.
    let (summary, ()) = tokio::join!(
        run_pipeline(
            &run,
            Arc::clone(&sink),
            "batch_size = 50\npullers = 3\nretry_base_delay_secs = 3600",
            stop.clone(),
        ),
        watcher
    );

    let confirmed: HashSet<String> = sink.confirmed.lock().unwrap().iter().cloned().collect();
    assert_eq!(confirmed.len(), expected);
    assert!(confirmed.is_disjoint(&permanent));

    let stats = run.emulator.stats(ACCOUNT, &run.queue);
    let never_acked: HashSet<String> = stats.never_acked_ids.iter().cloned().collect();
    // Refused records: never acknowledged. Confirmed records: all acknowledged.
    assert_eq!(
        never_acked, permanent,
        "exactly the refused records stay unacked"
    );
    assert_eq!(stats.acked as usize, expected);
    assert_eq!(
        acked_lease_count(&run),
        expected,
        "no lease acked twice or without confirmation"
    );
    assert_eq!(summary.stats.acked as usize, expected);
    assert_eq!(
        summary.stats.sink_permanent_failures as usize,
        permanent.len()
    );
    assert_eq!(summary.stats.released as usize, permanent.len());
    assert_eq!(summary.unacked_confirmed, 0);
    assert!(assert_requests_match_schema(&run.emulator) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_outage_pauses_pulls_and_acks_nothing() {
    let run = seeded("outage", 300).await;
    let sink = Arc::new(ScriptedSink::default());
    sink.down.store(true, Ordering::SeqCst);
    let stop = CancellationToken::new();
    // Samples the emulator while the outage is in effect, once the pipeline has
    // demonstrably pulled (the sink saw deliveries) and had time to fill its in-flight
    // bound, and checks it there; then ends the outage and stops when everything is
    // confirmed. (Sampling before the pipeline starts would see 0 acks whatever it does.)
    let sampler = async {
        wait_until(
            "the pipeline pulled and met the outage",
            Duration::from_secs(30),
            async || sink.calls_while_down.load(Ordering::SeqCst) > 0,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let first = run.emulator.stats(ACCOUNT, &run.queue);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let during = run.emulator.stats(ACCOUNT, &run.queue);
        let calls_while_down = sink.calls_while_down.load(Ordering::SeqCst);
        assert!(
            during.delivered >= 20,
            "the sample must be taken after the pipeline pulled (delivered {})",
            during.delivered
        );
        assert_eq!(
            first.acked + during.acked,
            0,
            "nothing may be acked while the sink is down"
        );
        assert!(
            during.delivered <= 100,
            "pulling must pause while the sink is down (delivered {} > max_in_flight)",
            during.delivered
        );
        assert_eq!(
            during.delivered, first.delivered,
            "no pull may be made while the in-flight bound is full and the sink down"
        );
        assert!(
            calls_while_down > 1,
            "the sink was retried during the outage"
        );
        sink.down.store(false, Ordering::SeqCst);
        wait_until(
            "everything confirmed after the outage",
            Duration::from_secs(60),
            async || sink.confirmed.lock().unwrap().len() >= 300,
        )
        .await;
        stop.cancel();
    };
    let (summary, ()) = tokio::join!(
        run_pipeline(
            &run,
            Arc::clone(&sink),
            "batch_size = 20\npullers = 4\nmax_in_flight = 100",
            stop.clone(),
        ),
        sampler
    );
    let stats = run.emulator.stats(ACCOUNT, &run.queue);
    assert_eq!(stats.acked, 300);
    assert!(stats.never_acked_ids.is_empty());
    assert!(summary.stats.sink_transient_failures > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_near_lease_expiry_are_released_not_delivered_late() {
    let run = seeded("lease", 30).await;
    let sink = Arc::new(ScriptedSink::default());
    sink.down.store(true, Ordering::SeqCst);
    let stop = CancellationToken::new();
    let stopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            // The run length is the test: 2.5 s spans two 1.2 s leases held by a down sink.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            stop.cancel();
        })
    };
    let summary = run_pipeline(
        &run,
        Arc::clone(&sink),
        "batch_size = 10\npullers = 1\nvisibility_timeout_ms = 1200\nlease_margin_ms = 600",
        stop,
    )
    .await;
    stopper.await.unwrap();
    assert!(
        summary.stats.lease_expired_releases > 0,
        "records held past their lease margin must be released: {:?}",
        summary.stats
    );
    assert_eq!(summary.stats.acked, 0);
    assert_eq!(run.emulator.stats(ACCOUNT, &run.queue).acked, 0);
    assert!(sink.confirmed.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_what_the_sink_never_answered() {
    let run = seeded("shutdown", 200).await;
    // The batch holding this id never returns from the sink.
    let hang: HashSet<String> = [run.ids[120].clone()].into();
    let sink = Arc::new(ScriptedSink {
        hang: hang.clone(),
        ..ScriptedSink::default()
    });
    let stop = CancellationToken::new();
    // Stops the run once the other batches are confirmed (beside the pipeline, in this task).
    let stopper = async {
        wait_until(
            "the other batches confirmed",
            Duration::from_secs(30),
            async || sink.confirmed.lock().unwrap().len() >= 180,
        )
        .await;
        stop.cancel();
    };
    let started = std::time::Instant::now();
    let (summary, ()) = tokio::join!(
        run_pipeline(
            &run,
            Arc::clone(&sink),
            "batch_size = 20\npullers = 2\nshutdown_grace_ms = 500",
            stop.clone(),
        ),
        stopper
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let confirmed: HashSet<String> = sink.confirmed.lock().unwrap().iter().cloned().collect();
    assert!(!confirmed.contains(&run.ids[120]));
    assert!(summary.stats.shutdown_releases >= 1);
    let stats = run.emulator.stats(ACCOUNT, &run.queue);
    assert_eq!(stats.acked as usize, confirmed.len());
    assert_eq!(
        stats.in_flight, 0,
        "everything unconfirmed was released at shutdown"
    );
    let never_acked: HashSet<String> = stats.never_acked_ids.iter().cloned().collect();
    assert!(never_acked.contains(&run.ids[120]));
    assert!(never_acked.is_disjoint(&confirmed));
}
