//! Counters of what the bridge did, shared by the pipeline, the Prometheus exporter and the
//! end-of-run summary.
//!
//! Each counter is an atomic (read for summaries and tests) mirrored into the `metrics`
//! facade as `cfq_bridge_<name>_total`, which the optional exporter serves.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// The bridge's counters. All are totals since start.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A plain copy of [`Stats`] at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct Snapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl Stats {
            /// Reads every counter.
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }

            /// Registers descriptions with the metrics facade.
            pub fn describe() {
                $( metrics::describe_counter!(
                    concat!("cfq_bridge_", stringify!($name), "_total"),
                    concat!($( stringify!($doc), )*)
                ); )*
            }
        }
    };
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
    /// Acks sent after the lease deadline the bridge tracked (the lease may have expired,
    /// so the message may be redelivered: a duplicate, not a loss).
    late_acks,
    /// Ack journal lines skipped at start because they failed their checksum (torn writes).
    journal_skipped_lines,
    /// Ack journal leases the API refused for good (HTTP 400) at recovery, dropped.
    journal_dropped,
}

impl Stats {
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
}
