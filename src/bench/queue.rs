//! `setpoint bench queue`: throughput and latency of the work queue on a durable PostgreSQL,
//! next to a naive one-row queue measured on the same cluster in the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use setpoint_adapter::{AdapterError, Outcome, TypedHandler, WorkContext, typed};
use sqlx::PgPool;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::store::StoreError;
use crate::store::work::{NewWork, work_enqueue};
use crate::worker::{Registry, Runtime, WorkerConfig};

/// What to measure.
#[derive(Debug, Clone)]
pub struct QueueBenchOptions {
    /// Backlog sizes to drain, one run each.
    pub jobs: Vec<usize>,
    /// Units run at once (the runtime's concurrency).
    pub workers: usize,
    /// Units per enqueue statement.
    pub enqueue_batch: usize,
    /// Units per claim.
    pub claim_batch: usize,
    /// Steady arrival rate for the pickup-latency run (units/s); 0 skips it.
    pub latency_rate: u32,
    /// Length of the pickup-latency run.
    pub latency_duration: Duration,
    /// Naive one-row cycles to time for the baseline; 0 skips it.
    pub baseline_cycles: usize,
    /// Concurrent connections of the baseline.
    pub baseline_clients: usize,
    /// When not 0, each backlog is drained a second time with this many units of a kind no
    /// engine serves enqueued first (at the head of the queue), to show what they cost.
    pub unserved: usize,
}

/// One drain run.
#[derive(Debug, Clone, Serialize)]
pub struct DrainFigures {
    /// Units enqueued and drained.
    pub jobs: usize,
    /// Bulk enqueue rate (units/s).
    pub enqueue_per_sec: f64,
    /// Drain rate from the first claim to the last completion committed (units/s).
    pub drain_per_sec: f64,
    /// Units of a kind no engine serves that waited at the head of the queue meanwhile.
    pub unserved: usize,
}

/// Everything `bench queue` measured.
#[derive(Debug, Clone, Serialize)]
pub struct QueueBenchReport {
    /// One row per backlog size.
    pub drains: Vec<DrainFigures>,
    /// Pickup latency p50 in ms (enqueue commit to handler start) at the steady rate.
    pub pickup_p50_ms: Option<f64>,
    /// Pickup latency p99 in ms.
    pub pickup_p99_ms: Option<f64>,
    /// Pickup latency max in ms.
    pub pickup_max_ms: Option<f64>,
    /// Units the latency run sent.
    pub latency_samples: usize,
    /// The steady rate used (units/s).
    pub latency_rate: u32,
    /// Naive one-row queue cycles per second on the same cluster.
    pub baseline_cycles_per_sec: Option<f64>,
}

/// Units of the unreported warm-up run that precedes the measured ones.
const WARM_UP: usize = 2_000;

struct Counting {
    done: Arc<AtomicU64>,
    started: Instant,
    latencies: Arc<Mutex<Vec<f64>>>,
}

#[derive(serde::Deserialize)]
struct CountSpec {
    /// Microseconds since the bench's start when the unit was committed, for latency runs.
    #[serde(default)]
    t: Option<u64>,
}

impl TypedHandler for Counting {
    type Spec = CountSpec;
    const KIND: &'static str = "bench.count";

    async fn run(&self, _ctx: &WorkContext, spec: CountSpec) -> Result<Outcome, AdapterError> {
        if let Some(t) = spec.t {
            let now = self.started.elapsed().as_micros() as u64;
            self.latencies
                .lock()
                .await
                .push(now.saturating_sub(t) as f64 / 1000.0);
        }
        self.done.fetch_add(1, Ordering::Relaxed);
        Ok(Outcome::done())
    }
}

async fn reset(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("TRUNCATE work, work_events")
        .execute(pool)
        .await?;
    sqlx::query("VACUUM ANALYZE work").execute(pool).await?;
    Ok(())
}

/// The kind of the units nobody serves (`--unserved`).
const UNSERVED_KIND: &str = "bench.unserved";

