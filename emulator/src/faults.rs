//! Fault injection and scripted responses.
//!
//! [`Faults`] are probabilistic: each API request (of the endpoints the faults apply to)
//! first waits `latency_ms` plus a uniform jitter, then, for a pull of a paused queue,
//! gets a 409; otherwise each fault kind rolls its own die, in this order: 429 with
//! `Retry-After`, 500, HTML 502, empty 520, and "applied then 500" (the request takes
//! effect, the answer is a 500). The first kind whose roll hits answers the request.
//!
//! [`ScriptedResponse`]s are deterministic: queued per [`Endpoint`], each answers exactly
//! one request of that endpoint (after authentication, before faults).

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::wire;

/// The API endpoints, for scripts, fault filters and recorded requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `POST .../messages/pull`.
    Pull,
    /// `POST .../messages/ack`.
    Ack,
    /// `POST .../messages` (publish one).
    Publish,
    /// `POST .../messages/batch` (publish a batch).
    PublishBatch,
    /// `GET /accounts/{account_id}/queues/{queue_id}`.
    QueueDetails,
}

impl Endpoint {
    /// The snake_case name used by the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Pull => "pull",
            Endpoint::Ack => "ack",
            Endpoint::Publish => "publish",
            Endpoint::PublishBatch => "publish_batch",
            Endpoint::QueueDetails => "queue_details",
        }
    }
}

/// Injected faults. `Faults::default()` injects none. Rates are probabilities from 0.0
/// to 1.0, rolled independently for each request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share of requests answered with HTTP 500 and a Cloudflare error envelope
    /// (0.0..=1.0).
    #[arg(long = "fault-500-rate", value_name = "RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub error_500_rate: f64,
    /// Share of requests answered with HTTP 429 and a `Retry-After` header (0.0..=1.0).
    #[arg(long = "fault-429-rate", value_name = "RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub rate_limit_429_rate: f64,
    /// `Retry-After` value sent with injected 429s, in seconds.
    #[arg(
        long = "fault-retry-after-secs",
        value_name = "SECS",
        default_value_t = 1
    )]
    pub retry_after_secs: u64,
    /// Share of requests that take effect but are answered with HTTP 500 (0.0..=1.0).
    #[arg(long = "fault-applied-then-500-rate", value_name = "RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub applied_then_500_rate: f64,
    /// Share of requests answered with an HTML 502 page, as an edge proxy would
    /// (0.0..=1.0).
    #[arg(long = "fault-html-502-rate", value_name = "RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub html_502_rate: f64,
    /// Share of requests answered with HTTP 520 and an empty body (0.0..=1.0).
    #[arg(long = "fault-empty-520-rate", value_name = "RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub empty_520_rate: f64,
    /// Latency added to every request, in milliseconds.
    #[arg(long = "fault-latency-ms", value_name = "MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Extra random latency, uniform from 0 to this many milliseconds.
    #[arg(long = "fault-jitter-ms", value_name = "MS", default_value_t = 0)]
    pub jitter_ms: u64,
    /// Pause delivery of every queue: pulls get HTTP 409.
    #[arg(long = "fault-paused")]
    pub paused: bool,
    /// Pause delivery of these queue ids only (repeatable): their pulls get HTTP 409.
    #[arg(long = "fault-paused-queue", value_name = "QUEUE_ID")]
    pub paused_queues: Vec<String>,
    /// Endpoints the faults apply to (repeatable); none means all. Pausing always applies
    /// to pulls only.
    #[arg(long = "fault-endpoint", value_name = "ENDPOINT")]
    pub endpoints: Vec<Endpoint>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            error_500_rate: 0.0,
            rate_limit_429_rate: 0.0,
            retry_after_secs: 1,
            applied_then_500_rate: 0.0,
            html_502_rate: 0.0,
            empty_520_rate: 0.0,
            latency_ms: 0,
            jitter_ms: 0,
            paused: false,
            paused_queues: Vec::new(),
            endpoints: Vec::new(),
        }
    }
}

/// A fault setting that cannot be applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FaultsError {
    /// A rate outside 0.0..=1.0.
    #[error("{field} must be a probability from 0.0 to 1.0, got {value}")]
    RateOutOfRange {
        /// The field name.
        field: &'static str,
        /// The value given.
        value: f64,
    },
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not a probability from 0.0 to 1.0"))
    }
}

