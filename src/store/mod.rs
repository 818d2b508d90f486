//! The SQL of setpoint, one module per table or concern. Nothing outside this module writes
//! SQL; every function takes a connection (or a transaction, which derefs to one), so callers
//! choose what commits together.

pub mod api_requests;
pub mod budgets;
pub mod create_batch;
pub mod drift;
pub mod engines;
pub mod events;
pub mod instances;
pub mod journal;
pub mod retention;
pub mod tenant_weights;
pub mod tokens;
pub mod work;

use std::sync::LazyLock;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

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

/// The longest failure message stored for a unit, in characters (the rest is cut, with a
/// marker saying so).
pub const MAX_STORED_MESSAGE: usize = 4000;

/// `text` as it can be stored: control characters other than newline and tab (NUL above all,
/// which PostgreSQL refuses in text) replaced by U+FFFD, and at most `max_chars` characters.
pub fn storable_text(text: &str, max_chars: usize) -> String {
    const CUT: &str = " …[cut]";
    let clean = |c: char| {
        if c.is_control() && c != '\n' && c != '\t' {
            '\u{FFFD}'
        } else {
            c
        }
    };
    if text.chars().count() <= max_chars {
        return text.chars().map(clean).collect();
    }
    let keep = max_chars.saturating_sub(CUT.chars().count());
    let mut out: String = text.chars().take(keep).map(clean).collect();
    out.push_str(CUT);
    out
}

/// `value` as `jsonb` accepts it: every string (keys included) without NUL characters, which
/// PostgreSQL refuses in `jsonb`, and each at most [`MAX_STORED_MESSAGE`] characters.
pub fn storable_json(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    // Nearly every value is already storable: a check that allocates nothing, then a plain
    // copy, instead of rebuilding every string (a tenth of the engine's CPU per unit in
    // `setpoint bench queue`).
    if is_storable_json(value) {
        return value.clone();
    }
    match value {
        Value::String(s) => Value::String(storable_text(s, MAX_STORED_MESSAGE)),
        Value::Array(items) => Value::Array(items.iter().map(storable_json).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (storable_text(k, MAX_STORED_MESSAGE), storable_json(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// True when `text` is stored as it is by [`storable_text`] with `max_chars`.
fn is_storable_text(text: &str, max_chars: usize) -> bool {
    // A string of at most `max_chars` bytes has at most that many characters.
    text.len() <= max_chars
        && !text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
}

/// True when `value` is stored as it is by [`storable_json`].
fn is_storable_json(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => is_storable_text(s, MAX_STORED_MESSAGE),
        Value::Array(items) => items.iter().all(is_storable_json),
        Value::Object(map) => map
            .iter()
            .all(|(k, v)| is_storable_text(k, MAX_STORED_MESSAGE) && is_storable_json(v)),
        _ => true,
    }
}

/// The *expand* migrations in `migrations/`, embedded in the binary: each leaves a schema on
/// which the previous release still runs, so they are applied at start-up during a rollout.
/// Versions this release does not know (a newer release's) are ignored, so that an engine of
/// this release keeps starting while a newer one rolls out.
pub static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut m = sqlx::migrate!("./migrations");
    m.set_ignore_missing(true);
    // [`migrate_with`] holds [`MigrationLock`] instead (see there why).
    m.set_locking(false);
    m
});

/// The *contract* migrations in `migrations/contract/`: they remove what only the previous
/// release needed, so they are applied once no engine of it runs ([`migrate_contract`]).
/// They share the expand migrations' table; their versions start at 1000.
pub static CONTRACT_MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut m = sqlx::migrate!("./migrations/contract");
    m.set_ignore_missing(true);
    m.set_locking(false);
    m
});

/// The advisory lock key every setpoint migration runs under (core and plugins'): "setpoint"
/// in ASCII.
const MIGRATION_LOCK_KEY: i64 = 0x7365_7470_6f69_6e74;

/// Held while one process migrates; the others wait for it.
///
/// It is taken by polling `pg_try_advisory_lock`, never by the blocking `pg_advisory_lock`
/// that sqlx's migrator takes: a session blocked in that call keeps its statement's snapshot
/// open, and `CREATE INDEX CONCURRENTLY` in the session that holds the lock waits for every
/// older snapshot to end — so two engines starting at once on an old schema would wait for
/// each other for ever. Between two tries this session holds no snapshot.
#[derive(Debug)]
pub struct MigrationLock(());

