//! The units this process holds leases on, for heartbeats and shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Units (id → attempt) whose lease this process holds: from claim until their completion or
/// failure is written. Shared by the executor, the completer and the heartbeat.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    units: Arc<Mutex<HashMap<i64, i32>>>,
}

impl InFlight {
    /// Records that this process holds unit `id` at `attempt`.
    pub fn insert(&self, id: i64, attempt: i32) {
        if let Ok(mut u) = self.units.lock() {
            u.insert(id, attempt);
        }
    }

    /// Forgets unit `id` (completed, failed or lost).
    pub fn remove(&self, id: i64) {
        if let Ok(mut u) = self.units.lock() {
            u.remove(&id);
        }
    }

    /// The held units as (id, attempt).
    pub fn snapshot(&self) -> Vec<(i64, i32)> {
        self.units
            .lock()
            .map(|u| u.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }

    /// How many units are held.
    pub fn len(&self) -> usize {
        self.units.lock().map(|u| u.len()).unwrap_or(0)
    }
}
