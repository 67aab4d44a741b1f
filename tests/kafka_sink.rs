//! Kafka sink against a real Kafka-protocol broker (tansu on 127.0.0.1:9092, started by
//! `.ci/start-kafka.sh`; `KAFKA_BROKERS` overrides the address). Every test creates its own
//! topics. A missing broker fails the tests with instructions.

#![cfg(feature = "kafka")]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cfq_sinks::kafka::rdkafka::message::{Message, Timestamp};
use cfq_sinks::kafka::{KafkaConfig, HEADER_DEAD_LETTER_ERROR, HEADER_DEAD_LETTER_TOPIC};
use cfq_sinks::{CheckContext, ErrorClass, Outcome, Record, Sink};
use futures_util::future::join_all;
use serde_json::{json, Value};

use common::kafka_broker::{
    brokers, consume, create_topic, header, headers, require_broker, unique_topic,
};

const READ_TIMEOUT: Duration = Duration::from_secs(30);
const LINGER: Duration = Duration::from_millis(500);

fn record(index: usize, queue: &Arc<str>, extra: &[(&str, Value)]) -> Record {
    let body = json!({"n": index, "text": format!("message number {index}")});
    let built = common::record(format!("msg-{index:05}"))
        .queue(Arc::clone(queue))
        .timestamp_ms(1_710_950_954_154 + index as u64)
        .attempts(1 + (index % 3) as u32)
        .json(&body)
        .meta("CF-sourceMessageSource", "api");
    extra
        .iter()
        .fold(built, |built, (name, value)| {
            built.meta(name, value.clone())
        })
        .build()
}

fn config(text: &str) -> KafkaConfig {
    let config: KafkaConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    config.validate().expect("valid config");
    config
}

async fn sink(text: &str) -> Box<dyn Sink> {
    cfq_sinks::kafka::build(&config(text))
        .await
        .expect("kafka sink builds")
}

fn failed(outcome: &Outcome) -> &cfq_sinks::SinkError {
    match outcome {
        Outcome::Failed(error) => error,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn every_record_is_confirmed_and_read_back_with_key_headers_and_timestamp() {
    let brokers = brokers();
    require_broker(&brokers).await;
    let queue: Arc<str> = Arc::from(unique_topic("q"));
    let topic = format!("cf.{queue}");
    create_topic(&brokers, &topic, 3).await;
    let sink = sink(&format!(
        "brokers = \"{brokers}\"\ntopic = \"cf.{{queue_id}}\"\ncompression = \"zstd\"\n\
         [librdkafka_options]\n\"linger.ms\" = 2\n"
    ))
    .await;

    let records: Vec<Record> = (0..600)
        .map(|i| {
            record(
                i,
                &queue,
                &[("tenant", json!(format!("t{}", i % 4))), ("n", json!(i))],
            )
        })
        .collect();
    // Several batches in flight at once, as the pipeline does.
    let mut outcomes = Vec::new();
    let batches = records.chunks(100).map(|batch| sink.deliver(batch));
    for batch_outcomes in join_all(batches).await {
        outcomes.extend(batch_outcomes);
    }
    assert_eq!(outcomes.len(), records.len());
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Confirmed),
        "{:?}",
        outcomes.iter().find(|o| **o != Outcome::Confirmed)
    );
    sink.close().await.unwrap();

    let messages = consume(&brokers, &topic, records.len(), READ_TIMEOUT, LINGER).await;
    assert_eq!(messages.len(), records.len(), "each record exactly once");
    let by_id: BTreeMap<&str, &Record> = records.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut seen = HashSet::new();
    let mut partitions = HashSet::new();
    for message in &messages {
        let key = std::str::from_utf8(message.key().expect("a key")).unwrap();
        let record = by_id
            .get(key)
            .unwrap_or_else(|| panic!("unknown key {key}"));
        assert!(seen.insert(key.to_owned()), "{key} read twice");
        partitions.insert(message.partition());
        assert_eq!(
            message.payload().unwrap(),
            &record.body[..],
            "body of {key}"
        );
        let body: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
        assert_eq!(body["text"], format!("message number {}", body["n"]));
        assert_eq!(
            message.timestamp(),
            Timestamp::CreateTime(record.timestamp_ms as i64),
            "timestamp of {key}"
        );
        let expected: Vec<(String, String)> = record
            .headers()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into_owned()))
            .collect();
        assert_eq!(headers(message), expected, "headers of {key}");
        assert_eq!(header(message, "cf-queue-id").as_deref(), Some(&*queue));
        assert_eq!(header(message, "n"), Some(record.metadata["n"].to_string()));
    }
    assert_eq!(partitions.len(), 3, "keys spread over the 3 partitions");
}

