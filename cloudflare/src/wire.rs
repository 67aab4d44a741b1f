//! The wire format of the pull, ack and publish calls: request bodies, the messages and
//! results they return, and tolerant parsers. A malformed message does not hide the good
//! ones beside it: it is reported with its lease, so it can still be released.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::{
    join_errors, not_json, parse_error, printable, snippet, ApiError, MAX_ERROR_MESSAGE,
};

/// Body of a pull call.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PullRequest {
    /// Most messages to return (1..=100).
    pub batch_size: u32,
    /// Lease length in milliseconds.
    pub visibility_timeout_ms: u64,
}

/// A pull answer in its expected shape (the fast path of [`crate::Client::pull`]).
#[derive(Deserialize)]
struct FastPullEnvelope {
    success: bool,
    result: FastPullResult,
}

#[derive(Deserialize)]
struct FastPullResult {
    message_backlog_count: Option<u64>,
    #[serde(default)]
    messages: Vec<PulledMessage>,
    metadata: Option<FastPullMetadata>,
}

#[derive(Deserialize)]
struct FastPullMetadata {
    metrics: Option<FastQueueMetrics>,
}

/// `result.metadata.metrics` of a pull answer (best-effort, newer API versions).
#[derive(Deserialize)]
struct FastQueueMetrics {
    backlog_count: Option<u64>,
    oldest_message_timestamp_ms: Option<u64>,
}

/// One message as the pull call returns it, body still encoded.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PulledMessage {
    /// Message id.
    pub id: String,
    /// Lease of this delivery; acks and retries name it.
    pub lease_id: String,
    /// The body, encoded per `CF-Content-Type`.
    pub body: String,
    /// Delivery attempt, 1 on first delivery.
    pub attempts: u32,
    /// Publish time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Metadata as sent.
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

/// A message whose fields were unusable, but whose lease can still be released.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokenMessage {
    /// The lease, to release the message for redelivery or Cloudflare's dead-letter queue.
    pub lease_id: String,
    /// The message id, when present.
    pub id: Option<String>,
    /// What was wrong.
    pub problem: String,
}

/// The result of a pull call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PullResult {
    /// Unacknowledged messages in the queue, when reported: `result.metadata.metrics
    /// .backlog_count` where the answer has it, else `result.message_backlog_count`.
    pub backlog: Option<u64>,
    /// When the oldest message in the queue was published (ms since the Unix epoch), when
    /// reported (`result.metadata.metrics.oldest_message_timestamp_ms`; 0 means unknown
    /// and is left out).
    pub oldest_message_timestamp_ms: Option<u64>,
    /// Usable messages.
    pub messages: Vec<PulledMessage>,
    /// Messages with missing or wrongly typed fields but a usable `lease_id`.
    pub broken: Vec<BrokenMessage>,
    /// Entries with no usable `lease_id`: they cannot be released and will come back when
    /// their lease expires.
    pub unreleasable: usize,
}

/// Body of an ack call.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct AckRequest {
    /// Deliveries that are done.
    pub acks: Vec<AckItem>,
    /// Deliveries to put back.
    pub retries: Vec<RetryItem>,
}

/// One acknowledged lease.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AckItem {
    /// The lease.
    pub lease_id: String,
}

/// One released lease.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RetryItem {
    /// The lease.
    pub lease_id: String,
    /// Seconds before the message is delivered again (≤ 43,200).
    pub delay_seconds: u64,
}

/// The result of an ack call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AckResult {
    /// Acks the API counted.
    pub ack_count: Option<u64>,
    /// Retries the API counted.
    pub retry_count: Option<u64>,
    /// Per-lease warnings (`lease_id` → message).
    pub warnings: Vec<(String, String)>,
}

/// Most messages in one publish batch call.
pub const MAX_PUBLISH_BATCH_MESSAGES: usize = 100;
/// Largest sum of message sizes (see [`PublishMessage::size`]) in one publish batch call,
/// in bytes (256 KB, 1 KB = 1000 bytes).
pub const MAX_PUBLISH_BATCH_BYTES: usize = 256_000;
/// Largest size of one published message (see [`PublishMessage::size`]), in bytes
/// (128 KB, 1 KB = 1000 bytes).
pub const MAX_PUBLISH_MESSAGE_BYTES: usize = 128_000;
/// Longest publish delay, in seconds (12 hours).
pub const MAX_PUBLISH_DELAY_SECONDS: u64 = crate::MAX_DELAY_SECONDS;

