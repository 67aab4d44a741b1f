//! The Cloudflare wire format: request bodies (parsed strictly), the response envelope,
//! error codes, and the pre-encoded pull representation of messages.
//!
//! Request parsing rejects unknown fields, so a client that sends the docs' old
//! `visibility_timeout` instead of `visibility_timeout_ms` gets a 400 naming the field
//! (the strict variant of Cloudflare's schema). Error codes are Cloudflare's Queues codes
//! where one exists (10000 authentication, 10107 malformed id, 10202-10208 request
//! problems, 7003 no route) and emulator choices otherwise (documented in
//! `docs/emulator.md`).

use std::borrow::Cow;

use axum::http::StatusCode;
use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::state::{Delivery, Metrics};

/// Largest message body accepted, in bytes (128 KB, 1 KB = 1000 B).
pub const MAX_BODY_BYTES: usize = 128_000;
/// Largest sum of body sizes in one publish batch, in bytes (256 KB).
pub const MAX_BATCH_BYTES: usize = 256_000;
/// Most messages in one publish batch.
pub const MAX_BATCH_MESSAGES: usize = 100;
/// Largest `batch_size` of a pull.
pub const MAX_PULL_BATCH: u64 = 100;
/// Default `batch_size` of a pull.
pub const DEFAULT_PULL_BATCH: u64 = 5;
/// Default visibility timeout of a pull, in milliseconds.
pub const DEFAULT_VISIBILITY_TIMEOUT_MS: u64 = 30_000;
/// Largest visibility timeout, in milliseconds (12 h).
pub const MAX_VISIBILITY_TIMEOUT_MS: u64 = 43_200_000;
/// Largest publish or retry delay, in seconds (12 h).
pub const MAX_DELAY_SECONDS: u64 = 43_200;
/// Longest account or queue id, in characters.
pub const MAX_ID_LEN: usize = 32;

/// An error answered in Cloudflare's failure envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ApiError {
    /// No or wrong credentials (401, code 10000).
    #[error("Authentication error")]
    Unauthenticated,
    /// The path matches no endpoint (404, code 7003).
    #[error("No route for the URI")]
    NoRoute,
    /// The path matches an endpoint, the method does not (405, code 7001).
    #[error("Method not allowed for this endpoint")]
    MethodNotAllowed,
    /// An account or queue id is malformed (400, code 10107).
    #[error("{0}")]
    MalformedId(String),
    /// The body is not JSON (400, code 10208).
    #[error("Request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// The body is JSON but does not match the schema or its limits (400, code 10207).
    #[error("Request JSON body does not match expected schema: {0}")]
    InvalidBody(String),
    /// A bad batch-level delay (400, code 10202).
    #[error("Invalid batch delay: {0}")]
    InvalidBatchDelay(String),
    /// A bad content type or message delay (400, code 10203).
    #[error("Invalid message metadata: {0}")]
    InvalidMessage(String),
    /// A message body over 128 KB (400, code 10204).
    #[error("Message size out of bounds: {0}")]
    MessageTooLarge(String),
    /// A batch over 256 KB (400, code 10205).
    #[error("Batch size out of bounds: {0}")]
    BatchTooLarge(String),
    /// A batch of more than 100 messages (400, code 10206).
    #[error("Batch count out of bounds: {0}")]
    BatchTooMany(String),
    /// The request body could not be read or is far too large (413, code 10204).
    #[error("Request body too large or unreadable: {0}")]
    BodyUnreadable(String),
}

impl ApiError {
    /// The HTTP status and Cloudflare error code.
    pub fn status_and_code(&self) -> (StatusCode, u32) {
        match self {
            ApiError::Unauthenticated => (StatusCode::UNAUTHORIZED, 10000),
            ApiError::NoRoute => (StatusCode::NOT_FOUND, 7003),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, 7001),
            ApiError::MalformedId(_) => (StatusCode::BAD_REQUEST, 10107),
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, 10208),
            ApiError::InvalidBody(_) => (StatusCode::BAD_REQUEST, 10207),
            ApiError::InvalidBatchDelay(_) => (StatusCode::BAD_REQUEST, 10202),
            ApiError::InvalidMessage(_) => (StatusCode::BAD_REQUEST, 10203),
            ApiError::MessageTooLarge(_) => (StatusCode::BAD_REQUEST, 10204),
            ApiError::BatchTooLarge(_) => (StatusCode::BAD_REQUEST, 10205),
            ApiError::BatchTooMany(_) => (StatusCode::BAD_REQUEST, 10206),
            ApiError::BodyUnreadable(_) => (StatusCode::PAYLOAD_TOO_LARGE, 10204),
        }
    }
}

