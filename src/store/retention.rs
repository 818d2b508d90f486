//! SQL of retention: pruning the history of finished units (`work_events`), expired request
//! ids (`api_requests`), journal rows of finished units (`side_effects`) and old tombstones
//! (`instances` with `deleted_at` set), plus the advisory lock that lets one engine prune at a
//! time. The rules and their reasons are in `docs/retention.md`; the service that runs these
//! statements is [`crate::maintenance::retention`].
//!
//! Every prune statement is one short transaction of its own that reads at most `batch` rows
//! through an index, in index order, after a keyset cursor the caller passes back in, and
//! deletes only rows among them (a unit's whole history, for events): so no statement holds a
//! lock on more than one batch of rows, and a round walks each table once. Each statement
//! re-checks its rule (unit gone, old enough) in the same snapshot as the delete, so a row that
//! becomes live again between two batches is never removed.
//!
//! Units that are still in `work` are looked up by primary key (`work_pkey`) or by
//! `work_resource_idx` for the ids of one batch (`= ANY(ARRAY(…))`): a plain `NOT EXISTS`
//! lets the planner hash the whole queue table with a sequential scan in every batch.
//!
//! The SQL texts are public so that a benchmark (or an operator) can `EXPLAIN` exactly what
//! runs.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::StoreError;

/// The key of the session-level advisory lock a pruning round holds (`setpoint` in ASCII,
/// with `r` for retention in the last byte), so that one engine prunes at a time. No other
/// lock of setpoint uses it; sqlx's migration lock is derived from the database name.
pub const RETENTION_LOCK_KEY: i64 = 0x7365_7470_6f69_6e72;

/// What one prune statement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneBatch<K> {
    /// Rows the statement read in index order (at most the batch size).
    pub scanned: u64,
    /// Rows it deleted.
    pub pruned: u64,
    /// The key of the last row read: the cursor of the next statement. `None` when nothing
    /// was read (the walk is over).
    pub last: Option<K>,
    /// True when the walk may stop after this statement although it read a full batch: the
    /// rows after it are all too recent (see [`work_events_prune`]).
    pub reached_recent: bool,
}

/// Takes the retention lock on `conn`'s session if no other session holds it; never waits.
///
/// # Errors
/// Database errors.
pub async fn retention_lock_try(conn: &mut PgConnection) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(RETENTION_LOCK_KEY)
        .fetch_one(conn)
        .await?)
}

/// Releases the retention lock held by `conn`'s session; false when it held none.
///
/// # Errors
/// Database errors.
pub async fn retention_unlock(conn: &mut PgConnection) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
        .bind(RETENTION_LOCK_KEY)
        .fetch_one(conn)
        .await?)
}

/// The database's clock: cut-offs are computed from it, so that an engine whose clock is off
/// does not prune early.
///
/// # Errors
/// Database errors.
pub async fn retention_now(conn: &mut PgConnection) -> Result<DateTime<Utc>, StoreError> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(conn).await?)
}

/// [`work_events_prune`]'s statement. `$1` the last unit of the previous batch (0 at first),
/// `$2` the batch size, `$3` the cut-off.
///
/// It reads the next `$2` events in unit order (`work_events_work_idx`), and deletes the
/// whole history of each unit among them that has left `work` and whose newest event is
/// older than `$3`. A unit's history goes as a whole, never in part, so `setpoint work show`
/// shows a finished unit completely or not at all; the last unit of a batch may have more
/// events than the batch read, which are deleted with it.
pub const WORK_EVENTS_PRUNE_SQL: &str = "
WITH scan AS (
    SELECT work_id, id, at FROM work_events
    WHERE work_id > $1
    ORDER BY work_id, id
    LIMIT $2
), units AS (
    SELECT DISTINCT work_id FROM scan
), live AS (
    SELECT id FROM work WHERE id = ANY (ARRAY(SELECT work_id FROM units))
), finished AS (
    SELECT u.work_id FROM units u
    WHERE u.work_id NOT IN (SELECT id FROM live)
      AND NOT EXISTS (SELECT 1 FROM work_events l WHERE l.work_id = u.work_id AND l.at >= $3)
), pruned AS (
    DELETE FROM work_events e
    WHERE e.work_id = ANY (ARRAY(SELECT work_id FROM finished))
    RETURNING 1
)
SELECT (SELECT count(*) FROM scan) AS scanned,
       (SELECT count(*) FROM pruned) AS pruned,
       (SELECT max(work_id) FROM scan) AS last,
       (SELECT at FROM scan ORDER BY work_id DESC, id LIMIT 1) AS last_unit_first_at";

