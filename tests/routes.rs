//! Several routes in one process (`[[routes]]`): each has its own in-flight bound, sink
//! health and counters (the `route` label). Two routes side by side, one into a JSONL file
//! and one into NATS on a private server: cutting NATS stalls only its own route, while
//! the other keeps moving; restoring it lets the stalled route finish. Nothing is lost.

// Without the `nats` feature only the tests that need no NATS sink remain (the two-route test needs the nats sink).
#![cfg_attr(not(feature = "nats"), allow(dead_code, unused_imports))]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use cfq_bridge::config::{Config, ConfigError};
use cfq_emulator::{ContentType, Emulator};
use common::nats_server::NatsServer;
use common::*;

/// `cfq_messages_acked_total` of one route, from a scrape.
fn acked(scraped: &HashMap<String, f64>, route: &str) -> u64 {
    scraped
        .iter()
        .filter(|(k, _)| {
            k.starts_with("cfq_messages_acked_total{") && k.contains(&format!("route=\"{route}\""))
        })
        .map(|(_, v)| *v)
        .sum::<f64>() as u64
}

fn queue_table(emulator: &Emulator, queue: &str) -> String {
    format!(
        "account_id = \"{ACCOUNT}\"\nqueue_id = \"{queue}\"\napi_base_url = \"{}\"\n\
         empty_backoff_max_ms = 200\nbatch_size = 50\n",
        emulator.base_url()
    )
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_sink_stalls_only_its_own_route() {
    let mut nats = NatsServer::start();
    let emulator = start_emulator().await;
    let (q_file, q_nats) = (queue_name("routefile"), queue_name("routenats"));
    let mut file_ids = seed_ids(&emulator, &q_file, 200, 32, ContentType::Json);
    let mut nats_ids = seed_ids(&emulator, &q_nats, 200, 32, ContentType::Json);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("file.jsonl");
    let port = reserve_port();
    let text = format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[routes]]\nname = \"to-file\"\n[routes.queue]\n{}[routes.sink]\n{}\n\n\
         [[routes]]\nname = \"to-nats\"\n[routes.queue]\n{}[routes.sink]\n\
         type = \"nats\"\nurl = \"{}\"\nsubject = \"routes.{{queue_id}}\"\npublish_timeout_ms = 1000\n\
         [routes.sink.create_stream]\nname = \"ROUTES\"\nduplicate_window_secs = 600\n",
        queue_table(&emulator, &q_file),
        jsonl_sink(&out),
        queue_table(&emulator, &q_nats),
        nats.url(),
    );
    let config = write_config(dir.path(), &text);
    let mut bridge = Running::spawn(
        &["run", "--config", config.to_str().unwrap()],
        &dir.path().join("bridge.log"),
        Some(port),
    );
    wait_until("both routes move", Duration::from_secs(60), async || {
        let s = scrape(port).await;
        acked(&s, "to-file") >= 200 && acked(&s, "to-nats") >= 200
    })
    .await;

    // Cut NATS, then give both queues more work.
    nats.stop();
    file_ids.extend(seed_ids(&emulator, &q_file, 300, 32, ContentType::Json));
    nats_ids.extend(seed_ids(&emulator, &q_nats, 300, 32, ContentType::Json));
    wait_until(
        "the file route finishes while NATS is down",
        Duration::from_secs(60),
        async || acked(&scrape(port).await, "to-file") >= 500,
    )
    .await;
    bridge.assert_running("while NATS is down");
    let stalled = acked(&scrape(port).await, "to-nats");
    assert!(
        stalled < 500,
        "the NATS route cannot ack while NATS is down: {stalled}"
    );
    assert!(
        emulator.stats(ACCOUNT, &q_nats).backlog > 0,
        "the NATS route's messages wait in their queue"
    );

    nats.restart();
    wait_until(
        "the NATS route finishes after the restart",
        Duration::from_secs(90),
        async || acked(&scrape(port).await, "to-nats") >= 500,
    )
    .await;
    bridge.stop().await;
    assert_eq!(
        archive_ids(&out),
        file_ids,
        "every file-route message in the file"
    );
    assert_eq!(emulator.stats(ACCOUNT, &q_file).backlog, 0);
    assert_eq!(emulator.stats(ACCOUNT, &q_nats).backlog, 0);
    assert_eq!(nats_ids.len(), 500);
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, |_| None)
}

