//! The `cloudflare_queue` sink against the in-process emulator: what is published and how
//! (bodies, content types, calls within the API's limits, the schema), what is refused and
//! where it goes, 429 and 5xx answers, the rate limiter, and the invariant from one queue
//! to another: no lease of the source is acknowledged before its message was published.
#![cfg(feature = "cloudflare_queue")]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use cfq_emulator::{Emulator, Endpoint, ScriptedResponse};
use cfq_sinks::cloudflare_queue::{
    BytesPolicy, CloudflareQueue, CloudflareQueueConfig, SkipReason, REJECT_REASON_KEY,
};
use cfq_sinks::{ContentType, ErrorClass, Outcome, Record, Sink};
use common::*;
use serde_json::{json, Value};

/// A sink table publishing into `queue` on `emulator`, the token in a file under `dir`.
fn sink_table(emulator: &Emulator, queue: &str, dir: &Path, extra: &str) -> String {
    let token = dir.join("dest-token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    format!(
        "type = \"cloudflare_queue\"\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"{queue}\"\n\
         api_base_url = \"{}\"\napi_token_file = {}\n{extra}\n",
        emulator.base_url(),
        toml_string(&token.display().to_string()),
    )
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// Opens the sink on `queue`, with extra `[sink]` lines.
fn open(emulator: &Emulator, queue: &str, dir: &Path, extra: &str) -> CloudflareQueue {
    let table = sink_table(emulator, queue, dir, extra);
    let table = table.replace("type = \"cloudflare_queue\"\n", "");
    let config: CloudflareQueueConfig = toml::from_str(&table).expect("a valid sink table");
    CloudflareQueue::open(&config).expect("the sink opens")
}

/// A message pulled back from a queue: content type and decoded body bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Pulled {
    content_type: String,
    body: Vec<u8>,
}

/// Pulls every message of `queue` (in process) and acks them, returning them.
fn drain(emulator: &Emulator, queue: &str) -> Vec<Pulled> {
    let mut out = Vec::new();
    loop {
        let answer = emulator.request(
            Endpoint::Pull,
            ACCOUNT,
            queue,
            br#"{"batch_size":100,"visibility_timeout_ms":60000}"#,
        );
        assert_eq!(answer.status, 200);
        let value: Value = serde_json::from_slice(&answer.body).unwrap();
        let messages = value["result"]["messages"].as_array().unwrap().clone();
        if messages.is_empty() {
            return out;
        }
        let mut acks = Vec::new();
        for m in messages {
            let content_type = m["metadata"]["CF-Content-Type"]
                .as_str()
                .unwrap()
                .to_owned();
            let body = m["body"].as_str().unwrap();
            let body = match content_type.as_str() {
                "text" => body.as_bytes().to_vec(),
                _ => base64::engine::general_purpose::STANDARD
                    .decode(body)
                    .unwrap(),
            };
            out.push(Pulled { content_type, body });
            acks.push(json!({"lease_id": m["lease_id"]}));
        }
        let ack = json!({ "acks": acks }).to_string();
        assert_eq!(
            emulator
                .request(Endpoint::Ack, ACCOUNT, queue, ack.as_bytes())
                .status,
            200
        );
    }
}

fn pulled(content_type: &str, body: &[u8]) -> Pulled {
    Pulled {
        content_type: content_type.into(),
        body: body.to_vec(),
    }
}

/// The publish batch requests recorded so far, as JSON bodies.
fn publish_calls(emulator: &Emulator) -> Vec<Value> {
    emulator
        .recorded_requests()
        .into_iter()
        .filter(|r| r.endpoint == Some(Endpoint::PublishBatch))
        .map(|r| r.body.expect("a JSON body"))
        .collect()
}

fn failed_class(outcome: &Outcome) -> Option<ErrorClass> {
    match outcome {
        Outcome::Failed(error) => Some(error.class),
        _ => None,
    }
}