impl MigrationLock {
    /// Takes the lock on `conn` (a session of its own), waiting as long as another process
    /// holds it and saying so every 10 s.
    ///
    /// # Errors
    /// Database errors.
    pub async fn take(conn: &mut PgConnection) -> Result<Self, StoreError> {
        let started = std::time::Instant::now();
        let mut said = Duration::ZERO;
        loop {
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(MIGRATION_LOCK_KEY)
                .fetch_one(&mut *conn)
                .await?;
            if got {
                return Ok(Self(()));
            }
            let waited = started.elapsed();
            if waited >= said + Duration::from_secs(10) {
                said = waited;
                tracing::info!(
                    waited_s = waited.as_secs(),
                    "waiting for another process to finish migrating the database"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Gives the lock back (closing the session gives it back too).
    ///
    /// # Errors
    /// Database errors.
    pub async fn release(self, conn: &mut PgConnection) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATION_LOCK_KEY)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// The longest any statement of the engine may run ([`connect`]); migrations are exempt.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest any statement of the engine may wait for a lock ([`connect`]).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a pool of at most `max_connections` connections to `url`. Its statements time out
/// after [`STATEMENT_TIMEOUT`] and give up waiting for a lock after [`LOCK_TIMEOUT`]: a
/// statement stuck behind an operator's lock or a runaway query fails (and is retried by its
/// caller) instead of holding a connection, and the lease of the unit it serves, for ever.
///
/// # Errors
/// When the URL is malformed or the first connection fails.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions = url.parse::<PgConnectOptions>()?;
    let options = options
        .application_name("setpoint")
        .options([
            (
                "statement_timeout",
                format!("{}ms", STATEMENT_TIMEOUT.as_millis()),
            ),
            ("lock_timeout", format!("{}ms", LOCK_TIMEOUT.as_millis())),
        ])
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// The size of a table on disk: its heap (with TOAST) and its indexes, in bytes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableSize {
    /// The table.
    pub table: String,
    /// Heap and TOAST bytes.
    pub table_bytes: i64,
    /// Bytes of all its indexes.
    pub index_bytes: i64,
    /// The planner's row estimate (`reltuples`, after ANALYZE).
    pub rows_estimate: i64,
}

/// The sizes of `tables` (for benchmarks and capacity planning).
///
/// # Errors
/// Database errors.
pub async fn table_sizes(pool: &PgPool, tables: &[&str]) -> Result<Vec<TableSize>, StoreError> {
    let rows: Vec<(String, i64, i64, f32)> = sqlx::query_as(
        "SELECT c.relname::text, pg_table_size(c.oid), pg_indexes_size(c.oid), c.reltuples
         FROM pg_class c JOIN unnest($1::text[]) WITH ORDINALITY AS t(name, o) ON c.relname = t.name
         WHERE c.relkind = 'r' AND c.relnamespace = current_schema()::regnamespace
         ORDER BY t.o",
    )
    .bind(tables)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(table, table_bytes, index_bytes, rows)| TableSize {
            table,
            table_bytes,
            index_bytes,
            rows_estimate: rows.max(0.0) as i64,
        })
        .collect())
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

/// Which migrations [`migrate`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrations {
    /// The expand migrations only: safe while engines of the previous release run.
    Expand,
    /// The expand migrations, and the contract migrations too when the database is new (no
    /// release ran on it before, so no older engine can be running): what `serve`, `dev` and
    /// the tests do.
    ExpandOrFresh,
    /// Expand and contract: after a rollout, once no engine of the previous release runs.
    Contract,
}

/// Applies the migrations `which` says. Safe to run from several processes at once (one
/// migrates, under [`MigrationLock`], while the others wait). Runs on a connection of its own without the pool's statement and
/// lock timeouts: a migration may rewrite a large table, and must wait for the locks it needs
/// rather than fail half-way through a rollout. Returns whether the contract migrations ran.
///
/// # Errors
/// Database errors; a migration that fails (nothing of it is applied, except for one marked
/// `-- no-transaction`, which is written to be re-run).
pub async fn migrate_with(pool: &PgPool, which: Migrations) -> Result<bool, StoreError> {
    let mut conn = pool.acquire().await?.detach();
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut conn)
        .await?;
    sqlx::query("SET lock_timeout = 0")
        .execute(&mut conn)
        .await?;
    let lock = MigrationLock::take(&mut conn).await?;
    let fresh = match which {
        Migrations::ExpandOrFresh => {
            sqlx::query_scalar::<_, bool>("SELECT to_regclass('_sqlx_migrations') IS NULL")
                .fetch_one(&mut conn)
                .await?
        }
        _ => false,
    };
    MIGRATOR.run(&mut conn).await?;
    let contract = fresh || which == Migrations::Contract;
    if contract {
        CONTRACT_MIGRATOR.run(&mut conn).await?;
    }
    lock.release(&mut conn).await?;
    let _ = conn.close().await;
    Ok(contract)
}

/// [`migrate_with`] [`Migrations::ExpandOrFresh`]: what an engine does at start-up.
///
/// # Errors
/// As [`migrate_with`].
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    migrate_with(pool, Migrations::ExpandOrFresh).await?;
    Ok(())
}

/// How many of the embedded migrations ([`MIGRATOR`]) are not applied to the database
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
    Ok(MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .filter(|m| !applied.contains(&m.version))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn storable_json_keeps_clean_values_and_cleans_the_rest() {
        let clean = json!({"calls": ["ec2.run"], "duration_ms": 3, "note": "tab\tand\nnewline"});
        assert_eq!(storable_json(&clean), clean);

        let dirty = json!({"k\u{0}": ["a\u{0}b", {"x": "\u{7}"}], "n": 1});
        assert_eq!(
            storable_json(&dirty),
            json!({"k\u{FFFD}": ["a\u{FFFD}b", {"x": "\u{FFFD}"}], "n": 1})
        );

        let long = "é".repeat(MAX_STORED_MESSAGE);
        // Twice as many bytes as characters: still stored whole.
        assert_eq!(storable_json(&json!(long)), json!(long));
        let longer = "x".repeat(MAX_STORED_MESSAGE + 10);
        let cut = storable_json(&json!(longer));
        let cut = cut.as_str().unwrap_or_default();
        assert_eq!(cut.chars().count(), MAX_STORED_MESSAGE);
        assert!(cut.ends_with("…[cut]"), "{cut}");
    }
}
