//! Configuration: defaults, then an optional TOML file, then environment variables, then
//! flags — each overriding the one before. Durations are written `250ms`, `30s`, `5m`, `1h`,
//! `7d` (a bare number means seconds).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use setpoint_ec2::{Ec2Config, Ec2Regions};
use setpoint_email::{Password, Security, SmtpConfig};
use setpoint_kubernetes::{BearerToken, ClusterAccess, KubernetesConfig};

use crate::maintenance::retention::{RetentionConfig, RetentionError};
use crate::worker::{Backoff, WorkerConfig};
use crate::workflows::{DriftAction, WorkflowConfig};

/// A configuration problem, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for setpoint.
    #[error("the configuration file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A duration as written in configuration (`250ms`, `30s`, `5m`, `1h`, `7d`, or seconds).
///
/// # Errors
/// When the text is not a number with one of those units.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (write e.g. 250ms, 30s, 5m, 1h, 7d)"))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => {
            return Err(format!(
                "{text:?} has an unknown unit {other:?} (use ms, s, m, h or d)"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{text:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| parse_duration(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// A duration, or `"off"` (case does not matter), as the `[retention]` periods are written.
/// `None` is off.
///
/// # Errors
/// When the text is neither `off` nor a duration.
pub fn parse_duration_or_off(text: &str) -> Result<Option<Duration>, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    parse_duration(text)
        .map(Some)
        .map_err(|e| format!("{e}, or \"off\""))
}

/// A key that may be a duration or `"off"`: `None` when the key is absent, `Some(None)` when
/// it is `off`.
fn de_duration_or_off<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<Duration>>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| parse_duration_or_off(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// The `[worker]` table of the configuration file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerFile {
    /// Units run at once by one process.
    pub concurrency: Option<usize>,
    /// Most units claimed per statement.
    pub claim_batch: Option<usize>,
    /// Most units completed per transaction.
    pub completion_batch: Option<usize>,
    /// Lease length.
    #[serde(default, deserialize_with = "de_duration")]
    pub lease: Option<Duration>,
    /// Heartbeat interval.
    #[serde(default, deserialize_with = "de_duration")]
    pub heartbeat_interval: Option<Duration>,
    /// Poll interval.
    #[serde(default, deserialize_with = "de_duration")]
    pub poll_interval: Option<Duration>,
    /// Shutdown grace.
    #[serde(default, deserialize_with = "de_duration")]
    pub shutdown_grace: Option<Duration>,
    /// Longest attempt.
    #[serde(default, deserialize_with = "de_duration")]
    pub max_runtime: Option<Duration>,
    /// First retry delay scale.
    #[serde(default, deserialize_with = "de_duration")]
    pub backoff_base: Option<Duration>,
    /// Longest retry delay.
    #[serde(default, deserialize_with = "de_duration")]
    pub backoff_cap: Option<Duration>,
    /// Which registered kinds this engine claims, as glob patterns (default `["*"]`).
    pub kinds: Option<Vec<String>>,
}

/// The `[workflows]` table of the configuration file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowsFile {
    /// Enqueue an observe unit per ready instance this often (drift detection); off when unset.
    #[serde(default, deserialize_with = "de_duration")]
    pub resync_interval: Option<Duration>,
    /// What to do with a machine terminated behind setpoint's back: `heal` (default) or `mark`.
    pub drift: Option<DriftAction>,
    /// How long a create step waits for its machine to run before the unit retries.
    #[serde(default, deserialize_with = "de_duration")]
    pub machine_wait: Option<Duration>,
}

impl WorkflowsFile {
    /// The workflow configuration: defaults overridden by this table.
    pub fn workflow_config(&self) -> WorkflowConfig {
        let d = WorkflowConfig::default();
        WorkflowConfig {
            drift: self.drift.unwrap_or(d.drift),
            machine_wait: self.machine_wait.unwrap_or(d.machine_wait),
        }
    }
}

/// The `[api]` table of the configuration file: the gRPC API of `serve`. Flags and
/// environment variables override each key.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiFile {
    /// Address the API listens on (default `127.0.0.1:50051`).
    pub listen: Option<SocketAddr>,
    /// Server certificate chain (PEM file) for TLS, with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM file) for TLS, with `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// CA (PEM file) that client certificates must chain to (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
    /// Largest request message in bytes.
    pub max_message_bytes: Option<usize>,
    /// Concurrent transactions committing batches of Creates; 0 commits each on its own.
    pub create_batch_executors: Option<usize>,
    /// Most Creates in one batch.
    pub create_batch_max: Option<usize>,
    /// Most calls in progress at once; more are refused with `RESOURCE_EXHAUSTED`.
    pub max_in_flight: Option<usize>,
    /// Longest time to a call's (first) answer; then `DEADLINE_EXCEEDED`.
    #[serde(default, deserialize_with = "de_duration")]
    pub request_timeout: Option<Duration>,
    /// Most open WatchInstance streams per tenant.
    pub max_watches_per_tenant: Option<usize>,
    /// Database lookups of tokens in neither cache, per second (the whole process).
    pub token_lookups_per_second: Option<u32>,
    /// How many such lookups may come at once.
    pub token_lookup_burst: Option<u32>,
    /// How long an unknown token is refused without asking the database again.
    #[serde(default, deserialize_with = "de_duration")]
    pub unknown_token_ttl: Option<Duration>,
    /// Most unknown tokens kept.
    pub unknown_token_cache: Option<usize>,
}

/// The `[retention]` table of the configuration file: what old rows are pruned and how
/// (`docs/retention.md`). Each period is a duration (`7d`, `24h`) or `"off"` (keep for
/// ever); an absent key takes its default. File only: like the other tuning keys, it has no
/// flag or environment variable.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionFile {
    /// How often each engine tries a pruning round (default `1h`); `off` turns retention off
    /// in this engine.
    #[serde(default, deserialize_with = "de_duration_or_off")]
    pub interval: Option<Option<Duration>>,
    /// History of finished units (`work_events`), after their last event (default `7d`).
    #[serde(default, deserialize_with = "de_duration_or_off")]
    pub work_history: Option<Option<Duration>>,
    /// Request ids (`api_requests`): the replay window (default `24h`).
    #[serde(default, deserialize_with = "de_duration_or_off")]
    pub request_ids: Option<Option<Duration>>,
    /// Journal rows of finished units (`side_effects`), after their last change (default `30d`).
    #[serde(default, deserialize_with = "de_duration_or_off")]
    pub journal: Option<Option<Duration>>,
    /// Deleted instances with no unit left (default `30d`).
    #[serde(default, deserialize_with = "de_duration_or_off")]
    pub tombstones: Option<Option<Duration>>,
    /// Most rows one statement reads and deletes (default 2000).
    pub batch: Option<usize>,
    /// Shortest pause between two statements (default `100ms`).
    #[serde(default, deserialize_with = "de_duration")]
    pub pause: Option<Duration>,
}

