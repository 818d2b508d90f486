//! Shared request budgets (issue 19, docs/budgets.md) against real PostgreSQL and moto.
//!
//! - The take statement under concurrency from two pools (two engines): never more tokens
//!   than the bucket holds plus what it refills.
//! - AIMD: however many reports of a throttle arrive, the rate halves at most once a second
//!   per key, never below its floor, and recovers by a hundredth of the configured rate per
//!   second, more the longer no throttle was heard; a throttle of a call sent before the last
//!   decrease lowers nothing; a decrease moves the promises still to come to the new rate.
//! - A unit that finds no token waits: its attempt is given back, it holds no lease while it
//!   waits, and it runs once the budget has a token.
//! - The issue's test: a throttling proxy in front of moto (EC2's `RequestLimitExceeded` above
//!   R calls per second per `Action` and region, as EC2 limits an account), three `setpoint
//!   serve` engines on one database, N KVX creates, 200 per region (see [`PER_REGION`] for
//!   why). After the first 10 s fewer than 5% of the calls are throttled, no unit parks, every
//!   instance becomes READY; it prints the total time against N / (R × regions). N defaults to
//!   100 (`SETPOINT_BUDGET_TEST_N`, e.g. 1000: five regions) and R to 10
//!   (`SETPOINT_BUDGET_TEST_R`).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::awsproxy::AwsProxy;
use common::peers::Peers;
use common::stack::{TmpDir, client_for, create_small};
use common::{EngineProcess, api_addr_of, parked, serve, setpoint, wait_for};
use serde_json::{Value, json};
use setpoint::budgets::PgBudgets;
use setpoint::queue::{self, NewWork};
use setpoint::store::budgets::{
    Aimd, Taken, budget_admit, budget_ensure, budget_line_join, budget_reserve, budget_take,
    budget_throttle, budget_waiting,
};
use setpoint::worker::{Registry, Runtime};
use setpoint_adapter::{AdapterError, BudgetKey, Limit, Outcome, TypedHandler, WorkContext, typed};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Takes from one key with many concurrent callers on two pools for a while: what was
/// granted never exceeds the burst plus the refill, and is most of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takes_from_two_pools_never_exceed_the_bucket() {
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let other = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&db.url)
        .await
        .expect("second pool");
    let (rate, burst) = (40.0, 10.0);
    let key = "test/acct/region/concurrent";
    let mut conn = db.pool.acquire().await.expect("conn");
    budget_ensure(&mut conn, key, rate, burst)
        .await
        .expect("ensure");
    drop(conn);

    let aimd = Aimd::default();
    let run_for = Duration::from_secs(3);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let pool = if i % 2 == 0 {
            db.pool.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut granted = 0.0;
            let mut waits = 0u32;
            while started.elapsed() < run_for {
                let mut conn = pool.acquire().await.expect("conn");
                let t = budget_take(&mut conn, key, rate, burst, 2.0, 0.0, None, &aimd)
                    .await
                    .expect("take")
                    .expect("row");
                assert!(t.granted >= 0.0 && t.granted <= 2.0, "{t:?}");
                if t.granted > 0.0 {
                    granted += t.granted;
                } else {
                    waits += 1;
                    assert!(
                        t.wait_secs > 0.0,
                        "a wait says when its token is there: {t:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            (granted, waits)
        }));
    }
    let mut granted = 0.0;
    let mut waits = 0;
    for t in tasks {
        let (g, w) = t.await.expect("task");
        granted += g;
        waits += w;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let most = burst + rate * elapsed;
    println!("granted {granted} tokens in {elapsed:.2} s (at most {most:.1}), {waits} waits");
    assert!(granted <= most + 0.001, "granted {granted} > {most}");
    assert!(
        granted >= 0.8 * rate * run_for.as_secs_f64(),
        "the bucket starved its callers: {granted}"
    );
    assert!(
        waits > 0,
        "16 callers at most 2 tokens each must have waited"
    );
}

