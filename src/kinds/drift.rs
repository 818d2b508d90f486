//! Drift: every resource of a kind that declares an observe step is checked once per interval,
//! whatever the number of engines, spread over the interval.
//!
//! Each resource carries when its next check is due (`next_observe_at`). Every engine runs a
//! [`DriftScheduler`]; a round takes the resources whose check is due with `FOR UPDATE SKIP
//! LOCKED` (so engines never take the same one), moves their due time one interval on, and
//! enqueues their checks — a cost proportional to the resources due, read through one index.
//! A resource seen for the first time is given a due time at random within the interval, which
//! spreads the checks evenly. A check runs beside its resource: it never holds it, so a user's
//! change is never refused because of it, and a change that comes meanwhile supersedes it
//! (the check starts no heal on a resource that changed).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::chains::Chains;
use crate::store::StoreError;
use crate::store::instances::{drift_claim_due, drift_schedule_new};
use crate::store::work::{Lane, work_enqueue};

/// A drift scheduler's settings.
#[derive(Debug, Clone, Copy)]
pub struct DriftConfig {
    /// How often each resource is checked.
    pub interval: Duration,
    /// Most checks enqueued per statement.
    pub batch: i64,
}

/// Enqueues the due drift checks of every kind that declares one.
#[derive(Debug, Clone)]
pub struct DriftScheduler {
    pool: PgPool,
    chains: Arc<Chains>,
    config: DriftConfig,
}

impl DriftScheduler {
    /// A scheduler over `pool` for the kinds of `chains`.
    pub fn new(pool: PgPool, chains: Arc<Chains>, config: DriftConfig) -> Self {
        Self {
            pool,
            chains,
            config: DriftConfig {
                batch: config.batch.max(1),
                ..config
            },
        }
    }

    /// The kinds with an observe step.
    fn kinds(&self) -> Vec<String> {
        self.chains
            .catalog()
            .kinds()
            .filter(|k| k.decl.observe.is_some())
            .map(|k| k.decl.name.clone())
            .collect()
    }

    /// Runs rounds until `shutdown`: often enough that a due check waits at most a
    /// twentieth of the interval (between 1 s and 30 s).
    pub async fn run(self, shutdown: CancellationToken) {
        let tick =
            (self.config.interval / 20).clamp(Duration::from_secs(1), Duration::from_secs(30));
        tracing::info!(interval = ?self.config.interval, "drift checks scheduled");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            match self.run_once().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(checks = n, "drift checks enqueued"),
                Err(e) => tracing::warn!(error = %e, "drift round failed; trying again next round"),
            }
        }
    }

    /// One round: schedules resources never scheduled, then enqueues every due check.
    /// Returns how many checks it enqueued.
    ///
    /// # Errors
    /// Database errors.
    pub async fn run_once(&self) -> Result<usize, StoreError> {
        let kinds = self.kinds();
        if kinds.is_empty() {
            return Ok(0);
        }
        let interval_ms = self.config.interval.as_millis() as i64;
        {
            let mut conn = self.pool.acquire().await?;
            drift_schedule_new(&mut conn, &kinds, self.config.batch, interval_ms).await?;
        }
        let mut total = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let due = drift_claim_due(&mut tx, &kinds, self.config.batch, interval_ms).await?;
            let units: Vec<_> = due
                .iter()
                // A resource that is not READY, or busy, is not checked this round: its chain
                // brings it to its spec, and a check would only compete with it.
                .filter(|r| r.status == "READY" && !r.has_active_work)
                .filter_map(|r| {
                    self.chains
                        .first_unit(&r.kind, "observe", r.id, &r.tenant, r.generation)
                        .map(|u| u.beside_resource().in_lane(Lane::Drift))
                })
                .collect();
            work_enqueue(&mut tx, &units).await?;
            tx.commit().await?;
            total += units.len();
            if (due.len() as i64) < self.config.batch {
                return Ok(total);
            }
        }
    }
}
