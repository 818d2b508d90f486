//! `setpoint bench api`: CreateInstance calls per second with many concurrent clients against
//! a durable PostgreSQL, next to PostgreSQL's own single-row INSERT commit rate on the same
//! cluster in the same run (the same number of connections, each committing one-row INSERTs
//! into a scratch table). Each Create writes its request id, instance, unit of work and its
//! event, and stored answer; concurrent Creates share a transaction (the API's group commit,
//! see [`crate::api::batch`]). Workers do not run during the measurement: it measures the API's
//! write path alone.
//!
//! It also measures the two parts every Create holds, each on its own, with the same clients:
//! empty gRPC calls on the same server, and Creates handed straight to the group commit. Their
//! CPU added up bounds what any Create on this stack can reach on this machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::Endpoint;

use futures::future::BoxFuture;
use sqlx::PgPool;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::api::batch::{CreateBatcher, NewCreate, Settled};
use crate::api::proto::instance_service_client::InstanceServiceClient;
use crate::api::proto::{CreateInstanceRequest, Instance, InstanceSpec};
use crate::api::wake::WorkerWaker;
use crate::api::{ApiConfig, ApiError, ServeError, auth, convert};
use crate::config::parse_duration;
use crate::dev::cpu::{CpuSample, PostgresServer, own_cpu, postgres_server_of};
use crate::dev::postgres::{ClusterError, ClusterOptions, Durability, TempCluster};
use crate::store::{self, StoreError};

/// `setpoint bench api`.
#[derive(Debug, Clone, Args)]
pub struct BenchApiArgs {
    /// Concurrent API clients (and baseline connections).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Length of each measurement.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Use this database (on a durable cluster of yours, e.g. one with pg_stat_statements)
    /// instead of a throw-away cluster. It is migrated, and the benchmark's instances, units
    /// and a scratch table `bench_scratch` are left in it.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Concurrent batch transactions of the API's group commit (0: each Create on its own).
    #[arg(long, default_value_t = crate::api::batch::DEFAULT_EXECUTORS)]
    pub create_batch_executors: usize,
    /// Most Creates in one batch.
    #[arg(long, default_value_t = crate::api::batch::DEFAULT_MAX_BATCH)]
    pub create_batch_max: usize,
}

