//! Black-box tests of the emulator's Cloudflare API surface: envelope, auth, routes,
//! schema conformance, pull defaults and limits, content types, publish limits, backlog.

mod emulator_support;

use base64::Engine as _;
use cfq_emulator::ContentType;
use cfq_emulator::{EmulatorConfig, SeedSpec};
use emulator_support::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};

fn b64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64 body")
}

#[tokio::test]
async fn auth_is_checked_with_code_10000() {
    let mut h = Harness::default().await;
    let url = format!("{}/messages/pull", h.queue_url("q"));

    h.token = None;
    let answer = h.send(Method::POST, &url, Some("{}")).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error().0, 10000);

    h.token = Some("wrong".into());
    let answer = h.send(Method::POST, &url, Some("{}")).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error(), (10000, "Authentication error".to_owned()));

    h.token = Some(TOKEN.into());
    h.send(Method::POST, &url, Some("{}")).await.result();

    // Legacy X-Auth-Email + X-Auth-Key is accepted with a known key.
    let response = h
        .http
        .post(&url)
        .header("x-auth-email", "dev@example.com")
        .header("x-auth-key", TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn without_configured_tokens_any_non_empty_token_is_accepted() {
    let emulator = cfq_emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .unwrap();
    let url = format!(
        "{}/accounts/{ACCOUNT}/queues/q/messages/pull",
        emulator.base_url()
    );
    let http = reqwest::Client::new();
    let ok = http
        .post(&url)
        .bearer_auth("anything")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let none = http.post(&url).body("{}").send().await.unwrap();
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    let empty = http
        .post(&url)
        .header("authorization", "Bearer ")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status(), StatusCode::UNAUTHORIZED);
    emulator.shutdown().await;
}

#[tokio::test]
async fn routes_exist_with_and_without_the_client_v4_prefix() {
    let h = Harness::default().await;
    h.publish_text("q", "one").await;
    let bare = format!(
        "http://{}/accounts/{ACCOUNT}/queues/q/messages/pull",
        h.emulator.addr()
    );
    let result = h.send(Method::POST, &bare, Some("{}")).await;
    assert_eq!(result.result()["messages"].as_array().unwrap().len(), 1);

    let unknown = h
        .send(
            Method::POST,
            &format!("{}/messages/peekaboo", h.queue_url("q")),
            Some("{}"),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.error().0, 7003);

    let wrong_method = h
        .send(
            Method::GET,
            &format!("{}/messages/pull", h.queue_url("q")),
            None,
        )
        .await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    wrong_method.error();
}

#[tokio::test]
async fn responses_match_cloudflares_schema() {
    let spec = openapi();
    let h = Harness::default().await;
    let base = "/accounts/{account_id}/queues/{queue_id}/messages";

    let push = h
        .post(
            "q",
            "/messages",
            &json!({"body": "hi", "content_type": "text"}),
        )
        .await;
    push.result();
    assert_matches_schema(&spec, base, "200", &push.json);

    let batch = h
        .post(
            "q",
            "/messages/batch",
            &json!({"messages": [{"body": {"a": 1}, "content_type": "json"}, {"body": "x", "content_type": "text"}]}),
        )
        .await;
    batch.result();
    assert_matches_schema(&spec, &format!("{base}/batch"), "200", &batch.json);

    let pull = h
        .post("q", "/messages/pull", &json!({"batch_size": 10}))
        .await;
    let leases = leases(pull.result());
    assert_eq!(leases.len(), 3);
    assert_matches_schema(&spec, &format!("{base}/pull"), "200", &pull.json);
    // The check is not vacuous: metrics without backlog_bytes do not conform.
    let mut broken = pull.json.clone();
    broken["result"]["metadata"]["metrics"]
        .as_object_mut()
        .unwrap()
        .remove("backlog_bytes");
    assert!(!schema_errors(&spec, &format!("{base}/pull"), "200", &broken).is_empty());

    let ack = h
        .post(
            "q",
            "/messages/ack",
            &json!({"acks": [{"lease_id": leases[0]}, {"lease_id": "nope"}], "retries": [{"lease_id": leases[1], "delay_seconds": 0}]}),
        )
        .await;
    ack.result();
    assert_matches_schema(&spec, &format!("{base}/ack"), "200", &ack.json);

    let bad = h
        .post("q", "/messages/pull", &json!({"batch_size": 0}))
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_matches_schema(&spec, &format!("{base}/pull"), "4XX", &bad.json);
}

