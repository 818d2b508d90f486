//! The SQL of setpoint, one module per table or concern. Nothing outside this module writes
//! SQL; every function takes a connection (or a transaction, which derefs to one), so callers
//! choose what commits together.

pub mod api_requests;
pub mod create_batch;
pub mod events;
pub mod instances;
pub mod journal;
pub mod tokens;
pub mod work;
pub mod workflows;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection, PgPool};

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database answered with an error or the connection failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// True when retrying the same statement later may succeed (connection lost, server
    /// restarting, serialization failure, pool timeout).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(db) => db.code().is_some_and(|c| {
                    // 40001 serialization, 40P01 deadlock, 57P01-3 admin shutdown / crash
                    // shutdown / cannot connect now, 08xxx connection exceptions, 53300 too
                    // many connections.
                    matches!(
                        c.as_ref(),
                        "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "53300"
                    ) || c.starts_with("08")
                }),
                _ => false,
            },
            StoreError::Migrate(_) => false,
        }
    }

    /// True when the statement broke a unique constraint (another transaction wrote the same
    /// key first).
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Database(db)) if db.is_unique_violation())
    }
}

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens a pool of at most `max_connections` connections to `url`.
///
/// # Errors
/// When the URL is malformed or the first connection fails.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions = url.parse::<PgConnectOptions>()?;
    let options = options
        .application_name("setpoint")
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// A connection of its own, outside `pool` but with its settings, for a task that keeps it
/// (a batch executor): it never waits for the pool, and the pool's test before each acquire
/// (a round trip) is saved.
///
/// # Errors
/// When the connection fails.
pub async fn connect_dedicated(pool: &PgPool) -> Result<PgConnection, StoreError> {
    Ok(pool.connect_options().connect().await?)
}

/// Makes `conn`'s prepared statements use generic plans (`plan_cache_mode =
/// force_generic_plan`) for the rest of its session.
///
/// For batch statements over arrays on a connection of their own: PostgreSQL would otherwise
/// plan them anew at every call (a custom plan for each array length looks cheaper than the
/// generic one), and planning a statement of several data-modifying CTEs costs more than
/// running it for a small batch.
///
/// # Errors
/// Database errors.
pub async fn use_generic_plans(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(conn)
        .await?;
    Ok(())
}

/// Applies every migration not yet applied. Safe to run from several processes at once
/// (sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
