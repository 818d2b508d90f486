//! The gRPC API (`setpoint.v1`, see `proto/setpoint/v1/`), served by `setpoint serve` next to
//! the workers.
//!
//! # Layout
//! - [`proto`]: the generated messages, clients and servers, and the descriptor set.
//! - [`instances`]: `InstanceService` (create, get, list, update, delete, watch).
//! - [`work`]: `WorkService` for operators (admin tokens only).
//! - [`auth`]: bearer tokens → [`auth::Caller`]; the wrapper that checks every call but health.
//! - [`validate`]: input rules → `INVALID_ARGUMENT` with `BadRequest` field violations.
//! - [`errors`]: [`ApiError`] and its mapping to gRPC statuses with `google.rpc` details.
//! - [`idempotency`]: client request ids (replay the first answer, refuse reuse).
//! - [`batch`]: group commit of CreateInstance (many creates, one transaction).
//! - [`tls`]: the server's TLS material, from files or from PEM environment variables.
//! - [`cert_expiry`]: when the server certificate expires (log and gauge).
//! - [`wake`]: waking the workers after commits, one NOTIFY at a time.
//! - [`status`]: the instance life cycle (the transitions live in one SQL trigger).
//! - [`watch`]: the LISTEN/NOTIFY feed behind `WatchInstance`.
//! - [`convert`]: rows ↔ messages.
//! - [`bench`]: `setpoint bench api`.
//!
//! Besides `setpoint.v1` the server offers `grpc.health.v1` (no token needed) and server
//! reflection v1 and v1alpha (grpcurl 1.8 speaks only v1alpha).

pub mod auth;
pub mod batch;
pub mod bench;
pub mod cert_expiry;
pub mod convert;
pub mod errors;
pub mod idempotency;
pub mod instances;
pub mod proto;
pub mod status;
pub mod tls;
pub mod validate;
pub mod wake;
pub mod watch;
pub mod work;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

pub use errors::ApiError;
pub use tls::{PemSource, TlsConfig, TlsError};

use proto::instance_service_server::InstanceServiceServer;
use proto::work_service_server::WorkServiceServer;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default largest request message (bytes); larger ones are refused by tonic with
/// `OUT_OF_RANGE` before any handler runs.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;

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

/// The API flags of `setpoint serve`.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Address the gRPC API listens on.
    #[arg(long, env = "SETPOINT_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
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
    /// Largest request message in bytes.
    #[arg(long, env = "SETPOINT_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Concurrent transactions committing batches of Creates (group commit); 0 commits each
    /// Create on its own.
    #[arg(long, env = "SETPOINT_CREATE_BATCH_EXECUTORS", default_value_t = batch::DEFAULT_EXECUTORS)]
    pub create_batch_executors: usize,
    /// Most Creates committed in one batch.
    #[arg(long, env = "SETPOINT_CREATE_BATCH_MAX", default_value_t = batch::DEFAULT_MAX_BATCH,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    pub create_batch_max: usize,
}

impl ApiArgs {
    /// The configuration these flags and the process's TLS PEM variables describe.
    ///
    /// # Errors
    /// When the TLS settings do not fit together (see [`TlsConfig::resolve`]).
    pub fn config(&self) -> Result<ApiConfig, TlsError> {
        self.config_with_env(&|k| std::env::var(k).ok())
    }

