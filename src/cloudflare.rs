//! The Cloudflare Queues HTTP client: pull, ack (with retries) and queue details.
//!
//! Every request matches Cloudflare's OpenAPI schema (`visibility_timeout_ms`, never
//! `visibility_timeout`). Every answer is classified into an [`ApiError`] that says what
//! the caller should do: stop (bad token, unknown queue), wait (`Retry-After`, paused
//! queue), or back off and retry (5xx, transport errors, malformed answers). Nothing here
//! panics on what the network sends.

use std::fmt;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest part of an unexpected response body quoted in an error.
const SNIPPET: usize = 200;

/// An API call that did not succeed, classified by what to do next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 401/403: the token is wrong or lacks permissions. Fatal.
    #[error("authentication failed (HTTP {status}): {message}. Check CLOUDFLARE_API_TOKEN (or queue.api_token_file): it must be a valid API token with Queues read and write permission for this account")]
    Auth {
        /// The HTTP status.
        status: u16,
        /// Cloudflare's error messages.
        message: String,
    },
    /// 404: no such account, queue or route. Fatal.
    #[error("not found (HTTP 404): {message}. Check queue.account_id and queue.queue_id (the queue id, not its name) and that the queue has an HTTP pull consumer")]
    NotFound {
        /// Cloudflare's error messages.
        message: String,
    },
    /// Another 4xx: the request was refused. Fatal: retrying the same request cannot help.
    #[error("request refused (HTTP {status}): {message}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// Cloudflare's error messages.
        message: String,
    },
    /// 429: wait `retry_after` (when given) before the next call.
    #[error("rate limited (HTTP 429){}", .retry_after.map(|d| format!(", retry after {} s", d.as_secs_f64())).unwrap_or_default())]
    RateLimited {
        /// The `Retry-After` delay, when the answer had one.
        retry_after: Option<Duration>,
    },
    /// 409: the queue's delivery is paused. Wait and try again.
    #[error("queue delivery is paused (HTTP 409): {message}")]
    Paused {
        /// Cloudflare's error messages.
        message: String,
    },
    /// 5xx with a Cloudflare envelope, or `success: false` on a 2xx. Retry with back-off.
    #[error("server error (HTTP {status}): {message}")]
    Server {
        /// The HTTP status.
        status: u16,
        /// Cloudflare's error messages.
        message: String,
    },
    /// The answer could not be understood: not JSON, truncated, missing fields, an HTML
    /// error page, an empty body, too large. Retry with back-off.
    #[error("malformed response (HTTP {status}): {detail}")]
    Malformed {
        /// The HTTP status.
        status: u16,
        /// What was wrong, with a short quote of the body.
        detail: String,
    },
    /// The request did not complete: connection refused or reset, DNS, TLS, timeout.
    /// Retry with back-off.
    #[error("transport error: {0}")]
    Transport(String),
}

impl ApiError {
    /// True when retrying cannot help and the bridge should stop.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ApiError::Auth { .. } | ApiError::NotFound { .. } | ApiError::Rejected { .. }
        )
    }

    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::Auth { .. } => "auth",
            ApiError::NotFound { .. } => "not_found",
            ApiError::Rejected { .. } => "rejected",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Paused { .. } => "paused",
            ApiError::Server { .. } => "server",
            ApiError::Malformed { .. } => "malformed",
            ApiError::Transport(_) => "transport",
        }
    }
}

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

/// The Cloudflare Queues client for one queue.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    pull_url: String,
    ack_url: String,
    queue_url: String,
    max_response_bytes: usize,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("queue_url", &self.queue_url)
            .finish_non_exhaustive()
    }
}

/// How to build a [`Client`].
pub struct ClientOptions<'a> {
    /// API base URL, e.g. `https://api.cloudflare.com/client/v4`.
    pub base_url: &'a str,
    /// Account id.
    pub account_id: &'a str,
    /// Queue id.
    pub queue_id: &'a str,
    /// Bearer token.
    pub token: &'a SecretString,
    /// Timeout of one call, covering a slow or stalled body.
    pub request_timeout: Duration,
    /// Largest response accepted.
    pub max_response_bytes: usize,
    /// Keep-alive connections kept per host (at least the number of concurrent calls).
    pub pool_size: usize,
}

