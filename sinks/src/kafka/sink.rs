//! The Kafka sink itself: one rdkafka `FutureProducer` shared by every batch.
//!
//! A batch goes through the shared round (`crate::round`); this file supplies the Kafka
//! side of it. Sending is two steps: every record is enqueued (waiting and retrying while
//! librdkafka's local queue is full), then all delivery reports are awaited together. A
//! record is confirmed only on an `Ok` report. Records the brokers refuse for good go,
//! whole (key, headers, timestamp, body), to the dead-letter topic when one is
//! configured; one the dead-letter topic refuses too (a record too large for its topic
//! usually is for the dead-letter topic as well) fails permanently.

use std::borrow::Cow;
use std::fmt;
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::join_all;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tracing::{debug, error, info, warn};

use super::classify::{class_of, describe, is_queue_full, needs_new_producer};
use super::config::{KafkaConfig, KeySource, LibrdkafkaOptions};
use super::{KafkaSinkError, HEADER_DEAD_LETTER_ERROR, HEADER_DEAD_LETTER_TOPIC};
use crate::round::{self, Publisher, Refusal, Sent};
use crate::{CheckContext, ErrorClass, Outcome, Record, Sink, SinkError};

/// How long to wait before retrying an enqueue refused because the local queue is full.
/// The producer's polling thread drains delivery reports meanwhile.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// Default of `topic.metadata.propagation.max.ms`: how long librdkafka holds records for a
/// topic the brokers do not know before failing them as unknown. librdkafka's own default
/// (30 s) would eat the whole default lease.
const DEFAULT_TOPIC_PROPAGATION_MS: u64 = 3_000;

/// Default of `reconnect.backoff.max.ms`, in milliseconds.
const DEFAULT_RECONNECT_BACKOFF_MAX_MS: u64 = 1_000;

/// The producer's client context: librdkafka's logs and global errors go to `tracing`.
/// librdkafka never logs configuration values, so secrets stay out of the logs.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => error!(facility, "librdkafka: {message}"),
            RDKafkaLogLevel::Warning => warn!(facility, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => debug!(facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        warn!(error = %error, reason, "kafka client error");
    }
}

type Producer = FutureProducer<LogContext>;

/// Where records go: one topic, or a template expanded per record.
#[derive(Debug, Clone)]
enum TopicRoute {
    Static(String),
    Template(String),
}

impl TopicRoute {
    fn resolve<'a>(&'a self, record: &Record) -> Result<Cow<'a, str>, String> {
        match self {
            TopicRoute::Static(topic) => Ok(Cow::Borrowed(topic)),
            TopicRoute::Template(template) => record.expand_template(template).map(Cow::Owned),
        }
    }

    fn static_name(&self) -> Option<&str> {
        match self {
            TopicRoute::Static(topic) => Some(topic),
            TopicRoute::Template(_) => None,
        }
    }

    fn as_configured(&self) -> &str {
        match self {
            TopicRoute::Static(topic) | TopicRoute::Template(topic) => topic,
        }
    }
}

/// Produces records to Kafka and confirms each on its delivery report.
///
/// Built from a [`KafkaConfig`]; `Debug` shows the routing, never the librdkafka options.
pub struct KafkaSink {
    /// The full librdkafka configuration, kept to build a new producer after a fatal
    /// error. Holds secrets: never logged.
    client_config: ClientConfig,
    /// The producer; replaced when librdkafka reports a fatal (idempotence) error, after
    /// which the old one refuses every record.
    producer: RwLock<Producer>,
    topic: TopicRoute,
    key: KeySource,
    dead_letter_topic: Option<String>,
    brokers: String,
    message_timeout: Duration,
    metadata_timeout: Duration,
    /// The effective `acks`, for `check`.
    acks: String,
    /// The effective `enable.idempotence`, for `check`.
    idempotent: bool,
}

