//! `setpoint bench scale`: an engine in charge of many resources. It fills a durable throw-away
//! PostgreSQL with N READY resources of a benchmark kind (bulk statements, with the history
//! their creation left), starts an engine whose steps answer after a set time (no cloud), lets
//! drift check every resource once per interval, and meanwhile submits Creates through the
//! gRPC API at a steady rate. It prints the time from a Create's commit to its first adapter
//! call (p50/p99/max), from Create to READY, the drift checks per second against the rate the
//! interval asks for, and the sizes of the tables and their indexes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::json;
use setpoint_adapter::{
    AdapterError, BatchStep, BoxFuture, ResourceKind, Step, StepDecl, StepInput, StepResult,
    WorkContext,
};
use tokio_util::sync::CancellationToken;
use tonic::Request;
use uuid::Uuid;

use super::api::BenchError;
use crate::api::ApiConfig;
use crate::api::convert::json_to_struct;
use crate::api::proto::resource_service_client::ResourceServiceClient;
use crate::api::proto::{CreateResourceRequest, Resource};
use crate::config::parse_duration;
use crate::dev::postgres::{ClusterOptions, Durability, TempCluster};
use crate::engine::EngineBuilder;
use crate::plugin::{ConfigContext, Plugin, PluginError, Registrar, Services};
use crate::store::drift::drift_schedule_fill;
use crate::store::events::events_fill_history;
use crate::store::instances::{Fill, instances_fill_ready, instances_ready_ids};
use crate::store::work::{Lane, work_lane_backlog};
use crate::store::{self, StoreError, TableSize};
use crate::worker::WorkerConfig;

/// The benchmark's resource kind.
pub const KIND: &str = "bench.item";
/// The tenant whose Creates are measured.
const NEWCOMER: &str = "newcomer";
/// Resources written per fill statement.
const FILL_BATCH: i64 = 50_000;
/// How often the created resources are polled for READY (the resolution of create -> READY).
const READY_POLL: Duration = Duration::from_millis(50);

/// `setpoint bench scale`.
#[derive(Debug, Clone, Args)]
pub struct BenchScaleArgs {
    /// READY resources the engine keeps watching.
    #[arg(long, default_value_t = 10_000)]
    pub resources: usize,
    /// Tenants they belong to.
    #[arg(long, default_value_t = 100)]
    pub tenants: usize,
    /// How often drift checks each resource.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub drift_interval: Duration,
    /// How long every adapter call (a create step, a drift check) takes to answer.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub adapter_latency: Duration,
    /// Creates submitted per second through the API.
    #[arg(long, default_value_t = 20)]
    pub create_rate: u32,
    /// How long Creates are submitted.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Units the engine runs at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Most drift checks observed by one adapter call (the kind's observe step batches; 1
    /// observes each resource with a call of its own).
    #[arg(long, default_value_t = 200)]
    pub observe_batch: usize,
    /// Use this (empty, scratch) database instead of a throw-away durable cluster.
    #[arg(long, env = "SETPOINT_BENCH_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// p50, p99 and max of a sample, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Spread {
        v.sort_by(f64::total_cmp);
        let at = |p: f64| {
            if v.is_empty() {
                return 0.0;
            }
            let i = ((v.len() - 1) as f64 * p).round() as usize;
            v[i.min(v.len() - 1)]
        };
        Spread {
            n: v.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// What `bench scale` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    /// READY resources written before the run.
    pub resources: usize,
    /// Their tenants.
    pub tenants: usize,
    /// Seconds the fill took (resources and their history).
    pub fill_secs: f64,
    /// The drift interval (s).
    pub drift_interval_secs: f64,
    /// Every adapter call's answer time (ms).
    pub adapter_latency_ms: f64,
    /// Creates submitted per second.
    pub create_rate: u32,
    /// Creates the API accepted.
    pub creates: usize,
    /// Creates the API refused or that failed.
    pub create_errors: u64,
    /// From a Create's answer (its commit) to its first adapter call.
    pub commit_to_first_call: Spread,
    /// From a Create's commit to READY (seen by polling every 50 ms).
    pub create_to_ready: Spread,
    /// Drift checks run per second while Creates were submitted.
    pub drift_checks_per_sec: f64,
    /// Drift checks not finished when Creates started, and when they ended: a backlog that
    /// grows means drift does not keep its interval.
    pub drift_backlog: (i64, i64),
    /// Drift checks per second the interval asks for (resources / interval).
    pub drift_checks_needed_per_sec: f64,
    /// Adapter calls per sweep: the resources, divided by the drift checks each observe call
    /// answered while Creates were submitted.
    pub adapter_calls_per_sweep: usize,
    /// Drift checks per observe call, on average, while Creates were submitted.
    pub checks_per_observe_call: f64,
    /// Table and index sizes after the run.
    pub sizes: Vec<TableSize>,
}

/// What the benchmark's steps record.
#[derive(Debug, Default)]
struct Calls {
    /// When the first create call of each resource started.
    first_call: Mutex<HashMap<Uuid, Instant>>,
    /// Drift checks run.
    observed: AtomicU64,
    /// Observe calls made (each answers a batch of checks).
    observe_calls: AtomicU64,
}

/// A step that answers after the set time, like an adapter whose peer takes that long.
struct SlowStep {
    latency: Duration,
    calls: Arc<Calls>,
}

/// The drift check: one call for a batch of resources, answering after the set time, like a
/// describe of many machines at once.
struct SlowObserve {
    latency: Duration,
    calls: Arc<Calls>,
}

impl BatchStep for SlowObserve {
    fn batch_key(&self, _input: &StepInput) -> String {
        String::new()
    }

