//! The engine's request budgets: the SDK's [`Budgets`] on the `request_budgets` table, shared
//! by every engine on the database (docs/budgets.md).
//!
//! Each engine takes tokens in small batches into a local reserve per key (at most a tenth of
//! the burst, at least one), so a busy key costs a few row updates per second per engine, not
//! one per call; a reserve not spent within [`RESERVE_TTL`] is given back with the key's next
//! statement, or by the next admission round if the engine stops calling the key. A take that
//! finds no token returns a *waiting* error (the unit gives its attempt back and leaves its
//! worker slot and lease, see [`AdapterError::waiting`]) and
//! promises the unit the next token not yet promised: the unit finds it when it comes back, on
//! any engine, whoever took meanwhile (a unit is known by the task-local [`as_unit`] the
//! worker sets). A unit at the first call of its attempt is promised a token only while the
//! line of promises is at most [`FRESH_LINE`] long and nobody is in the key's *line of units*;
//! otherwise it joins that line and sleeps (no re-asking: it is due again only after
//! [`LINE_RECHECK`]). Every engine runs admission rounds ([`PgBudgets::run_admissions`]) that
//! let the head of each line in — a promise each, and their work made due at its slot — as
//! the line of promises shortens. So a unit in the middle of a step always finds a line it can
//! wait out in place, and a backlog waits in the database, not in claims. A throttle
//! report lowers the shared rate (multiplicative decrease, at most once a second per key, and
//! only for a call sent after the last decrease), moves the promises still to come to the
//! lowered rate, and throws away this engine's reserve of the key; the rate recovers
//! additively with the takes that follow, faster the longer no throttle was heard.
//!
//! A unit waits *in place* (sleeps, keeping its worker slot and lease, then takes its
//! promised token) in two cases only: when the wait is at most [`IN_PLACE_ALWAYS`], and when
//! the attempt was granted a token before (it is in the middle of a step that makes several
//! calls) and the wait is at most [`IN_PLACE_AFTER_PROGRESS`]. Every other wait — the first
//! call of an attempt, which is what a backlog of units waits on — leaves the worker.
//!
//! A database failure during a take grants nothing and asks the unit to wait
//! [`DB_RETRY`]: a budget that cannot be read is not a reason to flood the peer, nor to
//! fail an attempt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use setpoint_adapter::{AdapterError, BoxFuture, BudgetKey, Budgets, CODE_BUDGET_WAIT, Limit};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::StoreError;
use crate::store::budgets::{
    Aimd, budget_admit, budget_claim_reservation, budget_ensure, budget_give_back,
    budget_line_join, budget_lined_keys, budget_reserve, budget_take, budget_throttle,
};

/// How long a batch of tokens may sit in an engine's reserve before it is given back.
pub const RESERVE_TTL: Duration = Duration::from_secs(1);

/// How long a unit waits when the budget table could not be read.
pub const DB_RETRY: Duration = Duration::from_secs(1);

/// A wait this short is spent in place: leaving and coming back costs more.
pub const IN_PLACE_ALWAYS: Duration = Duration::from_millis(100);

/// A unit that was granted a token in this attempt already (it is in the middle of a step
/// that makes several calls) waits this long for its next token in place, holding its slot
/// and lease: leaving would throw away the calls it made, and the next attempt would need as
/// many tokens again before reaching this point, which under load it never gets.
pub const IN_PLACE_AFTER_PROGRESS: Duration = Duration::from_secs(30);

/// A unit at the first call of its attempt is promised a token only while the line of
/// promises is at most this long; otherwise it joins the key's line of units, and admission
/// rounds let it in when the line of promises is this short again. A longer line would make
/// the units in the middle of a step wait longer than [`IN_PLACE_AFTER_PROGRESS`]: they would
/// leave, and their next attempt would start the step again from its first call, at the back
/// of the line, and never reach its end. It is short because every unit let in holds a worker
/// slot while it waits in place between its calls: the units in flight are about the rate
/// times this line.
pub const FRESH_LINE: Duration = Duration::from_secs(1);

