//! Publishing records to NATS and turning the server's answers into [`Outcome`]s.
//!
//! JetStream mode sends every record of a batch first (each send only queues the message
//! on the connection), then awaits the PubAcks, all against one deadline, so a batch costs
//! one round trip plus the server's work, and an outage costs one timeout rather than one
//! per record. A record is [`Outcome::Confirmed`] only when its own PubAck came back.
//!
//! Failure classes:
//! - transient: not connected, send or PubAck timed out, connection lost before the
//!   PubAck, stream storage full. The bridge stops pulling until [`Sink::ready`] succeeds.
//! - permanent: no stream captures the subject (verified with a stream lookup, since
//!   "no responders" can also mean JetStream is still starting), message larger than the
//!   server's `max_payload` or the stream's `max_msg_size`, a subject or header the
//!   protocol cannot carry. These go to `dead_letter_subject` when configured, through the
//!   shared round in `crate::round`: whole (body and every header) or not at all, so a
//!   body above `max_payload` fails permanently rather than being dead-lettered.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::str::FromStr;
use std::time::Duration;

use async_nats::client::PublishErrorKind as CorePublishErrorKind;
use async_nats::connection::State;
use async_nats::header::{HeaderMap, HeaderName, HeaderValue, NATS_MESSAGE_ID};
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, ErrorCode};
use async_nats::Subject;
use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info};

use super::config::{has_placeholder, validate_subject, NatsConfig};
use super::stream::{self, StreamTarget};
use super::{NatsError, HEADER_ERROR_CLASS, HEADER_ERROR_REASON, HEADER_ORIGINAL_SUBJECT};
use crate::round::{self, Publisher, Refusal, Sent};
use crate::{CheckContext, Outcome, Record, Sink, SinkError};

/// The JetStream API subject answering account information, used as a readiness probe.
const JS_API_INFO: &str = "$JS.API.INFO";

/// JetStream error codes that retrying cannot fix. Every other server error is treated as
/// transient (storage full, cluster without leader, ...).
const PERMANENT_CODES: [ErrorCode; 5] = [
    ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM,
    ErrorCode::STREAM_NOT_MATCH,
    ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID,
    ErrorCode::STREAM_WRONG_LAST_SEQUENCE,
    ErrorCode::STREAM_NOT_FOUND,
];

/// The NATS sink. Cheap to share: the client multiplexes every publish over one
/// connection, and `deliver` may run from several tasks at once.
#[derive(Debug)]
pub struct NatsSink {
    /// The connection; it reconnects by itself after an outage.
    client: async_nats::Client,
    /// The JetStream context (JetStream mode only). Its timeout bounds sends, PubAcks and
    /// API requests; its in-flight bound is `max_in_flight`.
    js: Option<jetstream::Context>,
    /// The destination: a ready-made subject, or a template expanded per record.
    subject: SubjectSpec,
    /// Where refused records go, if anywhere.
    dead_letter: Option<Subject>,
    /// The wait for PubAcks (or the flush), per batch.
    publish_timeout: Duration,
    /// How `check` and start-up find the stream.
    target: StreamTarget,
    /// The settings, for start-up and `check` (secrets inside are redacted in `Debug`).
    config: NatsConfig,
}

#[derive(Debug, Clone)]
enum SubjectSpec {
    Static(Subject),
    Template(String),
}

/// Why a record was not stored, before deciding what to do about it.
#[derive(Debug)]
enum Failure {
    /// Retrying later should work.
    Transient(String),
    /// Retrying will not work.
    Permanent(String),
    /// The server had no responder for the subject: either no stream captures it
    /// (permanent) or JetStream is not ready (transient). Resolved by a lookup.
    NoResponders,
}

/// One message ready to publish.
struct Message {
    subject: Subject,
    headers: HeaderMap,
    body: Bytes,
}

impl NatsSink {
    /// Connects to the server(s) and prepares the JetStream context. Does not look at
    /// streams; [`super::build`] also calls [`NatsSink::prepare_stream`].
    pub async fn connect(config: &NatsConfig) -> Result<Self, SinkError> {
        crate::registry::check(config)?;
        let client = super::connect::connect(config).await?;
        let publish_timeout = Duration::from_millis(config.publish_timeout_ms);
        let js = config.jetstream.then(|| {
            jetstream::ContextBuilder::new()
                .timeout(publish_timeout)
                .ack_timeout(publish_timeout)
                .max_ack_inflight(config.max_in_flight)
                .build(client.clone())
        });
        let subject = if has_placeholder(&config.subject) {
            SubjectSpec::Template(config.subject.clone())
        } else {
            SubjectSpec::Static(Subject::from(config.subject.as_str()))
        };
        Ok(NatsSink {
            client,
            js,
            subject,
            dead_letter: config.dead_letter_subject.as_deref().map(Subject::from),
            publish_timeout,
            target: StreamTarget::from_config(config),
            config: config.clone(),
        })
    }

