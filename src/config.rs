//! Configuration: defaults, then an optional TOML file, then environment variables, then
//! flags — each overriding the one before. Durations are written `250ms`, `30s`, `5m`, `1h`,
//! `7d` (a bare number means seconds).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::maintenance::retention::{RetentionConfig, RetentionError};
use crate::worker::{Backoff, WorkerConfig};

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

pub(crate) fn de_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
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
pub(crate) fn de_duration_or_off<'de, D: serde::Deserializer<'de>>(
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
    /// What to do with a machine terminated behind setpoint's back: `heal` (default) or `mark`
    /// (read by the KVX plugin).
    pub drift: Option<String>,
    /// How long a create step waits for its machine to run before the unit retries.
    #[serde(default, deserialize_with = "de_duration")]
    pub machine_wait: Option<Duration>,
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
    /// Most resources of one tenant with a change in flight; one more change is refused with
    /// `RESOURCE_EXHAUSTED` and a retry delay.
    pub max_changes_in_flight_per_tenant: Option<usize>,
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

/// The `[console]` table of the configuration file: the web console (`docs/console.md`). The
/// flags `--console-listen` and `--console-plaintext` (and their environment variables)
/// override its keys.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleFile {
    /// Address of the console; off when unset.
    pub listen: Option<SocketAddr>,
    /// Serve plain HTTP even when the API serves TLS (a load balancer ends TLS in front of it).
    pub plaintext: Option<bool>,
    /// Mark the session cookie `Secure` over plain HTTP too (TLS ends at a load balancer).
    pub secure_cookies: Option<bool>,
    /// A session unused this long ends (default `8h`).
    #[serde(default, deserialize_with = "de_duration")]
    pub idle_timeout: Option<Duration>,
    /// Most sessions at once (default 10000).
    pub max_sessions: Option<usize>,
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
    /// Deleted resources with no unit left (default `30d`).
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
    /// The EC2 plugin's table (one region, or `[ec2.regions.<name>]` tables); read by the
    /// plugin. With `[kubernetes]` and `[smtp]` it turns on the KVX kind.
    pub ec2: Option<toml::Value>,
    /// The Kubernetes plugin's table.
    pub kubernetes: Option<toml::Value>,
    /// The e-mail plugin's table.
    pub smtp: Option<toml::Value>,
    /// The orphan-machine sweep's table (read by the EC2 plugin): how often managed machines
    /// that belong to no resource are looked for, and whether they are terminated.
    pub orphans: Option<toml::Value>,
    /// Each plugin's table, `[plugins.<name>]`; read by the plugin of that name. A table no
    /// compiled-in plugin reads is refused at start-up.
    #[serde(default)]
    pub plugins: std::collections::BTreeMap<String, toml::Value>,
    /// Workflow settings (resync, drift).
    #[serde(default)]
    pub workflows: WorkflowsFile,
    /// The gRPC API (listen address, TLS, limits).
    #[serde(default)]
    pub api: ApiFile,
    /// Retention periods and pruning.
    #[serde(default)]
    pub retention: RetentionFile,
    /// The web console.
    #[serde(default)]
    pub console: ConsoleFile,
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

/// The configuration section (`what`) that the variable `var` refines; an error saying how to
/// configure it when it is missing.
#[cfg_attr(not(any(feature = "ec2", feature = "kubernetes")), allow(dead_code))]
pub(crate) fn section_for<'a, T>(
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