/// A unit in the line of units is due again after this long even if no admission round let it
/// in (no engine ran one: they all stopped); it then finds its place kept.
pub const LINE_RECHECK: Duration = Duration::from_secs(60);

/// How often each engine runs an admission round over the keys that have a line.
pub const ADMIT_EVERY: Duration = Duration::from_millis(200);

/// At most this many units let in per key and round.
const ADMIT_MAX: i64 = 500;

/// The shortest wait handed out (a slot due now is still a round trip away).
const MIN_WAIT: Duration = Duration::from_millis(20);

/// This engine's share of one key.
#[derive(Debug, Default)]
struct Local {
    /// Tokens taken from the row and not spent yet.
    reserve: f64,
    /// When they were taken.
    taken_at: Option<Instant>,
    /// Whether this engine made sure the row exists.
    ensured: bool,
}

/// The engine's [`Budgets`]: token buckets in PostgreSQL. Cheap to clone.
#[derive(Clone)]
pub struct PgBudgets {
    pool: PgPool,
    aimd: Aimd,
    keys: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<Local>>>>>,
    /// The keys that had a line at the last admission round (their gauge goes to 0 after).
    lined: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for PgBudgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBudgets")
            .field("aimd", &self.aimd)
            .finish_non_exhaustive()
    }
}

impl PgBudgets {
    /// Budgets on `pool`'s `request_budgets` table, with the default AIMD settings.
    pub fn new(pool: PgPool) -> Self {
        Self::with_aimd(pool, Aimd::default())
    }

    /// Budgets with these AIMD settings.
    pub fn with_aimd(pool: PgPool, aimd: Aimd) -> Self {
        Self {
            pool,
            aimd,
            keys: Arc::default(),
            lined: Arc::default(),
        }
    }

    /// How many tokens one statement takes for a key with `limit`: a tenth of the burst, at
    /// least one.
    pub fn batch(limit: Limit) -> f64 {
        (limit.burst / 10.0).floor().max(1.0)
    }

    fn local(&self, key: &str) -> Arc<tokio::sync::Mutex<Local>> {
        let mut keys = match self.keys.lock() {
            Ok(k) => k,
            Err(poisoned) => poisoned.into_inner(),
        };
        keys.entry(key.to_owned()).or_default().clone()
    }

