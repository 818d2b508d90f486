//! # setpoint: a provisioning engine
//!
//! A user's request becomes desired state plus a unit of work, written in one PostgreSQL
//! transaction. Workers claim units, call adapters with each unit's idempotency token, and
//! commit what they learned together with any follow-up work — fenced, so a worker that lost
//! its lease changes nothing. PostgreSQL is the only coordinator; any number of engine
//! processes may share one database.
//!
//! # Layout
//! - [`queue`]: enqueue units inside the caller's transaction; operator retry and cancel.
//! - [`worker`]: the runtime that claims, runs and completes units; the handler [`Registry`].
//! - [`store`]: every SQL statement, one module per table.
//! - [`config`]: configuration from flags, environment and a TOML file.
//! - [`dev`]: throw-away local peers (PostgreSQL) for `setpoint dev`, benchmarks and tests.
//! - [`bench`]: the benchmarks behind `setpoint bench`.
//! - [`kinds`]: resources of declared kinds: the catalog, the chain runner, drift checks,
//!   conditions, sealed secret outputs.
//! - [`plugin`]: how plugins add adapters and kinds; [`plugins`]: the built-in ones (the
//!   EC2, Kubernetes and e-mail adapters, the KVX kind, the DNS kind).
//! - [`console`]: the web console, a client of the API on an HTTP listener of its own.
//! - [`engine`]: the engine as a library ([`engine::EngineBuilder`]): `serve`, `dev` and a
//!   team's own binary are thin users of it.
//! - [`names`]: naming rules every layer shares.
//! - [`maintenance`]: background services every engine runs (retention).
//! - [`metrics`]: Prometheus metrics, `/healthz` and `/readyz`.

#![deny(unsafe_code)]

pub mod api;
pub mod bench;
pub mod budgets;
pub mod cli;
pub mod client;
pub mod config;
pub mod console;
pub mod dev;
pub mod engine;
pub mod kinds;
pub mod maintenance;
pub mod metrics;
pub mod names;
pub mod plugin;
pub mod plugins;
pub mod queue;
pub mod store;
pub mod worker;

pub use queue::NewWork;
pub use worker::{Registry, Runtime, WorkerConfig};