#[tokio::test]
async fn queue_details_describe_an_http_pull_consumer() {
    let h = Harness::start(EmulatorConfig {
        max_retries: 7,
        dead_letter_queue: Some("dlq".into()),
        ..EmulatorConfig::default()
    })
    .await;
    let answer = h.send(Method::GET, &h.queue_url("orders"), None).await;
    let result = answer.result();
    assert_eq!(result["queue_id"], "orders");
    assert_eq!(result["queue_name"], "orders");
    let consumer = &result["consumers"][0];
    assert_eq!(consumer["type"], "http_pull");
    assert_eq!(consumer["dead_letter_queue"], "dlq");
    assert_eq!(consumer["settings"]["max_retries"], 7);
    assert_eq!(consumer["settings"]["visibility_timeout_ms"], 30_000);
    assert_eq!(consumer["settings"]["batch_size"], 5);
    assert_eq!(result["settings"]["delivery_paused"], false);
    assert!(result["created_on"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn pull_defaults_to_five_messages_with_every_field() {
    let h = Harness::default().await;
    let seeded = h.emulator.seed(
        ACCOUNT,
        "q",
        &SeedSpec {
            count: 12,
            body_size: 50,
            content_type: ContentType::Text,
        },
    );
    let result = h.pull("q", json!({})).await;
    assert_eq!(result["message_backlog_count"], 12);
    let messages = result["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 5, "default batch_size is 5");
    assert_eq!(ids(&result), seeded[..5].to_vec(), "FIFO order");
    for message in messages {
        let id = message["id"].as_str().unwrap();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!message["lease_id"].as_str().unwrap().is_empty());
        assert_eq!(message["attempts"], 1);
        assert!(message["timestamp_ms"].as_u64().unwrap() > 1_700_000_000_000);
        assert_eq!(message["metadata"]["CF-Content-Type"], "text");
        assert!(message["metadata"]["CF-sourceMessageSource"].is_string());
        assert_eq!(message["body"].as_str().unwrap().len(), 50);
    }
    let metrics = &result["metadata"]["metrics"];
    assert_eq!(metrics["backlog_count"], 12);
    assert_eq!(metrics["backlog_bytes"], 600);
    assert!(metrics["oldest_message_timestamp_ms"].as_u64().unwrap() > 0);

    // The default visibility timeout is 30 s: the stats see five leased messages.
    let stats = h.emulator.stats(ACCOUNT, "q");
    assert_eq!((stats.in_flight, stats.ready, stats.delivered), (5, 7, 5));

    // An empty body means the defaults too.
    let url = format!("{}/messages/pull", h.queue_url("q"));
    let answer = h.send(Method::POST, &url, None).await;
    assert_eq!(answer.result()["messages"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn pull_limits_are_answered_with_400s_naming_the_field() {
    let h = Harness::default().await;
    h.emulator.seed(
        ACCOUNT,
        "q",
        &SeedSpec {
            count: 150,
            ..SeedSpec::default()
        },
    );
    let cases = [
        (json!({"batch_size": 0}), "batch_size"),
        (json!({"batch_size": 101}), "batch_size"),
        (json!({"batch_size": 2.5}), "batch_size"),
        (json!({"batch_size": "10"}), "batch_size"),
        (json!({"visibility_timeout_ms": 0}), "visibility_timeout_ms"),
        (
            json!({"visibility_timeout_ms": 43_200_001}),
            "visibility_timeout_ms",
        ),
        (json!({"visibility_timeout": 1000}), "visibility_timeout"),
        (json!({"batch_size": 5, "extra": true}), "extra"),
    ];
    for (body, field) in cases {
        let answer = h.post("q", "/messages/pull", &body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        let (code, message) = answer.error();
        assert_eq!(code, 10207, "{body}");
        assert!(
            message.contains(field),
            "{body}: {message:?} should name {field}"
        );
    }
    // Nothing was leased by the rejected pulls.
    assert_eq!(h.emulator.stats(ACCOUNT, "q").delivered, 0);

    let malformed = h
        .send(
            Method::POST,
            &format!("{}/messages/pull", h.queue_url("q")),
            Some("{\"batch_size\":"),
        )
        .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert_eq!(malformed.error().0, 10208);

    // The limits themselves are accepted.
    let result = h
        .pull(
            "q",
            json!({"batch_size": 100, "visibility_timeout_ms": 43_200_000}),
        )
        .await;
    assert_eq!(result["messages"].as_array().unwrap().len(), 100);
    let result = h
        .pull("q", json!({"batch_size": 1.0, "visibility_timeout_ms": 1}))
        .await;
    assert_eq!(result["messages"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn ack_bodies_are_checked_strictly() {
    let h = Harness::default().await;
    let cases = [
        (json!({"acks": [{"lease_id": "x", "id": "y"}]}), "acks[0]"),
        (json!({"acks": [{}]}), "lease_id"),
        (
            json!({"retries": [{"lease_id": "x", "delay_seconds": 43_201}]}),
            "delay_seconds",
        ),
        (
            json!({"retries": [{"lease_id": "x", "delay_seconds": -1}]}),
            "delay_seconds",
        ),
        (json!({"retries": [{"lease_id": "x", "delay": 5}]}), "delay"),
        (json!({"ack": []}), "ack"),
    ];
    for (body, field) in cases {
        let answer = h.post("q", "/messages/ack", &body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        let (code, message) = answer.error();
        assert_eq!(code, 10207, "{body}");
        assert!(
            message.contains(field),
            "{body}: {message:?} should name {field}"
        );
    }
    let ok = h.ack("q", &[], &[]).await;
    assert_eq!(ok["ackCount"], 0);
    assert_eq!(ok["retryCount"], 0);
    assert_eq!(ok["warnings"], json!({}));
}

#[tokio::test]
async fn content_types_are_encoded_like_cloudflare() {
    let h = Harness::default().await;
    h.post(
        "q",
        "/messages",
        &json!({"body": "plain text é", "content_type": "text"}),
    )
    .await
    .result();
    h.post(
        "q",
        "/messages",
        &json!({"body": {"k": [1, 2]}, "content_type": "json"}),
    )
    .await
    .result();
    // json is the default content type and takes any JSON value.
    for body in [
        json!(42),
        json!("a string"),
        json!([true, null]),
        json!(null),
    ] {
        h.post("q", "/messages", &json!({ "body": body }))
            .await
            .result();
    }
    let bytes = h.emulator.seed(
        ACCOUNT,
        "q",
        &SeedSpec {
            count: 1,
            body_size: 64,
            content_type: ContentType::Bytes,
        },
    );
    let v8 = h.emulator.seed(
        ACCOUNT,
        "q",
        &SeedSpec {
            count: 1,
            body_size: 16,
            content_type: ContentType::V8,
        },
    );

    let result = h.pull("q", json!({"batch_size": 100})).await;
    let messages = result["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 8);
    let kind = |m: &Value| {
        m["metadata"]["CF-Content-Type"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    assert_eq!(kind(&messages[0]), "text");
    assert_eq!(messages[0]["body"], "plain text é");

    assert_eq!(kind(&messages[1]), "json");
    let decoded: Value =
        serde_json::from_slice(&b64(messages[1]["body"].as_str().unwrap())).unwrap();
    assert_eq!(decoded, json!({"k": [1, 2]}));

    let expected = [
        json!(42),
        json!("a string"),
        json!([true, null]),
        json!(null),
    ];
    for (message, expected) in messages[2..6].iter().zip(expected) {
        assert_eq!(kind(message), "json");
        let decoded: Value =
            serde_json::from_slice(&b64(message["body"].as_str().unwrap())).unwrap();
        assert_eq!(decoded, expected);
    }

    assert_eq!(kind(&messages[6]), "bytes");
    assert_eq!(messages[6]["id"], bytes[0]);
    assert_eq!(b64(messages[6]["body"].as_str().unwrap()).len(), 64);

    assert_eq!(kind(&messages[7]), "v8");
    assert_eq!(messages[7]["id"], v8[0]);
    let opaque = b64(messages[7]["body"].as_str().unwrap());
    assert_eq!(&opaque[..2], &[0xFF, 0x0F]);
}

#[tokio::test]
async fn publish_raw_keeps_body_and_metadata_exactly() {
    let h = Harness::default().await;
    let mut metadata = Map::new();
    metadata.insert("CF-Content-Type".into(), json!("bogus"));
    metadata.insert("n".into(), json!(7));
    let id = h
        .emulator
        .publish_raw(ACCOUNT, "q", "%%% not base64 %%%", metadata.clone());
    let id2 = h
        .emulator
        .publish_raw(ACCOUNT, "q", "no content type", Map::new());
    let result = h.pull("q", json!({})).await;
    assert_eq!(ids(&result), vec![id, id2]);
    assert_eq!(result["messages"][0]["body"], "%%% not base64 %%%");
    assert_eq!(result["messages"][0]["metadata"], Value::Object(metadata));
    assert_eq!(result["messages"][1]["metadata"], json!({}));
}

#[tokio::test]
async fn publish_limits_are_enforced() {
    let h = Harness::default().await;
    let at_limit = "x".repeat(128_000);
    h.post(
        "q",
        "/messages",
        &json!({"body": at_limit, "content_type": "text"}),
    )
    .await
    .result();
    let over = h
        .post(
            "q",
            "/messages",
            &json!({"body": "x".repeat(128_001), "content_type": "text"}),
        )
        .await;
    assert_eq!(over.status, StatusCode::BAD_REQUEST);
    assert_eq!(over.error().0, 10204);

    let hundred: Vec<Value> = (0..100).map(|i| json!({"body": i})).collect();
    h.post("q", "/messages/batch", &json!({ "messages": hundred }))
        .await
        .result();
    let too_many: Vec<Value> = (0..101).map(|i| json!({"body": i})).collect();
    let answer = h
        .post("q", "/messages/batch", &json!({ "messages": too_many }))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.error().0, 10206);

    let big = "y".repeat(85_334);
    let heavy: Vec<Value> = (0..3)
        .map(|_| json!({"body": big, "content_type": "text"}))
        .collect();
    let answer = h
        .post("q", "/messages/batch", &json!({ "messages": heavy }))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.error().0, 10205);

    let cases = [
        (
            json!({"body": "a", "content_type": "bytes"}),
            10203,
            "content_type",
        ),
        (
            json!({"body": "a", "delay_seconds": 43_201}),
            10203,
            "delay_seconds",
        ),
        (json!({"body": 5, "content_type": "text"}), 10207, "body"),
        (json!({"content_type": "text"}), 10207, "body"),
        (
            json!({"body": "a", "contentType": "text"}),
            10207,
            "contentType",
        ),
    ];
    for (body, code, field) in cases {
        let answer = h.post("q", "/messages", &body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        let (got, message) = answer.error();
        assert_eq!(got, code, "{body}: {message}");
        assert!(
            message.contains(field),
            "{body}: {message:?} should name {field}"
        );
    }
    let answer = h
        .post(
            "q",
            "/messages/batch",
            &json!({"messages": [], "delay_seconds": 50_000}),
        )
        .await;
    assert_eq!(answer.error().0, 10202);

    // Nothing from the rejected requests was published.
    assert_eq!(h.emulator.stats(ACCOUNT, "q").published, 101);

    // Ids of more than 32 characters are rejected; 32 are fine.
    let long = "q".repeat(33);
    let answer = h.post(&long, "/messages", &json!({"body": 1})).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let (code, message) = answer.error();
    assert_eq!(code, 10107);
    assert!(message.contains("queue_id"));
    h.post(&"q".repeat(32), "/messages", &json!({"body": 1}))
        .await
        .result();
    let url = format!(
        "{}/accounts/{}/queues/q/messages/pull",
        h.base(),
        "a".repeat(33)
    );
    let answer = h.send(Method::POST, &url, Some("{}")).await;
    assert!(answer.error().1.contains("account_id"));
}

#[tokio::test]
async fn backlog_counts_every_unacknowledged_message() {
    let h = Harness::default().await;
    for body in ["a", "bb", "ccc"] {
        h.publish_text("q", body).await;
    }
    h.post(
        "q",
        "/messages",
        &json!({"body": "later", "content_type": "text", "delay_seconds": 600}),
    )
    .await
    .result();
    let result = h.pull("q", json!({"batch_size": 2})).await;
    // Leased and delayed messages are still in the backlog.
    assert_eq!(result["message_backlog_count"], 4);
    assert_eq!(result["metadata"]["metrics"]["backlog_bytes"], 11);
    let leases = leases(&result);
    let ack = h.ack("q", &[&leases[0]], &[]).await;
    assert_eq!(ack["ackCount"], 1);
    let result = h.pull("q", json!({})).await;
    assert_eq!(result["message_backlog_count"], 3);
    assert_eq!(
        result["messages"].as_array().unwrap().len(),
        1,
        "ccc only; bb is leased, later is delayed"
    );
    let publish = h
        .post(
            "q",
            "/messages",
            &json!({"body": "d", "content_type": "text"}),
        )
        .await;
    assert_eq!(publish.result()["metadata"]["metrics"]["backlog_count"], 4);
    let stats = h.emulator.stats(ACCOUNT, "q");
    assert_eq!(
        (stats.backlog, stats.in_flight, stats.delayed, stats.ready),
        (4, 2, 1, 1)
    );
}
