//! SQL of the orphan sweep: its two tables (made by the EC2 plugin's own migration), the
//! advisory lock that lets one engine sweep at a time, and what `setpoint work orphans` reads.
//!
//! - `orphan_machines`: one row per managed machine the last sweep of its region found
//!   belonging to no live resource, or extra to one (and, for a week, the ones it terminated).
//! - `orphan_sweeps`: one row per region: when it was last swept, what was found, what failed.
//!
//! Both stay small: a row per orphan, a row per region. Rows of machines a sweep no longer
//! finds are deleted by that sweep; terminated ones a week after.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::plugin::PluginMigration;
use crate::store::StoreError;

/// The key of the session-level advisory lock a sweep holds (`setpoint` in ASCII, with `o`
/// for orphans in the last byte), so that one engine sweeps at a time. Retention's key ends in
/// `r`; no other lock of setpoint uses this one.
pub const ORPHAN_LOCK_KEY: i64 = 0x7365_7470_6f69_6e6f;

/// The EC2 plugin's migrations: the sweep's tables.
pub fn migrations() -> Vec<PluginMigration> {
    vec![PluginMigration {
        version: 1,
        description: "orphan machines".into(),
        sql: "CREATE TABLE IF NOT EXISTS orphan_machines (
                  region        text        NOT NULL,
                  instance_id   text        NOT NULL,
                  state         text        NOT NULL,
                  resource_id   uuid,
                  tenant        text,
                  launch_token  text,
                  launched_at   timestamptz,
                  reason        text        NOT NULL,
                  action        text        NOT NULL,
                  note          text,
                  first_seen_at timestamptz NOT NULL DEFAULT now(),
                  last_seen_at  timestamptz NOT NULL DEFAULT now(),
                  PRIMARY KEY (region, instance_id)
              );
              CREATE TABLE IF NOT EXISTS orphan_sweeps (
                  region     text        PRIMARY KEY,
                  swept_at   timestamptz NOT NULL,
                  machines   integer     NOT NULL,
                  orphans    integer     NOT NULL,
                  terminated integer     NOT NULL,
                  error      text
              );"
        .into(),
    }]
}

/// One orphaned machine as the sweep records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrphanRow {
    /// The region it runs in.
    pub region: String,
    /// The provider's id (`i-…`).
    pub instance_id: String,
    /// Its state when last seen (`running`, `stopped`, …).
    pub state: String,
    /// The resource its tag names, if the tag holds a resource id.
    pub resource_id: Option<Uuid>,
    /// The tenant its tag names.
    pub tenant: Option<String>,
    /// The token that launched it, from its tag.
    pub launch_token: Option<String>,
    /// When the provider says it was launched.
    pub launched_at: Option<DateTime<Utc>>,
    /// Why it is an orphan: `unknown-resource`, `extra`, `deleted-resource` or `untagged`.
    pub reason: String,
    /// What the sweep did: `reported`, `waiting` (terminable once old enough), `held` (more
    /// than the limit would have been terminated), `terminated` or `failed`.
    pub action: String,
    /// Why, for `waiting`, `held` and `failed`.
    pub note: Option<String>,
    /// When a sweep first found it.
    pub first_seen_at: DateTime<Utc>,
    /// When a sweep last found it.
    pub last_seen_at: DateTime<Utc>,
}

/// A region's last sweep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SweepRow {
    /// The region.
    pub region: String,
    /// When it ended.
    pub swept_at: DateTime<Utc>,
    /// Managed machines it listed.
    pub machines: i32,
    /// Orphans among them.
    pub orphans: i32,
    /// Orphans it terminated.
    pub terminated: i32,
    /// Why the region could not be swept, if it could not (its rows are then the previous
    /// sweep's).
    pub error: Option<String>,
}

/// Takes the sweep lock on `conn`'s session if no other session holds it; never waits.
///
/// # Errors
/// Database errors.
pub async fn orphan_lock_try(conn: &mut PgConnection) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(ORPHAN_LOCK_KEY)
        .fetch_one(conn)
        .await?)
}

