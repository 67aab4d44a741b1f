//! `cfq-bridge doctor` for the Kafka sink: the worst confirmation time
//! (`message.timeout.ms`, twice with a dead-letter topic), and, with the `kafka` feature,
//! the topics: each exists (metadata) and its `max.message.bytes` takes the largest
//! record a Cloudflare message can become.
//!
//! The checks use their own admin client, built from the same brokers and raw options as
//! the producer (TLS, SASL), and write nothing.

use async_trait::async_trait;

use super::config::KafkaConfig;
use crate::doctor::{with_margin, Confirmation, DoctorContext, Finding, SinkDoctor};

/// The `max.message.bytes` a topic needs for the largest record the bridge produces:
/// Cloudflare's largest message body (128 KB, 128,000 bytes), plus 3,072 bytes for the
/// key, the headers and the record batch's framing. 128 KiB.
pub const NEEDED_MAX_MESSAGE_BYTES: u64 = 131_072;

/// librdkafka's default `batch.size`, in bytes.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
const DEFAULT_BATCH_SIZE: u64 = 1_000_000;

impl KafkaConfig {
    /// The config key that sets the effective `message.timeout.ms`, as the user would
    /// write it.
    fn message_timeout_key(&self) -> String {
        if self.message_timeout_ms.is_some() {
            return "sink.message_timeout_ms".into();
        }
        ["message.timeout.ms", "delivery.timeout.ms"]
            .into_iter()
            .find(|name| {
                self.librdkafka_options
                    .get(name)
                    .is_some_and(|v| v.trim().parse::<u64>().is_ok())
            })
            .map_or_else(
                || "sink.message_timeout_ms".into(),
                |name| format!("sink.librdkafka_options.\"{name}\""),
            )
    }
}

#[async_trait]
impl SinkDoctor for KafkaConfig {
    /// A batch waits up to `message.timeout.ms` for its delivery reports; the copies of
    /// refused records to the dead-letter topic may wait as long again.
    fn confirmation(&self) -> Confirmation {
        let timeout_ms = self.effective_message_timeout_ms();
        let (ms, what) = match &self.dead_letter_topic {
            Some(_) => (
                timeout_ms.saturating_mul(2),
                format!(
                    "twice message.timeout.ms = {timeout_ms} ms (a refused record's copy to \
                     sink.dead_letter_topic may wait as long again)"
                ),
            ),
            None => (timeout_ms, format!("message.timeout.ms = {timeout_ms} ms")),
        };
        Confirmation::Within {
            ms,
            what,
            key: self.message_timeout_key(),
            needed_visibility_ms: with_margin(ms),
        }
    }

    async fn doctor(&self, _ctx: &DoctorContext) -> Vec<Finding> {
        #[cfg(feature = "kafka")]
        {
            brokers::findings(self).await
        }
        // Building the sink already says that Kafka support is not compiled in.
        #[cfg(not(feature = "kafka"))]
        {
            Vec::new()
        }
    }
}

/// `1 partition`, `3 partitions`.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
fn partitions_text(count: usize) -> String {
    match count {
        1 => "1 partition".into(),
        n => format!("{n} partitions"),
    }
}

/// What a topic's `max.message.bytes` (`limit`) means for the bridge's records, and for
/// the producer's batches of up to `batch_size` bytes.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
fn size_findings(
    brokers: &str,
    topic: &str,
    partitions: usize,
    limit: u64,
    batch_size: u64,
) -> Vec<Finding> {
    let raise = |to: u64| {
        format!(
            "kafka-configs.sh --bootstrap-server {brokers} --alter --entity-type topics \
             --entity-name {topic} --add-config max.message.bytes={to}"
        )
    };
    if limit < NEEDED_MAX_MESSAGE_BYTES {
        return vec![Finding::fail(
            format!(
                "kafka topic {topic:?}: max.message.bytes = {limit} is less than a 128 KB \
                 Cloudflare message with its key and headers needs \
                 ({NEEDED_MAX_MESSAGE_BYTES}): such records are refused"
            ),
            format!("raise it: {}", raise(NEEDED_MAX_MESSAGE_BYTES)),
        )];
    }
    let mut findings = vec![Finding::ok(format!(
        "kafka topic {topic:?} exists ({}); max.message.bytes = {limit} takes a 128 KB \
         message with its key and headers",
        partitions_text(partitions)
    ))];
    if limit < batch_size {
        findings.push(Finding::warn(
            format!(
                "kafka topic {topic:?} takes record batches of at most {limit} bytes \
                 (max.message.bytes), and the producer fills batches up to batch.size = \
                 {batch_size} bytes: a full batch is refused as too large, every record in it"
            ),
            format!(
                "set sink.librdkafka_options.\"batch.size\" = {limit} (or less), or raise the \
                 topic's limit: {}",
                raise(batch_size)
            ),
        ));
    }
    findings
}

