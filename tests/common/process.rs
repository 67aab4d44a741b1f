//! The bridge binary as a long-running child with its output in a log file, the
//! Prometheus counters it exports, and a direct API client for tests that need real leases
//! (bad input, security, journal, metrics).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cfq_bridge::cloudflare::{Client, ClientOptions, PullRequest, PulledMessage};
use cfq_emulator::Emulator;
use secrecy::SecretString;

use super::{bridge, try_wait_until, ACCOUNT, TOKEN};

/// A bridge process whose stdout and stderr go to one log file.
pub struct Running {
    /// The child.
    pub child: tokio::process::Child,
    /// Its log.
    pub log: PathBuf,
    /// The metrics port, when the config set one.
    pub metrics_port: Option<u16>,
}

impl Running {
    /// Spawns `cfq-bridge ARGS` with the test token.
    pub fn spawn(args: &[&str], log: &Path, metrics_port: Option<u16>) -> Running {
        let file = std::fs::File::create(log).expect("create the bridge log");
        let err = file.try_clone().expect("clone the log handle");
        let child = bridge()
            // Plain log lines, whatever the CLI decides about colours.
            .env("NO_COLOR", "1")
            .args(args)
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn cfq-bridge");
        Running {
            child,
            log: log.to_path_buf(),
            metrics_port,
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Panics (with the log) unless the process is still running.
    pub fn assert_running(&mut self, when: &str) {
        if let Some(status) = self.child.try_wait().expect("poll the bridge") {
            panic!(
                "the bridge exited ({status}) {when}; it must keep running:\n{}",
                self.log_tail()
            );
        }
    }

    /// A counter of `Stats` by its field name (`acked`), read from the family and labels
    /// it is exported as. Panics when `/metrics` cannot be read or lacks the counter
    /// (every counter is exported from the start), so that a dead endpoint never reads
    /// as 0.
    pub async fn counter(&self, name: &str) -> u64 {
        let port = self.metrics_port.expect("config has [metrics] listen");
        let scraped = scrape(port).await;
        assert!(
            !scraped.is_empty(),
            "/metrics on port {port} is unreachable or empty:\n{}",
            self.log_tail()
        );
        exported_counter(&scraped, name).unwrap_or_else(|| panic!("/metrics has no counter {name}"))
    }

    /// Waits until the counter reaches `at_least`, failing at once if the bridge exits.
    pub async fn wait_counter(&mut self, name: &str, at_least: u64, timeout: Duration) {
        let port = self.metrics_port.expect("config has [metrics] listen");
        let value = Cell::new(0);
        let this = RefCell::new(&mut *self);
        let reached = try_wait_until(timeout, async || {
            value.set(counter_or_zero(port, name).await);
            if value.get() < at_least {
                this.borrow_mut()
                    .assert_running(&format!("while waiting for {name}"));
            }
            value.get() >= at_least
        })
        .await;
        assert!(
            reached,
            "counter {name} is {}, expected at least {at_least}:\n{}",
            value.get(),
            self.log_tail()
        );
    }

    /// Waits until the log contains `needle`, failing at once if the bridge exits.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let this = RefCell::new(&mut *self);
        let found = try_wait_until(timeout, async || {
            let mut this = this.borrow_mut();
            let found = this.log_text().contains(needle);
            if !found {
                this.assert_running(&format!("while waiting for the log line {needle:?}"));
            }
            found
        })
        .await;
        assert!(found, "the log never said {needle:?}:\n{}", self.log_tail());
    }

    /// Sends SIGTERM and expects a clean exit (status 0) without a panic.
    pub async fn stop(mut self) -> String {
        self.assert_running("before SIGTERM");
        let pid = self.child.id().expect("pid").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the bridge exits after SIGTERM")
            .expect("wait for the bridge");
        let log = self.log_text();
        assert!(status.success(), "exit {status:?} after SIGTERM:\n{log}");
        assert!(!log.contains("panicked"), "the bridge panicked:\n{log}");
        log
    }
}

/// A counter as [`Running::counter`], but 0 while `/metrics` is not up yet (for polling
/// from the start of a run).
async fn counter_or_zero(port: u16, name: &str) -> u64 {
    exported_counter(&scrape(port).await, name).unwrap_or(0)
}

/// The value of the `Stats` counter `field` in a scrape: the samples of its family that
/// carry its labels, summed. `None` when there are none.
pub fn exported_counter(scraped: &HashMap<String, f64>, field: &str) -> Option<u64> {
    let all = cfq_bridge::stats::Stats::exported_as();
    let (_, family, extra) = all
        .iter()
        .find(|(name, _, _)| *name == field)
        .unwrap_or_else(|| panic!("Stats has no counter {field}"));
    if family.is_empty() {
        // A total exported by parts (`decode_errors` as `decode_errors_<kind>`): their sum.
        let parts: Vec<u64> = all
            .iter()
            .filter(|(name, f, _)| !f.is_empty() && name.starts_with(&format!("{field}_")))
            .filter_map(|(name, _, _)| exported_counter(scraped, name))
            .collect();
        return (!parts.is_empty()).then(|| parts.iter().sum());
    }
    let mut found = None;
    for (sample, value) in scraped {
        let (name, labels) = sample.split_once('{').unwrap_or((sample, ""));
        let matches = name == *family
            && extra
                .iter()
                .filter(|(_, v)| !v.starts_with('$'))
                .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")));
        if matches {
            *found.get_or_insert(0.0) += value;
        }
    }
    found.map(|v| v as u64)
}

/// Reads `/metrics` as name → value (labels kept in the name).
pub async fn scrape(port: u16) -> HashMap<String, f64> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let Ok(response) = reqwest::get(&url).await else {
        return HashMap::new();
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Counts the lines of a log that contain `needle` and the level `WARN` or `ERROR`.
pub fn warn_lines(log: &str, needle: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(needle) && (l.contains("WARN") || l.contains("ERROR")))
        .count()
}

/// A client of the emulator's queue, as the bridge builds it.
pub fn api(emulator: &Emulator, queue: &str) -> Client {
    let token = SecretString::from(TOKEN.to_string());
    let base = emulator.base_url();
    Client::new(ClientOptions {
        base_url: &base,
        account_id: ACCOUNT,
        queue_id: queue,
        token: &token,
        request_timeout: Duration::from_secs(10),
        max_response_bytes: 64 * 1024 * 1024,
        pool_size: 2,
        shared_pool: None,
    })
    .expect("build an API client")
}

/// Leases `count` messages for `lease_ms` from the test itself (to build scripted
/// answers that carry real lease ids).
pub async fn lease(
    emulator: &Emulator,
    queue: &str,
    count: u32,
    lease_ms: u64,
) -> Vec<PulledMessage> {
    let result = api(emulator, queue)
        .pull(PullRequest {
            batch_size: count,
            visibility_timeout_ms: lease_ms,
        })
        .await
        .expect("pull from the emulator");
    assert_eq!(
        result.messages.len(),
        count as usize,
        "lease {count} messages"
    );
    result.messages
}

/// `[metrics]` table for a port.
pub fn metrics_table(port: u16) -> String {
    format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
}
