//! The publish endpoints hold exactly Cloudflare's documented limits, at their edges: 128 KB
//! (128,000 bytes) a message, counted in bytes of the text or of the JSON text; 100
//! messages and 256 KB (256,000 bytes) a batch call; only `text` and `json`; delays up to
//! 12 h. Each refusal carries Cloudflare's error code (10202-10206) and publishes nothing.

mod emulator_support;

use emulator_support::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Publishes a batch and returns the answer.
async fn batch(h: &Harness, queue: &str, body: Value) -> Answer {
    h.post(queue, "/messages/batch", &body).await
}

/// Asserts a 400 with `code` and a message naming `field`.
fn refused(answer: &Answer, code: u64, field: &str) {
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{answer:?}");
    let (got, message) = answer.error();
    assert_eq!(got, code, "{message}");
    assert!(message.contains(field), "{message:?} should name {field}");
}

fn published(h: &Harness, queue: &str) -> u64 {
    h.emulator.stats(ACCOUNT, queue).published
}

#[tokio::test]
async fn a_message_may_hold_128000_bytes_counted_in_utf8_bytes() {
    let h = Harness::default().await;
    // 64,000 two-byte characters are 128,000 bytes: at the limit.
    let at = "\u{e9}".repeat(64_000);
    h.post(
        "q",
        "/messages",
        &json!({"body": at, "content_type": "text"}),
    )
    .await
    .result();
    // One more byte is over it, though the text has far fewer than 128,000 characters.
    let over = format!("{at}a");
    let answer = h
        .post(
            "q",
            "/messages",
            &json!({"body": over, "content_type": "text"}),
        )
        .await;
    refused(&answer, 10204, "128001 bytes");
    let answer = batch(
        &h,
        "q",
        json!({"messages": [{"body": "ok", "content_type": "text"}, {"body": over, "content_type": "text"}]}),
    )
    .await;
    refused(&answer, 10204, "messages[1].body");
    assert_eq!(
        published(&h, "q"),
        1,
        "nothing of a refused batch is published"
    );
}

#[tokio::test]
async fn a_json_message_is_counted_by_its_json_text() {
    let h = Harness::default().await;
    // A JSON string body: its quotes count. "y"*127,998 in quotes is 128,000 bytes.
    let text = "y".repeat(127_998);
    h.post(
        "q",
        "/messages",
        &json!({"body": text, "content_type": "json"}),
    )
    .await
    .result();
    let text = "y".repeat(127_999);
    let answer = h
        .post(
            "q",
            "/messages",
            &json!({"body": text, "content_type": "json"}),
        )
        .await;
    refused(&answer, 10204, "128001 bytes");
    // The JSON text as sent, spacing included: an object of 128,000 bytes passes.
    let padding = 128_000 - r#"{"k" : ""}"#.len();
    let raw = format!(
        r#"{{"messages":[{{"body":{{"k" : "{}"}},"content_type":"json"}}]}}"#,
        "z".repeat(padding)
    );
    let url = format!("{}/messages/batch", h.queue_url("q"));
    h.send(reqwest::Method::POST, &url, Some(&raw))
        .await
        .result();
    assert_eq!(published(&h, "q"), 2);
}

#[tokio::test]
async fn a_batch_may_hold_256000_bytes_and_100_messages() {
    let h = Harness::default().await;
    let text = |n: usize| json!({"body": "x".repeat(n), "content_type": "text"});
    batch(
        &h,
        "q",
        json!({"messages": [text(128_000), text(127_999), text(1)]}),
    )
    .await
    .result();
    let answer = batch(
        &h,
        "q",
        json!({"messages": [text(128_000), text(128_000), text(1)]}),
    )
    .await;
    refused(&answer, 10205, "256001 bytes");
    let hundred: Vec<Value> = (0..100).map(|_| text(2_560)).collect();
    batch(&h, "q", json!({ "messages": hundred }))
        .await
        .result();
    let many: Vec<Value> = (0..101).map(|_| text(1)).collect();
    let answer = batch(&h, "q", json!({ "messages": many })).await;
    refused(&answer, 10206, "101 entries");
    // An empty batch is within the limits and publishes nothing.
    batch(&h, "q", json!({ "messages": [] })).await.result();
    assert_eq!(published(&h, "q"), 103);
}

#[tokio::test]
async fn only_text_and_json_can_be_published() {
    let h = Harness::default().await;
    for content_type in ["bytes", "v8", "TEXT", ""] {
        let answer = h
            .post(
                "q",
                "/messages",
                &json!({"body": "a", "content_type": content_type}),
            )
            .await;
        refused(&answer, 10203, "content_type");
        let answer = batch(
            &h,
            "q",
            json!({"messages": [{"body": "a", "content_type": "text"}, {"body": "a", "content_type": content_type}]}),
        )
        .await;
        refused(&answer, 10203, "messages[1].content_type");
    }
    assert_eq!(published(&h, "q"), 0);
    // `json` is the default content type.
    h.post("q", "/messages", &json!({"body": {"a": 1}}))
        .await
        .result();
    assert_eq!(published(&h, "q"), 1);
}

#[tokio::test]
async fn delays_go_up_to_12_hours() {
    let h = Harness::default().await;
    h.post(
        "q",
        "/messages",
        &json!({"body": "a", "content_type": "text", "delay_seconds": 43_200}),
    )
    .await
    .result();
    batch(
        &h,
        "q",
        json!({"messages": [{"body": "a", "content_type": "text"}], "delay_seconds": 43_200}),
    )
    .await
    .result();
    for delay in [json!(43_200.5), json!(43_201), json!(-1)] {
        let answer = h
            .post(
                "q",
                "/messages",
                &json!({"body": "a", "content_type": "text", "delay_seconds": delay}),
            )
            .await;
        refused(&answer, 10203, "delay_seconds");
        let answer = batch(
            &h,
            "q",
            json!({"messages": [{"body": "a", "content_type": "text", "delay_seconds": delay}]}),
        )
        .await;
        refused(&answer, 10203, "messages[0].delay_seconds");
        let answer = batch(
            &h,
            "q",
            json!({"messages": [{"body": "a", "content_type": "text"}], "delay_seconds": delay}),
        )
        .await;
        refused(&answer, 10202, "delay_seconds");
    }
    assert_eq!(published(&h, "q"), 2);
}
