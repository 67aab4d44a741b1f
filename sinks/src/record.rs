//! The record a sink receives: one Cloudflare Queues message, its body decoded.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Header carrying the Cloudflare message id (stable across redeliveries).
pub const HEADER_MESSAGE_ID: &str = "cf-queue-message-id";
/// Header carrying the publish time, milliseconds since the Unix epoch.
pub const HEADER_TIMESTAMP_MS: &str = "cf-queue-timestamp-ms";
/// Header carrying the delivery attempt number (1 on first delivery).
pub const HEADER_ATTEMPTS: &str = "cf-queue-attempts";
/// Header carrying the queue id the message was pulled from.
pub const HEADER_QUEUE_ID: &str = "cf-queue-id";

/// The `CF-Content-Type` of a message, which decides how its body was encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentType {
    /// UTF-8 text, sent as is.
    Text,
    /// JSON text (base64 on the wire, decoded by the bridge).
    Json,
    /// Raw bytes (base64 on the wire, decoded by the bridge).
    Bytes,
    /// Workers structured-clone data. Opaque: no pull consumer can decode it. A record with
    /// this type only reaches a sink when the operator chose to forward v8 bodies raw.
    V8,
}

impl ContentType {
    /// The name Cloudflare uses in `CF-Content-Type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Text => "text",
            ContentType::Json => "json",
            ContentType::Bytes => "bytes",
            ContentType::V8 => "v8",
        }
    }

    /// Parses a `CF-Content-Type` value. Unknown names give `None`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "text" => Some(ContentType::Text),
            "json" => Some(ContentType::Json),
            "bytes" => Some(ContentType::Bytes),
            "v8" => Some(ContentType::V8),
            _ => None,
        }
    }
}

impl fmt::Display for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks a destination template without a record (the grammar
/// [`Record::expand_template`] expands): every `{` is closed and each placeholder is
/// `{queue_id}` or `{metadata.NAME}`. Returns the template's literal text, each
/// placeholder replaced by `stand_in`, for the caller's own checks (a stray `}`, the
/// characters its destination allows).
pub fn template_literal(template: &str, stand_in: &str) -> Result<String, String> {
    let mut literal = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        literal.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else {
            return Err(format!("unclosed '{{' in {template:?}"));
        };
        let name = &after[..end];
        let known = name == "queue_id"
            || name
                .strip_prefix("metadata.")
                .is_some_and(|key| !key.is_empty());
        if !known {
            return Err(format!(
                "unknown placeholder {{{name}}} in {template:?} (use {{queue_id}} or {{metadata.NAME}})"
            ));
        }
        literal.push_str(stand_in);
        rest = &after[end + 1..];
    }
    literal.push_str(rest);
    Ok(literal)
}

/// One message, ready for a sink.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The Cloudflare message id. Redeliveries of one message share it, so downstream
    /// consumers deduplicate on it.
    pub id: String,
    /// The queue the message came from.
    pub queue_id: Arc<str>,
    /// When the message was published, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The delivery attempt (1 on first delivery).
    pub attempts: u32,
    /// How the body was encoded on the wire.
    pub content_type: ContentType,
    /// The message metadata exactly as Cloudflare sent it (including `CF-Content-Type`).
    pub metadata: Map<String, Value>,
    /// The decoded body: UTF-8 text for `text`, JSON text for `json` (already validated),
    /// raw bytes for `bytes`, and the opaque payload for `v8`.
    pub body: Bytes,
}

