//! The work-row life cycle against a real PostgreSQL, in one process: retries and backoff,
//! parking, operator retry and cancel, bad units, fencing, follow-ups, resource updates,
//! heartbeats and graceful shutdown.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use setpoint::Registry;
use setpoint::queue::{self, NewWork, QueueError};
use setpoint::store::work::{
    ClaimFrom, ClaimedWork, Completion, Lane, work_claim, work_complete_if_leased, work_enqueue,
    work_heartbeat,
};
use setpoint_adapter::{AdapterError, BoxFuture, Handler, IdempotencyToken, Outcome, WorkContext};
use uuid::Uuid;

async fn enqueue(pool: &sqlx::PgPool, unit: NewWork) -> i64 {
    let mut tx = pool.begin().await.unwrap();
    let e = queue::enqueue(&mut tx, unit).await.unwrap();
    tx.commit().await.unwrap();
    e.id
}

/// The hooks of operators' actions: the chain runner's, with no kind declared.
fn hooks(pool: &sqlx::PgPool) -> setpoint::kinds::Chains {
    setpoint::kinds::Chains::new(
        std::sync::Arc::new(setpoint::kinds::KindCatalog::new()),
        std::sync::Arc::new(setpoint::kinds::SecretBox::none()),
        pool.clone(),
    )
}

/// The kinds a claim in these tests serves.
fn noop() -> Vec<String> {
    vec!["setpoint.noop".to_owned()]
}

async fn state(pool: &sqlx::PgPool, id: i64) -> Option<String> {
    let mut conn = pool.acquire().await.unwrap();
    setpoint::store::work::work_get(&mut conn, id)
        .await
        .unwrap()
        .map(|row| row.state)
}

async fn wait_state(pool: &sqlx::PgPool, id: i64, want: Option<&str>) {
    wait_for(&format!("unit {id} to be {want:?}"), || async {
        (state(pool, id).await.as_deref() == want).then_some(())
    })
    .await
}

#[tokio::test]
async fn transient_errors_retry_with_growing_delays_then_succeed() {
    let db = db().await;
    let rt = start_runtime(&db.pool, fast_config("w1"), Registry::new());
    let id = enqueue(
        &db.pool,
        NewWork::new("setpoint.probe", json!({"fail_transient_until_attempt": 3})),
    )
    .await;
    wait_state(&db.pool, id, None).await;
    rt.stop().await;

    let h = history(&db.pool, id).await;
    let events: Vec<&str> = h.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        events,
        [
            "enqueued",
            "claimed",
            "failed",
            "claimed",
            "failed",
            "claimed",
            "failed",
            "claimed",
            "succeeded"
        ]
    );
    // The delays asked for never shrink, and each retry waited at least that long.
    let rows: Vec<(String, Option<Value>, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT event, detail, at FROM work_events WHERE work_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let mut delays = Vec::new();
    for (i, (event, detail, at)) in rows.iter().enumerate() {
        if event == "failed" {
            let ms = detail.as_ref().unwrap()["retry_in_ms"].as_i64().unwrap();
            let next_claim = &rows[i + 1];
            assert_eq!(next_claim.0, "claimed");
            assert!(
                (next_claim.2 - *at).num_milliseconds() >= ms - 5,
                "retried before its backoff"
            );
            delays.push(ms);
        }
    }
    assert_eq!(delays.len(), 3);
    assert!(
        delays.windows(2).all(|w| w[0] <= w[1]),
        "delays {delays:?} shrank"
    );
    assert!(
        delays[2] >= 200,
        "third delay {delays:?} should be at least 2x base/2"
    );
}

