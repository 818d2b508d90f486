//! What the life cycle of a unit does to the resource it works on, as hooks the domain
//! registers: the worker runtime and the queue's operator actions know units, not resources.
//!
//! Every hook runs inside the transaction that changes the unit, so the unit and its
//! resource change together or not at all.

use std::sync::Arc;

use serde_json::Value;
use setpoint_adapter::{BoxFuture, IdempotencyToken, Outcome};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::store::StoreError;
use crate::store::work::Lane;

/// A unit whose completion applied, as its resource's hook sees it.
#[derive(Debug, Clone)]
pub struct CompletedUnit<'a> {
    /// The unit's id.
    pub work_id: i64,
    /// Its work kind.
    pub kind: &'a str,
    /// Its token (what follows it derives its tokens from it).
    pub token: &'a IdempotencyToken,
    /// Its resource.
    pub resource_id: Uuid,
    /// The resource's tenant.
    pub tenant: Option<&'a str>,
    /// The unit's spec as enqueued.
    pub spec: &'a Value,
    /// The lane it ran in (what follows it runs in the same one).
    pub lane: Lane,
    /// It holds its resource (false: it runs beside it, as a drift check does).
    pub holds_resource: bool,
    /// What its handler returned.
    pub outcome: &'a Outcome,
}

/// A unit that stopped being worked on: parked for an operator, retried or cancelled by one.
#[derive(Debug, Clone)]
pub struct UnitEvent<'a> {
    /// The unit's id.
    pub work_id: i64,
    /// Its work kind.
    pub kind: &'a str,
    /// Its resource.
    pub resource_id: Uuid,
    /// False for a unit that runs beside its resource (its park is not the resource's).
    pub holds_resource: bool,
    /// Why (the failure for a park, the operator's reason for a cancel); raw text, for
    /// operators.
    pub reason: &'a str,
    /// Who acted (an operator's name), for retries and cancels.
    pub operator: Option<&'a str>,
}

/// The domain's side of the unit life cycle. Default methods do nothing, so a domain
/// implements only what its resources need.
pub trait UnitHooks: Send + Sync + 'static {
    /// Units of resources completed (in the completion transaction, after their follow-ups
    /// were enqueued): record what they observed, end their chains.
    fn completed<'a>(
        &'a self,
        _tx: &'a mut PgConnection,
        _units: &'a [CompletedUnit<'a>],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    /// A unit of a resource was parked (a permanent failure, attempts used up, or a unit
    /// that never reported back).
    fn parked<'a>(
        &'a self,
        _tx: &'a mut PgConnection,
        _unit: &'a UnitEvent<'a>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    /// An operator made a parked unit of a resource pending again.
    fn retried<'a>(
        &'a self,
        _tx: &'a mut PgConnection,
        _unit: &'a UnitEvent<'a>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    /// An operator cancelled a parked unit of a resource.
    fn cancelled<'a>(
        &'a self,
        _tx: &'a mut PgConnection,
        _unit: &'a UnitEvent<'a>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Hooks that do nothing: units without resources, tests of the runtime alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl UnitHooks for NoHooks {}

/// Shared hooks.
pub type Hooks = Arc<dyn UnitHooks>;
