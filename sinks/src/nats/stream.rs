//! The JetStream stream behind the sink's subject: created at start when configured,
//! otherwise required to exist, and checked by `cfq-bridge check` (existence, and a
//! duplicate window long enough to drop the redeliveries the bridge can cause).

use std::time::Duration;

use async_nats::jetstream::context::{GetStreamByNameErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use tracing::{info, warn};

use super::config::{NatsConfig, StreamStorage};
use super::NatsError;
use crate::CheckContext;

/// How the sink finds the stream that must capture its subject.
#[derive(Debug, Clone)]
pub(crate) enum StreamTarget {
    /// By name (`stream` or `create_stream.name`).
    Named(String),
    /// By the static subject.
    BySubject(String),
    /// The subject is a template and no stream is named: nothing to look up.
    Unknown,
}

impl StreamTarget {
    pub(crate) fn from_config(config: &NatsConfig) -> Self {
        if let Some(create) = &config.create_stream {
            StreamTarget::Named(create.name.clone())
        } else if let Some(name) = &config.stream {
            StreamTarget::Named(name.clone())
        } else if super::config::has_placeholder(&config.subject) {
            StreamTarget::Unknown
        } else {
            StreamTarget::BySubject(config.subject.clone())
        }
    }
}

/// Creates the configured stream when it does not exist yet (an existing stream of that
/// name is left as it is).
pub(crate) async fn create(
    js: &jetstream::Context,
    config: &NatsConfig,
) -> Result<jetstream::stream::Info, NatsError> {
    let Some(create) = &config.create_stream else {
        return Err(NatsError::NoStream("no sink.create_stream table".into()));
    };
    let stream_config = StreamConfig {
        name: create.name.clone(),
        subjects: config.stream_subjects(),
        duplicate_window: Duration::from_secs(create.duplicate_window_secs),
        storage: match create.storage {
            StreamStorage::File => StorageType::File,
            StreamStorage::Memory => StorageType::Memory,
        },
        num_replicas: create.replicas,
        max_age: Duration::from_secs(create.max_age_secs),
        ..Default::default()
    };
    let mut stream =
        js.get_or_create_stream(stream_config)
            .await
            .map_err(|e| NatsError::CreateStream {
                name: create.name.clone(),
                message: e.to_string(),
            })?;
    let info = stream
        .info()
        .await
        .map_err(|e| NatsError::Unavailable(format!("stream {} info: {e}", create.name)))?
        .clone();
    info!(
        stream = %info.config.name,
        subjects = ?info.config.subjects,
        duplicate_window_secs = info.config.duplicate_window.as_secs(),
        "JetStream stream ready (created if it was missing)"
    );
    Ok(info)
}

/// Looks up the stream the sink publishes into. `Ok(None)` when it cannot be known (a
/// templated subject and no stream named).
pub(crate) async fn find(
    js: &jetstream::Context,
    target: &StreamTarget,
    subject: &str,
) -> Result<Option<jetstream::stream::Info>, NatsError> {
    let name = match target {
        StreamTarget::Unknown => return Ok(None),
        StreamTarget::Named(name) => name.clone(),
        StreamTarget::BySubject(subject) => stream_for_subject(js, subject).await?,
    };
    let stream = js.get_stream(&name).await.map_err(|e| match e.kind() {
        GetStreamErrorKind::JetStream(err) if err.error_code() == ErrorCode::STREAM_NOT_FOUND => {
            NatsError::NoStream(format!(
                "JetStream stream {name} does not exist; the stream must exist before the \
                 bridge starts: create it, or configure [sink.create_stream]"
            ))
        }
        _ => NatsError::Unavailable(format!("looking up JetStream stream {name}: {e}")),
    })?;
    let info = stream.cached_info().clone();
    if matches!(target, StreamTarget::Named(_)) && !super::config::has_placeholder(subject) {
        let owner = stream_for_subject(js, subject).await?;
        if owner != name {
            return Err(NatsError::NoStream(format!(
                "subject {subject} is captured by stream {owner}, not by the configured stream {name}"
            )));
        }
    }
    Ok(Some(info))
}

/// The name of the stream capturing `subject`, or a clear error when there is none.
pub(crate) async fn stream_for_subject(
    js: &jetstream::Context,
    subject: &str,
) -> Result<String, NatsError> {
    js.stream_by_subject(subject)
        .await
        .map_err(|e| match e.kind() {
            GetStreamByNameErrorKind::NotFound => NatsError::NoStream(format!(
                "no JetStream stream captures subject {subject}; the stream must exist before the \
             bridge starts: create one (for example `nats stream add --subjects '{subject}'`), \
             or configure [sink.create_stream]"
            )),
            GetStreamByNameErrorKind::InvalidSubject => {
                NatsError::NoStream(format!("subject {subject:?} is not a valid subject"))
            }
            _ => {
                NatsError::Unavailable(format!("looking up the stream for subject {subject}: {e}"))
            }
        })
}

/// Warnings about a stream whose settings do not fit the bridge's.
pub(crate) fn warnings(info: &jetstream::stream::Info, ctx: &CheckContext) -> Vec<String> {
    let mut warnings = Vec::new();
    let window = info.config.duplicate_window;
    let needed = Duration::from_millis(ctx.visibility_timeout_ms)
        + Duration::from_secs(ctx.max_retry_delay_secs);
    if window < needed {
        warnings.push(format!(
            "JetStream stream {} remembers message ids for {} s (duplicate_window), less than \
             the visibility timeout ({} ms) plus the largest retry delay ({} s): a message \
             redelivered after that is stored twice; raise the stream's duplicate window to at \
             least {} s",
            info.config.name,
            window.as_secs_f64(),
            ctx.visibility_timeout_ms,
            ctx.max_retry_delay_secs,
            needed.as_secs_f64().ceil()
        ));
    }
    warnings
}

/// Logs what the sink relies on when it cannot look the stream up by itself.
pub(crate) fn warn_unknown(subject: &str) {
    warn!(
        subject = %subject,
        "subject is a template and no sink.stream is named: every subject it expands to must \
         be captured by an existing JetStream stream; a record whose subject has none fails \
         permanently"
    );
}
