//! From records to publish calls, without any I/O: how each record becomes a message (or
//! why it cannot), how messages are grouped into calls within the API's limits, and the
//! counters the sink keeps. [`plan`] is the same decision as the sink's, for dry runs.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use cfq_cloudflare::{
    PublishMessage, MAX_PUBLISH_BATCH_BYTES, MAX_PUBLISH_BATCH_MESSAGES, MAX_PUBLISH_MESSAGE_BYTES,
};
use serde_json::value::RawValue;

use super::BytesPolicy;
use crate::{ContentType, Record};

/// Why a record is not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// A `bytes` record under `bytes_policy = "refuse"`.
    BytesPolicy,
    /// A `v8` record: opaque Workers data, which the HTTP API cannot publish.
    V8,
    /// The body as it would be published is over 128 KB (128,000 bytes).
    TooLarge,
    /// A `text` body that is not UTF-8, or a `json` body that is not valid JSON.
    InvalidBody,
    /// The API refused the message itself (a 4xx other than authentication or a missing
    /// queue, for a call holding this message alone).
    Refused,
}

impl SkipReason {
    /// Every reason, in a fixed order (for summaries).
    pub const ALL: [SkipReason; 5] = [
        SkipReason::BytesPolicy,
        SkipReason::V8,
        SkipReason::TooLarge,
        SkipReason::InvalidBody,
        SkipReason::Refused,
    ];

    /// A short snake_case name for logs, counters and the `cfq-reject-reason` entry.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::BytesPolicy => "bytes_policy",
            SkipReason::V8 => "v8",
            SkipReason::TooLarge => "too_large",
            SkipReason::InvalidBody => "invalid_body",
            SkipReason::Refused => "refused",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that will not be published: the reason, and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Skip {
    pub(crate) reason: SkipReason,
    pub(crate) detail: String,
}

/// What the sink would do with `record` under `policy`, without sending anything: `Ok`
/// when it would be published, else why not. The replay command's dry run uses it.
///
/// The API may still refuse a message this accepts ([`SkipReason::Refused`]); the limits
/// checked here are those the API documents.
pub fn plan(record: &Record, policy: BytesPolicy) -> Result<(), SkipReason> {
    prepare(record, policy).map(drop).map_err(|skip| skip.reason)
}

/// Turns a record into the message to publish, borrowing its body where it can.
pub(crate) fn prepare(record: &Record, policy: BytesPolicy) -> Result<PublishMessage<'_>, Skip> {
    let skip = |reason, detail: String| Skip { reason, detail };
    let message = match record.content_type {
        ContentType::Text => match std::str::from_utf8(&record.body) {
            Ok(text) => PublishMessage::text(text),
            Err(e) => {
                return Err(skip(
                    SkipReason::InvalidBody,
                    format!("the text body is not UTF-8 ({e})"),
                ))
            }
        },
        ContentType::Json => match serde_json::from_slice::<&RawValue>(&record.body) {
            Ok(json) => PublishMessage::json(json),
            Err(e) => {
                return Err(skip(
                    SkipReason::InvalidBody,
                    format!("the json body is not valid JSON ({e})"),
                ))
            }
        },
        ContentType::Bytes => match policy {
            BytesPolicy::Refuse => {
                return Err(skip(
                    SkipReason::BytesPolicy,
                    "a bytes body cannot be published over HTTP (sink.bytes_policy = \"refuse\"; \
                     \"base64_text\" publishes its base64 as text)"
                        .into(),
                ))
            }
            BytesPolicy::Base64Text => PublishMessage::text(Cow::Owned(
                base64::engine::general_purpose::STANDARD.encode(&record.body),
            )),
        },
        ContentType::V8 => {
            return Err(skip(
                SkipReason::V8,
                "a v8 body is opaque Workers data and cannot be published over HTTP".into(),
            ))
        }
    };
    let size = message.size();
    if size > MAX_PUBLISH_MESSAGE_BYTES {
        return Err(skip(
            SkipReason::TooLarge,
            format!(
                "the message is {size} bytes as published, over the API's limit of \
                 {MAX_PUBLISH_MESSAGE_BYTES} bytes (128 KB)"
            ),
        ));
    }
    Ok(message)
}

