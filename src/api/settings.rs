//! The API's settings: flags and environment variables of `setpoint serve`, over the `[api]`
//! table of the configuration file, over the defaults.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::batch;
use super::quota;
use super::tls::{TlsConfig, TlsError};
use super::token_cache::{self, TokenLimits};
use crate::config::{ApiFile, parse_duration};

/// Default listen address.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 50051);
/// Default largest request message (bytes); larger ones are refused by tonic with
/// `OUT_OF_RANGE` before any handler runs.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The largest batch one may ask for.
const MAX_BATCH_LIMIT: usize = 65536;
/// Default [`ApiConfig::max_in_flight`]: far above what the database behind one engine can
/// serve at once (the pool has at most 64 connections), so it only cuts a flood short.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// Default [`ApiConfig::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`ApiConfig::max_watches_per_tenant`].
pub const DEFAULT_MAX_WATCHES_PER_TENANT: usize = 100;

/// API settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Kind of the first unit of a Create (a later issue sets `kvx.create`).
    pub create_kind: String,
    /// Kind of the first unit of an Update.
    pub update_kind: String,
    /// Kind of the first unit of a Delete.
    pub delete_kind: String,
    /// Largest request message in bytes.
    pub max_message_bytes: usize,
    /// TLS; `None` serves plaintext.
    pub tls: Option<TlsConfig>,
    /// Concurrent transactions that each commit a batch of Creates (see [`batch`]); 0 runs
    /// every Create in a transaction of its own.
    pub create_batch_executors: usize,
    /// Most Creates in one batch.
    pub create_batch_max: usize,
    /// Most calls in progress at once (Watch streams until their first answer); one more is
    /// refused with `RESOURCE_EXHAUSTED`.
    pub max_in_flight: usize,
    /// Longest time to a call's (first) answer; then `DEADLINE_EXCEEDED`.
    pub request_timeout: Duration,
    /// Most open WatchInstance streams per tenant; one more is refused with
    /// `RESOURCE_EXHAUSTED`.
    pub max_watches_per_tenant: usize,
    /// Most resources of one tenant with a change in flight (see [`super::quota`]); one more
    /// change is refused with `RESOURCE_EXHAUSTED` and a retry delay.
    pub max_changes_in_flight_per_tenant: usize,
    /// The caches and the budget of token lookups.
    pub tokens: TokenLimits,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            create_kind: "setpoint.noop".into(),
            update_kind: "setpoint.noop".into(),
            delete_kind: "setpoint.noop".into(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            tls: None,
            create_batch_executors: batch::DEFAULT_EXECUTORS,
            create_batch_max: batch::DEFAULT_MAX_BATCH,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_watches_per_tenant: DEFAULT_MAX_WATCHES_PER_TENANT,
            max_changes_in_flight_per_tenant: quota::DEFAULT_MAX_CHANGES_IN_FLIGHT,
            tokens: TokenLimits::default(),
        }
    }
}

/// Why the API's settings cannot be used. The messages name flags, variables and file keys,
/// never a secret's value.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The TLS settings.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A value out of its range.
    #[error("{0}")]
    Invalid(String),
}

