//! [`KubernetesCluster`]: the SDK's [`Cluster`] on kube-rs, by server-side apply.
//!
//! **Apply** reads the instance's objects first (observe before act; the reads also tell whether
//! the apply changed anything and which generation the cluster holds), refuses to write when
//! the cluster holds a newer generation than the unit's ([`CODE_SUPERSEDED`]), then applies
//! namespace, Secret, Service and Deployment in that order under the one field manager
//! `setpoint`. Every write of an instance object is *conditional* on the read it is based on:
//! it carries that read's `metadata.resourceVersion` — the object's own version when the object
//! exists (the API server refuses the write with 409 if anything changed it since), the
//! version of the (empty) list that found it absent when it does not (the server ignores the
//! version when it creates the object, and refuses with 409 if a concurrent writer created it
//! first) — and, for an object that exists, its `metadata.uid` (the server refuses with 409
//! rather than re-create an object deleted since). On such a 409 the apply reads everything again and starts over, at most
//! [`APPLY_ROUNDS`] times, so it converges on what the other writer left instead of
//! overwriting it — and sees a newer generation if that is what the other writer wrote.
//!
//! **Delete** lists each kind by the instance label and deletes what it finds, each delete
//! conditional on the uid and version it was listed with (the label decided it belongs to the
//! instance); on a 409 it lists again, at most [`DELETE_ROUNDS`] times. "Not found" at any
//! point is success.
//!
//! The tenant's namespace is applied without a precondition: it is shared by the tenant's
//! instances and its content depends on the tenant alone, so no write to it can be stale.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;

use setpoint_adapter::{
    AdapterError, BoxFuture, Budget, BudgetKey, Budgets, CODE_SUPERSEDED, Cluster,
    ClusterInstanceSpec, ClusterObject, ClusterObservation, DeleteOutcome, Fence, IdempotencyToken,
    Unlimited,
};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::config::{ConfigError, KubernetesConfig};
use crate::error::{CODE_KEPT_CHANGING, classify, is_stale_write};
use crate::names;
use crate::objects::{self, Generation, InstanceIdentity, Workload};

/// How many times one apply reads the instance's objects and writes them, when a conditional
/// write keeps meeting a newer version (a concurrent writer). Then it gives up with a transient
/// [`CODE_KEPT_CHANGING`] error and the engine's backoff takes over.
pub const APPLY_ROUNDS: usize = 4;

/// How many times one delete lists a kind and deletes what it found, when a conditional delete
/// keeps meeting a newer version.
pub const DELETE_ROUNDS: usize = 4;

/// A Kubernetes cluster as a [`Cluster`]. Cheap to clone (the kube client is shared).
///
/// Every request takes a token of its class's budget first (`kubernetes/<scope>/global/read`
/// for gets and lists, `…/write` for applies and deletes), and a 429 lowers that budget's
/// shared rate and becomes a wait (docs/budgets.md). Without [`KubernetesCluster::with_budgets`]
/// nothing is limited.
#[derive(Clone)]
pub struct KubernetesCluster {
    client: kube::Client,
    workload: Workload,
    force_conflicts: bool,
    reads: Budget,
    writes: Budget,
    config: Arc<KubernetesConfig>,
}

impl Debug for KubernetesCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesCluster")
            .field("workload", &self.workload)
            .field("force_conflicts", &self.force_conflicts)
            .finish_non_exhaustive()
    }
}

/// One object as read, and the `resourceVersion` a write based on this read must carry.
struct Read<K> {
    /// The object, when it exists.
    live: Option<K>,
    /// The object's version; when absent, the version of the list that found no object.
    precondition: Option<String>,
}

/// The objects of one instance as read from the API server.
struct Current {
    namespace: Option<Namespace>,
    secret: Read<Secret>,
    service: Read<Service>,
    deployment: Read<Deployment>,
}

impl Current {
    /// The newest generation recorded on the instance's objects, if any records one.
    fn newest_generation(&self, token: &IdempotencyToken) -> Option<i64> {
        let metas = [
            self.secret.live.as_ref().map(|o| (o.meta(), "Secret")),
            self.service.live.as_ref().map(|o| (o.meta(), "Service")),
            self.deployment
                .live
                .as_ref()
                .map(|o| (o.meta(), "Deployment")),
        ];
        metas
            .into_iter()
            .flatten()
            .filter_map(|(meta, kind)| {
                let recorded = objects::recorded_generation(meta);
                if recorded.is_none()
                    && meta
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.contains_key(names::ANNOTATION_GENERATION))
                {
                    warn!(%token, kind, name = ?meta.name,
                        "the {} annotation does not hold a number; ignoring it",
                        names::ANNOTATION_GENERATION);
                }
                recorded
            })
            .max()
    }
}

