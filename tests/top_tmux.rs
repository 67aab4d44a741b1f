//! `cfq-bridge top` as a person sees it: inside tmux, against a bridge that is moving
//! messages slowly (the emulator answers every call after 100 ms; five messages a pull).
//! The queue's row must show up with numbers that change; `q` must end it with the
//! terminal put back (main screen, canonical mode and echo on).
//!
//! Needs `tmux` (`.ci/test` installs it). Each test runs its own tmux server
//! (`tmux -L <unique name>`), so parallel tests don't meet.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use cfq_emulator::{ContentType, EmulatorConfig, Faults, SeedSpec};
use common::*;

/// A private tmux server, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(tag: &str) -> Tmux {
        let probe = Command::new("tmux").arg("-V").output();
        assert!(
            probe.as_ref().is_ok_and(|o| o.status.success()),
            "tmux is not installed ({probe:?}); `.ci/test` installs it (apt-get install tmux)"
        );
        Tmux {
            socket: format!("cfq-{tag}-{}", queue_name("t")),
        }
    }

    /// Runs `tmux -L SOCKET -f /dev/null ARGS` and returns its stdout, or the failure.
    fn try_run(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .map_err(|e| format!("run tmux: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "tmux {args:?}: {}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    fn run(&self, args: &[&str]) -> String {
        self.try_run(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The visible text of the pane.
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    /// The text of the pane's main screen with its scrollback: a dead pane's closing
    /// message scrolls the screen by a line.
    fn screen_and_history(&self) -> String {
        self.run(&["capture-pane", "-p", "-S", "-", "-t", "top"])
    }

    /// A tmux format variable of the pane (`#{pane_dead}`, ...).
    fn pane(&self, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", "top", format])
            .trim()
            .to_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.try_run(&["kill-server"]);
    }
}

/// The table line of `queue` on `screen`, split into cells.
fn row_cells(screen: &str, queue: &str) -> Option<Vec<String>> {
    let line = screen.lines().find(|l| l.contains(queue))?;
    let cells: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    let at = cells.iter().position(|c| c == queue)?;
    Some(cells[at..].to_vec())
}

/// Polls the pane until `ok` holds for the row of `queue`, or panics with the screen.
async fn wait_row(
    tmux: &Tmux,
    queue: &str,
    what: &str,
    timeout: Duration,
    mut ok: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let screen = tmux.screen();
        if let Some(cells) = row_cells(&screen, queue) {
            if ok(&cells) {
                return cells;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; the screen:\n{screen}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_the_queue_moving_and_quits_on_q() {
    let emulator = start_emulator_with(EmulatorConfig {
        tokens: vec![TOKEN.to_string()],
        faults: Faults {
            latency_ms: 100,
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let queue = queue_name("top");
    emulator.seed(
        ACCOUNT,
        &queue,
        &SeedSpec {
            count: 5_000,
            body_size: 32,
            content_type: ContentType::Json,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut bridge, port) =
        run_into_jsonl(&emulator, &queue, "batch_size = 5\npullers = 1", dir.path());

    // top inside a 160x40 pane; when it ends, the shell around it prints the tty modes
    // and top's exit status, and the pane stays (remain-on-exit) to be read.
    let tmux = Tmux::new("top");
    let bin = env!("CARGO_BIN_EXE_cfq-bridge");
    let script = format!(
        "'{bin}' top --url http://127.0.0.1:{port}; status=$?; \
         echo \"tty after top: $(stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo | tr '\\n' ' ')\"; \
         echo \"top exit status: $status\""
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "40",
        "sh",
        "-c",
        &script,
        ";",
        "set-option",
        "-w",
        "-t",
        "top",
        "remain-on-exit",
        "on",
    ]);

    // The row appears, then its rates are known (a second scrape) and messages move.
    let first = wait_row(
        &tmux,
        &queue,
        "a pulled/s above 0 in the queue's row",
        Duration::from_secs(30),
        |cells| cells.get(1).and_then(|c| c.parse::<f64>().ok()) > Some(0.0),
    )
    .await;
    assert!(tmux.screen().contains("PULLED/S"), "{}", tmux.screen());
    assert_eq!(
        tmux.pane("#{alternate_on}"),
        "1",
        "top draws on the alternate screen"
    );
    let changed = wait_row(
        &tmux,
        &queue,
        "the row's numbers to change",
        Duration::from_secs(15),
        |cells| cells != first.as_slice(),
    )
    .await;
    assert_ne!(first, changed);
    bridge.assert_running("while top watched it");

    tmux.run(&["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.pane("#{pane_dead}") != "1" {
        assert!(
            Instant::now() < deadline,
            "top did not exit after q:\n{}",
            tmux.screen()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let screen = tmux.screen_and_history();
    assert!(screen.contains("top exit status: 0"), "{screen}");
    let modes = screen
        .lines()
        .find_map(|l| l.strip_prefix("tty after top: "))
        .unwrap_or_else(|| panic!("no tty modes printed:\n{screen}"));
    let modes: Vec<&str> = modes.split_whitespace().collect();
    assert!(
        modes.contains(&"icanon") && modes.contains(&"echo"),
        "the terminal is still raw after top: {modes:?}"
    );
    assert_eq!(
        tmux.pane("#{alternate_on}"),
        "0",
        "top left the alternate screen on"
    );
    assert!(
        !screen.contains("PULLED/S"),
        "the table is still on the main screen:\n{screen}"
    );
    // The pane was only kept to be read: closing it ends the session.
    tmux.run(&["kill-pane", "-t", "top"]);
    assert!(
        tmux.try_run(&["has-session", "-t", "top"]).is_err(),
        "the tmux session is still there"
    );

    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_says_when_the_endpoint_is_unreachable_and_keeps_running() {
    // Nothing listens on this port.
    let port = reserve_port();
    let tmux = Tmux::new("down");
    let bin = env!("CARGO_BIN_EXE_cfq-bridge");
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "40",
        bin,
        "top",
        "--url",
        &format!("http://127.0.0.1:{port}"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let screen = tmux.screen();
        if screen.contains("UNAVAILABLE: cannot connect to") {
            assert!(screen.contains("retrying every 1s"), "{screen}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no unreachable status line:\n{screen}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still running a few scrapes later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(tmux.pane("#{pane_dead}"), "0");
    assert!(tmux.screen().contains("UNAVAILABLE"));
    tmux.run(&["send-keys", "-t", "top", "Escape"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.try_run(&["has-session", "-t", "top"]).is_ok() {
        assert!(Instant::now() < deadline, "top did not exit after Esc");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
