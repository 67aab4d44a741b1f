//! The sink side of `cfq-bridge doctor`: findings (`ok`, `warn`, `fail`, each with what to
//! do), how long a sink may take at worst to confirm a record, and checks of the
//! destination that go beyond [`crate::Sink::check`].
//!
//! Doctoring works from a sink's settings, not from an open sink: [`SinkDoctor`] is
//! implemented by each settings type (`kafka::doctor`, `nats::doctor`, `s3::doctor`, and
//! below for the sinks that need nothing more), and [`for_config`] picks it for a
//! `[sink]` table. A doctor opens its own short-lived connections (a Kafka admin client, a
//! NATS connection) and never writes a record.
//!
//! The rule every sink is held to: the visibility timeout must outlast the longest time
//! the sink may take to confirm a record, with a margin for the pull before and the ack
//! after ([`with_margin`]). Otherwise a record can be confirmed after its lease ended, and
//! Cloudflare delivers it again.

use std::fmt;

use async_trait::async_trait;

use crate::{CheckContext, SinkConfig};

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Checked and fine.
    Ok,
    /// Works, but something is likely to go wrong or cost duplicates.
    Warn,
    /// Will not work, or can lose the at-least-once promise: fix before running.
    Fail,
}

impl Level {
    /// `ok`, `warn` or `fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }
}

/// One line of `doctor` output: what was found, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How serious it is.
    pub level: Level,
    /// What was checked and found, in a sentence. Never holds a secret.
    pub what: String,
    /// What to do about it (for `warn` and `fail`), in a sentence.
    pub fix: Option<String>,
}

impl Finding {
    /// A finding that needs nothing done.
    pub fn ok(what: impl Into<String>) -> Finding {
        Finding {
            level: Level::Ok,
            what: what.into(),
            fix: None,
        }
    }

    /// A warning, with what to do.
    pub fn warn(what: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            level: Level::Warn,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }

    /// A failure, with what to do.
    pub fn fail(what: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            level: Level::Fail,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Finding {
    /// `LEVEL  WHAT  FIX`: the level padded to four characters, fields two spaces apart.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4}  {}", self.level.as_str(), self.what)?;
        if let Some(fix) = &self.fix {
            write!(f, "  {fix}")?;
        }
        Ok(())
    }
}

/// What the bridge knows that a sink's doctor may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoctorContext {
    /// The visibility timeout the bridge pulls with, in milliseconds; `None` for an
    /// archive source, whose records hold no lease.
    pub visibility_timeout_ms: Option<u64>,
    /// The longest delay, in seconds, the bridge asks for before a failed record is
    /// delivered again.
    pub max_retry_delay_secs: u64,
}

impl DoctorContext {
    /// The same facts as `check` takes them, when there is a lease to outlast.
    pub fn check_context(&self) -> Option<CheckContext> {
        self.visibility_timeout_ms.map(|ms| CheckContext {
            visibility_timeout_ms: ms,
            max_retry_delay_secs: self.max_retry_delay_secs,
        })
    }
}

/// The longest a sink may take to confirm a record, from the moment it gets the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// Within the batch's own write (a file write and fsync, a flushed pipe): no timeout
    /// of the sink's to compare with the lease.
    Immediate {
        /// How the sink confirms, for the finding.
        how: &'static str,
    },
    /// Within `ms` milliseconds.
    Within {
        /// The bound, in milliseconds.
        ms: u64,
        /// What sets it, for the finding (`message.timeout.ms = 10000 ms`).
        what: String,
        /// The config key to lower instead of raising the visibility timeout.
        key: String,
        /// The smallest visibility timeout that covers it, in milliseconds.
        needed_visibility_ms: u64,
    },
}

/// `ms` plus a margin for the pull before the delivery and the ack after it: a tenth,
/// and at least one second.
pub fn with_margin(ms: u64) -> u64 {
    ms.saturating_add((ms / 10).max(1_000))
}

/// What `doctor` asks of a sink's settings.
#[async_trait]
pub trait SinkDoctor: Send + Sync {
    /// The longest the sink may take to confirm a record.
    fn confirmation(&self) -> Confirmation;

    /// Whether a visibility timeout of `visibility_timeout_ms` covers
    /// [`SinkDoctor::confirmation`]; `kind` names the sink.
    fn visibility_finding(&self, kind: &str, visibility_timeout_ms: u64) -> Finding {
        covers(kind, &self.confirmation(), visibility_timeout_ms)
    }

    /// Checks of the destination beyond `check`: what the sink needs there and whether it
    /// fits. Opens its own connections; writes nothing. Default: none.
    async fn doctor(&self, _ctx: &DoctorContext) -> Vec<Finding> {
        Vec::new()
    }
}

