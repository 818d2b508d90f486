//! The attempts this process holds leases for, for heartbeats, fences and shutdown.
//!
//! An attempt is keyed by (unit id, attempt number): after a unit was taken over and then
//! claimed again by this same process, its stale attempt and its live one are two entries, and
//! the end of one never touches the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use setpoint_adapter::Fence;
use tokio::time::{Duration, Instant};

/// One attempt: (unit id, attempt number).
pub type AttemptKey = (i64, i32);

#[derive(Debug)]
struct Entry {
    fence: Fence,
    /// When the statement that last set the lease (the claim, or a renewal) was *sent*: the
    /// database's lease runs from a moment after this, so a fence counted from here never
    /// outlives the lease.
    lease_sent_at: Instant,
}

/// Attempts whose lease this process holds, from claim until their completion or failure is
/// written (or they are abandoned). Shared by the executor, the completer and the heartbeat.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    units: Arc<Mutex<HashMap<AttemptKey, Entry>>>,
}

impl InFlight {
    /// Records that this process holds `key`, leased by a statement sent at `sent_at`, with
    /// the attempt's `fence`.
    pub fn insert(&self, key: AttemptKey, fence: Fence, sent_at: Instant) {
        if let Ok(mut u) = self.units.lock() {
            u.insert(
                key,
                Entry {
                    fence,
                    lease_sent_at: sent_at,
                },
            );
        }
    }

    /// Forgets `key` (completed, failed, discarded or abandoned). Other attempts of the same
    /// unit stay.
    pub fn remove(&self, key: AttemptKey) {
        if let Ok(mut u) = self.units.lock() {
            u.remove(&key);
        }
    }

    /// The held attempts whose lease was last set by a statement sent at least `age` ago and
    /// whose fence still holds. Attempts that finish quickly never need a renewal, which keeps
    /// heartbeats off the hot path.
    pub fn due_for_renewal(&self, age: Duration) -> Vec<AttemptKey> {
        let now = Instant::now();
        self.units
            .lock()
            .map(|u| {
                u.iter()
                    .filter(|(_, e)| {
                        now.saturating_duration_since(e.lease_sent_at) >= age && e.fence.is_held()
                    })
                    .map(|(k, _)| *k)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The leases of `keys` were renewed by a statement sent at `sent_at`: their fences now
    /// hold until `sent_at + hold`.
    pub fn renewed(&self, keys: &[AttemptKey], sent_at: Instant, hold: Duration) {
        if let Ok(mut u) = self.units.lock() {
            for key in keys {
                if let Some(entry) = u.get_mut(key) {
                    entry.lease_sent_at = sent_at;
                    entry.fence.extend(sent_at + hold);
                }
            }
        }
    }

    /// The attempts of `keys` lost their unit (`why` is logged by the fence's owner).
    pub fn lose(&self, keys: &[AttemptKey], why: &'static str) {
        if let Ok(u) = self.units.lock() {
            for key in keys {
                if let Some(entry) = u.get(key) {
                    entry.fence.lose(why);
                }
            }
        }
    }

    /// Says every attempt whose fence's time has passed is lost (so that waiters of
    /// `Fence::lost` wake up); returns how many were newly lost.
    pub fn expire_overdue(&self) -> usize {
        self.units
            .lock()
            .map(|u| {
                u.values()
                    .filter(|e| e.fence.lost_because().is_none() && !e.fence.is_held())
                    .map(|e| e.fence.lose("the lease was not renewed in time"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Says every held attempt is lost, because of `why` (shutdown).
    pub fn lose_all(&self, why: &'static str) {
        if let Ok(u) = self.units.lock() {
            for entry in u.values() {
                entry.fence.lose(why);
            }
        }
    }

    /// How many attempts are held.
    pub fn len(&self) -> usize {
        self.units.lock().map(|u| u.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stale_and_a_live_attempt_of_one_unit_are_apart() {
        let inflight = InFlight::default();
        let stale = Fence::until(Instant::now() + Duration::from_secs(10));
        let live = Fence::until(Instant::now() + Duration::from_secs(10));
        inflight.insert((7, 1), stale.clone(), Instant::now());
        inflight.insert((7, 2), live.clone(), Instant::now());
        inflight.lose(&[(7, 1)], "taken over");
        inflight.remove((7, 1));
        assert!(!stale.is_held());
        assert!(live.is_held(), "the live attempt keeps its fence");
        assert_eq!(inflight.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_move_fences_and_overdue_ones_are_lost() {
        let inflight = InFlight::default();
        let start = Instant::now();
        let fence = Fence::until(start + Duration::from_secs(8));
        inflight.insert((1, 1), fence.clone(), start);
        assert!(inflight.due_for_renewal(Duration::from_secs(5)).is_empty());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            inflight.due_for_renewal(Duration::from_secs(5)),
            vec![(1, 1)]
        );
        let sent = Instant::now();
        inflight.renewed(&[(1, 1)], sent, Duration::from_secs(8));
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(inflight.expire_overdue(), 0, "held until 13 s");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(inflight.expire_overdue(), 1);
        assert!(fence.lost_because().is_some());
        assert!(
            inflight.due_for_renewal(Duration::ZERO).is_empty(),
            "a lost attempt is not renewed"
        );
    }
}
