//! The crash-safe ack journal (`queue.ack_journal`), measured: the same workload is run
//! with and without the journal, the bridge is SIGKILLed at the same points, restarted,
//! and the duplicates in the JSONL archive are counted. Both figures are printed (the
//! numbers in docs/reliability.md come from this test):
//!
//! ```text
//! cargo test --no-default-features --test journal -- --nocapture
//! ```
//!
//! Workload: 20,000 JSON messages of 300 bytes, API round trips of 50 ms (+0..10 ms
//! jitter, emulated), 4 pullers of 100, one SIGKILL per trial once 25%, 50% and 75% of the
//! messages are acknowledged, then a restart with `--until-empty`.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use cfq_emulator::{ContentType, Emulator, EmulatorConfig, Faults, SeedSpec};
use common::*;

const MESSAGES: usize = 20_000;
/// Kill points: share of the messages acknowledged when the SIGKILL is sent.
const KILL_AT: [f64; 3] = [0.25, 0.50, 0.75];

/// What one trial measured.
#[derive(Debug, Default, Clone, Copy)]
struct Trial {
    /// Archive lines beyond one per message.
    duplicates: usize,
    /// Leases the restarted bridge acked from the journal.
    recovered: usize,
    /// Acks the emulator had when the kill landed.
    acked_at_kill: u64,
}

