//! The NATS sink (cargo feature `nats`): records published with async-nats.
//!
//! - JetStream mode (default): every record is published with its headers and
//!   `Nats-Msg-Id` = the Cloudflare message id; all publishes of a batch are in flight at
//!   once, and a record is confirmed only when its own `PubAck` arrives. A `PubAck` with
//!   `duplicate: true` (the stream already held that message id within its duplicate
//!   window) becomes [`crate::Outcome::Duplicate`].
//! - Core mode (`jetstream = false`, only with `allow_weaker_delivery = true`): publish,
//!   then flush the connection. Weaker: the server confirms nothing, so a record flushed
//!   just before a failure can be lost.
//!
//! Modules: [`config`] (the settings, parsed in every build), `connect` (options, auth and
//! TLS), `stream` (creating or verifying the stream, duplicate-window checks) and `sink`
//! (publishing, error classes, and the NATS side of the shared round in `crate::round`).
//! The last three need the feature. `doctor` is what `cfq-bridge doctor` checks (the
//! publish timeout against the lease, the stream and its duplicate window).

mod config;
#[cfg(feature = "nats")]
mod connect;
mod doctor;
#[cfg(feature = "nats")]
mod sink;
#[cfg(feature = "nats")]
mod stream;

pub use config::{
    CreateStreamConfig, NatsConfig, NatsTlsConfig, StreamStorage, DEFAULT_CONNECT_TIMEOUT_MS,
    DEFAULT_DUPLICATE_WINDOW_SECS, DEFAULT_MAX_IN_FLIGHT, DEFAULT_PUBLISH_TIMEOUT_MS,
};
#[cfg(feature = "nats")]
pub use sink::NatsSink;

use crate::{ErrorClass, Sink, SinkError};

/// The error message of a build without the `nats` feature.
pub const NOT_COMPILED_IN: &str = "nats support not compiled in; rebuild with `--features nats`";

/// Header naming the error class on a dead-lettered message (`permanent`).
pub const HEADER_ERROR_CLASS: &str = "cfq-error-class";
/// Header carrying why the primary subject refused a dead-lettered message.
pub const HEADER_ERROR_REASON: &str = "cfq-error-reason";
/// Header carrying the subject a dead-lettered message was meant for, when known.
pub const HEADER_ORIGINAL_SUBJECT: &str = "cfq-original-subject";

/// What can go wrong while setting up or checking the NATS sink. Per-record failures are
/// reported as [`crate::Outcome`]s instead.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// A secret or credentials file named by the config could not be read.
    #[error("cannot read sink.{key} file {path}: {source}")]
    ReadFile {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The server list could not be parsed.
    #[error("sink.url {url}: {message}")]
    BadUrl {
        /// The URL, with credentials masked.
        url: String,
        /// What is wrong with it.
        message: String,
    },
    /// Connecting failed.
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect {
        /// The URL, with credentials masked.
        url: String,
        /// The client's error.
        message: String,
        /// Authentication and TLS set-up failures are permanent; the rest (refused,
        /// timed out) are transient.
        class: ErrorClass,
    },
    /// The server is not reachable right now.
    #[error("NATS server unavailable: {0}")]
    Unavailable(String),
    /// No JetStream stream captures the subject, or the named stream does not exist.
    #[error("{0}")]
    NoStream(String),
    /// The stream could not be created.
    #[error("cannot create JetStream stream {name}: {message}")]
    CreateStream {
        /// The stream name.
        name: String,
        /// The server's answer.
        message: String,
    },
}

impl NatsError {
    /// Whether retrying later can help.
    pub fn class(&self) -> ErrorClass {
        match self {
            NatsError::Connect { class, .. } => *class,
            NatsError::Unavailable(_) => ErrorClass::Transient,
            NatsError::ReadFile { .. }
            | NatsError::BadUrl { .. }
            | NatsError::NoStream(_)
            | NatsError::CreateStream { .. } => ErrorClass::Permanent,
        }
    }
}

impl From<NatsError> for SinkError {
    fn from(error: NatsError) -> Self {
        SinkError {
            class: error.class(),
            message: error.to_string(),
        }
    }
}

/// Builds the NATS sink, or explains that this build has none. Goes through
/// [`crate::registry::build`]: the settings are checked (`jetstream = false` needs
/// `allow_weaker_delivery`) and any allowed weakening is logged at warn.
///
/// Connects, then creates the stream (`create_stream`) or verifies that one captures the
/// subject: in JetStream mode the sink refuses to start without its stream.
pub async fn build(config: &NatsConfig) -> Result<Box<dyn Sink>, SinkError> {
    crate::registry::build("nats", config).await
}

/// Connects and prepares the stream (the registry has checked the settings), or explains
/// that this build has none.
async fn open(config: &NatsConfig) -> Result<Box<dyn Sink>, SinkError> {
    #[cfg(not(feature = "nats"))]
    {
        let _ = config;
        Err(SinkError::permanent(NOT_COMPILED_IN))
    }
    #[cfg(feature = "nats")]
    {
        let sink = NatsSink::connect(config).await?;
        sink.prepare_stream().await?;
        Ok(Box::new(sink))
    }
}

#[cfg(test)]
mod tests {
    #[cfg(not(feature = "nats"))]
    #[tokio::test]
    async fn build_without_the_feature_says_how_to_rebuild() {
        let sink: crate::SinkConfig =
            toml::from_str("type = \"nats\"\nurl = \"nats://h:4222\"\nsubject = \"s\"\n")
                .expect("parses in every build");
        sink.validate().expect("validates in every build");
        let error = crate::build(&sink).await.err().expect("build must fail");
        assert_eq!(error.message, super::NOT_COMPILED_IN);
    }
}
