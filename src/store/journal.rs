//! SQL of the `side_effects` table: the durable at-most-once journal adapters use for side
//! effects no peer makes idempotent (see `setpoint_adapter::Journal`).

use serde_json::Value;
use sqlx::PgPool;

use super::StoreError;

/// What the table held for a key before [`side_effect_begin`].
#[derive(Debug, Clone, PartialEq)]
pub enum SideEffectState {
    /// Nothing: the start is now recorded.
    Fresh,
    /// Started earlier, no result recorded.
    Started,
    /// Finished earlier with this result.
    Finished(Value),
}

/// What the table holds for a key, as [`side_effect_find`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum SideEffectRecord {
    /// Started, no result recorded.
    Started,
    /// Finished with this result.
    Finished(Value),
}

/// Records that side effect `key` starts now, committed at once (autocommit), unless a record
/// exists, which is returned instead.
pub async fn side_effect_begin(
    pool: &PgPool,
    key: &str,
    work_id: i64,
    token: &str,
) -> Result<SideEffectState, StoreError> {
    let inserted: Option<String> = sqlx::query_scalar(
        "INSERT INTO side_effects (key, work_id, token) VALUES ($1, $2, $3)
         ON CONFLICT (key) DO NOTHING RETURNING key",
    )
    .bind(key)
    .bind(work_id)
    .bind(token)
    .fetch_optional(pool)
    .await?;
    if inserted.is_some() {
        return Ok(SideEffectState::Fresh);
    }
    // The record exists. Should it vanish before this read (a retention job, say), "started"
    // is the answer that never lets a caller act twice.
    Ok(match side_effect_find(pool, key).await? {
        Some(SideEffectRecord::Finished(v)) => SideEffectState::Finished(v),
        Some(SideEffectRecord::Started) | None => SideEffectState::Started,
    })
}

/// Reads the record of side effect `key`, if any; changes nothing.
pub async fn side_effect_find(
    pool: &PgPool,
    key: &str,
) -> Result<Option<SideEffectRecord>, StoreError> {
    let result: Option<Option<Value>> =
        sqlx::query_scalar("SELECT result FROM side_effects WHERE key = $1")
            .bind(key)
            .fetch_optional(pool)
            .await?;
    Ok(result.map(|r| match r {
        Some(v) => SideEffectRecord::Finished(v),
        None => SideEffectRecord::Started,
    }))
}

/// Records the result of side effect `key`, committed at once.
pub async fn side_effect_finish(
    pool: &PgPool,
    key: &str,
    result: &Value,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO side_effects (key, finished_at, result) VALUES ($1, now(), $2)
         ON CONFLICT (key) DO UPDATE SET finished_at = now(), result = EXCLUDED.result",
    )
    .bind(key)
    .bind(result)
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks every side effect of unit `work_id` that started and recorded no result as not having
/// happened (`{"sent": false, "resolved_by": "operator"}`), in the caller's transaction. An
/// operator retrying a unit parked with "outcome unknown" asserts exactly that (after checking
/// the peer), so the next attempt may act once more. Returns how many records were resolved.
pub async fn side_effects_resolve_unknown(
    conn: &mut sqlx::PgConnection,
    work_id: i64,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE side_effects
         SET finished_at = now(), result = '{\"sent\": false, \"resolved_by\": \"operator\"}'::jsonb
         WHERE work_id = $1 AND result IS NULL",
    )
    .bind(work_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
