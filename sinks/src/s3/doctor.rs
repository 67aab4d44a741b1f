//! `cfq-bridge doctor` for the `s3` sink: a record is confirmed when the object holding it
//! is written, so at worst after the object's age limit plus its upload time. The rule is
//! `check`'s own ([`super::timing_problem`]), so both commands agree and `doctor` shows
//! the problem once. Reaching the bucket is `check`'s part.

use super::config::{timing_problem, S3Config};
use crate::doctor::{covers, Confirmation, Finding, SinkDoctor};

impl SinkDoctor for S3Config {
    /// `max_object_age_secs` + `upload_timeout_secs`; the visibility timeout must leave a
    /// quarter on top for pulling, settling and the ack.
    fn confirmation(&self) -> Confirmation {
        let ms = self
            .max_object_age_secs
            .saturating_add(self.upload_timeout_secs)
            .saturating_mul(1000);
        Confirmation::Within {
            ms,
            what: format!(
                "sink.max_object_age_secs ({} s) + sink.upload_timeout_secs ({} s)",
                self.max_object_age_secs, self.upload_timeout_secs
            ),
            key: "sink.max_object_age_secs".into(),
            needed_visibility_ms: ms.div_ceil(3).saturating_mul(4),
        }
    }

    fn visibility_finding(&self, kind: &str, visibility_timeout_ms: u64) -> Finding {
        let confirmation = self.confirmation();
        match timing_problem(
            self.max_object_age_secs,
            self.upload_timeout_secs,
            visibility_timeout_ms,
        ) {
            Some(problem) => {
                let needed = match &confirmation {
                    Confirmation::Within {
                        needed_visibility_ms,
                        ..
                    } => *needed_visibility_ms,
                    Confirmation::Immediate { .. } => 0,
                };
                Finding::fail(
                    problem,
                    format!(
                        "set queue.visibility_timeout_ms >= {needed} or lower \
                         sink.max_object_age_secs"
                    ),
                )
            }
            None => covers(kind, &confirmation, visibility_timeout_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    #[test]
    fn the_rule_is_checks_own() {
        let config: S3Config = toml::from_str(
            "bucket = \"b\"\nmax_object_age_secs = 20\nupload_timeout_secs = 25\n",
        )
        .unwrap();
        assert!(matches!(
            config.confirmation(),
            Confirmation::Within {
                ms: 45_000,
                needed_visibility_ms: 60_000,
                ..
            }
        ));
        assert_eq!(config.visibility_finding("s3", 60_000).level, Level::Ok);
        let short = config.visibility_finding("s3", 59_999);
        assert_eq!(short.level, Level::Fail);
        assert_eq!(short.what, timing_problem(20, 25, 59_999).unwrap());
        assert!(short.fix.unwrap().contains(">= 60000"));
    }
}
