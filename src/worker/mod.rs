//! The worker runtime: claims due units, runs each with the handler registered for its kind,
//! and records the result — fenced, so a worker that lost its lease changes nothing.
//!
//! # Layout
//! - [`registry`]: kind → handler.
//! - `listener`: LISTEN/NOTIFY wake-ups; the fetch loop also polls.
//! - `completer`: batched, fenced completion of successful units.
//! - `heartbeat`: lease renewal of running units.
//! - [`backoff`]: retry delays.
//! - [`journal`]: the durable at-most-once journal handed to adapters.
//! - [`builtin`]: the kinds every engine knows (`setpoint.noop`, `setpoint.probe`).

pub mod backoff;
pub mod builtin;
mod completer;
mod heartbeat;
mod inflight;
pub mod journal;
mod listener;
pub mod registry;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::json;
use setpoint_adapter::{AdapterError, ErrorClass, IdempotencyToken, WorkContext};
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use backoff::Backoff;
pub use registry::Registry;

use crate::store::StoreError;
use crate::store::instances::instances_clear_active_work;
use crate::store::work::{
    ClaimFrom, ClaimedWork, Failure, FailureAction, work_claim, work_fail_if_leased,
};
use completer::Finished;
use inflight::InFlight;

/// How a worker process claims and runs units. Every field has a sane default.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Units run at once by this process.
    pub concurrency: usize,
    /// Most units claimed in one statement.
    pub claim_batch: usize,
    /// Most units completed in one transaction.
    pub completion_batch: usize,
    /// How long a claim is valid without a heartbeat; a dead worker's units wait this long
    /// before another worker takes them over.
    pub lease: Duration,
    /// How often running units' leases are renewed (keep well under `lease`).
    pub heartbeat_interval: Duration,
    /// How often to look for due units when no notification arrives (retries that became due,
    /// expired leases, lost notifications).
    pub poll_interval: Duration,
    /// On shutdown, how long running units may take to finish.
    pub shutdown_grace: Duration,
    /// The longest one attempt may run; past it the attempt fails as transient.
    pub max_runtime: Duration,
    /// Retry delays after transient failures.
    pub backoff: Backoff,
    /// This worker's name in leases and events (default: host-pid-random).
    pub worker_id: Option<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            claim_batch: 500,
            completion_batch: 1000,
            lease: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
            max_runtime: Duration::from_secs(600),
            backoff: Backoff::default(),
            worker_id: None,
        }
    }
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A configuration value is out of range.
    #[error("invalid worker configuration: {0}")]
    Config(String),
}

impl WorkerConfig {
    /// Checks that the values make sense together.
    ///
    /// # Errors
    /// When a value is zero or the heartbeat is not shorter than the lease.
    pub fn validate(&self) -> Result<(), WorkerError> {
        if self.concurrency == 0 || self.claim_batch == 0 || self.completion_batch == 0 {
            return Err(WorkerError::Config(
                "concurrency, claim_batch and completion_batch must be at least 1".into(),
            ));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.lease {
            return Err(WorkerError::Config(format!(
                "heartbeat_interval ({:?}) must be positive and shorter than lease ({:?})",
                self.heartbeat_interval, self.lease
            )));
        }
        if self.poll_interval.is_zero() {
            return Err(WorkerError::Config("poll_interval must be positive".into()));
        }
        Ok(())
    }
}

/// A unique name for this process: host, pid and a random suffix.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    format!("{host}-{}-{suffix}", std::process::id())
}

/// A worker process's runtime: claims, runs and completes units until shut down.
pub struct Runtime {
    pool: PgPool,
    registry: Arc<Registry>,
    config: WorkerConfig,
    worker_id: String,
}

/// Everything an executing unit needs, shared by all units of the runtime.
struct Shared {
    pool: PgPool,
    registry: Arc<Registry>,
    config: WorkerConfig,
    worker_id: String,
    inflight: InFlight,
    completions: mpsc::Sender<Finished>,
}

