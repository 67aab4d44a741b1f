//! The JSONL sink's directory mode: rotation by bytes and by age, segment names, every
//! compression read back in order (by stream decoders and by the archive source), a
//! SIGKILL mid-segment and the repair at restart, and the failures that must confirm
//! nothing: a full disk and a read-only directory (real tmpfs mounts; the tests need
//! root and fail, saying why, when they cannot mount).

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cfq_bridge::sources::archive::{scan, ArchiveConfig};
use cfq_emulator::ContentType as SeedContentType;
use cfq_sinks::compress::Compression;
use cfq_sinks::jsonl::{JsonlConfig, JsonlSink};
use cfq_sinks::{Outcome, Record, Sink};
use common::*;
use serde_json::Value;

/// The segments in `dir`: the closed ones in name order, and the `.partial` ones.
fn segments(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut closed = Vec::new();
    let mut partial = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        // Not created yet.
        return (closed, partial);
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".partial") {
            partial.push(path);
        } else if name.contains(".jsonl") {
            closed.push(path);
        }
    }
    closed.sort();
    (closed, partial)
}

/// The decompressed bytes of a segment, read as `zcat` / `zstdcat` would (every member or
/// frame); panics when any of it is unreadable.
fn decompress(path: &Path) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let name = path.to_str().unwrap().trim_end_matches(".partial");
    if name.ends_with(".gz") {
        flate2::read::MultiGzDecoder::new(&data[..])
            .read_to_end(&mut out)
            .unwrap_or_else(|e| panic!("{} is unreadable: {e}", path.display()));
    } else if name.ends_with(".zst") {
        zstd::stream::read::Decoder::new(&data[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_or_else(|e| panic!("{} is unreadable: {e}", path.display()));
    } else {
        out = data;
    }
    out
}

/// The ids in a segment, in order; every line must parse.
fn segment_ids(path: &Path) -> Vec<String> {
    let data = decompress(path);
    assert!(
        data.is_empty() || data.ends_with(b"\n"),
        "{} ends mid-line",
        path.display()
    );
    data.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|line| {
            let value: Value = serde_json::from_slice(line)
                .unwrap_or_else(|e| panic!("{}: bad line: {e}", path.display()));
            value["id"].as_str().unwrap().to_string()
        })
        .collect()
}

/// The ids of every closed segment, in name order.
fn all_ids(dir: &Path) -> Vec<String> {
    segments(dir)
        .0
        .iter()
        .flat_map(|p| segment_ids(p))
        .collect()
}

fn batch(range: std::ops::Range<usize>, body: usize) -> Vec<Record> {
    range
        .map(|i| {
            record(format!("id-{i:05}"))
                .queue("q1")
                .text("x".repeat(body))
                .build()
        })
        .collect()
}

fn directory_config(dir: &Path, rotate_bytes: u64, compression: Compression) -> JsonlConfig {
    JsonlConfig {
        rotate_bytes: Some(rotate_bytes),
        compression: Some(compression),
        ..JsonlConfig::directory(dir)
    }
}

async fn deliver_confirmed(sink: &JsonlSink, records: &[Record]) {
    let outcomes = sink.deliver(records).await;
    assert!(
        outcomes.iter().all(Outcome::is_confirmed),
        "not confirmed: {outcomes:?}"
    );
}

/// `<queue>-YYYYMMDDTHHMMSSZ-NNNNNN.jsonl<ext>`; returns the sequence number.
fn check_name(path: &Path, queue: &str, ext: &str) -> u64 {
    let name = path.file_name().unwrap().to_str().unwrap();
    let stem = name
        .strip_prefix(&format!("{queue}-"))
        .and_then(|n| n.strip_suffix(&format!(".jsonl{ext}")))
        .unwrap_or_else(|| panic!("bad segment name {name}"));
    let (stamp, seq) = stem.split_once('-').unwrap();
    assert_eq!(stamp.len(), 16, "{name}");
    assert!(
        stamp.starts_with("20") && &stamp[8..9] == "T" && stamp.ends_with('Z'),
        "{name}"
    );
    assert_eq!(seq.len(), 6, "{name}");
    seq.parse().unwrap()
}

