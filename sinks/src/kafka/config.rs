//! Settings of the Kafka sink (the `[sink]` table with `type = "kafka"`).
//!
//! They parse and validate in every build, with or without the `kafka` feature, so that a
//! config naming Kafka fails in a build without it with a message saying how to rebuild,
//! rather than with a parse error.

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::registry::{SinkConfigError, SinkSettings, Weakening};
use crate::{Sink, SinkError};

/// Default of [`KafkaConfig::message_timeout_ms`]: librdkafka's `message.timeout.ms`. A third
/// of Cloudflare's default visibility timeout (30 s), so a record that cannot be delivered
/// fails while its lease still has time left to be released.
pub const DEFAULT_MESSAGE_TIMEOUT_MS: u64 = 10_000;

/// Default of [`KafkaConfig::metadata_timeout_ms`].
pub const DEFAULT_METADATA_TIMEOUT_MS: u64 = 5_000;

/// The `[sink]` table for `type = "kafka"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma separated (`host:port,host:port`). Becomes librdkafka's
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Destination topic: a plain name, or a template using `{queue_id}` and
    /// `{metadata.NAME}` (a record lacking the named metadata entry fails permanently).
    pub topic: String,
    /// What becomes the Kafka message key: `"message_id"` (the default: the Cloudflare
    /// message id, so redeliveries land on the same partition), `"none"` (no key), or
    /// `"metadata:NAME"` (that metadata entry as text; no key when the entry is missing).
    #[serde(default)]
    pub key: KeySource,
    /// Where records that the brokers refuse for good (too large, topic missing or not
    /// authorized) are produced instead, whole (key, headers, timestamp, body), with the
    /// extra headers `cf-dead-letter-error` and `cf-dead-letter-topic`. A plain topic name.
    /// A record this topic refuses too, and every refused record without this setting, is
    /// left to Cloudflare's retries and dead-letter queue.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Compression codec of produced batches (librdkafka's `compression.type`). Default:
    /// librdkafka's own (`none`). Can also be given as `compression.type` in
    /// `librdkafka_options`, but not both.
    #[serde(default)]
    pub compression: Option<Compression>,
    /// How long, in milliseconds, librdkafka may try to deliver a record before reporting
    /// it failed (`message.timeout.ms`). Keep it well under the visibility timeout: a
    /// record confirmed after its lease ended may be delivered twice. Default 10,000.
    /// Can also be given as `message.timeout.ms` in `librdkafka_options`, but not both.
    #[serde(default)]
    pub message_timeout_ms: Option<u64>,
    /// How long, in milliseconds, a metadata request may take in `check` and in the
    /// readiness probe used to resume after an outage. Default 5,000.
    #[serde(default = "default_metadata_timeout_ms")]
    pub metadata_timeout_ms: u64,
    /// Raw librdkafka options, passed through unchanged after the sink's defaults
    /// (`acks=all`, `enable.idempotence=true`, `partitioner=murmur2_random`, ...), so they
    /// can override them. TLS and SASL are configured here. Values may be TOML strings,
    /// integers, floats or booleans. Values of options whose name contains `password`,
    /// `secret`, `key`, `token` or `oauthbearer.config` are kept secret: never logged and
    /// redacted in `Debug` output.
    #[serde(default)]
    pub librdkafka_options: LibrdkafkaOptions,
    /// Accept settings that weaken delivery: `acks` other than `all`/`-1`,
    /// `enable.idempotence = false`, or a message timeout above 12 hours (see
    /// [`KafkaConfig::weakenings`]). Without it such settings are refused at load, naming
    /// the key; with it the bridge starts and logs at warn what is given up. Default false.
    #[serde(default)]
    pub allow_weaker_delivery: bool,
}

/// The longest lease Cloudflare grants (its maximum visibility timeout, 12 hours), in
/// milliseconds. A message timeout above it outlives every possible lease.
pub const MAX_LEASE_MS: u64 = 43_200_000;

fn default_metadata_timeout_ms() -> u64 {
    DEFAULT_METADATA_TIMEOUT_MS
}

