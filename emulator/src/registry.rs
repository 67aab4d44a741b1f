//! All queues of the emulator, keyed by account and queue id, created on first use.
//!
//! Each queue has its own mutex, so requests for different queues never contend, and the
//! map itself is behind a read-mostly lock. Messages that exhaust their retries are taken
//! out of their queue under its lock and moved into the dead-letter queue afterwards, so
//! no two queue locks are ever held at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::state::{format_id, Queue, QueueStats, StoredMessage};
use crate::{wire, ContentType, SeedSpec};

/// The value of `CF-sourceMessageSource` for messages published over HTTP.
pub(crate) const SOURCE_API: &str = "api";
/// The value of `CF-sourceMessageSource` for seeded messages (as if from a Worker).
pub(crate) const SOURCE_SEED: &str = "worker";

/// A queue shared between request handlers.
pub(crate) type SharedQueue = Arc<Mutex<Queue>>;

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every queue
/// operation leaves the queue consistent between statements that can panic, and an
/// emulator that keeps serving is more useful to a test than one that cascades panics.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Milliseconds since the Unix epoch, on the wall clock (for publish timestamps, which
/// clients read as dates; leases and delays use tokio's clock instead).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every queue, plus what is needed to create new ones.
#[derive(Debug)]
pub(crate) struct Registry {
    queues: RwLock<HashMap<String, HashMap<String, SharedQueue>>>,
    next_queue_no: AtomicU32,
    epoch: AtomicU32,
    id_prefix: u64,
    next_id: AtomicU64,
    max_retries: u32,
    dead_letter_queue: Option<String>,
    /// Queue ids (in any account) created without an HTTP pull consumer.
    without_pull_consumer: RwLock<Vec<String>>,
}

impl Registry {
    /// An empty registry whose queues use these consumer settings.
    pub fn new(max_retries: u32, dead_letter_queue: Option<String>) -> Self {
        Registry {
            queues: RwLock::new(HashMap::new()),
            next_queue_no: AtomicU32::new(1),
            epoch: AtomicU32::new(rand::random()),
            id_prefix: rand::random(),
            next_id: AtomicU64::new(rand::random::<u32>().into()),
            max_retries,
            dead_letter_queue,
            without_pull_consumer: RwLock::new(Vec::new()),
        }
    }

    /// Queue ids (in any account) that are created without an HTTP pull consumer from
    /// now on, also after a reset. Queues that exist already keep theirs.
    pub fn set_queues_without_pull_consumer(&self, queue_ids: Vec<String>) {
        *self
            .without_pull_consumer
            .write()
            .unwrap_or_else(|p| p.into_inner()) = queue_ids;
    }

    /// Attaches or removes the HTTP pull consumer of a queue (created if needed).
    pub fn set_pull_consumer(&self, account_id: &str, queue_id: &str, attached: bool) {
        self.with_queue(account_id, queue_id, |queue, _| {
            queue.set_http_pull_consumer(attached)
        });
    }

    /// The dead-letter queue's name, if any.
    pub fn dead_letter_queue(&self) -> Option<&str> {
        self.dead_letter_queue.as_deref()
    }

