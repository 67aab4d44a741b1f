//! Kafka benchmark: the bridge end to end into Kafka against a raw rdkafka produce loop,
//! same broker, same message size, same run (the machines are shared and noisy: compare the
//! ratio, not absolute figures).
//!
//! Run: `cargo bench --bench kafka`
//! (`bash .ci/start-kafka.sh` installs tansu; each measurement starts a fresh tansu broker
//! of its own unless `KAFKA_BROKERS` names one; `BENCH_MESSAGES`, default 30000;
//! `BENCH_ROUNDS`, default 3: the two targets alternate, and the medians are compared;
//! `BENCH_BRIDGE_QUEUE`: extra `[queue]` lines for the bridge, default `pullers = 4`).
//!
//! 1. **Raw loop (baseline)**: one rdkafka `FutureProducer` with the sink's delivery
//!    settings (acks=all, idempotence, murmur2 partitioner) produces every message with a
//!    key, all sends in flight, then awaits every delivery report. No Cloudflare API, no
//!    headers, no decoding.
//! 2. **Bridge**: `cfq-bridge run --until-empty` pulls the same number of ~1 KB json
//!    messages from an emulator (in this process, so its CPU is not the bridge's), decodes
//!    them and produces them with headers, acking each lease after its delivery report.
//!
//! Each run gets a fresh 3-partition topic. The bridge's peak RSS is read from
//! `/proc/PID/status` (`VmHWM`), since `ru_maxrss` of a child also counts this process.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cfq_emulator::{self as emulator, ContentType, EmulatorConfig, SeedSpec};
use cfq_sinks::kafka::rdkafka;
use futures_util::future::join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

#[path = "support/mod.rs"]
mod support;

use support::{median, reserve_port, run_bridge, self_cpu, wait_until, Measured, ACCOUNT, TOKEN};

const BODY_SIZE: usize = 1000;

fn main() {
    let messages: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(messages, rounds));
}

