//! # setpoint-route53: the Route 53 adapter of setpoint
//!
//! The adapter library behind the `dns.zone` kind: a public hosted zone on Amazon Route 53
//! and the records setpoint keeps in it, with aws-sdk-route53 (rustls + ring, hyper 1). The
//! same code talks to AWS or to a moto server: only [`Route53Config::endpoint_url`] differs.
//!
//! ## A retry never makes a second zone
//! [`Route53Dns::ensure_zone`] first looks for a zone whose `CallerReference` is the unit's
//! token (paging through `ListHostedZones`) and adopts it; only if there is none does it call
//! `CreateHostedZone` with `CallerReference = token`, then tag the zone (`setpoint:managed`,
//! `setpoint:resource`, `setpoint:tenant`, `setpoint:token`). AWS also refuses a repeated
//! `CallerReference`; moto does not, so against moto the lookup is what keeps retries safe.
//!
//! ## Records: ours, or refused
//! Record sets cannot be tagged, so each record setpoint writes has a TXT *ownership record*
//! (`_setpoint-<type>[-<set>].<name>` holding `setpoint:resource=<uuid>`), written in the same
//! atomic change batch (see [`ownership`]). [`Route53Dns::sync_records`] writes missing
//! records, changes ours, deletes ours the spec dropped, and refuses records that exist and
//! are not ours — never overwriting them. The apex SOA and NS are never touched.
//!
//! ## Using it
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use setpoint_adapter::{Fence, IdempotencyToken};
//! use setpoint_route53::{Route53Config, Route53Dns, ZoneRef, ZoneRequest, ZoneSpec};
//!
//! let dns = Route53Dns::connect(Route53Config::default()).await?;
//! let request = ZoneRequest {
//!     resource_id: uuid::Uuid::new_v4(),
//!     tenant: "acme".into(),
//!     spec: serde_json::from_str::<ZoneSpec>(
//!         r#"{"name": "example.com", "records": [
//!               {"name": "www", "type": "A", "values": ["192.0.2.10"]}]}"#,
//!     )?,
//! };
//! let token = IdempotencyToken::generate();
//! let fence = Fence::unbounded();
//! let zone = dns.ensure_zone(&token, &request, &fence).await?;
//! let synced = dns
//!     .sync_records(&token.derive("records"), &ZoneRef::id(&zone.id), &request, &fence)
//!     .await?;
//! # let _ = synced; Ok(()) }
//! ```
//!
//! # Layout
//! - [`config`]: [`Route53Config`] (the `[route53]` TOML table) and building the client.
//! - [`spec`]: [`ZoneSpec`], [`RecordSpec`], [`ZoneRequest`], [`ZoneRef`] and the spec check.
//! - [`value`](mod@value): [`RecordType`] and each type's values.
//! - [`ownership`]: the ownership records' names and values.
//! - `plan` (private): from the zone's records and the spec to change batches (no network).
//! - [`zone`]: [`Route53Dns`], the calls to Route 53.
//! - [`observation`]: [`ZoneInfo`], [`ZoneObservation`], [`Drift`] and the outcomes.
//! - [`classify`](mod@classify): the one function that makes Route 53 failures transient or
//!   permanent.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod classify;
pub mod config;
mod name;
pub mod observation;
pub mod ownership;
mod plan;
pub mod spec;
mod txt;
pub mod value;
pub mod zone;

pub use classify::{BUSY_RETRY_AFTER, THROTTLE_RETRY_AFTER, classify, classify_code};
pub use config::{
    ConfigError, DEFAULT_CHANGE_BUDGET, DEFAULT_REGION, Route53BudgetsConfig, Route53Config,
    TimeoutsConfig,
};
pub use observation::{
    DeleteOutcome, Drift, ObservedRecord, RecordValues, SyncOutcome, ZoneInfo, ZoneObservation,
};
pub use plan::CODE_NOT_OWNED;
pub use spec::{
    FieldViolation, InvalidSpec, RecordKey, RecordSpec, ZoneRef, ZoneRequest, ZoneSpec,
};
pub use value::RecordType;
pub use zone::{
    CODE_INVALID_SPEC, CODE_ZONE_NOT_EMPTY, CODE_ZONE_NOT_FOUND, CODE_ZONE_NOT_OWNED, Route53Dns,
    TAG_MANAGED, TAG_RESOURCE, TAG_TENANT, TAG_TOKEN,
};
