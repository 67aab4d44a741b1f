//! The in-flight bound: how many records a source may have read and not yet settled.
//!
//! A source reserves room for a whole batch before it reads ([`Flow::reserve`]), keeps one
//! unit per record it actually got ([`Reservation::take`]), and the units travel with the
//! records as an [`InFlight`] value: into the delivery task, into the settlement, and for
//! Cloudflare into the ack call. Dropping an [`InFlight`] gives its units back, so room is
//! returned exactly when the records are settled, on every path, without bookkeeping by
//! hand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The bound and its counters. Shared by a pipeline's readers, deliveries and settlers.
#[derive(Debug)]
pub struct Flow {
    /// One permit per record that may be read and not yet settled.
    permits: Arc<Semaphore>,
    /// Records read and not yet settled.
    outstanding: AtomicU64,
    /// Permits owed to the bound: a read that returned more records than it reserved room
    /// for could not take a permit for each; returned units pay this down first.
    owed: AtomicU64,
    /// Notified whenever `outstanding` drops to 0.
    idle: Notify,
}

impl Flow {
    /// A bound of `max_in_flight` records.
    pub fn new(max_in_flight: u32) -> Arc<Flow> {
        Arc::new(Flow {
            permits: Arc::new(Semaphore::new(max_in_flight as usize)),
            outstanding: AtomicU64::new(0),
            owed: AtomicU64::new(0),
            idle: Notify::new(),
        })
    }

    /// Waits for room for `n` records. Unused room goes back when the reservation is
    /// dropped or [taken](Reservation::take).
    pub async fn reserve(self: &Arc<Self>, n: u32) -> Reservation {
        // The semaphore is never closed, so acquiring cannot fail; the fallback keeps the
        // bound intact even so (a reservation of nothing).
        let permit = Arc::clone(&self.permits).acquire_many_owned(n).await.ok();
        Reservation {
            flow: Arc::clone(self),
            permit,
            reserved: n as usize,
        }
    }

    /// Records read and not yet settled.
    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Resolves the next time nothing is outstanding. Create the future before checking
    /// the condition it waits for, as with [`Notify::notified`].
    pub fn idle(&self) -> tokio::sync::futures::Notified<'_> {
        self.idle.notified()
    }

    /// `n` records are settled: they leave the count and give their room back (minus any
    /// owed).
    fn settled(&self, n: u64) {
        if n == 0 {
            return;
        }
        if self.outstanding.fetch_sub(n, Ordering::AcqRel) == n {
            self.idle.notify_waiters();
        }
        let owed = self
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| {
                Some(e.saturating_sub(n))
            })
            .unwrap_or(0);
        self.permits.add_permits((n - owed.min(n)) as usize);
    }
}

/// Room reserved for one read.
#[derive(Debug)]
#[must_use = "dropping a reservation gives its room back"]
pub struct Reservation {
    flow: Arc<Flow>,
    permit: Option<OwnedSemaphorePermit>,
    reserved: usize,
}

impl Reservation {
    /// The read returned `received` records: keep one unit for each (returning the rest),
    /// and hand them over as an [`InFlight`].
    pub fn take(self, received: usize) -> InFlight {
        let Reservation {
            flow,
            permit,
            reserved,
        } = self;
        if let Some(permit) = permit {
            permit.forget();
        }
        if received <= reserved {
            flow.permits.add_permits(reserved - received);
        } else {
            // More than reserved: hold a permit for the extra ones too when there is room,
            // otherwise owe them, or settling would return more than was taken.
            let extra = received - reserved;
            let taken = flow.permits.forget_permits(extra);
            if taken < extra {
                tracing::warn!(
                    received,
                    reserved,
                    "a read returned more records than reserved; the in-flight bound is exceeded until they settle"
                );
                flow.owed
                    .fetch_add((extra - taken) as u64, Ordering::AcqRel);
            }
        }
        flow.outstanding
            .fetch_add(received as u64, Ordering::AcqRel);
        InFlight {
            flow,
            units: received as u64,
        }
    }
}

/// Units of the in-flight bound held by records on their way to settlement. Dropping it
/// settles them: they leave the count and their room is returned.
#[derive(Debug)]
#[must_use = "dropping an InFlight settles its records"]
pub struct InFlight {
    flow: Arc<Flow>,
    units: u64,
}

impl InFlight {
    /// Holds nothing (for settlements of records that never took room, such as leases
    /// recovered from a journal).
    pub fn none(flow: &Arc<Flow>) -> InFlight {
        InFlight {
            flow: Arc::clone(flow),
            units: 0,
        }
    }

    /// How many records this holds room for.
    pub fn units(&self) -> u64 {
        self.units
    }

    /// Splits off `n` units (at most all of them) into a value of their own.
    pub fn split(&mut self, n: u64) -> InFlight {
        let n = n.min(self.units);
        self.units -= n;
        InFlight {
            flow: Arc::clone(&self.flow),
            units: n,
        }
    }

    /// Takes over the units of `other`.
    pub fn merge(&mut self, mut other: InFlight) {
        self.units += std::mem::take(&mut other.units);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.flow.settled(self.units);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn room_returns_only_when_units_are_dropped() {
        let flow = Flow::new(10);
        let held = flow.reserve(10).await.take(4);
        assert_eq!(flow.outstanding(), 4);
        assert_eq!(flow.permits.available_permits(), 6);
        let mut held = held;
        let part = held.split(3);
        drop(held);
        assert_eq!(flow.outstanding(), 3);
        assert_eq!(flow.permits.available_permits(), 7);
        drop(part);
        assert_eq!(flow.outstanding(), 0);
        assert_eq!(flow.permits.available_permits(), 10);
    }

    #[tokio::test]
    async fn extra_records_are_owed_and_paid_back() {
        let flow = Flow::new(5);
        let held = flow.reserve(5).await.take(8);
        assert_eq!(flow.outstanding(), 8);
        assert_eq!(flow.permits.available_permits(), 0);
        drop(held);
        // Only the 5 permits that existed come back.
        assert_eq!(flow.permits.available_permits(), 5);
        assert_eq!(flow.outstanding(), 0);
    }

    #[tokio::test]
    async fn an_unused_reservation_gives_its_room_back() {
        let flow = Flow::new(3);
        let r = flow.reserve(3).await;
        assert_eq!(flow.permits.available_permits(), 0);
        drop(r);
        assert_eq!(flow.permits.available_permits(), 3);
        let merged = {
            let mut a = flow.reserve(2).await.take(2);
            a.merge(flow.reserve(1).await.take(1));
            a
        };
        assert_eq!(merged.units(), 3);
        drop(merged);
        assert_eq!(flow.permits.available_permits(), 3);
    }
}