/// What the fault layer decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultAction {
    /// 409: the queue is paused.
    Paused,
    /// 429 with `Retry-After: secs`.
    RateLimited(u64),
    /// 500 with a Cloudflare error envelope.
    Error500,
    /// Apply the request, then answer 500.
    AppliedThen500,
    /// 502 with an HTML page.
    Html502,
    /// 520 with an empty body.
    Empty520,
}

impl Faults {
    /// Checks that every rate is a probability.
    pub fn validate(&self) -> Result<(), FaultsError> {
        let rates = [
            ("error_500_rate", self.error_500_rate),
            ("rate_limit_429_rate", self.rate_limit_429_rate),
            ("applied_then_500_rate", self.applied_then_500_rate),
            ("html_502_rate", self.html_502_rate),
            ("empty_520_rate", self.empty_520_rate),
        ];
        for (field, value) in rates {
            if !(0.0..=1.0).contains(&value) {
                return Err(FaultsError::RateOutOfRange { field, value });
            }
        }
        Ok(())
    }

    /// Whether no fault at all is configured (the fast path skips everything).
    pub fn is_none(&self) -> bool {
        *self
            == Faults {
                retry_after_secs: self.retry_after_secs,
                endpoints: self.endpoints.clone(),
                ..Faults::default()
            }
    }

    fn applies_to(&self, endpoint: Endpoint) -> bool {
        self.endpoints.is_empty() || self.endpoints.contains(&endpoint)
    }

    /// The latency to add to a request of `endpoint`.
    pub(crate) fn latency(&self, endpoint: Endpoint) -> Option<Duration> {
        if !self.applies_to(endpoint) || (self.latency_ms == 0 && self.jitter_ms == 0) {
            return None;
        }
        let jitter = if self.jitter_ms > 0 {
            rand::random_range(0..=self.jitter_ms)
        } else {
            0
        };
        Some(Duration::from_millis(self.latency_ms + jitter))
    }

    /// Rolls the dice for one request.
    pub(crate) fn decide(&self, endpoint: Endpoint, queue_id: &str) -> Option<FaultAction> {
        if endpoint == Endpoint::Pull
            && (self.paused || self.paused_queues.iter().any(|q| q == queue_id))
        {
            return Some(FaultAction::Paused);
        }
        if !self.applies_to(endpoint) {
            return None;
        }
        let hit = |rate: f64| rate > 0.0 && rand::random::<f64>() < rate;
        if hit(self.rate_limit_429_rate) {
            Some(FaultAction::RateLimited(self.retry_after_secs))
        } else if hit(self.error_500_rate) {
            Some(FaultAction::Error500)
        } else if hit(self.html_502_rate) {
            Some(FaultAction::Html502)
        } else if hit(self.empty_520_rate) {
            Some(FaultAction::Empty520)
        } else if hit(self.applied_then_500_rate) {
            Some(FaultAction::AppliedThen500)
        } else {
            None
        }
    }
}

/// Error code of the injected 500s.
pub const CODE_INTERNAL: u32 = 10001;
/// Error code of the 409 answered to pulls of a paused queue.
pub const CODE_PAUSED: u32 = 11001;
/// Error code of the injected 429s (Cloudflare's API rate-limit code).
pub const CODE_RATE_LIMITED: u32 = 971;

const HTML_502: &str = "<!DOCTYPE html>\n<html>\n<head><title>502 Bad Gateway</title></head>\n\
<body>\n<center><h1>502 Bad Gateway</h1></center>\n<hr><center>cloudflare</center>\n\
</body>\n</html>\n";

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Builds the answer for a fault (for `AppliedThen500` the caller applies the request
/// first).
pub(crate) fn fault_response(action: FaultAction) -> Response<Body> {
    match action {
        FaultAction::Paused => json_response(
            StatusCode::CONFLICT,
            wire::failure_envelope(
                CODE_PAUSED,
                "queue_delivery_paused: message delivery is paused for this queue",
            ),
        ),
        FaultAction::RateLimited(secs) => {
            let mut response = json_response(
                StatusCode::TOO_MANY_REQUESTS,
                wire::failure_envelope(
                    CODE_RATE_LIMITED,
                    "Please wait and consider throttling your request speed",
                ),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            response
        }
        FaultAction::Error500 | FaultAction::AppliedThen500 => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            wire::failure_envelope(
                CODE_INTERNAL,
                "Internal server error (injected by the emulator)",
            ),
        ),
        FaultAction::Html502 => {
            let mut response = Response::new(Body::from(HTML_502));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=UTF-8"),
            );
            response
        }
        FaultAction::Empty520 => {
            let mut response = Response::new(Body::empty());
            // 520 is a valid status code (100..=999), so this cannot fail.
            *response.status_mut() = StatusCode::from_u16(520).unwrap_or(StatusCode::BAD_GATEWAY);
            response
        }
    }
}

