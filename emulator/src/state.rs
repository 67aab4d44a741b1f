//! One queue's state: its messages, their leases and delays, and its counters.
//!
//! Every message is in one of three states: ready (waiting in the FIFO for a pull),
//! delayed (published or retried with a delay), or leased (handed out by a pull, until its
//! visibility timeout ends). Time-driven transitions (a delay ends, a lease expires) are
//! kept in a min-heap of timers and applied lazily by [`Queue::advance`], which every
//! operation calls first, and by the emulator's background sweeper.
//!
//! Counting retries: `attempts` is the number of deliveries a message has had; the pull
//! that hands it out increments it, so the first delivery says `attempts: 1`. A delivery
//! *fails* when its lease expires or the consumer retries it. When the delivery that
//! failed had `attempts >= max_retries`, the message leaves the queue: it is moved to the
//! dead-letter queue when one is configured, and dropped otherwise. With the default
//! `max_retries = 3` a message is therefore delivered at most three times.
//!
//! Stale heap and FIFO entries (for messages acknowledged or moved meanwhile) are skipped
//! when they come up; the heap is compacted when stale entries outnumber live ones, so
//! its size stays proportional to the number of leased and delayed messages.
//!
//! Time: lease deadlines, delays and retry delays are measured on tokio's clock
//! ([`tokio::time::Instant`]), so a test that pauses it (`tokio::time::pause`) moves leases
//! forward without waiting. Publish timestamps (`timestamp_ms`) stay on the wall clock.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::lease::Lease;

/// A snapshot of one queue's counters and contents, as reported by the admin API and
/// [`crate::Emulator::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Messages published into the queue: over HTTP, by seeding, by `publish_raw`, and
    /// messages moved in from another queue when this is the dead-letter queue.
    pub published: u64,
    /// Deliveries made by pulls (a message delivered three times counts three times).
    pub delivered: u64,
    /// Messages deleted by an ack (each message counts once).
    pub acked: u64,
    /// Deliveries given back by an accepted retry entry.
    pub retried: u64,
    /// Deliveries with `attempts > 1`.
    pub redelivered: u64,
    /// Leases that ended by visibility timeout without an ack or a retry.
    pub expired: u64,
    /// Messages moved to the dead-letter queue after their last allowed delivery failed.
    pub dead_lettered: u64,
    /// Messages deleted after their last allowed delivery failed, when no dead-letter
    /// queue is configured.
    pub dropped: u64,
    /// Acks that deleted a message with a lease that had expired or been superseded by a
    /// newer delivery (accepted, as Cloudflare does).
    pub late_acks: u64,
    /// Acks for messages that were no longer in the queue (already acknowledged,
    /// dead-lettered or dropped); counted in `ackCount` without a warning.
    pub repeated_acks: u64,
    /// Entries of ack requests answered with a warning (unknown lease id, stale retry).
    pub warnings: u64,
    /// Unacknowledged messages in the queue, whatever their state
    /// (`message_backlog_count`).
    pub backlog: u64,
    /// Sum of the body sizes of the unacknowledged messages, in bytes.
    pub backlog_bytes: u64,
    /// Messages a pull could return right now.
    pub ready: u64,
    /// Messages waiting for a publish or retry delay to end.
    pub delayed: u64,
    /// Messages leased right now (their visibility timeout has not ended).
    pub in_flight: u64,
    /// Ids of the messages published here that were never acknowledged: those still in
    /// the queue (in publish order), then those dead-lettered or dropped (in that order).
    pub never_acked_ids: Vec<String>,
}

/// Best-effort queue metrics, as Cloudflare's `metadata.metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Metrics {
    /// Unacknowledged messages.
    pub backlog_count: u64,
    /// Their body sizes, in bytes.
    pub backlog_bytes: u64,
    /// Publish time of the oldest unacknowledged message (ms since the Unix epoch), 0 when
    /// the queue is empty.
    pub oldest_message_timestamp_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MessageState {
    Ready,
    Delayed,
    Leased,
}

