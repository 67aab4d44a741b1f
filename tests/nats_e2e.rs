//! End to end into NATS JetStream: messages seeded into the emulator go through the real
//! `cfq-bridge run` binary (or the in-process pipeline, for the outage) into a JetStream
//! stream, and an independent client reads them back.
//!
//! Needs the shared server on 127.0.0.1:4222 (`bash .ci/start-nats.sh`); the outage test
//! runs its own private nats-server.

#![cfg(feature = "nats")]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::message::StreamMessage;
use cfq_bridge::app::{api_client, run_cloudflare};
use cfq_bridge::sources::cloudflare::SourceOptions;
use cfq_bridge::stats::Stats;
use cfq_emulator::{ContentType, SeedSpec};
use cfq_sinks::Sink;
use common::*;
use secrecy::SecretString;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use common::nats_server::{require_shared_server, NatsServer, SHARED_URL};

/// Reads every message of `stream` with a fresh client.
async fn read_stream(url: &str, stream: &str) -> Vec<StreamMessage> {
    let client = async_nats::connect(url)
        .await
        .expect("independent client connects");
    let js = jetstream::new(client);
    let mut s = js.get_stream(stream).await.expect("stream exists");
    let state = s.info().await.expect("stream info").state.clone();
    let mut out = Vec::with_capacity(state.messages as usize);
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        out.push(s.get_raw_message(seq).await.expect("stored message"));
    }
    out
}

fn header<'a>(m: &'a StreamMessage, name: &str) -> &'a str {
    m.headers
        .get(name)
        .unwrap_or_else(|| panic!("header {name} missing"))
        .as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_json_messages_land_in_jetstream_through_the_binary() {
    require_shared_server();
    let emulator = start_emulator().await;
    let queue = queue_name("natse2e");
    let ids: Vec<String> = emulator.seed(
        ACCOUNT,
        &queue,
        &SeedSpec {
            count: 5_000,
            body_size: 256,
            content_type: ContentType::Json,
        },
    );
    assert_eq!(ids.len(), 5_000);
    let stream = format!("CFQ_E2E_{queue}");
    let subject = format!("cfqe2e.{queue}");
    let dir = tempfile::tempdir().unwrap();
    let sink = format!(
        "type = \"nats\"\nurl = \"{SHARED_URL}\"\nsubject = \"{subject}.{{queue_id}}\"\n\
         jetstream = true\n\n[sink.create_stream]\nname = \"{stream}\"\n"
    );
    let config = write_config(dir.path(), &config_text(&emulator, &queue, "", &sink));
    let output = run_bridge(
        &["run", "--config", config.to_str().unwrap(), "--until-empty"],
        Duration::from_secs(240),
    )
    .await;
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let stored = read_stream(SHARED_URL, &stream).await;
    assert_eq!(stored.len(), ids.len(), "each message stored exactly once");
    let expected: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut seen = HashSet::new();
    let mut seqs = HashSet::new();
    for m in &stored {
        let id = header(m, "Nats-Msg-Id");
        assert!(expected.contains(id), "unexpected message id {id}");
        assert!(seen.insert(id.to_string()), "message {id} stored twice");
        assert_eq!(m.subject.as_str(), format!("{subject}.{queue}"));
        assert_eq!(header(m, "cf-queue-message-id"), id);
        assert_eq!(header(m, "cf-queue-id"), queue);
        assert_eq!(header(m, "cf-queue-attempts"), "1");
        assert!(header(m, "cf-queue-timestamp-ms").parse::<u64>().unwrap() > 0);
        assert_eq!(header(m, "CF-Content-Type"), "json");
        assert_eq!(header(m, "CF-sourceMessageSource"), "worker");
        // The body is the decoded JSON, not the base64 text of the wire.
        let body: Value = serde_json::from_slice(&m.payload).unwrap_or_else(|e| {
            panic!(
                "body of {id} is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&m.payload)
            )
        });
        assert!(seqs.insert(body["seq"].as_u64().expect("seeded body has seq")));
        assert_eq!(m.payload.len(), 256, "decoded body size of {id}");
    }
    assert_eq!(seen.len(), ids.len());

    let stats = emulator.stats(ACCOUNT, &queue);
    assert_eq!(stats.acked, 5_000, "every lease acked");
    assert_eq!(stats.backlog, 0);
    assert!(stats.never_acked_ids.is_empty());

    let client = async_nats::connect(SHARED_URL).await.unwrap();
    jetstream::new(client)
        .delete_stream(&stream)
        .await
        .expect("cleanup");
}