/// Throttle reports from two pools at once lower the rate once; the next second's report
/// lowers it again; the floor holds; takes bring it back slowly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aimd_decreases_once_a_second_and_recovers_slowly() {
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let other = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&db.url)
        .await
        .expect("second pool");
    let (rate, burst) = (10.0, 10.0);
    let key = "test/acct/region/aimd";
    // The plain additive increase; the boost after a quiet time is tested below.
    let aimd = Aimd {
        max_boost: 1.0,
        ..Aimd::default()
    };
    let mut conn = db.pool.acquire().await.expect("conn");
    budget_ensure(&mut conn, key, rate, burst)
        .await
        .expect("ensure");
    drop(conn);

    let report = |pool: PgPool| async move {
        let mut conn = pool.acquire().await.expect("conn");
        budget_throttle(&mut conn, key, rate, burst, None, &aimd)
            .await
            .expect("throttle")
            .expect("row")
    };
    let burst_of_reports = || {
        let mut all = Vec::new();
        for i in 0..10 {
            let pool = if i % 2 == 0 {
                db.pool.clone()
            } else {
                other.clone()
            };
            all.push(tokio::spawn(report(pool)));
        }
        all
    };
    let mut decreased = 0;
    let mut last_rate = 0.0;
    for r in burst_of_reports() {
        let t = r.await.expect("task");
        decreased += usize::from(t.decreased);
        last_rate = t.rate;
    }
    assert_eq!(
        decreased, 1,
        "ten reports in one instant lower the rate once"
    );
    assert!((last_rate - 5.0).abs() < 0.05, "halved: {last_rate}");

    // Within the second: no further decrease.
    let t = report(db.pool.clone()).await;
    assert!(!t.decreased, "{t:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let t = report(other.clone()).await;
    assert!(t.decreased, "a new second, a new decrease: {t:?}");
    // 5 + about 0.1 per second of recovery, halved.
    assert!(t.rate > 2.5 && t.rate < 2.7, "{t:?}");

    // Never below a twentieth of the configured rate.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1010)).await;
        report(db.pool.clone()).await;
    }
    let mut conn = db.pool.acquire().await.expect("conn");
    let floor = rate * aimd.floor;
    let t = budget_take(&mut conn, key, rate, burst, 1.0, 0.0, None, &aimd)
        .await
        .expect("take")
        .expect("row");
    assert!(
        t.rate >= floor && t.rate < floor + 0.1,
        "at the floor: {t:?}"
    );

    // Additive increase: a hundredth of the configured rate per second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = budget_take(&mut conn, key, rate, burst, 1.0, 0.0, None, &aimd)
        .await
        .expect("take")
        .expect("row");
    let gained = later.rate - t.rate;
    assert!(
        (0.18..0.3).contains(&gained),
        "2 s recover about 0.2/s: {t:?} → {later:?}"
    );
}

/// Takes one token of a tiny budget, then succeeds.
struct Metered;

impl TypedHandler for Metered {
    type Spec = Value;
    const KIND: &'static str = "test.metered";

    async fn run(&self, ctx: &WorkContext, _spec: Value) -> Result<Outcome, AdapterError> {
        ctx.budget(
            BudgetKey::new("test", "acct", "global", "metered"),
            Limit::new(1.0, 1.0),
        )
        .take()
        .await?;
        Ok(Outcome::done())
    }
}

