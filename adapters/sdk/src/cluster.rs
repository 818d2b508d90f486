//! The cluster domain: what the engine's KVX workflows ask of a container cluster (Kubernetes).
//!
//! A KVX instance runs in a cluster as a small set of objects that belong to it alone (in
//! Kubernetes: a Deployment, a Service and a Secret in its tenant's namespace). The engine never
//! talks to a cluster API directly; it calls a [`Cluster`], which `setpoint-kubernetes`
//! implements and an alternative platform (Nomad, ECS, …) may implement too.
//!
//! # Rules every implementation keeps
//! - **Idempotent.** Every method may run any number of times with the same arguments (a unit
//!   runs at least once). [`Cluster::apply_instance`] twice with the same request changes
//!   nothing the second time; [`Cluster::delete_instance`] of an instance that is already gone
//!   succeeds.
//! - **Deterministic identity.** The objects of an instance are found from its resource id and
//!   tenant alone (deterministic names, a label with the resource id), so a retry after an
//!   ambiguous failure adopts what the earlier attempt made instead of creating a second copy.
//! - **Tokens are recorded, not required.** Mutating methods take the unit's
//!   [`IdempotencyToken`] and record it on what they write (a label), so an operator can tell
//!   which unit last wrote an object.
//! - **Classified errors.** Every failure is an [`AdapterError`]: transient (throttling, 5xx,
//!   timeouts, connection errors) or permanent (invalid object, permission denied, a field owned
//!   by another writer).
//! - **Secrets stay secret.** [`SecretData`] never appears in `Debug` output, logs or errors.
//! - **Cancel-safe.** A call dropped half-way leaves a state that the next call converges from.
//! - **Fenced.** Mutating methods call [`Fence::check`] on their `fence` immediately before
//!   every write, so an attempt that lost its unit stops writing before another attempt acts.
//! - **Conditional.** A write can arrive late (an attempt paused after its last fence check),
//!   so writes are conditional: an apply never replaces a newer
//!   [`ClusterInstanceSpec::generation`] with an older one ([`CODE_SUPERSEDED`]), and a write
//!   based on a read that is no longer current fails instead of overwriting what changed since.
//!
//! [`NopCluster`] and [`ClusterFns`] are test doubles for code that only needs *a* cluster.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::AdapterError;
use crate::fence::Fence;
use crate::handler::BoxFuture;
use crate::token::IdempotencyToken;

/// Secret material handed to an instance (user names, passwords, keys), keyed by name.
///
/// Its `Debug` output names the keys only, never the values; implementations must never log
/// the values or put them into error messages.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretData(pub BTreeMap<String, String>);

impl SecretData {
    /// Secret material from `(key, value)` pairs.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

/// Where an instance's backend (its EC2 machine) can be reached, once compute has made it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendAddress {
    /// The backend's private IP address, e.g. `10.0.3.17`.
    pub private_ip: Option<String>,
    /// The backend's endpoint (DNS name or `host:port`), when it has one.
    pub endpoint: Option<String>,
}

/// What an instance should look like in the cluster: the argument of
/// [`Cluster::apply_instance`]. Everything here is desired state; nothing is looked up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterInstanceSpec {
    /// The instance's resource id: the stable identity its objects are named and labelled by.
    pub resource_id: Uuid,
    /// The tenant owning the instance; it selects the namespace.
    pub tenant: String,
    /// The instance's user-facing name (unique per tenant); recorded, never used as identity.
    pub name: String,
    /// The instance's plan, e.g. `"small"`.
    pub plan: String,
    /// How many replicas to run (default 1).
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// The backend the instance fronts, when compute has made it.
    #[serde(default)]
    pub backend: BackendAddress,
    /// The instance's credentials, stored in the cluster as a secret.
    #[serde(default)]
    pub credentials: SecretData,
    /// The resource's spec generation this write is for (the engine's `instances.generation`
    /// when the unit's chain was enqueued). An implementation records it on what it writes and
    /// never lets an older generation overwrite a newer one (it fails with
    /// [`CODE_SUPERSEDED`] instead). `0` means "unknown" (a unit enqueued before the field
    /// existed): nothing is compared, and a recorded generation is kept as it is.
    #[serde(default)]
    pub generation: i64,
}

fn default_replicas() -> u32 {
    1
}

/// The [`AdapterError::code`] of an apply refused because the cluster already holds a newer
/// generation of the instance than the unit's [`ClusterInstanceSpec::generation`]. Always
/// permanent: retrying the same (older) spec can never succeed, and must not.
pub const CODE_SUPERSEDED: &str = "superseded";