const SINK: &str = "[routes.sink]\ntype = \"stdout\"\n";

#[test]
fn route_errors_name_the_route() {
    let queue = "[routes.queue]\naccount_id = \"a\"\nqueue_id = \"q\"\n";
    let bad_batch = format!("[[routes]]\nname = \"orders\"\n{queue}batch_size = 0\n{SINK}");
    let error = parse(&bad_batch).unwrap_err().to_string();
    assert!(
        error.contains("route `orders`") && error.contains("batch_size"),
        "{error}"
    );

    let twice =
        format!("[[routes]]\nname = \"a\"\n{queue}{SINK}\n[[routes]]\nname = \"a\"\n{queue}{SINK}");
    let error = parse(&twice).unwrap_err().to_string();
    assert!(error.contains("two routes are named `a`"), "{error}");

    let no_source = format!("[[routes]]\nname = \"empty\"\n{SINK}");
    let error = parse(&no_source).unwrap_err().to_string();
    assert!(
        error.contains("route `empty`") && error.contains("needs a source"),
        "{error}"
    );

    let mixed = format!(
        "[queue]\naccount_id = \"a\"\nqueue_id = \"q\"\n\n[[routes]]\nname = \"x\"\n{queue}{SINK}"
    );
    let error = parse(&mixed).unwrap_err().to_string();
    assert!(error.contains("[[routes]] and also a top-level"), "{error}");

    let bad_name = format!("[[routes]]\nname = \"a b\"\n{queue}{SINK}");
    assert!(parse(&bad_name)
        .unwrap_err()
        .to_string()
        .contains("route name"));

    let two =
        format!("[[routes]]\nname = \"a\"\n{queue}{SINK}\n[[routes]]\nname = \"b\"\n{queue}{SINK}");
    let config = parse(&two).expect("two valid routes");
    let names: Vec<&str> = config.routes().unwrap().iter().map(|r| r.name).collect();
    assert_eq!(names, ["a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_takes_one_route_at_a_time() {
    let emulator = start_emulator().await;
    let (q_a, q_b) = (queue_name("exporta"), queue_name("exportb"));
    seed_ids(&emulator, &q_a, 50, 32, ContentType::Json);
    let ids_b = seed_ids(&emulator, &q_b, 80, 32, ContentType::Json);
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[[routes]]\nname = \"a\"\n[routes.queue]\n{}[routes.sink]\n{}\n\n\
         [[routes]]\nname = \"b\"\n[routes.queue]\n{}[routes.sink]\n{}\n",
        queue_table(&emulator, &q_a),
        jsonl_sink(&dir.path().join("a.jsonl")),
        queue_table(&emulator, &q_b),
        jsonl_sink(&dir.path().join("b.jsonl")),
    );
    let config = write_config(dir.path(), &text);
    let config = config.to_str().unwrap();

    let output = run_bridge(&["export", "--config", config], Duration::from_secs(30)).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("--route") && stderr.contains("a, b"),
        "{stderr}"
    );

    let output = run_bridge(
        &["export", "--config", config, "--route", "b"],
        Duration::from_secs(60),
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(archive_ids(&dir.path().join("b.jsonl")), ids_b);
    assert_eq!(emulator.stats(ACCOUNT, &q_b).backlog, 0);
    assert_eq!(
        emulator.stats(ACCOUNT, &q_a).backlog,
        50,
        "route a untouched"
    );
}
