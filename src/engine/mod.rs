//! The engine as a library: the composition root. An [`EngineBuilder`] takes the database,
//! the settings and the plugins, and [`EngineBuilder::start`] runs the engine (workers, the
//! chain runner of every declared kind, the drift scheduler, the gRPC API, the web console,
//! metrics) until a shutdown token fires. `setpoint serve`, `setpoint dev` and a platform
//! team's own binary are thin users of it.
//!
//! ```no_run
//! # async fn f(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use setpoint::engine::EngineBuilder;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let engine = EngineBuilder::new(pool)
//!     .plugins(setpoint::plugins::builtin(Default::default()))
//!     .api("127.0.0.1:50051".parse()?, Default::default())
//!     .start(shutdown.clone())
//!     .await?;
//! engine.wait().await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - `presence`: the engine's row in `engines` (what it serves, that it is alive).
//! - `plugin_migrations`: each plugin's migrations, in a table of its own.

mod plugin_migrations;
mod presence;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use setpoint_adapter::typed;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiConfig};
use crate::config::FileConfig;
use crate::console::{self, ConsoleConfig, RunningConsole};
use crate::kinds::drift::{DriftConfig, DriftScheduler};
use crate::kinds::{Chains, KindCatalog, SecretBox, StepHandler};
use crate::maintenance::retention::{Retention, RetentionConfig, RetentionError};
use crate::plugin::{
    ConfigContext, HealthCheck, Plugin, PluginError, Registrar, Services, StepImpl, TaskContext,
};
use crate::worker::builtin::{Noop, Probe};
use crate::worker::{Registry, Runtime, WorkerConfig, default_worker_id};
use crate::{metrics, store};