/// The database's clock: a machine's age is counted from it, so that an engine whose clock
/// runs ahead does not call a machine old early.
///
/// # Errors
/// Database errors.
pub async fn orphan_now(conn: &mut PgConnection) -> Result<DateTime<Utc>, StoreError> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(conn).await?)
}

/// Records what the sweep of `region` found: `orphans` replace that region's rows (rows of
/// machines no longer found are deleted, terminated ones a week after), and the sweep's row.
///
/// # Errors
/// Database errors; nothing is written then.
pub async fn orphans_record(
    conn: &mut PgConnection,
    sweep: &SweepRow,
    orphans: &[OrphanRow],
) -> Result<(), StoreError> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    for o in orphans {
        sqlx::query(
            "INSERT INTO orphan_machines (region, instance_id, state, resource_id, tenant,
                 launch_token, launched_at, reason, action, note, first_seen_at, last_seen_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11)
             ON CONFLICT (region, instance_id) DO UPDATE SET
                 state = EXCLUDED.state, resource_id = EXCLUDED.resource_id,
                 tenant = EXCLUDED.tenant, launch_token = EXCLUDED.launch_token,
                 launched_at = EXCLUDED.launched_at, reason = EXCLUDED.reason,
                 action = EXCLUDED.action, note = EXCLUDED.note,
                 last_seen_at = EXCLUDED.last_seen_at",
        )
        .bind(&o.region)
        .bind(&o.instance_id)
        .bind(&o.state)
        .bind(o.resource_id)
        .bind(&o.tenant)
        .bind(&o.launch_token)
        .bind(o.launched_at)
        .bind(&o.reason)
        .bind(&o.action)
        .bind(&o.note)
        .bind(o.last_seen_at)
        .execute(&mut *tx)
        .await?;
    }
    let found: Vec<&str> = orphans.iter().map(|o| o.instance_id.as_str()).collect();
    // Terminated machines stay listed for a week after their last sweep.
    sqlx::query(
        "DELETE FROM orphan_machines
          WHERE region = $1 AND NOT (instance_id = ANY($2))
            AND (action <> 'terminated' OR last_seen_at < now() - interval '7 days')",
    )
    .bind(&sweep.region)
    .bind(&found)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO orphan_sweeps (region, swept_at, machines, orphans, terminated, error)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (region) DO UPDATE SET swept_at = EXCLUDED.swept_at,
             machines = EXCLUDED.machines, orphans = EXCLUDED.orphans,
             terminated = EXCLUDED.terminated, error = EXCLUDED.error",
    )
    .bind(&sweep.region)
    .bind(sweep.swept_at)
    .bind(sweep.machines)
    .bind(sweep.orphans)
    .bind(sweep.terminated)
    .bind(&sweep.error)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Records that `region` could not be swept (its orphan rows stay as the last sweep left
/// them).
///
/// # Errors
/// Database errors.
pub async fn orphans_record_failure(
    conn: &mut PgConnection,
    region: &str,
    at: DateTime<Utc>,
    error: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO orphan_sweeps (region, swept_at, machines, orphans, terminated, error)
         VALUES ($1, $2, 0, 0, 0, $3)
         ON CONFLICT (region) DO UPDATE SET swept_at = EXCLUDED.swept_at, error = EXCLUDED.error",
    )
    .bind(region)
    .bind(at)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// What the database records of a live resource, as the sweep needs it to tell an `extra`
/// machine of the resource from its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveRecord {
    /// The machines its record names: the `instance_id` of each output (KVX's `machine`) and
    /// `ec2_instance_id` (the `ec2.ensure-instance` kind); empty ids left out.
    pub machines: Vec<String>,
    /// True when no unit holds the resource (`has_active_work` is false and no unit of it that
    /// holds its resource is left, parked ones included): nothing is launching or replacing its
    /// machine, so the record is what it has.
    pub settled: bool,
}

