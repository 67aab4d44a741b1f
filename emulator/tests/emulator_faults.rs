//! Black-box tests of fault injection, scripted responses, request recording and the
//! admin API (including its loopback-only rule).

mod emulator_support;

use std::time::{Duration, Instant};

use cfq_emulator::{
    admin_peer_allowed, EmulatorConfig, Endpoint, Faults, ScriptedResponse, SeedSpec,
};
use clap::Parser as _;
use emulator_support::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn pull_url(h: &Harness, queue: &str) -> String {
    format!("{}/messages/pull", h.queue_url(queue))
}

#[tokio::test]
async fn fault_500_answers_an_error_envelope_on_selected_endpoints() {
    let h = Harness::default().await;
    h.emulator.set_faults(Faults {
        error_500_rate: 1.0,
        endpoints: vec![Endpoint::Ack],
        ..Faults::default()
    });
    h.publish_text("q", "x").await;
    let l = leases(&h.pull("q", json!({})).await);
    let answer = h
        .post("q", "/messages/ack", &json!({"acks": [{"lease_id": l[0]}]}))
        .await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    answer.error();
    assert_eq!(
        h.emulator.stats(ACCOUNT, "q").acked,
        0,
        "a plain 500 is not applied"
    );

    h.emulator.set_faults(Faults::default());
    assert_eq!(h.ack("q", &[&l[0]], &[]).await["ackCount"], 1);
}

