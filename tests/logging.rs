//! What the bridge's log says, as a user reads it on stderr: a fatal error once (not as a
//! log line and again as an `error:` line), every line about a message with `queue_id`
//! and `message_id` fields (checked in `--log-format json`), and a warning repeated by
//! many messages limited, with a line saying how many were left out.

mod common;

use std::time::Duration;

use cfq_emulator::ContentType;
use common::*;
use serde_json::{Map, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_error_is_printed_once() {
    let emulator = start_emulator().await;
    let queue = queue_name("fatalonce");
    seed_ids(&emulator, &queue, 1, 16, ContentType::Text);
    let dir = tempfile::tempdir().unwrap();
    let config = jsonl_config(&emulator, &queue, "", dir.path());
    let config = config.to_str().unwrap();
    for format in ["text", "json"] {
        let output = bridge()
            .args(["--log-format", format, "run", "--config", config])
            .env("CLOUDFLARE_API_TOKEN", "not-the-token")
            .output()
            .await
            .expect("run the bridge");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        let mentions = stderr.matches("authentication failed").count();
        assert_eq!(mentions, 1, "{format}: the error once:\n{stderr}");
        if format == "json" {
            let line = stderr
                .lines()
                .find(|l| l.contains("authentication failed"))
                .unwrap();
            let event: Value = serde_json::from_str(line).expect("a JSON log line");
            assert_eq!(event["level"], "ERROR", "{line}");
        } else {
            assert!(stderr.contains("error: authentication failed"), "{stderr}");
        }
        assert!(!stderr.contains("not-the-token"), "no secret in the output");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_lines_carry_their_ids_and_repeats_are_limited() {
    let emulator = start_emulator().await;
    let queue = queue_name("logthrottle");
    // 40 messages whose content type cannot be decoded: each is released every time it
    // is pulled, so the same warning comes again and again.
    let mut bad = Vec::new();
    for _ in 0..40 {
        let mut metadata = Map::new();
        metadata.insert("CF-Content-Type".into(), Value::from("yaml"));
        bad.push(emulator.publish_raw(ACCOUNT, &queue, "a: 1", metadata));
    }
    let dir = tempfile::tempdir().unwrap();
    let config = jsonl_config(
        &emulator,
        &queue,
        "retry_base_delay_secs = 0\nretry_max_delay_secs = 0",
        dir.path(),
    );
    let log = dir.path().join("bridge.log");
    let bridge = Running::spawn(
        &[
            "--log-format",
            "json",
            "run",
            "--config",
            config.to_str().unwrap(),
        ],
        &log,
        None,
    );
    // Longer than one throttle window, so that the report of what was left out is due.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let text = bridge.stop().await;
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let about_messages: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("message not forwarded"))
        })
        .collect();
    assert!(!about_messages.is_empty(), "{text}");
    for event in &about_messages {
        let fields = &event["fields"];
        assert_eq!(fields["queue_id"], queue.as_str(), "{event}");
        let id = fields["message_id"].as_str().expect("a message_id field");
        assert!(bad.iter().any(|b| b == id), "{event}");
    }
    // Many more deliveries than lines: at most 10 lines per 10 s window from that call
    // site, and a line saying how many were left out.
    let deliveries = emulator.stats(ACCOUNT, &queue).retried;
    assert!(
        deliveries > 40,
        "the messages came back many times: {deliveries}"
    );
    assert!(
        about_messages.len() <= 20,
        "{} lines for {deliveries} deliveries",
        about_messages.len()
    );
    let report = events
        .iter()
        .find_map(|e| {
            let m = e["fields"]["message"].as_str()?;
            m.contains("more log lines like this were left out")
                .then_some(m)
        })
        .unwrap_or_else(|| panic!("no report of the lines left out:\n{text}"));
    assert!(report.contains("message not forwarded"), "{report}");
}
