//! Prometheus metrics, `/healthz` and `/readyz` on one HTTP port (`--metrics-listen`).
//!
//! Metric names (all prefixed `setpoint_`):
//!
//! | metric                                   | type      | labels                          |
//! |------------------------------------------|-----------|---------------------------------|
//! | `units`                                  | gauge     | `kind`, `state`                 |
//! | `units_parked`                           | gauge     |                                 |
//! | `units_unserved`                         | gauge     | `kind`                          |
//! | `oldest_pending_age_seconds`             | gauge     |                                 |
//! | `units_claimed_total`                    | counter   | `kind`                          |
//! | `units_succeeded_total`                  | counter   | `kind`                          |
//! | `units_failed_total`                     | counter   | `kind`, `class`, `action`       |
//! | `units_abandoned_total`                  | counter   | `kind`                          |
//! | `unit_duration_seconds`                  | histogram | `kind`, `result`                |
//! | `adapter_calls_total`                    | counter   | `adapter`, `operation`, `result`|
//! | `adapter_call_duration_seconds`          | histogram | `adapter`, `operation`, `result`|
//! | `api_requests_total`                     | counter   | `method`, `code`                |
//! | `api_token_lookups_total`                | counter   | `result`                        |
//! | `api_token_lookups_refused_total`        | counter   |                                 |
//! | `api_create_batches_total`               | counter   | `result`                        |
//! | `api_create_batched_total`               | counter   | `result`                        |
//! | `api_tls_certificate_expiry_seconds`     | gauge     |                                 |
//! | `retention_rows_pruned_total`            | counter   | `table`                         |
//! | `retention_rounds_total`                 | counter   | `result`                        |
//! | `retention_round_duration_seconds`       | histogram | `result`                        |
//! | `orphan_machines`                        | gauge     | `region`                        |
//! | `orphan_machines_terminated_total`       | counter   | `region`                        |
//! | `orphan_sweeps_total`                    | counter   | `result`                        |
//! | `batch_calls_total`                      | counter   | `work_kind`                     |
//! | `batch_items_total`                      | counter   | `work_kind`                     |
//!
//! `result` is `ok`, `transient` or `permanent`; `action` is `retry`, `wait` (a wait that is
//! not a failed attempt) or `park`. An attempt is *abandoned* when it lost its unit (its lease
//! was not renewed in time or was taken over, or the engine shut down): it stopped without a
//! result, and another attempt redoes the unit. An API request's
//! `method` is the path of a method the server serves (`/setpoint.v1.InstanceService/GetInstance`)
//! or `unknown` for any other path: label values never come from what a client sends, so made-up
//! paths add no series. `api_token_lookups_total` counts the bearer-token lookups that reached the
//! database, by `result` (`found`, `unknown`, `error`); `api_token_lookups_refused_total` counts
//! the calls refused because the lookup budget was spent (no database work). The API's group
//! commit counts batches of creates and the creates in them, by `result`: `committed` or
//! `failed` (a failed batch's creates then run one by one). With TLS, the API's server
//! certificate expires in `api_tls_certificate_expiry_seconds` (negative once it has). Retention
//! counts the rows it deletes per `table` (`work_events`, `api_requests`, `side_effects`,
//! `instances`) and its rounds by `result`: `done`, `skipped` (another engine was pruning) or
//! `failed`. The orphan sweep (`[orphans]`, EC2) exports the managed machines that belong to no
//! live resource per `region`, as the last sweep found them (every engine reports the same
//! figure, whichever swept: aggregate with `max`, not `sum`), the machines it terminated, and
//! its rounds by `result` (`done`, `skipped`, `failed`). A batch step (a drift check that
//! observes many resources per call) counts its calls and the items they answered per
//! `work_kind`: items per call is how well the checks of a round are gathered. The queue gauges are refreshed from
//! the database every few seconds by [`serve`]. The recording functions are cheap no-ops until
//! a recorder is installed ([`install`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use setpoint_adapter::{AdapterError, BoxFuture};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::store::engines::units_unserved;
use crate::store::migrations_pending;
use crate::store::work::work_stats;

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The Prometheus recorder could not be built or installed.
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
    /// The address could not be bound.
    #[error("cannot listen on {addr} for metrics: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
