//! The work queue's public face: enqueue units inside the caller's transaction, and the
//! operator actions on parked units. The worker runtime ([`crate::worker`]) is the other half.
//!
//! ```no_run
//! # async fn f(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use setpoint::queue::{self, NewWork};
//! let mut tx = pool.begin().await?;
//! // ... write the desired state in `tx` ...
//! queue::enqueue(&mut tx, NewWork::new("setpoint.noop", serde_json::json!({}))).await?;
//! tx.commit().await?; // the unit exists if and only if the desired state does
//! # Ok(()) }
//! ```

use serde::Serialize;
use setpoint_adapter::OUTCOME_UNKNOWN;
use sqlx::PgConnection;

use crate::store::StoreError;
use crate::store::engines::units_unserved;
use crate::store::events::{WorkEvent, events_for_work, last_failure_code, work_id_for_token};
use crate::store::journal::side_effects_resolve_unknown;
pub use crate::store::work::{Enqueued, NewWork, WorkFilter, WorkRow};
use crate::store::work::{
    notify_workers, work_cancel_parked, work_enqueue, work_enqueue_quiet, work_get,
    work_get_by_token, work_list, work_list_of_kinds, work_retry_parked,
};
use crate::worker::hooks::{UnitEvent, UnitHooks};

/// Why a queue operation did nothing.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A unit with this token is already in the table.
    #[error("a unit with token {0} is already queued")]
    DuplicateToken(String),
    /// No unit has this id (or token), now or in the history.
    #[error("no unit of work {0} exists")]
    NotFound(String),
    /// The unit is not parked, so the operator action does not apply.
    #[error(
        "unit {id} is {state}, not parked; only parked units can be retried or cancelled \
         (a pending or running unit is still being worked on)"
    )]
    NotParked {
        /// The unit.
        id: i64,
        /// Its state.
        state: String,
    },
    /// The unit finished; only its history remains.
    #[error("unit {0} has already finished; see its history with `setpoint work show {0}`")]
    Finished(i64),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Enqueues one unit in the caller's transaction. It becomes visible to workers when the
/// transaction commits, and workers are woken then.
///
/// # Errors
/// [`QueueError::DuplicateToken`] when its token is taken; database errors.
pub async fn enqueue(conn: &mut PgConnection, unit: NewWork) -> Result<Enqueued, QueueError> {
    let token = unit.token.to_string();
    work_enqueue(conn, std::slice::from_ref(&unit))
        .await?
        .into_iter()
        .next()
        .ok_or(QueueError::DuplicateToken(token))
}

/// Enqueues one unit in the caller's transaction without waking workers: call
/// [`wake_workers`] after the commit. Workers poll too, so a missed wake-up costs at most one
/// poll interval. For callers committing many small transactions concurrently (see
/// [`crate::store::work::work_enqueue_quiet`] for why).
///
/// # Errors
/// [`QueueError::DuplicateToken`] when its token is taken; database errors.
pub async fn enqueue_quiet(conn: &mut PgConnection, unit: NewWork) -> Result<Enqueued, QueueError> {
    let token = unit.token.to_string();
    work_enqueue_quiet(conn, std::slice::from_ref(&unit))
        .await?
        .into_iter()
        .next()
        .ok_or(QueueError::DuplicateToken(token))
}

/// Wakes idle workers in every engine process now (a NOTIFY in its own short transaction).
///
/// # Errors
/// Database errors.
pub async fn wake_workers(pool: &sqlx::PgPool) -> Result<(), QueueError> {
    let mut conn = pool.acquire().await.map_err(StoreError::from)?;
    notify_workers(&mut conn).await?;
    Ok(())
}

/// [`wake_workers`] on a connection the caller holds (outside a transaction).
///
/// # Errors
/// Database errors.
pub async fn wake_workers_on(conn: &mut PgConnection) -> Result<(), QueueError> {
    notify_workers(conn).await?;
    Ok(())
}

/// Enqueues many units with one statement in the caller's transaction. Units whose token is
/// already queued are skipped (not returned).
///
/// # Errors
/// Database errors.
pub async fn enqueue_many(
    conn: &mut PgConnection,
    units: &[NewWork],
) -> Result<Vec<Enqueued>, QueueError> {
    Ok(work_enqueue(conn, units).await?)
}

/// [`enqueue_many`] without waking workers: call [`wake_workers`] after the commit (see
/// [`enqueue_quiet`]). Units whose token is already queued are skipped (not returned).
///
/// # Errors
/// Database errors.
pub async fn enqueue_many_quiet(
    conn: &mut PgConnection,
    units: &[NewWork],
) -> Result<Vec<Enqueued>, QueueError> {
    Ok(work_enqueue_quiet(conn, units).await?)
}

/// A unit and its history.
#[derive(Debug, Clone, Serialize)]
pub struct UnitReport {
    /// The unit's id.
    pub id: i64,
    /// The row, while the unit is unfinished.
    pub row: Option<WorkRow>,
    /// Every event, oldest first.
    pub events: Vec<WorkEvent>,
}