impl Client {
    /// Builds a client. TLS certificates are always verified.
    pub fn new(options: ClientOptions<'_>) -> Result<Client, ApiError> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", options.token.expose_secret()))
            .map_err(|_| ApiError::Rejected {
                status: 0,
                message: "the API token contains characters not allowed in an HTTP header".into(),
            })?;
        // Keeps the token out of any debug output of the HTTP stack.
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("cfq-bridge/", env!("CARGO_PKG_VERSION")))
            .timeout(options.request_timeout)
            .connect_timeout(Duration::from_secs(10).min(options.request_timeout))
            .pool_max_idle_per_host(options.pool_size.max(1))
            .tcp_nodelay(true)
            .https_only(false)
            .build()
            .map_err(|e| ApiError::Transport(format!("building the HTTP client: {e}")))?;
        let base = options.base_url.trim_end_matches('/');
        let queue_url = format!(
            "{base}/accounts/{}/queues/{}",
            options.account_id, options.queue_id
        );
        Ok(Client {
            http,
            pull_url: format!("{queue_url}/messages/pull"),
            ack_url: format!("{queue_url}/messages/ack"),
            queue_url,
            max_response_bytes: options.max_response_bytes,
        })
    }

    /// Pulls a batch of messages.
    pub async fn pull(&self, request: PullRequest) -> Result<PullResult, ApiError> {
        let builder = self.http.post(&self.pull_url).json(&request);
        let (status, body) = self.send(builder).await?;
        parse_pull_response(status, &body)
    }

    /// Acknowledges and releases leases in one call.
    pub async fn ack(&self, request: &AckRequest) -> Result<AckResult, ApiError> {
        let builder = self.http.post(&self.ack_url).json(request);
        let (status, body) = self.send(builder).await?;
        parse_ack_response(status, &body)
    }

    /// Fetches the queue's details (name, consumers and their settings).
    pub async fn queue_details(&self) -> Result<Value, ApiError> {
        let (status, body) = self.send(self.http.get(&self.queue_url)).await?;
        envelope_result(status, &body)
    }

    /// Sends a request and reads the body, bounded in size. Classifies HTTP errors.
    async fn send(&self, builder: reqwest::RequestBuilder) -> Result<(u16, Vec<u8>), ApiError> {
        let mut response = builder.send().await.map_err(transport_error)?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let is_html = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("html"));
        if let Some(len) = response.content_length() {
            if len as usize > self.max_response_bytes {
                return Err(ApiError::Malformed {
                    status: status.as_u16(),
                    detail: format!(
                        "response of {len} bytes exceeds queue.max_response_bytes ({})",
                        self.max_response_bytes
                    ),
                });
            }
        }
        // Sized up front when the length is known, so the body is copied once.
        let mut body = Vec::with_capacity(response.content_length().unwrap_or(0) as usize);
        while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
            if body.len() + chunk.len() > self.max_response_bytes {
                return Err(ApiError::Malformed {
                    status: status.as_u16(),
                    detail: format!(
                        "response exceeds queue.max_response_bytes ({})",
                        self.max_response_bytes
                    ),
                });
            }
            body.extend_from_slice(&chunk);
        }
        classify_status(status, retry_after, is_html, &body)?;
        Ok((status.as_u16(), body))
    }
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

/// Classifies an answer by its HTTP status, `Retry-After` header and `Content-Type`
/// (`is_html`), before its body is parsed. Public for the fuzz targets.
pub fn classify_answer(
    status: u16,
    retry_after: Option<&str>,
    is_html: bool,
    body: &[u8],
) -> Result<(), ApiError> {
    let status = StatusCode::from_u16(status).map_err(|_| ApiError::Malformed {
        status,
        detail: "invalid HTTP status".into(),
    })?;
    classify_status(
        status,
        retry_after.and_then(parse_retry_after),
        is_html,
        body,
    )
}

fn transport_error(e: reqwest::Error) -> ApiError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the response body was cut off"
    } else {
        "request failed"
    };
    // `without_url` keeps the message short; the URL carries no secret either way.
    let mut source = String::new();
    let mut err: Option<&dyn std::error::Error> = std::error::Error::source(&e);
    while let Some(inner) = err {
        source = format!("{source}: {inner}");
        err = inner.source();
    }
    ApiError::Transport(format!("{what}{source}"))
}

/// `Retry-After` as seconds (the HTTP-date form is rare from Cloudflare; treated as 1 s).
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(3600)));
    }
    if let Ok(secs) = value.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs.min(3600.0)));
        }
    }
    Some(Duration::from_secs(1))
}

/// Turns non-2xx statuses into errors.
fn classify_status(
    status: StatusCode,
    retry_after: Option<Duration>,
    is_html: bool,
    body: &[u8],
) -> Result<(), ApiError> {
    if status.is_success() {
        return Ok(());
    }
    let code = status.as_u16();
    if code == 429 {
        return Err(ApiError::RateLimited { retry_after });
    }
    let message = error_messages(body, is_html);
    match (code, message) {
        (401 | 403, Ok(message)) => Err(ApiError::Auth {
            status: code,
            message,
        }),
        (404, Ok(message)) => Err(ApiError::NotFound { message }),
        (409, Ok(message)) => Err(ApiError::Paused { message }),
        (400..=499, Ok(message)) => Err(ApiError::Rejected {
            status: code,
            message,
        }),
        (_, Ok(message)) => Err(ApiError::Server {
            status: code,
            message,
        }),
        // 401/403 without a Cloudflare envelope is still an auth failure.
        (401 | 403, Err(detail)) => Err(ApiError::Auth {
            status: code,
            message: detail,
        }),
        (409, Err(detail)) => Err(ApiError::Paused { message: detail }),
        (_, Err(detail)) => Err(ApiError::Malformed {
            status: code,
            detail,
        }),
    }
}