///
/// # Errors
/// When another recorder is already installed.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .map_err(|e| MetricsError::Recorder(e.to_string()))?
        .install_recorder()
        .map_err(|e| MetricsError::Recorder(e.to_string()))?;
    let _ = HANDLE.set(handle.clone());
    Ok(handle)
}

/// A unit was claimed.
pub fn unit_claimed(kind: &str) {
    metrics::counter!("setpoint_units_claimed_total", "kind" => kind.to_owned()).increment(1);
}

/// A unit's handler finished: `result` is `ok`, `transient` or `permanent`.
pub fn unit_finished(kind: &str, result: &'static str, took: Duration) {
    if result == "ok" {
        metrics::counter!("setpoint_units_succeeded_total", "kind" => kind.to_owned()).increment(1);
    }
    metrics::histogram!("setpoint_unit_duration_seconds", "kind" => kind.to_owned(), "result" => result)
        .record(took.as_secs_f64());
}

/// A unit failed and was retried (`action` `retry`) or parked (`park`).
pub fn unit_failed(kind: &str, class: &'static str, action: &'static str) {
    metrics::counter!("setpoint_units_failed_total", "kind" => kind.to_owned(), "class" => class, "action" => action)
        .increment(1);
}

/// An attempt of a unit of `kind` stopped without a result because it lost its unit.
pub fn unit_abandoned(kind: &str) {
    metrics::counter!("setpoint_units_abandoned_total", "kind" => kind.to_owned()).increment(1);
}

/// An API call ended with gRPC status `code`. `method` must be a known method's path or
/// `unknown` (see `api::methods`), never a path as a client sent it.
pub fn api_request(method: &str, code: &'static str) {
    metrics::counter!("setpoint_api_requests_total", "method" => method.to_owned(), "code" => code)
        .increment(1);
}

/// A bearer token was looked up in the database: `result` is `found`, `unknown` or `error`.
pub fn api_token_lookup(result: &'static str) {
    metrics::counter!("setpoint_api_token_lookups_total", "result" => result).increment(1);
}

/// A call was refused because the budget of token lookups was spent.
pub fn api_token_lookup_refused() {
    metrics::counter!("setpoint_api_token_lookups_refused_total").increment(1);
}

/// A batch of `creates` CreateInstance calls was `committed` or `failed` (then each ran on
/// its own).
pub fn api_create_batch(result: &'static str, creates: usize) {
    metrics::counter!("setpoint_api_create_batches_total", "result" => result).increment(1);
    metrics::counter!("setpoint_api_create_batched_total", "result" => result)
        .increment(creates as u64);
}

/// A change was refused because its tenant reached its quota of changes in flight.
pub fn api_quota_refused() {
    metrics::counter!("setpoint_api_quota_refused_total").increment(1);
}

/// The API's server certificate expires in `secs` seconds (negative: it has expired).
pub fn api_tls_certificate_expiry(secs: f64) {
    metrics::gauge!("setpoint_api_tls_certificate_expiry_seconds").set(secs);
}

/// Retention deleted `rows` rows of `table`.
pub fn retention_pruned(table: &'static str, rows: u64) {
    metrics::counter!("setpoint_retention_rows_pruned_total", "table" => table).increment(rows);
}

/// A retention round ended with `result` (`done`, `skipped` or `failed`) after `took`.
pub fn retention_round(result: &'static str, took: Duration) {
    metrics::counter!("setpoint_retention_rounds_total", "result" => result).increment(1);
    metrics::histogram!("setpoint_retention_round_duration_seconds", "result" => result)
        .record(took.as_secs_f64());
}

