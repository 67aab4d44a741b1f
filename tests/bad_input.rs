//! The bad-input table of issue 6, one test per row, against the real `cfq-bridge` binary.
//!
//! Each test starts the emulator, queues good messages next to the bad input (a bad
//! message, or a scripted raw answer of the API), runs `cfq-bridge run` with a Prometheus
//! exporter, and checks:
//! - one clear warning line in the log;
//! - a counter in `/metrics`;
//! - the bad message retried or dead-lettered per policy (undecodable messages are
//!   released with the retry delay, so the consumer's `max_retries` moves them to the
//!   dead-letter queue; bad API answers are retried, and leases they hid come back when
//!   they expire);
//! - no panic, the process still running, and every good message archived and acked;
//! - a clean exit on SIGTERM.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use cfq_emulator::{ContentType, Emulator, EmulatorConfig, Endpoint, ScriptedResponse, SeedSpec};
use common::*;
use serde_json::{json, Map, Value};

const WAIT: Duration = Duration::from_secs(60);
/// The dead-letter queue of the bad-message tests.
const DLQ: &str = "dlq";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One test's world: an emulator, a queue with good messages, a config and a bridge.
struct Case {
    emulator: Emulator,
    queue: String,
    good: HashSet<String>,
    archive: PathBuf,
    config: PathBuf,
    metrics_port: u16,
    dir: tempfile::TempDir,
}

impl Case {
    /// An emulator whose consumer dead-letters after two deliveries, a queue with `good`
    /// text messages, and a config with `queue_extra` lines. Failed records are released
    /// with no delay (`retry_base_delay_secs = 0`) so the policy plays out in seconds.
    async fn new(tag: &str, good: usize, queue_extra: &str) -> Case {
        let emulator = start_emulator_with(EmulatorConfig {
            tokens: vec![TOKEN.to_string()],
            max_retries: 2,
            dead_letter_queue: Some(DLQ.to_string()),
            // `finish` checks every request the bridge made against the schema.
            record_requests: true,
            ..EmulatorConfig::default()
        })
        .await;
        let queue = queue_name(tag);
        let good = emulator
            .seed(
                ACCOUNT,
                &queue,
                &SeedSpec {
                    count: good,
                    body_size: 64,
                    content_type: ContentType::Text,
                },
            )
            .into_iter()
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("archive.jsonl");
        let metrics_port = reserve_port();
        let pullers = if queue_extra.contains("pullers") {
            ""
        } else {
            "pullers = 2\n"
        };
        let extra = format!(
            "visibility_timeout_ms = 3000\nlease_margin_ms = 500\nretry_base_delay_secs = 0\n\
             {pullers}{queue_extra}"
        );
        let sink = format!("{}\n{}", jsonl_sink(&archive), metrics_table(metrics_port));
        let config = write_config(dir.path(), &config_text(&emulator, &queue, &extra, &sink));
        Case {
            emulator,
            queue,
            good,
            archive,
            config,
            metrics_port,
            dir,
        }
    }

    /// Publishes a message with an exact pull `body` and `CF-Content-Type`.
    fn publish_raw(&self, content_type: &str, body: &str) -> String {
        let mut metadata = Map::new();
        metadata.insert("CF-Content-Type".into(), Value::from(content_type));
        self.emulator
            .publish_raw(ACCOUNT, &self.queue, body, metadata)
    }

    /// Starts `cfq-bridge run`.
    fn start(&self) -> Running {
        Running::spawn(
            &["run", "--config", self.config.to_str().unwrap()],
            &self.dir.path().join("bridge.log"),
            Some(self.metrics_port),
        )
    }

