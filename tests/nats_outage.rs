//! The NATS sink through a server outage, on a private nats-server (its own port and
//! store directory), so the shared server on 4222 is never stopped.
//!
//! While the server is down every delivery fails as transient and `ready()` fails; after
//! the restart `ready()` succeeds again, retried records are stored, and the stream holds
//! every record exactly once.

#![cfg(feature = "nats")]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use cfq_sinks::nats::{NatsConfig, NatsSink};
use cfq_sinks::{ContentType, ErrorClass, Outcome, Record, Sink};

use common::nats_server::NatsServer;

const STREAM: &str = "OUTAGE";

fn sink_config(url: &str) -> NatsConfig {
    let cfg: NatsConfig = toml::from_str(&format!(
        "url = '{url}'\nsubject = 'outage.{{queue_id}}'\npublish_timeout_ms = 1000\n\
         [create_stream]\nname = '{STREAM}'\nduplicate_window_secs = 600\n"
    ))
    .expect("config parses");
    cfg.validate().expect("config valid");
    cfg
}

fn record(i: usize) -> Record {
    common::record(format!("outage-{i:05}"))
        .body(ContentType::Json, format!("{{\"i\":{i}}}"))
        .build()
}

async fn stored_ids(url: &str) -> Vec<String> {
    let client = async_nats::connect(url).await.expect("connect for reading");
    let js = jetstream::new(client);
    let mut stream = js
        .get_stream(STREAM)
        .await
        .expect("stream survived the restart");
    let state = stream.info().await.expect("info").state.clone();
    let mut ids = Vec::new();
    if state.messages == 0 {
        return ids;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let m = stream.get_raw_message(seq).await.expect("message");
        ids.push(
            m.headers
                .get("Nats-Msg-Id")
                .expect("msg id")
                .as_str()
                .to_string(),
        );
    }
    ids
}

/// Waits until `ready()` succeeds (every failure on the way must be transient) and returns
/// how long that took.
async fn wait_ready(sink: &NatsSink) -> Duration {
    let start = Instant::now();
    let last_error = std::cell::RefCell::new(None);
    let ready =
        common::try_wait_until(Duration::from_secs(30), async || match sink.ready().await {
            Ok(()) => true,
            Err(e) => {
                assert!(e.is_transient(), "ready() failed permanently: {e}");
                *last_error.borrow_mut() = Some(e);
                false
            }
        })
        .await;
    assert!(
        ready,
        "not ready 30 s after restart: {:?}",
        last_error.borrow()
    );
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_fails_transient_and_loses_nothing_after_restart() {
    let mut server = NatsServer::start();
    let sink = NatsSink::connect(&sink_config(&server.url()))
        .await
        .expect("connects");
    sink.prepare_stream().await.expect("stream created");

    let before: Vec<Record> = (0..100).map(record).collect();
    let outcomes = sink.deliver(&before).await;
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Confirmed),
        "{outcomes:?}"
    );

    server.stop();
    let during: Vec<Record> = (100..200).map(record).collect();
    let started = Instant::now();
    let outcomes = sink.deliver(&during).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an outage must cost at most one timeout per batch"
    );
    for outcome in &outcomes {
        match outcome {
            Outcome::Failed(e) => assert_eq!(e.class, ErrorClass::Transient, "{e}"),
            other => panic!("nothing may be confirmed while the server is down: {other:?}"),
        }
    }
    let err = sink
        .ready()
        .await
        .expect_err("ready() fails while the server is down");
    assert!(err.is_transient(), "{err}");

    server.restart();
    wait_ready(&sink).await;
    // The bridge retries what failed; what was stored before is recognised by its id.
    let outcomes = sink.deliver(&during).await;
    assert!(outcomes.iter().all(Outcome::is_confirmed), "{outcomes:?}");
    let outcomes = sink.deliver(&before).await;
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Duplicate),
        "ids stored before the crash are still deduplicated: {outcomes:?}"
    );

    let ids = stored_ids(&server.url()).await;
    let expected: Vec<String> = (0..200).map(|i| record(i).id).collect();
    assert_eq!(ids, expected, "every record stored once, in order");
}

