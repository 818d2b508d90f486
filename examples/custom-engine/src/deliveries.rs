//! SQL of the plugin's table `webhook_deliveries`: one row per POST the endpoint answered.
//!
//! The table is the plugin's own, made by its own migration ([`migrations`]), which the engine
//! applies at start-up and records in `_setpoint_plugin_webhook_migrations`, apart from the
//! core's migrations. Rows older than the configured retention are deleted as new ones come
//! ([`prune`]), so the table does not grow forever.

use chrono::{DateTime, Utc};
use setpoint::plugin::PluginMigration;
use setpoint::store::StoreError;
use sqlx::{PgPool, Row};

/// The plugin's migrations, in version order. Forward-only: a release adds a migration, it
/// never edits one that shipped.
pub fn migrations() -> Vec<PluginMigration> {
    vec![PluginMigration {
        version: 1,
        description: "webhook deliveries".into(),
        sql: "
CREATE TABLE webhook_deliveries (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    work_id         bigint      NOT NULL,
    token           text        NOT NULL,
    idempotency_key text        NOT NULL,
    tenant          text,
    event           text        NOT NULL,
    attempt         integer     NOT NULL,
    status_code     integer     NOT NULL,
    answered_at     timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    CONSTRAINT webhook_deliveries_delivered_2xx
        CHECK (delivered_at IS NULL OR status_code BETWEEN 200 AND 299)
);
-- Find before make: at most one accepted POST per unit, found by the unit's token.
CREATE UNIQUE INDEX webhook_deliveries_accepted_key
    ON webhook_deliveries (token) WHERE delivered_at IS NOT NULL;
-- ListDeliveries: a tenant's newest first.
CREATE INDEX webhook_deliveries_tenant_idx
    ON webhook_deliveries (tenant, id DESC) WHERE tenant IS NOT NULL;
-- Retention.
CREATE INDEX webhook_deliveries_answered_idx ON webhook_deliveries (answered_at);
"
        .into(),
    }]
}

/// An answered POST, to record.
#[derive(Debug, Clone)]
pub struct NewDelivery<'a> {
    /// The unit of work.
    pub work_id: i64,
    /// The unit's token.
    pub token: &'a str,
    /// The `Idempotency-Key` sent.
    pub idempotency_key: &'a str,
    /// The unit's tenant, if it has one.
    pub tenant: Option<&'a str>,
    /// The notification's event.
    pub event: &'a str,
    /// The unit's attempt.
    pub attempt: i32,
    /// The endpoint's HTTP status.
    pub status_code: u16,
}

/// A recorded POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The unit of work.
    pub work_id: i64,
    /// The unit's attempt.
    pub attempt: i32,
    /// The `Idempotency-Key` sent.
    pub idempotency_key: String,
    /// The notification's event.
    pub event: String,
    /// The endpoint's HTTP status.
    pub status_code: i32,
    /// When the endpoint answered.
    pub answered_at: DateTime<Utc>,
    /// When it accepted the notification (a 2xx answer).
    pub delivered_at: Option<DateTime<Utc>>,
}

/// When the endpoint accepted the notification of the unit holding `token`, if it did.
///
/// # Errors
/// Database errors.
pub async fn accepted(pool: &PgPool, token: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT delivered_at FROM webhook_deliveries
          WHERE token = $1 AND delivered_at IS NOT NULL",
    )
    .bind(token)
    .fetch_optional(pool)
    .await?)
}

/// Records an answered POST; a 2xx answer marks the notification delivered. A second 2xx for
/// the same token (a stale attempt that raced a newer one) keeps the first record.
///
/// # Errors
/// Database errors.
pub async fn record(pool: &PgPool, d: &NewDelivery<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO webhook_deliveries
                (work_id, token, idempotency_key, tenant, event, attempt, status_code, delivered_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7,
                 CASE WHEN $7 BETWEEN 200 AND 299 THEN now() END)
         ON CONFLICT (token) WHERE delivered_at IS NOT NULL DO NOTHING",
    )
    .bind(d.work_id)
    .bind(d.token)
    .bind(d.idempotency_key)
    .bind(d.tenant)
    .bind(d.event)
    .bind(d.attempt)
    .bind(i32::from(d.status_code))
    .execute(pool)
    .await?;
    Ok(())
}

/// Most rows [`prune`] deletes at once: a bounded statement, however far behind it is.
pub const PRUNE_BATCH: i64 = 1000;

/// Deletes up to [`PRUNE_BATCH`] rows answered more than `retention` ago; returns how many.
///
/// # Errors
/// Database errors.
pub async fn prune(pool: &PgPool, retention: std::time::Duration) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "DELETE FROM webhook_deliveries WHERE id IN (
             SELECT id FROM webhook_deliveries
              WHERE answered_at < now() - make_interval(secs => $1)
              ORDER BY answered_at LIMIT $2)",
    )
    .bind(retention.as_secs_f64())
    .bind(PRUNE_BATCH)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// The newest `limit` rows of `tenant`, optionally of one unit only, newest first.
///
/// # Errors
/// Database errors.
pub async fn list(
    pool: &PgPool,
    tenant: &str,
    work_id: Option<i64>,
    limit: i64,
) -> Result<Vec<Delivery>, StoreError> {
    let rows = sqlx::query(
        "SELECT work_id, attempt, idempotency_key, event, status_code, answered_at, delivered_at
           FROM webhook_deliveries
          WHERE tenant = $1 AND ($2::bigint IS NULL OR work_id = $2)
          ORDER BY id DESC
          LIMIT $3",
    )
    .bind(tenant)
    .bind(work_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Delivery {
                work_id: r.try_get("work_id")?,
                attempt: r.try_get("attempt")?,
                idempotency_key: r.try_get("idempotency_key")?,
                event: r.try_get("event")?,
                status_code: r.try_get("status_code")?,
                answered_at: r.try_get("answered_at")?,
                delivered_at: r.try_get("delivered_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}