/// A batch step of `work_kind` made one call answering `items` units.
pub fn batch_call(work_kind: &str, items: usize) {
    metrics::counter!("setpoint_batch_calls_total", "work_kind" => work_kind.to_owned())
        .increment(1);
    metrics::counter!("setpoint_batch_items_total", "work_kind" => work_kind.to_owned())
        .increment(items as u64);
}

/// An orphan sweep ended with `result` (`done`, `skipped` or `failed`).
pub fn orphan_sweep(result: &'static str) {
    metrics::counter!("setpoint_orphan_sweeps_total", "result" => result).increment(1);
}

/// The last sweep of `region` found `n` orphaned machines still there.
pub fn orphan_machines(region: &str, n: i64) {
    metrics::gauge!("setpoint_orphan_machines", "region" => region.to_owned()).set(n as f64);
}

/// A sweep of `region` terminated `n` orphaned machines.
pub fn orphans_terminated(region: &str, n: u64) {
    metrics::counter!("setpoint_orphan_machines_terminated_total", "region" => region.to_owned())
        .increment(n);
}

/// A token of budget `key` was taken: from this engine's reserve, or `granted` by the table.
pub fn budget_take(key: &str, from: &'static str) {
    metrics::counter!("setpoint_budget_takes_total", "key" => key.to_owned(), "from" => from)
        .increment(1);
}

/// A unit found no token of budget `key` and waits.
pub fn budget_wait(key: &str) {
    metrics::counter!("setpoint_budget_waits_total", "key" => key.to_owned()).increment(1);
}

/// A unit in the middle of a step waited for its next token of budget `key` in place.
pub fn budget_wait_in_place(key: &str) {
    metrics::counter!("setpoint_budget_waits_in_place_total", "key" => key.to_owned()).increment(1);
}

/// The peer throttled a call of budget `key`.
pub fn budget_throttle(key: &str) {
    metrics::counter!("setpoint_budget_throttles_total", "key" => key.to_owned()).increment(1);
}

/// Budget `key` as the last statement of this engine left it: its current rate, its tokens
/// (negative: the debt after a throttle) and its configured rate.
pub fn budget_state(key: &str, rate: f64, tokens: f64, max_rate: f64) {
    metrics::gauge!("setpoint_budget_rate", "key" => key.to_owned()).set(rate);
    metrics::gauge!("setpoint_budget_tokens", "key" => key.to_owned()).set(tokens);
    metrics::gauge!("setpoint_budget_max_rate", "key" => key.to_owned()).set(max_rate);
}

/// Units waiting in the line of budget `key` to be let in (all engines), as this engine's
/// last admission round counted them.
pub fn budget_in_line(key: &str, units: i64) {
    metrics::gauge!("setpoint_budget_in_line", "key" => key.to_owned()).set(units as f64);
}

/// Runs an adapter call, recording its latency and result class.
pub async fn adapter_call<T>(
    adapter: &'static str,
    operation: &'static str,
    call: impl Future<Output = Result<T, AdapterError>>,
) -> Result<T, AdapterError> {
    let started = Instant::now();
    let result = call.await;
    let class = match &result {
        Ok(_) => "ok",
        Err(e) => e.class.as_str(),
    };
    metrics::counter!("setpoint_adapter_calls_total", "adapter" => adapter, "operation" => operation, "result" => class)
        .increment(1);
    metrics::histogram!("setpoint_adapter_call_duration_seconds", "adapter" => adapter, "operation" => operation, "result" => class)
        .record(started.elapsed().as_secs_f64());
    result
}

