//! The one builder of sink records for tests and benches: `record(id)` gives a text
//! record with plain defaults, and a few setters change what a test cares about.
//!
//! The benches include this file by path (`benches/support/mod.rs`), so it depends on
//! `cfq-sinks` and `serde_json` only.

#![allow(dead_code)]

use std::sync::Arc;

use bytes::Bytes;
use cfq_sinks::{ContentType, Record};
use serde_json::{Map, Value};

/// The metadata key Cloudflare uses for the body's encoding.
const CONTENT_TYPE_KEY: &str = "CF-Content-Type";

/// A record under construction; [`RecordBuilder::build`] finishes it.
#[derive(Debug, Clone)]
pub struct RecordBuilder {
    record: Record,
}

/// Starts a record with id `id`: queue `q`, timestamp 1 ms, attempt 1, content type
/// `text` (also as the first metadata entry, `CF-Content-Type`) and an empty body.
pub fn record(id: impl Into<String>) -> RecordBuilder {
    let mut metadata = Map::new();
    metadata.insert(CONTENT_TYPE_KEY.into(), ContentType::Text.as_str().into());
    RecordBuilder {
        record: Record {
            id: id.into(),
            queue_id: Arc::from("q"),
            timestamp_ms: 1,
            attempts: 1,
            content_type: ContentType::Text,
            metadata,
            body: Bytes::new(),
        },
    }
}

impl RecordBuilder {
    /// The queue the record came from.
    pub fn queue(mut self, queue: impl Into<Arc<str>>) -> Self {
        self.record.queue_id = queue.into();
        self
    }

    /// The publish time, in milliseconds since the Unix epoch.
    pub fn timestamp_ms(mut self, timestamp_ms: u64) -> Self {
        self.record.timestamp_ms = timestamp_ms;
        self
    }

    /// The delivery attempt (1 on first delivery).
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.record.attempts = attempts;
        self
    }

    /// The body and its content type; `CF-Content-Type` follows, in its first place.
    pub fn body(mut self, content_type: ContentType, body: impl Into<Bytes>) -> Self {
        self.record.content_type = content_type;
        self.record
            .metadata
            .insert(CONTENT_TYPE_KEY.into(), content_type.as_str().into());
        self.record.body = body.into();
        self
    }

    /// A `text` body.
    pub fn text(self, body: impl Into<String>) -> Self {
        self.body(ContentType::Text, body.into())
    }

    /// A `json` body (the value's JSON text).
    pub fn json(self, body: &Value) -> Self {
        self.body(ContentType::Json, body.to_string())
    }

    /// Adds (or replaces) a metadata entry, after the ones set before.
    pub fn meta(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.record.metadata.insert(name.into(), value.into());
        self
    }

    /// The finished record.
    pub fn build(self) -> Record {
        self.record
    }
}