    fn run_batch<'a>(
        &'a self,
        items: &'a [(WorkContext, StepInput)],
    ) -> BoxFuture<'a, Vec<Result<StepResult, AdapterError>>> {
        Box::pin(async move {
            self.calls.observe_calls.fetch_add(1, Ordering::Relaxed);
            self.calls
                .observed
                .fetch_add(items.len() as u64, Ordering::Relaxed);
            tokio::time::sleep(self.latency).await;
            items.iter().map(|_| Ok(StepResult::next())).collect()
        })
    }
}

impl Step for SlowStep {
    fn run<'a>(
        &'a self,
        _ctx: &'a WorkContext,
        input: &'a StepInput,
    ) -> BoxFuture<'a, Result<StepResult, AdapterError>> {
        Box::pin(async move {
            self.calls
                .first_call
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(input.resource.id)
                .or_insert_with(Instant::now);
            tokio::time::sleep(self.latency).await;
            Ok(StepResult::next())
        })
    }
}

/// The plugin that declares the benchmark's kind: one step to create, update or delete, and a
/// drift check, all answering after the set time.
struct ScalePlugin {
    latency: Duration,
    calls: Arc<Calls>,
    observe_batch: usize,
}

fn kind(observe_batch: usize) -> ResourceKind {
    ResourceKind::new(KIND, "items")
        .describe("A resource of `setpoint bench scale`: its adapter answers after a set time")
        .create([StepDecl::new("apply", "bench.item.create")])
        .update([StepDecl::new("apply", "bench.item.update")])
        .delete([StepDecl::new("delete", "bench.item.delete")])
        .observe(
            StepDecl::new("observe", "bench.item.observe")
                .beside("DriftChecked")
                .batched(observe_batch),
        )
}

impl Plugin for ScalePlugin {
    fn name(&self) -> &str {
        "bench"
    }

    fn configure(&mut self, _cx: &ConfigContext<'_>) -> Result<(), PluginError> {
        Ok(())
    }

    fn register(&self, _services: &Services, r: &mut Registrar) -> Result<(), PluginError> {
        r.kind(kind(self.observe_batch))?;
        let step = || {
            Arc::new(SlowStep {
                latency: self.latency,
                calls: self.calls.clone(),
            })
        };
        r.step("bench.item.create", step())?;
        r.step("bench.item.update", step())?;
        r.step("bench.item.delete", step())?;
        r.batch_step(
            "bench.item.observe",
            Arc::new(SlowObserve {
                latency: self.latency,
                calls: self.calls.clone(),
            }),
        )?;
        Ok(())
    }
}

/// Drift checks not finished.
async fn drift_backlog(pool: &sqlx::PgPool) -> Result<i64, BenchError> {
    let mut conn = pool.acquire().await.map_err(StoreError::from)?;
    Ok(work_lane_backlog(&mut conn, Lane::Drift).await?)
}

