//! Settings of a pipeline run that do not depend on the source.

use std::time::Duration;

use super::backoff;

/// How a pipeline delivers and settles, whatever the source.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Most records read and not yet settled. Readers wait while it is reached.
    pub max_in_flight: u32,
    /// A record whose deadline is closer than this when it would reach the sink is
    /// released instead of delivered late.
    pub deadline_margin: Duration,
    /// At shutdown, how long deliveries may take to finish before what they hold is
    /// released.
    pub shutdown_grace: Duration,
    /// Retry delay of a record its sink refused, on its first attempt, in seconds; it
    /// doubles with each attempt.
    pub retry_base_delay_secs: u64,
    /// Longest such delay, in seconds.
    pub retry_max_delay_secs: u64,
}

impl PipelineOptions {
    /// The retry delay for a refused record on attempt `attempts`, in seconds.
    pub fn failure_delay(&self, attempts: u32) -> u64 {
        backoff::retry_delay_secs(
            attempts,
            self.retry_base_delay_secs,
            self.retry_max_delay_secs,
        )
    }
}