/// How a conditional write ended when it did not succeed.
enum WriteError {
    /// The object changed since it was read (409 on the precondition): read again.
    Stale(String),
    /// Any other failure, classified.
    Failed(AdapterError),
}

impl From<AdapterError> for WriteError {
    fn from(e: AdapterError) -> Self {
        WriteError::Failed(e)
    }
}

impl KubernetesCluster {
    /// Connects as `config` says. No request is sent until the first call.
    ///
    /// # Errors
    /// [`ConfigError`] when the configuration cannot produce a client.
    pub async fn connect(config: &KubernetesConfig) -> Result<Self, ConfigError> {
        config.validate_budgets()?;
        let client = config.client().await?;
        Ok(Self::with_client(client, config))
    }

    /// Wraps an existing client, taking the workload settings from `config`.
    pub fn with_client(client: kube::Client, config: &KubernetesConfig) -> Self {
        let unlimited: Arc<dyn Budgets> = Arc::new(Unlimited);
        Self {
            client,
            workload: Workload {
                image: config.image.clone(),
                port: config.port,
            },
            force_conflicts: config.force_conflicts,
            reads: budget(&unlimited, config, "read"),
            writes: budget(&unlimited, config, "write"),
            config: Arc::new(config.clone()),
        }
    }

    /// Draws its requests' tokens from `budgets` (the engine's, shared by every engine), at
    /// the limits of its configuration's `budgets`.
    pub fn with_budgets(mut self, budgets: Arc<dyn Budgets>) -> Self {
        self.reads = budget(&budgets, &self.config, "read");
        self.writes = budget(&budgets, &self.config, "write");
        self
    }

    /// The kube client (for tests and tools that inspect the cluster).
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    fn apply_params(&self) -> PatchParams {
        let params = PatchParams::apply(names::FIELD_MANAGER);
        if self.force_conflicts {
            params.force()
        } else {
            params
        }
    }

    async fn read(&self, id: &InstanceIdentity) -> Result<Current, AdapterError> {
        Ok(Current {
            namespace: get_opt(
                &self.reads,
                Api::<Namespace>::all(self.client.clone()),
                &id.namespace,
            )
            .await?,
            secret: read_named(&self.reads, self.namespaced::<Secret>(id), &id.name).await?,
            service: read_named(&self.reads, self.namespaced::<Service>(id), &id.name).await?,
            deployment: read_named(&self.reads, self.namespaced::<Deployment>(id), &id.name)
                .await?,
        })
    }

