//! [`KubernetesCluster`]: the SDK's [`Cluster`] on kube-rs, by server-side apply.
//!
//! Apply reads the instance's objects first (observe before act; the reads also tell whether
//! the apply changed anything), then applies namespace, Secret, Service and Deployment in that
//! order under the one field manager `setpoint`. Delete lists each kind by the instance label
//! and deletes what it finds; "not found" at any point is success.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use setpoint_adapter::{
    AdapterError, BoxFuture, Cluster, ClusterInstanceSpec, ClusterObject, ClusterObservation,
    DeleteOutcome, Fence, IdempotencyToken,
};
use tracing::{debug, info};
use uuid::Uuid;

use crate::config::{ConfigError, KubernetesConfig};
use crate::error::classify;
use crate::names;
use crate::objects::{self, InstanceIdentity, Workload};

/// A Kubernetes cluster as a [`Cluster`]. Cheap to clone (the kube client is shared).
#[derive(Clone)]
pub struct KubernetesCluster {
    client: kube::Client,
    workload: Workload,
    force_conflicts: bool,
}

impl Debug for KubernetesCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesCluster")
            .field("workload", &self.workload)
            .field("force_conflicts", &self.force_conflicts)
            .finish_non_exhaustive()
    }
}

/// The objects of one instance as read from the API server (each `None` when absent).
struct Current {
    namespace: Option<Namespace>,
    secret: Option<Secret>,
    service: Option<Service>,
    deployment: Option<Deployment>,
}

impl KubernetesCluster {
    /// Connects as `config` says. No request is sent until the first call.
    ///
    /// # Errors
    /// [`ConfigError`] when the configuration cannot produce a client.
    pub async fn connect(config: &KubernetesConfig) -> Result<Self, ConfigError> {
        let client = config.client().await?;
        Ok(Self::with_client(client, config))
    }

    /// Wraps an existing client, taking the workload settings from `config`.
    pub fn with_client(client: kube::Client, config: &KubernetesConfig) -> Self {
        Self {
            client,
            workload: Workload {
                image: config.image.clone(),
                port: config.port,
            },
            force_conflicts: config.force_conflicts,
        }
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
            namespace: get_opt(Api::<Namespace>::all(self.client.clone()), &id.namespace).await?,
            secret: get_opt(self.namespaced::<Secret>(id), &id.name).await?,
            service: get_opt(self.namespaced::<Service>(id), &id.name).await?,
            deployment: get_opt(self.namespaced::<Deployment>(id), &id.name).await?,
        })
    }

    fn namespaced<K>(&self, id: &InstanceIdentity) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &id.namespace)
    }

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
        fence.check()?;
        api.patch(name, &self.apply_params(), &Patch::Apply(intent))
            .await
            .map_err(|e| {
                classify(
                    &format!("apply {} {}", K::kind(&Default::default()), name),
                    &e,
                )
            })
    }

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
        let list = api
            .list(&ListParams::default().labels(selector))
            .await
            .map_err(|e| classify(&format!("list {kind} with {selector}"), &e))?;
        for item in list.items {
            let name = item.name_any();
            fence.check()?;
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => deleted.push(ClusterObject {
                    kind: kind.clone(),
                    name,
                    version: item.resource_version(),
                }),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(classify(&format!("delete {kind} {name}"), &e)),
            }
        }
        Ok(())
    }
}

async fn get_opt<K>(api: Api<K>, name: &str) -> Result<Option<K>, AdapterError>
where
    K: Resource + Clone + Debug + DeserializeOwned,
    <K as Resource>::DynamicType: Default,
{
    match api.get(name).await {
        Ok(k) => Ok(Some(k)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(classify(
            &format!("get {} {}", K::kind(&Default::default()), name),
            &e,
        )),
    }
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
    current: &Current,
    changed: bool,
) -> ClusterObservation {
    let mut objects_ = Vec::new();
    if let Some(s) = &current.secret {
        objects_.push(object(s));
    }
    if let Some(s) = &current.service {
        objects_.push(object(s));
    }
    if let Some(d) = &current.deployment {
        objects_.push(object(d));
    }
    let desired = current
        .deployment
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let ready = current
        .deployment
        .as_ref()
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    ClusterObservation {
        namespace: id.namespace.clone(),
        objects: objects_,
        service_host: current
            .service
            .as_ref()
            .map(|_| format!("{}.{}.svc", id.name, id.namespace)),
        service_port: current.service.as_ref().map(|_| port),
        desired_replicas: u32::try_from(desired).unwrap_or(0),
        ready_replicas: u32::try_from(ready).unwrap_or(0),
        complete: current.secret.is_some()
            && current.service.is_some()
            && current.deployment.is_some(),
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
            // Observe before act: what an earlier attempt (or unit) left, and its versions.
            let before = self.read(&id).await?;
            if let Some(d) = &before.deployment {
                let earlier = d
                    .labels()
                    .get(names::LABEL_TOKEN)
                    .cloned()
                    .unwrap_or_default();
                debug!(%token, earlier_token = %earlier, namespace = %id.namespace, name = %id.name,
                    "instance objects exist; applying over them");
            }

            let ns_intent = objects::namespace(&id, &spec.tenant);
            let secret_intent = objects::secret(&id, spec, token);
            let service_intent = objects::service(&id, spec, token, &self.workload);
            let deployment_intent = objects::deployment(&id, spec, token, &self.workload);
            // Whether this apply changes anything: some intent is not already contained in
            // what the server holds. (Comparing resourceVersions instead would count the
            // controllers' own status writes as our changes.)
            let changed = !(contains(before.namespace.as_ref(), &ns_intent)
                && contains(before.secret.as_ref(), &secret_intent)
                && contains(before.service.as_ref(), &service_intent)
                && contains(before.deployment.as_ref(), &deployment_intent));

            let namespaces = Api::<Namespace>::all(self.client.clone());
            let ns = self
                .apply(&namespaces, &id.namespace, &ns_intent, fence)
                .await?;
            let secret = self
                .apply(
                    &self.namespaced::<Secret>(&id),
                    &id.name,
                    &secret_intent,
                    fence,
                )
                .await?;
            let service = self
                .apply(
                    &self.namespaced::<Service>(&id),
                    &id.name,
                    &service_intent,
                    fence,
                )
                .await?;
            let deployment = self
                .apply(
                    &self.namespaced::<Deployment>(&id),
                    &id.name,
                    &deployment_intent,
                    fence,
                )
                .await?;

            let after = Current {
                namespace: Some(ns),
                secret: Some(secret),
                service: Some(service),
                deployment: Some(deployment),
            };
            let obs = observation(&id, self.workload.port, &after, changed);
            info!(%token, resource_id = %spec.resource_id, namespace = %id.namespace,
                name = %id.name, changed, "applied kvx instance objects");
            Ok(obs)
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
            if current.secret.is_none() && current.service.is_none() && current.deployment.is_none()
            {
                return Ok(None);
            }
            Ok(Some(observation(&id, self.workload.port, &current, false)))
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
