//! Self-tuning concurrency: how many pull loops run, and how many ack calls may be in
//! flight, under `pullers = "auto"` and `ack_concurrency = "auto"`.
//!
//! What bounds a bridge at a given round trip is calls in flight: pulls bring at most
//! `pullers × batch_size` messages per round trip, and acks settle at most
//! `ack calls × ack_batch_size` leases per round trip. At 50 ms, 4 ack calls of 100 leases
//! cap the bridge near 8,000 msg/s however many pullers run; that is why 8 fixed pullers
//! were no faster than 4. So both numbers tune:
//!
//! - **Pullers** grow by one (at most every [`GROW_SPACING`]) while pulls come back full,
//!   the backlog is not empty, the in-flight bound has room, and no 429 was seen for
//!   [`RATE_LIMIT_COOLDOWN`]. An empty pull drops them to `min_pullers` at once: empty
//!   pulls are billed, and an idle queue then costs one pull per back-off period, not one
//!   per loop. A 429 halves them.
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
/// How long a 429 stops growth.
pub const RATE_LIMIT_COOLDOWN: Duration = Duration::from_secs(10);
/// Ack calls in flight when `ack_concurrency = "auto"` starts.
pub const ACK_START: u32 = 4;
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
    last_grow: Option<Instant>,
    growth_allowed_at: Option<Instant>,
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
        stats.gauges.set_pullers(u64::from(pullers.min));
        Tuner {
            active: watch::channel(pullers.min).0,
            pullers,
            state: Mutex::new(State {
                last_grow: None,
                growth_allowed_at: None,
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
        if seen.received == 0 {
            self.set_active(self.pullers.min);
            return;
        }
        let full = seen.received >= seen.batch_size as usize;
        let backlog_left = seen.backlog.is_none_or(|b| b > 0);
        let room = (seen.in_flight as f64) < f64::from(seen.max_in_flight) * IN_FLIGHT_ROOM;
        if !(full && backlog_left && room) {
            return;
        }
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.growth_allowed_at.is_some_and(|at| now < at)
            || state
                .last_grow
                .is_some_and(|at| now.duration_since(at) < GROW_SPACING)
        {
            return;
        }
        let current = self.active_pullers();
        if current < self.pullers.max {
            state.last_grow = Some(now);
            drop(state);
            self.set_active(current + 1);
        }
    }

    /// A call was answered 429: halve the pullers and the ack calls, and hold growth for
    /// [`RATE_LIMIT_COOLDOWN`].
    pub fn rate_limited(&self) {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.growth_allowed_at = Some(Instant::now() + RATE_LIMIT_COOLDOWN);
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
        }
    }

    fn empty() -> PullSeen {
        PullSeen {
            received: 0,
            backlog: Some(0),
            ..full(0)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn grows_on_a_deep_queue_one_step_per_spacing() {
        let t = tuner("");
        assert_eq!(t.active_pullers(), 1);
        for _ in 0..5 {
            t.pulled(full(50_000));
        }
        assert_eq!(t.active_pullers(), 2, "one step, then the spacing");
        for _ in 0..30 {
            tokio::time::advance(GROW_SPACING).await;
            t.pulled(full(50_000));
        }
        assert_eq!(t.active_pullers(), 16, "up to max_pullers and no further");
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_grow_without_backlog_or_room_or_on_partial_pulls() {
        let t = tuner("");
        t.pulled(full(0));
        tokio::time::advance(GROW_SPACING).await;
        t.pulled(PullSeen {
            in_flight: 1900,
            ..full(10_000)
        });
        tokio::time::advance(GROW_SPACING).await;
        t.pulled(PullSeen {
            received: 40,
            ..full(10_000)
        });
        assert_eq!(t.active_pullers(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_pull_drops_to_the_minimum() {
        let t = tuner("min_pullers = 2");
        for _ in 0..10 {
            tokio::time::advance(GROW_SPACING).await;
            t.pulled(full(50_000));
        }
        assert_eq!(t.active_pullers(), 12);
        t.pulled(empty());
        assert_eq!(t.active_pullers(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_halves_and_holds_growth() {
        let t = tuner("");
        for _ in 0..8 {
            tokio::time::advance(GROW_SPACING).await;
            t.pulled(full(50_000));
        }
        assert_eq!(t.active_pullers(), 9);
        t.ack_calls_saturated();
        t.ack_calls_saturated();
        assert_eq!(t.ack_target(), ACK_START + 2);
        t.rate_limited();
        assert_eq!(t.active_pullers(), 4);
        assert_eq!(t.ack_target(), (ACK_START + 2) / 2);
        tokio::time::advance(GROW_SPACING).await;
        t.pulled(full(50_000));
        t.ack_calls_saturated();
        assert_eq!(t.active_pullers(), 4, "no growth while cooling down");
        assert_eq!(t.ack_target(), (ACK_START + 2) / 2);
        tokio::time::advance(RATE_LIMIT_COOLDOWN).await;
        t.pulled(full(50_000));
        assert_eq!(t.active_pullers(), 5);
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
        tokio::time::advance(GROW_SPACING).await;
        t.pulled(full(50_000));
        assert_eq!((t.active_pullers(), t.ack_target()), (4, 6));
    }

    #[tokio::test(start_paused = true)]
    async fn parked_loops_wait_for_their_turn() {
        let t = Arc::new(tuner(""));
        let stop = CancellationToken::new();
        let third = {
            let (t, stop) = (Arc::clone(&t), stop.clone());
            tokio::spawn(async move { t.wait_turn(2, &stop).await })
        };
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        for _ in 0..2 {
            tokio::time::advance(GROW_SPACING).await;
            t.pulled(full(50_000));
        }
        assert!(
            third.await.unwrap(),
            "the third loop runs once 3 are active"
        );
        let parked = {
            let (t, stop) = (Arc::clone(&t), stop.clone());
            tokio::spawn(async move { t.wait_turn(10, &stop).await })
        };
        stop.cancel();
        assert!(!parked.await.unwrap(), "a parked loop ends on stop");
    }
}