/// Finds a unit by id (digits) or token, with its history.
///
/// # Errors
/// [`QueueError::NotFound`] when neither the table nor the history knows it.
pub async fn show(conn: &mut PgConnection, id_or_token: &str) -> Result<UnitReport, QueueError> {
    let (id, row) = match id_or_token.parse::<i64>() {
        Ok(id) => (Some(id), work_get(conn, id).await?),
        Err(_) => match work_get_by_token(conn, id_or_token).await? {
            Some(row) => (Some(row.id), Some(row)),
            None => (work_id_for_token(conn, id_or_token).await?, None),
        },
    };
    let Some(id) = id else {
        return Err(QueueError::NotFound(id_or_token.to_owned()));
    };
    let events = events_for_work(conn, id).await?;
    if row.is_none() && events.is_empty() {
        return Err(QueueError::NotFound(id_or_token.to_owned()));
    }
    Ok(UnitReport { id, row, events })
}

/// Lists unfinished units.
///
/// # Errors
/// Database errors.
pub async fn list(
    conn: &mut PgConnection,
    filter: &WorkFilter,
) -> Result<Vec<WorkRow>, QueueError> {
    Ok(work_list(conn, filter).await?)
}

/// Units that wait because no live engine claims their kind: the count per kind, and the
/// oldest `limit` units of those kinds.
#[derive(Debug, Clone, Serialize)]
pub struct Unserved {
    /// Each unserved kind with its waiting units, by kind.
    pub kinds: Vec<UnservedKind>,
    /// The oldest waiting units of those kinds.
    pub units: Vec<WorkRow>,
}

/// One kind no live engine serves.
#[derive(Debug, Clone, Serialize)]
pub struct UnservedKind {
    /// The work kind.
    pub kind: String,
    /// How many of its units wait.
    pub units: i64,
}

/// The units no live engine serves (see [`Unserved`]), only of `kind` when given.
///
/// # Errors
/// Database errors.
pub async fn unserved(
    conn: &mut PgConnection,
    kind: Option<&str>,
    limit: i64,
) -> Result<Unserved, QueueError> {
    let kinds: Vec<UnservedKind> = units_unserved(conn)
        .await?
        .into_iter()
        .filter(|(k, _)| kind.is_none_or(|want| want == k))
        .map(|(kind, units)| UnservedKind { kind, units })
        .collect();
    let names: Vec<String> = kinds.iter().map(|k| k.kind.clone()).collect();
    let units = if names.is_empty() {
        Vec::new()
    } else {
        work_list_of_kinds(conn, &names, limit).await?
    };
    Ok(Unserved { kinds, units })
}

async fn explain_not_parked(conn: &mut PgConnection, id: i64) -> QueueError {
    match work_get(conn, id).await {
        Ok(Some(row)) => QueueError::NotParked {
            id,
            state: row.state,
        },
        Ok(None) => match events_for_work(conn, id).await {
            Ok(ev) if !ev.is_empty() => QueueError::Finished(id),
            Ok(_) => QueueError::NotFound(id.to_string()),
            Err(e) => e.into(),
        },
        Err(e) => e.into(),
    }
}

/// Makes parked unit `id` pending again (after a fix was deployed), granting it
/// `extra_attempts` more attempts, in the caller's transaction. When the unit was parked as
/// `outcome-unknown`, its side effects whose outcome is unknown (started, no result) are
/// recorded as not having happened: the operator checked the peer before retrying. A unit
/// parked for another reason keeps them open, so that its next attempt parks as
/// `outcome-unknown` and asks the operator that question first.
///
/// # Errors
/// [`QueueError::NotParked`], [`QueueError::Finished`], [`QueueError::NotFound`].
pub async fn retry_parked(
    conn: &mut PgConnection,
    hooks: &dyn UnitHooks,
    id: i64,
    operator: &str,
    extra_attempts: i32,
) -> Result<WorkRow, QueueError> {
    match work_retry_parked(conn, id, operator, extra_attempts).await? {
        Some(row) => {
            // Retrying a unit parked with "outcome unknown" is the operator's word that the
            // side effect did not happen; without this the next attempt would park again. A
            // retry after any other failure (attempts used up, say, the last one cut off in
            // the middle of a send) says nothing about the peer: resolving then could send twice.
            if last_failure_code(conn, id).await?.as_deref() == Some(OUTCOME_UNKNOWN) {
                side_effects_resolve_unknown(conn, id).await?;
            }
            if let Some(resource_id) = row.resource_id {
                let event = UnitEvent {
                    work_id: id,
                    kind: &row.kind,
                    resource_id,
                    holds_resource: row.holds_resource,
                    reason: "retried by an operator",
                    operator: Some(operator),
                };
                hooks.retried(conn, &event).await?;
            }
            Ok(row)
        }
        None => Err(explain_not_parked(conn, id).await),
    }
}

/// Removes parked unit `id` for good, recording `reason`, in the caller's transaction.
///
/// # Errors
/// [`QueueError::NotParked`], [`QueueError::Finished`], [`QueueError::NotFound`].
pub async fn cancel_parked(
    conn: &mut PgConnection,
    hooks: &dyn UnitHooks,
    id: i64,
    operator: &str,
    reason: &str,
) -> Result<WorkRow, QueueError> {
    match work_cancel_parked(conn, id, operator, reason).await? {
        Some(row) => {
            if let Some(resource_id) = row.resource_id {
                let event = UnitEvent {
                    work_id: id,
                    kind: &row.kind,
                    resource_id,
                    holds_resource: row.holds_resource,
                    reason,
                    operator: Some(operator),
                };
                hooks.cancelled(conn, &event).await?;
            }
            Ok(row)
        }
        None => Err(explain_not_parked(conn, id).await),
    }
}