#[tokio::test]
async fn rotation_by_bytes_names_segments_and_only_the_open_one_is_partial() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("archive");
    let sink = JsonlSink::open(&directory_config(&dir, 2000, Compression::None)).unwrap();
    for b in 0..20 {
        deliver_confirmed(&sink, &batch(b * 5..b * 5 + 5, 100)).await;
        let (_, partial) = segments(&dir);
        assert!(
            partial.len() <= 1,
            "more than one open segment: {partial:?}"
        );
    }
    let (closed, partial) = segments(&dir);
    assert!(closed.len() >= 5, "{closed:?}");
    let seqs: Vec<u64> = closed.iter().map(|p| check_name(p, "q1", "")).collect();
    let expected: Vec<u64> = (1..=closed.len() as u64).collect();
    assert_eq!(seqs, expected, "sequence numbers in name order");
    // Each closed segment reached rotate_bytes, and only by its last batch.
    let batch_bytes = {
        let mut lines = Vec::new();
        for r in batch(0..5, 100) {
            r.write_json_line(&mut lines);
        }
        lines.len() as u64
    };
    for path in &closed {
        let size = std::fs::metadata(path).unwrap().len();
        assert!(
            (2000..2000 + batch_bytes).contains(&size),
            "{}: {size}",
            path.display()
        );
    }
    assert!(partial.len() <= 1);
    sink.close().await.unwrap();
    let (closed, partial) = segments(&dir);
    assert!(partial.is_empty(), "a clean close leaves no .partial");
    let ids = all_ids(&dir);
    let expected: Vec<String> = (0..100).map(|i| format!("id-{i:05}")).collect();
    assert_eq!(ids, expected);
    assert!(closed.len() >= 5);
}

#[tokio::test]
async fn rotation_by_age_closes_a_quiet_segment_on_a_timer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("archive");
    let config = JsonlConfig {
        rotate_secs: Some(1),
        compression: Some(Compression::Gzip),
        ..JsonlConfig::directory(&dir)
    };
    let sink = JsonlSink::open(&config).unwrap();
    deliver_confirmed(&sink, &batch(0..3, 10)).await;
    assert_eq!(segments(&dir).1.len(), 1, "the open segment is .partial");
    // No record arrives; the segment is closed anyway.
    wait_until(
        "the quiet segment is closed",
        Duration::from_secs(10),
        async || {
            let (closed, partial) = segments(&dir);
            partial.is_empty() && closed.len() == 1
        },
    )
    .await;
    deliver_confirmed(&sink, &batch(3..5, 10)).await;
    let (closed, partial) = segments(&dir);
    assert_eq!((closed.len(), partial.len()), (1, 1));
    assert_eq!(check_name(&partial[0].with_extension(""), "q1", ".gz"), 2);
    sink.close().await.unwrap();
    let (closed, _) = segments(&dir);
    let seqs: Vec<u64> = closed.iter().map(|p| check_name(p, "q1", ".gz")).collect();
    assert_eq!(seqs, [1, 2]);
    assert_eq!(
        all_ids(&dir),
        ["id-00000", "id-00001", "id-00002", "id-00003", "id-00004"]
    );
}

#[tokio::test]
async fn every_compression_reads_back_in_order_by_decoders_and_the_archive_source() {
    for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("archive");
        let sink = JsonlSink::open(&directory_config(&dir, 3000, compression)).unwrap();
        for b in 0..30 {
            deliver_confirmed(&sink, &batch(b * 4..b * 4 + 4, 50)).await;
        }
        sink.close().await.unwrap();
        let (closed, partial) = segments(&dir);
        assert!(partial.is_empty());
        assert!(closed.len() > 2, "{compression}: {closed:?}");
        for path in &closed {
            check_name(path, "q1", compression.extension());
        }
        let expected: Vec<String> = (0..120).map(|i| format!("id-{i:05}")).collect();
        assert_eq!(all_ids(&dir), expected, "{compression}");

        // The archive source reads the closed segments, in the same order.
        let pattern = format!("{}/*.jsonl{}", dir.display(), compression.extension());
        let mut read = Vec::new();
        let report = scan(&ArchiveConfig::new(vec![pattern]), |r| {
            read.push(r.id.clone())
        })
        .unwrap();
        assert_eq!(read, expected, "{compression}");
        assert_eq!(report.malformed, 0);
        assert!(
            report.unreadable_tails.is_empty(),
            "{:?}",
            report.unreadable_tails
        );
        assert_eq!(report.files.len(), closed.len());
    }
}

