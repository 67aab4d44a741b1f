//! Self-tuning concurrency: how many pull loops run, and how many ack calls may be in
//! flight, under `pullers = "auto"` and `ack_concurrency = "auto"`.
//!
//! What bounds a bridge at a given round trip is calls in flight: pulls bring at most
//! `pullers × batch_size` messages per round trip, and acks settle at most
//! `ack calls × ack_batch_size` leases per round trip. At 50 ms, 4 ack calls of 100 leases
//! cap the bridge near 8,000 msg/s however many pullers run; that is why 8 fixed pullers
//! were no faster than 4. So both numbers tune:
//!
//! - **Pullers** start at [`PULLERS_START`] and grow while pulls come back full, the backlog is not empty, the in-flight
//!   bound has room, no 429 was seen for [`RATE_LIMIT_COOLDOWN`], **and the last step
//!   helped**: each step is judged by the pulled rate over the next window (at least
//!   [`GROW_SPACING`], and four pull round trips). They double at first, as TCP's slow
//!   start does, so that a deep queue at 50 ms reaches its pace within a second; a step
//!   that did not raise the rate by [`WORTH_IT`] is taken back, and from then on steps are
//!   one loop, tried again after [`PLATEAU_HOLD`]. (At 0 ms round trips the machine's CPU
//!   is the bound: more loops only add contention, and the check stops them.) An empty
//!   pull drops them to `min_pullers` at once: empty pulls are billed, and an idle queue
//!   then costs one pull per back-off period, not one per loop. A 429 halves them.
//! - **Ack calls** start at [`ACK_START`] and grow by one whenever a batch of settlements
//!   has to wait for a free call; a 429 halves them. A call slot nobody uses costs nothing,
//!   so they need not shrink when idle.
//!
//! Loops beyond the current number park; the time they would have used is nobody's.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::{Concurrency, QueueConfig};
use crate::stats::Stats;

/// Least time between two steps up of the pullers.
pub const GROW_SPACING: Duration = Duration::from_millis(100);
/// A step up must raise the pulled rate by this share to be kept.
pub const WORTH_IT: f64 = 0.10;
/// After a step that did not help, how long the pullers stay put.
pub const PLATEAU_HOLD: Duration = Duration::from_secs(10);
/// How long a 429 stops growth.
pub const RATE_LIMIT_COOLDOWN: Duration = Duration::from_secs(10);
/// Ack calls in flight when `ack_concurrency = "auto"` starts.
pub const ACK_START: u32 = 4;
/// Pull loops when `pullers = "auto"` starts (within its bounds): a deep queue gets going
/// without ramping up from one, and the first empty pull brings an idle queue down to
/// `min_pullers`.
pub const PULLERS_START: u32 = 4;
/// Pullers grow only while records in flight are below this share of the bound.
const IN_FLIGHT_ROOM: f64 = 0.8;

/// What one pull brought back, as the tuner needs it.
#[derive(Debug, Clone, Copy)]
pub struct PullSeen {
    /// Messages received.
    pub received: usize,
    /// The batch size asked for.
    pub batch_size: u32,
    /// The backlog the answer reported.
    pub backlog: Option<u64>,
    /// Records in flight after this pull.
    pub in_flight: u64,
    /// The in-flight bound.
    pub max_in_flight: u32,
    /// How long the pull call took.
    pub took: Duration,
}

/// The tuner of one Cloudflare source.
#[derive(Debug)]
pub struct Tuner {
    pullers: Bounds,
    active: watch::Sender<u32>,
    state: Mutex<State>,
    ack_calls: Arc<Semaphore>,
    ack: Bounds,
    ack_target: AtomicU32,
    stats: Arc<Stats>,
}

/// Tuned between `min` and `max`, or fixed (`min == max`).
#[derive(Debug, Clone, Copy)]
struct Bounds {
    min: u32,
    max: u32,
}

#[derive(Debug)]
struct State {
    /// No step up before this (a 429's cool-down, or a plateau's hold).
    growth_allowed_at: Option<Instant>,
    /// The current measuring window: since when, and messages pulled in it.
    window_start: Instant,
    window_pulled: u64,
    /// The last step up being judged: the loops before it and the rate before it.
    judging: Option<(u32, f64)>,
    /// Doubling (until the first step that did not help or a 429), else one at a time.
    slow_start: bool,
    /// A smoothed pull round trip.
    round_trip: Duration,
}