/// A message as stored, with its pull representation encoded once at publish time.
#[derive(Debug)]
pub(crate) struct StoredMessage {
    /// The 128-bit message id (32 hex digits on the wire).
    pub id: u128,
    /// Publish time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Body size counted in `backlog_bytes`, in bytes.
    pub size: u64,
    /// The message's JSON object as a pull returns it, without `attempts`, `lease_id` and
    /// the closing brace (see `wire::message_head`).
    pub head: Bytes,
    attempts: u32,
    version: u32,
    state: MessageState,
}

impl StoredMessage {
    /// A new message that has never been delivered.
    pub fn new(id: u128, timestamp_ms: u64, size: u64, head: Bytes) -> Self {
        StoredMessage {
            id,
            timestamp_ms,
            size,
            head,
            attempts: 0,
            version: 0,
            state: MessageState::Ready,
        }
    }
}

/// One delivery made by a pull.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    /// The message's encoded head (shared with the stored message, not copied).
    pub head: Bytes,
    /// The delivery attempt, 1 for the first.
    pub attempts: u32,
    /// The lease this delivery holds.
    pub lease: Lease,
}

/// What an ack request achieved.
#[derive(Debug, Default)]
pub(crate) struct AckOutcome {
    /// Entries of `acks` accepted.
    pub ack_count: u64,
    /// Entries of `retries` accepted.
    pub retry_count: u64,
    /// Lease id -> reason, for entries that were not applied.
    pub warnings: Vec<(String, &'static str)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    due: Instant,
    seq: u64,
    version: u32,
}

/// Warning for a lease id this queue never issued.
pub(crate) const WARN_UNKNOWN_LEASE: &str = "unknown lease id";
/// Warning for a retry whose lease is no longer the message's current delivery.
pub(crate) const WARN_STALE_RETRY: &str =
    "lease expired or was superseded by a newer delivery; retry ignored";
/// Warning for a retry of a message that left the queue.
pub(crate) const WARN_RETRY_GONE: &str =
    "message is no longer in the queue (acknowledged, dead-lettered or dropped); retry ignored";

/// Heap entries tolerated beyond live timers before the heap is compacted.
const TIMER_SLACK: usize = 4096;

/// One queue.
#[derive(Debug)]
pub(crate) struct Queue {
    /// The account the queue belongs to.
    pub account_id: String,
    /// The queue id (also its name in this emulator).
    pub queue_id: String,
    /// When the queue was created (first used), ms since the Unix epoch.
    pub created_ms: u64,
    no: u32,
    epoch: u32,
    max_retries: u32,
    has_dead_letter_queue: bool,
    /// Whether the queue has an HTTP pull consumer (queue details list it, pulls work).
    http_pull_consumer: bool,
    messages: BTreeMap<u64, StoredMessage>,
    ready: VecDeque<(u64, u32)>,
    timers: BinaryHeap<Reverse<Timer>>,
    next_seq: u64,
    backlog_bytes: u64,
    leased_now: u64,
    delayed_now: u64,
    stats: QueueStats,
    dead_ids: Vec<u128>,
    dead_out: Vec<StoredMessage>,
}

impl Queue {
    /// An empty queue. `has_dead_letter_queue` says whether messages that exhaust their
    /// retries are handed to [`Queue::take_dead_letters`] (true) or dropped (false).
    pub fn new(
        no: u32,
        epoch: u32,
        account_id: &str,
        queue_id: &str,
        max_retries: u32,
        has_dead_letter_queue: bool,
        created_ms: u64,
    ) -> Self {
        Queue {
            account_id: account_id.to_owned(),
            queue_id: queue_id.to_owned(),
            created_ms,
            no,
            epoch,
            max_retries,
            has_dead_letter_queue,
            http_pull_consumer: true,
            messages: BTreeMap::new(),
            ready: VecDeque::new(),
            timers: BinaryHeap::new(),
            next_seq: 0,
            backlog_bytes: 0,
            leased_now: 0,
            delayed_now: 0,
            stats: QueueStats::default(),
            dead_ids: Vec::new(),
            dead_out: Vec::new(),
        }
    }

    /// Whether failed messages go to a dead-letter queue.
    pub fn has_dead_letter_queue(&self) -> bool {
        self.has_dead_letter_queue
    }

