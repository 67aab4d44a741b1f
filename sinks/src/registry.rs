//! The one place sinks are registered, and what a sink's settings must offer to be
//! registered.
//!
//! Every sink lives in a folder of its own with a settings type implementing
//! [`SinkSettings`]. One line in the `register_sinks!` invocation of `lib.rs` adds it to
//! the `[sink]` table: the macro generates the [`crate::SinkConfig`] variant (`type =
//! "name"`), [`crate::SinkConfig::kind`] and the dispatch to the settings. Validation,
//! the delivery-strength gate and building are written once, here, for every sink.
//!
//! The delivery-strength gate: settings that give up part of the at-least-once promise
//! (Kafka `acks` below all replicas, NATS without JetStream, ...) describe it in
//! [`SinkSettings::weakenings`]. Validation refuses them, naming the key, unless the
//! sink's table sets `allow_weaker_delivery = true`; building the sink then logs at warn
//! what is given up. Nothing weakens delivery silently.

use async_trait::async_trait;
use tracing::warn;

use crate::{ErrorClass, Sink, SinkError};

/// One way a sink's settings give up part of the delivery promise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weakening {
    /// The full key that does it, as written in the config (`sink.jetstream`,
    /// `sink.librdkafka_options."acks"`).
    pub key: String,
    /// The value it has, as text.
    pub value: String,
    /// What is given up, in a sentence.
    pub given_up: String,
}

/// Why a `[sink]` table is not acceptable. Always permanent: an operator must change the
/// config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkConfigError {
    /// A value out of range or inconsistent with another; the message names the key.
    #[error("{0}")]
    Invalid(String),
    /// A setting weakens delivery and `allow_weaker_delivery` is not set.
    #[error(
        "{} = {} weakens delivery: {}; set sink.allow_weaker_delivery = true to accept this",
        .0.key, .0.value, .0.given_up
    )]
    WeakerDelivery(Weakening),
}

impl SinkConfigError {
    /// Always [`ErrorClass::Permanent`].
    pub fn class(&self) -> ErrorClass {
        ErrorClass::Permanent
    }
}

impl From<String> for SinkConfigError {
    fn from(message: String) -> Self {
        SinkConfigError::Invalid(message)
    }
}

impl From<SinkConfigError> for SinkError {
    fn from(error: SinkConfigError) -> Self {
        SinkError {
            class: error.class(),
            message: error.to_string(),
        }
    }
}

/// What a sink's settings (the `[sink]` table with its `type`) offer the registry.
///
/// Implemented in every build, with or without the sink's cargo feature, so that a config
/// naming a compiled-out sink still parses and validates; only [`SinkSettings::open`]
/// needs the feature, and without it answers "NAME support not compiled in".
#[async_trait]
pub trait SinkSettings: Send + Sync {
    /// I/O-free checks of ranges and consistency. The error names the key.
    fn validate(&self) -> Result<(), SinkConfigError>;

    /// Everything these settings give up of the at-least-once promise; empty when
    /// nothing is.
    fn weakenings(&self) -> Vec<Weakening> {
        Vec::new()
    }

    /// The table's `allow_weaker_delivery`: true accepts the [`SinkSettings::weakenings`].
    fn allows_weaker_delivery(&self) -> bool {
        false
    }

    /// Creates the sink: opens files, connects to brokers. Called only by [`build`], after
    /// [`check`] accepted the settings.
    async fn open(&self) -> Result<Box<dyn Sink>, SinkError>;
}

/// Validates settings and applies the delivery-strength gate: the first weakening is an
/// error unless `allow_weaker_delivery` is set.
pub fn check(settings: &dyn SinkSettings) -> Result<(), SinkConfigError> {
    settings.validate()?;
    if !settings.allows_weaker_delivery() {
        if let Some(weakening) = settings.weakenings().into_iter().next() {
            return Err(SinkConfigError::WeakerDelivery(weakening));
        }
    }
    Ok(())
}

