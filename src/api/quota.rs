//! Backpressure: a per-tenant quota on changes in flight.
//!
//! A change is *in flight* while its resource has active work (`has_active_work`: a create,
//! update or delete chain queued or running). A tenant at its quota gets `RESOURCE_EXHAUSTED`
//! with a `RetryInfo` delay instead of a unit in a queue without bound: the backlog one tenant
//! can build, and so the delay it can cause everyone else, stays bounded.
//!
//! Counting the tenant's active resources on every call would cost a query per request, so
//! each process remembers the last count per tenant and the changes it admitted since. While
//! that sum stays under the quota and the count is younger than [`RECOUNT_AFTER`], a change is
//! admitted without asking the database; otherwise the count is taken again (up to the quota
//! only, on `instances_active_tenant_idx`). Within one process the quota is therefore exact
//! for changes that arrive one after another, and it is never exceeded by more than the
//! changes other engine processes admitted within [`RECOUNT_AFTER`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::PgConnection;

use super::errors::ApiError;
use crate::store::instances::tenant_changes_in_flight;
use crate::store::work::Lane;

/// Default [`ChangeQuota`] limit: resources of one tenant with a change in flight.
pub const DEFAULT_MAX_CHANGES_IN_FLIGHT: usize = 1000;
/// The delay a refused caller is told to wait (`google.rpc.RetryInfo`): about the time a short
/// chain takes, so that a client retrying at this pace finds room as changes finish.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a tenant's count is trusted before it is taken again.
pub const RECOUNT_AFTER: Duration = Duration::from_secs(1);
/// Tenants remembered before stale entries are dropped (the map must not grow with the number
/// of tenants ever seen).
const MAX_REMEMBERED: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Active resources at `at` (at most the quota).
    counted: i64,
    at: Instant,
    /// Changes admitted by this process since `at`.
    admitted: i64,
}

/// The per-tenant quota of one API process; cheap to clone (shared by InstanceService and
/// ResourceService, so their changes count together).
#[derive(Debug, Clone)]
pub struct ChangeQuota {
    max: i64,
    seen: Arc<Mutex<HashMap<String, Seen>>>,
}

impl ChangeQuota {
    /// At most `max` resources of a tenant with a change in flight (at least one).
    pub fn new(max: usize) -> Self {
        Self {
            max: i64::try_from(max.max(1)).unwrap_or(i64::MAX),
            seen: Arc::default(),
        }
    }

    /// The limit.
    pub fn max(&self) -> usize {
        usize::try_from(self.max).unwrap_or(usize::MAX)
    }

    /// True when one more change of `tenant` fits by this process's last count, without
    /// asking the database (and then counts it as admitted). A caller that gets `false` must
    /// use [`ChangeQuota::admit`], which counts again.
    pub fn admit_known(&self, tenant: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        match seen.get_mut(tenant) {
            Some(s) if s.at.elapsed() < RECOUNT_AFTER && s.counted + s.admitted < self.max => {
                s.admitted += 1;
                true
            }
            _ => false,
        }
    }

    /// Admits one more change of `tenant`, counting its active resources on `conn` when this
    /// process's last count does not settle it. Run it in the change's transaction, before
    /// anything is written: a refusal then writes nothing.
    ///
    /// # Errors
    /// [`ApiError::Exhausted`] (`RESOURCE_EXHAUSTED` with `QuotaFailure` and `RetryInfo`) when
    /// the tenant has `max` resources with a change in flight; database errors.
    pub async fn admit(&self, conn: &mut PgConnection, tenant: &str) -> Result<(), ApiError> {
        if self.admit_known(tenant) {
            return Ok(());
        }
        let counted = tenant_changes_in_flight(conn, tenant, self.max).await?;
        let admitted = counted < self.max;
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if seen.len() >= MAX_REMEMBERED {
                seen.retain(|_, s| s.at.elapsed() < RECOUNT_AFTER);
            }
            seen.insert(
                tenant.to_owned(),
                Seen {
                    counted,
                    at: Instant::now(),
                    admitted: i64::from(admitted),
                },
            );
        }
        if admitted {
            return Ok(());
        }
        crate::metrics::api_quota_refused();
        Err(ApiError::Exhausted {
            subject: format!("tenants/{tenant}"),
            description: format!(
                "tenant {tenant} has {} resources with a change in progress, its limit \
                 (api.max_changes_in_flight_per_tenant); retry in {}s, once some of them are \
                 READY (`setpoint instances list`), or ask the operator to raise the limit",
                self.max,
                RETRY_AFTER.as_secs()
            ),
            retry_after: Some(RETRY_AFTER),
        })
    }
}

/// The lane of a change's first unit: the bulk lane when the client marked the request as
/// bulk (a mass update, an import), else the change lane.
pub fn lane_of(bulk: bool) -> Lane {
    if bulk { Lane::Bulk } else { Lane::Change }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_room_is_used_up_then_the_database_must_count() {
        let q = ChangeQuota::new(3);
        assert!(!q.admit_known("acme"), "nothing known yet");
        q.seen.lock().unwrap().insert(
            "acme".into(),
            Seen {
                counted: 1,
                at: Instant::now(),
                admitted: 0,
            },
        );
        assert!(q.admit_known("acme"));
        assert!(q.admit_known("acme"));
        assert!(!q.admit_known("acme"), "1 counted + 2 admitted = the quota");
        assert!(!q.admit_known("globex"));
        q.seen.lock().unwrap().insert(
            "old".into(),
            Seen {
                counted: 0,
                at: Instant::now() - RECOUNT_AFTER * 2,
                admitted: 0,
            },
        );
        assert!(!q.admit_known("old"), "a stale count is taken again");
        assert_eq!(ChangeQuota::new(0).max(), 1);
    }
}
