//! The work kinds `ec2.ensure-instance` and `ec2.terminate-instance`, as [`TypedHandler`]s over
//! any [`Compute`] (normally [`Ec2Compute`]).
//!
//! Both record on the resource (observed state): `ec2_instance_id`, `ec2_state`, `private_ip`,
//! `availability_zone`, `ec2_subnet_id`, `ec2_adopted`, and with a data volume
//! `ec2_data_volume_id` and `ec2_data_volume_gb` for ensure; `ec2_state` and
//! `ec2_terminated_ids` for terminate.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use setpoint_adapter::{
    AdapterError, Compute, Handler, IdempotencyToken, InstanceRequest, InstanceState, Outcome,
    TerminateRequest, TypedHandler, WorkContext, typed,
};
use uuid::Uuid;

use crate::compute::Ec2Compute;

/// The work kind that launches (or adopts) a resource's instance.
pub const KIND_ENSURE_INSTANCE: &str = "ec2.ensure-instance";
/// The work kind that terminates a resource's instances.
pub const KIND_TERMINATE_INSTANCE: &str = "ec2.terminate-instance";

/// How long to wait before checking again on an instance still `pending` at the deadline.
pub const PENDING_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The spec of an `ec2.ensure-instance` unit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EnsureInstanceSpec {
    /// The setpoint resource; defaults to the unit's resource.
    #[serde(default)]
    pub resource_id: Option<Uuid>,
    /// The owning tenant; defaults to the unit's tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// The KVX plan, e.g. `kvx.small`.
    pub plan: String,
    /// The `Name` tag; defaults to `setpoint-<resource id>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Overrides the plan's AMI.
    #[serde(default)]
    pub image_id: Option<String>,
    /// Overrides the plan's instance type.
    #[serde(default)]
    pub instance_type: Option<String>,
    /// Pins the subnet (otherwise chosen from `ec2.subnet_ids` by the token).
    #[serde(default)]
    pub subnet_id: Option<String>,
    /// Size in GiB of a data volume to launch with (none when absent).
    #[serde(default)]
    pub data_volume_gb: Option<u32>,
}

/// The spec of an `ec2.terminate-instance` unit. Every field is optional; the resource defaults
/// to the unit's, and all of the resource's managed instances are terminated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct TerminateInstanceSpec {
    /// The setpoint resource; defaults to the unit's resource.
    #[serde(default)]
    pub resource_id: Option<Uuid>,
    /// The EC2 instance id recorded on the resource, if any.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// The token of the unit that launched the instance, if known.
    #[serde(default)]
    pub launch_token: Option<IdempotencyToken>,
}

/// Runs `ec2.ensure-instance`: [`Compute::ensure_instance`] with the unit's token and deadline.
///
/// By default a unit only succeeds once the instance is `running`; if it is still `pending` at
/// the deadline the unit fails *transiently* (code `ec2-instance-pending`, retry after
/// [`PENDING_RETRY_AFTER`]) and its retry adopts the same instance by token and waits again.
/// With [`EnsureInstance::accept_pending`] it succeeds with `ec2_state = "pending"` instead.
#[derive(Debug, Clone)]
pub struct EnsureInstance<C = Ec2Compute> {
    compute: C,
    require_running: bool,
}

impl<C: Compute> EnsureInstance<C> {
    /// A handler that succeeds only once the instance runs.
    pub fn new(compute: C) -> Self {
        Self {
            compute,
            require_running: true,
        }
    }

    /// Whether a `pending` instance completes the unit (`true`) or retries it (`false`).
    pub fn accept_pending(mut self, accept: bool) -> Self {
        self.require_running = !accept;
        self
    }
}

impl<C: Compute> TypedHandler for EnsureInstance<C> {
    type Spec = EnsureInstanceSpec;
    const KIND: &'static str = KIND_ENSURE_INSTANCE;

    async fn run(
        &self,
        ctx: &WorkContext,
        spec: EnsureInstanceSpec,
    ) -> Result<Outcome, AdapterError> {
        let request = InstanceRequest {
            resource_id: spec.resource_id.or(ctx.resource_id).ok_or_else(|| {
                missing_field(
                    "resource_id",
                    "this unit has no resource and its spec names none",
                )
            })?,
            tenant: spec
                .tenant
                .or_else(|| ctx.tenant.clone())
                .ok_or_else(|| missing_field("tenant", "this unit has no tenant"))?,
            plan: spec.plan,
            name: spec.name,
            image_id: spec.image_id,
            instance_type: spec.instance_type,
            subnet_id: spec.subnet_id,
            data_volume_gb: spec.data_volume_gb,
        };
        ctx.record_call(format!("ec2:ensure-instance token={}", ctx.token));
        let obs = self
            .compute
            .ensure_instance(&ctx.token, &request, ctx.deadline, &ctx.fence)
            .await?;
        if self.require_running && obs.state == InstanceState::Pending {
            return Err(AdapterError::transient(format!(
                "instance {} is still pending at the unit's deadline; the retry adopts it and \
                 waits again",
                obs.instance_id
            ))
            .with_code("ec2-instance-pending")
            .with_retry_after(PENDING_RETRY_AFTER));
        }
        let volume = obs.data_volume.as_ref();
        Ok(Outcome::done().observed(json!({
            "ec2_instance_id": obs.instance_id,
            "ec2_state": obs.state.as_str(),
            "private_ip": obs.private_ip,
            "availability_zone": obs.availability_zone,
            "ec2_subnet_id": obs.subnet_id,
            "ec2_adopted": obs.adopted,
            "ec2_data_volume_id": volume.map(|v| &v.volume_id),
            "ec2_data_volume_gb": volume.map(|v| v.size_gb),
        })))
    }
}

