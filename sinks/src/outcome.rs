//! Per-record outcomes of a delivery, and how a failure should be treated.
//!
//! The contract every sink keeps: an outcome other than [`Outcome::Failed`] lets the
//! bridge settle the record as done (for Cloudflare, acknowledge its lease), so it must
//! only be given once the record, whole, is durable at the destination or at the
//! dead-letter destination.

use std::fmt;

/// The final answer of a sink for one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination has made the record durable. The lease may be acknowledged.
    Confirmed,
    /// The destination reports that it already held this record (for example a JetStream
    /// `PubAck` with `duplicate: true`). It is durable; the lease may be acknowledged, and
    /// the bridge counts a deduplicated redelivery.
    Duplicate,
    /// The record could not be stored at its destination, and the sink's configured
    /// dead-letter destination has made the WHOLE record durable: its body, byte for byte,
    /// and every header (metadata and `cf-queue-*` fields; a key where the destination has
    /// one), plus headers saying why. The lease may be acknowledged, since the record now
    /// exists there and nowhere else.
    ///
    /// Never report this for a partial copy (an empty or cut body, dropped headers). A
    /// record that cannot travel to the dead-letter destination whole (too large for it
    /// too, a header it cannot carry) is [`Outcome::Failed`] with
    /// [`ErrorClass::Permanent`], so that Cloudflare's retries and dead-letter queue keep
    /// it.
    DeadLettered {
        /// Why the primary destination refused the record.
        reason: String,
    },
    /// The record was not stored. The lease must not be acknowledged.
    Failed(SinkError),
}

impl Outcome {
    /// True when the record is durable somewhere and its lease may be acknowledged.
    pub fn is_confirmed(&self) -> bool {
        !matches!(self, Outcome::Failed(_))
    }
}

/// Whether retrying soon can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The destination is unavailable (disconnected, timed out, disk full). Retrying the
    /// same record later is expected to work; the bridge stops pulling until the sink is
    /// ready again instead of burning the message's delivery attempts.
    Transient,
    /// The destination refuses this record (too large, no such topic or stream, not
    /// authorized). The bridge releases it with a growing delay so that Cloudflare's own
    /// `max_retries` and dead-letter queue take over.
    Permanent,
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        })
    }
}

/// A sink failure, for one record or for the sink as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class} sink error: {message}")]
pub struct SinkError {
    /// How the bridge should treat the failure.
    pub class: ErrorClass,
    /// A human-readable description. Never contains secrets.
    pub message: String,
}

impl SinkError {
    /// A failure that retrying later is expected to fix.
    pub fn transient(message: impl Into<String>) -> Self {
        SinkError {
            class: ErrorClass::Transient,
            message: message.into(),
        }
    }

    /// A failure that retrying soon will not fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        SinkError {
            class: ErrorClass::Permanent,
            message: message.into(),
        }
    }

    /// True for [`ErrorClass::Transient`].
    pub fn is_transient(&self) -> bool {
        self.class == ErrorClass::Transient
    }
}
