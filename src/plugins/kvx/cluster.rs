//! The Kubernetes steps of the KVX kind (apply after create, update, heal and a rotation;
//! delete), the credentials step, and the notifications beside the instance.

use std::sync::Arc;

use serde_json::json;
use setpoint_adapter::{
    AdapterError, BackendAddress, BoxFuture, ClusterInstanceSpec, ConditionStatus, MailRequest,
    SecretData, Step, StepInput, StepResult, Template, WorkContext,
};

use super::machine::{Machine, NOT_RUNNING_RETRY};
use super::{Kvx, KvxSpec, NOTIFIED, READY, SYNCED, call};

/// Which chain a cluster step runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ApplyMode {
    /// After a create, an update or a rotation: the instance is ready once it serves.
    Change,
    /// After a heal: the objects point at the new machine.
    Heal,
    /// A rotation: new credentials.
    Rotate,
}

/// Applies the instance's Kubernetes objects, pointing at its machine, with its credentials:
/// the ones recorded (a secret output of this step), or new ones on the first apply and on a
/// rotation. The credentials are this step's secret output: the tenant reads them with its
/// connection-details call. A retry before the completion makes new ones again, which is
/// safe: the last apply wins, and it is the one recorded.
pub(super) struct ApplyCluster {
    pub kvx: Arc<Kvx>,
    pub mode: ApplyMode,
}

impl Step for ApplyCluster {
    fn run<'a>(
        &'a self,
        ctx: &'a WorkContext,
        input: &'a StepInput,
    ) -> BoxFuture<'a, Result<StepResult, AdapterError>> {
        Box::pin(async move {
            let spec: KvxSpec = input.spec()?;
            let machine: Machine = input.output("machine").unwrap_or_default();
            let region = machine
                .region
                .clone()
                .unwrap_or_else(|| self.kvx.default_region.clone());
            let cluster = self.kvx.cluster(&region)?;
            let recorded = input
                .secrets
                .get("cluster")
                .filter(|v| v.get("password").is_some())
                .cloned();
            let secret = match (recorded, self.mode) {
                (Some(known), ApplyMode::Change | ApplyMode::Heal) => known,
                _ => new_credentials(&input.resource.name)?,
            };
            let credentials = secret
                .as_object()
                .map(|m| {
                    SecretData::from_pairs(
                        m.iter()
                            .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned()))),
                    )
                })
                .unwrap_or_default();
            let request = ClusterInstanceSpec {
                resource_id: input.resource.id,
                tenant: input.resource.tenant.clone(),
                name: input.resource.name.clone(),
                plan: spec.plan.clone(),
                replicas: 1,
                generation: input.resource.generation,
                backend: BackendAddress {
                    private_ip: machine.private_ip.clone(),
                    endpoint: None,
                },
                credentials,
            };
            let seen = call(
                ctx,
                &ctx.token,
                "cluster",
                "apply_instance",
                cluster.apply_instance(&ctx.token, &request, &ctx.fence),
            )
            .await?;
            if seen.ready_replicas < seen.desired_replicas {
                // Applied, not yet serving: "ready" is said only once it is. The apply is
                // idempotent, so the retry re-applies and looks again.
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
            let (reason, message) = match self.mode {
                ApplyMode::Rotate => (
                    "CredentialsRotated",
                    "new credentials are in place; read them with the connection details"
                        .to_owned(),
                ),
                ApplyMode::Heal => (
                    "Healed",
                    "a new machine replaced one terminated outside setpoint".to_owned(),
                ),
                ApplyMode::Change => (
                    "Available",
                    format!(
                        "the instance serves at {}",
                        endpoint.as_deref().unwrap_or("its service")
                    ),
                ),
            };
            Ok(StepResult::next()
                .secret(secret)
                .output(json!({
                    "namespace": seen.namespace,
                    "objects": seen.objects.iter().map(|o| format!("{}/{}", o.kind, o.name)).collect::<Vec<_>>(),
                    "service_host": seen.service_host,
                    "service_port": seen.service_port,
                    "ready_replicas": seen.ready_replicas,
                    "endpoint": endpoint,
                }))
                .condition(
                    SYNCED,
                    ConditionStatus::True,
                    "Applied",
                    format!(
                        "{} object(s) in namespace {} match generation {}",
                        seen.objects.len(),
                        seen.namespace,
                        input.resource.generation
                    ),
                )
                .condition(READY, ConditionStatus::True, reason, message))
        })
    }
}

