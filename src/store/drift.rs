//! SQL of the drift schedule (migration 0023): `drift_schedule`, each resource's fixed place on
//! its kind's ring of one interval, and `drift_cursors`, per kind the time up to which checks
//! are enqueued. A round reads the places its cursor passes and writes the cursor alone, so a
//! check costs no write of a per-resource row.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreError;

/// A resource whose drift check falls in a round's window, as [`drift_due_between`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftDue {
    /// Its id.
    pub id: Uuid,
    /// Its tenant (empty when `gone`).
    pub tenant: String,
    /// Its spec generation.
    pub generation: i64,
    /// Its status (empty when `gone`).
    pub status: String,
    /// A unit holding it is queued or running.
    pub has_active_work: bool,
    /// It is deleted, or its row is pruned: it leaves the schedule.
    pub gone: bool,
}

/// A schedule row with its resource's columns (all `None` when the resource's row is pruned).
type DueRow = (
    Uuid,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<bool>,
    bool,
);

/// A kind's cursor, locked for the caller's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriftCursor {
    /// Checks are enqueued for every place passed up to this time.
    pub through: DateTime<Utc>,
    /// The database's time at the start of the transaction.
    pub now: DateTime<Utc>,
}

/// Gives at most `limit` live resources of `kinds` that have not joined the schedule a place
/// on it, at random (which spreads checks evenly over the interval). Returns how many joined.
///
/// # Errors
/// Database errors.
pub async fn drift_schedule_new(
    conn: &mut PgConnection,
    kinds: &[String],
    limit: i64,
) -> Result<u64, StoreError> {
    // `next_observe_at` marks a resource that has joined (migration 0023): set once per
    // resource, so finding the new ones stays a read of 0014's small index.
    let done = sqlx::query(
        "WITH new AS (
             SELECT id, kind FROM instances
             WHERE deleted_at IS NULL AND next_observe_at IS NULL AND kind = ANY($1)
             LIMIT $2 FOR UPDATE SKIP LOCKED
         ), marked AS (
             UPDATE instances i SET next_observe_at = now() FROM new WHERE i.id = new.id
         )
         INSERT INTO drift_schedule (resource_id, kind, phase)
         SELECT id, kind, random() FROM new
         ON CONFLICT (resource_id) DO NOTHING",
    )
    .bind(kinds)
    .bind(limit)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Places resources `ids` of `kind`, just written, on the schedule at random (the bench's
/// bulk fill; the API's resources join through [`drift_schedule_new`]).
///
/// # Errors
/// Database errors.
pub async fn drift_schedule_fill(
    conn: &mut PgConnection,
    kind: &str,
    ids: &[Uuid],
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO drift_schedule (resource_id, kind, phase)
         SELECT id, $1, random() FROM unnest($2::uuid[]) AS u(id)
         ON CONFLICT (resource_id) DO NOTHING",
    )
    .bind(kind)
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// Locks `kind`'s cursor until the caller's transaction ends. `None` when another engine holds
/// it (that engine is enqueuing this kind's checks), or when the kind had no cursor: it is
/// made at the database's time, so checks start from now.
///
/// # Errors
/// Database errors.
pub async fn drift_cursor_lock(
    conn: &mut PgConnection,
    kind: &str,
) -> Result<Option<DriftCursor>, StoreError> {
    let row: Option<(DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT through, now() FROM drift_cursors WHERE kind = $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(kind)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((through, now)) = row {
        return Ok(Some(DriftCursor { through, now }));
    }
    // A locked row is committed, so this does not wait for its holder.
    sqlx::query(
        "INSERT INTO drift_cursors (kind, through) VALUES ($1, now()) ON CONFLICT (kind) DO NOTHING",
    )
    .bind(kind)
    .execute(conn)
    .await?;
    Ok(None)
}

/// Moves `kind`'s cursor (locked by [`drift_cursor_lock`] in this transaction) to `through`.
///
/// # Errors
/// Database errors.
pub async fn drift_cursor_advance(
    conn: &mut PgConnection,
    kind: &str,
    through: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE drift_cursors SET through = $2 WHERE kind = $1")
        .bind(kind)
        .bind(through)
        .execute(conn)
        .await?;
    Ok(())
}

/// The resources of `kind` whose place is in `[from, to)` (fractions of the interval,
/// `0 ≤ from < to ≤ 1`), with what decides whether each is checked.
///
/// # Errors
/// Database errors.
pub async fn drift_due_between(
    conn: &mut PgConnection,
    kind: &str,
    from: f64,
    to: f64,
) -> Result<Vec<DriftDue>, StoreError> {
    let rows: Vec<DueRow> = sqlx::query_as(
        "SELECT s.resource_id, i.tenant, i.generation, i.status, i.has_active_work,
                    i.id IS NULL OR i.deleted_at IS NOT NULL
             FROM drift_schedule s LEFT JOIN instances i ON i.id = s.resource_id
             WHERE s.kind = $1 AND s.phase >= $2 AND s.phase < $3",
    )
    .bind(kind)
    .bind(from)
    .bind(to)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, tenant, generation, status, has_active_work, gone)| DriftDue {
                id,
                tenant: tenant.unwrap_or_default(),
                generation: generation.unwrap_or_default(),
                status: status.unwrap_or_default(),
                has_active_work: has_active_work.unwrap_or_default(),
                gone,
            },
        )
        .collect())
}

/// Removes resources `ids` from the schedule (they are deleted or pruned).
///
/// # Errors
/// Database errors.
pub async fn drift_schedule_forget(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM drift_schedule WHERE resource_id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}
