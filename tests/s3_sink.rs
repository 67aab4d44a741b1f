//! The `s3` sink against a real S3-compatible server (s3s-fs, see `.ci/start-s3.sh`).
//!
//! - 20,000 messages through `cfq-bridge run --until-empty` into the bucket, in JSONL +
//!   zstd and in Parquet; an independent Python reader (pyarrow, zstandard) reads every
//!   object back and finds every id with its body. While the bridge runs, a monitor checks
//!   over and over that the acks Cloudflare received never outnumber the records in the
//!   objects already listed: nothing is acked before its object exists.
//! - The server stopped mid-run and restarted: nothing is acked while it is down, nothing
//!   is lost, the bridge resumes and drains the queue.
//! - Bad input: a missing bucket and wrong credentials each stop the bridge with a clear
//!   error naming the bucket (and not the secret), and nothing is acked.
//! - Two deliveries sharing one object both return only once it is in the bucket.
//! - `check`: the age + upload timeout rule against the visibility timeout.

#![cfg(feature = "s3")]

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Read as _;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use cfq_emulator::Emulator;
use cfq_sinks::s3::{S3Config, S3Sink};
use cfq_sinks::{CheckContext, ContentType, Outcome, Sink};
use common::s3_server::{self, S3Server, ACCESS_KEY, SECRET_KEY};
use common::*;
use futures_util::StreamExt as _;
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, ObjectStoreExt as _};
use serde_json::{Map, Value};

/// What a test expects of each message: its content type and decoded body.
type Expected = HashMap<String, (ContentType, Vec<u8>)>;

/// Publishes `count` messages with known bodies (text, json and bytes in turn).
fn publish(emulator: &Emulator, queue: &str, count: usize) -> Expected {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut expected = HashMap::with_capacity(count);
    for i in 0..count {
        let (content_type, body): (ContentType, Vec<u8>) = match i % 3 {
            0 => (
                ContentType::Text,
                format!("text message {i} \u{e9}\n{}", "t".repeat(i % 200)).into_bytes(),
            ),
            1 => (
                ContentType::Json,
                format!(
                    "{{\"i\":{i},\"pad\":\"{}\",\"n\":1.50}}",
                    "j".repeat(i % 300)
                )
                .into_bytes(),
            ),
            _ => (
                ContentType::Bytes,
                (0..(i % 150 + 1)).map(|k| (k * 31 + i) as u8).collect(),
            ),
        };
        let wire = match content_type {
            ContentType::Text => String::from_utf8(body.clone()).unwrap(),
            _ => b64.encode(&body),
        };
        let mut metadata = Map::new();
        metadata.insert("CF-Content-Type".into(), content_type.as_str().into());
        metadata.insert("n".into(), Value::from(i));
        let id = emulator.publish_raw(ACCOUNT, queue, &wire, metadata);
        expected.insert(id, (content_type, body));
    }
    expected
}

/// A client for the bucket, to list and read objects from the test.
fn store(endpoint: &str, bucket: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .build()
            .expect("test client"),
    )
}

/// Every record in the bucket, read by the sink crate's own decoders (JSONL: the
/// compression is the key's suffix; Parquet: `cfq_sinks::parquet`), with its key.
async fn read_bucket(store: &dyn ObjectStore) -> Vec<(String, cfq_sinks::Record)> {
    let mut records = Vec::new();
    let mut keys: Vec<String> = store
        .list(None)
        .map(|meta| meta.expect("list").location.to_string())
        .collect()
        .await;
    keys.sort();
    for key in keys {
        let data = store
            .get(&key.as_str().into())
            .await
            .expect("get")
            .bytes()
            .await
            .expect("body");
        for record in decode_object(&key, data) {
            records.push((key.clone(), record));
        }
    }
    records
}