/// The `errors[].message` of a Cloudflare envelope, or a description of why the body is
/// not one.
fn error_messages(body: &[u8], is_html: bool) -> Result<String, String> {
    if let Some(reason) = not_json(body, is_html) {
        return Err(reason);
    }
    let envelope: ErrorEnvelope = serde_json::from_slice(body).map_err(|e| {
        format!(
            "not a JSON envelope ({}): {}",
            parse_error(&e),
            snippet(body)
        )
    })?;
    Ok(join_errors(&envelope.errors))
}

/// Why a body cannot be a JSON envelope at a glance: empty, or an HTML page.
fn not_json(body: &[u8], is_html: bool) -> Option<String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Some("empty response body".into())
    } else if is_html || looks_like_html(body) {
        Some(format!("an HTML page instead of JSON: {}", snippet(body)))
    } else {
        None
    }
}

/// `errors[]` of an envelope as one bounded line: `message (code N); ...`.
fn join_errors(errors: &[Value]) -> String {
    let messages: Vec<String> = errors
        .iter()
        .map(
            |e| match (e.get("code"), e.get("message").and_then(Value::as_str)) {
                (Some(code), Some(msg)) => format!("{msg} (code {code})"),
                (None, Some(msg)) => msg.to_string(),
                _ => e.to_string(),
            },
        )
        .collect();
    if messages.is_empty() {
        "no error message given".into()
    } else {
        printable(&messages.join("; "), MAX_ERROR_MESSAGE)
    }
}

/// Longest error text quoted from an answer's `errors[]`, in characters: they end up in
/// log lines, which must stay short whatever the server sends.
const MAX_ERROR_MESSAGE: usize = 1000;

/// A JSON parse error, bounded: serde quotes the offending value (say, a 1 MB string
/// where a boolean was expected) in full. Found by the `pull_response` fuzz target.
fn parse_error(error: &serde_json::Error) -> String {
    printable(&error.to_string(), SNIPPET)
}

/// `text` on one line (control characters become spaces), cut to `max` characters.
fn printable(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    #[serde(default)]
    errors: Vec<Value>,
}

fn looks_like_html(body: &[u8]) -> bool {
    let start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(0);
    let head = &body[start..body.len().min(start + 15)];
    head.first() == Some(&b'<')
}

/// A printable, bounded quote of a body.
fn snippet(body: &[u8]) -> String {
    let head = String::from_utf8_lossy(&body[..body.len().min(SNIPPET)]);
    // At most SNIPPET bytes, so `printable` cuts nothing; mark what was left out here.
    let mut s = printable(&head, SNIPPET);
    if body.len() > SNIPPET {
        s.push('…');
    }
    s
}

/// Parses a 2xx envelope and returns its `result`.
fn envelope_result(status: u16, body: &[u8]) -> Result<Value, ApiError> {
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
    fn statuses_are_classified() {
        let cf = br#"{"success":false,"errors":[{"code":10000,"message":"Authentication error"}]}"#;
        let e = classify_status(StatusCode::UNAUTHORIZED, None, false, cf).unwrap_err();
        assert!(e.is_fatal());
        assert!(e.to_string().contains("Authentication error (code 10000)"));
        let e = classify_status(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(2)),
            false,
            b"",
        )
        .unwrap_err();
        assert!(
            matches!(e, ApiError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(2))
        );
        let e = classify_status(
            StatusCode::BAD_GATEWAY,
            None,
            true,
            b"<html><body>502</body></html>",
        )
        .unwrap_err();
        assert!(
            matches!(e, ApiError::Malformed { status: 502, .. }) && !e.is_fatal(),
            "{e}"
        );
        let e = classify_status(StatusCode::from_u16(520).unwrap(), None, false, b"").unwrap_err();
        assert!(e.to_string().contains("empty response body"), "{e}");
        let e = classify_status(StatusCode::CONFLICT, None, false, cf).unwrap_err();
        assert!(matches!(e, ApiError::Paused { .. }));
        let e = classify_status(StatusCode::INTERNAL_SERVER_ERROR, None, false, cf).unwrap_err();
        assert!(matches!(e, ApiError::Server { status: 500, .. }));
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
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::from_secs(1))
        );
    }
}