/// The API flags of `setpoint serve`. Each overrides the same key of the file's `[api]` table.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Address the gRPC API listens on [default: 127.0.0.1:50051].
    #[arg(long, env = "SETPOINT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Server certificate chain (PEM file) for TLS, with its key. The document itself may
    /// come in SETPOINT_TLS_CERT_PEM instead (an environment variable only).
    #[arg(long, env = "SETPOINT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM file) for TLS, with the certificate. The document itself may
    /// come in SETPOINT_TLS_KEY_PEM instead (an environment variable only: a key on a command
    /// line is visible to every user of the machine).
    #[arg(long, env = "SETPOINT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM file) that client certificates must chain to (mutual TLS). The
    /// document itself may come in SETPOINT_TLS_CLIENT_CA_PEM instead.
    #[arg(long, env = "SETPOINT_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Work kind of the first unit of a Create.
    #[arg(long, env = "SETPOINT_CREATE_KIND", default_value = "setpoint.noop")]
    pub create_kind: String,
    /// Work kind of the first unit of an Update.
    #[arg(long, env = "SETPOINT_UPDATE_KIND", default_value = "setpoint.noop")]
    pub update_kind: String,
    /// Work kind of the first unit of a Delete.
    #[arg(long, env = "SETPOINT_DELETE_KIND", default_value = "setpoint.noop")]
    pub delete_kind: String,
    /// Largest request message in bytes [default: 65536].
    #[arg(long, env = "SETPOINT_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Concurrent transactions committing batches of Creates (group commit); 0 commits each
    /// Create on its own [default: 2].
    #[arg(long, env = "SETPOINT_CREATE_BATCH_EXECUTORS")]
    pub create_batch_executors: Option<usize>,
    /// Most Creates committed in one batch, 1 to 65536 [default: 256].
    #[arg(long, env = "SETPOINT_CREATE_BATCH_MAX",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    pub create_batch_max: Option<usize>,
    /// Most calls in progress at once; more are refused with RESOURCE_EXHAUSTED
    /// [default: 1024].
    #[arg(long, env = "SETPOINT_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Longest time to a call's answer (a Watch's first message), e.g. 30s; then
    /// DEADLINE_EXCEEDED [default: 30s].
    #[arg(long, env = "SETPOINT_REQUEST_TIMEOUT", value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,
    /// Most open WatchInstance streams per tenant [default: 100].
    #[arg(long, env = "SETPOINT_MAX_WATCHES_PER_TENANT")]
    pub max_watches_per_tenant: Option<usize>,
    /// Most resources of one tenant with a change (create, update, delete) in progress; one
    /// more change is refused with RESOURCE_EXHAUSTED and a retry delay [default: 1000].
    #[arg(long, env = "SETPOINT_MAX_CHANGES_IN_FLIGHT_PER_TENANT")]
    pub max_changes_in_flight_per_tenant: Option<usize>,
}

/// `value`, unless it lies outside `range`: then an error naming `key` and the range.
fn in_range<T: PartialOrd + std::fmt::Debug>(
    key: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, SettingsError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(SettingsError::Invalid(format!(
            "{key} is {value:?}: it must be between {:?} and {:?}",
            range.start(),
            range.end()
        )))
    }
}

impl ApiArgs {
    /// The address to listen on: the flag, else the file's `api.listen`, else the default.
    pub fn listen(&self, file: &ApiFile) -> SocketAddr {
        self.listen.or(file.listen).unwrap_or(DEFAULT_LISTEN)
    }

    /// The configuration these flags, the process's TLS PEM variables and the file's `[api]`
    /// table describe.
    ///
    /// # Errors
    /// When the TLS settings do not fit together (see [`TlsConfig::resolve`]) or a file value
    /// is out of range.
    pub fn config(&self, file: &ApiFile) -> Result<ApiConfig, SettingsError> {
        self.config_with_env(file, &|k| std::env::var(k).ok())
    }