/// Eight units on a budget of one token per second: they all finish, one per token; the ones
/// that waited show `waiting` events, never a failure, hold no lease and no attempt while
/// they wait; those beyond the short line of promises sleep in the line of units until an
/// admission round lets them in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_waiting_for_budget_counts_no_attempt_and_holds_no_lease() {
    // More than the short line of promises (`FRESH_LINE`) at 1 token/s.
    const UNITS: usize = 8;
    let db = common::db().await;
    let mut registry = Registry::new();
    registry.register(typed(Metered)).expect("register");
    // As the engine does: the budgets' admission rounds wake the runtime.
    let budgets = PgBudgets::new(db.pool.clone());
    let wake = Arc::new(tokio::sync::Notify::new());
    let runtime = Runtime::new(db.pool.clone(), registry, common::fast_config("w-budget"))
        .expect("runtime")
        .with_budgets(Arc::new(budgets.clone()))
        .with_wake(wake.clone());
    let stop = CancellationToken::new();
    let admissions = tokio::spawn(budgets.run_admissions(wake, stop.clone()));
    let handle = tokio::spawn(runtime.run(stop.clone()));

    let mut ids = Vec::new();
    let mut tx = db.pool.begin().await.expect("tx");
    for i in 0..UNITS {
        let mut unit = NewWork::new(Metered::KIND, json!({ "i": i }));
        unit.max_attempts = Some(1);
        ids.push(queue::enqueue(&mut tx, unit).await.expect("enqueue").id);
    }
    tx.commit().await.expect("commit");
    queue::wake_workers(&db.pool).await.expect("wake");

    // While some wait: none of the waiting ones holds a lease or an attempt.
    let waiting: Vec<(i64, i32, Option<String>)> = wait_for("a unit waiting for budget", || {
        let pool = db.pool.clone();
        async move {
            let rows: Vec<(i64, i32, Option<String>)> = sqlx::query_as(
                "SELECT id, attempt, lease_owner FROM work
                 WHERE state = 'queued' AND last_error LIKE 'waiting for budget%'",
            )
            .fetch_all(&pool)
            .await
            .expect("rows");
            (!rows.is_empty()).then_some(rows)
        }
    })
    .await;
    for (id, attempt, owner) in &waiting {
        assert_eq!(*attempt, 0, "unit {id} waits with its attempt given back");
        assert_eq!(*owner, None, "unit {id} waits without a lease");
    }
    let started = Instant::now();
    common::wait_drained(&db.pool).await;
    stop.cancel();
    handle.await.expect("runtime");
    admissions.await.expect("admissions");
    println!(
        "{UNITS} units on 1 token/s drained {:.1} s after the first wait",
        started.elapsed().as_secs_f64()
    );
    // The units beyond the short line of promises slept in the line of units (no re-asking)
    // until an admission round let them in; the line is empty once they are done.
    let lined: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT work_id) FROM work_events
         WHERE work_id = ANY($1) AND event = 'waiting' AND message LIKE '%in the line of%'",
    )
    .bind(&ids)
    .fetch_one(&db.pool)
    .await
    .expect("lined");
    assert!(lined >= 1, "at 1 token/s, {UNITS} units make a line");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM request_budget_line")
        .fetch_one(&db.pool)
        .await
        .expect("line");
    assert_eq!(left, 0);

    let events: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event, count(*) FROM work_events WHERE work_id = ANY($1) GROUP BY 1 ORDER BY 1",
    )
    .bind(&ids)
    .fetch_all(&db.pool)
    .await
    .expect("events");
    let count = |e: &str| events.iter().find(|(n, _)| n == e).map_or(0, |(_, c)| *c);
    assert_eq!(count("succeeded"), UNITS as i64, "{events:?}");
    assert_eq!(count("failed") + count("parked"), 0, "{events:?}");
    assert!(
        count("waiting") >= 3,
        "at 1 token/s most of them waited: {events:?}"
    );
    // With one attempt allowed, a wait that counted would have parked the unit.
}

/// One token of `key` at `limit` (rate, burst), promised if at most `within` seconds away.
async fn take_one(
    conn: &mut sqlx::PgConnection,
    key: &str,
    (rate, burst): (f64, f64),
    within: Option<f64>,
) -> Taken {
    budget_take(conn, key, rate, burst, 1.0, 0.0, within, &Aimd::default())
        .await
        .expect("take")
        .expect("row")
}