impl Runtime {
    /// A runtime over `pool` running the kinds in `registry`.
    ///
    /// # Errors
    /// When `config` is invalid.
    pub fn new(
        pool: PgPool,
        registry: Registry,
        config: WorkerConfig,
    ) -> Result<Self, WorkerError> {
        config.validate()?;
        let worker_id = config.worker_id.clone().unwrap_or_else(default_worker_id);
        Ok(Self {
            pool,
            registry: Arc::new(registry),
            config,
            worker_id,
        })
    }

    /// This worker's name in leases and events.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Runs until `shutdown` is cancelled, then stops claiming, lets running units finish for
    /// up to the shutdown grace, commits their results, and returns. Units still running after
    /// the grace keep their lease until it expires, then any worker rescues them.
    pub async fn run(self, shutdown: CancellationToken) {
        let cfg = self.config.clone();
        let wake = Arc::new(Notify::new());
        let inflight = InFlight::default();
        let background = CancellationToken::new();
        let (tx, rx) = mpsc::channel(cfg.completion_batch.max(cfg.concurrency) * 2);

        let listener = tokio::spawn(listener::run(
            self.pool.clone(),
            wake.clone(),
            background.clone(),
        ));
        let heartbeat = tokio::spawn(heartbeat::run(
            self.pool.clone(),
            self.worker_id.clone(),
            inflight.clone(),
            cfg.heartbeat_interval,
            cfg.lease,
            background.clone(),
        ));
        let completer = tokio::spawn(completer::run(
            self.pool.clone(),
            self.worker_id.clone(),
            inflight.clone(),
            rx,
            cfg.completion_batch,
        ));
        let shared = Arc::new(Shared {
            pool: self.pool.clone(),
            registry: self.registry.clone(),
            config: cfg.clone(),
            worker_id: self.worker_id.clone(),
            inflight: inflight.clone(),
            completions: tx,
        });
        tracing::info!(worker = %self.worker_id, kinds = ?self.registry.kinds(), concurrency = cfg.concurrency, "worker started");

        let tasks = TaskTracker::new();
        fetch_loop(&shared, &wake, &tasks, &shutdown).await;

        tracing::info!(worker = %self.worker_id, running = inflight.len(), "shutting down: no new claims, waiting for running units");
        tasks.close();
        if tokio::time::timeout(cfg.shutdown_grace, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = inflight.len(),
                "shutdown grace over; unfinished units will be rescued when their leases expire"
            );
        }
        drop(shared);
        // The completer ends once every sender (the shared state and finished tasks) is gone.
        let _ = tokio::time::timeout(cfg.shutdown_grace, completer).await;
        background.cancel();
        let _ = listener.await;
        let _ = heartbeat.await;
        tracing::info!(worker = %self.worker_id, "worker stopped");
    }
}

