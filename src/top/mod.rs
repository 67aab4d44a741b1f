//! `cfq-bridge top`: a live terminal view of a running bridge's `/metrics`.
//!
//! Three parts:
//! - [`model`]: exposition text → rows (rates, gauges, latency quantiles), pure;
//! - [`ui`]: draws a frame from the rows and the scrape's health;
//! - this module: the loop. A task scrapes every second (with a short timeout) and sends
//!   each outcome on a channel; a thread reads keys; the loop redraws on either and ends
//!   on `q`, Esc, Ctrl-C, SIGINT or SIGTERM. An unreachable endpoint or a non-200 answer
//!   is shown on the status line and retried; the last good rows stay on screen.
//!
//! The terminal is put back (raw mode off, main screen) on every way out: a normal exit,
//! an error (the guard's `Drop`) and a panic (ratatui's panic hook).

pub mod model;
pub mod ui;

use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use reqwest::Url;
use tokio::sync::mpsc;

use model::{Row, Snapshot};
use ui::{Health, View};

/// Time between scrapes.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// How long one scrape may take, connection included. Below [`INTERVAL`], so a hung
/// endpoint shows as unavailable at the next tick instead of freezing the view.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_millis(800);
/// The URL used when `--url` is not given.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9464";

/// Arguments of `cfq-bridge top`.
#[derive(clap::Args, Debug, Clone)]
pub struct TopArgs {
    /// The bridge's metrics listener (`[metrics] listen`). `/metrics` is added when the
    /// URL has no path.
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
}

/// Why `top` could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// `--url` is not an http(s) URL.
    #[error("--url {url:?} is not an http:// or https:// URL: {reason}")]
    BadUrl {
        /// What was given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Standard output is not a terminal (a pipe or a file).
    #[error("top draws on a terminal, and standard output is not one")]
    NotATerminal,
    /// The terminal could not be set up or drawn on.
    #[error("cannot use the terminal")]
    Terminal(#[source] std::io::Error),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// The URL to scrape: `given`, with `/metrics` as its path when it has none.
pub fn metrics_url(given: &str) -> Result<Url, TopError> {
    let bad = |reason: String| TopError::BadUrl {
        url: given.to_owned(),
        reason,
    };
    let mut url = Url::parse(given).map_err(|e| bad(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!("the scheme is {:?}", url.scheme())));
    }
    if url.path().is_empty() || url.path() == "/" {
        url.set_path("/metrics");
    }
    Ok(url)
}

/// Runs the view until the user quits.
pub async fn run(args: TopArgs) -> Result<(), TopError> {
    use std::io::IsTerminal as _;
    let url = metrics_url(&args.url)?;
    if !std::io::stdout().is_terminal() {
        return Err(TopError::NotATerminal);
    }
    let client = reqwest::Client::builder()
        .timeout(SCRAPE_TIMEOUT)
        .connect_timeout(SCRAPE_TIMEOUT)
        .build()
        .map_err(TopError::Client)?;

    let (scrapes_tx, mut scrapes) = mpsc::channel(1);
    let scraper = tokio::spawn(scrape_loop(client, url.clone(), scrapes_tx));
    let (keys_tx, mut keys) = mpsc::channel(8);
    // crossterm's event reading blocks: it gets a thread of its own, which ends when the
    // loop drops the receiver (or with the process).
    std::thread::spawn(move || read_keys(&keys_tx));

    let mut terminal = match ratatui::try_init() {
        Ok(terminal) => terminal,
        Err(e) => {
            // Undo whatever part of the set-up did happen (raw mode, say).
            let _ = ratatui::try_restore();
            return Err(TopError::Terminal(e));
        }
    };
    let _restore = RestoreTerminal;
    let mut state = State::new();
    let url_text = url.to_string();
    let shutdown = crate::app::shutdown_signal();
    tokio::pin!(shutdown);
    let result = loop {
        let now = Instant::now();
        let view = View {
            url: &url_text,
            rows: &state.rows,
            health: &state.health,
            last_good: state.previous.as_ref().map(|(at, _)| now - *at),
            interval: INTERVAL,
        };
        if let Err(e) = terminal.draw(|frame| ui::draw(frame, &view)) {
            break Err(TopError::Terminal(e));
        }
        tokio::select! {
            Some((at, outcome)) = scrapes.recv() => state.apply(at, outcome),
            key = keys.recv() => match key {
                Some(Input::Quit) | None => break Ok(()),
                Some(Input::Redraw) => {}
            },
            () = &mut shutdown => break Ok(()),
        }
    };
    scraper.abort();
    result
}

/// Puts the terminal back when dropped (on return and on unwinding).
struct RestoreTerminal;

impl Drop for RestoreTerminal {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// What the screen shows between scrapes.
struct State {
    /// The last good scrape and when it arrived: the base of the next rates.
    previous: Option<(Instant, Snapshot)>,
    /// The rows of the last good scrape.
    rows: Vec<Row>,
    /// How the last scrape went.
    health: Health,
}

impl State {
    fn new() -> State {
        State {
            previous: None,
            rows: Vec::new(),
            health: Health::Waiting,
        }
    }

    /// Takes in one scrape's outcome. A failure keeps the rows and the rate base, so the
    /// next good scrape measures rates over the whole gap.
    fn apply(&mut self, at: Instant, outcome: Result<String, String>) {
        let text = match outcome {
            Ok(text) => text,
            Err(error) => {
                self.health = Health::Failed(error);
                return;
            }
        };
        let snapshot = match Snapshot::parse(&text) {
            Ok(snapshot) => snapshot,
            Err(e) => {
                self.health = Health::Failed(format!("unreadable /metrics: {e}"));
                return;
            }
        };
        self.rows = match &self.previous {
            Some((before, previous)) => model::rows(Some(previous), &snapshot, at - *before),
            None => model::rows(None, &snapshot, Duration::ZERO),
        };
        self.previous = Some((at, snapshot));
        self.health = Health::Live;
    }
}

/// Scrapes `url` every [`INTERVAL`] and sends each outcome with the time it arrived,
/// until the receiver is gone. An error is a sentence for the status line.
async fn scrape_loop(
    client: reqwest::Client,
    url: Url,
    out: mpsc::Sender<(Instant, Result<String, String>)>,
) {
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let outcome = scrape(&client, &url).await;
        if out.send((Instant::now(), outcome)).await.is_err() {
            return;
        }
    }
}

/// One GET of `url`: the body of a 200, or what went wrong.
async fn scrape(client: &reqwest::Client, url: &Url) -> Result<String, String> {
    let response = client.get(url.clone()).send().await.map_err(|e| {
        if e.is_timeout() {
            format!("{url} did not answer within {SCRAPE_TIMEOUT:?}")
        } else if e.is_connect() {
            format!("cannot connect to {url} (is the bridge running with [metrics] listen?)")
        } else {
            format!("{url}: {e}")
        }
    })?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("{url} answered HTTP {status}"));
    }
    response
        .text()
        .await
        .map_err(|e| format!("reading the body of {url}: {e}"))
}

