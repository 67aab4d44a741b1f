//! Back-off schedules: exponential sequences from `backon`, with "equal jitter" (each
//! delay is drawn from the upper half of its step, so delays never exceed the cap).

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use rand::Rng as _;

/// An endless exponential back-off: `min`, doubling up to `max`, each delay jittered to
/// between half and all of its step. [`Backoff::reset`] starts again from `min`.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    steps: ExponentialBackoff,
}

impl Backoff {
    /// A back-off from `min` to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            steps: Self::build(min, max),
        }
    }

    fn build(min: Duration, max: Duration) -> ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max.max(min))
            .with_factor(2.0)
            .without_max_times()
            .build()
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        // `without_max_times` makes the sequence endless; fall back to the cap regardless.
        let step = self.steps.next().unwrap_or(self.max);
        jitter(step)
    }

    /// Starts again from the smallest delay.
    pub fn reset(&mut self) {
        self.steps = Self::build(self.min, self.max);
    }
}

/// A delay drawn uniformly from `[d/2, d]`.
pub fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

/// The retry delay, in seconds, for a record that failed on delivery attempt `attempts`:
/// `base × 2^(attempts−1)`, capped at `max`.
pub fn retry_delay_secs(attempts: u32, base: u64, max: u64) -> u64 {
    let exp = attempts.saturating_sub(1).min(32);
    base.saturating_mul(1u64 << exp).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let mut last = first;
        for _ in 0..20 {
            last = b.next_delay();
            assert!(last <= Duration::from_secs(5));
        }
        assert!(last >= Duration::from_millis(2500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn retry_delay_grows_with_attempts() {
        assert_eq!(retry_delay_secs(1, 5, 3600), 5);
        assert_eq!(retry_delay_secs(2, 5, 3600), 10);
        assert_eq!(retry_delay_secs(4, 5, 3600), 40);
        assert_eq!(retry_delay_secs(100, 5, 3600), 3600);
        assert_eq!(retry_delay_secs(0, 5, 3600), 5);
        assert_eq!(retry_delay_secs(3, 0, 3600), 0);
    }
}