    /// Creates the stream (`create_stream`) or verifies that the subject's stream and the
    /// dead-letter subject's stream exist. Nothing to do in core mode.
    pub async fn prepare_stream(&self) -> Result<(), SinkError> {
        // Core mode: nothing to prepare. Building logged at warn what that mode gives up.
        let Some(js) = &self.js else {
            return Ok(());
        };
        if self.config.create_stream.is_some() {
            stream::create(js, &self.config).await?;
        }
        match stream::find(js, &self.target, &self.config.subject).await? {
            Some(info) => info!(
                stream = %info.config.name,
                subject = %self.config.subject,
                duplicate_window_secs = info.config.duplicate_window.as_secs(),
                "publishing into JetStream stream"
            ),
            None => stream::warn_unknown(&self.config.subject),
        }
        if let Some(dl) = &self.config.dead_letter_subject {
            stream::stream_for_subject(js, dl).await?;
        }
        Ok(())
    }

    /// The subject of a record, validated.
    fn subject_for(&self, record: &Record) -> Result<Subject, String> {
        match &self.subject {
            SubjectSpec::Static(subject) => Ok(subject.clone()),
            SubjectSpec::Template(template) => {
                let subject = record.expand_template(template)?;
                validate_subject(&subject).map_err(|e| format!("expanded subject: {e}"))?;
                Ok(Subject::from(subject))
            }
        }
    }

    fn not_connected(&self) -> Option<String> {
        match self.client.connection_state() {
            State::Connected => None,
            state => Some(format!(
                "not connected to NATS at {} ({state}); the client is reconnecting",
                self.config.redacted_url()
            )),
        }
    }

    /// Sends every message, then awaits every PubAck, against one deadline each.
    async fn publish_jetstream(
        &self,
        js: &jetstream::Context,
        messages: Vec<(usize, Message)>,
    ) -> Vec<(usize, Subject, Result<bool, Failure>)> {
        let mut results = Vec::with_capacity(messages.len());
        let mut pending = Vec::with_capacity(messages.len());
        let send_deadline = Instant::now() + self.publish_timeout;
        let mut stalled: Option<String> = None;
        for (index, message) in messages {
            if let Some(reason) = &stalled {
                results.push((
                    index,
                    message.subject,
                    Err(Failure::Transient(reason.clone())),
                ));
                continue;
            }
            let publish = PublishMessage::build()
                .payload(message.body)
                .headers(message.headers);
            let sent = timeout_at(
                send_deadline,
                js.send_publish(message.subject.clone(), publish),
            )
            .await;
            match sent {
                Ok(Ok(ack)) => pending.push((index, message.subject, ack)),
                Ok(Err(error)) => {
                    let failure = classify_jetstream(&error);
                    if let Failure::Transient(reason) = &failure {
                        stalled = Some(reason.clone());
                    }
                    results.push((index, message.subject, Err(failure)));
                }
                Err(_elapsed) => {
                    let reason = format!(
                        "could not hand the message to the NATS connection within {} ms",
                        self.publish_timeout.as_millis()
                    );
                    stalled = Some(reason.clone());
                    results.push((index, message.subject, Err(Failure::Transient(reason))));
                }
            }
        }
        let ack_deadline = Instant::now() + self.publish_timeout;
        for (index, subject, ack) in pending {
            let result = match timeout_at(ack_deadline, ack.into_future()).await {
                Ok(Ok(ack)) => Ok(ack.duplicate),
                Ok(Err(error)) => Err(classify_jetstream(&error)),
                Err(_elapsed) => Err(Failure::Transient(format!(
                    "no PubAck within {} ms",
                    self.publish_timeout.as_millis()
                ))),
            };
            results.push((index, subject, result));
        }
        results
    }

