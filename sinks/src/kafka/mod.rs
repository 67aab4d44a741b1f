//! The Kafka sink (cargo feature `kafka`): records produced with rdkafka's
//! `FutureProducer`, each confirmed only on its `Ok` delivery report.
//!
//! - [`config`](KafkaConfig): the `[sink]` settings, parsed and validated in every build;
//! - `classify`: which librdkafka errors are permanent for a record and which are transient;
//! - `sink`: the producer, and its side of the shared delivery round (`crate::round`):
//!   how a record becomes a produce, and its copy for the dead-letter topic;
//! - `doctor`: what `cfq-bridge doctor` checks (the message timeout against the lease, the
//!   topics and their `max.message.bytes`).
//!
//! Without the `kafka` feature only the settings exist, and [`build`] answers "kafka
//! support not compiled in; rebuild with `--features kafka`".

mod config;
mod doctor;

#[cfg(feature = "kafka")]
mod classify;
#[cfg(feature = "kafka")]
mod sink;

pub use config::{
    Compression, KafkaConfig, KeySource, LibrdkafkaOptions, DEFAULT_MESSAGE_TIMEOUT_MS,
    DEFAULT_METADATA_TIMEOUT_MS, MAX_LEASE_MS,
};
pub use doctor::NEEDED_MAX_MESSAGE_BYTES;
#[cfg(feature = "kafka")]
pub use sink::KafkaSink;

/// The rdkafka crate this sink is built on, re-exported so that tests and tools (admin
/// clients, consumers) use the very same version and librdkafka build.
#[cfg(feature = "kafka")]
pub use rdkafka;

use crate::{ErrorClass, Sink, SinkError};

/// Header added to a dead-lettered record: why its topic refused it.
pub const HEADER_DEAD_LETTER_ERROR: &str = "cf-dead-letter-error";
/// Header added to a dead-lettered record: the topic it was meant for.
pub const HEADER_DEAD_LETTER_TOPIC: &str = "cf-dead-letter-topic";

/// The error message of a build without the `kafka` feature.
pub const NOT_COMPILED_IN: &str = "kafka support not compiled in; rebuild with `--features kafka`";

/// Failures of the Kafka sink as a whole (building it, reaching the brokers, checking
/// topics). Per-record failures are reported as [`crate::Outcome::Failed`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KafkaSinkError {
    /// This build has no Kafka support.
    #[error("kafka support not compiled in; rebuild with `--features kafka`")]
    NotCompiledIn,
    /// The settings are invalid (the message names the key).
    #[error("invalid kafka settings: {0}")]
    Config(String),
    /// librdkafka refused the configuration (an unknown or malformed raw option).
    #[error("librdkafka refused the configuration: {0}")]
    Client(String),
    /// No broker answered a metadata request in time.
    #[error("kafka brokers {brokers} unreachable (no metadata within {timeout_ms} ms): {reason}")]
    Unreachable {
        /// The configured bootstrap brokers.
        brokers: String,
        /// How long the request waited, in milliseconds.
        timeout_ms: u64,
        /// librdkafka's description.
        reason: String,
    },
    /// A static topic the sink needs does not exist; topics are not created by the sink.
    #[error(
        "kafka topic {topic:?} does not exist on brokers {brokers} (the bridge does not create \
         topics: create it, or fix sink.topic / sink.dead_letter_topic)"
    )]
    TopicMissing {
        /// The missing topic.
        topic: String,
        /// The configured bootstrap brokers.
        brokers: String,
    },
    /// The brokers report another error for a topic the sink needs (not authorized, ...).
    #[error("kafka topic {topic:?} is not usable: {reason}")]
    TopicUnusable {
        /// The topic.
        topic: String,
        /// The broker's error.
        reason: String,
    },
}

impl KafkaSinkError {
    /// Whether retrying later can help: brokers that do not answer may come back; a missing
    /// topic or a bad setting needs an operator.
    pub fn class(&self) -> ErrorClass {
        match self {
            KafkaSinkError::Unreachable { .. } => ErrorClass::Transient,
            KafkaSinkError::NotCompiledIn
            | KafkaSinkError::Config(_)
            | KafkaSinkError::Client(_)
            | KafkaSinkError::TopicMissing { .. }
            | KafkaSinkError::TopicUnusable { .. } => ErrorClass::Permanent,
        }
    }
}

impl From<KafkaSinkError> for SinkError {
    fn from(error: KafkaSinkError) -> Self {
        SinkError {
            class: error.class(),
            message: error.to_string(),
        }
    }
}

/// Builds the Kafka sink, or explains that this build has none. Goes through
/// [`crate::registry::build`]: the settings are checked (weaker delivery needs
/// `allow_weaker_delivery`) and any allowed weakening is logged at warn.
///
/// The producer connects in the background: building succeeds while the brokers are
/// down, and [`Sink::ready`] / [`Sink::check`] tell whether they answer.
pub async fn build(config: &KafkaConfig) -> Result<Box<dyn Sink>, SinkError> {
    crate::registry::build("kafka", config).await
}

/// Creates the producer (the registry has checked the settings), or explains that this
/// build has none.
fn open(config: &KafkaConfig) -> Result<Box<dyn Sink>, SinkError> {
    #[cfg(not(feature = "kafka"))]
    {
        let _ = config;
        Err(KafkaSinkError::NotCompiledIn.into())
    }
    #[cfg(feature = "kafka")]
    {
        Ok(Box::new(KafkaSink::new(config)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_compiled_in_message_is_exact() {
        let error: SinkError = KafkaSinkError::NotCompiledIn.into();
        assert_eq!(error.message, NOT_COMPILED_IN);
        assert_eq!(error.class, ErrorClass::Permanent);
    }

    #[cfg(not(feature = "kafka"))]
    #[tokio::test]
    async fn build_without_the_feature_says_how_to_rebuild() {
        let config: KafkaConfig =
            toml::from_str("brokers = \"127.0.0.1:9092\"\ntopic = \"t\"\n").unwrap();
        let error = build(&config).await.err().expect("build must fail");
        assert_eq!(
            error.message,
            "kafka support not compiled in; rebuild with `--features kafka`"
        );
    }
}
