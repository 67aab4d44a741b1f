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
mod rel_support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use cfq_emulator::{ContentType, Emulator, EmulatorConfig, Faults, SeedSpec};
use common::*;
use rel_support::*;

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
    let start = Instant::now();
    while emulator.stats(ACCOUNT, &queue).acked < target {
        first.assert_running("before the kill");
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{}",
            first.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
