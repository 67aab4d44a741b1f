//! The `[sink]` table of the bridge's configuration.
//!
//! The table is the [`SinkConfig`] enum that `register_sinks!` in `lib.rs` generates, one
//! variant per registered sink. Every sink's settings parse in every build, so a config
//! naming a sink that was compiled out still parses, validates, and then fails to build
//! with a message saying how to rebuild.

pub use crate::cloudflare_queue::CloudflareQueueConfig;
pub use crate::jsonl::JsonlConfig;
pub use crate::kafka::KafkaConfig;
pub use crate::nats::NatsConfig;
pub use crate::registry::{SinkConfigError, SinkSettings, Weakening};
pub use crate::s3::S3Config;
pub use crate::stdout::StdoutConfig;
pub use crate::SinkConfig;

impl SinkConfig {
    /// Checks the settings without touching the network or the disk, including the
    /// delivery-strength gate (see [`crate::registry`]). The error names the offending key.
    pub fn validate(&self) -> Result<(), SinkConfigError> {
        crate::registry::check(self.settings())
    }

    /// What these settings give up of the at-least-once promise (accepted only with
    /// `allow_weaker_delivery = true`).
    pub fn weakenings(&self) -> Vec<Weakening> {
        self.settings().weakenings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(text: &str) -> SinkConfig {
        toml::from_str(text).expect("a valid [sink] table")
    }

    #[test]
    fn every_registered_type_parses_with_its_name_as_kind() {
        let tables = [
            "type = \"stdout\"\n",
            "type = \"jsonl\"\npath = \"a.jsonl\"\n",
            "type = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"t\"\n",
            "type = \"nats\"\nurl = \"nats://h:4222\"\nsubject = \"s\"\n",
            "type = \"cloudflare_queue\"\naccount_id = \"a\"\nqueue_id = \"q\"\n",
            "type = \"s3\"\nbucket = \"b\"\nprefix = \"cf/{queue_id}/\"\n",
        ];
        let kinds: Vec<&str> = tables.iter().map(|t| sink(t).kind()).collect();
        assert_eq!(kinds, SinkConfig::KINDS);
        for table in tables {
            sink(table).validate().unwrap();
        }
    }

    #[test]
    fn an_unknown_type_is_refused_with_the_known_ones() {
        let error = toml::from_str::<SinkConfig>("type = \"kafak\"\n").unwrap_err();
        let text = error.to_string();
        assert!(text.contains("kafak") && text.contains("kafka"), "{text}");
    }

    #[test]
    fn an_empty_jsonl_path_names_the_key() {
        let error = sink("type = \"jsonl\"\npath = \"\"\n")
            .validate()
            .unwrap_err();
        assert!(error.to_string().contains("sink.path"), "{error}");
    }

    /// Each weakening is refused naming its key, and accepted with the flag.
    #[test]
    fn weaker_delivery_needs_the_explicit_flag() {
        let kafka = "type = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"t\"\n";
        let nats = "type = \"nats\"\nurl = \"nats://h:4222\"\nsubject = \"s\"\n";
        let cases = [
            (
                format!("{kafka}[librdkafka_options]\nacks = \"1\"\n"),
                "sink.librdkafka_options.\"acks\"",
            ),
            (
                format!("{kafka}[librdkafka_options]\n\"request.required.acks\" = 0\n"),
                "sink.librdkafka_options.\"request.required.acks\"",
            ),
            (
                format!("{kafka}[librdkafka_options]\n\"enable.idempotence\" = false\n"),
                "sink.librdkafka_options.\"enable.idempotence\"",
            ),
            (
                format!("{kafka}message_timeout_ms = 43200001\n"),
                "sink.message_timeout_ms",
            ),
            (
                format!("{kafka}[librdkafka_options]\n\"delivery.timeout.ms\" = 86400000\n"),
                "sink.librdkafka_options.\"delivery.timeout.ms\"",
            ),
            (format!("{nats}jetstream = false\n"), "sink.jetstream"),
        ];
        for (table, key) in cases {
            let error = sink(&table).validate().unwrap_err();
            assert!(
                matches!(&error, SinkConfigError::WeakerDelivery(w) if w.key == key),
                "{table}: {error:?}"
            );
            let text = error.to_string();
            assert!(
                text.contains(key) && text.contains("allow_weaker_delivery = true"),
                "{text}"
            );
            // The flag is a key of the [sink] table itself.
            let allowed = if let Some((head, tail)) = table.split_once("[librdkafka_options]") {
                format!("{head}allow_weaker_delivery = true\n[librdkafka_options]{tail}")
            } else {
                format!("{table}allow_weaker_delivery = true\n")
            };
            let allowed = sink(&allowed);
            allowed.validate().unwrap();
            assert_eq!(allowed.weakenings().len(), 1, "{table}");
        }
    }

    #[test]
    fn the_full_promise_is_not_a_weakening() {
        let kafka = "type = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"t\"\n";
        for options in [
            "acks = \"all\"\n",
            "acks = -1\n",
            "acks = \" ALL \"\n",
            "\"enable.idempotence\" = true\n",
            "\"message.timeout.ms\" = 43200000\n",
        ] {
            let table = sink(&format!("{kafka}[librdkafka_options]\n{options}"));
            table.validate().unwrap();
            assert!(table.weakenings().is_empty(), "{options}");
        }
        let nats = sink("type = \"nats\"\nurl = \"nats://h:4222\"\nsubject = \"s\"\n");
        assert!(nats.weakenings().is_empty());
    }
}