#[tokio::test]
async fn a_second_sink_on_the_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("archive");
    let first = JsonlSink::open(&JsonlConfig::directory(&dir)).unwrap();
    let err = JsonlSink::open(&JsonlConfig::directory(&dir)).unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    first.close().await.unwrap();
    JsonlSink::open(&JsonlConfig::directory(&dir))
        .unwrap()
        .close()
        .await
        .unwrap();
}

/// The bridge is killed with SIGKILL while it writes a zstd segment. Before the restart,
/// every message acknowledged so far is readable in the segments once the `.partial` is
/// repaired; the restart repairs and renames it, drains the queue, and leaves no
/// unreadable segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_segment_then_restart_repairs_and_keeps_every_acked_message() {
    let emulator = start_emulator().await;
    let queue = queue_name("segkill");
    let seeded = seed_ids(&emulator, &queue, 20_000, 300, SeedContentType::Json);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("archive");
    let sink = format!(
        "type = \"jsonl\"\ndirectory = {}\nrotate_bytes = 300000\ncompression = \"zstd\"\n",
        serde_json::to_string(&dir.display().to_string()).unwrap()
    );
    let config_path = write_config(
        tmp.path(),
        &config_text(
            &emulator,
            &queue,
            "visibility_timeout_ms = 5000\nlease_margin_ms = 1000\nbatch_size = 50\n",
            &sink,
        ),
    );
    let config = config_path.to_str().unwrap();
    let mut first = Running::spawn(
        &["run", "--config", config],
        &tmp.path().join("1.log"),
        None,
    );
    let running = std::cell::RefCell::new(&mut first);
    let mid_segment = try_wait_until(Duration::from_secs(120), async || {
        let (closed, partial) = segments(&dir);
        let writing = closed.len() >= 2
            && partial
                .iter()
                .any(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false));
        if !writing {
            running.borrow_mut().assert_running("before the kill");
        }
        writing
    })
    .await;
    assert!(mid_segment, "{}", first.log_tail());
    first.child.kill().await.expect("SIGKILL");
    let stats = emulator.stats(ACCOUNT, &queue);
    let unacked: HashSet<String> = stats.never_acked_ids.into_iter().collect();
    let acked_at_kill: HashSet<String> = seeded.difference(&unacked).cloned().collect();
    assert!(!acked_at_kill.is_empty());
    let (_, partial) = segments(&dir);
    assert_eq!(partial.len(), 1, "the kill left the open segment .partial");

    // The repair, as the restart does it: open and close the sink.
    JsonlSink::open(&JsonlConfig::directory(&dir))
        .unwrap()
        .close()
        .await
        .unwrap();
    let (closed, partial) = segments(&dir);
    assert!(partial.is_empty(), "repaired and renamed");
    let readable: HashSet<String> = all_ids(&dir).into_iter().collect();
    let missing: Vec<&String> = acked_at_kill.difference(&readable).collect();
    assert!(
        missing.is_empty(),
        "{} acked messages are not in the segments, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let before_restart = closed.len();

    // Put a fresh torn segment back to see the restart itself repair it.
    let torn = dir.join(format!("{queue}-20261130T071500Z-999999.jsonl.zst.partial"));
    let whole = std::fs::read(&closed[0]).unwrap();
    let mut data = whole.clone();
    data.extend_from_slice(&whole[..whole.len() / 2]);
    std::fs::write(&torn, &data).unwrap();

    let mut second = Running::spawn(
        &["run", "--until-empty", "--config", config],
        &tmp.path().join("2.log"),
        None,
    );
    let status = tokio::time::timeout(Duration::from_secs(240), second.child.wait())
        .await
        .expect("the restart drains the queue")
        .unwrap();
    assert!(status.success(), "{}", second.log_tail());
    assert!(
        second
            .log_text()
            .contains("repaired a segment left open by an earlier crash"),
        "{}",
        second.log_tail()
    );
    let (closed, partial) = segments(&dir);
    assert!(partial.is_empty(), "{partial:?}");
    assert!(closed.len() > before_restart);
    assert!(dir
        .join(format!("{queue}-20261130T071500Z-999999.jsonl.zst"))
        .exists());
    // Every segment decodes whole, and every message is there.
    let archived: HashSet<String> = all_ids(&dir).into_iter().collect();
    let missing = seeded.difference(&archived).count();
    assert_eq!(missing, 0, "messages missing from the segments");
    let stats = emulator.stats(ACCOUNT, &queue);
    assert!(
        stats.never_acked_ids.is_empty() && stats.backlog == 0,
        "all acked"
    );
    // And `archive verify` agrees: no segment is unreadable, every record counted.
    let output = run_bridge(
        &["--log", "error", "archive", "verify", dir.to_str().unwrap()],
        Duration::from_secs(60),
    )
    .await;
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{report}");
    assert!(
        report.contains("result: ok") && !report.contains("UNREADABLE"),
        "{report}"
    );
    let counted: usize = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("records"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no record count in {report}"));
    assert!(
        counted >= seeded.len(),
        "{counted} records for {} seeded",
        seeded.len()
    );
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    /// Mounts a tmpfs with `options` at `at`; panics saying why when it cannot (the test
    /// needs root, or CAP_SYS_ADMIN).
    fn tmpfs(at: &Path, options: &str) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "this test mounts a tmpfs ({options}) at {} and needs root for it: {}",
            at.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        Mount(at.to_path_buf())
    }

    fn remount(&self, options: &str) {
        let output = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "remounting {} ({options}): {}",
            self.0.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A full disk: the batch that does not fit fails (transient, saying why), nothing of it
/// is confirmed or left in the segment, and writing resumes once there is room again.
#[tokio::test]
async fn a_full_disk_fails_transiently_confirms_nothing_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let mount = Mount::tmpfs(&tmp.path().join("small"), "size=1m");
    let filler = mount.0.join("filler");
    std::fs::write(&filler, vec![0u8; 300 << 10]).unwrap();
    let dir = mount.0.join("archive");
    let sink = JsonlSink::open(&directory_config(&dir, 64 << 20, Compression::None)).unwrap();
    let mut confirmed = Vec::new();
    let mut failure = None;
    for b in 0..40 {
        let records = batch(b * 10..b * 10 + 10, 10_000);
        let outcomes = sink.deliver(&records).await;
        match &outcomes[0] {
            Outcome::Failed(error) => {
                assert!(
                    outcomes.iter().all(|o| !o.is_confirmed()),
                    "part of a failed batch confirmed"
                );
                failure = Some(error.clone());
                break;
            }
            _ => confirmed.extend(records.iter().map(|r| r.id.clone())),
        }
    }
    let error = failure.expect("the 1 MiB tmpfs filled up");
    assert!(error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("No space left on device"),
        "{error}"
    );
    assert!(!confirmed.is_empty());
    // The failed write was cut back: the open segment holds exactly the confirmed records.
    let (_, partial) = segments(&dir);
    assert_eq!(partial.len(), 1);
    assert_eq!(segment_ids(&partial[0]), confirmed);
    sink.ready()
        .await
        .expect("a rolled-back failure leaves the sink writing");

    std::fs::remove_file(&filler).unwrap();
    let records = batch(1000..1005, 100);
    deliver_confirmed(&sink, &records).await;
    confirmed.extend(records.iter().map(|r| r.id.clone()));
    sink.close().await.unwrap();
    assert_eq!(all_ids(&dir), confirmed);
}

/// A read-only directory: the bridge refuses to start, says why and where, and acks
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_directory_stops_the_bridge_with_a_clear_error_and_no_ack() {
    let emulator = start_emulator().await;
    let queue = queue_name("segro");
    seed_ids(&emulator, &queue, 50, 100, SeedContentType::Text);
    let tmp = tempfile::tempdir().unwrap();
    let mount = Mount::tmpfs(&tmp.path().join("ro"), "size=1m");
    let dir = mount.0.join("archive");
    std::fs::create_dir(&dir).unwrap();
    mount.remount("ro");
    let sink = format!(
        "type = \"jsonl\"\ndirectory = {}\n",
        serde_json::to_string(&dir.display().to_string()).unwrap()
    );
    let config = write_config(tmp.path(), &config_text(&emulator, &queue, "", &sink));
    let output = run_bridge(
        &["run", "--config", config.to_str().unwrap(), "--until-empty"],
        Duration::from_secs(60),
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    assert!(stderr.contains(&dir.display().to_string()), "{stderr}");
    assert_eq!(emulator.stats(ACCOUNT, &queue).acked, 0);
}