#[tokio::test]
async fn a_retried_check_of_a_ready_instance_shows_ready_while_it_runs() {
    let db = db().await;
    // A READY instance under a check (a unit of no operation, as a drift check is).
    let resource = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO instances (id, tenant, name, spec, status, has_active_work)
         VALUES ($1, 't', 'checked', '{}', 'READY', true)",
    )
    .bind(resource)
    .execute(&db.pool)
    .await
    .unwrap();
    let rt = start_runtime(&db.pool, fast_config("w1"), Registry::new());
    let id = enqueue(
        &db.pool,
        NewWork::new("setpoint.probe", json!({"fail_permanent": "peer down"}))
            .for_resource(resource, "t"),
    )
    .await;
    wait_state(&db.pool, id, Some("parked")).await;
    rt.stop().await;
    let status = || async {
        sqlx::query_scalar::<_, String>("SELECT status FROM instances WHERE id = $1")
            .bind(resource)
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert_eq!(status().await, "FAILED");
    let mut tx = db.pool.begin().await.unwrap();
    queue::retry_parked(&mut tx, &hooks(&db.pool), id, "alice", 1)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        status().await,
        "READY",
        "a retried check runs on a READY instance"
    );
}

#[tokio::test]
async fn a_retry_resolves_unknown_side_effects_only_of_a_unit_parked_as_outcome_unknown() {
    let db = db().await;
    let rt = start_runtime(&db.pool, fast_config("w1"), Registry::new());
    let id = enqueue(
        &db.pool,
        NewWork::new("setpoint.probe", json!({"fail_permanent": "no"})),
    )
    .await;
    wait_state(&db.pool, id, Some("parked")).await;
    // A send that started and recorded no result (its attempt was cut off, say).
    sqlx::query(
        "INSERT INTO side_effects (key, work_id, token)
         SELECT 'mail:' || token, id, token FROM work WHERE id = $1",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    let open = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM side_effects WHERE work_id = $1 AND result IS NULL",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    // Parked for another reason: the retry leaves the send open (its next attempt would park
    // as outcome-unknown instead of sending a second time).
    // (No worker runs from here on: the test sets the unit's states itself.)
    rt.stop().await;
    let mut tx = db.pool.begin().await.unwrap();
    queue::retry_parked(&mut tx, &hooks(&db.pool), id, "alice", 1)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(open().await, 1);
    // Parked as outcome-unknown: the operator's retry says the send did not happen.
    sqlx::query("UPDATE work SET state = 'parked' WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO work_events (work_id, token, event, detail)
         SELECT id, token, 'failed', '{\"code\": \"outcome-unknown\"}' FROM work WHERE id = $1",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    queue::retry_parked(&mut tx, &hooks(&db.pool), id, "alice", 1)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(open().await, 0);
}

#[tokio::test]
async fn permanent_error_parks_at_once_and_operator_can_retry_or_cancel() {
    let db = db().await;
    let rt = start_runtime(&db.pool, fast_config("w1"), Registry::new());
    let id = enqueue(
        &db.pool,
        NewWork::new(
            "setpoint.probe",
            json!({"fail_permanent": "AMI ami-123 does not exist"}),
        ),
    )
    .await;
    wait_state(&db.pool, id, Some("parked")).await;
    let row = setpoint::store::work::work_get(&mut db.pool.acquire().await.unwrap(), id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.attempt, 1, "a permanent error must not be retried");
    assert_eq!(
        row.last_error.as_deref(),
        Some("AMI ami-123 does not exist")
    );
    assert_eq!(row.last_error_class.as_deref(), Some("permanent"));

    // Retry: runs again (and parks again, the cause being unchanged).
    let mut tx = db.pool.begin().await.unwrap();
    queue::retry_parked(&mut tx, &hooks(&db.pool), id, "alice", 3)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    wait_for("the retried unit to run and park again", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM work_events WHERE work_id = $1 AND event = 'parked'",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .ok()?;
        (n == 2).then_some(())
    })
    .await;

    // Cancel removes it; retry and cancel of a finished unit explain themselves.
    let mut tx = db.pool.begin().await.unwrap();
    queue::cancel_parked(&mut tx, &hooks(&db.pool), id, "alice", "AMI retired")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(state(&db.pool, id).await, None);
    let mut conn = db.pool.acquire().await.unwrap();
    assert!(matches!(
        queue::retry_parked(&mut conn, &hooks(&db.pool), id, "alice", 1).await,
        Err(QueueError::Finished(_))
    ));
    assert!(matches!(
        queue::cancel_parked(&mut conn, &hooks(&db.pool), 999_999, "alice", "x").await,
        Err(QueueError::NotFound(_))
    ));
    let report = queue::show(&mut conn, &id.to_string()).await.unwrap();
    let last = report.events.last().unwrap();
    assert_eq!(last.event, "cancelled");
    assert_eq!(last.message.as_deref(), Some("AMI retired"));
    assert!(
        report
            .events
            .iter()
            .any(|e| e.event == "retried" && e.worker.as_deref() == Some("alice"))
    );
    rt.stop().await;
}

#[tokio::test]
async fn retry_of_a_pending_unit_is_refused() {
    let db = db().await;
    let id = enqueue(&db.pool, NewWork::new("setpoint.noop", json!({}))).await;
    let mut conn = db.pool.acquire().await.unwrap();
    match queue::retry_parked(&mut conn, &hooks(&db.pool), id, "op", 1).await {
        Err(QueueError::NotParked { state, .. }) => assert_eq!(state, "pending"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn attempts_run_out_then_the_unit_parks() {
    let db = db().await;
    let rt = start_runtime(&db.pool, fast_config("w1"), Registry::new());
    let id = enqueue(
        &db.pool,
        NewWork::new(
            "setpoint.probe",
            json!({"fail_transient_until_attempt": 100}),
        )
        .max_attempts(2),
    )
    .await;
    wait_state(&db.pool, id, Some("parked")).await;
    rt.stop().await;
    let msg: String = sqlx::query_scalar("SELECT last_error FROM work WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(msg.starts_with("gave up after 2 attempts"), "{msg}");
}

struct Panics;
impl Handler for Panics {
    fn kind(&self) -> &str {
        "test.panics"
    }
    fn handle<'a>(
        &'a self,
        _: &'a WorkContext,
        _: &'a Value,
    ) -> BoxFuture<'a, Result<Outcome, AdapterError>> {
        Box::pin(async { panic!("boom") })
    }
}

#[tokio::test]
async fn bad_units_park_with_a_clear_error_and_the_worker_keeps_running() {
    let db = db().await;
    let mut extra = Registry::new();
    extra.register(Panics).unwrap();
    let rt = start_runtime(&db.pool, fast_config("w1"), extra);
    let bad_spec = enqueue(
        &db.pool,
        NewWork::new("setpoint.probe", json!({"sleep_ms": "soon"})),
    )
    .await;
    let unknown = enqueue(&db.pool, NewWork::new("dns.ensure-record", json!({}))).await;
    let panics = enqueue(&db.pool, NewWork::new("test.panics", json!({}))).await;
    for id in [bad_spec, panics] {
        wait_state(&db.pool, id, Some("parked")).await;
    }
    let err = |id: i64| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT last_error FROM work WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let e = err(bad_spec).await;
    assert!(
        e.contains("not valid for its kind") && e.contains("setpoint.probe"),
        "{e}"
    );
    let e = err(panics).await;
    assert!(e.contains("panicked: boom"), "{e}");
    // Still working.
    let ok = enqueue(&db.pool, NewWork::new("setpoint.noop", json!({}))).await;
    wait_state(&db.pool, ok, None).await;
    rt.stop().await;
    // A kind this engine has no handler for is not its to run: the unit waits, untouched, for
    // an engine that serves it (it was parked before engines claimed by kind).
    assert_eq!(state(&db.pool, unknown).await.as_deref(), Some("pending"));
    let h = history(&db.pool, unknown).await;
    assert_eq!(
        h.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["enqueued"]
    );
}

#[tokio::test]
async fn a_claim_after_a_position_skips_what_is_behind_it_and_one_from_the_start_does_not() {
    let db = db().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let units: Vec<NewWork> = (0..3)
        .map(|_| NewWork::new("setpoint.noop", json!({})))
        .collect();
    work_enqueue(&mut conn, &units).await.unwrap();
    let first = work_claim(&mut conn, "A", &noop(), 2, 60_000, ClaimFrom::Start)
        .await
        .unwrap()
        .units;
    assert_eq!(first.len(), 2);
    let next = work_claim(
        &mut conn,
        "A",
        &noop(),
        10,
        60_000,
        ClaimFrom::after_last(&first),
    )
    .await
    .unwrap()
    .units;
    assert_eq!(next.len(), 1, "the unit after the position");
    // A's first two leases run out: only a scan from the start finds them.
    let behind: Vec<i64> = first.iter().map(|u| u.id).collect();
    sqlx::query(
        "UPDATE work SET lease_expires_at = now() - interval '1 second' WHERE id = ANY($1)",
    )
    .bind(&behind)
    .execute(&mut *conn)
    .await
    .unwrap();
    let after = ClaimFrom::after_last(&next);
    assert!(
        work_claim(&mut conn, "B", &noop(), 10, 60_000, after)
            .await
            .unwrap()
            .units
            .is_empty()
    );
    let rescued = work_claim(&mut conn, "B", &noop(), 10, 60_000, ClaimFrom::Start)
        .await
        .unwrap()
        .units;
    let mut ids: Vec<i64> = rescued.iter().map(|u| u.id).collect();
    ids.sort();
    assert_eq!(ids, behind);
    assert!(rescued.iter().all(|u| u.rescued));
}

#[tokio::test]
async fn a_stale_worker_commits_nothing() {
    let db = db().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let token = IdempotencyToken::generate();
    let unit = NewWork::new("setpoint.noop", json!({})).with_token(token.clone());
    work_enqueue(&mut conn, &[unit]).await.unwrap();
    let a = work_claim(&mut conn, "A", &noop(), 10, 60_000, ClaimFrom::Start)
        .await
        .unwrap()
        .units;
    assert_eq!(a.len(), 1);
    // A stalls; its lease runs out and B takes the unit over.
    sqlx::query("UPDATE work SET lease_expires_at = now() - interval '1 second'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let b = work_claim(&mut conn, "B", &noop(), 10, 60_000, ClaimFrom::Start)
        .await
        .unwrap()
        .units;
    assert_eq!(b.len(), 1);
    assert!(b[0].rescued);
    assert_eq!(b[0].attempt, 2);
    // A wakes up: its heartbeat says it lost the unit; its completion and failure change
    // nothing.
    let renewals = work_heartbeat(&mut conn, "A", &[(a[0].id, 1)], 60_000)
        .await
        .unwrap();
    assert!(renewals.renewed.is_empty());
    assert_eq!(renewals.lost, vec![(a[0].id, 1)]);
    let stale = [Completion {
        id: a[0].id,
        attempt: 1,
        detail: json!({}),
    }];
    assert!(
        work_complete_if_leased(&mut conn, "A", &stale)
            .await
            .unwrap()
            .is_empty()
    );
    let f = setpoint::store::work::Failure {
        id: a[0].id,
        attempt: 1,
        class: "transient".into(),
        message: "late".into(),
        detail: json!({}),
        action: setpoint::store::work::FailureAction::Retry { delay_ms: 0 },
    };
    assert!(
        setpoint::store::work::work_fail_if_leased(&mut conn, "A", &f)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(state(&db.pool, a[0].id).await.as_deref(), Some("running"));
    // B's completion applies, once.
    let fresh = [Completion {
        id: b[0].id,
        attempt: 2,
        detail: json!({}),
    }];
    assert_eq!(
        work_complete_if_leased(&mut conn, "B", &fresh)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        work_complete_if_leased(&mut conn, "B", &fresh)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        event_counts(&db.pool, "succeeded").await,
        vec![(a[0].id, 1)]
    );
}

#[tokio::test]
async fn a_follow_up_token_can_be_enqueued_only_once() {
    let db = db().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let parent = IdempotencyToken::generate();
    let child = || NewWork::new("setpoint.noop", json!({})).with_token(parent.derive("next"));
    assert_eq!(work_enqueue(&mut conn, &[child()]).await.unwrap().len(), 1);
    assert_eq!(
        work_enqueue(&mut conn, &[child(), child()])
            .await
            .unwrap()
            .len(),
        0
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM work")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn completion_records_observed_state_follow_ups_and_ends_active_work() {
    let db = db().await;
    let resource = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO instances (id, tenant, name, spec, has_active_work) VALUES ($1, 'acme', 'cache-1', '{}', true)",
    )
    .bind(resource)
    .execute(&db.pool)
    .await
    .unwrap();
    let rt = start_runtime(&db.pool, fast_config("w1"), Registry::new());
    let token = IdempotencyToken::generate();
    let id = enqueue(
        &db.pool,
        NewWork::new(
            "setpoint.probe",
            json!({"observed": {"ec2_instance_id": "i-1"}, "then": "step-2", "record": true}),
        )
        .with_token(token.clone())
        .for_resource(resource, "acme"),
    )
    .await;
    wait_drained(&db.pool).await;
    rt.stop().await;
    let (observed, active): (Value, bool) =
        sqlx::query_as("SELECT observed, has_active_work FROM instances WHERE id = $1")
            .bind(resource)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(observed, json!({"ec2_instance_id": "i-1"}));
    assert!(
        !active,
        "the chain ended, so has_active_work must be cleared"
    );
    // The follow-up ran with the derived token, for the same resource.
    let (follow_token, parent): (String, Value) = sqlx::query_as(
        "SELECT p.token, e.detail FROM probe_runs p
         JOIN work_events e ON e.work_id = p.work_id AND e.event = 'enqueued'
         WHERE p.phase = 'end' AND p.work_id <> $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(follow_token, token.derive("step-2").to_string());
    assert_eq!(parent, json!({"parent_id": id}));
    // Each `succeeded` event carries its own unit's detail (the completion matches batch
    // entries to rows by id).
    let details: Vec<(i64, Value)> = sqlx::query_as(
        "SELECT work_id, detail FROM work_events WHERE event = 'succeeded' ORDER BY work_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(details.len(), 2);
    assert_eq!(details[0].0, id);
    assert_eq!(details[0].1["follow_ups"], json!(["step-2"]));
    assert_eq!(details[1].1["follow_ups"], json!([]));
    assert!(details.iter().all(|(_, d)| d["duration_ms"].is_u64()));
}

#[tokio::test]
async fn heartbeats_keep_a_long_unit_from_being_taken_over() {
    let db = db().await;
    let cfg = |id: &str| {
        let mut c = fast_config(id);
        c.lease = Duration::from_millis(600);
        c.heartbeat_interval = Duration::from_millis(150);
        c
    };
    let a = start_runtime(&db.pool, cfg("A"), Registry::new());
    let b = start_runtime(&db.pool, cfg("B"), Registry::new());
    let id = enqueue(
        &db.pool,
        NewWork::new("setpoint.probe", json!({"sleep_ms": 2500, "record": true})),
    )
    .await;
    wait_state(&db.pool, id, None).await;
    a.stop().await;
    b.stop().await;
    let starts: i64 = sqlx::query_scalar("SELECT count(*) FROM probe_runs WHERE phase = 'start'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        starts,
        1,
        "the unit ran twice: {:?}",
        history(&db.pool, id).await
    );
}

#[tokio::test]
async fn graceful_shutdown_lets_running_units_finish() {
    let db = db().await;
    let rt = start_runtime(&db.pool, fast_config("w1"), Registry::new());
    let id = enqueue(
        &db.pool,
        NewWork::new("setpoint.probe", json!({"sleep_ms": 700, "record": true})),
    )
    .await;
    wait_for("the unit to start", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM probe_runs")
            .fetch_one(&db.pool)
            .await
            .ok()?;
        (n == 1).then_some(())
    })
    .await;
    rt.stop().await;
    assert_eq!(
        state(&db.pool, id).await,
        None,
        "the running unit should have completed"
    );
    assert_eq!(event_counts(&db.pool, "succeeded").await, vec![(id, 1)]);
}

/// A handler that fails with a message holding a NUL byte and 100,000 more characters.
struct NulFailure;

impl Handler for NulFailure {
    fn kind(&self) -> &str {
        "test.nul-failure"
    }
    fn handle<'a>(
        &'a self,
        _ctx: &'a WorkContext,
        _spec: &'a Value,
    ) -> BoxFuture<'a, Result<Outcome, AdapterError>> {
        let huge = "x".repeat(100_000);
        Box::pin(async move {
            Err(AdapterError::permanent(format!("bad\u{0}byte {huge}")).with_code("nul\u{0}code"))
        })
    }
}

/// Defect 6, second cause: an error text PostgreSQL refuses (a NUL byte) made the failure
/// impossible to record, so the unit was claimed again and again. Failure text is now cleaned
/// and capped before it is stored.
#[tokio::test]
async fn a_failure_text_postgresql_would_refuse_is_cleaned_and_recorded() {
    let db = db().await;
    let mut extra = Registry::new();
    extra.register(NulFailure).unwrap();
    let rt = start_runtime(&db.pool, fast_config("w1"), extra);
    let id = enqueue(&db.pool, NewWork::new("test.nul-failure", json!({}))).await;
    wait_state(&db.pool, id, Some("parked")).await;
    rt.stop().await;
    let last_error: String = sqlx::query_scalar("SELECT last_error FROM work WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        last_error.starts_with("bad\u{FFFD}byte"),
        "{}",
        &last_error[..40]
    );
    assert!(last_error.chars().count() <= setpoint::store::MAX_STORED_MESSAGE);
    assert!(last_error.ends_with("[cut]"));
    let h = history(&db.pool, id).await;
    assert_eq!(h.iter().filter(|e| e.0 == "claimed").count(), 1, "{h:?}");
}

/// Waits (without failing) until it has waited four times, counting its `waiting` events.
struct Cooldown(sqlx::PgPool);

impl Handler for Cooldown {
    fn kind(&self) -> &str {
        "test.cooldown"
    }
    fn handle<'a>(
        &'a self,
        ctx: &'a WorkContext,
        _spec: &'a Value,
    ) -> BoxFuture<'a, Result<Outcome, AdapterError>> {
        Box::pin(async move {
            let waited: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM work_events WHERE work_id = $1 AND event = 'waiting'",
            )
            .bind(ctx.work_id)
            .fetch_one(&self.0)
            .await
            .map_err(|e| AdapterError::transient(e.to_string()))?;
            if waited < 4 {
                return Err(AdapterError::waiting(
                    "the volume was modified less than 6 hours ago",
                    Duration::from_millis(50),
                ));
            }
            Ok(Outcome::done())
        })
    }
}

/// A unit that waits (for a cooldown, a budget) gives its attempt back: it never runs out of
/// attempts by waiting.
#[tokio::test]
async fn a_waiting_unit_does_not_use_up_its_attempts() {
    let db = db().await;
    let mut extra = Registry::new();
    extra.register(Cooldown(db.pool.clone())).unwrap();
    let rt = start_runtime(&db.pool, fast_config("w1"), extra);
    let id = enqueue(
        &db.pool,
        NewWork::new("test.cooldown", json!({})).max_attempts(2),
    )
    .await;
    wait_state(&db.pool, id, None).await;
    rt.stop().await;
    let h = history(&db.pool, id).await;
    let waits: Vec<_> = h.iter().filter(|e| e.0 == "waiting").collect();
    assert_eq!(waits.len(), 4, "{h:?}");
    assert!(h.iter().any(|e| e.0 == "succeeded"), "{h:?}");
    assert!(!h.iter().any(|e| e.0 == "parked"), "{h:?}");
}

/// Completes `units` as their worker `w` would (they leave the table).
async fn complete_all(conn: &mut sqlx::PgConnection, w: &str, units: &[ClaimedWork]) {
    let done: Vec<Completion> = units
        .iter()
        .map(|u| Completion {
            id: u.id,
            attempt: u.attempt,
            detail: json!({}),
        })
        .collect();
    let completed = work_complete_if_leased(conn, w, &done).await.unwrap();
    assert_eq!(completed.len(), units.len());
}

/// `n` units of `kind` in `lane` for tenant `tenant`, each on a resource of its own, enqueued
/// with statements of at most 1,000 units (as the API's batches and the drift scheduler do).
async fn enqueue_for(pool: &sqlx::PgPool, tenant: &str, kind: &str, lane: Lane, n: usize) {
    let mut left = n;
    while left > 0 {
        let now = left.min(1000);
        let units: Vec<NewWork> = (0..now)
            .map(|_| {
                NewWork::new(kind, json!({}))
                    .for_resource(Uuid::new_v4(), tenant)
                    .in_lane(lane)
            })
            .collect();
        let mut tx = pool.begin().await.unwrap();
        work_enqueue(&mut tx, &units).await.unwrap();
        tx.commit().await.unwrap();
        left -= now;
    }
}

#[tokio::test]
async fn one_tenants_burst_does_not_hold_back_another_tenants_single_change() {
    let db = db().await;
    enqueue_for(&db.pool, "a", "setpoint.noop", Lane::Change, 10_000).await;
    let mut conn = db.pool.acquire().await.unwrap();
    // The workers are already busy with A's backlog.
    let first = work_claim(&mut conn, "w", &noop(), 100, 60_000, ClaimFrom::Start)
        .await
        .unwrap()
        .units;
    assert_eq!(first.len(), 100);
    assert!(first.iter().all(|u| u.tenant.as_deref() == Some("a")));
    complete_all(&mut conn, "w", &first).await;
    let b = enqueue(
        &db.pool,
        NewWork::new("setpoint.noop", json!({})).for_resource(Uuid::new_v4(), "b"),
    )
    .await;
    // Claim rounds of 100 as the workers run them after a wake-up (from the start).
    let mut a_claimed = first.len();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let got = work_claim(&mut conn, "w", &noop(), 100, 60_000, ClaimFrom::Start)
            .await
            .unwrap()
            .units;
        assert!(!got.is_empty(), "B's unit was never claimed");
        let found = got.iter().any(|u| u.id == b);
        a_claimed += got.iter().filter(|u| u.id != b).count();
        complete_all(&mut conn, "w", &got).await;
        if found {
            break;
        }
    }
    assert_eq!(
        rounds, 1,
        "B is claimed in the first round after its commit"
    );
    assert!(
        a_claimed < 1_000,
        "B waited for {a_claimed} of A's 10,000 units (10% is 1,000)"
    );
    // A's backlog still drains, in its own order.
    let rest = work_claim(&mut conn, "w", &noop(), 10_000, 60_000, ClaimFrom::Start)
        .await
        .unwrap()
        .units;
    assert_eq!(a_claimed + rest.len(), 10_000);
}

