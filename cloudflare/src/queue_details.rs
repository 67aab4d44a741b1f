//! The queue details (`GET /accounts/{account_id}/queues/{queue_id}`), read leniently:
//! the queue's name, its consumers with their type and settings, and the queue's own
//! settings (`delivery_paused`, ...).
//!
//! Every field is optional. Cloudflare's schema marks them all optional, and the official
//! SDKs have typed some of them differently over time, so a field of an unexpected type
//! reads as absent instead of failing the whole answer. Numbers are accepted as integers
//! or as floats with no fraction (`3` or `3.0`).

use serde_json::{Map, Value};

/// The consumer type of an HTTP pull consumer.
pub const HTTP_PULL: &str = "http_pull";

/// A queue's details, as far as the answer told them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueDetails {
    /// `queue_id`.
    pub queue_id: Option<String>,
    /// `queue_name`: what `wrangler` commands take.
    pub queue_name: Option<String>,
    /// `created_on`, as given (RFC 3339).
    pub created_on: Option<String>,
    /// `modified_on`, as given (RFC 3339).
    pub modified_on: Option<String>,
    /// `consumers`; `None` when the answer had no such list (which says nothing about the
    /// consumers), an empty list when it said there are none.
    pub consumers: Option<Vec<Consumer>>,
    /// `settings`: the queue's own settings.
    pub settings: QueueSettings,
}

/// The queue's own settings (`result.settings`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSettings {
    /// `delivery_paused`: when true, pulls are refused (HTTP 409) until delivery resumes.
    pub delivery_paused: Option<bool>,
    /// `delivery_delay`: seconds every published message waits before delivery.
    pub delivery_delay: Option<u64>,
    /// `message_retention_period`: seconds an unacknowledged message is kept.
    pub message_retention_period: Option<u64>,
}

/// One consumer of the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Consumer {
    /// `type`: `http_pull` or `worker`.
    pub kind: Option<String>,
    /// `consumer_id`.
    pub consumer_id: Option<String>,
    /// `script_name` (or the older `service`) of a Worker consumer.
    pub script_name: Option<String>,
    /// `dead_letter_queue`: the queue that receives messages whose retries ran out. An
    /// empty string (Cloudflare's "not configured") reads as `None`. Read from the
    /// consumer, or from its `settings` where some answers put it.
    pub dead_letter_queue: Option<String>,
    /// `settings`.
    pub settings: ConsumerSettings,
}

/// A consumer's settings (`consumers[].settings`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerSettings {
    /// `batch_size`: the default batch of a pull without one.
    pub batch_size: Option<u64>,
    /// `max_retries`: deliveries before a message is dropped or dead-lettered.
    pub max_retries: Option<u64>,
    /// `retry_delay`: seconds before a retried message is delivered again.
    pub retry_delay: Option<u64>,
    /// `visibility_timeout_ms`: the default lease of a pull without one.
    pub visibility_timeout_ms: Option<u64>,
    /// `max_wait_time_ms` (Worker consumers).
    pub max_wait_time_ms: Option<u64>,
}

impl QueueDetails {
    /// Reads the `result` of a queue-details answer. Never fails: what is missing or of
    /// an unexpected type is `None`.
    pub fn from_result(result: &Value) -> QueueDetails {
        let empty = Map::new();
        let object = result.as_object().unwrap_or(&empty);
        let settings = object
            .get("settings")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        QueueDetails {
            queue_id: text(object, "queue_id"),
            queue_name: text(object, "queue_name"),
            created_on: text(object, "created_on"),
            modified_on: text(object, "modified_on"),
            consumers: object
                .get("consumers")
                .and_then(Value::as_array)
                .map(|list| list.iter().map(Consumer::from_value).collect()),
            settings: QueueSettings {
                delivery_paused: settings.get("delivery_paused").and_then(Value::as_bool),
                delivery_delay: number(settings, "delivery_delay"),
                message_retention_period: number(settings, "message_retention_period"),
            },
        }
    }

    /// The first HTTP pull consumer, if the answer lists one.
    pub fn http_pull_consumer(&self) -> Option<&Consumer> {
        self.consumers
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|c| c.is_http_pull())
    }

    /// The queue's name, else its id, else `"<queue-name>"`: what to put in a `wrangler`
    /// command.
    pub fn name_for_commands(&self) -> &str {
        self.queue_name
            .as_deref()
            .or(self.queue_id.as_deref())
            .unwrap_or("<queue-name>")
    }
}