#[tokio::test]
async fn text_and_json_records_come_back_identical() {
    let emulator = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sink = open(&emulator, "dest", dir.path(), "");
    // JSON kept as written: spacing, key order, number spelling, an escape.
    let json_text = r#"{"b" : 1.50, "a":["\u00e9", null],"big":123456789012345678901234567890}"#;
    let records = vec![
        record("t1").text("plain text").build(),
        record("t2")
            .text("tab\t\"quote\" \u{e9} \u{1F600} \\ line\nbreak")
            .build(),
        record("j1")
            .body(ContentType::Json, json_text.as_bytes().to_vec())
            .build(),
        record("j2")
            .json(&json!({"nested": {"list": [1, 2, 3]}}))
            .build(),
        record("t3").text("").build(),
    ];
    let outcomes = sink.deliver(&records).await;
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Confirmed),
        "{outcomes:?}"
    );
    let mut expected: Vec<Pulled> = records
        .iter()
        .map(|r| pulled(r.content_type.as_str(), &r.body))
        .collect();
    let mut got = drain(&emulator, "dest");
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    let stats = sink.stats().snapshot();
    assert_eq!(stats.published, 5);
    assert_eq!(stats.calls, 1);
    assert!(assert_requests_match_schema(&emulator) >= 1);
}

#[tokio::test]
async fn bytes_and_v8_records_go_whole_to_the_rejects_file() {
    let emulator = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let rejects = dir.path().join("rejects.jsonl");
    let sink = open(
        &emulator,
        "dest",
        dir.path(),
        &format!(
            "rejects_path = {}",
            toml_string(&rejects.display().to_string())
        ),
    );
    let records = vec![
        record("b1")
            .body(ContentType::Bytes, vec![0u8, 255, 10, 13])
            .meta("origin", "archive")
            .meta("n", 7)
            .build(),
        record("v1")
            .body(ContentType::V8, vec![0xffu8, 0x0d, 0x22])
            .attempts(3)
            .build(),
        record("t1").text("kept").build(),
    ];
    let outcomes = sink.deliver(&records).await;
    assert!(
        matches!(&outcomes[0], Outcome::DeadLettered { reason } if reason.starts_with("bytes_policy")),
        "{outcomes:?}"
    );
    assert!(
        matches!(&outcomes[1], Outcome::DeadLettered { reason } if reason.starts_with("v8")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[2], Outcome::Confirmed);
    assert_eq!(drain(&emulator, "dest"), vec![pulled("text", b"kept")]);

    // Each refused record is in the file whole: id, queue, timestamp, attempts, content
    // type, every metadata entry, the exact body, plus the reason.
    let lines = read_jsonl(&rejects);
    assert_eq!(lines.len(), 2);
    for (line, record) in lines.iter().zip(&records[..2]) {
        assert_eq!(line["id"], record.id.as_str());
        assert_eq!(line["queue_id"], &*record.queue_id);
        assert_eq!(line["timestamp_ms"], record.timestamp_ms);
        assert_eq!(line["attempts"], record.attempts);
        assert_eq!(line["content_type"], record.content_type.as_str());
        let body = base64::engine::general_purpose::STANDARD
            .decode(line["body"].as_str().unwrap())
            .unwrap();
        assert_eq!(body, record.body.to_vec());
        for (key, value) in &record.metadata {
            assert_eq!(&line["metadata"][key], value, "{key}");
        }
        assert!(line["metadata"][REJECT_REASON_KEY].is_string(), "{line}");
    }
    let stats = sink.stats().snapshot();
    assert_eq!(stats.skipped(SkipReason::BytesPolicy), 1);
    assert_eq!(stats.skipped(SkipReason::V8), 1);
    assert_eq!(stats.dead_lettered, 2);
    sink.close().await.unwrap();
}

#[tokio::test]
async fn base64_text_publishes_bytes_and_v8_is_always_refused() {
    let emulator = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sink = open(
        &emulator,
        "dest",
        dir.path(),
        "bytes_policy = \"base64_text\"",
    );
    assert_eq!(
        cfq_sinks::cloudflare_queue::plan(
            &record("b").body(ContentType::Bytes, vec![1u8]).build(),
            BytesPolicy::Base64Text
        ),
        Ok(())
    );
    let records = vec![
        record("b1")
            .body(ContentType::Bytes, vec![0u8, 255, 10])
            .build(),
        record("v1").body(ContentType::V8, vec![1u8, 2]).build(),
    ];
    let outcomes = sink.deliver(&records).await;
    assert_eq!(outcomes[0], Outcome::Confirmed);
    // No rejects file: the v8 record is left at its source.
    assert_eq!(
        failed_class(&outcomes[1]),
        Some(ErrorClass::Permanent),
        "{outcomes:?}"
    );
    assert_eq!(drain(&emulator, "dest"), vec![pulled("text", b"AP8K")]);
}

#[tokio::test]
async fn without_a_rejects_file_refused_records_fail_permanently() {
    let emulator = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sink = open(&emulator, "dest", dir.path(), "");
    let records = vec![
        record("b1").body(ContentType::Bytes, vec![1u8]).build(),
        record("v1").body(ContentType::V8, vec![1u8]).build(),
        record("big").text("x".repeat(128_001)).build(),
        record("j")
            .body(ContentType::Json, b"{\"a\":".to_vec())
            .build(),
        record("ok").text("x".repeat(128_000)).build(),
    ];
    let outcomes = sink.deliver(&records).await;
    for (outcome, reason) in
        outcomes[..4]
            .iter()
            .zip(["bytes_policy", "v8", "too_large", "invalid_body"])
    {
        match outcome {
            Outcome::Failed(error) => {
                assert_eq!(error.class, ErrorClass::Permanent);
                assert!(error.message.contains(reason), "{error}");
            }
            other => panic!("{reason}: {other:?}"),
        }
    }
    assert_eq!(outcomes[4], Outcome::Confirmed);
    let got = drain(&emulator, "dest");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body.len(), 128_000);
    let stats = sink.stats().snapshot();
    assert_eq!(stats.skipped(SkipReason::TooLarge), 1);
    assert_eq!(stats.skipped(SkipReason::InvalidBody), 1);
    assert_eq!(stats.dead_lettered, 0);
}

