//! The delivery round that every broker sink shares: send a batch, sort the answers per
//! record, send what the destination refused to the dead-letter destination, and turn it
//! all into one [`Outcome`] per record.
//!
//! A sink plugs in through [`Publisher`]: how a record becomes a message to its
//! destination, how a refused record becomes a message to the dead-letter destination, and
//! how a set of messages is sent. [`deliver`] does the rest, the same way for every sink:
//!
//! 1. every record is prepared; a record that cannot even be addressed (a template that
//!    does not expand, a header the protocol cannot carry) is refused at once;
//! 2. every prepared message is sent in one [`Publisher::send_all`] call, which puts all
//!    of them in flight before it awaits any confirmation;
//! 3. confirmed and duplicate records are final; transient failures are final for this
//!    batch (the bridge retries them); refusals wait for the dead-letter round;
//! 4. refused records are sent whole (body, headers, key) to the dead-letter destination
//!    in a second `send_all`. Only a record the dead-letter destination confirmed becomes
//!    [`Outcome::DeadLettered`]; one that it refused, or that cannot be carried there
//!    whole, is [`Outcome::Failed`] with the dead-letter reason appended, so that
//!    Cloudflare's retries and dead-letter queue keep it.

use std::future::Future;

use tracing::{debug, warn};

use crate::{ErrorClass, Outcome, Record, SinkError};

/// Why a destination refused a record for good, before the dead-letter round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The topic or subject the record was meant for, when it is known (a template that
    /// did not expand leaves it unknown or as the template itself).
    pub(crate) destination: Option<String>,
    /// Why it was refused, for the outcome, the logs and the dead-letter headers.
    pub(crate) reason: String,
}

/// What the destination answered for one sent message.
#[derive(Debug)]
pub(crate) enum Sent {
    /// Stored durably.
    Stored,
    /// The destination already held it (deduplicated); durable.
    Duplicate,
    /// Refused for good: retrying the same message cannot work.
    Refused(Refusal),
    /// Not stored; retrying later may work.
    Failed(SinkError),
}

/// What one sink brings to the shared round. Implemented per batch, so that state that
/// belongs to one batch (a producer handle, a deadline) lives in `self`.
pub(crate) trait Publisher: Send {
    /// A message ready to send, with its destination and headers.
    type Message: Send;

    /// The sink's `type` name, for logs.
    fn kind(&self) -> &'static str;

    /// Turns a record into a message to its primary destination, or refuses it.
    fn prepare(&self, record: &Record) -> Result<Self::Message, Refusal>;

    /// The configured dead-letter destination, if any.
    fn dead_letter_destination(&self) -> Option<&str>;

    /// Turns a refused record into a message to the dead-letter destination carrying the
    /// WHOLE record: its body, every header and its key, plus headers saying why. Errs,
    /// with the reason, when the record cannot travel there whole.
    fn prepare_dead_letter(
        &self,
        record: &Record,
        refusal: &Refusal,
    ) -> Result<Self::Message, String>;

    /// Sends every message (each tagged with its record's index in the batch) with all of
    /// them in flight at once, then awaits their confirmations. Returns one answer per
    /// message, in any order.
    fn send_all(
        &mut self,
        records: &[Record],
        messages: Vec<(usize, Self::Message)>,
    ) -> impl Future<Output = Vec<(usize, Sent)>> + Send;
}

/// Runs the whole round for one batch and returns exactly one outcome per record, in
/// order.
pub(crate) async fn deliver<P: Publisher>(publisher: &mut P, records: &[Record]) -> Vec<Outcome> {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; records.len()];
    let mut refusals: Vec<(usize, Refusal)> = Vec::new();

    let mut messages = Vec::with_capacity(records.len());
    for (index, record) in records.iter().enumerate() {
        match publisher.prepare(record) {
            Ok(message) => messages.push((index, message)),
            Err(refusal) => refusals.push((index, refusal)),
        }
    }
    if !messages.is_empty() {
        for (index, sent) in publisher.send_all(records, messages).await {
            match sent {
                Sent::Stored => outcomes[index] = Some(Outcome::Confirmed),
                Sent::Duplicate => {
                    debug!(message_id = %records[index].id, "the destination already held the record");
                    outcomes[index] = Some(Outcome::Duplicate);
                }
                Sent::Failed(error) => outcomes[index] = Some(Outcome::Failed(error)),
                Sent::Refused(refusal) => refusals.push((index, refusal)),
            }
        }
    }
    if !refusals.is_empty() {
        dead_letter(publisher, records, refusals, &mut outcomes).await;
    }

    let outcomes: Vec<Outcome> = outcomes
        .into_iter()
        .map(|outcome| {
            // Every index is given exactly one outcome above; this fallback only keeps a
            // slip from ever turning into an acknowledgement.
            outcome.unwrap_or_else(|| {
                Outcome::Failed(SinkError::transient(
                    "internal error: record left without an outcome",
                ))
            })
        })
        .collect();
    log_failures(publisher.kind(), &outcomes);
    outcomes
}