    /// A take, waiting in place where that costs less than leaving (see the module docs).
    async fn take_inner(&self, key: &BudgetKey, limit: Limit) -> Result<(), AdapterError> {
        loop {
            match self.take_once(key, limit).await {
                Ok(()) => {
                    set_took();
                    return Ok(());
                }
                Err(e) => {
                    let wait = e.retry_after.unwrap_or(DB_RETRY);
                    let in_place = wait <= IN_PLACE_ALWAYS
                        || (progressed() && wait <= IN_PLACE_AFTER_PROGRESS);
                    if !in_place || e.code.as_deref() != Some(CODE_BUDGET_WAIT) {
                        return Err(e);
                    }
                    crate::metrics::budget_wait_in_place(&key.to_string());
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn take_once(&self, key: &BudgetKey, limit: Limit) -> Result<(), AdapterError> {
        let name = key.to_string();
        let unit = current_unit();
        let local = self.local(&name);
        // One statement per key at a time in this engine: the others wait for its batch.
        let mut local = local.lock().await;
        let fresh = local.taken_at.is_some_and(|t| t.elapsed() < RESERVE_TTL);
        if local.reserve >= 1.0 && fresh {
            local.reserve -= 1.0;
            crate::metrics::budget_take(&name, "reserve");
            return Ok(());
        }
        let give_back = std::mem::take(&mut local.reserve).max(0.0);
        let want = Self::batch(limit);
        let within = if progressed() {
            f64::INFINITY
        } else {
            FRESH_LINE.as_secs_f64()
        };
        let taken = match self
            .take_row(&name, limit, want, give_back, unit, within, &mut local)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(budget = %name, error = %e, "the request budget could not be read; the unit waits");
                return Err(AdapterError::waiting(
                    format!("waiting for budget {name}: the budget table could not be read ({e})"),
                    DB_RETRY,
                )
                .with_code(CODE_BUDGET_WAIT));
            }
        };
        let wait_secs = match taken {
            Take::Promised => {
                crate::metrics::budget_take(&name, "promised");
                return Ok(());
            }
            Take::Lined(in_line) => {
                crate::metrics::budget_wait(&name);
                return Err(AdapterError::waiting(
                    format!(
                        "waiting for budget {name}: in the line of {in_line} units waiting to be \
                         let in; a token is promised as the line moves"
                    ),
                    LINE_RECHECK,
                )
                .with_code(CODE_BUDGET_WAIT));
            }
            Take::Early(secs) => secs,
            Take::Row(t) => {
                crate::metrics::budget_state(&name, t.rate, t.tokens, limit.rate);
                if t.granted >= 1.0 {
                    local.reserve = t.granted - 1.0;
                    local.taken_at = Some(Instant::now());
                    crate::metrics::budget_take(&name, "granted");
                    return Ok(());
                }
                // Not granted: promised (a unit in the middle of a step, or one at its first
                // call with a short line; the others joined the line above), or a take outside
                // a unit, which waits the same time without a promise.
                t.wait_secs
            }
        };
        crate::metrics::budget_wait(&name);
        let wait = Duration::from_secs_f64(wait_secs.max(0.0)).max(MIN_WAIT);
        Err(AdapterError::waiting(
            format!(
                "waiting for budget {name}: a token is promised in {} ms",
                wait.as_millis()
            ),
            wait,
        )
        .with_code(CODE_BUDGET_WAIT))
    }

    /// One transaction: the unit's promised token if it has one, else a take that, finding
    /// none, promises the unit the next one if it is at most `within` seconds away.
    #[allow(clippy::too_many_arguments)]
    async fn take_row(
        &self,
        name: &str,
        limit: Limit,
        want: f64,
        give_back: f64,
        unit: Option<i64>,
        within: f64,
        local: &mut Local,
    ) -> Result<Take, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !local.ensured {
            budget_ensure(&mut tx, name, limit.rate, limit.burst).await?;
            local.ensured = true;
        }
        if let Some(work_id) = unit {
            match budget_claim_reservation(&mut tx, name, work_id).await? {
                Some(secs) if secs <= 0.0 => {
                    tx.commit().await?;
                    return Ok(Take::Promised);
                }
                Some(secs) => {
                    tx.commit().await?;
                    return Ok(Take::Early(secs));
                }
                None => {}
            }
        }
        let taken = loop {
            let taken = budget_take(
                &mut tx,
                name,
                limit.rate,
                limit.burst,
                want,
                give_back,
                unit.map(|_| within),
                &self.aimd,
            )
            .await?;
            match taken {
                Some(t) => break t,
                // Removed by an operator since: make it again.
                None => budget_ensure(&mut tx, name, limit.rate, limit.burst).await?,
            }
        };
        if let Some(work_id) = unit {
            if taken.promised {
                budget_reserve(&mut tx, name, work_id, taken.wait_secs).await?;
            } else if taken.granted < 1.0 && within.is_finite() {
                // At its first call and the line is long: it gets in line and sleeps.
                let in_line = budget_line_join(&mut tx, name, work_id).await?;
                tx.commit().await?;
                return Ok(Take::Lined(in_line));
            }
        }
        tx.commit().await?;
        Ok(Take::Row(taken))
    }

    async fn throttled_inner(&self, key: &BudgetKey, limit: Limit) -> Duration {
        let name = key.to_string();
        let unit = current_unit();
        let sent_ago = last_take().map(|at| at.elapsed().as_secs_f64());
        crate::metrics::budget_throttle(&name);
        let local = self.local(&name);
        let mut local = local.lock().await;
        // This engine's reserve was taken at the rate that was too high.
        local.reserve = 0.0;
        let done = async {
            let mut conn = self.pool.acquire().await?;
            if !local.ensured {
                budget_ensure(&mut conn, &name, limit.rate, limit.burst).await?;
                local.ensured = true;
            }
            let t = budget_throttle(
                &mut conn,
                &name,
                limit.rate,
                limit.burst,
                sent_ago,
                &self.aimd,
            )
            .await?;
            drop(conn);
            if let Some(t) = &t
                && t.decreased
            {
                tracing::info!(budget = %name, work_id = ?unit, rate = t.rate, max_rate = limit.rate,
                    "the peer throttled: the shared rate is lowered and the promises moved to it");
            }
            // The throttled unit gets in line like any waiter in the middle of a step (promised
            // the next token, however long the line).
            self.take_row(&name, limit, 0.0, 0.0, unit, f64::INFINITY, &mut local)
                .await
        };
        match done.await {
            Ok(Take::Row(t)) => {
                crate::metrics::budget_state(&name, t.rate, t.tokens, limit.rate);
                Duration::from_secs_f64(t.wait_secs.max(0.0)).max(MIN_WAIT)
            }
            Ok(Take::Early(secs)) => Duration::from_secs_f64(secs).max(MIN_WAIT),
            Ok(Take::Promised) => MIN_WAIT,
            // Not reached: a throttled unit is promised a token however long the line.
            Ok(Take::Lined(_)) => LINE_RECHECK,
            Err(e) => {
                tracing::warn!(budget = %name, error = %e, "a throttle could not be recorded in the request budget");
                DB_RETRY
            }
        }
    }
}

impl PgBudgets {
    /// Runs admission rounds every [`ADMIT_EVERY`] until `shutdown`: for each key with a line
    /// of units, lets its head in while the line of promises is at most [`FRESH_LINE`] long,
    /// and wakes `wake` (the worker's fetch loop) at each slot handed out, so the units are
    /// claimed when their token is there. Every engine runs it; a key another engine is
    /// working on is passed over in that round. Each round also gives back this engine's
    /// reserves left idle longer than [`RESERVE_TTL`]. A failing round is logged and retried.
    pub async fn run_admissions(self, wake: Arc<Notify>, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(ADMIT_EVERY) => {}
            }
            if let Err(e) = self.give_back_idle().await {
                tracing::debug!(error = %e, "an idle budget reserve could not be given back; the next round retries");
            }
            match self.admit_round().await {
                Ok(slots) => {
                    failing = false;
                    wake_at(&wake, slots);
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "a budget admission round failed; the next one retries");
                }
                Err(_) => {}
            }
        }
    }

    /// Gives back every reserve of this engine not spent within [`RESERVE_TTL`] (a key busy
    /// in a take at this moment is left for its take to give back); returns how many keys
    /// got tokens back. So an engine that stops calling a key keeps none of its tokens.
    pub async fn give_back_idle(&self) -> Result<usize, StoreError> {
        let locals: Vec<(String, Arc<tokio::sync::Mutex<Local>>)> = {
            let keys = match self.keys.lock() {
                Ok(k) => k,
                Err(poisoned) => poisoned.into_inner(),
            };
            keys.iter().map(|(k, l)| (k.clone(), l.clone())).collect()
        };
        let mut given = 0;
        // One connection for the round, taken only once a reserve is to go back.
        let mut conn = None;
        for (key, local) in locals {
            let Ok(mut local) = local.try_lock() else {
                continue;
            };
            let idle = local.taken_at.is_none_or(|t| t.elapsed() >= RESERVE_TTL);
            if local.reserve <= 0.0 || !idle {
                continue;
            }
            let conn = match &mut conn {
                Some(c) => c,
                slot @ None => slot.insert(self.pool.acquire().await?),
            };
            let left = std::mem::take(&mut local.reserve);
            if let Err(e) = budget_give_back(conn, &key, left).await {
                local.reserve = left;
                return Err(e);
            }
            given += 1;
        }
        Ok(given)
    }

    /// One admission round over every key with a line; returns the slots handed out.
    async fn admit_round(&self) -> Result<Vec<Duration>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let keys = budget_lined_keys(&mut conn).await?;
        {
            let mut lined = match self.lined.lock() {
                Ok(l) => l,
                Err(poisoned) => poisoned.into_inner(),
            };
            for gone in lined
                .iter()
                .filter(|k| !keys.iter().any(|(key, _)| key == *k))
            {
                crate::metrics::budget_in_line(gone, 0);
            }
            *lined = keys.iter().map(|(key, _)| key.clone()).collect();
        }
        let mut slots = Vec::new();
        for (key, in_line) in keys {
            crate::metrics::budget_in_line(&key, in_line);
            let within = FRESH_LINE.as_secs_f64();
            let Some(admitted) =
                budget_admit(&mut conn, &key, within, ADMIT_MAX, &self.aimd).await?
            else {
                continue;
            };
            if !admitted.slots.is_empty() {
                tracing::debug!(budget = %key, let_in = admitted.slots.len(), in_line = admitted.left,
                    "units let in from the budget's line");
            }
            slots.extend(
                admitted
                    .slots
                    .iter()
                    .map(|s| Duration::from_secs_f64(s.max(0.0))),
            );
        }
        Ok(slots)
    }
}

