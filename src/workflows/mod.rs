//! The KVX workflows: which units of work make up creating, changing, deleting and re-checking
//! an instance, and what each of them asks of the adapters.
//!
//! Every step is its own unit with its own work kind. A step's completion enqueues the next
//! step as a [`FollowUp`], so the next token derives from this one's and a step that runs twice
//! cannot start the next one twice. Steps reach the outside world only through the SDK's domain
//! traits ([`Compute`], [`Cluster`], [`Mailer`]); `setpoint serve` / `setpoint dev` choose the
//! concrete adapters.
//!
//! | operation | steps (kinds)                                                              |
//! |-----------|-----------------------------------------------------------------------------|
//! | create    | `kvx.create.ec2` → `kvx.create.k8s` → `kvx.create.notify` ("ready" mail)   |
//! | update    | `kvx.update.ec2` (resize to the plan) → `kvx.update.k8s` → `kvx.update.notify` |
//! | delete    | `kvx.delete.k8s` → `kvx.delete.ec2` → `kvx.delete.notify` ("deleted" mail) |
//! | resync    | `kvx.observe` → on drift, per [`DriftAction`]: `kvx.heal.ec2` → `kvx.heal.k8s` |
//!
//! Each step passes a [`ChainSpec`] to the next: the instance's identity and desired spec, the
//! machine it learned about, and the [`conditions`] it wrote. Each writes what it learned into
//! the instance's observed state (`machine`, `cluster`, `endpoint`, `conditions`, …).
//!
//! # Layout
//! - [`conditions`]: Kubernetes-style conditions and the parked-chain hook.
//! - `create`, `update`, `delete`: the steps of each operation.
//! - [`drift`]: the observe step, healing, and the periodic [`drift::Resync`].
//! - [`hooks`]: what a unit's life cycle does to its instance ([`hooks::InstanceHooks`]).

pub mod conditions;
mod create;
mod delete;
pub mod drift;
pub mod hooks;
mod update;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use setpoint_adapter::{
    AdapterError, BoxFuture, Cluster, Compute, FollowUp, Handler, IdempotencyToken,
    InstanceObservation, Mailer, Outcome, WorkContext,
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::worker::Registry;
use crate::worker::registry::DuplicateKind;
use conditions::Condition;

/// The first unit of a create (the API's `create_kind`).
pub const CREATE_KIND: &str = "kvx.create.ec2";
/// The first unit of an update (the API's `update_kind`): resizing the machine to the plan.
pub const UPDATE_KIND: &str = "kvx.update.ec2";
/// The first unit of a delete (the API's `delete_kind`).
pub const DELETE_KIND: &str = "kvx.delete.k8s";
/// The unit the resync enqueues per ready instance.
pub const OBSERVE_KIND: &str = "kvx.observe";

/// Every kind the workflows register.
pub const KINDS: &[&str] = &[
    "kvx.create.ec2",
    "kvx.create.k8s",
    "kvx.create.notify",
    "kvx.update.ec2",
    "kvx.update.k8s",
    "kvx.update.notify",
    "kvx.delete.k8s",
    "kvx.delete.ec2",
    "kvx.delete.notify",
    "kvx.observe",
    "kvx.heal.ec2",
    "kvx.heal.k8s",
];

/// What the resync does when an instance's machine was terminated behind setpoint's back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftAction {
    /// Launch a new machine and point the Kubernetes objects at it.
    #[default]
    Heal,
    /// Only record it: `MachineAvailable` and `Ready` become `False`.
    Mark,
}

impl std::str::FromStr for DriftAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "heal" => Ok(Self::Heal),
            "mark" => Ok(Self::Mark),
            other => Err(format!("drift action must be heal or mark, not {other:?}")),
        }
    }
}

/// How the workflows behave.
#[derive(Debug, Clone)]
pub struct WorkflowConfig {
    /// What to do about a machine terminated behind setpoint's back.
    pub drift: DriftAction,
    /// How long a create step waits for its machine to run before it lets the unit retry.
    pub machine_wait: Duration,
}

impl Default for WorkflowConfig {
    fn default() -> Self {
        Self {
            drift: DriftAction::Heal,
            machine_wait: Duration::from_secs(60),
        }
    }
}