    /// Publishes every message on the core connection, then flushes once.
    async fn publish_core(
        &self,
        messages: Vec<(usize, Message)>,
    ) -> Vec<(usize, Subject, Result<bool, Failure>)> {
        let mut results = Vec::with_capacity(messages.len());
        let mut sent = Vec::with_capacity(messages.len());
        let deadline = Instant::now() + self.publish_timeout;
        let mut stalled: Option<String> = None;
        for (index, message) in messages {
            if let Some(reason) = &stalled {
                results.push((
                    index,
                    message.subject,
                    Err(Failure::Transient(reason.clone())),
                ));
                continue;
            }
            let publish = self.client.publish_with_headers(
                message.subject.clone(),
                message.headers,
                message.body,
            );
            match timeout_at(deadline, publish).await {
                Ok(Ok(())) => sent.push((index, message.subject)),
                Ok(Err(error)) => {
                    let failure = match error.kind() {
                        CorePublishErrorKind::MaxPayloadExceeded => Failure::Permanent(format!(
                            "message too large for the NATS server: {error}"
                        )),
                        CorePublishErrorKind::InvalidSubject => {
                            Failure::Permanent(error.to_string())
                        }
                        CorePublishErrorKind::Send => {
                            let reason = format!("NATS publish failed: {error}");
                            stalled = Some(reason.clone());
                            Failure::Transient(reason)
                        }
                    };
                    results.push((index, message.subject, Err(failure)));
                }
                Err(_elapsed) => {
                    let reason = format!(
                        "could not hand the message to the NATS connection within {} ms",
                        self.publish_timeout.as_millis()
                    );
                    stalled = Some(reason.clone());
                    results.push((index, message.subject, Err(Failure::Transient(reason))));
                }
            }
        }
        if !sent.is_empty() {
            let flushed = match timeout_at(deadline, self.client.flush()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(format!("NATS flush failed: {error}")),
                Err(_elapsed) => Err(format!(
                    "NATS flush did not finish within {} ms",
                    self.publish_timeout.as_millis()
                )),
            };
            for (index, subject) in sent {
                let result = match &flushed {
                    Ok(()) => Ok(false),
                    Err(reason) => Err(Failure::Transient(reason.clone())),
                };
                results.push((index, subject, result));
            }
        }
        results
    }

    async fn publish(
        &self,
        messages: Vec<(usize, Message)>,
    ) -> Vec<(usize, Subject, Result<bool, Failure>)> {
        match &self.js {
            Some(js) => self.publish_jetstream(js, messages).await,
            None => self.publish_core(messages).await,
        }
    }

    /// Tells a missing stream (permanent) from JetStream not answering (transient).
    async fn explain_no_responders(&self, subject: &str) -> SinkError {
        let Some(js) = &self.js else {
            return SinkError::transient(format!("no responders for subject {subject}"));
        };
        match stream::stream_for_subject(js, subject).await {
            Err(error @ NatsError::NoStream(_)) => SinkError::permanent(error.to_string()),
            Err(error) => SinkError::transient(format!(
                "JetStream did not answer for subject {subject}: {error}"
            )),
            Ok(name) => SinkError::transient(format!(
                "JetStream stream {name} captures subject {subject} but did not answer (no responders)"
            )),
        }
    }
}

#[async_trait]
impl Sink for NatsSink {
    fn kind(&self) -> &'static str {
        "nats"
    }

    async fn deliver(&self, records: &[Record]) -> Vec<Outcome> {
        let mut batch = NatsBatch {
            sink: self,
            no_stream: HashMap::new(),
        };
        round::deliver(&mut batch, records).await
    }

    async fn ready(&self) -> Result<(), SinkError> {
        if let Some(reason) = self.not_connected() {
            return Err(SinkError::transient(reason));
        }
        match &self.js {
            // Any answer from the JetStream API will do; its content is not parsed so that
            // server versions with other account fields do not matter.
            Some(js) => match timeout(
                self.publish_timeout,
                js.client().request(JS_API_INFO, Bytes::new()),
            )
            .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) => Err(NatsError::Unavailable(format!("JetStream: {error}")).into()),
                Err(_elapsed) => Err(NatsError::Unavailable(format!(
                    "JetStream did not answer within {} ms",
                    self.publish_timeout.as_millis()
                ))
                .into()),
            },
            None => match timeout(self.publish_timeout, self.client.flush()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(NatsError::Unavailable(error.to_string()).into()),
                Err(_elapsed) => Err(NatsError::Unavailable("flush timed out".into()).into()),
            },
        }
    }

    async fn check(&self, ctx: &CheckContext) -> Result<Vec<String>, SinkError> {
        self.ready().await?;
        let mut warnings = Vec::new();
        if self.config.publish_timeout_ms >= ctx.visibility_timeout_ms {
            warnings.push(format!(
                "sink.publish_timeout_ms ({} ms) is not shorter than the visibility timeout ({} ms): \
                 a record may be confirmed after its lease expired, and be delivered again",
                self.config.publish_timeout_ms, ctx.visibility_timeout_ms
            ));
        }
        let Some(js) = &self.js else {
            warnings.push(
                "core NATS mode (jetstream = false): the server confirms nothing, so a record \
                 flushed just before a server or network failure is lost; use JetStream for \
                 at-least-once delivery"
                    .into(),
            );
            return Ok(warnings);
        };
        match stream::find(js, &self.target, &self.config.subject).await? {
            Some(info) => warnings.extend(stream::warnings(&info, ctx)),
            None => warnings.push(format!(
                "subject {} is a template and no sink.stream is named: the stream(s) it expands \
                 to cannot be checked; every such subject must be captured by an existing stream",
                self.config.subject
            )),
        }
        if let Some(dl) = &self.config.dead_letter_subject {
            stream::stream_for_subject(js, dl).await?;
        }
        Ok(warnings)
    }

    async fn close(&self) -> Result<(), SinkError> {
        match timeout(self.publish_timeout, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                return Err(NatsError::Unavailable(format!("final flush: {error}")).into())
            }
            Err(_elapsed) => {
                return Err(NatsError::Unavailable("final flush timed out".into()).into())
            }
        }
        if let Err(error) = self.client.drain().await {
            debug!(error = %error, "draining the NATS connection");
        }
        Ok(())
    }
}

