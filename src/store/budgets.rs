//! SQL of the `request_budgets` table: one token bucket per cloud-API limit, shared by every
//! engine (docs/budgets.md). Each function is one statement that locks the key's row for its
//! own duration only, so engines never hold a budget across a call to the peer.
//!
//! A row holds `tokens` at time `at` and the current `rate`; a statement first brings both to
//! now — the rate recovers additively (`max_rate * recover` per second, times a boost that
//! doubles every `boost_every_secs` without a decrease, capped at `max_boost`; never above
//! `max_rate`), the tokens refill at that rate (capped at `burst`) — then takes or throttles. A unit told
//! to wait is promised the next token not yet promised (the balance goes below zero by one
//! per waiter, `request_budget_reservations` names the unit), so waiters come back spread at
//! the rate the key serves, and find their token whoever took meanwhile.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

use super::StoreError;

/// The SQL expression of a key's rate brought up to now (additive increase) from a row
/// `rate`, `at`, `throttled_at` and `peak`, given the SQL of the configured rate and of
/// [`Aimd`]'s `recover`, `boost_every_secs` and `max_boost`: `max_rate · recover` per second,
/// times a boost that doubles every `boost_every_secs` since the last decrease (at most
/// `max_boost`), never above `max_rate`. Within 30 s of a decrease the boost is off once the
/// rate is back at 85% of the rate the peer refused (`peak`): the rate climbs back fast to just
/// under where it was throttled, then probes slowly, as TCP CUBIC does, so the calls spend
/// their time just under the peer's limit rather than crossing it again and again; a peer
/// quiet for 30 s has room again, and the boost resumes.
macro_rules! recovered_rate {
    ($max:literal, $recover:literal, $every:literal, $boost:literal) => {
        concat!(
            "least(",
            $max,
            ", rate + ",
            $max,
            " * ",
            $recover,
            " * greatest(0, extract(epoch FROM now() - at)::float8)
               * CASE WHEN throttled_at IS NULL THEN ",
            $boost,
            "
                      WHEN peak IS NOT NULL AND rate >= 0.85 * peak
                           AND now() - throttled_at < interval '30 seconds' THEN 1
                      ELSE least(",
            $boost,
            ", power(2, least(16, greatest(0,
                           extract(epoch FROM now() - throttled_at)::float8) / ",
            $every,
            ")))
                 END)"
        )
    };
}

