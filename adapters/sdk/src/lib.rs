//! # setpoint-adapter: the adapter SDK of setpoint
//!
//! setpoint records a user's request and a *unit of work* in PostgreSQL, then its workers run
//! each unit by calling an adapter until the real world matches the request. This crate is all
//! an adapter crate depends on: it never depends on the engine.
//!
//! ## The contract
//! - A unit runs **at least once**. Its [`IdempotencyToken`] is made when it is enqueued and is
//!   the same on every retry: pass it to every call that changes the world (EC2 `ClientToken`
//!   and a tag, a Kubernetes label, an e-mail `Message-ID`).
//! - **Observe before act**: look for what an earlier attempt made with this token and adopt
//!   it; only then create.
//! - Every failure is an [`AdapterError`] that says whether it is [`ErrorClass::Transient`]
//!   (retried with backoff) or [`ErrorClass::Permanent`] (parked for an operator). Calling a
//!   permanent failure transient makes a retry storm; calling a transient one permanent pages
//!   an operator for nothing.
//! - A unit's lease can be lost while its attempt runs (a paused process, a cut connection):
//!   call `ctx.fence.check()` immediately before every side effect, so a stale attempt stops
//!   acting before another attempt redoes the unit (see [`Fence`]).
//! - Where no peer offers an idempotent path, use the [`Journal`] in the [`WorkContext`] for
//!   at-most-once: `look` to see what earlier attempts did, `begin` as late as possible —
//!   immediately before the side effect, after everything that can fail without it — and
//!   `finish` after it.
//! - Success is an [`Outcome`]: observed state to record on the resource, and follow-up units
//!   whose tokens derive from this unit's token, committed together only if this worker still
//!   holds the unit's lease.
//!
//! ## Writing an adapter for a new kind of work
//! Implement [`TypedHandler`] (or [`Handler`] for raw JSON specs) in your own crate, then
//! register it when building the engine (`setpoint::worker::Registry::register`). The example
//! `examples/dns_record.rs` in this crate is a complete adapter.
//!
//! ```
//! use serde::Deserialize;
//! use setpoint_adapter::{AdapterError, Outcome, TypedHandler, WorkContext};
//!
//! #[derive(Deserialize)]
//! struct Spec { bucket: String }
//!
//! struct EnsureBucket;
//!
//! impl TypedHandler for EnsureBucket {
//!     type Spec = Spec;
//!     const KIND: &'static str = "s3.ensure-bucket";
//!
//!     async fn run(&self, ctx: &WorkContext, spec: Spec) -> Result<Outcome, AdapterError> {
//!         // 1. look for a bucket tagged with ctx.token; 2. create it only if none exists.
//!         let _ = (&ctx.token, spec.bucket);
//!         Ok(Outcome::done())
//!     }
//! }
//! ```
//!
//! The per-domain traits (compute, cluster, mail) are what the engine's KVX
//! workflows call; an alternative cloud or mail provider implements them.

#[cfg(feature = "aws")]
pub mod aws;
pub mod budget;
pub mod cluster;
pub mod compute;
pub mod context;
pub mod error;
pub mod failpoint;
pub mod fence;
pub mod handler;
pub mod journal;
pub mod kind;
pub mod mail;
pub mod slot;
pub mod step;
pub mod token;

pub use budget::{Budget, BudgetKey, Budgets, CODE_BUDGET_WAIT, CODE_THROTTLED, Limit, Unlimited};
pub use cluster::{
    BackendAddress, CODE_SUPERSEDED, Cluster, ClusterFns, ClusterInstanceSpec, ClusterObject,
    ClusterObservation, DeleteOutcome, NopCluster, SecretData,
};
pub use compute::{
    CODE_MACHINE_NOT_FOUND, CODE_NO_DATA_VOLUME, CODE_VOLUME_SHRINK, Compute, ComputeFns,
    DataVolume, InstanceObservation, InstanceRequest, InstanceState, ListMachinesRequest,
    MachinePage, ManagedMachine, NopCompute, ResizeRequest, TerminateOutcome, TerminateRequest,
    VolumeModification, VolumeModificationState,
};
pub use context::WorkContext;
pub use error::{AdapterError, ErrorClass};
pub use fence::{CODE_LEASE_LOST, Fence};
pub use handler::{BoxFuture, FollowUp, Handler, Outcome, Typed, TypedHandler, typed};
pub use journal::{Begun, Entry, Journal, MemoryJournal};
pub use kind::{ResourceKind, StepDecl};
pub use mail::{Delivery, MailRequest, Mailer, MailerFns, NopMailer, OUTCOME_UNKNOWN, Template};
pub use slot::{Slot, SlotGuard};
pub use step::{
    BatchStep, ConditionStatus, ConditionUpdate, ResourceRef, Secrets, Step, StepInput, StepResult,
    Then,
};
pub use token::{IdempotencyToken, MAX_TOKEN_LEN, TokenError};