/// The records of one object.
fn decode_object(key: &str, data: Bytes) -> Vec<cfq_sinks::Record> {
    if key.ends_with(".parquet") {
        return cfq_sinks::parquet::decode(data).expect("a readable Parquet object");
    }
    let mut text = Vec::new();
    if key.ends_with(".zst") {
        zstd::stream::read::Decoder::new(&data[..])
            .unwrap()
            .read_to_end(&mut text)
            .expect("a whole zstd object");
    } else {
        text = data.to_vec();
    }
    text.split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| cfq_sinks::Record::from_json_line(line).expect("a record line"))
        .collect()
}

/// How many records the objects now in the bucket hold; `counted` caches per key, since
/// objects never change.
async fn records_in_bucket(store: &dyn ObjectStore, counted: &mut HashMap<String, u64>) -> u64 {
    let keys: Vec<String> = store
        .list(None)
        .map(|meta| meta.expect("list").location.to_string())
        .collect()
        .await;
    for key in keys {
        if counted.contains_key(&key) {
            continue;
        }
        let data = store
            .get(&key.as_str().into())
            .await
            .expect("get")
            .bytes()
            .await
            .expect("body");
        counted.insert(key.clone(), decode_object(&key, data).len() as u64);
    }
    counted.values().sum()
}

/// Watches a run: over and over, reads the emulator's ack count, THEN counts the records
/// in the objects listed. An ack seen before the listing was sent before it, so its
/// object must be listed: `acked <= records` must hold at every sample.
fn spawn_ack_monitor(
    emulator: Arc<Emulator>,
    queue: String,
    store: Arc<dyn ObjectStore>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let mut counted = HashMap::new();
        let mut samples = 0;
        let mut max_acked = 0;
        while !stop.load(Ordering::SeqCst) {
            let acked = emulator.stats(ACCOUNT, &queue).acked;
            let stored = records_in_bucket(&*store, &mut counted).await;
            assert!(
                acked <= stored,
                "{acked} records acked while the bucket held only {stored}: an ack came \
                 before its object existed"
            );
            samples += 1;
            max_acked = max_acked.max(acked);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        (samples, max_acked)
    })
}

/// Runs `cfq-bridge ARGS` with the bucket's credentials until it exits.
async fn run_with_credentials(
    args: &[&str],
    secret: &str,
    timeout: Duration,
) -> std::process::Output {
    let child = bridge()
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("NO_COLOR", "1")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cfq-bridge");
    tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .expect("cfq-bridge finished in time")
        .expect("cfq-bridge output")
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Reads the bucket with the Python reader and checks every expected id, body, key.
fn python_reads_everything(
    endpoint: &str,
    bucket: &str,
    queue: &str,
    extension: &str,
    expected: &Expected,
) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/s3_archive_read.py"
    );
    let output = std::process::Command::new("python3")
        .args([script, endpoint, bucket, "cf/"])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "the Python reader failed (pip install -r tests/python/requirements.txt, as \
         .ci/test does): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("reader output"))
        .collect();
    let (summary, rows) = lines.split_last().expect("a summary line");
    assert!(summary["objects"].as_u64().unwrap() > 1, "{summary}");
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut seen = HashSet::new();
    for row in rows {
        let id = row["id"].as_str().unwrap();
        let key = row["key"].as_str().unwrap();
        let (content_type, body) = expected
            .get(id)
            .unwrap_or_else(|| panic!("unexpected id {id} in {key}"));
        assert_eq!(row["content_type"], content_type.as_str(), "{id}");
        assert_eq!(row["queue_id"], queue, "{id}");
        let want = match content_type {
            ContentType::Text => Value::from(std::str::from_utf8(body).unwrap()),
            ContentType::Json => serde_json::from_slice(body).unwrap(),
            _ => Value::from(b64.encode(body)),
        };
        assert_eq!(row["body"], want, "body of {id} in {key}");
        // Hive layout: cf/QUEUE/dt=YYYY-MM-DD/hour=HH/<first ts>-<unique><ext>, with the
        // record's own date and hour.
        let ts = row["timestamp_ms"].as_u64().unwrap();
        let time = chrono::DateTime::from_timestamp_millis(ts as i64).unwrap();
        let folder = format!("cf/{queue}/{}", time.format("dt=%Y-%m-%d/hour=%H/"));
        assert!(key.starts_with(&folder), "{key} for a record of {time}");
        let name = &key[folder.len()..];
        assert!(name.ends_with(extension), "{key}");
        let first: u64 = name
            .split('-')
            .next()
            .unwrap()
            .parse()
            .expect("a timestamp");
        assert!(first <= ts, "{key} starts after its record {ts}");
        seen.insert(id.to_owned());
    }
    let missing: Vec<&String> = expected.keys().filter(|id| !seen.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} ids missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