impl LiveRecord {
    /// Whether `machine`, carrying this resource's tag, is an extra one: the record is settled,
    /// names at least one machine, and not `machine`.
    pub fn is_extra(&self, machine: &str) -> bool {
        self.settled && !self.machines.is_empty() && !self.machines.iter().any(|m| m == machine)
    }
}

/// The records of the live (not deleted) resources among `ids`; deleted and unknown ids are
/// left out.
///
/// # Errors
/// Database errors.
pub async fn orphans_live_records(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, LiveRecord)>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT i.id,
                ARRAY(SELECT o.value->>'instance_id'
                        FROM jsonb_each(CASE WHEN jsonb_typeof(i.observed) = 'object'
                                             THEN i.observed ELSE '{}'::jsonb END) o
                       WHERE jsonb_typeof(o.value) = 'object'
                         AND jsonb_typeof(o.value->'instance_id') = 'string'
                         AND o.value->>'instance_id' <> ''
                      UNION ALL
                      SELECT i.observed->>'ec2_instance_id'
                       WHERE jsonb_typeof(i.observed->'ec2_instance_id') = 'string'
                         AND i.observed->>'ec2_instance_id' <> '') AS machines,
                NOT i.has_active_work
                  AND NOT EXISTS (SELECT 1 FROM work w
                                   WHERE w.resource_id = i.id AND w.holds_resource) AS settled
           FROM instances i
          WHERE i.id = ANY($1) AND i.deleted_at IS NULL",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("id")?,
                LiveRecord {
                    machines: r.try_get("machines")?,
                    settled: r.try_get("settled")?,
                },
            ))
        })
        .collect()
}

/// Live orphans (all but the terminated) per region, for the gauge.
///
/// # Errors
/// Database errors.
pub async fn orphans_per_region(conn: &mut PgConnection) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = sqlx::query(
        "SELECT region, count(*) FILTER (WHERE action <> 'terminated') AS n
           FROM orphan_machines GROUP BY region ORDER BY region",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("region")?, r.try_get("n")?)))
        .collect()
}

/// Whether the sweep's tables exist (an engine with the EC2 plugin made them).
///
/// # Errors
/// Database errors.
pub async fn orphan_tables_exist(conn: &mut PgConnection) -> Result<bool, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT to_regclass('orphan_machines') IS NOT NULL")
            .fetch_one(conn)
            .await?,
    )
}

/// Every recorded orphan, by region and machine.
///
/// # Errors
/// Database errors (among them: the tables do not exist).
pub async fn orphans_list(conn: &mut PgConnection) -> Result<Vec<OrphanRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT region, instance_id, state, resource_id, tenant, launch_token, launched_at,
                reason, action, note, first_seen_at, last_seen_at
           FROM orphan_machines ORDER BY region, instance_id",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(OrphanRow {
                region: r.try_get("region")?,
                instance_id: r.try_get("instance_id")?,
                state: r.try_get("state")?,
                resource_id: r.try_get("resource_id")?,
                tenant: r.try_get("tenant")?,
                launch_token: r.try_get("launch_token")?,
                launched_at: r.try_get("launched_at")?,
                reason: r.try_get("reason")?,
                action: r.try_get("action")?,
                note: r.try_get("note")?,
                first_seen_at: r.try_get("first_seen_at")?,
                last_seen_at: r.try_get("last_seen_at")?,
            })
        })
        .collect()
}

/// Every region's last sweep, by region.
///
/// # Errors
/// Database errors (among them: the tables do not exist).
pub async fn sweeps_list(conn: &mut PgConnection) -> Result<Vec<SweepRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT region, swept_at, machines, orphans, terminated, error
           FROM orphan_sweeps ORDER BY region",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(SweepRow {
                region: r.try_get("region")?,
                swept_at: r.try_get("swept_at")?,
                machines: r.try_get("machines")?,
                orphans: r.try_get("orphans")?,
                terminated: r.try_get("terminated")?,
                error: r.try_get("error")?,
            })
        })
        .collect()
}
