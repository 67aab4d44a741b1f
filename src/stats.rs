//! Counters of what the bridge did, shared by the pipeline, the Prometheus exporter and the
//! end-of-run summary.
//!
//! Each counter is an atomic (read for summaries and tests) mirrored into the `metrics`
//! facade as `cfq_bridge_<name>_total`, which the optional exporter serves.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[doc = $doc:literal])+ $name:ident ),* $(,)?) => {
        /// The bridge's counters. All are totals since start.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[doc = $doc])+ pub $name: AtomicU64, )*
        }

        /// A plain copy of [`Stats`] at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct Snapshot {
            $( $(#[doc = $doc])+ pub $name: u64, )*
        }

        impl Stats {
            /// Reads every counter.
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }

            /// Every counter as exported: its metric name and its help text (the field's
            /// doc comment, lines joined by spaces).
            pub fn descriptions() -> &'static [CounterDescription] {
                const ALL: &[CounterDescription] = &[$( CounterDescription {
                    metric: concat!("cfq_bridge_", stringify!($name), "_total"),
                    // Each doc line starts with the space after `///`: concatenated, the
                    // lines are separated by that space, and `trim` drops the first.
                    help: const_trim_start(concat!($( $doc ),+)),
                }, )*];
                ALL
            }
        }
    };
}

/// One exported counter: what `# HELP` says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterDescription {
    /// The Prometheus metric name (`cfq_bridge_acked_total`).
    pub metric: &'static str,
    /// The help text.
    pub help: &'static str,
}

/// `str::trim_start` for ASCII spaces, usable in a constant.
const fn const_trim_start(mut s: &str) -> &str {
    while let [b' ', rest @ ..] = s.as_bytes() {
        // Only an ASCII space was removed, so `rest` starts at a char boundary.
        s = match std::str::from_utf8(rest) {
            Ok(rest) => rest,
            Err(_) => return s,
        };
    }
    s
}

counters! {
    /// Pull calls that succeeded.
    pulls,
    /// Pull calls that returned no message.
    empty_pulls,
    /// Messages received from pulls.
    pulled,
    /// Records the sink confirmed (including duplicates and dead-lettered ones).
    confirmed,
    /// Confirmed records the destination already held (deduplicated redeliveries).
    duplicates,
    /// Records the sink stored at its own dead-letter destination.
    sink_dead_lettered,
    /// Records the sink failed with a transient error.
    sink_transient_failures,
    /// Records the sink failed with a permanent error.
    sink_permanent_failures,
    /// Leases acknowledged (ack calls that succeeded).
    acked,
    /// Leases released with a retry (ack calls that succeeded).
    released,
    /// Ack calls that succeeded.
    ack_calls,
    /// Ack calls that failed and were retried.
    ack_call_failures,
    /// Leases the API answered with a warning on ack.
    ack_warnings,
    /// Records released because their lease was about to expire before delivery.
    lease_expired_releases,
    /// Records released without delivery at shutdown.
    shutdown_releases,
    /// `v8` messages released under the `release` policy.
    v8_released,
    /// Messages whose body could not be decoded (bad base64, invalid JSON, unknown type).
    decode_errors,
    /// Messages too large or otherwise refused before delivery.
    oversized,
    /// Pull or ack responses that were malformed (not JSON, missing fields, HTML pages).
    malformed_responses,
    /// Responses with HTTP 429.
    rate_limited,
    /// Responses with HTTP 409 (queue paused).
    paused,
    /// Responses with HTTP 5xx, and transport errors.
    server_errors,
    /// Acks recovered from the ack journal after a restart.
    journal_recovered,
    /// Leases acknowledged after the lease deadline the bridge tracked for them (the
    /// record was confirmed, but Cloudflare may already have redelivered it: a possible
    /// duplicate).
    late_acks,
    /// Ack journal lines skipped at start because they failed their checksum (torn writes).
    journal_skipped_lines,
    /// Ack journal leases the API refused for good (HTTP 400) at recovery, dropped.
    journal_dropped,
    /// Records read from archive files (lines that parsed), before the filters.
    archive_records_read,
    /// Archive records left out by the `since_ms`, `until_ms` and `content_types` filters.
    archive_filtered,
    /// Archive lines that are not records, skipped and reported with their file and line.
    archive_malformed_lines,
    /// Archive files whose end could not be read (a torn last line, truncated compressed
    /// data); their readable part was read.
    archive_unreadable_tails,
    /// Archive records the sink refused, offered again after their retry delay.
    archive_reoffered,
    /// Archive checkpoint writes that failed (tried again at the next write).
    archive_checkpoint_failures,
}

/// Why the Prometheus exporter could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the Prometheus exporter on {addr}: {source}")]
pub struct ExporterError {
    /// The `[metrics] listen` address.
    pub addr: SocketAddr,
    /// What the exporter said.
    #[source]
    pub source: metrics_exporter_prometheus::BuildError,
}

/// Installs the Prometheus exporter on `addr` (serving `/metrics`), then describes every
/// counter and registers it at 0, so that each one is listed with its `# HELP` and
/// `# TYPE` from the first scrape. Descriptions given before the exporter is installed
/// would be lost, hence one function for both.
pub fn serve_prometheus(addr: SocketAddr) -> Result<(), ExporterError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|source| ExporterError { addr, source })?;
    Stats::describe();
    Ok(())
}

impl Stats {
    /// Gives each counter its help text and registers it (at 0) with the installed
    /// `metrics` recorder. Call it after the recorder is installed ([`serve_prometheus`]
    /// does); before, it has no effect.
    pub fn describe() {
        for counter in Stats::descriptions() {
            metrics::describe_counter!(counter.metric, counter.help);
            // Registering makes a counter that never moved show up, at 0.
            metrics::counter!(counter.metric).increment(0);
        }
    }

    /// Adds `n` to a counter and to its exported metric.
    pub fn add(&self, counter: fn(&Stats) -> &AtomicU64, name: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        counter(self).fetch_add(n, Ordering::Relaxed);
        metrics::counter!(name).increment(n);
    }
}

/// Increments a counter of a [`Stats`] by `n` and mirrors it to the metrics facade:
/// `bump!(stats, acked, 3)`.
#[macro_export]
macro_rules! bump {
    ($stats:expr, $name:ident, $n:expr) => {
        $stats.add(
            |s| &s.$name,
            concat!("cfq_bridge_", stringify!($name), "_total"),
            ($n) as u64,
        )
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
    fn help_texts_are_the_doc_comments() {
        let all = Stats::descriptions();
        let acked = all
            .iter()
            .find(|c| c.metric == "cfq_bridge_acked_total")
            .unwrap();
        assert_eq!(
            acked.help,
            "Leases acknowledged (ack calls that succeeded)."
        );
        let late = all
            .iter()
            .find(|c| c.metric == "cfq_bridge_late_acks_total")
            .unwrap();
        assert!(late.help.starts_with("Leases acknowledged after the lease deadline the bridge tracked for them (the record"), "{}", late.help);
        for c in all {
            assert!(!c.help.is_empty() && !c.help.starts_with(' '), "{c:?}");
            assert!(!c.help.contains("doc") && !c.help.contains('\n'), "{c:?}");
        }
    }
}
