//! `cfq-bridge archive verify`, black-box: what it counts, what it accepts (a torn tail the
//! writer repairs), and what fails it (a closed compressed segment cut short, a malformed
//! line), each with the exit code a script relies on.

mod common;

use std::path::Path;
use std::time::Duration;

use cfq_sinks::Record;
use common::archives::{json_lines, size, truncate, write_gz, write_plain, write_zst};
use common::{record, run_bridge};

fn records(prefix: &str, range: std::ops::Range<u64>) -> Vec<Record> {
    range
        .map(|n| {
            record(format!("{prefix}-{n:04}"))
                .timestamp_ms(1_764_460_800_000 + n * 1_000)
                .json(&serde_json::json!({ "n": n }))
                .build()
        })
        .collect()
}

async fn verify(target: &Path) -> (Option<i32>, String) {
    let output = run_bridge(
        &[
            "--log",
            "error",
            "archive",
            "verify",
            target.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    )
    .await;
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn a_directory_of_segments_in_every_format_is_counted_whole() {
    let dir = tempfile::tempdir().unwrap();
    let segments = dir.path().join("archive");
    std::fs::create_dir_all(segments.join("nested")).unwrap();
    let all = records("m", 0..300);
    write_plain(&segments.join("q-1.jsonl"), &all[..100]);
    write_gz(
        &segments.join("q-2.jsonl.gz"),
        &[&all[100..150], &all[150..200]],
    );
    write_zst(&segments.join("nested/q-3.jsonl.zst"), &[&all[200..300]]);
    // Not segments: skipped.
    std::fs::write(segments.join(".lock"), "123").unwrap();
    std::fs::write(segments.join("notes.txt"), "hello").unwrap();
    // A redelivered record stored twice.
    write_plain(&segments.join("q-4.jsonl"), &all[0..1]);

    let (code, text) = verify(&segments).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("segments       4"), "{text}");
    assert!(text.contains("records        301"), "{text}");
    assert!(
        text.contains("time span      2025-11-30T00:00:00.000Z .. 2025-11-30T00:04:59.000Z"),
        "{text}"
    );
    assert!(text.contains("duplicate ids  1 (1 extra copies"), "{text}");
    assert!(text.contains("m-0000 ×2"), "{text}");
    assert!(text.contains("result: ok"), "{text}");
}

#[tokio::test]
async fn a_closed_compressed_segment_cut_short_fails_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let all = records("c", 0..200);
    let cut = dir.path().join("q-1.jsonl.zst");
    write_zst(&cut, &[&all[..100], &all[100..]]);
    truncate(&cut, size(&cut) - 50);
    let (code, text) = verify(&cut).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("UNREADABLE") && text.contains("q-1.jsonl.zst:"),
        "{text}"
    );
    assert!(
        text.contains("records        100"),
        "the first frame is read: {text}"
    );
    assert!(text.contains("result: FAILED"), "{text}");

    // The same bytes in a segment still open are a tail the sink repairs: not a failure.
    let open = dir.path().join("q-2.jsonl.zst.partial");
    std::fs::copy(&cut, &open).unwrap();
    let (code, text) = verify(&open).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("repairable") && text.contains("still open"),
        "{text}"
    );
}

#[tokio::test]
async fn a_malformed_line_fails_with_its_file_and_line_and_a_torn_last_line_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let all = records("p", 0..10);
    let file = dir.path().join("a.jsonl");
    let mut bytes = json_lines(&all[..5]);
    bytes.extend_from_slice(b"{\"not\": \"a record\"}\n");
    bytes.extend(json_lines(&all[5..]));
    std::fs::write(&file, &bytes).unwrap();
    let (code, text) = verify(&file).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(&format!("{}:6", file.display())), "{text}");

    // A plain archive whose last line was torn by a crash: the sink cuts it on open.
    let torn = dir.path().join("b.jsonl");
    let mut bytes = json_lines(&all);
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&torn, &bytes).unwrap();
    let (code, text) = verify(&torn).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("records        9") && text.contains("repairable"),
        "{text}"
    );
}

#[tokio::test]
async fn nothing_to_verify_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _) = verify(&dir.path().join("missing/*.jsonl")).await;
    assert_eq!(code, Some(1));
}

#[cfg(feature = "parquet")]
#[tokio::test]
async fn parquet_files_are_read_and_a_damaged_one_fails() {
    let dir = tempfile::tempdir().unwrap();
    let all = records("pq", 0..50);
    let bytes = cfq_sinks::parquet::encode(&all, cfq_sinks::compress::Compression::Zstd).unwrap();
    let good = dir.path().join("q-1.parquet");
    std::fs::write(&good, &bytes).unwrap();
    let (code, text) = verify(&good).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("records        50"), "{text}");

    // Parquet keeps its index at the end: a cut file has nothing readable, and a writer
    // never leaves one (objects are put whole), so it is not a repairable tail.
    let cut = dir.path().join("q-2.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() - 20]).unwrap();
    let (code, text) = verify(&cut).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("UNREADABLE") && text.contains("q-2.parquet:1"),
        "{text}"
    );
}