    /// [`ApiArgs::config`] with the environment read through `get`.
    ///
    /// # Errors
    /// When the TLS settings do not fit together (see [`TlsConfig::resolve`]).
    pub fn config_with_env(
        &self,
        get: &impl Fn(&str) -> Option<String>,
    ) -> Result<ApiConfig, TlsError> {
        Ok(ApiConfig {
            create_kind: self.create_kind.clone(),
            update_kind: self.update_kind.clone(),
            delete_kind: self.delete_kind.clone(),
            max_message_bytes: self.max_message_bytes,
            create_batch_executors: self.create_batch_executors,
            create_batch_max: self.create_batch_max,
            tls: TlsConfig::resolve(
                self.tls_cert.clone(),
                self.tls_key.clone(),
                self.tls_client_ca.clone(),
                get,
            )?,
        })
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The TLS material could not be read.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The transport failed (I/O).
    #[error("gRPC server error: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Server reflection could not be built.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The notification listener could not start.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The server task panicked.
    #[error("the API server task failed: {0}")]
    Join(String),
}

/// A running API server.
#[derive(Debug)]
pub struct RunningApi {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningApi {
    /// Waits until the server has stopped (after the shutdown token fired).
    ///
    /// # Errors
    /// When the server failed.
    pub async fn wait(self) -> Result<(), ServeError> {
        self.task
            .await
            .map_err(|e| ServeError::Join(e.to_string()))?
    }
}

/// Starts the API on `listen` (port 0 picks a free port) until `shutdown` fires. Returns once
/// the socket is bound and the Watch feed is listening.
///
/// # Errors
/// When the address cannot be bound, TLS files cannot be read, or the database is unreachable.
pub async fn start(
    pool: PgPool,
    config: ApiConfig,
    listen: SocketAddr,
    shutdown: CancellationToken,
) -> Result<RunningApi, ServeError> {
    let config = Arc::new(config);
    let events = watch::InstanceEvents::start(&pool, shutdown.clone()).await?;
    let auth = Arc::new(auth::Authenticator::new(pool.clone()));
    let max = config.max_message_bytes;

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<InstanceServiceServer<instances::Instances>>()
        .await;
    reporter
        .set_serving::<WorkServiceServer<work::Work>>()
        .await;
    // The google.rpc types too: a client that learns the API by reflection (grpcurl) can then
    // show an error's details (BadRequest field violations, PreconditionFailure, ErrorInfo)
    // instead of their raw bytes.
    let descriptors = [
        proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_types::pb::FILE_DESCRIPTOR_SET,
    ];
    let reflection_v1 = descriptors
        .iter()
        .fold(tonic_reflection::server::Builder::configure(), |b, d| {
            b.register_encoded_file_descriptor_set(d)
        })
        .build_v1()?;
    let reflection_v1alpha = descriptors
        .iter()
        .fold(tonic_reflection::server::Builder::configure(), |b, d| {
            b.register_encoded_file_descriptor_set(d)
        })
        .build_v1alpha()?;

    let mut routes = Routes::builder();
    routes
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            InstanceServiceServer::new(instances::Instances::new(
                pool.clone(),
                config.clone(),
                events,
                shutdown.clone(),
            ))
            .max_decoding_message_size(max),
        )
        .add_service(
            WorkServiceServer::new(work::Work::new(pool.clone())).max_decoding_message_size(max),
        );
    let service = auth::AuthService::new(routes.routes().prepare(), auth);

    let mut server = Server::builder();
    if let Some(tls) = &config.tls {
        server = tls.apply(server)?;
        let not_after = tls.certificate_not_after()?;
        tracing::info!(tls = %tls.describe(),
            certificate_expires_at = %not_after.map_or_else(|| "unknown".into(), |t| t.to_rfc3339()),
            "gRPC API serves TLS");
        if let Some(not_after) = not_after {
            cert_expiry::watch(not_after, shutdown.clone());
        }
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: listen,
        source,
    })?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!(%addr, tls = config.tls.is_some(), "gRPC API listening");
    let task = tokio::spawn(async move {
        let stop = shutdown.clone();
        server
            .serve_with_incoming_shutdown(service, incoming, async move { stop.cancelled().await })
            .await?;
        reporter
            .set_not_serving::<InstanceServiceServer<instances::Instances>>()
            .await;
        tracing::info!("gRPC API stopped");
        Ok(())
    });
    Ok(RunningApi { addr, task })
}
