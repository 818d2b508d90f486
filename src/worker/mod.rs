//! The worker runtime: claims due units, runs each with the handler registered for its kind,
//! and records the result — fenced, so a worker that lost its lease changes nothing.
//!
//! # Layout
//! - [`registry`]: kind → handler.
//! - `listener`: LISTEN/NOTIFY wake-ups; the fetch loop also polls.
//! - `completer`: batched, fenced completion of successful units.
//! - `heartbeat`: lease renewal of running attempts, and the fences that follow it.
//! - `inflight`: the attempts this process holds, keyed by (unit, attempt).
//! - [`hooks`]: what a unit's life cycle does to its resource (the domain registers them).
//! - [`backoff`]: retry delays.
//! - [`journal`]: the durable at-most-once journal handed to adapters.
//! - [`builtin`]: the kinds every engine knows (`setpoint.noop`, `setpoint.probe`).

pub mod backoff;
pub mod builtin;
mod completer;
mod heartbeat;
pub mod hooks;
mod inflight;
pub mod journal;
mod listener;
pub mod registry;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::json;
use setpoint_adapter::{
    AdapterError, Budgets, CODE_LEASE_LOST, ErrorClass, Fence, IdempotencyToken, Slot, Unlimited,
    WorkContext,
};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use backoff::Backoff;
pub use hooks::{Hooks, NoHooks, UnitHooks};
pub use registry::Registry;

use crate::store::StoreError;
use crate::store::work::{
    ClaimFrom, ClaimedWork, Failure, FailureAction, FailureApplied as StoreFailure, work_abandon,
    work_claim, work_fail_if_leased,
};
use completer::Finished;
use hooks::UnitEvent;
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
    /// before another worker takes them over. An attempt stops acting once a fifth of its
    /// lease is all that is left since the last renewal that succeeded (see
    /// [`WorkerConfig::hold`]), so it stops before another worker may start.
    pub lease: Duration,
    /// How often running units' leases are renewed (at most half the lease; a third by
    /// default, so that a failed renewal is retried before the attempt must stop).
    pub heartbeat_interval: Duration,
    /// How often to look for due units when no notification arrives (retries that became due,
    /// expired leases, lost notifications).
    pub poll_interval: Duration,
    /// On shutdown, how long running units may take to finish, their results included: the
    /// runtime returns within it. Units still running then are abandoned (their leases
    /// released, so any engine takes them over at once).
    pub shutdown_grace: Duration,
    /// The longest one attempt may run; past it the attempt fails as transient.
    pub max_runtime: Duration,
    /// Retry delays after transient failures.
    pub backoff: Backoff,
    /// This worker's name in leases and events (default: host-pid-random).
    pub worker_id: Option<String>,
    /// Which of the registered kinds this process claims, as glob patterns (`kvx.*`,
    /// `dns.zone.*`; `*` for all, the default). Units of other kinds wait for an engine that
    /// serves them; they are never claimed, so never parked, here.
    pub kinds: Vec<String>,
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
            kinds: vec!["*".to_owned()],
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
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval > self.lease / 2 {
            return Err(WorkerError::Config(format!(
                "heartbeat_interval ({:?}) must be positive and at most half the lease ({:?}): \
                 an attempt stops acting when its lease is not renewed within {:?}",
                self.heartbeat_interval,
                self.lease,
                self.hold()
            )));
        }
        if self.poll_interval.is_zero() {
            return Err(WorkerError::Config("poll_interval must be positive".into()));
        }
        kind_patterns(&self.kinds)?;
        Ok(())
    }

    /// The registered `kinds` this configuration serves, sorted.
    ///
    /// # Errors
    /// When a pattern of [`WorkerConfig::kinds`] is not a valid glob.
    pub fn served<'a>(
        &self,
        kinds: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<String>, WorkerError> {
        let set = kind_patterns(&self.kinds)?;
        let mut served: Vec<String> = kinds
            .into_iter()
            .filter(|k| set.is_match(k))
            .map(str::to_owned)
            .collect();
        served.sort();
        served.dedup();
        Ok(served)
    }

    /// How long an attempt may act after the statement that last set its lease was sent: the
    /// lease minus a fifth, a margin for the statement's latency and for clocks that do not
    /// run at exactly the same rate.
    pub fn hold(&self) -> Duration {
        self.lease - self.lease / 5
    }
}