impl fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSink")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("key", &self.key)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("message_timeout", &self.message_timeout)
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Validates the settings and creates the producer. Does not wait for the brokers: the
    /// producer connects in the background.
    pub fn new(config: &KafkaConfig) -> Result<Self, KafkaSinkError> {
        crate::registry::check(config).map_err(|e| KafkaSinkError::Config(e.to_string()))?;
        let message_timeout_ms = config.effective_message_timeout_ms();
        let options = &config.librdkafka_options;

        let mut client_config = ClientConfig::new();
        client_config
            .set("bootstrap.servers", &config.brokers)
            .set("client.id", "cfq-bridge")
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // The Java client's partitioner, so keys land where Kafka users expect.
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", message_timeout_ms.to_string())
            // librdkafka only notices message timeouts between reconnect attempts; its
            // default back-off (up to 10 s) would stretch a failing batch well past
            // message.timeout.ms during an outage, and delay the recovery after it.
            .set(
                "reconnect.backoff.max.ms",
                DEFAULT_RECONNECT_BACKOFF_MAX_MS.to_string(),
            )
            .set(
                "topic.metadata.propagation.max.ms",
                DEFAULT_TOPIC_PROPAGATION_MS
                    .min(message_timeout_ms)
                    .to_string(),
            );
        if let Some(compression) = config.compression {
            client_config.set("compression.type", compression.as_str());
        }
        for (name, value) in options.iter_exposed() {
            client_config.set(name, value);
        }
        client_config.set_log_level(if options.contains("debug") {
            RDKafkaLogLevel::Debug
        } else {
            RDKafkaLogLevel::Notice
        });

        let producer = create_producer(&client_config)?;
        let acks = options
            .get("acks")
            .or_else(|| options.get("request.required.acks"))
            .unwrap_or("all")
            .trim()
            .to_owned();
        let idempotent = options
            .get("enable.idempotence")
            .is_none_or(|value| value.trim() == "true");
        let topic = if config.topic_is_template() {
            TopicRoute::Template(config.topic.clone())
        } else {
            TopicRoute::Static(config.topic.clone())
        };
        info!(
            brokers = %config.brokers,
            topic = %config.topic,
            dead_letter_topic = config.dead_letter_topic.as_deref().unwrap_or(""),
            message_timeout_ms,
            raw_options = options.len(),
            "kafka producer created"
        );
        Ok(KafkaSink {
            client_config,
            producer: RwLock::new(producer),
            topic,
            key: config.key.clone(),
            dead_letter_topic: config.dead_letter_topic.clone(),
            brokers: config.brokers.clone(),
            message_timeout: Duration::from_millis(message_timeout_ms),
            metadata_timeout: Duration::from_millis(config.metadata_timeout_ms),
            acks,
            idempotent,
        })
    }

    /// The current producer (a cheap clone of a shared handle).
    fn producer(&self) -> Producer {
        self.producer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces `failed` (if it is still the current producer) by a new one, with a new
    /// producer id. Records still in flight on the old one fail transiently and are retried
    /// by the bridge.
    fn replace_producer(&self, failed: &Producer, reason: &str) {
        let mut guard = self
            .producer
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if guard.client().native_ptr() != failed.client().native_ptr() {
            // Another batch already replaced it.
            return;
        }
        match create_producer(&self.client_config) {
            Ok(fresh) => {
                warn!(
                    reason,
                    "kafka producer lost its idempotence state; replaced it"
                );
                let old = std::mem::replace(&mut *guard, fresh);
                drop(guard);
                // Dropping a producer purges and briefly flushes: keep that off the
                // async workers.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(error) => {
                error!(error = %error, reason, "kafka producer is broken and cannot be replaced")
            }
        }
    }

    /// Replaces the current producer when librdkafka declared it fatally failed.
    fn replace_if_fatal(&self) {
        let producer = self.producer();
        if let Some((code, reason)) = producer.client().fatal_error() {
            self.replace_producer(&producer, &format!("fatal error {code:?}: {reason}"));
        }
    }

    /// The message key of a record, per `key`.
    fn key_of<'r>(&self, record: &'r Record) -> Option<Cow<'r, str>> {
        match &self.key {
            KeySource::MessageId => Some(Cow::Borrowed(record.id.as_str())),
            KeySource::None => None,
            KeySource::Metadata(name) => record.metadata_text(name),
        }
    }

    /// Hands one record to librdkafka. While the local queue is full, waits and retries
    /// until `deadline`; the returned future resolves with the delivery report.
    async fn enqueue(
        &self,
        producer: &Producer,
        record: &Record,
        topic: &str,
        extra_headers: &[(&str, &str)],
        deadline: Instant,
    ) -> Result<DeliveryFuture, KafkaError> {
        let key = self.key_of(record);
        let record_headers = record.headers();
        let mut headers =
            OwnedHeaders::new_with_capacity(record_headers.len() + extra_headers.len());
        for (name, value) in &record_headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_ref()),
            });
        }
        for (name, value) in extra_headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(*value),
            });
        }
        let mut message = FutureRecord::<str, [u8]>::to(topic)
            .payload(&record.body[..])
            .headers(headers);
        if let Some(key) = key.as_deref() {
            message = message.key(key);
        }
        if let Ok(timestamp) = i64::try_from(record.timestamp_ms) {
            message = message.timestamp(timestamp);
        }
        let mut waited = false;
        loop {
            match producer.send_result(message) {
                Ok(delivery) => return Ok(delivery),
                Err((error, returned)) if is_queue_full(&error) && Instant::now() < deadline => {
                    if !waited {
                        debug!(topic, "kafka producer queue full; waiting for deliveries");
                        waited = true;
                    }
                    message = returned;
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    /// Fetches metadata (for one topic, or for all) within `metadata_timeout`.
    async fn metadata(&self, topic: Option<String>) -> Result<Metadata, KafkaSinkError> {
        let producer = self.producer();
        let timeout = self.metadata_timeout;
        let fetched = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(topic.as_deref(), timeout)
        })
        .await;
        let unreachable = |reason: String| KafkaSinkError::Unreachable {
            brokers: self.brokers.clone(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            reason,
        };
        match fetched {
            Ok(Ok(metadata)) if !metadata.brokers().is_empty() => Ok(metadata),
            Ok(Ok(_)) => Err(unreachable("the metadata lists no broker".into())),
            Ok(Err(error)) => Err(unreachable(error.to_string())),
            Err(join_error) => Err(unreachable(format!("metadata task failed: {join_error}"))),
        }
    }

    /// Verifies that a topic exists and is usable.
    async fn check_topic(&self, topic: &str) -> Result<(), KafkaSinkError> {
        let metadata = self.metadata(Some(topic.to_owned())).await?;
        let missing = || KafkaSinkError::TopicMissing {
            topic: topic.to_owned(),
            brokers: self.brokers.clone(),
        };
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Err(missing());
        };
        match found.error() {
            None if !found.partitions().is_empty() => Ok(()),
            None | Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => Err(missing()),
            Some(code) => Err(KafkaSinkError::TopicUnusable {
                topic: topic.to_owned(),
                reason: RDKafkaErrorCode::from(code).to_string(),
            }),
        }
    }

    /// Warnings about settings that do not fit the bridge's.
    fn setting_warnings(&self, ctx: &CheckContext) -> Vec<String> {
        let mut warnings = Vec::new();
        let timeout_ms = u64::try_from(self.message_timeout.as_millis()).unwrap_or(u64::MAX);
        // A batch may wait up to message.timeout.ms for its reports (and as long again for
        // a dead-letter round); half the lease leaves room for the pull before and the ack
        // after.
        if timeout_ms > ctx.visibility_timeout_ms / 2 {
            warnings.push(format!(
                "kafka message.timeout.ms ({timeout_ms} ms) is more than half the visibility \
                 timeout ({} ms): a record could be confirmed after its lease ended and be \
                 delivered twice; lower sink.message_timeout_ms or raise the visibility timeout",
                ctx.visibility_timeout_ms
            ));
        }
        if !matches!(self.acks.as_str(), "all" | "-1") {
            warnings.push(format!(
                "kafka acks = {:?}: a record is confirmed before all in-sync replicas have it, \
                 so a broker failure can lose acknowledged messages (use acks = \"all\")",
                self.acks
            ));
        }
        if !self.idempotent {
            warnings.push(
                "kafka enable.idempotence = false: producer retries may write duplicates and \
                 reorder records"
                    .into(),
            );
        }
        warnings
    }
}

