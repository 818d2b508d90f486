//! Drift: the periodic resync enqueues a `kvx.observe` unit per ready, idle instance; the unit
//! looks for the instance's machine by its launch token and, when it is gone (terminated behind
//! setpoint's back), heals the instance (a new machine, objects re-pointed) or marks it, per
//! [`DriftAction`].

use std::time::Duration;

use serde_json::json;
use setpoint_adapter::{AdapterError, IdempotencyToken, Outcome, WorkContext};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::adapter_call;
use super::conditions::{self, ConditionStatus, MACHINE_AVAILABLE, READY};
use super::{ChainSpec, DriftAction, KvxSpec, OBSERVE_KIND, Workflows};
use crate::queue::NewWork;
use crate::store::StoreError;
use crate::store::work::work_enqueue;
use crate::store::workflows::resync_claim_ready;

/// Checks the instance's machine. Running: refreshes `machine` and `MachineAvailable`. Gone:
/// `MachineAvailable` and `Ready` become `False`; with [`DriftAction::Heal`] a new machine is
/// launched (`kvx.heal.ec2`, with a token derived from this unit's).
pub(super) async fn observe(
    wf: &Workflows,
    ctx: &WorkContext,
    mut chain: ChainSpec,
) -> Result<Outcome, AdapterError> {
    let Some(machine) = chain.machine.clone() else {
        // Nothing launched yet that we know of: nothing to compare.
        return Ok(Outcome::done());
    };
    let token = IdempotencyToken::parse(machine.launch_token.clone()).map_err(|e| {
        AdapterError::permanent(format!("the recorded launch token is invalid: {e}"))
    })?;
    let seen = adapter_call(
        ctx,
        &token,
        "compute",
        "describe_instance",
        wf.compute.describe_instance(&token),
    )
    .await?;
    match seen {
        Some(seen) if !seen.state.is_gone() => {
            chain.set(
                MACHINE_AVAILABLE,
                ConditionStatus::True,
                "MachineRunning",
                format!("machine {} is {}", seen.instance_id, seen.state),
            );
            let machine = machine.seen(seen);
            Ok(Outcome::done().observed(json!({
                "machine": machine,
                "conditions": chain.observed_conditions(),
                "last_resync_at": chrono::Utc::now(),
            })))
        }
        _ => {
            tracing::warn!(work_id = ctx.work_id, token = %ctx.token, instance = %chain.instance_id,
                machine = %machine.instance_id, "drift: the machine was terminated outside setpoint");
            chain.set(
                MACHINE_AVAILABLE,
                ConditionStatus::False,
                "TerminatedOutsideSetpoint",
                format!(
                    "machine {} was terminated outside setpoint",
                    machine.instance_id
                ),
            );
            let mut outcome = Outcome::done();
            match wf.config.drift {
                DriftAction::Heal => {
                    chain.set(
                        READY,
                        ConditionStatus::False,
                        "Healing",
                        "launching a new machine",
                    );
                    chain.machine = None;
                    outcome = outcome.then(chain.next("heal-ec2", "kvx.heal.ec2"));
                }
                DriftAction::Mark => {
                    chain.set(
                        READY,
                        ConditionStatus::False,
                        "MachineLost",
                        "the machine is gone; delete the instance, or run the engine with \
                         drift action `heal` to replace it",
                    );
                }
            }
            Ok(outcome.observed(json!({
                "machine": { "state": "terminated", "instance_id": machine.instance_id,
                             "launch_token": machine.launch_token },
                "conditions": chain.observed_conditions(),
                "last_resync_at": chrono::Utc::now(),
            })))
        }
    }
}

/// The periodic resync: every `interval`, enqueue a `kvx.observe` unit per ready, idle instance.
/// Safe with many engines: an instance is picked by one transaction at a time and marked
/// active, so it gets one observe unit per round at most.
#[derive(Debug, Clone)]
pub struct Resync {
    pool: PgPool,
    interval: Duration,
    batch: i64,
}

impl Resync {
    /// A resync over `pool` every `interval`, picking at most `batch` instances per statement.
    pub fn new(pool: PgPool, interval: Duration, batch: i64) -> Self {
        Self {
            pool,
            interval,
            batch: batch.max(1),
        }
    }

    /// Runs [`Resync::run_once`] every interval until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(interval = ?self.interval, "resync started");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
            match self.run_once().await {
                Ok(n) if n > 0 => tracing::info!(instances = n, "resync: observe units enqueued"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "resync failed; trying again next round"),
            }
        }
    }

    /// Enqueues one observe unit per ready, idle instance; returns how many.
    ///
    /// # Errors
    /// Database errors.
    pub async fn run_once(&self) -> Result<usize, StoreError> {
        let mut total = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let picked = resync_claim_ready(&mut tx, self.batch).await?;
            let units: Vec<NewWork> = picked
                .iter()
                .map(|f| {
                    let chain = ChainSpec {
                        instance_id: f.id,
                        tenant: f.tenant.clone(),
                        name: f.name.clone(),
                        operation: "resync".into(),
                        generation: f.generation,
                        spec: serde_json::from_value::<KvxSpec>(f.spec.clone()).unwrap_or_default(),
                        machine: f
                            .observed
                            .get("machine")
                            .cloned()
                            .and_then(|m| serde_json::from_value(m).ok()),
                        conditions: conditions::from_observed(&f.observed),
                    };
                    NewWork::new(
                        OBSERVE_KIND,
                        serde_json::to_value(&chain).unwrap_or_default(),
                    )
                    .for_resource(f.id, f.tenant.clone())
                })
                .collect();
            work_enqueue(&mut tx, &units).await?;
            tx.commit().await?;
            total += units.len();
            if (units.len() as i64) < self.batch {
                return Ok(total);
            }
        }
    }
}
