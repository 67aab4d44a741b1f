//! The pipeline's contract with any source, shown with a source that is not Cloudflare:
//! an in-memory list of records whose tickets are their indexes.
//!
//! - Only records the sink confirmed come back as done, and every other record comes back
//!   as a retry, exactly once each.
//! - The in-flight bound holds: the source never has more records read and unsettled
//!   than `max_in_flight`.
//! - A source that reports itself exhausted ends the run with `StopReason::Drained`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cfq_bridge::pipeline::{
    self, Feed, PipelineOptions, Settlement, Source, SourceBatch, StopReason,
};
use cfq_bridge::stats::Stats;
use cfq_sinks::{ContentType, Outcome, Record, Sink, SinkError};

const RECORDS: u64 = 1_000;
const BATCH: u32 = 25;
const MAX_IN_FLIGHT: u32 = 100;

/// Reads `RECORDS` records in batches and remembers how each was settled.
#[derive(Default)]
struct MemorySource {
    done: Mutex<Vec<u64>>,
    retried: Mutex<Vec<(u64, u64)>>,
    /// Read and not yet settled, and the most ever seen.
    unsettled: AtomicU64,
    most_unsettled: AtomicU64,
}

fn record(index: u64) -> Record {
    Record {
        id: format!("m{index}"),
        queue_id: Arc::from("memory"),
        timestamp_ms: 1_700_000_000_000 + index,
        attempts: 1 + (index % 3) as u32,
        content_type: ContentType::Text,
        metadata: serde_json::Map::new(),
        body: Bytes::from(format!("body {index}")),
    }
}

#[async_trait]
impl Source for MemorySource {
    type Ticket = u64;

    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn run(self: Arc<Self>, feed: Feed<u64>) {
        let mut next = 0;
        while next < RECORDS {
            let Some(room) = feed.reserve(BATCH).await else {
                return;
            };
            let end = (next + BATCH as u64).min(RECORDS);
            let tickets: Vec<u64> = (next..end).collect();
            let records = tickets.iter().map(|&i| record(i)).collect();
            let in_flight = room.take(tickets.len());
            let now = self
                .unsettled
                .fetch_add(tickets.len() as u64, Ordering::AcqRel)
                + tickets.len() as u64;
            self.most_unsettled.fetch_max(now, Ordering::AcqRel);
            next = end;
            feed.deliver(SourceBatch {
                records,
                tickets,
                deadline: None,
                in_flight,
            });
        }
        feed.exhausted();
    }

    async fn settle(&self, settlement: Settlement<u64>) {
        let n = (settlement.done.len() + settlement.retry.len()) as u64;
        self.done
            .lock()
            .unwrap()
            .extend(settlement.done.into_iter().map(|c| c.into_ticket()));
        self.retried.lock().unwrap().extend(
            settlement
                .retry
                .into_iter()
                .map(|r| (r.ticket, r.delay_secs)),
        );
        // Settled before the room is returned, so the count never undercounts.
        self.unsettled.fetch_sub(n, Ordering::AcqRel);
        drop(settlement.in_flight);
    }

    async fn finish(&self, _feed: &Feed<u64>) -> u64 {
        0
    }
}

/// Confirms records whose index is a multiple of 3, dead-letters those ≡ 1 (mod 5),
/// refuses the rest for good; slow enough that batches overlap.
struct PickySink;

fn confirmed(index: u64) -> bool {
    index.is_multiple_of(3) || index % 5 == 1
}

#[async_trait]
impl Sink for PickySink {
    fn kind(&self) -> &'static str {
        "picky"
    }

    async fn deliver(&self, records: &[Record]) -> Vec<Outcome> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        records
            .iter()
            .map(|r| {
                let index: u64 = r.id[1..].parse().unwrap();
                if index.is_multiple_of(3) {
                    Outcome::Confirmed
                } else if index % 5 == 1 {
                    Outcome::DeadLettered {
                        reason: "test".into(),
                    }
                } else {
                    Outcome::Failed(SinkError::permanent("refused by the test sink"))
                }
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_confirmed_records_are_done_and_the_bound_holds() {
    let source = Arc::new(MemorySource::default());
    let options = PipelineOptions {
        max_in_flight: MAX_IN_FLIGHT,
        deadline_margin: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(5),
        retry_base_delay_secs: 2,
        retry_max_delay_secs: 60,
    };
    let summary = pipeline::run(
        Arc::clone(&source),
        Arc::new(PickySink),
        Arc::new(Stats::default()),
        options,
        std::future::pending(),
    )
    .await
    .expect("the run ends when the source is exhausted");
    assert_eq!(summary.reason, StopReason::Drained);

    let done: Vec<u64> = source.done.lock().unwrap().clone();
    let retried: Vec<(u64, u64)> = source.retried.lock().unwrap().clone();
    let done_set: HashSet<u64> = done.iter().copied().collect();
    assert_eq!(
        done.len(),
        done_set.len(),
        "a record was settled as done twice"
    );
    let expected: HashSet<u64> = (0..RECORDS).filter(|&i| confirmed(i)).collect();
    assert_eq!(
        done_set, expected,
        "done must be exactly the confirmed records"
    );

    let retried_set: HashSet<u64> = retried.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        retried.len(),
        retried_set.len(),
        "a record was retried twice"
    );
    let refused: HashSet<u64> = (0..RECORDS).filter(|&i| !confirmed(i)).collect();
    assert_eq!(
        retried_set, refused,
        "every refused record comes back as a retry"
    );
    // Refused records are retried with the failure delay of their attempt (2 s doubling).
    for (index, delay) in &retried {
        let attempts = 1 + (index % 3) as u32;
        assert_eq!(*delay, 2u64 << (attempts - 1), "record {index}");
    }

    let most = source.most_unsettled.load(Ordering::Acquire);
    assert!(
        most <= MAX_IN_FLIGHT as u64,
        "{most} records read and unsettled at once, bound {MAX_IN_FLIGHT}"
    );
    assert!(
        most > BATCH as u64,
        "batches overlapped (otherwise the bound was not exercised): {most}"
    );
    assert_eq!(source.unsettled.load(Ordering::Acquire), 0);
    assert_eq!(summary.stats.confirmed, expected.len() as u64);
}