/// Wakes `wake` at each of `slots` (those within 50 ms of each other once).
fn wake_at(wake: &Arc<Notify>, mut slots: Vec<Duration>) {
    if slots.is_empty() {
        return;
    }
    slots.sort();
    slots.dedup_by(|b, a| b.saturating_sub(*a) < Duration::from_millis(50));
    let wake = wake.clone();
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        for at in slots {
            tokio::time::sleep_until(start + at).await;
            wake.notify_one();
        }
    });
}

/// What [`PgBudgets::take_row`] found.
enum Take {
    /// The unit's promised token, now spent.
    Promised,
    /// The unit is in the key's line of units, this many long.
    Lined(i64),
    /// The unit's promised token is due in this many seconds.
    Early(f64),
    /// The row's answer (granted tokens, or a wait with a promise).
    Row(crate::store::budgets::Taken),
}

/// The unit whose handler runs in this task, as its budgets see it.
struct UnitBudget {
    work_id: i64,
    /// When this attempt was last granted a token (its latest call was sent then); `None`
    /// before its first token.
    last_take: std::cell::Cell<Option<Instant>>,
}

tokio::task_local! {
    /// The unit whose handler runs in this task (set by the worker), so that a wait promises
    /// the next token to that unit, on whichever engine it runs next.
    static UNIT: UnitBudget;
}

