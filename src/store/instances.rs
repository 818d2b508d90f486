//! SQL of the `instances` table that the work life cycle owns: recording what workers
//! observed, and clearing `has_active_work` when a resource's chain of units ends.

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreError;

/// Merges `observed` (a JSON object) into the instance's observed state.
pub async fn instance_merge_observed(
    conn: &mut PgConnection,
    id: Uuid,
    observed: &Value,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE instances SET observed = observed || $2::jsonb, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(observed)
    .execute(conn)
    .await?;
    Ok(())
}

/// Clears `has_active_work` on those of `ids` that have no unit left pending or running.
/// Parked units do not count: a parked chain has ended and waits for an operator.
pub async fn instances_clear_active_work(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE instances i SET has_active_work = false, updated_at = now()
         WHERE i.id = ANY($1) AND i.has_active_work
           AND NOT EXISTS (SELECT 1 FROM work w WHERE w.resource_id = i.id AND w.state <> 'parked')",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks the instance as having active work (an operator retried its parked unit).
pub async fn instance_mark_active(conn: &mut PgConnection, id: Uuid) -> Result<(), StoreError> {
    sqlx::query("UPDATE instances SET has_active_work = true, updated_at = now() WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}
