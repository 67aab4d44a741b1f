//! The metrics listener: `/metrics` (Prometheus text), `/health` and `/ready`, served on
//! `[metrics] listen`, and the catalogue of every family the bridge exports.
//!
//! The values themselves live in [`crate::stats::Stats`], one per route. This module
//! installs the recorder they register with, describes each family once, and answers the
//! three paths:
//! - `/metrics`: every family of [`FAMILIES`], labelled `route` and `queue_id`;
//! - `/health`: 200 while the process runs (the answer comes from its own runtime);
//! - `/ready`: 200 when every running route's source reached its API recently and its
//!   sink answers; otherwise 503 with a JSON body saying why.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cfq_sinks::Sink;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use crate::stats::Stats;

/// A family's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// A current value.
    Gauge,
    /// A distribution, in buckets.
    Histogram,
}

impl Kind {
    /// The name Prometheus gives the type (`# TYPE`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported family: what the README's metrics table documents.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// The metric name.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// Labels beyond `route` and `queue_id`, comma-separated (empty when none).
    pub labels: &'static str,
    /// What it means (`# HELP`).
    pub help: &'static str,
}

const fn family(
    name: &'static str,
    kind: Kind,
    labels: &'static str,
    help: &'static str,
) -> Family {
    Family {
        name,
        kind,
        labels,
        help,
    }
}

use Kind::{Counter, Gauge, Histogram};

/// Every family the bridge exports. Each carries the labels `route` and `queue_id`.
pub const FAMILIES: &[Family] = &[
    family("cfq_messages_pulled_total", Counter, "", "Messages received from pull calls."),
    family("cfq_messages_delivered_total", Counter, "", "Records the sink confirmed as durable (including duplicates and dead-lettered records)."),
    family("cfq_messages_acked_total", Counter, "", "Leases acknowledged by ack calls that went through."),
    family("cfq_messages_retried_total", Counter, "", "Leases handed back for redelivery (the retries of ack calls that went through)."),
    family("cfq_messages_released_total", Counter, "reason", "Records given back without delivery, by reason: lease_expiring, shutdown, v8."),
    family("cfq_messages_dead_lettered_total", Counter, "", "Records the sink stored whole at its own dead-letter destination."),
    family("cfq_messages_redelivered_total", Counter, "", "Pulled messages on their second or later delivery (attempts > 1)."),
    family("cfq_late_acks_total", Counter, "", "Leases acknowledged after the lease deadline the bridge tracked (a duplicate is possible)."),
    family("cfq_decode_errors_total", Counter, "kind", "Messages not forwarded because they could not be decoded, by kind: content_type, base64, json, oversized."),
    family("cfq_api_errors_total", Counter, "class", "Failed API calls, by class: 429, 409, 5xx, 4xx, transport, malformed."),
    family("cfq_sink_errors_total", Counter, "sink, class", "Records the sink failed, by sink kind and class: transient, permanent."),
    family("cfq_pulls_total", Counter, "", "Pull calls that succeeded."),
    family("cfq_empty_pulls_total", Counter, "", "Pull calls that returned no message (billed operations)."),
    family("cfq_ack_calls_total", Counter, "", "Ack calls that went through."),
    family("cfq_ack_call_failures_total", Counter, "", "Ack calls that failed and were retried."),
    family("cfq_ack_warnings_total", Counter, "", "Leases an ack call answered with a warning."),
    family("cfq_duplicates_total", Counter, "", "Confirmed records the destination already held (deduplicated redeliveries)."),
    family("cfq_journal_recovered_total", Counter, "", "Leases acknowledged from the ack journal after a restart."),
    family("cfq_journal_skipped_lines_total", Counter, "", "Ack journal lines skipped at start because they failed their checksum."),
    family("cfq_journal_dropped_total", Counter, "", "Ack journal leases the API refused for good (HTTP 400), dropped."),
    family("cfq_archive_records_read_total", Counter, "", "Records read from archive files, before the filters."),
    family("cfq_archive_filtered_total", Counter, "", "Archive records left out by the since_ms, until_ms and content_types filters."),
    family("cfq_archive_malformed_lines_total", Counter, "", "Archive lines that are not records, skipped."),
    family("cfq_archive_unreadable_tails_total", Counter, "", "Archive files whose end could not be read (their readable part was read)."),
    family("cfq_archive_reoffered_total", Counter, "", "Archive records the sink refused, offered again after their retry delay."),
    family("cfq_archive_checkpoint_failures_total", Counter, "", "Archive checkpoint writes that failed (tried again at the next write)."),
    family("cfq_queue_backlog_messages", Gauge, "", "Messages in the queue, as the last API answer reported."),
    family("cfq_queue_oldest_message_age_seconds", Gauge, "", "Age of the oldest message in the queue, from the last API answer (0 when unknown or empty)."),
    family("cfq_in_flight_messages", Gauge, "", "Records read and not yet settled."),
    family("cfq_pullers", Gauge, "", "Pull loops running."),
    family("cfq_pull_duration_seconds", Histogram, "", "Duration of pull calls."),
    family("cfq_sink_duration_seconds", Histogram, "sink", "Duration of one delivery of a batch to the sink, until its outcomes."),
    family("cfq_ack_duration_seconds", Histogram, "", "Duration of ack calls."),
    family("cfq_end_to_end_latency_seconds", Histogram, "", "From a message's publish time to its sink's confirmation."),
];