impl Consumer {
    fn from_value(value: &Value) -> Consumer {
        let empty = Map::new();
        let object = value.as_object().unwrap_or(&empty);
        let settings = object
            .get("settings")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        Consumer {
            kind: text(object, "type"),
            consumer_id: text(object, "consumer_id"),
            script_name: text(object, "script_name").or_else(|| text(object, "service")),
            dead_letter_queue: text(object, "dead_letter_queue")
                .or_else(|| text(settings, "dead_letter_queue"))
                .filter(|name| !name.is_empty()),
            settings: ConsumerSettings {
                batch_size: number(settings, "batch_size"),
                max_retries: number(settings, "max_retries"),
                retry_delay: number(settings, "retry_delay"),
                visibility_timeout_ms: number(settings, "visibility_timeout_ms"),
                max_wait_time_ms: number(settings, "max_wait_time_ms"),
            },
        }
    }

    /// True for an HTTP pull consumer (`type: "http_pull"`).
    pub fn is_http_pull(&self) -> bool {
        self.kind.as_deref() == Some(HTTP_PULL)
    }
}

/// A string field; `None` when absent or not a string.
fn text(object: &Map<String, Value>, key: &str) -> Option<String> {
    object.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// A non-negative whole number, given as an integer or as a float without a fraction.
fn number(object: &Map<String, Value>, key: &str) -> Option<u64> {
    let value = object.get(key)?;
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0 && *f < 1.8e19)
            .map(|f| f as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_documented_shape() {
        let details = QueueDetails::from_result(&json!({
            "queue_id": "023e105f4ecef8ad9ca31a8372d0c353",
            "queue_name": "orders",
            "created_on": "2024-03-20T16:09:14.154Z",
            "modified_on": "2024-03-21T16:09:14.154Z",
            "producers": [],
            "consumers": [
                {"type": "worker", "script_name": "w", "dead_letter_queue": "",
                 "settings": {"batch_size": 10, "max_wait_time_ms": 5000}},
                {"type": "http_pull", "consumer_id": "c1", "dead_letter_queue": "orders-dlq",
                 "settings": {"batch_size": 50, "max_retries": 7.0, "retry_delay": 30,
                              "visibility_timeout_ms": 120000}},
            ],
            "settings": {"delivery_paused": true, "delivery_delay": 0,
                         "message_retention_period": 345600},
        }));
        assert_eq!(details.queue_name.as_deref(), Some("orders"));
        assert_eq!(details.name_for_commands(), "orders");
        assert_eq!(details.settings.delivery_paused, Some(true));
        assert_eq!(details.settings.message_retention_period, Some(345_600));
        let consumers = details.consumers.as_ref().unwrap();
        assert_eq!(consumers.len(), 2);
        assert_eq!(consumers[0].dead_letter_queue, None, "empty means none");
        assert_eq!(consumers[0].script_name.as_deref(), Some("w"));
        let pull = details.http_pull_consumer().expect("pull consumer");
        assert_eq!(pull.consumer_id.as_deref(), Some("c1"));
        assert_eq!(pull.dead_letter_queue.as_deref(), Some("orders-dlq"));
        assert_eq!(
            pull.settings,
            ConsumerSettings {
                batch_size: Some(50),
                max_retries: Some(7),
                retry_delay: Some(30),
                visibility_timeout_ms: Some(120_000),
                max_wait_time_ms: None,
            }
        );
    }

    #[test]
    fn tolerates_missing_and_mistyped_fields() {
        let details = QueueDetails::from_result(&json!({
            "queue_name": 5,
            "consumers": [
                "not an object",
                {"type": "http_pull", "settings": {"max_retries": "3", "batch_size": -1,
                                                   "dead_letter_queue": "dlq"}},
            ],
            "settings": "paused",
        }));
        assert_eq!(details.queue_name, None);
        assert_eq!(details.name_for_commands(), "<queue-name>");
        assert_eq!(details.settings, QueueSettings::default());
        let pull = details.http_pull_consumer().unwrap();
        assert_eq!(pull.settings.max_retries, None);
        assert_eq!(pull.settings.batch_size, None);
        assert_eq!(pull.dead_letter_queue.as_deref(), Some("dlq"));

        assert_eq!(
            QueueDetails::from_result(&json!(null)),
            QueueDetails::default()
        );
    }

    #[test]
    fn an_empty_list_differs_from_no_list() {
        let none = QueueDetails::from_result(&json!({"queue_id": "q", "consumers": []}));
        assert_eq!(none.consumers, Some(Vec::new()));
        assert!(none.http_pull_consumer().is_none());
        assert_eq!(none.name_for_commands(), "q");
        let unknown = QueueDetails::from_result(&json!({"queue_id": "q"}));
        assert_eq!(unknown.consumers, None);
        let worker_only = QueueDetails::from_result(&json!({"consumers": [{"type": "worker"}]}));
        assert!(worker_only.http_pull_consumer().is_none());
    }
}
