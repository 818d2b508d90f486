//! The Kubernetes plugin: the objects that front a KVX machine (the cluster domain).
//!
//! It reads the historical `[kubernetes]` table (see the `setpoint-kubernetes` crate) and the
//! deployment's environment variables, and provides a `dyn Cluster` for every region (`*`) to
//! the plugins after it; it also registers the adapter's own work kinds
//! (`k8s.apply-instance`, `k8s.delete-instance`).

use std::sync::Arc;

use setpoint_adapter::{BoxFuture, Cluster};
use setpoint_kubernetes::{BearerToken, ClusterAccess, KubernetesCluster, KubernetesConfig};

use crate::config::{ConfigError, section_for};
use crate::plugin::{ConfigContext, Plugin, PluginError, Registrar, Services};

/// The Kubernetes settings: the `[kubernetes]` table refined by the environment.
#[derive(Debug, Default, Clone)]
pub struct KubernetesSettings {
    /// The cluster, if Kubernetes is configured at all.
    pub kubernetes: Option<KubernetesConfig>,
}

impl KubernetesSettings {
    /// The settings of the `[kubernetes]` table `table` (JSON), if any.
    ///
    /// # Errors
    /// Unknown keys (by name) and bad values.
    pub fn from_table(table: Option<&serde_json::Value>) -> Result<Self, ConfigError> {
        let kubernetes = table
            .map(|t| serde_json::from_value::<KubernetesConfig>(t.clone()))
            .transpose()
            .map_err(|e| ConfigError::Invalid(format!("[kubernetes]: {e}")))?;
        Ok(Self { kubernetes })
    }

    /// Applies the Kubernetes environment variables. `SETPOINT_KUBERNETES_URL` replaces
    /// `kubernetes.access`: with `SETPOINT_KUBERNETES_TOKEN` (and optionally
    /// `SETPOINT_KUBERNETES_CA_DATA`) it is token access, without them a plain URL.
    pub fn apply_env(&mut self, get: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let url = get("SETPOINT_KUBERNETES_URL").map(|u| u.trim().to_owned());
        // Secrets stores and `kubectl create token` often end the value with a newline.
        let token = get("SETPOINT_KUBERNETES_TOKEN").map(|t| BearerToken::new(t.trim()));
        let ca = get("SETPOINT_KUBERNETES_CA_DATA")
            .map(|c| ca_data(&c))
            .transpose()?;
        let access = match (url, token, ca) {
            (Some(url), Some(token), ca) => Some(ClusterAccess::Token {
                url,
                token,
                certificate_authority_data: ca,
            }),
            (Some(_), None, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "SETPOINT_KUBERNETES_CA_DATA is set but SETPOINT_KUBERNETES_TOKEN is not: a \
                     CA bundle is used only with token access (set the token, or unset the CA)"
                        .into(),
                ));
            }
            (Some(url), None, None) => Some(ClusterAccess::Url { url }),
            (None, token, ca) if token.is_some() || ca.is_some() => {
                let given = match (token.is_some(), ca.is_some()) {
                    (true, true) => "SETPOINT_KUBERNETES_TOKEN and SETPOINT_KUBERNETES_CA_DATA are",
                    (true, false) => "SETPOINT_KUBERNETES_TOKEN is",
                    _ => "SETPOINT_KUBERNETES_CA_DATA is",
                };
                return Err(ConfigError::Invalid(format!(
                    "{given} set but SETPOINT_KUBERNETES_URL is not: set the Kubernetes API \
                     server URL (e.g. https://ABC.gr7.eu-west-1.eks.amazonaws.com)"
                )));
            }
            (None, _, _) => None,
        };
        if let Some(access) = access {
            match &mut self.kubernetes {
                Some(k) => k.access = access,
                None => self.kubernetes = Some(KubernetesConfig::new(access)),
            }
        }
        if let Some(image) = get("SETPOINT_KUBERNETES_IMAGE") {
            let k = section_for(
                &mut self.kubernetes,
                "SETPOINT_KUBERNETES_IMAGE",
                "Kubernetes",
                "SETPOINT_KUBERNETES_URL or add a [kubernetes] section",
            )?;
            k.image = image.trim().to_owned();
        }
        Ok(())
    }
}