/// Creates a producer, describing a configuration error without revealing secret values.
fn create_producer(client_config: &ClientConfig) -> Result<Producer, KafkaSinkError> {
    client_config
        .create_with_context(LogContext)
        .map_err(|error| match error {
            KafkaError::ClientConfig(_, description, name, value) => {
                if LibrdkafkaOptions::is_sensitive(&name) {
                    KafkaSinkError::Client(format!(
                        "option {name:?} was refused (its value is secret and not shown)"
                    ))
                } else {
                    KafkaSinkError::Client(format!(
                        "option {name:?} = {value:?} was refused: {description}"
                    ))
                }
            }
            other => KafkaSinkError::Client(other.to_string()),
        })
}

#[async_trait]
impl Sink for KafkaSink {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    async fn deliver(&self, records: &[Record]) -> Vec<Outcome> {
        let mut batch = KafkaBatch {
            sink: self,
            producer: self.producer(),
            broken: None,
        };
        let outcomes = round::deliver(&mut batch, records).await;
        match batch.broken {
            Some(reason) => self.replace_producer(&batch.producer, &reason),
            None => self.replace_if_fatal(),
        }
        outcomes
    }

    async fn ready(&self) -> Result<(), SinkError> {
        self.replace_if_fatal();
        let topic = self
            .topic
            .static_name()
            .or(self.dead_letter_topic.as_deref())
            .map(str::to_owned);
        self.metadata(topic).await.map(drop).map_err(Into::into)
    }

