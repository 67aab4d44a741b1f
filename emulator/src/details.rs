//! Queue details (`GET /accounts/{account_id}/queues/{queue_id}`) and what a queue without
//! an HTTP pull consumer answers to a pull.
//!
//! The details follow Cloudflare's "Queue Details" shape: `queue_id`, `queue_name`,
//! `created_on`, `modified_on`, `producers`, `consumers` and `settings`. A queue has one
//! `http_pull` consumer unless it was set up without one (`--no-pull-consumer`,
//! `PUT /_emulator/consumer`, [`crate::Emulator::set_pull_consumer`]); then `consumers` is
//! empty and pulls are refused with HTTP 405 and Cloudflare's message
//! [`NO_PULL_CONSUMER`].

use axum::http::StatusCode;

use crate::shared::Shared;
use crate::wire;

/// What Cloudflare answers (HTTP 405) to a pull from a queue without an HTTP pull
/// consumer, as reported by users of the API.
pub(crate) const NO_PULL_CONSUMER: &str =
    "messages cannot be pulled unless http_pull mode is enabled";

/// The error code of that answer. Cloudflare's own code is not documented; this is the
/// emulator's choice, the one it uses for its other 405 answers.
const NO_PULL_CONSUMER_CODE: u32 = 7001;

/// The answer to a pull from a queue that has no HTTP pull consumer.
pub(crate) fn pull_refused() -> (StatusCode, Vec<u8>) {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        wire::failure_envelope(NO_PULL_CONSUMER_CODE, NO_PULL_CONSUMER),
    )
}

/// The success envelope of a queue-details answer.
pub(crate) fn queue_details(shared: &Shared, account_id: &str, queue_id: &str) -> Vec<u8> {
    let faults = shared.faults();
    let paused = faults.paused || faults.paused_queues.iter().any(|q| q == queue_id);
    let (created_ms, max_retries, has_dlq, http_pull) =
        shared
            .registry
            .with_queue(account_id, queue_id, |queue, _| {
                (
                    queue.created_ms,
                    queue.max_retries(),
                    queue.has_dead_letter_queue(),
                    queue.has_http_pull_consumer(),
                )
            });
    let created_on = rfc3339_ms(created_ms);
    let dead_letter_queue = if has_dlq {
        shared.registry.dead_letter_queue().unwrap_or("")
    } else {
        ""
    };
    let consumers = if http_pull {
        vec![serde_json::json!({
            "consumer_id": format!("{:0>32}", "c0"),
            "created_on": created_on,
            "queue_name": queue_id,
            "type": "http_pull",
            "dead_letter_queue": dead_letter_queue,
            "settings": {
                "batch_size": wire::DEFAULT_PULL_BATCH,
                "max_retries": max_retries,
                "retry_delay": 0,
                "visibility_timeout_ms": wire::DEFAULT_VISIBILITY_TIMEOUT_MS,
            },
        })]
    } else {
        Vec::new()
    };
    wire::success_json(&serde_json::json!({
        "queue_id": queue_id,
        "queue_name": queue_id,
        "created_on": created_on,
        "modified_on": created_on,
        "producers": [],
        "producers_total_count": 0,
        "consumers_total_count": consumers.len(),
        "consumers": consumers,
        "settings": {
            "delivery_delay": 0,
            "delivery_paused": paused,
            "message_retention_period": 345_600,
        },
    }))
}

/// Formats ms since the Unix epoch as RFC 3339 in UTC, e.g. `2024-03-20T16:09:14.154Z`.
pub(crate) fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Gregorian, proleptic).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmulatorConfig;

    fn result(body: &[u8]) -> serde_json::Value {
        let envelope: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(envelope["success"], true);
        envelope["result"].clone()
    }

    #[test]
    fn formats_dates() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_710_950_954_154), "2024-03-20T16:09:14.154Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[tokio::test]
    async fn a_queue_without_a_pull_consumer_lists_no_consumer() {
        let shared = Shared::new(EmulatorConfig::default());
        shared
            .registry
            .set_queues_without_pull_consumer(vec!["bare".into()]);
        let with = result(&queue_details(&shared, "a", "q"));
        assert_eq!(with["consumers"][0]["type"], "http_pull");
        assert_eq!(with["consumers_total_count"], 1);
        let without = result(&queue_details(&shared, "a", "bare"));
        assert_eq!(without["consumers"], serde_json::json!([]));
        assert_eq!(without["consumers_total_count"], 0);
        assert_eq!(without["queue_name"], "bare");

        let (status, body) = pull_refused();
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(envelope["success"], false);
        assert_eq!(envelope["errors"][0]["message"], NO_PULL_CONSUMER);
    }
}
