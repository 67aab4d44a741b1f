//! Scale benchmarks of issue 14, each measured against its own baseline in the same run:
//!
//! 1. **auto versus fixed**: at 0, 20 and 50 ms per API call, `pullers = "auto"` and
//!    `ack_concurrency = "auto"` (the defaults) against a sweep of fixed `pullers` ×
//!    `ack_concurrency`; the best fixed setting of the sweep and auto are then run again,
//!    interleaved, and their medians compared (goal: auto ≥ 0.9 × the best);
//! 2. **density**: 20 routes in one process, one queue each, 50 ms per API call: the
//!    aggregate rate, CPU per message and peak RSS (goal: ≥ 80,000 msg/s on 2 cores with
//!    the emulator on the same machine);
//! 3. **idle cost**: empty pulls per minute on an empty queue, auto against 4 fixed loops,
//!    side by side.
//!
//! Run: `cargo bench --bench scale` (env `BENCH_MESSAGES`, messages per sweep run, default
//! 20000; `BENCH_ROUNDS`, default 3; `BENCH_DENSITY_MESSAGES`, per route, default 10000;
//! `BENCH_IDLE_SECS`, default 30; `BENCH_PARTS`, a comma list of `auto`, `density`, `idle`).

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{
    env_or, median, run_bridge, seed_admin as seed, start_emulator, Measured, ACCOUNT, TOKEN,
};

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "auto,density,idle".into());
    runtime.block_on(async {
        if parts.contains("auto") {
            auto_versus_fixed(env_or("BENCH_MESSAGES", 20_000), env_or("BENCH_ROUNDS", 3)).await;
        }
        if parts.contains("density") {
            density(env_or("BENCH_DENSITY_MESSAGES", 10_000)).await;
        }
        if parts.contains("idle") {
            idle_cost(env_or("BENCH_IDLE_SECS", 30) as u64).await;
        }
    });
}

/// A `[queue]` table for `queue` on `base` with `extra` lines.
fn queue_table(base: &str, queue: &str, extra: &str) -> String {
    format!(
        "account_id = \"{ACCOUNT}\"\nqueue_id = \"{queue}\"\napi_base_url = \"{base}\"\n\
         batch_size = 100\nempty_backoff_max_ms = 200\n{extra}\n"
    )
}

/// Drains `messages` seeded into a fresh queue with `settings`, into a JSONL file.
async fn drain_once(
    base: &str,
    dir: &Path,
    tag: &str,
    settings: &str,
    messages: usize,
) -> Measured {
    let queue = format!("q{}", unique());
    seed(base, &queue, messages, 100).await;
    let out = dir.join(format!("{queue}.jsonl"));
    let config = dir.join(format!("{queue}.toml"));
    std::fs::write(
        &config,
        format!(
            "[queue]\n{}\n[sink]\ntype = \"jsonl\"\npath = \"{}\"\n",
            queue_table(base, &queue, settings),
            out.display()
        ),
    )
    .unwrap();
    let measured = run_bridge(&config, messages);
    let lines = std::fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(
        lines >= messages,
        "{tag}: {lines} of {messages} records written"
    );
    let _ = std::fs::remove_file(out);
    measured
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn auto_versus_fixed(messages: usize, rounds: usize) {
    println!(
        "## auto versus fixed ({messages} messages per run, {rounds} rounds for the final pair)\n"
    );
    println!("| round trip | setting | msg/s | µs CPU/msg |");
    println!("|---|---|---|---|");
    let mut verdicts = Vec::new();
    for latency in [0u64, 20, 50] {
        let flags: Vec<String> = if latency > 0 {
            vec!["--fault-latency-ms".into(), latency.to_string()]
        } else {
            Vec::new()
        };
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (_emulator, base) = start_emulator(&flags).await;
        let dir = tempfile::tempdir().unwrap();
        // The sweep: one run each, to find the best fixed setting.
        let mut best: Option<(String, f64)> = None;
        for pullers in [1, 2, 4, 8, 16] {
            for acks in [4, 16] {
                let setting = format!("pullers = {pullers}\nack_concurrency = {acks}");
                let m = drain_once(&base, dir.path(), "sweep", &setting, messages).await;
                println!(
                    "| {latency} ms | fixed {pullers} pullers, {acks} ack calls (sweep) | {:.0} | {:.2} |",
                    m.rate(),
                    m.cpu_us_per_message()
                );
                if best.as_ref().is_none_or(|(_, rate)| m.rate() > *rate) {
                    best = Some((setting, m.rate()));
                }
            }
        }
        let (best_setting, _) = best.expect("a sweep ran");
        // The final pair, interleaved.
        let (mut auto, mut fixed) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            auto.push(drain_once(&base, dir.path(), "auto", "", messages).await);
            fixed.push(drain_once(&base, dir.path(), "best fixed", &best_setting, messages).await);
        }
        let (auto, fixed) = (median(auto), median(fixed));
        let label = best_setting.replace('\n', ", ");
        println!(
            "| {latency} ms | **best fixed** ({label}), median | {:.0} | {:.2} |",
            fixed.rate(),
            fixed.cpu_us_per_message()
        );
        println!(
            "| {latency} ms | **auto**, median | {:.0} | {:.2} |",
            auto.rate(),
            auto.cpu_us_per_message()
        );
        verdicts.push((latency, auto.rate() / fixed.rate()));
    }
    println!();
    for (latency, ratio) in verdicts {
        println!("auto / best fixed at {latency} ms: {ratio:.2}");
    }
    println!();
}

