//! The stdout sink: one JSON line per record, flushed before confirming.
//!
//! For piping and debugging. A flush hands the bytes to whatever is behind standard
//! output; nothing is synced to disk, so redirecting it to a file is not a durable export.

use std::io::Write as _;

use async_trait::async_trait;

mod config;

pub use config::StdoutConfig;

use crate::{ErrorClass, Outcome, Record, Sink, SinkError};

/// Failures of the stdout sink. All transient: a closed or full pipe may be fixed by the
/// operator, and nothing was confirmed.
#[derive(Debug, thiserror::Error)]
pub enum StdoutError {
    /// Writing or flushing standard output failed.
    #[error("writing to stdout: {0}")]
    Write(#[from] std::io::Error),
    /// The blocking writer task panicked or was cancelled.
    #[error("stdout writer task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl StdoutError {
    /// Whether retrying later can help: always [`ErrorClass::Transient`].
    pub fn class(&self) -> ErrorClass {
        ErrorClass::Transient
    }
}

impl From<StdoutError> for SinkError {
    fn from(error: StdoutError) -> Self {
        SinkError {
            class: error.class(),
            message: error.to_string(),
        }
    }
}

/// Writes records as JSON lines to standard output.
#[derive(Debug, Default)]
pub struct StdoutSink {}

impl StdoutSink {
    /// A sink writing to this process's standard output.
    pub fn new() -> Self {
        StdoutSink {}
    }
}

#[async_trait]
impl Sink for StdoutSink {
    fn kind(&self) -> &'static str {
        "stdout"
    }

    async fn deliver(&self, records: &[Record]) -> Vec<Outcome> {
        let mut buf = Vec::with_capacity(records.len() * 256);
        for record in records {
            record.write_json_line(&mut buf);
        }
        let written = tokio::task::spawn_blocking(move || {
            let mut out = std::io::stdout().lock();
            out.write_all(&buf)?;
            out.flush()
        })
        .await;
        let outcome = match written {
            Ok(Ok(())) => Outcome::Confirmed,
            Ok(Err(e)) => Outcome::Failed(StdoutError::from(e).into()),
            Err(e) => Outcome::Failed(StdoutError::from(e).into()),
        };
        vec![outcome; records.len()]
    }
}