    /// A fresh message id: 64 random bits fixed per emulator, then a counter.
    fn new_id(&self) -> u128 {
        (u128::from(self.id_prefix) << 64)
            | u128::from(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// The queue, created if this is its first use.
    pub fn queue(&self, account_id: &str, queue_id: &str) -> SharedQueue {
        {
            let queues = self.queues.read().unwrap_or_else(|p| p.into_inner());
            if let Some(queue) = queues.get(account_id).and_then(|a| a.get(queue_id)) {
                return Arc::clone(queue);
            }
        }
        let mut queues = self.queues.write().unwrap_or_else(|p| p.into_inner());
        let account = queues.entry(account_id.to_owned()).or_default();
        let queue = account.entry(queue_id.to_owned()).or_insert_with(|| {
            let no = self.next_queue_no.fetch_add(1, Ordering::Relaxed);
            let has_dlq = self
                .dead_letter_queue
                .as_deref()
                .is_some_and(|dlq| dlq != queue_id);
            let http_pull = !self
                .without_pull_consumer
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|q| q == queue_id);
            tracing::debug!(
                account_id,
                queue_id,
                http_pull,
                "queue created on first use"
            );
            let mut queue = Queue::new(
                no,
                self.epoch.load(Ordering::Relaxed),
                account_id,
                queue_id,
                self.max_retries,
                has_dlq,
                now_ms(),
            );
            queue.set_http_pull_consumer(http_pull);
            Arc::new(Mutex::new(queue))
        });
        Arc::clone(queue)
    }

    /// The queue if it exists (no creation).
    pub fn existing(&self, account_id: &str, queue_id: &str) -> Option<SharedQueue> {
        let queues = self.queues.read().unwrap_or_else(|p| p.into_inner());
        queues
            .get(account_id)
            .and_then(|a| a.get(queue_id))
            .map(Arc::clone)
    }

    /// Every queue, as (account id, queue id, queue).
    pub fn all(&self) -> Vec<SharedQueue> {
        let queues = self.queues.read().unwrap_or_else(|p| p.into_inner());
        queues
            .values()
            .flat_map(|a| a.values().map(Arc::clone))
            .collect()
    }

    /// Runs `f` on a queue (created if needed) after applying its due timers, then moves
    /// any message that exhausted its retries to the dead-letter queue.
    pub fn with_queue<R>(
        &self,
        account_id: &str,
        queue_id: &str,
        f: impl FnOnce(&mut Queue, Instant) -> R,
    ) -> R {
        let queue = self.queue(account_id, queue_id);
        let (result, dead) = {
            let mut guard = lock(&queue);
            let now = Instant::now();
            guard.advance(now);
            let result = f(&mut guard, now);
            (result, guard.take_dead_letters())
        };
        self.dead_letter(account_id, dead);
        result
    }

    /// Moves messages that exhausted their retries into the account's dead-letter queue.
    fn dead_letter(&self, account_id: &str, dead: Vec<StoredMessage>) {
        if dead.is_empty() {
            return;
        }
        let Some(dlq) = self.dead_letter_queue.as_deref() else {
            return;
        };
        let count = dead.len();
        let queue = self.queue(account_id, dlq);
        let mut guard = lock(&queue);
        let now = Instant::now();
        for message in dead {
            guard.publish(now, message, Duration::ZERO);
        }
        tracing::debug!(
            account_id,
            dead_letter_queue = dlq,
            count,
            "moved messages to the dead-letter queue"
        );
    }

    /// Applies due timers of every queue (run periodically, so expiries and dead-letter
    /// moves happen even for queues nobody calls).
    pub fn sweep(&self) {
        for queue in self.all() {
            let (account_id, dead) = {
                let mut guard = lock(&queue);
                guard.advance(Instant::now());
                let dead = guard.take_dead_letters();
                if dead.is_empty() {
                    continue;
                }
                (guard.account_id.clone(), dead)
            };
            self.dead_letter(&account_id, dead);
        }
    }

    /// Forgets every queue; leases issued before become unknown.
    pub fn reset(&self) {
        let mut queues = self.queues.write().unwrap_or_else(|p| p.into_inner());
        queues.clear();
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// A queue's stats (an empty default when the queue was never used).
    pub fn stats(&self, account_id: &str, queue_id: &str) -> QueueStats {
        self.sweep();
        match self.existing(account_id, queue_id) {
            Some(queue) => lock(&queue).stats(),
            None => QueueStats::default(),
        }
    }

    /// Publishes a validated HTTP message (`text` or `json`).
    pub fn publish_valid(&self, queue: &mut Queue, now: Instant, message: &wire::ValidMessage) {
        let metadata = metadata_json(message.content_type, SOURCE_API);
        self.publish_encoded(
            queue,
            now,
            &message.wire_body,
            message.size,
            &metadata,
            message.delay,
        );
    }

    fn publish_encoded(
        &self,
        queue: &mut Queue,
        now: Instant,
        wire_body: &str,
        size: usize,
        metadata_json: &[u8],
        delay: Duration,
    ) -> u128 {
        let id = self.new_id();
        let timestamp_ms = now_ms();
        let head = wire::message_head(id, wire_body, timestamp_ms, metadata_json);
        queue.publish(
            now,
            StoredMessage::new(id, timestamp_ms, size as u64, head),
            delay,
        );
        id
    }

    /// Seeds generated messages; returns their ids in publish order.
    pub fn seed(&self, account_id: &str, queue_id: &str, spec: &SeedSpec) -> Vec<String> {
        let metadata = metadata_json(spec.content_type, SOURCE_SEED);
        let mut raw = Vec::with_capacity(spec.body_size);
        let mut wire_body = String::with_capacity(spec.body_size * 4 / 3 + 4);
        let mut ids = Vec::with_capacity(spec.count);
        let start = self.with_queue(account_id, queue_id, |q, _| q.published());
        // Seed in chunks so a big seed does not hold the queue lock for long.
        let mut done = 0usize;
        while done < spec.count {
            let chunk = (spec.count - done).min(10_000);
            self.with_queue(account_id, queue_id, |queue, now| {
                for i in done..done + chunk {
                    let index = start + i as u64;
                    seed_body(spec.content_type, index, spec.body_size, &mut raw);
                    wire_body.clear();
                    match spec.content_type {
                        // Generated text is ASCII, so this conversion cannot fail.
                        ContentType::Text => {
                            wire_body.push_str(std::str::from_utf8(&raw).unwrap_or(""))
                        }
                        _ => base64::engine::general_purpose::STANDARD
                            .encode_string(&raw, &mut wire_body),
                    }
                    let id = self.publish_encoded(
                        queue,
                        now,
                        &wire_body,
                        raw.len(),
                        &metadata,
                        Duration::ZERO,
                    );
                    ids.push(format_id(id));
                }
            });
            done += chunk;
        }
        ids
    }

    /// Publishes a message whose pull `body` string and metadata are exactly as given.
    /// The body counts toward `backlog_bytes` with its length as given.
    pub fn publish_raw(
        &self,
        account_id: &str,
        queue_id: &str,
        body: &str,
        metadata: &Map<String, Value>,
    ) -> String {
        // Serializing a map of JSON values cannot fail.
        let metadata_json = serde_json::to_vec(metadata).unwrap_or_else(|_| b"{}".to_vec());
        let id = self.with_queue(account_id, queue_id, |queue, now| {
            self.publish_encoded(queue, now, body, body.len(), &metadata_json, Duration::ZERO)
        });
        format_id(id)
    }
}

/// `{"CF-Content-Type":"..","CF-sourceMessageSource":".."}`.
fn metadata_json(content_type: ContentType, source: &str) -> Vec<u8> {
    let mut map = Map::new();
    map.insert("CF-Content-Type".into(), content_type.as_str().into());
    map.insert("CF-sourceMessageSource".into(), source.into());
    serde_json::to_vec(&map).unwrap_or_else(|_| b"{}".to_vec())
}

/// Writes the raw body of seeded message number `index` into `out`:
/// - `text`: ASCII, `seed message N ` then letters, exactly `size` bytes;
/// - `json`: `{"seq":N,"pad":"xxx"}` padded to `size` bytes (never shorter than the
///   smallest such object, `{"seq":N}`);
/// - `bytes`: pseudo-random bytes derived from `N`, exactly `size` bytes;
/// - `v8`: an opaque payload starting with the V8 serializer's version header
///   (`0xFF 0x0F`), exactly `size` bytes (at least 2).
pub(crate) fn seed_body(content_type: ContentType, index: u64, size: usize, out: &mut Vec<u8>) {
    out.clear();
    match content_type {
        ContentType::Text => {
            out.extend_from_slice(format!("seed message {index} ").as_bytes());
            let mut letter = 0u8;
            while out.len() < size {
                out.push(b'a' + letter);
                letter = (letter + 1) % 26;
            }
            out.truncate(size);
        }
        ContentType::Json => {
            let bare = format!("{{\"seq\":{index}}}");
            let padded_min = bare.len() + ",\"pad\":\"\"".len();
            if size < padded_min {
                out.extend_from_slice(bare.as_bytes());
            } else {
                out.extend_from_slice(format!("{{\"seq\":{index},\"pad\":\"").as_bytes());
                out.resize(out.len() + size - padded_min, b'x');
                out.extend_from_slice(b"\"}");
            }
        }
        ContentType::Bytes | ContentType::V8 => {
            if content_type == ContentType::V8 {
                out.extend_from_slice(&[0xFF, 0x0F]);
            }
            // xorshift64*, seeded by the index: reproducible, cheap, not all-zero.
            let mut state = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            while out.len() < size {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let word = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                let take = (size - out.len()).min(8);
                out.extend_from_slice(&word[..take]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_bodies_have_the_requested_size() {
        let mut out = Vec::new();
        for ct in [
            ContentType::Text,
            ContentType::Json,
            ContentType::Bytes,
            ContentType::V8,
        ] {
            for size in [40, 100, 1000] {
                seed_body(ct, 12345, size, &mut out);
                assert_eq!(out.len(), size, "{ct} {size}");
            }
        }
        seed_body(ContentType::Json, 7, 1000, &mut out);
        let value: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["seq"], 7);
        seed_body(ContentType::Json, 7, 1, &mut out);
        assert_eq!(out, b"{\"seq\":7}");
    }
}