    /// Whether the queue has an HTTP pull consumer (true unless set otherwise).
    pub fn has_http_pull_consumer(&self) -> bool {
        self.http_pull_consumer
    }

    /// Attaches or removes the queue's HTTP pull consumer. Without one, queue details list
    /// no consumer and pulls are refused; messages and leases are kept.
    pub fn set_http_pull_consumer(&mut self, attached: bool) {
        self.http_pull_consumer = attached;
    }

    /// Messages published into this queue so far.
    pub fn published(&self) -> u64 {
        self.stats.published
    }

    /// The retry limit of this queue's consumer.
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// Applies every timer due at `now`: delays that ended make messages ready, leases
    /// that expired make them ready again or, past the retry limit, remove them.
    pub fn advance(&mut self, now: Instant) {
        while let Some(Reverse(timer)) = self.timers.peek().copied() {
            if timer.due > now {
                break;
            }
            self.timers.pop();
            let Some(message) = self.messages.get_mut(&timer.seq) else {
                continue;
            };
            if message.version != timer.version {
                continue;
            }
            match message.state {
                MessageState::Delayed => {
                    self.delayed_now -= 1;
                    message.state = MessageState::Ready;
                    message.version += 1;
                    self.ready.push_back((timer.seq, message.version));
                }
                MessageState::Leased => {
                    self.stats.expired += 1;
                    self.fail_delivery(timer.seq, None);
                }
                MessageState::Ready => {}
            }
        }
    }

    /// Handles a failed delivery of a leased message: back to ready (after `delay`, if
    /// any), or out of the queue when the retry limit is reached.
    fn fail_delivery(&mut self, seq: u64, delay: Option<(Instant, Duration)>) {
        let Some(message) = self.messages.get_mut(&seq) else {
            return;
        };
        debug_assert_eq!(message.state, MessageState::Leased);
        self.leased_now -= 1;
        message.state = MessageState::Ready;
        if message.attempts >= self.max_retries {
            self.kill(seq);
            return;
        }
        message.version += 1;
        match delay {
            Some((now, delay)) if !delay.is_zero() => {
                message.state = MessageState::Delayed;
                self.delayed_now += 1;
                self.timers.push(Reverse(Timer {
                    due: now + delay,
                    seq,
                    version: message.version,
                }));
                self.compact_timers();
            }
            _ => {
                message.state = MessageState::Ready;
                self.ready.push_back((seq, message.version));
            }
        }
    }

    /// Removes a message whose last allowed delivery failed.
    fn kill(&mut self, seq: u64) {
        let Some(message) = self.remove(seq) else {
            return;
        };
        self.dead_ids.push(message.id);
        if self.has_dead_letter_queue {
            self.stats.dead_lettered += 1;
            self.dead_out.push(message);
        } else {
            self.stats.dropped += 1;
        }
    }

    /// Removes a message from the queue, keeping the gauges right.
    fn remove(&mut self, seq: u64) -> Option<StoredMessage> {
        let message = self.messages.remove(&seq)?;
        self.backlog_bytes -= message.size;
        match message.state {
            MessageState::Leased => self.leased_now -= 1,
            MessageState::Delayed => self.delayed_now -= 1,
            MessageState::Ready => {}
        }
        Some(message)
    }

    /// Drops heap entries of messages that changed state, once they dominate the heap.
    fn compact_timers(&mut self) {
        let live = (self.leased_now + self.delayed_now) as usize;
        if self.timers.len() <= 2 * live + TIMER_SLACK {
            return;
        }
        let messages = &self.messages;
        self.timers.retain(|Reverse(timer)| {
            messages
                .get(&timer.seq)
                .is_some_and(|m| m.version == timer.version && m.state != MessageState::Ready)
        });
    }

    /// Adds a message; it becomes deliverable after `delay` (at once when zero).
    pub fn publish(&mut self, now: Instant, mut message: StoredMessage, delay: Duration) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stats.published += 1;
        self.backlog_bytes += message.size;
        message.attempts = 0;
        message.version = 0;
        if delay.is_zero() {
            message.state = MessageState::Ready;
            self.ready.push_back((seq, 0));
        } else {
            message.state = MessageState::Delayed;
            self.delayed_now += 1;
            self.timers.push(Reverse(Timer {
                due: now + delay,
                seq,
                version: 0,
            }));
        }
        self.messages.insert(seq, message);
    }

