//! The wire format of the pull and ack calls: request bodies, the messages and results
//! they return, and tolerant parsers. A malformed message does not hide the good ones
//! beside it: it is reported with its lease, so it can still be released.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{
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

/// A pull answer in its expected shape (the fast path of [`Client::pull`]).
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
    /// Unacknowledged messages in the queue, when reported.
    pub backlog: Option<u64>,
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

/// Parses the body of a pull answer whose HTTP status was a success (`status` is only
/// quoted in errors). Public so the fuzz targets (`fuzz/`) exercise the very code
/// [`Client::pull`] runs.
pub fn parse_pull_response(status: u16, body: &[u8]) -> Result<PullResult, ApiError> {
    // Fast path: a well-formed answer parses straight into typed messages. Anything
    // unusual (floats for counts, a message missing a field, `success: false`) takes the
    // tolerant path, which sorts out what can still be used or released.
    if let Ok(fast) = serde_json::from_slice::<FastPullEnvelope>(body) {
        let usable = |m: &PulledMessage| !m.id.is_empty() && !m.lease_id.is_empty();
        if fast.success && fast.result.messages.iter().all(usable) {
            return Ok(PullResult {
                backlog: fast.result.message_backlog_count,
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
        Some(true) => {}
        Some(false) => {
            return Err(ApiError::Server {
                status,
                message: format!("success: false: {}", join_errors(&envelope.errors)),
            });
        }
        None => return Err(malformed("the envelope has no `success` field".into())),
    }
    envelope
        .result
        .ok_or_else(|| malformed("the envelope has no `result`".into()))
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
    let backlog = result.get("message_backlog_count").and_then(as_u64);
    let messages = match result.remove("messages") {
        Some(Value::Array(messages)) => messages,
        Some(Value::Null) | None => Vec::new(),
        Some(_) => return Err(malformed("`result.messages` is not an array")),
    };
    let mut out = PullResult {
        backlog,
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
    use crate::cloudflare::error::{classify_status, SNIPPET};
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
}