/// One batch on its way through the shared round.
struct NatsBatch<'a> {
    sink: &'a NatsSink,
    /// What "no responders" meant per subject, looked up once per batch.
    no_stream: HashMap<String, SinkError>,
}

impl Publisher for NatsBatch<'_> {
    type Message = Message;

    fn kind(&self) -> &'static str {
        "nats"
    }

    fn prepare(&self, record: &Record) -> Result<Message, Refusal> {
        let subject = self.sink.subject_for(record).map_err(|reason| Refusal {
            destination: None,
            reason,
        })?;
        let headers = record_headers(record).map_err(|reason| Refusal {
            destination: Some(subject.to_string()),
            reason,
        })?;
        Ok(Message {
            subject,
            headers,
            body: record.body.clone(),
        })
    }

    fn dead_letter_destination(&self) -> Option<&str> {
        self.sink.dead_letter.as_ref().map(Subject::as_str)
    }

    fn prepare_dead_letter(&self, record: &Record, refusal: &Refusal) -> Result<Message, String> {
        let Some(subject) = &self.sink.dead_letter else {
            return Err("no dead-letter subject is configured".into());
        };
        // The whole record or nothing: a header NATS cannot carry is not dropped, the
        // record is left to Cloudflare instead.
        let mut headers = record_headers(record)?;
        insert_lenient(&mut headers, HEADER_ERROR_CLASS, "permanent");
        insert_lenient(&mut headers, HEADER_ERROR_REASON, &refusal.reason);
        if let Some(original) = &refusal.destination {
            insert_lenient(&mut headers, HEADER_ORIGINAL_SUBJECT, original);
        }
        Ok(Message {
            subject: subject.clone(),
            headers,
            body: record.body.clone(),
        })
    }

    async fn send_all(
        &mut self,
        _records: &[Record],
        messages: Vec<(usize, Message)>,
    ) -> Vec<(usize, Sent)> {
        if let Some(reason) = self.sink.not_connected() {
            return messages
                .into_iter()
                .map(|(index, _)| (index, Sent::Failed(SinkError::transient(reason.clone()))))
                .collect();
        }
        let results = self.sink.publish(messages).await;
        let mut answers = Vec::with_capacity(results.len());
        for (index, subject, result) in results {
            let answer = match result {
                Ok(false) => Sent::Stored,
                Ok(true) => Sent::Duplicate,
                Err(Failure::Transient(reason)) => Sent::Failed(SinkError::transient(reason)),
                Err(Failure::Permanent(reason)) => Sent::Refused(Refusal {
                    destination: Some(subject.to_string()),
                    reason,
                }),
                Err(Failure::NoResponders) => {
                    let error = match self.no_stream.get(subject.as_str()) {
                        Some(error) => error.clone(),
                        None => {
                            let error = self.sink.explain_no_responders(subject.as_str()).await;
                            self.no_stream.insert(subject.to_string(), error.clone());
                            error
                        }
                    };
                    if error.is_transient() {
                        Sent::Failed(error)
                    } else {
                        Sent::Refused(Refusal {
                            destination: Some(subject.to_string()),
                            reason: error.message,
                        })
                    }
                }
            };
            answers.push((index, answer));
        }
        answers
    }
}