#[tokio::test]
async fn a_tenant_of_weight_three_gets_three_turns_for_each_of_a_tenant_of_weight_one() {
    use setpoint::store::tenant_weights::{tenant_weight_reset, tenant_weight_set};

    let db = db().await;
    let mut conn = db.pool.acquire().await.unwrap();
    tenant_weight_set(&mut conn, "heavy", 3.0).await.unwrap();
    tenant_weight_set(&mut conn, "light", 2.0).await.unwrap();
    assert!(tenant_weight_reset(&mut conn, "light").await.unwrap());
    assert!(!tenant_weight_reset(&mut conn, "light").await.unwrap());
    // The table refuses what the CLI refuses: nothing is written.
    assert!(tenant_weight_set(&mut conn, "x", 0.0).await.is_err());
    assert!(tenant_weight_set(&mut conn, "x", 1001.0).await.is_err());

    // Both queue 400 units at the same moment: "light" (weight 1 again) first.
    enqueue_for(&db.pool, "light", "setpoint.noop", Lane::Change, 400).await;
    enqueue_for(&db.pool, "heavy", "setpoint.noop", Lane::Change, 400).await;
    let claimed = work_claim(&mut conn, "w", &noop(), 200, 60_000, ClaimFrom::Start)
        .await
        .unwrap()
        .units;
    assert_eq!(claimed.len(), 200);
    let heavy = claimed
        .iter()
        .filter(|u| u.tenant.as_deref() == Some("heavy"))
        .count();
    // Places 1/3 s apart against 1 s apart: 150 of the first 200 (one place either way for the
    // moment between the two enqueues).
    assert!(
        (147..=153).contains(&heavy),
        "{heavy} of the first 200 claims were the weight-3 tenant's"
    );
}

