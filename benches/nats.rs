//! End-to-end rate into NATS JetStream, against raw async-nats publish+PubAck loops on
//! the same server with the same message size, measured in the same run (the machine is
//! shared and noisy: compare ratios, not absolute figures).
//!
//! Run: `cargo bench --bench nats` (env `BENCH_MESSAGES`, default 50000; `BENCH_BODY`,
//! default 1000 bytes). Needs `/usr/sbin/nats-server` (`bash .ci/start-nats.sh` installs
//! it): the bench starts its own server on a port it chooses, with a fresh file store, and the
//! emulator as its own process (`cfq-bridge emulator`).
//!
//! Measured:
//! 1. raw loop A: publish `BENCH_BODY`-byte payloads without headers, keeping a window of
//!    PubAcks in flight (the strictest baseline);
//! 2. raw loop B: the same with the headers the bridge sends (metadata, `cf-queue-*`,
//!    `Nats-Msg-Id`, so the server deduplicates too);
//! 3. the emulator alone: a raw pull+ack loop (no decoding, no sink), the bridge's other
//!    ceiling;
//! 4. the bridge: `cfq-bridge run --until-empty` from the emulator into JetStream, json
//!    messages whose decoded body is `BENCH_BODY` bytes.

use std::path::Path;
use std::time::Instant;

use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::HeaderMap;
use bytes::Bytes;

#[path = "support/mod.rs"]
mod support;

use support::{
    json_body, raw_pull_ack_loop, record, run_bridge, seed, self_cpu, start_emulator, Measured,
    NatsServer, ACCOUNT,
};

/// PubAcks a raw loop keeps in flight.
const WINDOW: usize = 1_000;

fn main() {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let messages = env("BENCH_MESSAGES", 50_000);
    let body = env("BENCH_BODY", 1_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(messages, body));
}

async fn create_stream(js: &jetstream::Context, name: &str, subject: &str) {
    js.create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        ..Default::default()
    })
    .await
    .expect("create stream");
}

async fn stream_count(js: &jetstream::Context, name: &str) -> u64 {
    let mut stream = js.get_stream(name).await.expect("stream");
    stream.info().await.expect("info").state.messages
}

/// Publishes `count` messages keeping up to [`WINDOW`] PubAcks in flight, and checks each.
async fn raw_publish_loop(
    js: &jetstream::Context,
    subject: &str,
    count: usize,
    size: usize,
    with_headers: bool,
) -> Measured {
    let payload = Bytes::from(json_body(0, size).to_string());
    let cpu0 = self_cpu();
    let t0 = Instant::now();
    let mut window: std::collections::VecDeque<PublishAckFuture> =
        std::collections::VecDeque::with_capacity(WINDOW);
    for i in 0..count {
        if window.len() == WINDOW {
            let ack = window.pop_front().unwrap().await.expect("PubAck");
            assert!(!ack.duplicate);
        }
        let future = if with_headers {
            let mut headers = HeaderMap::new();
            headers.insert("CF-Content-Type", "json");
            headers.insert("CF-sourceMessageSource", "worker");
            headers.insert("cf-queue-message-id", format!("raw-{i}").as_str());
            headers.insert("cf-queue-timestamp-ms", "1710950954154");
            headers.insert("cf-queue-attempts", "1");
            headers.insert("cf-queue-id", "bench");
            headers.insert("Nats-Msg-Id", format!("raw-{i}").as_str());
            js.publish_with_headers(subject.to_string(), headers, payload.clone())
                .await
        } else {
            js.publish(subject.to_string(), payload.clone()).await
        };
        window.push_back(future.expect("publish"));
    }
    for ack in window {
        ack.await.expect("PubAck");
    }
    Measured {
        messages: count,
        wall: t0.elapsed(),
        cpu: self_cpu() - cpu0,
        max_rss_kb: 0,
    }
}