/// Groups messages (each tagged with its record's index) into calls of at most
/// `max_messages` (itself at most 100) messages whose sizes add up to at most 256 KB, in
/// order. Every message is within the per-message limit ([`prepare`] checked it), so each
/// fits in a call of its own.
pub(crate) fn split<'a>(
    messages: Vec<(usize, PublishMessage<'a>)>,
    max_messages: usize,
) -> Vec<Vec<(usize, PublishMessage<'a>)>> {
    let max_messages = max_messages.clamp(1, MAX_PUBLISH_BATCH_MESSAGES);
    let mut calls = Vec::new();
    let mut call: Vec<(usize, PublishMessage<'a>)> = Vec::new();
    let mut bytes = 0usize;
    for (index, message) in messages {
        let size = message.size();
        if !call.is_empty() && (call.len() == max_messages || bytes + size > MAX_PUBLISH_BATCH_BYTES)
        {
            calls.push(std::mem::take(&mut call));
            bytes = 0;
        }
        bytes += size;
        call.push((index, message));
    }
    if !call.is_empty() {
        calls.push(call);
    }
    calls
}

/// Counters of one `cloudflare_queue` sink, shared with whoever holds
/// [`super::CloudflareQueue::stats`] (the replay command prints them).
#[derive(Debug, Default)]
pub struct PublishStats {
    published: AtomicU64,
    calls: AtomicU64,
    rate_limited: AtomicU64,
    server_errors: AtomicU64,
    transport_errors: AtomicU64,
    dead_lettered: AtomicU64,
    skipped: [AtomicU64; SkipReason::ALL.len()],
}

/// The counters of a [`PublishStats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishSnapshot {
    /// Messages in calls that answered `success: true`.
    pub published: u64,
    /// Publish calls sent, retries included.
    pub calls: u64,
    /// Calls answered 429 (rate limited).
    pub rate_limited: u64,
    /// Calls answered with a server error (5xx, `success: false`) or an answer that
    /// could not be understood.
    pub server_errors: u64,
    /// Calls that did not complete (connection, timeout).
    pub transport_errors: u64,
    /// Records not published that were written whole to `rejects_path`.
    pub dead_lettered: u64,
    /// Records not published, by reason: `bytes_policy`, `v8`, `too_large`,
    /// `invalid_body`, `refused` (in the order of [`SkipReason::ALL`]). Each delivery
    /// attempt of a record counts.
    pub skipped: [(SkipReason, u64); SkipReason::ALL.len()],
}

