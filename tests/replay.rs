//! `cfq-bridge replay` and queue-to-queue runs, black-box, against the emulator:
//!
//! - export → replay → export: text and json come back identical; bytes follow the
//!   policy, and the exit code says so;
//! - a replay SIGKILLed half-way and restarted with its checkpoint publishes everything,
//!   with duplicates bounded by what was in flight;
//! - `--rate` holds the publish rate (read from the publish times the queue recorded);
//! - `--dry-run` validates and counts, and sends nothing;
//! - redrive: a dead-letter queue of 1,000 messages moved into its main queue by
//!   `run --until-empty`, with no lease acked while publishing fails.
//!
//! Every publish request is checked against Cloudflare's strict schema.

#![cfg(feature = "cloudflare_queue")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cfq_emulator::{ContentType, Emulator, Endpoint, Faults};
use common::*;
use serde_json::Value;

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Exports `queue` into `path` with `run --until-empty` and returns the records.
async fn export(emulator: &Emulator, queue: &str, dir: &Path, path: &Path) -> Vec<Value> {
    let config = dir.join(format!("export-{queue}.toml"));
    std::fs::write(&config, config_text(emulator, queue, "", &jsonl_sink(path))).unwrap();
    let output = run_bridge(
        &["run", "--config", config.to_str().unwrap(), "--until-empty"],
        Duration::from_secs(240),
    )
    .await;
    assert!(output.status.success(), "export: {}", stderr(&output));
    read_jsonl(path)
}

/// Runs `cfq-bridge replay --config CONFIG --input ARCHIVE EXTRA...` to its end.
async fn replay(config: &Path, archive: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "replay",
        "--config",
        config.to_str().unwrap(),
        "--input",
        archive.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_bridge(&args, Duration::from_secs(240)).await
}

/// A config whose `[queue]` is `queue` on `emulator` (replay's destination).
fn destination(emulator: &Emulator, queue: &str, dir: &Path) -> PathBuf {
    let path = dir.join(format!("replay-{queue}.toml"));
    std::fs::write(
        &path,
        format!(
            "[queue]\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"{queue}\"\napi_base_url = \"{}\"\n",
            emulator.base_url()
        ),
    )
    .unwrap();
    path
}

/// `(content_type, body)` of each record, counted: ids and timestamps are new after a
/// republish, what the message says is not.
fn contents(records: &[Value]) -> HashMap<(String, String), usize> {
    let mut counts = HashMap::new();
    for record in records {
        let key = (
            record["content_type"].as_str().unwrap().to_string(),
            record["body"].to_string(),
        );
        *counts.entry(key).or_default() += 1;
    }
    counts
}

