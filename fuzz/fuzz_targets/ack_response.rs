//! Fuzzes the ack answer path as `Client::ack` runs it: the envelope, then `ackCount`,
//! `retryCount` and `warnings` (a map today, a list in older answers).
#![no_main]

use cfq_bridge::cloudflare::parse_ack_response;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_ack_response(200, data) {
        Ok(result) => {
            let _ = (result.ack_count, result.retry_count, result.warnings.len());
        }
        Err(error) => {
            let text = error.to_string();
            assert!(
                text.chars().count() <= 4096,
                "an error of {} characters",
                text.len()
            );
        }
    }
});
