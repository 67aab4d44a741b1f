//! What the bridge did: the counters, gauges and histograms of one route, shared by the
//! pipeline, its source, the Prometheus exporter and the end-of-run summary.
//!
//! Each counter is an atomic (read for summaries, `export` and tests) mirrored into a
//! `metrics` handle registered once, with the route's labels, when [`Stats::new`] runs.
//! Several counters can feed one exported family under different labels
//! (`cfq_api_errors_total{class="429"}`, `{class="5xx"}`, ...). The families themselves,
//! with their types and help texts, are listed in [`crate::metrics::FAMILIES`].
//!
//! Without an installed recorder (no `[metrics] listen`), the handles do nothing and cost
//! nothing; the atomics still count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram, Label};

/// The labels every exported family of one route carries.
#[derive(Debug, Clone)]
pub struct MetricLabels {
    /// The route's name (`default` for a config with a single `[queue]` or `[archive]`).
    pub route: Arc<str>,
    /// The Cloudflare queue id of the source; empty for an archive source.
    pub queue_id: Arc<str>,
    /// The sink's kind (`kafka`, `nats`, ...), on the sink's own families.
    pub sink: &'static str,
}

impl Default for MetricLabels {
    fn default() -> Self {
        MetricLabels {
            route: Arc::from(DEFAULT_ROUTE),
            queue_id: Arc::from(""),
            sink: "",
        }
    }
}

/// The route name of a config with a single source and sink.
pub const DEFAULT_ROUTE: &str = "default";

/// The label value that [`MetricLabels::sink`] stands for in the counter table below.
const SINK: &str = "$sink";

