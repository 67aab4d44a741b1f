//! The HTTP front: routing, authentication, request recording, scripted responses and
//! faults, then the Cloudflare API handlers (publish, publish batch, pull, ack; queue
//! details are in [`crate::details`]). The admin API lives in [`crate::admin`].
//!
//! Routes are matched by hand on one axum fallback handler, so every unknown path or
//! method gets a Cloudflare-shaped error. API paths are accepted with and without the
//! `/client/v4` prefix.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, Method, Response, StatusCode};

use crate::admin;
use crate::details;
use crate::faults::{self, Endpoint, FaultAction};
use crate::registry::lock;
use crate::shared::{json_response, RecordedRequest, Shared};
use crate::wire::{self, ApiError};

/// Largest request body read, in bytes (a 256 KB batch of escaped text fits easily).
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// A matched API route.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route<'a> {
    endpoint: Endpoint,
    account_id: &'a str,
    queue_id: &'a str,
}

/// Matches an API path (without `/client/v4`) and method.
fn route<'a>(method: &Method, path: &'a str) -> Result<Route<'a>, ApiError> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let mut parts = path.split('/');
    let (Some(""), Some("accounts"), Some(account_id), Some("queues"), Some(queue_id)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(ApiError::NoRoute);
    };
    let rest: Vec<&str> = parts.collect();
    let (endpoint, expected) = match rest.as_slice() {
        [] => (Endpoint::QueueDetails, Method::GET),
        ["messages"] => (Endpoint::Publish, Method::POST),
        ["messages", "batch"] => (Endpoint::PublishBatch, Method::POST),
        ["messages", "pull"] => (Endpoint::Pull, Method::POST),
        ["messages", "ack"] => (Endpoint::Ack, Method::POST),
        _ => return Err(ApiError::NoRoute),
    };
    for (field, value) in [("account_id", account_id), ("queue_id", queue_id)] {
        if value.is_empty() {
            return Err(ApiError::NoRoute);
        }
        if value.chars().count() > wire::MAX_ID_LEN {
            return Err(ApiError::MalformedId(format!(
                "{field} must be at most {} characters, got {}",
                wire::MAX_ID_LEN,
                value.chars().count()
            )));
        }
    }
    if *method != expected {
        return Err(ApiError::MethodNotAllowed);
    }
    Ok(Route {
        endpoint,
        account_id,
        queue_id,
    })
}

fn error_response(error: &ApiError) -> Response<Body> {
    let (status, code) = error.status_and_code();
    json_response(status, wire::failure_envelope(code, &error.to_string()))
}

/// The single entry point of the HTTP server.
pub(crate) async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response<Body> {
    let path = request.uri().path().to_owned();
    if let Some(admin_path) = path.strip_prefix(admin::PREFIX) {
        if !admin::peer_allowed(peer.ip()) {
            tracing::warn!(peer = %peer, "admin API refused to a non-loopback peer");
            return json_response(
                StatusCode::FORBIDDEN,
                br#"{"error":"the admin API only answers loopback peers"}"#.to_vec(),
            );
        }
        let admin_path = admin_path.to_owned();
        return admin::handle(&shared, request, &admin_path).await;
    }
    let api_path = path.strip_prefix("/client/v4").unwrap_or(&path);
    let method = request.method().clone();
    let route = route(&method, api_path);
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(body) => body,
        Err(error) => return error_response(&ApiError::BodyUnreadable(error.to_string())),
    };
    if let Some(recorded) = &shared.recorded {
        let entry = record(
            &parts.method,
            &path,
            route.as_ref().ok(),
            &parts.headers,
            &body,
        );
        lock(recorded).push(entry);
    }
    let route = match route {
        Ok(route) => route,
        Err(error) => return error_response(&error),
    };
    let faults = if shared.faults_active.load(Ordering::Acquire) {
        Some(Arc::clone(
            &shared.faults.read().unwrap_or_else(|p| p.into_inner()),
        ))
    } else {
        None
    };
    if let Some(delay) = faults.as_ref().and_then(|f| f.latency(route.endpoint)) {
        tokio::time::sleep(delay).await;
    }
    if !shared.authorized(&parts.headers) {
        return error_response(&ApiError::Unauthenticated);
    }
    if let Some(script) = shared.next_script(route.endpoint) {
        tracing::debug!(
            endpoint = route.endpoint.as_str(),
            status = script.status,
            "answering with a scripted response"
        );
        if script.apply {
            let _ = dispatch(&shared, &route, &body);
        }
        return faults::scripted_response(script);
    }
    let action = faults
        .as_ref()
        .and_then(|f| f.decide(route.endpoint, route.queue_id));
    match action {
        None => dispatch(&shared, &route, &body),
        Some(FaultAction::AppliedThen500) => {
            let applied = dispatch(&shared, &route, &body);
            tracing::debug!(
                endpoint = route.endpoint.as_str(),
                applied_status = applied.status().as_u16(),
                "fault: applied then 500"
            );
            faults::fault_response(FaultAction::AppliedThen500)
        }
        Some(action) => {
            tracing::debug!(
                endpoint = route.endpoint.as_str(),
                ?action,
                "fault injected"
            );
            faults::fault_response(action)
        }
    }
}

