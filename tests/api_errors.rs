//! How the bridge meets API errors: 429 with `Retry-After` is honoured, a paused queue is
//! waited on, 5xx answers and failed ack calls are retried, and a second signal exits at
//! once without acknowledging anything unconfirmed.

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cfq_bridge::pipeline::Summary;
use cfq_emulator::{ContentType, Emulator, Endpoint, Faults, ScriptedResponse, SeedSpec};
use common::*;

fn seed(emulator: &Emulator, queue: &str, count: usize) -> HashSet<String> {
    emulator
        .seed(
            ACCOUNT,
            queue,
            &SeedSpec {
                count,
                body_size: 32,
                content_type: ContentType::Text,
            },
        )
        .into_iter()
        .collect()
}

/// Runs the pipeline in-process with `--until-empty` into a JSONL file.
async fn drain(emulator: &Emulator, queue: &str, queue_extra: &str) -> (Summary, HashSet<String>) {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a.jsonl");
    let config = config(emulator, queue, queue_extra, &jsonl_sink(&archive));
    let summary = drain_in_process(config, Duration::from_secs(120))
        .await
        .expect("run succeeds");
    (summary, archive_ids(&archive))
}

fn pull_times(emulator: &Emulator) -> usize {
    emulator
        .recorded_requests()
        .iter()
        .filter(|r| r.path.ends_with("/messages/pull"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_is_honoured() {
    let emulator = start_emulator().await;
    let queue = queue_name("ratelimit");
    let ids = seed(&emulator, &queue, 50);
    let mut limited = ScriptedResponse::json(
        429,
        r#"{"success":false,"errors":[{"code":10429,"message":"rate limited"}],"messages":[],"result":null}"#,
    );
    limited.headers.push(("Retry-After".into(), "2".into()));
    emulator.script(Endpoint::Pull, vec![limited]);

    let started = Instant::now();
    // One puller: after the 429, no pull may be sent for 2 s.
    let run = drain(&emulator, &queue, "pullers = 1");
    let check = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        pull_times(&emulator)
    };
    let ((summary, archived), pulls_at_1500ms) = tokio::join!(run, check);
    assert_eq!(
        pulls_at_1500ms, 1,
        "no second pull before Retry-After elapsed"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(summary.stats.rate_limited, 1);
    assert_eq!(archived, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queue_is_waited_on_then_drained() {
    let emulator = start_emulator().await;
    let queue = queue_name("paused");
    let ids = seed(&emulator, &queue, 120);
    emulator.set_faults(Faults {
        paused: true,
        ..Faults::default()
    });
    let unpause = async {
        // The pause lasting 1.5 s is the test: nothing may be delivered in that window.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(emulator.stats(ACCOUNT, &queue).delivered, 0);
        emulator.set_faults(Faults::default());
    };
    let ((summary, archived), ()) = tokio::join!(drain(&emulator, &queue, "pullers = 2"), unpause);
    assert!(summary.stats.paused >= 1, "{:?}", summary.stats);
    assert_eq!(archived, ids);
    assert_eq!(emulator.stats(ACCOUNT, &queue).acked, 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_failed_ack_calls_are_retried() {
    let emulator = start_emulator().await;
    let queue = queue_name("fivexx");
    let ids = seed(&emulator, &queue, 500);
    let error = || {
        ScriptedResponse::json(
            500,
            r#"{"success":false,"errors":[{"code":10001,"message":"internal"}],"messages":[],"result":null}"#,
        )
    };
    // The first three ack calls fail (one of them after taking effect), and so do two pulls.
    let mut applied = error();
    applied.apply = true;
    emulator.script(Endpoint::Ack, vec![error(), applied, error()]);
    emulator.script(Endpoint::Pull, vec![error(), error()]);
    let (summary, archived) = drain(&emulator, &queue, "pullers = 2\nbatch_size = 50").await;
    assert_eq!(archived, ids);
    assert!(summary.stats.ack_call_failures >= 3, "{:?}", summary.stats);
    assert!(summary.stats.server_errors >= 2, "{:?}", summary.stats);
    let stats = emulator.stats(ACCOUNT, &queue);
    assert!(stats.never_acked_ids.is_empty());
    assert_eq!(stats.backlog, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_5xx_faults_lose_nothing() {
    let emulator = start_emulator().await;
    let queue = queue_name("randomfaults");
    let ids = seed(&emulator, &queue, 2000);
    emulator.set_faults(Faults {
        error_500_rate: 0.2,
        html_502_rate: 0.05,
        empty_520_rate: 0.05,
        ..Faults::default()
    });
    let (summary, archived) = drain(&emulator, &queue, "batch_size = 100").await;
    assert_eq!(archived, ids);
    assert!(
        summary.stats.server_errors
            + summary.stats.malformed_responses
            + summary.stats.ack_call_failures
            > 0
    );
    assert!(emulator.stats(ACCOUNT, &queue).never_acked_ids.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_without_acking_the_unconfirmed() {
    let emulator = start_emulator().await;
    let queue = queue_name("twosignals");
    seed(&emulator, &queue, 5000);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &config_text(
            &emulator,
            &queue,
            "shutdown_grace_ms = 60000",
            "type = \"stdout\"",
        ),
    );
    // Nobody reads the bridge's stdout: once the pipe is full, the stdout sink blocks and
    // the records in flight can never be confirmed.
    let mut child = bridge()
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "deliveries blocked on a full pipe",
        Duration::from_secs(30),
        async || {
            let s = emulator.stats(ACCOUNT, &queue);
            s.in_flight > 0 && s.acked > 0
        },
    )
    .await;
    // Lets acks already under way land (none is observable as "the last one").
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked_before = emulator.stats(ACCOUNT, &queue).acked;
    let pid = child.id().unwrap().to_string();
    let term = || {
        assert!(std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success())
    };
    term();
    // Proving the process did not exit needs a window: 0.5 s of the 60 s grace period.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first signal waits for the grace period"
    );
    let second = Instant::now();
    term();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("the second signal exits at once")
        .unwrap();
    assert!(second.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(130));
    let after = emulator.stats(ACCOUNT, &queue);
    assert_eq!(
        after.acked, acked_before,
        "nothing acked after the blocked deliveries"
    );
    assert!(
        after.in_flight > 0,
        "blocked records were neither acked nor released"
    );
}
