//! The gRPC API (`setpoint.v1`, see `proto/setpoint/v1/`), served by `setpoint serve` next to
//! the workers.
//!
//! # Layout
//! - [`proto`]: the generated messages, clients and servers, and the descriptor set.
//! - [`instances`]: `InstanceService` (create, get, list, update, delete, watch).
//! - [`work`]: `WorkService` for operators (admin tokens only).
//! - [`history`]: a resource's units and their events (`ListResourceHistory`), curated for
//!   tenants.
//! - [`gate`]: what every call passes first: its metric label, the in-flight limit, the
//!   timeout, the token, the framing of its body.
//! - [`auth`]: bearer tokens → [`auth::Caller`].
//! - [`token_cache`]: token lookups: caches of known and unknown tokens, the lookup budget.
//! - [`methods`]: the methods served (metric labels, per-method rules), from the descriptors.
//! - [`frames`]: a request body must be one well-formed gRPC frame.
//! - [`codec`]: the servers' codec: a request that does not decode is `INVALID_ARGUMENT`.
//! - [`validate`]: input rules → `INVALID_ARGUMENT` with `BadRequest` field violations.
//! - [`errors`]: [`ApiError`] and its mapping to gRPC statuses with `google.rpc` details.
//! - [`page_token`]: page tokens bound to their listing (tenant and filters).
//! - [`tenant_view`]: what tenants are told about failures (curated, not the raw text).
//! - [`watch_limit`]: the cap on open Watch streams per tenant.
//! - [`idempotency`]: client request ids (replay the first answer, refuse reuse).
//! - [`batch`]: group commit of CreateInstance (many creates, one transaction).
//! - [`settings`]: the API's settings, from flags, environment and the `[api]` file table.
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
pub mod cert_expiry;
pub mod codec;
pub mod convert;
pub mod errors;
pub mod frames;
pub mod gate;
pub mod history;
pub mod idempotency;
pub mod instances;
pub mod listing;
pub mod methods;
pub mod operations;
pub mod page_token;
pub mod proto;
pub mod quota;
pub mod resources;
pub mod settings;
pub mod status;
pub mod tenant_view;
pub mod tls;
pub mod token_cache;
pub mod validate;
pub mod wake;
pub mod watch;
pub mod watch_limit;
pub mod work;

use std::net::SocketAddr;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

pub use errors::ApiError;
pub use settings::{ApiArgs, ApiConfig, DEFAULT_LISTEN, DEFAULT_MAX_MESSAGE_BYTES, SettingsError};
pub use tls::{PemSource, TlsConfig, TlsError};

use proto::instance_service_server::InstanceServiceServer;
use proto::resource_service_server::ResourceServiceServer;
use proto::work_service_server::WorkServiceServer;

/// What the API serves besides the database: the declared kinds, their chains, and the keys
/// of secret outputs.
pub struct ApiServices {
    /// The declared kinds.
    pub catalog: Arc<crate::kinds::KindCatalog>,
    /// Their chains (the first unit of an operation; the hooks of operators' actions).
    pub chains: Arc<crate::kinds::Chains>,
    /// The keys that open secret outputs (connection details).
    pub secrets: Arc<crate::kinds::SecretBox>,
    /// Plugins' own gRPC services, served behind the same gate.
    pub grpc: Vec<crate::plugin::GrpcService>,
}

impl std::fmt::Debug for ApiServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServices").finish_non_exhaustive()
    }
}

