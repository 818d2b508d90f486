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
        // Only units whose lease is at least one interval old: a lease set by the claim is
        // fresh, so units shorter than the interval never need a heartbeat.
        let units = inflight.older_than(interval);
        if units.is_empty() {
            continue;
        }
        let result = async {
            let mut conn = pool.acquire().await?;
            work_heartbeat(&mut conn, &worker, &units, lease.as_millis() as i64).await
        }
        .await;
        match result {
            Ok(kept) => {
                inflight.renewed(&kept);
                if kept.len() < units.len() {
                    // Taken over by another worker (its completion will be fenced off), or
                    // being completed right now (row locked); the next beat tells them apart.
                    tracing::debug!(
                        asked = units.len(),
                        renewed = kept.len(),
                        "some leases were not renewed"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, units = units.len(), "heartbeat failed; will retry")
            }
        }
    }
}
