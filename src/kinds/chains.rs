//! The chain runner: it runs the declared chains of every kind, one unit per step.
//!
//! - [`StepHandler`] runs a [`Step`] as the handler of its work kind: it reads the resource,
//!   upgrades its spec to the kind's current schema, opens its secret outputs, and hands the
//!   step a [`StepInput`]. Steps never touch the database.
//! - [`Chains`] is the domain's [`UnitHooks`]: in a step's fenced completion it records the
//!   step's output (visible, or sealed when secret) and conditions and enqueues what comes next
//!   (the chain's next step, a named chain, or nothing), with a token derived from the step's;
//!   a chain ends when no unit holding the resource is left, and the status trigger then
//!   makes the resource READY or DELETED. It also says on the resource why a unit was parked
//!   or cancelled.
//!
//! A unit's spec is only `{"resource_id", "generation"}`: its place in the chains comes from
//! its work kind ([`KindCatalog::position`]), its inputs from the resource. Units of the
//! previous release (`instance_id` and the whole chain in the spec) are read the same way.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use setpoint_adapter::{
    AdapterError, BoxFuture, Handler, Outcome, ResourceRef, Secrets, Step, StepInput, StepResult,
    Then, WorkContext,
};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::batch::Batcher;
use super::catalog::{KindCatalog, Position};
use super::conditions::{self, ConditionStatus, READY};
use super::secrets::SecretBox;
use crate::plugin::StepImpl;
use crate::store::StoreError;
use crate::store::instances::{
    StepResource, instance_mark_active, instance_merge_observed, instances_clear_active_work,
    resource_for_step, resource_record_step,
};
use crate::store::work::{NewWork, work_enqueue};
use crate::worker::hooks::{CompletedUnit, UnitEvent, UnitHooks};

/// The spec of a chain step's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepUnit {
    /// The resource.
    pub resource_id: Uuid,
    /// The spec generation the chain works towards.
    pub generation: i64,
}

impl StepUnit {
    /// The unit's spec.
    pub fn spec(&self) -> Value {
        json!({ "resource_id": self.resource_id, "generation": self.generation })
    }

    /// Reads a unit's spec: this release's, or the previous release's KVX chain spec (which
    /// names the resource `instance_id`).
    pub fn from_spec(spec: &Value) -> Option<Self> {
        let id = spec
            .get("resource_id")
            .or_else(|| spec.get("instance_id"))?
            .as_str()?
            .parse()
            .ok()?;
        Some(Self {
            resource_id: id,
            generation: spec.get("generation").and_then(Value::as_i64).unwrap_or(0),
        })
    }
}

/// What the chain runner shares: the kinds, the secrets' keys, and a pool for reading a
/// resource when its step starts.
#[derive(Debug)]
pub struct Chains {
    catalog: Arc<KindCatalog>,
    secrets: Arc<SecretBox>,
    pool: PgPool,
}

impl Chains {
    /// The runner of `catalog`'s chains.
    pub fn new(catalog: Arc<KindCatalog>, secrets: Arc<SecretBox>, pool: PgPool) -> Self {
        Self {
            catalog,
            secrets,
            pool,
        }
    }

    /// The kinds.
    pub fn catalog(&self) -> &Arc<KindCatalog> {
        &self.catalog
    }

    /// The first unit of chain `chain` of resource `resource` (kind `kind`, tenant
    /// `tenant`) at `generation`, with a fresh token; `None` when the chain has no steps.
    pub fn first_unit(
        &self,
        kind: &str,
        chain: &str,
        resource: Uuid,
        tenant: &str,
        generation: i64,
    ) -> Option<NewWork> {
        let first = self.catalog.get(kind)?.chain(chain).first()?;
        let mut unit = NewWork::new(
            first.work_kind.clone(),
            StepUnit {
                resource_id: resource,
                generation,
            }
            .spec(),
        )
        .for_resource(resource, tenant);
        if first.beside {
            unit = unit.beside_resource();
        }
        Some(unit)
    }
}

/// How a [`StepHandler`] runs its step.
enum Runner {
    One(Arc<dyn Step>),
    Batch(Arc<Batcher>),
}

/// Runs a step as the handler of the work kind it was registered under.
pub struct StepHandler {
    work_kind: String,
    runner: Runner,
    chains: Arc<Chains>,
}

impl StepHandler {
    /// `step`, run for units of `work_kind`; a batch step takes at most `batch_max` items per
    /// call.
    pub fn new(
        work_kind: impl Into<String>,
        step: StepImpl,
        batch_max: usize,
        chains: Arc<Chains>,
    ) -> Self {
        let work_kind = work_kind.into();
        let runner = match step {
            StepImpl::One(s) => Runner::One(s),
            StepImpl::Batch(s) => Runner::Batch(Batcher::new(work_kind.clone(), s, batch_max)),
        };
        Self {
            work_kind,
            runner,
            chains,
        }
    }

