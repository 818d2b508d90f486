//! The delete chain: Kubernetes objects first (nothing points at a dead machine), then the
//! machine, then the "deleted" mail. Every step treats "already gone" as success.

use serde_json::json;
use setpoint_adapter::{
    AdapterError, IdempotencyToken, MailRequest, Outcome, Template, TerminateRequest, WorkContext,
};

use super::adapter_call;
use super::conditions::{ConditionStatus, MACHINE_AVAILABLE, READY, SYNCED};
use super::{ChainSpec, Workflows};

/// Deletes the instance's Kubernetes objects. Next: terminate the machine.
pub(super) async fn delete_cluster(
    wf: &Workflows,
    ctx: &WorkContext,
    mut chain: ChainSpec,
) -> Result<Outcome, AdapterError> {
    let done = adapter_call(
        ctx,
        &ctx.token,
        "cluster",
        "delete_instance",
        wf.cluster
            .delete_instance(&ctx.token, chain.instance_id, &chain.tenant, &ctx.fence),
    )
    .await?;
    chain.set(
        SYNCED,
        ConditionStatus::False,
        "Deleted",
        format!("{} Kubernetes object(s) deleted", done.deleted.len()),
    );
    chain.set(
        READY,
        ConditionStatus::False,
        "Deleting",
        "terminating the machine",
    );
    Ok(Outcome::done()
        .observed(json!({ "conditions": chain.observed_conditions() }))
        .then(chain.next("ec2", "kvx.delete.ec2")))
}

/// Terminates every machine of the instance: the recorded one by its id and by the token that
/// launched it, and any other by the resource tag (a machine whose id was never recorded goes
/// too). Next: the "deleted" mail.
pub(super) async fn terminate_machine(
    wf: &Workflows,
    ctx: &WorkContext,
    mut chain: ChainSpec,
) -> Result<Outcome, AdapterError> {
    // The recorded machine, looked up by id: EC2's tag-filtered listing is eventually
    // consistent and may not show a machine launched moments ago yet.
    super::load_observed(wf, &mut chain).await?;
    let request = TerminateRequest {
        instance_id: chain.machine.as_ref().map(|m| m.instance_id.clone()),
        resource_id: Some(chain.instance_id),
        launch_token: chain
            .machine
            .as_ref()
            .and_then(|m| IdempotencyToken::parse(m.launch_token.clone()).ok()),
    };
    let done = adapter_call(
        ctx,
        &ctx.token,
        "compute",
        "terminate_instance",
        wf.compute
            .terminate_instance(&ctx.token, &request, &ctx.fence),
    )
    .await?;
    chain.set(
        MACHINE_AVAILABLE,
        ConditionStatus::False,
        "Terminated",
        format!(
            "terminated {:?}; already gone {:?}",
            done.terminated, done.already_gone
        ),
    );
    Ok(Outcome::done()
        .observed(
            json!({ "conditions": chain.observed_conditions(), "terminated": done.terminated }),
        )
        .then(chain.next("notify", "kvx.delete.notify")))
}

/// Sends the "deleted" mail, at most once per token. Ends the chain.
pub(super) async fn notify_deleted(
    wf: &Workflows,
    ctx: &WorkContext,
    mut chain: ChainSpec,
) -> Result<Outcome, AdapterError> {
    let request = MailRequest {
        to: chain.spec.owner_email.clone(),
        template: Template::InstanceDeleted {
            instance_id: chain.instance_id,
            instance_name: chain.name.clone(),
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
        ConditionStatus::False,
        "Deleted",
        "the instance is gone",
    );
    Ok(Outcome::done().observed(json!({
        "conditions": chain.observed_conditions(),
        "deleted_mail": delivery.message_id,
    })))
}
