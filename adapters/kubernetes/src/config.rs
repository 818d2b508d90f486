//! Configuration: which cluster to talk to, how, and what the instance's workload looks like.

use std::path::PathBuf;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Deserialize;
use setpoint_adapter::Limit;

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
    /// An API server URL with a bearer token (e.g. a service account's token) and, optionally,
    /// the cluster's CA bundle: how a process outside the cluster reaches an EKS (or any)
    /// API server without a kubeconfig file.
    ///
    /// The URL must be `https://`; plain `http://` is accepted only for a loopback host (a
    /// `kubectl proxy`, the test server), so the token never crosses a network in the clear.
    Token {
        /// The API server's base URL, e.g. `https://ABC.gr7.eu-west-1.eks.amazonaws.com`.
        url: String,
        /// The bearer token sent on every request. Never logged: `Debug` shows `***`.
        token: BearerToken,
        /// The CA bundle that signs the server's certificate, as base64 of the PEM text
        /// (kubeconfig's `certificate-authority-data`, EKS's `certificateAuthority.data`).
        /// Without it the system's trust store is used.
        #[serde(default)]
        certificate_authority_data: Option<String>,
    },
}

/// A bearer token: `Debug` and `Display` show `***`, never the value.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct BearerToken(String);

impl BearerToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Configuration of the Kubernetes adapter, read from setpoint's configuration file.
///
/// ```toml
/// [kubernetes]
/// access = { mode = "kubeconfig", path = "/etc/setpoint/kubeconfig", context = "prod" }
/// image = "registry.example.com/kvx-proxy:1.4"
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    /// The request budgets its calls share with every engine (`[kubernetes.budgets]`).
    #[serde(default)]
    pub budgets: KubernetesBudgetsConfig,
}

/// The API server's rate limits as setpoint's shared budgets (docs/budgets.md), keyed by
/// `scope` (by default the server's URL, or the kubeconfig and context that name it).
///
/// ```toml
/// [kubernetes.budgets]                 # the defaults
/// # scope = "prod-eu"                  # engines that name the same scope share the buckets
/// write = { rate = 20.0, burst = 40.0 }
/// read = { rate = 50.0, burst = 100.0 }
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesBudgetsConfig {
    /// The name engines share the buckets under (default: see above).
    pub scope: Option<String>,
    /// Applies and deletes.
    pub write: Limit,
    /// Gets and lists.
    pub read: Limit,
}

/// The default `write` budget: 20 requests per second, burst 40. (client-go's default of 5 per
/// second is one client's; an engine is many clients, and API priority and fairness throttles
/// with 429, which lowers the shared rate.)
pub const DEFAULT_WRITE_BUDGET: Limit = Limit::new(20.0, 40.0);

/// The default `read` budget: 50 requests per second, burst 100.
pub const DEFAULT_READ_BUDGET: Limit = Limit::new(50.0, 100.0);

impl Default for KubernetesBudgetsConfig {
    fn default() -> Self {
        Self {
            scope: None,
            write: DEFAULT_WRITE_BUDGET,
            read: DEFAULT_READ_BUDGET,
        }
    }
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
            budgets: KubernetesBudgetsConfig::default(),
        }
    }

    /// Checks the budgets' limits.
    ///
    /// # Errors
    /// [`ConfigError::BadBudget`] naming the class and the value.
    pub fn validate_budgets(&self) -> Result<(), ConfigError> {
        for (class, limit) in [("write", self.budgets.write), ("read", self.budgets.read)] {
            limit
                .validate()
                .map_err(|message| ConfigError::BadBudget { class, message })?;
        }
        Ok(())
    }

    /// The scope of its budget keys: `budgets.scope`, else the server's URL, else the
    /// kubeconfig and context (or `in-cluster`).
    pub fn budget_scope(&self) -> String {
        if let Some(scope) = &self.budgets.scope {
            return scope.clone();
        }
        match &self.access {
            ClusterAccess::Url { url } | ClusterAccess::Token { url, .. } => url.clone(),
            ClusterAccess::Kubeconfig { path, context } => format!(
                "{}#{}",
                path.display(),
                context.as_deref().unwrap_or("current-context")
            ),
            ClusterAccess::InCluster => "in-cluster".to_owned(),
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
            ClusterAccess::Token {
                url,
                token,
                certificate_authority_data,
            } => token_config(url, token, certificate_authority_data.as_deref()).await?,
        };
        config.default_retry = false;
        config.connect_timeout = Some(self.request_timeout());
        config.read_timeout = Some(self.request_timeout());
        config.write_timeout = Some(self.request_timeout());
        config.reset_reader_on_write = true;
        kube::Client::try_from(config).map_err(|e| ConfigError::Client(e.to_string()))
    }
}

