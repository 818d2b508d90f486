//! Retention against PostgreSQL: what each rule prunes and what it keeps, batches, two
//! engines at once, the service loop, and a request id replayed after its window through the
//! real API. Rows are aged by writing their timestamps in the past; no test waits for time to
//! pass or asserts on speed.
//!
//! The ignored test `retention_bench` measures table sizes and a round's time over 1,000,000
//! units (docs/retention.md): `cargo test -p setpoint --test retention -- --ignored
//! --nocapture retention_bench` (`RETENTION_BENCH_UNITS` sets another count).

mod api_support;
mod common;

use std::time::{Duration, Instant};

use api_support::{Env, authed, create_req};
use setpoint::dev::testdb::{TestDb, test_db};
use setpoint::maintenance::retention::{Retention, RetentionConfig, RoundReport, Table};
use setpoint::store::retention::{
    API_REQUESTS_PRUNE_SQL, RETENTION_LOCK_KEY, SIDE_EFFECTS_PRUNE_SQL, TOMBSTONES_PRUNE_SQL,
    WORK_EVENTS_PRUNE_SQL,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use uuid::Uuid;

const HOUR: Duration = Duration::from_secs(3600);

/// Every period one hour, small batches, no pause: rows aged two hours are due, rows of now
/// are not.
fn hourly(batch: usize) -> RetentionConfig {
    RetentionConfig {
        interval: Some(HOUR),
        work_history: Some(HOUR),
        request_ids: Some(HOUR),
        journal: Some(HOUR),
        tombstones: Some(HOUR),
        batch,
        pause: Duration::ZERO,
    }
}

fn service(db: &TestDb, config: RetentionConfig) -> Retention {
    Retention::new(db.pool.clone(), config).expect("valid config")
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A unit that has left `work` (finished), with one event per entry of `ages_h` (hours ago,
/// oldest first). Its id comes from the work table's identity, as a real unit's does.
async fn finished_unit(pool: &PgPool, ages_h: &[f64]) -> i64 {
    let id: i64 = sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('work', 'id'))")
        .fetch_one(pool)
        .await
        .unwrap();
    events(pool, id, ages_h).await;
    id
}

/// A unit still in `work` in `state`, working on `resource`, with events aged `ages_h`.
async fn live_unit(pool: &PgPool, state: &str, resource: Option<Uuid>, ages_h: &[f64]) -> i64 {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO work (kind, spec, token, state, resource_id, created_at)
         VALUES ('setpoint.noop', '{}', 'tok-' || md5(random()::text), $1::work_state, $2,
                 now() - interval '1 day')
         RETURNING id",
    )
    .bind(state)
    .bind(resource)
    .fetch_one(pool)
    .await
    .unwrap();
    events(pool, id, ages_h).await;
    id
}

async fn events(pool: &PgPool, id: i64, ages_h: &[f64]) {
    for (i, age) in ages_h.iter().enumerate() {
        let event = match i {
            0 => "enqueued",
            n if n + 1 == ages_h.len() => "succeeded",
            _ => "claimed",
        };
        sqlx::query(
            "INSERT INTO work_events (work_id, token, event, at)
             VALUES ($1, 'tok-' || $1, $2, now() - make_interval(secs => $3 * 3600))",
        )
        .bind(id)
        .bind(event)
        .bind(age)
        .execute(pool)
        .await
        .unwrap();
    }
}

async fn events_of(pool: &PgPool, id: i64) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM work_events WHERE work_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A journal row for unit `work_id`, started `age_h` hours ago, finished then or still open.
async fn journal_row(pool: &PgPool, key: &str, work_id: i64, age_h: f64, finished: bool) {
    sqlx::query(
        "INSERT INTO side_effects (key, work_id, token, started_at, finished_at, result)
         VALUES ($1, $2, 'tok', now() - make_interval(secs => $3 * 3600),
                 CASE WHEN $4 THEN now() - make_interval(secs => $3 * 3600) END,
                 CASE WHEN $4 THEN '{\"sent\": true}'::jsonb END)",
    )
    .bind(key)
    .bind(work_id)
    .bind(age_h)
    .bind(finished)
    .execute(pool)
    .await
    .unwrap();
}

async fn journal_keys(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT key FROM side_effects ORDER BY key")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// An instance created a day ago; deleted `deleted_h` hours ago when given.
async fn instance(pool: &PgPool, name: &str, deleted_h: Option<f64>) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO instances (id, tenant, name, spec, status, created_at, deleted_at)
         VALUES ($1, 'acme', $2, '{}', CASE WHEN $3::float8 IS NULL THEN 'READY' ELSE 'DELETED' END,
                 now() - interval '1 day', now() - make_interval(secs => $3 * 3600))",
    )
    .bind(id)
    .bind(name)
    .bind(deleted_h)
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn instance_names(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT name FROM instances ORDER BY name")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn request_id(pool: &PgPool, id: &str, age_h: f64) {
    sqlx::query(
        "INSERT INTO api_requests (tenant, request_id, method, body_hash, response, created_at)
         VALUES ('acme', $1, 'CreateInstance', '\\x01', '\\x02',
                 now() - make_interval(secs => $2 * 3600))",
    )
    .bind(id)
    .bind(age_h)
    .execute(pool)
    .await
    .unwrap();
}

async fn request_ids(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT request_id FROM api_requests ORDER BY request_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn round(db: &TestDb, config: RetentionConfig) -> RoundReport {
    let report = service(db, config).run_once().await.expect("round");
    assert!(report.ran, "nobody else holds the lock");
    report
}

#[tokio::test]
async fn finished_units_lose_their_whole_history_once_their_last_event_is_old() {
    let db = test_db().await.expect("test database");
    let pool = &db.pool;
    let old = finished_unit(pool, &[5.0, 4.9, 4.8]).await;
    let old_too = finished_unit(pool, &[3.0, 2.0]).await;
    // Enqueued long ago but finished within the period: kept whole, not in part.
    let finished_lately = finished_unit(pool, &[5.0, 4.0, 0.5]).await;
    let recent = finished_unit(pool, &[0.2, 0.1]).await;
    // Units still in work keep their history whatever its age: parked, pending, running.
    let parked = live_unit(pool, "parked", None, &[9.0, 8.0]).await;
    let pending = live_unit(pool, "pending", None, &[9.0]).await;
    let running = live_unit(pool, "pending", None, &[7.0, 6.0]).await;
    exec(
        pool,
        &format!(
            "UPDATE work SET lease_owner = 'w1', lease_expires_at = now() + interval '1 minute'
             WHERE id = {running}"
        ),
    )
    .await;

    let report = round(&db, hourly(1000)).await;
    assert_eq!(report.pruned(Table::WorkEvents), 5);
    assert_eq!(events_of(pool, old).await, 0);
    assert_eq!(events_of(pool, old_too).await, 0);
    assert_eq!(events_of(pool, finished_lately).await, 3, "kept whole");
    assert_eq!(events_of(pool, recent).await, 2);
    assert_eq!(events_of(pool, parked).await, 2);
    assert_eq!(events_of(pool, pending).await, 1);
    assert_eq!(events_of(pool, running).await, 2);

    // `setpoint work show` of a pruned unit says it does not exist; a kept one still shows.
    let mut conn = pool.acquire().await.unwrap();
    let gone = setpoint::queue::show(&mut conn, &old.to_string()).await;
    assert!(
        matches!(gone, Err(setpoint::queue::QueueError::NotFound(_))),
        "{gone:?}"
    );
    let kept = setpoint::queue::show(&mut conn, &finished_lately.to_string())
        .await
        .unwrap();
    assert_eq!(kept.events.len(), 3);
    drop(conn);

    // The parked unit is cancelled by an operator: once its last event is old, its history
    // goes too.
    exec(
        pool,
        &format!(
            "WITH c AS (DELETE FROM work WHERE id = {parked} RETURNING id)
             INSERT INTO work_events (work_id, token, event, at)
             SELECT id, 'tok', 'cancelled', now() - interval '2 hours' FROM c"
        ),
    )
    .await;
    let report = round(&db, hourly(1000)).await;
    assert_eq!(report.pruned(Table::WorkEvents), 3);
    assert_eq!(events_of(pool, parked).await, 0);
    assert_eq!(
        count(pool, "SELECT count(*) FROM work_events").await,
        3 + 2 + 1 + 2
    );
}

#[tokio::test]
async fn request_ids_older_than_the_window_are_forgotten() {
    let db = test_db().await.expect("test database");
    let pool = &db.pool;
    for (id, age) in [
        ("old-1", 2.0),
        ("old-2", 30.0),
        ("new-1", 0.5),
        ("new-2", 0.0),
    ] {
        request_id(pool, id, age).await;
    }
    // Another tenant's ids follow the same rule.
    exec(
        pool,
        "INSERT INTO api_requests (tenant, request_id, method, body_hash, created_at)
         VALUES ('globex', 'old-1', 'DeleteInstance', '\\x01', now() - interval '3 hours')",
    )
    .await;
    let report = round(&db, hourly(1000)).await;
    assert_eq!(report.pruned(Table::ApiRequests), 3);
    assert_eq!(request_ids(pool).await, vec!["new-1", "new-2"]);
}

#[tokio::test]
async fn journal_rows_go_with_their_unit_and_never_while_it_is_parked() {
    let db = test_db().await.expect("test database");
    let pool = &db.pool;
    let done = finished_unit(pool, &[5.0, 4.0]).await;
    let done_lately = finished_unit(pool, &[0.5]).await;
    let cancelled = finished_unit(pool, &[5.0]).await;
    let parked = live_unit(pool, "parked", None, &[9.0]).await;
    let pending = live_unit(pool, "pending", None, &[9.0]).await;
    journal_row(pool, "a-finished-old", done, 5.0, true).await;
    journal_row(pool, "b-finished-recent", done_lately, 0.5, true).await;
    // Started, no result, unit cancelled by an operator long ago: nothing can read it again.
    journal_row(pool, "c-open-unit-gone", cancelled, 5.0, false).await;
    // Started without a result while its unit is parked ("outcome unknown"): this row is what
    // keeps a retry from sending twice.
    journal_row(pool, "d-open-unit-parked", parked, 30.0, false).await;
    journal_row(pool, "e-finished-unit-pending", pending, 30.0, true).await;
    // Finished lately after an old start (an operator resolved it): its last change counts.
    journal_row(pool, "f-resolved-lately", done, 5.0, false).await;
    exec(
        pool,
        "UPDATE side_effects SET finished_at = now() - interval '10 minutes',
                result = '{\"sent\": false, \"resolved_by\": \"operator\"}'
         WHERE key = 'f-resolved-lately'",
    )
    .await;

    let report = round(&db, hourly(1000)).await;
    assert_eq!(report.pruned(Table::SideEffects), 2);
    assert_eq!(
        journal_keys(pool).await,
        vec![
            "b-finished-recent",
            "d-open-unit-parked",
            "e-finished-unit-pending",
            "f-resolved-lately"
        ]
    );
}

#[tokio::test]
async fn tombstones_go_once_old_and_without_work() {
    let db = test_db().await.expect("test database");
    let pool = &db.pool;
    instance(pool, "live", None).await;
    instance(pool, "deleted-old", Some(5.0)).await;
    instance(pool, "deleted-recently", Some(0.5)).await;
    // Deleted long ago, but a unit of it is still in work (a parked step of its chain).
    let busy = instance(pool, "deleted-old-with-work", Some(5.0)).await;
    live_unit(pool, "parked", Some(busy), &[5.0]).await;

    let report = round(&db, hourly(1000)).await;
    assert_eq!(report.pruned(Table::Tombstones), 1);
    assert_eq!(
        instance_names(pool).await,
        vec!["deleted-old-with-work", "deleted-recently", "live"]
    );

    // Its unit cancelled, the tombstone goes at the next round.
    exec(
        pool,
        &format!("DELETE FROM work WHERE resource_id = '{busy}'"),
    )
    .await;
    let report = round(&db, hourly(1000)).await;
    assert_eq!(report.pruned(Table::Tombstones), 1);
    assert_eq!(instance_names(pool).await, vec!["deleted-recently", "live"]);
}

#[tokio::test]
async fn a_period_set_off_keeps_its_table_whole() {
    let db = test_db().await.expect("test database");
    let pool = &db.pool;
    let unit = finished_unit(pool, &[5.0]).await;
    request_id(pool, "old", 5.0).await;
    journal_row(pool, "old", unit, 5.0, true).await;
    instance(pool, "gone", Some(5.0)).await;
    let off = RetentionConfig {
        work_history: None,
        request_ids: None,
        journal: None,
        tombstones: None,
        ..hourly(1000)
    };
    let report = round(&db, off).await;
    assert!(report.tables.is_empty(), "{report:?}");
    for table in ["work_events", "api_requests", "side_effects", "instances"] {
        assert_eq!(
            count(pool, &format!("SELECT count(*) FROM {table}")).await,
            1
        );
    }
    // And a service whose periods are all off is not even started.
    assert!(
        service(
            &db,
            RetentionConfig {
                interval: Some(HOUR),
                ..off_all()
            }
        )
        .spawn(&CancellationToken::new())
        .is_none()
    );
}

fn off_all() -> RetentionConfig {
    RetentionConfig {
        work_history: None,
        request_ids: None,
        journal: None,
        tombstones: None,
        ..RetentionConfig::default()
    }
}

/// 3,000 finished units (about 7,500 events), request ids and journal rows, half of them
/// old, and 40 tombstones, in bulk.
async fn fill_many(pool: &PgPool) -> (i64, i64, i64, i64) {
    exec(
        pool,
        "WITH u AS (
             SELECT nextval(pg_get_serial_sequence('work', 'id')) AS id, g,
                    CASE WHEN g % 2 = 0 THEN interval '2 hours' ELSE interval '0' END AS age
             FROM generate_series(1, 3000) g
         )
         INSERT INTO work_events (work_id, token, event, at)
         SELECT u.id, 'tok-' || u.id, e, now() - u.age
         FROM u, unnest(CASE WHEN u.g % 3 = 0 THEN ARRAY['enqueued', 'succeeded']
                             ELSE ARRAY['enqueued', 'claimed', 'succeeded'] END) e",
    )
    .await;
    exec(
        pool,
        "INSERT INTO api_requests (tenant, request_id, method, body_hash, created_at)
         SELECT 't' || (g % 7), 'r-' || g, 'CreateInstance', '\\x01',
                now() - CASE WHEN g % 2 = 0 THEN interval '2 hours' ELSE interval '0' END
         FROM generate_series(1, 3000) g",
    )
    .await;
    exec(
        pool,
        "INSERT INTO side_effects (key, work_id, token, started_at, finished_at, result)
         SELECT 'email:' || work_id, work_id, 'tok', min(at), min(at), '{}'
         FROM work_events GROUP BY work_id",
    )
    .await;
    exec(
        pool,
        "INSERT INTO instances (id, tenant, name, spec, status, deleted_at)
         SELECT gen_random_uuid(), 'acme', 'i-' || g, '{}', 'DELETED',
                now() - CASE WHEN g % 2 = 0 THEN interval '2 hours' ELSE interval '0' END
         FROM generate_series(1, 40) g",
    )
    .await;
    let old_events = count(
        pool,
        "SELECT count(*) FROM work_events WHERE at < now() - interval '1 hour'",
    )
    .await;
    (old_events, 1500, 1500, 20)
}

#[tokio::test]
async fn rounds_prune_in_batches_of_at_most_the_batch_size() {
    let db = test_db().await.expect("test database");
    let pool = &db.pool;
    let (events, requests, journal, tombstones) = fill_many(pool).await;
    let report = round(&db, hourly(100)).await;
    for (table, want) in [
        (Table::WorkEvents, events),
        (Table::ApiRequests, requests),
        (Table::SideEffects, journal),
        (Table::Tombstones, tombstones),
    ] {
        let t = report
            .tables
            .iter()
            .find(|t| t.table == table)
            .expect("table pruned");
        assert_eq!(t.pruned, want as u64, "{t:?}");
        // Events go unit by unit: the last unit of a batch may bring its other events along.
        let most = if table == Table::WorkEvents {
            100 + 2
        } else {
            100
        };
        assert!(t.largest_statement <= most, "{t:?}");
        assert!(
            t.statements >= t.scanned / 100,
            "every statement read at most a batch: {t:?}"
        );
    }
    // Everything still there is recent.
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM work_events WHERE at < now() - interval '1 hour'"
        )
        .await,
        0
    );
    assert_eq!(count(pool, "SELECT count(*) FROM api_requests").await, 1500);
    assert_eq!(count(pool, "SELECT count(*) FROM side_effects").await, 1500);
    assert_eq!(count(pool, "SELECT count(*) FROM instances").await, 20);
    // A second round finds nothing more.
    let again = round(&db, hourly(100)).await;
    assert!(again.tables.iter().all(|t| t.pruned == 0), "{again:?}");
}

