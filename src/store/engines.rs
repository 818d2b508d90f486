//! SQL of the `engines` table: every engine process says what it serves (work kinds, resource
//! kinds, regions) and that it is alive. The API refuses what no live engine serves; a unit no
//! live engine serves waits, and shows as unserved.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::StoreError;

/// How long after its last heartbeat an engine still counts as live.
pub const LIVE_FOR_SECS: i64 = 60;

/// What an engine serves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EngineRecord {
    /// The engine's id (its worker id).
    pub id: String,
    /// Its release.
    pub version: String,
    /// The work kinds it claims.
    pub kinds: Vec<String>,
    /// The resource kinds it declares.
    pub resource_kinds: Vec<String>,
    /// The regions it serves.
    pub regions: Vec<String>,
}

/// Records (or renews) engine `e` as started and live now.
pub async fn engine_register(conn: &mut PgConnection, e: &EngineRecord) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO engines (id, version, kinds, resource_kinds, regions)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (id) DO UPDATE SET version = $2, kinds = $3, resource_kinds = $4,
             regions = $5, started_at = now(), heartbeat_at = now(), stopped_at = NULL",
    )
    .bind(&e.id)
    .bind(&e.version)
    .bind(&e.kinds)
    .bind(&e.resource_kinds)
    .bind(&e.regions)
    .execute(conn)
    .await?;
    Ok(())
}

/// Engine `id` is alive. Returns false when its row is gone (pruned while it was cut off):
/// the caller registers again.
pub async fn engine_heartbeat(conn: &mut PgConnection, id: &str) -> Result<bool, StoreError> {
    let done =
        sqlx::query("UPDATE engines SET heartbeat_at = now(), stopped_at = NULL WHERE id = $1")
            .bind(id)
            .execute(conn)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// Engine `id` stopped.
pub async fn engine_stopped(conn: &mut PgConnection, id: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE engines SET stopped_at = now() WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// A live engine, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveEngine {
    /// What it serves.
    pub record: EngineRecord,
    /// When it last said it is alive.
    pub heartbeat_at: DateTime<Utc>,
}

/// A row of `engines` as listed: id, version, kinds, resource kinds, regions, heartbeat.
type EngineRow = (
    String,
    String,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    DateTime<Utc>,
);

/// The engines alive now (a heartbeat in the last [`LIVE_FOR_SECS`], not stopped).
pub async fn engines_live(conn: &mut PgConnection) -> Result<Vec<LiveEngine>, StoreError> {
    let rows: Vec<EngineRow> = sqlx::query_as(
        "SELECT id, version, kinds, resource_kinds, regions, heartbeat_at FROM engines
             WHERE stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1)
             ORDER BY id",
    )
    .bind(LIVE_FOR_SECS as f64)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, version, kinds, resource_kinds, regions, heartbeat_at)| LiveEngine {
                record: EngineRecord {
                    id,
                    version,
                    kinds,
                    resource_kinds,
                    regions,
                },
                heartbeat_at,
            },
        )
        .collect())
}

/// The regions in which live engines serve resource kind `kind`, sorted.
pub async fn regions_served(
    conn: &mut PgConnection,
    kind: &str,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT r FROM engines, unnest(regions) AS r
         WHERE stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1)
           AND $2 = ANY(resource_kinds)
         ORDER BY r",
    )
    .bind(LIVE_FOR_SECS as f64)
    .bind(kind)
    .fetch_all(conn)
    .await?)
}

/// True when a live engine declares resource kind `kind`.
pub async fn kind_served(conn: &mut PgConnection, kind: &str) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM engines
                        WHERE stopped_at IS NULL
                          AND heartbeat_at > now() - make_interval(secs => $1)
                          AND $2 = ANY(resource_kinds))",
    )
    .bind(LIVE_FOR_SECS as f64)
    .bind(kind)
    .fetch_one(conn)
    .await?)
}

/// Units waiting that no live engine claims, by kind: (kind, count). Reads the kinds with
/// due units one index descent each (a skip scan of work_claim_idx), so a large backlog costs
/// one count per unserved kind only.
pub async fn units_unserved(conn: &mut PgConnection) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(sqlx::query_as(
        "WITH RECURSIVE kinds(kind) AS (
             (SELECT kind FROM work WHERE state IN ('pending', 'queued') ORDER BY kind LIMIT 1)
             UNION ALL
             SELECT (SELECT w.kind FROM work w
                     WHERE w.state IN ('pending', 'queued') AND w.kind > k.kind
                     ORDER BY w.kind LIMIT 1)
             FROM kinds k WHERE k.kind IS NOT NULL
         ), served AS (
             SELECT DISTINCT unnest(kinds) AS kind FROM engines
             WHERE stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1)
         )
         SELECT k.kind, (SELECT count(*) FROM work w
                         WHERE w.kind = k.kind AND w.state IN ('pending', 'queued'))
         FROM kinds k
         WHERE k.kind IS NOT NULL AND k.kind NOT IN (SELECT kind FROM served)
         ORDER BY k.kind",
    )
    .bind(LIVE_FOR_SECS as f64)
    .fetch_all(conn)
    .await?)
}