#[tokio::test]
async fn fault_429_carries_retry_after() {
    let h = Harness::start(EmulatorConfig {
        faults: Faults {
            rate_limit_429_rate: 1.0,
            retry_after_secs: 7,
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let answer = h.send(Method::POST, &pull_url(&h, "q"), Some("{}")).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.headers["retry-after"], "7");
    answer.error();
}

#[tokio::test]
async fn applied_then_500_takes_effect_but_answers_an_error() {
    let h = Harness::default().await;
    h.publish_text("q", "x").await;
    let l = leases(&h.pull("q", json!({})).await);
    h.emulator.set_faults(Faults {
        applied_then_500_rate: 1.0,
        ..Faults::default()
    });
    let answer = h
        .post("q", "/messages/ack", &json!({"acks": [{"lease_id": l[0]}]}))
        .await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    answer.error();
    let publish = h.post("q", "/messages", &json!({"body": 1})).await;
    assert_eq!(publish.status, StatusCode::INTERNAL_SERVER_ERROR);
    let stats = h.emulator.stats(ACCOUNT, "q");
    assert_eq!((stats.acked, stats.published, stats.backlog), (1, 2, 1));
}

#[tokio::test]
async fn latency_with_jitter_delays_answers() {
    let h = Harness::default().await;
    h.emulator.set_faults(Faults {
        latency_ms: 150,
        jitter_ms: 50,
        ..Faults::default()
    });
    let started = Instant::now();
    h.pull("q", json!({})).await;
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "the answer came after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn html_502_and_empty_520_look_like_an_edge_failure() {
    let h = Harness::default().await;
    h.emulator.set_faults(Faults {
        html_502_rate: 1.0,
        ..Faults::default()
    });
    let answer = h.send(Method::POST, &pull_url(&h, "q"), Some("{}")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(answer.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(String::from_utf8_lossy(&answer.raw).contains("<html>"));
    assert_eq!(answer.json, Value::Null);

    h.emulator.set_faults(Faults {
        empty_520_rate: 1.0,
        ..Faults::default()
    });
    let answer = h.send(Method::POST, &pull_url(&h, "q"), Some("{}")).await;
    assert_eq!(answer.status.as_u16(), 520);
    assert!(answer.raw.is_empty());
}

#[tokio::test]
async fn a_paused_queue_answers_409_to_pulls_only() {
    let h = Harness::default().await;
    h.emulator.set_faults(Faults {
        paused_queues: vec!["paused".into()],
        ..Faults::default()
    });
    h.publish_text("paused", "still accepted").await;
    let answer = h
        .send(Method::POST, &pull_url(&h, "paused"), Some("{}"))
        .await;
    assert_eq!(answer.status, StatusCode::CONFLICT);
    assert!(answer.error().1.contains("queue_delivery_paused"));
    let details = h.send(Method::GET, &h.queue_url("paused"), None).await;
    assert_eq!(details.result()["settings"]["delivery_paused"], true);
    // Other queues are unaffected.
    h.pull("other", json!({})).await;

    h.emulator.set_faults(Faults {
        paused: true,
        ..Faults::default()
    });
    let answer = h
        .send(Method::POST, &pull_url(&h, "other"), Some("{}"))
        .await;
    assert_eq!(answer.status, StatusCode::CONFLICT);
}

/// A command whose options are exactly the emulator's, as `cfq-bridge emulator` and
/// `cfq-emulator` embed them.
#[derive(clap::Parser)]
struct EmulatorCommand {
    #[command(flatten)]
    args: cfq_emulator::EmulatorArgs,
}

#[tokio::test]
async fn faults_are_flags_of_the_emulator_command() {
    let args = EmulatorCommand::try_parse_from([
        "cfq-emulator",
        "--port",
        "0",
        "--fault-500-rate",
        "0.25",
        "--fault-429-rate",
        "0.1",
        "--fault-retry-after-secs",
        "3",
        "--fault-applied-then-500-rate",
        "0.05",
        "--fault-html-502-rate",
        "0.01",
        "--fault-empty-520-rate",
        "0.02",
        "--fault-latency-ms",
        "40",
        "--fault-jitter-ms",
        "10",
        "--fault-paused-queue",
        "q1",
        "--fault-endpoint",
        "pull",
        "--max-retries",
        "5",
        "--dead-letter-queue",
        "dlq",
    ])
    .expect("the flags parse")
    .args;
    assert_eq!(
        args.faults,
        Faults {
            error_500_rate: 0.25,
            rate_limit_429_rate: 0.1,
            retry_after_secs: 3,
            applied_then_500_rate: 0.05,
            html_502_rate: 0.01,
            empty_520_rate: 0.02,
            latency_ms: 40,
            jitter_ms: 10,
            paused: false,
            paused_queues: vec!["q1".into()],
            endpoints: vec![Endpoint::Pull],
        }
    );
    assert_eq!(args.max_retries, 5);
    assert!(EmulatorCommand::try_parse_from(["cfq-emulator", "--fault-500-rate", "1.5"]).is_err());
    assert!(EmulatorCommand::try_parse_from(["cfq-emulator", "--max-retries", "101"]).is_err());
}

#[tokio::test]
async fn scripted_responses_answer_the_next_requests_verbatim() {
    let h = Harness::default().await;
    h.publish_text("q", "x").await;
    h.emulator.script(
        Endpoint::Pull,
        vec![
            ScriptedResponse::raw(200, Some("application/json"), b"{\"success\":tru".to_vec()),
            ScriptedResponse::json(503, "{}").with_header("Retry-After", "bogus"),
        ],
    );
    let first = h.send(Method::POST, &pull_url(&h, "q"), Some("{}")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.raw, b"{\"success\":tru");
    let second = h.send(Method::POST, &pull_url(&h, "q"), Some("{}")).await;
    assert_eq!(second.status.as_u16(), 503);
    assert_eq!(second.headers["retry-after"], "bogus");
    // Not applied: the message was never leased; the next pull is real.
    assert_eq!(h.emulator.stats(ACCOUNT, "q").delivered, 0);
    assert_eq!(h.pull("q", json!({})).await["messages"][0]["body"], "x");
}

#[tokio::test]
async fn a_scripted_response_can_apply_the_request_first() {
    let h = Harness::default().await;
    h.publish_text("q", "x").await;
    let l = leases(&h.pull("q", json!({})).await);
    h.emulator.script(
        Endpoint::Ack,
        vec![ScriptedResponse::raw(500, None, Vec::new()).applied()],
    );
    let answer = h
        .post("q", "/messages/ack", &json!({"acks": [{"lease_id": l[0]}]}))
        .await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(answer.raw.is_empty());
    assert_eq!(h.emulator.stats(ACCOUNT, "q").acked, 1);
}

#[tokio::test]
async fn a_dripping_response_sends_its_body_slowly() {
    let h = Harness::default().await;
    let body = r#"{"success":true,"errors":[],"messages":[],"result":{}}"#;
    h.emulator.script(
        Endpoint::Pull,
        vec![ScriptedResponse::json(200, body).dripped(Duration::from_millis(20))],
    );
    let started = Instant::now();
    let answer = h.send(Method::POST, &pull_url(&h, "q"), Some("{}")).await;
    assert_eq!(answer.raw, body.as_bytes());
    // 55 bytes in chunks of 4: 13 pauses of 20 ms at least.
    assert!(
        started.elapsed() >= Duration::from_millis(13 * 20),
        "{:?}",
        started.elapsed()
    );

    // A client with a short timeout gives up on it.
    h.emulator.script(
        Endpoint::Pull,
        vec![ScriptedResponse::json(200, body).dripped(Duration::from_millis(200))],
    );
    let result = h
        .http
        .post(pull_url(&h, "q"))
        .bearer_auth(TOKEN)
        .body("{}")
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    let timed_out = match result {
        Err(error) => error.is_timeout(),
        Ok(response) => response.bytes().await.is_err(),
    };
    assert!(timed_out, "the client should time out while the body drips");
}

#[tokio::test]
async fn requests_are_recorded_without_credentials() {
    let h = Harness::start(EmulatorConfig {
        record_requests: true,
        ..EmulatorConfig::default()
    })
    .await;
    h.pull("q", json!({"batch_size": 3, "visibility_timeout_ms": 1000}))
        .await;
    let recorded = h.emulator.recorded_requests();
    assert_eq!(recorded.len(), 1);
    let request = &recorded[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.endpoint, Some(Endpoint::Pull));
    assert!(request.path.ends_with("/queues/q/messages/pull"));
    assert_eq!(
        request.body,
        Some(json!({"batch_size": 3, "visibility_timeout_ms": 1000}))
    );
    assert!(request
        .headers
        .iter()
        .all(|(name, _)| name != "authorization"));
    assert!(request
        .headers
        .iter()
        .any(|(name, _)| name == "content-type"));
    let (_, over_http) = h.admin_get("requests").await;
    assert_eq!(over_http[0]["endpoint"], "pull");
}

#[tokio::test]
async fn the_admin_api_seeds_publishes_reports_and_resets() {
    let h = Harness::default().await;
    let (status, health) = h.admin_get("health").await;
    assert_eq!((status, health), (StatusCode::OK, json!({"ok": true})));

    let (status, seeded) = h
        .admin_send(
            Method::POST,
            "seed",
            &json!({"account_id": ACCOUNT, "queue_id": "q", "count": 3, "body_size": 20, "content_type": "bytes", "return_ids": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{seeded}");
    assert_eq!(seeded["seeded"], 3);
    let (_, raw) = h
        .admin_send(
            Method::POST,
            "publish_raw",
            &json!({"account_id": ACCOUNT, "queue_id": "q", "body": "!!", "metadata": {"CF-Content-Type": "json"}}),
        )
        .await;
    let pulled = h.pull("q", json!({"batch_size": 10})).await;
    let mut expected: Vec<Value> = seeded["ids"].as_array().unwrap().clone();
    expected.push(raw["id"].clone());
    assert_eq!(json!(ids(&pulled)), json!(expected));
    assert_eq!(pulled["messages"][3]["body"], "!!");

    let l = leases(&pulled);
    h.ack("q", &[&l[0]], &[]).await;
    let (_, stats) = h.admin_get(&format!("stats/{ACCOUNT}/q")).await;
    assert_eq!(stats["published"], 4);
    assert_eq!(stats["delivered"], 4);
    assert_eq!(stats["acked"], 1);
    assert_eq!(stats["never_acked_ids"].as_array().unwrap().len(), 3);
    let (_, all) = h.admin_get("stats").await;
    assert_eq!(all["queues"][0]["queue_id"], "q");

    let (status, _) = h
        .admin_send(
            Method::POST,
            "seed",
            &json!({"account_id": ACCOUNT, "queue_id": "q", "count": 1, "content_type": "xml"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, _) = h.admin_send(Method::POST, "reset", &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, stats) = h.admin_get(&format!("stats/{ACCOUNT}/q")).await;
    assert_eq!(stats["published"], 0);

    let (status, _) = h.admin_get("nothing-here").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_admin_api_changes_faults_and_scripts_at_run_time() {
    let h = Harness::default().await;
    let (status, faults) = h
        .admin_send(
            Method::PUT,
            "faults",
            &json!({"error_500_rate": 1.0, "endpoints": ["pull"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        faults["retry_after_secs"], 1,
        "missing fields take defaults"
    );
    assert_eq!(h.emulator.faults().error_500_rate, 1.0);
    let answer = h.send(Method::POST, &pull_url(&h, "q"), Some("{}")).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);

    let (status, _) = h
        .admin_send(Method::PUT, "faults", &json!({"html_502_rate": 2.0}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = h
        .admin_send(Method::PUT, "faults", &json!({"unknown_knob": 1}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, current) = h.admin_get("faults").await;
    assert_eq!(
        current["error_500_rate"], 1.0,
        "rejected changes leave faults alone"
    );

    h.admin_send(Method::PUT, "faults", &json!({})).await;
    let (status, queued) = h
        .admin_send(
            Method::POST,
            "script",
            &json!({"endpoint": "pull", "responses": [{"status": 200, "content_type": "text/plain", "body_base64": "aGk="}]}),
        )
        .await;
    assert_eq!((status, queued), (StatusCode::OK, json!({"queued": 1})));
    let answer = h.send(Method::POST, &pull_url(&h, "q"), Some("{}")).await;
    assert_eq!(answer.raw, b"hi");
    assert_eq!(answer.headers["content-type"], "text/plain");
}

#[test]
fn the_admin_api_only_answers_loopback_peers() {
    for allowed in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
        assert!(admin_peer_allowed(allowed.parse().unwrap()), "{allowed}");
    }
    for refused in [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.0.10",
        "8.8.8.8",
        "::ffff:10.0.0.1",
        "fe80::1",
    ] {
        assert!(!admin_peer_allowed(refused.parse().unwrap()), "{refused}");
    }
}

#[tokio::test]
async fn seeding_a_large_queue_keeps_counts_right() {
    // Not a timing assertion: seeds a large queue and checks the counts add up.
    let h = Harness::default().await;
    let ids = h.emulator.seed(
        ACCOUNT,
        "big",
        &SeedSpec {
            count: 50_000,
            body_size: 200,
            content_type: cfq_emulator::ContentType::Json,
        },
    );
    assert_eq!(ids.len(), 50_000);
    let stats = h.emulator.stats(ACCOUNT, "big");
    assert_eq!((stats.backlog, stats.backlog_bytes), (50_000, 50_000 * 200));
}