/// Runs the benchmark; progress goes to `say`.
///
/// # Errors
/// When the cluster, the engine or the API cannot start, or a statement fails.
pub async fn run(args: BenchScaleArgs, say: impl Fn(&str)) -> Result<ScaleReport, BenchError> {
    let (_cluster, url) = match &args.database_url {
        Some(url) => (None, url.clone()),
        None => {
            say("starting a throw-away PostgreSQL with durable settings");
            let cluster = tokio::task::spawn_blocking(|| {
                TempCluster::start(ClusterOptions {
                    durability: Durability::Durable,
                    ..ClusterOptions::default()
                })
            })
            .await
            .map_err(|e| BenchError::Join(e.to_string()))??;
            say(&format!(
                "PostgreSQL runs in {} (removed at the end, or on Ctrl-C)",
                cluster.dir().display()
            ));
            let url = cluster.url("postgres");
            (Some(cluster), url)
        }
    };
    let pool = store::connect(&url, 40).await?;
    store::migrate(&pool).await?;

    let n = i64::try_from(args.resources).unwrap_or(i64::MAX);
    let started = Instant::now();
    let spec = json!({});
    let mut from = 0;
    while from < n {
        let batch = FILL_BATCH.min(n - from);
        let mut tx = pool.begin().await.map_err(StoreError::from)?;
        let ids = instances_fill_ready(
            &mut tx,
            Fill {
                kind: KIND,
                spec: &spec,
                tenant_prefix: "fleet",
                tenants: i64::try_from(args.tenants).unwrap_or(1),
                name_prefix: "item-",
                from,
                n: batch,
            },
        )
        .await?;
        drift_schedule_fill(&mut tx, KIND, &ids).await?;
        events_fill_history(&mut tx, from + 1, batch, "bench-fill").await?;
        tx.commit().await.map_err(StoreError::from)?;
        from += batch;
        say(&format!("filled {from} of {n} READY resources"));
    }
    for table in ["instances", "drift_schedule", "work_events"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
            .execute(&pool)
            .await
            .map_err(StoreError::from)?;
    }
    let fill_secs = started.elapsed().as_secs_f64();

    let token = crate::api::auth::create_token(&pool, NEWCOMER, false, None)
        .await?
        .token;
    let calls = Arc::new(Calls::default());
    let shutdown = CancellationToken::new();
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let engine = EngineBuilder::new(pool.clone())
        .env(|_| None)
        .worker(WorkerConfig {
            concurrency: args.concurrency.max(1),
            ..WorkerConfig::default()
        })
        .api(listen, ApiConfig::default())
        .drift(Some(args.drift_interval))
        .plugin(ScalePlugin {
            latency: args.adapter_latency,
            calls: calls.clone(),
            observe_batch: args.observe_batch.max(1),
        })
        .start(shutdown.clone())
        .await
        .map_err(|e| BenchError::Engine(e.to_string()))?;
    let addr = engine
        .api_addr
        .ok_or_else(|| BenchError::Engine("the engine serves no API".into()))?;
    let client = ResourceServiceClient::connect(format!("http://{addr}")).await?;
    // The drift scheduler starts its kind's cursor and reaches a steady stream of checks.
    say("engine started; letting drift settle for 5s");
    tokio::time::sleep(Duration::from_secs(5)).await;

    say(&format!(
        "submitting {} creates per second for {:?}",
        args.create_rate, args.duration
    ));
    let accepted: Arc<Mutex<Vec<(Uuid, Instant)>>> = Arc::default();
    let errors = Arc::new(AtomicU64::new(0));
    let total = (f64::from(args.create_rate) * args.duration.as_secs_f64()).round() as u64;
    let every = Duration::from_secs_f64(1.0 / f64::from(args.create_rate.max(1)));
    let backlog_before = drift_backlog(&pool).await?;
    let observed_before = calls.observed.load(Ordering::Relaxed);
    let observe_calls_before = calls.observe_calls.load(Ordering::Relaxed);
    let window = Instant::now();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    // Seen READY, polled: the first time each created resource was seen READY.
    let seen_ready: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let polling = CancellationToken::new();
    let poller = {
        let (pool, seen, stop) = (pool.clone(), seen_ready.clone(), polling.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(mut conn) = pool.acquire().await
                    && let Ok(ids) = instances_ready_ids(&mut conn, NEWCOMER, KIND).await
                {
                    let now = Instant::now();
                    let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                    for id in ids {
                        seen.entry(id).or_insert(now);
                    }
                }
                tokio::time::sleep(READY_POLL).await;
            }
        })
    };
    let mut sent = Vec::new();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| BenchError::Engine("a token that is no header value".into()))?;
    for i in 0..total {
        ticks.tick().await;
        let mut client = client.clone();
        let accepted = accepted.clone();
        let errors = errors.clone();
        let bearer = bearer.clone();
        sent.push(tokio::spawn(async move {
            let mut req = Request::new(CreateResourceRequest {
                parent: String::new(),
                kind: KIND.into(),
                resource_id: format!("new-{i}"),
                resource: Some(Resource {
                    spec: Some(json_to_struct(&json!({}))),
                    ..Resource::default()
                }),
                request_id: Uuid::new_v4().to_string(),
                bulk: false,
            });
            req.metadata_mut().insert("authorization", bearer);
            match client.create_resource(req).await {
                Ok(answer) => {
                    let at = Instant::now();
                    match Uuid::parse_str(&answer.into_inner().uid) {
                        Ok(uid) => accepted
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push((uid, at)),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bench create failed");
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for s in sent {
        s.await.map_err(|e| BenchError::Join(e.to_string()))?;
    }
    let window_secs = window.elapsed().as_secs_f64();
    let backlog_after = drift_backlog(&pool).await?;
    let checks_in_window = calls.observed.load(Ordering::Relaxed) - observed_before;
    let drift_checks_per_sec = checks_in_window as f64 / window_secs;
    let observe_calls_in_window =
        calls.observe_calls.load(Ordering::Relaxed) - observe_calls_before;
    let checks_per_observe_call = if observe_calls_in_window == 0 {
        1.0
    } else {
        checks_in_window as f64 / observe_calls_in_window as f64
    };
    let accepted = std::mem::take(&mut *accepted.lock().unwrap_or_else(PoisonError::into_inner));

    say("waiting for every create to be READY");
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let seen = seen_ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        if seen >= accepted.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    polling.cancel();
    let _ = poller.await;
    let ready: Vec<f64> = {
        let seen = seen_ready.lock().unwrap_or_else(PoisonError::into_inner);
        accepted
            .iter()
            .filter_map(|(uid, at)| seen.get(uid).map(|r| r.saturating_duration_since(*at)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect()
    };
    let first_calls = std::mem::take(
        &mut *calls
            .first_call
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    // A first call that started before the answer reached the client counts as 0 ms.
    let to_first_call: Vec<f64> = accepted
        .iter()
        .filter_map(|(uid, at)| {
            first_calls
                .get(uid)
                .map(|c| c.saturating_duration_since(*at))
        })
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();

    shutdown.cancel();
    engine
        .wait()
        .await
        .map_err(|e| BenchError::Engine(e.to_string()))?;
    sqlx::query("ANALYZE instances, work, work_events, api_requests")
        .execute(&pool)
        .await
        .map_err(StoreError::from)?;
    let sizes = store::table_sizes(
        &pool,
        &[
            "instances",
            "drift_schedule",
            "work",
            "work_events",
            "api_requests",
        ],
    )
    .await?;
    Ok(ScaleReport {
        resources: args.resources,
        tenants: args.tenants,
        fill_secs,
        drift_interval_secs: args.drift_interval.as_secs_f64(),
        adapter_latency_ms: args.adapter_latency.as_secs_f64() * 1000.0,
        create_rate: args.create_rate,
        creates: accepted.len(),
        create_errors: errors.load(Ordering::Relaxed),
        commit_to_first_call: Spread::of(to_first_call),
        create_to_ready: Spread::of(ready),
        drift_checks_per_sec,
        drift_backlog: (backlog_before, backlog_after),
        drift_checks_needed_per_sec: args.resources as f64 / args.drift_interval.as_secs_f64(),
        adapter_calls_per_sweep: (args.resources as f64 / checks_per_observe_call).ceil() as usize,
        checks_per_observe_call,
        sizes,
    })
}

/// The report as text.
pub fn print(r: &ScaleReport) {
    println!(
        "setpoint bench scale  ({} READY resources of {} tenants, filled in {:.1}s; drift every \
         {:.0}s; adapters answer in {:.0} ms; {} creates/s)",
        r.resources,
        r.tenants,
        r.fill_secs,
        r.drift_interval_secs,
        r.adapter_latency_ms,
        r.create_rate
    );
    let spread = |name: &str, s: &Spread| {
        println!(
            "  {name:<28} p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms  ({} samples)",
            s.p50_ms, s.p99_ms, s.max_ms, s.n
        );
    };
    println!(
        "  creates accepted           {} ({} errors)",
        r.creates, r.create_errors
    );
    spread("commit -> first adapter call", &r.commit_to_first_call);
    spread("create -> READY", &r.create_to_ready);
    println!(
        "  drift checks               {:.1}/s (the interval needs {:.1}/s); {} adapter calls per sweep ({:.1} checks per call)",
        r.drift_checks_per_sec,
        r.drift_checks_needed_per_sec,
        r.adapter_calls_per_sweep,
        r.checks_per_observe_call
    );
    println!(
        "  drift backlog              {} checks waiting when Creates started, {} when they ended",
        r.drift_backlog.0, r.drift_backlog.1
    );
    println!("  table            rows (est.)     heap MB   indexes MB");
    for s in &r.sizes {
        println!(
            "  {:<14} {:>12} {:>11.1} {:>12.1}",
            s.table,
            s.rows_estimate,
            s.table_bytes as f64 / 1_048_576.0,
            s.index_bytes as f64 / 1_048_576.0
        );
    }
}