macro_rules! counters {
    ($( $(#[doc = $doc:literal])+ $name:ident => $metric:literal $([$($key:literal = $value:expr),+])? ),* $(,)?) => {
        /// A route's counters, gauges and histograms. All counters are totals since start.
        #[derive(Debug)]
        pub struct Stats {
            $( $(#[doc = $doc])+ pub $name: AtomicU64, )*
            /// The gauges (backlog, oldest message, in flight, pullers).
            pub gauges: Gauges,
            /// The exported handles of the counters above, and the histograms.
            pub(crate) export: Export,
            /// The labels this route's families carry.
            labels: MetricLabels,
            /// When the source's last API call succeeded, in ms since `epoch` (0: never).
            api_ok_at_ms: AtomicU64,
            epoch: Instant,
        }

        /// A plain copy of the counters of [`Stats`] at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct Snapshot {
            $( $(#[doc = $doc])+ pub $name: u64, )*
        }

        /// The `metrics` handles of the counters, registered once with the route's labels
        /// (what [`bump!`](crate::bump) increments besides the atomic).
        #[derive(Debug)]
        #[doc(hidden)]
        pub struct ExportedCounters {
            $( pub $name: Counter, )*
        }

        impl ExportedCounters {
            fn register(labels: &MetricLabels) -> ExportedCounters {
                ExportedCounters {
                    $( $name: register_counter(
                        $metric,
                        labels,
                        &[$($( ($key, $value) ),+)?],
                    ), )*
                }
            }
        }

        impl Stats {
            fn zeroed(labels: &MetricLabels) -> Stats {
                Stats {
                    $( $name: AtomicU64::new(0), )*
                    gauges: Gauges::register(labels),
                    export: Export::register(labels),
                    labels: labels.clone(),
                    api_ok_at_ms: AtomicU64::new(0),
                    epoch: Instant::now(),
                }
            }

            /// Reads every counter.
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }

            /// Where each counter is exported: its field name, the family, and the labels
            /// it adds to the route's (`$sink` stands for the sink's kind). A family of
            /// `""` is not exported (a total kept for summaries, exported by parts).
            pub fn exported_as() -> &'static [(&'static str, &'static str, &'static [(&'static str, &'static str)])] {
                &[$( (stringify!($name), $metric, &[$($( ($key, $value) ),+)?]), )*]
            }
        }
    };
}

counters! {
    /// Pull calls that succeeded.
    pulls => "cfq_pulls_total",
    /// Pull calls that returned no message.
    empty_pulls => "cfq_empty_pulls_total",
    /// Messages received from pulls.
    pulled => "cfq_messages_pulled_total",
    /// Pulled messages on their second or later delivery (`attempts` > 1).
    redelivered => "cfq_messages_redelivered_total",
    /// Records the sink confirmed (including duplicates and dead-lettered ones).
    confirmed => "cfq_messages_delivered_total",
    /// Confirmed records the destination already held (deduplicated redeliveries).
    duplicates => "cfq_duplicates_total",
    /// Records the sink stored at its own dead-letter destination.
    sink_dead_lettered => "cfq_messages_dead_lettered_total",
    /// Records the sink failed with a transient error.
    sink_transient_failures => "cfq_sink_errors_total" ["sink" = SINK, "class" = "transient"],
    /// Records the sink failed with a permanent error.
    sink_permanent_failures => "cfq_sink_errors_total" ["sink" = SINK, "class" = "permanent"],
    /// Leases acknowledged (ack calls that succeeded).
    acked => "cfq_messages_acked_total",
    /// Leases released with a retry (ack calls that succeeded).
    released => "cfq_messages_retried_total",
    /// Ack calls that succeeded.
    ack_calls => "cfq_ack_calls_total",
    /// Ack calls that failed and were retried.
    ack_call_failures => "cfq_ack_call_failures_total",
    /// Leases the API answered with a warning on ack.
    ack_warnings => "cfq_ack_warnings_total",
    /// Records released because their lease was about to expire before delivery.
    lease_expired_releases => "cfq_messages_released_total" ["reason" = "lease_expiring"],
    /// Records released without delivery at shutdown.
    shutdown_releases => "cfq_messages_released_total" ["reason" = "shutdown"],
    /// `v8` messages released under the `release` policy.
    v8_released => "cfq_messages_released_total" ["reason" = "v8"],
    /// Messages whose body could not be decoded (bad base64, invalid JSON, unknown type).
    decode_errors => "",
    /// Messages with a missing or unknown `CF-Content-Type`.
    decode_errors_content_type => "cfq_decode_errors_total" ["kind" = "content_type"],
    /// Messages whose body is not valid base64.
    decode_errors_base64 => "cfq_decode_errors_total" ["kind" = "base64"],
    /// `json` messages whose body is not valid JSON.
    decode_errors_json => "cfq_decode_errors_total" ["kind" = "json"],
    /// Messages too large or otherwise refused before delivery.
    oversized => "cfq_decode_errors_total" ["kind" = "oversized"],
    /// Pull or ack responses that were malformed (not JSON, missing fields, HTML pages).
    malformed_responses => "cfq_api_errors_total" ["class" = "malformed"],
    /// Responses with HTTP 429.
    rate_limited => "cfq_api_errors_total" ["class" = "429"],
    /// Responses with HTTP 409 (queue paused).
    paused => "cfq_api_errors_total" ["class" = "409"],
    /// Responses with HTTP 5xx (or `success: false`).
    server_errors => "cfq_api_errors_total" ["class" = "5xx"],
    /// Calls that got no answer: connection refused or reset, DNS, TLS, timeouts.
    transport_errors => "cfq_api_errors_total" ["class" = "transport"],
    /// Responses with another HTTP 4xx (401, 403, 404, 400, ...).
    rejected_responses => "cfq_api_errors_total" ["class" = "4xx"],
    /// Acks recovered from the ack journal after a restart.
    journal_recovered => "cfq_journal_recovered_total",
    /// Leases acknowledged after the lease deadline the bridge tracked for them (the
    /// record was confirmed, but Cloudflare may already have redelivered it: a possible
    /// duplicate).
    late_acks => "cfq_late_acks_total",
    /// Ack journal lines skipped at start because they failed their checksum (torn writes).
    journal_skipped_lines => "cfq_journal_skipped_lines_total",
    /// Ack journal leases the API refused for good (HTTP 400) at recovery, dropped.
    journal_dropped => "cfq_journal_dropped_total",
    /// Records read from archive files (lines that parsed), before the filters.
    archive_records_read => "cfq_archive_records_read_total",
    /// Archive records left out by the `since_ms`, `until_ms` and `content_types` filters.
    archive_filtered => "cfq_archive_filtered_total",
    /// Archive lines that are not records, skipped and reported with their file and line.
    archive_malformed_lines => "cfq_archive_malformed_lines_total",
    /// Archive files whose end could not be read (a torn last line, truncated compressed
    /// data); their readable part was read.
    archive_unreadable_tails => "cfq_archive_unreadable_tails_total",
    /// Archive records the sink refused, offered again after their retry delay.
    archive_reoffered => "cfq_archive_reoffered_total",
    /// Archive checkpoint writes that failed (tried again at the next write).
    archive_checkpoint_failures => "cfq_archive_checkpoint_failures_total",
}

/// Registers one counter with the route's labels plus `extra`.
fn register_counter(
    name: &'static str,
    labels: &MetricLabels,
    extra: &[(&'static str, &'static str)],
) -> Counter {
    if name.is_empty() {
        return Counter::noop();
    }
    let mut all = route_labels(labels);
    for (key, value) in extra {
        let value = if *value == SINK { labels.sink } else { value };
        all.push(Label::new(*key, value.to_string()));
    }
    metrics::counter!(name, all)
}

fn route_labels(labels: &MetricLabels) -> Vec<Label> {
    vec![
        Label::new("route", labels.route.to_string()),
        Label::new("queue_id", labels.queue_id.to_string()),
    ]
}

/// A value a gauge does not know yet.
const UNKNOWN: u64 = u64::MAX;

/// A route's gauges: atomics (read by `export`'s progress display and the summary) and
/// their exported handles.
#[derive(Debug)]
pub struct Gauges {
    backlog: AtomicU64,
    /// The first backlog any API answer reported (what `export` measures against).
    first_backlog: AtomicU64,
    oldest_timestamp_ms: AtomicU64,
    export_backlog: Gauge,
    export_oldest_age: Gauge,
    export_in_flight: Gauge,
    export_pullers: Gauge,
}

impl Gauges {
    fn register(labels: &MetricLabels) -> Gauges {
        let l = route_labels(labels);
        Gauges {
            backlog: AtomicU64::new(UNKNOWN),
            first_backlog: AtomicU64::new(UNKNOWN),
            oldest_timestamp_ms: AtomicU64::new(0),
            export_backlog: metrics::gauge!("cfq_queue_backlog_messages", l.clone()),
            export_oldest_age: metrics::gauge!("cfq_queue_oldest_message_age_seconds", l.clone()),
            export_in_flight: metrics::gauge!("cfq_in_flight_messages", l.clone()),
            export_pullers: metrics::gauge!("cfq_pullers", l),
        }
    }

    /// The queue's backlog as last reported by the API, if it was.
    pub fn backlog(&self) -> Option<u64> {
        Some(self.backlog.load(Ordering::Relaxed)).filter(|b| *b != UNKNOWN)
    }

    /// The first backlog an API answer reported, if one has.
    pub fn first_backlog(&self) -> Option<u64> {
        Some(self.first_backlog.load(Ordering::Relaxed)).filter(|b| *b != UNKNOWN)
    }

    /// Records the backlog and the oldest message's publish time an API answer reported
    /// (a timestamp of 0 means unknown).
    pub fn set_queue(&self, backlog: Option<u64>, oldest_timestamp_ms: Option<u64>) {
        if let Some(backlog) = backlog {
            let _ = self.first_backlog.compare_exchange(
                UNKNOWN,
                backlog,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            self.backlog.store(backlog, Ordering::Relaxed);
            self.export_backlog.set(backlog as f64);
        }
        if let Some(oldest) = oldest_timestamp_ms {
            self.oldest_timestamp_ms.store(oldest, Ordering::Relaxed);
        }
        if backlog == Some(0) {
            // An empty queue has no oldest message.
            self.oldest_timestamp_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Sets the number of running pull loops.
    pub fn set_pullers(&self, pullers: u64) {
        self.export_pullers.set(pullers as f64);
    }

    /// Refreshes the gauges that change with time: records in flight, and the oldest
    /// message's age (which grows between pulls).
    pub fn sample(&self, in_flight: u64) {
        self.export_in_flight.set(in_flight as f64);
        let oldest = self.oldest_timestamp_ms.load(Ordering::Relaxed);
        let age = if oldest == 0 {
            0.0
        } else {
            (now_ms().saturating_sub(oldest)) as f64 / 1000.0
        };
        self.export_oldest_age.set(age);
    }
}

/// The histograms of one route.
#[derive(Debug)]
pub(crate) struct Export {
    pub(crate) counters: ExportedCounters,
    /// One pull call, answered or failed.
    pub(crate) pull_duration: Histogram,
    /// One `Sink::deliver` call.
    pub(crate) sink_duration: Histogram,
    /// One ack call, until it went through or failed for good.
    pub(crate) ack_duration: Histogram,
    /// From a record's publish time to its sink's confirmation.
    pub(crate) end_to_end: Histogram,
}

impl Export {
    fn register(labels: &MetricLabels) -> Export {
        let l = route_labels(labels);
        let mut sink = l.clone();
        sink.push(Label::new("sink", labels.sink));
        Export {
            counters: ExportedCounters::register(labels),
            pull_duration: metrics::histogram!("cfq_pull_duration_seconds", l.clone()),
            sink_duration: metrics::histogram!("cfq_sink_duration_seconds", sink),
            ack_duration: metrics::histogram!("cfq_ack_duration_seconds", l.clone()),
            end_to_end: metrics::histogram!("cfq_end_to_end_latency_seconds", l),
        }
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new(MetricLabels::default())
    }
}

impl Stats {
    /// A route's stats, registering its exported families with `labels` (with the
    /// installed recorder, if any: install it first).
    pub fn new(labels: MetricLabels) -> Stats {
        let stats = Stats::zeroed(&labels);
        stats.gauges.sample(0);
        stats
    }

    /// The labels of this route's families.
    pub fn labels(&self) -> &MetricLabels {
        &self.labels
    }

    /// Adds `n` to a counter and to its exported family.
    #[inline]
    pub fn add(
        &self,
        counter: fn(&Stats) -> &AtomicU64,
        exported: fn(&ExportedCounters) -> &Counter,
        n: u64,
    ) {
        if n == 0 {
            return;
        }
        counter(self).fetch_add(n, Ordering::Relaxed);
        exported(&self.export.counters).increment(n);
    }

    /// Counts a failed API call under its class (`429`, `409`, `5xx`, `transport`,
    /// `malformed`, `4xx`).
    pub fn api_error(&self, error: &crate::cloudflare::ApiError) {
        use crate::cloudflare::ApiError;
        match error {
            ApiError::RateLimited { .. } => crate::bump!(self, rate_limited),
            ApiError::Paused { .. } => crate::bump!(self, paused),
            ApiError::Server { .. } => crate::bump!(self, server_errors),
            ApiError::Transport(_) => crate::bump!(self, transport_errors),
            ApiError::Malformed { .. } => crate::bump!(self, malformed_responses),
            ApiError::Auth { .. } | ApiError::NotFound { .. } | ApiError::Rejected { .. } => {
                crate::bump!(self, rejected_responses)
            }
        }
    }

    /// Records that an API call just succeeded (for `/ready`).
    pub fn api_ok(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.api_ok_at_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// How long ago an API call last succeeded; `None` if none has yet.
    pub fn since_api_ok(&self) -> Option<Duration> {
        match self.api_ok_at_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(at)),
            ),
        }
    }

    /// Records how long a pull call took.
    pub fn pull_took(&self, took: Duration) {
        self.export.pull_duration.record(took.as_secs_f64());
    }

    /// Records how long an ack call took.
    pub fn ack_took(&self, took: Duration) {
        self.export.ack_duration.record(took.as_secs_f64());
    }

    /// Records how long a sink call took.
    pub fn sink_took(&self, took: Duration) {
        self.export.sink_duration.record(took.as_secs_f64());
    }

    /// Records the end-to-end latency of a record confirmed at `now_ms` and published at
    /// `published_ms`.
    pub fn confirmed_at(&self, now_ms: u64, published_ms: u64) {
        let latency = now_ms.saturating_sub(published_ms) as f64 / 1000.0;
        self.export.end_to_end.record(latency);
    }
}

/// The wall clock in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Increments a counter of a [`Stats`] by `n` and mirrors it to its exported family:
/// `bump!(stats, acked, 3)`.
#[macro_export]
macro_rules! bump {
    ($stats:expr, $name:ident, $n:expr) => {
        $stats.add(|s| &s.$name, |e| &e.$name, ($n) as u64)
    };
    ($stats:expr, $name:ident) => {
        $crate::bump!($stats, $name, 1)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bump_counts() {
        let s = Stats::default();
        bump!(s, acked, 3);
        bump!(s, acked);
        bump!(s, pulls, 0);
        let snap = s.snapshot();
        assert_eq!(snap.acked, 4);
        assert_eq!(snap.pulls, 0);
    }

    #[test]
    fn every_exported_counter_names_a_documented_counter_family() {
        for (field, family, _) in Stats::exported_as() {
            if family.is_empty() {
                continue;
            }
            let documented = crate::metrics::FAMILIES
                .iter()
                .find(|f| f.name == *family)
                .unwrap_or_else(|| panic!("{field} is exported as {family}, which FAMILIES lacks"));
            assert_eq!(documented.kind, crate::metrics::Kind::Counter, "{family}");
        }
    }

    #[test]
    fn gauges_know_when_the_backlog_is_unknown() {
        let s = Stats::default();
        assert_eq!(s.gauges.backlog(), None);
        s.gauges.set_queue(Some(12), Some(0));
        assert_eq!(s.gauges.backlog(), Some(12));
        s.gauges.set_queue(None, None);
        assert_eq!(s.gauges.backlog(), Some(12));
        s.gauges.set_queue(Some(3), None);
        assert_eq!(s.gauges.backlog(), Some(3));
        assert_eq!(s.gauges.first_backlog(), Some(12));
    }

    #[test]
    fn api_ok_is_remembered() {
        let s = Stats::default();
        assert_eq!(s.since_api_ok(), None);
        s.api_ok();
        assert!(s.since_api_ok().unwrap() < Duration::from_secs(5));
    }
}