/// Where a measurement produces to: the broker named by `KAFKA_BROKERS`, or a fresh tansu
/// broker of its own (tansu's in-memory storage slows down as it fills, so a shared broker
/// would favour whichever target runs first).
struct Broker {
    brokers: String,
    child: Option<std::process::Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Broker {
    fn start() -> Broker {
        if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
            return Broker {
                brokers,
                child: None,
                _dir: None,
            };
        }
        // tansu is told its port (it reports none it chose, see `reserve_port`); when
        // another process took it meanwhile, tansu exits at start: try another one.
        let tansu = std::env::var("TANSU").unwrap_or_else(|_| "tansu".into());
        let mut attempts = 0;
        let (port, child, dir) = loop {
            attempts += 1;
            let port = reserve_port();
            let dir = tempfile::tempdir().expect("temporary directory");
            let url = format!("tcp://127.0.0.1:{port}");
            let mut child = Command::new(&tansu)
                .current_dir(dir.path())
                .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
                .args(["--storage-engine", "memory://tansu/"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run {tansu} ({e}): install it with `bash .ci/start-kafka.sh`, or set KAFKA_BROKERS")
                });
            let deadline = Instant::now() + Duration::from_secs(20);
            let exited = loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break false;
                }
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break true;
                }
                assert!(Instant::now() < deadline, "tansu did not start");
                std::thread::sleep(Duration::from_millis(20));
            };
            if !exited {
                break (port, child, dir);
            }
            assert!(attempts < 3, "tansu exited at start {attempts} times");
        };
        Broker {
            brokers: format!("127.0.0.1:{port}"),
            child: Some(child),
            _dir: Some(dir),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A unique topic name for this run.
fn topic_name(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
        % 1_000_000_000;
    format!("bench{tag}{nanos}")
}

async fn create_topic(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            [&NewTopic::new(topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap_or_else(|e| {
            panic!("no Kafka broker at {brokers} ({e}): start one with `bash .ci/start-kafka.sh`")
        });
    for result in results {
        result.unwrap_or_else(|(name, code)| panic!("creating {name}: {code}"));
    }
    // Wait until the metadata lists the new partitions.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("metadata client");
    let topic_name = topic.to_owned();
    wait_until(
        "the new topic's 3 partitions in the metadata",
        Duration::from_secs(10),
        async || {
            consumer
                .fetch_metadata(Some(&topic_name), Duration::from_secs(5))
                .is_ok_and(|metadata| {
                    metadata.topics().iter().any(|t| {
                        t.name() == topic_name && t.error().is_none() && t.partitions().len() == 3
                    })
                })
        },
    )
    .await;
}

/// The baseline: every message produced with a key, all in flight, then every report
/// awaited; a message counts only on an Ok report.
async fn raw_loop(brokers: &str, topic: &str, messages: usize) -> Measured {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    let payloads: Vec<(String, Vec<u8>)> = (0..messages)
        .map(|i| {
            let mut body = format!("{{\"seq\":{i},\"pad\":\"").into_bytes();
            body.resize(BODY_SIZE - 2, b'x');
            body.extend_from_slice(b"\"}");
            (format!("bench-{i:08}"), body)
        })
        .collect();
    let cpu0 = self_cpu();
    let t0 = Instant::now();
    let mut reports = Vec::with_capacity(messages);
    for (key, body) in &payloads {
        let mut record = FutureRecord::to(topic).key(key.as_str()).payload(&body[..]);
        loop {
            match producer.send_result(record) {
                Ok(report) => break reports.push(report),
                Err((_queue_full, returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    let delivered = join_all(reports)
        .await
        .into_iter()
        .filter(|report| matches!(report, Ok(Ok(_))))
        .count();
    let wall = t0.elapsed();
    assert_eq!(delivered, messages, "every raw message delivered");
    Measured {
        messages,
        wall,
        cpu: self_cpu() - cpu0,
        max_rss_kb: 0,
    }
}

/// Extra `[queue]` lines for the bridge: `BENCH_BRIDGE_QUEUE`, default `pullers = 4`
/// (the default `max_in_flight`, 2000, applies unless given).
fn bridge_queue_settings() -> String {
    std::env::var("BENCH_BRIDGE_QUEUE").unwrap_or_else(|_| "pullers = 4".into())
}

/// Runs `cfq-bridge run --until-empty` into `topic` and measures its wall time, CPU time and
/// peak RSS.
fn bridge_into_kafka(
    dir: &Path,
    base: &str,
    queue: &str,
    brokers: &str,
    messages: usize,
) -> Measured {
    let config = dir.join(format!("{queue}.toml"));
    std::fs::write(
        &config,
        format!(
            "[queue]\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"{queue}\"\napi_base_url = \"{base}\"\n\
             batch_size = 100\nempty_backoff_max_ms = 200\n{}\n\
             [sink]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"cf.{{queue_id}}\"\n",
            bridge_queue_settings()
        ),
    )
    .expect("write the config");
    run_bridge(&config, messages)
}

async fn run(messages: usize, rounds: usize) {
    let broker_kind = match std::env::var("KAFKA_BROKERS") {
        Ok(brokers) => format!("broker {brokers}"),
        Err(_) => "a fresh tansu broker per measurement".into(),
    };
    println!(
        "# cfq-bridge Kafka benchmark ({messages} messages of ~1 KB json, {broker_kind}, \
         median of {rounds} alternating rounds; bridge queue settings: {:?})\n",
        bridge_queue_settings()
    );
    let dir = tempfile::tempdir().expect("temporary directory");
    let emulator = emulator::start(
        "127.0.0.1:0".parse().expect("address"),
        EmulatorConfig {
            tokens: vec![TOKEN.into()],
            ..EmulatorConfig::default()
        },
    )
    .await
    .expect("start the emulator");

    let mut raws = Vec::new();
    let mut bridges = Vec::new();
    for _ in 0..rounds {
        let broker = Broker::start();
        let brokers = broker.brokers.as_str();
        let raw_topic = topic_name("raw");
        create_topic(brokers, &raw_topic).await;
        raws.push(raw_loop(brokers, &raw_topic, messages).await);
        drop(broker);

        let broker = Broker::start();
        let brokers = broker.brokers.as_str();
        let queue = topic_name("q");
        create_topic(brokers, &format!("cf.{queue}")).await;
        emulator.seed(
            ACCOUNT,
            &queue,
            &SeedSpec {
                count: messages,
                body_size: BODY_SIZE,
                content_type: ContentType::Json,
            },
        );
        let base = emulator.base_url();
        let brokers_owned = brokers.to_owned();
        let dir_path = dir.path().to_owned();
        let queue_for_run = queue.clone();
        let bridge = tokio::task::spawn_blocking(move || {
            bridge_into_kafka(&dir_path, &base, &queue_for_run, &brokers_owned, messages)
        })
        .await
        .expect("bridge run");
        let stats = emulator.stats(ACCOUNT, &queue);
        assert_eq!(stats.acked as usize, messages, "every lease acked");
        eprintln!(
            "round: raw {:.0} msg/s, bridge {:.0} msg/s",
            raws.last().map_or(0.0, Measured::rate),
            bridge.rate()
        );
        bridges.push(bridge);
        drop(broker);
    }
    let raw = median(raws);
    let bridge = median(bridges);

    println!("| scenario | messages | msg/s | CPU µs/msg | peak RSS |");
    println!("|---|---|---|---|---|");
    println!(
        "| raw rdkafka produce loop (baseline) | {} | {:.0} | {:.1} | |",
        raw.messages,
        raw.rate(),
        raw.cpu_us_per_message()
    );
    println!(
        "| bridge → Kafka (emulator → run --until-empty) | {} | {:.0} | {:.1} | {} MB |",
        bridge.messages,
        bridge.rate(),
        bridge.cpu_us_per_message(),
        bridge.max_rss_kb / 1024
    );
    println!();
    println!(
        "ratio bridge/raw (Kafka, same broker, same run): {:.2}",
        bridge.rate() / raw.rate()
    );
}