/// A decrease moves the promises still to come to the new rate, in their order; a throttle of
/// a call sent before the last decrease lowers nothing; the longer no throttle was heard, the
/// faster the rate recovers. Times are set in the rows, so nothing here depends on speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decrease_moves_the_promises_and_a_quiet_key_recovers_faster() {
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let (rate, burst) = (10.0, 1.0);
    let key = "test/acct/region/rescale";
    let aimd = Aimd::default();
    let mut conn = db.pool.acquire().await.expect("conn");
    // Up to the first decrease in one transaction: one `now()` for every statement, so the
    // line's length does not depend on how fast the machine runs them.
    let mut tx = db.pool.begin().await.expect("tx");
    budget_ensure(&mut tx, key, rate, burst)
        .await
        .expect("ensure");
    // The one token, then four units promised the next ones.
    let t = take_one(&mut tx, key, (rate, burst), Some(f64::INFINITY)).await;
    assert_eq!(t.granted, 1.0, "{t:?}");
    for unit in 1..=4 {
        let t = take_one(&mut tx, key, (rate, burst), Some(f64::INFINITY)).await;
        assert_eq!(t.granted, 0.0, "{t:?}");
        budget_reserve(&mut tx, key, unit, t.wait_secs)
            .await
            .expect("reserve");
    }
    async fn slots(conn: &mut sqlx::PgConnection, key: &str) -> Vec<(i64, f64)> {
        sqlx::query_as(
            "SELECT work_id, extract(epoch FROM slot)::float8
             FROM request_budget_reservations WHERE key = $1 ORDER BY slot",
        )
        .bind(key)
        .fetch_all(conn)
        .await
        .expect("slots")
    }
    // A unit at its first call is not promised a token beyond a short line (it joins the line
    // of units instead), and the balance stays as it was.
    let t = take_one(&mut tx, key, (rate, burst), Some(0.2)).await;
    assert!(!t.promised && t.granted == 0.0, "{t:?}");
    assert!(t.wait_secs > 0.2, "the line is about 0.5 s: {t:?}");
    let before = slots(&mut tx, key).await;
    assert_eq!(before.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4]);

    let t = budget_throttle(&mut tx, key, rate, burst, None, &aimd)
        .await
        .expect("throttle")
        .expect("row");
    assert!(t.decreased && (t.rate - 5.0).abs() < 0.05, "{t:?}");
    let at: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM at)::float8 FROM request_budgets WHERE key = $1",
    )
    .bind(key)
    .fetch_one(&mut *tx)
    .await
    .expect("at");
    let after = slots(&mut tx, key).await;
    assert_eq!(after.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
    for (b, a) in before.iter().zip(&after) {
        if b.1 > at {
            // Twice as far from the decrease: the rate halved.
            let (was, now) = (b.1 - at, a.1 - at);
            assert!(
                now > 1.9 * was && now < 2.0 * was + 1e-3,
                "unit {}: {was:.4} s → {now:.4} s",
                b.0
            );
        }
    }

    tx.commit().await.expect("commit");

    // A throttle of a call sent before the last decrease (two seconds ago) lowers nothing; one
    // of a call sent after it does.
    sqlx::query(
        "UPDATE request_budgets SET throttled_at = now() - interval '2 seconds' WHERE key = $1",
    )
    .bind(key)
    .execute(&db.pool)
    .await
    .expect("age");
    let t = budget_throttle(&mut conn, key, rate, burst, Some(3.0), &aimd)
        .await
        .expect("throttle")
        .expect("row");
    assert!(!t.decreased, "sent before the decrease: {t:?}");
    let t = budget_throttle(&mut conn, key, rate, burst, Some(0.5), &aimd)
        .await
        .expect("throttle")
        .expect("row");
    assert!(t.decreased, "sent after the decrease: {t:?}");

    // One second of recovery right after a decrease regains 1% of the configured rate; after
    // a minute without a throttle, `max_boost` times that.
    let regained = |quiet_secs: f64, peak: Option<f64>| {
        let pool = db.pool.clone();
        async move {
            sqlx::query(
                "UPDATE request_budgets
                 SET rate = 1, at = now() - interval '1 second',
                     throttled_at = now() - make_interval(secs => $2), peak = $3
                 WHERE key = $1",
            )
            .bind(key)
            .bind(quiet_secs)
            .bind(peak)
            .execute(&pool)
            .await
            .expect("set");
            let mut conn = pool.acquire().await.expect("conn");
            let t = budget_take(&mut conn, key, rate, burst, 1.0, 0.0, None, &aimd)
                .await
                .expect("take")
                .expect("row");
            t.rate - 1.0
        }
    };
    let fresh = regained(1.0, None).await;
    let quiet = regained(60.0, None).await;
    // Back near the rate the peer refused (`peak`), within 30 s of the decrease, the rate
    // probes without the boost; far below it, or after 30 quiet seconds, the boost is back.
    let near_peak = regained(20.0, Some(1.1)).await;
    let below_peak = regained(20.0, Some(5.0)).await;
    let past_hold = regained(40.0, Some(1.1)).await;
    assert!(
        (0.1..0.13).contains(&near_peak),
        "20 s after a decrease, at 91% of the refused rate: about 0.1/s, got {near_peak:.3}"
    );
    assert!(
        (0.75..0.85).contains(&below_peak),
        "20 s after a decrease, at 20% of the refused rate: 2^4 · 0.1 capped at 0.8/s, got \
         {below_peak:.3}"
    );
    assert!(
        (past_hold - rate * aimd.recover * aimd.max_boost).abs() < 0.02,
        "40 s after a decrease: {past_hold:.3}"
    );
    assert!(
        (0.1..0.13).contains(&fresh),
        "1 s after a decrease: about 0.1/s, got {fresh:.3}"
    );
    assert!(
        (quiet - rate * aimd.recover * aimd.max_boost).abs() < 0.02,
        "after a quiet minute: {quiet:.3}"
    );
}