/// Why the benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The cluster did not start.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// A database statement failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The API failed to start.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Token creation failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A client failed to connect.
    #[error("client: {0}")]
    Client(#[from] tonic::transport::Error),
    /// A task failed.
    #[error("task failed: {0}")]
    Join(String),
    /// The engine failed to start or to stop.
    #[error("engine: {0}")]
    Engine(String),
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct BenchApiReport {
    /// Concurrent clients.
    pub clients: usize,
    /// Seconds per measurement.
    pub duration_secs: f64,
    /// PostgreSQL single-row INSERT commits per second.
    pub baseline_commits_per_sec: f64,
    /// Successful CreateInstance calls per second.
    pub creates_per_sec: f64,
    /// Failed calls during the measurement.
    pub create_errors: u64,
    /// `creates_per_sec / baseline_commits_per_sec`.
    pub ratio: f64,
    /// Median Create latency (ms).
    pub create_p50_ms: f64,
    /// 99th percentile Create latency (ms).
    pub create_p99_ms: f64,
    /// Concurrent batch transactions of the API (0: each Create on its own).
    pub create_batch_executors: usize,
    /// Most Creates per batch.
    pub create_batch_max: usize,
    /// Creates written per second by the group commit alone, without gRPC (absent with 0
    /// batch executors).
    pub batched_writes_per_sec: Option<f64>,
    /// Empty gRPC calls (`grpc.health.v1.Health/Check`) per second on the same server.
    pub empty_calls_per_sec: f64,
    /// Failed batched writes and empty calls.
    pub floor_errors: u64,
    /// CPU per baseline commit and per Create, when the server's processes are readable.
    pub cpu: Option<CpuReport>,
}

/// Where the CPU went (Linux, PostgreSQL on this machine): per baseline commit and per Create,
/// PostgreSQL's processes and this one (the API server and its clients, or the baseline's
/// connections).
#[derive(Debug, Clone, Serialize)]
pub struct CpuReport {
    /// Cores of this machine.
    pub cores: usize,
    /// PostgreSQL CPU per baseline commit (µs).
    pub baseline_postgres_us: f64,
    /// This process's CPU per baseline commit (µs).
    pub baseline_process_us: f64,
    /// PostgreSQL CPU per Create (µs).
    pub create_postgres_us: f64,
    /// This process's CPU per Create: the API server, its batch executors and the clients (µs).
    pub create_process_us: f64,
    /// Creates/s these costs allow when every core is busy: `cores / (both per Create)`.
    pub create_ceiling_per_sec: f64,
    /// PostgreSQL CPU per Create written by the group commit alone (µs).
    pub batched_write_postgres_us: Option<f64>,
    /// This process's CPU per Create written by the group commit alone (µs).
    pub batched_write_process_us: Option<f64>,
    /// This process's CPU per empty gRPC call, server and client (µs).
    pub empty_call_process_us: f64,
    /// Creates/s that no implementation of Create on this stack can beat here: `cores /
    /// (a batched write + an empty call)`, both of which every Create contains.
    pub floor_ceiling_per_sec: Option<f64>,
}

/// CPU readings at the start of a measurement, on a readable local server.
#[derive(Debug, Clone)]
struct CpuMark {
    server: PostgresServer,
    postgres: CpuSample,
    process: Duration,
}

impl CpuMark {
    fn start(server: PostgresServer) -> Option<CpuMark> {
        Some(CpuMark {
            server,
            postgres: server.sample(),
            process: own_cpu()?,
        })
    }

    /// (PostgreSQL, this process) CPU in µs per each of `n` operations since this mark.
    fn per_op(&self, n: f64) -> Option<(f64, f64)> {
        let end = CpuMark::start(self.server)?;
        let us = |d: Duration| d.as_secs_f64() * 1e6 / n.max(1.0);
        Some((
            us(end.postgres.since(&self.postgres)),
            us(end.process.saturating_sub(self.process)),
        ))
    }
}

/// The baseline's commits/s, and its CPU per commit (PostgreSQL, this process) when `server`
/// is readable.
///
/// Not run by [`drive`]: each client keeps one connection for all its INSERTs (a call of
/// `drive` owns nothing across calls), and a failed INSERT fails the benchmark.
async fn baseline(
    url: &str,
    clients: usize,
    duration: Duration,
    server: Option<PostgresServer>,
) -> Result<(f64, Option<(f64, f64)>), BenchError> {
    let pool = store::connect(url, clients as u32 + 2).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_scratch (id bigserial PRIMARY KEY, payload text NOT NULL, at timestamptz NOT NULL DEFAULT now())")
        .execute(&pool)
        .await
        .map_err(StoreError::from)?;
    let count = Arc::new(AtomicU64::new(0));
    let mark = server.and_then(CpuMark::start);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let pool = pool.clone();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            let mut i = 0u64;
            while start.elapsed() < duration {
                sqlx::query("INSERT INTO bench_scratch (payload) VALUES ($1)")
                    .bind(format!("client {c} row {i}"))
                    .execute(&mut *conn)
                    .await?;
                i += 1;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), sqlx::Error>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| BenchError::Join(e.to_string()))?
            .map_err(StoreError::from)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let commits = count.load(Ordering::Relaxed) as f64;
    let cpu = mark.and_then(|m| m.per_op(commits));
    pool.close().await;
    Ok((commits / secs, cpu))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One call of a benchmark client: its `i`th call, boxed so that every phase drives its
/// clients the same way.
type Call = Box<dyn FnMut(u64) -> BoxFuture<'static, Result<(), String>> + Send>;

/// What one phase measured.
#[derive(Debug, Clone)]
struct Phase {
    /// Successful calls per second.
    rate: f64,
    /// Latencies of the successful calls (ms), sorted.
    latencies: Vec<f64>,
    /// Failed calls.
    errors: u64,
    /// CPU per successful call (PostgreSQL, this process), when the server is readable.
    cpu: Option<(f64, f64)>,
}

/// Runs `clients` concurrent clients (client `c` calls `client(c)`) for `duration`.
async fn drive(
    clients: usize,
    duration: Duration,
    server: Option<PostgresServer>,
    what: &'static str,
    client: impl Fn(usize) -> Call,
) -> Result<Phase, BenchError> {
    let errors = Arc::new(AtomicU64::new(0));
    let calls: Vec<Call> = (0..clients).map(client).collect();
    let mark = server.and_then(CpuMark::start);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut call in calls {
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u64;
            while start.elapsed() < duration {
                let t = Instant::now();
                match call(i).await {
                    Ok(()) => latencies.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            tracing::warn!(error = %e, "{what} failed");
                        }
                    }
                }
                i += 1;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.map_err(|e| BenchError::Join(e.to_string()))?);
    }
    let secs = start.elapsed().as_secs_f64();
    // Before anything shuts down: connections must still be open to be counted.
    let cpu = mark.and_then(|m| m.per_op(latencies.len() as f64));
    latencies.sort_by(f64::total_cmp);
    Ok(Phase {
        rate: latencies.len() as f64 / secs,
        latencies,
        errors: errors.load(Ordering::Relaxed),
        cpu,
    })
}