impl Tuner {
    /// The tuner for `cfg`: fixed numbers stay put; `auto` starts at the bottom (pullers)
    /// or at [`ACK_START`] (ack calls) and moves.
    pub fn new(cfg: &QueueConfig, stats: Arc<Stats>) -> Tuner {
        let pullers = match cfg.pullers {
            Concurrency::Auto => Bounds {
                min: cfg.min_pullers,
                max: cfg.max_pullers,
            },
            Concurrency::Fixed(n) => Bounds { min: n, max: n },
        };
        let ack = match cfg.ack_concurrency {
            Concurrency::Auto => Bounds {
                min: 1,
                max: cfg.max_ack_concurrency,
            },
            Concurrency::Fixed(n) => Bounds { min: n, max: n },
        };
        let ack_start = if ack.min == ack.max {
            ack.max
        } else {
            ACK_START.clamp(ack.min, ack.max)
        };
        let pullers_start = PULLERS_START.clamp(pullers.min, pullers.max);
        stats.gauges.set_pullers(u64::from(pullers_start));
        Tuner {
            active: watch::channel(pullers_start).0,
            pullers,
            state: Mutex::new(State {
                growth_allowed_at: None,
                window_start: Instant::now(),
                window_pulled: 0,
                judging: None,
                slow_start: true,
                round_trip: Duration::ZERO,
            }),
            ack_calls: Arc::new(Semaphore::new(ack_start as usize)),
            ack,
            ack_target: AtomicU32::new(ack_start),
            stats,
        }
    }

    /// The most pull loops that can ever run (how many to spawn).
    pub fn most_pullers(&self) -> u32 {
        self.pullers.max
    }

    /// Pull loops that should run now.
    pub fn active_pullers(&self) -> u32 {
        *self.active.borrow()
    }

    /// Ack calls that may be in flight now.
    pub fn ack_target(&self) -> u32 {
        self.ack_target.load(Ordering::Relaxed)
    }

    /// The ack calls' slots.
    pub fn ack_calls(&self) -> Arc<Semaphore> {
        Arc::clone(&self.ack_calls)
    }

    /// Waits until pull loop `index` may pull (its index is below the current number).
    /// `false` when `stop` came first.
    pub async fn wait_turn(&self, index: u32, stop: &CancellationToken) -> bool {
        let mut active = self.active.subscribe();
        tokio::select! {
            biased;
            () = stop.cancelled() => false,
            turn = active.wait_for(|n| index < *n) => turn.is_ok(),
        }
    }

    /// Takes in what a pull brought back.
    pub fn pulled(&self, seen: PullSeen) {
        if self.pullers.min == self.pullers.max {
            return;
        }
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.round_trip = (state.round_trip * 7 + seen.took) / 8;
        if seen.received == 0 {
            state.judging = None;
            state.slow_start = true;
            state.window_start = now;
            state.window_pulled = 0;
            drop(state);
            self.set_active(self.pullers.min);
            return;
        }
        state.window_pulled += seen.received as u64;
        let window = GROW_SPACING.max(state.round_trip * 4);
        let elapsed = now.duration_since(state.window_start);
        if elapsed < window {
            return;
        }
        let rate = state.window_pulled as f64 / elapsed.as_secs_f64();
        state.window_start = now;
        state.window_pulled = 0;
        if elapsed > window * 3 {
            // Pulls paused (a full in-flight bound, a sink outage): this window says
            // nothing about the loops; start measuring afresh.
            state.judging = None;
            return;
        }
        let current = self.active_pullers();
        // Judge the last step by the window that followed it.
        if let Some((before, rate_before)) = state.judging.take() {
            if rate < rate_before * (1.0 + WORTH_IT) {
                state.slow_start = false;
                state.growth_allowed_at = Some(now + PLATEAU_HOLD);
                drop(state);
                tracing::debug!(
                    from = current,
                    to = before,
                    rate,
                    rate_before,
                    "a step up of the pull loops did not help; taking it back"
                );
                self.set_active(before);
                return;
            }
        }
        let full = seen.received >= seen.batch_size as usize;
        let backlog_left = seen.backlog.is_none_or(|b| b > 0);
        let room = (seen.in_flight as f64) < f64::from(seen.max_in_flight) * IN_FLIGHT_ROOM;
        let allowed = state.growth_allowed_at.is_none_or(|at| now >= at);
        if !(full && backlog_left && room && allowed) || current >= self.pullers.max {
            return;
        }
        let next = if state.slow_start {
            current * 2
        } else {
            current + 1
        };
        state.judging = Some((current, rate));
        drop(state);
        self.set_active(next);
    }

