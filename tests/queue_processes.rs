//! The queue across processes and failures, against a real PostgreSQL: several workers and
//! engine processes draining one queue, an engine killed mid-unit, a stalled worker whose lease
//! was taken over, PostgreSQL restarted under running workers, a unit that kills its engine,
//! and a shutdown that must fit in its grace.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use setpoint::Registry;
use setpoint::dev::postgres::{ClusterOptions, TempCluster};
use setpoint::queue::NewWork;
use setpoint::store::work::work_enqueue;
use setpoint_adapter::failpoint;

async fn enqueue_probes(pool: &sqlx::PgPool, n: usize, spec: serde_json::Value) -> Vec<i64> {
    let units: Vec<NewWork> = (0..n)
        .map(|_| NewWork::new("setpoint.probe", spec.clone()))
        .collect();
    let mut tx = pool.begin().await.unwrap();
    let ids = work_enqueue(&mut tx, &units)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    tx.commit().await.unwrap();
    ids
}

/// Every unit has exactly one `succeeded` event and exactly one recorded run that ended.
async fn assert_exactly_once(pool: &sqlx::PgPool, ids: &[i64]) {
    let succeeded = event_counts(pool, "succeeded").await;
    assert_eq!(succeeded.len(), ids.len(), "every unit must succeed");
    assert!(
        succeeded.iter().all(|(_, n)| *n == 1),
        "a completion applied twice"
    );
    let ends: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT work_id, count(*) FROM probe_runs WHERE phase = 'end' GROUP BY 1 HAVING count(*) <> 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        ends.is_empty(),
        "units that ran to the end more than once: {ends:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_workers_and_two_processes_drain_one_queue_exactly_once() {
    let db = db().await;
    let ids = enqueue_probes(&db.pool, 3000, json!({"record": true, "sleep_ms": 1})).await;
    let p1 = EngineProcess::start(&db.url, "proc-1", &[], &["--concurrency", "8"]);
    let p2 = EngineProcess::start(&db.url, "proc-2", &[], &["--concurrency", "8"]);
    let a = start_runtime(&db.pool, fast_config("task-a"), Registry::new());
    let b = start_runtime(&db.pool, fast_config("task-b"), Registry::new());
    wait_drained(&db.pool).await;
    a.stop().await;
    b.stop().await;
    assert_exactly_once(&db.pool, &ids).await;
    // Everyone took part, and no unit ran twice at once: one start per unit (no lease expired).
    let workers: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT worker FROM probe_runs ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        workers,
        ["proc-1", "proc-2", "task-a", "task-b"],
        "{}",
        p1.output()
    );
    let doubles: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT work_id FROM probe_runs WHERE phase = 'start' GROUP BY 1 HAVING count(*) > 1) d",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(doubles, 0, "a unit started twice while its lease was valid");
    drop((p1, p2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_whose_engine_was_killed_is_completed_once_by_another() {
    let db = db().await;
    let ids = enqueue_probes(
        &db.pool,
        1,
        json!({"record": true, "failpoint": "probe.mid"}),
    )
    .await;
    let mut victim = EngineProcess::start(
        &db.url,
        "victim",
        &[("SETPOINT_FAILPOINTS", "probe.mid")],
        &[],
    );
    wait_for("the victim to reach the failpoint", || async {
        victim
            .printed(&failpoint::marker("probe.mid"))
            .then_some(())
    })
    .await;
    victim.signal("KILL");
    assert!(!victim.wait_exit().await);
    let rescuer = EngineProcess::start(&db.url, "rescuer", &[], &[]);
    wait_drained(&db.pool).await;
    assert_exactly_once(&db.pool, &ids).await;
    let h = history(&db.pool, ids[0]).await;
    let h: Vec<(&str, Option<i32>, Option<&str>)> = h
        .iter()
        .map(|(e, a, w)| (e.as_str(), *a, w.as_deref()))
        .collect();
    assert_eq!(
        h,
        [
            ("enqueued", None, None),
            ("claimed", Some(1), Some("victim")),
            ("rescued", Some(2), Some("rescuer")),
            ("succeeded", Some(2), Some("rescuer")),
        ]
    );
    drop(rescuer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_worker_resumed_after_takeover_acts_no_more() {
    let db = db().await;
    let ids = enqueue_probes(
        &db.pool,
        1,
        json!({"record": true, "sleep_ms": 1500, "then": "next"}),
    )
    .await;
    let mut stale = EngineProcess::start(&db.url, "stale", &[], &[]);
    wait_for("the stale worker to start the unit", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM probe_runs WHERE worker = 'stale'")
            .fetch_one(&db.pool)
            .await
            .ok()?;
        (n == 1).then_some(())
    })
    .await;
    // Freeze it: no heartbeats, so its 2 s lease runs out and another engine takes over.
    stale.signal("STOP");
    let fresh = EngineProcess::start(&db.url, "fresh", &[], &[]);
    wait_drained(&db.pool).await;
    // Thaw it: it sees at once that it lost the unit, stops the attempt without acting again
    // (no `end` record, no completion, no follow-up) and says so in the unit's history.
    stale.signal("CONT");
    let parent = ids[0];
    wait_for("the stale attempt to be recorded as abandoned", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM work_events WHERE work_id = $1 AND event = 'abandoned' AND worker = 'stale'",
        )
        .bind(parent)
        .fetch_one(&db.pool)
        .await
        .ok()?;
        (n == 1).then_some(())
    })
    .await;
    stale.signal("TERM");
    assert!(stale.wait_exit().await, "{}", stale.output());
    wait_drained(&db.pool).await;
    drop(fresh);

    let stale_ends: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM probe_runs WHERE worker = 'stale' AND phase = 'end'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        stale_ends, 0,
        "the stale attempt acted after it lost its lease"
    );
    let succeeded = event_counts(&db.pool, "succeeded").await;
    assert_eq!(
        succeeded.len(),
        2,
        "the parent and exactly one follow-up: {succeeded:?}"
    );
    assert!(succeeded.iter().all(|(_, n)| *n == 1));
    let by: Vec<String> = sqlx::query_scalar(
        "SELECT worker FROM work_events WHERE work_id = $1 AND event = 'succeeded'",
    )
    .bind(parent)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        by,
        ["fresh"],
        "only the worker holding the lease may complete"
    );
    let children: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM work_events WHERE event = 'enqueued' AND detail->>'parent_id' = $1::text",
    )
    .bind(parent)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(children, 1, "the follow-up was enqueued more than once");
    assert!(stale.printed("attempt abandoned"), "{}", stale.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_carry_on_after_postgresql_restarts() {
    // Its own cluster: this test stops the server.
    let mut cluster = tokio::task::spawn_blocking(|| TempCluster::start(ClusterOptions::default()))
        .await
        .unwrap()
        .unwrap();
    let url = cluster.url("postgres");
    let pool = setpoint::store::connect(&url, 20).await.unwrap();
    setpoint::store::migrate(&pool).await.unwrap();
    sqlx::query(
        "CREATE TABLE probe_runs (work_id bigint, token text, attempt int, worker text,
                                  phase text, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .execute(&pool)
    .await
    .unwrap();
    let ids = enqueue_probes(&pool, 1500, json!({"record": true, "sleep_ms": 2})).await;
    let mut cfg = fast_config("survivor");
    cfg.lease = std::time::Duration::from_secs(60);
    cfg.heartbeat_interval = Duration::from_secs(1);
    let rt = start_runtime(&pool, cfg, Registry::new());
    let proc_ = EngineProcess::start(&url, "proc", &[], &["--lease", "60s", "--concurrency", "4"]);
    wait_for("some progress", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM probe_runs WHERE phase = 'end'")
            .fetch_one(&pool)
            .await
            .ok()?;
        (n >= 100).then_some(())
    })
    .await;
    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster.stop_server().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        cluster.start_server().unwrap();
        cluster
    })
    .await
    .unwrap();
    wait_drained(&pool).await;
    rt.stop().await;
    assert_exactly_once(&pool, &ids).await;
    drop(proc_);
    pool.close().await;
    tokio::task::spawn_blocking(move || cluster.stop_server())
        .await
        .unwrap()
        .unwrap();
}

