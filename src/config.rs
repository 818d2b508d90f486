//! Configuration: defaults, then an optional TOML file, then environment variables, then
//! flags — each overriding the one before. Durations are written `250ms`, `30s`, `5m`, `1h`
//! (a bare number means seconds).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use setpoint_ec2::Ec2Config;
use setpoint_email::{Password, Security, SmtpConfig};
use setpoint_kubernetes::KubernetesConfig;

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

/// A duration as written in configuration (`250ms`, `30s`, `5m`, `1h`, or seconds).
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
        .map_err(|_| format!("{text:?} is not a duration (write e.g. 250ms, 30s, 5m, 1h)"))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "{text:?} has an unknown unit {other:?} (use ms, s, m or h)"
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
    /// The EC2 adapter. With `[kubernetes]` and `[smtp]` it turns on the KVX workflows.
    pub ec2: Option<Ec2Config>,
    /// The Kubernetes adapter.
    pub kubernetes: Option<KubernetesConfig>,
    /// The SMTP adapter.
    pub smtp: Option<SmtpConfig>,
    /// Workflow settings (resync, drift).
    #[serde(default)]
    pub workflows: WorkflowsFile,
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

    /// Applies the environment variables a deployment passes (see the README): `SETPOINT_AWS_REGION`
    /// (sets `ec2.region`, creating `[ec2]` when absent), `SETPOINT_EC2_SUBNET_ID` and
    /// `SETPOINT_EC2_SECURITY_GROUP_IDS` (comma lists), `SETPOINT_SMTP_URL` (host, port,
    /// security and AUTH of `[smtp]`, creating it when absent) and `SETPOINT_EMAIL_FROM`
    /// (`smtp.from`). Empty values count as unset. `get` reads one variable.
    ///
    /// # Errors
    /// When a value is malformed or refines a section that does not exist. The messages never
    /// contain the SMTP password.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let list = |v: String| -> Vec<String> {
            v.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        if let Some(region) = get("SETPOINT_AWS_REGION") {
            match &mut self.ec2 {
                Some(ec2) => ec2.region = region.trim().to_owned(),
                None => self.ec2 = Some(Ec2Config::new(region.trim())),
            }
        }
        for (var, subnets) in [
            ("SETPOINT_EC2_SUBNET_ID", true),
            ("SETPOINT_EC2_SECURITY_GROUP_IDS", false),
        ] {
            let Some(value) = get(var) else { continue };
            let ec2 = self.ec2.as_mut().ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "{var} is set but EC2 is not configured: set SETPOINT_AWS_REGION or add an \
                     [ec2] section"
                ))
            })?;
            if subnets {
                ec2.subnet_ids = list(value);
            } else {
                ec2.security_group_ids = list(value);
            }
        }
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
        }
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