async fn density(per_route: usize) {
    const ROUTES: usize = 20;
    println!("## density: {ROUTES} routes in one process, 50 ms per API call, {per_route} messages per route\n");
    let (_emulator, base) = start_emulator(&["--fault-latency-ms", "50"]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for r in 0..ROUTES {
        let queue = format!("dense{r}x{}", unique() % 1_000_000);
        seed(&base, &queue, per_route, 100).await;
        text.push_str(&format!(
            "[[routes]]\nname = \"r{r}\"\n[routes.queue]\n{}[routes.sink]\ntype = \"jsonl\"\npath = \"{}\"\n\n",
            queue_table(&base, &queue, ""),
            dir.path().join(format!("r{r}.jsonl")).display()
        ));
    }
    let config = dir.path().join("routes.toml");
    std::fs::write(&config, text).unwrap();
    let total = per_route * ROUTES;
    let m = run_bridge(&config, total);
    let written: usize = (0..ROUTES)
        .map(|r| {
            std::fs::read_to_string(dir.path().join(format!("r{r}.jsonl")))
                .unwrap_or_default()
                .lines()
                .count()
        })
        .sum();
    assert!(written >= total, "{written} of {total} records written");
    println!("| routes | messages | wall s | msg/s together | µs CPU/msg | peak RSS MB |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {ROUTES} | {total} | {:.2} | {:.0} | {:.2} | {:.1} |\n",
        m.wall.as_secs_f64(),
        m.rate(),
        m.cpu_us_per_message(),
        m.max_rss_kb as f64 / 1024.0
    );
}

async fn idle_cost(secs: u64) {
    println!("## idle cost: an empty queue for {secs} s, side by side, default back-off (100 ms to 5 s)\n");
    let (_emulator, base) = start_emulator(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut children = Vec::new();
    for (tag, setting) in [("auto", ""), ("fixed 4 pullers", "pullers = 4")] {
        let queue = format!("idle{}", unique() % 1_000_000);
        seed(&base, &queue, 1, 16).await;
        let port = free_port();
        let config = dir.path().join(format!("{queue}.toml"));
        std::fs::write(
            &config,
            format!(
                "[queue]\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"{queue}\"\napi_base_url = \"{base}\"\n{setting}\n\n\
                 [sink]\ntype = \"jsonl\"\npath = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
                dir.path().join(format!("{queue}.jsonl")).display()
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cfq-bridge"))
            .args(["--log", "warn", "run", "--config"])
            .arg(&config)
            .env("CLOUDFLARE_API_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .spawn()
            .expect("start a bridge");
        children.push((tag, port, support::Process(child)));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    println!("| setting | empty pulls | per minute |");
    println!("|---|---|---|");
    for (tag, port, _child) in &children {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("metrics text");
        let empty: f64 = text
            .lines()
            .filter(|l| l.starts_with("cfq_empty_pulls_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        let minutes = started.elapsed().as_secs_f64() / 60.0;
        println!("| {tag} | {empty:.0} | {:.1} |", empty / minutes);
    }
    println!();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