/// Prunes the history of finished units: of the next `batch` events after unit
/// `after_unit`, deletes the whole history of every unit that is no longer in `work` and
/// whose newest event is older than `before`. Never an event of a unit still in `work`.
///
/// Unit ids grow with enqueue time, so the walk can stop at the first unit enqueued after
/// `before` ([`PruneBatch::reached_recent`]): no later unit can qualify, and the walk never
/// reads the recent history, which is most of the table.
///
/// # Errors
/// Database errors.
pub async fn work_events_prune(
    conn: &mut PgConnection,
    after_unit: i64,
    before: DateTime<Utc>,
    batch: i64,
) -> Result<PruneBatch<i64>, StoreError> {
    let r = sqlx::query(WORK_EVENTS_PRUNE_SQL)
        .bind(after_unit)
        .bind(batch)
        .bind(before)
        .fetch_one(conn)
        .await?;
    let first_at: Option<DateTime<Utc>> = r.try_get("last_unit_first_at")?;
    Ok(PruneBatch {
        scanned: count(r.try_get("scanned")?),
        pruned: count(r.try_get("pruned")?),
        last: r.try_get("last")?,
        reached_recent: first_at.is_some_and(|at| at >= before),
    })
}

/// [`api_requests_prune`]'s statement. `$1`, `$2` the last key of the previous batch (empty
/// strings at first: no tenant or request id is empty), `$3` the batch size, `$4` the cut-off.
/// It reads the next `$3` rows in primary-key order (`api_requests_pkey`) and deletes those
/// older than `$4` by their row address (a TID scan, not a join the planner could turn into a
/// scan of the table).
pub const API_REQUESTS_PRUNE_SQL: &str = "
WITH scan AS (
    SELECT ctid, tenant, request_id, created_at FROM api_requests
    WHERE (tenant, request_id) > ($1, $2)
    ORDER BY tenant, request_id
    LIMIT $3
), pruned AS (
    DELETE FROM api_requests a
    WHERE a.ctid = ANY (ARRAY(SELECT ctid FROM scan WHERE created_at < $4))
      AND a.created_at < $4
    RETURNING 1
), last AS (
    SELECT tenant, request_id FROM scan ORDER BY tenant DESC, request_id DESC LIMIT 1
)
SELECT (SELECT count(*) FROM scan) AS scanned,
       (SELECT count(*) FROM pruned) AS pruned,
       (SELECT tenant FROM last) AS last_tenant,
       (SELECT request_id FROM last) AS last_request_id";

/// Prunes request ids older than `before` among the next `batch` rows after key `after`
/// (`(tenant, request_id)`; `("", "")` at first). A pruned id is unknown again: the same id
/// sent later is a new request. This is what bounds the replay window.
///
/// # Errors
/// Database errors.
pub async fn api_requests_prune(
    conn: &mut PgConnection,
    after: (&str, &str),
    before: DateTime<Utc>,
    batch: i64,
) -> Result<PruneBatch<(String, String)>, StoreError> {
    let r = sqlx::query(API_REQUESTS_PRUNE_SQL)
        .bind(after.0)
        .bind(after.1)
        .bind(batch)
        .bind(before)
        .fetch_one(conn)
        .await?;
    let tenant: Option<String> = r.try_get("last_tenant")?;
    let request_id: Option<String> = r.try_get("last_request_id")?;
    Ok(PruneBatch {
        scanned: count(r.try_get("scanned")?),
        pruned: count(r.try_get("pruned")?),
        last: tenant.zip(request_id),
        reached_recent: false,
    })
}

