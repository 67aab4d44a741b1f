//! Keeps one repeated warning from flooding the log: the same `warn!` call site (a decode
//! error hit by 10,000 messages, an outage reported by every batch) prints at most
//! [`PER_WINDOW`] lines per [`WINDOW`]; the rest are counted, and one line per window
//! says how many were left out and what they said.
//!
//! It is a per-layer filter on the log output only: metrics still count every event.
//! (`tracing-throttle` does this and much more; this is the one behaviour we need, keyed
//! by call site rather than by field values, which differ per message.)

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// Lines one call site may print per window.
pub const PER_WINDOW: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// The target of the "lines left out" reports, which are never throttled themselves.
const REPORT_TARGET: &str = "cfq_bridge::log_throttle";

/// The filter. Cloning shares its state.
#[derive(Clone, Default)]
pub struct Throttle {
    sites: Arc<Mutex<HashMap<Identifier, Site>>>,
}

struct Site {
    window_start: Instant,
    printed: u32,
    suppressed: u64,
    /// The message of the last line left out, for the report.
    message: String,
}

impl Throttle {
    /// A filter, and a thread that reports what it left out once per [`WINDOW`].
    pub fn start() -> Throttle {
        let throttle = Throttle::default();
        let reporter = throttle.clone();
        let spawned = std::thread::Builder::new()
            .name("log-throttle".into())
            .spawn(move || loop {
                std::thread::sleep(WINDOW);
                reporter.report();
            });
        if let Err(error) = spawned {
            // Without the reporter, lines are still limited; only the counts go unsaid.
            eprintln!("cannot start the log throttle's reporter: {error}");
        }
        throttle
    }

    /// Whether a warning from `site` may print now.
    fn admit(&self, site: Identifier, event: &Event<'_>, now: Instant) -> bool {
        let mut sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        let entry = sites.entry(site).or_insert_with(|| Site {
            window_start: now,
            printed: 0,
            suppressed: 0,
            message: String::new(),
        });
        if now.duration_since(entry.window_start) >= WINDOW {
            entry.window_start = now;
            entry.printed = 0;
        }
        if entry.printed < PER_WINDOW {
            entry.printed += 1;
            return true;
        }
        entry.suppressed += 1;
        entry.message.clear();
        event.record(&mut MessageOf(&mut entry.message));
        false
    }

    /// Logs, per call site, how many lines were left out since the last report.
    pub fn report(&self) {
        let left_out: Vec<(u64, String)> = {
            let mut sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
            sites
                .values_mut()
                .filter(|s| s.suppressed > 0)
                .map(|s| (std::mem::take(&mut s.suppressed), s.message.clone()))
                .collect()
        };
        for (count, message) in left_out {
            tracing::warn!(
                target: REPORT_TARGET,
                suppressed = count,
                "{count} more log lines like this were left out in the last {} s: {message}",
                WINDOW.as_secs()
            );
        }
    }
}

impl<S> Filter<S> for Throttle {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() != Level::WARN || meta.target() == REPORT_TARGET {
            return true;
        }
        self.admit(meta.callsite(), event, Instant::now())
    }
}

/// Collects an event's message.
struct MessageOf<'a>(&'a mut String);

impl Visit for MessageOf<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::Layer;

    /// Counts the events that reach it, and keeps their messages.
    #[derive(Clone, Default)]
    struct Count {
        seen: Arc<AtomicUsize>,
        messages: Arc<Mutex<Vec<String>>>,
    }

    impl<S: tracing::Subscriber> Layer<S> for Count {
        fn on_event(&self, event: &Event<'_>, _cx: tracing_subscriber::layer::Context<'_, S>) {
            self.seen.fetch_add(1, Ordering::Relaxed);
            let mut message = String::new();
            event.record(&mut MessageOf(&mut message));
            self.messages.lock().unwrap().push(message);
        }
    }

    #[test]
    fn a_repeated_warning_prints_a_few_times_then_is_counted() {
        let throttle = Throttle::default();
        let count = Count::default();
        let subscriber =
            tracing_subscriber::registry().with(count.clone().with_filter(throttle.clone()));
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..10_000 {
                tracing::warn!(message_id = i, "the same decode error");
            }
            // Another call site has its own allowance, and other levels are not limited.
            tracing::warn!("a different warning");
            for _ in 0..50 {
                tracing::info!("progress");
            }
            throttle.report();
        });
        // 10 warnings, 1 other warning, 50 infos, 1 report.
        assert_eq!(count.seen.load(Ordering::Relaxed), 10 + 1 + 50 + 1);
        let messages = count.messages.lock().unwrap();
        let report = messages.last().unwrap();
        assert!(
            report.starts_with("9990 more log lines like this were left out")
                && report.ends_with("the same decode error"),
            "{report}"
        );
    }

    #[test]
    fn a_new_window_prints_again() {
        let throttle = Throttle::default();
        let count = Count::default();
        let subscriber =
            tracing_subscriber::registry().with(count.clone().with_filter(throttle.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let warn = || tracing::warn!("sink unavailable");
            for _ in 0..20 {
                warn();
            }
            assert_eq!(count.seen.load(Ordering::Relaxed), PER_WINDOW as usize);
            // A window later, the allowance is back; the count waits for the report.
            for site in throttle.sites.lock().unwrap().values_mut() {
                site.window_start -= WINDOW;
            }
            for _ in 0..20 {
                warn();
            }
            assert_eq!(count.seen.load(Ordering::Relaxed), 2 * PER_WINDOW as usize);
            throttle.report();
        });
        let messages = count.messages.lock().unwrap();
        assert!(
            messages.last().unwrap().starts_with("20 more log lines"),
            "{messages:?}"
        );
    }
}