    async fn check(&self, ctx: &CheckContext) -> Result<Vec<String>, SinkError> {
        let warnings = self.setting_warnings(ctx);
        match self.topic.static_name() {
            Some(topic) => self.check_topic(topic).await?,
            None => {
                self.metadata(None).await?;
            }
        }
        if let Some(dead_topic) = &self.dead_letter_topic {
            self.check_topic(dead_topic).await?;
        }
        Ok(warnings)
    }

    async fn close(&self) -> Result<(), SinkError> {
        let producer = self.producer();
        let timeout = self.message_timeout;
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        match flushed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(SinkError::transient(format!(
                "kafka producer could not flush within {} ms: {error}",
                timeout.as_millis()
            ))),
            Err(join_error) => Err(SinkError::transient(format!(
                "kafka flush task failed: {join_error}"
            ))),
        }
    }
}

/// One batch on its way through the shared round: the producer it started with, and
/// whether that producer turned out broken.
struct KafkaBatch<'a> {
    sink: &'a KafkaSink,
    /// Taken once per batch, so that every record and its dead-letter copy use the same
    /// producer, and a broken one is replaced only once.
    producer: Producer,
    /// Set when a record's error says the producer's idempotence state is broken.
    broken: Option<String>,
}

/// One record ready to produce: its topic and, for a dead-letter copy, why and where from.
struct KafkaMessage<'a> {
    topic: Cow<'a, str>,
    dead_letter: Option<Refusal>,
}

impl KafkaBatch<'_> {
    /// Sorts a failed produce: refused for good, or worth retrying later.
    fn answer(&mut self, topic: &str, error: &KafkaError) -> Sent {
        if needs_new_producer(error) {
            self.broken = Some(error.to_string());
        }
        let reason = describe(error, topic);
        match class_of(error) {
            ErrorClass::Permanent => Sent::Refused(Refusal {
                destination: Some(topic.to_owned()),
                reason,
            }),
            ErrorClass::Transient => Sent::Failed(SinkError::transient(reason)),
        }
    }
}

impl<'a> Publisher for KafkaBatch<'a> {
    type Message = KafkaMessage<'a>;

    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn prepare(&self, record: &Record) -> Result<KafkaMessage<'a>, Refusal> {
        match self.sink.topic.resolve(record) {
            Ok(topic) => Ok(KafkaMessage {
                topic,
                dead_letter: None,
            }),
            Err(reason) => Err(Refusal {
                destination: Some(self.sink.topic.as_configured().to_owned()),
                reason,
            }),
        }
    }

    fn dead_letter_destination(&self) -> Option<&str> {
        self.sink.dead_letter_topic.as_deref()
    }

    fn prepare_dead_letter(
        &self,
        _record: &Record,
        refusal: &Refusal,
    ) -> Result<KafkaMessage<'a>, String> {
        // Kafka headers carry any bytes and the key and timestamp are kept, so every record
        // can travel whole; only the dead-letter topic's answer decides.
        match self.sink.dead_letter_topic.as_deref() {
            Some(topic) => Ok(KafkaMessage {
                topic: Cow::Borrowed(topic),
                dead_letter: Some(refusal.clone()),
            }),
            None => Err("no dead-letter topic is configured".into()),
        }
    }

    async fn send_all(
        &mut self,
        records: &[Record],
        messages: Vec<(usize, KafkaMessage<'a>)>,
    ) -> Vec<(usize, Sent)> {
        let deadline = Instant::now() + self.sink.message_timeout;
        let mut answers = Vec::with_capacity(messages.len());
        // Every record in flight first...
        let mut in_flight = Vec::with_capacity(messages.len());
        for (index, message) in messages {
            let extra_headers = message.dead_letter.as_ref().map(|refusal| {
                [
                    (HEADER_DEAD_LETTER_ERROR, refusal.reason.as_str()),
                    (
                        HEADER_DEAD_LETTER_TOPIC,
                        refusal.destination.as_deref().unwrap_or(""),
                    ),
                ]
            });
            let enqueued = self
                .sink
                .enqueue(
                    &self.producer,
                    &records[index],
                    &message.topic,
                    extra_headers.as_ref().map_or(&[][..], |h| &h[..]),
                    deadline,
                )
                .await;
            match enqueued {
                Ok(delivery) => in_flight.push((index, message.topic, delivery)),
                Err(error) => {
                    let answer = self.answer(&message.topic, &error);
                    answers.push((index, answer));
                }
            }
        }
        // ...then every report together.
        let reports = join_all(
            in_flight
                .into_iter()
                .map(|(index, topic, delivery)| async move { (index, topic, delivery.await) }),
        )
        .await;
        for (index, topic, report) in reports {
            let answer = match report {
                Ok(Ok(_delivery)) => Sent::Stored,
                Ok(Err((error, _message))) => self.answer(&topic, &error),
                Err(_canceled) => Sent::Failed(SinkError::transient(
                    "the kafka producer was closed before reporting delivery",
                )),
            };
            answers.push((index, answer));
        }
        answers
    }
}