/// How the rate moves (AIMD): the engine's settings, the same for every key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aimd {
    /// Additive increase: the fraction of `max_rate` the rate regains per second right after
    /// a decrease.
    pub recover: f64,
    /// The increase doubles every this many seconds without a decrease...
    pub boost_every_secs: f64,
    /// ...up to this many times `recover` (1: a plain additive increase).
    pub max_boost: f64,
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
            boost_every_secs: 5.0,
            max_boost: 8.0,
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
    /// Whether nothing was granted and the caller was promised the next token not yet
    /// promised (it is paid for; record it with [`budget_reserve`]).
    pub promised: bool,
    /// When nothing was granted: seconds until the caller's token is there (promised), or
    /// until the next token not yet promised (not promised).
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
/// none, and gives back `give_back` tokens an engine did not use. With none granted, and
/// `promise_within` given, the caller is promised the next token not yet promised when that
/// token is at most `promise_within` seconds away (the line of promises is that short): the
/// token is paid for now (the balance goes below zero) so that the caller finds it at that
/// time whoever takes meanwhile, and the caller records it with [`budget_reserve`] in the same
/// transaction. While promises are still to come nothing is granted: a caller gets in line
/// after the last of them. A caller with a finite `promise_within` (a unit at its first call)
/// is granted or promised nothing while units wait in the key's line ([`budget_line_join`]):
/// it gets in line behind them. `wait_secs` is the time to the next token not yet promised.
/// `want = 0` only promises. `None` when the key has no row yet ([`budget_ensure`]). The
/// configured limits are written with every take, so a changed configuration applies at the
/// next take of any engine.
#[allow(clippy::too_many_arguments)]
pub async fn budget_take(
    conn: &mut PgConnection,
    key: &str,
    max_rate: f64,
    burst: f64,
    want: f64,
    give_back: f64,
    promise_within: Option<f64>,
    aimd: &Aimd,
) -> Result<Option<Taken>, StoreError> {
    let row = sqlx::query(concat!(
        // The locking CTE reads the newest version of the row once it holds the lock; every
        // computation uses those values. `t` never goes back: a statement that waited for the
        // lock may have started before the one it waited for.
        "WITH cur AS (
             SELECT * FROM request_budgets WHERE key = $1 FOR UPDATE
         ), r AS (
             SELECT key, tokens, greatest(at, now()) AS t,
                    greatest(0, extract(epoch FROM now() - at)::float8) AS dt,
                    ",
        recovered_rate!("$2", "$6", "$8", "$9"),
        " AS rate
             FROM cur
         ), a AS (
             SELECT key, t, rate, least($3, tokens + rate * dt + $5) AS avail,
                    -- The last promise still to come, in seconds from now.
                    (SELECT extract(epoch FROM max(slot) - now())::float8
                     FROM request_budget_reservations
                     WHERE key = $1 AND slot > now()) AS last,
                    (coalesce($7::float8 < 'Infinity'::float8, false)
                     AND EXISTS (SELECT 1 FROM request_budget_line WHERE key = $1)) AS lined
             FROM r
         ), g AS (
             -- Nothing is granted while promises are still to come: when the rate rose since
             -- they were made, the balance is back above zero before their slots, and a grant
             -- then would add its call to theirs.
             SELECT key, t, rate, avail, lined,
                    CASE WHEN avail >= 1 AND last IS NULL AND NOT lined
                         THEN least($4, floor(avail)) ELSE 0 END AS granted,
                    greatest((1 - avail) / rate, coalesce(last + 1 / rate, 0)) AS line
             FROM a
         ), p AS (
             SELECT *, (granted = 0 AND $7::float8 IS NOT NULL AND line <= $7 AND NOT lined)
                       AS promised
             FROM g
         )
         UPDATE request_budgets b
         SET max_rate = $2, burst = $3, rate = p.rate, at = p.t,
             tokens = CASE WHEN p.granted > 0 THEN p.avail - p.granted
                           WHEN p.promised THEN p.avail - 1 ELSE p.avail END,
             waits = b.waits + CASE WHEN p.granted > 0 THEN 0 ELSE 1 END
         FROM p
         WHERE b.key = p.key
         RETURNING p.granted::float8 AS granted, p.promised,
                   CASE WHEN p.granted > 0 THEN 0 ELSE p.line END AS wait_secs,
                   b.rate, b.tokens",
    ))
    .bind(key)
    .bind(max_rate)
    .bind(burst)
    .bind(want)
    .bind(give_back)
    .bind(aimd.recover)
    .bind(promise_within)
    .bind(aimd.boost_every_secs)
    .bind(aimd.max_boost)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        Ok(Taken {
            granted: r.try_get("granted")?,
            promised: r.try_get("promised")?,
            wait_secs: r.try_get("wait_secs")?,
            rate: r.try_get("rate")?,
            tokens: r.try_get("tokens")?,
        })
    })
    .transpose()
}

/// Reports that the peer throttled a call of `key`, made `sent_secs_ago` seconds ago when the
/// caller knows. The report lowers the rate when no decrease happened in the last
/// `aimd.decrease_every_secs` and the call was sent after the last decrease (a call sent at
/// the old rate says nothing about the new one; unknown counts as after): it multiplies the
/// rate by `aimd.decrease` (never below `max_rate * aimd.floor`), takes back the tokens left
/// (a balance above zero becomes zero; promised tokens stay promised) and moves every promise
/// still to come to the new rate (its distance from now grows by `old rate / new rate`, so the
/// waiters keep their order and come back spread at the new rate). `None` when the key has no
/// row.
pub async fn budget_throttle(
    conn: &mut PgConnection,
    key: &str,
    max_rate: f64,
    burst: f64,
    sent_secs_ago: Option<f64>,
    aimd: &Aimd,
) -> Result<Option<Throttled>, StoreError> {
    let row = sqlx::query(concat!(
        "WITH cur AS (
             SELECT * FROM request_budgets WHERE key = $1 FOR UPDATE
         ), r AS (
             SELECT key, tokens, throttled_at, greatest(at, now()) AS t,
                    greatest(0, extract(epoch FROM now() - at)::float8) AS dt,
                    ",
        recovered_rate!("$2", "$4", "$9", "$10"),
        " AS rate
             FROM cur
         ), d AS (
             SELECT key, t, rate, least($3, tokens + rate * dt) AS avail,
                    (throttled_at IS NULL
                     OR (throttled_at <= t - make_interval(secs => $7)
                         AND ($8::float8 IS NULL
                              OR throttled_at <= now() - make_interval(secs => $8)))) AS decrease,
                    greatest($2 * $6, rate * $5) AS lowered
             FROM r
         ), moved AS (
             UPDATE request_budget_reservations res
             SET slot = d.t + (res.slot - d.t) * (d.rate / d.lowered)
             FROM d
             WHERE d.decrease AND res.key = d.key AND res.slot > d.t
         )
         UPDATE request_budgets b
         SET max_rate = $2, burst = $3, at = d.t,
             rate = CASE WHEN d.decrease THEN d.lowered ELSE d.rate END,
             tokens = CASE WHEN d.decrease THEN least(d.avail, 0) ELSE d.avail END,
             throttled_at = CASE WHEN d.decrease THEN d.t ELSE b.throttled_at END,
             peak = CASE WHEN d.decrease THEN d.rate ELSE b.peak END,
             throttles = b.throttles + 1
         FROM d
         WHERE b.key = d.key
         RETURNING d.decrease, b.rate, b.tokens",
    ))
    .bind(key)
    .bind(max_rate)
    .bind(burst)
    .bind(aimd.recover)
    .bind(aimd.decrease)
    .bind(aimd.floor)
    .bind(aimd.decrease_every_secs)
    .bind(sent_secs_ago)
    .bind(aimd.boost_every_secs)
    .bind(aimd.max_boost)
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
/// promising [`budget_take`]), and removes the promises of units that did not come back
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