/// The release of this engine, as it registers itself.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why the engine could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A plugin's configuration or registration failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// A configuration table no plugin reads.
    #[error("{0}")]
    UnknownTable(String),
    /// A declared kind is not usable.
    #[error(transparent)]
    Kind(#[from] crate::kinds::KindError),
    /// A chain names a step nobody registered.
    #[error("{0}")]
    MissingStep(String),
    /// A step is registered as a batch step and declared as one that is not, or the reverse.
    #[error("{0}")]
    StepMismatch(String),
    /// A kind keeps secret outputs and no key is configured.
    #[error(
        "resource kind {0} keeps secret outputs (sealed at rest), and no key is configured: set \
         SETPOINT_SECRETS_KEY (`setpoint secrets-key` prints a new one; keep it in a secrets store)"
    )]
    NoSecretsKey(String),
    /// The worker configuration is invalid.
    #[error(transparent)]
    Worker(#[from] crate::worker::WorkerError),
    /// A handler kind was registered twice.
    #[error(transparent)]
    Duplicate(#[from] crate::worker::registry::DuplicateKind),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The API could not start or failed.
    #[error(transparent)]
    Api(#[from] api::ServeError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// The retention settings are invalid.
    #[error(transparent)]
    Retention(#[from] RetentionError),
    /// The console could not start.
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
    /// The console was asked for without the API it is a client of.
    #[error("the web console needs the gRPC API: it calls the API's services")]
    ConsoleWithoutApi,
}

/// Where plugins read environment variables.
type Env = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Builds and starts an engine.
pub struct EngineBuilder {
    pool: PgPool,
    worker: WorkerConfig,
    api: Option<(SocketAddr, ApiConfig)>,
    console: Option<(SocketAddr, ConsoleConfig)>,
    metrics: Option<SocketAddr>,
    drift: Option<Duration>,
    retention: Option<RetentionConfig>,
    secrets: SecretBox,
    probe: bool,
    file: FileConfig,
    env: Env,
    plugins: Vec<Box<dyn Plugin>>,
}

impl EngineBuilder {
    /// An engine on `pool` (migrated), with default worker settings, no API, no metrics, no
    /// drift checks, no plugins, and the process's environment for plugins to read.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            worker: WorkerConfig::default(),
            api: None,
            console: None,
            metrics: None,
            drift: None,
            retention: None,
            secrets: SecretBox::none(),
            probe: false,
            file: FileConfig::default(),
            env: Arc::new(|k| std::env::var(k).ok()),
            plugins: Vec::new(),
        }
    }

    /// Sets the worker settings.
    pub fn worker(mut self, config: WorkerConfig) -> Self {
        self.worker = config;
        self
    }

    /// Serves the gRPC API on `listen` (port 0 picks one).
    pub fn api(mut self, listen: SocketAddr, config: ApiConfig) -> Self {
        self.api = Some((listen, config));
        self
    }

    /// Serves the web console on `listen` (port 0 picks one), as a client of the API: it needs
    /// [`EngineBuilder::api`] too, and starts after it (see `docs/console.md`).
    pub fn console(mut self, listen: SocketAddr, config: ConsoleConfig) -> Self {
        self.console = Some((listen, config));
        self
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `listen`.
    pub fn metrics(mut self, listen: SocketAddr) -> Self {
        self.metrics = Some(listen);
        self
    }

    /// Checks each resource of a kind with an observe step for drift every `interval`.
    pub fn drift(mut self, interval: Option<Duration>) -> Self {
        self.drift = interval;
        self
    }

    /// Prunes old history, request ids, journal rows and tombstones as `config` says
    /// (`docs/retention.md`). Without this call the engine prunes nothing.
    pub fn retention(mut self, config: RetentionConfig) -> Self {
        self.retention = Some(config);
        self
    }

    /// Seals secret outputs with `secrets` (without keys, a step's secret output cannot be
    /// kept, and an error says so).
    pub fn secrets(mut self, secrets: SecretBox) -> Self {
        self.secrets = secrets;
        self
    }

    /// Registers the `setpoint.probe` kind (tests, deployment checks).
    pub fn probe(mut self, on: bool) -> Self {
        self.probe = on;
        self
    }

    /// The configuration file the plugins read their tables from.
    pub fn file(mut self, file: FileConfig) -> Self {
        self.file = file;
        self
    }

    /// Where plugins read environment variables (default: the process's environment).
    pub fn env(mut self, env: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        self.env = Arc::new(env);
        self
    }

    /// Adds a plugin; plugins are set up in the order added.
    pub fn plugin(mut self, plugin: impl Plugin) -> Self {
        self.plugins.push(Box::new(plugin));
        self
    }

    /// Adds plugins, in order.
    pub fn plugins(mut self, plugins: Vec<Box<dyn Plugin>>) -> Self {
        self.plugins.extend(plugins);
        self
    }

    /// Configures the plugins, lets them provide their clients and register what they serve,
    /// applies their migrations, then starts the engine. Returns once the API (if any) listens.
    ///
    /// # Errors
    /// Anything that keeps the engine from serving: a plugin's configuration, a kind or a chain
    /// that cannot be served, a table no plugin reads, the database, the API's address.
    pub async fn start(mut self, shutdown: CancellationToken) -> Result<Engine, EngineError> {
        self.configure_plugins()?;
        let mut services = Services::new();
        // The engine's own pool, for plugins that keep tables of their own (their migrations
        // have run by the time handlers run).
        services.provide::<PgPool>(crate::plugin::POOL, Arc::new(self.pool.clone()));
        let pg_budgets = crate::budgets::PgBudgets::new(self.pool.clone());
        let budgets: Arc<dyn setpoint_adapter::Budgets> = Arc::new(pg_budgets.clone());
        services.provide::<dyn setpoint_adapter::Budgets>(crate::plugin::BUDGETS, budgets.clone());
        for plugin in &mut self.plugins {
            plugin.provide(&mut services).await?;
        }
        let mut registrar = Registrar::default();
        for plugin in &self.plugins {
            registrar.for_plugin(plugin.name());
            plugin.register(&services, &mut registrar)?;
        }
        for plugin in &self.plugins {
            plugin_migrations::apply(&self.pool, plugin.name(), &plugin.migrations()).await?;
        }

        // The kinds and the handlers of their steps.
        let mut catalog = KindCatalog::new();
        for (_, kind) in std::mem::take(&mut registrar.kinds) {
            catalog.add(kind)?;
        }
        let catalog = Arc::new(catalog);
        let stepped: BTreeSet<&str> = registrar.steps.iter().map(|(_, k, _)| k.as_str()).collect();
        if let Some(missing) = catalog.step_work_kinds().find(|k| !stepped.contains(k)) {
            let at = catalog
                .position(missing)
                .map(|p| format!("{} {}", p.kind, p.chain));
            return Err(EngineError::MissingStep(format!(
                "the chain {} names step work kind {missing:?}, which no plugin registers",
                at.unwrap_or_default()
            )));
        }
        if !self.secrets.has_key()
            && let Some(k) = catalog.kinds().find(|k| k.decl.secret_outputs)
        {
            return Err(EngineError::NoSecretsKey(k.decl.name.clone()));
        }
        let secrets = Arc::new(std::mem::replace(&mut self.secrets, SecretBox::none()));
        let chains = Arc::new(Chains::new(
            catalog.clone(),
            secrets.clone(),
            self.pool.clone(),
        ));
        let worker_id = self
            .worker
            .worker_id
            .clone()
            .unwrap_or_else(default_worker_id);
        let mut registry = Registry::new();
        registry.register(typed(Noop))?;
        if self.probe {
            registry.register(typed(Probe::new(self.pool.clone(), worker_id.clone())))?;
        }
        for (_, handler) in std::mem::take(&mut registrar.handlers) {
            registry.register_arc(handler)?;
        }
        for (plugin, work_kind, step) in std::mem::take(&mut registrar.steps) {
            let decl = catalog.position(&work_kind).and_then(|p| catalog.step(p));
            if decl.is_none() {
                tracing::warn!(
                    work_kind,
                    "a step is registered that no declared chain names"
                );
            }
            let batch = decl.and_then(|d| d.batch);
            match (&step, batch) {
                (StepImpl::One(_), Some(_)) => {
                    return Err(EngineError::StepMismatch(format!(
                        "step work kind {work_kind:?} is declared batched, and plugin {plugin} \
                         registers a step that runs one unit at a time: register it with \
                         Registrar::batch_step"
                    )));
                }
                (StepImpl::Batch(_), None) if decl.is_some() => {
                    return Err(EngineError::StepMismatch(format!(
                        "plugin {plugin} registers a batch step for {work_kind:?}, which its kind \
                         does not declare batched (StepDecl::batched)"
                    )));
                }
                _ => {}
            }
            registry.register(StepHandler::new(
                work_kind,
                step,
                batch.unwrap_or(1),
                chains.clone(),
            ))?;
        }
        let worker = WorkerConfig {
            worker_id: Some(worker_id.clone()),
            ..self.worker.clone()
        };
        // The budgets' admission rounds make units due; they wake this engine's fetch loop.
        let wake = Arc::new(tokio::sync::Notify::new());
        let runtime = Runtime::new(self.pool.clone(), registry, worker)?
            .with_hooks(chains.clone())
            .with_budgets(budgets)
            .with_wake(wake.clone());
        let record = store::engines::EngineRecord {
            id: worker_id.clone(),
            version: VERSION.to_owned(),
            kinds: runtime.served().to_vec(),
            resource_kinds: catalog.kinds().map(|k| k.decl.name.clone()).collect(),
            regions: registrar.regions.clone(),
        };
        tracing::info!(engine = %worker_id, version = VERSION, kinds = ?record.kinds,
            resource_kinds = ?record.resource_kinds, regions = ?record.regions, "engine starting");

        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        tasks.push(presence::start(self.pool.clone(), record, shutdown.clone()).await?);
        tasks.push(tokio::spawn(
            pg_budgets.run_admissions(wake, shutdown.clone()),
        ));
        let metrics_addr = match self.metrics {
            Some(addr) => Some(
                metrics::serve(
                    addr,
                    self.pool.clone(),
                    health_checks(&registrar.health),
                    shutdown.clone(),
                )
                .await?,
            ),
            None => None,
        };
        if let Some(interval) = self.drift {
            let scheduler = DriftScheduler::new(
                self.pool.clone(),
                chains.clone(),
                DriftConfig {
                    interval,
                    batch: 500,
                },
            );
            tasks.push(tokio::spawn(scheduler.run(shutdown.clone())));
        }
        if let Some(config) = self.retention.take()
            && let Some(task) = Retention::new(self.pool.clone(), config)?.spawn(&shutdown)
        {
            tasks.push(task);
        }
        for (plugin, task) in std::mem::take(&mut registrar.tasks) {
            tracing::info!(plugin, task = task.name(), "background task started");
            let cx = TaskContext {
                pool: self.pool.clone(),
                engine: worker_id.clone(),
                shutdown: shutdown.clone(),
            };
            tasks.push(tokio::spawn(task.run(cx)));
        }
        let api = match self.api.take() {
            Some((listen, config)) => {
                let services = api::ApiServices {
                    catalog: catalog.clone(),
                    chains: chains.clone(),
                    secrets: secrets.clone(),
                    grpc: std::mem::take(&mut registrar.grpc),
                };
                Some(
                    api::start(
                        self.pool.clone(),
                        config,
                        services,
                        listen,
                        shutdown.clone(),
                    )
                    .await?,
                )
            }
            None => None,
        };
        let api_addr = api.as_ref().map(|a| a.addr);
        let console = match (self.console.take(), &api) {
            (Some((listen, config)), Some(api)) => Some(
                console::start(api.in_process.clone(), listen, config, shutdown.clone()).await?,
            ),
            (Some(_), None) => return Err(EngineError::ConsoleWithoutApi),
            (None, _) => None,
        };
        let console_url = console.as_ref().map(RunningConsole::url);
        let worker = tokio::spawn(runtime.run(shutdown.clone()));
        Ok(Engine {
            worker_id,
            api_addr,
            console_url,
            metrics_addr,
            catalog,
            api,
            console,
            worker,
            tasks,
        })
    }

    /// Hands each plugin its tables; refuses `[plugins.<name>]` tables no plugin reads and the
    /// built-in adapters' tables when their plugin is not compiled in.
    fn configure_plugins(&mut self) -> Result<(), EngineError> {
        let names: BTreeSet<String> = self.plugins.iter().map(|p| p.name().to_owned()).collect();
        if let Some(unknown) = self.file.plugins.keys().find(|k| !names.contains(*k)) {
            return Err(EngineError::UnknownTable(format!(
                "the configuration has a [plugins.{unknown}] table, but no plugin of that name is \
                 part of this engine (it has: {}); remove the table, or build an engine with that \
                 plugin",
                names.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let to_json = |v: &toml::Value| serde_json::to_value(v).unwrap_or(serde_json::Value::Null);
        let plugin_tables: BTreeMap<String, serde_json::Value> = self
            .file
            .plugins
            .iter()
            .map(|(k, v)| (k.clone(), to_json(v)))
            .collect();
        let legacy_tables: BTreeMap<&str, serde_json::Value> = [
            ("ec2", self.file.ec2.as_ref()),
            ("kubernetes", self.file.kubernetes.as_ref()),
            ("smtp", self.file.smtp.as_ref()),
            ("orphans", self.file.orphans.as_ref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, to_json(v))))
        .collect();
        let read: BTreeSet<&str> = self
            .plugins
            .iter()
            .flat_map(|p| p.legacy_tables().iter().copied())
            .collect();
        if let Some(t) = legacy_tables.keys().find(|t| !read.contains(**t)) {
            return Err(EngineError::UnknownTable(format!(
                "the configuration has an [{t}] table, but this engine was built without the \
                 plugin that reads it (cargo feature {:?}); remove the table, or build with the \
                 feature",
                match *t {
                    "smtp" => "email",
                    "orphans" => "ec2",
                    other => other,
                }
            )));
        }
        let env = self.env.clone();
        for plugin in &mut self.plugins {
            let name = plugin.name().to_owned();
            let legacy = plugin
                .legacy_tables()
                .iter()
                .filter_map(|t| legacy_tables.get(t).map(|v| (*t, v)))
                .collect();
            let cx = ConfigContext::new(&name, plugin_tables.get(&name), legacy, env.as_ref());
            plugin.configure(&cx)?;
        }
        Ok(())
    }
}

fn health_checks(checks: &[Arc<dyn HealthCheck>]) -> Vec<metrics::Readiness> {
    checks
        .iter()
        .map(|c| {
            let check = c.clone();
            let run: Arc<
                dyn Fn() -> setpoint_adapter::BoxFuture<'static, Result<(), String>> + Send + Sync,
            > = Arc::new(move || {
                let check = check.clone();
                Box::pin(async move { check.check().await })
            });
            (c.name().to_owned(), run)
        })
        .collect()
}

/// A running engine.
pub struct Engine {
    /// Its id (worker id in leases, `engines.id`).
    pub worker_id: String,
    /// Where its API listens, if it serves one.
    pub api_addr: Option<SocketAddr>,
    /// Where its web console is (`http://…` or `https://…`), if it serves one.
    pub console_url: Option<String>,
    /// Where its metrics listen, if it serves them.
    pub metrics_addr: Option<SocketAddr>,
    /// The kinds it serves.
    pub catalog: Arc<KindCatalog>,
    api: Option<api::RunningApi>,
    console: Option<RunningConsole>,
    worker: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("worker_id", &self.worker_id)
            .field("api_addr", &self.api_addr)
            .field("console_url", &self.console_url)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Waits until everything stopped, after the shutdown token fired: the API, then the
    /// workers (within their shutdown grace), then the background tasks.
    ///
    /// # Errors
    /// When the API failed.
    pub async fn wait(self) -> Result<(), EngineError> {
        if let Some(console) = self.console {
            console.wait().await;
        }
        if let Some(api) = self.api {
            api.wait().await?;
        }
        let _ = self.worker.await;
        for t in self.tasks {
            let _ = t.await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// Records whether the engine's pool reached it.
    struct NeedsPool(Arc<AtomicBool>);

    impl Plugin for NeedsPool {
        fn name(&self) -> &str {
            "needs-pool"
        }

        fn configure(&mut self, _cx: &ConfigContext<'_>) -> Result<(), PluginError> {
            Ok(())
        }

        fn register(&self, services: &Services, _r: &mut Registrar) -> Result<(), PluginError> {
            self.0.store(
                services.get::<PgPool>(crate::plugin::POOL).is_some(),
                Ordering::SeqCst,
            );
            Ok(())
        }
    }

    #[tokio::test]
    async fn plugins_get_the_engines_pool() {
        let db = crate::dev::testdb::test_db().await.expect("db");
        let seen = Arc::new(AtomicBool::new(false));
        let shutdown = CancellationToken::new();
        let engine = EngineBuilder::new(db.pool.clone())
            .env(|_| None)
            .plugin(NeedsPool(seen.clone()))
            .start(shutdown.clone())
            .await
            .expect("engine");
        shutdown.cancel();
        engine.wait().await.expect("stopped");
        assert!(seen.load(Ordering::SeqCst));
    }
}