/// [`side_effects_prune`]'s statement. `$1` the last key of the previous batch (`''` at
/// first), `$2` the batch size, `$3` the cut-off. It reads the next `$2` rows in key order
/// (`side_effects_pkey`) and deletes those whose unit is no longer in `work` (looked up by
/// `work_pkey`) and whose last change (result, else start) is older than `$3`.
pub const SIDE_EFFECTS_PRUNE_SQL: &str = "
WITH scan AS (
    SELECT ctid, key, work_id, coalesce(finished_at, started_at) AS changed_at
    FROM side_effects
    WHERE key > $1
    ORDER BY key
    LIMIT $2
), live AS (
    SELECT id FROM work WHERE id = ANY (ARRAY(SELECT work_id FROM scan WHERE work_id IS NOT NULL))
), pruned AS (
    DELETE FROM side_effects s
    WHERE s.ctid = ANY (ARRAY(
              SELECT ctid FROM scan
              WHERE changed_at < $3
                AND (work_id IS NULL OR work_id NOT IN (SELECT id FROM live))))
      AND coalesce(s.finished_at, s.started_at) < $3
    RETURNING 1
)
SELECT (SELECT count(*) FROM scan) AS scanned,
       (SELECT count(*) FROM pruned) AS pruned,
       (SELECT max(key) FROM scan) AS last";

/// Prunes journal rows among the next `batch` rows after key `after` (`""` at first): rows
/// whose unit has left `work` and whose last change is older than `before`. A row whose unit
/// is still in `work` stays whatever its age — above all a started row without a result of a
/// parked unit, which is what keeps that unit from acting twice.
///
/// # Errors
/// Database errors.
pub async fn side_effects_prune(
    conn: &mut PgConnection,
    after: &str,
    before: DateTime<Utc>,
    batch: i64,
) -> Result<PruneBatch<String>, StoreError> {
    let r = sqlx::query(SIDE_EFFECTS_PRUNE_SQL)
        .bind(after)
        .bind(batch)
        .bind(before)
        .fetch_one(conn)
        .await?;
    Ok(PruneBatch {
        scanned: count(r.try_get("scanned")?),
        pruned: count(r.try_get("pruned")?),
        last: r.try_get("last")?,
        reached_recent: false,
    })
}

/// [`tombstones_prune`]'s statement. `$1` the last id of the previous batch (the nil UUID at
/// first), `$2` the batch size, `$3` the cut-off. It reads the next `$2` instances in id
/// order (`instances_pkey`), live or not, and deletes those deleted before `$3` of which no
/// unit is left in `work` (looked up by `work_resource_idx`).
pub const TOMBSTONES_PRUNE_SQL: &str = "
WITH scan AS (
    SELECT id, deleted_at FROM instances
    WHERE id > $1
    ORDER BY id
    LIMIT $2
), old AS (
    SELECT id FROM scan WHERE deleted_at < $3
), busy AS (
    SELECT DISTINCT resource_id FROM work WHERE resource_id = ANY (ARRAY(SELECT id FROM old))
), pruned AS (
    DELETE FROM instances i
    WHERE i.id = ANY (ARRAY(SELECT id FROM old WHERE id NOT IN (SELECT resource_id FROM busy)))
      AND i.deleted_at < $3
    RETURNING 1
)
SELECT (SELECT count(*) FROM scan) AS scanned,
       (SELECT count(*) FROM pruned) AS pruned,
       (SELECT id FROM scan ORDER BY id DESC LIMIT 1) AS last";

/// Prunes tombstones among the next `batch` instances after id `after` (nil at first):
/// instances deleted before `before` of which no unit is left in `work`.
///
/// # Errors
/// Database errors.
pub async fn tombstones_prune(
    conn: &mut PgConnection,
    after: Uuid,
    before: DateTime<Utc>,
    batch: i64,
) -> Result<PruneBatch<Uuid>, StoreError> {
    let r = sqlx::query(TOMBSTONES_PRUNE_SQL)
        .bind(after)
        .bind(batch)
        .bind(before)
        .fetch_one(conn)
        .await?;
    Ok(PruneBatch {
        scanned: count(r.try_get("scanned")?),
        pruned: count(r.try_get("pruned")?),
        last: r.try_get("last")?,
        reached_recent: false,
    })
}

/// A `count(*)` (never negative) as an unsigned number.
fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
