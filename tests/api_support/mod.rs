//! Helpers of the API tests: a fresh database, the API server in-process on a free 127.0.0.1
//! port, tokens for two tenants and an admin, authenticated requests, and workers to start
//! when a test wants the chain to run. No test asserts on timing; waits are bounded only to
//! catch a hung test.

#![allow(dead_code)]

pub mod raw;

use std::net::SocketAddr;
use std::time::Duration;

use setpoint::api::auth::create_token;
use setpoint::api::proto::instance_service_client::InstanceServiceClient;
use setpoint::api::proto::work_service_client::WorkServiceClient;
use setpoint::api::proto::{CreateInstanceRequest, GetInstanceRequest, Instance, InstanceSpec};
use setpoint::api::{ApiConfig, RunningApi};
use setpoint::dev::testdb::{TestDb, test_db};
use setpoint::worker::builtin::{Noop, Probe};
use setpoint::{Registry, Runtime, WorkerConfig};
use setpoint_adapter::typed;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::Channel;

/// Longest wait before a test is declared hung.
pub const HUNG: Duration = Duration::from_secs(60);

/// A running API on its own database.
pub struct Env {
    /// The database.
    pub db: TestDb,
    /// Where the API listens.
    pub addr: SocketAddr,
    /// Stops the API (and workers started with [`Env::start_workers`]).
    pub shutdown: CancellationToken,
    /// Tenant `acme`'s token.
    pub acme: String,
    /// Tenant `globex`'s token.
    pub globex: String,
    /// An admin token (tenant `ops`).
    pub admin: String,
    api: Option<RunningApi>,
}

impl Env {
    /// A database, tokens and the API with `config`.
    pub async fn start(config: ApiConfig) -> Env {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let db = test_db().await.expect("test database");
        let shutdown = CancellationToken::new();
        let api = setpoint::api::start(
            db.pool.clone(),
            config,
            setpoint::api::ApiServices::none(&db.pool),
            "127.0.0.1:0".parse().unwrap(),
            shutdown.clone(),
        )
        .await
        .expect("API starts");
        let acme = create_token(&db.pool, "acme", false, None)
            .await
            .unwrap()
            .token;
        let globex = create_token(&db.pool, "globex", false, None)
            .await
            .unwrap()
            .token;
        let admin = create_token(&db.pool, "ops", true, None)
            .await
            .unwrap()
            .token;
        Env {
            db,
            addr: api.addr,
            shutdown,
            acme,
            globex,
            admin,
            api: Some(api),
        }
    }

    /// The API with the default configuration (first units are `setpoint.noop`).
    pub async fn default() -> Env {
        Env::start(ApiConfig::default()).await
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A channel to the API.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// An InstanceService client.
    pub async fn instances(&self) -> InstanceServiceClient<Channel> {
        InstanceServiceClient::new(self.channel().await)
    }

    /// A WorkService client.
    pub async fn work(&self) -> WorkServiceClient<Channel> {
        WorkServiceClient::new(self.channel().await)
    }

    /// Starts workers running `setpoint.noop` and `setpoint.probe` until shutdown.
    pub fn start_workers(&self) {
        let mut registry = Registry::new();
        registry.register(typed(Noop)).unwrap();
        registry
            .register(typed(Probe::new(
                self.db.pool.clone(),
                "test-worker".into(),
            )))
            .unwrap();
        let config = WorkerConfig {
            poll_interval: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(5),
            worker_id: Some("test-worker".into()),
            ..WorkerConfig::default()
        };
        let runtime = Runtime::new(self.db.pool.clone(), registry, config)
            .unwrap()
            .with_hooks(std::sync::Arc::new(setpoint::kinds::Chains::new(
                std::sync::Arc::new(setpoint::kinds::KindCatalog::new()),
                std::sync::Arc::new(setpoint::kinds::SecretBox::none()),
                self.db.pool.clone(),
            )));
        let stop = self.shutdown.clone();
        tokio::spawn(async move { runtime.run(stop).await });
    }

    /// Stops everything.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(api) = self.api.take() {
            api.wait().await.unwrap();
        }
    }
}

/// Instance `name` as `token`'s tenant sees it; the call must succeed.
pub async fn get_ok(c: &mut InstanceServiceClient<Channel>, token: &str, name: &str) -> Instance {
    c.get_instance(authed(
        token,
        GetInstanceRequest {
            name: name.to_owned(),
        },
    ))
    .await
    .unwrap_or_else(|e| panic!("get {name}: {e:?}"))
    .into_inner()
}

/// `msg` with `authorization: Bearer token`.
pub fn authed<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// A valid spec.
pub fn spec() -> InstanceSpec {
    InstanceSpec {
        plan: "kvx.small".into(),
        region: "eu-west-1".into(),
        size_gb: 20,
        owner_email: "ops@example.com".into(),
    }
}

/// A valid create request for `name` with request id `rid`.
pub fn create_req(name: &str, rid: &str) -> CreateInstanceRequest {
    CreateInstanceRequest {
        parent: String::new(),
        instance_id: name.into(),
        instance: Some(Instance {
            spec: Some(spec()),
            ..Instance::default()
        }),
        request_id: rid.into(),
        bulk: false,
    }
}

/// Rows in a table.
pub async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}