#[tokio::test]
async fn key_can_be_none_or_a_metadata_entry() {
    let brokers = brokers();
    require_broker(&brokers).await;
    let queue: Arc<str> = Arc::from(unique_topic("q"));
    for (key, expected) in [
        ("none", [None, None]),
        ("metadata:tenant", [Some("acme"), None]),
    ] {
        let topic = unique_topic("keys");
        create_topic(&brokers, &topic, 1).await;
        let sink = sink(&format!(
            "brokers = \"{brokers}\"\ntopic = \"{topic}\"\nkey = \"{key}\"\n"
        ))
        .await;
        let records = [
            record(0, &queue, &[("tenant", json!("acme"))]),
            record(1, &queue, &[]),
        ];
        let outcomes = sink.deliver(&records).await;
        assert_eq!(outcomes, [Outcome::Confirmed, Outcome::Confirmed]);
        let messages = consume(&brokers, &topic, 2, READ_TIMEOUT, LINGER).await;
        let mut keys: Vec<(String, Option<String>)> = messages
            .iter()
            .map(|m| {
                (
                    header(m, "cf-queue-message-id").unwrap(),
                    m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                )
            })
            .collect();
        keys.sort();
        let expected: Vec<(String, Option<String>)> = records
            .iter()
            .zip(expected)
            .map(|(r, k)| (r.id.clone(), k.map(str::to_owned)))
            .collect();
        assert_eq!(keys, expected, "key = {key}");
    }
}

#[tokio::test]
async fn partial_failure_in_a_batch_gives_per_record_outcomes() {
    let brokers = brokers();
    require_broker(&brokers).await;
    let queue: Arc<str> = Arc::from(unique_topic("q"));
    let good = unique_topic("good");
    let missing = unique_topic("never-created");
    create_topic(&brokers, &good, 3).await;
    let sink = sink(&format!(
        "brokers = \"{brokers}\"\ntopic = \"{{metadata.dest}}\"\n"
    ))
    .await;

    // Records 0, 3, 6, ... go to a missing topic, 1, 4, 7, ... lack the metadata entry the
    // template needs, the rest go to the existing topic.
    let records: Vec<Record> = (0..30)
        .map(|i| match i % 3 {
            0 => record(i, &queue, &[("dest", json!(missing))]),
            1 => record(i, &queue, &[]),
            _ => record(i, &queue, &[("dest", json!(good))]),
        })
        .collect();
    let outcomes = sink.deliver(&records).await;
    assert_eq!(outcomes.len(), records.len());
    for (i, outcome) in outcomes.iter().enumerate() {
        match i % 3 {
            0 => {
                let error = failed(outcome);
                assert_eq!(error.class, ErrorClass::Permanent, "{error}");
                assert!(
                    error.message.contains(&missing) && error.message.contains("does not exist"),
                    "{error}"
                );
            }
            1 => {
                let error = failed(outcome);
                assert_eq!(error.class, ErrorClass::Permanent, "{error}");
                assert!(error.message.contains("\"dest\""), "{error}");
            }
            _ => assert_eq!(*outcome, Outcome::Confirmed, "record {i}"),
        }
    }
    let messages = consume(&brokers, &good, 10, READ_TIMEOUT, LINGER).await;
    let mut ids: Vec<String> = messages
        .iter()
        .map(|m| header(m, "cf-queue-message-id").unwrap())
        .collect();
    ids.sort();
    let expected: Vec<String> = records
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 2)
        .map(|(_, r)| r.id.clone())
        .collect();
    assert_eq!(ids, expected, "only the confirmed records are in the topic");
}

#[tokio::test]
async fn refused_records_go_to_the_dead_letter_topic_with_the_reason() {
    let brokers = brokers();
    require_broker(&brokers).await;
    let queue: Arc<str> = Arc::from(unique_topic("q"));
    let topic = unique_topic("small");
    let dead = unique_topic("dead");
    create_topic(&brokers, &topic, 1).await;
    create_topic(&brokers, &dead, 1).await;
    let sink = sink(&format!(
        "brokers = \"{brokers}\"\ntopic = \"{{metadata.dest}}\"\ndead_letter_topic = \"{dead}\"\n"
    ))
    .await;
    let missing = unique_topic("never-created");
    let records = [
        record(0, &queue, &[("dest", json!(topic))]),
        record(1, &queue, &[("dest", json!(missing))]),
        record(2, &queue, &[]),
    ];
    let outcomes = sink.deliver(&records).await;
    assert_eq!(outcomes[0], Outcome::Confirmed);
    for outcome in &outcomes[1..] {
        assert!(
            matches!(outcome, Outcome::DeadLettered { .. }),
            "{outcome:?}"
        );
        assert!(outcome.is_confirmed());
    }
    let messages = consume(&brokers, &dead, 2, READ_TIMEOUT, LINGER).await;
    assert_eq!(messages.len(), 2);
    for message in &messages {
        let id = header(message, "cf-queue-message-id").unwrap();
        let original = if id == records[1].id {
            &records[1]
        } else {
            &records[2]
        };
        assert_eq!(message.payload().unwrap(), &original.body[..]);
        assert_eq!(message.key().unwrap(), original.id.as_bytes());
        let reason = header(message, HEADER_DEAD_LETTER_ERROR).unwrap();
        let meant_for = header(message, HEADER_DEAD_LETTER_TOPIC).unwrap();
        if original.id == records[1].id {
            assert_eq!(meant_for, missing);
            assert!(reason.contains("does not exist"), "{reason}");
        } else {
            assert_eq!(meant_for, "{metadata.dest}");
            assert!(reason.contains("\"dest\""), "{reason}");
        }
    }
}