/// The adapters and settings every step shares.
pub struct Workflows {
    compute: Arc<dyn Compute>,
    cluster: Arc<dyn Cluster>,
    mailer: Arc<dyn Mailer>,
    pool: PgPool,
    config: WorkflowConfig,
}

impl std::fmt::Debug for Workflows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workflows")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Workflows {
    /// Workflows over these adapters. `pool` is read by the steps that start from what an
    /// earlier chain observed (update).
    pub fn new(
        compute: Arc<dyn Compute>,
        cluster: Arc<dyn Cluster>,
        mailer: Arc<dyn Mailer>,
        pool: PgPool,
        config: WorkflowConfig,
    ) -> Self {
        Self {
            compute,
            cluster,
            mailer,
            pool,
            config,
        }
    }

    /// Registers a handler for every kind in [`KINDS`].
    ///
    /// # Errors
    /// When one of the kinds is already registered.
    pub fn register(self, registry: &mut Registry) -> Result<(), DuplicateKind> {
        let shared = Arc::new(self);
        for kind in KINDS {
            registry.register_arc(Arc::new(Step {
                kind,
                workflows: shared.clone(),
            }))?;
        }
        Ok(())
    }
}

/// The desired spec of a KVX instance, as the API stores it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KvxSpec {
    /// The plan, e.g. `kvx.small`.
    #[serde(default)]
    pub plan: String,
    /// The region.
    #[serde(default)]
    pub region: String,
    /// Storage size in GB.
    #[serde(default)]
    pub size_gb: i64,
    /// Who gets the notifications.
    #[serde(default)]
    pub owner_email: String,
}

/// What a step knows about the instance's machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// The provider's id (`i-…`).
    pub instance_id: String,
    /// Its private IP.
    #[serde(default)]
    pub private_ip: Option<String>,
    /// Its availability zone.
    #[serde(default)]
    pub availability_zone: Option<String>,
    /// The token that launched it (to find it again).
    pub launch_token: String,
    /// Its state when last seen.
    #[serde(default)]
    pub state: String,
    /// Its size (EC2 instance type) when last seen, if the provider reported one.
    #[serde(default)]
    pub instance_type: Option<String>,
}

impl Machine {
    /// This machine as `seen` now: what the provider reported replaces what was known, and
    /// what it left out stays.
    pub fn seen(self, seen: InstanceObservation) -> Machine {
        Machine {
            instance_id: seen.instance_id,
            private_ip: seen.private_ip.or(self.private_ip),
            availability_zone: seen.availability_zone.or(self.availability_zone),
            launch_token: self.launch_token,
            state: seen.state.to_string(),
            instance_type: seen.instance_type.or(self.instance_type),
        }
    }
}

/// The spec of every KVX unit: what the API enqueued, plus what earlier steps of the chain
/// learned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainSpec {
    /// The instance.
    pub instance_id: Uuid,
    /// Its tenant.
    pub tenant: String,
    /// Its name.
    pub name: String,
    /// `create`, `update`, `delete` or `resync`.
    #[serde(default)]
    pub operation: String,
    /// The spec generation the chain works towards.
    #[serde(default)]
    pub generation: i64,
    /// The desired spec.
    #[serde(default)]
    pub spec: KvxSpec,
    /// The machine, once known.
    #[serde(default)]
    pub machine: Option<Machine>,
    /// The conditions the previous step wrote.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

impl ChainSpec {
    /// Sets a condition at this chain's generation.
    fn set(
        &mut self,
        kind: &str,
        status: conditions::ConditionStatus,
        reason: &str,
        message: impl Into<String>,
    ) {
        conditions::set(
            &mut self.conditions,
            kind,
            status,
            reason,
            message,
            self.generation,
        );
    }

    /// The follow-up unit `kind` at `step`, carrying this chain.
    fn next(&self, step: &str, kind: &str) -> FollowUp {
        FollowUp::new(
            step,
            kind,
            serde_json::to_value(self).unwrap_or(Value::Null),
        )
    }

    /// The `conditions` key of the observed state.
    fn observed_conditions(&self) -> Value {
        serde_json::to_value(&self.conditions).unwrap_or(Value::Array(Vec::new()))
    }
}