/// What the Kafka message key is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum KeySource {
    /// The Cloudflare message id (`key = "message_id"`).
    #[default]
    MessageId,
    /// No key (`key = "none"`): librdkafka spreads records over partitions.
    None,
    /// The text of one metadata entry (`key = "metadata:NAME"`).
    Metadata(String),
}

impl TryFrom<String> for KeySource {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.as_str() {
            "message_id" => Ok(KeySource::MessageId),
            "none" => Ok(KeySource::None),
            other => match other.strip_prefix("metadata:") {
                Some(name) if !name.is_empty() => Ok(KeySource::Metadata(name.to_owned())),
                _ => Err(format!(
                    "sink.key must be \"message_id\", \"none\" or \"metadata:NAME\", not {value:?}"
                )),
            },
        }
    }
}

/// A compression codec librdkafka supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// No compression.
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// The value of librdkafka's `compression.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// The value of one raw librdkafka option; sensitive ones are held as secrets.
#[derive(Clone)]
enum OptionValue {
    Plain(String),
    Secret(SecretString),
}

impl OptionValue {
    fn expose(&self) -> &str {
        match self {
            OptionValue::Plain(value) => value,
            OptionValue::Secret(value) => value.expose_secret(),
        }
    }
}

/// Raw librdkafka options (`[sink.librdkafka_options]`), name to value.
///
/// `Debug` prints the names and the values of ordinary options; values of sensitive options
/// (see [`LibrdkafkaOptions::is_sensitive`]) print as `[REDACTED]`.
#[derive(Clone, Default)]
pub struct LibrdkafkaOptions {
    entries: BTreeMap<String, OptionValue>,
}

impl LibrdkafkaOptions {
    /// True for option names whose values must stay secret: those containing `password`,
    /// `secret`, `key` (`ssl.key.pem`, `ssl.key.password`, ...), `token` or
    /// `oauthbearer.config` (case-insensitive).
    pub fn is_sensitive(name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        ["password", "secret", "key", "token", "oauthbearer.config"]
            .iter()
            .any(|word| name.contains(word))
    }

    /// Sets an option; sensitive values are stored as secrets.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        let value = if Self::is_sensitive(&name) {
            OptionValue::Secret(SecretString::from(value))
        } else {
            OptionValue::Plain(value)
        };
        self.entries.insert(name, value);
    }

    /// The value of an option, if set. Exposes secrets: do not log the result.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries.get(name).map(OptionValue::expose)
    }

    /// True when the option is set.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Every option as `(name, value)`, secrets exposed: for handing to librdkafka only.
    pub fn iter_exposed(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .map(|(name, value)| (name.as_str(), value.expose()))
    }

    /// The number of options set.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no option is set.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Debug for LibrdkafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, value) in &self.entries {
            match value {
                OptionValue::Plain(value) => map.entry(name, value),
                OptionValue::Secret(_) => map.entry(name, &format_args!("[REDACTED]")),
            };
        }
        map.finish()
    }
}

impl<'de> Deserialize<'de> for LibrdkafkaOptions {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// TOML scalars accepted as option values; librdkafka takes them all as text.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            Text(String),
            Bool(bool),
            Int(i64),
            Float(f64),
        }
        let raw = BTreeMap::<String, Scalar>::deserialize(deserializer)?;
        let mut options = LibrdkafkaOptions::default();
        for (name, value) in raw {
            let text = match value {
                Scalar::Text(text) => text,
                Scalar::Bool(flag) => flag.to_string(),
                Scalar::Int(number) => number.to_string(),
                Scalar::Float(number) => number.to_string(),
            };
            options.insert(name, text);
        }
        Ok(options)
    }
}

/// Options the sink sets from its own keys; giving both is ambiguous.
const OWN_KEYS: &[(&str, &[&str])] = &[
    ("brokers", &["bootstrap.servers", "metadata.broker.list"]),
    ("compression", &["compression.type", "compression.codec"]),
    (
        "message_timeout_ms",
        &["message.timeout.ms", "delivery.timeout.ms"],
    ),
];

