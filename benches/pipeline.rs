//! End-to-end benchmark of the bridge against the emulator, with baselines measured in the
//! same run (the machines are shared and noisy: compare ratios, not absolute figures).
//!
//! Run: `cargo bench --bench pipeline` (env `BENCH_MESSAGES`, default 50000).
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

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const ACCOUNT: &str = "bench0account";
const TOKEN: &str = "bench-token";

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

struct EmulatorProcess {
    child: Child,
    base: String,
}

impl Drop for EmulatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn start_emulator(extra: &[&str]) -> EmulatorProcess {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_cfq-bridge"))
        .args([
            "--log",
            "warn",
            "emulator",
            "--port",
            &port.to_string(),
            "--token",
            TOKEN,
        ])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("start the emulator");
    let base = format!("http://127.0.0.1:{port}/client/v4");
    let client = http();
    for _ in 0..200 {
        if client
            .get(format!("{base}/accounts/{ACCOUNT}/queues/ready"))
            .send()
            .await
            .is_ok()
        {
            return EmulatorProcess { child, base };
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut child = child;
    let _ = child.kill();
    let _ = child.wait();
    panic!("the emulator did not start");
}

fn http() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(32)
        .build()
        .unwrap()
}

/// Publishes `count` json messages of about `size` bytes through the batch endpoint.
async fn seed(base: &str, queue: &str, count: usize, size: usize) {
    let client = http();
    let filler = "x".repeat(size.saturating_sub(40));
    let url = format!("{base}/accounts/{ACCOUNT}/queues/{queue}/messages/batch");
    let mut sent = 0;
    let mut tasks = Vec::new();
    while sent < count {
        let n = (count - sent).min(100);
        let batch: Vec<Value> = (0..n)
            .map(|i| json!({"content_type": "json", "body": {"n": sent + i, "pad": filler}}))
            .collect();
        sent += n;
        let request = client.post(&url).json(&json!({ "messages": batch }));
        tasks.push(tokio::spawn(async move {
            let r = request.send().await.expect("publish");
            assert!(r.status().is_success(), "publish failed: {}", r.status());
        }));
        if tasks.len() >= 8 {
            for t in tasks.drain(..) {
                t.await.unwrap();
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// CPU time (user + system) of this process.
fn self_cpu() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

struct Measured {
    messages: usize,
    wall: Duration,
    cpu: Duration,
    max_rss_kb: i64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.wall.as_secs_f64()
    }
    fn cpu_us_per_message(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.messages as f64
    }
}

/// The baseline: `pullers` loops of pull (batch 100) then ack every lease, no decoding and
/// no sink, until an empty pull with a backlog of 0.
async fn raw_loop(base: &str, queue: &str, pullers: usize, expected: usize) -> Measured {
    let client = http();
    let pull_url = format!("{base}/accounts/{ACCOUNT}/queues/{queue}/messages/pull");
    let ack_url = format!("{base}/accounts/{ACCOUNT}/queues/{queue}/messages/ack");
    let cpu0 = self_cpu();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..pullers {
        let (client, pull_url, ack_url) = (client.clone(), pull_url.clone(), ack_url.clone());
        tasks.push(tokio::spawn(async move {
            let mut moved = 0usize;
            loop {
                let body: Value = client
                    .post(&pull_url)
                    .json(&json!({"batch_size": 100, "visibility_timeout_ms": 60000}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let messages = body["result"]["messages"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if messages.is_empty() {
                    if body["result"]["message_backlog_count"].as_u64() == Some(0) {
                        return moved;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                let acks: Vec<Value> = messages
                    .iter()
                    .map(|m| json!({"lease_id": m["lease_id"]}))
                    .collect();
                moved += acks.len();
                let r = client
                    .post(&ack_url)
                    .json(&json!({"acks": acks, "retries": []}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
            }
        }));
    }
    let mut moved = 0;
    for t in tasks {
        moved += t.await.unwrap();
    }
    let wall = t0.elapsed();
    assert_eq!(moved, expected, "the raw loop moved every message");
    Measured {
        messages: moved,
        wall,
        cpu: self_cpu() - cpu0,
        max_rss_kb: 0,
    }
}

/// Runs `cfq-bridge run --until-empty` and measures it with wait4.
fn run_bridge(dir: &Path, base: &str, queue: &str, queue_extra: &str, expected: usize) -> Measured {
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
    let t0 = Instant::now();
    // Reaped below with wait4 (for its resource usage), not with Child::wait.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_cfq-bridge"))
        .args(["--log", "warn", "run", "--until-empty", "--config"])
        .arg(&config)
        .env("CLOUDFLARE_API_TOKEN", TOKEN)
        .spawn()
        .expect("start the bridge");
    // wait4's ru_maxrss would include the pages the child shared with this (large) process
    // between fork and exec; the kernel's high-water mark of the bridge itself is polled
    // instead.
    let peak_kb = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let poller = {
        let peak_kb = std::sync::Arc::clone(&peak_kb);
        let status_path = format!("/proc/{}/status", child.id());
        std::thread::spawn(move || {
            while let Ok(text) = std::fs::read_to_string(&status_path) {
                if let Some(kb) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
                {
                    peak_kb.fetch_max(kb, std::sync::atomic::Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut status = 0;
    // SAFETY: wait4 only writes into the locals we pass; the pid is our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let wall = t0.elapsed();
    let _ = poller.join();
    assert_eq!(pid, child.id() as i32);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the bridge failed"
    );
    let lines = std::fs::read_to_string(&archive).unwrap().lines().count();
    assert!(
        lines >= expected,
        "archive has {lines} of {expected} messages"
    );
    Measured {
        messages: expected,
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kb: peak_kb.load(std::sync::atomic::Ordering::Relaxed),
    }
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
    let emulator = start_emulator(&[]).await;
    let mut raws = Vec::new();
    let mut bridges = Vec::new();
    for round in 0..rounds {
        let raw_queue = format!("rawloop{round}");
        seed(&emulator.base, &raw_queue, messages, 1000).await;
        raws.push(raw_loop(&emulator.base, &raw_queue, 4, messages).await);
        let bridge_queue = format!("bridgejsonl{round}");
        seed(&emulator.base, &bridge_queue, messages, 1000).await;
        bridges.push(run_bridge(
            dir.path(),
            &emulator.base,
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
    let median = |v: &mut Vec<Measured>| {
        v.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
        v.remove(v.len() / 2)
    };
    let raw = median(&mut raws);
    let bridge = median(&mut bridges);
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
    let slow = start_emulator(&["--fault-latency-ms", "50"]).await;
    let n = messages.min(30_000);
    seed(&slow.base, "bridgertt", n, 1000).await;
    let rtt = run_bridge(
        dir.path(),
        &slow.base,
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
    let held = start_emulator(&["--fault-latency-ms", "400", "--fault-endpoint", "ack"]).await;
    let n = messages.min(40_000);
    seed(&held.base, "bridgeheld", n, 1000).await;
    let inflight = run_bridge(
        dir.path(),
        &held.base,
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