impl ApiServices {
    /// No kinds: instances run the stand-in kinds of the API's configuration (tests, an
    /// engine without adapters).
    pub fn none(pool: &PgPool) -> Self {
        let catalog = Arc::new(crate::kinds::KindCatalog::new());
        let secrets = Arc::new(crate::kinds::SecretBox::none());
        Self {
            chains: Arc::new(crate::kinds::Chains::new(
                catalog.clone(),
                secrets.clone(),
                pool.clone(),
            )),
            catalog,
            secrets,
            grpc: Vec::new(),
        }
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
    /// The TLS material could not be read or used.
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

/// The API as an in-process caller reaches it (the web console): the same gate and services a
/// network client reaches — token, limits, timeout, framing, validation, tenancy, request ids —
/// without a network hop, so that TLS and client certificates are no concern of the caller.
#[derive(Debug, Clone)]
pub struct InProcessApi {
    /// The gate with every service behind it: a tonic client runs over it as over a channel.
    pub service: gate::Gate<Routes>,
    /// The gate's authenticator (same caches and lookup budget).
    pub auth: Arc<auth::Authenticator>,
    /// The LISTEN/NOTIFY feed of resource changes behind Watch.
    pub events: Arc<watch::InstanceEvents>,
    /// The API's TLS material, if it serves TLS.
    pub tls: Option<TlsConfig>,
}

/// A running API server.
#[derive(Debug)]
pub struct RunningApi {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    /// The same API for in-process callers.
    pub in_process: InProcessApi,
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
    services: ApiServices,
    listen: SocketAddr,
    shutdown: CancellationToken,
) -> Result<RunningApi, ServeError> {
    let config = Arc::new(config);
    let first = if services.catalog.get(crate::plugins::kvx::KIND).is_some() {
        operations::FirstUnits::Declared(services.chains.clone())
    } else {
        operations::FirstUnits::StandIn {
            create: config.create_kind.clone(),
            update: config.update_kind.clone(),
            delete: config.delete_kind.clone(),
        }
    };
    let events = watch::InstanceEvents::start(&pool, shutdown.clone()).await?;
    let feed = events.clone();
    let watches = watch_limit::WatchSlots::new(config.max_watches_per_tenant);
    let quota = quota::ChangeQuota::new(config.max_changes_in_flight_per_tenant);
    let auth = Arc::new(auth::Authenticator::with_limits(
        pool.clone(),
        config.tokens.clone(),
    ));
    let gate_auth = auth.clone();
    let max = config.max_message_bytes;

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<InstanceServiceServer<instances::Instances>>()
        .await;
    reporter
        .set_serving::<WorkServiceServer<work::Work>>()
        .await;
    reporter
        .set_serving::<ResourceServiceServer<resources::Resources>>()
        .await;
    // The google.rpc types too: a client that learns the API by reflection (grpcurl) can then
    // show an error's details (BadRequest field violations, PreconditionFailure, ErrorInfo)
    // instead of their raw bytes.
    let mut descriptors = vec![
        proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_types::pb::FILE_DESCRIPTOR_SET,
    ];
    descriptors.extend(services.grpc.iter().map(|g| g.descriptors()));
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
                first,
                events.clone(),
                watches.clone(),
                quota.clone(),
                shutdown.clone(),
            ))
            .max_decoding_message_size(max),
        )
        .add_service(
            ResourceServiceServer::new(resources::Resources::new(
                pool.clone(),
                resources::ResourcesParts {
                    catalog: services.catalog.clone(),
                    chains: services.chains.clone(),
                    secrets: services.secrets.clone(),
                    events,
                    watches,
                    quota,
                },
                shutdown.clone(),
            ))
            .max_decoding_message_size(max),
        )
        .add_service(
            WorkServiceServer::new(work::Work::new(pool.clone(), services.chains.clone()))
                .max_decoding_message_size(max),
        );
    for plugin_service in services.grpc {
        tracing::info!(
            service = plugin_service.name(),
            "gRPC API serves a plugin's service"
        );
        plugin_service.add_to(&mut routes);
    }
    let mut method_sets = descriptors.clone();
    method_sets.extend([
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]);
    let methods = methods::Methods::from_descriptor_sets(&method_sets);
    let service = gate::Gate::new(
        routes.routes().prepare(),
        methods,
        gate_auth,
        gate::GateLimits {
            max_in_flight: config.max_in_flight,
            request_timeout: config.request_timeout,
            max_message_bytes: max,
        },
    );

    let mut server = Server::builder();
    if let Some(tls) = &config.tls {
        let (with_tls, not_after) = tls.apply(server)?;
        server = with_tls;
        match not_after {
            Some(not_after) => {
                tracing::info!(tls = %tls.describe(), certificate_expires_at = %not_after.to_rfc3339(),
                    "gRPC API serves TLS");
                cert_expiry::watch(not_after, shutdown.clone());
            }
            None => tracing::warn!(tls = %tls.describe(),
                "gRPC API serves TLS, but the certificate's expiry date cannot be read: \
                 setpoint_api_tls_certificate_expiry_seconds is not reported, so watch the \
                 expiry some other way"),
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
    let in_process = InProcessApi {
        service: service.clone(),
        auth,
        events: feed,
        tls: config.tls.clone(),
    };
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
    Ok(RunningApi {
        addr,
        in_process,
        task,
    })
}