/// One object the cluster holds for an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterObject {
    /// The object's kind, e.g. `"Deployment"`.
    pub kind: String,
    /// The object's name.
    pub name: String,
    /// The object's version as the cluster reports it (changes whenever the object changes).
    pub version: Option<String>,
}

/// What the cluster holds for an instance, as seen by the call that returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterObservation {
    /// The namespace (or equivalent) holding the instance's objects.
    pub namespace: String,
    /// The instance's objects, in the order they were applied.
    pub objects: Vec<ClusterObject>,
    /// The in-cluster host name clients use to reach the instance, e.g. `kvx-….ns.svc`.
    pub service_host: Option<String>,
    /// The port clients use on [`ClusterObservation::service_host`].
    pub service_port: Option<u16>,
    /// Replicas the instance should run.
    pub desired_replicas: u32,
    /// Replicas the cluster reports ready; the engine treats the instance as serving once this
    /// reaches [`ClusterObservation::desired_replicas`].
    pub ready_replicas: u32,
    /// True when every object the instance needs exists.
    pub complete: bool,
    /// True when the call changed something in the cluster (always false from
    /// [`Cluster::observe_instance`]; false from an apply that found everything up to date).
    pub changed: bool,
}

/// What [`Cluster::delete_instance`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteOutcome {
    /// The objects this call deleted (empty when nothing was left).
    pub deleted: Vec<ClusterObject>,
    /// True when nothing of the instance was left to delete — still a success.
    pub already_absent: bool,
}

/// A container cluster that runs KVX instances. Object-safe: the engine holds an
/// `Arc<dyn Cluster>`.
///
/// See the [module docs](self) for the rules every implementation keeps.
pub trait Cluster: Send + Sync {
    /// Makes the instance's objects match `spec`, creating what is missing.
    ///
    /// Called by the create and update workflows once the backend exists, and again on every
    /// retry of such a unit. It may create or change only the instance's own objects (and the
    /// tenant's namespace, which it creates but never changes in a way that affects other
    /// instances). Applying the same `spec` twice changes nothing the second time
    /// ([`ClusterObservation::changed`] is false). `token` is recorded on what is written.
    ///
    /// # Errors
    /// Transient for throttling, 5xx, timeouts and connection errors (and for objects that kept
    /// changing between this call's reads and writes); permanent for an invalid object, missing
    /// permissions, a field another writer owns (the message names it), or code
    /// [`CODE_SUPERSEDED`] when the cluster holds a newer generation than `spec.generation`
    /// (nothing was written).
    fn apply_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        spec: &'a ClusterInstanceSpec,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<ClusterObservation, AdapterError>>;

    /// Reports what the cluster holds for the instance, or `None` when it holds nothing.
    ///
    /// Called when the engine refreshes an instance's observed state (e.g. polling readiness).
    /// It must not change anything.
    ///
    /// # Errors
    /// As [`Cluster::apply_instance`], for the reads it makes.
    fn observe_instance<'a>(
        &'a self,
        resource_id: Uuid,
        tenant: &'a str,
    ) -> BoxFuture<'a, Result<Option<ClusterObservation>, AdapterError>>;

    /// Deletes every object of the instance; "already gone" is success.
    ///
    /// Called by the delete workflow, and on every retry of it. It removes only objects
    /// labelled with this instance's resource id; the tenant's namespace stays (other instances
    /// may live there).
    ///
    /// # Errors
    /// Transient for throttling, 5xx, timeouts and connection errors; permanent for missing
    /// permissions.
    fn delete_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        resource_id: Uuid,
        tenant: &'a str,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<DeleteOutcome, AdapterError>>;
}

/// A [`Cluster`] that holds nothing and does nothing: apply reports an empty, complete
/// observation, observe reports `None`, delete reports "already absent". For engine tests that
/// do not exercise the cluster step.
#[derive(Debug, Clone, Copy, Default)]
pub struct NopCluster;

impl Cluster for NopCluster {
    fn apply_instance<'a>(
        &'a self,
        _token: &'a IdempotencyToken,
        spec: &'a ClusterInstanceSpec,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<ClusterObservation, AdapterError>> {
        Box::pin(async move {
            fence.check()?;
            Ok(ClusterObservation {
                namespace: String::new(),
                objects: Vec::new(),
                service_host: None,
                service_port: None,
                desired_replicas: spec.replicas,
                ready_replicas: spec.replicas,
                complete: true,
                changed: false,
            })
        })
    }

    fn observe_instance<'a>(
        &'a self,
        _resource_id: Uuid,
        _tenant: &'a str,
    ) -> BoxFuture<'a, Result<Option<ClusterObservation>, AdapterError>> {
        Box::pin(async { Ok(None) })
    }

    fn delete_instance<'a>(
        &'a self,
        _token: &'a IdempotencyToken,
        _resource_id: Uuid,
        _tenant: &'a str,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<DeleteOutcome, AdapterError>> {
        Box::pin(async move {
            fence.check()?;
            Ok(DeleteOutcome {
                deleted: Vec::new(),
                already_absent: true,
            })
        })
    }
}

