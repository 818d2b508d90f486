//! The Kubernetes plugin: the objects that front a KVX machine (the cluster domain).
//!
//! It reads the historical `[kubernetes]` table (see the `setpoint-kubernetes` crate) and the
//! deployment's environment variables, and provides that cluster for every region (`*`) to the
//! plugins after it. Clusters that front the machines of some regions only are tables of their
//! own, `[kubernetes.clusters.<name>]` (or `[plugins.kubernetes.clusters.<name>]`), each with
//! `regions = [...]` and the keys of `[kubernetes]`; its token may come from an environment
//! variable named by `token_env`, so that no token sits in the file. A region's own cluster
//! wins over the `*` one. It also registers the adapter's own work kinds
//! (`k8s.apply-instance`, `k8s.delete-instance`).

use std::collections::BTreeMap;
use std::sync::Arc;

use setpoint_adapter::{BoxFuture, Cluster};
use setpoint_kubernetes::{BearerToken, ClusterAccess, KubernetesCluster, KubernetesConfig};

use crate::config::{ConfigError, section_for};
use crate::plugin::{ConfigContext, Plugin, PluginError, Registrar, Services};

/// The Kubernetes settings: the `[kubernetes]` table refined by the environment.
#[derive(Debug, Default, Clone)]
pub struct KubernetesSettings {
    /// The cluster of every region without one of its own, if any.
    pub kubernetes: Option<KubernetesConfig>,
    /// Clusters of some regions only, by name.
    pub clusters: BTreeMap<String, RegionalCluster>,
}

/// A cluster that fronts the machines of some regions.
#[derive(Debug, Clone)]
pub struct RegionalCluster {
    /// The regions it serves.
    pub regions: Vec<String>,
    /// How to reach it.
    pub config: KubernetesConfig,
}

impl KubernetesSettings {
    /// The settings of the `[kubernetes]` table `table` (JSON), if any; a `token_env` of a
    /// regional cluster is read from the process's environment.
    ///
    /// # Errors
    /// Unknown keys (by name) and bad values.
    pub fn from_table(table: Option<&serde_json::Value>) -> Result<Self, ConfigError> {
        Self::from_table_with_env(table, &|k| std::env::var(k).ok())
    }

    /// As [`KubernetesSettings::from_table`], with environment variables read by `get`.
    ///
    /// # Errors
    /// Unknown keys (by name), bad values, a region served by two clusters, a `token_env`
    /// that is not set.
    pub fn from_table_with_env(
        table: Option<&serde_json::Value>,
        get: &impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let Some(table) = table else {
            return Ok(Self::default());
        };
        let mut table = table.clone();
        let clusters = table
            .as_object_mut()
            .and_then(|t| t.remove("clusters"))
            .map(|c| regional_clusters(&c, get))
            .transpose()?
            .unwrap_or_default();
        // Only `clusters` in the table: no cluster for every region.
        let only_clusters = table.as_object().is_some_and(serde_json::Map::is_empty);
        let kubernetes = if only_clusters && !clusters.is_empty() {
            None
        } else {
            Some(
                serde_json::from_value::<KubernetesConfig>(table)
                    .map_err(|e| ConfigError::Invalid(format!("[kubernetes]: {e}")))?,
            )
        };
        Ok(Self {
            kubernetes,
            clusters,
        })
    }