async fn trial(emulator: &Emulator, dir: &Path, tag: &str, share: f64, journal: bool) -> Trial {
    let queue = queue_name(tag);
    let published: HashSet<String> = emulator
        .seed(
            ACCOUNT,
            &queue,
            &SeedSpec {
                count: MESSAGES,
                body_size: 300,
                content_type: ContentType::Json,
            },
        )
        .into_iter()
        .collect();
    let archive = dir.join(format!("{tag}.jsonl"));
    let journal_line = if journal {
        format!(
            "ack_journal = {}\n",
            serde_json::to_string(&dir.join(format!("{tag}.journal")).display().to_string())
                .unwrap()
        )
    } else {
        String::new()
    };
    let config_path = dir.join(format!("{tag}.toml"));
    std::fs::write(
        &config_path,
        config_text(
            emulator,
            &queue,
            &format!("visibility_timeout_ms = 5000\nlease_margin_ms = 1000\n{journal_line}"),
            &jsonl_sink(&archive),
        ),
    )
    .unwrap();
    let config = config_path.to_str().unwrap();

    let mut first = Running::spawn(
        &["run", "--config", config],
        &dir.join(format!("{tag}-1.log")),
        None,
    );
    let target = (share * MESSAGES as f64) as u64;
    let running = std::cell::RefCell::new(&mut first);
    let reached = try_wait_until(Duration::from_secs(120), async || {
        let reached = emulator.stats(ACCOUNT, &queue).acked >= target;
        if !reached {
            running.borrow_mut().assert_running("before the kill");
        }
        reached
    })
    .await;
    assert!(reached, "{}", first.log_tail());
    first.child.kill().await.expect("SIGKILL");
    let acked_at_kill = emulator.stats(ACCOUNT, &queue).acked;

    let mut second = Running::spawn(
        &["run", "--until-empty", "--config", config],
        &dir.join(format!("{tag}-2.log")),
        None,
    );
    let status = tokio::time::timeout(Duration::from_secs(120), second.child.wait())
        .await
        .expect("the restart drains the queue")
        .unwrap();
    assert!(status.success(), "{}", second.log_tail());

    let lines = read_jsonl(&archive);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for line in &lines {
        *counts
            .entry(line["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(
        counts.keys().cloned().collect::<HashSet<_>>(),
        published,
        "every message archived"
    );
    let stats = emulator.stats(ACCOUNT, &queue);
    assert!(
        stats.never_acked_ids.is_empty() && stats.backlog == 0,
        "{tag}: all acked"
    );

    let log = second.log_text();
    let recovered = log
        .lines()
        .find(|l| l.contains("ack journal recorded as confirmed"))
        .and_then(|l| l.split("leases=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Trial {
        duplicates: lines.len() - counts.len(),
        recovered,
        acked_at_kill,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_cuts_duplicates_after_sigkill() {
    let emulator = start_emulator_with(EmulatorConfig {
        tokens: vec![TOKEN.to_string()],
        max_retries: 100,
        faults: Faults {
            latency_ms: 50,
            jitter_ms: 10,
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut totals = [Trial::default(), Trial::default()];
    for (i, share) in KILL_AT.iter().enumerate() {
        // Alternate the order so neither mode always runs on a warmer machine.
        let modes = if i % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for journal in modes {
            let tag = format!("{}{i}", if journal { "with" } else { "without" });
            let t = trial(&emulator, dir.path(), &tag, *share, journal).await;
            println!(
                "kill at {:>3.0}% ({} acked) {:<15} duplicates {:>5}, acked from the journal {:>5}",
                share * 100.0,
                t.acked_at_kill,
                if journal {
                    "with journal:"
                } else {
                    "without journal:"
                },
                t.duplicates,
                t.recovered
            );
            let total = &mut totals[usize::from(journal)];
            total.duplicates += t.duplicates;
            total.recovered += t.recovered;
        }
    }
    let [without, with] = totals;
    let runs = KILL_AT.len();
    println!(
        "duplicates after SIGKILL, {runs} kills of {MESSAGES} messages each: without journal {} ({:.2} per kill), with journal {} ({:.2} per kill); {} leases acked from the journal",
        without.duplicates,
        without.duplicates as f64 / runs as f64,
        with.duplicates,
        with.duplicates as f64 / runs as f64,
        with.recovered
    );
    assert_eq!(without.recovered, 0);
    assert!(
        with.recovered > 0,
        "the journal recovered leases after a crash"
    );
    assert!(
        with.duplicates < without.duplicates,
        "the journal reduces duplicates: with {} vs without {}",
        with.duplicates,
        without.duplicates
    );
}

// ---------------------------------------------------------------------------------------
// Bad journals (issue 9): a torn line, a journal of another queue, a lease the API refuses.
// Each is clear, counted, and ends in no crash loop.
// ---------------------------------------------------------------------------------------

mod bad {
    use super::*;
    use cfq_bridge::sources::cloudflare::journal::Journal;
    use cfq_emulator::{Endpoint, ScriptedResponse};
    use std::path::PathBuf;

    const WAIT: Duration = Duration::from_secs(60);

    /// A queue of `count` text messages, all leased by the test for `lease_ms` (so the
    /// bridge can only meet them through the journal, or once the leases expire).
    async fn leased_queue(
        emulator: &Emulator,
        tag: &str,
        count: u32,
        lease_ms: u64,
    ) -> (String, Vec<String>) {
        let queue = queue_name(tag);
        emulator.seed(
            ACCOUNT,
            &queue,
            &SeedSpec {
                count: count as usize,
                body_size: 32,
                content_type: ContentType::Text,
            },
        );
        let leases = lease(emulator, &queue, count, lease_ms)
            .await
            .into_iter()
            .map(|m| m.lease_id)
            .collect();
        (queue, leases)
    }

    /// Config text with the journal, a JSONL archive and a metrics listener.
    fn write_journal_config(
        emulator: &Emulator,
        dir: &Path,
        queue: &str,
        journal: &Path,
        metrics_port: u16,
    ) -> PathBuf {
        let extra = format!(
            "visibility_timeout_ms = 3000\nlease_margin_ms = 500\nack_journal = {}\n",
            serde_json::to_string(&journal.display().to_string()).unwrap()
        );
        let sink = format!(
            "{}\n{}",
            jsonl_sink(&dir.join("archive.jsonl")),
            metrics_table(metrics_port)
        );
        write_config(dir, &config_text(emulator, queue, &extra, &sink))
    }

    /// The lease ids of every ack the emulator received.
    fn acked_lease_ids(emulator: &Emulator) -> Vec<String> {
        emulator
            .recorded_requests()
            .iter()
            .filter(|r| r.path.ends_with("/messages/ack"))
            .filter_map(|r| r.body.as_ref()?.get("acks")?.as_array().cloned())
            .flatten()
            .filter_map(|a| Some(a.get("lease_id")?.as_str()?.to_string()))
            .collect()
    }

    async fn wait_all_acked(emulator: &Emulator, queue: &str, bridge: &mut Running) {
        let running = std::cell::RefCell::new(&mut *bridge);
        let acked = try_wait_until(WAIT, async || {
            let stats = emulator.stats(ACCOUNT, queue);
            let acked = stats.backlog == 0 && stats.never_acked_ids.is_empty();
            if !acked {
                running
                    .borrow_mut()
                    .assert_running("before every message was acked");
            }
            acked
        })
        .await;
        assert!(
            acked,
            "{:?}\n{}",
            emulator.stats(ACCOUNT, queue),
            bridge.log_tail()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_torn_journal_line_is_skipped_and_counted_not_acked_as_a_shorter_id() {
        let emulator = start_emulator().await;
        let (queue, leases) = leased_queue(&emulator, "torn", 3, 2000).await;
        let dir = tempfile::tempdir().unwrap();
        let journal_path = dir.path().join("acks.journal");
        let journal = Journal::open(&journal_path, ACCOUNT, &queue).unwrap();
        journal.record_confirmed(&leases[..2]).await.unwrap();
        drop(journal);
        // A crash cut the third entry in the middle of its lease id: once with a newline
        // after it (a later write landed behind it, so only the checksum can tell), and
        // once as the last bytes of the file.
        let half = &leases[2][..leases[2].len() / 2];
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&journal_path)
            .unwrap();
        std::io::Write::write_all(&mut f, format!("+{half}\n+{half}").as_bytes()).unwrap();
        drop(f);

        let port = reserve_port();
        let config = write_journal_config(&emulator, dir.path(), &queue, &journal_path, port);
        let mut bridge = Running::spawn(
            &["run", "--config", config.to_str().unwrap()],
            &dir.path().join("bridge.log"),
            Some(port),
        );
        bridge.wait_counter("journal_skipped_lines", 2, WAIT).await;
        bridge.wait_counter("journal_recovered", 2, WAIT).await;
        // The third message comes back when the test's lease expires, and is archived.
        wait_all_acked(&emulator, &queue, &mut bridge).await;
        assert_eq!(bridge.counter("journal_skipped_lines").await, 2);
        assert_eq!(bridge.counter("journal_recovered").await, 2);
        let log = bridge.stop().await;
        assert_eq!(
            warn_lines(&log, "skipped torn ack journal lines"),
            1,
            "{log}"
        );
        let acked = acked_lease_ids(&emulator);
        assert!(
            !acked.iter().any(|l| l.as_str() == half),
            "the torn half of a lease id was sent as an ack: {acked:?}"
        );
        assert!(leases[..2].iter().all(|l| acked.contains(l)), "{acked:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_journal_of_another_queue_is_a_clear_error() {
        let emulator = start_emulator().await;
        let dir = tempfile::tempdir().unwrap();
        let journal_path = dir.path().join("acks.journal");
        let theirs = queue_name("theirs");
        let ours = queue_name("ours");
        let journal = Journal::open(&journal_path, ACCOUNT, &theirs).unwrap();
        journal.record_confirmed(&["x".into()]).await.unwrap();
        drop(journal);
        let extra = format!(
            "ack_journal = {}\n",
            serde_json::to_string(&journal_path.display().to_string()).unwrap()
        );
        let config = config(
            &emulator,
            &ours,
            &extra,
            &jsonl_sink(&dir.path().join("a.jsonl")),
        );
        let result = drain_in_process(config, WAIT).await;
        let error = format!(
            "{:#}",
            result.expect_err("another queue's journal is refused")
        );
        assert!(error.contains(&format!("queue {theirs}")), "{error}");
        assert!(error.contains(&format!("queue {ours}")), "{error}");
        assert!(
            error.contains(&journal_path.display().to_string()),
            "{error}"
        );
        // Nothing of theirs was acked on our queue, and their journal is intact.
        assert!(acked_lease_ids(&emulator).is_empty());
        let journal = Journal::open(&journal_path, ACCOUNT, &theirs).unwrap();
        assert_eq!(journal.pending(), vec!["x".to_string()]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_journal_lease_refused_with_400_is_dropped_counted_and_a_restart_runs() {
        let emulator = start_emulator().await;
        let (queue, leases) = leased_queue(&emulator, "refused", 3, 3000).await;
        let dir = tempfile::tempdir().unwrap();
        let journal_path = dir.path().join("acks.journal");
        let journal = Journal::open(&journal_path, ACCOUNT, &queue).unwrap();
        journal.record_confirmed(&leases).await.unwrap();
        drop(journal);
        // The first recovered call (all three) and the call holding only the first lease
        // are refused for good; the other two leases must still be acked.
        let refused = ScriptedResponse::json(
            400,
            r#"{"success":false,"errors":[{"code":10104,"message":"lease_id is not valid"}],"messages":[],"result":null}"#,
        );
        emulator.script(Endpoint::Ack, vec![refused.clone(), refused]);

        let port = reserve_port();
        let config = write_journal_config(&emulator, dir.path(), &queue, &journal_path, port);
        let config = config.to_str().unwrap();
        let mut bridge = Running::spawn(
            &["run", "--config", config],
            &dir.path().join("bridge-1.log"),
            Some(port),
        );
        bridge.wait_counter("journal_dropped", 1, WAIT).await;
        bridge.wait_counter("journal_recovered", 2, WAIT).await;
        // The refused lease's message comes back when the lease expires and is archived.
        wait_all_acked(&emulator, &queue, &mut bridge).await;
        bridge.assert_running("after the 400");
        assert_eq!(bridge.counter("journal_dropped").await, 1);
        let log = bridge.stop().await;
        let line = "the API refused a lease from the ack journal for good";
        assert_eq!(warn_lines(&log, line), 1, "{log}");
        assert!(log.contains(&leases[0]), "the log names the lease: {log}");
        let acked = acked_lease_ids(&emulator);
        assert!(leases[1..].iter().all(|l| acked.contains(l)), "{acked:?}");

        // The journal marked the refused lease done: a restart has nothing to recover
        // and runs.
        let mut again = Running::spawn(
            &["run", "--config", config],
            &dir.path().join("bridge-2.log"),
            Some(port),
        );
        again.wait_log("bridge starting", WAIT).await;
        // Proving the restart keeps running needs a window.
        tokio::time::sleep(Duration::from_millis(500)).await;
        again.assert_running("after the restart");
        assert_eq!(again.counter("journal_dropped").await, 0);
        assert_eq!(again.counter("journal_recovered").await, 0);
        let log = again.stop().await;
        assert!(!log.contains("ack journal recorded as confirmed"), "{log}");
    }
}