/// A unit of `tenant` enqueued and put in `key`'s line of units, as a unit at its first call
/// that found a long line is.
async fn line_unit(pool: &PgPool, key: &str, tenant: &str) -> i64 {
    let mut work = NewWork::new("test.line", json!({}));
    work.tenant = Some(tenant.to_owned());
    let mut tx = pool.begin().await.expect("tx");
    let id = queue::enqueue(&mut tx, work).await.expect("enqueue").id;
    budget_line_join(&mut tx, key, id).await.expect("join");
    tx.commit().await.expect("commit");
    id
}

/// The line of units: an admission round lets units in while the line of promises is short,
/// by lane, then one unit of each tenant in turn, then who came first; a unit running at that
/// moment is passed over and let in by a later round; a unit whose work is gone leaves the
/// line. Each unit let in holds a promise and is due at its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_line_lets_units_in_by_tenant_turns_and_passes_over_running_ones() {
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let (rate, burst) = (10.0, 1.0);
    let key = "test/acct/region/line";
    let mut conn = db.pool.acquire().await.expect("conn");
    budget_ensure(&mut conn, key, rate, burst)
        .await
        .expect("ensure");
    // Tenant a's four units joined first, then tenant b's one, then a unit whose work is gone.
    let mut a = Vec::new();
    for _ in 0..4 {
        a.push(line_unit(&db.pool, key, "a").await);
    }
    let b = line_unit(&db.pool, key, "b").await;
    let gone = line_unit(&db.pool, key, "c").await;
    sqlx::query("DELETE FROM work WHERE id = $1")
        .bind(gone)
        .execute(&db.pool)
        .await
        .expect("delete");
    // a[1] is running (an attempt deciding to wait holds its lease).
    sqlx::query(
        "UPDATE work SET lease_owner = 'w', lease_expires_at = now() + interval '1 minute'
         WHERE id = $1",
    )
    .bind(a[1])
    .execute(&db.pool)
    .await
    .expect("lease");

    // With `empty`, the bucket is emptied in the round's transaction first: the next token is
    // then exactly 0.1 s away (one `now()` for both statements, however slow the machine).
    let let_in = |within: f64, empty: bool| {
        let pool = db.pool.clone();
        async move {
            let mut tx = pool.begin().await.expect("tx");
            if empty {
                sqlx::query("UPDATE request_budgets SET tokens = 0, at = now() WHERE key = $1")
                    .bind(key)
                    .execute(&mut *tx)
                    .await
                    .expect("empty");
            }
            let admitted = budget_admit(&mut tx, key, within, 100, &Aimd::default())
                .await
                .expect("admit")
                .expect("row not locked");
            tx.commit().await.expect("commit");
            let order: Vec<i64> = sqlx::query_scalar(
                "SELECT r.work_id FROM request_budget_reservations r
                 JOIN work w ON w.id = r.work_id AND w.run_at = r.slot AND w.fair_at = r.slot
                 WHERE r.key = $1 ORDER BY r.slot",
            )
            .bind(key)
            .fetch_all(&pool)
            .await
            .expect("reservations");
            (admitted, order)
        }
    };
    // An empty bucket: the next token is 0.1 s away, so 0.22 s of promises fit two units: a's
    // first, then b's (turns), not a's second.
    let (admitted, order) = let_in(0.22, true).await;
    assert_eq!(order, [a[0], b], "{admitted:?}");
    assert_eq!(admitted.slots.len(), 2, "{admitted:?}");
    assert!(
        (admitted.slots[1] - admitted.slots[0] - 0.1).abs() < 0.01,
        "spaced at the rate: {admitted:?}"
    );
    // The gone unit left the line; a[1] (running), a[2], a[3] are in it.
    assert_eq!(admitted.left, 3, "{admitted:?}");

    // A long window: everyone not running is let in, a[1] is passed over.
    let (admitted, order) = let_in(60.0, false).await;
    assert_eq!(order, [a[0], b, a[2], a[3]], "{admitted:?}");
    assert_eq!(admitted.left, 1, "{admitted:?}");
    let waiting = budget_waiting(&mut conn).await.expect("waiting");
    assert_eq!(waiting, [(key.to_owned(), 4, 1)]);

    // Once a[1] has recorded its wait (no lease), the next round lets it in.
    sqlx::query("UPDATE work SET lease_owner = NULL, lease_expires_at = NULL WHERE id = $1")
        .bind(a[1])
        .execute(&db.pool)
        .await
        .expect("release");
    let (admitted, order) = let_in(60.0, false).await;
    assert_eq!(order, [a[0], b, a[2], a[3], a[1]], "{admitted:?}");
    assert_eq!(admitted.left, 0, "{admitted:?}");
}

