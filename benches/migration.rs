//! Migration benchmark: how fast `replay` and a queue-to-queue `run` publish when every
//! API call takes 50 ms, against a raw publish loop measured in the same run.
//!
//! Run: `cargo bench --bench migration` (env `BENCH_MESSAGES`, default 20000).
//!
//! The emulator runs as its own process with `--fault-latency-ms 50`. Messages are ~1 KB
//! json. Scenarios:
//! 1. **raw publish loop** (baseline): 8 tasks in this process publishing batches of 100
//!    through `/messages/batch`, no rate limit: what the emulator allows at 50 ms;
//! 2. **replay, default rate**: `cfq-bridge replay` of a JSONL archive with the default
//!    `max_messages_per_second` (5,000, Cloudflare's per-queue cap);
//! 3. **replay, half rate**: the same with `--rate 2500`, to show the limiter, not the
//!    round trips, sets the pace;
//! 4. **queue to queue**: `cfq-bridge run --until-empty` from a queue into a
//!    `cloudflare_queue` sink (a redrive), default settings.

#[path = "support/mod.rs"]
mod support;

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use cfq_sinks::{ContentType, Record};
use serde_json::{json, Value};
use support::{
    http, json_body, run_bridge_command, seed, self_cpu, start_emulator, Measured, ACCOUNT,
};

/// Cloudflare's per-queue publish cap, the sink's default rate.
const DEFAULT_RATE: f64 = 5_000.0;

fn main() {
    let messages: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(messages));
}

/// Writes `count` json records of ~`size` bytes as a JSONL archive.
fn write_archive(path: &Path, count: usize, size: usize) {
    let queue: Arc<str> = Arc::from("archived");
    let mut out = Vec::with_capacity(count * (size + 200));
    for n in 0..count {
        let mut metadata = serde_json::Map::new();
        metadata.insert("CF-Content-Type".into(), "json".into());
        Record {
            id: format!("msg-{n:08}"),
            queue_id: Arc::clone(&queue),
            timestamp_ms: 1_764_000_000_000 + n as u64,
            attempts: 1,
            content_type: ContentType::Json,
            metadata,
            body: Bytes::from(json_body(n, size).to_string()),
        }
        .write_json_line(&mut out);
    }
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(&out))
        .expect("write the archive");
}

/// The baseline: 8 tasks publishing batches of 100, unlimited. CPU is this process's.
async fn raw_publish_loop(base: &str, queue: &str, count: usize, size: usize) -> Measured {
    let client = http();
    let url = format!("{base}/accounts/{ACCOUNT}/queues/{queue}/messages/batch");
    let batches: Vec<Value> = (0..count.div_ceil(100))
        .map(|b| {
            let messages: Vec<Value> = (b * 100..((b + 1) * 100).min(count))
                .map(|n| json!({"content_type": "json", "body": json_body(n, size)}))
                .collect();
            json!({ "messages": messages })
        })
        .collect();
    let queue_of_work = Arc::new(std::sync::Mutex::new(batches));
    let cpu0 = self_cpu();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        let url = url.clone();
        let work = Arc::clone(&queue_of_work);
        tasks.push(tokio::spawn(async move {
            loop {
                let next = work.lock().unwrap().pop();
                let Some(batch) = next else { break };
                let answer = client
                    .post(&url)
                    .json(&batch)
                    .send()
                    .await
                    .expect("publish");
                assert!(answer.status().is_success(), "{}", answer.status());
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    Measured {
        messages: count,
        wall: t0.elapsed(),
        cpu: self_cpu() - cpu0,
        max_rss_kb: 0,
    }
}

fn destination_config(dir: &Path, base: &str, queue: &str) -> String {
    let path = dir.join(format!("{queue}.toml"));
    std::fs::write(
        &path,
        format!(
            "[queue]\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"{queue}\"\napi_base_url = \"{base}\"\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn row(name: &str, m: &Measured, raw: &Measured) {
    println!(
        "| {name} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {} |",
        m.messages,
        m.rate(),
        m.rate() / raw.rate(),
        m.rate() / DEFAULT_RATE,
        m.cpu_us_per_message(),
        if m.max_rss_kb > 0 {
            format!("{} MB", m.max_rss_kb / 1024)
        } else {
            String::new()
        }
    );
}

async fn run(messages: usize) {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive.jsonl");
    write_archive(&archive, messages, 1000);
    let archive = archive.to_str().unwrap().to_string();
    println!("# cfq-bridge migration benchmark ({messages} messages of ~1 KB json, 50 ms per API call)\n");

    let (emulator, base) = start_emulator(&["--fault-latency-ms", "50"]).await;
    let raw = raw_publish_loop(&base, "rawpublish", messages, 1000).await;

    let config = destination_config(dir.path(), &base, "replaydefault");
    let replay_default = run_bridge_command(
        &["replay", "--config", &config, "--input", &archive],
        messages,
    );
    let config = destination_config(dir.path(), &base, "replayhalf");
    let replay_half = run_bridge_command(
        &[
            "replay", "--config", &config, "--input", &archive, "--rate", "2500",
        ],
        messages,
    );

    seed(&base, "redrivesource", messages, 1000).await;
    let redrive_config = dir.path().join("redrive.toml");
    std::fs::write(
        &redrive_config,
        format!(
            "[queue]\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"redrivesource\"\napi_base_url = \"{base}\"\n\
             [sink]\ntype = \"cloudflare_queue\"\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"redrivetarget\"\n\
             api_base_url = \"{base}\"\n"
        ),
    )
    .unwrap();
    let redrive = run_bridge_command(
        &[
            "run",
            "--until-empty",
            "--config",
            redrive_config.to_str().unwrap(),
        ],
        messages,
    );
    drop(emulator);

    println!(
        "| scenario | messages | msg/s | × raw loop | × 5,000/s cap | CPU µs/msg | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|");
    row("raw publish loop, 8 × batch 100 (baseline)", &raw, &raw);
    row("replay, default rate (5,000/s)", &replay_default, &raw);
    row("replay, --rate 2500", &replay_half, &raw);
    row("queue → queue (run --until-empty)", &redrive, &raw);
}
