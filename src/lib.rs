//! cfq-bridge: moves messages out of Cloudflare Queues (HTTP pull consumers) into Kafka,
//! NATS, stdout or JSONL files, at least once.
//!
//! A tour of the modules, in the order a message meets them:
//! - [`config`]: the TOML configuration, `${ENV}` interpolation, validation;
//! - [`cloudflare`]: the HTTP client for pull and ack, and its typed errors;
//! - [`decode`]: turns a pulled message into a [`cfq_sinks::Record`] by `CF-Content-Type`;
//! - [`pipeline`]: pullers, the in-flight bound, delivery to the sink, the acker, leases
//!   and shutdown. The invariant lives here: a lease is acknowledged only after the sink
//!   confirmed its record;
//! - [`stats`]: counters shared by the pipeline, the metrics exporter and summaries;
//! - `demo`: `cfq-bridge demo`, the pipeline on an embedded emulator (feature `emulator`);
//! - [`cli`]: the `run`, `check`, `emulator` and `demo` commands.
//!
//! Sinks live in the `cfq-sinks` crate (`sinks/`). The local Cloudflare Queues API used by
//! the `emulator` and `demo` commands, the tests and the benches is the `cfq-emulator` crate
//! (`emulator/`), compiled in with the default feature `emulator`.

pub mod cli;
pub mod cloudflare;
pub mod config;
pub mod decode;
#[cfg(feature = "emulator")]
pub mod demo;
pub mod pipeline;
pub mod stats;
