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
    /// Nothing recorded, and nothing recorded now: the attempt no longer holds its unit.
    NotHeld,
}

/// The attempt on whose behalf a side effect is recorded: only an attempt that still holds
/// its unit (same attempt, same lease owner, lease not expired) may start one.
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    /// The unit.
    pub work_id: i64,
    /// Its attempt.
    pub attempt: i32,
    /// The worker holding the lease.
    pub worker: &'a str,
    /// The unit's token.
    pub token: &'a str,
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
/// exists, which is returned instead. Fenced: nothing is recorded unless `holder` still holds
/// its unit, so an attempt that lost its lease can never open a side effect (and therefore
/// never make it: the caller acts only after a [`SideEffectState::Fresh`]).
pub async fn side_effect_begin(
    pool: &PgPool,
    key: &str,
    holder: Holder<'_>,
) -> Result<SideEffectState, StoreError> {
    let (inserted, held): (bool, bool) = sqlx::query_as(
        "WITH held AS (
             SELECT 1 FROM work
             WHERE id = $2 AND attempt = $4 AND lease_owner = $5 AND lease_expires_at > now()
         ), ins AS (
             INSERT INTO side_effects (key, work_id, token)
             SELECT $1, $2, $3 FROM held
             ON CONFLICT (key) DO NOTHING RETURNING key
         )
         SELECT EXISTS (SELECT 1 FROM ins), EXISTS (SELECT 1 FROM held)",
    )
    .bind(key)
    .bind(holder.work_id)
    .bind(holder.token)
    .bind(holder.attempt)
    .bind(holder.worker)
    .fetch_one(pool)
    .await?;
    if inserted {
        return Ok(SideEffectState::Fresh);
    }
    if !held && side_effect_find(pool, key).await?.is_none() {
        return Ok(SideEffectState::NotHeld);
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