    fn namespaced<K>(&self, id: &InstanceIdentity) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &id.namespace)
    }

    /// Applies `intent` unconditionally (the shared namespace).
    async fn apply<K>(
        &self,
        api: &Api<K>,
        name: &str,
        intent: &K,
        fence: &Fence,
    ) -> Result<K, AdapterError>
    where
        K: Resource + Clone + Debug + Serialize + DeserializeOwned,
        <K as Resource>::DynamicType: Default,
    {
        // The token first, the fence check last before the write.
        self.writes.take().await?;
        fence.check()?;
        let result = api
            .patch(name, &self.apply_params(), &Patch::Apply(intent))
            .await
            .map_err(|e| {
                classify(
                    &format!("apply {} {}", K::kind(&Default::default()), name),
                    &e,
                )
            });
        self.writes.report(result).await
    }

    /// Applies `intent` on the condition that the object is still as `read` saw it.
    async fn apply_if_unchanged<K>(
        &self,
        api: &Api<K>,
        name: &str,
        mut intent: K,
        read: &Read<K>,
        fence: &Fence,
    ) -> Result<K, WriteError>
    where
        K: Resource + Clone + Debug + Serialize + DeserializeOwned,
        <K as Resource>::DynamicType: Default,
    {
        // The version, and for an object that exists its uid: should the object be deleted
        // while this write is under way, the server refuses it (409) instead of creating a
        // new object from a stale decision.
        intent.meta_mut().resource_version = read.precondition.clone();
        intent.meta_mut().uid = read.live.as_ref().and_then(ResourceExt::uid);
        let kind = K::kind(&Default::default()).to_string();
        self.writes.take().await?;
        fence.check()?;
        match api
            .patch(name, &self.apply_params(), &Patch::Apply(&intent))
            .await
        {
            Ok(k) => Ok(k),
            Err(e) if is_stale_write(&e) => Err(WriteError::Stale(format!("{kind} {name}"))),
            // A 429 lowers the shared write budget and becomes a wait.
            Err(e) => Err(WriteError::Failed(
                self.writes
                    .report_error(classify(&format!("apply {kind} {name}"), &e))
                    .await,
            )),
        }
    }

    /// One round of an apply: reads, checks the generation, writes. `changed` becomes true
    /// when this round's intents differ from what it read.
    async fn apply_round(
        &self,
        id: &InstanceIdentity,
        token: &IdempotencyToken,
        spec: &ClusterInstanceSpec,
        fence: &Fence,
        changed: &mut bool,
    ) -> Result<ClusterObservation, WriteError> {
        // Observe before act: what an earlier attempt (or unit) left, and its versions.
        let before = self.read(id).await?;
        if let Some(d) = &before.deployment.live {
            let earlier = d
                .labels()
                .get(names::LABEL_TOKEN)
                .cloned()
                .unwrap_or_default();
            debug!(%token, earlier_token = %earlier, namespace = %id.namespace, name = %id.name,
                "instance objects exist; applying over them");
        }
        let generation = generation_to_record(id, spec, before.newest_generation(token))?;

        let ns_intent = objects::namespace(id, &spec.tenant);
        let secret_intent = objects::secret(id, spec, token, generation);
        let service_intent = objects::service(id, spec, token, generation, &self.workload);
        let deployment_intent = objects::deployment(id, spec, token, generation, &self.workload);
        // Whether this apply changes anything: some intent is not already contained in what
        // the server holds. (Comparing resourceVersions instead would count the controllers'
        // own status writes as our changes.)
        *changed |= !(contains(before.namespace.as_ref(), &ns_intent)
            && contains(before.secret.live.as_ref(), &secret_intent)
            && contains(before.service.live.as_ref(), &service_intent)
            && contains(before.deployment.live.as_ref(), &deployment_intent));

        let namespaces = Api::<Namespace>::all(self.client.clone());
        self.apply(&namespaces, &id.namespace, &ns_intent, fence)
            .await?;
        let secret = self
            .apply_if_unchanged(
                &self.namespaced::<Secret>(id),
                &id.name,
                secret_intent,
                &before.secret,
                fence,
            )
            .await?;
        let service = self
            .apply_if_unchanged(
                &self.namespaced::<Service>(id),
                &id.name,
                service_intent,
                &before.service,
                fence,
            )
            .await?;
        let deployment = self
            .apply_if_unchanged(
                &self.namespaced::<Deployment>(id),
                &id.name,
                deployment_intent,
                &before.deployment,
                fence,
            )
            .await?;
        Ok(observation(
            id,
            self.workload.port,
            Some(&secret),
            Some(&service),
            Some(&deployment),
            *changed,
        ))
    }

    /// Deletes every object of kind `K` labelled `selector`, each on the condition that it is
    /// still the object (uid) and the version that was listed; lists again when one changed.
    async fn delete_labelled<K>(
        &self,
        api: Api<K>,
        selector: &str,
        deleted: &mut Vec<ClusterObject>,
        fence: &Fence,
    ) -> Result<(), AdapterError>
    where
        K: Resource + Clone + Debug + DeserializeOwned,
        <K as Resource>::DynamicType: Default,
    {
        let kind = K::kind(&Default::default()).to_string();
        for round in 1..=DELETE_ROUNDS {
            let list = self
                .reads
                .call(async {
                    api.list(&ListParams::default().labels(selector))
                        .await
                        .map_err(|e| classify(&format!("list {kind} with {selector}"), &e))
                })
                .await?;
            let mut stale = Vec::new();
            for item in list.items {
                let name = item.name_any();
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: item.uid(),
                        resource_version: item.resource_version(),
                    }),
                    ..DeleteParams::background()
                };
                self.writes.take().await?;
                fence.check()?;
                match api.delete(&name, &params).await {
                    Ok(_) => deleted.push(ClusterObject {
                        kind: kind.clone(),
                        name,
                        version: item.resource_version(),
                    }),
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) if is_stale_write(&e) => stale.push(name),
                    Err(e) => {
                        return Err(self
                            .writes
                            .report_error(classify(&format!("delete {kind} {name}"), &e))
                            .await);
                    }
                }
            }
            if stale.is_empty() {
                return Ok(());
            }
            debug!(
                kind,
                ?stale,
                round,
                "objects changed since they were listed; listing again"
            );
        }
        Err(AdapterError::transient(format!(
            "deleting the {kind}s labelled {selector}: they changed between listing and \
             deleting {DELETE_ROUNDS} times in a row; the next attempt lists them again"
        ))
        .with_code(CODE_KEPT_CHANGING))
    }
}

