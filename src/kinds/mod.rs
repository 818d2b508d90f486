//! Resources of declared kinds: the engine's side of what plugins declare.
//!
//! A plugin declares a [`setpoint_adapter::ResourceKind`] and registers the
//! [`setpoint_adapter::Step`]s its chains name; the engine keeps the kinds in a
//! [`catalog::KindCatalog`] (schemas compiled, steps placed), runs their chains
//! ([`chains`]), keeps each step's output on the resource (secret ones sealed by
//! [`secrets::SecretBox`]) and its conditions ([`conditions`]).
//!
//! # Layout
//! - [`batch`]: units of a batch step that run together share one call to the peer.
//! - [`catalog`]: declared kinds, spec validation against their JSON Schema, step positions.
//! - [`chains`]: the chain runner (a handler per step, the hooks that record and continue).
//! - [`conditions`]: Kubernetes-style conditions on a resource.
//! - [`drift`]: each resource's drift check, once per interval across all engines.
//! - [`secrets`]: sealing secret outputs at rest.

pub mod batch;
pub mod catalog;
pub mod chains;
pub mod conditions;
pub mod drift;
pub mod secrets;

pub use catalog::{Kind, KindCatalog, KindError, SpecViolation};
pub use chains::{Chains, StepHandler, StepUnit};
pub use secrets::{SecretBox, SecretsError};
