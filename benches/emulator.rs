//! Throughput of the emulator: batch-100 pull + ack loops against an in-process emulator
//! over loopback HTTP, as the bridge's raw baseline would drive it.
//!
//! `cargo bench --bench emulator` prints, per scenario, messages per second and the CPU
//! time per message of the whole process (emulator and client share the machine's cores).
//! The issue's target is >= 200k msg/s of batch-100 pull+ack on a 2-core machine.
//! `CFQ_BENCH_MESSAGES` overrides the number of messages per scenario (default 300,000).

use std::time::{Duration, Instant};

use cfq_emulator::{start, ContentType, EmulatorConfig, SeedSpec};
use serde::Deserialize;

const ACCOUNT: &str = "bench";
const WORKERS: usize = 4;
const BATCH: usize = 100;

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    result: PullResult<'a>,
}

#[derive(Deserialize)]
struct PullResult<'a> {
    #[serde(borrow)]
    messages: Vec<PulledMessage<'a>>,
}

#[derive(Deserialize)]
struct PulledMessage<'a> {
    lease_id: &'a str,
}

/// User + system CPU time of this process, from /proc (Linux); `None` elsewhere.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // Linux reports in clock ticks of 1/100 s on every mainstream configuration.
    Some(Duration::from_millis((utime + stime) * 10))
}

async fn worker(http: reqwest::Client, pull_url: String, ack_url: String) -> usize {
    let pull_body = format!(r#"{{"batch_size":{BATCH},"visibility_timeout_ms":60000}}"#);
    let mut moved = 0;
    let mut ack_body = String::with_capacity(BATCH * 64);
    loop {
        let response = http
            .post(&pull_url)
            .bearer_auth("bench")
            .body(pull_body.clone())
            .send()
            .await
            .expect("pull answered");
        assert!(
            response.status().is_success(),
            "pull failed: {}",
            response.status()
        );
        let bytes = response.bytes().await.expect("pull body");
        let envelope: Envelope<'_> = serde_json::from_slice(&bytes).expect("pull result");
        if envelope.result.messages.is_empty() {
            return moved;
        }
        ack_body.clear();
        ack_body.push_str(r#"{"acks":["#);
        for (i, message) in envelope.result.messages.iter().enumerate() {
            if i > 0 {
                ack_body.push(',');
            }
            ack_body.push_str(r#"{"lease_id":""#);
            ack_body.push_str(message.lease_id);
            ack_body.push_str(r#""}"#);
        }
        ack_body.push_str("]}");
        moved += envelope.result.messages.len();
        let response = http
            .post(&ack_url)
            .bearer_auth("bench")
            .body(ack_body.clone())
            .send()
            .await
            .expect("ack answered");
        assert!(
            response.status().is_success(),
            "ack failed: {}",
            response.status()
        );
        response.bytes().await.expect("ack body");
    }
}

async fn scenario(name: &str, count: usize, body_size: usize, content_type: ContentType) {
    let emulator = start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .expect("emulator starts");
    let queue = format!("bench-{body_size}");
    let seeding = Instant::now();
    emulator.seed(
        ACCOUNT,
        &queue,
        &SeedSpec {
            count,
            body_size,
            content_type,
        },
    );
    let seed_secs = seeding.elapsed().as_secs_f64();

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(WORKERS * 2)
        .build()
        .unwrap();
    let base = format!(
        "{}/accounts/{ACCOUNT}/queues/{queue}/messages",
        emulator.base_url()
    );
    let cpu_before = cpu_time();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        tasks.push(tokio::spawn(worker(
            http.clone(),
            format!("{base}/pull"),
            format!("{base}/ack"),
        )));
    }
    let mut moved = 0;
    for task in tasks {
        moved += task.await.expect("worker finished");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_before
        .zip(cpu_time())
        .map(|(before, after)| after.saturating_sub(before));
    let stats = emulator.stats(ACCOUNT, &queue);
    assert_eq!(moved, count, "every message moved once");
    assert_eq!(stats.acked as usize, count, "every message acked");
    let rate = moved as f64 / elapsed;
    let cpu_note = cpu.map_or_else(String::new, |cpu| {
        format!(
            ", {:.2} us CPU/msg (client + emulator)",
            cpu.as_secs_f64() * 1e6 / moved as f64
        )
    });
    println!(
        "{name}: {moved} msgs in {elapsed:.2} s = {rate:.0} msg/s (batch {BATCH}, {WORKERS} workers{cpu_note}); seeded at {:.0} msg/s",
        count as f64 / seed_secs
    );
    emulator.shutdown().await;
}

fn main() {
    let count: usize = std::env::var("CFQ_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        scenario("pull+ack json 100 B", count, 100, ContentType::Json).await;
        scenario("pull+ack json 1 KB", count, 1000, ContentType::Json).await;
        scenario("pull+ack text 100 B", count, 100, ContentType::Text).await;
    });
}
