//! The cap on open WatchInstance streams per tenant. A stream holds a database-backed task and
//! a subscription for as long as the client keeps it open, so without a cap one tenant could
//! hold any number; with it, one tenant's streams cannot crowd out another's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::errors::ApiError;

/// Open streams per tenant, up to a limit.
#[derive(Debug, Clone)]
pub struct WatchSlots {
    max_per_tenant: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open stream of a tenant; dropping it frees the slot.
#[derive(Debug)]
pub struct WatchSlot {
    tenant: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl WatchSlots {
    /// At most `max_per_tenant` streams per tenant (at least one).
    pub fn new(max_per_tenant: usize) -> Self {
        Self {
            max_per_tenant: max_per_tenant.max(1),
            open: Arc::default(),
        }
    }

    /// A slot for one more stream of `tenant`.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` naming the limit when `tenant` has as many streams open.
    pub fn open(&self, tenant: &str) -> Result<WatchSlot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(tenant.to_owned()).or_insert(0);
        if *n >= self.max_per_tenant {
            return Err(ApiError::Exhausted {
                subject: format!("tenants/{tenant}"),
                description: format!(
                    "tenant {tenant} already has {} WatchInstance streams open, its limit \
                     (api.max_watches_per_tenant); close one first",
                    self.max_per_tenant
                ),
                retry_after: None,
            });
        }
        *n += 1;
        Ok(WatchSlot {
            tenant: tenant.to_owned(),
            open: self.open.clone(),
        })
    }

    /// Streams `tenant` has open.
    pub fn count(&self, tenant: &str) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(tenant).copied().unwrap_or(0)
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // No entry for a tenant without streams: the map does not grow with tenants
                // that watched once.
                open.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tenant_gets_its_own_slots_and_a_closed_stream_frees_one() {
        let slots = WatchSlots::new(2);
        let a1 = slots.open("acme").unwrap();
        let _a2 = slots.open("acme").unwrap();
        let e = slots.open("acme").unwrap_err();
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("api.max_watches_per_tenant"),
            "{status:?}"
        );
        assert!(status.message().contains('2'));
        let _g = slots.open("globex").unwrap();
        drop(a1);
        assert_eq!(slots.count("acme"), 1);
        let _a3 = slots.open("acme").unwrap();
        drop(_g);
        assert_eq!(slots.count("globex"), 0);
        assert!(!slots.open.lock().unwrap().contains_key("globex"));
    }
}
