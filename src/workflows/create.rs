//! The create chain — machine, then Kubernetes objects pointing at it, then the "ready" mail —
//! and the steps the update and heal chains share with it.

use std::time::{Duration, Instant};

use serde_json::json;
use setpoint_adapter::{
    AdapterError, BackendAddress, ClusterInstanceSpec, InstanceRequest, InstanceState, MailRequest,
    Outcome, SecretData, Template, WorkContext,
};

use super::adapter_call;
use super::conditions::{ConditionStatus, MACHINE_AVAILABLE, READY, SYNCED};
use super::{ChainSpec, Machine, Workflows};

/// Which chain a shared step runs in; it decides the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// `kvx.create.*`: ends with the "ready" mail.
    Create,
    /// `kvx.update.*`: ends with the "ready" mail.
    Update,
    /// `kvx.heal.*` (after drift): ends without mail.
    Heal,
}

/// How soon a unit whose machine is not running yet is retried.
pub(super) const NOT_RUNNING_RETRY: Duration = Duration::from_secs(2);

/// Ensures the instance's machine, launched with this unit's token (observe first, adopt what
/// an earlier attempt made), and waits for it to run. Next: the Kubernetes objects.
pub(super) async fn ensure_machine(
    wf: &Workflows,
    ctx: &WorkContext,
    mut chain: ChainSpec,
    mode: Mode,
) -> Result<Outcome, AdapterError> {
    let request = InstanceRequest {
        resource_id: chain.instance_id,
        tenant: chain.tenant.clone(),
        plan: chain.spec.plan.clone(),
        name: Some(format!("kvx-{}-{}", chain.tenant, chain.name)),
        image_id: None,
        instance_type: None,
        subnet_id: None,
        data_volume_gb: u32::try_from(chain.spec.size_gb).ok(),
    };
    let deadline = ctx.deadline.min(Instant::now() + wf.config.machine_wait);
    let seen = adapter_call(
        ctx,
        &ctx.token,
        "compute",
        "ensure_instance",
        wf.compute
            .ensure_instance(&ctx.token, &request, deadline, &ctx.fence),
    )
    .await?;
    if seen.state != InstanceState::Running || seen.private_ip.is_none() {
        // The same token adopts the same machine on the retry.
        return Err(AdapterError::transient(format!(
            "machine {} is {} (private IP {}); checking again shortly",
            seen.instance_id,
            seen.state,
            seen.private_ip.as_deref().unwrap_or("not yet assigned")
        ))
        .with_code("machine-not-running")
        .with_retry_after(NOT_RUNNING_RETRY));
    }
    let machine = Machine {
        instance_id: seen.instance_id.clone(),
        private_ip: seen.private_ip.clone(),
        availability_zone: seen.availability_zone.clone(),
        launch_token: ctx.token.to_string(),
        state: seen.state.to_string(),
        instance_type: seen.instance_type.clone(),
    };
    chain.set(
        MACHINE_AVAILABLE,
        ConditionStatus::True,
        "MachineRunning",
        format!(
            "machine {} runs at {}",
            machine.instance_id,
            machine.private_ip.as_deref().unwrap_or("?")
        ),
    );
    chain.set(
        READY,
        ConditionStatus::False,
        if mode == Mode::Heal {
            "Healing"
        } else {
            "Provisioning"
        },
        "configuring the Kubernetes objects",
    );
    chain.machine = Some(machine.clone());
    let next = match mode {
        Mode::Heal => chain.next("heal-k8s", "kvx.heal.k8s"),
        Mode::Create => chain.next("k8s", "kvx.create.k8s"),
        Mode::Update => chain.next("k8s", "kvx.update.k8s"),
    };
    Ok(Outcome::done()
        .observed(json!({ "machine": machine, "conditions": chain.observed_conditions() }))
        .then(next))
}