impl RetentionFile {
    /// The retention configuration: defaults overridden by this table, validated.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when a value is out of range.
    pub fn retention_config(&self) -> Result<RetentionConfig, ConfigError> {
        let d = RetentionConfig::default();
        let c = RetentionConfig {
            interval: self.interval.unwrap_or(d.interval),
            work_history: self.work_history.unwrap_or(d.work_history),
            request_ids: self.request_ids.unwrap_or(d.request_ids),
            journal: self.journal.unwrap_or(d.journal),
            tombstones: self.tombstones.unwrap_or(d.tombstones),
            batch: self.batch.unwrap_or(d.batch),
            pause: self.pause.unwrap_or(d.pause),
        };
        c.validate().map_err(|e| {
            ConfigError::Invalid(match e {
                RetentionError::Config(message) => message,
                other => other.to_string(),
            })
        })?;
        Ok(c)
    }
}

/// The configuration file (`--config` / `SETPOINT_CONFIG`). Every key is optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// PostgreSQL URL.
    pub database_url: Option<String>,
    /// Apply migrations when `serve` starts (default true).
    pub migrate_on_start: Option<bool>,
    /// Register the `setpoint.probe` kind.
    pub enable_probe: Option<bool>,
    /// Largest database pool of one process.
    pub database_max_connections: Option<u32>,
    /// Folder of the embedded PostgreSQL used when no database URL is given.
    pub data_dir: Option<PathBuf>,
    /// Address of `/metrics`, `/healthz` and `/readyz`; off when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Worker settings.
    #[serde(default)]
    pub worker: WorkerFile,
    /// The EC2 adapter: one region (`region` and its settings) or `[ec2.regions.<name>]`
    /// tables. With `[kubernetes]` and `[smtp]` it turns on the KVX workflows.
    pub ec2: Option<Ec2Regions>,
    /// The Kubernetes adapter.
    pub kubernetes: Option<KubernetesConfig>,
    /// The SMTP adapter.
    pub smtp: Option<SmtpConfig>,
    /// Workflow settings (resync, drift).
    #[serde(default)]
    pub workflows: WorkflowsFile,
    /// The gRPC API (listen address, TLS, limits).
    #[serde(default)]
    pub api: ApiFile,
    /// Retention periods and pruning.
    #[serde(default)]
    pub retention: RetentionFile,
}