/// `{"success":true,"errors":[],"messages":[],"result":RESULT}` around an already
/// encoded result.
pub(crate) fn success_envelope(result: &[u8]) -> Vec<u8> {
    const HEAD: &[u8] = br#"{"success":true,"errors":[],"messages":[],"result":"#;
    let mut out = Vec::with_capacity(HEAD.len() + result.len() + 1);
    out.extend_from_slice(HEAD);
    out.extend_from_slice(result);
    out.push(b'}');
    out
}

/// The success envelope around a serializable result.
pub(crate) fn success_json<T: Serialize>(result: &T) -> Vec<u8> {
    // Serializing plain structs and maps into a Vec cannot fail; fall back to `null`
    // rather than panicking if a future type ever could.
    let encoded = serde_json::to_vec(result).unwrap_or_else(|_| b"null".to_vec());
    success_envelope(&encoded)
}

/// The failure envelope: `{"success":false,"errors":[{"code":..,"message":..}],
/// "messages":[],"result":null}`.
pub(crate) fn failure_envelope(code: u32, message: &str) -> Vec<u8> {
    let value = serde_json::json!({
        "success": false,
        "errors": [{"code": code, "message": message}],
        "messages": [],
        "result": null,
    });
    value.to_string().into_bytes()
}

/// Encodes the invariant part of a message's pull representation, once, at publish time:
/// `{"id":"..","body":"..","timestamp_ms":..,"metadata":{..}` (no closing brace; a pull
/// appends `attempts` and `lease_id`). `wire_body` is the body as pull returns it (plain
/// text, or base64); `metadata_json` is an encoded JSON object.
pub(crate) fn message_head(
    id: u128,
    wire_body: &str,
    timestamp_ms: u64,
    metadata_json: &[u8],
) -> Bytes {
    let mut out = Vec::with_capacity(wire_body.len() + metadata_json.len() + 96);
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(format!("{id:032x}").as_bytes());
    out.extend_from_slice(b"\",\"body\":");
    push_json_string(&mut out, wire_body);
    out.extend_from_slice(b",\"timestamp_ms\":");
    out.extend_from_slice(itoa::Buffer::new().format(timestamp_ms).as_bytes());
    out.extend_from_slice(b",\"metadata\":");
    out.extend_from_slice(metadata_json);
    Bytes::from(out)
}

