//! The record a sink receives: one Cloudflare Queues message, its body decoded.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
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
}
