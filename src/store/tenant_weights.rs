//! SQL of the `tenant_weights` table (migration 0025): each tenant's weight in the fair claim.
//! The enqueue statements (`work_enqueue`, the API's create batches) read it once per tenant
//! of a statement; operators write it with `setpoint work weights`.

use sqlx::PgConnection;

use super::StoreError;

/// The smallest weight a tenant may have (the table's check): its units lie 100 s apart.
pub const MIN_WEIGHT: f64 = 0.01;
/// The largest weight a tenant may have (the table's check).
pub const MAX_WEIGHT: f64 = 1000.0;

/// Whether `weight` is one the table accepts: finite, from [`MIN_WEIGHT`] to [`MAX_WEIGHT`].
pub fn valid_weight(weight: f64) -> bool {
    weight.is_finite() && (MIN_WEIGHT..=MAX_WEIGHT).contains(&weight)
}

/// Sets `tenant`'s weight; units enqueued from the statement's commit on are placed by it
/// (units already queued keep their places).
///
/// # Errors
/// A weight outside [`MIN_WEIGHT`]..=[`MAX_WEIGHT`] (the table's check), or a database error.
pub async fn tenant_weight_set(
    conn: &mut PgConnection,
    tenant: &str,
    weight: f64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO tenant_weights (tenant, weight) VALUES ($1, $2)
         ON CONFLICT (tenant) DO UPDATE SET weight = excluded.weight, updated_at = now()",
    )
    .bind(tenant)
    .bind(weight)
    .execute(conn)
    .await?;
    Ok(())
}

/// Gives `tenant` the default weight (1) again; false when it had no weight of its own.
///
/// # Errors
/// Database errors.
pub async fn tenant_weight_reset(
    conn: &mut PgConnection,
    tenant: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query("DELETE FROM tenant_weights WHERE tenant = $1")
        .bind(tenant)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Every tenant with a weight of its own, by name: (tenant, weight).
///
/// # Errors
/// Database errors.
pub async fn tenant_weight_list(conn: &mut PgConnection) -> Result<Vec<(String, f64)>, StoreError> {
    Ok(
        sqlx::query_as("SELECT tenant, weight FROM tenant_weights ORDER BY tenant")
            .fetch_all(conn)
            .await?,
    )
}