fn record(
    method: &Method,
    path: &str,
    route: Option<&Route<'_>>,
    headers: &HeaderMap,
    body: &Bytes,
) -> RecordedRequest {
    let headers = headers
        .iter()
        .filter(|(name, _)| *name != header::AUTHORIZATION && name.as_str() != "x-auth-key")
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    RecordedRequest {
        method: method.as_str().to_owned(),
        path: path.to_owned(),
        endpoint: route.map(|r| r.endpoint),
        headers,
        body: serde_json::from_slice(body).ok(),
    }
}

/// Runs the real handler of an endpoint and wraps its answer in an HTTP response.
fn dispatch(shared: &Shared, route: &Route<'_>, body: &[u8]) -> Response<Body> {
    let (status, body) = answer(shared, route, body);
    json_response(status, body)
}

/// Runs the real handler of an endpoint: the status and the JSON envelope it answers.
fn answer(shared: &Shared, route: &Route<'_>, body: &[u8]) -> (StatusCode, Vec<u8>) {
    let result = match route.endpoint {
        Endpoint::Pull => match pull(shared, route, body) {
            Ok(Some(body)) => Ok(body),
            Ok(None) => {
                tracing::debug!(
                    queue_id = route.queue_id,
                    "pull refused: no HTTP pull consumer"
                );
                return details::pull_refused();
            }
            Err(error) => Err(error),
        },
        Endpoint::Ack => ack(shared, route, body),
        Endpoint::Publish => publish(shared, route, body),
        Endpoint::PublishBatch => publish_batch(shared, route, body),
        Endpoint::QueueDetails => Ok(details::queue_details(
            shared,
            route.account_id,
            route.queue_id,
        )),
    };
    match result {
        Ok(body) => (StatusCode::OK, body),
        Err(error) => {
            tracing::debug!(endpoint = route.endpoint.as_str(), %error, "request rejected");
            let (status, code) = error.status_and_code();
            (status, wire::failure_envelope(code, &error.to_string()))
        }
    }
}

/// Runs one API call in process (see [`crate::Emulator::request`]): the same handler an
/// HTTP request of `endpoint` reaches once routing, authentication, scripts and faults
/// are past. Returns the HTTP status and the response body.
pub(crate) fn answer_in_process(
    shared: &Shared,
    endpoint: Endpoint,
    account_id: &str,
    queue_id: &str,
    body: &[u8],
) -> (StatusCode, Vec<u8>) {
    let route = Route {
        endpoint,
        account_id,
        queue_id,
    };
    answer(shared, &route, body)
}

/// A pull: the response body, or `None` when the queue has no HTTP pull consumer.
fn pull(shared: &Shared, route: &Route<'_>, body: &[u8]) -> Result<Option<Vec<u8>>, ApiError> {
    let params = wire::parse_body::<wire::PullRequest>(body)?.validate()?;
    let visibility = std::time::Duration::from_millis(params.visibility_timeout_ms);
    let pulled = shared
        .registry
        .with_queue(route.account_id, route.queue_id, |queue, now| {
            if !queue.has_http_pull_consumer() {
                return None;
            }
            let deliveries = queue.pull(now, params.batch_size, visibility);
            Some((deliveries, queue.metrics()))
        });
    Ok(pulled.map(|(deliveries, metrics)| wire::pull_response(&deliveries, &metrics)))
}

