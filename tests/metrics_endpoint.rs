//! The Prometheus endpoint, read as Prometheus reads it: `cfq-bridge run` with
//! `[metrics] listen` against the emulator, `/metrics` parsed by the Prometheus project's
//! Python parser (`prometheus-client`, pinned in `tests/python/requirements.txt`). Every
//! counter of [`Stats`] must be a family of type `counter` whose `# HELP` is its doc
//! text, with one sample and a value; and every counter must be in the README's table.
//!
//! Needs `python3` with `pip install -r tests/python/requirements.txt` (`.ci/test` does
//! it). Without them this test fails and says so.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cfq_bridge::stats::Stats;
use cfq_emulator::ContentType;
use cfq_emulator::SeedSpec;
use common::*;
use serde_json::Value;

/// One metric family as the parser saw it.
#[derive(Debug)]
struct Family {
    kind: String,
    help: String,
    samples: Vec<(String, f64)>,
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
                .map(|s| {
                    (
                        s["name"].as_str().expect("sample name").to_string(),
                        s["value"].as_f64().expect("sample value"),
                    )
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_counter_has_its_help_type_and_value() {
    let emulator = start_emulator().await;
    let queue = queue_name("metrics");
    let seeded = 40;
    emulator.seed(
        ACCOUNT,
        &queue,
        &SeedSpec {
            count: seeded,
            body_size: 32,
            content_type: ContentType::Json,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let port = reserve_port();
    let sink = format!(
        "{}\n{}",
        jsonl_sink(&dir.path().join("out.jsonl")),
        metrics_table(port)
    );
    let config = write_config(dir.path(), &config_text(&emulator, &queue, "", &sink));
    let mut bridge = Running::spawn(
        &["run", "--config", config.to_str().unwrap()],
        &dir.path().join("bridge.log"),
        Some(port),
    );
    // Some counters move (pulls, acks), the rest stay at 0: both kinds must be listed.
    bridge
        .wait_counter("acked", seeded as u64, Duration::from_secs(30))
        .await;
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("scrape /metrics")
        .text()
        .await
        .expect("the /metrics body");
    bridge.stop().await;

    let families = parse_exposition(&text);
    let mut expected = BTreeSet::new();
    for counter in Stats::descriptions() {
        // The parser names a counter family without its `_total` suffix.
        let name = counter
            .metric
            .strip_suffix("_total")
            .expect("counter names end in _total");
        expected.insert(name.to_string());
        let family = families
            .get(name)
            .unwrap_or_else(|| panic!("{} is not exported:\n{text}", counter.metric));
        assert_eq!(family.kind, "counter", "# TYPE of {}", counter.metric);
        assert_eq!(family.help, counter.help, "# HELP of {}", counter.metric);
        assert_eq!(
            family.samples.len(),
            1,
            "{}: one sample: {family:?}",
            counter.metric
        );
        let (sample, value) = &family.samples[0];
        assert_eq!(sample, counter.metric);
        assert!(value.is_finite() && *value >= 0.0, "{sample} = {value}");
    }
    let listed: BTreeSet<String> = families.keys().cloned().collect();
    assert_eq!(
        listed, expected,
        "families in /metrics and counters of Stats"
    );
    // The values are the bridge's, not placeholders.
    let value = |name: &str| families[name].samples[0].1;
    assert_eq!(value("cfq_bridge_acked"), seeded as f64);
    assert_eq!(value("cfq_bridge_pulled"), seeded as f64);
    assert_eq!(value("cfq_bridge_decode_errors"), 0.0);
}

#[test]
fn every_counter_is_in_the_readme() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let table: BTreeSet<&str> = readme
        .lines()
        .filter_map(|line| line.strip_prefix("| `cfq_bridge_"))
        .filter_map(|rest| rest.split_once("_total`"))
        .map(|(name, _)| name)
        .collect();
    let missing: Vec<&str> = Stats::descriptions()
        .iter()
        .map(|c| {
            c.metric
                .strip_prefix("cfq_bridge_")
                .and_then(|m| m.strip_suffix("_total"))
                .expect("cfq_bridge_<name>_total")
        })
        .filter(|name| !table.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "counters missing from README.md's metrics table: {missing:?}"
    );
}
