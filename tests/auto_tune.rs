//! `pullers = "auto"` against the emulator: on a deep queue with 20 ms round trips the pull
//! loops grow, and once the queue is drained they drop back to one; on an idle queue, auto
//! costs a fraction of the pulls that 4 fixed pullers cost (empty pulls are billed). The
//! tuner's rules themselves, 429s included, are tested with tokio's paused clock in
//! `src/sources/cloudflare/tuner.rs`.

mod common;

use std::time::Duration;

use cfq_emulator::{ContentType, Faults};
use common::*;

fn gauge(scraped: &std::collections::HashMap<String, f64>, name: &str) -> Option<f64> {
    scraped
        .iter()
        .find(|(k, _)| k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| *v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pullers_grow_on_a_deep_queue_and_fall_back_when_it_is_drained() {
    let emulator = start_emulator().await;
    let queue = queue_name("autodeep");
    let ids = seed_ids(&emulator, &queue, 20_000, 64, ContentType::Json);
    emulator.set_faults(Faults {
        latency_ms: 20,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let (bridge, port) = run_into_jsonl(&emulator, &queue, "", dir.path());
    let most = std::cell::Cell::new(0.0f64);
    wait_until("the queue drains", Duration::from_secs(120), async || {
        let scraped = scrape(port).await;
        if let Some(p) = gauge(&scraped, "cfq_pullers") {
            most.set(most.get().max(p));
        }
        exported_counter(&scraped, "acked").unwrap_or(0) >= ids.len() as u64
    })
    .await;
    assert!(
        most.get() >= 3.0,
        "pull loops grew on the deep queue: at most {}",
        most.get()
    );
    wait_until(
        "the loops fall back to one",
        Duration::from_secs(30),
        async || gauge(&scrape(port).await, "cfq_pullers") == Some(1.0),
    )
    .await;
    bridge.stop().await;
    assert_eq!(archive_ids(&dir.path().join("out.jsonl")), ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_queue_costs_one_loop_of_pulls_not_one_per_puller() {
    let emulator = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut bridges = Vec::new();
    for (tag, extra) in [("auto", ""), ("fixed", "pullers = 4")] {
        let queue = queue_name(&format!("idle{tag}"));
        // One message, so that the queue exists; then it stays empty.
        seed_ids(&emulator, &queue, 1, 16, ContentType::Text);
        let sub = dir.path().join(tag);
        std::fs::create_dir_all(&sub).unwrap();
        let port = reserve_port();
        let sink = format!(
            "{}\n{}",
            jsonl_sink(&sub.join("out.jsonl")),
            metrics_table(port)
        );
        // `config_text` caps the empty back-off at 200 ms.
        let queue_extra = format!("{extra}\nempty_backoff_min_ms = 100");
        let config = write_config(&sub, &config_text(&emulator, &queue, &queue_extra, &sink));
        let bridge = Running::spawn(
            &["run", "--config", config.to_str().unwrap()],
            &sub.join("bridge.log"),
            Some(port),
        );
        bridges.push((tag, port, bridge));
    }
    // Both idle side by side for the same few seconds.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut pulls = Vec::new();
    for (tag, port, bridge) in bridges {
        let scraped = scrape(port).await;
        let empty = exported_counter(&scraped, "empty_pulls")
            .unwrap_or_else(|| panic!("{tag}: no empty pulls counted:\n{}", bridge.log_tail()));
        pulls.push((tag, empty));
        bridge.stop().await;
    }
    let (auto, fixed) = (pulls[0].1, pulls[1].1);
    assert!(fixed >= 20, "4 fixed loops poll all along: {pulls:?}");
    assert!(
        auto * 2 < fixed,
        "an idle queue under auto costs about a quarter of 4 fixed loops: {pulls:?}"
    );
}