    async fn input(
        &self,
        position: &Position,
        unit: StepUnit,
    ) -> Result<Option<StepInput>, AdapterError> {
        let database = |e: StoreError| {
            AdapterError::transient(format!("cannot read the resource: {e}")).with_code("database")
        };
        let resource = {
            let mut conn = self
                .chains
                .pool
                .acquire()
                .await
                .map_err(|e| database(e.into()))?;
            resource_for_step(&mut conn, unit.resource_id, false)
                .await
                .map_err(database)?
        };
        let Some(resource) = resource else {
            return Err(AdapterError::permanent(format!(
                "resource {} no longer exists",
                unit.resource_id
            ))
            .with_code("resource-gone"));
        };
        let catalog = &self.chains.catalog;
        let decl = catalog.step(position).ok_or_else(|| {
            AdapterError::permanent(format!("no declared step runs {:?}", self.work_kind))
        })?;
        if decl.beside && unit.generation != 0 && resource.generation != unit.generation {
            // A newer change superseded what this step (a notification) was about.
            tracing::info!(resource = %unit.resource_id, unit_generation = unit.generation,
                generation = resource.generation, step = %decl.name,
                "step beside its resource superseded by a newer change; skipped");
            return Ok(None);
        }
        let kind = catalog.get(&resource.kind).ok_or_else(|| {
            AdapterError::permanent(format!(
                "resource {} is of kind {:?}, which this engine does not declare",
                resource.id, resource.kind
            ))
        })?;
        let version = u32::try_from(resource.spec_version).unwrap_or(0);
        let spec = kind
            .upgrade(version, resource.spec.clone())
            .map_err(|e| AdapterError::permanent(e).with_code("spec-upgrade"))?;
        let secrets = match &resource.secrets {
            Some(sealed) => self
                .chains
                .secrets
                .open(resource.id, sealed)
                .map_err(|e| AdapterError::permanent(e.to_string()).with_code("secrets"))?,
            None => BTreeMap::new(),
        };
        let mut outputs: BTreeMap<String, Value> = match resource.observed {
            Value::Object(m) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        };
        outputs.remove("conditions");
        Ok(Some(StepInput {
            resource: ResourceRef {
                id: resource.id,
                tenant: resource.tenant,
                kind: resource.kind,
                name: resource.name,
                generation: if unit.generation == 0 {
                    resource.generation
                } else {
                    unit.generation
                },
            },
            chain: position.chain.clone(),
            step: decl.name.clone(),
            spec,
            outputs,
            secrets: Secrets(secrets),
        }))
    }
}

impl Handler for StepHandler {
    fn kind(&self) -> &str {
        &self.work_kind
    }

    fn handle<'a>(
        &'a self,
        ctx: &'a WorkContext,
        spec: &'a Value,
    ) -> BoxFuture<'a, Result<Outcome, AdapterError>> {
        Box::pin(async move {
            let position = self
                .chains
                .catalog
                .position(&self.work_kind)
                .ok_or_else(|| {
                    AdapterError::permanent(format!(
                        "work kind {:?} is registered as a step but no declared chain runs it",
                        self.work_kind
                    ))
                })?;
            let unit = StepUnit::from_spec(spec).ok_or_else(|| {
                AdapterError::permanent(format!(
                    "the spec of this {} unit names no resource",
                    self.work_kind
                ))
                .with_code("invalid-spec")
            })?;
            let Some(input) = self.input(position, unit).await? else {
                return Ok(Outcome {
                    step: Some(StepResult::next().then(Then::End)),
                    ..Outcome::default()
                });
            };
            tracing::debug!(work_id = ctx.work_id, token = %ctx.token, resource = %input.resource.id,
                chain = %input.chain, step = %input.step, "running a chain step");
            let result = match &self.runner {
                Runner::One(step) => step.run(ctx, &input).await?,
                Runner::Batch(batcher) => batcher.run(ctx, &input).await?,
            };
            Ok(Outcome {
                step: Some(result),
                ..Outcome::default()
            })
        })
    }
}