/// What a key means to the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    /// `q`, Esc or Ctrl-C.
    Quit,
    /// Anything that changes the screen's size: draw again.
    Redraw,
}

/// Reads terminal events and sends the ones that matter, until the receiver is gone or
/// the terminal fails (then the loop sees the channel close and quits).
fn read_keys(out: &mpsc::Sender<Input>) {
    while !out.is_closed() {
        match event::poll(Duration::from_millis(200)) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(_) => return,
        }
        let input = match event::read() {
            Ok(Event::Key(key)) => key_input(key),
            Ok(Event::Resize(..)) => Some(Input::Redraw),
            Ok(_) => None,
            Err(_) => return,
        };
        if let Some(input) = input {
            if out.blocking_send(input).is_err() {
                return;
            }
        }
    }
}

/// The meaning of a key press, if any.
fn key_input(key: KeyEvent) -> Option<Input> {
    if key.kind != KeyEventKind::Press {
        return None;
    }
    match key.code {
        KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc => Some(Input::Quit),
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Some(Input::Quit),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_is_the_default_path() {
        assert_eq!(
            metrics_url(DEFAULT_URL).unwrap().as_str(),
            "http://127.0.0.1:9464/metrics"
        );
        assert_eq!(
            metrics_url("http://host:1/").unwrap().as_str(),
            "http://host:1/metrics"
        );
        // A path given is kept (a bridge behind a proxy, say).
        assert_eq!(
            metrics_url("https://host/bridge/metrics").unwrap().as_str(),
            "https://host/bridge/metrics"
        );
        assert!(matches!(
            metrics_url("127.0.0.1:9464"),
            Err(TopError::BadUrl { .. })
        ));
        assert!(matches!(
            metrics_url("ftp://host/"),
            Err(TopError::BadUrl { .. })
        ));
    }

    #[test]
    fn quit_keys() {
        let press = |code, modifiers| key_input(KeyEvent::new(code, modifiers));
        assert_eq!(
            press(KeyCode::Char('q'), KeyModifiers::NONE),
            Some(Input::Quit)
        );
        assert_eq!(press(KeyCode::Esc, KeyModifiers::NONE), Some(Input::Quit));
        assert_eq!(
            press(KeyCode::Char('c'), KeyModifiers::CONTROL),
            Some(Input::Quit)
        );
        assert_eq!(press(KeyCode::Char('c'), KeyModifiers::NONE), None);
    }

    #[test]
    fn a_failed_scrape_keeps_the_rows_and_the_rate_base() {
        let text =
            |n: u32| format!("cfq_messages_pulled_total{{route=\"r\",queue_id=\"q\"}} {n}\n");
        let start = Instant::now();
        let mut state = State::new();
        state.apply(start, Ok(text(10)));
        assert_eq!(state.health, Health::Live);
        assert_eq!(state.rows[0].pulled_per_sec, None);
        state.apply(start + Duration::from_secs(1), Err("refused".into()));
        assert_eq!(state.health, Health::Failed("refused".into()));
        assert_eq!(state.rows.len(), 1, "the last rows stay on screen");
        // 20 more over the 2 s since the last good scrape.
        state.apply(start + Duration::from_secs(2), Ok(text(30)));
        assert_eq!(state.health, Health::Live);
        assert_eq!(state.rows[0].pulled_per_sec, Some(10.0));
    }
}