/// The generation to record on the instance's objects, or the refusal to write over a newer
/// one. A spec of unknown generation (0) compares nothing and keeps what is recorded.
fn generation_to_record(
    id: &InstanceIdentity,
    spec: &ClusterInstanceSpec,
    newest: Option<i64>,
) -> Result<Generation, AdapterError> {
    if spec.generation <= 0 {
        return Ok(Generation(newest));
    }
    match newest {
        Some(held) if held > spec.generation => Err(AdapterError::permanent(format!(
            "the cluster holds generation {held} of instance {} (objects {} in namespace {}), \
             newer than this unit's generation {}; nothing was written. A later change of the \
             instance has already been applied, so this unit's spec is out of date",
            spec.resource_id, id.name, id.namespace, spec.generation
        ))
        .with_code(CODE_SUPERSEDED)),
        _ => Ok(Generation(Some(spec.generation))),
    }
}

/// The `kubernetes/<scope>/global/<class>` budget of `config`.
fn budget(budgets: &Arc<dyn Budgets>, config: &KubernetesConfig, class: &'static str) -> Budget {
    let limit = if class == "write" {
        config.budgets.write
    } else {
        config.budgets.read
    };
    Budget::new(
        budgets.clone(),
        BudgetKey::new("kubernetes", config.budget_scope(), "global", class),
        limit,
    )
}

async fn get_opt<K>(reads: &Budget, api: Api<K>, name: &str) -> Result<Option<K>, AdapterError>
where
    K: Resource + Clone + Debug + DeserializeOwned,
    <K as Resource>::DynamicType: Default,
{
    reads
        .call(async {
            match api.get(name).await {
                Ok(k) => Ok(Some(k)),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
                Err(e) => Err(classify(
                    &format!("get {} {}", K::kind(&Default::default()), name),
                    &e,
                )),
            }
        })
        .await
}

/// Reads the object `name` by listing its kind with a field selector on the name: one round
/// trip that gives the object and, when there is none, the version of the list that found
/// none (a precondition a concurrent create cannot meet).
async fn read_named<K>(reads: &Budget, api: Api<K>, name: &str) -> Result<Read<K>, AdapterError>
where
    K: Resource + Clone + Debug + DeserializeOwned,
    <K as Resource>::DynamicType: Default,
{
    let list = reads
        .call(async {
            api.list(&ListParams::default().fields(&format!("metadata.name={name}")))
                .await
                .map_err(|e| {
                    classify(
                        &format!("read {} {}", K::kind(&Default::default()), name),
                        &e,
                    )
                })
        })
        .await?;
    let live = list
        .items
        .into_iter()
        .find(|k| k.meta().name.as_deref() == Some(name));
    let precondition = match &live {
        Some(k) => k.resource_version(),
        None => list.metadata.resource_version.filter(|v| !v.is_empty()),
    };
    Ok(Read { live, precondition })
}

fn object<K: Resource<DynamicType = ()>>(k: &K) -> ClusterObject {
    ClusterObject {
        kind: K::kind(&()).to_string(),
        name: k.meta().name.clone().unwrap_or_default(),
        version: k.meta().resource_version.clone(),
    }
}

/// True when every field of `intent` is present in `live` with the same value (objects by
/// key, arrays item by item, so server defaults inside list items do not count).
fn contains<K: Serialize>(live: Option<&K>, intent: &K) -> bool {
    let (Some(live), Ok(intent)) = (live, serde_json::to_value(intent)) else {
        return false;
    };
    serde_json::to_value(live).is_ok_and(|live| subset(&intent, &live))
}

fn subset(want: &serde_json::Value, have: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w
            .iter()
            .all(|(k, v)| h.get(k).is_some_and(|hv| subset(v, hv))),
        (Value::Array(w), Value::Array(h)) => {
            w.len() == h.len() && w.iter().zip(h).all(|(a, b)| subset(a, b))
        }
        (w, h) => w == h,
    }
}

