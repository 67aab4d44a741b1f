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

/// One archive layout: a name, its `[sink]` table (given the round's directory and the
/// round's bucket) and extra `[queue]` lines.
struct Layout {
    name: &'static str,
    sink: fn(&Path, &str) -> String,
    queue_extra: &'static str,
    needs_s3: bool,
}

/// The S3 server of `.ci/start-s3.sh` (s3s-fs: a bucket is a directory under its root).
const S3_ENDPOINT: &str = "http://127.0.0.1:9014";
const S3_ROOT: &str = "/tmp/cfq-s3";
const S3_ACCESS_KEY: &str = "cfq-test-key";
const S3_SECRET_KEY: &str = "cfq-test-secret";

/// Objects fill to the default 64 MiB only when that many records can wait leased. The
/// last, partial object waits for its age: 2 s here instead of the default 20 s, so that
/// the rows measure the uploads, not that one wait.
const S3_QUEUE: &str = "max_in_flight = 100000\nvisibility_timeout_ms = 120000\n";

fn s3_sink(bucket: &str, format: &str) -> String {
    format!(
        "type = \"s3\"\nbucket = \"{bucket}\"\nprefix = \"cf/{{queue_id}}/\"\nendpoint = \"{S3_ENDPOINT}\"\n\
         allow_http = true\nregion = \"us-east-1\"\nformat = \"{format}\"\ncompression = \"zstd\"\n\
         max_object_age_secs = 2\n"
    )
}

const LAYOUTS: &[Layout] = &[
    Layout {
        name: "jsonl, one file (baseline)",
        sink: |dir, _| jsonl_sink(dir, "path = \"{}/archive.jsonl\""),
        queue_extra: "",
        needs_s3: false,
    },
    Layout {
        name: "jsonl segments, no compression",
        sink: |dir, _| jsonl_sink(dir, "directory = \"{}/segments\"\ncompression = \"none\""),
        queue_extra: "",
        needs_s3: false,
    },
    Layout {
        name: "jsonl segments, zstd",
        sink: |dir, _| jsonl_sink(dir, "directory = \"{}/segments\"\ncompression = \"zstd\""),
        queue_extra: "",
        needs_s3: false,
    },
    Layout {
        name: "s3, jsonl + zstd (64 MiB objects)",
        sink: |_, bucket| s3_sink(bucket, "jsonl"),
        queue_extra: S3_QUEUE,
        needs_s3: true,
    },
    Layout {
        name: "s3, parquet (64 MiB objects)",
        sink: |_, bucket| s3_sink(bucket, "parquet"),
        queue_extra: S3_QUEUE,
        needs_s3: true,
    },
];

/// A `jsonl` sink table whose `where_` line has `{}` for the round's directory.
fn jsonl_sink(dir: &Path, where_: &str) -> String {
    format!(
        "type = \"jsonl\"\n{}\n",
        where_.replace("{}", &dir.display().to_string())
    )
}

fn bridge_into(
    dir: &Path,
    base: &str,
    queue: &str,
    queue_extra: &str,
    sink: &str,
    expected: usize,
) -> Measured {
    let config = dir.join(format!("{queue}.toml"));
    std::fs::write(
        &config,
        format!(
            "[queue]\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"{queue}\"\napi_base_url = \"{base}\"\n\
             batch_size = 100\npullers = 4\n{queue_extra}\n[sink]\n{sink}"
        ),
    )
    .unwrap();
    run_bridge(&config, expected)
}

async fn run(messages: usize, rounds: usize) {
    println!(
        "# cfq-bridge archive benchmark ({messages} messages of ~1 KB json, {rounds} rounds)\n"
    );
    let s3 = std::net::TcpStream::connect("127.0.0.1:9014").is_ok();
    if s3 {
        // The bridges inherit these.
        std::env::set_var("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY);
    } else {
        println!(
            "(no S3 server on 127.0.0.1:9014: the s3 rows are left out; run .ci/start-s3.sh)\n"
        );
    }
    let layouts: Vec<&Layout> = LAYOUTS.iter().filter(|l| s3 || !l.needs_s3).collect();
    let (emulator, base) = start_emulator(&[]).await;
    let mut results: Vec<Vec<Measured>> = layouts.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        // Each round starts with a different layout, so none always runs first.
        for step in 0..layouts.len() {
            let i = (step + round) % layouts.len();
            let layout = layouts[i];
            let dir = tempfile::tempdir().unwrap();
            let queue = format!("archive{round}x{i}");
            let bucket = format!("bench{round}x{i}p{}", std::process::id());
            let bucket_dir = Path::new(S3_ROOT).join(&bucket);
            if layout.needs_s3 {
                std::fs::create_dir_all(&bucket_dir).expect("create the bucket");
            }
            seed_bodies(&base, &queue, messages, |n| event_body(n, 1000)).await;
            let sink = (layout.sink)(dir.path(), &bucket);
            let measured = bridge_into(
                dir.path(),
                &base,
                &queue,
                layout.queue_extra,
                &sink,
                messages,
            );
            let bytes = du(dir.path()) + du(&bucket_dir);
            let _ = std::fs::remove_dir_all(&bucket_dir);
            println!(
                "round {round}: {:<36} {:>8.0} msg/s  {:>6.1} CPU µs/msg  {:>4} MB peak RSS  {:>6.1} MB on disk",
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
    for (layout, m) in layouts.iter().zip(&medians) {
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
