//! Test harness: runs each test against the [`TestApiServer`], or against a real cluster when
//! one is configured.
//!
//! - `SETPOINT_TEST_KUBECONFIG=/path/to/kubeconfig` (optionally `SETPOINT_TEST_KUBE_CONTEXT`),
//!   or `SETPOINT_TEST_REAL_CLUSTER=1` with `KUBECONFIG` set: a real cluster (kind, k3d, …).
//!   Fault-injection tests are skipped there.
//! - otherwise: a fresh test server per test.
//!
//! Each test uses its own random tenant (so its own namespace) and deletes that namespace at
//! the end, so tests are independent on a shared real cluster too.

#![allow(dead_code)]

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams};
use setpoint_adapter::{BackendAddress, ClusterInstanceSpec, IdempotencyToken, SecretData};
use setpoint_kubernetes::{ClusterAccess, KubernetesCluster, KubernetesConfig, TestApiServer};
use uuid::Uuid;

/// Where a test runs.
pub struct Env {
    /// The adapter under test.
    pub cluster: KubernetesCluster,
    /// The configuration it was built from.
    pub config: KubernetesConfig,
    /// A client for inspecting the cluster directly.
    pub client: kube::Client,
    /// The test server, when not on a real cluster.
    pub server: Option<TestApiServer>,
    /// This test's tenant.
    pub tenant: String,
}

/// The real cluster's configuration, if the environment names one.
pub fn real_cluster() -> Option<KubernetesConfig> {
    let path = match std::env::var("SETPOINT_TEST_KUBECONFIG") {
        Ok(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            if std::env::var("SETPOINT_TEST_REAL_CLUSTER").as_deref() != Ok("1") {
                return None;
            }
            let list = std::env::var("KUBECONFIG").ok()?;
            PathBuf::from(list.split(':').next()?)
        }
    };
    let context = std::env::var("SETPOINT_TEST_KUBE_CONTEXT")
        .ok()
        .filter(|c| !c.is_empty());
    Some(KubernetesConfig::new(ClusterAccess::Kubeconfig {
        path,
        context,
    }))
}

impl Env {
    /// A fresh environment with a random tenant.
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// A fresh environment whose configuration `tweak` adjusts.
    pub async fn with(tweak: impl FnOnce(&mut KubernetesConfig)) -> Self {
        let (mut config, server) = match real_cluster() {
            Some(c) => (c, None),
            None => {
                let server = TestApiServer::start().await.expect("start test server");
                (server.config(), Some(server))
            }
        };
        tweak(&mut config);
        let cluster = KubernetesCluster::connect(&config)
            .await
            .expect("connect cluster");
        let client = cluster.client().clone();
        let tenant = format!("t-{}", &Uuid::new_v4().simple().to_string()[..10]);
        Self {
            cluster,
            config,
            client,
            server,
            tenant,
        }
    }

    /// True when running against the test server (fault injection available).
    pub fn is_fake(&self) -> bool {
        self.server.is_some()
    }

    /// A spec for a new instance of this test's tenant.
    pub fn spec(&self) -> ClusterInstanceSpec {
        ClusterInstanceSpec {
            resource_id: Uuid::new_v4(),
            tenant: self.tenant.clone(),
            name: "cache".to_owned(),
            plan: "small".to_owned(),
            replicas: 1,
            backend: BackendAddress {
                private_ip: Some("10.0.3.17".to_owned()),
                endpoint: None,
            },
            credentials: SecretData::from_pairs([("KVX_PASSWORD", "s3cr3t-value")]),
            generation: 1,
        }
    }

    /// A typed API for namespaced objects of this tenant.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(
            self.client.clone(),
            &setpoint_kubernetes::names::namespace_name(&self.tenant),
        )
    }

    /// Deletes this test's namespace (best effort; matters on a real cluster).
    pub async fn cleanup(mut self) {
        let ns = setpoint_kubernetes::names::namespace_name(&self.tenant);
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&ns, &DeleteParams::background())
            .await;
        if let Some(server) = self.server.as_mut() {
            server.stop().await;
        }
    }
}

/// A fresh token.
pub fn token() -> IdempotencyToken {
    IdempotencyToken::generate()
}