#[tokio::test]
async fn a_users_change_is_claimed_in_the_first_round_after_its_commit_despite_100k_drift_checks() {
    let db = db().await;
    // 100,000 drift checks of 100 tenants are due (an earlier sweep).
    for t in 0..100 {
        enqueue_for(
            &db.pool,
            &format!("t{t}"),
            "setpoint.noop",
            Lane::Drift,
            1000,
        )
        .await;
    }
    let kinds = vec!["setpoint.noop".to_owned(), "setpoint.probe".to_owned()];
    let mut conn = db.pool.acquire().await.unwrap();
    let first = work_claim(&mut conn, "w", &kinds, 100, 60_000, ClaimFrom::Start)
        .await
        .unwrap()
        .units;
    assert_eq!(first.len(), 100);
    assert!(first.iter().all(|u| u.lane == Lane::Drift));
    // Fair between tenants within the drift lane too: the first round spreads over them.
    let tenants: std::collections::HashSet<_> = first.iter().map(|u| u.tenant.clone()).collect();
    assert!(
        tenants.len() >= 10,
        "{} tenants in the first round",
        tenants.len()
    );
    // A user's update (of another kind: its step) commits while the checks are claimed.
    let update = enqueue(
        &db.pool,
        NewWork::new("setpoint.probe", json!({})).for_resource(Uuid::new_v4(), "t7"),
    )
    .await;
    let next = work_claim(&mut conn, "w", &kinds, 100, 60_000, ClaimFrom::Start)
        .await
        .unwrap()
        .units;
    let claimed = next.iter().find(|u| u.id == update);
    assert_eq!(
        claimed.map(|u| u.lane),
        Some(Lane::Change),
        "the change is claimed in the next round"
    );
    // A bulk unit waits behind both lanes.
    let bulk = enqueue(
        &db.pool,
        NewWork::new("setpoint.probe", json!({}))
            .for_resource(Uuid::new_v4(), "t8")
            .in_lane(Lane::Bulk),
    )
    .await;
    let change = enqueue(
        &db.pool,
        NewWork::new("setpoint.probe", json!({})).for_resource(Uuid::new_v4(), "t9"),
    )
    .await;
    let round = work_claim(&mut conn, "w", &kinds, 100, 60_000, ClaimFrom::Start)
        .await
        .unwrap()
        .units;
    assert!(round.iter().any(|u| u.id == change));
    assert!(
        round.iter().all(|u| u.id != bulk),
        "bulk waits while checks are due"
    );
}