/// Appends `text` as a JSON string literal.
fn push_json_string(out: &mut Vec<u8>, text: &str) {
    // Fast path: base64 and plain ASCII text need no escaping.
    if text
        .bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
        return;
    }
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// Encodes a whole pull response (envelope included).
pub(crate) fn pull_response(deliveries: &[Delivery], metrics: &Metrics) -> Vec<u8> {
    let bodies: usize = deliveries.iter().map(|d| d.head.len() + 80).sum();
    let mut out = Vec::with_capacity(bodies + 320);
    out.extend_from_slice(
        br#"{"success":true,"errors":[],"messages":[],"result":{"message_backlog_count":"#,
    );
    let mut numbers = itoa::Buffer::new();
    out.extend_from_slice(numbers.format(metrics.backlog_count).as_bytes());
    out.extend_from_slice(br#","messages":["#);
    for (i, delivery) in deliveries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&delivery.head);
        out.extend_from_slice(br#","attempts":"#);
        out.extend_from_slice(numbers.format(delivery.attempts).as_bytes());
        out.extend_from_slice(br#","lease_id":""#);
        delivery.lease.write(&mut out);
        out.extend_from_slice(b"\"}");
    }
    out.extend_from_slice(br#"],"metadata":{"metrics":"#);
    write_metrics(&mut out, metrics);
    out.extend_from_slice(b"}}}");
    out
}

fn write_metrics(out: &mut Vec<u8>, metrics: &Metrics) {
    let mut numbers = itoa::Buffer::new();
    out.extend_from_slice(br#"{"backlog_count":"#);
    out.extend_from_slice(numbers.format(metrics.backlog_count).as_bytes());
    out.extend_from_slice(br#","backlog_bytes":"#);
    out.extend_from_slice(numbers.format(metrics.backlog_bytes).as_bytes());
    out.extend_from_slice(br#","oldest_message_timestamp_ms":"#);
    out.extend_from_slice(
        numbers
            .format(metrics.oldest_message_timestamp_ms)
            .as_bytes(),
    );
    out.push(b'}');
}

/// Encodes a publish response: the envelope with `{"metadata":{"metrics":{..}}}`.
pub(crate) fn publish_response(metrics: &Metrics) -> Vec<u8> {
    let mut result = Vec::with_capacity(128);
    result.extend_from_slice(br#"{"metadata":{"metrics":"#);
    write_metrics(&mut result, metrics);
    result.extend_from_slice(b"}}");
    success_envelope(&result)
}

/// Encodes an ack response: `{"ackCount":n,"retryCount":n,"warnings":{lease: reason}}`.
pub(crate) fn ack_response(
    ack_count: u64,
    retry_count: u64,
    warnings: &[(String, &'static str)],
) -> Vec<u8> {
    let mut map = serde_json::Map::with_capacity(warnings.len());
    for (lease, reason) in warnings {
        map.insert(lease.clone(), serde_json::Value::from(*reason));
    }
    success_json(&serde_json::json!({
        "ackCount": ack_count,
        "retryCount": retry_count,
        "warnings": map,
    }))
}

/// Body of `POST .../messages/pull`. Every field is optional; `{}` uses the defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PullRequest {
    /// Most messages to return (1..=100, default 5).
    pub batch_size: Option<f64>,
    /// Lease length in milliseconds (1..=43,200,000, default 30,000).
    pub visibility_timeout_ms: Option<f64>,
}

/// A validated pull request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PullParams {
    /// Most messages to return.
    pub batch_size: usize,
    /// Lease length, in milliseconds.
    pub visibility_timeout_ms: u64,
}

impl PullRequest {
    /// Applies defaults and limits.
    pub fn validate(&self) -> Result<PullParams, ApiError> {
        let batch_size = match self.batch_size {
            None => DEFAULT_PULL_BATCH,
            Some(n) => whole_in_range("batch_size", n, 1, MAX_PULL_BATCH)?,
        };
        let visibility_timeout_ms = match self.visibility_timeout_ms {
            None => DEFAULT_VISIBILITY_TIMEOUT_MS,
            Some(n) => whole_in_range("visibility_timeout_ms", n, 1, MAX_VISIBILITY_TIMEOUT_MS)?,
        };
        Ok(PullParams {
            // At most 100, so the conversion cannot truncate.
            batch_size: batch_size as usize,
            visibility_timeout_ms,
        })
    }
}

fn whole_in_range(field: &str, value: f64, min: u64, max: u64) -> Result<u64, ApiError> {
    if !value.is_finite() || value.fract() != 0.0 {
        return Err(ApiError::InvalidBody(format!(
            "{field} must be a whole number from {min} to {max}, got {value}"
        )));
    }
    if value < min as f64 || value > max as f64 {
        return Err(ApiError::InvalidBody(format!(
            "{field} must be from {min} to {max}, got {value}"
        )));
    }
    // In range and whole, so the conversion is exact.
    Ok(value as u64)
}

/// Checks a delay in seconds (0..=43,200; fractions allowed) and converts it.
pub(crate) fn delay_seconds(
    field: &str,
    value: Option<f64>,
) -> Result<std::time::Duration, String> {
    let Some(value) = value else {
        return Ok(std::time::Duration::ZERO);
    };
    if !value.is_finite() || !(0.0..=MAX_DELAY_SECONDS as f64).contains(&value) {
        return Err(format!(
            "{field} must be from 0 to {MAX_DELAY_SECONDS} seconds (12 h), got {value}"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(value))
}

/// Body of `POST .../messages/ack`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AckRequest<'a> {
    /// Deliveries that are done.
    #[serde(borrow, default)]
    pub acks: Option<Vec<AckEntry<'a>>>,
    /// Deliveries to put back, with an optional delay.
    #[serde(borrow, default)]
    pub retries: Option<Vec<RetryEntry<'a>>>,
}

/// One entry of `acks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AckEntry<'a> {
    /// The lease to acknowledge (required).
    #[serde(borrow)]
    pub lease_id: Cow<'a, str>,
}

/// One entry of `retries`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryEntry<'a> {
    /// The lease to give back (required).
    #[serde(borrow)]
    pub lease_id: Cow<'a, str>,
    /// Seconds before the message may be delivered again (0..=43,200).
    pub delay_seconds: Option<f64>,
}

/// One message of a publish (`POST .../messages`, or an item of a batch).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishMessage {
    /// The body: a string for `text`, any JSON value for `json`. Present even when
    /// `null` (a JSON message may be `null`).
    #[serde(default, deserialize_with = "present")]
    pub body: Option<Box<RawValue>>,
    /// `text` or `json` (the default).
    pub content_type: Option<String>,
    /// Seconds before the message may be delivered (0..=43,200).
    pub delay_seconds: Option<f64>,
}

/// Body of `POST .../messages/batch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishBatch {
    /// The messages (at most 100 and 256 KB of bodies).
    pub messages: Option<Vec<PublishMessage>>,
    /// Delay applied to messages that have none of their own, in seconds.
    pub delay_seconds: Option<f64>,
}

fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(deserializer).map(Some)
}

/// A publish message after validation: the raw body bytes and its pull encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ValidMessage {
    /// `text` or `json`.
    pub content_type: crate::ContentType,
    /// The body as pull returns it: the text itself, or base64 of the JSON text.
    pub wire_body: String,
    /// The size of the decoded body, in bytes.
    pub size: usize,
    /// Delay before first delivery.
    pub delay: std::time::Duration,
}

impl PublishMessage {
    /// Validates content type, body and size; `batch_delay` applies when the message has
    /// no delay of its own.
    pub fn validate(
        &self,
        where_: &str,
        batch_delay: std::time::Duration,
    ) -> Result<ValidMessage, ApiError> {
        use base64::Engine as _;
        let content_type = match self.content_type.as_deref() {
            None | Some("json") => crate::ContentType::Json,
            Some("text") => crate::ContentType::Text,
            Some(other) => {
                return Err(ApiError::InvalidMessage(format!(
                    "{where_}content_type must be \"text\" or \"json\", got {other:?}"
                )))
            }
        };
        let Some(raw) = self.body.as_deref() else {
            return Err(ApiError::InvalidBody(format!("{where_}body is required")));
        };
        let delay = match self.delay_seconds {
            None => batch_delay,
            some => delay_seconds(&format!("{where_}delay_seconds"), some)
                .map_err(ApiError::InvalidMessage)?,
        };
        let (wire_body, size) = match content_type {
            crate::ContentType::Text => {
                let text: String = serde_json::from_str(raw.get()).map_err(|_| {
                    ApiError::InvalidBody(format!(
                        "{where_}body must be a string when content_type is \"text\""
                    ))
                })?;
                let size = text.len();
                (text, size)
            }
            _ => {
                let text = raw.get().trim();
                (
                    base64::engine::general_purpose::STANDARD.encode(text),
                    text.len(),
                )
            }
        };
        if size > MAX_BODY_BYTES {
            return Err(ApiError::MessageTooLarge(format!(
                "{where_}body is {size} bytes, more than {MAX_BODY_BYTES} (128 KB)"
            )));
        }
        Ok(ValidMessage {
            content_type,
            wire_body,
            size,
            delay,
        })
    }
}

/// Parses a JSON request body strictly into `T`. An empty body counts as `{}`. Errors
/// name the offending field with its path (for example `acks[0]: unknown field ...`).
pub(crate) fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    match serde_json::from_slice::<T>(body) {
        Ok(value) => Ok(value),
        Err(error) if error.is_syntax() || error.is_eof() => {
            Err(ApiError::MalformedJson(error.to_string()))
        }
        Err(_) => {
            // Parse again, tracking the path, to name the field in the message.
            let mut de = serde_json::Deserializer::from_slice(body);
            match serde_path_to_error::deserialize::<_, T>(&mut de) {
                Ok(_) => Err(ApiError::InvalidBody("invalid request body".into())),
                Err(error) => {
                    let path = error.path().to_string();
                    let inner = error.into_inner();
                    if path.is_empty() || path == "." {
                        Err(ApiError::InvalidBody(inner.to_string()))
                    } else {
                        Err(ApiError::InvalidBody(format!("{path}: {inner}")))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_pull_field_is_named() {
        let err = parse_body::<PullRequest>(br#"{"visibility_timeout": 1000}"#).unwrap_err();
        assert!(matches!(&err, ApiError::InvalidBody(m) if m.contains("visibility_timeout")));
    }

    #[test]
    fn nested_unknown_field_has_a_path() {
        let err = parse_body::<AckRequest>(br#"{"acks":[{"lease_id":"x","foo":1}]}"#).unwrap_err();
        assert!(
            matches!(&err, ApiError::InvalidBody(m) if m.contains("acks[0]") && m.contains("foo")),
            "{err}"
        );
    }

    #[test]
    fn empty_body_means_defaults() {
        let req = parse_body::<PullRequest>(b"").unwrap();
        let params = req.validate().unwrap();
        assert_eq!(params.batch_size, 5);
        assert_eq!(params.visibility_timeout_ms, 30_000);
    }

    #[test]
    fn syntax_errors_are_malformed_json() {
        assert!(matches!(
            parse_body::<PullRequest>(b"{"),
            Err(ApiError::MalformedJson(_))
        ));
    }

    #[test]
    fn json_null_body_is_present() {
        let msg: PublishMessage = parse_body(br#"{"body":null}"#).unwrap();
        let valid = msg.validate("", std::time::Duration::ZERO).unwrap();
        assert_eq!(valid.wire_body, "bnVsbA==");
        let msg: PublishMessage = parse_body(br#"{}"#).unwrap();
        assert!(msg.validate("", std::time::Duration::ZERO).is_err());
    }
}