/// Defect 6: `max_attempts` was checked only when a failure was recorded, so a unit that takes
/// its process down (an abort, an OOM kill) was claimed forever, taking the process's other
/// units down each time. Now the claim that finds it out of attempts parks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_that_kills_its_engine_is_parked_once_its_attempts_are_used() {
    let db = db().await;
    let point = "probe.poison";
    let units = vec![
        NewWork::new(
            "setpoint.probe",
            json!({"record": true, "failpoint": point}),
        )
        .max_attempts(2),
    ];
    let mut tx = db.pool.begin().await.unwrap();
    let id = work_enqueue(&mut tx, &units).await.unwrap()[0].id;
    tx.commit().await.unwrap();
    for attempt in 1..=2 {
        let engine = EngineProcess::start(
            &db.url,
            &format!("victim-{attempt}"),
            &[("SETPOINT_FAILPOINTS", point)],
            &[],
        );
        wait_for("the unit to take its engine down", || async {
            engine.printed(&failpoint::marker(point)).then_some(())
        })
        .await;
        // The process dies at that point: this is what an OOM kill or an abort looks like.
        drop(engine);
    }
    // A healthy engine claims it after the last lease runs out: it must park it, not run it.
    let healthy = EngineProcess::start(&db.url, "healthy", &[], &[]);
    wait_for("the unit to be parked", || async {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state::text FROM work WHERE id = $1")
                .bind(id)
                .fetch_optional(&db.pool)
                .await
                .ok()?;
        (state.as_deref() == Some("parked")).then_some(())
    })
    .await;
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM probe_runs WHERE work_id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(runs, 2, "the healthy engine must not run it a third time");
    let last_error: String = sqlx::query_scalar("SELECT last_error FROM work WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        last_error.contains("gave up after 2 attempts")
            && last_error.contains("never reported back"),
        "{last_error}"
    );
    let h = history(&db.pool, id).await;
    let last = h.last().expect("events");
    assert_eq!(
        (last.0.as_str(), last.2.as_deref()),
        ("parked", Some("healthy"))
    );
    drop(healthy);
}