impl Record {
    /// The headers every sink attaches: each metadata entry (strings as given, other values
    /// as JSON text), then `cf-queue-message-id`, `cf-queue-timestamp-ms`,
    /// `cf-queue-attempts` and `cf-queue-id`.
    pub fn headers(&self) -> Vec<(&str, Cow<'_, str>)> {
        let mut headers = Vec::with_capacity(self.metadata.len() + 4);
        for (key, value) in &self.metadata {
            let value = match value {
                Value::String(s) => Cow::Borrowed(s.as_str()),
                other => Cow::Owned(other.to_string()),
            };
            headers.push((key.as_str(), value));
        }
        headers.push((HEADER_MESSAGE_ID, Cow::Borrowed(self.id.as_str())));
        headers.push((
            HEADER_TIMESTAMP_MS,
            Cow::Owned(self.timestamp_ms.to_string()),
        ));
        headers.push((HEADER_ATTEMPTS, Cow::Owned(self.attempts.to_string())));
        headers.push((HEADER_QUEUE_ID, Cow::Borrowed(&*self.queue_id)));
        headers
    }

    /// Looks up a metadata entry as text (strings as given, other values as JSON text).
    pub fn metadata_text(&self, name: &str) -> Option<Cow<'_, str>> {
        self.metadata.get(name).map(|value| match value {
            Value::String(s) => Cow::Borrowed(s.as_str()),
            other => Cow::Owned(other.to_string()),
        })
    }

    /// Expands a destination template: `{queue_id}` and `{metadata.NAME}` are replaced;
    /// a metadata entry that is missing expands to an error naming it.
    pub fn expand_template(&self, template: &str) -> Result<String, String> {
        let mut out = String::with_capacity(template.len() + 16);
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            let Some(end) = after.find('}') else {
                return Err(format!("unclosed '{{' in template {template:?}"));
            };
            let name = &after[..end];
            if name == "queue_id" {
                out.push_str(&self.queue_id);
            } else if let Some(key) = name.strip_prefix("metadata.") {
                match self.metadata_text(key) {
                    Some(value) => out.push_str(&value),
                    None => {
                        return Err(format!(
                            "template {template:?} needs metadata entry {key:?}, which message {} lacks",
                            self.id
                        ))
                    }
                }
            } else {
                return Err(format!(
                    "unknown placeholder {{{name}}} in template {template:?} (use {{queue_id}} or {{metadata.NAME}})"
                ));
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// Appends this record as one JSON line (with the trailing newline) to `out`.
    ///
    /// The object has exactly the keys `id`, `queue_id`, `timestamp_ms`, `attempts`,
    /// `content_type`, `metadata` and `body`. What `body` keeps of the message, by type:
    /// - `json`: the decoded JSON text embedded as the producer sent it, byte for byte
    ///   (spacing, key order, number spelling, escapes), except that each CR or LF byte
    ///   becomes a space so the record stays on one line. Valid JSON has CR and LF only
    ///   between tokens, so the value is always the same, and the bytes are too when the
    ///   producer's JSON had no line break;
    /// - `text`: a JSON string whose decoded value is the exact text;
    /// - `bytes`: standard padded base64 of the exact bytes;
    /// - `v8`: standard padded base64 of the opaque payload the decoder kept.
    ///
    /// `metadata` keeps every entry, its key order and its value, but is re-serialized:
    /// the bytes of a value (number spelling, string escapes) may differ from the wire.
    pub fn write_json_line(&self, out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail, and every value here is serializable, so the
        // `expect`s below only document that invariant.
        out.extend_from_slice(b"{\"id\":");
        serde_json::to_writer(&mut *out, &self.id).expect("string serializes");
        out.extend_from_slice(b",\"queue_id\":");
        serde_json::to_writer(&mut *out, &*self.queue_id).expect("string serializes");
        out.extend_from_slice(b",\"timestamp_ms\":");
        out.extend_from_slice(self.timestamp_ms.to_string().as_bytes());
        out.extend_from_slice(b",\"attempts\":");
        out.extend_from_slice(self.attempts.to_string().as_bytes());
        out.extend_from_slice(b",\"content_type\":\"");
        out.extend_from_slice(self.content_type.as_str().as_bytes());
        out.extend_from_slice(b"\",\"metadata\":");
        serde_json::to_writer(&mut *out, &self.metadata).expect("map serializes");
        out.extend_from_slice(b",\"body\":");
        match self.content_type {
            ContentType::Json => {
                // The bridge validated the JSON when decoding and kept its text: embed it
                // raw, not re-serialized. Raw CR and LF can only be whitespace between
                // tokens in valid JSON, so turning them into spaces keeps the value and
                // the one-line-per-record layout; every other byte is kept.
                let start = out.len();
                out.extend_from_slice(&self.body);
                for byte in &mut out[start..] {
                    if *byte == b'\n' || *byte == b'\r' {
                        *byte = b' ';
                    }
                }
            }
            ContentType::Text => match std::str::from_utf8(&self.body) {
                Ok(text) => serde_json::to_writer(&mut *out, text).expect("string serializes"),
                // Unreachable from the bridge: a `text` body comes from a JSON string, so
                // it is UTF-8. A hand-built record with other bytes gets U+FFFD for
                // them rather than an unreadable line.
                Err(_) => serde_json::to_writer(&mut *out, &String::from_utf8_lossy(&self.body))
                    .expect("string serializes"),
            },
            ContentType::Bytes | ContentType::V8 => {
                out.push(b'"');
                let encoded = base64::engine::general_purpose::STANDARD.encode(&self.body);
                out.extend_from_slice(encoded.as_bytes());
                out.push(b'"');
            }
        }
        out.extend_from_slice(b"}\n");
    }
}

/// Why a line could not be read back as a [`Record`] by [`Record::from_json_line`].
#[derive(Debug, thiserror::Error)]
pub enum RecordLineError {
    /// The line is not one JSON object (cut short, not JSON at all).
    #[error("not a JSON object: {0}")]
    NotJson(#[source] serde_json::Error),
    /// The line is a JSON object, but a key is missing or has the wrong type.
    #[error("not a record line: {0}")]
    Fields(#[source] serde_json::Error),
    /// `content_type` is not one of `text`, `json`, `bytes`, `v8`.
    #[error("unknown content_type {0:?} (expected text, json, bytes or v8)")]
    ContentType(String),
    /// The body of a `text`, `bytes` or `v8` record is not a JSON string.
    #[error("the body of a {0} record must be a JSON string")]
    BodyNotString(ContentType),
    /// The body of a `bytes` or `v8` record is not standard padded base64.
    #[error("the body of a {content_type} record is not valid base64: {source}")]
    Base64 {
        /// The record's content type.
        content_type: ContentType,
        /// What the decoder found.
        #[source]
        source: base64::DecodeError,
    },
}

/// The keys of a record line, borrowed from the line where possible.
#[derive(Deserialize)]
struct RecordLine<'a> {
    id: String,
    #[serde(borrow)]
    queue_id: std::borrow::Cow<'a, str>,
    timestamp_ms: u64,
    attempts: u32,
    #[serde(borrow)]
    content_type: std::borrow::Cow<'a, str>,
    metadata: Map<String, Value>,
    #[serde(borrow)]
    body: &'a RawValue,
}

impl Record {
    /// Reads back one line written by [`Record::write_json_line`] (a trailing newline is
    /// allowed, and so is a missing one).
    ///
    /// What comes back, by content type:
    /// - `json`: the bytes embedded in the line, exactly (what lies between the `:` after
    ///   `"body"` and the next `,` or `}`, spacing included);
    /// - `text`: the exact text of the JSON string;
    /// - `bytes` and `v8`: the base64 string decoded.
    ///
    /// Keys other than the seven written are ignored.
    pub fn from_json_line(line: &[u8]) -> Result<Record, RecordLineError> {
        let parsed: RecordLine<'_> = serde_json::from_slice(line).map_err(|e| {
            if e.is_data() {
                RecordLineError::Fields(e)
            } else {
                RecordLineError::NotJson(e)
            }
        })?;
        let content_type = ContentType::parse(&parsed.content_type)
            .ok_or_else(|| RecordLineError::ContentType(parsed.content_type.to_string()))?;
        let raw = parsed.body.get();
        let body = match content_type {
            ContentType::Json => Bytes::copy_from_slice(embedded_span(line, raw.as_bytes())),
            ContentType::Text => {
                let text: String = serde_json::from_str(raw)
                    .map_err(|_| RecordLineError::BodyNotString(content_type))?;
                Bytes::from(text)
            }
            ContentType::Bytes | ContentType::V8 => {
                let encoded: std::borrow::Cow<'_, str> = serde_json::from_str(raw)
                    .map_err(|_| RecordLineError::BodyNotString(content_type))?;
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(encoded.as_bytes())
                    .map_err(|source| RecordLineError::Base64 {
                        content_type,
                        source,
                    })?;
                Bytes::from(decoded)
            }
        };
        Ok(Record {
            id: parsed.id,
            queue_id: Arc::from(&*parsed.queue_id),
            timestamp_ms: parsed.timestamp_ms,
            attempts: parsed.attempts,
            content_type,
            metadata: parsed.metadata,
            body,
        })
    }
}

