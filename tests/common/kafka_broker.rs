//! Helpers for the real-broker Kafka tests: where the shared broker is, per-test topics, an
//! independent consumer that reads a topic back, and a private broker reached only through
//! a cutting [`TcpProxy`] for outage tests.
//!
//! Part of `tests/common`, built with the `kafka` feature.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cfq_sinks::kafka::rdkafka;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::process::{Child, Command};

use super::ports::reserve_port;
use super::tcp_proxy::TcpProxy;

/// How to start the shared broker, for failure messages.
pub const START_HINT: &str =
    "start one with `bash .ci/start-kafka.sh` (tansu on 127.0.0.1:9092), or set KAFKA_BROKERS";

/// The shared test broker: `KAFKA_BROKERS`, or tansu's default `127.0.0.1:9092`.
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Fails the test with instructions when no broker answers at `brokers`.
pub async fn require_broker(brokers: &str) {
    let config = client_config(brokers);
    let answered = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().expect("consumer config is valid");
        consumer.fetch_metadata(None, Duration::from_secs(5))
    })
    .await
    .expect("metadata task");
    if let Err(error) = answered {
        panic!("no Kafka broker answers at {brokers} ({error}): {START_HINT}");
    }
}

/// A topic name no other test (or earlier run against the same broker) uses.
pub fn unique_topic(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    config
}

/// Creates a topic (the brokers do not auto-create them) and waits until its metadata
/// lists every partition.
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = client_config(brokers)
        .create()
        .expect("admin config is valid");
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&new_topic], &options)
        .await
        .unwrap_or_else(|e| panic!("creating topic {topic} at {brokers}: {e}; {START_HINT}"));
    for result in results {
        if let Err((name, code)) = result {
            panic!("creating topic {name} failed: {code}");
        }
    }
    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config(&brokers).create().expect("valid config");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let metadata = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .expect("metadata of a new topic");
            let listed = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .map(|t| t.error().is_none() && t.partitions().len() == partitions as usize);
            if listed == Some(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "topic {topic} not visible in metadata after creation"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("metadata task");
}

/// Reads a topic from the beginning with an independent consumer (manual assignment of
/// every partition, no consumer group) until `expected` messages arrived, then keeps reading
/// for `linger` to catch extra ones. Panics with the count seen when `timeout` passes first.
pub async fn consume(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
    linger: Duration,
) -> Vec<OwnedMessage> {
    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config(&brokers)
            .set("group.id", unique_topic("cfq-test-reader"))
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .create()
            .expect("consumer config is valid");
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("metadata for {topic}: {e}"));
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        assert!(partitions > 0, "topic {topic} has no partitions");
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions as i32 {
            assignment
                .add_partition_offset(&topic, partition, Offset::Beginning)
                .expect("valid offset");
        }
        consumer.assign(&assignment).expect("assign partitions");

        let mut messages = Vec::new();
        let deadline = Instant::now() + timeout;
        let mut linger_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if let Some(until) = linger_until {
                if now >= until {
                    break;
                }
            } else if now >= deadline {
                panic!(
                    "read {} of {expected} messages from {topic} within {timeout:?}",
                    messages.len()
                );
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    messages.push(message.detach());
                    if messages.len() >= expected && linger_until.is_none() {
                        linger_until = Some(Instant::now() + linger);
                    }
                }
                Some(Err(error)) => panic!("consuming {topic}: {error}"),
                None => {}
            }
        }
        messages
    })
    .await
    .expect("consumer task")
}

/// The value of a header, as text.
pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Every header of a message, in order, as text.
pub fn headers(message: &OwnedMessage) -> Vec<(String, String)> {
    use rdkafka::message::Headers;
    message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The tansu binary: `TANSU` if set, else `tansu` from `PATH` or `~/.cargo/bin`.
fn tansu_binary() -> PathBuf {
    if let Ok(path) = std::env::var("TANSU") {
        return PathBuf::from(path);
    }
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("tansu"))
            .find(|candidate| candidate.is_file())
    });
    from_path.unwrap_or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .unwrap_or_default();
        home.join("bin").join("tansu")
    })
}

/// A tansu broker of the test's own, advertised at a cutting proxy's address, so that
/// every client connection (bootstrap and partition leaders alike) goes through the proxy.
/// Needed because the shared broker advertises its own address: clients would bypass a
/// proxy after bootstrap. Killed when dropped.
pub struct BrokerBehindProxy {
    /// The proxy every client connects through.
    pub proxy: TcpProxy,
    child: Child,
    _dir: tempfile::TempDir,
}

impl BrokerBehindProxy {
    /// Starts the broker (in-memory storage, from an empty directory) and its proxy.
    ///
    /// tansu is told its port ([`reserve_port`]); when another process took that port
    /// meanwhile, tansu exits at start and this tries again on another one.
    pub async fn start() -> BrokerBehindProxy {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            if let Some(broker) = Self::try_start().await {
                return broker;
            }
            eprintln!("private tansu broker exited at start (attempt {attempt}): port taken?");
        }
        panic!("private tansu broker did not start in {ATTEMPTS} attempts");
    }

    /// One start; `None` when tansu exited before it listened.
    async fn try_start() -> Option<BrokerBehindProxy> {
        let broker_addr = SocketAddr::from(([127, 0, 0, 1], reserve_port()));
        let proxy = TcpProxy::start(broker_addr).await.expect("start the proxy");
        let dir = tempfile::tempdir().expect("temporary directory");
        let binary = tansu_binary();
        let child = Command::new(&binary)
            .current_dir(dir.path())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://{broker_addr}"),
                "--advertised-listener-url",
                &format!("tcp://{}", proxy.addr()),
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}): install tansu with `bash .ci/start-kafka.sh` \
                     (or point TANSU at the binary)",
                    binary.display()
                )
            });
        let child = std::cell::RefCell::new(child);
        let exited = || matches!(child.borrow_mut().try_wait(), Ok(Some(_)));
        let listening = super::try_wait_until(Duration::from_secs(20), async || {
            exited() || tokio::net::TcpStream::connect(broker_addr).await.is_ok()
        })
        .await;
        if exited() {
            return None;
        }
        let child = child.into_inner();
        assert!(
            listening,
            "private tansu broker did not listen on {broker_addr}"
        );
        Some(BrokerBehindProxy {
            proxy,
            child,
            _dir: dir,
        })
    }

    /// The bootstrap address clients use: the proxy's.
    pub fn brokers(&self) -> String {
        self.proxy.addr().to_string()
    }
}

impl Drop for BrokerBehindProxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