/// 20,000 messages through the binary into the shared server, read back by Python, with
/// the ack monitor running throughout.
async fn twenty_thousand_through_the_binary(format_lines: &str, extension: &str) {
    let endpoint = s3_server::require_shared_server();
    let bucket = s3_server::unique_bucket("twentyk");
    s3_server::create_bucket(&s3_server::shared_root(), &bucket);
    let emulator = Arc::new(start_emulator().await);
    let queue = queue_name("s3twentyk");
    let expected = publish(&emulator, &queue, 20_000);
    let dir = tempfile::tempdir().unwrap();
    let sink = s3_server::sink_table(
        &endpoint,
        &bucket,
        &format!("{format_lines}max_object_bytes = 262144\nmax_object_age_secs = 1\n"),
    );
    let config = write_config(
        dir.path(),
        // One puller: a run long enough for the ack monitor to sample it many times.
        &config_text(
            &emulator,
            &queue,
            "max_in_flight = 5000\npullers = 1\n",
            &sink,
        ),
    );
    let client = store(&endpoint, &bucket);
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = spawn_ack_monitor(
        emulator.clone(),
        queue.clone(),
        client.clone(),
        stop.clone(),
    );
    let output = run_with_credentials(
        &["run", "--config", config.to_str().unwrap(), "--until-empty"],
        SECRET_KEY,
        Duration::from_secs(300),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let (samples, max_acked) = monitor.await.expect("the ack monitor held");
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status,
        stderr(&output)
    );
    eprintln!("ack monitor: {samples} samples, up to {max_acked} acked");
    assert!(
        samples > 5 && max_acked > 0,
        "{samples} samples, {max_acked} acked"
    );

    let stats = emulator.stats(ACCOUNT, &queue);
    assert_eq!(stats.acked, 20_000, "every lease is acked: {stats:?}");
    assert!(stats.never_acked_ids.is_empty());
    // The final state too: every acked record is in the bucket.
    let stored: HashSet<String> = read_bucket(&*client)
        .await
        .into_iter()
        .map(|(_, r)| r.id)
        .collect();
    assert_eq!(stored.len(), 20_000);
    python_reads_everything(&endpoint, &bucket, &queue, extension, &expected);

    // `archive verify` reads the bucket with the run's own config: every record readable.
    let url = format!("s3://{bucket}/");
    let output = run_with_credentials(
        &[
            "archive",
            "verify",
            &url,
            "--config",
            config.to_str().unwrap(),
        ],
        SECRET_KEY,
        Duration::from_secs(120),
    )
    .await;
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{report}{}", stderr(&output));
    assert!(report.contains("records        20000"), "{report}");
    assert!(report.contains("result: ok"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_messages_into_jsonl_zstd_objects() {
    twenty_thousand_through_the_binary(
        "format = \"jsonl\"\ncompression = \"zstd\"\n",
        ".jsonl.zst",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_messages_into_parquet_objects() {
    twenty_thousand_through_the_binary(
        "format = \"parquet\"\ncompression = \"zstd\"\n",
        ".parquet",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_outage_acks_nothing_while_down_and_loses_nothing() {
    let mut server = S3Server::start();
    let bucket = "outage";
    s3_server::create_bucket(server.root(), bucket);
    let emulator = Arc::new(start_emulator().await);
    let queue = queue_name("s3outage");
    let expected = publish(&emulator, &queue, 8_000);
    let dir = tempfile::tempdir().unwrap();
    let sink = s3_server::sink_table(
        &server.endpoint(),
        bucket,
        "max_object_bytes = 65536\nmax_object_age_secs = 1\nupload_timeout_secs = 2\n",
    );
    // A slow drain (small in-flight bound) so that the outage falls mid-run.
    let config = write_config(
        dir.path(),
        &config_text(
            &emulator,
            &queue,
            "max_in_flight = 300\npullers = 1\nbatch_size = 50\n",
            &sink,
        ),
    );
    let config = config.to_str().unwrap().to_owned();
    let bridge = tokio::spawn(async move {
        run_with_credentials(
            &["run", "--config", &config, "--until-empty"],
            SECRET_KEY,
            Duration::from_secs(300),
        )
        .await
    });
    let acked = || emulator.stats(ACCOUNT, &queue).acked;
    wait_until("some records acked", Duration::from_secs(60), async || {
        acked() >= 500
    })
    .await;
    server.stop();
    // Uploads that completed just before the stop may still be acked: let them settle
    // (the upload timeout is 2 s), then no ack may happen while the server is down.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acked_while_down = acked();
    assert!(
        (acked_while_down as usize) < expected.len(),
        "the outage came too late"
    );
    let samples = Arc::new(AtomicU64::new(0));
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            acked(),
            acked_while_down,
            "acked while the S3 server was down"
        );
        samples.fetch_add(1, Ordering::Relaxed);
    }
    server.restart();
    let output = bridge.await.unwrap();
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status,
        stderr(&output)
    );
    assert!(
        acked() > acked_while_down,
        "the bridge resumed after the restart"
    );
    let stats = emulator.stats(ACCOUNT, &queue);
    assert_eq!(stats.acked as usize, expected.len(), "{stats:?}");
    let client = store(&server.endpoint(), bucket);
    let mut stored = HashSet::new();
    for (key, record) in read_bucket(&*client).await {
        let (content_type, body) = &expected[&record.id];
        assert_eq!(record.content_type, *content_type, "{key}");
        if *content_type != ContentType::Json {
            assert_eq!(&record.body[..], &body[..], "{key}");
        }
        stored.insert(record.id);
    }
    let lost: Vec<&String> = expected.keys().filter(|id| !stored.contains(*id)).collect();
    assert!(lost.is_empty(), "acked but not in the bucket: {lost:?}");
}

/// A bridge against `bucket` with `secret` fails at start naming the bucket, acks nothing.
async fn bad_input_run(bucket: &str, secret: &str) -> String {
    let endpoint = s3_server::require_shared_server();
    let emulator = start_emulator().await;
    let queue = queue_name("s3bad");
    publish(&emulator, &queue, 50);
    let dir = tempfile::tempdir().unwrap();
    let sink = s3_server::sink_table(&endpoint, bucket, "upload_timeout_secs = 5\n");
    let config = write_config(dir.path(), &config_text(&emulator, &queue, "", &sink));
    let output = run_with_credentials(
        &["run", "--config", config.to_str().unwrap(), "--until-empty"],
        secret,
        Duration::from_secs(60),
    )
    .await;
    let text = stderr(&output);
    assert!(!output.status.success(), "the bridge must fail: {text}");
    let stats = emulator.stats(ACCOUNT, &queue);
    assert_eq!(stats.acked, 0, "{stats:?}");
    let acks = emulator
        .recorded_requests()
        .iter()
        .filter(|r| {
            r.path.ends_with("/messages/ack")
                && r.body.as_ref().is_some_and(|body| {
                    body["acks"].as_array().is_some_and(|acks| !acks.is_empty())
                })
        })
        .count();
    assert_eq!(acks, 0, "no ack request");
    assert!(text.contains(bucket), "the error names the bucket: {text}");
    assert!(!text.contains(secret), "the secret is not logged: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_a_clear_error_and_nothing_is_acked() {
    let bucket = s3_server::unique_bucket("missing");
    let text = bad_input_run(&bucket, SECRET_KEY).await;
    assert!(text.contains("does not exist"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_a_clear_error_and_nothing_is_acked() {
    let bucket = s3_server::unique_bucket("creds");
    s3_server::create_bucket(&s3_server::shared_root(), &bucket);
    let text = bad_input_run(&bucket, "wrong-secret-5e1f").await;
    assert!(
        text.contains("denied") && text.contains("AWS_SECRET_ACCESS_KEY"),
        "{text}"
    );
}

/// Settings for a sink opened in the test process (credentials from files, so the test
/// does not change its own environment).
fn sink_config(endpoint: &str, bucket: &str, dir: &std::path::Path, extra: &str) -> S3Config {
    let id = dir.join("id");
    let secret = dir.join("secret");
    std::fs::write(&id, ACCESS_KEY).unwrap();
    std::fs::write(&secret, SECRET_KEY).unwrap();
    let table = format!(
        "bucket = \"{bucket}\"\nprefix = \"cf/{{queue_id}}/\"\nendpoint = \"{endpoint}\"\n\
         allow_http = true\naccess_key_id_file = {:?}\nsecret_access_key_file = {:?}\n{extra}",
        id.display().to_string(),
        secret.display().to_string()
    );
    toml::from_str(&table).expect("sink settings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_confirmed_only_when_their_object_is_in_the_bucket() {
    let endpoint = s3_server::require_shared_server();
    let bucket = s3_server::unique_bucket("confirm");
    s3_server::create_bucket(&s3_server::shared_root(), &bucket);
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(
        S3Sink::open(&sink_config(
            &endpoint,
            &bucket,
            dir.path(),
            "max_object_age_secs = 2\n",
        ))
        .await
        .expect("open"),
    );
    let shown = format!("{sink:?}");
    assert!(
        shown.contains(&bucket) && !shown.contains(SECRET_KEY),
        "{shown}"
    );
    let client = store(&endpoint, &bucket);
    // Two batches share one object, written by the age timer with no further record.
    let first: Vec<_> = (0..3)
        .map(|i| record(format!("a{i}")).text("a").build())
        .collect();
    let second: Vec<_> = (0..2)
        .map(|i| record(format!("b{i}")).text("b").build())
        .collect();
    let (s1, s2) = (sink.clone(), sink.clone());
    let one = tokio::spawn(async move { s1.deliver(&first).await });
    let two = tokio::spawn(async move { s2.deliver(&second).await });
    let started = std::time::Instant::now();
    // Until the object exists, neither delivery has returned.
    while read_bucket(&*client).await.is_empty() {
        assert!(
            !one.is_finished() && !two.is_finished(),
            "confirmed before the object existed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no object written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "written before its age"
    );
    let (one, two) = (one.await.unwrap(), two.await.unwrap());
    assert!(one.iter().chain(&two).all(|o| *o == Outcome::Confirmed));
    let objects = read_bucket(&*client).await;
    assert_eq!(objects.len(), 5);
    assert_eq!(
        objects.iter().map(|(k, _)| k).collect::<HashSet<_>>().len(),
        1,
        "one object for both batches"
    );
    sink.close().await.unwrap();
}

#[tokio::test]
async fn check_refuses_an_object_age_that_does_not_fit_the_lease() {
    let endpoint = s3_server::require_shared_server();
    let bucket = s3_server::unique_bucket("check");
    s3_server::create_bucket(&s3_server::shared_root(), &bucket);
    let dir = tempfile::tempdir().unwrap();
    let sink = S3Sink::open(&sink_config(
        &endpoint,
        &bucket,
        dir.path(),
        "max_object_age_secs = 60\nupload_timeout_secs = 25\n",
    ))
    .await
    .expect("open");
    let ctx = |visibility_timeout_ms| CheckContext {
        visibility_timeout_ms,
        max_retry_delay_secs: 3600,
    };
    let error = sink
        .check(&ctx(60_000))
        .await
        .expect_err("85 s do not fit in 60 s");
    assert!(
        error.message.contains("sink.max_object_age_secs")
            && error.message.contains("queue.visibility_timeout_ms"),
        "{error}"
    );
    assert_eq!(
        sink.check(&ctx(120_000)).await.expect("fits"),
        Vec::<String>::new()
    );
}
