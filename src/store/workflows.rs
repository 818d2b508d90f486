//! SQL the KVX workflows need beyond the work life cycle: reading an instance's observed state
//! for a step that starts from it, the conditions written when a chain ends parked, and the
//! periodic resync's pick of instances to observe.

use serde_json::Value;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::StoreError;

/// What a workflow step reads of an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceFacts {
    /// The instance id.
    pub id: Uuid,
    /// Owning tenant.
    pub tenant: String,
    /// Short name.
    pub name: String,
    /// Desired spec.
    pub spec: Value,
    /// Version of the spec.
    pub generation: i64,
    /// What workers observed.
    pub observed: Value,
}

fn facts(r: sqlx::postgres::PgRow) -> Result<InstanceFacts, StoreError> {
    Ok(InstanceFacts {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        name: r.try_get("name")?,
        spec: r.try_get("spec")?,
        generation: r.try_get("generation")?,
        observed: r.try_get("observed")?,
    })
}

/// The facts of instance `id`, live or deleted; with `lock`, the row stays locked until the
/// transaction ends.
pub async fn instance_facts_get(
    conn: &mut PgConnection,
    id: Uuid,
    lock: bool,
) -> Result<Option<InstanceFacts>, StoreError> {
    let sql = if lock {
        "SELECT id, tenant, name, spec, generation, observed FROM instances WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT id, tenant, name, spec, generation, observed FROM instances WHERE id = $1"
    };
    sqlx::query(sql)
        .bind(id)
        .fetch_optional(conn)
        .await?
        .map(facts)
        .transpose()
}

/// Replaces the `conditions` key of instance `id`'s observed state (and mirrors it into the
/// `conditions` column).
pub async fn instance_conditions_set(
    conn: &mut PgConnection,
    id: Uuid,
    conditions: &Value,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE instances SET observed = observed || jsonb_build_object('conditions', $2::jsonb),
                conditions = $2::jsonb, updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(conditions)
    .execute(conn)
    .await?;
    Ok(())
}

/// Picks at most `limit` instances that are `READY`, live and idle (no unit of theirs in the
/// work table), marks them active so that nobody else picks them (and the API refuses changes
/// while they are observed), and returns them. Rows locked by another transaction are skipped,
/// so engines resyncing at the same moment never pick the same instance.
pub async fn resync_claim_ready(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<InstanceFacts>, StoreError> {
    let rows = sqlx::query(
        "WITH due AS (
             SELECT i.id FROM instances i
             WHERE i.status = 'READY' AND i.deleted_at IS NULL AND NOT i.has_active_work
               AND NOT EXISTS (SELECT 1 FROM work w WHERE w.resource_id = i.id)
             ORDER BY i.updated_at, i.id
             LIMIT $1
             FOR UPDATE OF i SKIP LOCKED)
         UPDATE instances i SET has_active_work = true
         FROM due WHERE i.id = due.id
         RETURNING i.id, i.tenant, i.name, i.spec, i.generation, i.observed",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(facts).collect()
}

/// How many of the embedded migrations ([`super::MIGRATOR`]) are not applied to the database
/// yet (0 when it is up to date), for readiness checks.
///
/// # Errors
/// Database errors (unreachable, no migrations table yet counts as all pending).
pub async fn migrations_pending(conn: &mut PgConnection) -> Result<usize, StoreError> {
    let applied: Vec<i64> =
        match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&mut *conn)
            .await
        {
            Ok(v) => v,
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Vec::new(),
            Err(e) => return Err(e.into()),
        };
    Ok(super::MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .filter(|m| !applied.contains(&m.version))
        .count())
}
