//! The update chain: resize the machine to the new plan's size (`kvx.update.ec2`), reapply the
//! Kubernetes objects with the new spec (`kvx.update.k8s`), then tell the owner
//! (`kvx.update.notify`).
//!
//! The resize keeps the machine (same instance, same private IP): EC2 stops it, changes its
//! type and starts it, so the instance is unavailable for that time. The Kubernetes step comes
//! after it so the objects describe a machine that already has the new size.

use std::time::Instant;

use serde_json::json;
use setpoint_adapter::{
    AdapterError, CODE_MACHINE_NOT_FOUND, IdempotencyToken, InstanceState, Outcome, ResizeRequest,
    WorkContext,
};

use super::adapter_call;
use super::conditions::{ConditionStatus, MACHINE_AVAILABLE, READY, SYNCED};
use super::create::{self, Mode, NOT_RUNNING_RETRY};
use super::{ChainSpec, Workflows, load_observed};

/// First step of an update: makes the machine the size of the (new) plan and running. Next:
/// the Kubernetes objects.
///
/// This step always runs, also when the plan did not change (an update of `size_gb` or
/// `owner_email` only), and is then a cheap no-op: the adapter observes first and, finding the
/// machine running at the plan's size, returns after one describe without touching it. Skipping
/// it here would need two things the workflow does not have: the size the plan maps to (only
/// the adapter knows it, from `[ec2.plans]`, which may also have changed since the launch) and
/// the previous plan (the update already replaced it). Running it every time also converges a
/// machine whose size or state was changed outside setpoint.
pub(super) async fn resize_machine(
    wf: &Workflows,
    ctx: &WorkContext,
    mut chain: ChainSpec,
) -> Result<Outcome, AdapterError> {
    load_observed(wf, &mut chain).await?;
    let Some(machine) = chain.machine.clone() else {
        // No machine was ever recorded (a create given up before its launch): the update
        // launches one of the new plan, with its own token.
        tracing::info!(work_id = ctx.work_id, token = %ctx.token, instance = %chain.instance_id,
            "update: no machine recorded; launching one");
        return create::ensure_machine(wf, ctx, chain, Mode::Update).await;
    };
    // The machine is found by the token that launched it, never by this unit's token.
    let launch_token = IdempotencyToken::parse(machine.launch_token.clone()).map_err(|e| {
        AdapterError::permanent(format!("the recorded launch token is invalid: {e}"))
            .with_code("invalid-spec")
    })?;
    let request = ResizeRequest {
        resource_id: chain.instance_id,
        plan: chain.spec.plan.clone(),
        instance_type: None,
        data_volume_gb: u32::try_from(chain.spec.size_gb).ok(),
    };
    let deadline = ctx.deadline.min(Instant::now() + wf.config.machine_wait);
    let seen = match adapter_call(
        ctx,
        &launch_token,
        "compute",
        "resize_instance",
        wf.compute
            .resize_instance(&launch_token, &request, deadline, &ctx.fence),
    )
    .await
    {
        Ok(seen) => seen,
        Err(e) if e.code.as_deref() == Some(CODE_MACHINE_NOT_FOUND) => {
            // The machine was terminated outside setpoint. The update still wants a machine
            // of the new plan: it launches one with its own token (a retry adopts it), as the
            // drift heal would, instead of parking until an operator gives up on the change.
            tracing::warn!(work_id = ctx.work_id, token = %ctx.token, launch_token = %launch_token,
                instance = %chain.instance_id, machine = %machine.instance_id, error = %e,
                "update: the machine is gone; launching a new one");
            chain.set(
                MACHINE_AVAILABLE,
                ConditionStatus::False,
                "MachineLost",
                format!(
                    "machine {} was terminated outside setpoint; launching a new one",
                    machine.instance_id
                ),
            );
            chain.machine = None;
            return create::ensure_machine(wf, ctx, chain, Mode::Update).await;
        }
        Err(e) => return Err(e),
    };
    if seen.state != InstanceState::Running || seen.private_ip.is_none() {
        // The retry continues from whatever state the machine has reached.
        return Err(AdapterError::transient(format!(
            "machine {} is {} while being resized to plan {}; checking again shortly",
            seen.instance_id, seen.state, chain.spec.plan
        ))
        .with_code("machine-resizing")
        .with_retry_after(NOT_RUNNING_RETRY));
    }
    let resized = machine.instance_type.is_some() && seen.instance_type != machine.instance_type;
    let size = seen.instance_type.as_deref().unwrap_or("its size");
    tracing::info!(
        work_id = ctx.work_id,
        token = %ctx.token,
        launch_token = %launch_token,
        instance = %chain.instance_id,
        machine = %seen.instance_id,
        from = machine.instance_type.as_deref().unwrap_or("?"),
        to = size,
        resized,
        "update: the machine runs at the plan's size"
    );
    chain.set(
        MACHINE_AVAILABLE,
        ConditionStatus::True,
        if resized { "Resized" } else { "MachineRunning" },
        if resized {
            format!(
                "machine {} was resized from {} to {size} for plan {}",
                seen.instance_id,
                machine.instance_type.as_deref().unwrap_or("?"),
                chain.spec.plan
            )
        } else {
            format!(
                "machine {} runs as {size} for plan {}",
                seen.instance_id, chain.spec.plan
            )
        },
    );
    chain.set(
        READY,
        ConditionStatus::False,
        "Updating",
        "configuring the Kubernetes objects",
    );
    let machine = machine.seen(seen);
    chain.machine = Some(machine.clone());
    Ok(Outcome::done()
        .observed(json!({ "machine": machine, "conditions": chain.observed_conditions() }))
        .then(chain.next("k8s", "kvx.update.k8s")))
}

/// Second step of an update: applies the objects with the new spec, pointing at the (resized)
/// machine. Next: the "updated" mail.
///
/// A unit enqueued by an engine from before the resize step starts the chain here, with no
/// machine in its spec; it reads what the create chain observed, as the first step does.
pub(super) async fn apply_cluster(
    wf: &Workflows,
    ctx: &WorkContext,
    mut chain: ChainSpec,
) -> Result<Outcome, AdapterError> {
    load_observed(wf, &mut chain).await?;
    chain.set(
        SYNCED,
        ConditionStatus::False,
        "Updating",
        format!("applying generation {}", chain.generation),
    );
    create::apply_cluster(wf, ctx, chain, Mode::Update).await
}
