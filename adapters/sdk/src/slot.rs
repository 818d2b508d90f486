//! A unit's slot: its place among the units its engine runs at once.
//!
//! The engine runs at most so many units at once (its concurrency); each running unit holds a
//! slot until its attempt ends. A handler that only waits for work done on its behalf by
//! another (an item of a batch, whose shared call runs elsewhere) may hand its slot over, so
//! that the engine claims more units meanwhile: the items of one batch then take one slot, not
//! one each.

use std::any::Any;
use std::sync::{Arc, Mutex, PoisonError};

/// The slot a running unit holds, shared by its context's clones. Empty when the engine gave
/// none (a context built outside an engine) or once taken.
#[derive(Clone, Default)]
pub struct Slot(Arc<Mutex<Option<SlotGuard>>>);

/// A taken slot: held while this lives, given back to the engine when dropped.
pub struct SlotGuard(#[allow(dead_code)] Box<dyn Any + Send>);

impl Slot {
    /// A slot holding `held` (the engine's permit) until it is taken or released.
    pub fn holding(held: impl Any + Send) -> Self {
        Self(Arc::new(Mutex::new(Some(SlotGuard(Box::new(held))))))
    }

    /// Takes the slot out of the unit: whoever keeps the guard holds it, and dropping the guard
    /// gives it back. `None` when it was already taken (or there is none).
    pub fn take(&self) -> Option<SlotGuard> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Gives the slot back now, if it is still here.
    pub fn release(&self) {
        drop(self.take());
    }

    /// Whether the slot is still held by the unit (not taken, not released).
    pub fn is_held(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("held", &self.is_held())
            .finish()
    }
}

impl std::fmt::Debug for SlotGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotGuard")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_given_back_once_whoever_took_it_drops_it() {
        let held = Arc::new(());
        let slot = Slot::holding(held.clone());
        let clone = slot.clone();
        assert!(clone.is_held());
        let guard = slot.take().expect("held");
        assert!(!clone.is_held() && clone.take().is_none());
        assert_eq!(Arc::strong_count(&held), 2, "the guard keeps it");
        drop(guard);
        assert_eq!(
            Arc::strong_count(&held),
            1,
            "dropping the guard gives it back"
        );
        let slot = Slot::holding(held.clone());
        slot.release();
        assert_eq!(Arc::strong_count(&held), 1);
        assert!(Slot::default().take().is_none());
    }
}