/// The generic rule: the visibility timeout must reach `confirmation`'s
/// `needed_visibility_ms`.
pub fn covers(kind: &str, confirmation: &Confirmation, visibility_timeout_ms: u64) -> Finding {
    match confirmation {
        Confirmation::Immediate { how } => Finding::ok(format!(
            "queue.visibility_timeout_ms ({visibility_timeout_ms} ms): the {kind} sink {how}, \
             with no timeout of its own to outlast"
        )),
        Confirmation::Within {
            what,
            key,
            needed_visibility_ms,
            ..
        } if visibility_timeout_ms < *needed_visibility_ms => Finding::fail(
            format!(
                "queue.visibility_timeout_ms ({visibility_timeout_ms} ms) does not cover the \
                 {kind} sink's worst confirmation time, {what}, with a margin for the pull \
                 and the ack: a record confirmed that late is delivered again"
            ),
            format!("set queue.visibility_timeout_ms >= {needed_visibility_ms} or lower {key}"),
        ),
        Confirmation::Within {
            what,
            needed_visibility_ms,
            ..
        } => Finding::ok(format!(
            "queue.visibility_timeout_ms ({visibility_timeout_ms} ms) covers the {kind} sink's \
             worst confirmation time, {what} (needs at least {needed_visibility_ms} ms)"
        )),
    }
}

/// The doctor of a `[sink]` table's settings.
pub fn for_config(config: &SinkConfig) -> &dyn SinkDoctor {
    match config {
        SinkConfig::Stdout(settings) => settings,
        SinkConfig::Jsonl(settings) => settings,
        SinkConfig::Kafka(settings) => settings,
        SinkConfig::Nats(settings) => settings,
        SinkConfig::CloudflareQueue(settings) => settings,
        SinkConfig::S3(settings) => settings,
    }
}

/// Everything the sink side of `doctor` finds for `config`: the visibility rule (when
/// there is a lease), then the sink's own checks.
pub async fn run(config: &SinkConfig, ctx: &DoctorContext) -> Vec<Finding> {
    let doctor = for_config(config);
    let mut findings = Vec::new();
    if let Some(visibility_timeout_ms) = ctx.visibility_timeout_ms {
        findings.push(doctor.visibility_finding(config.kind(), visibility_timeout_ms));
    }
    findings.extend(doctor.doctor(ctx).await);
    findings
}

impl SinkDoctor for crate::stdout::StdoutConfig {
    fn confirmation(&self) -> Confirmation {
        Confirmation::Immediate {
            how: "confirms once each batch is written and flushed",
        }
    }
}

impl SinkDoctor for crate::jsonl::JsonlConfig {
    fn confirmation(&self) -> Confirmation {
        Confirmation::Immediate {
            how: "confirms once each batch is written and fsynced",
        }
    }
}

impl SinkDoctor for crate::cloudflare_queue::CloudflareQueueConfig {
    /// One publish call. Retries and waits for 429s can take longer; a record whose lease
    /// runs out meanwhile is released by the pipeline, not confirmed late.
    fn confirmation(&self) -> Confirmation {
        Confirmation::Within {
            ms: self.request_timeout_ms,
            what: format!(
                "one publish call of up to sink.request_timeout_ms = {} ms",
                self.request_timeout_ms
            ),
            key: "sink.request_timeout_ms".into(),
            needed_visibility_ms: with_margin(self.request_timeout_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_print_as_level_what_fix() {
        assert_eq!(Finding::ok("token found").to_string(), "ok    token found");
        assert_eq!(
            Finding::fail("no consumer", "add one").to_string(),
            "fail  no consumer  add one"
        );
        assert_eq!(
            Finding::warn("paused", "resume").to_string(),
            "warn  paused  resume"
        );
    }

    #[test]
    fn the_margin_is_a_tenth_and_at_least_a_second() {
        assert_eq!(with_margin(300_000), 330_000);
        assert_eq!(with_margin(5_000), 6_000);
        assert_eq!(with_margin(u64::MAX), u64::MAX);
    }

    #[test]
    fn a_short_visibility_timeout_fails_naming_both_values() {
        let within = Confirmation::Within {
            ms: 300_000,
            what: "message.timeout.ms = 300000 ms".into(),
            key: "sink.librdkafka_options.\"message.timeout.ms\"".into(),
            needed_visibility_ms: 330_000,
        };
        let short = covers("kafka", &within, 60_000);
        assert_eq!(short.level, Level::Fail);
        assert!(short
            .what
            .contains("queue.visibility_timeout_ms (60000 ms)"));
        assert!(short.what.contains("message.timeout.ms = 300000 ms"));
        assert_eq!(
            short.fix.as_deref(),
            Some(
                "set queue.visibility_timeout_ms >= 330000 or lower \
                 sink.librdkafka_options.\"message.timeout.ms\""
            )
        );
        assert_eq!(covers("kafka", &within, 330_000).level, Level::Ok);
        let immediate = Confirmation::Immediate { how: "fsyncs" };
        assert_eq!(covers("jsonl", &immediate, 1).level, Level::Ok);
    }

    #[test]
    fn every_sink_has_a_doctor() {
        for (table, immediate) in [
            ("type = \"stdout\"", true),
            ("type = \"jsonl\"\npath = \"/tmp/x.jsonl\"", true),
            (
                "type = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\ntopic = \"t\"",
                false,
            ),
            (
                "type = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nsubject = \"s\"",
                false,
            ),
            (
                "type = \"cloudflare_queue\"\naccount_id = \"a\"\nqueue_id = \"q\"",
                false,
            ),
            ("type = \"s3\"\nbucket = \"b\"", false),
        ] {
            let config: SinkConfig = toml::from_str(table).unwrap();
            let confirmation = for_config(&config).confirmation();
            assert_eq!(
                matches!(confirmation, Confirmation::Immediate { .. }),
                immediate,
                "{table}: {confirmation:?}"
            );
        }
    }
}