/// Claims while there is room and work; sleeps on NOTIFY or the poll interval otherwise.
async fn fetch_loop(
    shared: &Arc<Shared>,
    wake: &Notify,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let cfg = &shared.config;
    let slots = Arc::new(Semaphore::new(cfg.concurrency));
    let mut error_delay = Duration::from_millis(100);
    // While claims come back full, the next one starts after the last unit claimed (see
    // `ClaimFrom`); what that skips is found by a scan from the start, which runs at least
    // once per poll interval and whenever a claim comes back short.
    let mut from = ClaimFrom::Start;
    let mut last_full_scan = Instant::now();
    loop {
        // Wait for at least one free slot, then take as many as are free (up to a batch).
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let mut permits = vec![first];
        while permits.len() < cfg.claim_batch {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let wanted = permits.len();
        if last_full_scan.elapsed() >= cfg.poll_interval {
            from = ClaimFrom::Start;
        }
        let scanned_from = from;
        if scanned_from == ClaimFrom::Start {
            last_full_scan = Instant::now();
        }
        let claimed = claim(shared, wanted, scanned_from).await;
        let units = match claimed {
            Ok(units) => {
                error_delay = Duration::from_millis(100);
                units
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming work failed; retrying");
                drop(permits);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(error_delay) => {}
                }
                error_delay = (error_delay * 2).min(Duration::from_secs(5));
                from = ClaimFrom::Start;
                continue;
            }
        };
        let got = units.len();
        from = ClaimFrom::after_last(&units);
        for (unit, permit) in units.into_iter().zip(permits.drain(..)) {
            crate::metrics::unit_claimed(&unit.kind);
            shared.inflight.insert(unit.id, unit.attempt);
            let shared = shared.clone();
            // Boxed: the unit's future is several KB (handler, failure path, completion), and
            // tokio moves a task's future by value into its cell and again when it finishes;
            // at tens of thousands of units per second those copies dominated the engine's CPU.
            tasks.spawn(Box::pin(async move {
                execute(&shared, unit).await;
                drop(permit);
            }));
        }
        drop(permits);
        if got < wanted {
            from = ClaimFrom::Start;
            if scanned_from != ClaimFrom::Start {
                // Nothing more after the position: look behind it before going idle.
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(cfg.poll_interval) => {}
            }
        }
    }
}

/// Claims at most `n` units: the caller holds exactly `n` free slots.
async fn claim(shared: &Shared, n: usize, from: ClaimFrom) -> Result<Vec<ClaimedWork>, StoreError> {
    let mut conn = shared.pool.acquire().await?;
    work_claim(
        &mut conn,
        &shared.worker_id,
        n as i64,
        shared.config.lease.as_millis() as i64,
        from,
    )
    .await
}

/// Runs one claimed unit and hands its result on.
async fn execute(shared: &Shared, unit: ClaimedWork) {
    let span = tracing::info_span!("work", work_id = unit.id, token = %unit.token, kind = %unit.kind, attempt = unit.attempt);
    async {
        let started = Instant::now();
        let lease_deadline = started + shared.config.lease;
        let token = match IdempotencyToken::parse(unit.token.clone()) {
            Ok(t) => t,
            Err(e) => {
                // The table's CHECK constraint makes this unreachable; park rather than panic.
                let err = AdapterError::permanent(format!("the unit's token is invalid: {e}"));
                return Box::pin(fail(shared, &unit, err, Vec::new())).await;
            }
        };
        let Some(handler) = shared.registry.get(&unit.kind).cloned() else {
            let err = AdapterError::permanent(format!(
                "no handler is registered for work kind {:?} in this engine (it knows: {}); \
                 deploy an engine that registers it, then retry the unit",
                unit.kind,
                shared.registry.kinds().join(", ")
            ))
            .with_code("unknown-kind");
            return Box::pin(fail(shared, &unit, err, Vec::new())).await;
        };
        let journal = Arc::new(journal::PgJournal::new(
            shared.pool.clone(),
            unit.id,
            unit.token.clone(),
        ));
        let mut ctx = WorkContext::new(
            unit.id,
            unit.kind.clone(),
            token.clone(),
            unit.attempt,
            started + shared.config.max_runtime,
            journal,
        );
        if let Some(resource) = unit.resource_id {
            ctx = ctx.with_resource(resource, unit.tenant.clone());
        }
        tracing::debug!(rescued = unit.rescued, "running");
        let run = AssertUnwindSafe(handler.handle(&ctx, &unit.spec)).catch_unwind();
        let result = match tokio::time::timeout(shared.config.max_runtime, run).await {
            Ok(Ok(r)) => r,
            Ok(Err(panic)) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(AdapterError::permanent(format!(
                    "the handler for {:?} panicked: {what}; this is a bug in that handler",
                    unit.kind
                ))
                .with_code("handler-panic"))
            }
            Err(_) => Err(AdapterError::transient(format!(
                "the attempt did not finish within {:?}",
                shared.config.max_runtime
            ))
            .with_code("timeout")),
        };
        let calls = ctx.calls();
        crate::metrics::unit_finished(&unit.kind, result.as_ref().map_or_else(|e| e.class.as_str(), |_| "ok"), started.elapsed());
        match result {
            Ok(outcome) => {
                let detail = json!({
                    "duration_ms": started.elapsed().as_millis() as u64,
                    "calls": calls,
                    "follow_ups": outcome.follow_ups.iter().map(|f| f.step.clone()).collect::<Vec<_>>(),
                });
                let finished = Finished {
                    id: unit.id,
                    attempt: unit.attempt,
                    token,
                    resource_id: unit.resource_id,
                    tenant: unit.tenant.clone(),
                    outcome,
                    detail,
                    lease_deadline,
                };
                // Crash tests stop here: the handler's side effects happened, the completion
                // did not commit.
                setpoint_adapter::failpoint::hit("worker.before-complete");
                if shared.completions.send(finished).await.is_err() {
                    tracing::warn!("completer gone; the unit will be rescued");
                }
            }
            // Boxed: the failure path is rare and its future large (see fetch_loop).
            Err(err) => Box::pin(fail(shared, &unit, err, calls)).await,
        }
    }
    .instrument(span)
    .await
}