#[tokio::test]
async fn large_batches_are_split_into_calls_within_the_limits() {
    let emulator = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sink = open(&emulator, "dest", dir.path(), "");
    let mut records = Vec::new();
    for i in 0..6 {
        records.push(
            record(format!("big{i}"))
                .text(format!("{i}{}", "b".repeat(99_999)))
                .build(),
        );
    }
    for i in 0..250 {
        records.push(record(format!("s{i}")).text(format!("small {i}")).build());
    }
    let outcomes = sink.deliver(&records).await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Confirmed));
    let calls = publish_calls(&emulator);
    assert!(calls.len() >= 4, "{} calls", calls.len());
    let mut total = 0;
    for call in &calls {
        let messages = call["messages"].as_array().unwrap();
        assert!(
            messages.len() <= 100,
            "{} messages in one call",
            messages.len()
        );
        let bytes: usize = messages
            .iter()
            .map(|m| m["body"].as_str().unwrap().len())
            .sum();
        assert!(bytes <= 256_000, "{bytes} bytes in one call");
        total += messages.len();
    }
    assert_eq!(total, records.len());
    assert_eq!(drain(&emulator, "dest").len(), records.len());
    assert_requests_match_schema(&emulator);
}

#[tokio::test]
async fn rate_limits_and_server_errors_lose_nothing_and_retry_after_is_honoured() {
    let emulator = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sink = open(&emulator, "dest", dir.path(), "");
    let envelope = r#"{"success":false,"errors":[{"code":10001,"message":"injected"}],"messages":[],"result":null}"#;
    emulator.script(
        Endpoint::PublishBatch,
        vec![
            ScriptedResponse::json(429, envelope).with_header("Retry-After", "2"),
            ScriptedResponse::json(500, envelope),
            ScriptedResponse::raw(502, Some("text/html"), "<html>bad gateway</html>"),
            // A 200 whose envelope says `success: false` publishes nothing either.
            ScriptedResponse::json(200, envelope),
        ],
    );
    let records: Vec<Record> = (0..10)
        .map(|i| record(format!("m{i}")).text(format!("body {i}")).build())
        .collect();
    let started = Instant::now();
    let outcomes = sink.deliver(&records).await;
    let elapsed = started.elapsed();
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Confirmed),
        "{outcomes:?}"
    );
    assert!(
        elapsed >= Duration::from_secs(2),
        "Retry-After not honoured: {elapsed:?}"
    );
    let got = drain(&emulator, "dest");
    assert_eq!(
        got.len(),
        10,
        "each message exactly once: failed calls publish nothing"
    );
    let stats = sink.stats().snapshot();
    assert_eq!(stats.rate_limited, 1);
    assert_eq!(stats.server_errors, 3);
    assert_eq!(stats.calls, 5);
    assert_eq!(stats.published, 10);
}

