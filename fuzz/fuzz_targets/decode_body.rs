//! Fuzzes body decoding by `CF-Content-Type` (`cfq_bridge::sources::cloudflare::decode::decode`) and the JSONL
//! line written for every decoded record: whatever the body, a decoded record is within
//! the 128 KB limit, a `json` body is one valid JSON value, and its archive line is one
//! line of JSON that gives the body back.
//!
//! Input layout: byte 0 picks the content type (low bits) and the v8 policy (high bit);
//! the rest, when UTF-8, is the body string as a pull would carry it.
#![no_main]

use std::sync::Arc;

use cfq_bridge::cloudflare::PulledMessage;
use cfq_bridge::config::V8Policy;
use cfq_bridge::sources::cloudflare::decode::{decode, MAX_BODY_BYTES};
use cfq_sinks::ContentType;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

const TYPES: [&str; 5] = ["text", "json", "bytes", "v8", "yaml"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(body) = std::str::from_utf8(rest) else {
        return;
    };
    let content_type = TYPES[usize::from(selector & 0x7f) % TYPES.len()];
    let policy = if selector & 0x80 != 0 {
        V8Policy::ForwardRaw
    } else {
        V8Policy::Release
    };
    let mut metadata = Map::new();
    metadata.insert("CF-Content-Type".into(), Value::from(content_type));
    let message = PulledMessage {
        id: "0123456789abcdef".into(),
        lease_id: "lease".into(),
        body: body.to_string(),
        attempts: 1,
        timestamp_ms: 1,
        metadata,
    };
    let queue: Arc<str> = Arc::from("q");
    let record = match decode(message, &queue, policy) {
        Ok(record) => record,
        Err((error, _id)) => {
            let _ = (error.kind(), error.to_string());
            return;
        }
    };
    assert!(record.body.len() <= MAX_BODY_BYTES);
    let mut line = Vec::new();
    record.write_json_line(&mut line);
    assert_eq!(line.last(), Some(&b'\n'), "a line ends with a newline");
    assert_eq!(
        line.iter().filter(|&&b| b == b'\n').count(),
        1,
        "one record, one line"
    );
    let parsed: Value = match serde_json::from_slice(&line) {
        Ok(parsed) => parsed,
        Err(error) => {
            // Known limit (docs/reliability.md): a number beyond the f64 range (`1e400`)
            // is valid JSON and kept as is, but serde_json without `arbitrary_precision`
            // cannot read it. JavaScript producers cannot send one. Anything else is a bug.
            assert!(
                record.content_type == ContentType::Json
                    && error.to_string().starts_with("number out of range"),
                "the archive line is not JSON: {error}"
            );
            serde_json::from_slice::<serde::de::IgnoredAny>(&line)
                .expect("the archive line is JSON syntax");
            return;
        }
    };
    match record.content_type {
        ContentType::Text => assert_eq!(parsed["body"].as_str(), Some(body)),
        ContentType::Json => {
            let value: Value =
                serde_json::from_slice(&record.body).expect("a json body is one JSON value");
            assert_eq!(parsed["body"], value);
        }
        ContentType::Bytes | ContentType::V8 => assert!(parsed["body"].is_string()),
    }
});
