//! Fuzzes the pull answer path as `Client::pull` runs it: status classification (with a
//! `Retry-After` header and an HTML content type), then the envelope, the fast and the
//! tolerant message parsers, then body decoding of every usable message.
//!
//! Input layout: byte 0 flags (bit 0: HTML content type, bit 1: take a `Retry-After`
//! from the body's first bytes, bit 2: force HTTP 200), bytes 1-2 the status, the rest is
//! the body.
#![no_main]

use std::sync::Arc;

use cfq_bridge::cloudflare::{classify_answer, parse_pull_response, ApiError};
use cfq_bridge::config::V8Policy;
use libfuzzer_sys::fuzz_target;

/// Errors end up in log lines: they must stay short whatever the body holds.
const MAX_ERROR_CHARS: usize = 4096;

fn check_error(error: &ApiError) {
    let text = error.to_string();
    assert!(
        text.chars().count() <= MAX_ERROR_CHARS,
        "an error message of {} characters",
        text.chars().count()
    );
    let _ = (error.is_fatal(), error.kind());
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let flags = data[0];
    let body = &data[3..];
    let status = if flags & 4 != 0 {
        200
    } else {
        u16::from_le_bytes([data[1], data[2]]) % 1000
    };
    let retry_after = (flags & 2 != 0)
        .then(|| std::str::from_utf8(&body[..body.len().min(12)]).ok())
        .flatten();
    if let Err(error) = classify_answer(status, retry_after, flags & 1 != 0, body) {
        check_error(&error);
        if let ApiError::RateLimited {
            retry_after: Some(delay),
        } = error
        {
            assert!(delay.as_secs() <= 3600, "Retry-After is capped");
        }
        return;
    }
    match parse_pull_response(status, body) {
        Err(error) => check_error(&error),
        Ok(result) => {
            let queue: Arc<str> = Arc::from("q");
            for broken in &result.broken {
                assert!(!broken.lease_id.is_empty());
            }
            for message in result.messages {
                assert!(!message.id.is_empty() && !message.lease_id.is_empty());
                if let Err((error, _id)) = cfq_bridge::sources::cloudflare::decode::decode(
                    message,
                    &queue,
                    V8Policy::Release,
                ) {
                    let _ = (error.kind(), error.to_string());
                }
            }
        }
    }
});
