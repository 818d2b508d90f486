//! A flood of made-up bearer tokens: 200 concurrent clients, each with a random token of its
//! own, call the API over and over (two calls at a time) while a unit of work runs in the same
//! engine, on the same database pool as the API (as `setpoint serve` runs them).
//!
//! The database must see each token once: its first lookup, then the negative cache answers
//! (the lookup counter `setpoint_api_token_lookups_total{result="unknown"}` ends at exactly
//! 200). The budget is small here (20 lookups/s, burst 20), so the first round of 200 new
//! tokens overruns it: those calls are refused without a lookup (UNAVAILABLE) and get their
//! lookup later. The unit keeps its lease throughout and finishes on attempt 1.
//!
//! Why 20 s (the unit's run time) is enough: it spans more than three leases of 6 s, so a unit
//! whose heartbeats starved would be rescued (attempt 2); 200 tokens need about 9 s of budget
//! at 20/s, so every token is looked up within the first half, and the second half shows that
//! repeats cost nothing (the counter stays at 200) while the negative cache keeps its entries
//! (60 s). A longer run would repeat the same steady state.
//!
//! One test function: the metrics recorder is global to the test process.

mod api_support;
mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api_support::*;
use serde_json::json;
use setpoint::api::ApiConfig;
use setpoint::api::proto::GetInstanceRequest;
use setpoint::api::proto::instance_service_client::InstanceServiceClient;
use setpoint::api::token_cache::TokenLimits;
use setpoint::queue::{self, NewWork};
use setpoint::worker::builtin::Probe;
use setpoint::{Registry, Runtime, WorkerConfig};
use setpoint_adapter::typed;
use tokio_util::sync::CancellationToken;
use tonic::Code;

const CLIENTS: usize = 200;
const UNIT_RUNS: Duration = Duration::from_secs(20);

/// The value of the sample `name` (with its labels) in a Prometheus text body; 0 when absent.
fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_tokens_cost_one_lookup_each_and_a_running_unit_keeps_its_lease() {
    let metrics = setpoint::metrics::install().expect("recorder");
    let env = Env::start(ApiConfig {
        tokens: TokenLimits {
            lookups_per_second: 20,
            lookup_burst: 20,
            ..TokenLimits::default()
        },
        ..ApiConfig::default()
    })
    .await;

    // The unit: a probe that runs for UNIT_RUNS with a 6 s lease renewed every 2 s.
    let unit = {
        let mut conn = env.db.pool.acquire().await.unwrap();
        queue::enqueue(
            &mut conn,
            NewWork::new(
                "setpoint.probe",
                json!({"sleep_ms": UNIT_RUNS.as_millis() as u64}),
            ),
        )
        .await
        .unwrap()
        .id
    };
    let mut registry = Registry::new();
    registry
        .register(typed(Probe::new(
            env.db.pool.clone(),
            "flood-worker".into(),
        )))
        .unwrap();
    let runtime = Runtime::new(
        env.db.pool.clone(),
        registry,
        WorkerConfig {
            lease: Duration::from_secs(6),
            heartbeat_interval: Duration::from_secs(2),
            poll_interval: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(5),
            worker_id: Some("flood-worker".into()),
            ..WorkerConfig::default()
        },
    )
    .unwrap();
    let stop_workers = env.shutdown.clone();
    tokio::spawn(async move { runtime.run(stop_workers).await });

    // The clients, until the unit has finished.
    let stop = CancellationToken::new();
    let seen: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let token = format!("spt_{}", uuid::Uuid::new_v4().simple());
        let mut c = InstanceServiceClient::new(env.channel().await);
        let stop = stop.clone();
        let seen = seen.clone();
        clients.push(tokio::spawn(async move {
            let mut looked_up = false;
            while !stop.is_cancelled() {
                let req = || {
                    authed(
                        &token,
                        GetInstanceRequest {
                            name: "tenants/-/instances/web-1".into(),
                        },
                    )
                };
                let mut other = c.clone();
                let (x, y) = tokio::join!(c.get_instance(req()), other.get_instance(req()));
                for answer in [x, y] {
                    let e = answer.expect_err("a made-up token is never let in");
                    let code = e.code();
                    assert!(
                        matches!(code, Code::Unauthenticated | Code::Unavailable),
                        "{e:?}"
                    );
                    looked_up |= code == Code::Unauthenticated;
                    *seen.lock().unwrap().entry(format!("{code:?}")).or_default() += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            looked_up
        }));
    }

    let finished = common::wait_for("the unit to finish", || {
        let pool = env.db.pool.clone();
        async move {
            let rows: Vec<(String, Option<i32>)> = sqlx::query_as(
                "SELECT event, attempt FROM work_events WHERE work_id = $1 ORDER BY id",
            )
            .bind(unit)
            .fetch_all(&pool)
            .await
            .unwrap();
            rows.iter()
                .any(|(e, _)| e == "succeeded" || e == "parked")
                .then_some(rows)
        }
    })
    .await;
    stop.cancel();
    let mut every_token_looked_up = true;
    for c in clients {
        every_token_looked_up &= c.await.unwrap();
    }
    let body = metrics.render();
    let unknown = sample(
        &body,
        "setpoint_api_token_lookups_total{result=\"unknown\"}",
    );
    let refused = sample(&body, "setpoint_api_token_lookups_refused_total");
    eprintln!(
        "answers {:?}; database lookups of unknown tokens {unknown}, refused by the budget \
         {refused}; unit events {finished:?}",
        seen.lock().unwrap()
    );

    assert!(every_token_looked_up, "every token got its lookup");
    assert_eq!(unknown, CLIENTS as f64, "one database lookup per token");
    assert!(refused > 0.0, "the budget was spent and held");
    let calls: usize = seen.lock().unwrap().values().sum();
    assert!(calls > 4 * CLIENTS, "{calls} calls");
    // The unit ran once, on its first attempt, and was never rescued.
    let events: Vec<&str> = finished.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(events.last(), Some(&"succeeded"), "{finished:?}");
    assert!(!events.contains(&"rescued"), "{finished:?}");
    assert!(
        finished.iter().all(|(_, a)| a.unwrap_or(1) <= 1),
        "{finished:?}"
    );
    env.stop().await;
}
