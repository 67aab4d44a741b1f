//! Errors of the Cloudflare API client: [`ApiError`], what each class means for the caller
//! (stop, wait, back off), and the classification of an HTTP answer into one. Text quoted
//! from an answer is bounded and kept on one line, because it ends up in log lines.

use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;

/// Longest part of an unexpected response body quoted in an error.
pub(crate) const SNIPPET: usize = 200;

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

/// `Retry-After` as seconds (the HTTP-date form is rare from Cloudflare; treated as 1 s).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
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
pub(crate) fn classify_status(
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
pub(crate) fn not_json(body: &[u8], is_html: bool) -> Option<String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Some("empty response body".into())
    } else if is_html || looks_like_html(body) {
        Some(format!("an HTML page instead of JSON: {}", snippet(body)))
    } else {
        None
    }
}

/// `errors[]` of an envelope as one bounded line: `message (code N); ...`.
pub(crate) fn join_errors(errors: &[Value]) -> String {
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
pub(crate) const MAX_ERROR_MESSAGE: usize = 1000;

/// A JSON parse error, bounded: serde quotes the offending value (say, a 1 MB string
/// where a boolean was expected) in full. Found by the `pull_response` fuzz target.
pub(crate) fn parse_error(error: &serde_json::Error) -> String {
    printable(&error.to_string(), SNIPPET)
}

/// `text` on one line (control characters become spaces), cut to `max` characters.
pub(crate) fn printable(text: &str, max: usize) -> String {
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
pub(crate) fn snippet(body: &[u8]) -> String {
    let head = String::from_utf8_lossy(&body[..body.len().min(SNIPPET)]);
    // At most SNIPPET bytes, so `printable` cuts nothing; mark what was left out here.
    let mut s = printable(&head, SNIPPET);
    if body.len() > SNIPPET {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::from_secs(1))
        );
    }
}
