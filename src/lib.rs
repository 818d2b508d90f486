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
//! - [`workflows`]: the KVX steps of create, update, delete and drift resync.
//! - [`engine`]: the adapters and workflows built from configuration (`serve` and `dev`).
//! - [`maintenance`]: background services every engine runs (retention).
//! - [`metrics`]: Prometheus metrics, `/healthz` and `/readyz`.

#![deny(unsafe_code)]

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod dev;
pub mod engine;
pub mod maintenance;
pub mod metrics;
pub mod queue;
pub mod store;
pub mod worker;
pub mod workflows;

pub use queue::NewWork;
pub use worker::{Registry, Runtime, WorkerConfig};