/// The whole pipeline into a private nats-server that is killed mid-run and restarted:
/// no ack happens while it is down, pulling resumes once `ready()` succeeds, and every
/// message ends up in the stream exactly once and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_acks_nothing_while_the_server_is_down_and_loses_nothing() {
    const COUNT: usize = 3_000;
    let mut server = NatsServer::start();
    let emulator = start_emulator().await;
    let queue = queue_name("natsoutage");
    let ids = emulator.seed(
        ACCOUNT,
        &queue,
        &SeedSpec {
            count: COUNT,
            body_size: 128,
            content_type: ContentType::Json,
        },
    );
    let sink_table = format!(
        "type = \"nats\"\nurl = \"{}\"\nsubject = \"outage.{{queue_id}}\"\npublish_timeout_ms = 1000\n\n\
         [sink.create_stream]\nname = \"OUTAGE\"\n",
        server.url()
    );
    // Small batches and a paced run, so the outage falls in the middle of it.
    let config = config(
        &emulator,
        &queue,
        "batch_size = 10\npullers = 2\nmax_in_flight = 100\nack_interval_ms = 20",
        &sink_table,
    );
    let sink: Arc<dyn Sink> = Arc::from(
        cfq_sinks::build(config.sink().unwrap())
            .await
            .expect("nats sink builds"),
    );
    let token = SecretString::from(TOKEN.to_string());
    let client = api_client(config.queue().unwrap(), &token).unwrap();
    let stop = CancellationToken::new();
    let pipeline = {
        let stop = stop.clone();
        let queue_cfg = config.queue().unwrap().clone();
        let sink = Arc::clone(&sink);
        tokio::spawn(async move {
            run_cloudflare(
                queue_cfg,
                client,
                sink,
                Arc::new(Stats::default()),
                SourceOptions::default(),
                async move { stop.cancelled().await },
            )
            .await
        })
    };

    // Let part of the queue through, then kill the server.
    wait_until("first acks", Duration::from_secs(60), async || {
        emulator.stats(ACCOUNT, &queue).acked > 0
    })
    .await;
    server.stop();
    // PubAcks that came back before the kill still confirm their records, once the rest
    // of their batch has timed out (publish_timeout_ms = 1000), and are then acked. Give
    // those 2 s; after that nothing more may be acked while the server stays down.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let at_kill = emulator.stats(ACCOUNT, &queue);
    assert!(
        (at_kill.acked as usize) < COUNT,
        "the queue drained before the outage; the test proves nothing"
    );
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let while_down = emulator.stats(ACCOUNT, &queue);
    assert_eq!(
        while_down.acked, at_kill.acked,
        "leases acked while the NATS server was down"
    );
    assert!(sink.ready().await.is_err(), "ready() must fail while down");

    server.restart();
    let start = Instant::now();
    wait_until(
        "every lease acked after the restart",
        Duration::from_secs(120),
        async || emulator.stats(ACCOUNT, &queue).acked as usize == COUNT,
    )
    .await;
    let recovery = start.elapsed();
    stop.cancel();
    let summary = pipeline
        .await
        .expect("pipeline task")
        .expect("pipeline run");
    assert!(
        summary.stats.sink_transient_failures > 0,
        "the outage was not seen"
    );

    let stored = read_stream(&server.url(), "OUTAGE").await;
    let stored_ids: Vec<&str> = stored.iter().map(|m| header(m, "Nats-Msg-Id")).collect();
    let unique: HashSet<&str> = stored_ids.iter().copied().collect();
    assert_eq!(unique.len(), stored_ids.len(), "a message was stored twice");
    let expected: HashSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(
        unique, expected,
        "every message stored (recovered in {recovery:?})"
    );
    let stats = emulator.stats(ACCOUNT, &queue);
    assert!(stats.never_acked_ids.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_command_reports_a_missing_stream_and_a_short_duplicate_window() {
    require_shared_server();
    let emulator = start_emulator().await;
    let queue = queue_name("natscheck");
    emulator.seed(ACCOUNT, &queue, &SeedSpec::default());
    let dir = tempfile::tempdir().unwrap();

    let subject = format!("cfqcheck.{queue}");
    let missing = write_config(
        dir.path(),
        &config_text(
            &emulator,
            &queue,
            "",
            &format!("type = \"nats\"\nurl = \"{SHARED_URL}\"\nsubject = \"{subject}\""),
        ),
    );
    let output = run_bridge(
        &["check", "--config", missing.to_str().unwrap()],
        Duration::from_secs(60),
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "check must fail without a stream");
    assert!(
        stderr.contains("no JetStream stream captures subject") && stderr.contains(&subject),
        "{stderr}"
    );

    // The stream exists, but remembers message ids for 60 s only.
    let stream = format!("CFQ_CHECK_{queue}");
    let short = dir.path().join("short.toml");
    std::fs::write(
        &short,
        config_text(
            &emulator,
            &queue,
            "visibility_timeout_ms = 30000\nretry_max_delay_secs = 600",
            &format!(
                "type = \"nats\"\nurl = \"{SHARED_URL}\"\nsubject = \"{subject}\"\n\n\
                 [sink.create_stream]\nname = \"{stream}\"\nduplicate_window_secs = 60\nstorage = \"memory\""
            ),
        ),
    )
    .unwrap();
    let output = run_bridge(
        &["check", "--config", short.to_str().unwrap()],
        Duration::from_secs(60),
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("sink: ok (nats)"), "{stdout}");
    assert!(
        stdout.contains("warning:") && stdout.contains("duplicate_window"),
        "{stdout}"
    );
    let client = async_nats::connect(SHARED_URL).await.unwrap();
    jetstream::new(client)
        .delete_stream(&stream)
        .await
        .expect("cleanup");
}
