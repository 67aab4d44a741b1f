//! Black-box tests of the emulator's delivery semantics: lease expiry, retries with delay,
//! late acks, unknown leases, max_retries with drop or dead-letter queue, reset.
//!
//! Tests that wait for a lease or a delay to end run under a paused tokio clock
//! (`start_paused`): the emulator measures leases on tokio's clock, so a sleep moves them
//! forward at once and without flakiness. Those tests call the emulator in process
//! ([`cfq_emulator::Emulator::request`], through `Harness::in_process`), because an HTTP
//! round trip lets a paused clock jump ahead while the request is on the wire. One test
//! runs the lease expiry over real HTTP on the wall clock, to keep that path covered.

mod emulator_support;

use std::time::Duration;

use cfq_emulator::{EmulatorConfig, SeedSpec};
use emulator_support::*;
use serde_json::json;

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_redelivers_with_attempts_plus_one() {
    let h = Harness::in_process(EmulatorConfig::default()).await;
    expired_lease_redelivers(&h).await;
}

#[tokio::test]
async fn an_expired_lease_redelivers_over_http_on_the_wall_clock() {
    let h = Harness::default().await;
    expired_lease_redelivers(&h).await;
}

/// Pulls one message with a 600 ms lease, checks it is not delivered again meanwhile,
/// waits 800 ms, and checks it comes back with its attempts counted.
async fn expired_lease_redelivers(h: &Harness) {
    let seeded = h.emulator.seed(
        ACCOUNT,
        "q",
        &SeedSpec {
            count: 1,
            ..SeedSpec::default()
        },
    );
    let first = h.pull("q", json!({"visibility_timeout_ms": 600})).await;
    assert_eq!(ids(&first), seeded);
    assert_eq!(first["messages"][0]["attempts"], 1);

    // Still leased: not delivered again.
    let during = h.pull("q", json!({})).await;
    assert_eq!(during["messages"], json!([]));
    assert_eq!(during["message_backlog_count"], 1);

    sleep_ms(800).await;
    let second = h.pull("q", json!({"visibility_timeout_ms": 200})).await;
    assert_eq!(ids(&second), seeded, "the same message id comes back");
    assert_eq!(second["messages"][0]["attempts"], 2);
    assert_ne!(
        leases(&first),
        leases(&second),
        "each delivery has its own lease"
    );
    let stats = h.emulator.stats(ACCOUNT, "q");
    assert_eq!(
        (stats.delivered, stats.redelivered, stats.expired),
        (2, 1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_puts_the_message_back_after_its_delay() {
    let h = Harness::in_process(EmulatorConfig::default()).await;
    h.publish_text("q", "now").await;
    h.publish_text("q", "later").await;
    let first = h.pull("q", json!({"batch_size": 10})).await;
    let l = leases(&first);
    let answer = h.ack("q", &[], &[(&l[0], 0.0), (&l[1], 1.0)]).await;
    assert_eq!(answer["retryCount"], 2);
    assert_eq!(answer["ackCount"], 0);

    // Delay 0: available at once, with attempts + 1. The delayed one is not.
    let again = h.pull("q", json!({"batch_size": 10})).await;
    assert_eq!(again["messages"].as_array().unwrap().len(), 1);
    assert_eq!(again["messages"][0]["body"], "now");
    assert_eq!(again["messages"][0]["attempts"], 2);
    assert_eq!(h.emulator.stats(ACCOUNT, "q").delayed, 1);

    sleep_ms(1300).await;
    let delayed = h.pull("q", json!({"batch_size": 10})).await;
    assert_eq!(delayed["messages"][0]["body"], "later");
    assert_eq!(delayed["messages"][0]["attempts"], 2);
    assert_eq!(h.emulator.stats(ACCOUNT, "q").retried, 2);
}

#[tokio::test(start_paused = true)]
async fn a_publish_delay_holds_the_message_back() {
    let h = Harness::in_process(EmulatorConfig::default()).await;
    h.post(
        "q",
        "/messages/batch",
        &json!({"messages": [{"body": "a", "content_type": "text"}], "delay_seconds": 1.0}),
    )
    .await
    .result();
    let early = h.pull("q", json!({})).await;
    assert_eq!(early["messages"], json!([]));
    assert_eq!(early["message_backlog_count"], 1);
    sleep_ms(1300).await;
    let late = h.pull("q", json!({})).await;
    assert_eq!(late["messages"][0]["body"], "a");
    assert_eq!(late["messages"][0]["attempts"], 1);
}

#[tokio::test(start_paused = true)]
async fn a_late_ack_is_accepted_even_after_redelivery() {
    let h = Harness::in_process(EmulatorConfig::default()).await;
    h.publish_text("q", "x").await;
    let first = h.pull("q", json!({"visibility_timeout_ms": 100})).await;
    sleep_ms(250).await;
    let second = h.pull("q", json!({"visibility_timeout_ms": 60_000})).await;
    assert_eq!(second["messages"][0]["attempts"], 2);

    let old = leases(&first);
    let answer = h.ack("q", &[&old[0]], &[]).await;
    assert_eq!(answer["ackCount"], 1);
    assert_eq!(answer["warnings"], json!({}));
    let stats = h.emulator.stats(ACCOUNT, "q");
    assert_eq!((stats.acked, stats.late_acks, stats.backlog), (1, 1, 0));

    // The newer lease's ack finds the message gone and is still counted.
    let new = leases(&second);
    let answer = h.ack("q", &[&new[0]], &[]).await;
    assert_eq!(answer["ackCount"], 1);
    assert_eq!(h.emulator.stats(ACCOUNT, "q").repeated_acks, 1);
    assert!(h.emulator.stats(ACCOUNT, "q").never_acked_ids.is_empty());
}

#[tokio::test(start_paused = true)]
async fn unknown_and_stale_leases_give_warnings_not_errors() {
    let h = Harness::in_process(EmulatorConfig::default()).await;
    h.publish_text("q", "x").await;
    let first = h.pull("q", json!({"visibility_timeout_ms": 100})).await;
    let answer = h
        .ack("q", &["not-a-lease", "0123"], &[("also-unknown", 0.0)])
        .await;
    assert_eq!(answer["ackCount"], 0);
    assert_eq!(answer["retryCount"], 0);
    let warnings = answer["warnings"].as_object().unwrap();
    assert_eq!(warnings.len(), 3);
    assert!(warnings["not-a-lease"]
        .as_str()
        .unwrap()
        .contains("unknown"));

    // A retry with an expired lease is ignored with a warning.
    sleep_ms(250).await;
    let old = leases(&first);
    let answer = h.ack("q", &[], &[(&old[0], 0.0)]).await;
    assert_eq!(answer["retryCount"], 0);
    assert!(answer["warnings"][&old[0]].is_string());

    // A lease of another queue is unknown here.
    h.publish_text("other", "y").await;
    let other = leases(&h.pull("other", json!({})).await);
    let answer = h.ack("q", &[&other[0]], &[]).await;
    assert_eq!(answer["ackCount"], 0);
    assert!(answer["warnings"][&other[0]].is_string());
    assert_eq!(h.emulator.stats(ACCOUNT, "other").backlog, 1);
}

#[tokio::test]
async fn max_retries_then_the_message_is_dropped() {
    let h = Harness::start(EmulatorConfig {
        max_retries: 2,
        ..EmulatorConfig::default()
    })
    .await;
    let seeded = h.emulator.seed(
        ACCOUNT,
        "q",
        &SeedSpec {
            count: 1,
            ..SeedSpec::default()
        },
    );
    for attempt in 1..=2 {
        let result = h.pull("q", json!({})).await;
        assert_eq!(result["messages"][0]["attempts"], attempt);
        let l = leases(&result);
        assert_eq!(h.ack("q", &[], &[(&l[0], 0.0)]).await["retryCount"], 1);
    }
    let result = h.pull("q", json!({})).await;
    assert_eq!(
        result["messages"],
        json!([]),
        "delivered max_retries times, then dropped"
    );
    assert_eq!(result["message_backlog_count"], 0);
    let stats = h.emulator.stats(ACCOUNT, "q");
    assert_eq!(
        (stats.dropped, stats.dead_lettered, stats.delivered),
        (1, 0, 2)
    );
    assert_eq!(stats.never_acked_ids, seeded);
}

#[tokio::test(start_paused = true)]
async fn max_retries_then_the_message_moves_to_the_dead_letter_queue() {
    let h = Harness::in_process(EmulatorConfig {
        max_retries: 1,
        dead_letter_queue: Some("dlq".into()),
        ..EmulatorConfig::default()
    })
    .await;
    h.publish_text("q", "poison").await;
    h.publish_text("q", "expires").await;
    let result = h
        .pull("q", json!({"batch_size": 2, "visibility_timeout_ms": 100}))
        .await;
    let l = leases(&result);
    let original_ids = ids(&result);
    // One fails by retry, the other by lease expiry (the background sweeper moves it
    // without anyone pulling from `q`).
    h.ack("q", &[], &[(&l[0], 0.0)]).await;
    sleep_ms(300).await;
    let dlq_stats = h.emulator.stats(ACCOUNT, "dlq");
    assert_eq!(dlq_stats.published, 2);
    let stats = h.emulator.stats(ACCOUNT, "q");
    assert_eq!((stats.dead_lettered, stats.backlog), (2, 0));
    assert_eq!(stats.never_acked_ids, original_ids);

    let dead = h.pull("dlq", json!({"batch_size": 10})).await;
    assert_eq!(
        ids(&dead),
        original_ids,
        "same ids in the dead-letter queue"
    );
    assert_eq!(dead["messages"][0]["body"], "poison");
    assert_eq!(dead["messages"][0]["attempts"], 1);

    // The dead-letter queue does not dead-letter into itself: its failures are dropped.
    let l = leases(&dead);
    h.ack("dlq", &[], &[(&l[0], 0.0)]).await;
    let dlq_stats = h.emulator.stats(ACCOUNT, "dlq");
    assert_eq!((dlq_stats.dropped, dlq_stats.dead_lettered), (1, 0));
}

#[tokio::test]
async fn reset_forgets_queues_and_leases() {
    let h = Harness::default().await;
    h.publish_text("q", "x").await;
    let l = leases(&h.pull("q", json!({})).await);
    h.emulator.reset();
    assert_eq!(h.emulator.stats(ACCOUNT, "q").published, 0);
    h.publish_text("q", "y").await;
    let answer = h.ack("q", &[&l[0]], &[]).await;
    assert_eq!(
        answer["ackCount"], 0,
        "a lease from before the reset is unknown"
    );
    assert_eq!(h.emulator.stats(ACCOUNT, "q").backlog, 1);
}

#[tokio::test]
async fn concurrent_pullers_never_share_a_message() {
    let h = std::sync::Arc::new(Harness::default().await);
    let seeded = h.emulator.seed(
        ACCOUNT,
        "q",
        &SeedSpec {
            count: 2_000,
            ..SeedSpec::default()
        },
    );
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let h = std::sync::Arc::clone(&h);
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let result = h.pull("q", json!({"batch_size": 100})).await;
                let batch = ids(&result);
                if batch.is_empty() {
                    break got;
                }
                let l = leases(&result);
                let refs: Vec<&str> = l.iter().map(String::as_str).collect();
                assert_eq!(h.ack("q", &refs, &[]).await["ackCount"], batch.len());
                got.extend(batch);
            }
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    let mut expected = seeded;
    expected.sort();
    assert_eq!(all, expected, "each message delivered exactly once");
    let stats = h.emulator.stats(ACCOUNT, "q");
    assert_eq!(
        (stats.acked, stats.backlog, stats.redelivered),
        (2_000, 0, 0)
    );
}