/// Runs `ec2.terminate-instance`: [`Compute::terminate_instance`] for the resource's instances.
/// Already terminated or unknown is success, so running it twice is harmless.
#[derive(Debug, Clone)]
pub struct TerminateInstance<C = Ec2Compute> {
    compute: C,
}

impl<C: Compute> TerminateInstance<C> {
    /// A terminate handler over `compute`.
    pub fn new(compute: C) -> Self {
        Self { compute }
    }
}

impl<C: Compute> TypedHandler for TerminateInstance<C> {
    type Spec = TerminateInstanceSpec;
    const KIND: &'static str = KIND_TERMINATE_INSTANCE;

    async fn run(
        &self,
        ctx: &WorkContext,
        spec: TerminateInstanceSpec,
    ) -> Result<Outcome, AdapterError> {
        let request = TerminateRequest {
            instance_id: spec.instance_id,
            resource_id: spec.resource_id.or(ctx.resource_id),
            launch_token: spec.launch_token,
        };
        ctx.record_call(format!("ec2:terminate-instance token={}", ctx.token));
        let outcome = self
            .compute
            .terminate_instance(&ctx.token, &request, &ctx.fence)
            .await?;
        let ids: Vec<&String> = outcome
            .terminated
            .iter()
            .chain(&outcome.already_gone)
            .collect();
        Ok(Outcome::done().observed(json!({
            "ec2_state": InstanceState::Terminated.as_str(),
            "ec2_terminated_ids": ids,
        })))
    }
}

/// Both handlers over one [`Ec2Compute`], ready for the engine's registry (`register_arc`).
/// `ensure` accepts `pending` exactly when `ec2.wait_for_running` is off.
pub fn handlers(compute: &Ec2Compute) -> Vec<Arc<dyn Handler>> {
    let accept_pending = !compute.config().wait_for_running;
    vec![
        Arc::new(typed(
            EnsureInstance::new(compute.clone()).accept_pending(accept_pending),
        )),
        Arc::new(typed(TerminateInstance::new(compute.clone()))),
    ]
}

fn missing_field(field: &str, why: &str) -> AdapterError {
    AdapterError::permanent(format!(
        "{why}: set \"{field}\" in the spec of this {KIND_ENSURE_INSTANCE} unit"
    ))
    .with_code("invalid-spec")
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use setpoint_adapter::{ComputeFns, ErrorClass, InstanceObservation, MemoryJournal};

    use super::*;

    fn ctx() -> WorkContext {
        WorkContext::new(
            7,
            KIND_ENSURE_INSTANCE,
            IdempotencyToken::parse("tok-7").unwrap(),
            1,
            Instant::now(),
            Arc::new(MemoryJournal::default()),
        )
        .with_resource(Uuid::nil(), Some("acme".into()))
    }

    fn pending_compute() -> ComputeFns {
        ComputeFns::new().on_ensure(|token, req| {
            assert_eq!(token.as_str(), "tok-7");
            assert_eq!(req.tenant, "acme");
            Ok(InstanceObservation {
                instance_id: "i-9".into(),
                state: InstanceState::Pending,
                private_ip: Some("10.0.0.9".into()),
                availability_zone: Some("us-east-1a".into()),
                subnet_id: None,
                instance_type: Some("t3.micro".into()),
                data_volume: None,
                adopted: true,
            })
        })
    }

    #[tokio::test]
    async fn pending_retries_transiently_unless_accepted() {
        let spec = json!({"plan": "kvx.small"});
        let h = typed(EnsureInstance::new(pending_compute()));
        let e = h.handle(&ctx(), &spec).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Transient);
        assert_eq!(e.retry_after, Some(PENDING_RETRY_AFTER));

        let h = typed(EnsureInstance::new(pending_compute()).accept_pending(true));
        let out = h.handle(&ctx(), &spec).await.unwrap();
        let observed = out.observed.unwrap();
        assert_eq!(observed["ec2_instance_id"], "i-9");
        assert_eq!(observed["ec2_state"], "pending");
        assert_eq!(observed["private_ip"], "10.0.0.9");
        assert_eq!(observed["availability_zone"], "us-east-1a");
    }

    #[tokio::test]
    async fn bad_specs_are_permanent() {
        let h = typed(EnsureInstance::new(pending_compute()));
        let e = h.handle(&ctx(), &json!({"plan": 3})).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Permanent);
        let no_resource = WorkContext::new(
            1,
            KIND_ENSURE_INSTANCE,
            IdempotencyToken::parse("t").unwrap(),
            1,
            Instant::now(),
            Arc::new(MemoryJournal::default()),
        );
        let e = h
            .handle(&no_resource, &json!({"plan": "kvx.small"}))
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Permanent);
        assert!(e.message.contains("resource_id"), "{e}");
    }

    #[tokio::test]
    async fn terminate_defaults_to_the_units_resource() {
        let compute = ComputeFns::new().on_terminate(|_, req| {
            assert_eq!(req.resource_id, Some(Uuid::nil()));
            Ok(setpoint_adapter::TerminateOutcome {
                terminated: vec!["i-1".into()],
                already_gone: vec!["i-2".into()],
            })
        });
        let h = typed(TerminateInstance::new(compute));
        let out = h.handle(&ctx(), &json!({})).await.unwrap();
        assert_eq!(
            out.observed.unwrap(),
            json!({"ec2_state": "terminated", "ec2_terminated_ids": ["i-1", "i-2"]})
        );
    }
}