/// Fast tests against librdkafka's in-process mock cluster. Real-broker tests live in the
/// bridge's `tests/kafka_*.rs`.
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::RDKafkaApiKey;
    use rdkafka::{Offset, TopicPartitionList};
    use serde_json::Map;

    use super::*;
    use crate::ContentType;

    fn record(index: usize, body: Bytes) -> Record {
        let mut metadata = Map::new();
        metadata.insert("CF-Content-Type".into(), "bytes".into());
        Record {
            id: format!("m{index}"),
            queue_id: Arc::from("q"),
            timestamp_ms: 1_700_000_000_000 + index as u64,
            attempts: 1,
            content_type: ContentType::Bytes,
            metadata,
            body,
        }
    }

    fn sink(brokers: &str, extra: &str) -> KafkaSink {
        let text = format!(
            "brokers = \"{brokers}\"\ntopic = \"events\"\nmessage_timeout_ms = 1500\n\
             metadata_timeout_ms = 1000\n{extra}"
        );
        let config: KafkaConfig = toml::from_str(&text).expect("valid test config");
        KafkaSink::new(&config).expect("sink builds")
    }

    /// Reads `count` messages of a mock topic's partition 0.
    fn read(brokers: &str, topic: &str, count: usize) -> Vec<rdkafka::message::OwnedMessage> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "mock-reader")
            .create()
            .expect("consumer builds");
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, 0, Offset::Beginning)
            .expect("valid offset");
        consumer.assign(&assignment).expect("assign");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut messages = Vec::new();
        while messages.len() < count {
            assert!(
                Instant::now() < deadline,
                "read {} of {count}",
                messages.len()
            );
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                messages.push(message.expect("consume").detach());
            }
        }
        messages
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broker_refusing_a_record_as_too_large_sends_it_to_the_dead_letter_topic() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("events", 1, 1).expect("topic");
        cluster.create_topic("dead", 1, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        let sink = sink(&brokers, "dead_letter_topic = \"dead\"\n");
        // Warm up: the producer id and metadata are in place, so the next Produce request
        // carries exactly the record below.
        assert_eq!(
            sink.deliver(&[record(0, Bytes::from_static(b"small"))])
                .await,
            [Outcome::Confirmed]
        );

        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
        );
        let big = Bytes::from(vec![7u8; 50_000]);
        let outcomes = sink.deliver(&[record(1, big.clone())]).await;
        let Outcome::DeadLettered { reason } = &outcomes[0] else {
            panic!("expected a dead-lettered record, got {outcomes:?}");
        };
        assert!(reason.contains("too large"), "{reason}");

        let brokers_for_read = brokers.clone();
        let messages = tokio::task::spawn_blocking(move || read(&brokers_for_read, "dead", 1))
            .await
            .expect("reader");
        let message = &messages[0];
        assert_eq!(message.payload(), Some(&big[..]));
        assert_eq!(message.key(), Some(&b"m1"[..]));
        let header = |name: &str| {
            message.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        assert_eq!(header(HEADER_DEAD_LETTER_TOPIC).as_deref(), Some("events"));
        assert!(header(HEADER_DEAD_LETTER_ERROR).is_some_and(|e| e.contains("too large")));
        assert_eq!(header("cf-queue-message-id").as_deref(), Some("m1"));
    }

    /// A record its topic refuses as too large is usually too large for the dead-letter
    /// topic too. Then it is not dead-lettered at all: it fails permanently, so that
    /// Cloudflare keeps it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_the_dead_letter_topic_refuses_too_fails_permanently() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("events", 1, 1).expect("topic");
        cluster.create_topic("dead", 1, 1).expect("topic");
        let sink = sink(
            &cluster.bootstrap_servers(),
            "dead_letter_topic = \"dead\"\n",
        );
        assert_eq!(
            sink.deliver(&[record(0, Bytes::from_static(b"small"))])
                .await,
            [Outcome::Confirmed]
        );
        // Both the produce to the topic and the one to the dead-letter topic are refused.
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            ],
        );
        let outcomes = sink
            .deliver(&[record(1, Bytes::from(vec![7u8; 50_000]))])
            .await;
        let Outcome::Failed(error) = &outcomes[0] else {
            panic!("expected a permanent failure, got {outcomes:?}");
        };
        assert_eq!(error.class, ErrorClass::Permanent, "{error}");
        assert!(
            error.message.contains("dead-lettering to dead failed too"),
            "{error}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_record_without_a_dead_letter_topic_fails_permanently() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("events", 1, 1).expect("topic");
        let sink = sink(&cluster.bootstrap_servers(), "");
        assert_eq!(
            sink.deliver(&[record(0, Bytes::from_static(b"a"))]).await,
            [Outcome::Confirmed]
        );
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        );
        let outcomes = sink.deliver(&[record(1, Bytes::from_static(b"b"))]).await;
        let Outcome::Failed(error) = &outcomes[0] else {
            panic!("expected a failure, got {outcomes:?}");
        };
        assert_eq!(error.class, ErrorClass::Permanent, "{error}");
        assert!(error.message.contains("not authorized"), "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broker_outage_fails_records_transiently_until_the_broker_is_back() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("events", 1, 1).expect("topic");
        let sink = sink(&cluster.bootstrap_servers(), "");
        sink.ready().await.expect("ready while the broker is up");
        assert_eq!(
            sink.deliver(&[record(0, Bytes::from_static(b"a"))]).await,
            [Outcome::Confirmed]
        );

        cluster.broker_down(1).expect("broker down");
        let outcomes = sink
            .deliver(&[
                record(1, Bytes::from_static(b"b")),
                record(2, Bytes::from_static(b"c")),
            ])
            .await;
        for outcome in &outcomes {
            let Outcome::Failed(error) = outcome else {
                panic!("expected failures while the broker is down, got {outcomes:?}");
            };
            assert!(error.is_transient(), "{error}");
        }
        assert!(
            sink.ready().await.is_err(),
            "not ready while the broker is down"
        );

        cluster.broker_up(1).expect("broker up");
        let deadline = Instant::now() + Duration::from_secs(20);
        while sink.ready().await.is_err() {
            assert!(Instant::now() < deadline, "never ready again");
        }
        let outcomes = sink
            .deliver(&[
                record(1, Bytes::from_static(b"b")),
                record(2, Bytes::from_static(b"c")),
            ])
            .await;
        assert_eq!(outcomes, [Outcome::Confirmed, Outcome::Confirmed]);
        sink.close().await.expect("flush");
    }

    #[tokio::test]
    async fn debug_output_hides_options_and_refused_secrets_are_not_echoed() {
        let config: KafkaConfig = toml::from_str(
            "brokers = \"127.0.0.1:1\"\ntopic = \"t\"\n[librdkafka_options]\n\
             \"security.protocol\" = \"sasl_ssl\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
             \"sasl.username\" = \"bridge\"\n\"sasl.password\" = \"pw-123\"\n",
        )
        .expect("valid");
        let sink = KafkaSink::new(&config).expect("TLS and SCRAM are compiled in");
        let debug = format!("{sink:?}");
        assert!(!debug.contains("pw-123"), "{debug}");

        // librdkafka refuses an unknown option; when its name looks secret, the value is
        // not repeated in the error.
        let config: KafkaConfig = toml::from_str(
            "brokers = \"127.0.0.1:1\"\ntopic = \"t\"\n[librdkafka_options]\n\
             \"sasl.secret.typo\" = \"s3cr3t-value\"\n",
        )
        .expect("valid");
        let error = KafkaSink::new(&config).expect_err("refused").to_string();
        assert!(!error.contains("s3cr3t-value"), "{error}");
        assert!(error.contains("sasl.secret.typo"), "{error}");
    }
}