fn observation(
    id: &InstanceIdentity,
    port: u16,
    secret: Option<&Secret>,
    service: Option<&Service>,
    deployment: Option<&Deployment>,
    changed: bool,
) -> ClusterObservation {
    let mut objects_ = Vec::new();
    if let Some(s) = secret {
        objects_.push(object(s));
    }
    if let Some(s) = service {
        objects_.push(object(s));
    }
    if let Some(d) = deployment {
        objects_.push(object(d));
    }
    let desired = deployment
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let ready = deployment
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    ClusterObservation {
        namespace: id.namespace.clone(),
        objects: objects_,
        service_host: service.map(|_| format!("{}.{}.svc", id.name, id.namespace)),
        service_port: service.map(|_| port),
        desired_replicas: u32::try_from(desired).unwrap_or(0),
        ready_replicas: u32::try_from(ready).unwrap_or(0),
        complete: secret.is_some() && service.is_some() && deployment.is_some(),
        changed,
    }
}

impl Cluster for KubernetesCluster {
    fn apply_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        spec: &'a ClusterInstanceSpec,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<ClusterObservation, AdapterError>> {
        Box::pin(async move {
            let id = InstanceIdentity::new(spec.resource_id, &spec.tenant);
            let mut changed = false;
            for round in 1..=APPLY_ROUNDS {
                match self
                    .apply_round(&id, token, spec, fence, &mut changed)
                    .await
                {
                    Ok(obs) => {
                        info!(%token, resource_id = %spec.resource_id, namespace = %id.namespace,
                            name = %id.name, generation = spec.generation, changed, round,
                            "applied kvx instance objects");
                        return Ok(obs);
                    }
                    Err(WriteError::Stale(what)) => {
                        info!(%token, resource_id = %spec.resource_id, round, object = %what,
                            "the object changed since it was read; reading the instance again");
                    }
                    Err(WriteError::Failed(e)) => return Err(e),
                }
            }
            Err(AdapterError::transient(format!(
                "the objects of instance {} in namespace {} changed between reading and writing \
                 {APPLY_ROUNDS} times in a row (another writer is busy with them); nothing was \
                 overwritten, and the next attempt reads them again",
                spec.resource_id, id.namespace
            ))
            .with_code(CODE_KEPT_CHANGING))
        })
    }

    fn observe_instance<'a>(
        &'a self,
        resource_id: Uuid,
        tenant: &'a str,
    ) -> BoxFuture<'a, Result<Option<ClusterObservation>, AdapterError>> {
        Box::pin(async move {
            let id = InstanceIdentity::new(resource_id, tenant);
            let current = self.read(&id).await?;
            let (secret, service, deployment) = (
                current.secret.live.as_ref(),
                current.service.live.as_ref(),
                current.deployment.live.as_ref(),
            );
            if secret.is_none() && service.is_none() && deployment.is_none() {
                return Ok(None);
            }
            Ok(Some(observation(
                &id,
                self.workload.port,
                secret,
                service,
                deployment,
                false,
            )))
        })
    }

    fn delete_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        resource_id: Uuid,
        tenant: &'a str,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<DeleteOutcome, AdapterError>> {
        Box::pin(async move {
            let id = InstanceIdentity::new(resource_id, tenant);
            let mut deleted = Vec::new();
            // The Deployment first, so pods stop before their Service and Secret go.
            self.delete_labelled(
                self.namespaced::<Deployment>(&id),
                &id.selector,
                &mut deleted,
                fence,
            )
            .await?;
            self.delete_labelled(
                self.namespaced::<Service>(&id),
                &id.selector,
                &mut deleted,
                fence,
            )
            .await?;
            self.delete_labelled(
                self.namespaced::<Secret>(&id),
                &id.selector,
                &mut deleted,
                fence,
            )
            .await?;
            let already_absent = deleted.is_empty();
            info!(%token, %resource_id, namespace = %id.namespace, deleted = deleted.len(),
                already_absent, "deleted kvx instance objects");
            Ok(DeleteOutcome {
                deleted,
                already_absent,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::subset;

    #[test]
    fn subset_ignores_server_additions_but_not_changes() {
        let want = json!({"a": 1, "l": [{"name": "c", "image": "i"}]});
        let have = json!({"a": 1, "b": 2, "l": [{"name": "c", "image": "i", "pull": "Always"}]});
        assert!(subset(&want, &have));
        assert!(!subset(&json!({"a": 2}), &have));
        assert!(!subset(&json!({"l": []}), &have));
        assert!(!subset(&json!({"z": 1}), &have));
    }
}
