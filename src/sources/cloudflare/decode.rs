//! Turns a pulled message into a [`Record`] by its `CF-Content-Type`.
//!
//! - `text`: the body as is;
//! - `json`: base64, decoded once, then checked to be one valid JSON value (kept as text,
//!   never re-serialized);
//! - `bytes`: base64, decoded once;
//! - `v8`: opaque; by default not forwarded (see [`V8Policy`]).
//!
//! Anything that cannot be decoded is an error for the pipeline to release, log and count:
//! it is never forwarded as if it had been decoded.

use std::sync::Arc;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use bytes::Bytes;
use cfq_sinks::{ContentType, Record};

use super::config::V8Policy;
use crate::cloudflare::PulledMessage;

/// Cloudflare's largest message: 128 KB (1 KB = 1000 bytes). A decoded body above this
/// cannot have come from a real queue and is refused.
pub const MAX_BODY_BYTES: usize = 128_000;

/// Standard base64 alphabet, padding optional (both forms are seen in the wild).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The metadata key naming the content type.
pub const CONTENT_TYPE_KEY: &str = "CF-Content-Type";

/// Why a message could not become a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No `CF-Content-Type` in the metadata.
    #[error("metadata has no CF-Content-Type")]
    MissingContentType,
    /// A content type the bridge does not know.
    #[error("unknown CF-Content-Type {0:?}")]
    UnknownContentType(String),
    /// The body of a `json` or `bytes` message is not valid base64.
    #[error("{content_type} body is not valid base64: {detail}")]
    BadBase64 {
        /// `json` or `bytes`.
        content_type: ContentType,
        /// The decoder's message.
        detail: String,
    },
    /// The base64 of a `json` message decodes to something that is not one JSON value.
    #[error("json body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The decoded body is larger than Cloudflare allows.
    #[error("body of {0} bytes exceeds the 128 KB message limit")]
    Oversized(usize),
    /// A `v8` message under the `release` policy.
    #[error("v8 body (Workers structured clone) cannot be decoded by a pull consumer")]
    V8,
}

impl DecodeError {
    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::MissingContentType | DecodeError::UnknownContentType(_) => "content_type",
            DecodeError::BadBase64 { .. } => "base64",
            DecodeError::InvalidJson(_) => "json",
            DecodeError::Oversized(_) => "oversized",
            DecodeError::V8 => "v8",
        }
    }
}

/// Decodes one message. On failure the message id comes back with the error, for the
/// log line.
pub fn decode(
    message: PulledMessage,
    queue_id: &Arc<str>,
    v8_policy: V8Policy,
) -> Result<Record, (DecodeError, String)> {
    let content_type = match message.metadata.get(CONTENT_TYPE_KEY) {
        None => return Err((DecodeError::MissingContentType, message.id)),
        Some(serde_json::Value::String(name)) => match ContentType::parse(name) {
            Some(content_type) => content_type,
            None => {
                let error = DecodeError::UnknownContentType(name.clone());
                return Err((error, message.id));
            }
        },
        Some(other) => {
            let error = DecodeError::UnknownContentType(other.to_string());
            return Err((error, message.id));
        }
    };
    let body = match decode_body(content_type, message.body, v8_policy) {
        Ok(body) => body,
        Err(error) => return Err((error, message.id)),
    };
    if body.len() > MAX_BODY_BYTES {
        return Err((DecodeError::Oversized(body.len()), message.id));
    }
    Ok(Record {
        id: message.id,
        queue_id: Arc::clone(queue_id),
        timestamp_ms: message.timestamp_ms,
        attempts: message.attempts,
        content_type,
        metadata: message.metadata,
        body,
    })
}

/// Decodes a body given its content type.
pub fn decode_body(
    content_type: ContentType,
    body: String,
    v8_policy: V8Policy,
) -> Result<Bytes, DecodeError> {
    match content_type {
        ContentType::Text => Ok(Bytes::from(body)),
        ContentType::Bytes => base64_decode(content_type, &body),
        ContentType::Json => {
            let bytes = base64_decode(content_type, &body)?;
            // JSON text is UTF-8 (RFC 8259). serde_json does not check the bytes inside
            // strings it skips, so check them first: the body is embedded as is in JSONL
            // lines, which must stay readable.
            let text = std::str::from_utf8(&bytes)
                .map_err(|e| DecodeError::InvalidJson(format!("not UTF-8: {e}")))?;
            serde_json::from_str::<serde::de::IgnoredAny>(text)
                .map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
            Ok(bytes)
        }
        ContentType::V8 => match v8_policy {
            V8Policy::Release => Err(DecodeError::V8),
            // Keep the opaque payload: its base64 decoding when it is base64, else the
            // string itself, so nothing is lost either way.
            V8Policy::ForwardRaw => Ok(BASE64
                .decode(body.as_bytes())
                .map(Bytes::from)
                .unwrap_or_else(|_| Bytes::from(body))),
        },
    }
}

