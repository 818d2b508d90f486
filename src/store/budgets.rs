//! SQL of the `request_budgets` table: one token bucket per cloud-API limit, shared by every
//! engine (docs/budgets.md). Each function is one statement that locks the key's row for its
//! own duration only, so engines never hold a budget across a call to the peer.
//!
//! A row holds `tokens` at time `at` and the current `rate`; a statement first brings both to
//! now — the rate recovers additively (`max_rate * recover` per second, capped at `max_rate`),
//! the tokens refill at that rate (capped at `burst`) — then takes or throttles. A unit told
//! to wait is promised the next token not yet promised (the balance goes below zero by one
//! per waiter, `request_budget_reservations` names the unit), so waiters come back spread at
//! the rate the key serves, and find their token whoever took meanwhile.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

use super::StoreError;

/// How the rate moves (AIMD): the engine's settings, the same for every key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aimd {
    /// Additive increase: the fraction of `max_rate` the rate regains per second.
    pub recover: f64,
    /// Multiplicative decrease: the rate is multiplied by this on a throttle.
    pub decrease: f64,
    /// The rate never drops below `max_rate * floor`.
    pub floor: f64,
    /// At most one decrease per key in this many seconds, however many engines report.
    pub decrease_every_secs: f64,
}

impl Default for Aimd {
    fn default() -> Self {
        Self {
            recover: 0.01,
            decrease: 0.5,
            floor: 0.05,
            decrease_every_secs: 1.0,
        }
    }
}

/// What a take got.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Taken {
    /// Tokens granted (0 to the number asked).
    pub granted: f64,
    /// When nothing was granted: seconds until the caller's token is there.
    pub wait_secs: f64,
    /// The key's rate after the statement.
    pub rate: f64,
    /// The key's tokens after the statement.
    pub tokens: f64,
}

/// What a throttle report did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttled {
    /// True when this report lowered the rate (the first in its second).
    pub decreased: bool,
    /// The key's rate after the statement.
    pub rate: f64,
    /// The key's tokens after the statement.
    pub tokens: f64,
}

/// One key as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetRow {
    /// `adapter/scope/region/class`.
    pub key: String,
    /// The current rate (tokens per second).
    pub rate: f64,
    /// The configured rate.
    pub max_rate: f64,
    /// The configured burst.
    pub burst: f64,
    /// Tokens at `at`.
    pub tokens: f64,
    /// When `tokens` and `rate` were last brought up to date.
    pub at: DateTime<Utc>,
    /// The last decrease.
    pub throttled_at: Option<DateTime<Utc>>,
    /// Throttles reported, all engines together.
    pub throttles: i64,
    /// Takes that found no token, all engines together.
    pub waits: i64,
}

/// Creates the row of `key` with a full bucket, unless it exists.
pub async fn budget_ensure(
    conn: &mut PgConnection,
    key: &str,
    rate: f64,
    burst: f64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO request_budgets (key, rate, max_rate, burst, tokens)
         VALUES ($1, $2, $2, $3, $3)
         ON CONFLICT (key) DO NOTHING",
    )
    .bind(key)
    .bind(rate)
    .bind(burst)
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes up to `want` whole tokens of `key` (configured `max_rate`, `burst`), at least one or
/// none, and gives back `give_back` tokens an engine did not use. With none granted, the caller
/// gets the time its token will be there (`wait_secs`); with `reserve`, that token is paid for
/// now (the balance goes below zero), so that the caller finds it at that time whoever takes
/// meanwhile: the caller records it with [`budget_reserve`] in the same transaction. `want = 0`
/// only reserves. `None` when the key has no row yet ([`budget_ensure`]). The configured limits
/// are written with every take, so a changed configuration applies at the next take of any
/// engine.
#[allow(clippy::too_many_arguments)]
pub async fn budget_take(
    conn: &mut PgConnection,
    key: &str,
    max_rate: f64,
    burst: f64,
    want: f64,
    give_back: f64,
    reserve: bool,
    aimd: &Aimd,
) -> Result<Option<Taken>, StoreError> {
    let row = sqlx::query(
        // The locking CTE reads the newest version of the row once it holds the lock; every
        // computation uses those values. `t` never goes back: a statement that waited for the
        // lock may have started before the one it waited for.
        "WITH cur AS (
             SELECT * FROM request_budgets WHERE key = $1 FOR UPDATE
         ), r AS (
             SELECT key, tokens, greatest(at, now()) AS t,
                    greatest(0, extract(epoch FROM now() - at)::float8) AS dt,
                    least($2, rate + $2 * $6 * greatest(0, extract(epoch FROM now() - at)::float8)) AS rate
             FROM cur
         ), a AS (
             SELECT key, t, rate, least($3, tokens + rate * dt + $5) AS avail FROM r
         ), g AS (
             SELECT key, t, rate, avail,
                    CASE WHEN avail >= 1 THEN least($4, floor(avail)) ELSE 0 END AS granted
             FROM a
         )
         UPDATE request_budgets b
         SET max_rate = $2, burst = $3, rate = g.rate, at = g.t,
             tokens = CASE WHEN g.granted > 0 THEN g.avail - g.granted
                           WHEN $7 THEN g.avail - 1 ELSE g.avail END,
             waits = b.waits + CASE WHEN g.granted > 0 THEN 0 ELSE 1 END
         FROM g
         WHERE b.key = g.key
         RETURNING g.granted::float8 AS granted,
                   CASE WHEN g.granted > 0 THEN 0
                        ELSE (1 - g.avail) / g.rate END AS wait_secs,
                   b.rate, b.tokens",
    )
    .bind(key)
    .bind(max_rate)
    .bind(burst)
    .bind(want)
    .bind(give_back)
    .bind(aimd.recover)
    .bind(reserve)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        Ok(Taken {
            granted: r.try_get("granted")?,
            wait_secs: r.try_get("wait_secs")?,
            rate: r.try_get("rate")?,
            tokens: r.try_get("tokens")?,
        })
    })
    .transpose()
}

