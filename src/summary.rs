//! The closing report of a job that ends (`demo`, `export`), printed on stderr in one
//! shape, so that users learn to read it once.

use std::time::Duration;

/// What a finished job did.
#[derive(Debug, Clone, Default)]
pub struct JobReport {
    /// `demo`, `export`.
    pub job: &'static str,
    /// Wall time.
    pub elapsed: Duration,
    /// The line about what was there to move (`seeded 240 messages ...`), if any.
    pub input: Option<String>,
    /// Records the sink confirmed.
    pub moved: u64,
    /// Where they went (`stdout`, a path, `the kafka sink`).
    pub destination: String,
    /// Leases acknowledged.
    pub acked: u64,
    /// Leases handed back for redelivery, and why, when any were.
    pub released: u64,
    /// Why records were released, when there is something to say.
    pub released_note: Option<String>,
    /// Records dead-lettered, with where.
    pub dead_lettered: String,
    /// Records confirmed more than once (redeliveries).
    pub duplicates: u64,
    /// Messages left in the queue at the end, when known.
    pub left_in_queue: Option<u64>,
}

impl JobReport {
    /// The report's lines.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![
            String::new(),
            format!(
                "cfq-bridge {}: done in {:.2} s",
                self.job,
                self.elapsed.as_secs_f64()
            ),
        ];
        if let Some(input) = &self.input {
            out.push(format!("  {:<14} {input}", "seeded"));
        }
        out.push(format!(
            "  {:<14} {} records to {}",
            "moved", self.moved, self.destination
        ));
        out.push(format!("  {:<14} {} leases", "acked", self.acked));
        out.push(match &self.released_note {
            Some(note) => format!("  {:<14} {} ({note})", "released", self.released),
            None => format!("  {:<14} {}", "released", self.released),
        });
        out.push(format!("  {:<14} {}", "dead-lettered", self.dead_lettered));
        out.push(format!("  {:<14} {}", "duplicates", self.duplicates));
        if let Some(left) = self.left_in_queue {
            out.push(format!("  {:<14} {left}", "left in queue"));
        }
        out
    }

    /// Prints the report on stderr.
    pub fn print(&self) {
        for line in self.lines() {
            crate::app::say(format_args!("{line}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_lines_up() {
        let report = JobReport {
            job: "export",
            elapsed: Duration::from_millis(1500),
            moved: 10,
            destination: "out.jsonl".into(),
            acked: 10,
            dead_lettered: "0".into(),
            left_in_queue: Some(0),
            ..JobReport::default()
        };
        let lines = report.lines();
        assert_eq!(lines[1], "cfq-bridge export: done in 1.50 s");
        assert_eq!(lines[2], "  moved          10 records to out.jsonl");
        assert_eq!(lines.last().unwrap(), "  left in queue  0");
    }
}