    /// Waits until every id in `ids` is archived and acknowledged.
    async fn wait_archived(&self, bridge: &mut Running, ids: &HashSet<String>) {
        let running = std::cell::RefCell::new(&mut *bridge);
        let done = try_wait_until(WAIT, async || {
            let archived = complete_lines_ids(&self.archive);
            let never_acked: HashSet<String> = self
                .emulator
                .stats(ACCOUNT, &self.queue)
                .never_acked_ids
                .into_iter()
                .collect();
            let done = ids.is_subset(&archived) && ids.is_disjoint(&never_acked);
            if !done {
                running
                    .borrow_mut()
                    .assert_running("before the good messages arrived");
            }
            done
        })
        .await;
        assert!(
            done,
            "{} of {} messages archived:\n{}",
            ids.intersection(&complete_lines_ids(&self.archive)).count(),
            ids.len(),
            bridge.log_tail()
        );
    }

    /// Waits until the message `id` was moved to the dead-letter queue (it keeps its id
    /// there), and checks it was never archived.
    async fn wait_dead_lettered(&self, bridge: &mut Running, id: &str) {
        let running = std::cell::RefCell::new(&mut *bridge);
        let moved = try_wait_until(WAIT, async || {
            let moved = self
                .emulator
                .stats(ACCOUNT, DLQ)
                .never_acked_ids
                .iter()
                .any(|i| i == id);
            if !moved {
                running
                    .borrow_mut()
                    .assert_running("before the bad message was dead-lettered");
            }
            moved
        })
        .await;
        assert!(
            moved,
            "{id} was not dead-lettered: {:?}\n{}",
            self.emulator.stats(ACCOUNT, &self.queue),
            bridge.log_tail()
        );
        assert!(
            !complete_lines_ids(&self.archive).contains(id),
            "{id} must not be forwarded"
        );
    }

    /// The final checks every row shares: clean exit, good messages acked, the requests
    /// the bridge made valid.
    async fn finish(self, bridge: Running) -> String {
        let log = bridge.stop().await;
        let archived = archive_ids(&self.archive);
        assert!(self.good.is_subset(&archived), "a good message is missing");
        let stats = self.emulator.stats(ACCOUNT, &self.queue);
        for id in &self.good {
            assert!(
                !stats.never_acked_ids.contains(id),
                "good message {id} not acked"
            );
        }
        assert_requests_match_schema(&self.emulator);
        log
    }
}

/// The ids of the complete lines of an archive that may be being written.
fn complete_lines_ids(path: &std::path::Path) -> HashSet<String> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    bytes[..end]
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_slice(l).expect("a complete archive line parses");
            v["id"].as_str().expect("id").to_string()
        })
        .collect()
}

/// A pull answer wrapping `messages` the way Cloudflare does.
fn pull_body(messages: Value) -> String {
    json!({
        "success": true,
        "errors": [],
        "messages": [],
        "result": {"message_backlog_count": 1, "messages": messages}
    })
    .to_string()
}

/// A pulled message as JSON.
fn as_json(m: &cfq_bridge::cloudflare::PulledMessage) -> Value {
    json!({
        "id": m.id,
        "lease_id": m.lease_id,
        "body": m.body,
        "attempts": m.attempts,
        "timestamp_ms": m.timestamp_ms,
        "metadata": m.metadata,
    })
}

// ---------------------------------------------------------------------------------------
// Answers of the API that cannot be used.
// ---------------------------------------------------------------------------------------