#[cfg(feature = "kafka")]
mod brokers {
    use std::sync::Arc;
    use std::time::Duration;

    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::types::RDKafkaRespErr;

    use super::{KafkaConfig, DEFAULT_BATCH_SIZE, NEEDED_MAX_MESSAGE_BYTES};
    use crate::doctor::Finding;
    use crate::kafka::sink::LogContext;
    use crate::kafka::LibrdkafkaOptions;

    type Admin = AdminClient<LogContext>;

    /// The topics' findings.
    pub(super) async fn findings(config: &KafkaConfig) -> Vec<Finding> {
        let admin = match admin_client(config) {
            Ok(admin) => Arc::new(admin),
            Err(reason) => {
                return vec![Finding::fail(
                    format!("cannot create a Kafka admin client: {reason}"),
                    "fix sink.librdkafka_options",
                )]
            }
        };
        let mut findings = Vec::new();
        let mut topics = Vec::new();
        if config.topic_is_template() {
            findings.push(Finding::warn(
                format!(
                    "kafka topic {:?} is a template: the topics it expands to cannot be checked",
                    config.topic
                ),
                format!(
                    "make sure every topic it expands to exists, with max.message.bytes >= \
                     {NEEDED_MAX_MESSAGE_BYTES}"
                ),
            ));
        } else {
            topics.push(("sink.topic", config.topic.as_str()));
        }
        if let Some(dead) = &config.dead_letter_topic {
            topics.push(("sink.dead_letter_topic", dead.as_str()));
        }
        for (key, topic) in topics {
            findings.extend(topic_findings(&admin, config, key, topic).await);
        }
        findings
    }

    /// An admin client with the producer's brokers and raw options.
    fn admin_client(config: &KafkaConfig) -> Result<Admin, String> {
        let mut client_config = ClientConfig::new();
        client_config
            .set("bootstrap.servers", &config.brokers)
            .set("client.id", "cfq-bridge-doctor");
        for (name, value) in config.librdkafka_options.iter_exposed() {
            client_config.set(name, value);
        }
        client_config.set_log_level(RDKafkaLogLevel::Warning);
        client_config
            .create_with_context(LogContext)
            .map_err(|error| match error {
                // librdkafka may quote the refused value: never show a secret one.
                KafkaError::ClientConfig(_, _, name, _)
                    if LibrdkafkaOptions::is_sensitive(&name) =>
                {
                    format!("option {name:?} was refused (its value is secret and not shown)")
                }
                KafkaError::ClientConfig(_, description, name, _) => {
                    format!("option {name:?} was refused: {description}")
                }
                other => other.to_string(),
            })
    }

    /// Whether `topic` exists, and whether its `max.message.bytes` fits.
    async fn topic_findings(
        admin: &Arc<Admin>,
        config: &KafkaConfig,
        key: &str,
        topic: &str,
    ) -> Vec<Finding> {
        let brokers = &config.brokers;
        let timeout = Duration::from_millis(config.metadata_timeout_ms);
        let partitions = match partitions(admin, topic, timeout).await {
            Ok(Some(partitions)) => partitions,
            Ok(None) => {
                return vec![Finding::fail(
                    format!("kafka topic {topic:?} ({key}) does not exist on {brokers}"),
                    format!(
                        "create it (kafka-topics.sh --bootstrap-server {brokers} --create \
                         --topic {topic}), or fix {key}: the bridge does not create topics"
                    ),
                )]
            }
            Err(reason) => {
                return vec![Finding::fail(
                    format!("kafka topic {topic:?} ({key}) could not be looked up: {reason}"),
                    "check sink.brokers, that the brokers are up, and the TLS and SASL \
                     options in sink.librdkafka_options",
                )]
            }
        };
        let limit = match max_message_bytes(admin, topic, timeout).await {
            Ok(limit) => limit,
            Err(reason) => {
                return vec![Finding::warn(
                    format!(
                        "kafka topic {topic:?} exists ({}), but its max.message.bytes could \
                         not be read: {reason}",
                        super::partitions_text(partitions)
                    ),
                    format!(
                        "make sure it is at least {NEEDED_MAX_MESSAGE_BYTES} (kafka-configs.sh \
                         --bootstrap-server {brokers} --describe --entity-type topics \
                         --entity-name {topic})"
                    ),
                )]
            }
        };
        let batch_size = config
            .librdkafka_options
            .get("batch.size")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(DEFAULT_BATCH_SIZE);
        super::size_findings(brokers, topic, partitions, limit, batch_size)
    }