/// A delivery loop runs while the server is killed and restarted under it, retrying what
/// fails like the pipeline does. No batch that ran entirely inside the outage confirms
/// anything, and at the end every record is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_run_and_restarted() {
    let mut server = NatsServer::start();
    let sink = Arc::new(
        NatsSink::connect(&sink_config(&server.url()))
            .await
            .expect("connects"),
    );
    sink.prepare_stream().await.expect("stream created");

    // 100 batches, paced so that the run lasts about 3 s and spans the outage.
    const TOTAL: usize = 5_000;
    const BATCH: usize = 50;
    const PACE: Duration = Duration::from_millis(30);
    // `down` is set after the server was killed and cleared before it is restarted;
    // `outages` counts the kills, so a batch knows whether it ran inside one outage.
    let down = Arc::new(AtomicBool::new(false));
    let outages = Arc::new(AtomicU64::new(0));
    // Batches confirmed so far, so the kill comes after the run is under way.
    let confirmed_batches = Arc::new(AtomicU64::new(0));

    let deliverer = {
        let sink = Arc::clone(&sink);
        let down = Arc::clone(&down);
        let outages = Arc::clone(&outages);
        let confirmed_batches = Arc::clone(&confirmed_batches);
        tokio::spawn(async move {
            let mut confirmed: HashMap<String, usize> = HashMap::new();
            let mut transient = 0usize;
            let mut confirmed_while_down = 0usize;
            let mut queue: Vec<Record> = (0..TOTAL).map(record).collect();
            let deadline = Instant::now() + Duration::from_secs(120);
            while !queue.is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "records still unconfirmed after 120 s"
                );
                tokio::time::sleep(PACE).await;
                let n = queue.len().min(BATCH);
                let batch: Vec<Record> = queue.drain(..n).collect();
                let down_at_start = down
                    .load(Ordering::SeqCst)
                    .then(|| outages.load(Ordering::SeqCst));
                let outcomes = sink.deliver(&batch).await;
                let inside_outage = down_at_start.is_some()
                    && down.load(Ordering::SeqCst)
                    && down_at_start == Some(outages.load(Ordering::SeqCst));
                let mut failed_any = false;
                for (record, outcome) in batch.into_iter().zip(outcomes) {
                    match outcome {
                        Outcome::Confirmed | Outcome::Duplicate => {
                            if inside_outage {
                                confirmed_while_down += 1;
                            }
                            *confirmed.entry(record.id.clone()).or_default() += 1;
                        }
                        Outcome::Failed(e) => {
                            assert!(e.is_transient(), "only transient failures expected: {e}");
                            transient += 1;
                            failed_any = true;
                            queue.push(record);
                        }
                        other => panic!("unexpected outcome {other:?}"),
                    }
                }
                if failed_any {
                    // The pipeline waits for ready() before pulling again.
                    common::wait_until(
                        "ready() after a failed batch",
                        Duration::from_secs(60),
                        async || sink.ready().await.is_ok(),
                    )
                    .await;
                } else {
                    confirmed_batches.fetch_add(1, Ordering::SeqCst);
                }
            }
            (confirmed, transient, confirmed_while_down)
        })
    };

    common::wait_until(
        "a first batch confirmed",
        Duration::from_secs(30),
        async || confirmed_batches.load(Ordering::SeqCst) > 0,
    )
    .await;
    server.stop();
    outages.fetch_add(1, Ordering::SeqCst);
    down.store(true, Ordering::SeqCst);
    // The outage lasts 2 s on purpose: long enough for many paced batches to run inside it.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let err = sink
        .ready()
        .await
        .expect_err("ready() fails while the server is down");
    assert!(err.is_transient(), "{err}");
    down.store(false, Ordering::SeqCst);
    server.restart();

    let (confirmed, transient, confirmed_while_down) = deliverer.await.expect("deliverer");
    assert!(transient > 0, "the outage was not seen by any delivery");
    assert_eq!(
        confirmed_while_down, 0,
        "records confirmed while the server was down"
    );
    assert_eq!(confirmed.len(), TOTAL);

    let ids = stored_ids(&server.url()).await;
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a record was stored twice");
    assert_eq!(
        ids.len(),
        TOTAL,
        "a confirmed record is missing from the stream"
    );
}