/// One registered kind; dispatches to its step function.
/// Calls an adapter for the unit in `ctx`, with `token` (the unit's own, or the one that
/// launched the machine): the call is listed in the unit's history (the `calls` of its
/// `succeeded` or `failed` event) and counted in the metrics.
async fn adapter_call<T>(
    ctx: &WorkContext,
    token: &IdempotencyToken,
    adapter: &'static str,
    operation: &'static str,
    call: impl std::future::Future<Output = Result<T, AdapterError>>,
) -> Result<T, AdapterError> {
    // Recorded before the call: an attempt that fails or times out made it all the same.
    ctx.record_call(format!("{adapter}:{operation} token={token}"));
    crate::metrics::adapter_call(adapter, operation, call).await
}

/// Fills in what the chain does not carry yet from the instance's observed state: the machine
/// and the conditions the earlier chains wrote.
async fn load_observed(wf: &Workflows, chain: &mut ChainSpec) -> Result<(), AdapterError> {
    if chain.machine.is_some() && !chain.conditions.is_empty() {
        return Ok(());
    }
    let database = |e: &dyn std::fmt::Display| {
        AdapterError::transient(format!("cannot read the instance: {e}")).with_code("database")
    };
    let facts = {
        let mut conn = wf.pool.acquire().await.map_err(|e| database(&e))?;
        crate::store::workflows::instance_facts_get(&mut conn, chain.instance_id, false)
            .await
            .map_err(|e| database(&e))?
    };
    let Some(facts) = facts else {
        return Err(AdapterError::permanent(format!(
            "instance {} does not exist",
            chain.instance_id
        )));
    };
    if chain.machine.is_none() {
        chain.machine = facts
            .observed
            .get("machine")
            .cloned()
            .and_then(|m| serde_json::from_value::<Machine>(m).ok());
    }
    if chain.conditions.is_empty() {
        chain.conditions = conditions::from_observed(&facts.observed);
    }
    Ok(())
}

struct Step {
    kind: &'static str,
    workflows: Arc<Workflows>,
}

impl Handler for Step {
    fn kind(&self) -> &str {
        self.kind
    }

    fn handle<'a>(
        &'a self,
        ctx: &'a WorkContext,
        spec: &'a Value,
    ) -> BoxFuture<'a, Result<Outcome, AdapterError>> {
        Box::pin(async move {
            let chain: ChainSpec = serde_json::from_value(spec.clone()).map_err(|e| {
                AdapterError::permanent(format!(
                    "the spec of this {} unit is not a KVX chain spec: {e}",
                    self.kind
                ))
                .with_code("invalid-spec")
            })?;
            let wf = &self.workflows;
            tracing::debug!(work_id = ctx.work_id, token = %ctx.token, instance = %chain.instance_id, "KVX step");
            match self.kind {
                "kvx.create.ec2" => {
                    create::ensure_machine(wf, ctx, chain, create::Mode::Create).await
                }
                "kvx.create.k8s" => {
                    create::apply_cluster(wf, ctx, chain, create::Mode::Create).await
                }
                "kvx.create.notify" => create::notify_ready(wf, ctx, chain).await,
                "kvx.update.ec2" => update::resize_machine(wf, ctx, chain).await,
                "kvx.update.k8s" => update::apply_cluster(wf, ctx, chain).await,
                "kvx.update.notify" => create::notify_ready(wf, ctx, chain).await,
                "kvx.delete.k8s" => delete::delete_cluster(wf, ctx, chain).await,
                "kvx.delete.ec2" => delete::terminate_machine(wf, ctx, chain).await,
                "kvx.delete.notify" => delete::notify_deleted(wf, ctx, chain).await,
                "kvx.observe" => drift::observe(wf, ctx, chain).await,
                "kvx.heal.ec2" => create::ensure_machine(wf, ctx, chain, create::Mode::Heal).await,
                "kvx.heal.k8s" => create::apply_cluster(wf, ctx, chain, create::Mode::Heal).await,
                other => Err(AdapterError::permanent(format!(
                    "the KVX workflows have no step {other:?}"
                ))),
            }
        })
    }
}