/// Checks the settings, logs at warn every weakening that was explicitly allowed, then
/// opens the sink. Every way of building a sink goes through here.
pub async fn build(
    kind: &'static str,
    settings: &dyn SinkSettings,
) -> Result<Box<dyn Sink>, SinkError> {
    check(settings)?;
    for weakening in settings.weakenings() {
        warn!(
            sink = kind,
            key = %weakening.key,
            value = %weakening.value,
            given_up = %weakening.given_up,
            "weaker delivery accepted (sink.allow_weaker_delivery = true)"
        );
    }
    settings.open().await
}

/// Registers the sinks: one `"type" => folder::Variant(SettingsType),` line per sink, with a
/// doc comment. Declares the sink's module (`pub mod folder;`, the folder beside `lib.rs`)
/// and generates the `SinkConfig` enum (internally tagged by `type`), its `kind()`,
/// `settings()` and the list of names [`crate::SinkConfig::KINDS`].
macro_rules! register_sinks {
    ($( $(#[$doc:meta])* $name:literal => $module:ident::$variant:ident($settings:ident), )+) => {
        $( pub mod $module; )+

        /// Which sink to use, chosen by `type`, with that sink's settings.
        #[derive(Debug, Clone, serde::Deserialize)]
        #[serde(tag = "type")]
        pub enum SinkConfig {
            $(
                $(#[$doc])*
                #[serde(rename = $name)]
                $variant($module::$settings),
            )+
        }

        impl SinkConfig {
            /// Every registered `type` name, in registration order.
            pub const KINDS: &'static [&'static str] = &[$($name),+];

            /// The sink's `type` name.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(SinkConfig::$variant(_) => $name,)+
                }
            }

            /// The sink's settings, as the registry sees them.
            pub fn settings(&self) -> &dyn $crate::registry::SinkSettings {
                match self {
                    $(SinkConfig::$variant(settings) => settings,)+
                }
            }
        }
    };
}

pub(crate) use register_sinks;

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::{Outcome, Record};

    /// Settings with one weakening, and a sink that refuses everything.
    struct Weak {
        allow: bool,
    }

    struct Refusing;

    #[async_trait]
    impl Sink for Refusing {
        fn kind(&self) -> &'static str {
            "weak"
        }

        async fn deliver(&self, records: &[Record]) -> Vec<Outcome> {
            vec![Outcome::Failed(SinkError::permanent("test sink")); records.len()]
        }
    }

    #[async_trait]
    impl SinkSettings for Weak {
        fn validate(&self) -> Result<(), SinkConfigError> {
            Ok(())
        }

        fn weakenings(&self) -> Vec<Weakening> {
            vec![Weakening {
                key: "sink.mode".into(),
                value: "\"fast\"".into(),
                given_up: "nothing is confirmed".into(),
            }]
        }

        fn allows_weaker_delivery(&self) -> bool {
            self.allow
        }

        async fn open(&self) -> Result<Box<dyn Sink>, SinkError> {
            Ok(Box::new(Refusing))
        }
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs `build` with a subscriber that captures every log line.
    fn build_logged(settings: &Weak) -> (Result<(), SinkError>, String) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let result = tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(build("weak", settings)).map(drop)
        });
        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        (result, logs)
    }

    #[test]
    fn a_weakening_is_refused_naming_its_key_without_the_flag() {
        let (result, logs) = build_logged(&Weak { allow: false });
        let error = result.expect_err("refused");
        assert_eq!(error.class, ErrorClass::Permanent);
        assert_eq!(
            error.message,
            "sink.mode = \"fast\" weakens delivery: nothing is confirmed; set \
             sink.allow_weaker_delivery = true to accept this"
        );
        assert!(logs.is_empty(), "{logs}");
    }

    #[test]
    fn an_allowed_weakening_is_logged_at_warn_when_the_sink_is_built() {
        let (result, logs) = build_logged(&Weak { allow: true });
        result.expect("allowed");
        assert!(logs.contains("WARN"), "{logs}");
        for part in ["sink=\"weak\"", "key=sink.mode", "nothing is confirmed"] {
            assert!(logs.contains(part), "{part} missing in {logs}");
        }
    }
}
