//! The archive source, black-box: archives written with `Record::write_json_line` (plain,
//! gzip members, zstd frames) read back through `pipeline::run` into a sink.
//!
//! - every record arrives once and identical, from every format and through globs;
//! - the invariant: the checkpoint never passes a record the sink refused, and the run
//!   fails naming its `file:line` after `max_attempts` offers; a transient outage loses
//!   nothing;
//! - a restart resumes after the checkpoint, with duplicates bounded by the in-flight
//!   bound;
//! - torn files give their readable prefix and a report; malformed lines are reported with
//!   `file:line`;
//! - the `since_ms`, `until_ms` and `content_types` filters, in the source and in `scan`.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cfq_bridge::pipeline::{self, PipelineError, StopReason, Summary};
use cfq_bridge::sources::archive::{scan, ArchiveConfig, ArchiveSource};
use cfq_bridge::stats::Stats;
use cfq_sinks::jsonl::{JsonlConfig, JsonlSink};
use cfq_sinks::{ContentType, Outcome, Record, Sink, SinkError};
use serde_json::json;
use tokio::sync::oneshot;

use common::archives::{self, size, truncate, write_gz, write_plain, write_zst};
use common::records::record;

/// Records of every content type, with metadata worth keeping: ids `{prefix}-{i}`,
/// timestamps `1000 + i`.
fn sample(prefix: &str, range: std::ops::Range<u64>) -> Vec<Record> {
    range
        .map(|i| {
            let builder = record(format!("{prefix}-{i}"))
                .queue(format!("queue-{}", i % 3))
                .timestamp_ms(1000 + i)
                .attempts(1)
                .meta("n", i)
                .meta("nested", json!({"a": [1, "x\ny"], "f": 1.5, "z": null}));
            let builder = match i % 4 {
                0 => builder.text(format!("text {i} \u{e9}\u{1F600} \"quoted\"\t\\")),
                1 => builder.body(
                    ContentType::Json,
                    format!(
                        r#" {{ "i" : {i},"s":"\u00e9" , "big": 123456789012345678901234567890 }}"#
                    ),
                ),
                2 => builder.body(
                    ContentType::Bytes,
                    Bytes::from(
                        (0..=255u8)
                            .cycle()
                            .skip(i as usize)
                            .take(40)
                            .collect::<Vec<_>>(),
                    ),
                ),
                _ => builder.body(ContentType::V8, Bytes::from(vec![0xff, 0x0f, i as u8])),
            };
            builder.build()
        })
        .collect()
}

fn archive_config(paths: &[String], checkpoint: Option<&Path>) -> ArchiveConfig {
    let mut config: ArchiveConfig = toml::from_str(&format!(
        "paths = {}\nbatch_size = 10\nmax_in_flight = 50\nmax_attempts = 3\nretry_base_delay_secs = 1\nshutdown_grace_ms = 5000",
        serde_json::to_string(paths).unwrap()
    ))
    .unwrap();
    config.checkpoint = checkpoint.map(Path::to_path_buf);
    config
}

fn path_text(path: &Path) -> String {
    path.display().to_string()
}

/// Runs `source` into `sink` until it is exhausted, fails, or `shutdown` resolves.
async fn run(
    config: ArchiveConfig,
    sink: Arc<dyn Sink>,
    shutdown: impl std::future::Future<Output = ()>,
) -> (
    Result<Summary, PipelineError>,
    Arc<ArchiveSource>,
    Arc<Stats>,
) {
    let stats = Arc::new(Stats::default());
    let source = Arc::new(ArchiveSource::new(config, Arc::clone(&stats)).expect("a source"));
    let options = source.pipeline_options();
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        pipeline::run(
            Arc::clone(&source),
            sink,
            Arc::clone(&stats),
            options,
            shutdown,
        ),
    )
    .await
    .expect("the run ends");
    (result, source, stats)
}