/// Defect 10: shutdown could take twice the grace (running units, then the completer, each
/// got a whole grace), so an orchestrator killed engines mid-unit. Now the runtime returns
/// within the grace, and units it could not finish are released at once (not after their
/// lease runs out), so another engine takes them over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fits_in_the_grace_and_releases_unfinished_units() {
    let db = db().await;
    let ids = enqueue_probes(&db.pool, 1, json!({"record": true, "sleep_ms": 600_000})).await;
    // A lease far longer than this test may run: only a release lets another engine in.
    let engine = |name: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_setpoint"));
        cmd.args(["serve", "--enable-probe", "--poll-interval", "100ms"])
            .args(["--lease", "600s", "--shutdown-grace", "2s"])
            .args(["--worker-id", name, "--listen", "127.0.0.1:0"])
            .env("SETPOINT_DATABASE_URL", &db.url)
            .env("RUST_LOG", "info,sqlx=warn")
            .env_remove("SETPOINT_FAILPOINTS")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        EngineProcess::from_command(cmd)
    };
    let mut first = engine("leaving");
    wait_for("the unit to start", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM probe_runs")
            .fetch_one(&db.pool)
            .await
            .ok()?;
        (n == 1).then_some(())
    })
    .await;
    first.signal("TERM");
    assert!(first.wait_exit().await, "{}", first.output());
    assert!(
        first.printed("abandoning the units still running"),
        "{}",
        first.output()
    );
    let h = history(&db.pool, ids[0]).await;
    assert!(
        h.iter()
            .any(|(e, a, w)| e == "abandoned" && *a == Some(1) && w.as_deref() == Some("leaving")),
        "{h:?}"
    );
    let second = engine("next");
    wait_for("another engine to take the unit over", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM probe_runs WHERE worker = 'next'")
            .fetch_one(&db.pool)
            .await
            .ok()?;
        (n == 1).then_some(())
    })
    .await;
    drop(second);
}

/// Engines that start at once on a new database all migrate it: one applies the migrations
/// (some build indexes CONCURRENTLY, which waits for every older snapshot) while the others
/// wait without holding a snapshot, so nobody waits on a waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_starting_at_once_migrate_a_new_database_once() {
    let db = db().await;
    let name = format!("fresh_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&db.pool)
        .await
        .unwrap();
    let url = db.url.replace(&db.name, &name);
    // Joined in one task (sqlx's migrator future is not Send); each has a session of its own.
    let starts = (0..4).map(|_| {
        let url = url.clone();
        async move {
            let pool = setpoint::store::connect(&url, 2).await.unwrap();
            let contract =
                setpoint::store::migrate_with(&pool, setpoint::store::Migrations::ExpandOrFresh)
                    .await;
            pool.close().await;
            contract.map_err(|e| e.to_string())
        }
    });
    let results = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(starts))
        .await
        .expect("a migration waited for ever");
    for r in &results {
        assert!(r.is_ok(), "{results:?}");
    }
    let pool = setpoint::store::connect(&url, 1).await.unwrap();
    let pending = {
        let mut conn = pool.acquire().await.unwrap();
        setpoint::store::migrations_pending(&mut conn)
            .await
            .unwrap()
    };
    assert_eq!(pending, 0);
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    let expected = setpoint::store::MIGRATOR.iter().count()
        + setpoint::store::CONTRACT_MIGRATOR.iter().count();
    assert_eq!(applied as usize, expected, "each migration applied once");
    pool.close().await;
}