fn ack(shared: &Shared, route: &Route<'_>, body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let request: wire::AckRequest<'_> = wire::parse_body(body)?;
    let acks = request.acks.unwrap_or_default();
    let retries = request.retries.unwrap_or_default();
    let mut delays = Vec::with_capacity(retries.len());
    for (i, retry) in retries.iter().enumerate() {
        let delay =
            wire::delay_seconds(&format!("retries[{i}].delay_seconds"), retry.delay_seconds)
                .map_err(ApiError::InvalidBody)?;
        delays.push(delay);
    }
    let outcome = shared
        .registry
        .with_queue(route.account_id, route.queue_id, |queue, now| {
            queue.ack(
                now,
                acks.iter().map(|a| a.lease_id.as_ref()),
                retries
                    .iter()
                    .zip(delays.iter().copied())
                    .map(|(r, d)| (r.lease_id.as_ref(), d)),
            )
        });
    Ok(wire::ack_response(
        outcome.ack_count,
        outcome.retry_count,
        &outcome.warnings,
    ))
}

fn publish(shared: &Shared, route: &Route<'_>, body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let message: wire::PublishMessage = wire::parse_body(body)?;
    let valid = message.validate("", std::time::Duration::ZERO)?;
    let metrics = shared
        .registry
        .with_queue(route.account_id, route.queue_id, |queue, now| {
            shared.registry.publish_valid(queue, now, &valid);
            queue.metrics()
        });
    Ok(wire::publish_response(&metrics))
}

fn publish_batch(shared: &Shared, route: &Route<'_>, body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let batch: wire::PublishBatch = wire::parse_body(body)?;
    let batch_delay = wire::delay_seconds("delay_seconds", batch.delay_seconds)
        .map_err(ApiError::InvalidBatchDelay)?;
    let Some(messages) = batch.messages else {
        return Err(ApiError::InvalidBody("messages is required".into()));
    };
    if messages.len() > wire::MAX_BATCH_MESSAGES {
        return Err(ApiError::BatchTooMany(format!(
            "messages has {} entries, more than {}",
            messages.len(),
            wire::MAX_BATCH_MESSAGES
        )));
    }
    let mut valid = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        valid.push(message.validate(&format!("messages[{i}]."), batch_delay)?);
    }
    let total: usize = valid.iter().map(|m| m.size).sum();
    if total > wire::MAX_BATCH_BYTES {
        return Err(ApiError::BatchTooLarge(format!(
            "the bodies add up to {total} bytes, more than {} (256 KB)",
            wire::MAX_BATCH_BYTES
        )));
    }
    let metrics = shared
        .registry
        .with_queue(route.account_id, route.queue_id, |queue, now| {
            for message in &valid {
                shared.registry.publish_valid(queue, now, message);
            }
            queue.metrics()
        });
    Ok(wire::publish_response(&metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_paths_and_methods() {
        let r = route(&Method::POST, "/accounts/a/queues/q/messages/pull").unwrap();
        assert_eq!(
            (r.endpoint, r.account_id, r.queue_id),
            (Endpoint::Pull, "a", "q")
        );
        let r = route(&Method::GET, "/accounts/a/queues/q").unwrap();
        assert_eq!(r.endpoint, Endpoint::QueueDetails);
        assert_eq!(
            route(&Method::GET, "/accounts/a/queues/q/messages/pull"),
            Err(ApiError::MethodNotAllowed)
        );
        assert_eq!(
            route(&Method::POST, "/accounts/a/queues/q/messages/peek"),
            Err(ApiError::NoRoute)
        );
        assert_eq!(route(&Method::POST, "/other"), Err(ApiError::NoRoute));
        let long = "x".repeat(33);
        assert!(matches!(
            route(&Method::POST, &format!("/accounts/a/queues/{long}/messages")),
            Err(ApiError::MalformedId(m)) if m.contains("queue_id")
        ));
    }
}