/// `SETPOINT_KUBERNETES_CA_DATA` as the adapter takes it (base64 of the PEM text): accepts that
/// form (what kubeconfig files and EKS give) or the PEM text itself, and checks that it holds at
/// least one certificate.
fn ca_data(value: &str) -> Result<String, ConfigError> {
    use base64::Engine as _;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    let engine = base64::engine::general_purpose::STANDARD;
    let value = value.trim();
    if value.starts_with("-----BEGIN") {
        return if value.contains(BEGIN) {
            Ok(engine.encode(format!("{value}\n")))
        } else {
            Err(ConfigError::Invalid(
                "SETPOINT_KUBERNETES_CA_DATA is PEM but holds no CERTIFICATE block".into(),
            ))
        };
    }
    let compact: String = value.split_whitespace().collect();
    match engine.decode(&compact) {
        Ok(pem) if String::from_utf8_lossy(&pem).contains(BEGIN) => Ok(compact),
        _ => Err(ConfigError::Invalid(
            "SETPOINT_KUBERNETES_CA_DATA must be the cluster's CA bundle: PEM certificates, or \
             base64 of them (kubeconfig's certificate-authority-data, EKS's \
             certificateAuthority.data)"
                .into(),
        )),
    }
}

/// The Kubernetes plugin.
#[derive(Default)]
pub struct KubernetesPlugin {
    settings: KubernetesSettings,
    cluster: Option<Arc<dyn Cluster>>,
}

impl KubernetesPlugin {
    /// The plugin, configured from the file and the environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// The plugin with these settings (a local stack): its configuration step keeps them.
    pub fn with_settings(settings: KubernetesSettings) -> Self {
        Self {
            settings,
            cluster: None,
        }
    }
}

impl Plugin for KubernetesPlugin {
    fn name(&self) -> &str {
        "kubernetes"
    }

    fn legacy_tables(&self) -> &[&'static str] {
        &["kubernetes"]
    }

    fn configure(&mut self, cx: &ConfigContext<'_>) -> Result<(), PluginError> {
        let err = |e: ConfigError| cx.error(e.to_string());
        if self.settings.kubernetes.is_none() {
            let table = cx.legacy("kubernetes").or(cx.table());
            self.settings = KubernetesSettings::from_table(table).map_err(err)?;
        }
        self.settings.apply_env(&|k| cx.env(k)).map_err(err)
    }

