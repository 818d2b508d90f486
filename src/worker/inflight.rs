//! The units this process holds leases on, for heartbeats and shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Units whose lease this process holds, from claim until their completion or failure is
/// written, with the attempt and when their lease was last set. Shared by the executor, the
/// completer and the heartbeat.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    units: Arc<Mutex<HashMap<i64, (i32, Instant)>>>,
}

impl InFlight {
    /// Records that this process holds unit `id` at `attempt`.
    pub fn insert(&self, id: i64, attempt: i32) {
        if let Ok(mut u) = self.units.lock() {
            u.insert(id, (attempt, Instant::now()));
        }
    }

    /// Forgets unit `id` (completed, failed or lost).
    pub fn remove(&self, id: i64) {
        if let Ok(mut u) = self.units.lock() {
            u.remove(&id);
        }
    }

    /// The held units (id, attempt) whose lease was set at least `age` ago. Units that finish
    /// quickly never need a heartbeat, which keeps heartbeats off the hot path.
    pub fn older_than(&self, age: Duration) -> Vec<(i64, i32)> {
        let now = Instant::now();
        self.units
            .lock()
            .map(|u| {
                u.iter()
                    .filter(|(_, (_, set))| now.duration_since(*set) >= age)
                    .map(|(k, (a, _))| (*k, *a))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records that the leases of `ids` were just extended.
    pub fn renewed(&self, ids: &[i64]) {
        let now = Instant::now();
        if let Ok(mut u) = self.units.lock() {
            for id in ids {
                if let Some(entry) = u.get_mut(id) {
                    entry.1 = now;
                }
            }
        }
    }

    /// How many units are held.
    pub fn len(&self) -> usize {
        self.units.lock().map(|u| u.len()).unwrap_or(0)
    }
}
