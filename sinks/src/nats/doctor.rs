//! `cfq-bridge doctor` for the NATS sink: the worst confirmation time (the PubAck wait,
//! twice with a dead-letter subject), and, with the `nats` feature and in JetStream mode,
//! the stream: one captures the subject (and the dead-letter subject), and its duplicate
//! window covers the visibility timeout plus the largest retry delay, so that the
//! redeliveries the bridge can cause are dropped by `Nats-Msg-Id`.
//!
//! The checks use their own connection, with the sink's options, and publish nothing.

use async_trait::async_trait;

use super::config::NatsConfig;
use crate::doctor::{with_margin, Confirmation, DoctorContext, Finding, SinkDoctor};

#[async_trait]
impl SinkDoctor for NatsConfig {
    /// A record waits up to `publish_timeout_ms` for its PubAck (or the flush, in core
    /// mode); a refused record's copy to the dead-letter subject may wait as long again.
    fn confirmation(&self) -> Confirmation {
        let timeout_ms = self.publish_timeout_ms;
        let wait = if self.jetstream { "PubAck" } else { "flush" };
        let (ms, what) = match &self.dead_letter_subject {
            Some(_) => (
                timeout_ms.saturating_mul(2),
                format!(
                    "twice the {wait} wait, sink.publish_timeout_ms = {timeout_ms} ms (a \
                     refused record's copy to sink.dead_letter_subject may wait as long again)"
                ),
            ),
            None => (
                timeout_ms,
                format!("the {wait} wait, sink.publish_timeout_ms = {timeout_ms} ms"),
            ),
        };
        Confirmation::Within {
            ms,
            what,
            key: "sink.publish_timeout_ms".into(),
            needed_visibility_ms: with_margin(ms),
        }
    }

    async fn doctor(&self, ctx: &DoctorContext) -> Vec<Finding> {
        #[cfg(feature = "nats")]
        {
            server::findings(self, ctx).await
        }
        // Building the sink already says that NATS support is not compiled in.
        #[cfg(not(feature = "nats"))]
        {
            let _ = ctx;
            Vec::new()
        }
    }
}

#[cfg(feature = "nats")]
mod server {
    use std::time::Duration;

    use async_nats::jetstream;

    use super::NatsConfig;
    use crate::doctor::{DoctorContext, Finding};
    use crate::nats::stream::{self, StreamTarget};
    use crate::nats::NatsError;

    /// The stream findings. Core NATS mode has no stream: `check` warns about that mode.
    pub(super) async fn findings(config: &NatsConfig, ctx: &DoctorContext) -> Vec<Finding> {
        if !config.jetstream {
            return Vec::new();
        }
        let client = match crate::nats::connect::connect(config).await {
            Ok(client) => client,
            Err(error) => {
                return vec![Finding::fail(
                    error.to_string(),
                    "check sink.url, sink.auth and sink.tls, and that the server is up",
                )]
            }
        };
        let js = jetstream::new(client);
        let needed_window = ctx.visibility_timeout_ms.map(|ms| {
            (Duration::from_millis(ms) + Duration::from_secs(ctx.max_retry_delay_secs))
                .as_secs_f64()
                .ceil() as u64
        });
        let mut findings = Vec::new();
        let subject = &config.subject;
        match stream::find(&js, &StreamTarget::from_config(config), subject).await {
            Ok(Some(info)) => {
                findings.push(Finding::ok(format!(
                    "JetStream stream {} captures subject {subject}",
                    info.config.name
                )));
                if let Some(check_ctx) = ctx.check_context() {
                    findings.push(window_finding(config, &info, &check_ctx, needed_window));
                }
            }
            Ok(None) => findings.push(Finding::warn(
                format!(
                    "subject {subject} is a template and no sink.stream is named: the streams \
                     it expands to cannot be checked"
                ),
                "name the stream in sink.stream, or make sure a stream captures every subject \
                 the template expands to",
            )),
            Err(error) => findings.push(stream_failure(error, subject, needed_window)),
        }
        if let Some(dead) = &config.dead_letter_subject {
            match stream::stream_for_subject(&js, dead).await {
                Ok(name) => findings.push(Finding::ok(format!(
                    "JetStream stream {name} captures the dead-letter subject {dead}"
                ))),
                Err(error) => findings.push(stream_failure(error, dead, needed_window)),
            }
        }
        findings
    }

    /// A stream that is missing or cannot be looked up.
    fn stream_failure(error: NatsError, subject: &str, needed_window: Option<u64>) -> Finding {
        match error {
            NatsError::NoStream(reason) => {
                let window = needed_window
                    .map(|secs| format!(" --dupe-window {secs}s"))
                    .unwrap_or_default();
                Finding::fail(
                    reason,
                    format!(
                        "create a stream capturing it (nats stream add STREAM --subjects \
                         '{subject}'{window}), or configure [sink.create_stream]"
                    ),
                )
            }
            other => Finding::fail(
                other.to_string(),
                "check that JetStream is enabled on the server and that the bridge's user may \
                 use its API ($JS.API.>)",
            ),
        }
    }

    /// Whether the stream's duplicate window covers the lease plus the largest retry
    /// delay. The warning's text is `check`'s own, so `doctor` can show it once.
    fn window_finding(
        config: &NatsConfig,
        info: &jetstream::stream::Info,
        check_ctx: &crate::CheckContext,
        needed_window: Option<u64>,
    ) -> Finding {
        let name = &info.config.name;
        let window = info.config.duplicate_window.as_secs_f64();
        let needed = needed_window.unwrap_or(0);
        match stream::warnings(info, check_ctx).into_iter().next() {
            None => Finding::ok(format!(
                "JetStream stream {name}: its duplicate window ({window} s) covers the \
                 visibility timeout plus the largest retry delay ({needed} s)"
            )),
            Some(warning) => {
                let mut fix = format!("nats stream edit {name} --dupe-window {needed}s");
                if config
                    .create_stream
                    .as_ref()
                    .is_some_and(|create| &create.name == name)
                {
                    fix.push_str(&format!(
                        ", and set sink.create_stream.duplicate_window_secs >= {needed} (it \
                         applies only when the stream is created)"
                    ));
                }
                Finding::warn(warning, fix)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_confirmation_is_the_publish_timeout() {
        let config: NatsConfig = toml::from_str(
            "url = \"nats://127.0.0.1:4222\"\nsubject = \"s\"\npublish_timeout_ms = 2000\n",
        )
        .unwrap();
        match config.confirmation() {
            Confirmation::Within {
                ms,
                key,
                needed_visibility_ms,
                what,
            } => {
                assert_eq!((ms, needed_visibility_ms), (2_000, 3_000));
                assert_eq!(key, "sink.publish_timeout_ms");
                assert!(what.contains("PubAck"), "{what}");
            }
            other => panic!("{other:?}"),
        }
        let with_dead: NatsConfig = toml::from_str(
            "url = \"nats://127.0.0.1:4222\"\nsubject = \"s\"\npublish_timeout_ms = 2000\n\
             dead_letter_subject = \"dead\"\n",
        )
        .unwrap();
        assert!(matches!(
            with_dead.confirmation(),
            Confirmation::Within { ms: 4_000, .. }
        ));
    }
}