    /// A call was answered 429: halve the pullers and the ack calls, and hold growth for
    /// [`RATE_LIMIT_COOLDOWN`].
    pub fn rate_limited(&self) {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.growth_allowed_at = Some(Instant::now() + RATE_LIMIT_COOLDOWN);
            state.judging = None;
            state.slow_start = false;
        }
        self.set_active((self.active_pullers() / 2).max(self.pullers.min));
        let ack = self.ack_target();
        self.set_ack_target((ack / 2).max(self.ack.min));
    }

    /// Settlements had to wait for a free ack call: allow one more, unless a 429 is
    /// recent.
    pub fn ack_calls_saturated(&self) {
        let cooling = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state
                .growth_allowed_at
                .is_some_and(|at| Instant::now() < at)
        };
        let ack = self.ack_target();
        if !cooling && ack < self.ack.max {
            self.set_ack_target(ack + 1);
        }
    }

    fn set_active(&self, n: u32) {
        let n = n.clamp(self.pullers.min, self.pullers.max);
        if self
            .active
            .send_if_modified(|active| std::mem::replace(active, n) != n)
        {
            tracing::debug!(pullers = n, "pull loops tuned");
            self.stats.gauges.set_pullers(u64::from(n));
        }
    }

    fn set_ack_target(&self, n: u32) {
        let old = self.ack_target.swap(n, Ordering::Relaxed);
        if n > old {
            self.ack_calls.add_permits((n - old) as usize);
        } else if n < old {
            // Calls in flight keep their slots; the slots leave as they come back.
            let surplus = (old - n) as usize;
            let calls = Arc::clone(&self.ack_calls);
            tokio::spawn(async move {
                if let Ok(permits) = calls.acquire_many_owned(surplus as u32).await {
                    permits.forget();
                }
            });
        }
        if n != old {
            tracing::debug!(ack_calls = n, "ack calls tuned");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuner(extra: &str) -> Tuner {
        let text = format!(
            "[queue]\naccount_id = \"a\"\nqueue_id = \"q\"\n{extra}\n[sink]\ntype = \"stdout\"\n"
        );
        let config = crate::config::Config::from_toml(&text, |_| None).expect("config");
        Tuner::new(config.queue().unwrap(), Arc::new(Stats::default()))
    }

    fn full(backlog: u64) -> PullSeen {
        PullSeen {
            received: 100,
            batch_size: 100,
            backlog: Some(backlog),
            in_flight: 100,
            max_in_flight: 2000,
            took: Duration::ZERO,
        }
    }

    fn empty() -> PullSeen {
        PullSeen {
            received: 0,
            backlog: Some(0),
            ..full(0)
        }
    }

    /// One window: `pulls` pulls spread evenly over it (the last one closes it).
    async fn window(t: &Tuner, pulls: u32, seen: PullSeen) {
        let step = GROW_SPACING.div_f64(f64::from(pulls)) + Duration::from_micros(1);
        for _ in 0..pulls {
            tokio::time::advance(step).await;
            t.pulled(seen);
        }
    }

    /// A deep queue where every loop adds its pulls: the rate follows the loops.
    async fn latency_bound(t: &Tuner, windows: usize) {
        for _ in 0..windows {
            window(t, t.active_pullers(), full(50_000)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn doubles_on_a_deep_queue_while_each_step_helps() {
        let t = tuner("");
        assert_eq!(t.active_pullers(), PULLERS_START);
        t.pulled(empty());
        assert_eq!(t.active_pullers(), 1, "an empty pull: down to min_pullers");
        let mut seen = vec![];
        for _ in 0..6 {
            latency_bound(&t, 1).await;
            seen.push(t.active_pullers());
        }
        assert_eq!(seen, [2, 4, 8, 16, 16, 16], "doubling up to max_pullers");
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_that_does_not_help_is_taken_back() {
        let t = tuner("");
        t.pulled(empty());
        // The rate follows the loops up to 4, then stays: 4 pulls per window at most.
        let mut seen = vec![];
        for _ in 0..6 {
            window(&t, t.active_pullers().min(4), full(50_000)).await;
            seen.push(t.active_pullers());
        }
        assert_eq!(
            seen,
            [2, 4, 8, 4, 4, 4],
            "8 did not beat 4: back to 4, and held"
        );
        // After the hold, one loop at a time is tried, and taken back again.
        let mut windows = 0;
        while t.active_pullers() == 4 && windows < 200 {
            window(&t, 4, full(50_000)).await;
            windows += 1;
        }
        // Two windows of the hold passed in the loop above.
        let hold = PLATEAU_HOLD.as_millis() / GROW_SPACING.as_millis();
        assert!(
            windows as u128 + 2 >= hold,
            "held for {windows} windows only"
        );
        assert_eq!(t.active_pullers(), 5);
        window(&t, 4, full(50_000)).await;
        assert_eq!(t.active_pullers(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_grow_without_backlog_or_room_or_on_partial_pulls() {
        let t = tuner("");
        t.pulled(empty());
        for _ in 0..3 {
            window(&t, 1, full(0)).await;
            window(
                &t,
                1,
                PullSeen {
                    in_flight: 1900,
                    ..full(10_000)
                },
            )
            .await;
            window(
                &t,
                1,
                PullSeen {
                    received: 40,
                    ..full(10_000)
                },
            )
            .await;
        }
        assert_eq!(t.active_pullers(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_pull_drops_to_the_minimum() {
        let t = tuner("min_pullers = 2");
        latency_bound(&t, 2).await;
        assert_eq!(t.active_pullers(), 16);
        t.pulled(empty());
        assert_eq!(t.active_pullers(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_halves_and_holds_growth() {
        let t = tuner("");
        latency_bound(&t, 1).await;
        assert_eq!(t.active_pullers(), 8);
        t.ack_calls_saturated();
        t.ack_calls_saturated();
        assert_eq!(t.ack_target(), ACK_START + 2);
        t.rate_limited();
        assert_eq!(t.active_pullers(), 4);
        assert_eq!(t.ack_target(), (ACK_START + 2) / 2);
        latency_bound(&t, 3).await;
        t.ack_calls_saturated();
        assert_eq!(t.active_pullers(), 4, "no growth while cooling down");
        assert_eq!(t.ack_target(), (ACK_START + 2) / 2);
        tokio::time::advance(RATE_LIMIT_COOLDOWN).await;
        // The first window after the pause only restarts the measurement.
        latency_bound(&t, 2).await;
        assert_eq!(t.active_pullers(), 5, "then one loop at a time");
        // Slots given back by the shrink are taken out of the semaphore.
        tokio::task::yield_now().await;
        assert_eq!(t.ack_calls.available_permits() as u32, t.ack_target());
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_numbers_stay_put() {
        let t = tuner("pullers = 4\nack_concurrency = 6");
        assert_eq!(
            (t.active_pullers(), t.most_pullers(), t.ack_target()),
            (4, 4, 6)
        );
        t.pulled(empty());
        t.rate_limited();
        t.ack_calls_saturated();
        latency_bound(&t, 3).await;
        assert_eq!((t.active_pullers(), t.ack_target()), (4, 6));
    }

    #[tokio::test(start_paused = true)]
    async fn parked_loops_wait_for_their_turn() {
        let t = Arc::new(tuner(""));
        t.pulled(empty());
        let stop = CancellationToken::new();
        let third = {
            let (t, stop) = (Arc::clone(&t), stop.clone());
            tokio::spawn(async move { t.wait_turn(2, &stop).await })
        };
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        latency_bound(&t, 3).await;
        assert!(
            third.await.unwrap(),
            "the third loop runs once 4 are active"
        );
        let parked = {
            let (t, stop) = (Arc::clone(&t), stop.clone());
            tokio::spawn(async move { t.wait_turn(10, &stop).await })
        };
        stop.cancel();
        assert!(!parked.await.unwrap(), "a parked loop ends on stop");
    }
}