impl Chains {
    /// Records one step's result and adds what follows it to `next`.
    async fn step_completed(
        &self,
        tx: &mut PgConnection,
        u: &CompletedUnit<'_>,
        result: &StepResult,
        next: &mut Vec<NewWork>,
    ) -> Result<(), StoreError> {
        let Some(position) = self.catalog.position(u.kind) else {
            return Ok(());
        };
        let Some(decl) = self.catalog.step(position) else {
            return Ok(());
        };
        let at_generation = |res: &StepResource| {
            StepUnit::from_spec(u.spec)
                .map(|s| s.generation)
                .filter(|g| *g != 0)
                .unwrap_or(res.generation)
        };
        // What the step's result makes of the resource's outputs and conditions.
        let recorded = |res: &StepResource, generation: i64| {
            let mut outputs = Map::new();
            if let Some(output) = &result.output {
                outputs.insert(decl.output.clone(), output.clone());
            }
            let mut conds = conditions::from_observed(&res.observed);
            conditions::apply(&mut conds, &result.conditions, generation);
            let conds = conditions::to_value(&conds);
            // No conditions recorded and none reported is no change either.
            let empty = Value::Array(Vec::new());
            let unchanged = result.secret.is_none()
                && res.observed.get("conditions").unwrap_or(&empty) == &conds
                && outputs
                    .iter()
                    .all(|(name, value)| res.observed.get(name) == Some(value));
            (outputs, conds, unchanged)
        };
        // A check that finds what was recorded and starts nothing writes nothing: no row lock,
        // no row version, no Watch notification (at 1M resources a drift sweep is 1,667
        // checks a second, nearly all unchanged). Read without a lock, a change racing with
        // the check wins, as it would had the check finished first.
        let starts_nothing = match &result.then {
            Then::End => true,
            Then::Next => self
                .catalog
                .get(&position.kind)
                .is_none_or(|k| k.chain(&position.chain).get(position.index + 1).is_none()),
            Then::Chain(_) => false,
        };
        if position.chain == "observe" && starts_nothing {
            let Some(res) = resource_for_step(tx, u.resource_id, false).await? else {
                return Ok(());
            };
            if recorded(&res, at_generation(&res)).2 {
                return Ok(());
            }
        }
        let Some(res) = resource_for_step(tx, u.resource_id, true).await? else {
            return Ok(());
        };
        let generation = at_generation(&res);
        let (outputs, conds, unchanged) = recorded(&res, generation);
        let sealed = match &result.secret {
            Some(secret) => {
                let mut all = match &res.secrets {
                    Some(s) => self.secrets.open(res.id, s).unwrap_or_else(|e| {
                        tracing::error!(resource = %res.id, error = %e,
                            "the resource's secrets cannot be opened; they are replaced");
                        BTreeMap::new()
                    }),
                    None => BTreeMap::new(),
                };
                all.insert(decl.output.clone(), secret.clone());
                match self.secrets.seal(res.id, &all) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        // Nothing can be sealed without a key; the step's visible output and
                        // conditions are still recorded, and the operator is told.
                        tracing::error!(resource = %res.id, work_id = u.work_id, token = %u.token,
                            error = %e, "a secret output could not be kept");
                        None
                    }
                }
            }
            None => None,
        };
        if !unchanged {
            resource_record_step(
                tx,
                res.id,
                &Value::Object(outputs),
                &conds,
                sealed.as_deref(),
            )
            .await?;
        }

        // A delete supersedes every other chain: nothing of theirs follows.
        let superseded = position.chain != "delete"
            && (res.deleted || res.operation.as_deref() == Some("delete"));
        if superseded {
            return Ok(());
        }
        let Some(kind) = self.catalog.get(&position.kind) else {
            return Ok(());
        };
        let tenant = u.tenant.unwrap_or(&res.tenant);
        let (chain, index) = match &result.then {
            Then::End => return Ok(()),
            Then::Next => (position.chain.as_str(), position.index + 1),
            Then::Chain(name) => {
                // A chain a check starts (a heal) must not run into a user's change: it only
                // starts on a resource that is ready, idle, and still at the checked spec.
                if position.chain == "observe"
                    && (res.status != "READY"
                        || res.has_active_work
                        || res.generation != generation)
                {
                    tracing::info!(resource = %res.id, chain = %name, status = %res.status,
                        "drift found, but the resource changed meanwhile; not starting the chain");
                    return Ok(());
                }
                (name.as_str(), 0)
            }
        };
        let Some(step) = kind.chain(chain).get(index) else {
            return Ok(());
        };
        let step_name = if index == 0 && chain != position.chain {
            format!("{chain}.{}", step.name)
        } else {
            step.name.clone()
        };
        let mut unit = NewWork::new(
            step.work_kind.clone(),
            StepUnit {
                resource_id: res.id,
                generation,
            }
            .spec(),
        )
        .with_token(u.token.derive(&step_name))
        .for_resource(res.id, tenant)
        .in_lane(u.lane);
        unit.parent_id = Some(u.work_id);
        if step.beside {
            unit = unit.beside_resource();
        }
        if !step.beside && (decl.beside || position.chain == "observe") {
            // A chain holding the resource starts from a step beside it (a heal after a
            // check): the resource is busy until it ends.
            instance_mark_active(tx, res.id).await?;
        }
        next.push(unit);
        Ok(())
    }

    /// Sets condition `kind` of resource `resource` at its current generation.
    async fn set_condition(
        &self,
        tx: &mut PgConnection,
        resource: Uuid,
        kind: &str,
        status: ConditionStatus,
        reason: &str,
        message: String,
    ) -> Result<(), StoreError> {
        let Some(res) = resource_for_step(tx, resource, true).await? else {
            return Ok(());
        };
        let mut conds = conditions::from_observed(&res.observed);
        conditions::set(&mut conds, kind, status, reason, message, res.generation);
        resource_record_step(
            tx,
            resource,
            &Value::Object(Map::new()),
            &conditions::to_value(&conds),
            None,
        )
        .await
    }

    /// The condition a unit beside its resource reports on, from its step's declaration.
    fn beside_condition(&self, kind: &str) -> String {
        self.catalog
            .position(kind)
            .and_then(|p| self.catalog.step(p))
            .and_then(|s| s.condition.clone())
            .unwrap_or_else(|| "SideEffect".to_owned())
    }
}