#[tokio::test]
async fn a_missing_topic_is_a_clear_error_at_check_and_at_delivery() {
    let brokers = brokers();
    require_broker(&brokers).await;
    let queue: Arc<str> = Arc::from(unique_topic("q"));
    let missing = unique_topic("missing");
    let sink = sink(&format!("brokers = \"{brokers}\"\ntopic = \"{missing}\"\n")).await;
    let ctx = CheckContext {
        visibility_timeout_ms: 30_000,
        max_retry_delay_secs: 600,
    };
    let error = sink.check(&ctx).await.expect_err("check must fail");
    assert_eq!(error.class, ErrorClass::Permanent);
    assert!(
        error.message.contains(&missing) && error.message.contains("does not exist"),
        "{error}"
    );
    sink.ready()
        .await
        .expect("the brokers themselves are reachable");

    let outcomes = sink.deliver(&[record(0, &queue, &[])]).await;
    let error = failed(&outcomes[0]);
    assert_eq!(error.class, ErrorClass::Permanent, "{error}");
    assert!(
        error.message.contains(&missing) && error.message.contains("does not exist"),
        "{error}"
    );
}

#[tokio::test]
async fn check_passes_for_an_existing_topic_and_warns_about_a_long_timeout() {
    let brokers = brokers();
    require_broker(&brokers).await;
    let topic = unique_topic("checked");
    create_topic(&brokers, &topic, 1).await;
    let sink = sink(&format!(
        "brokers = \"{brokers}\"\ntopic = \"{topic}\"\nmessage_timeout_ms = 20000\n"
    ))
    .await;
    let roomy = CheckContext {
        visibility_timeout_ms: 120_000,
        max_retry_delay_secs: 600,
    };
    assert_eq!(sink.check(&roomy).await.unwrap(), Vec::<String>::new());
    let tight = CheckContext {
        visibility_timeout_ms: 30_000,
        ..roomy
    };
    let warnings = sink.check(&tight).await.unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("message.timeout.ms"), "{warnings:?}");
}

#[tokio::test]
async fn a_record_over_the_producer_size_limit_fails_permanently_even_with_a_dead_letter_topic() {
    // Tansu does not enforce size limits (a 100 KB record to a topic created with
    // max.message.bytes = 2000 was accepted), so the limit here is the producer's own
    // `message.max.bytes`, which applies to the dead-letter topic as well: the record is
    // then left to Cloudflare's retries. A broker refusing an oversized record is covered by
    // the MockCluster test in sinks/src/kafka/sink.rs, where the dead-letter copy succeeds.
    let brokers = brokers();
    require_broker(&brokers).await;
    let queue: Arc<str> = Arc::from(unique_topic("q"));
    let topic = unique_topic("limited");
    let dead = unique_topic("dead");
    create_topic(&brokers, &topic, 1).await;
    create_topic(&brokers, &dead, 1).await;
    let sink = sink(&format!(
        "brokers = \"{brokers}\"\ntopic = \"{topic}\"\ndead_letter_topic = \"{dead}\"\n\
         [librdkafka_options]\n\"message.max.bytes\" = 10000\n"
    ))
    .await;
    let mut big = record(0, &queue, &[]);
    big.body = Bytes::from(vec![b'x'; 20_000]);
    let outcomes = sink.deliver(&[big, record(1, &queue, &[])]).await;
    let error = failed(&outcomes[0]);
    assert_eq!(error.class, ErrorClass::Permanent, "{error}");
    assert!(error.message.contains("too large"), "{error}");
    assert!(
        error
            .message
            .contains(&format!("dead-lettering to {dead} failed too")),
        "{error}"
    );
    assert_eq!(outcomes[1], Outcome::Confirmed);
}
