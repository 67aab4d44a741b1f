//! `cfq-bridge export`: a drain with progress and a closing report. Piped, it prints
//! plain progress lines every 5 s; in a pseudo-terminal (util-linux `script`), an
//! indicatif bar with an ETA. Both exit 0 with every message moved.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use cfq_emulator::{ContentType, Emulator, Faults};
use common::*;

/// Enough messages, slowly enough served (one puller, small batches, 30 ms per call), that
/// the export runs past the first 5 s progress line.
const MESSAGES: usize = 4000;

async fn slow_queue(tag: &str) -> (Emulator, String, HashSet<String>) {
    let emulator = start_emulator().await;
    let queue = queue_name(tag);
    let ids = seed_ids(&emulator, &queue, MESSAGES, 64, ContentType::Json);
    emulator.set_faults(Faults {
        latency_ms: 30,
        ..Faults::default()
    });
    (emulator, queue, ids)
}

fn export_config(emulator: &Emulator, queue: &str, dir: &Path) -> std::path::PathBuf {
    write_config(
        dir,
        &config_text(
            emulator,
            queue,
            "batch_size = 25\npullers = 1",
            &jsonl_sink(&dir.join("out.jsonl")),
        ),
    )
}

fn assert_all_moved(emulator: &Emulator, queue: &str, dir: &Path, ids: &HashSet<String>) {
    assert_eq!(
        &archive_ids(&dir.join("out.jsonl")),
        ids,
        "every message exported"
    );
    let stats = emulator.stats(ACCOUNT, queue);
    assert_eq!(stats.backlog, 0, "{stats:?}");
}

/// The backlog the first pull reported (the whole queue, less at most that pull's batch,
/// depending on whether the API counts leased messages).
fn assert_start_backlog(text: &str) {
    let at_start = text
        .split("backlog ")
        .skip(1)
        .find_map(|rest| rest.split(' ').next()?.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no `backlog N at start`: {text}"));
    assert!(
        (MESSAGES - 25..=MESSAGES).contains(&at_start),
        "backlog at start {at_start}: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_it_prints_progress_lines_and_the_report() {
    let (emulator, queue, ids) = slow_queue("exportpiped").await;
    let dir = tempfile::tempdir().unwrap();
    let config = export_config(&emulator, &queue, dir.path());
    let output = run_bridge(
        &["export", "--config", config.to_str().unwrap()],
        Duration::from_secs(120),
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}\n{stderr}", output.status);
    let progress: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("export: "))
        .collect();
    assert!(!progress.is_empty(), "no progress line:\n{stderr}");
    let first = progress[0];
    assert!(
        first.contains(" messages (") && first.contains("/s, ETA "),
        "{first}"
    );
    assert_start_backlog(first);
    assert!(
        !stderr.contains('\u{1b}'),
        "no control codes when piped:\n{stderr}"
    );
    assert!(stderr.contains("cfq-bridge export: done in"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "  moved          {MESSAGES} records to the jsonl sink"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("  left in queue  0"), "{stderr}");
    assert_all_moved(&emulator, &queue, dir.path(), &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_terminal_it_draws_a_bar_with_an_eta() {
    let (emulator, queue, ids) = slow_queue("exporttty").await;
    let dir = tempfile::tempdir().unwrap();
    let config = export_config(&emulator, &queue, dir.path());
    let command = format!(
        "{} export --config {}",
        env!("CARGO_BIN_EXE_cfq-bridge"),
        config.display()
    );
    // `script` runs the command on a pseudo-terminal and copies what it draws to stdout;
    // `-e` returns the command's exit code.
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("script")
            .args(["-q", "-e", "-c", &command, "/dev/null"])
            .env("CLOUDFLARE_API_TOKEN", TOKEN)
            .env("COLUMNS", "160")
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("export ends in time")
    .expect("util-linux `script` runs (apt-get install util-linux)");
    let screen = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{:?}\n{screen}", output.status);
    assert!(screen.contains("export ["), "a bar is drawn:\n{screen}");
    assert!(screen.contains("ETA"), "with an ETA:\n{screen}");
    assert_start_backlog(&screen);
    assert!(screen.contains("at start"), "{screen}");
    assert!(screen.contains("cfq-bridge export: done in"), "{screen}");
    assert_all_moved(&emulator, &queue, dir.path(), &ids);
}
