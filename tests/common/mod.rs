//! The one support module of the bridge's black-box tests (`mod common;` in each file):
//! the in-process emulator, config files, the bridge binary, archive readers, the schema
//! check of recorded requests, waiting on a condition with a deadline, and ports.
//!
//! Submodules: [`archives`] (archive files: plain, gzip, zstd, damaged), [`process`] (the
//! bridge as a long-running child and its counters),
//! [`records`] (the one sink-record builder), [`nats_server`] (a private nats-server),
//! [`kafka_broker`] (the shared and private Kafka brokers), [`s3_server`] (the S3 server
//! of `.ci/start-s3.sh`, and private ones) and [`tcp_proxy`] (a cutting proxy for outages).
//!
//! Ports: in-process servers bind `127.0.0.1:0` and keep their listener; external
//! processes choose their own port where they can (nats-server with `-p -1`, the
//! `cfq-bridge emulator --port 0` command). [`ports::reserve_port`] is the one exception, for
//! the processes that cannot report a port they chose (see its doc).
#![allow(dead_code)]

pub mod archives;
#[cfg(feature = "kafka")]
pub mod kafka_broker;
pub mod nats_server;
pub mod ports;
pub mod process;
pub mod records;
pub mod s3_server;
pub mod tcp_proxy;

#[allow(unused_imports)]
pub use ports::reserve_port;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use records::{record, RecordBuilder};

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cfq_bridge::config::Config;
use cfq_emulator::{self as emulator, ContentType, Emulator, EmulatorConfig, SeedSpec};
use serde_json::Value;

pub const ACCOUNT: &str = "0123456789abcdef0123456789abcdef";
pub const TOKEN: &str = "test-token-7c1d";

/// Starts an emulator on 127.0.0.1:0 that accepts [`TOKEN`] and records requests.
pub async fn start_emulator() -> Emulator {
    start_emulator_with(EmulatorConfig {
        tokens: vec![TOKEN.to_string()],
        record_requests: true,
        ..EmulatorConfig::default()
    })
    .await
}

/// Starts an emulator with the given settings on 127.0.0.1:0.
pub async fn start_emulator_with(config: EmulatorConfig) -> Emulator {
    emulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("start the emulator")
}

/// Seeds `count` messages of `content_type` with bodies of about `body_size` bytes into
/// `queue` and returns their ids.
pub fn seed_ids(
    emulator: &Emulator,
    queue: &str,
    count: usize,
    body_size: usize,
    content_type: ContentType,
) -> HashSet<String> {
    emulator
        .seed(
            ACCOUNT,
            queue,
            &SeedSpec {
                count,
                body_size,
                content_type,
            },
        )
        .into_iter()
        .collect()
}

/// Runs `config` in process with the test token, draining the queue (`--until-empty`),
/// within `timeout`.
pub async fn drain_in_process(
    config: Config,
    timeout: Duration,
) -> anyhow::Result<cfq_bridge::pipeline::Summary> {
    tokio::time::timeout(
        timeout,
        cfq_bridge::app::run_pipeline_with_stats(
            config,
            secrecy::SecretString::from(TOKEN.to_string()),
            true,
            std::future::pending(),
            std::sync::Arc::new(cfq_bridge::stats::Stats::default()),
        ),
    )
    .await
    .expect("the in-process run ended in time")
}

/// A queue id unique to the calling test (≤ 32 characters).
pub fn queue_name(tag: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000;
    let tag: String = tag
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(20)
        .collect();
    format!("{tag}{n}")
}

/// Config text for a queue on `emulator` with extra `[queue]` lines and a `[sink]` body.
pub fn config_text(emulator: &Emulator, queue: &str, queue_extra: &str, sink: &str) -> String {
    format!(
        "[queue]\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"{queue}\"\napi_base_url = \"{}\"\n\
         empty_backoff_max_ms = 200\n{queue_extra}\n\n[sink]\n{sink}\n",
        emulator.base_url()
    )
}

/// Parsed config for in-process runs.
pub fn config(emulator: &Emulator, queue: &str, queue_extra: &str, sink: &str) -> Config {
    Config::from_toml(&config_text(emulator, queue, queue_extra, sink), |_| None)
        .expect("valid test config")
}

/// A JSONL sink table for `path`.
pub fn jsonl_sink(path: &Path) -> String {
    format!(
        "type = \"jsonl\"\npath = {}",
        serde_json::to_string(&path.display().to_string()).unwrap()
    )
}

/// Writes `dir/bridge.toml`: `queue` on the emulator, with `queue_extra` lines in
/// `[queue]`, into the JSONL file `dir/out.jsonl`; returns the config's path.
pub fn jsonl_config(emulator: &Emulator, queue: &str, queue_extra: &str, dir: &Path) -> PathBuf {
    let sink = jsonl_sink(&dir.join("out.jsonl"));
    write_config(dir, &config_text(emulator, queue, queue_extra, &sink))
}

