//! What the work life cycle does to an instance: the [`UnitHooks`] the KVX workflows register
//! with the runtime and the queue's operator actions.
//!
//! | unit event        | instance                                                              |
//! |-------------------|-----------------------------------------------------------------------|
//! | completed         | what it observed is merged in; `has_active_work` clears when the chain ends |
//! | parked            | `has_active_work` clears (the status becomes FAILED); `Ready` says why   |
//! | retried           | `has_active_work` is set again (the status returns to its operation's) |
//! | cancelled         | `has_active_work` clears; `Ready` says the change was given up         |

use setpoint_adapter::BoxFuture;
use sqlx::PgConnection;
use uuid::Uuid;

use super::conditions;
use crate::store::StoreError;
use crate::store::instances::{
    instance_mark_active, instance_merge_observed, instances_clear_active_work,
};
use crate::worker::hooks::{CompletedUnit, UnitEvent, UnitHooks};

/// The instances' hooks.
#[derive(Debug, Clone, Copy, Default)]
pub struct InstanceHooks;

impl UnitHooks for InstanceHooks {
    fn completed<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        units: &'a [CompletedUnit<'a>],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut touched: Vec<Uuid> = Vec::with_capacity(units.len());
            for u in units {
                if let Some(observed) = u.observed {
                    instance_merge_observed(tx, u.resource_id, observed).await?;
                }
                touched.push(u.resource_id);
            }
            touched.sort_unstable();
            touched.dedup();
            instances_clear_active_work(tx, &touched).await
        })
    }

    fn parked<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        unit: &'a UnitEvent<'a>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            instances_clear_active_work(tx, &[unit.resource_id]).await?;
            conditions::record_parked(tx, unit.resource_id, unit.work_id, unit.reason).await
        })
    }

    fn retried<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        unit: &'a UnitEvent<'a>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { instance_mark_active(tx, unit.resource_id).await })
    }

    fn cancelled<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        unit: &'a UnitEvent<'a>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            instances_clear_active_work(tx, &[unit.resource_id]).await?;
            // The instance says the change was given up, and watchers see it (the row
            // changes, so its NOTIFY fires).
            conditions::record_cancelled(
                tx,
                unit.resource_id,
                unit.work_id,
                unit.operator.unwrap_or("an operator"),
                unit.reason,
            )
            .await
        })
    }
}
