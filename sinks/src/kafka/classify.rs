//! Which librdkafka errors doom a record and which only say "not now".
//!
//! The permanent list is short and explicit, the way Kafka users know it: the record is too
//! large, the topic or partition does not exist, the topic is not authorized, the broker
//! refuses the record itself. Everything else (broker down, timeouts, the local queue
//! being full, a broken idempotence state that a new producer clears) is transient: the
//! bridge stops pulling and retries later, and acks nothing meanwhile.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::ErrorClass;

/// How one failed produce of one record should be treated.
pub(crate) fn class_of(error: &KafkaError) -> ErrorClass {
    match error.rdkafka_error_code() {
        Some(code) if is_permanent(code) => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// True for error codes that no retry of the same record can fix.
pub(crate) fn is_permanent(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        // Larger than the broker's or the topic's limit (broker answer), or than the
        // producer's `message.max.bytes` (local check at enqueue).
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge
            // No such topic / partition: broker answer, and librdkafka's local verdict
            // after `topic.metadata.propagation.max.ms`.
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            // The broker validated the record and refused it (compacted topic without a
            // key, a broker-side policy).
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::PolicyViolation
    )
}

/// True when the producer's idempotence state is broken and only a new producer (with a
/// new producer id) will deliver again: librdkafka's fatal error, or the broker no longer
/// accepting the producer id or epoch (a broker that lost its state, or one that fenced the
/// producer after an epoch bump).
pub(crate) fn needs_new_producer(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::UnknownProducerId
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::InvalidProducerIdMapping
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
        )
    )
}

/// True when the local producer queue is full: wait for deliveries to drain, then retry.
pub(crate) fn is_queue_full(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
    )
}

/// A description of a failed produce for logs and outcomes, clearer than the bare code for
/// the cases operators meet most.
pub(crate) fn describe(error: &KafkaError, topic: &str) -> String {
    match error.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition,
        ) => format!(
            "kafka topic {topic:?} does not exist (the bridge does not create topics): {error}"
        ),
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => {
            format!("not authorized to produce to kafka topic {topic:?}: {error}")
        }
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge,
        ) => format!("record too large for kafka topic {topic:?}: {error}"),
        Some(RDKafkaErrorCode::MessageTimedOut) => format!(
            "no delivery report from kafka for topic {topic:?} within message.timeout.ms: {error}"
        ),
        _ => format!("producing to kafka topic {topic:?} failed: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produce_error(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[test]
    fn the_listed_codes_are_permanent() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::UnknownTopic,
            RDKafkaErrorCode::UnknownPartition,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::InvalidRecord,
        ] {
            assert_eq!(
                class_of(&produce_error(code)),
                ErrorClass::Permanent,
                "{code:?}"
            );
        }
    }

    #[test]
    fn outages_and_the_rest_are_transient() {
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::Fatal,
            RDKafkaErrorCode::UnknownProducerId,
        ] {
            assert_eq!(
                class_of(&produce_error(code)),
                ErrorClass::Transient,
                "{code:?}"
            );
        }
        assert_eq!(class_of(&KafkaError::Canceled), ErrorClass::Transient);
    }

    #[test]
    fn queue_full_and_broken_producers_are_recognised() {
        assert!(is_queue_full(&produce_error(RDKafkaErrorCode::QueueFull)));
        assert!(!is_queue_full(&produce_error(
            RDKafkaErrorCode::MessageTimedOut
        )));
        for code in [
            RDKafkaErrorCode::Fatal,
            RDKafkaErrorCode::ProducerFenced,
            RDKafkaErrorCode::UnknownProducerId,
        ] {
            assert!(needs_new_producer(&produce_error(code)), "{code:?}");
        }
        assert!(!needs_new_producer(&produce_error(
            RDKafkaErrorCode::QueueFull
        )));
        assert!(!needs_new_producer(&produce_error(
            RDKafkaErrorCode::MessageTimedOut
        )));
    }

    #[test]
    fn descriptions_name_the_topic_and_the_cause() {
        let text = describe(&produce_error(RDKafkaErrorCode::UnknownTopic), "cf.q");
        assert!(text.contains("\"cf.q\" does not exist"), "{text}");
        let text = describe(
            &produce_error(RDKafkaErrorCode::MessageSizeTooLarge),
            "cf.q",
        );
        assert!(text.contains("too large"), "{text}");
    }
}