/// The glob set of `patterns` (`*` matches dots too: a kind is one name, not a path).
fn kind_patterns(patterns: &[String]) -> Result<globset::GlobSet, WorkerError> {
    let mut set = globset::GlobSetBuilder::new();
    for p in patterns {
        let glob = globset::GlobBuilder::new(p)
            .literal_separator(false)
            .build()
            .map_err(|e| WorkerError::Config(format!("kinds pattern {p:?} is not a glob: {e}")))?;
        set.add(glob);
    }
    set.build()
        .map_err(|e| WorkerError::Config(format!("kinds patterns: {e}")))
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
    control: PgPool,
    registry: Arc<Registry>,
    hooks: Hooks,
    budgets: Arc<dyn Budgets>,
    config: WorkerConfig,
    worker_id: String,
    served: Vec<String>,
    wake: Arc<Notify>,
}

/// Everything an executing unit needs, shared by all units of the runtime.
struct Shared {
    pool: PgPool,
    registry: Arc<Registry>,
    served: Vec<String>,
    hooks: Hooks,
    budgets: Arc<dyn Budgets>,
    config: WorkerConfig,
    worker_id: String,
    inflight: InFlight,
    completions: mpsc::Sender<Finished>,
    /// Wakes the fetch loop: a unit that waits for budget wakes it when it is due again,
    /// so it is claimed at its slot rather than at the next poll.
    wake: Arc<Notify>,
}