/// The second round: refused records to the dead-letter destination, whole, or failed.
async fn dead_letter<P: Publisher>(
    publisher: &mut P,
    records: &[Record],
    refusals: Vec<(usize, Refusal)>,
    outcomes: &mut [Option<Outcome>],
) {
    let Some(destination) = publisher.dead_letter_destination().map(str::to_owned) else {
        for (index, refusal) in refusals {
            debug!(message_id = %records[index].id, reason = %refusal.reason, "record refused");
            outcomes[index] = Some(Outcome::Failed(SinkError::permanent(refusal.reason)));
        }
        return;
    };
    let mut reasons: Vec<Option<String>> = vec![None; records.len()];
    let mut messages = Vec::with_capacity(refusals.len());
    for (index, refusal) in refusals {
        match publisher.prepare_dead_letter(&records[index], &refusal) {
            Ok(message) => {
                messages.push((index, message));
                reasons[index] = Some(refusal.reason);
            }
            Err(why) => {
                outcomes[index] = Some(Outcome::Failed(SinkError::permanent(format!(
                    "{}; it cannot be dead-lettered to {destination} whole: {why}",
                    refusal.reason
                ))));
            }
        }
    }
    if messages.is_empty() {
        return;
    }
    for (index, sent) in publisher.send_all(records, messages).await {
        let reason = reasons[index].take().unwrap_or_default();
        let failed_too = |class: ErrorClass, why: &str| {
            Outcome::Failed(SinkError {
                class,
                message: format!("{reason}; dead-lettering to {destination} failed too: {why}"),
            })
        };
        let outcome = match sent {
            Sent::Stored | Sent::Duplicate => {
                warn!(
                    sink = publisher.kind(),
                    message_id = %records[index].id,
                    dead_letter = %destination,
                    reason = %reason,
                    "record dead-lettered"
                );
                Outcome::DeadLettered {
                    reason: reason.clone(),
                }
            }
            Sent::Refused(refusal) => failed_too(ErrorClass::Permanent, &refusal.reason),
            Sent::Failed(error) => failed_too(error.class, &error.message),
        };
        outcomes[index] = Some(outcome);
    }
}