/// The bytes of `line` that embed the JSON value `value` (a slice of `line`), widened over
/// the whitespace around it up to the `:` before and the `,` or `}` after: what
/// [`Record::write_json_line`] wrote there.
fn embedded_span<'a>(line: &'a [u8], value: &'a [u8]) -> &'a [u8] {
    let line_start = line.as_ptr() as usize;
    let value_start = value.as_ptr() as usize;
    // `value` is borrowed from `line` (the parser hands out slices of its input); if it
    // ever were not, the value alone is still the body, minus its outer spacing.
    if value_start < line_start || value_start + value.len() > line_start + line.len() {
        return value;
    }
    let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let mut start = value_start - line_start;
    let mut end = start + value.len();
    while start > 0 && is_space(line[start - 1]) {
        start -= 1;
    }
    while end < line.len() && is_space(line[end]) {
        end += 1;
    }
    // Inside an object a value is always followed by `,` or `}`, so `end` stops there.
    &line[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(content_type: ContentType, body: &[u8]) -> Record {
        let mut metadata = Map::new();
        metadata.insert("CF-Content-Type".into(), content_type.as_str().into());
        metadata.insert("n".into(), Value::from(7));
        Record {
            id: "m1".into(),
            queue_id: Arc::from("q1"),
            timestamp_ms: 1_710_950_954_154,
            attempts: 2,
            content_type,
            metadata,
            body: Bytes::copy_from_slice(body),
        }
    }

    fn line(record: &Record) -> Value {
        let mut out = Vec::new();
        record.write_json_line(&mut out);
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn json_line_has_exactly_the_documented_keys() {
        let v = line(&record(ContentType::Text, b"hi"));
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "id",
                "queue_id",
                "timestamp_ms",
                "attempts",
                "content_type",
                "metadata",
                "body"
            ]
        );
        assert_eq!(v["body"], "hi");
        assert_eq!(v["attempts"], 2);
        assert_eq!(v["metadata"]["n"], 7);
    }

    #[test]
    fn json_body_is_embedded_as_a_value_even_when_pretty_printed() {
        let v = line(&record(
            ContentType::Json,
            b"{\n  \"a\": [1, \"x\\ny\"]\r\n}",
        ));
        assert_eq!(v["body"], serde_json::json!({"a": [1, "x\ny"]}));
    }

    /// The bytes between `"body":` and the closing `}` of a line.
    fn raw_body(record: &Record) -> Vec<u8> {
        let mut out = Vec::new();
        record.write_json_line(&mut out);
        let start = out
            .windows(7)
            .position(|w| w == b"\"body\":")
            .expect("a body key")
            + 7;
        assert_eq!(&out[out.len() - 2..], b"}\n");
        out[start..out.len() - 2].to_vec()
    }

    #[test]
    fn json_body_is_embedded_byte_for_byte() {
        // Spacing, key order, `1.50`, an escape a serializer would rewrite, a number
        // beyond f64 and u64: a re-serializing writer changes each of them.
        let sent: &[u8] = br#" { "b" : 1.50,"a":"\u00e9\/", "big":123456789012345678901234567890 ,"t":[true,null]} "#;
        assert_eq!(raw_body(&record(ContentType::Json, sent)), sent);
        // Line breaks, and only they, become spaces.
        let sent: &[u8] = b"{\r\n  \"a\": 1.50\n}";
        assert_eq!(
            raw_body(&record(ContentType::Json, sent)),
            b"{    \"a\": 1.50 }"
        );
    }

    #[test]
    fn text_and_bytes_bodies_read_back_exactly() {
        let text = "tab\t\"quote\" \u{e9} \u{1F600} \\ \u{0}\n";
        let v = line(&record(ContentType::Text, text.as_bytes()));
        assert_eq!(v["body"], text);
        let bytes: Vec<u8> = (0..=255).collect();
        let v = line(&record(ContentType::Bytes, &bytes));
        let back = base64::engine::general_purpose::STANDARD
            .decode(v["body"].as_str().unwrap())
            .unwrap();
        assert_eq!(back, bytes);
    }

    #[test]
    fn bytes_and_v8_bodies_are_base64() {
        let v = line(&record(ContentType::Bytes, &[0, 255, 10]));
        assert_eq!(v["body"], "AP8K");
        let v = line(&record(ContentType::V8, &[1, 2]));
        assert_eq!(v["body"], "AQI=");
    }

    #[test]
    fn headers_carry_metadata_and_bridge_fields() {
        let r = record(ContentType::Text, b"x");
        let h: Vec<(String, String)> = r
            .headers()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_owned()))
            .collect();
        assert!(h.contains(&("CF-Content-Type".into(), "text".into())));
        assert!(h.contains(&("n".into(), "7".into())));
        assert!(h.contains(&(HEADER_MESSAGE_ID.into(), "m1".into())));
        assert!(h.contains(&(HEADER_TIMESTAMP_MS.into(), "1710950954154".into())));
        assert!(h.contains(&(HEADER_ATTEMPTS.into(), "2".into())));
        assert!(h.contains(&(HEADER_QUEUE_ID.into(), "q1".into())));
    }

    #[test]
    fn templates_expand_queue_and_metadata() {
        let r = record(ContentType::Text, b"x");
        assert_eq!(
            r.expand_template("cf.{queue_id}.{metadata.n}").unwrap(),
            "cf.q1.7"
        );
        assert!(r.expand_template("{metadata.missing}").is_err());
        assert!(r.expand_template("{other}").is_err());
        assert!(r.expand_template("{queue_id").is_err());
    }

    fn round_trip(record: &Record) -> Record {
        let mut out = Vec::new();
        record.write_json_line(&mut out);
        Record::from_json_line(&out).expect("a written line reads back")
    }

    #[test]
    fn every_content_type_reads_back_exactly() {
        let all_bytes: Vec<u8> = (0..=255).collect();
        let cases: Vec<(ContentType, &[u8])> = vec![
            (ContentType::Text, "tab\t\"q\" \u{e9} \u{1F600} \\ \u{0}\n\r".as_bytes()),
            (ContentType::Text, b""),
            (
                ContentType::Json,
                br#" { "b" : 1.50,"a":"\u00e9\/", "big":123456789012345678901234567890 ,"t":[true,null]} "#,
            ),
            (ContentType::Json, b"\"just a string\""),
            (ContentType::Json, b"-0.0e+00"),
            (ContentType::Bytes, &all_bytes),
            (ContentType::Bytes, b""),
            (ContentType::V8, &[0xff, 0x0f, 0x22, 0x02]),
        ];
        for (content_type, body) in cases {
            let sent = record(content_type, body);
            assert_eq!(round_trip(&sent), sent, "{content_type}: {body:?}");
        }
    }

    #[test]
    fn a_json_body_comes_back_as_embedded_with_line_breaks_as_spaces() {
        let sent = record(ContentType::Json, b"{\r\n  \"a\": 1.50\n}");
        let back = round_trip(&sent);
        assert_eq!(&back.body[..], b"{    \"a\": 1.50 }");
    }

    #[test]
    fn odd_metadata_and_fields_read_back() {
        let mut sent = record(ContentType::Text, b"x");
        sent.id = "id with \"quotes\" and \u{2028}".into();
        sent.queue_id = Arc::from("q\\n\u{e9}");
        sent.timestamp_ms = u64::MAX;
        sent.attempts = u32::MAX;
        sent.metadata = serde_json::from_str(
            r#"{"z":null,"a":[1,{"b":false}],"":"empty key","\u00e9\n":"x\u0000y","n":-12.5}"#,
        )
        .unwrap();
        let back = round_trip(&sent);
        assert_eq!(back, sent);
        let keys: Vec<_> = back.metadata.keys().cloned().collect();
        assert_eq!(keys, ["z", "a", "", "\u{e9}\n", "n"], "key order is kept");
    }

    #[test]
    fn a_line_without_its_newline_and_with_extra_keys_still_reads() {
        let line = br#"{"id":"m","queue_id":"q","timestamp_ms":5,"attempts":1,"content_type":"text","metadata":{},"body":"hi","extra":true}"#;
        let back = Record::from_json_line(line).unwrap();
        assert_eq!(&back.body[..], b"hi");
        assert_eq!(back.timestamp_ms, 5);
    }

    fn error_of(line: &str) -> String {
        match Record::from_json_line(line.as_bytes()) {
            Ok(record) => panic!("{line} read as {record:?}"),
            Err(e) => e.to_string(),
        }
    }

    const GOOD: &str = r#"{"id":"m","queue_id":"q","timestamp_ms":5,"attempts":1,"content_type":"bytes","metadata":{},"body":"AP8K"}"#;

    #[test]
    fn malformed_lines_give_clear_errors() {
        assert!(Record::from_json_line(GOOD.as_bytes()).is_ok());
        let e = error_of("this is not json");
        assert!(e.starts_with("not a JSON object"), "{e}");
        let e = error_of(&GOOD[..GOOD.len() - 7]);
        assert!(e.starts_with("not a JSON object"), "a cut line: {e}");
        let e = error_of(&GOOD.replace(r#","body":"AP8K""#, ""));
        assert!(e.contains("missing field `body`"), "{e}");
        let e = error_of(&GOOD.replace(r#""id":"m","#, ""));
        assert!(e.contains("missing field `id`"), "{e}");
        let e = error_of(&GOOD.replace(r#""timestamp_ms":5"#, r#""timestamp_ms":"5""#));
        assert!(
            e.starts_with("not a record line") && e.contains("invalid type"),
            "{e}"
        );
        let e = error_of(&GOOD.replace("AP8K", "AP8K!"));
        assert!(e.contains("not valid base64"), "{e}");
        let e = error_of(&GOOD.replace(r#""AP8K""#, "[1]"));
        assert_eq!(e, "the body of a bytes record must be a JSON string");
        let e = error_of(&GOOD.replace(r#""bytes""#, r#""xml""#));
        assert_eq!(
            e,
            r#"unknown content_type "xml" (expected text, json, bytes or v8)"#
        );
        let e = error_of(
            &GOOD
                .replace(r#""bytes""#, r#""text""#)
                .replace(r#""AP8K""#, "7"),
        );
        assert_eq!(e, "the body of a text record must be a JSON string");
        let e = error_of("[1,2]");
        assert!(e.starts_with("not a record line"), "{e}");
    }
}