#[tokio::test]
async fn failures_that_outlast_the_retries_are_transient_and_confirm_nothing() {
    let emulator = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sink = open(&emulator, "dest", dir.path(), "max_retries = 1");
    let envelope = r#"{"success":false,"errors":[{"code":10001,"message":"injected"}],"messages":[],"result":null}"#;
    // The first call fails twice (retries exhausted); the records of the second call are
    // not sent at all.
    emulator.script(
        Endpoint::PublishBatch,
        vec![ScriptedResponse::json(500, envelope); 2],
    );
    let mut records: Vec<Record> = (0..150)
        .map(|i| record(format!("m{i}")).text(format!("body {i}")).build())
        .collect();
    records.push(record("big").text("x".repeat(127_000)).build());
    let outcomes = sink.deliver(&records).await;
    assert!(
        outcomes
            .iter()
            .all(|o| failed_class(o) == Some(ErrorClass::Transient)),
        "{outcomes:?}"
    );
    assert_eq!(publish_calls(&emulator).len(), 2);
    assert!(drain(&emulator, "dest").is_empty());
    // Once the API answers again, the same records go through.
    let outcomes = sink.deliver(&records).await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Confirmed));
    assert_eq!(drain(&emulator, "dest").len(), records.len());
}

#[tokio::test]
async fn a_refused_token_or_a_missing_queue_is_permanent_and_ready_says_so() {
    let emulator = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sink = open(&emulator, "dest", dir.path(), "");
    sink.ready().await.expect("reachable");
    let auth = r#"{"success":false,"errors":[{"code":10000,"message":"Authentication error"}],"messages":[],"result":null}"#;
    emulator.script(
        Endpoint::PublishBatch,
        vec![ScriptedResponse::json(403, auth)],
    );
    let outcomes = sink.deliver(&[record("a").text("a").build()]).await;
    match &outcomes[0] {
        Outcome::Failed(error) => {
            assert_eq!(error.class, ErrorClass::Permanent);
            assert!(error.message.contains("sink.api_token_env"), "{error}");
            assert!(!error.message.contains(TOKEN), "the token leaked: {error}");
        }
        other => panic!("{other:?}"),
    }
    let missing = r#"{"success":false,"errors":[{"code":10104,"message":"QueueNotFound"}],"messages":[],"result":null}"#;
    emulator.script(
        Endpoint::QueueDetails,
        vec![ScriptedResponse::json(404, missing)],
    );
    let error = sink.ready().await.expect_err("a missing queue");
    assert_eq!(error.class, ErrorClass::Permanent);
    assert!(error.message.contains("sink.queue_id"), "{error}");
    // The token never shows in Debug output.
    assert!(!format!("{sink:?}").contains(TOKEN));
}

#[tokio::test]
async fn the_rate_limiter_holds_the_configured_rate() {
    let emulator = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(open(
        &emulator,
        "dest",
        dir.path(),
        "max_messages_per_second = 500",
    ));
    let records: Vec<Record> = (0..1_500)
        .map(|i| record(format!("m{i}")).text(format!("{i}")).build())
        .collect();
    let started = Instant::now();
    // Two deliveries at once share the one limiter.
    let (a, b) = tokio::join!(sink.deliver(&records[..750]), sink.deliver(&records[750..]));
    let elapsed = started.elapsed();
    assert!(a.iter().chain(&b).all(|o| *o == Outcome::Confirmed));
    // One call's worth (100) may go at once; the other 1,400 need 2.8 s at 500/s.
    assert!(elapsed >= Duration::from_millis(2_500), "{elapsed:?}");
    assert_eq!(drain(&emulator, "dest").len(), 1_500);
}