fn of_type(records: &[Value], content_type: &str) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r["content_type"] == content_type)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_replay_export_keeps_text_and_json_and_follows_the_bytes_policy() {
    let emulator = start_emulator().await;
    let source = queue_name("rtsrc");
    for (content_type, size) in [
        (ContentType::Text, 300),
        (ContentType::Json, 400),
        (ContentType::Bytes, 200),
    ] {
        seed_ids(&emulator, &source, 150, size, content_type);
    }
    let dir = tempfile::tempdir().unwrap();
    let first = export(&emulator, &source, dir.path(), &dir.path().join("a.jsonl")).await;
    assert_eq!(first.len(), 450);

    // Default policy: bytes are refused, written whole to the rejects file, exit 3.
    let target = queue_name("rtdst");
    let config = destination(&emulator, &target, dir.path());
    let rejects = dir.path().join("rejects.jsonl");
    let output = replay(
        &config,
        &dir.path().join("a.jsonl"),
        &["--rejects", rejects.to_str().unwrap()],
    )
    .await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(3), "{text}");
    assert!(text.contains(rejects.to_str().unwrap()), "{text}");
    let rejected = read_jsonl(&rejects);
    assert_eq!(
        contents(&rejected),
        contents(&of_type(&first, "bytes")),
        "every bytes record, whole, in the rejects file"
    );
    let second = export(&emulator, &target, dir.path(), &dir.path().join("b.jsonl")).await;
    assert_eq!(second.len(), 300, "text and json only");
    for content_type in ["text", "json"] {
        assert_eq!(
            contents(&of_type(&second, content_type)),
            contents(&of_type(&first, content_type)),
            "{content_type} records come back identical"
        );
    }

    // base64_text: bytes travel as text holding their base64, exit 0.
    let target = queue_name("rtb64");
    let config = destination(&emulator, &target, dir.path());
    let output = replay(
        &config,
        &dir.path().join("a.jsonl"),
        &[
            "--bytes-policy",
            "base64-text",
            "--rejects",
            dir.path().join("none.jsonl").to_str().unwrap(),
        ],
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let third = export(&emulator, &target, dir.path(), &dir.path().join("c.jsonl")).await;
    assert_eq!(third.len(), 450);
    let as_text: Vec<Value> = of_type(&first, "bytes")
        .into_iter()
        .map(|mut r| {
            r["content_type"] = "text".into();
            r
        })
        .collect();
    let mut expected = contents(&of_type(&first, "text"));
    for (key, n) in contents(&as_text) {
        *expected.entry(key).or_default() += n;
    }
    assert_eq!(contents(&of_type(&third, "text")), expected);
    assert!(
        !dir.path().join("none.jsonl").exists(),
        "an unused rejects file is not left behind"
    );
    assert_requests_match_schema(&emulator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_counts_and_sends_nothing() {
    let emulator = start_emulator().await;
    let source = queue_name("drysrc");
    seed_ids(&emulator, &source, 40, 100, ContentType::Text);
    seed_ids(&emulator, &source, 10, 100, ContentType::Bytes);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a.jsonl");
    export(&emulator, &source, dir.path(), &archive).await;
    let target = queue_name("drydst");
    let config = destination(&emulator, &target, dir.path());
    let before = emulator.recorded_requests().len();
    let output = replay(&config, &archive, &["--dry-run"]).await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(3), "{text}");
    assert!(text.contains("would publish  40"), "{text}");
    assert!(text.contains("would skip     10"), "{text}");
    let after = emulator.recorded_requests();
    assert!(
        after[before..]
            .iter()
            .all(|r| !r.path.contains(&format!("/queues/{target}/"))),
        "a dry run sends nothing"
    );
    assert_eq!(emulator.stats(ACCOUNT, &target).published, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_half_way_resumes_from_its_checkpoint() {
    const TOTAL: usize = 3_000;
    let emulator = start_emulator().await;
    let source = queue_name("killsrc");
    seed_ids(&emulator, &source, TOTAL, 200, ContentType::Json);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a.jsonl");
    let first = export(&emulator, &source, dir.path(), &archive).await;
    assert_eq!(first.len(), TOTAL);

    let target = queue_name("killdst");
    let config = destination(&emulator, &target, dir.path());
    let checkpoint = dir.path().join("replay.checkpoint");
    let args = [
        "replay",
        "--config",
        config.to_str().unwrap(),
        "--input",
        archive.to_str().unwrap(),
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--rate",
        "1000",
    ];
    let mut child = bridge()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("a third published", Duration::from_secs(60), async || {
        emulator.stats(ACCOUNT, &target).published >= (TOTAL / 3) as u64
    })
    .await;
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    let at_kill = emulator.stats(ACCOUNT, &target).published;
    assert!(
        at_kill < TOTAL as u64,
        "killed before the end ({at_kill} published)"
    );
    assert!(
        checkpoint.exists(),
        "a checkpoint was written before the kill"
    );

    let output = run_bridge(&args, Duration::from_secs(120)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let second = export(&emulator, &target, dir.path(), &dir.path().join("b.jsonl")).await;
    let want = contents(&first);
    let got = contents(&second);
    for key in want.keys() {
        assert!(
            got.contains_key(key),
            "a record is missing after the restart"
        );
    }
    let duplicates = second.len() - TOTAL;
    // What can be published twice: the records in flight at the kill. A confirmed record
    // keeps its room in the in-flight bound until a checkpoint write recorded it, so that
    // includes the ones confirmed since the last write.
    let bound = cfq_bridge::replay::REPLAY_MAX_IN_FLIGHT as usize;
    eprintln!("{at_kill} published at the kill, {duplicates} duplicates after the restart (bound {bound})");
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates: more than the {bound} in flight"
    );
    assert_requests_match_schema(&emulator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_flag_holds_the_publish_rate() {
    const TOTAL: usize = 10_000;
    let emulator = start_emulator().await;
    let source = queue_name("ratesrc");
    seed_ids(&emulator, &source, TOTAL, 50, ContentType::Text);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a.jsonl");
    export(&emulator, &source, dir.path(), &archive).await;
    let target = queue_name("ratedst");
    let config = destination(&emulator, &target, dir.path());
    let started = std::time::Instant::now();
    let output = replay(&config, &archive, &["--rate", "2000"]).await;
    let elapsed = started.elapsed();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        elapsed >= Duration::from_millis(4_500),
        "10,000 messages at 2,000/s took {elapsed:?}"
    );
    // The queue's own publish times, first to last: the limiter, not the process start.
    let published = export(&emulator, &target, dir.path(), &dir.path().join("b.jsonl")).await;
    assert_eq!(published.len(), TOTAL);
    let times: Vec<u64> = published
        .iter()
        .map(|r| r["timestamp_ms"].as_u64().unwrap())
        .collect();
    let span = times.iter().max().unwrap() - times.iter().min().unwrap();
    assert!(
        span >= 4_500,
        "publish times span {span} ms for 10,000 messages at 2,000/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_terminal_progress_is_a_line_every_five_seconds() {
    const TOTAL: usize = 7_000;
    let emulator = start_emulator().await;
    let source = queue_name("linesrc");
    seed_ids(&emulator, &source, TOTAL, 50, ContentType::Text);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a.jsonl");
    export(&emulator, &source, dir.path(), &archive).await;
    let target = queue_name("linedst");
    let config = destination(&emulator, &target, dir.path());
    // 7,000 at 1,000/s: about 7 s, so at least one line at 5 s. stderr is a pipe here.
    let output = replay(&config, &archive, &["--rate", "1000"]).await;
    let text = stderr(&output);
    assert!(output.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("replay: ") && l.contains("/7000 messages ("))
        .unwrap_or_else(|| panic!("no progress line in: {text}"));
    assert!(line.contains("/s, ETA "), "{line}");
    assert!(
        !text.contains('\u{1b}'),
        "no terminal control codes when stderr is not a terminal"
    );
    assert!(text.contains("published      7000"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_a_dead_letter_queue_into_its_main_queue() {
    const TOTAL: usize = 1_000;
    let emulator = start_emulator().await;
    let dead = queue_name("dlq");
    let main = queue_name("main");
    let ids = seed_ids(&emulator, &dead, TOTAL, 300, ContentType::Json);
    assert_eq!(ids.len(), TOTAL);
    let dir = tempfile::tempdir().unwrap();
    let sink = format!(
        "type = \"cloudflare_queue\"\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"{main}\"\n\
         api_base_url = \"{}\"\n",
        emulator.base_url()
    );
    let config = dir.path().join("redrive.toml");
    std::fs::write(&config, config_text(&emulator, &dead, "", &sink)).unwrap();

    // Publishing fails at first: nothing may be acked while it does.
    emulator.set_faults(Faults {
        error_500_rate: 1.0,
        endpoints: vec![Endpoint::PublishBatch],
        ..Faults::default()
    });
    let mut child = bridge()
        .args(["run", "--config", config.to_str().unwrap(), "--until-empty"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("publish calls fail", Duration::from_secs(30), async || {
        emulator
            .recorded_requests()
            .iter()
            .filter(|r| r.path.ends_with(&format!("/queues/{main}/messages/batch")))
            .count()
            >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        emulator.stats(ACCOUNT, &dead).acked,
        0,
        "a lease was acked while its publish failed"
    );
    assert_eq!(emulator.stats(ACCOUNT, &main).published, 0);
    emulator.set_faults(Faults::default());

    let status = tokio::time::timeout(Duration::from_secs(120), child.wait())
        .await
        .expect("the redrive finished")
        .unwrap();
    assert!(status.success());
    let dead_stats = emulator.stats(ACCOUNT, &dead);
    assert_eq!(dead_stats.acked, TOTAL as u64);
    assert_eq!(dead_stats.backlog, 0);
    let moved = export(&emulator, &main, dir.path(), &dir.path().join("main.jsonl")).await;
    assert!(moved.len() >= TOTAL, "every message reached the main queue");
    assert_requests_match_schema(&emulator);
}
