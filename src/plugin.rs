//! Plugins: how a platform team adds adapters and whole kinds of resources to an engine
//! without forking it.
//!
//! A [`Plugin`] names itself, reads its own configuration table (`[plugins.<name>]`; the
//! built-in adapters also keep reading their historical top-level tables), builds the clients
//! it shares with other plugins ([`Services`]), and registers handlers, resource kinds and the
//! steps of their chains ([`Registrar`]). It may bring migrations of its own (kept in a
//! migration table of its own, so the core's migrator never sees versions it does not know),
//! health checks, and gRPC services. The engine builder ([`crate::engine::EngineBuilder`])
//! takes plugins in the order given: a plugin may use what the plugins before it provided.
//!
//! ```no_run
//! use setpoint::plugin::{ConfigContext, Plugin, PluginError, Registrar, Services};
//! use setpoint_adapter::{typed, AdapterError, Outcome, TypedHandler, WorkContext};
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct PingConfig { url: String }
//!
//! struct Ping { url: String }
//!
//! impl TypedHandler for Ping {
//!     type Spec = serde_json::Value;
//!     const KIND: &'static str = "ping.send";
//!     async fn run(&self, _ctx: &WorkContext, _spec: serde_json::Value) -> Result<Outcome, AdapterError> {
//!         Ok(Outcome::done())
//!     }
//! }
//!
//! #[derive(Default)]
//! struct PingPlugin { url: Option<String> }
//!
//! impl Plugin for PingPlugin {
//!     fn name(&self) -> &str { "ping" }
//!     fn configure(&mut self, cx: &ConfigContext<'_>) -> Result<(), PluginError> {
//!         let c: PingConfig = cx.parse()?;
//!         self.url = Some(c.url);
//!         Ok(())
//!     }
//!     fn register(&self, _s: &Services, r: &mut Registrar) -> Result<(), PluginError> {
//!         let url = self.url.clone().unwrap_or_default();
//!         r.handler(typed(Ping { url }))
//!     }
//! }
//! ```

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;
use setpoint_adapter::{BatchStep, BoxFuture, Handler, ResourceKind, Step};
use tokio_util::sync::CancellationToken;

/// Why a plugin could not be configured or registered. Messages name the plugin and the key
/// or variable at fault, never a secret's value.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The plugin's configuration is wrong.
    #[error("plugin {plugin}: {message}")]
    Config {
        /// The plugin.
        plugin: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A service the plugin needs was not provided by an earlier plugin.
    #[error("plugin {plugin} needs {what}, which no plugin before it provides ({hint})")]
    Missing {
        /// The plugin.
        plugin: String,
        /// What it needs.
        what: String,
        /// Which plugin provides it.
        hint: String,
    },
    /// Its client could not be built (an unreachable endpoint, a bad credential source).
    #[error("plugin {plugin}: {message}")]
    Start {
        /// The plugin.
        plugin: String,
        /// What failed.
        message: String,
    },
    /// Two plugins registered the same thing.
    #[error("{0}")]
    Duplicate(String),
}

/// A plugin: see the module docs. Every method but [`Plugin::name`], [`Plugin::configure`] and
/// [`Plugin::register`] has a default that does nothing.
pub trait Plugin: Send + Sync + 'static {
    /// Its name: lower-case, the key of its `[plugins.<name>]` table.
    fn name(&self) -> &str;

    /// Top-level tables of the configuration file it reads besides `[plugins.<name>]` (the
    /// built-in adapters' historical `[ec2]`, `[kubernetes]`, `[smtp]`).
    fn legacy_tables(&self) -> &[&'static str] {
        &[]
    }

    /// Reads its configuration: its table and the environment. A plugin without a table and
    /// without its variables set is simply not configured (it provides and registers
    /// nothing), unless it needs no configuration.
    ///
    /// # Errors
    /// [`PluginError::Config`] naming the key or variable at fault.
    fn configure(&mut self, cx: &ConfigContext<'_>) -> Result<(), PluginError>;

    /// Builds what it shares with the plugins after it (clients), into `services`. May
    /// connect to its peer.
    fn provide<'a>(
        &'a mut self,
        _services: &'a mut Services,
    ) -> BoxFuture<'a, Result<(), PluginError>> {
        Box::pin(async { Ok(()) })
    }

    /// Registers its handlers, resource kinds, steps, regions and health checks, using what
    /// the plugins before it provided.
    ///
    /// # Errors
    /// [`PluginError::Missing`] for a service no plugin before it provides; duplicates.
    fn register(&self, services: &Services, r: &mut Registrar) -> Result<(), PluginError>;

    /// Its migrations, applied at start-up in version order, in a migration table of its own.
    fn migrations(&self) -> Vec<PluginMigration> {
        Vec::new()
    }
}

