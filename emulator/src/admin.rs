//! The admin API, under `/_emulator/`, answered to loopback peers only.
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /_emulator/health` | | `{"ok":true}` |
//! | `POST /_emulator/seed` | `{account_id, queue_id, count, body_size, content_type, return_ids?}` | `{"seeded":n,"ids":[..]}` (ids only with `return_ids: true`) |
//! | `POST /_emulator/publish_raw` | `{account_id, queue_id, body, metadata}` | `{"id":".."}` |
//! | `GET /_emulator/stats` | | `{"queues":[{account_id, queue_id, stats}]}` |
//! | `GET /_emulator/stats/{account_id}/{queue_id}` | | the queue's stats |
//! | `PUT` or `POST /_emulator/consumer` | `{account_id, queue_id, http_pull}` | the same, as applied |
//! | `GET /_emulator/faults` | | the faults |
//! | `PUT` or `POST /_emulator/faults` | faults (missing fields take defaults) | the faults |
//! | `POST /_emulator/script` | `{endpoint, responses:[{status, content_type?, headers?, body?, body_base64?, apply?, drip_ms?}]}` | `{"queued":n}` |
//! | `GET /_emulator/requests` | | recorded requests |
//! | `POST /_emulator/reset` | | `{"ok":true}` |
//!
//! Answers are plain JSON (no Cloudflare envelope); errors are `{"error":".."}` with a 4xx
//! status.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{Method, Response, StatusCode};
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::faults::{Endpoint, Faults, ScriptedResponse};
use crate::shared::{json_response, Shared};
use crate::SeedSpec;

/// The path prefix of the admin API.
pub const PREFIX: &str = "/_emulator";

/// Largest admin request body, in bytes.
const MAX_ADMIN_BYTES: usize = 16 * 1024 * 1024;

/// Whether a peer may use the admin API: loopback addresses only (`127.0.0.0/8`, `::1`,
/// and IPv4-mapped loopback `::ffff:127.x.y.z`).
pub fn peer_allowed(peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedRequest {
    account_id: String,
    queue_id: String,
    count: usize,
    #[serde(default = "default_body_size")]
    body_size: usize,
    #[serde(default = "default_content_type")]
    content_type: String,
    #[serde(default)]
    return_ids: bool,
}

fn default_body_size() -> usize {
    100
}

fn default_content_type() -> String {
    "json".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRawRequest {
    account_id: String,
    queue_id: String,
    body: String,
    #[serde(default)]
    metadata: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerRequest {
    account_id: String,
    queue_id: String,
    /// Whether the queue has an HTTP pull consumer.
    http_pull: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptRequest {
    endpoint: Endpoint,
    responses: Vec<ScriptEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptEntry {
    status: u16,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    body_base64: Option<String>,
    #[serde(default)]
    apply: bool,
    #[serde(default)]
    drip_ms: Option<u64>,
}

impl ScriptEntry {
    fn into_response(self) -> Result<ScriptedResponse, String> {
        if !(100..=999).contains(&self.status) {
            return Err(format!(
                "status must be from 100 to 999, got {}",
                self.status
            ));
        }
        let body = match (self.body, self.body_base64) {
            (Some(_), Some(_)) => return Err("give body or body_base64, not both".into()),
            (Some(text), None) => text.into_bytes(),
            (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| format!("body_base64 is not base64: {e}"))?,
            (None, None) => Vec::new(),
        };
        Ok(ScriptedResponse {
            status: self.status,
            content_type: self.content_type,
            headers: self.headers,
            body,
            apply: self.apply,
            drip: self.drip_ms.map(Duration::from_millis),
        })
    }
}

/// An admin request that cannot be answered.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct AdminError {
    status: StatusCode,
    message: String,
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> AdminError {
    AdminError {
        status,
        message: message.to_string(),
    }
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, AdminError> {
    serde_json::from_slice(body).map_err(|e| error(StatusCode::BAD_REQUEST, e))
}

/// Answers one admin request; `path` is the part after [`PREFIX`].
pub(crate) async fn handle(shared: &Arc<Shared>, request: Request, path: &str) -> Response<Body> {
    let method = request.method().clone();
    let answered = match axum::body::to_bytes(request.into_body(), MAX_ADMIN_BYTES).await {
        Ok(body) => answer(shared, &method, path, &body).await,
        Err(e) => Err(error(StatusCode::PAYLOAD_TOO_LARGE, e)),
    };
    match answered {
        Ok(value) => json_response(StatusCode::OK, value.to_string().into_bytes()),
        Err(e) => json_response(
            e.status,
            json!({ "error": e.message }).to_string().into_bytes(),
        ),
    }
}

async fn answer(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    body: &Bytes,
) -> Result<Value, AdminError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["health"]) => Ok(json!({"ok": true})),
        ("POST", ["seed"]) => {
            let request: SeedRequest = parse(body)?;
            let content_type =
                crate::ContentType::parse(&request.content_type).ok_or_else(|| {
                    error(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "content_type must be text, json, bytes or v8, got {:?}",
                            request.content_type
                        ),
                    )
                })?;
            let spec = SeedSpec {
                count: request.count,
                body_size: request.body_size,
                content_type,
            };
            let shared = Arc::clone(shared);
            let (account_id, queue_id) = (request.account_id, request.queue_id);
            let ids = tokio::task::spawn_blocking(move || {
                shared.registry.seed(&account_id, &queue_id, &spec)
            })
            .await
            .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?;
            let mut answer = json!({ "seeded": ids.len() });
            if request.return_ids {
                answer["ids"] = json!(ids);
            }
            Ok(answer)
        }
        ("POST", ["publish_raw"]) => {
            let request: PublishRawRequest = parse(body)?;
            let id = shared.registry.publish_raw(
                &request.account_id,
                &request.queue_id,
                &request.body,
                &request.metadata,
            );
            Ok(json!({ "id": id }))
        }
        ("GET", ["stats"]) => {
            shared.registry.sweep();
            let mut queues = Vec::new();
            for queue in shared.registry.all() {
                let guard = crate::registry::lock(&queue);
                queues.push(json!({
                    "account_id": guard.account_id,
                    "queue_id": guard.queue_id,
                    "stats": guard.stats(),
                }));
            }
            Ok(json!({ "queues": queues }))
        }
        ("GET", ["stats", account_id, queue_id]) => {
            let stats = shared.registry.stats(account_id, queue_id);
            Ok(serde_json::to_value(stats)
                .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?)
        }
        ("PUT" | "POST", ["consumer"]) => {
            let request: ConsumerRequest = parse(body)?;
            shared.registry.set_pull_consumer(
                &request.account_id,
                &request.queue_id,
                request.http_pull,
            );
            tracing::info!(
                account_id = %request.account_id,
                queue_id = %request.queue_id,
                http_pull = request.http_pull,
                "HTTP pull consumer changed through the admin API"
            );
            Ok(json!({
                "account_id": request.account_id,
                "queue_id": request.queue_id,
                "http_pull": request.http_pull,
            }))
        }
        ("GET", ["faults"]) => Ok(json!(shared.faults())),
        ("PUT" | "POST", ["faults"]) => {
            let faults: Faults = parse(body)?;
            faults
                .validate()
                .map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
            tracing::info!(?faults, "faults changed through the admin API");
            shared.set_faults(faults.clone());
            Ok(json!(faults))
        }
        ("POST", ["script"]) => {
            let request: ScriptRequest = parse(body)?;
            let responses = request
                .responses
                .into_iter()
                .map(ScriptEntry::into_response)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
            let queued = responses.len();
            shared.script(request.endpoint, responses);
            Ok(json!({ "queued": queued }))
        }
        ("GET", ["requests"]) => Ok(json!(shared.recorded_requests())),
        ("POST", ["reset"]) => {
            shared.reset();
            tracing::info!("emulator reset through the admin API");
            Ok(json!({"ok": true}))
        }
        _ => Err(error(
            StatusCode::NOT_FOUND,
            format!("no admin route {method} {PREFIX}{path} (see docs/emulator.md)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_peers_are_allowed() {
        assert!(peer_allowed("127.0.0.1".parse().unwrap()));
        assert!(peer_allowed("127.3.2.1".parse().unwrap()));
        assert!(peer_allowed("::1".parse().unwrap()));
        assert!(peer_allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!peer_allowed("10.0.0.1".parse().unwrap()));
        assert!(!peer_allowed("192.168.1.1".parse().unwrap()));
        assert!(!peer_allowed("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!peer_allowed("2001:db8::1".parse().unwrap()));
    }

    #[tokio::test]
    async fn the_consumer_route_attaches_and_removes_the_pull_consumer() {
        let shared = Arc::new(Shared::new(crate::EmulatorConfig::default()));
        let set = |http_pull: bool| {
            Bytes::from(
                json!({"account_id": "a", "queue_id": "q", "http_pull": http_pull}).to_string(),
            )
        };
        let has = |shared: &Shared| {
            shared
                .registry
                .with_queue("a", "q", |queue, _| queue.has_http_pull_consumer())
        };
        assert!(has(&shared), "a queue has a pull consumer by default");
        let answer_off = answer(&shared, &Method::PUT, "/consumer", &set(false))
            .await
            .unwrap();
        assert_eq!(answer_off["http_pull"], false);
        assert!(!has(&shared));
        answer(&shared, &Method::POST, "/consumer", &set(true))
            .await
            .unwrap();
        assert!(has(&shared));
        let refused = answer(
            &shared,
            &Method::PUT,
            "/consumer",
            &Bytes::from_static(br#"{"account_id":"a","queue_id":"q"}"#),
        )
        .await
        .unwrap_err();
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    }
}