    /// Whether any cluster is configured.
    pub fn is_configured(&self) -> bool {
        self.kubernetes.is_some() || !self.clusters.is_empty()
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

/// The `clusters` table: name → `{ regions = [...], token_env = "VAR"?, <[kubernetes] keys> }`.
fn regional_clusters(
    value: &serde_json::Value,
    get: &impl Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, RegionalCluster>, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(format!("[kubernetes.clusters]: {m}"));
    let map = value
        .as_object()
        .ok_or_else(|| invalid("must be a table of clusters by name".into()))?;
    let mut out = BTreeMap::new();
    let mut served: BTreeMap<String, String> = BTreeMap::new();
    for (name, entry) in map {
        let at = |m: &str| invalid(format!("{name}: {m}"));
        let mut entry = entry
            .as_object()
            .cloned()
            .ok_or_else(|| at("must be a table"))?;
        let regions: Vec<String> = entry
            .remove("regions")
            .map(serde_json::from_value)
            .transpose()
            .map_err(|_| at("regions must be a list of region names"))?
            .unwrap_or_default();
        if regions.is_empty() {
            return Err(at(
                "name the regions whose machines it fronts: regions = [\"eu-west-1\"]",
            ));
        }
        for region in &regions {
            if !crate::names::is_region_name(region) {
                return Err(at(&format!("{region:?} is not a region name")));
            }
            if let Some(other) = served.insert(region.clone(), name.clone()) {
                return Err(at(&format!(
                    "region {region} is served by cluster {other} already: one cluster per region"
                )));
            }
        }
        if let Some(var) = entry.remove("token_env") {
            let var = var
                .as_str()
                .ok_or_else(|| at("token_env must name an environment variable"))?
                .to_owned();
            let token = get(&var)
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    at(&format!(
                        "token_env names {var}, which is not set in the environment"
                    ))
                })?;
            let access = entry
                .get_mut("access")
                .and_then(serde_json::Value::as_object_mut)
                .ok_or_else(|| at("token_env needs an access table with mode = \"token\""))?;
            access.insert("token".into(), serde_json::Value::String(token));
        }
        let config: KubernetesConfig = serde_json::from_value(serde_json::Value::Object(entry))
            .map_err(|e| {
                // serde's message names the key; a token never appears in it.
                at(&e.to_string())
            })?;
        out.insert(name.clone(), RegionalCluster { regions, config });
    }
    Ok(out)
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
    /// The cluster the adapter's own work kinds use: the `*` one, else the first regional.
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
        if !self.settings.is_configured() {
            let table = cx.legacy("kubernetes").or(cx.table());
            self.settings =
                KubernetesSettings::from_table_with_env(table, &|k| cx.env(k)).map_err(err)?;
        }
        self.settings.apply_env(&|k| cx.env(k)).map_err(err)
    }

    fn provide<'a>(
        &'a mut self,
        services: &'a mut Services,
    ) -> BoxFuture<'a, Result<(), PluginError>> {
        Box::pin(async move {
            // Every engine on the database shares the API servers' budgets (docs/budgets.md).
            let budgets = services.get::<dyn setpoint_adapter::Budgets>(crate::plugin::BUDGETS);
            let connect = |config: &KubernetesConfig| {
                let config = config.clone();
                let budgets = budgets.clone();
                async move {
                    KubernetesCluster::connect(&config)
                        .await
                        .map(|c| match budgets {
                            Some(b) => c.with_budgets(b),
                            None => c,
                        })
                        .map(|c| Arc::new(c) as Arc<dyn Cluster>)
                        .map_err(|e| PluginError::Start {
                            plugin: "kubernetes".into(),
                            message: e.to_string(),
                        })
                }
            };
            if let Some(config) = &self.settings.kubernetes {
                let cluster = connect(config).await?;
                services.provide::<dyn Cluster>("*", cluster.clone());
                self.cluster = Some(cluster);
            }
            for regional in self.settings.clusters.values() {
                let cluster = connect(&regional.config).await?;
                for region in &regional.regions {
                    services.provide::<dyn Cluster>(region, cluster.clone());
                }
                self.cluster.get_or_insert(cluster);
            }
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
    fn clusters_of_some_regions_take_their_tokens_from_the_environment() {
        let text = r#"
[kubernetes]
access = { mode = "url", url = "http://127.0.0.1:8001" }
[kubernetes.clusters.eu]
regions = ["eu-west-1", "eu-central-1"]
token_env = "EU_TOKEN"
image = "eu/kvx:1"
access = { mode = "token", url = "https://eu.example" }
[kubernetes.clusters.us]
regions = ["us-east-1"]
access = { mode = "url", url = "http://127.0.0.1:8002" }
"#;
        let file: toml::Table = toml::from_str(text).expect("toml");
        let table = serde_json::to_value(&file["kubernetes"]).expect("json");
        let env = vars(&[("EU_TOKEN", "s3cret-eu\n")]);
        let s = KubernetesSettings::from_table_with_env(Some(&table), &env).expect("settings");
        assert!(
            s.kubernetes.is_some(),
            "the cluster of every other region stays"
        );
        let eu = &s.clusters["eu"];
        assert_eq!(eu.regions, ["eu-west-1", "eu-central-1"]);
        assert_eq!(eu.config.image, "eu/kvx:1");
        let ClusterAccess::Token { token, url, .. } = &eu.config.access else {
            panic!("{:?}", eu.config.access)
        };
        assert_eq!(
            (token.expose(), url.as_str()),
            ("s3cret-eu", "https://eu.example")
        );
        assert!(!format!("{s:?}").contains("s3cret-eu"));
        assert_eq!(s.clusters["us"].regions, ["us-east-1"]);

        // Only regional clusters: none for every region.
        let only = serde_json::json!({"clusters": {"us": {"regions": ["us-east-1"],
            "access": {"mode": "url", "url": "http://127.0.0.1:8002"}}}});
        let s = KubernetesSettings::from_table_with_env(Some(&only), &env).expect("settings");
        assert!(s.kubernetes.is_none() && s.is_configured());

        for (bad, want) in [
            (
                serde_json::json!({"clusters": {"a": {"regions": ["us-east-1"], "access": {"mode": "url", "url": "http://x"}},
                                                "b": {"regions": ["us-east-1"], "access": {"mode": "url", "url": "http://y"}}}}),
                "served by cluster a already",
            ),
            (
                serde_json::json!({"clusters": {"a": {"access": {"mode": "url", "url": "http://x"}}}}),
                "name the regions",
            ),
            (
                serde_json::json!({"clusters": {"a": {"regions": ["mars"], "access": {"mode": "url", "url": "http://x"}}}}),
                "not a region name",
            ),
            (
                serde_json::json!({"clusters": {"a": {"regions": ["us-east-1"], "token_env": "NOPE",
                                                      "access": {"mode": "token", "url": "https://x"}}}}),
                "NOPE, which is not set",
            ),
            (
                serde_json::json!({"clusters": {"a": {"regions": ["us-east-1"], "colour": 1,
                                                      "access": {"mode": "url", "url": "http://x"}}}}),
                "colour",
            ),
        ] {
            let err = KubernetesSettings::from_table_with_env(Some(&bad), &env)
                .expect_err(want)
                .to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

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