/// What a plugin reads its configuration from.
pub struct ConfigContext<'a> {
    plugin: &'a str,
    table: Option<&'a Value>,
    legacy: BTreeMap<&'a str, &'a Value>,
    env: &'a (dyn Fn(&str) -> Option<String> + Send + Sync),
}

impl<'a> ConfigContext<'a> {
    /// The context of plugin `plugin`: its `[plugins.<plugin>]` table, the top-level tables it
    /// reads for compatibility, and the environment.
    pub fn new(
        plugin: &'a str,
        table: Option<&'a Value>,
        legacy: BTreeMap<&'a str, &'a Value>,
        env: &'a (dyn Fn(&str) -> Option<String> + Send + Sync),
    ) -> Self {
        Self {
            plugin,
            table,
            legacy,
            env,
        }
    }

    /// The plugin's `[plugins.<name>]` table, if the file has one.
    pub fn table(&self) -> Option<&Value> {
        self.table
    }

    /// The top-level table `name` (`[ec2]`), if the plugin reads it and the file has it.
    pub fn legacy(&self, name: &str) -> Option<&Value> {
        self.legacy.get(name).copied()
    }

    /// The environment variable `name`; empty counts as unset.
    pub fn env(&self, name: &str) -> Option<String> {
        (self.env)(name).filter(|v| !v.trim().is_empty())
    }

    /// The plugin's table as `T` (an empty table when there is none). Use
    /// `#[serde(deny_unknown_fields)]` so that a misspelt key is refused by name.
    ///
    /// # Errors
    /// [`PluginError::Config`] with serde's message (the key, the expected type).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, PluginError> {
        let value = self
            .table
            .cloned()
            .unwrap_or_else(|| Value::Object(Default::default()));
        serde_json::from_value(value)
            .map_err(|e| self.error(format!("[plugins.{}]: {e}", self.plugin)))
    }

    /// A configuration error of this plugin.
    pub fn error(&self, message: impl Into<String>) -> PluginError {
        PluginError::Config {
            plugin: self.plugin.to_owned(),
            message: message.into(),
        }
    }
}

/// The name under which [`Services`] holds the engine's `sqlx::PgPool` (its statement and lock
/// timeouts set), for a plugin that keeps tables of its own: `services.get::<PgPool>(POOL)`.
pub const POOL: &str = "setpoint.pool";

/// The name under which [`Services`] holds the engine's request budgets (an
/// `Arc<dyn setpoint_adapter::Budgets>`, shared by every engine through PostgreSQL; see
/// docs/budgets.md), provided before any plugin's `provide`: an adapter draws its calls' tokens
/// from it (`services.get::<dyn Budgets>(BUDGETS)`). Handlers find the same in
/// `WorkContext::budgets`.
pub const BUDGETS: &str = "setpoint.budgets";

/// What plugins share: clients and settings by type and name (the EC2 plugin provides a
/// `Compute` per region; the KVX kind uses them). The engine provides its database pool under
/// [`POOL`] before any plugin's `provide`.
#[derive(Default)]
pub struct Services {
    items: HashMap<(TypeId, String), Box<dyn Any + Send + Sync>>,
}

impl Services {
    /// No services.
    pub fn new() -> Self {
        Self::default()
    }

    /// Provides `value` under `name` (replacing what was there).
    pub fn provide<T: ?Sized + Send + Sync + 'static>(
        &mut self,
        name: impl Into<String>,
        value: Arc<T>,
    ) {
        self.items
            .insert((TypeId::of::<Arc<T>>(), name.into()), Box::new(value));
    }

    /// The `T` provided under `name`.
    pub fn get<T: ?Sized + Send + Sync + 'static>(&self, name: &str) -> Option<Arc<T>> {
        self.items
            .get(&(TypeId::of::<Arc<T>>(), name.to_owned()))
            .and_then(|b| b.downcast_ref::<Arc<T>>())
            .cloned()
    }

    /// Every `T` provided, by name, sorted.
    pub fn all<T: ?Sized + Send + Sync + 'static>(&self) -> BTreeMap<String, Arc<T>> {
        self.items
            .iter()
            .filter(|((t, _), _)| *t == TypeId::of::<Arc<T>>())
            .filter_map(|((_, name), b)| {
                b.downcast_ref::<Arc<T>>()
                    .map(|v| (name.clone(), v.clone()))
            })
            .collect()
    }
}