/// Buckets of the call durations, in seconds.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of the end-to-end latency, in seconds (messages can wait in a queue for days).
const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    21600.0, 86400.0,
];

/// How recently a route's source must have reached its API for `/ready`.
pub const READY_API_WINDOW: Duration = Duration::from_secs(30);

/// How long `/ready` waits for a sink's `ready()`.
const SINK_READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// The address could not be bound.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        /// The `[metrics] listen` address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A recorder was already installed in this process.
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
}

/// Installs the Prometheus recorder, describes every family, and serves `/metrics`,
/// `/health` and `/ready` on `addr`. Call it before any [`Stats`] is created, so that
/// their families register with this recorder.
pub async fn serve(addr: SocketAddr) -> Result<SocketAddr, ListenerError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ListenerError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    let handle = install_recorder()?;
    let upkeep = handle.clone();
    // Histogram samples wait in the recorder until drained; without scrapes they would
    // pile up, so drain them on a timer too.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new()
        .route("/metrics", get(metrics_page))
        .route("/health", get(health_page))
        .route("/ready", get(ready_page))
        .with_state(handle);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(error = %error, "the metrics listener stopped");
        }
    });
    Ok(local)
}

fn install_recorder() -> Result<PrometheusHandle, ListenerError> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("cfq_end_to_end_latency_seconds".into()),
            LATENCY_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Suffix("_duration_seconds".into()),
                DURATION_BUCKETS,
            )
        })
        .map_err(|e| ListenerError::Recorder(e.to_string()))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| ListenerError::Recorder(e.to_string()))?;
    for f in FAMILIES {
        match f.kind {
            Kind::Counter => metrics::describe_counter!(f.name, f.help),
            Kind::Gauge => metrics::describe_gauge!(f.name, f.help),
            Kind::Histogram => metrics::describe_histogram!(f.name, f.help),
        }
    }
    Ok(handle)
}

async fn metrics_page(State(handle): State<PrometheusHandle>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

async fn health_page() -> Response {
    let routes = registry().routes().len();
    json(
        StatusCode::OK,
        serde_json::json!({"status": "ok", "routes": routes}),
    )
}

async fn ready_page() -> Response {
    let routes = registry().routes();
    if routes.is_empty() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not ready", "reasons": ["starting: no route is running yet"]}),
        );
    }
    let mut reasons = Vec::new();
    for route in &routes {
        if let Some(reason) = route.not_ready().await {
            reasons.push(format!("route {}: {reason}", route.stats.labels().route));
        }
    }
    if reasons.is_empty() {
        json(StatusCode::OK, serde_json::json!({"status": "ready"}))
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not ready", "reasons": reasons}),
        )
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// What `/ready` asks of one running route.
struct RouteProbe {
    stats: Arc<Stats>,
    sink: Arc<dyn Sink>,
    /// The pipeline's own view of its sink: `false` while reads are paused.
    sink_healthy: watch::Receiver<bool>,
    /// Whether the source calls the Cloudflare API (an archive source does not).
    uses_api: bool,
}

impl RouteProbe {
    async fn not_ready(&self) -> Option<String> {
        if self.uses_api {
            match self.stats.since_api_ok() {
                None => return Some("no API call has succeeded yet".to_string()),
                Some(ago) if ago > READY_API_WINDOW => {
                    return Some(format!(
                        "the last successful API call was {} s ago",
                        ago.as_secs()
                    ))
                }
                Some(_) => {}
            }
        }
        if !*self.sink_healthy.borrow() {
            return Some(format!(
                "the {} sink is unavailable; reads are paused",
                self.sink.kind()
            ));
        }
        match tokio::time::timeout(SINK_READY_TIMEOUT, self.sink.ready()).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(format!(
                "the {} sink is not ready: {error}",
                self.sink.kind()
            )),
            Err(_) => Some(format!(
                "the {} sink did not answer within {} s",
                self.sink.kind(),
                SINK_READY_TIMEOUT.as_secs()
            )),
        }
    }
}

/// The running routes, for `/health` and `/ready`.
#[derive(Default)]
struct Registry {
    routes: Mutex<Vec<Weak<RouteProbe>>>,
}

impl Registry {
    fn routes(&self) -> Vec<Arc<RouteProbe>> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.retain(|r| r.strong_count() > 0);
        routes.iter().filter_map(Weak::upgrade).collect()
    }
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

/// A route's entry in `/ready`, removed when dropped.
#[must_use = "the route leaves /ready when this is dropped"]
pub struct Registration {
    _probe: Arc<RouteProbe>,
}

/// Enters a running route into `/ready` until the returned value is dropped.
pub fn register_route(
    stats: Arc<Stats>,
    sink: Arc<dyn Sink>,
    sink_healthy: watch::Receiver<bool>,
    uses_api: bool,
) -> Registration {
    let probe = Arc::new(RouteProbe {
        stats,
        sink,
        sink_healthy,
        uses_api,
    });
    registry()
        .routes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Arc::downgrade(&probe));
    Registration { _probe: probe }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_names_are_unique_and_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for f in FAMILIES {
            assert!(seen.insert(f.name), "{} twice", f.name);
            assert!(f.name.starts_with("cfq_"), "{}", f.name);
            assert_eq!(
                f.kind == Kind::Counter,
                f.name.ends_with("_total"),
                "{}",
                f.name
            );
            assert!(!f.help.is_empty() && f.help.ends_with('.'), "{}", f.name);
        }
    }
}