impl KafkaConfig {
    /// I/O-free checks; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.brokers.trim().is_empty() {
            return Err("sink.brokers must not be empty".into());
        }
        if self.topic.trim().is_empty() {
            return Err("sink.topic must not be empty".into());
        }
        check_template(&self.topic).map_err(|e| format!("sink.topic: {e}"))?;
        if let Some(dead) = &self.dead_letter_topic {
            if dead.trim().is_empty() {
                return Err("sink.dead_letter_topic must not be empty when set".into());
            }
            if dead.contains('{') || dead.contains('}') {
                return Err("sink.dead_letter_topic must be a plain topic name".into());
            }
            if *dead == self.topic {
                return Err("sink.dead_letter_topic must differ from sink.topic".into());
            }
        }
        if self.message_timeout_ms == Some(0) {
            return Err("sink.message_timeout_ms must be greater than 0".into());
        }
        if self.metadata_timeout_ms == 0 {
            return Err("sink.metadata_timeout_ms must be greater than 0".into());
        }
        let set_by_key = [
            true,
            self.compression.is_some(),
            self.message_timeout_ms.is_some(),
        ];
        for ((key, names), set) in OWN_KEYS.iter().zip(set_by_key) {
            if let Some(name) = names.iter().find(|n| self.librdkafka_options.contains(n)) {
                if set {
                    return Err(format!(
                        "sink.librdkafka_options.\"{name}\" conflicts with sink.{key}; set only sink.{key}"
                    ));
                }
            }
        }
        for name in ["message.timeout.ms", "delivery.timeout.ms"] {
            if let Some(value) = self.librdkafka_options.get(name) {
                match value.trim().parse::<u64>() {
                    Ok(ms) if ms > 0 => {}
                    _ => {
                        return Err(format!(
                            "sink.librdkafka_options.\"{name}\" must be a positive number of milliseconds, not {value:?}"
                        ))
                    }
                }
            }
        }
        if self
            .librdkafka_options
            .get("delivery.report.only.error")
            .is_some_and(|v| v.trim() == "true")
        {
            return Err(
                "sink.librdkafka_options.\"delivery.report.only.error\" = true would hide the delivery reports the sink confirms records with".into(),
            );
        }
        Ok(())
    }

    /// The effective `message.timeout.ms`, in milliseconds: `message_timeout_ms`, or the
    /// raw option, or the default.
    pub fn effective_message_timeout_ms(&self) -> u64 {
        if let Some(ms) = self.message_timeout_ms {
            return ms;
        }
        ["message.timeout.ms", "delivery.timeout.ms"]
            .iter()
            .filter_map(|name| self.librdkafka_options.get(name))
            .find_map(|value| value.trim().parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_TIMEOUT_MS)
    }

    /// What these settings give up of the at-least-once promise. Weakening:
    /// - `acks` (or `request.required.acks`) other than `all` / `-1`: a record is confirmed
    ///   before every in-sync replica has it, so losing one broker can lose confirmed
    ///   records;
    /// - `enable.idempotence = false`: librdkafka's own retries may then write a record
    ///   twice and reorder records within a partition, and `acks=all` is no longer enforced
    ///   together with it;
    /// - a message timeout (`message_timeout_ms`, `message.timeout.ms`,
    ///   `delivery.timeout.ms`) above [`MAX_LEASE_MS`]: the delivery report can come after
    ///   any lease has ended, so the record is always delivered again and the in-flight
    ///   bound no longer bounds anything. Timeouts above half the configured visibility
    ///   timeout only risk duplicates; `cfq-bridge check` warns about those, since the
    ///   visibility timeout is not part of the `[sink]` table. `0` (no timeout at all) is
    ///   refused outright by [`KafkaConfig::validate`].
    pub fn weakenings(&self) -> Vec<Weakening> {
        let mut found = Vec::new();
        let options = &self.librdkafka_options;
        for name in ["acks", "request.required.acks"] {
            if let Some(value) = options.get(name) {
                if !matches!(value.trim().to_ascii_lowercase().as_str(), "all" | "-1") {
                    found.push(Weakening {
                        key: format!("sink.librdkafka_options.\"{name}\""),
                        value: format!("{value:?}"),
                        given_up: "a record is confirmed before every in-sync replica has it, so \
                                   losing one broker can lose confirmed records"
                            .into(),
                    });
                }
            }
        }
        if let Some(value) = options.get("enable.idempotence") {
            if !value.trim().eq_ignore_ascii_case("true") {
                found.push(Weakening {
                    key: "sink.librdkafka_options.\"enable.idempotence\"".into(),
                    value: format!("{value:?}"),
                    given_up: "librdkafka's own retries may write a record twice and reorder \
                               records within a partition"
                        .into(),
                });
            }
        }
        let timeout = match self.message_timeout_ms {
            Some(ms) => Some(("sink.message_timeout_ms".to_owned(), ms)),
            None => ["message.timeout.ms", "delivery.timeout.ms"]
                .iter()
                .find_map(|name| {
                    let ms = options.get(name)?.trim().parse::<u64>().ok()?;
                    Some((format!("sink.librdkafka_options.\"{name}\""), ms))
                }),
        };
        if let Some((key, ms)) = timeout.filter(|(_, ms)| *ms > MAX_LEASE_MS) {
            found.push(Weakening {
                key,
                value: ms.to_string(),
                given_up: format!(
                    "a delivery report may come after any lease has ended (Cloudflare's longest \
                     is {MAX_LEASE_MS} ms), so such a record is always delivered again and the \
                     in-flight bound no longer holds"
                ),
            });
        }
        found
    }

    /// True when the topic is a template that depends on the record.
    pub fn topic_is_template(&self) -> bool {
        self.topic.contains('{')
    }
}

