//! The update chain: a plan change reapplies the Kubernetes objects with the new plan and tells
//! the owner. The machine stays (the compute trait has no resize; a new plan's machine size
//! applies to machines launched from then on, e.g. by healing).

use setpoint_adapter::{AdapterError, Outcome, WorkContext};

use super::conditions;
use super::create::{Mode, apply_cluster};
use super::{ChainSpec, Machine, Workflows};
use crate::store::workflows::instance_facts_get;

/// First step of an update: reads what the create chain observed (the machine, the conditions),
/// then applies the objects with the new spec.
pub(super) async fn start(
    wf: &Workflows,
    ctx: &WorkContext,
    mut chain: ChainSpec,
) -> Result<Outcome, AdapterError> {
    let facts = {
        let mut conn = wf.pool.acquire().await.map_err(|e| {
            AdapterError::transient(format!("cannot read the instance: {e}")).with_code("database")
        })?;
        instance_facts_get(&mut conn, chain.instance_id, false)
            .await
            .map_err(|e| {
                AdapterError::transient(format!("cannot read the instance: {e}"))
                    .with_code("database")
            })?
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
    chain.set(
        conditions::SYNCED,
        conditions::ConditionStatus::False,
        "Updating",
        format!("applying generation {}", chain.generation),
    );
    apply_cluster(wf, ctx, chain, Mode::Update).await
}