/// Records a failed attempt: retry with backoff, or park (permanent, or attempts used up).
async fn fail(shared: &Shared, unit: &ClaimedWork, err: AdapterError, calls: Vec<String>) {
    let exhausted = unit.attempt >= unit.max_attempts;
    let (action, message) = match err.class {
        ErrorClass::Transient if !exhausted => {
            let delay = shared.config.backoff.delay(unit.attempt, err.retry_after);
            (
                FailureAction::Retry {
                    delay_ms: delay.as_millis() as i64,
                },
                err.message.clone(),
            )
        }
        ErrorClass::Transient => (
            FailureAction::Park,
            format!(
                "gave up after {} attempts; last error: {}",
                unit.attempt, err.message
            ),
        ),
        ErrorClass::Permanent => (FailureAction::Park, err.message.clone()),
    };
    crate::metrics::unit_failed(
        &unit.kind,
        err.class.as_str(),
        if matches!(action, FailureAction::Park) {
            "park"
        } else {
            "retry"
        },
    );
    match &action {
        FailureAction::Retry { delay_ms } => {
            tracing::warn!(error = %err, retry_in_ms = delay_ms, "attempt failed; will retry")
        }
        FailureAction::Park => tracing::error!(error = %err, "unit parked for an operator"),
    }
    let failure = Failure {
        id: unit.id,
        attempt: unit.attempt,
        class: err.class.as_str().to_owned(),
        message,
        detail: json!({ "code": err.code, "calls": calls }),
        action,
    };
    let mut delay = Duration::from_millis(50);
    let lease_deadline = Instant::now() + shared.config.lease;
    loop {
        match record_failure(shared, &failure).await {
            Ok(()) => break,
            Err(e) if Instant::now() < lease_deadline => {
                tracing::warn!(error = %e, "recording the failure failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not record the failure before the lease ran out; the unit will be rescued");
                break;
            }
        }
    }
    shared.inflight.remove(unit.id);
}

async fn record_failure(shared: &Shared, failure: &Failure) -> Result<(), StoreError> {
    let mut tx = shared.pool.begin().await?;
    let applied = work_fail_if_leased(&mut tx, &shared.worker_id, failure).await?;
    match applied {
        Some((Some(resource), _)) if matches!(failure.action, FailureAction::Park) => {
            instances_clear_active_work(&mut tx, &[resource]).await?;
            // Hook (workflows): the instance shows the failure and the operator's options.
            crate::workflows::conditions::record_parked(
                &mut tx,
                resource,
                failure.id,
                &failure.message,
            )
            .await?;
        }
        Some(_) => {}
        None => tracing::warn!("failure discarded: the lease was lost"),
    }
    tx.commit().await?;
    Ok(())
}