/// Starts `cfq-bridge run` on `queue` into `dir/out.jsonl`, with `queue_extra` lines in
/// `[queue]` and `[metrics]` on a free port; returns the bridge and that port.
pub fn run_into_jsonl(
    emulator: &Emulator,
    queue: &str,
    queue_extra: &str,
    dir: &Path,
) -> (Running, u16) {
    let port = reserve_port();
    let sink = format!(
        "{}\n{}",
        jsonl_sink(&dir.join("out.jsonl")),
        metrics_table(port)
    );
    let config = write_config(dir, &config_text(emulator, queue, queue_extra, &sink));
    let bridge = Running::spawn(
        &["run", "--config", config.to_str().unwrap()],
        &dir.join("bridge.log"),
        Some(port),
    );
    (bridge, port)
}

/// Writes a config file into `dir`.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("bridge.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The bridge binary with the test token in its environment.
pub fn bridge() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cfq-bridge"));
    cmd.env("CLOUDFLARE_API_TOKEN", TOKEN)
        .env_remove("RUST_LOG")
        .env_remove("CFQ_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs the bridge to completion (with a generous timeout) and returns its output.
pub async fn run_bridge(args: &[&str], timeout: Duration) -> std::process::Output {
    let child = bridge()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cfq-bridge");
    tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .expect("cfq-bridge finished in time")
        .expect("cfq-bridge output")
}

/// Reads a JSONL archive; every line must parse.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "archive ends mid-line"
    );
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).unwrap_or_else(|e| {
                panic!(
                    "line {} of {} is unreadable: {e}: {line}",
                    i + 1,
                    path.display()
                )
            })
        })
        .collect()
}

/// The ids in an archive, as a set.
pub fn archive_ids(path: &Path) -> HashSet<String> {
    read_jsonl(path)
        .iter()
        .map(|v| v["id"].as_str().expect("id").to_string())
        .collect()
}

/// Polls `condition` every 20 ms until it holds, or panics after `timeout` naming `what`.
/// The one way tests wait for something they can observe.
///
/// `condition` is usually an async closure (`async || ...`) that reads shared state; one
/// that must change a captured value does it through a `Cell`/`RefCell`, which keeps the
/// future `Send` for tasks that are spawned.
pub async fn wait_until<F>(what: &str, timeout: Duration, condition: impl FnMut() -> F)
where
    F: Future<Output = bool>,
{
    assert!(
        try_wait_until(timeout, condition).await,
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// Polls `condition` every 20 ms until it holds (true) or `timeout` passes (false), for
/// callers that add their own context to the failure.
pub async fn try_wait_until<F>(timeout: Duration, mut condition: impl FnMut() -> F) -> bool
where
    F: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Validates every recorded pull, ack and publish (`/messages`, `/messages/batch`)
/// request body against Cloudflare's strict schema. Returns how many requests were
/// checked, and panics when there were none: checking no request proves nothing (the
/// emulator needs `record_requests: true`).
pub fn assert_requests_match_schema(emulator: &Emulator) -> usize {
    let spec: Value = serde_json::from_str(include_str!(
        "../fixtures/openapi/queues-messages.strict.openapi.json"
    ))
    .unwrap();
    let validator = |path: &str| {
        let mut schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
            ["schema"]
            .clone();
        assert!(schema.is_object(), "no request schema for {path}");
        schema["components"] = spec["components"].clone();
        jsonschema::draft7::new(&schema).expect("compile schema")
    };
    let pull = validator("/accounts/{account_id}/queues/{queue_id}/messages/pull");
    let ack = validator("/accounts/{account_id}/queues/{queue_id}/messages/ack");
    let publish = validator("/accounts/{account_id}/queues/{queue_id}/messages");
    let batch = validator("/accounts/{account_id}/queues/{queue_id}/messages/batch");
    let mut checked = 0;
    for request in emulator.recorded_requests() {
        let path = request.path.trim_end_matches('/');
        let v = if path.ends_with("/messages/pull") {
            &pull
        } else if path.ends_with("/messages/ack") {
            &ack
        } else if path.ends_with("/messages/batch") {
            &batch
        } else if path.ends_with("/messages") {
            &publish
        } else {
            continue;
        };
        let body = request
            .body
            .as_ref()
            .unwrap_or_else(|| panic!("{} {} sent no JSON body", request.method, request.path));
        let errors: Vec<String> = v.iter_errors(body).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{} {} does not match Cloudflare's schema: {errors:?}\nbody: {}",
            request.method,
            request.path,
            body
        );
        checked += 1;
    }
    assert!(
        checked > 0,
        "no pull, ack or publish request was recorded: start the emulator with record_requests: true"
    );
    checked
}
