//! State shared by the HTTP handlers (API and admin) and the [`crate::Emulator`] handle:
//! the queues, accepted tokens, injected faults, scripted answers and recorded requests.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::faults::{Endpoint, Faults, ScriptedResponse};
use crate::registry::{lock, Registry};
use crate::EmulatorConfig;

/// One API request as the emulator received it (recorded when
/// [`EmulatorConfig::record_requests`] is on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Request path, e.g. `/client/v4/accounts/a/queues/q/messages/pull`.
    pub path: String,
    /// The endpoint the path matched, if any.
    pub endpoint: Option<Endpoint>,
    /// Headers (names in lower case), without `authorization` and `x-auth-key`.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON; `None` when empty or not JSON.
    pub body: Option<serde_json::Value>,
}

/// State shared by every request handler and the [`crate::Emulator`] handle.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The queues.
    pub registry: Registry,
    /// Accepted tokens; empty accepts any non-empty token.
    tokens: Vec<String>,
    /// Faults currently injected.
    pub(crate) faults: RwLock<Arc<Faults>>,
    /// Fast-path flag: false when `faults` injects nothing.
    pub(crate) faults_active: AtomicBool,
    /// The faults configured at start, restored by a reset.
    initial_faults: Faults,
    /// Scripted answers per endpoint.
    scripts: Mutex<HashMap<Endpoint, VecDeque<ScriptedResponse>>>,
    /// Number of scripted answers queued, to skip the lock when there are none.
    scripted: AtomicUsize,
    /// Recorded requests, when recording is on.
    pub(crate) recorded: Option<Mutex<Vec<RecordedRequest>>>,
}

impl Shared {
    /// Shared state for a configuration.
    pub fn new(config: EmulatorConfig) -> Self {
        let faults_active = !config.faults.is_none();
        Shared {
            registry: Registry::new(config.max_retries, config.dead_letter_queue),
            tokens: config.tokens,
            faults_active: AtomicBool::new(faults_active),
            faults: RwLock::new(Arc::new(config.faults.clone())),
            initial_faults: config.faults,
            scripts: Mutex::new(HashMap::new()),
            scripted: AtomicUsize::new(0),
            recorded: config.record_requests.then(|| Mutex::new(Vec::new())),
        }
    }

    /// The faults currently injected.
    pub fn faults(&self) -> Faults {
        (**self.faults.read().unwrap_or_else(|p| p.into_inner())).clone()
    }

    /// Replaces the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        let active = !faults.is_none();
        *self.faults.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(faults);
        self.faults_active.store(active, Ordering::Release);
    }

    /// Queues scripted answers for the next requests of `endpoint`.
    pub fn script(&self, endpoint: Endpoint, responses: Vec<ScriptedResponse>) {
        let mut scripts = lock(&self.scripts);
        self.scripted.fetch_add(responses.len(), Ordering::AcqRel);
        scripts.entry(endpoint).or_default().extend(responses);
    }

    pub(crate) fn next_script(&self, endpoint: Endpoint) -> Option<ScriptedResponse> {
        if self.scripted.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut scripts = lock(&self.scripts);
        let script = scripts.get_mut(&endpoint)?.pop_front()?;
        self.scripted.fetch_sub(1, Ordering::AcqRel);
        Some(script)
    }

    /// The requests recorded so far (empty when recording is off).
    pub fn recorded_requests(&self) -> Vec<RecordedRequest> {
        self.recorded
            .as_ref()
            .map(|r| lock(r).clone())
            .unwrap_or_default()
    }

    /// Forgets queues, scripts and recorded requests, and restores the initial faults.
    pub fn reset(&self) {
        self.registry.reset();
        {
            let mut scripts = lock(&self.scripts);
            scripts.clear();
            self.scripted.store(0, Ordering::Release);
        }
        if let Some(recorded) = &self.recorded {
            lock(recorded).clear();
        }
        self.set_faults(self.initial_faults.clone());
    }

    pub(crate) fn authorized(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let key = headers
            .get("x-auth-key")
            .filter(|_| headers.contains_key("x-auth-email"))
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        [bearer, key].into_iter().flatten().any(|token| {
            !token.is_empty() && (self.tokens.is_empty() || self.tokens.iter().any(|t| t == token))
        })
    }
}

/// An HTTP response with a JSON body.
pub(crate) fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