impl UnitHooks for Chains {
    fn completed<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        units: &'a [CompletedUnit<'a>],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut touched: Vec<Uuid> = Vec::with_capacity(units.len());
            let mut next = Vec::new();
            for u in units {
                // A unit beside its resource never made it busy: a check or a notification
                // ends no chain (a heal a check starts holds the resource with its own unit).
                if u.holds_resource {
                    touched.push(u.resource_id);
                }
                match &u.outcome.step {
                    Some(result) => self.step_completed(tx, u, result, &mut next).await?,
                    None => {
                        // A plain handler working on a resource: what it observed is merged in.
                        if let Some(observed) = &u.outcome.observed {
                            instance_merge_observed(tx, u.resource_id, observed).await?;
                        }
                    }
                }
            }
            work_enqueue(tx, &next).await?;
            touched.sort_unstable();
            touched.dedup();
            // Ends the chains with no unit left holding their resource.
            instances_clear_active_work(tx, &touched).await
        })
    }

    fn parked<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        unit: &'a UnitEvent<'a>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if unit.holds_resource {
                instances_clear_active_work(tx, &[unit.resource_id]).await?;
                self.set_condition(
                    tx,
                    unit.resource_id,
                    READY,
                    ConditionStatus::False,
                    "WorkParked",
                    conditions::parked_message(unit.work_id),
                )
                .await
            } else {
                let kind = self.beside_condition(unit.kind);
                self.set_condition(
                    tx,
                    unit.resource_id,
                    &kind,
                    ConditionStatus::Unknown,
                    "WorkParked",
                    conditions::beside_parked_message(unit.work_id),
                )
                .await
            }
        })
    }

    fn retried<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        unit: &'a UnitEvent<'a>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if unit.holds_resource {
                instance_mark_active(tx, unit.resource_id).await
            } else {
                Ok(())
            }
        })
    }

    fn cancelled<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        unit: &'a UnitEvent<'a>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if unit.holds_resource {
                instances_clear_active_work(tx, &[unit.resource_id]).await?;
                self.set_condition(
                    tx,
                    unit.resource_id,
                    READY,
                    ConditionStatus::False,
                    "WorkCancelled",
                    conditions::cancelled_message(unit.work_id),
                )
                .await
            } else {
                let kind = self.beside_condition(unit.kind);
                self.set_condition(
                    tx,
                    unit.resource_id,
                    &kind,
                    ConditionStatus::False,
                    "WorkCancelled",
                    conditions::beside_cancelled_message(unit.work_id),
                )
                .await
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_specs_of_both_releases_name_their_resource() {
        let id = Uuid::new_v4();
        let unit = StepUnit {
            resource_id: id,
            generation: 3,
        };
        assert_eq!(StepUnit::from_spec(&unit.spec()), Some(unit));
        let legacy = json!({"instance_id": id, "tenant": "acme", "name": "db", "generation": 2,
                            "operation": "update", "spec": {"plan": "kvx.small"}});
        assert_eq!(
            StepUnit::from_spec(&legacy),
            Some(StepUnit {
                resource_id: id,
                generation: 2
            })
        );
        assert_eq!(StepUnit::from_spec(&json!({})), None);
    }
}