    /// The topic's partition count; `None` when the brokers do not know the topic.
    async fn partitions(
        admin: &Arc<Admin>,
        topic: &str,
        timeout: Duration,
    ) -> Result<Option<usize>, String> {
        let client = Arc::clone(admin);
        let name = topic.to_owned();
        let metadata =
            tokio::task::spawn_blocking(move || client.inner().fetch_metadata(Some(&name), timeout))
                .await
                .map_err(|e| format!("metadata task failed: {e}"))?
                .map_err(|e| e.to_string())?;
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Ok(None);
        };
        match found.error() {
            None if !found.partitions().is_empty() => Ok(Some(found.partitions().len())),
            None | Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => Ok(None),
            Some(code) => Err(RDKafkaErrorCode::from(code).to_string()),
        }
    }

    /// The topic's effective `max.message.bytes` (its own, or the broker's default).
    async fn max_message_bytes(
        admin: &Arc<Admin>,
        topic: &str,
        timeout: Duration,
    ) -> Result<u64, String> {
        let options = AdminOptions::new().request_timeout(Some(timeout));
        let results = admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &options)
            .await
            .map_err(|e| e.to_string())?;
        let resource = results
            .into_iter()
            .next()
            .ok_or("the brokers answered no configuration")?
            .map_err(|code| code.to_string())?;
        let entry = resource
            .get("max.message.bytes")
            .ok_or("the configuration has no max.message.bytes")?;
        let value = entry
            .value
            .as_deref()
            .ok_or("max.message.bytes has no value")?;
        value
            .trim()
            .parse()
            .map_err(|_| format!("max.message.bytes is not a number: {value:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> KafkaConfig {
        toml::from_str(&format!(
            "brokers = \"127.0.0.1:9092\"\ntopic = \"t\"\n{extra}"
        ))
        .unwrap()
    }

    fn within(config: &KafkaConfig) -> (u64, String, String, u64) {
        match config.confirmation() {
            Confirmation::Within {
                ms,
                what,
                key,
                needed_visibility_ms,
            } => (ms, what, key, needed_visibility_ms),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_worst_confirmation_is_the_message_timeout_and_names_its_key() {
        let (ms, what, key, needed) = within(&config(""));
        assert_eq!(ms, super::super::DEFAULT_MESSAGE_TIMEOUT_MS);
        assert_eq!(what, "message.timeout.ms = 10000 ms");
        assert_eq!(key, "sink.message_timeout_ms");
        assert_eq!(needed, 11_000);

        let raw = config("[librdkafka_options]\n\"message.timeout.ms\" = 300000\n");
        let (ms, what, key, needed) = within(&raw);
        assert_eq!(ms, 300_000);
        assert!(what.contains("message.timeout.ms = 300000 ms"));
        assert_eq!(key, "sink.librdkafka_options.\"message.timeout.ms\"");
        assert_eq!(needed, 330_000);
        let short = raw.visibility_finding("kafka", 60_000);
        assert_eq!(short.level, crate::doctor::Level::Fail);
        assert!(short.what.contains("visibility_timeout_ms"));
        assert!(short.fix.unwrap().contains(">= 330000"));

        let delivery = config("[librdkafka_options]\n\"delivery.timeout.ms\" = 20000\n");
        assert_eq!(
            within(&delivery).2,
            "sink.librdkafka_options.\"delivery.timeout.ms\""
        );
        let own = config("message_timeout_ms = 4000\n");
        assert_eq!(within(&own).2, "sink.message_timeout_ms");
    }

    #[test]
    fn max_message_bytes_must_take_a_full_cloudflare_message() {
        use crate::doctor::Level;
        let small = size_findings("b:9092", "t", 3, 100_000, DEFAULT_BATCH_SIZE);
        assert_eq!(small.len(), 1);
        assert_eq!(small[0].level, Level::Fail);
        assert!(small[0].what.contains("max.message.bytes = 100000"));
        assert!(small[0]
            .fix
            .as_deref()
            .unwrap()
            .ends_with("--entity-name t --add-config max.message.bytes=131072"));

        let roomy = size_findings("b:9092", "t", 1, 1_048_588, DEFAULT_BATCH_SIZE);
        assert_eq!(roomy.len(), 1);
        assert_eq!(roomy[0].level, Level::Ok);
        assert!(roomy[0].what.contains("(1 partition)"), "{}", roomy[0].what);

        let tight = size_findings("b:9092", "t", 2, NEEDED_MAX_MESSAGE_BYTES, 500_000);
        assert_eq!(tight[0].level, Level::Ok);
        assert_eq!(tight[1].level, Level::Warn);
        assert!(tight[1]
            .fix
            .as_deref()
            .unwrap()
            .starts_with("set sink.librdkafka_options.\"batch.size\" = 131072"));
    }

    #[test]
    fn a_dead_letter_topic_doubles_the_worst_confirmation() {
        let (ms, what, _, needed) = within(&config(
            "message_timeout_ms = 5000\ndead_letter_topic = \"dead\"\n",
        ));
        assert_eq!(ms, 10_000);
        assert!(what.starts_with("twice message.timeout.ms = 5000 ms"), "{what}");
        assert_eq!(needed, 11_000);
    }
}