/// The content types a message can be published with over HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishContentType {
    /// A string body, delivered as the text itself.
    Text,
    /// Any JSON value, delivered as its JSON text.
    Json,
}

/// The body of a published message: a string for `text`, a JSON value (sent as it is
/// written, not re-serialized) for `json`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum PublishBody<'a> {
    /// The text of a `text` message.
    Text(Cow<'a, str>),
    /// The JSON text of a `json` message, embedded raw.
    Json(&'a RawValue),
}

/// One message of a publish batch.
#[derive(Debug, Clone, Serialize)]
pub struct PublishMessage<'a> {
    /// The body; its variant must match `content_type`.
    pub body: PublishBody<'a>,
    /// `text` or `json`.
    pub content_type: PublishContentType,
    /// Seconds before the message may be delivered (≤ [`MAX_PUBLISH_DELAY_SECONDS`]);
    /// left out when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_seconds: Option<u64>,
}

impl<'a> PublishMessage<'a> {
    /// A `text` message.
    pub fn text(text: impl Into<Cow<'a, str>>) -> Self {
        PublishMessage {
            body: PublishBody::Text(text.into()),
            content_type: PublishContentType::Text,
            delay_seconds: None,
        }
    }

    /// A `json` message whose body is the JSON text `json`, embedded as written.
    pub fn json(json: &'a RawValue) -> Self {
        PublishMessage {
            body: PublishBody::Json(json),
            content_type: PublishContentType::Json,
            delay_seconds: None,
        }
    }

    /// The size the API holds against the per-message and per-batch limits: the bytes of
    /// the text (UTF-8) for `text`, the bytes of the JSON text for `json`.
    pub fn size(&self) -> usize {
        match &self.body {
            PublishBody::Text(text) => text.len(),
            PublishBody::Json(json) => json.get().len(),
        }
    }
}

/// Body of a publish batch call (`POST .../messages/batch`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PublishBatchRequest<'a> {
    /// The messages: at most [`MAX_PUBLISH_BATCH_MESSAGES`], their sizes adding up to at
    /// most [`MAX_PUBLISH_BATCH_BYTES`].
    pub messages: Vec<PublishMessage<'a>>,
    /// Delay for messages without one of their own, in seconds; left out when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_seconds: Option<u64>,
}

/// The result of a publish call that answered `success: true`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishResult {
    /// Messages in the queue after the call, when the answer reported it
    /// (`result.metadata.metrics.backlog_count`).
    pub backlog_count: Option<u64>,
}

/// Parses the body of a publish answer whose HTTP status was a success. The call counts
/// as published only when the envelope says `success: true`; `result` is informational and
/// may be missing. Public for the fuzz targets, like [`parse_pull_response`].
pub fn parse_publish_response(status: u16, body: &[u8]) -> Result<PublishResult, ApiError> {
    let result = envelope(status, body)?;
    let backlog_count = result
        .as_ref()
        .and_then(|r| r.pointer("/metadata/metrics/backlog_count"))
        .and_then(as_u64);
    Ok(PublishResult { backlog_count })
}

/// Parses the body of a pull answer whose HTTP status was a success (`status` is only
/// quoted in errors). Public so the fuzz targets (`fuzz/`) exercise the very code
/// [`crate::Client::pull`] runs.
pub fn parse_pull_response(status: u16, body: &[u8]) -> Result<PullResult, ApiError> {
    // Fast path: a well-formed answer parses straight into typed messages. Anything
    // unusual (floats for counts, a message missing a field, `success: false`) takes the
    // tolerant path, which sorts out what can still be used or released.
    if let Ok(fast) = serde_json::from_slice::<FastPullEnvelope>(body) {
        let usable = |m: &PulledMessage| !m.id.is_empty() && !m.lease_id.is_empty();
        if fast.success && fast.result.messages.iter().all(usable) {
            let metrics = fast.result.metadata.and_then(|m| m.metrics);
            let (backlog, oldest) = match metrics {
                Some(m) => (m.backlog_count, m.oldest_message_timestamp_ms),
                None => (None, None),
            };
            return Ok(PullResult {
                backlog: backlog.or(fast.result.message_backlog_count),
                oldest_message_timestamp_ms: oldest.filter(|t| *t > 0),
                messages: fast.result.messages,
                broken: Vec::new(),
                unreleasable: 0,
            });
        }
    }
    let result = envelope_result(status, body)?;
    parse_pull_result(status, result)
}

