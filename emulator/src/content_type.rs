//! The `CF-Content-Type` values a queued message can carry, as the emulator sees them.
//!
//! The emulator keeps its own type rather than borrowing the bridge's: it is an independent
//! implementation of the Cloudflare API, and sharing types with the client under test would
//! let a mistake in one hide in the other.

use std::fmt;

/// The `CF-Content-Type` of a message: how its body is carried in a pull answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentType {
    /// UTF-8 text, pulled as the text itself.
    Text,
    /// JSON, pulled as the base64 of its text.
    Json,
    /// Raw bytes, pulled as base64.
    Bytes,
    /// Workers structured-clone data, pulled as base64 and opaque to pull consumers.
    V8,
}

impl ContentType {
    /// The name Cloudflare writes in `CF-Content-Type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Text => "text",
            ContentType::Json => "json",
            ContentType::Bytes => "bytes",
            ContentType::V8 => "v8",
        }
    }

    /// Parses a `CF-Content-Type` name; unknown names give `None`.
    pub fn parse(name: &str) -> Option<Self> {
        [
            ContentType::Text,
            ContentType::Json,
            ContentType::Bytes,
            ContentType::V8,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == name)
    }
}

impl fmt::Display for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for kind in [
            ContentType::Text,
            ContentType::Json,
            ContentType::Bytes,
            ContentType::V8,
        ] {
            assert_eq!(ContentType::parse(kind.as_str()), Some(kind));
            assert_eq!(kind.to_string(), kind.as_str());
        }
        assert_eq!(ContentType::parse("JSON"), None);
        assert_eq!(ContentType::parse(""), None);
    }
}