/// Runs one "bad API answer" row: the next pull and the next ack get `answer` (applied
/// first, so the pull really leases messages the bridge never learns about, and the ack
/// really acknowledges). Checks the log line and the counters, and that the hidden
/// leases come back and arrive.
async fn bad_answer_row(
    tag: &str,
    answer: ScriptedResponse,
    log_needle: &str,
    pull_counter: &str,
) -> String {
    let case = Case::new(tag, 30, "batch_size = 10").await;
    case.emulator
        .script(Endpoint::Pull, vec![answer.clone().applied()]);
    case.emulator.script(Endpoint::Ack, vec![answer.applied()]);
    let mut bridge = case.start();
    bridge.wait_log(log_needle, WAIT).await;
    bridge.wait_counter(pull_counter, 1, WAIT).await;
    bridge.wait_counter("ack_call_failures", 1, WAIT).await;
    case.wait_archived(&mut bridge, &case.good.clone()).await;
    bridge.assert_running("after the bad answers");
    let stats = case.emulator.stats(ACCOUNT, &case.queue);
    assert!(
        stats.expired >= 1,
        "the leases of the unreadable pull expired and were redelivered: {stats:?}"
    );
    let log = case.finish(bridge).await;
    assert!(
        warn_lines(&log, "malformed pull response") + warn_lines(&log, "pull failed; retrying")
            >= 1
    );
    assert!(warn_lines(&log, "ack call failed; retrying") >= 1);
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_answer_that_is_not_json() {
    let log = bad_answer_row(
        "notjson",
        ScriptedResponse::raw(
            200,
            Some("application/json"),
            "Service temporarily unavailable",
        ),
        "not a JSON envelope",
        "malformed_responses",
    )
    .await;
    assert_eq!(
        warn_lines(&log, "malformed pull response; retrying"),
        1,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_pull_answer() {
    let cut = r#"{"success":true,"errors":[],"messages":[],"result":{"message_backlog_count":30,"messages":[{"id":"0000","lease_id":"ey"#;
    let log = bad_answer_row(
        "truncated",
        ScriptedResponse::json(200, cut),
        "EOF while parsing",
        "malformed_responses",
    )
    .await;
    assert_eq!(
        warn_lines(&log, "malformed pull response; retrying"),
        1,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_false_with_http_200() {
    let body = r#"{"success":false,"errors":[{"code":10001,"message":"Internal error"}],"messages":[],"result":null}"#;
    let log = bad_answer_row(
        "succfalse",
        ScriptedResponse::json(200, body),
        "success: false: Internal error (code 10001)",
        "server_errors",
    )
    .await;
    assert_eq!(warn_lines(&log, "pull failed; retrying"), 1, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_html_502_page() {
    let page = "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\
                <body><h1>502 Bad Gateway</h1><hr>cloudflare</body></html>\n";
    let log = bad_answer_row(
        "html502",
        ScriptedResponse::raw(502, Some("text/html; charset=UTF-8"), page),
        "an HTML page instead of JSON",
        "malformed_responses",
    )
    .await;
    assert!(log.contains("HTTP 502"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_520() {
    let log = bad_answer_row(
        "empty520",
        ScriptedResponse::raw(520, None, Vec::new()),
        "empty response body",
        "malformed_responses",
    )
    .await;
    assert!(log.contains("HTTP 520"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrongly_typed_fields() {
    let case = Case::new("fields", 10, "batch_size = 10").await;
    // Real leases, so the bridge's releases are real too.
    let leased = lease(&case.emulator, &case.queue, 5, 2000).await;
    let mut entries: Vec<Value> = leased.iter().map(as_json).collect();
    entries[0].as_object_mut().unwrap().remove("body");
    entries[1]["attempts"] = json!("1");
    entries[1]["timestamp_ms"] = json!(null);
    entries[2]["id"] = json!(12345);
    entries[3]["metadata"] = json!("CF-Content-Type: text");
    // No lease id: cannot be released, comes back when the lease ends.
    entries[4].as_object_mut().unwrap().remove("lease_id");
    entries.push(json!("not an object"));
    case.emulator.script(
        Endpoint::Pull,
        vec![
            // Envelope-level problems first: the whole answer is unusable.
            ScriptedResponse::json(200, r#"{"success":true,"errors":[]}"#),
            ScriptedResponse::json(200, r#"{"success":true,"result":{"messages":{"id":"x"}}}"#),
            ScriptedResponse::json(200, r#"{"success":"yes","result":{}}"#),
            ScriptedResponse::json(200, pull_body(Value::Array(entries))),
        ],
    );
    let mut bridge = case.start();
    bridge
        .wait_log("pulled message is malformed; releasing it for retry", WAIT)
        .await;
    bridge
        .wait_log("pull response had entries without a usable lease_id", WAIT)
        .await;
    // 3 malformed envelopes + 4 broken messages + 1 answer with unreleasable entries.
    bridge.wait_counter("malformed_responses", 8, WAIT).await;
    let all: HashSet<String> = case.good.clone();
    case.wait_archived(&mut bridge, &all).await;
    let stats = case.emulator.stats(ACCOUNT, &case.queue);
    assert!(
        stats.retried >= 4,
        "the 4 broken messages were released: {stats:?}"
    );
    assert!(
        stats.expired >= 1,
        "the one without a lease id expired: {stats:?}"
    );
    let log = case.finish(bridge).await;
    assert_eq!(
        warn_lines(&log, "pulled message is malformed; releasing it for retry"),
        4,
        "{log}"
    );
    for field in ["body", "attempts, timestamp_ms", "id", "metadata"] {
        assert!(
            log.contains(&format!("missing or wrongly typed: {field}")),
            "{field}: {log}"
        );
    }
    assert!(log.contains("the envelope has no `result`"), "{log}");
    assert!(log.contains("`result.messages` is not an array"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_extra_fields_are_accepted() {
    let case = Case::new("extra", 10, "batch_size = 10").await;
    let leased = lease(&case.emulator, &case.queue, 3, 30_000).await;
    let entries: Vec<Value> = leased
        .iter()
        .map(|m| {
            let mut v = as_json(m);
            v["priority"] = json!("high");
            v["trace"] = json!({"span": [1, 2, 3]});
            v
        })
        .collect();
    let body = json!({
        "success": true,
        "errors": [],
        "messages": ["a note"],
        "result_info": {"page": 1},
        "result": {
            "message_backlog_count": 10.0,
            "messages": entries,
            "metadata": {"metrics": {"backlog_count": 10, "backlog_bytes": 640, "oldest_message_timestamp_ms": 1}},
            "next_cursor": null
        }
    });
    case.emulator.script(
        Endpoint::Pull,
        vec![ScriptedResponse::json(200, body.to_string())],
    );
    let mut bridge = case.start();
    // The three leased by the test are only reachable through the scripted answer: their
    // lease (30 s) outlasts the test. Their arrival proves the answer was used.
    case.wait_archived(&mut bridge, &case.good.clone()).await;
    bridge.wait_counter("acked", 10, WAIT).await;
    assert_eq!(bridge.counter("malformed_responses").await, 0);
    let stats = case.emulator.stats(ACCOUNT, &case.queue);
    assert_eq!(stats.expired, 0, "{stats:?}");
    let log = case.finish(bridge).await;
    assert_eq!(warn_lines(&log, "malformed"), 0, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_pull_answer_is_refused_not_buffered() {
    let case = Case::new("huge", 20, "batch_size = 10\nmax_response_bytes = 65536").await;
    let padding = "x".repeat(2 * 1024 * 1024);
    let body = json!({"success": true, "errors": [], "messages": [], "result": {"padding": padding, "messages": []}});
    case.emulator.script(
        Endpoint::Pull,
        vec![ScriptedResponse::json(200, body.to_string()).applied()],
    );
    let mut bridge = case.start();
    bridge
        .wait_log("exceeds queue.max_response_bytes (65536)", WAIT)
        .await;
    bridge.wait_counter("malformed_responses", 1, WAIT).await;
    case.wait_archived(&mut bridge, &case.good.clone()).await;
    let stats = case.emulator.stats(ACCOUNT, &case.queue);
    assert!(stats.expired >= 1, "the hidden leases came back: {stats:?}");
    let log = case.finish(bridge).await;
    assert_eq!(
        warn_lines(&log, "malformed pull response; retrying"),
        1,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_but_legal_pull_answer_is_processed() {
    // 100 messages of 120 KB: a 16 MB answer, under the default limit (32 MiB).
    let case = Case::new("hugeok", 0, "batch_size = 100\npullers = 1").await;
    let mut ids = HashSet::new();
    for i in 0..100u8 {
        let body: Vec<u8> = (0..120_000u32).map(|j| (j as u8) ^ i).collect();
        ids.insert(case.publish_raw("bytes", &B64.encode(&body)));
    }
    let mut bridge = case.start();
    case.wait_archived(&mut bridge, &ids).await;
    assert_eq!(bridge.counter("pulled").await, 100);
    let log = case.finish(bridge).await;
    assert_eq!(warn_lines(&log, "malformed"), 0, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_answer_times_out() {
    let case = Case::new(
        "slowloris",
        20,
        "batch_size = 10\nrequest_timeout_ms = 1000",
    )
    .await;
    // About 350 bytes, 4 bytes every 300 ms: 26 s to send, far past the 1 s timeout.
    let body = pull_body(json!([])) + &" ".repeat(150);
    case.emulator.script(
        Endpoint::Pull,
        vec![ScriptedResponse::json(200, body).dripped(Duration::from_millis(300))],
    );
    let mut bridge = case.start();
    bridge.wait_log("timed out", WAIT).await;
    bridge.wait_counter("transport_errors", 1, WAIT).await;
    // The good messages arrive while the slow answer would still be dripping (26 s).
    case.wait_archived(&mut bridge, &case.good.clone()).await;
    let log = case.finish(bridge).await;
    assert_eq!(warn_lines(&log, "pull failed; retrying"), 1, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_answered_with_warnings() {
    let case = Case::new("ackwarn", 20, "batch_size = 10").await;
    let body = json!({
        "success": true, "errors": [], "messages": [],
        "result": {"ackCount": 9, "retryCount": 0, "warnings": {"lease-that-was-gone": "unknown lease id"}}
    });
    case.emulator.script(
        Endpoint::Ack,
        vec![ScriptedResponse::json(200, body.to_string()).applied()],
    );
    let mut bridge = case.start();
    bridge
        .wait_log("ack call answered with a warning", WAIT)
        .await;
    bridge.wait_counter("ack_warnings", 1, WAIT).await;
    case.wait_archived(&mut bridge, &case.good.clone()).await;
    let log = case.finish(bridge).await;
    assert_eq!(
        warn_lines(&log, "ack call answered with a warning"),
        1,
        "{log}"
    );
    assert!(log.contains("unknown lease id"), "{log}");
}

// ---------------------------------------------------------------------------------------
// Messages that cannot be decoded: released with the retry delay, so the consumer's
// max_retries (2 here) moves them to the dead-letter queue. Never forwarded.
// ---------------------------------------------------------------------------------------

/// Publishes one bad message among good ones and checks it is counted, logged, released,
/// and dead-lettered after two deliveries, while the good ones arrive.
async fn bad_message_row(
    tag: &str,
    content_type: &str,
    body: &str,
    counter: &str,
    kind: &str,
) -> String {
    // Decode errors are exported by kind (`cfq_decode_errors_total{kind=..}`).
    let counter = match counter {
        "decode_errors" => format!("decode_errors_{kind}"),
        other => other.to_string(),
    };
    let counter = counter.as_str();
    let case = Case::new(tag, 20, "batch_size = 10").await;
    let bad = case.publish_raw(content_type, body);
    let mut bridge = case.start();
    case.wait_archived(&mut bridge, &case.good.clone()).await;
    case.wait_dead_lettered(&mut bridge, &bad).await;
    // One count per delivery: the message was delivered twice (max_retries = 2).
    bridge.wait_counter(counter, 2, WAIT).await;
    let stats = case.emulator.stats(ACCOUNT, &case.queue);
    assert_eq!(stats.retried, 2, "released on each delivery: {stats:?}");
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    let dlq = case.emulator.stats(ACCOUNT, DLQ);
    assert_eq!(dlq.published, 1, "moved to the dead-letter queue");
    let log = case.finish(bridge).await;
    let line = "message not forwarded: released for retry";
    assert_eq!(warn_lines(&log, line), 2, "{log}");
    assert!(
        log.contains(&format!("kind=\"{kind}\"")) || log.contains(&format!("kind={kind}")),
        "{log}"
    );
    assert!(log.contains(&bad), "the log names the message id: {log}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_base64_in_a_json_body() {
    let log = bad_message_row("b64json", "json", "eyJhIjo%%%!!", "decode_errors", "base64").await;
    assert!(log.contains("json body is not valid base64"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_base64_in_a_bytes_body() {
    let log = bad_message_row("b64bytes", "bytes", "AAEC A==", "decode_errors", "base64").await;
    assert!(log.contains("bytes body is not valid base64"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_that_decodes_to_invalid_json() {
    let log = bad_message_row(
        "badjson",
        "json",
        &B64.encode(br#"{"a": [1, 2"#),
        "decode_errors",
        "json",
    )
    .await;
    assert!(log.contains("json body is not valid JSON"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_that_decodes_to_json_with_invalid_utf8() {
    // Valid JSON syntax, but the string holds bytes that are not UTF-8 (found by the
    // `decode_body` fuzz target): embedded as is, it would make an unreadable line.
    let log = bad_message_row(
        "badutf8",
        "json",
        &B64.encode(b"{\"k\":\"g\xadu\xabZ\x8b\xcf\"}"),
        "decode_errors",
        "json",
    )
    .await;
    assert!(
        log.contains("json body is not valid JSON: not UTF-8"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v8_message_is_not_forwarded_by_default() {
    let log = bad_message_row(
        "v8",
        "v8",
        &B64.encode([0xFF, 0x0F, 0x6F, 0x7B]),
        "v8_released",
        "v8",
    )
    .await;
    assert!(
        log.contains("cannot be decoded by a pull consumer"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v8_message_is_archived_raw_under_forward_raw() {
    let case = Case::new("v8raw", 5, "batch_size = 10\nv8_policy = \"forward_raw\"").await;
    let payload = [0xFFu8, 0x0F, 0x6F, 0x7B, 0x00];
    let id = case.publish_raw("v8", &B64.encode(payload));
    let mut bridge = case.start();
    let mut all = case.good.clone();
    all.insert(id.clone());
    case.wait_archived(&mut bridge, &all).await;
    let line = read_jsonl(&case.archive)
        .into_iter()
        .find(|l| l["id"] == id.as_str())
        .unwrap();
    assert_eq!(line["content_type"], "v8");
    assert_eq!(B64.decode(line["body"].as_str().unwrap()).unwrap(), payload);
    assert_eq!(bridge.counter("v8_released").await, 0);
    case.finish(bridge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_body_over_128_kb() {
    let log = bad_message_row(
        "bigtext",
        "text",
        &"x".repeat(128_001),
        "oversized",
        "oversized",
    )
    .await;
    assert!(log.contains("exceeds the 128 KB message limit"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bytes_body_over_128_kb() {
    let log = bad_message_row(
        "bigbytes",
        "bytes",
        &B64.encode(vec![7u8; 200_000]),
        "oversized",
        "oversized",
    )
    .await;
    assert!(log.contains("exceeds the 128 KB message limit"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_unknown_content_type() {
    let case = Case::new("ctype", 10, "batch_size = 10").await;
    let unknown = case.publish_raw("yaml", "a: 1");
    let none = case
        .emulator
        .publish_raw(ACCOUNT, &case.queue, "no type", Map::new());
    let mut bridge = case.start();
    case.wait_archived(&mut bridge, &case.good.clone()).await;
    case.wait_dead_lettered(&mut bridge, &unknown).await;
    case.wait_dead_lettered(&mut bridge, &none).await;
    bridge.wait_counter("decode_errors", 4, WAIT).await;
    let log = case.finish(bridge).await;
    assert!(
        log.contains("unknown CF-Content-Type \\\"yaml\\\"")
            || log.contains("unknown CF-Content-Type \"yaml\""),
        "{log}"
    );
    assert!(log.contains("metadata has no CF-Content-Type"), "{log}");
}

// ---------------------------------------------------------------------------------------
// Two bridges on one file (issue 9): the archive and the ack journal are locked, and the
// second bridge exits at once, naming the path and the first one's pid.
// ---------------------------------------------------------------------------------------

/// Starts a bridge on `first_config`, waits until it holds `locked` (its lock file names
/// its pid), then runs a second bridge on `second_config` and checks that it exits
/// non-zero at once with an error naming `locked` and the first bridge's pid. The first
/// bridge keeps running and stops cleanly.
async fn second_bridge_is_refused(tag: &str, journal_shared: bool) {
    let emulator = start_emulator().await;
    let queue = queue_name(tag);
    emulator.seed(
        ACCOUNT,
        &queue,
        &SeedSpec {
            count: 20,
            body_size: 16,
            content_type: ContentType::Text,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("acks.journal");
    let quoted = |p: &std::path::Path| serde_json::to_string(&p.display().to_string()).unwrap();
    let write = |name: &str, archive: &std::path::Path| {
        let extra = format!("ack_journal = {}\n", quoted(&journal));
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            config_text(&emulator, &queue, &extra, &jsonl_sink(archive)),
        )
        .unwrap();
        path
    };
    let archive = dir.path().join("archive.jsonl");
    let first_config = write("first.toml", &archive);
    let (second_config, locked) = if journal_shared {
        (
            write("second.toml", &dir.path().join("other.jsonl")),
            journal.clone(),
        )
    } else {
        (write("second.toml", &archive), archive.clone())
    };
    let first = Running::spawn(
        &["run", "--config", first_config.to_str().unwrap()],
        &dir.path().join("first.log"),
        None,
    );
    let pid = first.child.id().expect("pid");
    let lock_file = cfq_sinks::lock::lock_path_of(&locked);
    wait_until("the first bridge holds the lock", WAIT, async || {
        std::fs::read_to_string(&lock_file).is_ok_and(|t| t.trim() == pid.to_string())
    })
    .await;

    let output = run_bridge(
        &["run", "--config", second_config.to_str().unwrap()],
        Duration::from_secs(20),
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the second bridge must refuse to start: {stderr}"
    );
    assert!(
        stderr.contains(&locked.display().to_string()),
        "names the path: {stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {pid}")),
        "names the holder: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The first bridge was not disturbed: it archived every message once.
    wait_until("the first bridge drained the queue", WAIT, async || {
        emulator.stats(ACCOUNT, &queue).backlog == 0
    })
    .await;
    first.stop().await;
    assert_eq!(read_jsonl(&archive).len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bridges_on_one_archive() {
    second_bridge_is_refused("twoarchive", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bridges_on_one_journal() {
    second_bridge_is_refused("twojournal", true).await;
}

/// Stderr that cannot be written (`/dev/full`: every write fails with ENOSPC, as on a
/// full disk under a redirect). Logging must not kill the tasks that log: the run drains
/// the queue and exits 0. Before the fix the first log line panicked (exit 101); in a
/// longer run the dead tasks left a process that was up and moved nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stderr_that_cannot_be_written_does_not_stop_the_bridge() {
    let emulator = start_emulator().await;
    let queue = queue_name("fullerr");
    let ids = seed_ids(&emulator, &queue, 500, 100, ContentType::Json);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive.jsonl");
    let config = write_config(
        dir.path(),
        &config_text(&emulator, &queue, "", &jsonl_sink(&archive)),
    );
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let child = bridge()
        .args(["run", "--config", config.to_str().unwrap(), "--until-empty"])
        // Debug logs from every task, so that each of them logs into the full stderr.
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::from(full))
        .spawn()
        .expect("spawn cfq-bridge");
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the bridge finished in time")
        .expect("exit status")
        .status;
    assert!(status.success(), "exit {status:?}");
    assert_eq!(archive_ids(&archive), ids);
    let stats = emulator.stats(ACCOUNT, &queue);
    assert_eq!(stats.acked, ids.len() as u64, "{stats:?}");
    assert_eq!(stats.backlog, 0, "{stats:?}");
}
