//! The metrics listener, read as Prometheus and Kubernetes read it: `cfq-bridge run` with
//! `[metrics] listen` against the emulator (injecting 500s and 429s) into a NATS sink on a
//! private server that the test cuts and restores. `/metrics` is parsed by the Prometheus
//! project's Python parser (`prometheus-client`, pinned in
//! `tests/python/requirements.txt`): every family of [`FAMILIES`] must be served with its
//! type, help text and labels, and match the README's table. `/health` must answer 200
//! throughout, `/ready` 503 while the sink is cut and 200 again after.
//!
//! Needs `python3` with `pip install -r tests/python/requirements.txt` (`.ci/test` does
//! it). Without them this test fails and says so.

// Without the `nats` feature only the tests that need no NATS sink remain (the listener test needs the nats sink).
#![cfg_attr(not(feature = "nats"), allow(dead_code, unused_imports))]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cfq_bridge::metrics::FAMILIES;
use cfq_emulator::{ContentType, Faults};
use common::nats_server::NatsServer;
use common::*;
use serde_json::Value;

/// One metric family as the parser saw it.
#[derive(Debug)]
struct Family {
    kind: String,
    help: String,
    samples: Vec<Sample>,
}

/// One sample: its name (with `_bucket`, `_sum`, ... for histograms), labels and value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses exposition `text` with `prometheus_client.parser`; panics on a parse error.
fn parse_exposition(text: &str) -> BTreeMap<String, Family> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/metrics_check.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "python3 is not available ({e}); install Python 3, then \
                 `pip install -r tests/python/requirements.txt`"
            )
        });
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(text.as_bytes()).expect("feed the parser");
    }
    let output = child.wait_with_output().expect("the parser runs");
    assert!(
        output.status.success(),
        "the Prometheus parser refused /metrics (is `prometheus-client` installed? \
         `pip install -r tests/python/requirements.txt`):\n{}\n--- exposition:\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("utf-8 from the parser")
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("a JSON line from the parser");
            let samples = v["samples"]
                .as_array()
                .expect("samples")
                .iter()
                .map(|s| Sample {
                    name: s["name"].as_str().expect("sample name").to_string(),
                    labels: serde_json::from_value(s["labels"].clone()).expect("labels"),
                    value: s["value"].as_f64().expect("sample value"),
                })
                .collect();
            let family = Family {
                kind: v["type"].as_str().expect("type").to_string(),
                help: v["help"].as_str().expect("help").to_string(),
                samples,
            };
            (v["name"].as_str().expect("name").to_string(), family)
        })
        .collect()
}

