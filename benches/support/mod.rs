//! Pieces every benchmark shares: the emulator as its own process, seeding through the
//! batch endpoint, the raw pull+ack baseline, running the bridge binary, and CPU/RSS
//! measurement. Included by each bench with `#[path = "support/mod.rs"] mod support;`.
//!
//! Ports, the record builder, the private nats-server and waiting with a deadline come
//! from the tests' support module (`tests/common`), included here by path.
#![allow(dead_code)]

#[path = "../../tests/common/mod.rs"]
pub mod common;

#[allow(unused_imports)]
pub use common::nats_server::NatsServer;
#[allow(unused_imports)]
pub use common::{record, reserve_port, wait_until};

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The account every bench queue lives in.
pub const ACCOUNT: &str = "bench0account";
/// The token the emulator accepts and the bridge sends.
pub const TOKEN: &str = "bench-token";

/// The number in environment variable `name`, else `default` (the benches' knobs).
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A child process killed on drop.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cfq-bridge emulator` (with `extra` arguments, e.g. fault flags) on a port it
/// chooses (`--port 0`), and returns it with the API base URL it prints on its first line.
pub async fn start_emulator(extra: &[&str]) -> (Process, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cfq-bridge"))
        .args(["--log", "warn", "emulator", "--port", "0", "--token", TOKEN])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the emulator");
    let stdout = child.stdout.take().expect("piped stdout");
    let process = Process(child);
    // Reads the first line, then keeps draining stdout so that a later line never meets a
    // closed pipe.
    let (first_line, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = first_line.send(line);
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let line = tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .expect("the emulator printed its address within 30 s")
        .expect("the emulator's stdout is readable");
    let base = line
        .trim()
        .strip_prefix("cfq-bridge emulator listening on ")
        .unwrap_or_else(|| panic!("unexpected first line of the emulator: {line:?}"))
        .to_owned();
    (process, base)
}

/// An HTTP client sending the bench token.
pub fn http() -> reqwest::Client {
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

/// A json body of exactly `size` bytes (`size` ≥ 30).
pub fn json_body(n: usize, size: usize) -> Value {
    let bare = json!({"n": n, "pad": ""}).to_string().len();
    json!({"n": n, "pad": "x".repeat(size.saturating_sub(bare))})
}

/// A json body of about `size` bytes (`size` ≥ 80) that compresses like real events
/// (a few repeated fields and a hex payload, about 2:1), unlike [`json_body`]'s padding.
pub fn event_body(n: usize, size: usize) -> Value {
    let mut pad = String::with_capacity(size);
    // A cheap deterministic generator (xorshift), so runs are comparable.
    let mut x = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while pad.len() + 80 < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        pad.push_str(&format!("{x:016x}"));
    }
    let kinds = ["view", "click", "purchase", "signup"];
    json!({"n": n, "user": format!("user-{}", n % 1000), "event": kinds[n % 4], "payload": pad})
}

/// Publishes `count` json messages of `size` bytes through the batch endpoint.
pub async fn seed(base: &str, queue: &str, count: usize, size: usize) {
    seed_bodies(base, queue, count, |n| json_body(n, size)).await
}

/// Seeds `count` json messages of `size` bytes into `queue` through the emulator's admin
/// API, which adds no latency (for benchmarks whose API calls are slowed down).
pub async fn seed_admin(base: &str, queue: &str, count: usize, size: usize) {
    let admin = base.trim_end_matches("/client/v4");
    let answer: Value = reqwest::Client::new()
        .post(format!("{admin}/_emulator/seed"))
        .json(&serde_json::json!({
            "account_id": ACCOUNT,
            "queue_id": queue,
            "count": count,
            "body_size": size,
            "content_type": "json",
        }))
        .send()
        .await
        .expect("seed")
        .json()
        .await
        .expect("seed answer");
    assert_eq!(answer["seeded"].as_u64(), Some(count as u64), "{answer}");
}

/// Publishes `count` json messages, the n-th with `body(n)`, through the batch endpoint.
pub async fn seed_bodies(base: &str, queue: &str, count: usize, body: impl Fn(usize) -> Value) {
    let client = http();
    let url = format!("{base}/accounts/{ACCOUNT}/queues/{queue}/messages/batch");
    let mut sent = 0;
    let mut tasks = Vec::new();
    while sent < count {
        let n = (count - sent).min(100);
        let batch: Vec<Value> = (0..n)
            .map(|i| json!({"content_type": "json", "body": body(sent + i)}))
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

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut usage) };
    timeval(usage.ru_utime) + timeval(usage.ru_stime)
}

/// CPU time (user + system) of this process.
pub fn self_cpu() -> Duration {
    rusage(libc::RUSAGE_SELF)
}

/// CPU time (user + system) of this process's children that have been waited for.
pub fn children_cpu() -> Duration {
    rusage(libc::RUSAGE_CHILDREN)
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// One measured run.
pub struct Measured {
    pub messages: usize,
    pub wall: Duration,
    pub cpu: Duration,
    /// Peak RSS of the measured process in KB (0 when not measured).
    pub max_rss_kb: i64,
}

impl Measured {
    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.wall.as_secs_f64()
    }

    /// CPU microseconds per message.
    pub fn cpu_us_per_message(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.messages as f64
    }
}

/// The median of measured runs, by rate.
pub fn median(mut runs: Vec<Measured>) -> Measured {
    runs.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    let middle = runs.len() / 2;
    runs.swap_remove(middle)
}

/// The baseline: `pullers` loops of pull (batch 100) then ack every lease, no decoding and
/// no sink, until an empty pull with a backlog of 0. CPU is this process's.
pub async fn raw_pull_ack_loop(
    base: &str,
    queue: &str,
    pullers: usize,
    expected: usize,
) -> Measured {
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
    assert_eq!(moved, expected, "the raw pull+ack loop moved every message");
    Measured {
        messages: moved,
        wall,
        cpu: self_cpu() - cpu0,
        max_rss_kb: 0,
    }
}

/// Runs `cfq-bridge run --until-empty --config CONFIG` and measures its wall time, its CPU
/// time and its peak RSS. `messages` is what the run is expected to move.
pub fn run_bridge(config: &Path, messages: usize) -> Measured {
    let config = config.to_str().expect("a UTF-8 path");
    run_bridge_command(&["run", "--until-empty", "--config", config], messages)
}

/// Runs `cfq-bridge ARGS` (a command that ends by itself) and measures its wall time,
/// its CPU time and its peak RSS. `messages` is what the run is expected to move.
pub fn run_bridge_command(args: &[&str], messages: usize) -> Measured {
    let cpu_before = children_cpu();
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cfq-bridge"))
        .args(["--log", "warn"])
        .args(args)
        .env("CLOUDFLARE_API_TOKEN", TOKEN)
        .spawn()
        .expect("start the bridge");
    // ru_maxrss of a child also counts the pages it shared with this (large) process
    // between fork and exec: read the bridge's own high-water mark from /proc instead,
    // until it exits.
    let status_path = format!("/proc/{}/status", child.id());
    let peak_watcher = std::thread::spawn(move || {
        let mut peak_kb = 0i64;
        while let Ok(status) = std::fs::read_to_string(&status_path) {
            let hwm = status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok());
            match hwm {
                Some(kb) => peak_kb = peak_kb.max(kb),
                None => break, // a zombie: the bridge has exited
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        peak_kb
    });
    let status = child.wait().expect("wait for the bridge");
    let wall = t0.elapsed();
    // The bridge is the only child reaped during its run: the growth of the children's
    // CPU time is its own.
    let cpu = children_cpu() - cpu_before;
    assert!(status.success(), "the bridge failed: {status}");
    Measured {
        messages,
        wall,
        cpu,
        max_rss_kb: peak_watcher.join().expect("peak watcher"),
    }
}