/// A migration a plugin brings: applied in version order, recorded in the plugin's own table
/// (`_setpoint_plugin_<name>_migrations`).
#[derive(Debug, Clone)]
pub struct PluginMigration {
    /// Its version, increasing.
    pub version: i64,
    /// What it does.
    pub description: String,
    /// Its SQL.
    pub sql: String,
}

/// A check `/readyz` runs: `Err` with a reason while what the plugin depends on is not usable.
pub trait HealthCheck: Send + Sync + 'static {
    /// What is checked (e.g. `webhook endpoint`).
    fn name(&self) -> &str;
    /// Checks it.
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// What a plugin's [`BackgroundTask`] runs with.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The engine's database (the pool its workers use).
    pub pool: sqlx::PgPool,
    /// The engine's id (`engines.id`, the workers' name in leases), for logs.
    pub engine: String,
    /// Fires when the engine shuts down; the task must return soon after, since the engine
    /// waits for it.
    pub shutdown: CancellationToken,
}

/// A task a plugin runs beside the workers for as long as the engine runs: a periodic sweep,
/// a refresh. Every engine runs its own; a task that must run in one engine at a time takes a
/// lock of its own (a session advisory lock, as retention does).
pub trait BackgroundTask: Send + Sync + 'static {
    /// What it is, for logs (`orphan machines sweep`).
    fn name(&self) -> &str;

    /// Runs until `cx.shutdown` fires. Errors are the task's to log and retry: nothing
    /// restarts a task that returned early.
    fn run(self: Arc<Self>, cx: TaskContext) -> BoxFuture<'static, ()>;
}

/// What a plugin registered to run a step: a [`Step`] run per unit, or a [`BatchStep`] whose
/// units share calls.
#[derive(Clone)]
pub enum StepImpl {
    /// Runs each unit alone.
    One(Arc<dyn Step>),
    /// Runs the units that come together in one call per batch key.
    Batch(Arc<dyn BatchStep>),
}

/// What a plugin registers with the engine.
#[derive(Default)]
pub struct Registrar {
    plugin: String,
    pub(crate) handlers: Vec<(String, Arc<dyn Handler>)>,
    pub(crate) kinds: Vec<(String, ResourceKind)>,
    pub(crate) steps: Vec<(String, String, StepImpl)>,
    pub(crate) regions: Vec<String>,
    pub(crate) health: Vec<Arc<dyn HealthCheck>>,
    pub(crate) grpc: Vec<GrpcService>,
    pub(crate) tasks: Vec<(String, Arc<dyn BackgroundTask>)>,
}

/// A gRPC service a plugin serves beside setpoint's own, on the same listener and behind the
/// same gate: a call must carry a valid token, and the handler reads who is calling with
/// [`crate::api::auth::Caller::of`]. Its methods are known to reflection, metrics and the
/// gate's framing checks through the file descriptor set it comes with.
pub struct GrpcService {
    pub(crate) name: &'static str,
    pub(crate) descriptors: &'static [u8],
    pub(crate) add: Box<dyn FnOnce(&mut tonic::service::RoutesBuilder) + Send + Sync>,
}

impl std::fmt::Debug for GrpcService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcService")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl GrpcService {
    /// The service's full name (`package.Service`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The encoded file descriptor set that describes it.
    pub fn descriptors(&self) -> &'static [u8] {
        self.descriptors
    }

    /// Adds it to `routes`.
    pub fn add_to(self, routes: &mut tonic::service::RoutesBuilder) {
        (self.add)(routes);
    }
}

impl Registrar {
    /// Makes registrations on behalf of `plugin`.
    pub(crate) fn for_plugin(&mut self, plugin: &str) {
        plugin.clone_into(&mut self.plugin);
    }

    /// Registers `handler` for units of its kind.
    ///
    /// # Errors
    /// [`PluginError::Duplicate`] when another plugin registered that kind.
    pub fn handler(&mut self, handler: impl Handler) -> Result<(), PluginError> {
        self.handler_arc(Arc::new(handler))
    }