impl Runtime {
    /// A runtime over `pool` running the kinds in `registry`. Claims and failures use `pool`;
    /// lease renewals and completions use a few connections of the runtime's own with the same
    /// settings, so that nothing else on `pool` (an API, a flood of requests) can delay a
    /// renewal past a lease.
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
        let served = config.served(registry.kinds())?;
        // A renewal that waits longer than its interval for a connection or an answer is
        // pointless: the next round sends a fresh one.
        let statement_ms = config
            .heartbeat_interval
            .max(Duration::from_secs(5))
            .as_millis();
        let options = (*pool.connect_options())
            .clone()
            .options([("statement_timeout", format!("{statement_ms}ms"))]);
        let control = PgPoolOptions::new()
            .max_connections(3)
            .acquire_timeout(config.heartbeat_interval.max(Duration::from_millis(200)))
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            control,
            registry: Arc::new(registry),
            hooks: Arc::new(NoHooks),
            budgets: Arc::new(Unlimited),
            config,
            worker_id,
            served,
            wake: Arc::new(Notify::new()),
        })
    }

    /// Sets what the units' life cycle does to their resources (default: nothing).
    pub fn with_hooks(mut self, hooks: Hooks) -> Self {
        self.hooks = hooks;
        self
    }

    /// Wakes the fetch loop (it claims what is due at once) whenever `wake` is notified: for
    /// whatever makes units due outside this runtime, such as the budgets' admission rounds.
    pub fn with_wake(mut self, wake: Arc<Notify>) -> Self {
        self.wake = wake;
        self
    }

    /// Sets where handlers draw request budgets from (`WorkContext::budgets`; default:
    /// unlimited).
    pub fn with_budgets(mut self, budgets: Arc<dyn Budgets>) -> Self {
        self.budgets = budgets;
        self
    }

    /// This worker's name in leases and events.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The work kinds this runtime claims: the registered ones its configuration serves.
    pub fn served(&self) -> &[String] {
        &self.served
    }

    /// Runs until `shutdown` is cancelled, then stops claiming and returns within the shutdown
    /// grace: running units may finish and their results are committed; units still running
    /// near the end of the grace are abandoned (their attempts stop, their leases are
    /// released), so any engine takes them over at once.
    pub async fn run(self, shutdown: CancellationToken) {
        let cfg = self.config.clone();
        let wake = self.wake.clone();
        let inflight = InFlight::default();
        let background = CancellationToken::new();
        let (tx, rx) = mpsc::channel(cfg.completion_batch.max(cfg.concurrency) * 2);

        let listener = tokio::spawn(listener::run(
            self.pool.clone(),
            wake.clone(),
            background.clone(),
        ));
        let heartbeat = tokio::spawn(heartbeat::run(
            heartbeat::PgLeases {
                pool: self.control.clone(),
                worker: self.worker_id.clone(),
                lease: cfg.lease,
            },
            inflight.clone(),
            heartbeat::Timing {
                interval: cfg.heartbeat_interval,
                hold: cfg.hold(),
            },
            background.clone(),
        ));
        let watchdog = tokio::spawn(heartbeat::watchdog(
            inflight.clone(),
            (cfg.lease / 20).clamp(Duration::from_millis(50), Duration::from_secs(1)),
            background.clone(),
        ));
        let completer = tokio::spawn(completer::run(
            completer::PgCompletions {
                pool: self.control.clone(),
                worker: self.worker_id.clone(),
                hooks: self.hooks.clone(),
            },
            inflight.clone(),
            rx,
            cfg.completion_batch,
        ));
        let shared = Arc::new(Shared {
            pool: self.pool.clone(),
            registry: self.registry.clone(),
            served: self.served.clone(),
            hooks: self.hooks.clone(),
            budgets: self.budgets.clone(),
            config: cfg.clone(),
            worker_id: self.worker_id.clone(),
            inflight: inflight.clone(),
            completions: tx,
            wake: wake.clone(),
        });
        tracing::info!(worker = %self.worker_id, kinds = ?self.served, concurrency = cfg.concurrency, "worker started");

        let tasks = TaskTracker::new();
        fetch_loop(&shared, &wake, &tasks, &shutdown).await;

        // One deadline for everything that follows, so that the whole shutdown fits in the
        // grace (an orchestrator kills the process after it).
        let deadline = tokio::time::Instant::now() + cfg.shutdown_grace;
        let reserve = (cfg.shutdown_grace / 4).min(Duration::from_secs(5));
        tracing::info!(worker = %self.worker_id, running = inflight.len(), grace = ?cfg.shutdown_grace,
            "shutting down: no new claims, waiting for running units");
        tasks.close();
        if tokio::time::timeout_at(deadline - reserve, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = inflight.len(),
                "shutdown grace nearly over; abandoning the units still running (their leases \
                 are released, another engine takes them over)"
            );
            inflight.lose_all("the engine is shutting down");
            let _ = tokio::time::timeout_at(deadline - reserve / 2, tasks.wait()).await;
        }
        drop(shared);
        // The completer ends once every sender (the shared state and finished tasks) is gone.
        if tokio::time::timeout_at(deadline, completer).await.is_err() {
            tracing::warn!(
                "shutdown grace over before the last results were committed; those units will be redone"
            );
        }
        background.cancel();
        let _ = listener.await;
        let _ = heartbeat.await;
        let _ = watchdog.await;
        self.control.close().await;
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
        // A unit committed since the last claim (its NOTIFY arrived while this worker was
        // busy) may lie before the position: a user's change while drift checks are claimed,
        // or another tenant's single change beside one tenant's burst. Scanning from the
        // start at once lets the claim order (lanes, then tenants) hold within a round,
        // instead of within a poll interval.
        if last_full_scan.elapsed() >= cfg.poll_interval
            || futures::FutureExt::now_or_never(wake.notified()).is_some()
        {
            from = ClaimFrom::Start;
        }
        let scanned_from = from;
        if scanned_from == ClaimFrom::Start {
            last_full_scan = Instant::now();
        }
        // The time the claim is *sent*: the database's lease starts after it, so a fence
        // counted from here never outlives the lease.
        let sent_at = tokio::time::Instant::now();
        let units = match claim(shared, wanted, scanned_from).await {
            Ok(claimed) => {
                error_delay = Duration::from_millis(100);
                claimed
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
            let fence = Fence::until(sent_at + cfg.hold());
            shared
                .inflight
                .insert((unit.id, unit.attempt), fence.clone(), sent_at);
            let shared = shared.clone();
            // Boxed: the unit's future is several KB (handler, failure path, completion), and
            // tokio moves a task's future by value into its cell and again when it finishes;
            // at tens of thousands of units per second those copies dominated the engine's CPU.
            // The unit's slot, given back when its attempt ends, or earlier by a handler that
            // only waits for work done on its behalf (the items of a batch share one slot).
            let slot = Slot::holding(permit);
            tasks.spawn(Box::pin(async move {
                execute(&shared, unit, fence, slot.clone()).await;
                slot.release();
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

/// Claims at most `n` units: the caller holds exactly `n` free slots. Units that used all
/// their attempts without reporting back are parked by the same transaction, with their
/// resources' hooks.
async fn claim(shared: &Shared, n: usize, from: ClaimFrom) -> Result<Vec<ClaimedWork>, StoreError> {
    if shared.served.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = shared.pool.begin().await?;
    let claimed = work_claim(
        &mut tx,
        &shared.worker_id,
        &shared.served,
        n as i64,
        shared.config.lease.as_millis() as i64,
        from,
    )
    .await?;
    for (unit, reason) in &claimed.poisoned {
        tracing::error!(work_id = unit.id, token = %unit.token, kind = %unit.kind, attempt = unit.attempt,
            "unit parked: its last attempt never reported back and it has no attempt left");
        crate::metrics::unit_failed(&unit.kind, "transient", "park");
        if let Some(resource_id) = unit.resource_id {
            let event = UnitEvent {
                work_id: unit.id,
                kind: &unit.kind,
                resource_id,
                holds_resource: unit.holds_resource,
                reason,
                operator: None,
            };
            shared.hooks.parked(&mut tx, &event).await?;
        }
    }
    tx.commit().await?;
    Ok(claimed.units)
}

/// Runs one attempt of a claimed unit and hands its result on. The attempt stops as soon as its
/// fence is lost (its lease was not renewed in time, or it was taken over): its handler is
/// dropped at its next await point, and no result of it is recorded.
async fn execute(shared: &Shared, unit: ClaimedWork, fence: Fence, slot: Slot) {
    let span = tracing::info_span!("work", work_id = unit.id, token = %unit.token, kind = %unit.kind, attempt = unit.attempt);
    async {
        let started = Instant::now();
        let token = match IdempotencyToken::parse(unit.token.clone()) {
            Ok(t) => t,
            Err(e) => {
                // The table's CHECK constraint makes this unreachable; park rather than panic.
                let err = AdapterError::permanent(format!("the unit's token is invalid: {e}"));
                return Box::pin(fail(shared, &unit, &fence, err, Vec::new())).await;
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
            return Box::pin(fail(shared, &unit, &fence, err, Vec::new())).await;
        };
        let journal = Arc::new(journal::PgJournal::new(
            shared.pool.clone(),
            unit.id,
            unit.attempt,
            shared.worker_id.clone(),
            unit.token.clone(),
        ));
        let mut ctx = WorkContext::new(
            unit.id,
            unit.kind.clone(),
            token.clone(),
            unit.attempt,
            started + shared.config.max_runtime,
            journal,
        )
        .with_fence(fence.clone())
        .with_budgets(shared.budgets.clone())
        .with_slot(slot);
        if let Some(resource) = unit.resource_id {
            ctx = ctx.with_resource(resource, unit.tenant.clone());
        }
        tracing::debug!(rescued = unit.rescued, "running");
        let run = AssertUnwindSafe(crate::budgets::as_unit(unit.id, handler.handle(&ctx, &unit.spec)))
            .catch_unwind();
        let result = tokio::select! {
            biased;
            _ = fence.lost() => None,
            r = tokio::time::timeout(shared.config.max_runtime, run) => Some(match r {
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
            }),
        };
        let calls = ctx.calls();
        let result = match result {
            // Lost while running, or the handler saw the loss first (a failed fence check).
            // Boxed like the failure path: rare, and its future is large.
            None => return Box::pin(abandon(shared, &unit, &fence, &calls)).await,
            Some(Err(e)) if e.code.as_deref() == Some(CODE_LEASE_LOST) => {
                return Box::pin(abandon(shared, &unit, &fence, &calls)).await;
            }
            Some(r) => r,
        };
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
                    kind: unit.kind.clone(),
                    spec: unit.spec.clone(),
                    token,
                    resource_id: unit.resource_id,
                    tenant: unit.tenant.clone(),
                    lane: unit.lane,
                    holds_resource: unit.holds_resource,
                    outcome,
                    detail,
                    fence,
                };
                // Crash tests stop here: the handler's side effects happened, the completion
                // did not commit.
                setpoint_adapter::failpoint::hit("worker.before-complete");
                if setpoint_adapter::failpoint::any_armed() {
                    // The same point for one kind of unit: `worker.before-complete:dns.zone.create.zone`.
                    setpoint_adapter::failpoint::hit(&format!("worker.before-complete:{}", unit.kind));
                }
                if shared.completions.send(finished).await.is_err() {
                    tracing::warn!("completer gone; the unit will be rescued");
                }
            }
            // Boxed: the failure path is rare and its future large (see fetch_loop).
            Err(err) => Box::pin(fail(shared, &unit, &fence, err, calls)).await,
        }
    }
    .instrument(span)
    .await
}

/// Ends an attempt that lost its unit: records that it stopped (the event lists the adapter
/// calls it made) and releases the lease if the attempt still holds it, so that another
/// attempt may start at once.
async fn abandon(shared: &Shared, unit: &ClaimedWork, fence: &Fence, calls: &[String]) {
    let why = fence
        .lost_because()
        .unwrap_or("the lease was not renewed in time");
    tracing::warn!(%why, calls = ?calls, "attempt abandoned: it lost its unit; another attempt redoes it");
    crate::metrics::unit_abandoned(&unit.kind);
    let message = format!("attempt stopped: {why}");
    let done = async {
        let mut conn = shared.pool.acquire().await?;
        work_abandon(
            &mut conn,
            &shared.worker_id,
            unit.id,
            unit.attempt,
            &unit.token,
            &message,
        )
        .await
    };
    if let Err(e) = done.await {
        tracing::warn!(error = %e, "could not record the abandoned attempt; its lease runs out by itself");
    }
    shared.inflight.remove((unit.id, unit.attempt));
}

/// Records a failed attempt: retry with backoff, wait without counting the attempt, or park
/// (permanent, or attempts used up).
async fn fail(
    shared: &Shared,
    unit: &ClaimedWork,
    fence: &Fence,
    err: AdapterError,
    calls: Vec<String>,
) {
    let exhausted = unit.attempt >= unit.max_attempts;
    let (action, message) = match err.class {
        // A throttled call is not a failure either: the peer asked for less, the unit waits
        // (its budget, when it has one, already chose when) and never parks for it.
        ErrorClass::Transient if err.waiting || err.throttled => {
            let delay = err
                .retry_after
                .unwrap_or_else(|| shared.config.backoff.delay(unit.attempt, None));
            (
                FailureAction::Wait {
                    delay_ms: delay.as_millis() as i64,
                },
                err.message.clone(),
            )
        }
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
    let action_name = match action {
        FailureAction::Retry { .. } => "retry",
        FailureAction::Wait { .. } => "wait",
        FailureAction::Park => "park",
    };
    crate::metrics::unit_failed(&unit.kind, err.class.as_str(), action_name);
    match &action {
        FailureAction::Retry { delay_ms } => {
            tracing::warn!(error = %err, retry_in_ms = delay_ms, "attempt failed; will retry")
        }
        FailureAction::Wait { delay_ms } => {
            tracing::info!(reason = %err.message, retry_in_ms = delay_ms, "unit waits; the attempt does not count")
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
    // Recording is worth retrying while the attempt holds the unit; after that the record
    // would be fenced off anyway, and another attempt redoes the unit.
    loop {
        match record_failure(shared, &unit.kind, &failure).await {
            Ok(()) => {
                if let FailureAction::Wait { delay_ms } = failure.action {
                    // Claimed at its slot, not at the next poll: a budget hands out slots
                    // a fraction of a second apart.
                    let wake = shared.wake.clone();
                    let due = Duration::from_millis(u64::try_from(delay_ms).unwrap_or(0));
                    if due < shared.config.poll_interval * 10 {
                        tokio::spawn(async move {
                            tokio::time::sleep(due).await;
                            wake.notify_one();
                        });
                    }
                }
                break;
            }
            Err(e) if fence.is_held() => {
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
    shared.inflight.remove((unit.id, unit.attempt));
}

async fn record_failure(shared: &Shared, kind: &str, failure: &Failure) -> Result<(), StoreError> {
    let mut tx = shared.pool.begin().await?;
    let applied = work_fail_if_leased(&mut tx, &shared.worker_id, failure).await?;
    match applied {
        Some(StoreFailure {
            resource_id: Some(resource_id),
            holds_resource,
            ..
        }) if matches!(failure.action, FailureAction::Park) => {
            let event = UnitEvent {
                work_id: failure.id,
                kind,
                resource_id,
                holds_resource,
                reason: &failure.message,
                operator: None,
            };
            shared.hooks.parked(&mut tx, &event).await?;
        }
        Some(_) => {}
        None => tracing::warn!("failure discarded: the lease was lost"),
    }
    tx.commit().await?;
    Ok(())
}