type ApplyFn = dyn Fn(&IdempotencyToken, &ClusterInstanceSpec) -> Result<ClusterObservation, AdapterError>
    + Send
    + Sync;
type ObserveFn =
    dyn Fn(Uuid, &str) -> Result<Option<ClusterObservation>, AdapterError> + Send + Sync;
type DeleteFn =
    dyn Fn(&IdempotencyToken, Uuid, &str) -> Result<DeleteOutcome, AdapterError> + Send + Sync;

/// A [`Cluster`] test double backed by closures; a method without a closure behaves like
/// [`NopCluster`]. For engine tests that script the cluster's answers (a transient failure, a
/// conflict, a not-yet-ready instance).
#[derive(Clone, Default)]
pub struct ClusterFns {
    apply: Option<Arc<ApplyFn>>,
    observe: Option<Arc<ObserveFn>>,
    delete: Option<Arc<DeleteFn>>,
}

impl fmt::Debug for ClusterFns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterFns")
            .field("apply", &self.apply.is_some())
            .field("observe", &self.observe.is_some())
            .field("delete", &self.delete.is_some())
            .finish()
    }
}

impl ClusterFns {
    /// A double that behaves like [`NopCluster`] until closures are set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets what [`Cluster::apply_instance`] does.
    pub fn on_apply(
        mut self,
        f: impl Fn(&IdempotencyToken, &ClusterInstanceSpec) -> Result<ClusterObservation, AdapterError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.apply = Some(Arc::new(f));
        self
    }

    /// Sets what [`Cluster::observe_instance`] does.
    pub fn on_observe(
        mut self,
        f: impl Fn(Uuid, &str) -> Result<Option<ClusterObservation>, AdapterError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.observe = Some(Arc::new(f));
        self
    }

    /// Sets what [`Cluster::delete_instance`] does.
    pub fn on_delete(
        mut self,
        f: impl Fn(&IdempotencyToken, Uuid, &str) -> Result<DeleteOutcome, AdapterError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.delete = Some(Arc::new(f));
        self
    }
}

impl Cluster for ClusterFns {
    fn apply_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        spec: &'a ClusterInstanceSpec,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<ClusterObservation, AdapterError>> {
        match &self.apply {
            Some(f) => {
                let out = fence.check().and_then(|()| f(token, spec));
                Box::pin(async move { out })
            }
            None => NopCluster.apply_instance(token, spec, fence),
        }
    }

    fn observe_instance<'a>(
        &'a self,
        resource_id: Uuid,
        tenant: &'a str,
    ) -> BoxFuture<'a, Result<Option<ClusterObservation>, AdapterError>> {
        match &self.observe {
            Some(f) => {
                let out = f(resource_id, tenant);
                Box::pin(async move { out })
            }
            None => NopCluster.observe_instance(resource_id, tenant),
        }
    }

    fn delete_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        resource_id: Uuid,
        tenant: &'a str,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<DeleteOutcome, AdapterError>> {
        match &self.delete {
            Some(f) => {
                let out = fence.check().and_then(|()| f(token, resource_id, tenant));
                Box::pin(async move { out })
            }
            None => NopCluster.delete_instance(token, resource_id, tenant, fence),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_data_debug_hides_values() {
        let s = SecretData::from_pairs([("password", "hunter2")]);
        let shown = format!("{s:?}");
        assert!(shown.contains("password"));
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn spec_defaults_replicas_and_backend() {
        let spec: ClusterInstanceSpec = serde_json::from_value(serde_json::json!({
            "resource_id": "6f1c1f0e-8d0b-4b43-9a59-1c2b3d4e5f60",
            "tenant": "acme",
            "name": "cache",
            "plan": "small",
        }))
        .unwrap();
        assert_eq!(spec.replicas, 1);
        assert_eq!(
            spec.generation, 0,
            "a spec without a generation is 'unknown'"
        );
        assert_eq!(spec.backend, BackendAddress::default());
        assert!(spec.credentials.0.is_empty());
    }

    #[test]
    fn nop_cluster_is_object_safe_and_idle() {
        let c: Box<dyn Cluster> = Box::new(NopCluster);
        let token = IdempotencyToken::generate();
        let out =
            block_on(c.delete_instance(&token, Uuid::nil(), "t", &Fence::unbounded())).unwrap();
        assert!(out.already_absent);
    }

    /// Polls a future that never waits (the Nop futures are ready at once).
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(f)
    }
}
