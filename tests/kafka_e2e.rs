//! The definition of done: 5,000 json messages seeded into the emulator reach a
//! 3-partition Kafka topic through the real binary (`cfq-bridge run --until-empty`); an
//! independent consumer reads every id once, with key = message id, the headers carried,
//! timestamp = publish time and the body decoded; every lease is acked.
//!
//! Needs the shared broker on 127.0.0.1:9092 (`bash .ci/start-kafka.sh`).

#![cfg(feature = "kafka")]

mod common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cfq_emulator::{ContentType, SeedSpec};
use cfq_sinks::kafka::rdkafka::message::{Message, Timestamp};
use serde_json::Value;

use common::kafka_broker::{brokers, consume, create_topic, header, require_broker};
use common::{config_text, queue_name, run_bridge, write_config, ACCOUNT};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_json_messages_reach_a_three_partition_topic() {
    let brokers = brokers();
    require_broker(&brokers).await;
    let emulator = common::start_emulator().await;
    let queue = queue_name("kafkae2e");
    let topic = format!("cf.{queue}");
    create_topic(&brokers, &topic, 3).await;

    let seeded_from = now_ms();
    let ids: HashSet<String> = emulator
        .seed(
            ACCOUNT,
            &queue,
            &SeedSpec {
                count: 5_000,
                body_size: 300,
                content_type: ContentType::Json,
            },
        )
        .into_iter()
        .collect();
    let seeded_until = now_ms();
    assert_eq!(ids.len(), 5_000);

    let dir = tempfile::tempdir().unwrap();
    let sink = format!(
        "type = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"cf.{{queue_id}}\"\n\
         key = \"message_id\"\n[sink.librdkafka_options]\n\"compression.type\" = \"zstd\"\n"
    );
    let config = write_config(dir.path(), &config_text(&emulator, &queue, "", &sink));
    let output = run_bridge(
        &["run", "--config", config.to_str().unwrap(), "--until-empty"],
        Duration::from_secs(240),
    )
    .await;
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let stats = emulator.stats(ACCOUNT, &queue);
    assert_eq!(stats.acked, 5_000, "every lease acked: {stats:?}");
    assert_eq!(stats.backlog, 0);
    assert!(stats.never_acked_ids.is_empty());

    let messages = consume(
        &brokers,
        &topic,
        ids.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    let mut seen = HashSet::new();
    let mut seqs = HashSet::new();
    let mut partitions = HashSet::new();
    for message in &messages {
        let key = String::from_utf8(message.key().expect("a key").to_vec()).unwrap();
        assert!(ids.contains(&key), "unknown key {key}");
        assert!(seen.insert(key.clone()), "{key} read twice");
        partitions.insert(message.partition());

        assert_eq!(
            header(message, "cf-queue-message-id").as_deref(),
            Some(&*key)
        );
        assert_eq!(header(message, "cf-queue-id").as_deref(), Some(&*queue));
        assert_eq!(header(message, "cf-queue-attempts").as_deref(), Some("1"));
        assert_eq!(header(message, "CF-Content-Type").as_deref(), Some("json"));
        assert_eq!(
            header(message, "CF-sourceMessageSource").as_deref(),
            Some("worker")
        );
        let published: u64 = header(message, "cf-queue-timestamp-ms")
            .expect("timestamp header")
            .parse()
            .unwrap();
        assert!(
            (seeded_from..=seeded_until).contains(&published),
            "publish time {published} outside the seeding window"
        );
        assert_eq!(
            message.timestamp(),
            Timestamp::CreateTime(published as i64),
            "Kafka timestamp of {key} is the publish time"
        );

        let body: Value = serde_json::from_slice(message.payload().expect("a body"))
            .unwrap_or_else(|e| panic!("body of {key} is not the decoded JSON: {e}"));
        let seq = body["seq"].as_u64().expect("seeded bodies carry seq");
        assert!(seqs.insert(seq), "seq {seq} twice");
    }
    assert_eq!(seen, ids, "every id read exactly once");
    assert_eq!(partitions.len(), 3, "keys spread over the 3 partitions");
}

/// Migration: an archive replayed into Kafka through the `[archive]` source, filtered to a
/// time window. Exactly the records published inside `[since_ms, until_ms)` arrive, each
/// with its original id, timestamp and body; a checkpoint records the end of the archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_time_window_replays_into_a_topic() {
    let brokers = brokers();
    require_broker(&brokers).await;
    let topic = format!("replay.{}", queue_name("window"));
    create_topic(&brokers, &topic, 1).await;

    // 600 records, one per second of publish time, in a .zst and a plain file.
    let start = 1_764_460_800_000u64;
    let records: Vec<cfq_sinks::Record> = (0..600u64)
        .map(|n| {
            common::record(format!("arch-{n:04}"))
                .queue("archived")
                .timestamp_ms(start + n * 1_000)
                .json(&serde_json::json!({ "n": n }))
                .build()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    common::archives::write_zst(&dir.path().join("part-1.jsonl.zst"), &[&records[..300]]);
    common::archives::write_plain(&dir.path().join("part-2.jsonl"), &records[300..]);
    let (since, until) = (start + 100_000, start + 400_000);
    let checkpoint = dir.path().join("window.checkpoint");
    let text = format!(
        "[archive]\npaths = [{:?}]\nsince_ms = {since}\nuntil_ms = {until}\ncheckpoint = {:?}\n\n\
         [sink]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\n",
        dir.path().join("part-*").display().to_string(),
        checkpoint.display().to_string(),
    );
    let config = write_config(dir.path(), &text);
    let output = run_bridge(
        &["run", "--config", config.to_str().unwrap()],
        Duration::from_secs(120),
    )
    .await;
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(checkpoint.exists(), "the checkpoint was written");

    let expected: HashSet<String> = (100..400u64).map(|n| format!("arch-{n:04}")).collect();
    let messages = consume(
        &brokers,
        &topic,
        expected.len(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await;
    let mut seen = HashSet::new();
    for message in &messages {
        let key = String::from_utf8(message.key().expect("a key").to_vec()).unwrap();
        assert!(expected.contains(&key), "{key} is outside the window");
        assert!(seen.insert(key.clone()), "{key} read twice");
        let n: u64 = key[5..].parse().unwrap();
        assert_eq!(
            message.timestamp(),
            Timestamp::CreateTime((start + n * 1_000) as i64),
            "{key} keeps its original publish time"
        );
        let body: Value = serde_json::from_slice(message.payload().expect("a body")).unwrap();
        assert_eq!(body["n"], n, "{key} keeps its body");
    }
    assert_eq!(seen, expected, "exactly the window, each record once");
}