/// Reports that the peer throttled a call of `key`: the first report in
/// `aimd.decrease_every_secs` multiplies the rate by `aimd.decrease` (never below
/// `max_rate * aimd.floor`) and takes back the tokens left (a balance above zero becomes
/// zero; promised tokens stay promised). `None` when the key has no row.
pub async fn budget_throttle(
    conn: &mut PgConnection,
    key: &str,
    max_rate: f64,
    burst: f64,
    aimd: &Aimd,
) -> Result<Option<Throttled>, StoreError> {
    let row = sqlx::query(
        "WITH cur AS (
             SELECT * FROM request_budgets WHERE key = $1 FOR UPDATE
         ), r AS (
             SELECT key, tokens, throttled_at, greatest(at, now()) AS t,
                    greatest(0, extract(epoch FROM now() - at)::float8) AS dt,
                    least($2, rate + $2 * $4 * greatest(0, extract(epoch FROM now() - at)::float8)) AS rate
             FROM cur
         ), d AS (
             SELECT key, t, rate, least($3, tokens + rate * dt) AS avail,
                    (throttled_at IS NULL
                     OR throttled_at <= t - make_interval(secs => $7)) AS decrease
             FROM r
         )
         UPDATE request_budgets b
         SET max_rate = $2, burst = $3, at = d.t,
             rate = CASE WHEN d.decrease THEN greatest($2 * $6, d.rate * $5) ELSE d.rate END,
             tokens = CASE WHEN d.decrease THEN least(d.avail, 0) ELSE d.avail END,
             throttled_at = CASE WHEN d.decrease THEN d.t ELSE b.throttled_at END,
             throttles = b.throttles + 1
         FROM d
         WHERE b.key = d.key
         RETURNING d.decrease, b.rate, b.tokens",
    )
    .bind(key)
    .bind(max_rate)
    .bind(burst)
    .bind(aimd.recover)
    .bind(aimd.decrease)
    .bind(aimd.floor)
    .bind(aimd.decrease_every_secs)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        Ok(Throttled {
            decreased: r.try_get("decrease")?,
            rate: r.try_get("rate")?,
            tokens: r.try_get("tokens")?,
        })
    })
    .transpose()
}

/// Records that unit `work_id` holds a token of `key` promised at `slot` (paid for by a
/// reserving [`budget_take`]), and removes the promises of units that did not come back
/// within five minutes of their slot.
pub async fn budget_reserve(
    conn: &mut PgConnection,
    key: &str,
    work_id: i64,
    wait_secs: f64,
) -> Result<(), StoreError> {
    sqlx::query(
        "WITH gone AS (
             DELETE FROM request_budget_reservations
             WHERE key = $1 AND slot < now() - interval '5 minutes'
         )
         INSERT INTO request_budget_reservations (key, work_id, slot)
         VALUES ($1, $2, now() + make_interval(secs => $3))
         ON CONFLICT (key, work_id) DO UPDATE SET slot = excluded.slot, made_at = now()",
    )
    .bind(key)
    .bind(work_id)
    .bind(wait_secs)
    .execute(conn)
    .await?;
    Ok(())
}

/// The token of `key` promised to unit `work_id`, if any: `Some(0)` (and the promise is spent)
/// when its slot has come, `Some(seconds)` until the slot (the promise is kept), `None`
/// without a promise. A throttle keeps the promises made before it: voiding them sent every
/// waiter to the back of the queue at each decrease, and with a queue longer than the time
/// between two decreases (1,000 units) nobody got through.
pub async fn budget_claim_reservation(
    conn: &mut PgConnection,
    key: &str,
    work_id: i64,
) -> Result<Option<f64>, StoreError> {
    // A little early counts as on time: the unit was woken for this slot.
    let due: Option<(f64, bool)> = sqlx::query_as(
        "SELECT greatest(0, extract(epoch FROM slot - now())::float8 - 0.05), true
         FROM request_budget_reservations
         WHERE key = $1 AND work_id = $2",
    )
    .bind(key)
    .bind(work_id)
    .fetch_optional(&mut *conn)
    .await?;
    let due = due.map(|(secs, _)| secs);
    if due == Some(0.0) {
        sqlx::query("DELETE FROM request_budget_reservations WHERE key = $1 AND work_id = $2")
            .bind(key)
            .bind(work_id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(due)
}

/// Every key, by key: what `setpoint budgets` and the gauges show. The rate and tokens are as
/// of each row's `at`.
pub async fn budget_list(conn: &mut PgConnection) -> Result<Vec<BudgetRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT key, rate, max_rate, burst, tokens, at, throttled_at, throttles, waits
         FROM request_budgets ORDER BY key",
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(BudgetRow {
                key: r.try_get("key")?,
                rate: r.try_get("rate")?,
                max_rate: r.try_get("max_rate")?,
                burst: r.try_get("burst")?,
                tokens: r.try_get("tokens")?,
                at: r.try_get("at")?,
                throttled_at: r.try_get("throttled_at")?,
                throttles: r.try_get("throttles")?,
                waits: r.try_get("waits")?,
            })
        })
        .collect()
}

/// Per key, how many units wait for a promised token (`setpoint work budgets`).
///
/// # Errors
/// Database errors.
pub async fn budget_waiting(conn: &mut PgConnection) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT key, count(*) FROM request_budget_reservations GROUP BY key ORDER BY key",
    )
    .fetch_all(conn)
    .await?)
}