/// The line's turns follow the tenants' weights, as the claim does: a tenant of weight 2 is let
/// in twice for each time a tenant of weight 1 is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_line_gives_a_tenant_of_weight_two_two_turns_for_each_of_weight_one() {
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let key = "test/acct/region/weighted";
    let mut conn = db.pool.acquire().await.expect("conn");
    budget_ensure(&mut conn, key, 10.0, 1.0)
        .await
        .expect("ensure");
    setpoint::store::tenant_weights::tenant_weight_set(&mut conn, "heavy", 2.0)
        .await
        .expect("weight");
    // "heavy" joined first with four units, then "light" with two.
    let mut h = Vec::new();
    for _ in 0..4 {
        h.push(line_unit(&db.pool, key, "heavy").await);
    }
    let l = [
        line_unit(&db.pool, key, "light").await,
        line_unit(&db.pool, key, "light").await,
    ];
    let mut tx = db.pool.begin().await.expect("tx");
    budget_admit(&mut tx, key, 60.0, 100, &Aimd::default())
        .await
        .expect("admit")
        .expect("row not locked");
    tx.commit().await.expect("commit");
    let order: Vec<i64> = sqlx::query_scalar(
        "SELECT work_id FROM request_budget_reservations WHERE key = $1 ORDER BY slot",
    )
    .bind(key)
    .fetch_all(&db.pool)
    .await
    .expect("reservations");
    // Turns: heavy 0.5, 1, 1.5, 2; light 1, 2 (ties go to who joined first).
    assert_eq!(order, [h[0], h[1], l[0], h[2], h[3], l[1]]);
}

/// An engine takes tokens in batches; what it does not spend within a second goes back to the
/// shared row even when the engine never calls the key again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_reserve_goes_back_to_the_shared_budget() {
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let budgets = PgBudgets::new(db.pool.clone());
    let key = BudgetKey::new("test", "acct", "global", "reserve");
    // Burst 20: a batch of 2 tokens, one spent, one left in the engine's reserve.
    let limit = Limit::new(0.001, 20.0);
    setpoint_adapter::Budgets::take(&budgets, &key, limit)
        .await
        .expect("take");
    // Within its second the reserve stays with the engine.
    assert_eq!(budgets.give_back_idle().await.expect("give back"), 0);
    let name = key.to_string();
    let tokens = || {
        let pool = db.pool.clone();
        let name = name.clone();
        async move {
            sqlx::query_scalar::<_, f64>("SELECT tokens FROM request_budgets WHERE key = $1")
                .bind(name)
                .fetch_one(&pool)
                .await
                .expect("tokens")
        }
    };
    assert_eq!(tokens().await, 18.0);
    tokio::time::sleep(setpoint::budgets::RESERVE_TTL).await;
    assert_eq!(budgets.give_back_idle().await.expect("give back"), 1);
    assert_eq!(tokens().await, 19.0);
    assert_eq!(budgets.give_back_idle().await.expect("give back"), 0);
}

