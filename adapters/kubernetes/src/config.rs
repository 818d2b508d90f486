//! Configuration: which cluster to talk to, how, and what the instance's workload looks like.

use std::path::PathBuf;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Deserialize;

/// How to reach the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ClusterAccess {
    /// The service account of the pod setpoint runs in (`KUBERNETES_SERVICE_HOST` and the
    /// mounted token and CA).
    InCluster,
    /// A kubeconfig file and, optionally, one of its contexts (default: its current context).
    Kubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// The context to use; the file's `current-context` when absent.
        #[serde(default)]
        context: Option<String>,
    },
    /// A plain URL with no credentials, e.g. the [`crate::test_server::TestApiServer`] or a
    /// `kubectl proxy`.
    Url {
        /// The API server's base URL, e.g. `http://127.0.0.1:8001`.
        url: String,
    },
}

/// Configuration of the Kubernetes adapter, read from setpoint's configuration file.
///
/// ```toml
/// [kubernetes]
/// access = { mode = "kubeconfig", path = "/etc/setpoint/kubeconfig", context = "prod" }
/// image = "registry.example.com/kvx-proxy:1.4"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// How to reach the API server.
    pub access: ClusterAccess,
    /// The container image every instance runs.
    #[serde(default = "default_image")]
    pub image: String,
    /// The port the instance's container listens on and its Service exposes.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Per-request timeout (connect, and waiting for a response), in seconds. A request that
    /// times out is a transient failure.
    #[serde(default = "default_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Take ownership of fields another field manager owns (server-side apply `force`).
    /// Off by default: a conflict is reported (permanent, naming the other manager and the
    /// fields) so an operator decides, instead of silently undoing someone else's change.
    #[serde(default)]
    pub force_conflicts: bool,
}

fn default_image() -> String {
    "ghcr.io/setpoint-dev/kvx-proxy:1".to_owned()
}

fn default_port() -> u16 {
    7379
}

fn default_timeout_secs() -> u64 {
    30
}

impl KubernetesConfig {
    /// A configuration with defaults for everything but `access`.
    pub fn new(access: ClusterAccess) -> Self {
        Self {
            access,
            image: default_image(),
            port: default_port(),
            request_timeout_secs: default_timeout_secs(),
            force_conflicts: false,
        }
    }

    /// A configuration for a plain URL with no credentials (the test server, `kubectl proxy`).
    pub fn for_url(url: impl Into<String>) -> Self {
        Self::new(ClusterAccess::Url { url: url.into() })
    }

    /// The per-request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }

    /// Builds a kube client for this configuration.
    ///
    /// kube's own retry layer is turned off: one call of the adapter is one round trip per
    /// request, and retries belong to the engine (its backoff, its attempt budget, its
    /// events). Timeouts apply to connecting and to waiting for a response.
    ///
    /// # Errors
    /// [`ConfigError`] when the kubeconfig cannot be read or lacks the context, the in-cluster
    /// environment is missing, or the URL does not parse.
    pub async fn client(&self) -> Result<kube::Client, ConfigError> {
        let mut config = match &self.access {
            ClusterAccess::InCluster => {
                kube::Config::incluster().map_err(|e| ConfigError::InCluster(e.to_string()))?
            }
            ClusterAccess::Kubeconfig { path, context } => {
                let file = Kubeconfig::read_from(path).map_err(|e| ConfigError::Kubeconfig {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                let options = KubeConfigOptions {
                    context: context.clone(),
                    ..KubeConfigOptions::default()
                };
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| ConfigError::Kubeconfig {
                        path: path.clone(),
                        message: e.to_string(),
                    })?
            }
            ClusterAccess::Url { url } => {
                let uri = url.parse::<hyper::Uri>().map_err(|e| ConfigError::Url {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
                kube::Config::new(uri)
            }
        };
        config.default_retry = false;
        config.connect_timeout = Some(self.request_timeout());
        config.read_timeout = Some(self.request_timeout());
        config.write_timeout = Some(self.request_timeout());
        config.reset_reader_on_write = true;
        kube::Client::try_from(config).map_err(|e| ConfigError::Client(e.to_string()))
    }
}

/// Why a Kubernetes client could not be built. Always permanent: the configuration must change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The in-cluster environment (service host, token, CA) is missing or unreadable.
    #[error("in-cluster Kubernetes configuration is not available: {0}")]
    InCluster(String),
    /// The kubeconfig file cannot be read, or lacks the requested context.
    #[error("kubeconfig {path:?} cannot be used: {message}")]
    Kubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// What was wrong with it.
        message: String,
    },
    /// The URL does not parse.
    #[error("Kubernetes API URL {url:?} is not valid: {message}")]
    Url {
        /// The URL as configured.
        url: String,
        /// The parse error.
        message: String,
    },
    /// The client could not be built from a readable configuration (e.g. bad TLS material).
    #[error("cannot build a Kubernetes client: {0}")]
    Client(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserializes_each_access_mode_with_defaults() {
        let c: KubernetesConfig = toml_like(r#"{"access": {"mode": "in-cluster"}}"#);
        assert_eq!(c.access, ClusterAccess::InCluster);
        assert_eq!(c.port, 7379);
        assert!(!c.force_conflicts);
        let c: KubernetesConfig = toml_like(
            r#"{"access": {"mode": "kubeconfig", "path": "/k", "context": "kind-dev"}, "port": 1}"#,
        );
        assert_eq!(
            c.access,
            ClusterAccess::Kubeconfig {
                path: "/k".into(),
                context: Some("kind-dev".into())
            }
        );
        let c: KubernetesConfig =
            toml_like(r#"{"access": {"mode": "url", "url": "http://127.0.0.1:1"}}"#);
        assert_eq!(c, KubernetesConfig::for_url("http://127.0.0.1:1"));
    }

    fn toml_like(json: &str) -> KubernetesConfig {
        serde_json::from_str(json).unwrap()
    }

    #[tokio::test]
    async fn missing_kubeconfig_is_a_config_error() {
        let c = KubernetesConfig::new(ClusterAccess::Kubeconfig {
            path: "/nonexistent/kubeconfig".into(),
            context: None,
        });
        assert!(matches!(
            c.client().await,
            Err(ConfigError::Kubeconfig { .. })
        ));
    }
}
