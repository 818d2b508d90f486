//! Lease renewal and the fences that follow it: while an attempt runs, its lease is renewed
//! every interval, and its fence holds only as long as the last renewal that succeeded
//! guarantees. An attempt whose lease was not renewed in time, or was taken over, is told it
//! lost its unit (its fence), so it stops before another worker acts.

use setpoint_adapter::BoxFuture;
use sqlx::PgPool;
use tokio::time::{Duration, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::inflight::{AttemptKey, InFlight};
use crate::store::StoreError;
use crate::store::work::{Renewals, work_heartbeat};

/// How renewals are timed.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often leases are renewed.
    pub interval: Duration,
    /// How long a renewal sent at `t` lets the attempt act: until `t + hold` (the lease
    /// minus a margin for clock rates and the statement's own latency).
    pub hold: Duration,
}

/// The database side of renewals: a trait so that the loop can be tested under tokio's paused
/// clock.
pub trait LeaseStore: Send + Sync + 'static {
    /// Renews the leases of `units`.
    fn renew<'a>(&'a self, units: &'a [AttemptKey]) -> BoxFuture<'a, Result<Renewals, StoreError>>;
}

/// Renewals on PostgreSQL, on the runtime's own connections (never the API's: a flood of API
/// requests must not cost a running unit its lease).
pub struct PgLeases {
    /// The runtime's control pool.
    pub pool: PgPool,
    /// This worker's name in leases.
    pub worker: String,
    /// The lease a renewal sets.
    pub lease: Duration,
}

impl LeaseStore for PgLeases {
    fn renew<'a>(&'a self, units: &'a [AttemptKey]) -> BoxFuture<'a, Result<Renewals, StoreError>> {
        Box::pin(async move {
            let mut conn = self.pool.acquire().await?;
            work_heartbeat(
                &mut conn,
                &self.worker,
                units,
                self.lease.as_millis() as i64,
            )
            .await
        })
    }
}

/// Every `timing.interval`, renews the leases of the attempts in `inflight` that need it, until
/// `shutdown`. A failed renewal is retried within the interval; an attempt found taken over is
/// told at once.
pub async fn run(
    store: impl LeaseStore,
    inflight: InFlight,
    timing: Timing,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(timing.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = beat(&store, &inflight, timing) => {}
        }
    }
}