/// Lets each measurement start as the first did: the rows an earlier one wrote are vacuumed
/// now, so that autovacuum does not count them during the next one.
async fn settle(pool: &PgPool) {
    let vacuum = "VACUUM (ANALYZE) bench_scratch, instances, work, work_events, api_requests";
    if let Err(e) = sqlx::raw_sql(vacuum).execute(pool).await {
        tracing::warn!(error = %e, "cannot vacuum between measurements; carrying on");
    }
}

/// The spec every benchmark Create asks for.
fn bench_spec() -> InstanceSpec {
    InstanceSpec {
        plan: "kvx.small".into(),
        region: "eu-west-1".into(),
        size_gb: 10,
        owner_email: "bench@example.com".into(),
    }
}

/// Creates written by the API's group commit alone, without gRPC: what the database side of
/// a Create costs at this concurrency.
async fn batched_writes(
    pool: &PgPool,
    config: &ApiConfig,
    clients: usize,
    duration: Duration,
    run: &str,
    server: Option<PostgresServer>,
) -> Result<Phase, BenchError> {
    let batcher = CreateBatcher::start(
        pool.clone(),
        crate::api::operations::FirstUnits::StandIn {
            create: config.create_kind.clone(),
            update: config.update_kind.clone(),
            delete: config.delete_kind.clone(),
        },
        config.create_batch_executors,
        config.create_batch_max,
        WorkerWaker::start(pool.clone()),
    );
    let spec = convert::spec_to_json(&bench_spec());
    drive(clients, duration, server, "batched write", |c| {
        let batcher = batcher.clone();
        let spec = spec.clone();
        let run = run.to_owned();
        Box::new(move |i| {
            let batcher = batcher.clone();
            let create = NewCreate {
                tenant: "bench".into(),
                request_id: format!("bench-w{run}-{c}-{i}"),
                name: format!("w{run}-{c}-{i}"),
                spec: spec.clone(),
                body_hash: [0; 32],
                bulk: false,
            };
            Box::pin(async move {
                match batcher.submit(create).await {
                    Ok((Settled::Created(_), _)) => Ok(()),
                    Ok((Settled::Alone, _)) => Err("the batch did not write it".into()),
                    Err(e) => Err(e.to_string()),
                }
            })
        })
    })
    .await
}