#[async_trait]
impl SinkSettings for KafkaConfig {
    fn validate(&self) -> Result<(), SinkConfigError> {
        KafkaConfig::validate(self).map_err(SinkConfigError::Invalid)
    }

    fn weakenings(&self) -> Vec<Weakening> {
        KafkaConfig::weakenings(self)
    }

    fn allows_weaker_delivery(&self) -> bool {
        self.allow_weaker_delivery
    }

    async fn open(&self) -> Result<Box<dyn Sink>, SinkError> {
        super::open(self)
    }
}

/// Checks a destination template: every `{...}` is `{queue_id}` or `{metadata.NAME}`.
fn check_template(template: &str) -> Result<(), String> {
    if crate::record::template_literal(template, "")?.contains('}') {
        return Err(format!("unmatched '}}' in {template:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<KafkaConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    const BASE: &str = "brokers = \"127.0.0.1:9092\"\ntopic = \"cf.{queue_id}\"\n";

    #[test]
    fn defaults_follow_the_contract() {
        let cfg = parse(BASE).unwrap();
        assert_eq!(cfg.key, KeySource::MessageId);
        assert_eq!(cfg.dead_letter_topic, None);
        assert_eq!(
            cfg.effective_message_timeout_ms(),
            DEFAULT_MESSAGE_TIMEOUT_MS
        );
        assert!(cfg.topic_is_template());
        cfg.validate().unwrap();
    }

    #[test]
    fn key_forms_parse_and_bad_ones_name_the_key() {
        let key = |k: &str| parse(&format!("{BASE}key = \"{k}\"\n")).map(|c| c.key);
        assert_eq!(key("none").unwrap(), KeySource::None);
        assert_eq!(
            key("metadata:tenant").unwrap(),
            KeySource::Metadata("tenant".into())
        );
        let err = key("metadata:").unwrap_err();
        assert!(err.contains("sink.key must be"), "{err}");
        assert!(key("id").is_err());
    }

    #[test]
    fn option_values_accept_scalars_and_hide_secrets_in_debug() {
        let cfg = parse(&format!(
            "{BASE}[librdkafka_options]\n\"linger.ms\" = 5\n\"enable.idempotence\" = true\n\
             \"security.protocol\" = \"SASL_SSL\"\n\"sasl.password\" = \"hunter2-pw\"\n\
             \"ssl.key.password\" = \"k3y-pw\"\n\"sasl.oauthbearer.client.secret\" = \"s3cret\"\n"
        ))
        .unwrap();
        let opts = &cfg.librdkafka_options;
        assert_eq!(opts.get("linger.ms"), Some("5"));
        assert_eq!(opts.get("enable.idempotence"), Some("true"));
        assert_eq!(opts.get("sasl.password"), Some("hunter2-pw"));
        let debug = format!("{cfg:?}");
        for secret in ["hunter2-pw", "k3y-pw", "s3cret"] {
            assert!(!debug.contains(secret), "{secret} leaked in {debug}");
        }
        assert!(debug.contains("SASL_SSL"), "{debug}");
        assert!(debug.contains("sasl.password"), "{debug}");
        assert!(debug.contains("[REDACTED]"), "{debug}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = parse(&format!("{BASE}topik = \"x\"\n")).unwrap_err();
        assert!(err.contains("topik"), "{err}");
    }

    #[test]
    fn validation_names_the_bad_entry() {
        let check = |extra: &str| parse(&format!("{BASE}{extra}")).unwrap().validate();
        let err =
            check("compression = \"zstd\"\n[librdkafka_options]\n\"compression.type\" = \"lz4\"\n")
                .unwrap_err();
        assert!(
            err.contains("compression.type") && err.contains("sink.compression"),
            "{err}"
        );
        let err =
            check("message_timeout_ms = 5000\n[librdkafka_options]\n\"message.timeout.ms\" = 1\n")
                .unwrap_err();
        assert!(err.contains("message_timeout_ms"), "{err}");
        let err = check("[librdkafka_options]\n\"bootstrap.servers\" = \"x:1\"\n").unwrap_err();
        assert!(err.contains("sink.brokers"), "{err}");
        let err = check("[librdkafka_options]\n\"message.timeout.ms\" = \"soon\"\n").unwrap_err();
        assert!(err.contains("positive number"), "{err}");
        let err =
            check("[librdkafka_options]\n\"delivery.report.only.error\" = true\n").unwrap_err();
        assert!(err.contains("delivery reports"), "{err}");
        let err = check("dead_letter_topic = \"dead.{queue_id}\"\n").unwrap_err();
        assert!(err.contains("sink.dead_letter_topic"), "{err}");
        let err = check("message_timeout_ms = 0\n").unwrap_err();
        assert!(err.contains("sink.message_timeout_ms"), "{err}");

        let bad_topic = |topic: &str| {
            let cfg: KafkaConfig =
                toml::from_str(&format!("brokers = \"b:1\"\ntopic = \"{topic}\"\n")).unwrap();
            cfg.validate()
        };
        assert!(bad_topic("cf.{queue}")
            .unwrap_err()
            .contains("unknown placeholder"));
        assert!(bad_topic("cf.{queue_id").unwrap_err().contains("unclosed"));
        assert!(bad_topic("cf.}").unwrap_err().contains("unmatched"));
        assert!(bad_topic("").unwrap_err().contains("sink.topic"));
        bad_topic("cf.{metadata.tenant}.{queue_id}").unwrap();
    }

    #[test]
    fn raw_timeout_is_the_effective_one_when_the_key_is_absent() {
        let cfg = parse(&format!(
            "{BASE}[librdkafka_options]\n\"message.timeout.ms\" = 2500\n"
        ))
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.effective_message_timeout_ms(), 2500);
    }

    #[test]
    fn the_example_config_parses_as_a_sink_table() {
        let example: toml::Table =
            toml::from_str(include_str!("../../../config/kafka.toml")).unwrap();
        let sink: crate::SinkConfig = example["sink"].clone().try_into().unwrap();
        let crate::SinkConfig::Kafka(cfg) = &sink else {
            panic!("config/kafka.toml is not a kafka sink: {sink:?}");
        };
        sink.validate().unwrap();
        assert_eq!(cfg.topic, "cf.{queue_id}");
        assert_eq!(cfg.librdkafka_options.get("compression.type"), Some("zstd"));
    }

    #[test]
    fn sensitive_names() {
        for name in [
            "sasl.password",
            "ssl.key.password",
            "ssl.key.pem",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "SASL.PASSWORD",
        ] {
            assert!(LibrdkafkaOptions::is_sensitive(name), "{name}");
        }
        for name in ["sasl.username", "security.protocol", "linger.ms", "acks"] {
            assert!(!LibrdkafkaOptions::is_sensitive(name), "{name}");
        }
    }
}