    /// Registers a shared handler.
    ///
    /// # Errors
    /// As [`Registrar::handler`].
    pub fn handler_arc(&mut self, handler: Arc<dyn Handler>) -> Result<(), PluginError> {
        let kind = handler.kind().to_owned();
        self.claim_work_kind(&kind)?;
        self.handlers.push((self.plugin.clone(), handler));
        Ok(())
    }

    /// Declares a kind of resource. Its chains' steps must be registered too
    /// ([`Registrar::step`]), by this plugin or another.
    ///
    /// # Errors
    /// [`PluginError::Duplicate`] when another plugin declared a kind of that name.
    pub fn kind(&mut self, kind: ResourceKind) -> Result<(), PluginError> {
        if let Some((other, _)) = self.kinds.iter().find(|(_, k)| k.name == kind.name) {
            return Err(PluginError::Duplicate(format!(
                "resource kind {:?} is declared by plugin {other} and plugin {}",
                kind.name, self.plugin
            )));
        }
        self.kinds.push((self.plugin.clone(), kind));
        Ok(())
    }

    /// Registers `step` as what runs units of `work_kind` (a step a declared chain names).
    ///
    /// # Errors
    /// [`PluginError::Duplicate`] when that work kind is taken.
    pub fn step(
        &mut self,
        work_kind: impl Into<String>,
        step: Arc<dyn Step>,
    ) -> Result<(), PluginError> {
        let work_kind = work_kind.into();
        self.claim_work_kind(&work_kind)?;
        self.steps
            .push((self.plugin.clone(), work_kind, StepImpl::One(step)));
        Ok(())
    }

    /// Registers `step` as what runs units of `work_kind`, a step its kind declares batched
    /// ([`setpoint_adapter::StepDecl::batched`]): the units that run together share calls.
    ///
    /// # Errors
    /// [`PluginError::Duplicate`] when that work kind is taken.
    pub fn batch_step(
        &mut self,
        work_kind: impl Into<String>,
        step: Arc<dyn BatchStep>,
    ) -> Result<(), PluginError> {
        let work_kind = work_kind.into();
        self.claim_work_kind(&work_kind)?;
        self.steps
            .push((self.plugin.clone(), work_kind, StepImpl::Batch(step)));
        Ok(())
    }

    /// Says this engine serves `region` (the API refuses resources in regions no live engine
    /// serves).
    pub fn region(&mut self, region: impl Into<String>) {
        let region = region.into();
        if !self.regions.contains(&region) {
            self.regions.push(region);
        }
    }

    /// Adds a check `/readyz` runs.
    pub fn health_check(&mut self, check: Arc<dyn HealthCheck>) {
        self.health.push(check);
    }

    /// Runs `task` in the background while the engine runs (see [`BackgroundTask`]).
    pub fn background(&mut self, task: Arc<dyn BackgroundTask>) {
        self.tasks.push((self.plugin.clone(), task));
    }

    /// Serves `service` (a tonic server type) on the engine's gRPC API, described by the
    /// encoded file descriptor set `descriptors` (what `tonic_prost_build` writes with
    /// `file_descriptor_set_path`). Ignored when the engine runs no API.
    ///
    /// # Errors
    /// [`PluginError::Duplicate`] when a service of that name is registered already.
    pub fn grpc_service<S>(
        &mut self,
        service: S,
        descriptors: &'static [u8],
    ) -> Result<(), PluginError>
    where
        S: tonic::codegen::Service<
                tonic::codegen::http::Request<tonic::body::Body>,
                Response = tonic::codegen::http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        if self.grpc.iter().any(|g| g.name == S::NAME) {
            return Err(PluginError::Duplicate(format!(
                "gRPC service {} is registered twice (plugin {})",
                S::NAME,
                self.plugin
            )));
        }
        self.grpc.push(GrpcService {
            name: S::NAME,
            descriptors,
            add: Box::new(move |routes| {
                routes.add_service(service);
            }),
        });
        Ok(())
    }

    fn claim_work_kind(&self, kind: &str) -> Result<(), PluginError> {
        let taken = self
            .handlers
            .iter()
            .map(|(p, h)| (p, h.kind()))
            .chain(self.steps.iter().map(|(p, k, _)| (p, k.as_str())))
            .find(|(_, k)| *k == kind);
        match taken {
            Some((other, _)) => Err(PluginError::Duplicate(format!(
                "work kind {kind:?} is registered by plugin {other} and plugin {}",
                self.plugin
            ))),
            None => Ok(()),
        }
    }
}