/// A sink that confirms what it keeps, refuses some ids for good, fails its first calls
/// transiently, can be slow, and can ask for a shutdown after some confirmations.
#[derive(Default)]
struct TestSink {
    /// Ids refused (permanently) while they were offered fewer times than this.
    refuse: HashMap<String, u32>,
    /// Calls that fail every record transiently, before the sink works.
    transient_calls: AtomicU32,
    /// Time each call takes.
    delay: Duration,
    /// A call holding one of these ids takes this long instead.
    slow: (HashSet<String>, Duration),
    /// Records confirmed, in order.
    confirmed: Mutex<Vec<Record>>,
    /// Times each id was offered.
    offers: Mutex<HashMap<String, u32>>,
    /// Fired once this many records are confirmed.
    stop_after: Option<usize>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl TestSink {
    fn confirmed_ids(&self) -> Vec<String> {
        self.confirmed
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.id.clone())
            .collect()
    }

    fn offers(&self, id: &str) -> u32 {
        self.offers.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

#[async_trait]
impl Sink for TestSink {
    fn kind(&self) -> &'static str {
        "test"
    }

    async fn deliver(&self, records: &[Record]) -> Vec<Outcome> {
        let delay = if records.iter().any(|r| self.slow.0.contains(&r.id)) {
            self.slow.1
        } else {
            self.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self
            .transient_calls
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return vec![Outcome::Failed(SinkError::transient("test outage")); records.len()];
        }
        let mut outcomes = Vec::with_capacity(records.len());
        let mut confirmed = self.confirmed.lock().unwrap();
        let mut offers = self.offers.lock().unwrap();
        for record in records {
            let offered = offers.entry(record.id.clone()).or_default();
            *offered += 1;
            if self.refuse.get(&record.id).is_some_and(|&n| *offered <= n) {
                outcomes.push(Outcome::Failed(SinkError::permanent("refused by the test")));
            } else {
                confirmed.push(record.clone());
                outcomes.push(Outcome::Confirmed);
            }
        }
        if self.stop_after.is_some_and(|n| confirmed.len() >= n) {
            if let Some(stop) = self.stop.lock().unwrap().take() {
                let _ = stop.send(());
            }
        }
        outcomes
    }
}

fn by_id(records: impl IntoIterator<Item = Record>) -> HashMap<String, Record> {
    records.into_iter().map(|r| (r.id.clone(), r)).collect()
}

/// The checkpoint file's `(complete, file, line)`.
fn checkpoint_position(path: &Path) -> (bool, usize, u64) {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    (
        v["complete"].as_bool().unwrap(),
        v["file"].as_u64().unwrap() as usize,
        v["line"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_arrives_once_and_identical_from_plain_gzip_and_zstd_archives() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let plain = sample("plain", 0..120);
    let gz = sample("gz", 0..120);
    let zst = sample("zst", 0..100);
    write_plain(&input.join("a.jsonl"), &plain);
    write_gz(&input.join("b.jsonl.gz"), &[&gz[..50], &gz[50..]]);
    write_zst(&input.join("c.jsonl.zst"), &[&zst[..60], &zst[60..]]);
    let checkpoint = dir.path().join("state/replay.checkpoint");
    let out = dir.path().join("out/replayed.jsonl");
    let config = archive_config(
        &[
            path_text(&input.join("*.jsonl")),
            path_text(&input.join("*.gz")),
            path_text(&input.join("c.jsonl.zst")),
            // The same file again, through another pattern: read once.
            path_text(&input.join("a.*")),
        ],
        Some(&checkpoint),
    );
    let sink = Arc::new(JsonlSink::open(&JsonlConfig::file(out.clone())).unwrap());
    let (result, source, stats) = run(config.clone(), sink, std::future::pending()).await;
    let summary = result.expect("the replay succeeds");
    assert_eq!(summary.reason, StopReason::Drained);
    assert_eq!(summary.unacked_confirmed, 0);

    let text = std::fs::read(&out).unwrap();
    let written: Vec<Record> = text
        .split_inclusive(|b| *b == b'\n')
        .map(|line| Record::from_json_line(line).expect("the sink wrote a record line"))
        .collect();
    let expected: Vec<Record> = plain.into_iter().chain(gz).chain(zst).collect();
    assert_eq!(written.len(), expected.len(), "each record exactly once");
    let written = by_id(written);
    assert_eq!(written.len(), expected.len(), "no id twice");
    for record in &expected {
        assert_eq!(
            written.get(&record.id),
            Some(record),
            "record {}",
            record.id
        );
    }

    let report = source.report();
    assert_eq!(report.files.len(), 3);
    assert_eq!((report.read, report.selected), (340, 340));
    assert!(report.complete && report.unreadable_tails.is_empty());
    assert_eq!(stats.snapshot().archive_records_read, 340);
    assert_eq!(checkpoint_position(&checkpoint), (true, 3, 0));
    drop(source);

    // Again with the same checkpoint: everything is settled, nothing is sent.
    let sink = Arc::new(TestSink::default());
    let (result, _, _) = run(config, sink.clone(), std::future::pending()).await;
    assert_eq!(result.unwrap().reason, StopReason::Drained);
    assert!(sink.confirmed_ids().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_never_passes_a_record_the_sink_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.jsonl");
    let records = sample("r", 0..300);
    write_plain(&file, &records);
    let checkpoint = dir.path().join("cp");
    let config = archive_config(&[path_text(&file)], Some(&checkpoint));
    // r-150 is line 151. Everything else is confirmed.
    let sink = Arc::new(TestSink {
        refuse: HashMap::from([("r-150".to_string(), u32::MAX)]),
        ..TestSink::default()
    });
    let (result, source, stats) = run(config.clone(), sink.clone(), std::future::pending()).await;
    let error = result.expect_err("the run fails").to_string();
    let place = format!("{}:151", file.display());
    assert!(error.contains(&place), "{error} names {place}");
    assert!(
        error.contains("r-150") && error.contains("3 offers"),
        "{error}"
    );
    assert!(
        error.contains("refused by the test"),
        "{error} carries the sink's reason"
    );
    assert_eq!(sink.offers("r-150"), 3, "offered max_attempts times");
    assert_eq!(stats.snapshot().archive_reoffered, 2);
    // Every record before it was confirmed; the checkpoint stops right before it.
    let confirmed: HashSet<String> = sink.confirmed_ids().into_iter().collect();
    assert!((0..150).all(|i| confirmed.contains(&format!("r-{i}"))));
    assert_eq!(checkpoint_position(&checkpoint), (false, 0, 150));
    assert_eq!(source.report().position.line, 150);
    drop(source);

    // A sink that now takes it: the run resumes at that record, and finishes.
    let again = Arc::new(TestSink::default());
    let (result, _, _) = run(config, again.clone(), std::future::pending()).await;
    assert_eq!(result.unwrap().reason, StopReason::Drained);
    let resent = again.confirmed_ids();
    assert!(resent.iter().any(|id| id == "r-150"));
    assert!(
        resent
            .iter()
            .all(|id| id[2..].parse::<u32>().unwrap() >= 150),
        "the restart starts at the refused record"
    );
    let all: HashSet<String> = confirmed.into_iter().chain(resent).collect();
    assert_eq!(all.len(), 300, "nothing lost");
    assert_eq!(checkpoint_position(&checkpoint), (true, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_refused_fewer_times_than_max_attempts_and_a_transient_outage_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.jsonl.gz");
    let records = sample("t", 0..200);
    write_gz(&file, &[&records]);
    let checkpoint = dir.path().join("cp");
    let sink = Arc::new(TestSink {
        refuse: HashMap::from([("t-7".to_string(), 2), ("t-120".to_string(), 1)]),
        transient_calls: AtomicU32::new(3),
        ..TestSink::default()
    });
    let (result, _, stats) = run(
        archive_config(&[path_text(&file)], Some(&checkpoint)),
        sink.clone(),
        std::future::pending(),
    )
    .await;
    assert_eq!(result.unwrap().reason, StopReason::Drained);
    let ids = sink.confirmed_ids();
    assert_eq!(ids.len(), 200, "each record confirmed once");
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 200);
    assert_eq!(sink.offers("t-7"), 3);
    let snapshot = stats.snapshot();
    assert_eq!(snapshot.archive_reoffered, 3);
    assert!(snapshot.sink_transient_failures > 0);
    assert_eq!(checkpoint_position(&checkpoint), (true, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_after_the_checkpoint_with_duplicates_bounded_by_the_in_flight_bound() {
    let dir = tempfile::tempdir().unwrap();
    let records = sample("s", 0..1000);
    write_plain(&dir.path().join("a.jsonl"), &records[..400]);
    write_zst(&dir.path().join("b.jsonl.zst"), &[&records[400..]]);
    let checkpoint = dir.path().join("cp");
    let mut config = archive_config(
        &[path_text(&dir.path().join("*.jsonl*"))],
        Some(&checkpoint),
    );
    config.shutdown_grace_ms = 200;
    let max_in_flight = config.max_in_flight as usize;

    // The batch of s-250..s-259 hangs past the grace period, so it is given back
    // undelivered at shutdown, while later batches are confirmed: the checkpoint must
    // stay before it, and the restart must deliver it.
    let (stop_tx, stop_rx) = oneshot::channel();
    let first = Arc::new(TestSink {
        delay: Duration::from_millis(3),
        slow: (
            HashSet::from(["s-250".to_string()]),
            Duration::from_secs(30),
        ),
        stop_after: Some(270),
        stop: Mutex::new(Some(stop_tx)),
        ..TestSink::default()
    });
    let (result, source, _) = run(config.clone(), first.clone(), async {
        let _ = stop_rx.await;
    })
    .await;
    let summary = result.unwrap();
    assert_eq!(summary.reason, StopReason::Signal);
    let first_ids = first.confirmed_ids();
    assert!(
        first_ids.len() >= 270 && first_ids.len() < 1000,
        "{}",
        first_ids.len()
    );
    assert!(!first_ids.contains(&"s-250".to_string()));
    assert!(
        first_ids.contains(&"s-260".to_string()),
        "confirmed after the gap"
    );
    assert_eq!(
        checkpoint_position(&checkpoint),
        (false, 0, 250),
        "stopped at the gap"
    );
    let position = source.report().position;
    drop(source);

    let second = Arc::new(TestSink::default());
    let (result, _, _) = run(config, second.clone(), std::future::pending()).await;
    assert_eq!(result.unwrap().reason, StopReason::Drained);
    let second_ids = second.confirmed_ids();
    assert!(second_ids.contains(&"s-250".to_string()));
    let all: HashSet<&String> = first_ids.iter().chain(&second_ids).collect();
    assert_eq!(all.len(), 1000, "every record delivered");
    let duplicates = first_ids.len() + second_ids.len() - 1000;
    assert!(
        duplicates <= max_in_flight,
        "{duplicates} duplicates, in-flight bound {max_in_flight} (stopped at {position:?})"
    );
    assert_eq!(checkpoint_position(&checkpoint), (true, 2, 0));
}

/// How many of `{name}-0`, `{name}-1`, ... arrived, checking that they are a prefix.
fn prefix_len(got: &HashSet<String>, name: &str, of: usize) -> usize {
    let n = (0..of)
        .take_while(|i| got.contains(&format!("{name}-{i}")))
        .count();
    assert!(
        (n..of).all(|i| !got.contains(&format!("{name}-{i}"))),
        "{name}: what arrived is a prefix"
    );
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tails_give_their_readable_prefix_and_malformed_lines_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    // a: 20 records, then half of a 21st without its newline.
    let a = sample("a", 0..21);
    let torn = archives::json_lines(&a);
    let last_start = archives::json_lines(&a[..20]).len();
    let cut = last_start + (torn.len() - last_start) / 2;
    std::fs::write(dir.path().join("a.jsonl"), &torn[..cut]).unwrap();
    // b: two gzip members, the second cut in its middle.
    let b = sample("b", 0..60);
    let b_path = dir.path().join("b.jsonl.gz");
    write_gz(&dir.path().join("b-first.tmp"), &[&b[..30]]);
    let first_member = size(&dir.path().join("b-first.tmp"));
    write_gz(&b_path, &[&b[..30], &b[30..]]);
    truncate(&b_path, first_member + (size(&b_path) - first_member) / 2);
    // c: two zstd frames, the second cut in its middle.
    let c = sample("c", 0..60);
    let c_path = dir.path().join("c.jsonl.zst");
    write_zst(&dir.path().join("c-first.tmp"), &[&c[..30]]);
    let first_frame = size(&dir.path().join("c-first.tmp"));
    write_zst(&c_path, &[&c[..30], &c[30..]]);
    truncate(&c_path, first_frame + (size(&c_path) - first_frame) / 2);
    // d: line 5 is not a record, line 7 (a bytes record) has a bad content type.
    let d = sample("d", 0..10);
    let mut d_lines: Vec<Vec<u8>> = d
        .iter()
        .map(|r| archives::json_lines(std::slice::from_ref(r)))
        .collect();
    d_lines[4] = b"{\"id\": \"cut\n".to_vec();
    d_lines[6] = String::from_utf8(d_lines[6].clone())
        .unwrap()
        .replace("\"content_type\":\"bytes\"", "\"content_type\":\"xml\"")
        .into_bytes();
    std::fs::write(dir.path().join("d.jsonl"), d_lines.concat()).unwrap();
    // e: a whole last record, only its newline missing: it is read.
    let e_lines = archives::json_lines(&sample("e", 0..3));
    std::fs::write(dir.path().join("e.jsonl"), &e_lines[..e_lines.len() - 1]).unwrap();

    let checkpoint = dir.path().join("cp");
    let config = archive_config(
        &[path_text(&dir.path().join("*.jsonl*"))],
        Some(&checkpoint),
    );
    let sink = Arc::new(TestSink::default());
    let (result, source, stats) = run(config.clone(), sink.clone(), std::future::pending()).await;
    assert_eq!(result.unwrap().reason, StopReason::Drained);
    let got: HashSet<String> = sink.confirmed_ids().into_iter().collect();

    let prefix = |name: &str, of: usize| prefix_len(&got, name, of);
    assert_eq!(prefix("e", 3), 3, "e: its unterminated whole last line too");
    assert_eq!(
        prefix("a", 21),
        20,
        "a: the whole lines before the torn one"
    );
    let b_read = prefix("b", 60);
    assert!(
        (30..60).contains(&b_read),
        "b: the first member at least, not the cut end: {b_read}"
    );
    let c_read = prefix("c", 60);
    assert!(
        (30..60).contains(&c_read),
        "c: the first frame at least, not the cut end: {c_read}"
    );
    let d_got: Vec<usize> = (0..10)
        .filter(|i| got.contains(&format!("d-{i}")))
        .collect();
    assert_eq!(d_got, [0, 1, 2, 3, 5, 7, 8, 9]);

    let report = source.report();
    assert_eq!(
        report.unreadable_tails.len(),
        3,
        "{:?}",
        report.unreadable_tails
    );
    let tail_of = |name: &str| {
        report
            .unreadable_tails
            .iter()
            .find(|t| t.path.ends_with(name))
            .unwrap_or_else(|| panic!("a tail for {name}"))
    };
    let a_tail = tail_of("a.jsonl");
    assert_eq!((a_tail.line, a_tail.byte), (21, last_start as u64));
    assert!(a_tail.to_string().contains("a.jsonl:21"), "{a_tail}");
    assert_eq!(tail_of("b.jsonl.gz").line, b_read as u64 + 1);
    assert!(tail_of("b.jsonl.gz").compressed_bytes_read.is_some());
    assert_eq!(tail_of("c.jsonl.zst").line, c_read as u64 + 1);
    assert_eq!(report.malformed, 2);
    let d_path = dir.path().join("d.jsonl").display().to_string();
    assert!(
        report.malformed_examples[0].starts_with(&format!("{d_path}:5: ")),
        "{:?}",
        report.malformed_examples
    );
    assert!(
        report.malformed_examples[1]
            .starts_with(&format!("{d_path}:7: unknown content_type \"xml\"")),
        "{:?}",
        report.malformed_examples
    );
    let snapshot = stats.snapshot();
    assert_eq!(snapshot.archive_unreadable_tails, 3);
    assert_eq!(snapshot.archive_malformed_lines, 2);
    assert!(report.complete, "skipped lines and tails count as settled");
    drop(source);

    // `scan` reads the same, and a restart over the finished checkpoint reads nothing.
    let scanned = scan(
        &archive_config(&[path_text(&dir.path().join("*.jsonl*"))], None),
        |_| {},
    )
    .unwrap();
    assert_eq!(scanned.selected as usize, got.len());
    assert_eq!(scanned.unreadable_tails, report.unreadable_tails);
    assert_eq!(scanned.malformed_examples, report.malformed_examples);
    let rescanned = scan(&config, |_| panic!("nothing left to read")).unwrap();
    assert!(rescanned.complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_until_and_content_type_filters_select_records() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.jsonl");
    let records = sample("f", 0..100);
    write_plain(&file, &records);
    let mut config = archive_config(&[path_text(&file)], Some(&dir.path().join("cp")));
    config.since_ms = Some(1020);
    config.until_ms = Some(1060);
    config.content_types = Some(vec![ContentType::Json, ContentType::Text]);
    let expected: HashSet<String> = records
        .iter()
        .filter(|r| {
            (1020..1060).contains(&r.timestamp_ms)
                && matches!(r.content_type, ContentType::Json | ContentType::Text)
        })
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(expected.len(), 20);

    let mut visited = HashSet::new();
    let report = scan(&config, |r| {
        visited.insert(r.id.clone());
    })
    .unwrap();
    assert_eq!(visited, expected);
    assert_eq!(
        (report.read, report.selected, report.filtered),
        (100, 20, 80)
    );

    let sink = Arc::new(TestSink::default());
    let (result, source, stats) = run(config, sink.clone(), std::future::pending()).await;
    assert_eq!(result.unwrap().reason, StopReason::Drained);
    let got: HashSet<String> = sink.confirmed_ids().into_iter().collect();
    assert_eq!(got, expected);
    assert_eq!(stats.snapshot().archive_filtered, 80);
    assert!(source.report().complete, "filtered lines count as settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_for_other_inputs_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.jsonl");
    let b = dir.path().join("b.jsonl");
    write_plain(&a, &sample("x", 0..10));
    write_plain(&b, &sample("y", 0..10));
    let checkpoint = dir.path().join("cp");
    let both = archive_config(&[path_text(&dir.path().join("*.jsonl"))], Some(&checkpoint));
    let (result, source, _) = run(
        both.clone(),
        Arc::new(TestSink::default()),
        std::future::pending(),
    )
    .await;
    result.unwrap();
    drop(source);

    let only_a = archive_config(&[path_text(&a)], Some(&checkpoint));
    let error = ArchiveSource::new(only_a, Arc::new(Stats::default()))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("b.jsonl") && error.contains("missing"),
        "{error}"
    );
    write_plain(&b, &sample("y", 0..11));
    let error = ArchiveSource::new(both, Arc::new(Stats::default()))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("b.jsonl") && error.contains("changed"),
        "{error}"
    );
    let missing = archive_config(&[path_text(&dir.path().join("*.zst"))], None);
    let error = scan(&missing, |_| {}).unwrap_err().to_string();
    assert!(
        error.contains("*.zst") && error.contains("matches no file"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_records_keep_their_room_until_a_checkpoint_records_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.jsonl");
    write_plain(&file, &sample("h", 0..300));
    let state = dir.path().join("state");
    let checkpoint = state.join("cp");
    let config = archive_config(&[path_text(&file)], Some(&checkpoint));
    let max_in_flight = config.max_in_flight as usize;
    let stats = Arc::new(Stats::default());
    let source = Arc::new(ArchiveSource::new(config, Arc::clone(&stats)).unwrap());
    // The checkpoint cannot be written while its directory is gone.
    std::fs::remove_dir_all(&state).unwrap();
    let sink = Arc::new(TestSink::default());
    let options = source.pipeline_options();
    let running = tokio::spawn(pipeline::run(
        Arc::clone(&source),
        sink.clone() as Arc<dyn Sink>,
        Arc::clone(&stats),
        options,
        std::future::pending(),
    ));
    let waited = tokio::time::Instant::now();
    while stats.snapshot().archive_checkpoint_failures < 3 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "checkpoint writes fail"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Confirmed but unrecorded records fill the in-flight bound, and reading waits: a
    // crash now would redeliver at most that many.
    let waited = tokio::time::Instant::now();
    while sink.confirmed_ids().len() < max_in_flight {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "{} confirmed, the bound is {max_in_flight}",
            sink.confirmed_ids().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sink.confirmed_ids().len(),
        max_in_flight,
        "nothing more is read while the checkpoint cannot be written"
    );

    std::fs::create_dir(&state).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the run ends")
        .unwrap()
        .expect("the run succeeds once the checkpoint can be written");
    assert_eq!(summary.reason, StopReason::Drained);
    let ids: HashSet<String> = sink.confirmed_ids().into_iter().collect();
    assert_eq!((ids.len(), sink.confirmed_ids().len()), (300, 300));
    assert_eq!(checkpoint_position(&checkpoint), (true, 1, 0));
}
