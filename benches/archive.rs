//! Archive benchmark: the same queue archived by `cfq-bridge run --until-empty` into each
//! archive layout, measured in one run against plain JSONL (a single file) as the baseline.
//!
//! Run: `cargo bench --bench archive` (env `BENCH_MESSAGES`, default 100000;
//! `BENCH_ROUNDS`, default 3). The `s3` rows need the S3 server of `.ci/start-s3.sh`
//! (they are left out, saying so, when it does not answer).
//!
//! The emulator runs as its own process; messages are ~1 KB json events that compress
//! about 2:1 (`support::event_body`). For each layout the bridge's wall time, CPU time and
//! peak RSS are measured (the bridge is the release binary), with the bytes it left on
//! disk; rounds are interleaved, each round in a different order, and medians compared.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;

use support::{event_body, median, run_bridge, seed_bodies, start_emulator, Measured, ACCOUNT};

fn main() {
    let messages: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(messages, rounds));
}

/// One archive layout: a name and its `[sink]` table (given the round's directory).
struct Layout {
    name: &'static str,
    sink: fn(&Path) -> String,
}

const LAYOUTS: &[Layout] = &[
    Layout {
        name: "jsonl, one file (baseline)",
        sink: |dir| {
            format!(
                "type = \"jsonl\"\npath = \"{}/archive.jsonl\"\n",
                dir.display()
            )
        },
    },
    Layout {
        name: "jsonl segments, no compression",
        sink: |dir| {
            format!(
                "type = \"jsonl\"\ndirectory = \"{}/segments\"\ncompression = \"none\"\n",
                dir.display()
            )
        },
    },
    Layout {
        name: "jsonl segments, zstd",
        sink: |dir| {
            format!(
                "type = \"jsonl\"\ndirectory = \"{}/segments\"\ncompression = \"zstd\"\n",
                dir.display()
            )
        },
    },
];

fn bridge_into(dir: &Path, base: &str, queue: &str, sink: &str, expected: usize) -> Measured {
    let config = dir.join(format!("{queue}.toml"));
    std::fs::write(
        &config,
        format!(
            "[queue]\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"{queue}\"\napi_base_url = \"{base}\"\n\
             batch_size = 100\npullers = 4\n\n[sink]\n{sink}"
        ),
    )
    .unwrap();
    run_bridge(&config, expected)
}

async fn run(messages: usize, rounds: usize) {
    println!(
        "# cfq-bridge archive benchmark ({messages} messages of ~1 KB json, {rounds} rounds)\n"
    );
    let (emulator, base) = start_emulator(&[]).await;
    let mut results: Vec<Vec<Measured>> = LAYOUTS.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        // Each round starts with a different layout, so none always runs first.
        for step in 0..LAYOUTS.len() {
            let i = (step + round) % LAYOUTS.len();
            let layout = &LAYOUTS[i];
            let dir = tempfile::tempdir().unwrap();
            let queue = format!("archive{round}x{i}");
            seed_bodies(&base, &queue, messages, |n| event_body(n, 1000)).await;
            let measured = bridge_into(
                dir.path(),
                &base,
                &queue,
                &(layout.sink)(dir.path()),
                messages,
            );
            let bytes = du(dir.path());
            println!(
                "round {round}: {:<34} {:>8.0} msg/s  {:>6.1} CPU µs/msg  {:>4} MB peak RSS  {:>6.1} MB on disk",
                layout.name,
                measured.rate(),
                measured.cpu_us_per_message(),
                measured.max_rss_kb / 1024,
                bytes as f64 / 1e6
            );
            results[i].push(measured);
        }
    }
    drop(emulator);
    let medians: Vec<Measured> = results.into_iter().map(median).collect();
    let baseline = medians[0].rate();
    println!();
    println!("| layout | msg/s (median) | × baseline | CPU µs/msg | peak RSS |");
    println!("|---|---|---|---|---|");
    for (layout, m) in LAYOUTS.iter().zip(&medians) {
        println!(
            "| {} | {:.0} | {:.2} | {:.1} | {} MB |",
            layout.name,
            m.rate(),
            m.rate() / baseline,
            m.cpu_us_per_message(),
            m.max_rss_kb / 1024
        );
    }
}

/// Bytes of the files under `dir`.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                total += du(&path);
            } else if let Ok(meta) = entry.metadata() {
                total += meta.len();
            }
        }
    }
    total
}