/// The sink alone: `NatsSink::deliver` on batches of 100 records from 4 tasks at once
/// (as the pipeline's delivery tasks call it), records built beforehand.
async fn sink_only(nats_url: &str, count: usize, size: usize) -> Measured {
    use cfq_sinks::{ContentType, Outcome, Record, Sink};
    let cfg: cfq_sinks::nats::NatsConfig = toml::from_str(&format!(
        "url = '{nats_url}'\nsubject = 'sink.{{queue_id}}'\nstream = 'SINK'\n"
    ))
    .unwrap();
    let sink: std::sync::Arc<dyn Sink> =
        std::sync::Arc::from(cfq_sinks::nats::build(&cfg).await.expect("sink"));
    let queue: std::sync::Arc<str> = std::sync::Arc::from("bench");
    let body = Bytes::from(json_body(0, size).to_string());
    let records: Vec<Record> = (0..count)
        .map(|i| {
            record(format!("sink-{i:08}"))
                .queue(queue.clone())
                .timestamp_ms(1_710_950_954_154)
                .body(ContentType::Json, body.clone())
                .meta("CF-sourceMessageSource", "worker")
                .build()
        })
        .collect();
    let batches: Vec<Vec<Record>> = records.chunks(100).map(<[Record]>::to_vec).collect();
    let queue = std::sync::Arc::new(std::sync::Mutex::new(batches));
    let cpu0 = self_cpu();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (sink, queue) = (sink.clone(), queue.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(batch) = queue.lock().unwrap().pop() else {
                    return;
                };
                let outcomes = sink.deliver(&batch).await;
                assert!(outcomes.iter().all(|o| *o == Outcome::Confirmed));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Measured {
        messages: count,
        wall: t0.elapsed(),
        cpu: self_cpu() - cpu0,
        max_rss_kb: 0,
    }
}

/// `cfq-bridge run --until-empty` into JetStream.
fn bridge_into_nats(
    dir: &Path,
    base: &str,
    nats_url: &str,
    queue: &str,
    queue_extra: &str,
    expected: usize,
) -> Measured {
    let config = dir.join(format!("{queue}.toml"));
    std::fs::write(
        &config,
        format!(
            "[queue]\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"{queue}\"\napi_base_url = \"{base}\"\n\
             {queue_extra}\n\n[sink]\ntype = \"nats\"\nurl = \"{nats_url}\"\n\
             subject = \"bridge.{{queue_id}}\"\nstream = \"BRIDGE\"\n"
        ),
    )
    .unwrap();
    run_bridge(&config, expected)
}

async fn run(messages: usize, body: usize) {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start();
    let nats_url = nats.url();
    let client = async_nats::connect(&nats_url).await.expect("connect");
    let js = jetstream::new(client);
    create_stream(&js, "RAW", "raw.>").await;
    create_stream(&js, "RAWH", "rawh.>").await;
    create_stream(&js, "BRIDGE", "bridge.>").await;
    create_stream(&js, "SINK", "sink.>").await;
    let (_emulator, base) = start_emulator(&[]).await;

    println!("# cfq-bridge NATS JetStream benchmark ({messages} messages, {body}-byte json bodies, file storage)\n");
    let raw = raw_publish_loop(&js, "raw.bench", messages, body, false).await;
    assert_eq!(stream_count(&js, "RAW").await as usize, messages);
    let raw_h = raw_publish_loop(&js, "rawh.bench", messages, body, true).await;
    assert_eq!(stream_count(&js, "RAWH").await as usize, messages);

    let sink = sink_only(&nats_url, messages, body).await;
    assert_eq!(stream_count(&js, "SINK").await as usize, messages);

    seed(&base, "pullack", messages, body).await;
    let pull_ack = raw_pull_ack_loop(&base, "pullack", 4, messages).await;

    seed(&base, "e2e", messages, body).await;
    let bridge = bridge_into_nats(dir.path(), &base, &nats_url, "e2e", "", messages);
    let stored = stream_count(&js, "BRIDGE").await as usize;
    assert_eq!(stored, messages, "the bridge stored every message once");

    seed(&base, "tuned", messages, body).await;
    let tuned = bridge_into_nats(
        dir.path(),
        &base,
        &nats_url,
        "tuned",
        "pullers = 8\nmax_in_flight = 10000",
        messages,
    );
    let stored = stream_count(&js, "BRIDGE").await as usize;
    assert_eq!(stored, 2 * messages, "the bridge stored every message once");

    println!("| scenario | messages | msg/s | CPU µs/msg (measured process) |");
    println!("|---|---|---|---|");
    let row = |name: &str, m: &Measured| {
        println!(
            "| {name} | {} | {:.0} | {:.1} |",
            m.messages,
            m.rate(),
            m.cpu_us_per_message()
        );
    };
    row("raw async-nats publish+PubAck, no headers (baseline)", &raw);
    row(
        "raw async-nats publish+PubAck, bridge's headers + Nats-Msg-Id",
        &raw_h,
    );
    row("NatsSink::deliver alone, batches of 100, 4 at once", &sink);
    row(
        "raw pull+ack loop against the emulator (no sink)",
        &pull_ack,
    );
    row(
        "bridge: emulator → JetStream, `run --until-empty`, default queue settings",
        &bridge,
    );
    row("bridge: same, pullers = 8, max_in_flight = 10000", &tuned);
    println!();
    println!(
        "ratio bridge / raw publish+PubAck (no headers): {:.2}",
        bridge.rate() / raw.rate()
    );
    println!(
        "ratio bridge / raw publish+PubAck (same headers): {:.2}",
        bridge.rate() / raw_h.rate()
    );
    println!(
        "ratio tuned bridge / raw publish+PubAck (same headers): {:.2}",
        tuned.rate() / raw_h.rate()
    );
    println!(
        "ratio sink alone / raw publish+PubAck (same headers): {:.2}",
        sink.rate() / raw_h.rate()
    );
    println!(
        "ratio bridge / min(raw publish with headers, raw pull+ack): {:.2}",
        bridge.rate() / raw_h.rate().min(pull_ack.rate())
    );
}