impl FileConfig {
    /// Reads `path`.
    ///
    /// # Errors
    /// When the file cannot be read or holds unknown keys or bad values.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Applies the environment variables a deployment passes (see the README): the EC2 ones
    /// (see [`FileConfig::apply_ec2_env`]), `SETPOINT_KUBERNETES_URL` with `SETPOINT_KUBERNETES_TOKEN` and
    /// `SETPOINT_KUBERNETES_CA_DATA` (`kubernetes.access`, creating `[kubernetes]` when
    /// absent), `SETPOINT_KUBERNETES_IMAGE` (`kubernetes.image`), `SETPOINT_SMTP_URL` (host,
    /// port, security and AUTH of `[smtp]`, creating it when absent) and `SETPOINT_EMAIL_FROM`
    /// (`smtp.from`). Empty values count as unset. `get` reads one variable.
    ///
    /// # Errors
    /// When a value is malformed, a setting comes without the one it needs, or a value refines
    /// a section that does not exist. The messages never contain the SMTP password or the
    /// Kubernetes token.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        self.apply_ec2_env(&get)?;
        self.apply_kubernetes_env(&get)?;
        let from = get("SETPOINT_EMAIL_FROM");
        if let Some(url) = get("SETPOINT_SMTP_URL") {
            let endpoint = SmtpEndpoint::parse(&url)?;
            let smtp = match self.smtp.take() {
                Some(s) => s,
                None => {
                    let sender = from.clone().ok_or_else(|| {
                        ConfigError::Invalid(
                            "SETPOINT_SMTP_URL is set but there is no sender: set \
                             SETPOINT_EMAIL_FROM or smtp.from"
                                .into(),
                        )
                    })?;
                    SmtpConfig::new(endpoint.host.clone(), sender)
                }
            };
            self.smtp = Some(endpoint.apply(smtp));
        }
        if let (Some(from), Some(smtp)) = (from, self.smtp.as_mut()) {
            smtp.from = from;
        }
        Ok(())
    }

    /// The EC2 part of [`FileConfig::apply_env`].
    ///
    /// - `SETPOINT_AWS_REGION` names the region the variables below refine: it creates `[ec2]`
    ///   when absent, renames the region when exactly one is configured, and otherwise must
    ///   name one of the configured regions.
    /// - `SETPOINT_EC2_REGIONS` adds regions: a JSON object of region tables, the keys of
    ///   `[ec2.regions.<name>]` (`{"us-east-1": {"subnet_ids": ["subnet-0abc"],
    ///   "default_image_id": "ami-0abc"}}`). A region it names replaces the file's region of
    ///   that name; it may not name `SETPOINT_AWS_REGION`'s region (configure that one with the
    ///   variables below).
    /// - `SETPOINT_EC2_SUBNET_ID`, `SETPOINT_EC2_SECURITY_GROUP_IDS` (comma lists),
    ///   `SETPOINT_EC2_IMAGE_ID` (`default_image_id`), `SETPOINT_EC2_PLAN_INSTANCE_TYPES`
    ///   (`plan=type,…`: `plans.<plan>.instance_type`) and `SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID`
    ///   (`data_volume.kms_key_id`) refine `SETPOINT_AWS_REGION`'s region, or the only region.
    fn apply_ec2_env(&mut self, get: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let list = |v: String| -> Vec<String> {
            v.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let home = get("SETPOINT_AWS_REGION").map(|r| r.trim().to_owned());
        if let Some(region) = &home {
            match &mut self.ec2 {
                None => self.ec2 = Some(Ec2Regions::single(Ec2Config::new(region))),
                Some(ec2) if ec2.get(region).is_some() => {}
                Some(ec2) if ec2.regions().len() == 1 => {
                    if let Some(one) = ec2.only_mut() {
                        one.region = region.clone();
                    }
                }
                Some(ec2) => {
                    return Err(ConfigError::Invalid(format!(
                        "SETPOINT_AWS_REGION={region} names none of the regions [ec2] \
                         configures ({}): name one of them, or add [ec2.regions.{region}]",
                        ec2.names().join(", ")
                    )));
                }
            }
        }
        if let Some(tables) = get(EC2_REGIONS) {
            let configs = Ec2Regions::from_json_tables(&tables)
                .map_err(|e| ConfigError::Invalid(format!("{EC2_REGIONS}: {e}")))?;
            for config in configs {
                if home.as_deref() == Some(config.region.as_str()) {
                    return Err(ConfigError::Invalid(format!(
                        "{EC2_REGIONS} names {0}, which SETPOINT_AWS_REGION already names: \
                         configure {0} either with the SETPOINT_EC2_* variables or in \
                         {EC2_REGIONS}, not both",
                        config.region
                    )));
                }
                match &mut self.ec2 {
                    Some(ec2) => {
                        ec2.insert(config);
                    }
                    None => self.ec2 = Some(Ec2Regions::single(config)),
                }
            }
        }
        for (var, subnets) in [
            ("SETPOINT_EC2_SUBNET_ID", true),
            ("SETPOINT_EC2_SECURITY_GROUP_IDS", false),
        ] {
            let Some(value) = get(var) else { continue };
            let ec2 = ec2_region(&mut self.ec2, var, home.as_deref())?;
            if subnets {
                ec2.subnet_ids = list(value);
            } else {
                ec2.security_group_ids = list(value);
            }
        }
        if let Some(image) = get("SETPOINT_EC2_IMAGE_ID") {
            let ec2 = ec2_region(&mut self.ec2, "SETPOINT_EC2_IMAGE_ID", home.as_deref())?;
            ec2.default_image_id = Some(image.trim().to_owned());
        }
        if let Some(pairs) = get(PLAN_TYPES) {
            let ec2 = ec2_region(&mut self.ec2, PLAN_TYPES, home.as_deref())?;
            for (plan, instance_type) in plan_instance_types(&pairs)? {
                ec2.plans.entry(plan).or_default().instance_type = Some(instance_type);
            }
        }
        if let Some(key) = get(KMS_KEY) {
            let ec2 = ec2_region(&mut self.ec2, KMS_KEY, home.as_deref())?;
            ec2.data_volume.kms_key_id = Some(key.trim().to_owned());
        }
        Ok(())
    }

    /// The Kubernetes part of [`FileConfig::apply_env`]. `SETPOINT_KUBERNETES_URL` replaces
    /// `kubernetes.access`: with `SETPOINT_KUBERNETES_TOKEN` (and optionally
    /// `SETPOINT_KUBERNETES_CA_DATA`) it is token access, without them a plain URL.
    fn apply_kubernetes_env(
        &mut self,
        get: &impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
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

    /// The worker configuration: defaults overridden by this file.
    pub fn worker_config(&self) -> WorkerConfig {
        let d = WorkerConfig::default();
        let w = &self.worker;
        let lease = w.lease.unwrap_or(d.lease);
        WorkerConfig {
            concurrency: w.concurrency.unwrap_or(d.concurrency),
            claim_batch: w.claim_batch.unwrap_or(d.claim_batch),
            completion_batch: w.completion_batch.unwrap_or(d.completion_batch),
            lease,
            // Renew three times per lease unless told otherwise.
            heartbeat_interval: w.heartbeat_interval.unwrap_or(lease / 3),
            poll_interval: w.poll_interval.unwrap_or(d.poll_interval),
            shutdown_grace: w.shutdown_grace.unwrap_or(d.shutdown_grace),
            max_runtime: w.max_runtime.unwrap_or(d.max_runtime),
            backoff: Backoff {
                base: w.backoff_base.unwrap_or(d.backoff.base),
                cap: w.backoff_cap.unwrap_or(d.backoff.cap),
            },
            worker_id: None,
            kinds: w.kinds.clone().unwrap_or(d.kinds),
        }
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

/// An SMTP relay as given by `SETPOINT_SMTP_URL`:
/// `smtp://[user[:password]@]host[:port][?security=none|starttls|tls]` (default STARTTLS) or
/// `smtps://…` (TLS from the first byte). User and password are percent-decoded. `Debug` and
/// every error leave the password out.
#[derive(Debug, Clone)]
pub struct SmtpEndpoint {
    /// Host name or IP address.
    pub host: String,
    /// Port; `None` for the security's usual port.
    pub port: Option<u16>,
    /// How the connection is secured.
    pub security: Security,
    /// The AUTH user.
    pub username: Option<String>,
    /// The AUTH password.
    pub password: Option<Password>,
}

impl SmtpEndpoint {
    /// Parses an SMTP URL.
    ///
    /// # Errors
    /// When it is not of the form above. The message never contains the password.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| {
            ConfigError::Invalid(format!(
                "SETPOINT_SMTP_URL is not smtp://[user[:password]@]host[:port] or \
                 smtps://…: {why}"
            ))
        };
        let (scheme, rest) = url
            .trim()
            .split_once("://")
            .ok_or_else(|| bad("no scheme"))?;
        let mut security = match scheme.to_ascii_lowercase().as_str() {
            "smtp" => Security::Starttls,
            "smtps" => Security::Tls,
            _ => return Err(bad("the scheme must be smtp or smtps")),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pass) = match u.split_once(':') {
                    Some((user, pass)) => (user, Some(pass)),
                    None => (u, None),
                };
                let user = percent_decode(user).ok_or_else(|| bad("bad escape in the user"))?;
                let pass = pass
                    .map(|p| percent_decode(p).ok_or_else(|| bad("bad escape in the password")))
                    .transpose()?;
                if user.is_empty() {
                    return Err(bad("empty user"));
                }
                (Some(user), pass.map(Password::new))
            }
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in host"))?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad("no host"));
        }
        let port = port
            .map(|p| {
                p.parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))
            })
            .transpose()?;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("security", v)) => {
                    security = match v {
                        "none" => Security::None,
                        "starttls" => Security::Starttls,
                        "tls" => Security::Tls,
                        _ => return Err(bad("security must be none, starttls or tls")),
                    }
                }
                _ => return Err(bad("the only query parameter is security")),
            }
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            security,
            username,
            password,
        })
    }

    /// `config` with this relay's host, port, security and AUTH.
    pub fn apply(self, mut config: SmtpConfig) -> SmtpConfig {
        config.host = self.host;
        config.port = self.port;
        config.security = self.security;
        config.username = self.username;
        config.password = self.password;
        config
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Builds a PostgreSQL URL from its parts (`SETPOINT_DATABASE_HOST`, `_PORT`, `_NAME`, `_USER`,
/// `_PASSWORD`), as a deployment that keeps the password in a secret store passes them.
/// Returns `None` when no host is set.
pub fn database_url_from_parts(get: impl Fn(&str) -> Option<String>) -> Option<String> {
    let host = get("SETPOINT_DATABASE_HOST")?;
    let port = get("SETPOINT_DATABASE_PORT").unwrap_or_else(|| "5432".into());
    let name = get("SETPOINT_DATABASE_NAME").unwrap_or_else(|| "setpoint".into());
    let user = get("SETPOINT_DATABASE_USER").unwrap_or_else(|| "setpoint".into());
    let auth = match get("SETPOINT_DATABASE_PASSWORD") {
        Some(p) => format!("{}:{}", encode(&user), encode(&p)),
        None => encode(&user),
    };
    let sslmode = get("SETPOINT_DATABASE_SSLMODE").unwrap_or_else(|| "prefer".into());
    Some(format!(
        "postgres://{auth}@{host}:{port}/{}?sslmode={sslmode}",
        encode(&name)
    ))
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A database URL with its password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// How an environment variable that refines the EC2 section says to configure it.
const EC2_HOW: &str = "SETPOINT_AWS_REGION or add an [ec2] section";

/// The variable that sets `ec2.plans.<plan>.instance_type` of several plans at once.
const PLAN_TYPES: &str = "SETPOINT_EC2_PLAN_INSTANCE_TYPES";

/// The variable that adds EC2 regions (a JSON object of region tables).
const EC2_REGIONS: &str = "SETPOINT_EC2_REGIONS";

/// The variable that sets the KMS key of the data volumes (`data_volume.kms_key_id`).
const KMS_KEY: &str = "SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID";

/// The EC2 region the variable `var` refines: `home` (`SETPOINT_AWS_REGION`), else the only
/// configured region; an error saying how to configure it otherwise.
fn ec2_region<'a>(
    ec2: &'a mut Option<Ec2Regions>,
    var: &str,
    home: Option<&str>,
) -> Result<&'a mut Ec2Config, ConfigError> {
    let regions = section_for(ec2, var, "EC2", EC2_HOW)?;
    let names = regions.names().join(", ");
    let found = match home {
        Some(h) => regions.get_mut(h),
        None => regions.only_mut(),
    };
    found.ok_or_else(|| {
        ConfigError::Invalid(format!(
            "{var} is set but [ec2] configures several regions ({names}): set \
             SETPOINT_AWS_REGION to the one it is for"
        ))
    })
}

/// Parses `plan=type,plan=type` (spaces and empty items ignored).
fn plan_instance_types(value: &str) -> Result<Vec<(String, String)>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once('=') {
            Some((plan, ty)) if !plan.trim().is_empty() && !ty.trim().is_empty() => {
                Ok((plan.trim().to_owned(), ty.trim().to_owned()))
            }
            _ => Err(ConfigError::Invalid(format!(
                "{PLAN_TYPES}: {item:?} is not plan=instance-type \
                 (e.g. kvx.small=t3.small,kvx.large=m6i.large)"
            ))),
        })
        .collect()
}