/// Applies the instance's Kubernetes objects, pointing at its machine. Next: the "ready" mail
/// (create, update) or nothing (heal).
pub(super) async fn apply_cluster(
    wf: &Workflows,
    ctx: &WorkContext,
    mut chain: ChainSpec,
    mode: Mode,
) -> Result<Outcome, AdapterError> {
    let machine = chain.machine.clone().unwrap_or_default();
    let spec = ClusterInstanceSpec {
        resource_id: chain.instance_id,
        tenant: chain.tenant.clone(),
        name: chain.name.clone(),
        plan: chain.spec.plan.clone(),
        replicas: 1,
        backend: BackendAddress {
            private_ip: machine.private_ip.clone(),
            endpoint: None,
        },
        credentials: SecretData::default(),
        // What the objects are written for: an older chain never overwrites a newer one's.
        generation: chain.generation,
    };
    let seen = adapter_call(
        ctx,
        &ctx.token,
        "cluster",
        "apply_instance",
        wf.cluster.apply_instance(&ctx.token, &spec, &ctx.fence),
    )
    .await?;
    if seen.ready_replicas < seen.desired_replicas {
        // Applied, not yet serving (pods starting, pulling their image): "ready" is told only
        // once it is. The apply is idempotent, so the retry re-applies and looks again; pods
        // that never come up use up the attempts and park the unit, and the instance says so.
        return Err(AdapterError::transient(format!(
            "{} of {} replica(s) ready in namespace {}; checking again shortly",
            seen.ready_replicas, seen.desired_replicas, seen.namespace
        ))
        .with_code("replicas-not-ready")
        .with_retry_after(NOT_RUNNING_RETRY));
    }
    let endpoint = match (&seen.service_host, seen.service_port) {
        (Some(host), Some(port)) => Some(format!("{host}:{port}")),
        (Some(host), None) => Some(host.clone()),
        _ => None,
    };
    chain.set(
        SYNCED,
        ConditionStatus::True,
        "Applied",
        format!(
            "{} object(s) in namespace {} match generation {}",
            seen.objects.len(),
            seen.namespace,
            chain.generation
        ),
    );
    let observed_cluster = json!({
        "namespace": seen.namespace,
        "objects": seen.objects.iter().map(|o| format!("{}/{}", o.kind, o.name)).collect::<Vec<_>>(),
        "service_host": seen.service_host,
        "service_port": seen.service_port,
        "ready_replicas": seen.ready_replicas,
    });
    let mut outcome = Outcome::done();
    match mode {
        Mode::Heal => {
            chain.set(
                READY,
                ConditionStatus::True,
                "Healed",
                "a new machine replaced one terminated outside setpoint",
            );
        }
        Mode::Create | Mode::Update => {
            chain.set(
                READY,
                ConditionStatus::False,
                "Notifying",
                "telling the owner the instance is ready",
            );
            let kind = if mode == Mode::Create {
                "kvx.create.notify"
            } else {
                "kvx.update.notify"
            };
            outcome = outcome.then(chain.next("notify", kind));
        }
    }
    Ok(outcome.observed(json!({
        "cluster": observed_cluster,
        "endpoint": endpoint,
        "conditions": chain.observed_conditions(),
    })))
}

/// Sends the "ready" mail, at most once per token (an interrupted send parks the unit as
/// `outcome-unknown`). Ends the chain: `Ready` becomes `True`.
pub(super) async fn notify_ready(
    wf: &Workflows,
    ctx: &WorkContext,
    mut chain: ChainSpec,
) -> Result<Outcome, AdapterError> {
    let request = MailRequest {
        to: chain.spec.owner_email.clone(),
        template: Template::InstanceReady {
            instance_id: chain.instance_id,
            instance_name: chain.name.clone(),
            endpoint: chain.machine.as_ref().and_then(|m| m.private_ip.clone()),
        },
    };
    let delivery = adapter_call(
        ctx,
        &ctx.token,
        "mail",
        "send",
        wf.mailer
            .send(&ctx.token, &request, ctx.journal.as_ref(), &ctx.fence),
    )
    .await?;
    chain.set(
        READY,
        ConditionStatus::True,
        "Available",
        format!("instance is ready; {} was told", chain.spec.owner_email),
    );
    Ok(Outcome::done().observed(json!({
        "conditions": chain.observed_conditions(),
        "ready_mail": delivery.message_id,
    })))
}