    /// Leases up to `batch_size` ready messages for `visibility_timeout`, oldest first.
    pub fn pull(
        &mut self,
        now: Instant,
        batch_size: usize,
        visibility_timeout: Duration,
    ) -> Vec<Delivery> {
        self.advance(now);
        let mut out = Vec::with_capacity(batch_size.min(self.ready.len()));
        let due = now + visibility_timeout;
        while out.len() < batch_size {
            let Some((seq, version)) = self.ready.pop_front() else {
                break;
            };
            let Some(message) = self.messages.get_mut(&seq) else {
                continue;
            };
            if message.version != version || message.state != MessageState::Ready {
                continue;
            }
            message.attempts += 1;
            message.version += 1;
            message.state = MessageState::Leased;
            self.timers.push(Reverse(Timer {
                due,
                seq,
                version: message.version,
            }));
            self.stats.delivered += 1;
            if message.attempts > 1 {
                self.stats.redelivered += 1;
            }
            out.push(Delivery {
                head: message.head.clone(),
                attempts: message.attempts,
                lease: Lease {
                    queue_no: self.no,
                    epoch: self.epoch,
                    seq,
                    version: message.version,
                },
            });
        }
        self.leased_now += out.len() as u64;
        self.compact_timers();
        out
    }

    /// Resolves a lease id to a sequence number and version, if this queue issued it.
    fn resolve(&self, lease_id: &str) -> Option<(u64, u32)> {
        let lease = Lease::parse(lease_id)?;
        if lease.queue_no != self.no || lease.epoch != self.epoch || lease.seq >= self.next_seq {
            return None;
        }
        if let Some(message) = self.messages.get(&lease.seq) {
            if lease.version > message.version {
                return None;
            }
        }
        Some((lease.seq, lease.version))
    }

    /// Applies acks, then retries (each with its delay). Unknown lease ids and retries of
    /// deliveries that are no longer current give warnings; acks are permissive (see
    /// [`QueueStats::late_acks`] and [`QueueStats::repeated_acks`]).
    pub fn ack<'a>(
        &mut self,
        now: Instant,
        acks: impl IntoIterator<Item = &'a str>,
        retries: impl IntoIterator<Item = (&'a str, Duration)>,
    ) -> AckOutcome {
        self.advance(now);
        let mut outcome = AckOutcome::default();
        for lease_id in acks {
            let Some((seq, version)) = self.resolve(lease_id) else {
                self.stats.warnings += 1;
                outcome
                    .warnings
                    .push((lease_id.to_owned(), WARN_UNKNOWN_LEASE));
                continue;
            };
            outcome.ack_count += 1;
            match self.remove(seq) {
                Some(message) => {
                    self.stats.acked += 1;
                    if message.state != MessageState::Leased || message.version != version {
                        self.stats.late_acks += 1;
                    }
                }
                None => self.stats.repeated_acks += 1,
            }
        }
        for (lease_id, delay) in retries {
            let Some((seq, version)) = self.resolve(lease_id) else {
                self.stats.warnings += 1;
                outcome
                    .warnings
                    .push((lease_id.to_owned(), WARN_UNKNOWN_LEASE));
                continue;
            };
            let current = match self.messages.get(&seq) {
                None => Err(WARN_RETRY_GONE),
                Some(m) if m.state == MessageState::Leased && m.version == version => Ok(()),
                Some(_) => Err(WARN_STALE_RETRY),
            };
            match current {
                Ok(()) => {
                    outcome.retry_count += 1;
                    self.stats.retried += 1;
                    self.fail_delivery(seq, Some((now, delay)));
                }
                Err(warning) => {
                    self.stats.warnings += 1;
                    outcome.warnings.push((lease_id.to_owned(), warning));
                }
            }
        }
        outcome
    }