fn base64_decode(content_type: ContentType, body: &str) -> Result<Bytes, DecodeError> {
    if body.len() > MAX_BODY_BYTES * 4 / 3 + 8 {
        return Err(DecodeError::Oversized(body.len() / 4 * 3));
    }
    BASE64
        .decode(body.as_bytes())
        .map(Bytes::from)
        .map_err(|e| DecodeError::BadBase64 {
            content_type,
            detail: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map, Value};

    fn message(content_type: Option<&str>, body: &str) -> PulledMessage {
        let mut metadata = Map::new();
        if let Some(ct) = content_type {
            metadata.insert(CONTENT_TYPE_KEY.into(), Value::from(ct));
        }
        PulledMessage {
            id: "id".into(),
            lease_id: "l".into(),
            body: body.into(),
            attempts: 1,
            timestamp_ms: 1,
            metadata,
        }
    }

    fn run(content_type: Option<&str>, body: &str) -> Result<Record, DecodeError> {
        decode(
            message(content_type, body),
            &Arc::from("q"),
            V8Policy::Release,
        )
        .map_err(|(error, id)| {
            assert_eq!(id, "id");
            error
        })
    }

    #[test]
    fn each_content_type_decodes() {
        assert_eq!(
            &run(Some("text"), "héllo").unwrap().body[..],
            "héllo".as_bytes()
        );
        let j = BASE64.encode(br#"{"a":[1,2]}"#);
        assert_eq!(&run(Some("json"), &j).unwrap().body[..], br#"{"a":[1,2]}"#);
        let b = BASE64.encode([0u8, 159, 255]);
        assert_eq!(&run(Some("bytes"), &b).unwrap().body[..], &[0u8, 159, 255]);
        assert_eq!(&run(Some("bytes"), "AP8").unwrap().body[..], &[0u8, 255]);
    }

    #[test]
    fn bad_bodies_are_errors() {
        assert!(matches!(
            run(Some("json"), "%%%"),
            Err(DecodeError::BadBase64 { .. })
        ));
        assert!(matches!(
            run(Some("bytes"), "a b"),
            Err(DecodeError::BadBase64 { .. })
        ));
        let not_json = BASE64.encode(b"{nope");
        assert!(matches!(
            run(Some("json"), &not_json),
            Err(DecodeError::InvalidJson(_))
        ));
        // Found by the `decode_body` fuzz target: invalid UTF-8 inside a JSON string.
        let not_utf8 = BASE64.encode(b"\"g\xadu\xabZ\x8b\xcf\"");
        assert!(matches!(
            run(Some("json"), &not_utf8),
            Err(DecodeError::InvalidJson(m)) if m.contains("UTF-8")
        ));
        let two_values = BASE64.encode(b"1 2");
        assert!(matches!(
            run(Some("json"), &two_values),
            Err(DecodeError::InvalidJson(_))
        ));
        assert_eq!(run(Some("v8"), "AAEC").unwrap_err(), DecodeError::V8);
        assert_eq!(run(None, "x").unwrap_err(), DecodeError::MissingContentType);
        assert!(matches!(
            run(Some("yaml"), "x"),
            Err(DecodeError::UnknownContentType(_))
        ));
        let big = "x".repeat(MAX_BODY_BYTES + 1);
        assert!(matches!(
            run(Some("text"), &big),
            Err(DecodeError::Oversized(_))
        ));
        let big64 = BASE64.encode(vec![0u8; MAX_BODY_BYTES + 10]);
        assert!(matches!(
            run(Some("bytes"), &big64),
            Err(DecodeError::Oversized(_))
        ));
    }

    #[test]
    fn v8_forward_raw_keeps_the_payload() {
        let r = decode(
            message(Some("v8"), "AAEC"),
            &Arc::from("q"),
            V8Policy::ForwardRaw,
        )
        .unwrap();
        assert_eq!(r.content_type, ContentType::V8);
        assert_eq!(&r.body[..], &[0u8, 1, 2]);
        let _ = json!(null);
    }
}