    fn provide<'a>(
        &'a mut self,
        services: &'a mut Services,
    ) -> BoxFuture<'a, Result<(), PluginError>> {
        Box::pin(async move {
            let Some(config) = &self.settings.kubernetes else {
                return Ok(());
            };
            let cluster =
                KubernetesCluster::connect(config)
                    .await
                    .map_err(|e| PluginError::Start {
                        plugin: "kubernetes".into(),
                        message: e.to_string(),
                    })?;
            let cluster: Arc<dyn Cluster> = Arc::new(cluster);
            services.provide::<dyn Cluster>("*", cluster.clone());
            self.cluster = Some(cluster);
            Ok(())
        })
    }

    fn register(&self, _services: &Services, r: &mut Registrar) -> Result<(), PluginError> {
        if let Some(cluster) = &self.cluster {
            r.handler(setpoint_adapter::typed(
                setpoint_kubernetes::handlers::ApplyInstance::new(cluster.clone()),
            ))?;
            r.handler(setpoint_adapter::typed(
                setpoint_kubernetes::handlers::DeleteInstance::new(cluster.clone()),
            ))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned().filter(|v| !v.trim().is_empty())
    }

    fn b64(text: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    /// The settings of the `[kubernetes]` table of configuration file `text`.
    fn settings(text: &str) -> KubernetesSettings {
        let file: toml::Table = toml::from_str(text).expect("toml");
        let table = file
            .get("kubernetes")
            .map(|t| serde_json::to_value(t).expect("json"));
        KubernetesSettings::from_table(table.as_ref()).expect("settings")
    }

    /// A self-signed CA certificate (public; its key was thrown away).
    const CA_PEM: &str = concat!(
        "-----BEGIN CERTIFICATE-----\n",
        "MIIBgTCCASegAwIBAgIUahtTjEBKVcp4Yjm2XouvhSdN3oQwCgYIKoZIzj0EAwIw\n",
        "FTETMBEGA1UEAwwKa3ViZXJuZXRlczAgFw0yNjExMjcxMjEzMDFaGA8yMTI2MTEw\n",
        "MzEyMTMwMVowFTETMBEGA1UEAwwKa3ViZXJuZXRlczBZMBMGByqGSM49AgEGCCqG\n",
        "SM49AwEHA0IABCMneswNHt3uerlRxwK92zp9fllog87dOQPnakVzXnGS+gON49+7\n",
        "30DF7XPywbHBKj1SZNe72QReJzUkXRoyULGjUzBRMB0GA1UdDgQWBBQ+WCVrqVpc\n",
        "tkasZZXnbrq4xlnsATAfBgNVHSMEGDAWgBQ+WCVrqVpctkasZZXnbrq4xlnsATAP\n",
        "BgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQCRnK2XG7Hb/NeTS1YL\n",
        "eMMWSIka/lYoH4ukE08Go0An9AIgLwSE4ux3C/wGVhvx4F/tjNQGDVnHK3qnOZn7\n",
        "aFcW/DU=\n",
        "-----END CERTIFICATE-----\n",
    );

    #[test]
    fn kubernetes_token_access_from_the_environment() {
        let url = "https://ABC.gr7.eu-west-1.eks.amazonaws.com";
        let mut f = KubernetesSettings::default();
        f.apply_env(&vars(&[
            ("SETPOINT_KUBERNETES_URL", url),
            ("SETPOINT_KUBERNETES_TOKEN", "eyJhbGciOi.s3cret-token\n"),
            ("SETPOINT_KUBERNETES_CA_DATA", &b64(CA_PEM)),
            (
                "SETPOINT_KUBERNETES_IMAGE",
                "registry.example.com/kvx-proxy:1.4",
            ),
        ]))
        .expect("env");
        let k = f
            .kubernetes
            .as_ref()
            .expect("[kubernetes] made from the environment");
        let ClusterAccess::Token {
            url: got_url,
            token,
            certificate_authority_data,
        } = &k.access
        else {
            panic!("{:?}", k.access)
        };
        assert_eq!(got_url, url);
        assert_eq!(token.expose(), "eyJhbGciOi.s3cret-token", "trimmed");
        assert_eq!(
            certificate_authority_data.as_deref(),
            Some(b64(CA_PEM).as_str())
        );
        assert_eq!(k.image, "registry.example.com/kvx-proxy:1.4");
        let debug = format!("{f:?}");
        assert!(!debug.contains("s3cret-token"), "{debug}");

        // The PEM text itself is accepted and handed on as base64, as is base64 with line breaks.
        for ca in [CA_PEM.to_owned(), b64(CA_PEM).replace('A', "A\n")] {
            let mut f = KubernetesSettings::default();
            f.apply_env(&vars(&[
                ("SETPOINT_KUBERNETES_URL", url),
                ("SETPOINT_KUBERNETES_TOKEN", "t"),
                ("SETPOINT_KUBERNETES_CA_DATA", &ca),
            ]))
            .expect("env");
            let Some(ClusterAccess::Token {
                certificate_authority_data: Some(data),
                ..
            }) = f.kubernetes.map(|k| k.access)
            else {
                panic!("token access")
            };
            use base64::Engine as _;
            let pem = base64::engine::general_purpose::STANDARD
                .decode(&data)
                .expect("base64");
            assert_eq!(String::from_utf8(pem).expect("utf-8").trim(), CA_PEM.trim());
        }

        // Over a file: the URL replaces the access, the file's other settings stay.
        let mut f = settings(
            "[kubernetes]\naccess = { mode = \"in-cluster\" }\nimage = \"file/image:1\"\nport = 9000\n",
        );
        f.apply_env(&vars(&[(
            "SETPOINT_KUBERNETES_URL",
            "http://127.0.0.1:8001",
        )]))
        .expect("env");
        let k = f.kubernetes.expect("kubernetes");
        assert_eq!(
            k.access,
            ClusterAccess::Url {
                url: "http://127.0.0.1:8001".into()
            }
        );
        assert_eq!((k.image.as_str(), k.port), ("file/image:1", 9000));

        // Nothing set: nothing made.
        let mut f = KubernetesSettings::default();
        f.apply_env(&vars(&[])).expect("env");
        assert!(f.kubernetes.is_none());
    }

    #[test]
    fn partial_kubernetes_settings_are_refused_clearly_without_the_token() {
        let token = "s3cret-token";
        let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
            (
                vec![("SETPOINT_KUBERNETES_TOKEN", token.into())],
                "SETPOINT_KUBERNETES_TOKEN is set but SETPOINT_KUBERNETES_URL is not",
            ),
            (
                vec![("SETPOINT_KUBERNETES_CA_DATA", b64(CA_PEM))],
                "SETPOINT_KUBERNETES_CA_DATA is set but SETPOINT_KUBERNETES_URL is not",
            ),
            (
                vec![
                    ("SETPOINT_KUBERNETES_TOKEN", token.into()),
                    ("SETPOINT_KUBERNETES_CA_DATA", b64(CA_PEM)),
                ],
                "SETPOINT_KUBERNETES_TOKEN and SETPOINT_KUBERNETES_CA_DATA are set but \
                 SETPOINT_KUBERNETES_URL is not",
            ),
            (
                vec![
                    ("SETPOINT_KUBERNETES_URL", "https://k8s.example".into()),
                    ("SETPOINT_KUBERNETES_CA_DATA", b64(CA_PEM)),
                ],
                "SETPOINT_KUBERNETES_TOKEN is not",
            ),
            (
                vec![
                    ("SETPOINT_KUBERNETES_URL", "https://k8s.example".into()),
                    ("SETPOINT_KUBERNETES_TOKEN", token.into()),
                    ("SETPOINT_KUBERNETES_CA_DATA", "not a certificate".into()),
                ],
                "SETPOINT_KUBERNETES_CA_DATA must be the cluster's CA bundle",
            ),
            (
                vec![
                    ("SETPOINT_KUBERNETES_URL", "https://k8s.example".into()),
                    ("SETPOINT_KUBERNETES_TOKEN", token.into()),
                    ("SETPOINT_KUBERNETES_CA_DATA", b64("hello")),
                ],
                "SETPOINT_KUBERNETES_CA_DATA must be the cluster's CA bundle",
            ),
            (
                vec![
                    ("SETPOINT_KUBERNETES_URL", "https://k8s.example".into()),
                    ("SETPOINT_KUBERNETES_TOKEN", token.into()),
                    (
                        "SETPOINT_KUBERNETES_CA_DATA",
                        "-----BEGIN PRIVATE KEY-----".into(),
                    ),
                ],
                "holds no CERTIFICATE block",
            ),
            (
                vec![("SETPOINT_KUBERNETES_IMAGE", "kvx:1".into())],
                "SETPOINT_KUBERNETES_IMAGE is set but Kubernetes is not configured",
            ),
        ];
        for (pairs, want) in cases {
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut f = KubernetesSettings::default();
            let err = f.apply_env(&vars(&pairs)).expect_err(want).to_string();
            assert!(err.contains(want), "{pairs:?}: {err}");
            assert!(!err.contains(token), "{err}");
        }
    }
}