/// The value of `family`'s sample whose labels include `with`, summed over the rest.
fn value(families: &BTreeMap<String, Family>, family: &str, with: &[(&str, &str)]) -> f64 {
    // A sample name (`..._total`, a histogram's `..._count`) or a family name.
    let name = ["_total", "_count", "_sum", "_bucket"]
        .iter()
        .find_map(|suffix| family.strip_suffix(suffix))
        .filter(|name| families.contains_key(*name))
        .unwrap_or(family);
    families
        .get(name)
        .unwrap_or_else(|| panic!("{family} is not served"))
        .samples
        .iter()
        .filter(|s| s.name == family || s.name == format!("{name}_total"))
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

async fn get(port: u16, path: &str) -> (u16, String) {
    match reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

async fn wait_status(bridge: &mut Running, port: u16, path: &str, status: u16) -> String {
    let body = std::cell::RefCell::new(String::new());
    let this = std::cell::RefCell::new(&mut *bridge);
    let reached = try_wait_until(Duration::from_secs(60), async || {
        let (got, text) = get(port, path).await;
        *body.borrow_mut() = text;
        if got != status {
            this.borrow_mut()
                .assert_running(&format!("while waiting for {path} to answer {status}"));
        }
        got == status
    })
    .await;
    assert!(
        reached,
        "{path} never answered {status} (last body: {}):\n{}",
        body.borrow(),
        bridge.log_tail()
    );
    body.into_inner()
}

/// Messages published while the sink is cut.
const LATE: usize = 500;

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn families_health_and_readiness_through_faults_and_a_sink_outage() {
    let mut nats = NatsServer::start();
    let emulator = start_emulator().await;
    let queue = queue_name("metrics");
    let seeded = 3000;
    seed_ids(&emulator, &queue, seeded, 32, ContentType::Json);
    emulator.set_faults(Faults {
        error_500_rate: 0.05,
        rate_limit_429_rate: 0.02,
        retry_after_secs: 1,
        // Slow enough that the sink is cut while messages are still moving.
        latency_ms: 20,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let port = reserve_port();
    let sink = format!(
        "type = \"nats\"\nurl = \"{}\"\nsubject = \"metrics.{{queue_id}}\"\npublish_timeout_ms = 1000\n\
         [sink.create_stream]\nname = \"METRICS\"\nduplicate_window_secs = 600\n{}",
        nats.url(),
        metrics_table(port)
    );
    // Small batches and one puller, so the run lasts long enough to cut the sink midway.
    let config = write_config(
        dir.path(),
        &config_text(&emulator, &queue, "batch_size = 20\npullers = 1", &sink),
    );
    let mut bridge = Running::spawn(
        &["run", "--config", config.to_str().unwrap()],
        &dir.path().join("bridge.log"),
        Some(port),
    );
    let health = wait_status(&mut bridge, port, "/health", 200).await;
    assert!(health.contains("\"ok\""), "{health}");
    wait_status(&mut bridge, port, "/ready", 200).await;
    bridge
        .wait_counter("acked", 100, Duration::from_secs(60))
        .await;

    // Cut the sink, and give the bridge more work: /ready says why, /health stays 200,
    // the deliveries fail as transient sink errors.
    nats.stop();
    seed_ids(&emulator, &queue, LATE, 32, ContentType::Json);
    bridge
        .wait_counter("sink_transient_failures", 1, Duration::from_secs(60))
        .await;
    let why = wait_status(&mut bridge, port, "/ready", 503).await;
    let why: Value = serde_json::from_str(&why).expect("/ready answers JSON");
    let reasons = why["reasons"].to_string();
    assert!(
        reasons.contains("route default") && reasons.contains("nats"),
        "{why}"
    );
    assert_eq!(
        get(port, "/health").await.0,
        200,
        "/health while the sink is cut"
    );
    nats.restart();
    wait_status(&mut bridge, port, "/ready", 200).await;

    let seeded = seeded + LATE;
    bridge
        .wait_counter("acked", seeded as u64, Duration::from_secs(120))
        .await;
    emulator.set_faults(Faults::default());
    // The backlog gauge falls to 0 with the next pull; the in-flight gauge, sampled once
    // a second, follows.
    let scraped = std::cell::RefCell::new(String::new());
    let drained = try_wait_until(Duration::from_secs(30), async || {
        let (_, text) = get(port, "/metrics").await;
        let zero = |gauge: &str| {
            text.lines()
                .any(|l| l.starts_with(&format!("{gauge}{{")) && l.ends_with(" 0"))
        };
        let done = zero("cfq_queue_backlog_messages") && zero("cfq_in_flight_messages");
        *scraped.borrow_mut() = text;
        done
    })
    .await;
    let text = scraped.into_inner();
    assert!(
        drained,
        "the backlog and in-flight gauges never fell to 0:\n{text}"
    );
    bridge.stop().await;

    let families = parse_exposition(&text);
    for documented in FAMILIES {
        let name = documented
            .name
            .strip_suffix("_total")
            .unwrap_or(documented.name);
        let family = families
            .get(name)
            .unwrap_or_else(|| panic!("{} is not served:\n{text}", documented.name));
        assert_eq!(family.kind, documented.kind.as_str(), "# TYPE of {name}");
        assert_eq!(family.help, documented.help, "# HELP of {name}");
        assert!(!family.samples.is_empty(), "{name} has no sample");
        let mut labels: Vec<&str> = vec!["route", "queue_id"];
        labels.extend(documented.labels.split(", ").filter(|l| !l.is_empty()));
        for sample in &family.samples {
            assert_eq!(sample.labels["route"], "default", "{sample:?}");
            assert_eq!(sample.labels["queue_id"], queue, "{sample:?}");
            for label in &labels {
                assert!(
                    sample.labels.contains_key(*label),
                    "{name}: {sample:?} lacks {label}"
                );
            }
            assert!(
                sample.value.is_finite() && sample.value >= 0.0,
                "{sample:?}"
            );
        }
    }
    let served: BTreeSet<&str> = families.keys().map(String::as_str).collect();
    let documented: BTreeSet<&str> = FAMILIES
        .iter()
        .map(|f| f.name.strip_suffix("_total").unwrap_or(f.name))
        .collect();
    assert_eq!(served, documented, "families served and documented");

    // The values are the bridge's.
    let seeded = seeded as f64;
    assert_eq!(value(&families, "cfq_messages_acked_total", &[]), seeded);
    assert!(value(&families, "cfq_messages_pulled_total", &[]) >= seeded);
    assert!(value(&families, "cfq_messages_delivered_total", &[]) >= seeded);
    assert!(
        value(&families, "cfq_api_errors_total", &[("class", "5xx")]) > 0.0,
        "{text}"
    );
    assert!(
        value(&families, "cfq_api_errors_total", &[("class", "429")]) > 0.0,
        "{text}"
    );
    assert!(
        value(
            &families,
            "cfq_sink_errors_total",
            &[("sink", "nats"), ("class", "transient")]
        ) > 0.0,
        "the outage shows as transient sink errors:\n{text}"
    );
    assert_eq!(value(&families, "cfq_in_flight_messages", &[]), 0.0);
    assert_eq!(value(&families, "cfq_pullers", &[]), 1.0);
    let latency = value(&families, "cfq_end_to_end_latency_seconds_count", &[]);
    assert!(
        latency >= seeded,
        "one latency sample per confirmed record: {latency}"
    );
    assert!(value(&families, "cfq_pull_duration_seconds_count", &[]) > 0.0);
    assert!(value(&families, "cfq_ack_duration_seconds_count", &[]) > 0.0);
    assert!(
        value(
            &families,
            "cfq_sink_duration_seconds_count",
            &[("sink", "nats")]
        ) > 0.0
    );
}

/// The README's metrics table, row by row: name, type, labels.
fn readme_table() -> BTreeMap<String, (String, String)> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    readme
        .lines()
        .filter(|line| line.starts_with("| `cfq_"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            (
                cells[1].trim_matches('`').to_string(),
                (cells[2].to_string(), cells[3].to_string()),
            )
        })
        .collect()
}

#[test]
fn the_readme_table_lists_every_family_as_exported() {
    let table = readme_table();
    let expected: BTreeMap<String, (String, String)> = FAMILIES
        .iter()
        .map(|f| {
            let labels = if f.labels.is_empty() {
                "route, queue_id".to_string()
            } else {
                format!("route, queue_id, {}", f.labels)
            };
            (f.name.to_string(), (f.kind.as_str().to_string(), labels))
        })
        .collect();
    assert_eq!(
        table, expected,
        "README.md's metrics table and cfq_bridge::metrics::FAMILIES"
    );
}
