//! Progress of a job that ends (`replay`, `export`), shown on stderr.
//!
//! On a terminal it is an indicatif bar with the count, the rate and an ETA, redrawn a few
//! times a second. When stderr is not a terminal (a log file, a CI job, a pipe) a bar would
//! fill the file with control codes, so a plain line is printed every few seconds instead.
//! Either way the numbers come from a closure reading the run's counters: the job does not
//! report progress itself.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often a plain progress line is printed when stderr is not a terminal.
pub const LINE_INTERVAL: Duration = Duration::from_secs(5);

/// How the progress is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// An indicatif bar (stderr is a terminal).
    Bar,
    /// A plain line every `every`.
    Lines {
        /// Time between two lines.
        every: Duration,
    },
}

impl Style {
    /// A bar when stderr is a terminal, else a line every [`LINE_INTERVAL`].
    pub fn for_stderr() -> Style {
        if std::io::stderr().is_terminal() {
            Style::Bar
        } else {
            Style::Lines {
                every: LINE_INTERVAL,
            }
        }
    }
}

/// One reading of a job's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reading {
    /// Units done.
    pub done: u64,
    /// Units in all, when known (it may change: a queue's backlog grows and shrinks).
    pub total: Option<u64>,
    /// Extra text after the numbers (`backlog 10000 at start, 5800 now`); may be empty.
    pub note: String,
}

/// A running progress display. [`Progress::finish`] stops it and draws the final state.
#[derive(Debug)]
pub struct Progress {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Progress {
    /// Starts showing `done()` out of `total` (when known) for a job called `label`
    /// (`"replay"`), counting in `unit` (`"messages"`). Needs a tokio runtime.
    pub fn start(
        label: &'static str,
        unit: &'static str,
        total: Option<u64>,
        style: Style,
        done: impl Fn() -> u64 + Send + 'static,
    ) -> Progress {
        Progress::watch(label, unit, style, move || Reading {
            done: done(),
            total,
            note: String::new(),
        })
    }

    /// Like [`Progress::start`], for a job whose total moves: each tick takes a whole
    /// [`Reading`].
    pub fn watch(
        label: &'static str,
        unit: &'static str,
        style: Style,
        read: impl Fn() -> Reading + Send + 'static,
    ) -> Progress {
        let stop = CancellationToken::new();
        let task = match style {
            Style::Bar => tokio::spawn(draw_bar(label, unit, read, stop.clone())),
            Style::Lines { every } => {
                tokio::spawn(print_lines(label, unit, every, read, stop.clone()))
            }
        };
        Progress { stop, task }
    }

    /// Stops the display after drawing the final count.
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn draw_bar(
    label: &'static str,
    unit: &'static str,
    read: impl Fn() -> Reading,
    stop: CancellationToken,
) {
    let first = read();
    let bar = ProgressBar::with_draw_target(first.total, ProgressDrawTarget::stderr());
    bar.set_style(bar_style(unit, first.total.is_some()));
    bar.set_prefix(label);
    // A total can become known later (a queue's backlog arrives with the first pull):
    // then the spinner turns into a bar.
    let with_total = std::sync::atomic::AtomicBool::new(first.total.is_some());
    let show = |reading: Reading| {
        if let Some(total) = reading.total {
            if !with_total.swap(true, std::sync::atomic::Ordering::Relaxed) {
                bar.set_style(bar_style(unit, true));
            }
            bar.set_length(total.max(reading.done));
        }
        bar.set_position(reading.done);
        bar.set_message(reading.note);
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => show(read()),
        }
    }
    show(read());
    bar.abandon();
}

/// The bar's look: a bar with a percentage and an ETA when the total is known, else a
/// spinner with the count.
fn bar_style(unit: &str, with_total: bool) -> ProgressStyle {
    let template = if with_total {
        format!("{{prefix}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} ({{percent}}%) {{rate}} ETA {{eta}} {{msg}}")
    } else {
        format!("{{prefix}} {{spinner}} {{human_pos}} {unit} {{rate}} {{elapsed}} {{msg}}")
    };
    let style =
        ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar());
    // indicatif's own `per_sec` prints four decimals; a whole number reads better.
    style
        .with_key(
            "rate",
            |state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write| {
                let _ = write!(out, "{:.0}/s", state.per_sec());
            },
        )
        .progress_chars("=> ")
}

async fn print_lines(
    label: &'static str,
    unit: &'static str,
    every: Duration,
    read: impl Fn() -> Reading,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {
                let r = read();
                let mut text = line(label, unit, r.done, r.total, started.elapsed());
                if !r.note.is_empty() {
                    text.push_str("; ");
                    text.push_str(&r.note);
                }
                crate::app::say(format_args!("{text}"));
            }
        }
    }
}

/// One plain progress line: `replay: 4200/10000 messages (42%), 1980 msg/s, ETA 3s`.
pub fn line(label: &str, unit: &str, done: u64, total: Option<u64>, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    match total {
        Some(total) => {
            let percent = (done.min(total) * 100).checked_div(total).unwrap_or(100);
            let eta = if done >= total {
                "0s".to_string()
            } else if rate > 0.0 {
                format!("{}s", ((total - done) as f64 / rate).ceil() as u64)
            } else {
                "unknown".to_string()
            };
            format!("{label}: {done}/{total} {unit} ({percent}%), {rate:.0}/s, ETA {eta}")
        }
        None => format!("{label}: {done} {unit}, {rate:.0}/s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_count_rate_and_eta() {
        let text = line(
            "replay",
            "messages",
            4_000,
            Some(10_000),
            Duration::from_secs(2),
        );
        assert_eq!(
            text, "replay: 4000/10000 messages (40%), 2000/s, ETA 3s",
            "{text}"
        );
        let text = line("replay", "messages", 0, Some(10), Duration::ZERO);
        assert!(text.ends_with("ETA unknown"), "{text}");
        let text = line("replay", "messages", 10, Some(10), Duration::from_secs(1));
        assert!(
            text.contains("(100%)") && text.ends_with("ETA 0s"),
            "{text}"
        );
        let text = line("export", "messages", 7, None, Duration::from_secs(7));
        assert_eq!(text, "export: 7 messages, 1/s");
    }
}