/// The headers of a record: metadata entries, the `cf-queue-*` fields and `Nats-Msg-Id`.
///
/// Refuses what NATS cannot carry (a name with `:`, spaces or non-ASCII, a value with a
/// line break) and metadata names starting with `Nats-`, which the server would read as
/// instructions (expected sequence, rollup, TTL). Nothing is dropped: a record travels
/// with all its headers, to its subject or to the dead-letter subject, or not at all.
fn record_headers(record: &Record) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (name, value) in record.headers() {
        let reserved = name
            .get(..5)
            .is_some_and(|p| p.eq_ignore_ascii_case("nats-"));
        if reserved {
            return Err(format!(
                "metadata entry {name:?} starts with \"Nats-\", which the NATS server reads as a control header"
            ));
        }
        let name_ok = HeaderName::from_str(name)
            .map_err(|_| format!("metadata name {name:?} cannot be a NATS header name"))?;
        let value_ok = HeaderValue::from_str(&value).map_err(|_| {
            format!("metadata entry {name:?} has a line break, which a NATS header cannot carry")
        })?;
        headers.insert(name_ok, value_ok);
    }
    let id = HeaderValue::from_str(&record.id)
        .map_err(|_| format!("message id {:?} cannot be a NATS header", record.id))?;
    headers.insert(NATS_MESSAGE_ID, id);
    Ok(headers)
}

/// Inserts a header whose value is made safe: line breaks become spaces.
fn insert_lenient(headers: &mut HeaderMap, name: &'static str, value: &str) {
    let clean = value.replace(['\r', '\n'], " ");
    if let Ok(value) = HeaderValue::from_str(&clean) {
        headers.insert(name, value);
    }
}

/// Sorts a JetStream publish error into the sink's classes.
fn classify_jetstream(error: &PublishError) -> Failure {
    match error.kind() {
        PublishErrorKind::StreamNotFound => Failure::NoResponders,
        PublishErrorKind::MaxPayloadExceeded => {
            Failure::Permanent(format!("message too large for the NATS server: {error}"))
        }
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
            Failure::Permanent(error.to_string())
        }
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending => {
            Failure::Transient(format!("JetStream publish: {error}"))
        }
        PublishErrorKind::Other => {
            let code = std::error::Error::source(error)
                .and_then(|source| source.downcast_ref::<jetstream::Error>())
                .map(|e| e.error_code());
            match code {
                Some(code) if PERMANENT_CODES.contains(&code) => {
                    Failure::Permanent(format!("JetStream refused the message: {error}"))
                }
                _ => Failure::Transient(format!("JetStream publish: {error}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{Map, Value};

    use super::*;
    use crate::ContentType;

    fn record(metadata: &[(&str, Value)]) -> Record {
        let mut map = Map::new();
        for (k, v) in metadata {
            map.insert((*k).to_string(), v.clone());
        }
        Record {
            id: "abc123".into(),
            queue_id: Arc::from("q1"),
            timestamp_ms: 5,
            attempts: 1,
            content_type: ContentType::Text,
            metadata: map,
            body: Bytes::from_static(b"hi"),
        }
    }

    #[test]
    fn headers_carry_metadata_bridge_fields_and_message_id() {
        let h = record_headers(&record(&[
            ("CF-Content-Type", "text".into()),
            ("n", 7.into()),
        ]))
        .unwrap();
        assert_eq!(h.get("CF-Content-Type").unwrap().as_str(), "text");
        assert_eq!(h.get("n").unwrap().as_str(), "7");
        assert_eq!(h.get("cf-queue-message-id").unwrap().as_str(), "abc123");
        assert_eq!(h.get("cf-queue-attempts").unwrap().as_str(), "1");
        assert_eq!(h.get("cf-queue-id").unwrap().as_str(), "q1");
        assert_eq!(h.get("cf-queue-timestamp-ms").unwrap().as_str(), "5");
        assert_eq!(h.get(NATS_MESSAGE_ID).unwrap().as_str(), "abc123");
    }

    #[test]
    fn headers_nats_cannot_carry_are_refused_never_dropped() {
        for bad in [
            record(&[("Nats-Rollup", "all".into())]),
            record(&[("has space", "x".into())]),
            record(&[("k", "line\nbreak".into())]),
        ] {
            assert!(record_headers(&bad).is_err());
        }
    }

    #[test]
    fn lenient_insert_removes_line_breaks() {
        let mut h = HeaderMap::new();
        insert_lenient(&mut h, HEADER_ERROR_REASON, "a\r\nb");
        assert_eq!(h.get(HEADER_ERROR_REASON).unwrap().as_str(), "a  b");
    }
}
