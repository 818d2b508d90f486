//! The API's settings: flags and environment variables of `setpoint serve`, over the `[api]`
//! table of the configuration file, over the defaults.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::Args;

use super::batch;
use super::tls::{TlsConfig, TlsError};
use crate::config::ApiFile;

/// Default listen address.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 50051);
/// Default largest request message (bytes); larger ones are refused by tonic with
/// `OUT_OF_RANGE` before any handler runs.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The largest batch one may ask for.
const MAX_BATCH_LIMIT: usize = 65536;

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
        Ok(ApiConfig {
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
             create_batch_executors = 0\ncreate_batch_max = 16\n",
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
        let c = args(&["--create-batch-max", "64"])
            .config_with_env(&f, &no_env)
            .expect("config");
        assert_eq!(c.create_batch_max, 64);
        let c = args(&[]).config_with_env(&none, &no_env).expect("config");
        assert_eq!(
            (c.max_message_bytes, c.create_batch_max),
            (DEFAULT_MAX_MESSAGE_BYTES, batch::DEFAULT_MAX_BATCH)
        );
        assert!(c.tls.is_none());
    }

    #[test]
    fn out_of_range_file_values_are_refused_by_name() {
        for (toml, key) in [
            ("[api]\ncreate_batch_max = 0\n", "api.create_batch_max"),
            ("[api]\nmax_message_bytes = 10\n", "api.max_message_bytes"),
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