// ---------------------------------------------------------------------------------------
// The issue's test: a throttling proxy in front of moto.

/// The regions the creates are spread over, [`PER_REGION`] per region: those an instance may
/// live in, us-east-1 first.
const REGIONS: [&str; 5] = [
    "us-east-1",
    "eu-west-1",
    "eu-central-1",
    "us-west-2",
    "ap-southeast-1",
];

/// Creates per region. moto's filtered `DescribeInstances` scans every machine of its region
/// (measured on an idle moto: 16 ms at 100 machines, 62 ms at 250, 192 ms at 500, 741 ms at
/// 1,000; `DescribeVolumes` 1.2 s at 1,000): with 1,000 creates in one region moto's one core
/// serves about one describe a second by the time 300 machines exist, every call times out,
/// and the test measures moto. EC2 limits requests per account *and region*, as the proxy does.
const PER_REGION: usize = 200;

/// The engines' configuration: EC2 through the proxy in each of `regions`, with budgets above
/// the proxy's limit for RunInstances and describes, so that only AIMD keeps them under it.
fn write_config(
    dir: &Path,
    db_url: &str,
    ec2: &str,
    peers: &Peers,
    r: usize,
    regions: &[&str],
) -> PathBuf {
    let config = dir.join("setpoint.toml");
    let ec2_regions: String = regions
        .iter()
        .map(|region| {
            format!(
                r#"
[ec2.regions.{region}]
endpoint_url = "{ec2}"
default_image_id = "ami-12c6146b"

[ec2.regions.{region}.timeouts]
poll_initial_ms = 200
poll_max_ms = 1000

[ec2.regions.{region}.budgets]
run_instances = {{ rate = {run}, burst = {r} }}
describe = {{ rate = {describe}, burst = {r} }}
"#,
                run = 1.5 * r as f64,
                describe = 2.0 * r as f64,
            )
        })
        .collect();
    std::fs::write(
        &config,
        format!(
            r#"
database_url = "{db_url}"

[api]
max_changes_in_flight_per_tenant = 100000

[worker]
poll_interval = "200ms"
lease = "10s"
backoff_base = "200ms"
backoff_cap = "2s"

# [ec2] max_attempts stays at its default (3): with shared budgets the SDK resends no
# throttle, the budget hears of it at once (setpoint_adapter::aws).
{ec2_regions}
[kubernetes]
access = {{ mode = "url", url = "{k8s}" }}

[smtp]
host = "127.0.0.1"
port = {smtp_port}
security = "none"
from = "setpoint <noreply@setpoint.test>"
"#,
            k8s = peers.k8s.url(),
            smtp_port = peers.smtp_port,
        ),
    )
    .expect("config");
    config
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_engines_stay_under_a_throttling_ec2_together() {
    let n = env_number("SETPOINT_BUDGET_TEST_N", 100);
    let r = env_number("SETPOINT_BUDGET_TEST_R", 10);
    let regions = &REGIONS[..n.div_ceil(PER_REGION).clamp(1, REGIONS.len())];
    let dir = TmpDir::new("budgets");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let peers = Peers::start(&dir).await;
    let proxy = AwsProxy::throttling(peers.moto.clone(), r).await;
    let (ok, _, err) = setpoint(Some(&db.url), &["migrate"]);
    assert!(ok, "{err}");
    let config = write_config(&dir, &db.url, &proxy.url(), &peers, r, regions);

    let engines: Vec<EngineProcess> = (1..=3)
        .map(|i| serve(&config, &format!("engine-{i}")))
        .collect();
    let mut api_addr = String::new();
    for e in &engines {
        api_addr = api_addr_of(e).await;
    }
    let token = setpoint::api::auth::create_token(&db.pool, "demo", false, None)
        .await
        .expect("token");
    let api = client_for(&format!("http://{api_addr}"), &token.token).await;

    let started = Instant::now();
    let names: Vec<String> = (0..n).map(|i| format!("vm-{i:04}")).collect();
    for (c, chunk) in names.chunks(32).enumerate() {
        let all: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let region = regions[(c * 32 + i) % regions.len()];
                {
                    let (api, name) = (api.clone(), name.clone());
                    tokio::spawn(async move { create_small(&api, &name, region).await })
                }
            })
            .collect();
        for t in all {
            t.await.expect("create task");
        }
    }
    let submitted = started.elapsed();
    let ready = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM instances WHERE tenant = 'demo' AND status = 'READY'",
        )
        .fetch_one(&pool)
        .await
        .expect("ready")
    };
    let mut last_print = Instant::now();
    loop {
        let done = ready(db.pool.clone()).await as usize;
        if done >= n {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            last_print = Instant::now();
            println!(
                "{done}/{n} READY after {:.0} s",
                started.elapsed().as_secs_f64()
            );
            let units: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT kind, state::text, count(*) FROM work GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .fetch_all(&db.pool)
            .await
            .expect("units");
            let rows: Vec<(String, f64, f64)> =
                sqlx::query_as("SELECT key, rate, tokens FROM request_budgets ORDER BY key")
                    .fetch_all(&db.pool)
                    .await
                    .expect("budgets");
            println!("  units {units:?}\n  budgets {rows:?}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60 + 2 * n as u64),
            "not every instance became READY in time"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let total = started.elapsed();

    let parked = parked(&db.pool).await;
    let (waits, throttle_waits, failed): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE event = 'waiting'),
                count(*) FILTER (WHERE event = 'waiting' AND detail->>'code' = 'RequestLimitExceeded'),
                count(*) FILTER (WHERE event = 'failed')
         FROM work_events",
    )
    .fetch_one(&db.pool)
    .await
    .expect("events");
    // What the failed attempts were (a transient failure retried, not a throttle).
    let failures: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT left(message, 160), count(*) FROM work_events WHERE event = 'failed'
         GROUP BY 1 ORDER BY 2 DESC LIMIT 5",
    )
    .fetch_all(&db.pool)
    .await
    .expect("failures");
    let budgets: Vec<(String, f64, f64, i64, i64)> = sqlx::query_as(
        "SELECT key, rate, max_rate, throttles, waits FROM request_budgets ORDER BY key",
    )
    .fetch_all(&db.pool)
    .await
    .expect("budgets");

    let calls = proxy.snapshot();
    let first = calls.first().map_or(started, |c| c.at);
    let after: Vec<_> = calls
        .iter()
        .filter(|c| c.at.duration_since(first) >= Duration::from_secs(10))
        .collect();
    let throttled_after = after.iter().filter(|c| c.throttled).count();
    let throttled_all = calls.iter().filter(|c| c.throttled).count();
    let mut by_action: HashMap<&str, (usize, usize)> = HashMap::new();
    for c in &calls {
        let e = by_action.entry(c.action.as_str()).or_default();
        e.0 += 1;
        e.1 += usize::from(c.throttled);
    }
    let share = throttled_after as f64 / after.len().max(1) as f64;
    // The proxy allows R calls per second per action in each region.
    let ideal = n as f64 / (r * regions.len()) as f64;
    println!(
        "N = {n} over {} region(s), R = {r}/s per action and region, 3 engines: all READY in \
         {:.1} s (submitted in {:.1} s); N / R = {:.1} s, N / (R × regions) = {ideal:.1} s, \
         ratio {:.2}",
        regions.len(),
        total.as_secs_f64(),
        submitted.as_secs_f64(),
        n as f64 / r as f64,
        total.as_secs_f64() / ideal
    );
    println!(
        "EC2 calls {} ({} throttled); after the first 10 s {} ({} throttled, {:.2}%)",
        calls.len(),
        throttled_all,
        after.len(),
        throttled_after,
        share * 100.0
    );
    println!("by action (calls, throttled): {by_action:?}");
    println!(
        "unit events: {waits} waits ({throttle_waits} after a throttle), {failed} failed, {parked} parked"
    );
    println!("failed attempts by message: {failures:#?}");
    println!("budgets (key, rate, max_rate, throttles, waits): {budgets:#?}");

    assert_eq!(parked, 0, "no unit parks");
    assert!(
        share < 0.05,
        "{:.2}% throttled after the first 10 s",
        share * 100.0
    );
    drop(engines);
}
