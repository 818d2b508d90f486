//! SQL of the `work_events` table: the append-only history of every unit. Rows are written by
//! the statements in [`super::work`] that change a unit; this module reads them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::StoreError;

/// Writes the history a finished create leaves behind (`enqueued`, `claimed`, `succeeded`)
/// for units `-from` down to `-(from + n - 1)`: negative ids, which the table's id sequence
/// never hands out, so they never mix with real units (for `setpoint bench scale`, whose
/// resources are written in bulk and must carry the history of their creation).
///
/// # Errors
/// Database errors.
pub async fn events_fill_history(
    conn: &mut PgConnection,
    from: i64,
    n: i64,
    worker: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO work_events (work_id, token, event, attempt, worker, detail)
         SELECT -g, 'bench-fill-' || g, e.event, CASE WHEN e.event = 'enqueued' THEN NULL ELSE 1 END,
                CASE WHEN e.event = 'enqueued' THEN NULL ELSE $3 END,
                CASE WHEN e.event = 'succeeded'
                     THEN jsonb_build_object('duration_ms', 50, 'calls', jsonb_build_array('bench.apply'))
                END
         FROM generate_series($1::bigint, $1::bigint + $2::bigint - 1) g,
              unnest(ARRAY['enqueued', 'claimed', 'succeeded']) AS e(event)",
    )
    .bind(from)
    .bind(n)
    .bind(worker)
    .execute(conn)
    .await?;
    Ok(())
}

/// One event in a unit's history.
#[derive(Debug, Clone, Serialize)]
pub struct WorkEvent {
    /// Event id (orders events).
    pub id: i64,
    /// The unit.
    pub work_id: i64,
    /// The unit's token.
    pub token: String,
    /// `enqueued`, `claimed`, `rescued`, `succeeded`, `failed`, `parked`, `retried`,
    /// `cancelled`.
    pub event: String,
    /// The attempt it belongs to.
    pub attempt: Option<i32>,
    /// The worker (or operator) that wrote it.
    pub worker: Option<String>,
    /// `transient` or `permanent`, for failures.
    pub error_class: Option<String>,
    /// A message a person can read.
    pub message: Option<String>,
    /// Extra facts: adapter calls made with the token, backoff, parent.
    pub detail: Option<Value>,
    /// When it happened.
    pub at: DateTime<Utc>,
}

/// The history of unit `work_id`, oldest first.
pub async fn events_for_work(
    conn: &mut PgConnection,
    work_id: i64,
) -> Result<Vec<WorkEvent>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, work_id, token, event, attempt, worker, error_class, message, detail, at
         FROM work_events WHERE work_id = $1 ORDER BY id",
    )
    .bind(work_id)
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(event_row).collect()
}

/// The error code (`detail.code`) of unit `work_id`'s latest failure, if it failed and its
/// adapter gave one.
pub async fn last_failure_code(
    conn: &mut PgConnection,
    work_id: i64,
) -> Result<Option<String>, StoreError> {
    let code: Option<Option<String>> = sqlx::query_scalar(
        "SELECT detail->>'code' FROM work_events WHERE work_id = $1 AND event = 'failed'
         ORDER BY id DESC LIMIT 1",
    )
    .bind(work_id)
    .fetch_optional(conn)
    .await?;
    Ok(code.flatten())
}

/// The id of the unit that carried `token`, from its history (the work row may be gone).
pub async fn work_id_for_token(
    conn: &mut PgConnection,
    token: &str,
) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT work_id FROM work_events WHERE token = $1 AND event = 'enqueued' LIMIT 1",
    )
    .bind(token)
    .fetch_optional(conn)
    .await?)
}

/// The ids of resource `resource_id`'s units, newest first, below `before` (a page's cursor),
/// at most `limit`: those whose `enqueued` event names the resource (finished or not) and
/// those still in the work table (which covers units enqueued before events named resources).
pub async fn resource_work_ids(
    conn: &mut PgConnection,
    resource_id: Uuid,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM (
             (SELECT work_id AS id FROM work_events
              WHERE resource_id = $1 AND ($2::bigint IS NULL OR work_id < $2)
              ORDER BY work_id DESC LIMIT $3)
             UNION
             (SELECT id FROM work
              WHERE resource_id = $1 AND ($2::bigint IS NULL OR id < $2)
              ORDER BY id DESC LIMIT $3)
         ) u ORDER BY id DESC LIMIT $3",
    )
    .bind(resource_id)
    .bind(before)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// The work kinds of units `work_ids`, from their `enqueued` events (units enqueued before
/// events named kinds have none).
pub async fn work_kinds(
    conn: &mut PgConnection,
    work_ids: &[i64],
) -> Result<Vec<(i64, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT work_id, kind FROM work_events
         WHERE work_id = ANY($1) AND event = 'enqueued' AND kind IS NOT NULL",
    )
    .bind(work_ids)
    .fetch_all(conn)
    .await?)
}

/// The histories of units `work_ids`, by unit, each oldest first.
pub async fn events_for_works(
    conn: &mut PgConnection,
    work_ids: &[i64],
) -> Result<Vec<WorkEvent>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, work_id, token, event, attempt, worker, error_class, message, detail, at
         FROM work_events WHERE work_id = ANY($1) ORDER BY work_id, id",
    )
    .bind(work_ids)
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(event_row).collect()
}

fn event_row(r: sqlx::postgres::PgRow) -> Result<WorkEvent, StoreError> {
    Ok(WorkEvent {
        id: r.try_get("id")?,
        work_id: r.try_get("work_id")?,
        token: r.try_get("token")?,
        event: r.try_get("event")?,
        attempt: r.try_get("attempt")?,
        worker: r.try_get("worker")?,
        error_class: r.try_get("error_class")?,
        message: r.try_get("message")?,
        detail: r.try_get("detail")?,
        at: r.try_get("at")?,
    })
}