impl PublishSnapshot {
    /// Records not published for `reason`.
    pub fn skipped(&self, reason: SkipReason) -> u64 {
        self.skipped
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

impl PublishStats {
    /// The counters now.
    pub fn snapshot(&self) -> PublishSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PublishSnapshot {
            published: get(&self.published),
            calls: get(&self.calls),
            rate_limited: get(&self.rate_limited),
            server_errors: get(&self.server_errors),
            transport_errors: get(&self.transport_errors),
            dead_lettered: get(&self.dead_lettered),
            skipped: SkipReason::ALL.map(|r| (r, get(&self.skipped[r as usize]))),
        }
    }

    pub(crate) fn add_published(&self, n: usize) {
        self.published.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_call(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_server_error(&self) {
        self.server_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_transport_error(&self) {
        self.transport_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_skipped(&self, reason: SkipReason) {
        self.skipped[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;

    fn record(content_type: ContentType, body: &[u8]) -> Record {
        Record {
            id: "m".into(),
            queue_id: Arc::from("q"),
            timestamp_ms: 1,
            attempts: 1,
            content_type,
            metadata: serde_json::Map::new(),
            body: Bytes::copy_from_slice(body),
        }
    }

    #[test]
    fn each_content_type_is_planned_by_policy() {
        let refuse = BytesPolicy::Refuse;
        let base64 = BytesPolicy::Base64Text;
        assert_eq!(plan(&record(ContentType::Text, b"hi"), refuse), Ok(()));
        assert_eq!(plan(&record(ContentType::Json, b" {\"a\":1} "), refuse), Ok(()));
        assert_eq!(
            plan(&record(ContentType::Bytes, &[0, 255]), refuse),
            Err(SkipReason::BytesPolicy)
        );
        assert_eq!(plan(&record(ContentType::Bytes, &[0, 255]), base64), Ok(()));
        for policy in [refuse, base64] {
            assert_eq!(
                plan(&record(ContentType::V8, &[1]), policy),
                Err(SkipReason::V8)
            );
        }
        assert_eq!(
            plan(&record(ContentType::Json, b"{\"a\":"), refuse),
            Err(SkipReason::InvalidBody)
        );
        assert_eq!(
            plan(&record(ContentType::Text, &[0xff]), refuse),
            Err(SkipReason::InvalidBody)
        );
        let bytes = record(ContentType::Bytes, &[0, 255, 10]);
        let message = prepare(&bytes, base64).unwrap();
        assert_eq!(message.size(), 4);
        assert!(matches!(message.body, cfq_cloudflare::PublishBody::Text(ref t) if t == "AP8K"));
    }

    #[test]
    fn the_size_limit_is_on_the_body_as_published() {
        let at = vec![b'x'; MAX_PUBLISH_MESSAGE_BYTES];
        let over = vec![b'x'; MAX_PUBLISH_MESSAGE_BYTES + 1];
        assert_eq!(plan(&record(ContentType::Text, &at), BytesPolicy::Refuse), Ok(()));
        assert_eq!(
            plan(&record(ContentType::Text, &over), BytesPolicy::Refuse),
            Err(SkipReason::TooLarge)
        );
        // 96,001 bytes become 128,004 bytes of base64: too large once encoded.
        let bytes = vec![7u8; 96_001];
        assert_eq!(
            plan(&record(ContentType::Bytes, &bytes), BytesPolicy::Base64Text),
            Err(SkipReason::TooLarge)
        );
        assert_eq!(
            plan(&record(ContentType::Bytes, &bytes[..96_000]), BytesPolicy::Base64Text),
            Ok(())
        );
        // JSON counts its text, surrounding whitespace excluded.
        let mut json = b"  \"".to_vec();
        json.extend(vec![b'y'; MAX_PUBLISH_MESSAGE_BYTES - 2]);
        json.extend_from_slice(b"\"\n");
        assert_eq!(plan(&record(ContentType::Json, &json), BytesPolicy::Refuse), Ok(()));
    }

    #[test]
    fn calls_stay_within_count_and_bytes() {
        let big = "b".repeat(100_000);
        let small = "s".repeat(10);
        let mut messages = Vec::new();
        for i in 0..5 {
            messages.push((i, PublishMessage::text(big.as_str())));
        }
        for i in 5..255 {
            messages.push((i, PublishMessage::text(small.as_str())));
        }
        let calls = split(messages, 100);
        let mut next = 0;
        for call in &calls {
            assert!(call.len() <= 100);
            let bytes: usize = call.iter().map(|(_, m)| m.size()).sum();
            assert!(bytes <= MAX_PUBLISH_BATCH_BYTES, "{bytes}");
            for (index, _) in call {
                assert_eq!(*index, next, "order kept");
                next += 1;
            }
        }
        assert_eq!(next, 255);
        // 2 + 2 + (1 big + 99 small) + 100 + 51.
        let sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 2, 100, 100, 51]);
        // A lower rate makes smaller calls.
        let messages: Vec<_> = (0..25).map(|i| (i, PublishMessage::text("x"))).collect();
        let sizes: Vec<usize> = split(messages, 10).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![10, 10, 5]);
    }
}