/// Parses the body of an ack answer whose HTTP status was a success. Public for the
/// fuzz targets, like [`parse_pull_response`].
pub fn parse_ack_response(status: u16, body: &[u8]) -> Result<AckResult, ApiError> {
    let result = envelope_result(status, body)?;
    Ok(parse_ack_result(&result))
}

/// Parses a 2xx envelope and returns its `result`.
pub(crate) fn envelope_result(status: u16, body: &[u8]) -> Result<Value, ApiError> {
    envelope(status, body)?.ok_or_else(|| ApiError::Malformed {
        status,
        detail: "the envelope has no `result`".into(),
    })
}

/// Parses a 2xx envelope: an error unless it says `success: true`; its `result` when
/// present.
fn envelope(status: u16, body: &[u8]) -> Result<Option<Value>, ApiError> {
    #[derive(Deserialize)]
    struct Envelope {
        success: Option<bool>,
        #[serde(default)]
        errors: Vec<Value>,
        result: Option<Value>,
    }
    let malformed = |detail: String| ApiError::Malformed { status, detail };
    if let Some(reason) = not_json(body, false) {
        return Err(malformed(reason));
    }
    let envelope: Envelope = serde_json::from_slice(body).map_err(|e| {
        malformed(format!(
            "not a JSON envelope ({}): {}",
            parse_error(&e),
            snippet(body)
        ))
    })?;
    match envelope.success {
        Some(true) => Ok(envelope.result.filter(|r| !r.is_null())),
        Some(false) => Err(ApiError::Server {
            status,
            message: format!("success: false: {}", join_errors(&envelope.errors)),
        }),
        None => Err(malformed("the envelope has no `success` field".into())),
    }
}

/// Reads a number that may arrive as an integer or a float (`1` or `1.0`).
fn as_u64(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0 && *f < 1.8e19)
            .map(|f| f as u64)
    })
}