/// A raw answer queued for the next request of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptedResponse {
    /// HTTP status code (any value from 100 to 999).
    pub status: u16,
    /// `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// Extra headers (for example `Retry-After`).
    pub headers: Vec<(String, String)>,
    /// The body, sent as is.
    pub body: Vec<u8>,
    /// Let the request take effect first (its real answer is discarded).
    pub apply: bool,
    /// Send the body a few bytes at a time, waiting this long between chunks (a slow,
    /// "slowloris" server).
    pub drip: Option<Duration>,
}

impl ScriptedResponse {
    /// A JSON answer with the given status and body text.
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        ScriptedResponse {
            status,
            content_type: Some("application/json".into()),
            headers: Vec::new(),
            body: body.into().into_bytes(),
            apply: false,
            drip: None,
        }
    }

    /// An answer with any content type (or none) and raw body bytes.
    pub fn raw(status: u16, content_type: Option<&str>, body: impl Into<Vec<u8>>) -> Self {
        ScriptedResponse {
            status,
            content_type: content_type.map(str::to_owned),
            headers: Vec::new(),
            body: body.into(),
            apply: false,
            drip: None,
        }
    }

    /// Lets the request take effect before this answer is sent.
    pub fn applied(mut self) -> Self {
        self.apply = true;
        self
    }

    /// Sends the body slowly: a chunk of a few bytes every `interval`.
    pub fn dripped(mut self, interval: Duration) -> Self {
        self.drip = Some(interval);
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Bytes sent per chunk by a dripping response.
const DRIP_CHUNK: usize = 4;

/// Builds the HTTP answer for a scripted response.
pub(crate) fn scripted_response(script: ScriptedResponse) -> Response<Body> {
    let length = script.body.len();
    let body = match script.drip {
        None => Body::from(script.body),
        Some(interval) => {
            let chunks: Vec<bytes::Bytes> = script
                .body
                .chunks(DRIP_CHUNK)
                .map(bytes::Bytes::copy_from_slice)
                .collect();
            let stream = futures_util::stream::unfold(
                (chunks.into_iter(), true),
                move |(mut rest, first)| async move {
                    let chunk = rest.next()?;
                    if !first {
                        tokio::time::sleep(interval).await;
                    }
                    Some((Ok::<_, std::convert::Infallible>(chunk), (rest, false)))
                },
            );
            Body::from_stream(stream)
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(script.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    if let Some(content_type) = &script.content_type {
        if let Ok(value) = HeaderValue::from_str(content_type) {
            headers.insert(header::CONTENT_TYPE, value);
        }
    }
    if script.drip.is_some() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    for (name, value) in &script.headers {
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_injects_nothing() {
        let faults = Faults::default();
        assert!(faults.is_none());
        for _ in 0..100 {
            assert_eq!(faults.decide(Endpoint::Pull, "q"), None);
        }
        assert_eq!(faults.latency(Endpoint::Pull), None);
    }

    #[test]
    fn certain_faults_always_hit_and_respect_endpoints() {
        let faults = Faults {
            error_500_rate: 1.0,
            endpoints: vec![Endpoint::Ack],
            ..Faults::default()
        };
        assert_eq!(
            faults.decide(Endpoint::Ack, "q"),
            Some(FaultAction::Error500)
        );
        assert_eq!(faults.decide(Endpoint::Pull, "q"), None);
    }

    #[test]
    fn pause_only_hits_pulls_of_paused_queues() {
        let faults = Faults {
            paused_queues: vec!["a".into()],
            ..Faults::default()
        };
        assert_eq!(
            faults.decide(Endpoint::Pull, "a"),
            Some(FaultAction::Paused)
        );
        assert_eq!(faults.decide(Endpoint::Pull, "b"), None);
        assert_eq!(faults.decide(Endpoint::Ack, "a"), None);
    }

    #[test]
    fn rates_are_validated() {
        let faults = Faults {
            html_502_rate: 1.5,
            ..Faults::default()
        };
        assert!(faults.validate().is_err());
        assert!(parse_rate("0.5").is_ok());
        assert!(parse_rate("-0.1").is_err());
    }
}
