//! Lease renewal: while a unit runs, its lease is extended so no other worker takes it over.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::inflight::InFlight;
use crate::store::work::work_heartbeat;

/// Every `interval`, extends the leases of all units in `inflight` to `lease` from now, until
/// `shutdown`. A unit whose lease could not be extended (taken over after this process
/// stalled) is logged; its completion will be fenced off.
pub async fn run(
    pool: PgPool,
    worker: String,
    inflight: InFlight,
    interval: Duration,
    lease: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let units = inflight.snapshot();
        if units.is_empty() {
            continue;
        }
        let result = async {
            let mut conn = pool.acquire().await?;
            work_heartbeat(&mut conn, &worker, &units, lease.as_millis() as i64).await
        }
        .await;
        match result {
            Ok(kept) if kept.len() < units.len() => {
                let kept: std::collections::HashSet<i64> = kept.into_iter().collect();
                for (id, attempt) in units.iter().filter(|(id, _)| !kept.contains(id)) {
                    tracing::warn!(
                        work_id = id,
                        attempt,
                        "lease lost; this attempt's result will be discarded"
                    );
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, units = units.len(), "heartbeat failed; will retry")
            }
        }
    }
}
