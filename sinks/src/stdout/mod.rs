//! The stdout sink: one JSON line per record, flushed before confirming.

use std::io::Write as _;

use async_trait::async_trait;

mod config;

pub use config::StdoutConfig;

use crate::{Outcome, Record, Sink, SinkError};

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
            Ok(Err(e)) => Outcome::Failed(SinkError::transient(format!("writing to stdout: {e}"))),
            Err(e) => Outcome::Failed(SinkError::transient(format!("stdout writer task: {e}"))),
        };
        vec![outcome; records.len()]
    }
}