/// THE INVARIANT, queue to queue: while publishes into the destination fail for a while,
/// no lease of the source is acknowledged before its message was published (counted at
/// every ack call in the order the emulator received the requests), and in the end every
/// source message is in the destination and the source is empty.
#[tokio::test]
async fn queue_to_queue_acks_nothing_before_it_is_published() {
    let emulator = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let source = queue_name("src");
    let dest = queue_name("dst");
    // Unique bodies, text and json, published into the source.
    let mut expected = Vec::new();
    let mut batch = Vec::new();
    for i in 0..120 {
        if i % 3 == 0 {
            let body = json!({"n": i, "kind": "json"});
            expected.push(pulled("json", body.to_string().as_bytes()));
            batch.push(json!({"body": body, "content_type": "json"}));
        } else {
            let body = format!("message {i}");
            expected.push(pulled("text", body.as_bytes()));
            batch.push(json!({"body": body, "content_type": "text"}));
        }
        if batch.len() == 60 {
            let request = json!({ "messages": std::mem::take(&mut batch) }).to_string();
            let answer =
                emulator.request(Endpoint::PublishBatch, ACCOUNT, &source, request.as_bytes());
            assert_eq!(answer.status, 200);
        }
    }
    // The first publish calls fail: more than one call's retries, so the pipeline also
    // pauses, probes `ready` and delivers again.
    const FAILED_CALLS: usize = 7;
    let envelope = r#"{"success":false,"errors":[{"code":10001,"message":"injected"}],"messages":[],"result":null}"#;
    emulator.script(
        Endpoint::PublishBatch,
        vec![ScriptedResponse::json(500, envelope); FAILED_CALLS],
    );
    // One batch in flight at a time, so the publish calls reach the emulator one after
    // the other and the scripted failures are the first ones recorded.
    let config = common::config(
        &emulator,
        &source,
        "batch_size = 20\npullers = 1\nmax_in_flight = 20\nack_interval_ms = 5",
        &sink_table(&emulator, &dest, dir.path(), "max_retries = 2"),
    );
    let summary = drain_in_process(config, Duration::from_secs(120))
        .await
        .expect("the run ends cleanly");
    assert_eq!(summary.unacked_confirmed, 0);

    // Walk the requests in arrival order: at every ack call, the leases acknowledged so
    // far must not outnumber the distinct source messages published so far.
    let mut publish_seen = 0usize;
    let mut published: HashMap<String, usize> = HashMap::new();
    let mut acked = 0usize;
    let mut acks_checked = 0;
    for request in emulator.recorded_requests() {
        let Some(body) = request.body else { continue };
        if request.endpoint == Some(Endpoint::PublishBatch) && request.path.contains(&dest) {
            publish_seen += 1;
            if publish_seen > FAILED_CALLS {
                for m in body["messages"].as_array().unwrap() {
                    *published.entry(m["body"].to_string()).or_default() += 1;
                }
            }
        } else if request.endpoint == Some(Endpoint::Ack) && request.path.contains(&source) {
            acked += body["acks"].as_array().map_or(0, Vec::len);
            acks_checked += 1;
            assert!(
                acked <= published.len(),
                "{acked} leases acknowledged while only {} messages were published",
                published.len()
            );
        }
    }
    assert!(
        publish_seen > FAILED_CALLS,
        "the failures were not all used"
    );
    assert!(acks_checked > 0);

    // Everything arrived (duplicates allowed, loss not) and the source is empty.
    let mut got = drain(&emulator, &dest);
    got.sort();
    got.dedup();
    expected.sort();
    assert_eq!(got, expected);
    let source_stats = emulator.stats(ACCOUNT, &source);
    assert_eq!(source_stats.backlog, 0, "{source_stats:?}");
    assert!(source_stats.never_acked_ids.is_empty());
    assert_requests_match_schema(&emulator);
}