/// Runs `fut` (one attempt of a unit's handler) as unit `work_id` for the budgets it takes
/// from.
pub async fn as_unit<F: std::future::Future>(work_id: i64, fut: F) -> F::Output {
    let unit = UnitBudget {
        work_id,
        last_take: std::cell::Cell::new(None),
    };
    UNIT.scope(unit, fut).await
}

fn current_unit() -> Option<i64> {
    UNIT.try_with(|u| u.work_id).ok()
}

/// Whether this attempt was granted a token already (it made progress).
fn progressed() -> bool {
    last_take().is_some()
}

/// When this attempt was last granted a token: a throttle of its call says something about
/// the rate only if the call was sent after the last decrease.
fn last_take() -> Option<Instant> {
    UNIT.try_with(|u| u.last_take.get()).ok().flatten()
}

fn set_took() {
    let _ = UNIT.try_with(|u| u.last_take.set(Some(Instant::now())));
}

impl Budgets for PgBudgets {
    fn take<'a>(
        &'a self,
        key: &'a BudgetKey,
        limit: Limit,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(self.take_inner(key, limit))
    }

    fn throttled<'a>(&'a self, key: &'a BudgetKey, limit: Limit) -> BoxFuture<'a, Duration> {
        Box::pin(self.throttled_inner(key, limit))
    }
}