/// One warning per batch with failures, counted by class.
fn log_failures(kind: &'static str, outcomes: &[Outcome]) {
    let mut failed = 0usize;
    let mut transient = 0usize;
    let mut first: Option<&SinkError> = None;
    for outcome in outcomes {
        if let Outcome::Failed(error) = outcome {
            failed += 1;
            transient += usize::from(error.is_transient());
            first.get_or_insert(error);
        }
    }
    match first {
        Some(first) => warn!(
            sink = kind,
            records = outcomes.len(),
            failed,
            transient,
            permanent = failed - transient,
            first_error = %first.message,
            "delivery failed for some records"
        ),
        None => debug!(sink = kind, records = outcomes.len(), "batch confirmed"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::ContentType;

    fn record(id: &str, body: &'static [u8]) -> Record {
        Record {
            id: id.into(),
            queue_id: Arc::from("q"),
            timestamp_ms: 1,
            attempts: 1,
            content_type: ContentType::Text,
            metadata: serde_json::Map::new(),
            body: Bytes::from_static(body),
        }
    }

    /// A fake destination: answers per record id; the dead-letter destination stores
    /// whatever it is sent unless its id is listed in `dead_refuses`.
    struct Fake {
        answers: HashMap<&'static str, &'static str>,
        dead_letter: Option<&'static str>,
        dead_refuses: Vec<&'static str>,
        cannot_carry: Vec<&'static str>,
        /// (destination, record id, body) of every message sent, in send order.
        sent: Vec<(String, String, Bytes)>,
        calls: usize,
    }

    impl Publisher for Fake {
        type Message = (String, String, Bytes);

        fn kind(&self) -> &'static str {
            "fake"
        }

        fn prepare(&self, record: &Record) -> Result<Self::Message, Refusal> {
            if self.answers.get(record.id.as_str()) == Some(&"unaddressable") {
                return Err(Refusal {
                    destination: None,
                    reason: "no destination".into(),
                });
            }
            Ok(("main".into(), record.id.clone(), record.body.clone()))
        }

        fn dead_letter_destination(&self) -> Option<&str> {
            self.dead_letter
        }

        fn prepare_dead_letter(
            &self,
            record: &Record,
            _refusal: &Refusal,
        ) -> Result<Self::Message, String> {
            if self.cannot_carry.contains(&record.id.as_str()) {
                return Err("header cannot travel".into());
            }
            Ok(("dead".into(), record.id.clone(), record.body.clone()))
        }

        async fn send_all(
            &mut self,
            _records: &[Record],
            messages: Vec<(usize, Self::Message)>,
        ) -> Vec<(usize, Sent)> {
            self.calls += 1;
            let mut answers = Vec::new();
            for (index, message) in messages {
                let id = message.1.as_str();
                let sent = if message.0 == "dead" {
                    if self.dead_refuses.contains(&id) {
                        Sent::Refused(Refusal {
                            destination: Some("dead".into()),
                            reason: "too large for dead".into(),
                        })
                    } else {
                        Sent::Stored
                    }
                } else {
                    match self.answers.get(id).copied().unwrap_or("ok") {
                        "dup" => Sent::Duplicate,
                        "down" => Sent::Failed(SinkError::transient("down")),
                        "refuse" => Sent::Refused(Refusal {
                            destination: Some("main".into()),
                            reason: "too large".into(),
                        }),
                        _ => Sent::Stored,
                    }
                };
                self.sent.push(message);
                answers.push((index, sent));
            }
            // Answers in reverse order: the round must not rely on order.
            answers.reverse();
            answers
        }
    }

    fn fake(answers: &[(&'static str, &'static str)], dead: Option<&'static str>) -> Fake {
        Fake {
            answers: answers.iter().copied().collect(),
            dead_letter: dead,
            dead_refuses: Vec::new(),
            cannot_carry: Vec::new(),
            sent: Vec::new(),
            calls: 0,
        }
    }

    #[tokio::test]
    async fn each_answer_becomes_its_records_outcome_in_order() {
        let records = [
            record("a", b"1"),
            record("b", b"2"),
            record("c", b"3"),
            record("d", b"4"),
        ];
        let mut fake = fake(
            &[("b", "dup"), ("c", "down"), ("d", "refuse")],
            Some("dead"),
        );
        let outcomes = deliver(&mut fake, &records).await;
        assert_eq!(outcomes[0], Outcome::Confirmed);
        assert_eq!(outcomes[1], Outcome::Duplicate);
        assert!(matches!(&outcomes[2], Outcome::Failed(e) if e.is_transient()));
        assert_eq!(
            outcomes[3],
            Outcome::DeadLettered {
                reason: "too large".into()
            }
        );
        // One send for the batch, one for the dead-letter round; the dead-lettered copy
        // is the whole body.
        assert_eq!(fake.calls, 2);
        assert_eq!(
            fake.sent.last(),
            Some(&("dead".into(), "d".into(), Bytes::from_static(b"4")))
        );
    }

    #[tokio::test]
    async fn without_a_dead_letter_destination_refusals_fail_permanently() {
        let records = [record("a", b"1"), record("u", b"2")];
        let mut fake = fake(&[("a", "refuse"), ("u", "unaddressable")], None);
        let outcomes = deliver(&mut fake, &records).await;
        for outcome in &outcomes {
            assert!(
                matches!(outcome, Outcome::Failed(e) if e.class == ErrorClass::Permanent),
                "{outcome:?}"
            );
        }
        assert_eq!(fake.calls, 1);
    }

    #[tokio::test]
    async fn a_record_that_cannot_be_dead_lettered_whole_is_never_dead_lettered() {
        let records = [
            record("big", b"xxxx"),
            record("odd", b"y"),
            record("u", b"z"),
        ];
        let mut fake = fake(
            &[("big", "refuse"), ("odd", "refuse"), ("u", "unaddressable")],
            Some("dead"),
        );
        fake.dead_refuses.push("big");
        fake.cannot_carry.push("odd");
        let outcomes = deliver(&mut fake, &records).await;
        let Outcome::Failed(error) = &outcomes[0] else {
            panic!("{outcomes:?}");
        };
        assert_eq!(error.class, ErrorClass::Permanent);
        assert!(
            error.message.contains("dead-lettering to dead failed too"),
            "{error}"
        );
        let Outcome::Failed(error) = &outcomes[1] else {
            panic!("{outcomes:?}");
        };
        assert_eq!(error.class, ErrorClass::Permanent);
        assert!(error.message.contains("cannot be dead-lettered"), "{error}");
        assert_eq!(
            outcomes[2],
            Outcome::DeadLettered {
                reason: "no destination".into()
            }
        );
    }
}
