//! The client side of the `setpoint` binary: `setpoint instances …` and `setpoint resources …`
//! against a running server (with a live progress display for `watch` and `--wait`, and
//! `--json`), and `setpoint tokens …`, which writes to the database directly.

pub mod instances;
mod progress;
pub mod resources;
pub mod tokens;

pub use instances::{InstancesCommand, full_name, run_instances};
pub use tokens::{TokensCommand, parse_lifetime, run_tokens};

use std::path::PathBuf;

use clap::Args;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};
use tonic_types::StatusExt;

use crate::api::ApiError;
use crate::api::proto::instance_service_client::InstanceServiceClient;
use crate::api::proto::resource_service_client::ResourceServiceClient;
use crate::store::StoreError;

/// A client failure, printed for a person.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot reach the server: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The server refused or failed the call.
    #[error("{}", describe_status(.0))]
    Call(Box<Status>),
    /// A local file or terminal problem.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A bad flag.
    #[error("{0}")]
    Usage(String),
    /// The operation ended with the instance FAILED.
    #[error("{0} failed: {1}")]
    Failed(String, String),
    /// Token creation failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The database failed (commands that use it directly).
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) fn json_error(e: serde_json::Error) -> ClientError {
    ClientError::Io(std::io::Error::other(e))
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        ClientError::Call(Box::new(s))
    }
}

fn describe_status(s: &Status) -> String {
    let mut out = format!("{:?}: {}", s.code(), s.message());
    let d = s.get_error_details();
    if let Some(br) = d.bad_request() {
        for v in &br.field_violations {
            out.push_str(&format!("\n  {}: {}", v.field, v.description));
        }
    }
    out
}

/// How to reach the server.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Server URL (`https://…` for TLS).
    #[arg(
        long,
        env = "SETPOINT_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// Bearer token (from `setpoint tokens create`).
    #[arg(long, env = "SETPOINT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to trust for the server's certificate.
    #[arg(long, env = "SETPOINT_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; with --client-key.
    #[arg(long, env = "SETPOINT_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, env = "SETPOINT_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A connected client that adds the bearer token to every call.
#[derive(Debug, Clone)]
pub struct Client {
    inner: InstanceServiceClient<Channel>,
    channel: Channel,
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Client {
    /// Connects as `args` say.
    ///
    /// # Errors
    /// Unreadable TLS files, bad URL, unreachable server, a token that is not ASCII.
    pub async fn connect(args: &ClientArgs) -> Result<Self, ClientError> {
        let mut ep = Endpoint::from_shared(args.server.clone())?;
        if args.server.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = &args.ca_cert {
                tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
            }
            if let (Some(c), Some(k)) = (&args.client_cert, &args.client_key) {
                tls = tls.identity(Identity::from_pem(std::fs::read(c)?, std::fs::read(k)?));
            }
            ep = ep.tls_config(tls)?;
        }
        let channel = ep.connect().await?;
        let auth = match &args.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::Usage("the token is not ASCII text".into()))?,
            ),
            None => None,
        };
        Ok(Self {
            inner: InstanceServiceClient::new(channel.clone()),
            channel,
            auth,
        })
    }

    /// A ResourceService client on the same connection.
    pub fn resources(&self) -> ResourceServiceClient<Channel> {
        ResourceServiceClient::new(self.channel.clone())
    }

    pub(crate) fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(a) = &self.auth {
            r.metadata_mut().insert("authorization", a.clone());
        }
        r
    }

    /// The generated client (for calls not wrapped here).
    pub fn raw(&mut self) -> &mut InstanceServiceClient<Channel> {
        &mut self.inner
    }
}

/// The request id of a change: the one given, else a new UUID.
pub(crate) fn new_request_id(given: Option<String>) -> String {
    given.unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}