async fn wait_empty(pool: &PgPool) -> Result<(), StoreError> {
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM work WHERE kind <> $1")
            .bind(UNSERVED_KIND)
            .fetch_one(pool)
            .await?;
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs the queue benchmark against `pool` (migrated) and returns its figures.
///
/// # Errors
/// Database errors.
pub async fn run_queue_bench(
    pool: &PgPool,
    opts: &QueueBenchOptions,
    mut progress: impl FnMut(&str),
) -> Result<QueueBenchReport, StoreError> {
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let mut registry = Registry::new();
    let _ = registry.register(typed(Counting {
        done: done.clone(),
        started,
        latencies: latencies.clone(),
    }));
    let config = WorkerConfig {
        concurrency: opts.workers,
        claim_batch: opts.claim_batch,
        completion_batch: opts.claim_batch.max(1000),
        poll_interval: Duration::from_millis(200),
        ..WorkerConfig::default()
    };

    let mut drains = Vec::new();
    // A first, unreported run of WARM_UP units opens the pool's connections and warms the
    // server's caches, which would otherwise be charged to whichever backlog is measured first.
    let with_unserved = (opts.unserved > 0).then_some(opts.unserved);
    let runs =
        std::iter::once((WARM_UP, false, 0)).chain(opts.jobs.iter().flat_map(|&j| {
            std::iter::once((j, true, 0)).chain(with_unserved.map(|u| (j, true, u)))
        }));
    for (jobs, measured, unserved) in runs {
        reset(pool).await?;
        if unserved > 0 {
            // First, so that they are the oldest due units: a claim that looked at due units
            // in order, whatever their kind, would meet them before any served one.
            progress(&format!(
                "enqueueing {unserved} units of {UNSERVED_KIND}, which no engine serves"
            ));
            let mut left = unserved;
            while left > 0 {
                let n = left.min(opts.enqueue_batch.max(1));
                let units: Vec<NewWork> = (0..n)
                    .map(|_| NewWork::new(UNSERVED_KIND, json!({})))
                    .collect();
                let mut tx = pool.begin().await?;
                work_enqueue(&mut tx, &units).await?;
                tx.commit().await?;
                left -= n;
            }
        }
        progress(&if measured {
            format!("enqueueing {jobs} units")
        } else {
            format!("warming up with {jobs} units (not reported)")
        });
        let t0 = Instant::now();
        // Two writers: one statement keeps one PostgreSQL backend busy, and there are two cores.
        let writers = 2;
        let mut handles = Vec::new();
        for w in 0..writers {
            let pool = pool.clone();
            let share = jobs / writers + usize::from(w < jobs % writers);
            let batch = opts.enqueue_batch;
            handles.push(tokio::spawn(async move {
                let mut left = share;
                while left > 0 {
                    let n = left.min(batch);
                    let units: Vec<NewWork> = (0..n)
                        .map(|_| NewWork::new(Counting::KIND, json!({})))
                        .collect();
                    let mut tx = pool.begin().await?;
                    work_enqueue(&mut tx, &units).await?;
                    tx.commit().await?;
                    left -= n;
                }
                Ok::<(), StoreError>(())
            }));
        }
        for h in handles {
            if let Ok(r) = h.await {
                r?;
            }
        }
        let enqueue_secs = t0.elapsed().as_secs_f64();
        sqlx::query("ANALYZE work").execute(pool).await?;
        progress(&format!(
            "draining {jobs} units with {} workers",
            opts.workers
        ));
        done.store(0, Ordering::Relaxed);
        let runtime = Runtime::new(pool.clone(), registry.clone(), config.clone())
            .map_err(|e| StoreError::Database(sqlx::Error::Configuration(e.to_string().into())))?;
        let stop = CancellationToken::new();
        let t1 = Instant::now();
        let handle = tokio::spawn(runtime.run(stop.clone()));
        while done.load(Ordering::Relaxed) < jobs as u64 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        wait_empty(pool).await?;
        let drain_secs = t1.elapsed().as_secs_f64();
        stop.cancel();
        let _ = handle.await;
        if measured {
            drains.push(DrainFigures {
                jobs,
                enqueue_per_sec: jobs as f64 / enqueue_secs,
                drain_per_sec: jobs as f64 / drain_secs,
                unserved,
            });
        }
    }

    // Pickup latency under a steady arrival rate: each unit committed in its own transaction,
    // as an API request would, with its commit time in the spec.
    let (mut p50, mut p99, mut pmax, mut samples) = (None, None, None, 0);
    if opts.latency_rate > 0 {
        reset(pool).await?;
        progress(&format!(
            "pickup latency at {} units/s for {:?}",
            opts.latency_rate, opts.latency_duration
        ));
        latencies.lock().await.clear();
        let runtime = Runtime::new(pool.clone(), registry.clone(), config.clone())
            .map_err(|e| StoreError::Database(sqlx::Error::Configuration(e.to_string().into())))?;
        let stop = CancellationToken::new();
        let handle = tokio::spawn(runtime.run(stop.clone()));
        let period = Duration::from_secs_f64(1.0 / opts.latency_rate as f64);
        let total = (opts.latency_rate as f64 * opts.latency_duration.as_secs_f64()) as usize;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        // Several producers, so one slow commit does not delay the next arrival.
        let (tx_units, rx_units) = async_channel(total);
        let mut producers = Vec::new();
        for _ in 0..8 {
            let pool = pool.clone();
            let rx = rx_units.clone();
            producers.push(tokio::spawn(async move {
                while let Ok(()) = rx.recv().await {
                    let mut tx = pool.begin().await?;
                    let t = started.elapsed().as_micros() as u64;
                    work_enqueue(&mut tx, &[NewWork::new(Counting::KIND, json!({ "t": t }))])
                        .await?;
                    tx.commit().await?;
                }
                Ok::<(), StoreError>(())
            }));
        }
        drop(rx_units);
        for _ in 0..total {
            tick.tick().await;
            let _ = tx_units.send(()).await;
        }
        drop(tx_units);
        for p in producers {
            if let Ok(r) = p.await {
                r?;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while latencies.lock().await.len() < total && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        let _ = handle.await;
        let mut l = latencies.lock().await.clone();
        l.sort_by(|a, b| a.total_cmp(b));
        samples = l.len();
        if !l.is_empty() {
            let pick = |q: f64| l[((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1];
            p50 = Some(pick(0.50));
            p99 = Some(pick(0.99));
            pmax = l.last().copied();
        }
    }

    let baseline = if opts.baseline_cycles > 0 {
        reset(pool).await?;
        progress(&format!(
            "baseline: naive one-row queue, {} cycles on {} connections",
            opts.baseline_cycles, opts.baseline_clients
        ));
        Some(naive_baseline(pool, opts.baseline_cycles, opts.baseline_clients).await?)
    } else {
        None
    };
    reset(pool).await?;
    Ok(QueueBenchReport {
        drains,
        pickup_p50_ms: p50,
        pickup_p99_ms: p99,
        pickup_max_ms: pmax,
        latency_samples: samples,
        latency_rate: opts.latency_rate,
        baseline_cycles_per_sec: baseline,
    })
}

/// A bounded multi-consumer channel from tokio parts: a shared receiver behind a mutex.
fn async_channel(cap: usize) -> (tokio::sync::mpsc::Sender<()>, SharedRx) {
    let (tx, rx) = tokio::sync::mpsc::channel(cap.max(1));
    (tx, SharedRx(Arc::new(Mutex::new(rx))))
}

#[derive(Clone)]
struct SharedRx(Arc<Mutex<tokio::sync::mpsc::Receiver<()>>>);

impl SharedRx {
    async fn recv(&self) -> Result<(), ()> {
        self.0.lock().await.recv().await.ok_or(())
    }
}

/// The naive queue: per cycle, insert one row (one transaction), then claim one row with
/// `FOR UPDATE SKIP LOCKED` and delete it (a second transaction).
async fn naive_baseline(pool: &PgPool, cycles: usize, clients: usize) -> Result<f64, StoreError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_naive_queue (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             payload jsonb NOT NULL, run_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(pool)
    .await?;
    sqlx::query("TRUNCATE bench_naive_queue")
        .execute(pool)
        .await?;
    let per_client = cycles.div_ceil(clients.max(1));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            for _ in 0..per_client {
                sqlx::query("INSERT INTO bench_naive_queue (payload) VALUES ('{}')")
                    .execute(&mut *conn)
                    .await?;
                sqlx::query(
                    "DELETE FROM bench_naive_queue WHERE id = (
                         SELECT id FROM bench_naive_queue ORDER BY run_at, id
                         LIMIT 1 FOR UPDATE SKIP LOCKED)",
                )
                .execute(&mut *conn)
                .await?;
            }
            Ok::<(), StoreError>(())
        }));
    }
    for t in tasks {
        if let Ok(r) = t.await {
            r?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE bench_naive_queue")
        .execute(pool)
        .await?;
    Ok((per_client * clients.max(1)) as f64 / secs)
}