/// Refreshes the queue gauges from the database once.
async fn refresh_queue_gauges(pool: &PgPool, seen: &mut Vec<(String, String)>) {
    let Ok(mut conn) = pool.acquire().await else {
        return;
    };
    let Ok(stats) = work_stats(&mut conn).await else {
        return;
    };
    let now: Vec<(String, String)> = stats
        .counts
        .iter()
        .map(|(s, k, _)| (s.clone(), k.clone()))
        .collect();
    for (state, kind) in seen.iter().filter(|p| !now.contains(p)) {
        metrics::gauge!("setpoint_units", "state" => state.clone(), "kind" => kind.clone())
            .set(0.0);
    }
    for (state, kind, n) in &stats.counts {
        metrics::gauge!("setpoint_units", "state" => state.clone(), "kind" => kind.clone())
            .set(*n as f64);
    }
    // The total on its own too: an alarm that cannot sum labelled series (CloudWatch, through
    // the Terraform module's metrics sidecar) reads this one.
    let parked: i64 = stats
        .counts
        .iter()
        .filter(|(state, _, _)| state == "parked")
        .map(|(_, _, n)| n)
        .sum();
    metrics::gauge!("setpoint_units_parked").set(parked as f64);
    metrics::gauge!("setpoint_oldest_pending_age_seconds").set(stats.oldest_pending_age_secs);
    *seen = now;
}

/// Refreshes the gauge of units that no live engine serves, per kind.
async fn refresh_unserved(pool: &PgPool, seen: &mut Vec<String>) {
    let Ok(mut conn) = pool.acquire().await else {
        return;
    };
    let Ok(unserved) = units_unserved(&mut conn).await else {
        return;
    };
    for kind in seen
        .iter()
        .filter(|k| !unserved.iter().any(|(u, _)| u == *k))
    {
        metrics::gauge!("setpoint_units_unserved", "kind" => kind.clone()).set(0.0);
    }
    for (kind, n) in &unserved {
        metrics::gauge!("setpoint_units_unserved", "kind" => kind.clone()).set(*n as f64);
    }
    *seen = unserved.into_iter().map(|(k, _)| k).collect();
}

/// A readiness check of a plugin (`/readyz` fails while it does): its name and the check.
pub type Readiness = (
    String,
    Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>,
);

/// Whether the engine can serve: the database answers, every migration is applied, and every
/// plugin's check passes.
async fn ready(pool: &PgPool, checks: &[Readiness]) -> Result<(), String> {
    let mut conn = tokio::time::timeout(Duration::from_secs(2), pool.acquire())
        .await
        .map_err(|_| "database: no connection within 2s".to_owned())?
        .map_err(|e| format!("database: {e}"))?;
    match migrations_pending(&mut conn).await {
        Ok(0) => {}
        Ok(n) => return Err(format!("{n} migration(s) not applied")),
        Err(e) => return Err(format!("database: {e}")),
    }
    for (name, check) in checks {
        match tokio::time::timeout(Duration::from_secs(2), check()).await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(format!("{name}: {why}")),
            Err(_) => return Err(format!("{name}: no answer within 2s")),
        }
    }
    Ok(())
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

async fn route(
    req: Request<hyper::body::Incoming>,
    pool: PgPool,
    checks: Arc<Vec<Readiness>>,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => match HANDLE.get() {
            Some(h) => text(StatusCode::OK, h.render()),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "no recorder\n".into()),
        },
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match ready(&pool, &checks).await {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Installs the recorder, serves `/metrics`, `/healthz` and `/readyz` on `addr` and refreshes
/// the queue gauges, until `shutdown`. Returns the bound address (port 0 picks one).
///
/// # Errors
/// When the recorder cannot be installed or the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    pool: PgPool,
    checks: Vec<Readiness>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, MetricsError> {
    let checks = Arc::new(checks);
    let handle = install()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let stop = shutdown.clone();
    let gauge_pool = pool.clone();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut unserved = Vec::new();
        loop {
            refresh_queue_gauges(&gauge_pool, &mut seen).await;
            refresh_unserved(&gauge_pool, &mut unserved).await;
            handle.run_upkeep();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let pool = pool.clone();
            let checks = checks.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let pool = pool.clone();
                    let checks = checks.clone();
                    async move { Ok::<_, Infallible>(route(req, pool, checks).await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    tracing::info!(addr = %bound, "metrics, /healthz and /readyz listening");
    Ok(bound)
}