/// One round of renewals. Attempts whose lease was set less than half an interval ago skip it
/// (a unit shorter than that never costs a renewal); every other held attempt is renewed at
/// every round, so renewals are at most 1.5 intervals apart.
async fn beat(store: &impl LeaseStore, inflight: &InFlight, timing: Timing) {
    let units = inflight.due_for_renewal(timing.interval / 2);
    if units.is_empty() {
        return;
    }
    let give_up = Instant::now() + timing.interval;
    let mut delay = Duration::from_millis(100).min(timing.interval / 8);
    loop {
        // The time the statement is *sent*: the database's new lease starts after it.
        let sent_at = Instant::now();
        match store.renew(&units).await {
            Ok(r) => {
                inflight.renewed(&r.renewed, sent_at, timing.hold);
                if !r.lost.is_empty() {
                    tracing::warn!(units = ?r.lost, "units taken over by another worker, finished or \
                        removed elsewhere; their attempts here stop");
                    inflight.lose(&r.lost, "the unit was taken over or removed");
                }
                return;
            }
            Err(e) if Instant::now() + delay < give_up => {
                tracing::warn!(error = %e, units = units.len(), retry_in = ?delay,
                    "renewing leases failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(timing.interval / 4);
            }
            Err(e) => {
                tracing::warn!(error = %e, units = units.len(),
                    "renewing leases failed for a whole interval; trying again at the next one \
                     (attempts whose lease runs out meanwhile stop)");
                return;
            }
        }
    }
}

/// Every `period`, tells the attempts whose fence ran out that they lost their unit, until
/// `shutdown`. Fences also read the clock at every check; this wakes attempts that are waiting
/// (on a slow peer, a long poll) rather than checking.
pub async fn watchdog(inflight: InFlight, period: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let lost = inflight.expire_overdue();
        if lost > 0 {
            tracing::warn!(
                attempts = lost,
                "leases not renewed in time; those attempts stop (another worker may take their \
                 units over)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use setpoint_adapter::Fence;

    use super::*;

    /// Renews whatever it is asked to, failing the calls listed in `fail_at` (by call number).
    #[derive(Default, Clone)]
    struct Counting {
        renewals: Arc<Mutex<HashMap<AttemptKey, u32>>>,
        calls: Arc<Mutex<u32>>,
        fail_at: Arc<Vec<u32>>,
        lost: Arc<Vec<AttemptKey>>,
    }

    impl LeaseStore for Counting {
        fn renew<'a>(
            &'a self,
            units: &'a [AttemptKey],
        ) -> BoxFuture<'a, Result<Renewals, StoreError>> {
            Box::pin(async move {
                let call = {
                    let mut c = self.calls.lock().expect("lock");
                    *c += 1;
                    *c
                };
                // A renewal takes a little time, like a database round trip.
                tokio::time::sleep(Duration::from_millis(5)).await;
                if self.fail_at.contains(&call) {
                    return Err(StoreError::Database(sqlx::Error::PoolTimedOut));
                }
                let mut out = Renewals::default();
                let mut counts = self.renewals.lock().expect("lock");
                for k in units {
                    if self.lost.contains(k) {
                        out.lost.push(*k);
                    } else {
                        *counts.entry(*k).or_default() += 1;
                        out.renewed.push(*k);
                    }
                }
                Ok(out)
            })
        }
    }

    const INTERVAL: Duration = Duration::from_secs(10);
    const LEASE: Duration = Duration::from_secs(30);
    const HOLD: Duration = Duration::from_secs(24);

    fn start(store: Counting, inflight: &InFlight) -> CancellationToken {
        let stop = CancellationToken::new();
        let timing = Timing {
            interval: INTERVAL,
            hold: HOLD,
        };
        tokio::spawn(run(store, inflight.clone(), timing, stop.clone()));
        tokio::spawn(watchdog(
            inflight.clone(),
            Duration::from_secs(1),
            stop.clone(),
        ));
        stop
    }

    fn claim(inflight: &InFlight, key: AttemptKey) -> Fence {
        let now = Instant::now();
        let fence = Fence::until(now + HOLD);
        inflight.insert(key, fence.clone(), now);
        fence
    }

    /// Defect 2: the renewal was recorded when the query *returned*, so at the next tick the
    /// unit looked fresh and was skipped: one renewal every second interval, a 10 s margin on
    /// a 30 s lease. Now every interval renews every long-running attempt.
    #[tokio::test(start_paused = true)]
    async fn a_long_unit_is_renewed_at_every_interval() {
        let store = Counting::default();
        let inflight = InFlight::default();
        let stop = start(store.clone(), &inflight);
        // Claimed just after the first tick (which renews nothing).
        tokio::time::sleep(Duration::from_millis(1)).await;
        let fence = claim(&inflight, (1, 1));
        tokio::time::sleep(INTERVAL * 10 + Duration::from_secs(1)).await;
        let renewals = store.renewals.lock().expect("lock")[&(1, 1)];
        assert_eq!(renewals, 10, "one renewal per interval over ten intervals");
        assert!(fence.is_held());
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_is_retried_within_the_interval() {
        let store = Counting {
            fail_at: Arc::new(vec![2, 3]),
            ..Counting::default()
        };
        let inflight = InFlight::default();
        let stop = start(store.clone(), &inflight);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let fence = claim(&inflight, (1, 1));
        tokio::time::sleep(INTERVAL * 3 + Duration::from_secs(1)).await;
        // Calls 2 and 3 failed within the second round; call 4 renewed in the same round.
        assert_eq!(store.renewals.lock().expect("lock")[&(1, 1)], 3);
        assert!(fence.is_held());
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_without_renewals_loses_its_fence_before_the_lease_runs_out() {
        // Every renewal fails, as when the database is unreachable from this process.
        let store = Counting {
            fail_at: Arc::new((1..1000).collect()),
            ..Counting::default()
        };
        let inflight = InFlight::default();
        let stop = start(store, &inflight);
        let claimed_at = Instant::now();
        let fence = claim(&inflight, (1, 1));
        let lost = tokio::time::timeout(LEASE, fence.lost()).await;
        assert!(lost.is_ok(), "the fence is lost within the lease");
        let after = claimed_at.elapsed();
        assert!(after >= HOLD && after < LEASE, "lost after {after:?}");
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_unit_taken_over_is_lost_at_once_and_other_attempts_keep_theirs() {
        let store = Counting {
            lost: Arc::new(vec![(1, 1)]),
            ..Counting::default()
        };
        let inflight = InFlight::default();
        let stop = start(store, &inflight);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let stale = claim(&inflight, (1, 1));
        let live = claim(&inflight, (1, 2));
        tokio::time::sleep(INTERVAL + Duration::from_secs(1)).await;
        assert!(!stale.is_held());
        assert!(live.is_held());
        stop.cancel();
    }
}
