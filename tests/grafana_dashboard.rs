//! The Grafana dashboard (`deploy/grafana/cfq-bridge.json`) asks only for metrics a
//! bridge serves: every `expr` of every panel target, and every templating query, names
//! `cfq_` families, and each of those (histograms by their base name) is in the
//! `/metrics` of a real `cfq-bridge run` against the emulator, parsed with the same
//! parser `cfq-bridge top` uses (`prometheus-parse`).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use cfq_emulator::{ContentType, SeedSpec};
use common::*;
use serde_json::Value;

/// The dashboard, parsed.
fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/cfq-bridge.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// `(where, query)` for every panel target's `expr` and every templating query.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("a target of panel {title:?} has no expr: {target}"));
            out.push((format!("panel {title:?}"), expr.to_owned()));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] != "query" {
            continue;
        }
        let name = variable["name"].as_str().unwrap_or("?");
        // The query is a string in older dashboards and an object in newer ones.
        let query = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str())
            .unwrap_or_else(|| panic!("variable {name} has no query: {variable}"));
        out.push((format!("variable {name}"), query.to_owned()));
        if let Some(definition) = variable["definition"].as_str() {
            out.push((
                format!("variable {name} (definition)"),
                definition.to_owned(),
            ));
        }
    }
    out
}

/// The `cfq_` metric names in a PromQL expression, histogram series by their family
/// name (`_bucket`, `_sum` and `_count` removed).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("cfq_") {
        // Only a whole identifier: not `xcfq_...`.
        let starts_word = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if starts_word {
            names.insert(family_name(&tail[..end]).to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// A series name without its histogram suffix.
fn family_name(series: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| series.strip_suffix(suffix))
        .unwrap_or(series)
}

#[test]
fn the_dashboard_has_panels_and_each_query_names_a_bridge_metric() {
    let dashboard = dashboard();
    assert!(
        dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "schemaVersion: {}",
        dashboard["schemaVersion"]
    );
    let graphs: Vec<&Value> = panels(&dashboard)
        .into_iter()
        .filter(|p| p["type"] != "row")
        .collect();
    assert!(!graphs.is_empty(), "the dashboard has no panels");
    for panel in &graphs {
        assert!(
            panel["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "panel {} has no targets",
            panel["title"]
        );
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {} must use the datasource variable",
            panel["title"]
        );
    }
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for wanted in ["datasource", "route", "queue_id"] {
        assert!(
            variables.contains(&wanted),
            "no template variable {wanted}: {variables:?}"
        );
    }
    let queries = queries(&dashboard);
    assert!(queries.len() > graphs.len(), "too few queries: {queries:?}");
    for (place, query) in &queries {
        assert!(
            !metric_names(query).is_empty(),
            "{place}: the query names no cfq_ metric: {query}"
        );
    }
    // The extraction itself: whole identifiers, histogram suffixes removed.
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(cfq_ack_duration_seconds_bucket{a=\"b\"}[5m]))) / xcfq_no + cfq_late_acks_total"
        ),
        BTreeSet::from([
            "cfq_ack_duration_seconds".to_owned(),
            "cfq_late_acks_total".to_owned()
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_is_served_by_a_running_bridge() {
    let wanted: BTreeSet<String> = queries(&dashboard())
        .iter()
        .flat_map(|(_, query)| metric_names(query))
        .collect();
    assert!(!wanted.is_empty());

    let emulator = start_emulator().await;
    let queue = queue_name("grafana");
    let seeded = 50;
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
    let (mut bridge, port) = run_into_jsonl(&emulator, &queue, "", dir.path());
    // Messages went all the way through, so every histogram has observations.
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

    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("parse /metrics");
    let served: BTreeSet<String> = scrape
        .samples
        .iter()
        .map(|s| family_name(&s.metric).to_owned())
        .collect();
    let missing: Vec<&String> = wanted.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the bridge does not serve: {missing:?}\n\
         served: {served:?}\n--- /metrics:\n{text}"
    );
}
