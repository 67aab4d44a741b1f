//! cfq-bridge: moves messages out of Cloudflare Queues (HTTP pull consumers) into Kafka,
//! NATS, stdout or JSONL files, at least once.
//!
//! A tour of the modules, in the order a message meets them:
//! - [`config`]: the TOML configuration, `${ENV}` interpolation, validation;
//! - [`cloudflare`]: the HTTP client for the Queues API, its wire types and errors (the
//!   `cfq-cloudflare` crate, `cloudflare/`, which the `cloudflare_queue` sink uses too);
//! - [`sources`]: where records come from, one folder each (`cloudflare`: pullers, body
//!   decoding, the acker and the ack journal);
//! - [`pipeline`]: the source-independent part: the in-flight bound, delivery to the
//!   sink, settlement and shutdown. The invariant lives in [`pipeline::delivery`]: nothing
//!   is settled as done before its sink confirmed it;
//! - [`stats`]: a route's counters, gauges and histograms, shared by the pipeline, the
//!   metrics exporter and summaries;
//! - [`metrics`]: the listener on `[metrics] listen` (`/metrics`, `/health`, `/ready`) and
//!   the catalogue of exported families;
//! - [`app`]: wiring: builds the client, source, sink and pipeline for a command;
//! - `replay`: `cfq-bridge replay` (feature `cloudflare_queue`), the archive source into the `cloudflare_queue` sink,
//!   with [`progress`] on stderr, a summary and exit codes;
//! - [`export`]: `cfq-bridge export`, a drain with [`progress`] and the [`summary`] report;
//! - `demo`: `cfq-bridge demo`, the pipeline on an embedded emulator (feature `emulator`);
//! - [`verify`]: `cfq-bridge archive verify`, every segment read to its end;
//! - [`doctor`]: `cfq-bridge doctor`, the preflight beyond `check`;
//! - [`top`]: `cfq-bridge top`, a live terminal view of a running bridge's `/metrics`;
//! - [`cli`]: argument parsing and dispatch.
//!
//! Sinks live in the `cfq-sinks` crate (`sinks/`), the emulator in `cfq-emulator`
//! (`emulator/`, compiled in with the default feature `emulator`). `docs/architecture.md`
//! draws the data flow and lists the steps to add a source or a sink.

pub mod app;
pub mod cli;
/// The Cloudflare Queues client, its wire types and errors: the `cfq-cloudflare` crate
/// (`cloudflare/`), shared with the sinks crate, under the path the bridge always used.
pub use cfq_cloudflare as cloudflare;
pub mod config;
#[cfg(feature = "emulator")]
pub mod demo;
pub mod doctor;
pub mod export;
pub mod log_throttle;
pub mod metrics;
pub mod pipeline;
pub mod progress;
#[cfg(feature = "cloudflare_queue")]
pub mod replay;
pub mod sources;
pub mod stats;
pub mod summary;
pub mod top;
pub mod verify;
