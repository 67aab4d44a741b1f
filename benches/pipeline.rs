//! End-to-end benchmark of the bridge against the emulator, with baselines measured in the
//! same run (the machines are shared and noisy: compare ratios, not absolute figures).
//!
//! Run: `cargo bench --bench pipeline` (env `BENCH_MESSAGES`, default 100000; `BENCH_ROUNDS`, default 3).
//!
//! The emulator runs as its own process (`cfq-bridge emulator`), so the CPU figures below
//! are the bridge's (or the baseline loop's) alone:
//! 1. **JSONL vs raw loop**: 1 KB json messages. Baseline: a raw pull+ack loop (same
//!    pullers and batch size, no decoding, no sink). Bridge: `cfq-bridge run --until-empty`
//!    into a JSONL file (fsync per batch). Ratio of rates, CPU µs per message.
//! 2. **50 ms round trips**: the emulator adds 50 ms to every call; the bridge's sustained
//!    rate and CPU per message.
//! 3. **10,000 in flight**: acks delayed by 400 ms and `max_in_flight = 10000`, so about
//!    10,000 messages are held at once; the bridge's peak RSS.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;

use support::{median, raw_pull_ack_loop, run_bridge, seed, start_emulator, Measured, ACCOUNT};

fn main() {
    let messages: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(messages));
}

/// Runs the bridge from `queue` into a JSONL file and checks the archive is complete.
fn bridge_into_jsonl(
    dir: &Path,
    base: &str,
    queue: &str,
    queue_extra: &str,
    expected: usize,
) -> Measured {
    let archive = dir.join(format!("{queue}.jsonl"));
    let config = dir.join(format!("{queue}.toml"));
    std::fs::write(
        &config,
        format!(
            "[queue]\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"{queue}\"\napi_base_url = \"{base}\"\n\
             batch_size = 100\n{queue_extra}\n[sink]\ntype = \"jsonl\"\npath = \"{}\"\n",
            archive.display()
        ),
    )
    .unwrap();
    let measured = run_bridge(&config, expected);
    let lines = std::fs::read_to_string(&archive).unwrap().lines().count();
    assert!(
        lines >= expected,
        "archive has {lines} of {expected} messages"
    );
    measured
}

async fn run(messages: usize) {
    let dir = tempfile::tempdir().unwrap();
    println!("# cfq-bridge pipeline benchmark ({messages} messages of ~1 KB json)\n");

    // 1. JSONL vs raw pull+ack loop, no added latency. Interleaved rounds, medians: the
    //    machine is shared, so one round can be disturbed by neighbours.
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (emulator, base) = start_emulator(&[]).await;
    let mut raws = Vec::new();
    let mut bridges = Vec::new();
    for round in 0..rounds {
        let raw_queue = format!("rawloop{round}");
        seed(&base, &raw_queue, messages, 1000).await;
        raws.push(raw_pull_ack_loop(&base, &raw_queue, 4, messages).await);
        let bridge_queue = format!("bridgejsonl{round}");
        seed(&base, &bridge_queue, messages, 1000).await;
        bridges.push(bridge_into_jsonl(
            dir.path(),
            &base,
            &bridge_queue,
            "pullers = 4",
            messages,
        ));
        println!(
            "round {round}: raw {:.0} msg/s, bridge {:.0} msg/s, ratio {:.2}",
            raws[round].rate(),
            bridges[round].rate(),
            bridges[round].rate() / raws[round].rate()
        );
    }
    drop(emulator);
    let raw = median(raws);
    let bridge = median(bridges);
    println!();
    println!("| scenario | messages | msg/s | CPU µs/msg | peak RSS |");
    println!("|---|---|---|---|---|");
    println!(
        "| raw pull+ack loop (baseline, median of {rounds}) | {} | {:.0} | {:.1} | |",
        raw.messages,
        raw.rate(),
        raw.cpu_us_per_message()
    );
    println!(
        "| bridge → JSONL, fsync per batch (median of {rounds}) | {} | {:.0} | {:.1} | {} MB |",
        bridge.messages,
        bridge.rate(),
        bridge.cpu_us_per_message(),
        bridge.max_rss_kb / 1024
    );

    // 2. 50 ms round trips.
    let (slow, slow_base) = start_emulator(&["--fault-latency-ms", "50"]).await;
    let n = messages.min(30_000);
    seed(&slow_base, "bridgertt", n, 1000).await;
    let rtt = bridge_into_jsonl(
        dir.path(),
        &slow_base,
        "bridgertt",
        "pullers = 8\nack_concurrency = 8",
        n,
    );
    drop(slow);
    println!(
        "| bridge → JSONL, 50 ms round trips | {} | {:.0} | {:.1} | {} MB |",
        rtt.messages,
        rtt.rate(),
        rtt.cpu_us_per_message(),
        rtt.max_rss_kb / 1024
    );

    // 3. About 10,000 in flight: acks take 400 ms.
    let (held, held_base) =
        start_emulator(&["--fault-latency-ms", "400", "--fault-endpoint", "ack"]).await;
    let n = messages.min(40_000);
    seed(&held_base, "bridgeheld", n, 1000).await;
    let inflight = bridge_into_jsonl(
        dir.path(),
        &held_base,
        "bridgeheld",
        "pullers = 8\nmax_in_flight = 10000\nack_concurrency = 32",
        n,
    );
    drop(held);
    println!(
        "| bridge → JSONL, ~10,000 in flight | {} | {:.0} | {:.1} | {} MB |",
        inflight.messages,
        inflight.rate(),
        inflight.cpu_us_per_message(),
        inflight.max_rss_kb / 1024
    );
    println!();
    println!(
        "ratio bridge/raw (JSONL, medians, same emulator, same run): {:.2}",
        bridge.rate() / raw.rate()
    );
}