/// The configuration section (`what`) that the variable `var` refines; an error saying how to
/// configure it when it is missing.
fn section_for<'a, T>(
    section: &'a mut Option<T>,
    var: &str,
    what: &str,
    how: &str,
) -> Result<&'a mut T, ConfigError> {
    section.as_mut().ok_or_else(|| {
        ConfigError::Invalid(format!(
            "{var} is set but {what} is not configured: set {how}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(parse_duration_or_off("OFF").unwrap(), None);
        assert_eq!(
            parse_duration_or_off("24h").unwrap(),
            Some(Duration::from_secs(86_400))
        );
        assert!(parse_duration_or_off("never").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn file_overrides_defaults() {
        let f: FileConfig = toml::from_str("[worker]\nconcurrency = 7\nlease = \"9s\"\n").unwrap();
        let w = f.worker_config();
        assert_eq!(w.concurrency, 7);
        assert_eq!(w.lease, Duration::from_secs(9));
        assert_eq!(w.heartbeat_interval, Duration::from_secs(3));
        let bad = toml::from_str::<FileConfig>("[worker]\nconcurency = 7\n");
        assert!(bad.unwrap_err().to_string().contains("concurency"));
    }

    #[test]
    fn retention_table_overrides_defaults_and_turns_periods_off() {
        let f: FileConfig = toml::from_str(
            "[retention]\nwork_history = \"3d\"\nrequest_ids = \"off\"\nbatch = 500\n",
        )
        .unwrap();
        let r = f.retention.retention_config().unwrap();
        assert_eq!(r.work_history, Some(Duration::from_secs(3 * 86_400)));
        assert_eq!(r.request_ids, None, "off");
        assert_eq!(r.batch, 500);
        let d = RetentionConfig::default();
        assert_eq!(
            (r.journal, r.tombstones, r.interval),
            (d.journal, d.tombstones, d.interval)
        );
        assert_eq!(
            FileConfig::default().retention.retention_config().unwrap(),
            d,
            "no [retention]: the defaults"
        );

        for (toml_text, want) in [
            (
                "[retention]\nrequest_ids = \"10s\"\n",
                "retention.request_ids",
            ),
            ("[retention]\nbatch = 0\n", "retention.batch"),
            ("[retention]\ninterval = \"0s\"\n", "retention.interval"),
        ] {
            let f: FileConfig = toml::from_str(toml_text).unwrap();
            let err = f.retention.retention_config().unwrap_err().to_string();
            assert!(err.contains(want), "{toml_text}: {err}");
        }
        let bad = toml::from_str::<FileConfig>("[retention]\njournal = \"forever\"\n");
        assert!(bad.unwrap_err().to_string().contains("off"));
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

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn b64(text: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn kubernetes_token_access_from_the_environment() {
        let url = "https://ABC.gr7.eu-west-1.eks.amazonaws.com";
        let mut f = FileConfig::default();
        f.apply_env(vars(&[
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
            let mut f = FileConfig::default();
            f.apply_env(vars(&[
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
        let mut f: FileConfig = toml::from_str(
            "[kubernetes]\naccess = { mode = \"in-cluster\" }\nimage = \"file/image:1\"\nport = 9000\n",
        )
        .expect("file");
        f.apply_env(vars(&[(
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
        let mut f = FileConfig::default();
        f.apply_env(vars(&[])).expect("env");
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
            (
                vec![("SETPOINT_EC2_IMAGE_ID", "ami-1".into())],
                "SETPOINT_EC2_IMAGE_ID is set but EC2 is not configured",
            ),
        ];
        for (pairs, want) in cases {
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut f = FileConfig::default();
            let err = f.apply_env(vars(&pairs)).expect_err(want).to_string();
            assert!(err.contains(want), "{pairs:?}: {err}");
            assert!(!err.contains(token), "{err}");
        }
    }

    #[test]
    fn ec2_image_from_the_environment() {
        let mut f = FileConfig::default();
        f.apply_env(vars(&[
            ("SETPOINT_AWS_REGION", "eu-west-1"),
            ("SETPOINT_EC2_IMAGE_ID", " ami-0123456789abcdef0 "),
        ]))
        .expect("env");
        assert_eq!(
            f.ec2
                .expect("ec2")
                .only()
                .expect("one region")
                .default_image_id
                .as_deref(),
            Some("ami-0123456789abcdef0")
        );
    }

    /// Regions from the environment: SETPOINT_EC2_REGIONS adds regions (JSON region tables),
    /// SETPOINT_AWS_REGION names the one the single-region variables refine.
    #[test]
    fn ec2_regions_from_the_environment() {
        let extra = r#"{"us-east-1": {"subnet_ids": ["subnet-east"],
            "security_group_ids": ["sg-east"], "default_image_id": "ami-east",
            "plans": {"kvx.small": {"instance_type": "t3.small"}},
            "data_volume": {"kms_key_id": "arn:aws:kms:us-east-1:123456789012:key/east"}}}"#;
        let mut f = FileConfig::default();
        f.apply_env(vars(&[
            ("SETPOINT_AWS_REGION", "eu-west-1"),
            ("SETPOINT_EC2_SUBNET_ID", "subnet-west"),
            ("SETPOINT_EC2_IMAGE_ID", "ami-west"),
            ("SETPOINT_EC2_PLAN_INSTANCE_TYPES", "kvx.small=t3.small"),
            (
                "SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID",
                "arn:aws:kms:eu-west-1:123456789012:key/west",
            ),
            ("SETPOINT_EC2_REGIONS", extra),
        ]))
        .expect("env");
        let ec2 = f.ec2.expect("ec2");
        assert_eq!(ec2.names(), ["eu-west-1", "us-east-1"]);
        let west = ec2.get("eu-west-1").expect("home region");
        assert_eq!(west.subnet_ids, ["subnet-west"]);
        assert_eq!(west.default_image_id.as_deref(), Some("ami-west"));
        assert!(
            west.data_volume
                .kms_key_id
                .as_deref()
                .unwrap()
                .ends_with("key/west")
        );
        let east = ec2.get("us-east-1").expect("added region");
        assert_eq!(
            east.subnet_ids,
            ["subnet-east"],
            "the home variables leave it alone"
        );
        assert_eq!(east.security_group_ids, ["sg-east"]);
        assert_eq!(
            east.plans["kvx.small"].instance_type.as_deref(),
            Some("t3.small")
        );
        assert!(
            east.data_volume
                .kms_key_id
                .as_deref()
                .unwrap()
                .ends_with("key/east")
        );
        ec2.validate().expect("valid");

        // Over a file with several regions: SETPOINT_AWS_REGION picks the one to refine.
        let file = "[ec2.regions.eu-west-1]\n[ec2.regions.us-west-2]\n";
        let mut f: FileConfig = toml::from_str(file).expect("parse");
        f.apply_env(vars(&[
            ("SETPOINT_AWS_REGION", "us-west-2"),
            ("SETPOINT_EC2_IMAGE_ID", "ami-2"),
        ]))
        .expect("env");
        let ec2 = f.ec2.expect("ec2");
        assert_eq!(
            ec2.get("us-west-2").unwrap().default_image_id.as_deref(),
            Some("ami-2")
        );
        assert_eq!(ec2.get("eu-west-1").unwrap().default_image_id, None);

        for (file, pairs, want) in [
            // Which of several regions a variable refines must be said.
            (
                file,
                vec![("SETPOINT_EC2_IMAGE_ID", "ami-1")],
                "set SETPOINT_AWS_REGION",
            ),
            // A home region that is none of several configured ones.
            (
                file,
                vec![("SETPOINT_AWS_REGION", "ap-south-1")],
                "names none of the regions [ec2] configures (eu-west-1, us-west-2)",
            ),
            // One region configured in two ways.
            (
                "",
                vec![
                    ("SETPOINT_AWS_REGION", "us-east-1"),
                    ("SETPOINT_EC2_REGIONS", extra),
                ],
                "not both",
            ),
            (
                "",
                vec![("SETPOINT_EC2_REGIONS", r#"{"us-east-1": {"subnet": "x"}}"#)],
                "SETPOINT_EC2_REGIONS: ec2.regions.us-east-1: unknown field `subnet`",
            ),
            (
                "",
                vec![("SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID", "k")],
                "SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID is set but EC2 is not configured",
            ),
        ] {
            let mut f: FileConfig = toml::from_str(file).expect("parse");
            let err = f.apply_env(vars(&pairs)).expect_err(want).to_string();
            assert!(err.contains(want), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn url_from_parts_encodes_and_redacts() {
        let env = |k: &str| match k {
            "SETPOINT_DATABASE_HOST" => Some("db.internal".to_string()),
            "SETPOINT_DATABASE_PASSWORD" => Some("p@ss/word".to_string()),
            _ => None,
        };
        let url = database_url_from_parts(env).unwrap();
        assert_eq!(
            url,
            "postgres://setpoint:p%40ss%2Fword@db.internal:5432/setpoint?sslmode=prefer"
        );
        assert_eq!(
            redact_url(&url),
            "postgres://setpoint:***@db.internal:5432/setpoint?sslmode=prefer"
        );
        assert!(database_url_from_parts(|_| None).is_none());
    }
}