/// Where the CPU went, when every phase could read it.
fn cpu_report(
    baseline: Option<(f64, f64)>,
    creates: &Phase,
    writes: Option<&Phase>,
    empty: &Phase,
) -> Option<CpuReport> {
    let (bp, bs) = baseline?;
    let (cp, cs) = creates.cpu?;
    let (_, es) = empty.cpu?;
    let write = writes.and_then(|w| w.cpu);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_sec = |us: f64| cores as f64 * 1e6 / us.max(1.0);
    Some(CpuReport {
        cores,
        baseline_postgres_us: bp,
        baseline_process_us: bs,
        create_postgres_us: cp,
        create_process_us: cs,
        create_ceiling_per_sec: per_sec(cp + cs),
        batched_write_postgres_us: write.map(|(wp, _)| wp),
        batched_write_process_us: write.map(|(_, ws)| ws),
        empty_call_process_us: es,
        floor_ceiling_per_sec: write.map(|(wp, ws)| per_sec(wp + ws + es)),
    })
}

/// Runs the benchmark and prints the figures.
///
/// # Errors
/// When the cluster, the server or a client cannot start.
pub async fn run(args: BenchApiArgs) -> Result<BenchApiReport, BenchError> {
    let clients = args.clients.max(1);
    let (cluster, url) = match &args.database_url {
        Some(url) => (None, url.clone()),
        None => {
            let cluster = tokio::task::spawn_blocking(move || {
                TempCluster::start(ClusterOptions {
                    durability: Durability::Durable,
                    max_connections: (clients as u32) * 2 + 40,
                    ..ClusterOptions::default()
                })
            })
            .await
            .map_err(|e| BenchError::Join(e.to_string()))??;
            let url = cluster.url("postgres");
            (Some(cluster), url)
        }
    };
    let pool = store::connect(&url, clients as u32 + 8).await?;
    store::migrate(&pool).await?;

    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .map_err(StoreError::from)?;
    let server = u32::try_from(backend).ok().and_then(postgres_server_of);
    let (baseline_rate, baseline_cpu) = baseline(&url, clients, args.duration, server).await?;

    let config = ApiConfig {
        create_batch_executors: args.create_batch_executors,
        create_batch_max: args.create_batch_max.max(1),
        ..ApiConfig::default()
    };
    // Names and request ids of this run (a database given with --database-url may hold an
    // earlier run's).
    let run = format!("{:08x}", rand::random::<u32>());
    let shutdown = CancellationToken::new();
    let api = crate::api::start(
        pool.clone(),
        config.clone(),
        crate::api::ApiServices::none(&pool),
        "127.0.0.1:0"
            .parse()
            .map_err(|e: std::net::AddrParseError| BenchError::Join(e.to_string()))?,
        shutdown.clone(),
    )
    .await?;
    let token = auth::create_token(&pool, "bench", false, None).await?.token;
    let endpoint = Endpoint::from_shared(format!("http://{}", api.addr))?;
    // A few HTTP/2 connections, many streams each.
    let channels = (clients / 16).max(1);
    let mut chans = Vec::new();
    for _ in 0..channels {
        chans.push(endpoint.connect().await?);
    }
    let auth_header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| BenchError::Join("token is not ASCII".into()))?;

    settle(&pool).await;
    let creates = drive(clients, args.duration, server, "create", |c| {
        let client = InstanceServiceClient::new(chans[c % channels].clone());
        let auth_header = auth_header.clone();
        let run = run.clone();
        Box::new(move |i| {
            let mut client = client.clone();
            let mut req = Request::new(CreateInstanceRequest {
                parent: String::new(),
                instance_id: format!("b{run}-{c}-{i}"),
                instance: Some(Instance {
                    spec: Some(bench_spec()),
                    ..Instance::default()
                }),
                request_id: format!("bench-{run}-{c}-{i}"),
                bulk: false,
            });
            req.metadata_mut()
                .insert("authorization", auth_header.clone());
            Box::pin(async move {
                client
                    .create_instance(req)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        })
    })
    .await?;
    // No database in these calls: nothing to settle.
    let empty = drive(clients, args.duration, server, "health check", |c| {
        let client = HealthClient::new(chans[c % channels].clone());
        Box::new(move |_| {
            let mut client = client.clone();
            Box::pin(async move {
                client
                    .check(HealthCheckRequest::default())
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        })
    })
    .await?;

    shutdown.cancel();
    api.wait().await?;
    settle(&pool).await;
    let writes = if config.create_batch_executors > 0 {
        Some(batched_writes(&pool, &config, clients, args.duration, &run, server).await?)
    } else {
        None
    };

    let report = BenchApiReport {
        clients,
        duration_secs: args.duration.as_secs_f64(),
        baseline_commits_per_sec: baseline_rate,
        creates_per_sec: creates.rate,
        create_errors: creates.errors,
        floor_errors: writes.as_ref().map_or(0, |w| w.errors) + empty.errors,
        ratio: if baseline_rate > 0.0 {
            creates.rate / baseline_rate
        } else {
            0.0
        },
        create_p50_ms: percentile(&creates.latencies, 0.5),
        create_p99_ms: percentile(&creates.latencies, 0.99),
        create_batch_executors: config.create_batch_executors,
        create_batch_max: config.create_batch_max,
        batched_writes_per_sec: writes.as_ref().map(|w| w.rate),
        empty_calls_per_sec: empty.rate,
        cpu: cpu_report(baseline_cpu, &creates, writes.as_ref(), &empty),
    };
    pool.close().await;
    drop(cluster);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        println!(
            "setpoint bench api  (durable PostgreSQL, {} concurrent clients, {:.0}s each)",
            report.clients, report.duration_secs
        );
        println!(
            "  PostgreSQL single-row INSERT commits: {:>8.0} /s",
            report.baseline_commits_per_sec
        );
        println!(
            "  API CreateInstance calls:             {:>8.0} /s  (p50 {:.1} ms, p99 {:.1} ms, {} errors)",
            report.creates_per_sec,
            report.create_p50_ms,
            report.create_p99_ms,
            report.create_errors
        );
        println!(
            "  ratio: {:.0}% of the commit rate (target >= 70%)",
            report.ratio * 100.0
        );
        println!(
            "  group commit: {} batch executors, at most {} creates per batch",
            report.create_batch_executors, report.create_batch_max
        );
        if let Some(w) = report.batched_writes_per_sec {
            println!("  Creates by the group commit alone:    {w:>8.0} /s  (no gRPC)");
        }
        println!(
            "  empty gRPC calls (health Check):      {:>8.0} /s  ({} errors in the parts)",
            report.empty_calls_per_sec, report.floor_errors
        );
        match &report.cpu {
            Some(cpu) => {
                println!(
                    "  CPU per baseline commit: PostgreSQL {:.0} µs, this process {:.0} µs",
                    cpu.baseline_postgres_us, cpu.baseline_process_us
                );
                println!(
                    "  CPU per Create: PostgreSQL {:.0} µs, this process (server and clients) {:.0} µs",
                    cpu.create_postgres_us, cpu.create_process_us
                );
                println!(
                    "  with all {} cores busy, at most {:.0} Creates/s ({:.0}% of the commit rate)",
                    cpu.cores,
                    cpu.create_ceiling_per_sec,
                    100.0 * cpu.create_ceiling_per_sec / report.baseline_commits_per_sec.max(1.0)
                );
                if let (Some(wp), Some(ws)) =
                    (cpu.batched_write_postgres_us, cpu.batched_write_process_us)
                {
                    println!(
                        "  CPU per Create by the group commit alone: PostgreSQL {wp:.0} µs, this process {ws:.0} µs"
                    );
                }
                println!(
                    "  CPU per empty gRPC call: this process (server and clients) {:.0} µs",
                    cpu.empty_call_process_us
                );
                if let Some(floor) = cpu.floor_ceiling_per_sec {
                    println!(
                        "  every Create holds both: none can beat {:.0} Creates/s here ({:.0}% of the commit rate)",
                        floor,
                        100.0 * floor / report.baseline_commits_per_sec.max(1.0)
                    );
                }
            }
            None => println!("  CPU per Create: unknown (PostgreSQL is not on this machine)"),
        }
    }
    Ok(report)
}