/// Gives back `tokens` an engine took for `key` and did not spend (never above the burst).
pub async fn budget_give_back(
    conn: &mut PgConnection,
    key: &str,
    tokens: f64,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE request_budgets SET tokens = least(burst, tokens + $2) WHERE key = $1")
        .bind(key)
        .bind(tokens)
        .execute(conn)
        .await?;
    Ok(())
}

/// Puts unit `work_id` in the line of units waiting to be let in to `key` (a unit already in
/// it keeps its place) and returns how many units are in the line, itself included.
pub async fn budget_line_join(
    conn: &mut PgConnection,
    key: &str,
    work_id: i64,
) -> Result<i64, StoreError> {
    sqlx::query(
        "INSERT INTO request_budget_line (key, work_id) VALUES ($1, $2)
         ON CONFLICT (key, work_id) DO NOTHING",
    )
    .bind(key)
    .bind(work_id)
    .execute(&mut *conn)
    .await?;
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM request_budget_line WHERE key = $1")
            .bind(key)
            .fetch_one(&mut *conn)
            .await?,
    )
}

/// The keys that have units in line, with how many, for the admission rounds.
pub async fn budget_lined_keys(conn: &mut PgConnection) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(
        sqlx::query_as("SELECT key, count(*) FROM request_budget_line GROUP BY key ORDER BY key")
            .fetch_all(conn)
            .await?,
    )
}

/// What an admission round did for one key.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    /// Seconds from now to the slot of each unit let in, in the line's order.
    pub slots: Vec<f64>,
    /// Units still in line.
    pub left: i64,
}