#[tokio::test]
async fn two_engines_prune_each_row_once_and_never_wait_for_each_other() {
    let db = test_db().await.expect("test database");
    let pool = &db.pool;
    let (events, requests, journal, tombstones) = fill_many(pool).await;
    let total = (events + requests + journal + tombstones) as u64;

    // Another engine is in the middle of a round: this one skips at once instead of waiting.
    let mut other = db.pool.acquire().await.unwrap().detach();
    let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(RETENTION_LOCK_KEY)
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert!(held);
    let skipped = service(&db, hourly(100)).run_once().await.unwrap();
    assert!(!skipped.ran && skipped.tables.is_empty(), "{skipped:?}");
    assert_eq!(
        count(pool, "SELECT count(*) FROM api_requests").await,
        3000,
        "nothing pruned"
    );
    // The other engine dies: its session ends, and PostgreSQL releases the lock with it.
    drop(other);
    common::wait_for("the dead session's lock to go", || async {
        let held = count(
            pool,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .await;
        (held == 0).then_some(())
    })
    .await;

    // Two engines at once, pausing between batches so their rounds overlap.
    let config = RetentionConfig {
        pause: Duration::from_millis(5),
        ..hourly(100)
    };
    let a = service(&db, config.clone());
    let b = service(&db, config);
    let (ra, rb) = tokio::join!(a.run_once(), b.run_once());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra.ran || rb.ran);
    let pruned = |r: &RoundReport| r.tables.iter().map(|t| t.pruned).sum::<u64>();
    assert_eq!(pruned(&ra) + pruned(&rb), total, "{ra:?} {rb:?}");
    assert_eq!(count(pool, "SELECT count(*) FROM api_requests").await, 1500);
    // No round left the lock behind.
    let mut conn = db.pool.acquire().await.unwrap();
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(RETENTION_LOCK_KEY)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(free);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(RETENTION_LOCK_KEY)
        .execute(&mut *conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_service_prunes_on_its_interval_counts_rows_and_stops_on_shutdown() {
    let handle = setpoint::metrics::install().expect("recorder");
    let db = test_db().await.expect("test database");
    let pool = &db.pool;
    let unit = finished_unit(pool, &[5.0, 4.0]).await;
    request_id(pool, "old", 5.0).await;
    let shutdown = CancellationToken::new();
    let config = RetentionConfig {
        interval: Some(Duration::from_secs(1)),
        ..hourly(1000)
    };
    let task = service(&db, config).spawn(&shutdown).expect("spawned");
    common::wait_for("the first round", || async {
        (events_of(pool, unit).await == 0 && request_ids(pool).await.is_empty()).then_some(())
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(common::HUNG, task)
        .await
        .expect("stops on shutdown")
        .expect("task");
    let text = handle.render();
    for needle in [
        "setpoint_retention_rows_pruned_total{table=\"work_events\"}",
        "setpoint_retention_rows_pruned_total{table=\"api_requests\"}",
        "setpoint_retention_rounds_total{result=\"done\"}",
    ] {
        assert!(text.contains(needle), "{needle} in\n{text}");
    }
}

#[tokio::test]
async fn shutdown_stops_a_round_at_its_pause_and_frees_the_lock() {
    let db = test_db().await.expect("test database");
    let pool = &db.pool;
    fill_many(pool).await;
    let shutdown = CancellationToken::new();
    // One statement, then a pause far longer than any test.
    let config = RetentionConfig {
        interval: Some(Duration::from_secs(1)),
        pause: Duration::from_secs(600),
        ..hourly(100)
    };
    let task = service(&db, config).spawn(&shutdown).expect("spawned");
    let old_events = "SELECT count(*) FROM work_events WHERE at < now() - interval '1 hour'";
    let before = count(pool, old_events).await;
    common::wait_for("the first statement", || async {
        (count(pool, old_events).await < before).then_some(())
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(common::HUNG, task)
        .await
        .expect("the round stops at its pause")
        .expect("task");
    assert!(
        count(pool, old_events).await > 0,
        "the round did not finish"
    );
    let mut conn = pool.acquire().await.unwrap();
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(RETENTION_LOCK_KEY)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(free, "the stopped round released the lock");
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(RETENTION_LOCK_KEY)
        .execute(&mut *conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn serve_prunes_by_its_retention_table_and_refuses_a_bad_one() {
    let db = test_db().await.expect("test database");
    let pool = &db.pool;
    let unit = finished_unit(pool, &[3.0, 2.0]).await;
    let recent = finished_unit(pool, &[0.1]).await;
    request_id(pool, "old", 30.0).await;
    request_id(pool, "new", 1.0).await;
    let dir = std::env::temp_dir().join(format!("setpoint-retention-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("setpoint.toml");
    std::fs::write(
        &config,
        "[retention]\ninterval = \"1s\"\nwork_history = \"1h\"\n",
    )
    .unwrap();
    let engine = common::EngineProcess::start(
        &db.url,
        "retention-serve",
        &[],
        &["--config", config.to_str().unwrap()],
    );
    common::wait_for("serve's first retention round", || async {
        (engine.printed("retention round: rows pruned") && events_of(pool, unit).await == 0)
            .then_some(())
    })
    .await;
    assert_eq!(events_of(pool, recent).await, 1);
    // work_history from the file; request_ids at its default, 24 hours.
    assert_eq!(request_ids(pool).await, vec!["new"]);
    drop(engine);

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[retention]\nbatch = 0\n").unwrap();
    let mut engine = common::EngineProcess::start(
        &db.url,
        "retention-bad",
        &[],
        &["--config", bad.to_str().unwrap()],
    );
    assert!(!engine.wait_exit().await, "a bad [retention] stops serve");
    assert!(
        engine
            .output()
            .contains("retention.batch must be between 1 and 50000"),
        "{}",
        engine.output()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_request_id_replayed_after_its_window_is_a_new_request() {
    let env = Env::default().await;
    let mut c = env.instances().await;
    let first = c
        .create_instance(authed(&env.acme, create_req("web-1", "rid-1")))
        .await
        .unwrap()
        .into_inner();
    // Within the window: the replay is the first answer, another body is refused.
    let replay = c
        .create_instance(authed(&env.acme, create_req("web-1", "rid-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, replay);
    let err = c
        .create_instance(authed(&env.acme, create_req("web-2", "rid-1")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // A round within the window keeps the id.
    let defaults = RetentionConfig::default();
    let kept = service(&env.db, defaults.clone()).run_once().await.unwrap();
    assert_eq!(kept.pruned(Table::ApiRequests), 0);

    // The window (24 hours by default) passes, a round runs.
    exec(
        &env.db.pool,
        "UPDATE api_requests SET created_at = now() - interval '25 hours'
         WHERE request_id = 'rid-1'",
    )
    .await;
    let pruned = service(&env.db, defaults).run_once().await.unwrap();
    assert_eq!(pruned.pruned(Table::ApiRequests), 1);

    // The same request again is a new request: web-1 exists, so it is refused as such rather
    // than answered with the first answer.
    let err = c
        .create_instance(authed(&env.acme, create_req("web-1", "rid-1")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // And the id is free for another request.
    let second = c
        .create_instance(authed(&env.acme, create_req("web-2", "rid-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.name, "tenants/acme/instances/web-2");
    assert_ne!(second.uid, first.uid);
    env.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The benchmark behind docs/retention.md.

/// Fills the database with `n` units spread evenly over the last 40 days, as
/// docs/retention.md describes.
const BENCH_FILL_SQL: &[&str] = &[
    "CREATE TEMP TABLE bench_units AS
     SELECT g AS id,
            now() - interval '40 days' + (g::float8 / $1::int) * interval '40 days' AS t,
            lpad(to_hex((extract(epoch FROM now()) * 1000)::bigint), 12, '0')
                || substr(md5(g::text), 1, 20) AS token,
            (g % 100 = 0) AS live,
            (g - 1) / 4 AS inst
     FROM generate_series(1, $1::int) g",
    "INSERT INTO work_events (work_id, token, event, attempt, worker, detail, at)
     SELECT u.id, u.token, e.event, e.attempt, e.worker, e.detail, u.t + e.off
     FROM bench_units u, LATERAL (VALUES
        ('enqueued', NULL::int, NULL::text, NULL::jsonb, interval '0'),
        ('claimed', 1, 'engine-1', NULL, interval '1 second'),
        (CASE WHEN u.live THEN 'parked' ELSE 'succeeded' END, 1, 'engine-1',
         jsonb_build_object('calls', jsonb_build_array(jsonb_build_object(
             'adapter', 'compute', 'operation', 'describe_instance', 'token', u.token))),
         interval '2 seconds')) e(event, attempt, worker, detail, off)
     ORDER BY u.id, e.off",
    "INSERT INTO work (id, kind, spec, token, resource_id, tenant, state, attempt, last_error,
                       last_error_class, created_at, run_at)
     OVERRIDING SYSTEM VALUE
     SELECT u.id, 'kvx.notify.email', '{\"step\": \"notify\"}', u.token,
            lpad(to_hex(u.inst), 32, '0')::uuid, 'tenant-' || (u.inst % 100), 'parked', 1,
            'outcome unknown', 'permanent', u.t, u.t
     FROM bench_units u WHERE u.live",
    "SELECT setval(pg_get_serial_sequence('work', 'id'), $1::bigint + 1)",
    "INSERT INTO api_requests (tenant, request_id, method, body_hash, response, created_at)
     SELECT 'tenant-' || (u.inst % 100), md5(u.token), 'CreateInstance', sha256(u.token::bytea),
            convert_to(repeat('x', 300), 'UTF8'), u.t
     FROM bench_units u ORDER BY u.id",
    "INSERT INTO side_effects (key, work_id, token, started_at, finished_at, result)
     SELECT 'email:' || u.token || ':1', u.id, u.token, u.t + interval '1 second',
            CASE WHEN u.live THEN NULL ELSE u.t + interval '2 seconds' END,
            CASE WHEN u.live THEN NULL
                 ELSE jsonb_build_object('sent', true, 'message_id', '<' || u.token || '@setpoint>')
            END
     FROM bench_units u ORDER BY u.id",
    "INSERT INTO instances (id, tenant, name, spec, status, created_at, updated_at, deleted_at)
     SELECT lpad(to_hex(u.inst), 32, '0')::uuid, 'tenant-' || (u.inst % 100), 'inst-' || u.inst,
            '{\"plan\": \"kvx.small\", \"region\": \"eu-west-1\", \"size_gb\": 20,
              \"owner_email\": \"ops@example.com\"}',
            CASE WHEN u.inst % 2 = 1 THEN 'DELETED' ELSE 'READY' END, u.t, u.t,
            CASE WHEN u.inst % 2 = 1 THEN u.t END
     FROM bench_units u WHERE u.id % 4 = 0 ORDER BY u.id",
    "DROP TABLE bench_units",
];

const BENCH_TABLES: [&str; 4] = ["work_events", "api_requests", "side_effects", "instances"];

/// (table, heap size, index size) in bytes, per table of the benchmark.
async fn sizes(pool: &PgPool) -> Vec<(String, i64, i64)> {
    sqlx::query_as(
        "SELECT c.relname::text, pg_table_size(c.oid), pg_indexes_size(c.oid)
         FROM pg_class c WHERE c.relname = ANY($1) AND c.relkind = 'r'
         ORDER BY array_position($1, c.relname::text)",
    )
    .bind(BENCH_TABLES)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Runs `sql` without the engine's statement timeout (filling and VACUUM FULL take longer).
async fn long(pool: &PgPool, sql: &str) {
    let mut conn = pool.acquire().await.unwrap().detach();
    exec_conn(&mut conn, "SET statement_timeout = 0").await;
    exec_conn(&mut conn, sql).await;
}

async fn rows(pool: &PgPool, table: &str) -> i64 {
    count(pool, &format!("SELECT count(*) FROM {table}")).await
}

fn mb(bytes: i64) -> String {
    format!("{:.0}", bytes as f64 / 1_048_576.0)
}

/// The plan of one prune statement for its first batch, as a prepared statement runs it:
/// the custom plan (for these values) or the generic plan PostgreSQL may switch to after five
/// executions.
async fn plan(pool: &PgPool, sql: &str, generic: bool) -> String {
    let mut conn = pool.acquire().await.unwrap().detach();
    let mode = if generic {
        "force_generic_plan"
    } else {
        "force_custom_plan"
    };
    exec_conn(&mut conn, &format!("SET plan_cache_mode = {mode}")).await;
    let (types, args) = if sql == API_REQUESTS_PRUNE_SQL {
        ("text, text, bigint, timestamptz", "'', '', 2000")
    } else if sql == SIDE_EFFECTS_PRUNE_SQL {
        ("text, bigint, timestamptz", "'', 2000")
    } else if sql == TOMBSTONES_PRUNE_SQL {
        (
            "uuid, bigint, timestamptz",
            "'00000000-0000-0000-0000-000000000000', 2000",
        )
    } else {
        ("bigint, bigint, timestamptz", "0, 2000")
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "PREPARE prune ({types}) AS {sql}"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (COSTS OFF) EXECUTE prune ({args}, now() - interval '7 days')"
    )))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    use sqlx::Row;
    rows.iter()
        .map(|r| r.get::<String, _>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn exec_conn(conn: &mut sqlx::PgConnection, sql: &str) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
        .unwrap();
}

/// Sizes of the four tables after `RETENTION_BENCH_UNITS` (default 1,000,000) units without
/// retention, after one round with the default periods, and after VACUUM FULL; the round's
/// time; and the plan of every statement, checked to use the expected index.
#[tokio::test]
#[ignore = "a benchmark: minutes and a few GB of disk; run with --ignored"]
async fn retention_bench() {
    let units: i32 = std::env::var("RETENTION_BENCH_UNITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let db = test_db().await.expect("test database");
    let pool = &db.pool;
    let t0 = Instant::now();
    // One connection: the fill goes through a temporary table. Filling takes longer than the
    // engine's statement timeout.
    let mut conn = pool.acquire().await.unwrap().detach();
    exec_conn(&mut conn, "SET statement_timeout = 0").await;
    for sql in BENCH_FILL_SQL {
        let q = sqlx::query(sqlx::AssertSqlSafe(*sql));
        let q = if sql.contains("$1") { q.bind(units) } else { q };
        q.execute(&mut conn).await.unwrap();
    }
    drop(conn);
    long(pool, "VACUUM ANALYZE").await;
    println!("filled {units} units in {:.0?}", t0.elapsed());

    // Every statement reads through the expected index, with the planner's custom plan and
    // with the generic plan a prepared statement may switch to.
    for (sql, index) in [
        (WORK_EVENTS_PRUNE_SQL, "work_events_work_idx"),
        (API_REQUESTS_PRUNE_SQL, "api_requests_pkey"),
        (SIDE_EFFECTS_PRUNE_SQL, "side_effects_pkey"),
        (TOMBSTONES_PRUNE_SQL, "instances_pkey"),
    ] {
        for generic in [false, true] {
            let p = plan(pool, sql, generic).await;
            println!(
                "--- plan ({}):\n{p}",
                if generic { "generic" } else { "custom" }
            );
            assert!(p.contains(index), "{index} not used:\n{p}");
            assert!(!p.contains("Seq Scan"), "a sequential scan:\n{p}");
        }
    }

    let before = sizes(pool).await;
    let mut counts = Vec::new();
    for t in BENCH_TABLES {
        counts.push(rows(pool, t).await);
    }
    let report = service(&db, RetentionConfig::default())
        .run_once()
        .await
        .unwrap();
    println!("{report:#?}");
    long(pool, "VACUUM ANALYZE").await;
    let after = sizes(pool).await;
    let mut left = Vec::new();
    for t in BENCH_TABLES {
        left.push(rows(pool, t).await);
    }
    long(pool, "VACUUM FULL").await;
    let full = sizes(pool).await;

    println!(
        "\n| table | rows before | rows after | before (table + indexes, MB) | after the round and VACUUM | after VACUUM FULL |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for i in 0..BENCH_TABLES.len() {
        let (name, bt, bi) = &before[i];
        let (_, at, ai) = &after[i];
        let (_, ft, fi) = &full[i];
        println!(
            "| `{name}` | {} | {} | {} + {} = {} | {} + {} = {} | {} + {} = {} |",
            counts[i],
            left[i],
            mb(*bt),
            mb(*bi),
            mb(bt + bi),
            mb(*at),
            mb(*ai),
            mb(at + ai),
            mb(*ft),
            mb(*fi),
            mb(ft + fi)
        );
    }
    println!(
        "\nround: {:.1?} wall ({:.1?} in statements), {} statements",
        report.took,
        report.busy,
        report.tables.iter().map(|t| t.statements).sum::<u64>()
    );
    print_tables(&report);

    // The next round finds nothing to prune but still walks what it keeps: the cost of a
    // round in the steady state.
    let quiet = service(&db, RetentionConfig::default())
        .run_once()
        .await
        .unwrap();
    println!(
        "\nnext round: {:.1?} wall ({:.1?} in statements)",
        quiet.took, quiet.busy
    );
    print_tables(&quiet);
}

fn print_tables(report: &RoundReport) {
    for t in &report.tables {
        println!(
            "  {}: {} rows pruned, {} read, {} statements, {:.1?} in statements",
            t.table.as_str(),
            t.pruned,
            t.scanned,
            t.statements,
            t.busy
        );
    }
}
