//! A plugin's migrations, applied in a migration table of its own
//! (`_setpoint_plugin_<name>_migrations`): the core's migrator never sees their versions, and a
//! plugin removed from an engine leaves the core's migrations working.

use std::borrow::Cow;

use sqlx::PgPool;
use sqlx::migrate::{Migration, MigrationType, Migrator};

use crate::plugin::PluginMigration;
use crate::store::StoreError;

/// Applies `migrations` of plugin `plugin` not applied yet.
///
/// # Errors
/// Database errors; a migration that fails (nothing of it is applied).
pub async fn apply(
    pool: &PgPool,
    plugin: &str,
    migrations: &[PluginMigration],
) -> Result<(), StoreError> {
    if migrations.is_empty() {
        return Ok(());
    }
    let table: String = plugin
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let mut migrator = Migrator::with_migrations(
        migrations
            .iter()
            .map(|m| {
                Migration::new(
                    m.version,
                    Cow::Owned(m.description.clone()),
                    MigrationType::Simple,
                    sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(m.sql.clone())),
                    false,
                )
            })
            .collect(),
    );
    migrator.dangerous_set_table_name(format!("_setpoint_plugin_{table}_migrations"));
    migrator.set_ignore_missing(true);
    migrator.set_locking(false);
    let mut conn = pool.acquire().await?.detach();
    // As the core's migrations: no statement or lock timeout (see store::migrate_with).
    sqlx::raw_sql("SET statement_timeout = 0; SET lock_timeout = 0")
        .execute(&mut conn)
        .await?;
    let lock = crate::store::MigrationLock::take(&mut conn).await?;
    let result = migrator.run(&mut conn).await;
    // Closing the session gives the lock back whatever happened.
    let _ = lock.release(&mut conn).await;
    let _ = sqlx::Connection::close(conn).await;
    result?;
    Ok(())
}