/// Deletes the instance's Kubernetes objects.
pub(super) struct DeleteCluster {
    pub kvx: Arc<Kvx>,
}

impl Step for DeleteCluster {
    fn run<'a>(
        &'a self,
        ctx: &'a WorkContext,
        input: &'a StepInput,
    ) -> BoxFuture<'a, Result<StepResult, AdapterError>> {
        Box::pin(async move {
            let spec: KvxSpec = input.spec()?;
            let machine: Option<Machine> = input.output("machine");
            let region = machine.and_then(|m| m.region).unwrap_or_else(|| {
                if self.kvx.serves(&spec.region) {
                    spec.region.clone()
                } else {
                    self.kvx.default_region.clone()
                }
            });
            let cluster = self.kvx.cluster(&region)?;
            let done = call(
                ctx,
                &ctx.token,
                "cluster",
                "delete_instance",
                cluster.delete_instance(
                    &ctx.token,
                    input.resource.id,
                    &input.resource.tenant,
                    &ctx.fence,
                ),
            )
            .await?;
            Ok(StepResult::next()
                .output(json!({ "deleted": done.deleted.iter().map(|o| format!("{}/{}", o.kind, o.name)).collect::<Vec<_>>() }))
                .condition(
                    SYNCED,
                    ConditionStatus::False,
                    "Deleted",
                    format!("{} Kubernetes object(s) deleted", done.deleted.len()),
                )
                .condition(READY, ConditionStatus::False, "Deleting", "terminating the machine"))
        })
    }
}

/// New credentials for instance `name`: its name as the user, and a random password (192
/// bits).
fn new_credentials(name: &str) -> Result<serde_json::Value, AdapterError> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AdapterError::transient("the system's random source failed"))?;
    Ok(json!({
        "username": name,
        "password": hex::encode(bytes),
        "issued_at": chrono::Utc::now(),
    }))
}

/// Which mail a notification step sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mail {
    /// The instance is ready (after a create or an update).
    Ready,
    /// The instance is gone.
    Deleted,
}

/// Tells the owner, beside the instance: at most once per token (an interrupted send parks
/// the unit as `outcome-unknown`, and the instance shows `Notified=Unknown`).
pub(super) struct Notify {
    pub kvx: Arc<Kvx>,
    pub mail: Mail,
}

impl Step for Notify {
    fn run<'a>(
        &'a self,
        ctx: &'a WorkContext,
        input: &'a StepInput,
    ) -> BoxFuture<'a, Result<StepResult, AdapterError>> {
        Box::pin(async move {
            let spec: KvxSpec = input.spec()?;
            let endpoint = input
                .outputs
                .get("cluster")
                .and_then(|c| c.get("endpoint"))
                .and_then(|e| e.as_str())
                .map(str::to_owned);
            let template = match self.mail {
                Mail::Ready => Template::InstanceReady {
                    instance_id: input.resource.id,
                    instance_name: input.resource.name.clone(),
                    endpoint,
                },
                Mail::Deleted => Template::InstanceDeleted {
                    instance_id: input.resource.id,
                    instance_name: input.resource.name.clone(),
                },
            };
            let request = MailRequest {
                to: spec.owner_email.clone(),
                template,
            };
            let delivery = call(
                ctx,
                &ctx.token,
                "mail",
                "send",
                self.kvx
                    .mailer
                    .send(&ctx.token, &request, ctx.journal.as_ref(), &ctx.fence),
            )
            .await?;
            let what = match self.mail {
                Mail::Ready => "ready",
                Mail::Deleted => "deleted",
            };
            Ok(StepResult::next()
                .output(json!({ "message_id": delivery.message_id, "generation": input.resource.generation }))
                .condition(
                    NOTIFIED,
                    ConditionStatus::True,
                    "Sent",
                    format!("the owner was told the instance is {what}"),
                ))
        })
    }
}
