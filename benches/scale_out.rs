//! Scale-out benchmark: one `cfq-bridge run --until-empty` process against three sharing
//! one queue, at 50 ms per API call, measured in the same run (the figure of
//! BENCHMARKS.md, "Scale-out", and of tests/scale_out.rs with release builds).
//!
//! Run: `cargo bench --bench scale_out` (env `BENCH_MESSAGES`, default 30000;
//! `BENCH_ROUNDS`, default 3; `BENCH_PULLERS`, pullers per process, default 1;
//! `BENCH_REPLICAS`, default 3).
//!
//! The emulator runs as its own process with `--fault-latency-ms 50`, and each queue is
//! seeded through its admin API (no latency) with ~100-byte json messages. Each process
//! writes its own JSONL file; a run counts only if the files hold every seeded id. Wall
//! time runs from spawning the processes to the last exit, so start-up and the final
//! empty pull are in it, as they are for any replica. A third row, one process with the
//! default 4 pullers, shows where a single process stands with default settings.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{env_or, seed_admin, start_emulator, ACCOUNT, TOKEN};

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(
        env_or("BENCH_MESSAGES", 30_000),
        env_or("BENCH_ROUNDS", 3),
        env_or("BENCH_PULLERS", 1),
        env_or("BENCH_REPLICAS", 3),
    ));
}

/// `processes` bridges with `pullers` each drain `queue`, which holds `messages`; returns
/// the wall time and the number of duplicate lines, after checking that the output files
/// hold every message.
fn drain(
    dir: &Path,
    base: &str,
    queue: &str,
    messages: usize,
    processes: usize,
    pullers: usize,
) -> (Duration, usize) {
    let mut children = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    let started = Instant::now();
    for i in 0..processes {
        let out = dir.join(format!("{queue}-{i}.jsonl"));
        let config = dir.join(format!("{queue}-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "[queue]\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"{queue}\"\napi_base_url = \"{base}\"\n\
                 batch_size = 100\npullers = {pullers}\nempty_backoff_max_ms = 200\n\n\
                 [sink]\ntype = \"jsonl\"\npath = \"{}\"\n",
                out.display()
            ),
        )
        .unwrap();
        children.push(
            Command::new(env!("CARGO_BIN_EXE_cfq-bridge"))
                .args(["--log", "error", "run", "--until-empty", "--config"])
                .arg(&config)
                .env("CLOUDFLARE_API_TOKEN", TOKEN)
                .stdin(Stdio::null())
                .spawn()
                .expect("start a bridge"),
        );
        files.push(out);
    }
    for mut child in children {
        let status = child.wait().expect("wait for a bridge");
        assert!(status.success(), "a bridge failed: {status}");
    }
    let wall = started.elapsed();
    let mut ids = HashSet::new();
    let mut lines = 0;
    for file in &files {
        for line in std::fs::read_to_string(file).unwrap_or_default().lines() {
            lines += 1;
            let record: Value = serde_json::from_str(line).expect("a JSONL record");
            ids.insert(record["id"].as_str().expect("an id").to_string());
        }
    }
    assert_eq!(
        ids.len(),
        messages,
        "{queue}: the output files miss messages"
    );
    (wall, lines - ids.len())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn run(messages: usize, rounds: usize, pullers: usize, replicas: usize) {
    println!(
        "# cfq-bridge scale-out benchmark: {messages} messages per run, 50 ms per API call, \
         {pullers} puller(s) per process, 1 vs {replicas} processes, {rounds} rounds\n"
    );
    let (emulator, base) = start_emulator(&["--fault-latency-ms", "50"]).await;
    let dir = tempfile::tempdir().unwrap();
    // (name, processes, pullers per process)
    let scenarios = [
        ("one process".to_string(), 1, pullers),
        (format!("{replicas} processes"), replicas, pullers),
        ("one process, default 4 pullers".to_string(), 1, 4),
    ];
    let mut rates: Vec<Vec<f64>> = scenarios.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        // Alternate which scenario starts, so none always runs on a warmer machine.
        for step in 0..scenarios.len() {
            let i = (step + round) % scenarios.len();
            let (name, processes, pullers) = &scenarios[i];
            let queue = format!("scale{round}x{i}");
            seed_admin(&base, &queue, messages, 100).await;
            let dir = dir.path().to_path_buf();
            let base = base.clone();
            let (processes, pullers) = (*processes, *pullers);
            let (wall, duplicates) = tokio::task::spawn_blocking(move || {
                drain(&dir, &base, &queue, messages, processes, pullers)
            })
            .await
            .unwrap();
            let rate = messages as f64 / wall.as_secs_f64();
            println!(
                "round {round}: {name:<32} {:>6.2} s  {rate:>7.0} msg/s  {duplicates} duplicates",
                wall.as_secs_f64()
            );
            rates[i].push(rate);
        }
    }
    drop(emulator);
    let medians: Vec<f64> = rates.into_iter().map(median).collect();
    println!();
    println!("| scenario | msg/s (median) | × one process |");
    println!("|---|---|---|");
    for ((name, _, _), rate) in scenarios.iter().zip(&medians) {
        println!("| {name} | {rate:.0} | {:.2} |", rate / medians[0]);
    }
}
