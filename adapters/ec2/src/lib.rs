//! # setpoint-ec2: the EC2 adapter of setpoint
//!
//! Implements the SDK's [`Compute`](setpoint_adapter::Compute) trait on Amazon EC2 with
//! aws-sdk-ec2 (rustls + ring, hyper 1), and the work kinds `ec2.ensure-instance` and
//! `ec2.terminate-instance`. The same code talks to AWS or to a moto server: only
//! [`Ec2Config::endpoint_url`] differs.
//!
//! ## A retry never launches a second instance
//! `ensure` first looks for a live instance tagged `setpoint:token=<token>` and adopts it; only
//! if there is none does it call `RunInstances`, with `ClientToken = token` and the tags set in
//! the same call. A retry uses the same subnet (chosen from the token), since EC2 scopes client
//! tokens to an AZ. Terminate treats "already terminated" and "not found" as success.
//!
//! ## A resize changes only the token's machine, one observed step at a time
//! `resize` finds the instance by the launching token's tag and, from its observed state, stops
//! it, changes its type while stopped, or starts it; already running at the wanted type, it
//! does nothing. A retry after a crash continues from the state the instance is in.
//!
//! ## A data volume per machine, grown in place
//! A launch with `data_volume_gb` adds an encrypted EBS volume (deleted with the instance) and
//! tags it like the instance; a resize grows it with `ModifyVolume` and never shrinks it. EBS's
//! limit on volume changes makes the unit wait ([`setpoint_adapter::AdapterError::waiting`]),
//! not fail.
//!
//! ## One region per `Ec2Compute`
//! [`Ec2Regions`] reads the `[ec2]` table (one region, or `[ec2.regions.<name>]` tables); an
//! engine serving several regions builds one [`Ec2Compute`] per region.
//!
//! ## Using it in the engine
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config: setpoint_ec2::Ec2Config = toml::from_str(r#"region = "us-east-1""#)?;
//! let compute = setpoint_ec2::Ec2Compute::connect(config).await?;
//! for handler in setpoint_ec2::handlers(&compute) {
//!     // registry.register_arc(handler)?;
//!     let _ = handler;
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`config`]: [`Ec2Config`] (one region's settings) and building the client.
//! - [`regions`]: [`Ec2Regions`] (the `[ec2]` table: one region or several).
//! - [`compute`]: [`Ec2Compute`], tags, failpoints, waiting for `running`.
//! - [`classify`](mod@classify): the one function that makes EC2 failures transient or permanent.
//! - [`handlers`](mod@handlers): the `ec2.*` work kinds.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod classify;
pub mod compute;
pub mod config;
pub mod handlers;
pub mod regions;

pub use classify::{
    CAPACITY_RETRY_AFTER, THROTTLE_RETRY_AFTER, VOLUME_BUSY_RETRY_AFTER, VOLUME_COOLDOWN,
    VOLUME_RATE_RECHECK, classify, classify_code, volume_change_refused,
};
pub use compute::{
    CODE_NO_DATA_VOLUME, DEFAULT_LIST_PAGE_SIZE, Ec2Budgets, Ec2Compute, FAILPOINT_AFTER_RUN,
    FAILPOINT_BEFORE_RUN, TAG_MANAGED, TAG_RESOURCE, TAG_TENANT, TAG_TOKEN,
};
pub use config::{
    ConfigError, DEFAULT_DATA_VOLUME_DEVICE, DEFAULT_DATA_VOLUME_TYPE, DEFAULT_DESCRIBE_BUDGET,
    DEFAULT_INSTANCE_TYPE, DEFAULT_MUTATING_BUDGET, DEFAULT_RUN_INSTANCES_BUDGET, DataVolumeConfig,
    Ec2BudgetsConfig, Ec2Config, PlanConfig, TimeoutsConfig,
};
pub use handlers::{
    EnsureInstance, EnsureInstanceSpec, KIND_ENSURE_INSTANCE, KIND_TERMINATE_INSTANCE,
    PENDING_RETRY_AFTER, TerminateInstance, TerminateInstanceSpec, handlers,
};
pub use regions::Ec2Regions;
