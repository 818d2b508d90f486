//! # setpoint-kubernetes: KVX instances on Kubernetes, by server-side apply
//!
//! Implements the SDK's [`setpoint_adapter::Cluster`] on kube-rs and runs the work kinds
//! `k8s.apply-instance` and `k8s.delete-instance`.
//!
//! Per instance, in the tenant's namespace `setpoint-<tenant>`, it applies a Secret (the
//! credentials), a Service and a Deployment, all named `kvx-<resource id>` and labelled with
//! the instance id (`setpoint.dev/instance`), the tenant and the token of the unit that wrote
//! them, and annotated with the spec generation they were written for. Every write is a
//! server-side apply under the one field manager `setpoint`, so applying twice is a no-op and a
//! retry adopts what an earlier attempt made. Writes are conditional, so a late write of a
//! stale attempt cannot undo a newer one: an older generation is refused (`superseded`), and
//! each write carries the `resourceVersion` it was based on (see [`cluster`]). Delete lists by
//! the instance label and deletes what it finds, each delete conditional on what it listed;
//! "not found" is success.
//!
//! ```no_run
//! # async fn wire() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use setpoint_adapter::{Cluster, typed};
//! use setpoint_kubernetes::{ApplyInstance, DeleteInstance, KubernetesCluster, KubernetesConfig};
//!
//! let config: KubernetesConfig = toml_or_json_from_setpoint_config();
//! let cluster: Arc<dyn Cluster> = Arc::new(KubernetesCluster::connect(&config).await?);
//! let apply = typed(ApplyInstance::new(cluster.clone()));   // kind "k8s.apply-instance"
//! let delete = typed(DeleteInstance::new(cluster));         // kind "k8s.delete-instance"
//! // registry.register(apply); registry.register(delete);
//! # let _ = (apply, delete); Ok(())
//! # }
//! # fn toml_or_json_from_setpoint_config() -> setpoint_kubernetes::KubernetesConfig {
//! #     setpoint_kubernetes::KubernetesConfig::for_url("http://127.0.0.1:1")
//! # }
//! ```
//!
//! # Layout
//! - [`config`]: [`KubernetesConfig`] — in-cluster, kubeconfig + context, a plain URL, or a URL
//!   with a bearer token and CA bundle.
//! - [`cluster`]: [`KubernetesCluster`], the [`setpoint_adapter::Cluster`] implementation.
//! - [`objects`]: the apply intents (Namespace, Secret, Service, Deployment).
//! - [`names`]: deterministic, DNS-safe names and valid label values.
//! - [`error`]: [`classify`], the one place a kube error becomes transient or permanent.
//! - [`handlers`]: [`ApplyInstance`] and [`DeleteInstance`], the [`setpoint_adapter::TypedHandler`]s.
//! - [`test_server`]: [`TestApiServer`], a Kubernetes API stand-in for tests and `setpoint dev`
//!   (with `resourceVersion` preconditions, and [`ConcurrentWrite`]s placed between a client's
//!   read and its write).

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cluster;
pub mod config;
pub mod error;
pub mod handlers;
pub mod names;
pub mod objects;
pub mod test_server;

pub use cluster::KubernetesCluster;
pub use config::{BearerToken, ClusterAccess, ConfigError, KubernetesConfig};
pub use error::classify;
pub use handlers::{
    ApplyInstance, DeleteInstance, DeleteInstanceSpec, KIND_APPLY_INSTANCE, KIND_DELETE_INSTANCE,
};
pub use names::FIELD_MANAGER;
pub use test_server::{ConcurrentWrite, Fault, LoggedRequest, TestApiServer};