/// The scheme rule of [`ClusterAccess::Token`]: `https`, or `http` to a loopback host only.
fn check_token_url(url: &str, with_ca: bool) -> Result<(), ConfigError> {
    let bad = |message: &str| ConfigError::Url {
        url: url.to_owned(),
        message: message.to_owned(),
    };
    let uri = url.parse::<hyper::Uri>().map_err(|e| bad(&e.to_string()))?;
    let host = uri
        .host()
        .ok_or_else(|| bad("it has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if with_ca => Err(bad(
            "a CA bundle is given but the URL is plain http; use https://",
        )),
        Some("http")
            if host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback()) =>
        {
            Ok(())
        }
        Some("http") => Err(bad(
            "a bearer token is sent only over https:// (plain http only to a loopback host)",
        )),
        _ => Err(bad("the scheme must be https")),
    }
}

/// A kube configuration for [`ClusterAccess::Token`], built through an in-memory kubeconfig so
/// that kube parses the CA bundle exactly as it would from a file.
async fn token_config(
    url: &str,
    token: &BearerToken,
    certificate_authority_data: Option<&str>,
) -> Result<kube::Config, ConfigError> {
    use kube::config::{AuthInfo, Cluster, Context, NamedAuthInfo, NamedCluster, NamedContext};
    check_token_url(url, certificate_authority_data.is_some())?;
    const NAME: &str = "setpoint";
    let kubeconfig = Kubeconfig {
        clusters: vec![NamedCluster {
            name: NAME.into(),
            cluster: Some(Cluster {
                server: Some(url.to_owned()),
                certificate_authority_data: certificate_authority_data.map(str::to_owned),
                ..Cluster::default()
            }),
            ..NamedCluster::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: NAME.into(),
            auth_info: Some(AuthInfo {
                token: Some(secrecy::SecretString::from(token.expose().to_owned())),
                ..AuthInfo::default()
            }),
            ..NamedAuthInfo::default()
        }],
        contexts: vec![NamedContext {
            name: NAME.into(),
            context: Some(Context {
                cluster: NAME.into(),
                user: Some(NAME.into()),
                ..Context::default()
            }),
            ..NamedContext::default()
        }],
        current_context: Some(NAME.into()),
        ..Kubeconfig::default()
    };
    // kube's errors here concern the URL or the CA bundle; the token is a `SecretString` and
    // never part of them.
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| ConfigError::Client(e.to_string()))
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
    /// A budget's rate or burst is unusable.
    #[error("kubernetes.budgets.{class}: {message}")]
    BadBudget {
        /// `write` or `read`.
        class: &'static str,
        /// What is wrong with it.
        message: String,
    },
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

    #[test]
    fn budgets_default_parse_and_are_checked() {
        let c = KubernetesConfig::for_url("https://k8s.example:6443");
        assert_eq!(c.budgets.write, DEFAULT_WRITE_BUDGET);
        assert_eq!(c.budgets.read, DEFAULT_READ_BUDGET);
        assert_eq!(c.budget_scope(), "https://k8s.example:6443");
        let c = toml_like(
            r#"{"access": {"mode": "in-cluster"},
                "budgets": {"scope": "prod-eu", "write": {"rate": 2.0, "burst": 4.0}}}"#,
        );
        assert_eq!(c.budget_scope(), "prod-eu");
        assert_eq!(c.budgets.write, Limit::new(2.0, 4.0));
        assert_eq!(
            c.budgets.read, DEFAULT_READ_BUDGET,
            "an unnamed class keeps its default"
        );
        assert!(
            serde_json::from_str::<KubernetesConfig>(
                r#"{"access": {"mode": "in-cluster"}, "budgets": {"writes": {"rate": 1, "burst": 1}}}"#
            )
            .is_err(),
            "an unknown class is refused by name"
        );
        let mut bad = c.clone();
        bad.budgets.read = Limit::new(0.0, 5.0);
        let e = bad.validate_budgets().unwrap_err();
        assert!(
            e.to_string().starts_with("kubernetes.budgets.read: rate"),
            "{e}"
        );
        assert_eq!(
            KubernetesConfig::new(ClusterAccess::InCluster).budget_scope(),
            "in-cluster"
        );
    }

    fn toml_like(json: &str) -> KubernetesConfig {
        serde_json::from_str(json).unwrap()
    }

    /// A self-signed CA certificate (no private key anywhere), base64 of its PEM text.
    const CA_DATA: &str = concat!(
        "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJnVENDQVNlZ0F3SUJBZ0lVYWh0VGpFQktW",
        "Y3A0WWptMlhvdXZoU2ROM29Rd0NnWUlLb1pJemowRUF3SXcKRlRFVE1CRUdBMVVFQXd3S2EzVmla",
        "WEp1WlhSbGN6QWdGdzB5TmpFeE1qY3hNakV6TURGYUdBOHlNVEkyTVRFdwpNekV5TVRNd01Wb3dG",
        "VEVUTUJFR0ExVUVBd3dLYTNWaVpYSnVaWFJsY3pCWk1CTUdCeXFHU000OUFnRUdDQ3FHClNNNDlB",
        "d0VIQTBJQUJDTW5lc3dOSHQzdWVybFJ4d0s5MnpwOWZsbG9nODdkT1FQbmFrVnpYbkdTK2dPTjQ5",
        "KzcKMzBERjdYUHl3YkhCS2oxU1pOZTcyUVJlSnpVa1hSb3lVTEdqVXpCUk1CMEdBMVVkRGdRV0JC",
        "UStXQ1ZycVZwYwp0a2FzWlpYbmJycTR4bG5zQVRBZkJnTlZIU01FR0RBV2dCUStXQ1ZycVZwY3Rr",
        "YXNaWlhuYnJxNHhsbnNBVEFQCkJnTlZIUk1CQWY4RUJUQURBUUgvTUFvR0NDcUdTTTQ5QkFNQ0Ew",
        "Z0FNRVVDSVFDUm5LMlhHN0hiL05lVFMxWUwKZU1NV1NJa2EvbFlvSDR1a0UwOEdvMEFuOUFJZ0x3",
        "U0U0dXgzQy93R1Zodng0Ri90ak5RR0RWbkhLM3FuT1puNwphRmNXL0RVPQotLS0tLUVORCBDRVJU",
        "SUZJQ0FURS0tLS0tCg==",
    );

    fn token_access(url: &str, ca: Option<&str>) -> KubernetesConfig {
        KubernetesConfig::new(ClusterAccess::Token {
            url: url.into(),
            token: BearerToken::new("tok-s3cret"),
            certificate_authority_data: ca.map(str::to_owned),
        })
    }

    #[test]
    fn token_mode_deserializes_and_never_shows_the_token() {
        let c: KubernetesConfig = toml_like(
            r#"{"access": {"mode": "token", "url": "https://k8s.example:443", "token": "tok-s3cret",
                "certificate_authority_data": "LS0t"}}"#,
        );
        match &c.access {
            ClusterAccess::Token {
                url,
                token,
                certificate_authority_data,
            } => {
                assert_eq!(url, "https://k8s.example:443");
                assert_eq!(token.expose(), "tok-s3cret");
                assert_eq!(certificate_authority_data.as_deref(), Some("LS0t"));
            }
            other => panic!("{other:?}"),
        }
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("tok-s3cret") && debug.contains("***"),
            "{debug}"
        );
        // The CA is optional; the token is not.
        let c: KubernetesConfig =
            toml_like(r#"{"access": {"mode": "token", "url": "https://k", "token": "t"}}"#);
        assert!(matches!(
            c.access,
            ClusterAccess::Token {
                certificate_authority_data: None,
                ..
            }
        ));
        let missing = serde_json::from_str::<KubernetesConfig>(
            r#"{"access": {"mode": "token", "url": "https://k"}}"#,
        );
        assert!(missing.unwrap_err().to_string().contains("token"));
    }

    #[tokio::test]
    async fn token_mode_builds_a_client_over_https_with_a_ca_bundle() {
        token_access("https://abc.gr7.eu-west-1.eks.amazonaws.com", Some(CA_DATA))
            .client()
            .await
            .expect("https with a CA bundle");
        token_access("https://k8s.example:6443", None)
            .client()
            .await
            .expect("https with the system trust store");
        // Plain http only to a loopback host (kubectl proxy, the test server).
        for url in [
            "http://127.0.0.1:8001",
            "http://localhost:8001",
            "http://[::1]:8001",
        ] {
            token_access(url, None).client().await.expect(url);
        }
    }

    #[tokio::test]
    async fn token_mode_refuses_what_would_leak_or_cannot_verify() {
        let cases = [
            ("http://k8s.example:8080", None, "only over https"),
            ("http://10.0.0.1", None, "only over https"),
            ("http://127.0.0.1:8001", Some(CA_DATA), "plain http"),
            ("ftp://k8s.example", None, "scheme must be https"),
            ("https://k8s.example", Some("%%not base64%%"), "certificate"),
        ];
        for (url, ca, why) in cases {
            let Err(err) = token_access(url, ca).client().await else {
                panic!("{url} was accepted");
            };
            let msg = err.to_string();
            assert!(msg.to_lowercase().contains(why), "{url}: {msg}");
            assert!(!msg.contains("tok-s3cret"), "{url}: {msg}");
        }
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
