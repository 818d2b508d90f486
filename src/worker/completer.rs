//! Batched, fenced completion of successful units.
//!
//! Handlers finish one by one; committing each in its own transaction would cap throughput at
//! the database's commit rate. The completer gathers what finished while the previous batch was
//! committing and completes it in one transaction: the fenced delete with `succeeded` events,
//! the follow-up units, the observed state and `has_active_work` — all or nothing, and only for
//! units this worker still holds at the same attempt.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::Value;
use setpoint_adapter::{IdempotencyToken, Outcome};
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::inflight::InFlight;
use crate::store::StoreError;
use crate::store::instances::{instance_merge_observed, instances_clear_active_work};
use crate::store::work::{Completion, NewWork, work_complete_if_leased, work_enqueue};

/// A unit whose handler succeeded, waiting to be committed.
#[derive(Debug)]
pub struct Finished {
    /// Row id.
    pub id: i64,
    /// The attempt that ran.
    pub attempt: i32,
    /// The unit's token (follow-up tokens derive from it).
    pub token: IdempotencyToken,
    /// The unit's resource and tenant.
    pub resource_id: Option<Uuid>,
    /// Tenant of the resource.
    pub tenant: Option<String>,
    /// What the handler returned.
    pub outcome: Outcome,
    /// Event detail: adapter calls, duration.
    pub detail: Value,
    /// When the lease runs out if no heartbeat renews it: past it, retrying is pointless.
    pub lease_deadline: Instant,
}

/// Runs until `rx` closes, committing what arrives in batches of at most `max_batch`.
pub async fn run(
    pool: PgPool,
    worker: String,
    inflight: InFlight,
    mut rx: mpsc::Receiver<Finished>,
    max_batch: usize,
) {
    let mut batch: Vec<Finished> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        commit_with_retry(&pool, &worker, &mut batch).await;
        for f in batch.drain(..) {
            inflight.remove(f.id);
        }
    }
}

async fn commit_with_retry(pool: &PgPool, worker: &str, batch: &mut Vec<Finished>) {
    let mut delay = Duration::from_millis(50);
    loop {
        match commit(pool, worker, batch).await {
            Ok(fenced) => {
                if fenced > 0 {
                    tracing::warn!(fenced, "completions discarded: their leases were lost");
                }
                return;
            }
            Err(e) => {
                // Completions are fenced, so retrying the same batch is always safe. Once a
                // unit's lease has run out another worker may redo it; stop holding it.
                let now = Instant::now();
                batch.retain(|f| {
                    let keep = f.lease_deadline > now;
                    if !keep {
                        tracing::warn!(work_id = f.id, token = %f.token, "completion abandoned after its lease ran out; the unit will be rescued");
                    }
                    keep
                });
                if batch.is_empty() {
                    return;
                }
                tracing::warn!(error = %e, units = batch.len(), "completing units failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Commits `batch`; returns how many units were fenced off.
async fn commit(pool: &PgPool, worker: &str, batch: &[Finished]) -> Result<usize, StoreError> {
    let completions: Vec<Completion> = batch
        .iter()
        .map(|f| Completion {
            id: f.id,
            attempt: f.attempt,
            detail: f.detail.clone(),
        })
        .collect();
    let mut tx = pool.begin().await?;
    let done = work_complete_if_leased(&mut tx, worker, &completions).await?;
    let applied: std::collections::HashSet<i64> = done.iter().map(|d| d.id).collect();
    let mut follow_ups = Vec::new();
    let mut touched: BTreeSet<Uuid> = BTreeSet::new();
    for f in batch.iter().filter(|f| applied.contains(&f.id)) {
        if let (Some(resource), Some(observed)) = (f.resource_id, &f.outcome.observed) {
            instance_merge_observed(&mut tx, resource, observed).await?;
        }
        if let Some(resource) = f.resource_id {
            touched.insert(resource);
        }
        for step in &f.outcome.follow_ups {
            follow_ups.push(NewWork {
                kind: step.kind.clone(),
                spec: step.spec.clone(),
                token: f.token.derive(&step.step),
                resource_id: f.resource_id,
                tenant: f.tenant.clone(),
                parent_id: Some(f.id),
                run_at: step
                    .delay
                    .and_then(|d| chrono::Duration::from_std(d).ok())
                    .map(|d| Utc::now() + d),
                max_attempts: None,
                fresh_token: false,
            });
        }
    }
    work_enqueue(&mut tx, &follow_ups).await?;
    let touched: Vec<Uuid> = touched.into_iter().collect();
    instances_clear_active_work(&mut tx, &touched).await?;
    tx.commit().await?;
    Ok(batch.len() - applied.len())
}