/// Lets units of the line of `key` in while the line of promises is at most `within` seconds
/// long (at most `max` units): each gets the next token not yet promised (paid for now, as a
/// promising [`budget_take`] does), a row in `request_budget_reservations`, and its work row
/// becomes due at its slot. The line's order: lane first, then one unit of each tenant in
/// turn (a tenant with a thousand units in line and one with one take turns), then who came
/// first. A unit that is running (its attempt is deciding to wait at this moment) is passed
/// over and let in by a later round; units whose work is gone or parked leave the line.
/// `None` when another engine is running a round or a take on this key right now (the row is
/// locked; nothing waits for it).
pub async fn budget_admit(
    conn: &mut PgConnection,
    key: &str,
    within: f64,
    max: i64,
    aimd: &Aimd,
) -> Result<Option<Admitted>, StoreError> {
    let row = sqlx::query(concat!(
        // The rate and the tokens are brought to now exactly as in `budget_take`; the row's
        // own limits are used (a round has no configuration of the key).
        "WITH cur AS (
             SELECT * FROM request_budgets WHERE key = $1 FOR UPDATE SKIP LOCKED
         ), r AS (
             SELECT key, tokens, burst, greatest(at, now()) AS t,
                    greatest(0, extract(epoch FROM now() - at)::float8) AS dt,
                    ", recovered_rate!("max_rate", "$4", "$5", "$6"), " AS rate
             FROM cur
         ), a AS (
             SELECT key, t, rate, least(burst, tokens + rate * dt) AS avail,
                    (SELECT extract(epoch FROM max(slot) - now())::float8
                     FROM request_budget_reservations
                     WHERE key = $1 AND slot > now()) AS last
             FROM r
         ), b AS (
             -- The first free slot, as a promise of `budget_take` would get it.
             SELECT *, greatest((1 - avail) / rate, coalesce(last + 1 / rate, 0)) AS base
             FROM a
         ), room AS (
             SELECT CASE WHEN base <= $2 THEN least($3, floor(($2 - base) * rate) + 1) ELSE 0 END AS n
             FROM b
         ), waiting AS (
             SELECT l.work_id, l.joined_at, w.lane, w.tenant
             FROM request_budget_line l JOIN work w ON w.id = l.work_id
             WHERE l.key = $1 AND w.state IN ('pending', 'queued') AND w.lease_owner IS NULL
         ), ranked AS (
             -- Tenants take turns by their weights (tenant_weights, 1 without a row), as in
             -- the claim: a tenant of weight 2 has two turns for each of a tenant of weight 1.
             SELECT work_id,
                    row_number() OVER (ORDER BY lane, turn / weight, joined_at, work_id) AS pos
             FROM (SELECT q.work_id, q.joined_at, q.lane,
                          row_number() OVER (PARTITION BY q.lane, q.tenant
                                             ORDER BY q.joined_at, q.work_id)::float8 AS turn,
                          coalesce(tw.weight, 1) AS weight
                   FROM waiting q
                   LEFT JOIN tenant_weights tw ON tw.tenant = coalesce(q.tenant, '')) x
         ), locked AS (
             -- Locked here, and checked again once locked: a unit claimed meanwhile is passed
             -- over rather than made due while it runs.
             SELECT w.id, k.pos
             FROM work w JOIN ranked k ON k.work_id = w.id
             WHERE k.pos <= (SELECT n FROM room)
               AND w.state IN ('pending', 'queued') AND w.lease_owner IS NULL
             FOR UPDATE OF w SKIP LOCKED
         ), slots AS (
             SELECT l.id, b.t + make_interval(secs => b.base
                        + (row_number() OVER (ORDER BY l.pos) - 1) / b.rate) AS slot
             FROM locked l CROSS JOIN b
         ), due AS (
             UPDATE work w SET run_at = s.slot, fair_at = s.slot
             FROM slots s WHERE w.id = s.id
         ), promised AS (
             INSERT INTO request_budget_reservations (key, work_id, slot)
             SELECT $1, id, slot FROM slots
             ON CONFLICT (key, work_id) DO UPDATE SET slot = excluded.slot, made_at = now()
         ), let_in AS (
             DELETE FROM request_budget_line
             WHERE key = $1 AND work_id IN (SELECT id FROM slots)
         ), gone AS (
             -- Whether or not this round holds the key's row (another engine's round, or an
             -- operator removed the row): the line never keeps a unit that is gone.
             DELETE FROM request_budget_line l
             WHERE l.key = $1
               AND NOT EXISTS (SELECT 1 FROM work w WHERE w.id = l.work_id AND w.state <> 'parked')
             RETURNING 1
         ), upd AS (
             UPDATE request_budgets bu
             SET rate = b.rate, at = b.t, tokens = b.avail - (SELECT count(*) FROM slots)
             FROM b WHERE bu.key = b.key
             RETURNING 1
         )
         SELECT coalesce((SELECT array_agg(extract(epoch FROM slot - now())::float8 ORDER BY slot)
                          FROM slots), '{}') AS slots,
                (SELECT count(*) FROM request_budget_line WHERE key = $1)
                  - (SELECT count(*) FROM slots) - (SELECT count(*) FROM gone) AS left,
                EXISTS (SELECT 1 FROM upd) AS locked",
    ))
    .bind(key)
    .bind(within)
    .bind(max)
    .bind(aimd.recover)
    .bind(aimd.boost_every_secs)
    .bind(aimd.max_boost)
    .fetch_one(conn)
    .await?;
    if !row.try_get::<bool, _>("locked")? {
        return Ok(None);
    }
    Ok(Some(Admitted {
        slots: row.try_get("slots")?,
        left: row.try_get("left")?,
    }))
}

/// The token of `key` promised to unit `work_id`, if any: `Some(0)` (and the promise is spent)
/// when its slot has come, `Some(seconds)` until the slot (the promise is kept), `None`
/// without a promise. A throttle keeps the promises made before it, moved to the new rate
/// ([`budget_throttle`]): voiding them sent every waiter to the back of the queue at each
/// decrease, and with a queue longer than the time between two decreases (1,000 units) nobody
/// got through.
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

/// Per key, how many units wait for a promised token and how many wait in line to be let in
/// (`setpoint work budgets`).
///
/// # Errors
/// Database errors.
pub async fn budget_waiting(
    conn: &mut PgConnection,
) -> Result<Vec<(String, i64, i64)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT key, sum(promised)::int8, sum(lined)::int8
         FROM (SELECT key, 1 AS promised, 0 AS lined FROM request_budget_reservations
               UNION ALL
               SELECT key, 0, 1 FROM request_budget_line) w
         GROUP BY key ORDER BY key",
    )
    .fetch_all(conn)
    .await?)
}