    /// The queue's current metrics.
    pub fn metrics(&self) -> Metrics {
        Metrics {
            backlog_count: self.messages.len() as u64,
            backlog_bytes: self.backlog_bytes,
            oldest_message_timestamp_ms: self
                .messages
                .values()
                .next()
                .map_or(0, |m| m.timestamp_ms),
        }
    }

    /// Messages that exhausted their retries since the last call, for the dead-letter
    /// queue.
    pub fn take_dead_letters(&mut self) -> Vec<StoredMessage> {
        std::mem::take(&mut self.dead_out)
    }

    /// A snapshot of the counters and contents.
    pub fn stats(&self) -> QueueStats {
        let mut stats = self.stats.clone();
        stats.backlog = self.messages.len() as u64;
        stats.backlog_bytes = self.backlog_bytes;
        stats.in_flight = self.leased_now;
        stats.delayed = self.delayed_now;
        stats.ready = stats.backlog - self.leased_now - self.delayed_now;
        stats.never_acked_ids = self
            .messages
            .values()
            .map(|m| m.id)
            .chain(self.dead_ids.iter().copied())
            .map(format_id)
            .collect();
        stats
    }
}

/// Formats a message id as 32 lowercase hex digits.
pub(crate) fn format_id(id: u128) -> String {
    format!("{id:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(max_retries: u32, dlq: bool) -> Queue {
        Queue::new(1, 9, "acct", "q", max_retries, dlq, 0)
    }

    fn message(id: u128) -> StoredMessage {
        StoredMessage::new(id, 1000 + id as u64, 10, Bytes::from_static(b"{}"))
    }

    fn lease_text(delivery: &Delivery) -> String {
        let mut out = Vec::new();
        delivery.lease.write(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn pull_ack_round_trip_updates_gauges() {
        let mut q = queue(3, false);
        let now = Instant::now();
        for id in 0..3 {
            q.publish(now, message(id), Duration::ZERO);
        }
        let got = q.pull(now, 2, Duration::from_secs(30));
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].attempts, 1);
        let stats = q.stats();
        assert_eq!((stats.backlog, stats.in_flight, stats.ready), (3, 2, 1));
        let leases: Vec<String> = got.iter().map(lease_text).collect();
        let outcome = q.ack(now, leases.iter().map(String::as_str), []);
        assert_eq!(outcome.ack_count, 2);
        assert!(outcome.warnings.is_empty());
        let stats = q.stats();
        assert_eq!((stats.backlog, stats.in_flight, stats.acked), (1, 0, 2));
        assert_eq!(stats.backlog_bytes, 10);
        assert_eq!(q.metrics().oldest_message_timestamp_ms, 1002);
    }

    #[test]
    fn expiry_counts_attempts_and_drops_at_the_limit() {
        let mut q = queue(2, false);
        let start = Instant::now();
        q.publish(start, message(5), Duration::ZERO);
        let vt = Duration::from_millis(10);
        let first = q.pull(start, 1, vt);
        assert_eq!(first[0].attempts, 1);
        let second = q.pull(start + vt, 1, vt);
        assert_eq!(second[0].attempts, 2);
        assert!(q.pull(start + vt * 2, 1, vt).is_empty());
        let stats = q.stats();
        assert_eq!((stats.expired, stats.dropped, stats.backlog), (2, 1, 0));
        assert_eq!(stats.never_acked_ids, vec![format_id(5)]);
        // A late ack after the drop is still counted, without a warning.
        let outcome = q.ack(start + vt * 3, [lease_text(&first[0]).as_str()], []);
        assert_eq!((outcome.ack_count, outcome.warnings.len()), (1, 0));
    }

    #[test]
    fn timers_are_compacted() {
        let mut q = queue(3, false);
        let now = Instant::now();
        for round in 0..50u128 {
            for i in 0..200 {
                q.publish(now, message(round * 1000 + i), Duration::ZERO);
            }
            let got = q.pull(now, 200, Duration::from_secs(3600));
            let leases: Vec<String> = got.iter().map(lease_text).collect();
            q.ack(now, leases.iter().map(String::as_str), []);
        }
        assert!(q.timers.len() <= TIMER_SLACK + 200, "{}", q.timers.len());
    }
}
