//! The work kinds this crate runs: `k8s.apply-instance` and `k8s.delete-instance`.
//!
//! Both hold an `Arc<dyn Cluster>`, so the engine can run them against any [`Cluster`] (the
//! real [`crate::KubernetesCluster`], or `ClusterFns` in its own tests). Both record what they
//! saw under the top-level key `kubernetes` of the instance's observed state.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use setpoint_adapter::{
    AdapterError, Cluster, ClusterInstanceSpec, Outcome, TypedHandler, WorkContext,
};
use uuid::Uuid;

/// The work kind that applies an instance's objects.
pub const KIND_APPLY_INSTANCE: &str = "k8s.apply-instance";
/// The work kind that deletes an instance's objects.
pub const KIND_DELETE_INSTANCE: &str = "k8s.delete-instance";

/// Runs `k8s.apply-instance`: the spec is a [`ClusterInstanceSpec`]; the outcome records the
/// [`setpoint_adapter::ClusterObservation`] as `{"kubernetes": {...}}`.
#[derive(Clone)]
pub struct ApplyInstance {
    cluster: Arc<dyn Cluster>,
}

impl ApplyInstance {
    /// A handler applying through `cluster`.
    pub fn new(cluster: Arc<dyn Cluster>) -> Self {
        Self { cluster }
    }
}

impl TypedHandler for ApplyInstance {
    type Spec = ClusterInstanceSpec;
    const KIND: &'static str = KIND_APPLY_INSTANCE;

    async fn run(
        &self,
        ctx: &WorkContext,
        spec: ClusterInstanceSpec,
    ) -> Result<Outcome, AdapterError> {
        ctx.record_call(format!(
            "kubernetes:apply-instance {} (tenant {})",
            spec.resource_id, spec.tenant
        ));
        let obs = self
            .cluster
            .apply_instance(&ctx.token, &spec, &ctx.fence)
            .await?;
        let observed = serde_json::to_value(&obs).map_err(|e| {
            AdapterError::permanent(format!("cannot record the cluster observation: {e}"))
        })?;
        Ok(Outcome::done().observed(json!({ "kubernetes": observed })))
    }
}

/// The spec of `k8s.delete-instance`. Either field may be left out; the unit's own resource
/// id and tenant ([`WorkContext`]) are used then.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct DeleteInstanceSpec {
    /// The instance to delete.
    #[serde(default)]
    pub resource_id: Option<Uuid>,
    /// Its tenant.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// Runs `k8s.delete-instance`; the outcome records
/// `{"kubernetes": {"deleted": true, "removed": [...], "already_absent": bool}}`.
#[derive(Clone)]
pub struct DeleteInstance {
    cluster: Arc<dyn Cluster>,
}

impl DeleteInstance {
    /// A handler deleting through `cluster`.
    pub fn new(cluster: Arc<dyn Cluster>) -> Self {
        Self { cluster }
    }
}

impl TypedHandler for DeleteInstance {
    type Spec = DeleteInstanceSpec;
    const KIND: &'static str = KIND_DELETE_INSTANCE;

    async fn run(
        &self,
        ctx: &WorkContext,
        spec: DeleteInstanceSpec,
    ) -> Result<Outcome, AdapterError> {
        let resource_id = spec.resource_id.or(ctx.resource_id).ok_or_else(|| {
            AdapterError::permanent(format!(
                "a {KIND_DELETE_INSTANCE} unit needs a resource id (in its spec or its unit)"
            ))
            .with_code("invalid-spec")
        })?;
        let tenant = spec.tenant.or_else(|| ctx.tenant.clone()).ok_or_else(|| {
            AdapterError::permanent(format!(
                "a {KIND_DELETE_INSTANCE} unit needs a tenant (in its spec or its unit)"
            ))
            .with_code("invalid-spec")
        })?;
        ctx.record_call(format!(
            "kubernetes:delete-instance {resource_id} (tenant {tenant})"
        ));
        let out = self
            .cluster
            .delete_instance(&ctx.token, resource_id, &tenant, &ctx.fence)
            .await?;
        Ok(Outcome::done().observed(json!({
            "kubernetes": {
                "deleted": true,
                "removed": out.deleted,
                "already_absent": out.already_absent,
            }
        })))
    }
}