/// Parses the pull `result`, message by message, so one bad message does not hide the
/// others: usable messages, broken-but-releasable ones, and unreleasable entries.
pub fn parse_pull_result(status: u16, result: Value) -> Result<PullResult, ApiError> {
    let malformed = |detail: &str| ApiError::Malformed {
        status,
        detail: detail.to_string(),
    };
    let Value::Object(mut result) = result else {
        return Err(malformed("`result` is not an object"));
    };
    let metric = |name: &str| {
        result
            .get("metadata")
            .and_then(|m| m.get("metrics"))
            .and_then(|m| m.get(name))
            .and_then(as_u64)
    };
    let backlog =
        metric("backlog_count").or_else(|| result.get("message_backlog_count").and_then(as_u64));
    let oldest_message_timestamp_ms = metric("oldest_message_timestamp_ms").filter(|t| *t > 0);
    let messages = match result.remove("messages") {
        Some(Value::Array(messages)) => messages,
        Some(Value::Null) | None => Vec::new(),
        Some(_) => return Err(malformed("`result.messages` is not an array")),
    };
    let mut out = PullResult {
        backlog,
        oldest_message_timestamp_ms,
        messages: Vec::with_capacity(messages.len()),
        broken: Vec::new(),
        unreleasable: 0,
    };
    for entry in messages {
        let Value::Object(mut m) = entry else {
            out.unreleasable += 1;
            continue;
        };
        let Some(lease_id) = m
            .get("lease_id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
        else {
            out.unreleasable += 1;
            continue;
        };
        let id = m.get("id").and_then(Value::as_str).map(str::to_string);
        let attempts = m.get("attempts").and_then(as_u64);
        let timestamp_ms = m.get("timestamp_ms").and_then(as_u64);
        let body = match m.remove("body") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let metadata = match m.remove("metadata") {
            Some(Value::Object(map)) => Some(map),
            Some(Value::Null) | None => Some(Map::new()),
            Some(_) => None,
        };
        match (id.clone(), body, attempts, timestamp_ms, metadata) {
            (Some(id), Some(body), Some(attempts), Some(timestamp_ms), Some(metadata))
                if !id.is_empty() && attempts <= u32::MAX as u64 =>
            {
                out.messages.push(PulledMessage {
                    id,
                    lease_id,
                    body,
                    attempts: attempts as u32,
                    timestamp_ms,
                    metadata,
                });
            }
            (_, body, attempts, timestamp_ms, metadata) => {
                let mut missing = Vec::new();
                if id.as_deref().is_none_or(str::is_empty) {
                    missing.push("id");
                }
                if body.is_none() {
                    missing.push("body");
                }
                if attempts.is_none_or(|a| a > u32::MAX as u64) {
                    missing.push("attempts");
                }
                if timestamp_ms.is_none() {
                    missing.push("timestamp_ms");
                }
                if metadata.is_none() {
                    missing.push("metadata");
                }
                out.broken.push(BrokenMessage {
                    lease_id,
                    id,
                    problem: format!("missing or wrongly typed: {}", missing.join(", ")),
                });
            }
        }
    }
    Ok(out)
}

/// A warning as printable text of bounded length (it is logged).
fn warning_text(value: &Value) -> String {
    match value.as_str() {
        Some(text) => printable(text, MAX_ERROR_MESSAGE),
        None => printable(&value.to_string(), MAX_ERROR_MESSAGE),
    }
}

/// Parses the ack `result`; `warnings` may be a map (current API) or a list (older one).
pub fn parse_ack_result(result: &Value) -> AckResult {
    let warnings = match result.get("warnings") {
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| (printable(k, MAX_ERROR_MESSAGE), warning_text(v)))
            .collect(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| (String::new(), warning_text(v)))
            .collect(),
        _ => Vec::new(),
    };
    AckResult {
        ack_count: result.get("ackCount").and_then(as_u64),
        retry_count: result.get("retryCount").and_then(as_u64),
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{classify_status, SNIPPET};
    use reqwest::StatusCode;
    use serde_json::json;

    #[test]
    fn pull_request_uses_visibility_timeout_ms() {
        let body = serde_json::to_value(PullRequest {
            batch_size: 10,
            visibility_timeout_ms: 1000,
        })
        .unwrap();
        assert_eq!(
            body,
            json!({"batch_size": 10, "visibility_timeout_ms": 1000})
        );
    }

    #[test]
    fn pull_metadata_metrics_win_over_the_older_backlog_field() {
        let body = br#"{"success":true,"errors":[],"messages":[],"result":{"message_backlog_count":9,"messages":[],"metadata":{"metrics":{"backlog_count":4,"backlog_bytes":10,"oldest_message_timestamp_ms":1700000000000}}}}"#;
        let fast = parse_pull_response(200, body).unwrap();
        assert_eq!(fast.backlog, Some(4));
        assert_eq!(fast.oldest_message_timestamp_ms, Some(1_700_000_000_000));
        // The tolerant path (a float count sends it there) reads the same fields.
        let body = br#"{"success":true,"errors":[],"messages":[],"result":{"message_backlog_count":9.0,"messages":[],"metadata":{"metrics":{"backlog_count":4.0,"oldest_message_timestamp_ms":0}}}}"#;
        let tolerant = parse_pull_response(200, body).unwrap();
        assert_eq!(tolerant.backlog, Some(4));
        assert_eq!(
            tolerant.oldest_message_timestamp_ms, None,
            "0 means unknown"
        );
        let body = br#"{"success":true,"errors":[],"messages":[],"result":{"message_backlog_count":9,"messages":[]}}"#;
        let old = parse_pull_response(200, body).unwrap();
        assert_eq!(
            (old.backlog, old.oldest_message_timestamp_ms),
            (Some(9), None)
        );
    }

    #[test]
    fn broken_messages_are_separated_from_good_ones() {
        let result = json!({
            "message_backlog_count": 3.0,
            "extra": "ignored",
            "messages": [
                {"id": "a", "lease_id": "l1", "body": "x", "attempts": 1, "timestamp_ms": 5, "metadata": {"CF-Content-Type": "text"}, "new_field": 1},
                {"id": "b", "lease_id": "l2", "body": 7, "attempts": "1", "timestamp_ms": 5, "metadata": {}},
                {"id": "c", "body": "x"},
                "junk"
            ]
        });
        let r = parse_pull_result(200, result).unwrap();
        assert_eq!(r.backlog, Some(3));
        assert_eq!(r.messages.len(), 1);
        assert_eq!(r.messages[0].lease_id, "l1");
        assert_eq!(r.broken.len(), 1);
        assert_eq!(r.broken[0].lease_id, "l2");
        assert!(r.broken[0].problem.contains("body"));
        assert!(r.broken[0].problem.contains("attempts"));
        assert_eq!(r.unreleasable, 2);
    }

    #[test]
    fn envelopes_are_checked() {
        assert!(matches!(
            envelope_result(200, b""),
            Err(ApiError::Malformed { .. })
        ));
        assert!(matches!(
            envelope_result(200, b"<html>oops"),
            Err(ApiError::Malformed { .. })
        ));
        assert!(matches!(
            envelope_result(200, b"{\"succ"),
            Err(ApiError::Malformed { .. })
        ));
        assert!(matches!(
            envelope_result(
                200,
                br#"{"success":false,"errors":[{"code":1,"message":"m"}]}"#
            ),
            Err(ApiError::Server { .. })
        ));
        assert!(matches!(
            envelope_result(200, br#"{"success":true}"#),
            Err(ApiError::Malformed { .. })
        ));
        assert_eq!(
            envelope_result(200, br#"{"success":true,"result":{"a":1}}"#).unwrap(),
            json!({"a": 1})
        );
    }

    #[test]
    fn error_messages_are_bounded_and_on_one_line() {
        let long = "x".repeat(10 * MAX_ERROR_MESSAGE);
        let body = json!({"success": false, "errors": [
            {"code": 1, "message": "line one\nline two"},
            {"code": 2, "message": long},
        ]})
        .to_string();
        let e = classify_status(StatusCode::BAD_GATEWAY, None, false, body.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line one line two (code 1)"), "{e}");
        assert!(!e.contains('\n'));
        assert!(
            e.chars().count() < MAX_ERROR_MESSAGE + 100,
            "{} chars",
            e.len()
        );
        let e = envelope_result(200, body.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.chars().count() < MAX_ERROR_MESSAGE + 100,
            "{} chars",
            e.len()
        );
        // A wrongly typed field quoted by serde (found by the pull_response fuzz target).
        let body = format!("{{\"success\":\"{long}\"}}");
        for e in [
            envelope_result(200, body.as_bytes()).unwrap_err(),
            classify_status(
                StatusCode::BAD_GATEWAY,
                None,
                false,
                format!("\"{long}\"").as_bytes(),
            )
            .unwrap_err(),
        ] {
            let e = e.to_string();
            assert!(
                e.chars().count() < 2 * SNIPPET + 100,
                "{} chars: {e}",
                e.len()
            );
        }
    }

    #[test]
    fn ack_warnings_map_or_list() {
        let r = parse_ack_result(
            &json!({"ackCount": 2, "retryCount": 0, "warnings": {"l1": "unknown lease"}}),
        );
        assert_eq!(r.ack_count, Some(2));
        assert_eq!(
            r.warnings,
            vec![("l1".to_string(), "unknown lease".to_string())]
        );
        let r = parse_ack_result(&json!({"warnings": ["w"]}));
        assert_eq!(r.warnings.len(), 1);
    }

    #[test]
    fn publish_batches_carry_text_as_strings_and_json_raw() {
        let raw: &RawValue = serde_json::from_str(r#"{"b" : 1.50, "a":[true]}"#).unwrap();
        let mut text = PublishMessage::text("h\u{e9}llo \"x\"");
        text.delay_seconds = Some(5);
        let request = PublishBatchRequest {
            messages: vec![text, PublishMessage::json(raw)],
            delay_seconds: None,
        };
        let encoded = serde_json::to_string(&request).unwrap();
        assert_eq!(
            encoded,
            "{\"messages\":[{\"body\":\"h\u{e9}llo \\\"x\\\"\",\"content_type\":\"text\",\"delay_seconds\":5},\
             {\"body\":{\"b\" : 1.50, \"a\":[true]},\"content_type\":\"json\"}]}"
        );
        // Sizes as the API counts them: UTF-8 bytes of the text, bytes of the JSON text.
        assert_eq!(request.messages[0].size(), 10);
        assert_eq!(
            request.messages[1].size(),
            r#"{"b" : 1.50, "a":[true]}"#.len()
        );
    }

    #[test]
    fn a_publish_counts_only_with_success_true() {
        let ok = parse_publish_response(
            200,
            br#"{"success":true,"errors":[],"messages":[],"result":{"metadata":{"metrics":{"backlog_count":7}}}}"#,
        )
        .unwrap();
        assert_eq!(ok.backlog_count, Some(7));
        // `result` is informational for a publish.
        assert_eq!(
            parse_publish_response(200, br#"{"success":true,"result":null}"#).unwrap(),
            PublishResult::default()
        );
        assert!(matches!(
            parse_publish_response(
                200,
                br#"{"success":false,"errors":[{"code":10001,"message":"m"}]}"#
            ),
            Err(ApiError::Server { .. })
        ));
        for body in [&b""[..], b"<html>", br#"{"result":{}}"#, b"{\"success\":tr"] {
            assert!(
                matches!(
                    parse_publish_response(200, body),
                    Err(ApiError::Malformed { .. })
                ),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
