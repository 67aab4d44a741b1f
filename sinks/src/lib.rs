//! Sinks for cfq-bridge.
//!
//! A sink takes a batch of decoded [`Record`]s and answers, for each record, with an
//! [`Outcome`]. An outcome is final: [`Outcome::Confirmed`] means the destination has made
//! the record durable (fsync, broker delivery report, JetStream `PubAck`), and only then may
//! the bridge acknowledge the record's lease to Cloudflare. Everything else is a failure the
//! bridge will retry, release or dead-letter; a sink never confirms what it has not stored.
//!
//! Modules:
//! - [`record`]: the record a sink receives, its headers and its JSON line form;
//! - [`outcome`]: per-record outcomes and the error classes (transient, permanent);
//! - [`registry`]: what a sink's settings offer ([`SinkSettings`]), the delivery-strength
//!   gate, and the `register_sinks!` macro; the registration itself is below, in this file;
//! - [`compress`]: gzip members and zstd frames that concatenate, for archives;
//! - `parquet` (cargo feature `parquet`): records as Parquet files and back;
//! - [`config`]: the `[sink]` table ([`SinkConfig`]) and its validation;
//! - [`doctor`]: the sink side of `cfq-bridge doctor` (findings, worst confirmation times);
//! - `round`: the send / per-record outcome / dead-letter round the broker sinks share;
//! - one folder per sink: [`stdout`], [`jsonl`], and `kafka`, `nats`, `cloudflare_queue`
//!   `s3` whose clients sit behind the cargo features of the same names.
//!
//! Adding a sink: see the checklist in `docs/architecture.md` ("Adding a sink").

pub mod compress;
pub mod config;
pub mod doctor;
pub mod lock;
pub mod outcome;
#[cfg(feature = "parquet")]
pub mod parquet;
pub mod record;
pub mod registry;
#[cfg_attr(not(any(feature = "kafka", feature = "nats")), allow(dead_code))]
mod round;

use async_trait::async_trait;

pub use outcome::{ErrorClass, Outcome, SinkError};
pub use record::{ContentType, Record};
pub use registry::{SinkConfigError, SinkSettings, Weakening};

// The registration of every sink: `type` name => folder::Variant(settings type). Each line
// declares the folder's module and adds the `[sink]` variant. Adding a sink is one line
// here plus its folder.
registry::register_sinks! {
    /// One JSON line per record on standard output, flushed before confirming. For piping
    /// and debugging: standard output is not a durable export.
    "stdout" => stdout::Stdout(StdoutConfig),
    /// One JSON line per record appended to a file, fsynced per batch before confirming.
    "jsonl" => jsonl::Jsonl(JsonlConfig),
    /// Records produced to Kafka, confirmed on the delivery report.
    "kafka" => kafka::Kafka(KafkaConfig),
    /// Records published to NATS (JetStream by default), confirmed on the `PubAck`.
    "nats" => nats::Nats(NatsConfig),
    /// Records published into a Cloudflare queue, confirmed when the batch call answered
    /// `success: true`.
    "cloudflare_queue" => cloudflare_queue::CloudflareQueue(CloudflareQueueConfig),
    /// Records archived as objects in an S3-compatible bucket (S3, R2, MinIO), JSONL or
    /// Parquet, confirmed when the object holding them is written.
    "s3" => s3::S3(S3Config),
}

/// What the bridge knows that a sink may need to judge its own settings in `check`.
#[derive(Debug, Clone, Copy)]
pub struct CheckContext {
    /// The visibility timeout the bridge pulls with, in milliseconds. A sink whose own
    /// delivery timeout is longer than this may confirm a record after its lease expired.
    pub visibility_timeout_ms: u64,
    /// The longest delay, in seconds, the bridge asks Cloudflare to wait before redelivering
    /// a failed record. Deduplication windows should cover the lease plus this delay.
    pub max_retry_delay_secs: u64,
}

/// A destination for records.
///
/// Implementations must be safe to call concurrently: the bridge keeps several batches in
/// flight and calls [`Sink::deliver`] from several tasks at once.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// A short name for logs and metrics (`"jsonl"`, `"kafka"`, ...).
    fn kind(&self) -> &'static str;

    /// Delivers a batch and returns exactly one outcome per record, in the same order.
    ///
    /// The future resolves only when every outcome is final: a record reported as
    /// [`Outcome::Confirmed`] (or [`Outcome::Duplicate`], [`Outcome::DeadLettered`]) is
    /// durable at the destination.
    async fn deliver(&self, records: &[Record]) -> Vec<Outcome>;

    /// A cheap check that the destination is reachable. The bridge calls it while pulling
    /// is paused after transient failures, to learn when to resume.
    async fn ready(&self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Used by `cfq-bridge check`: verifies the destination as far as possible without
    /// writing a record, and returns warnings about settings that do not fit the bridge's.
    async fn check(&self, _ctx: &CheckContext) -> Result<Vec<String>, SinkError> {
        self.ready().await.map(|()| Vec::new())
    }

    /// Flushes anything buffered and releases connections. Called once at shutdown, after
    /// the last `deliver` has returned.
    async fn close(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Builds the sink a `[sink]` table describes: checks the settings (including the
/// delivery-strength gate), logs any weakening that was allowed, then opens files or
/// connects to brokers.
pub async fn build(config: &SinkConfig) -> Result<Box<dyn Sink>, SinkError> {
    registry::build(config.kind(), config.settings()).await
}
