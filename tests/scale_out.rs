//! Scale-out on one queue: three `cfq-bridge run --until-empty` processes drain the same
//! queue with no coordination between them, lose nothing, settle every lease, and move
//! messages at least twice as fast together as one process does alone.
//!
//! The emulator adds 50 ms to every API call, and each process runs a single puller, so
//! one process is bound by round trips (one pull of 100 per 50 ms, about 2,000 msg/s at
//! best), not by CPU: that is the regime where replicas add up. The emulator has no
//! per-queue throughput cap (docs/emulator.md), so the three never meet Cloudflare's
//! 5,000 msg/s. Both runs are measured in this test, on identical queues, from spawning
//! the processes to the last exit. `cargo bench --bench scale_out` prints the same figure
//! with release builds (BENCHMARKS.md, "Scale-out").

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cfq_emulator::{ContentType, EmulatorConfig, Faults};
use common::*;

/// Messages per queue: enough that the single process runs for several seconds.
const MESSAGES: usize = 30_000;
/// Bridge processes sharing the queue in the scaled-out run.
const REPLICAS: usize = 3;
/// What each process is given: one puller of batches of 100 (round-trip bound).
const QUEUE_SETTINGS: &str = "batch_size = 100\npullers = 1\nmax_in_flight = 1000\n";

/// One drain of `queue` by `processes` bridges, each into its own JSONL file.
struct Drain {
    wall: Duration,
    files: Vec<PathBuf>,
}

impl Drain {
    fn rate(&self) -> f64 {
        MESSAGES as f64 / self.wall.as_secs_f64()
    }
}

async fn drain(
    emulator: &cfq_emulator::Emulator,
    dir: &Path,
    queue: &str,
    processes: usize,
) -> Drain {
    let mut running = Vec::new();
    let mut files = Vec::new();
    let started = Instant::now();
    for i in 0..processes {
        let out = dir.join(format!("{queue}-{i}.jsonl"));
        let config_dir = dir.join(format!("{queue}-{i}"));
        std::fs::create_dir_all(&config_dir).unwrap();
        let config = write_config(
            &config_dir,
            &config_text(emulator, queue, QUEUE_SETTINGS, &jsonl_sink(&out)),
        );
        let log = dir.join(format!("{queue}-{i}.log"));
        running.push(Running::spawn(
            &["run", "--until-empty", "--config", config.to_str().unwrap()],
            &log,
            None,
        ));
        files.push(out);
    }
    for mut bridge in running {
        let status = tokio::time::timeout(Duration::from_secs(60), bridge.child.wait())
            .await
            .unwrap_or_else(|_| panic!("a bridge did not drain {queue} within 60 s"))
            .expect("wait for the bridge");
        assert!(
            status.success(),
            "a bridge on {queue} exited with {status}:\n{}",
            bridge.log_tail()
        );
    }
    Drain {
        wall: started.elapsed(),
        files,
    }
}

/// Every published id was written, every lease settled: returns (lines, duplicates).
fn assert_complete(
    emulator: &cfq_emulator::Emulator,
    queue: &str,
    published: &HashSet<String>,
    files: &[PathBuf],
) -> (usize, usize) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut lines = 0;
    for file in files {
        let records = read_jsonl(file);
        assert!(
            !records.is_empty(),
            "{} is empty: every process should have taken a share",
            file.display()
        );
        lines += records.len();
        for record in records {
            let id = record["id"].as_str().expect("an id").to_string();
            *seen.entry(id).or_default() += 1;
        }
    }
    let missing: Vec<&String> = published
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{queue}: {} published messages are in no output file (first: {:?})",
        missing.len(),
        missing.first()
    );
    let strangers = seen.keys().filter(|id| !published.contains(*id)).count();
    assert_eq!(strangers, 0, "{queue}: ids that were never published");

    let stats = emulator.stats(ACCOUNT, queue);
    assert_eq!(stats.backlog, 0, "{queue}: backlog left: {stats:?}");
    assert_eq!(stats.in_flight, 0, "{queue}: leases still out: {stats:?}");
    assert!(
        stats.never_acked_ids.is_empty(),
        "{queue}: {} messages never acknowledged",
        stats.never_acked_ids.len()
    );
    assert_eq!(stats.acked, MESSAGES as u64, "{queue}: {stats:?}");
    (lines, lines - seen.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_on_one_queue_lose_nothing_and_add_up() {
    let emulator = start_emulator_with(EmulatorConfig {
        tokens: vec![TOKEN.to_string()],
        faults: Faults {
            latency_ms: 50,
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let single_queue = queue_name("scaleone");
    let shared_queue = queue_name("scalethree");
    let single_ids = seed_ids(&emulator, &single_queue, MESSAGES, 100, ContentType::Json);
    let shared_ids = seed_ids(&emulator, &shared_queue, MESSAGES, 100, ContentType::Json);

    let one = drain(&emulator, dir.path(), &single_queue, 1).await;
    let (one_lines, one_dups) = assert_complete(&emulator, &single_queue, &single_ids, &one.files);
    let three = drain(&emulator, dir.path(), &shared_queue, REPLICAS).await;
    let (three_lines, three_dups) =
        assert_complete(&emulator, &shared_queue, &shared_ids, &three.files);

    let ratio = three.rate() / one.rate();
    println!(
        "one process: {MESSAGES} messages in {:.2} s = {:.0} msg/s ({one_lines} lines, {one_dups} duplicates)",
        one.wall.as_secs_f64(),
        one.rate()
    );
    println!(
        "{REPLICAS} processes: {MESSAGES} messages in {:.2} s = {:.0} msg/s ({three_lines} lines, {three_dups} duplicates), {ratio:.2}x",
        three.wall.as_secs_f64(),
        three.rate()
    );
    assert!(
        ratio >= 2.0,
        "{REPLICAS} processes on one queue should move at least 2x what one does: \
         {:.0} vs {:.0} msg/s ({ratio:.2}x)",
        three.rate(),
        one.rate()
    );
    emulator.shutdown().await;
}