    /// [`ApiArgs::config`] with the environment read through `get`.
    ///
    /// # Errors
    /// As [`ApiArgs::config`].
    pub fn config_with_env(
        &self,
        file: &ApiFile,
        get: &impl Fn(&str) -> Option<String>,
    ) -> Result<ApiConfig, SettingsError> {
        let create_batch_max = self
            .create_batch_max
            .or(file.create_batch_max)
            .unwrap_or(batch::DEFAULT_MAX_BATCH);
        if !(1..=MAX_BATCH_LIMIT).contains(&create_batch_max) {
            return Err(SettingsError::Invalid(format!(
                "api.create_batch_max is {create_batch_max}: it must be between 1 and \
                 {MAX_BATCH_LIMIT}"
            )));
        }
        let max_message_bytes = self
            .max_message_bytes
            .or(file.max_message_bytes)
            .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        if max_message_bytes < 1024 {
            return Err(SettingsError::Invalid(format!(
                "the largest request message is {max_message_bytes} bytes: it must be at least \
                 1024 (--max-message-bytes, SETPOINT_MAX_MESSAGE_BYTES, api.max_message_bytes)"
            )));
        }
        let max_in_flight = in_range(
            "the in-flight limit (--max-in-flight, SETPOINT_MAX_IN_FLIGHT, api.max_in_flight)",
            self.max_in_flight
                .or(file.max_in_flight)
                .unwrap_or(DEFAULT_MAX_IN_FLIGHT),
            1..=1_000_000,
        )?;
        let request_timeout = in_range(
            "the request timeout (--request-timeout, SETPOINT_REQUEST_TIMEOUT, \
             api.request_timeout)",
            self.request_timeout
                .or(file.request_timeout)
                .unwrap_or(DEFAULT_REQUEST_TIMEOUT),
            Duration::from_millis(100)..=Duration::from_secs(3600),
        )?;
        let max_watches_per_tenant = in_range(
            "the Watch limit (--max-watches-per-tenant, SETPOINT_MAX_WATCHES_PER_TENANT, \
             api.max_watches_per_tenant)",
            self.max_watches_per_tenant
                .or(file.max_watches_per_tenant)
                .unwrap_or(DEFAULT_MAX_WATCHES_PER_TENANT),
            1..=1_000_000,
        )?;
        let max_changes_in_flight_per_tenant = in_range(
            "the quota of changes in flight (--max-changes-in-flight-per-tenant, \
             SETPOINT_MAX_CHANGES_IN_FLIGHT_PER_TENANT, api.max_changes_in_flight_per_tenant)",
            self.max_changes_in_flight_per_tenant
                .or(file.max_changes_in_flight_per_tenant)
                .unwrap_or(quota::DEFAULT_MAX_CHANGES_IN_FLIGHT),
            1..=100_000_000,
        )?;
        let tokens = TokenLimits {
            lookups_per_second: in_range(
                "api.token_lookups_per_second",
                file.token_lookups_per_second
                    .unwrap_or(token_cache::DEFAULT_LOOKUPS_PER_SECOND),
                1..=1_000_000,
            )?,
            lookup_burst: in_range(
                "api.token_lookup_burst",
                file.token_lookup_burst
                    .unwrap_or(token_cache::DEFAULT_LOOKUP_BURST),
                1..=1_000_000,
            )?,
            unknown_ttl: in_range(
                "api.unknown_token_ttl",
                file.unknown_token_ttl
                    .unwrap_or(token_cache::DEFAULT_UNKNOWN_TTL),
                Duration::from_secs(1)..=Duration::from_secs(3600),
            )?,
            unknown_capacity: in_range(
                "api.unknown_token_cache",
                file.unknown_token_cache
                    .unwrap_or(token_cache::DEFAULT_UNKNOWN_CAPACITY),
                1..=10_000_000,
            )?,
            ..TokenLimits::default()
        };
        Ok(ApiConfig {
            max_in_flight,
            request_timeout,
            max_watches_per_tenant,
            max_changes_in_flight_per_tenant,
            tokens,
            create_kind: self.create_kind.clone(),
            update_kind: self.update_kind.clone(),
            delete_kind: self.delete_kind.clone(),
            max_message_bytes,
            create_batch_executors: self
                .create_batch_executors
                .or(file.create_batch_executors)
                .unwrap_or(batch::DEFAULT_EXECUTORS),
            create_batch_max,
            tls: TlsConfig::resolve(
                [
                    (self.tls_cert.clone(), file.tls_cert.clone()),
                    (self.tls_key.clone(), file.tls_key.clone()),
                    (self.tls_client_ca.clone(), file.tls_client_ca.clone()),
                ],
                get,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        api: ApiArgs,
    }

    fn args(flags: &[&str]) -> ApiArgs {
        Cli::try_parse_from(std::iter::once("serve").chain(flags.iter().copied()))
            .expect("flags")
            .api
    }

    fn file(toml: &str) -> ApiFile {
        toml::from_str::<crate::config::FileConfig>(toml)
            .expect("file")
            .api
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn flags_override_the_file_which_overrides_the_defaults() {
        let none = ApiFile::default();
        assert_eq!(args(&[]).listen(&none), DEFAULT_LISTEN);
        let f = file(
            "[api]\nlisten = \"0.0.0.0:6000\"\nmax_message_bytes = 2048\n\
             create_batch_executors = 0\ncreate_batch_max = 16\nmax_in_flight = 64\n\
             request_timeout = \"5s\"\nmax_watches_per_tenant = 3\n\
             max_changes_in_flight_per_tenant = 7\n\
             token_lookups_per_second = 7\ntoken_lookup_burst = 9\n\
             unknown_token_ttl = \"2m\"\nunknown_token_cache = 1000\n",
        );
        assert_eq!(args(&[]).listen(&f).to_string(), "0.0.0.0:6000");
        assert_eq!(
            args(&["--listen", "127.0.0.1:7000"]).listen(&f).to_string(),
            "127.0.0.1:7000"
        );
        let c = args(&[]).config_with_env(&f, &no_env).expect("config");
        assert_eq!(
            (
                c.max_message_bytes,
                c.create_batch_executors,
                c.create_batch_max
            ),
            (2048, 0, 16)
        );
        assert_eq!(
            (c.max_in_flight, c.request_timeout, c.max_watches_per_tenant),
            (64, Duration::from_secs(5), 3)
        );
        assert_eq!(c.max_changes_in_flight_per_tenant, 7);
        assert_eq!(
            (
                c.tokens.lookups_per_second,
                c.tokens.lookup_burst,
                c.tokens.unknown_ttl,
                c.tokens.unknown_capacity
            ),
            (7, 9, Duration::from_secs(120), 1000)
        );
        let c = args(&[
            "--create-batch-max",
            "64",
            "--max-in-flight",
            "10",
            "--request-timeout",
            "250ms",
            "--max-watches-per-tenant",
            "1",
            "--max-changes-in-flight-per-tenant",
            "2",
        ])
        .config_with_env(&f, &no_env)
        .expect("config");
        assert_eq!(c.create_batch_max, 64);
        assert_eq!(c.max_changes_in_flight_per_tenant, 2);
        assert_eq!(
            (c.max_in_flight, c.request_timeout, c.max_watches_per_tenant),
            (10, Duration::from_millis(250), 1)
        );
        let c = args(&[]).config_with_env(&none, &no_env).expect("config");
        assert_eq!(
            (c.max_message_bytes, c.create_batch_max),
            (DEFAULT_MAX_MESSAGE_BYTES, batch::DEFAULT_MAX_BATCH)
        );
        assert_eq!(
            (c.max_in_flight, c.request_timeout, c.max_watches_per_tenant),
            (1024, Duration::from_secs(30), 100)
        );
        assert_eq!(c.max_changes_in_flight_per_tenant, 1000);
        assert_eq!(c.tokens, TokenLimits::default());
        assert!(c.tls.is_none());
    }

    #[test]
    fn out_of_range_file_values_are_refused_by_name() {
        for (toml, key) in [
            ("[api]\ncreate_batch_max = 0\n", "api.create_batch_max"),
            ("[api]\nmax_message_bytes = 10\n", "api.max_message_bytes"),
            ("[api]\nmax_in_flight = 0\n", "api.max_in_flight"),
            ("[api]\nrequest_timeout = \"0s\"\n", "api.request_timeout"),
            (
                "[api]\nmax_watches_per_tenant = 0\n",
                "api.max_watches_per_tenant",
            ),
            (
                "[api]\ntoken_lookups_per_second = 0\n",
                "api.token_lookups_per_second",
            ),
            ("[api]\ntoken_lookup_burst = 0\n", "api.token_lookup_burst"),
            (
                "[api]\nmax_changes_in_flight_per_tenant = 0\n",
                "api.max_changes_in_flight_per_tenant",
            ),
            (
                "[api]\nunknown_token_ttl = \"0s\"\n",
                "api.unknown_token_ttl",
            ),
            (
                "[api]\nunknown_token_cache = 0\n",
                "api.unknown_token_cache",
            ),
        ] {
            let e = args(&[])
                .config_with_env(&file(toml), &no_env)
                .expect_err("refused")
                .to_string();
            assert!(e.contains(key), "{e}");
        }
        let bad = toml::from_str::<crate::config::FileConfig>("[api]\nlisen = \"x\"\n")
            .expect_err("unknown key");
        assert!(bad.to_string().contains("lisen"), "{bad}");
    }
}
