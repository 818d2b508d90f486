//! Retention: every table that grows with traffic loses its old rows (DESIGN §9), by rules that
//! never take what the engine still needs. `docs/retention.md` gives the rules, the defaults
//! and measured sizes; the statements are in [`crate::store::retention`].
//!
//! | period (`[retention]`) | table          | pruned                                                        |
//! |------------------------|----------------|---------------------------------------------------------------|
//! | `work_history` (7d)    | `work_events`  | the whole history of a unit gone from `work`, once its newest event is older |
//! | `request_ids` (24h)    | `api_requests` | request ids older than the period: the replay window          |
//! | `journal` (30d)        | `side_effects` | journal rows of units gone from `work`, last changed before the period |
//! | `tombstones` (30d)     | `instances`    | instances deleted before the period with no unit left in `work` |
//!
//! # One engine at a time
//! A round runs on a connection of its own and first takes a session-level PostgreSQL advisory
//! lock with `pg_try_advisory_lock`, which never waits: an engine that finds it taken skips the
//! round, so engines never queue behind each other, and two never prune the same rows. The lock
//! lives exactly as long as the session: when the engine dies or its connection breaks,
//! PostgreSQL releases it at once, with no lease to expire, no clock to trust and no table to
//! write (a lease row would need all three, and a crashed holder would block pruning until its
//! lease ran out). The connection is closed at the end of every round, on success or error, so
//! the lock can never stay behind in a pooled connection. The price: a session lock needs a
//! direct connection, not a transaction-mode pooler (PgBouncer); the engine already needs one
//! for LISTEN.
//!
//! # Never competing with the queue
//! Each statement is its own short transaction over at most [`RetentionConfig::batch`] rows
//! read through an index, and the round sleeps between statements for [`RetentionConfig::pause`],
//! or for as long as the statement took if that was longer: a round keeps at most half of one
//! database backend busy, and row locks last one batch.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics;
use crate::store::retention::{
    PruneBatch, api_requests_prune, retention_lock_try, retention_now, retention_unlock,
    side_effects_prune, tombstones_prune, work_events_prune,
};
use crate::store::{self, StoreError};

/// Default of [`RetentionConfig::interval`]: one round an hour.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(3600);
/// Default of [`RetentionConfig::work_history`]: 7 days.
pub const DEFAULT_WORK_HISTORY: Duration = Duration::from_secs(7 * 86_400);
/// Default of [`RetentionConfig::request_ids`], the replay window: 24 hours.
pub const DEFAULT_REQUEST_IDS: Duration = Duration::from_secs(86_400);
/// Default of [`RetentionConfig::journal`]: 30 days.
pub const DEFAULT_JOURNAL: Duration = Duration::from_secs(30 * 86_400);
/// Default of [`RetentionConfig::tombstones`]: 30 days.
pub const DEFAULT_TOMBSTONES: Duration = Duration::from_secs(30 * 86_400);
/// Default of [`RetentionConfig::batch`].
pub const DEFAULT_BATCH: usize = 2000;
/// Default of [`RetentionConfig::pause`].
pub const DEFAULT_PAUSE: Duration = Duration::from_millis(100);

/// The first round comes this long after start at most (or after the interval, if shorter):
/// late enough to stay out of a start-up's way, early enough that engines restarted more often
/// than the interval still prune.
const FIRST_ROUND_AFTER: Duration = Duration::from_secs(60);
/// The shortest period allowed: a shorter replay window would forget a request id while its
/// client is still retrying it.
const MIN_PERIOD: Duration = Duration::from_secs(60);
/// The longest period allowed (about 100 years): longer is "off".
const MAX_PERIOD: Duration = Duration::from_secs(36_500 * 86_400);
/// The largest batch allowed: a larger one holds its row locks too long.
const MAX_BATCH: usize = 50_000;
/// The longest pause allowed between two statements.
const MAX_PAUSE: Duration = Duration::from_secs(600);

/// Why retention could not run.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The configuration is out of range.
    #[error("invalid retention configuration: {0}")]
    Config(String),
    /// A statement failed; the round stopped and the next round starts over.
    #[error("retention: {0}")]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for RetentionError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

/// What retention keeps, and how it prunes. A period of `None` keeps that table's rows for
/// ever; an `interval` of `None` turns the service off in this engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionConfig {
    /// How often this engine tries a round ([`DEFAULT_INTERVAL`]). Every engine tries; one at
    /// a time prunes.
    pub interval: Option<Duration>,
    /// How long the history of a finished unit is kept after its last event
    /// ([`DEFAULT_WORK_HISTORY`]).
    pub work_history: Option<Duration>,
    /// How long a request id is remembered: a request repeated within this window returns
    /// the first answer, after it is a new request ([`DEFAULT_REQUEST_IDS`]).
    pub request_ids: Option<Duration>,
    /// How long a journal row is kept after its last change once its unit has finished
    /// ([`DEFAULT_JOURNAL`]).
    pub journal: Option<Duration>,
    /// How long a deleted instance stays as a tombstone ([`DEFAULT_TOMBSTONES`]).
    pub tombstones: Option<Duration>,
    /// Most rows one statement reads, and so deletes (1 to 50,000; [`DEFAULT_BATCH`]).
    pub batch: usize,
    /// Shortest sleep between two statements of a round (at most 10 minutes;
    /// [`DEFAULT_PAUSE`]).
    pub pause: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            interval: Some(DEFAULT_INTERVAL),
            work_history: Some(DEFAULT_WORK_HISTORY),
            request_ids: Some(DEFAULT_REQUEST_IDS),
            journal: Some(DEFAULT_JOURNAL),
            tombstones: Some(DEFAULT_TOMBSTONES),
            batch: DEFAULT_BATCH,
            pause: DEFAULT_PAUSE,
        }
    }
}

impl RetentionConfig {
    /// Checks every value's range.
    ///
    /// # Errors
    /// [`RetentionError::Config`] naming the key and its range.
    pub fn validate(&self) -> Result<(), RetentionError> {
        let bad = |m: String| Err(RetentionError::Config(m));
        if self.interval.is_some_and(|i| i < Duration::from_secs(1)) {
            return bad("retention.interval must be at least 1s, or \"off\"".into());
        }
        for table in Table::ALL {
            if let Some(p) = self.period(table)
                && !(MIN_PERIOD..=MAX_PERIOD).contains(&p)
            {
                return bad(format!(
                    "retention.{} must be between 1m and 36500d, or \"off\"",
                    table.setting()
                ));
            }
        }
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return bad(format!("retention.batch must be between 1 and {MAX_BATCH}"));
        }
        if self.pause > MAX_PAUSE {
            return bad("retention.pause must be at most 10m".into());
        }
        Ok(())
    }

    /// The period of `table`; `None` when its rows are kept for ever.
    pub fn period(&self, table: Table) -> Option<Duration> {
        match table {
            Table::WorkEvents => self.work_history,
            Table::ApiRequests => self.request_ids,
            Table::SideEffects => self.journal,
            Table::Tombstones => self.tombstones,
        }
    }
}

/// A table retention prunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// `work_events`: the history of finished units.
    WorkEvents,
    /// `api_requests`: request ids.
    ApiRequests,
    /// `side_effects`: the journal.
    SideEffects,
    /// `instances` with `deleted_at` set.
    Tombstones,
}

impl Table {
    /// Every table, in the order a round prunes them.
    pub const ALL: [Table; 4] = [
        Table::WorkEvents,
        Table::SideEffects,
        Table::Tombstones,
        Table::ApiRequests,
    ];

    /// The table's name in the database (and in the `table` label of the metric).
    pub fn as_str(self) -> &'static str {
        match self {
            Table::WorkEvents => "work_events",
            Table::ApiRequests => "api_requests",
            Table::SideEffects => "side_effects",
            Table::Tombstones => "instances",
        }
    }

    /// The key of its period in `[retention]`.
    pub fn setting(self) -> &'static str {
        match self {
            Table::WorkEvents => "work_history",
            Table::ApiRequests => "request_ids",
            Table::SideEffects => "journal",
            Table::Tombstones => "tombstones",
        }
    }
}

/// What a round did to one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableReport {
    /// The table.
    pub table: Table,
    /// Rows deleted.
    pub pruned: u64,
    /// Rows read.
    pub scanned: u64,
    /// Statements run (one transaction each).
    pub statements: u64,
    /// The most rows one statement deleted.
    pub largest_statement: u64,
    /// Time spent in its statements (pauses excluded).
    pub busy: Duration,
}

/// What one round did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundReport {
    /// False when another engine held the lock: this round did nothing.
    pub ran: bool,
    /// Per table, in the order pruned; tables whose period is off are absent.
    pub tables: Vec<TableReport>,
    /// True when shutdown stopped the round before it was done.
    pub interrupted: bool,
    /// Wall time of the round, pauses included.
    pub took: Duration,
    /// Time spent in statements.
    pub busy: Duration,
}

impl RoundReport {
    /// Rows deleted from `table` in this round.
    pub fn pruned(&self, table: Table) -> u64 {
        self.tables
            .iter()
            .filter(|t| t.table == table)
            .map(|t| t.pruned)
            .sum()
    }
}

/// Where a table's walk stands: the key of the last row read.
#[derive(Debug, Clone)]
enum Cursor {
    Unit(i64),
    Request(String, String),
    Key(String),
    Instance(Uuid),
}

impl Cursor {
    /// Before the first row of `table`'s walk (no real key is this small).
    fn start(table: Table) -> Self {
        match table {
            Table::WorkEvents => Cursor::Unit(0),
            Table::ApiRequests => Cursor::Request(String::new(), String::new()),
            Table::SideEffects => Cursor::Key(String::new()),
            Table::Tombstones => Cursor::Instance(Uuid::nil()),
        }
    }
}

/// One statement's counts and the cursor after it (`None`: the walk is over).
struct Step {
    scanned: u64,
    pruned: u64,
    next: Option<Cursor>,
}

impl Step {
    fn from<K>(b: PruneBatch<K>, batch: u64, wrap: impl FnOnce(K) -> Cursor) -> Self {
        // A short batch read the table's end; a batch that reached recent units has nothing
        // after it to prune.
        let more = b.scanned >= batch && !b.reached_recent;
        Step {
            scanned: b.scanned,
            pruned: b.pruned,
            next: if more { b.last.map(wrap) } else { None },
        }
    }
}

/// The retention service of one engine.
#[derive(Debug, Clone)]
pub struct Retention {
    pool: PgPool,
    config: RetentionConfig,
}

impl Retention {
    /// A service pruning the database of `pool` as `config` says.
    ///
    /// # Errors
    /// [`RetentionError::Config`] when `config` is out of range.
    pub fn new(pool: PgPool, config: RetentionConfig) -> Result<Self, RetentionError> {
        config.validate()?;
        Ok(Self { pool, config })
    }

    /// Spawns [`Retention::run`] until `shutdown`; `None` (nothing spawned) when the interval
    /// is off or every period is.
    pub fn spawn(self, shutdown: &CancellationToken) -> Option<JoinHandle<()>> {
        let any = Table::ALL.iter().any(|t| self.config.period(*t).is_some());
        if self.config.interval.is_none() || !any {
            tracing::info!("retention off: rows are kept for ever ([retention])");
            return None;
        }
        Some(tokio::spawn(self.run(shutdown.clone())))
    }

    /// Runs a round shortly after start, then every interval, until `shutdown`; a round in
    /// progress stops at its next pause. A failed round is logged and counted
    /// (`setpoint_retention_rounds_total{result="failed"}`), and the next one starts over.
    pub async fn run(self, shutdown: CancellationToken) {
        let Some(interval) = self.config.interval else {
            return;
        };
        tracing::info!(
            interval = ?interval,
            work_history = ?self.config.work_history,
            request_ids = ?self.config.request_ids,
            journal = ?self.config.journal,
            tombstones = ?self.config.tombstones,
            "retention started"
        );
        let mut wait = interval.min(FIRST_ROUND_AFTER);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = interval;
            if let Err(e) = self.round(&shutdown).await {
                tracing::warn!(error = %e, "retention round failed; the next round starts over");
            }
        }
    }

    /// Runs one round now, to the end: takes the lock (or returns at once with
    /// [`RoundReport::ran`] false when another engine holds it), prunes every table whose
    /// period is set, and logs one line.
    ///
    /// # Errors
    /// Database errors; rows deleted before the error stay deleted (and counted in the
    /// metric).
    pub async fn run_once(&self) -> Result<RoundReport, RetentionError> {
        self.round(&CancellationToken::new()).await
    }

    async fn round(&self, stop: &CancellationToken) -> Result<RoundReport, RetentionError> {
        let started = Instant::now();
        // A connection of its own, closed at the end: the lock belongs to its session.
        let result = match store::connect_dedicated(&self.pool).await {
            Ok(mut conn) => {
                let result = self.locked_round(&mut conn, stop, started).await;
                // Closing ends the session and with it the lock, also after an error.
                let _ = conn.close().await;
                result
            }
            Err(e) => Err(e.into()),
        };
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                metrics::retention_round("failed", started.elapsed());
                return Err(e);
            }
        };
        let result = if report.ran { "done" } else { "skipped" };
        metrics::retention_round(result, report.took);
        if report.ran {
            tracing::info!(
                work_events = report.pruned(Table::WorkEvents),
                api_requests = report.pruned(Table::ApiRequests),
                side_effects = report.pruned(Table::SideEffects),
                tombstones = report.pruned(Table::Tombstones),
                statements = report.tables.iter().map(|t| t.statements).sum::<u64>(),
                took_ms = report.took.as_millis() as u64,
                busy_ms = report.busy.as_millis() as u64,
                interrupted = report.interrupted,
                "retention round: rows pruned"
            );
        } else {
            tracing::info!("retention round skipped: another engine is pruning");
        }
        Ok(report)
    }

    async fn locked_round(
        &self,
        conn: &mut PgConnection,
        stop: &CancellationToken,
        started: Instant,
    ) -> Result<RoundReport, RetentionError> {
        let mut report = RoundReport {
            ran: false,
            tables: Vec::new(),
            interrupted: false,
            took: Duration::ZERO,
            busy: Duration::ZERO,
        };
        if !retention_lock_try(conn).await? {
            report.took = started.elapsed();
            return Ok(report);
        }
        report.ran = true;
        let now = retention_now(conn).await?;
        for table in Table::ALL {
            let Some(period) = self.config.period(table) else {
                continue;
            };
            let period = chrono::TimeDelta::from_std(period)
                .map_err(|_| RetentionError::Config(format!("{} is too long", table.setting())))?;
            let done = self.prune_table(conn, table, now - period, stop).await?;
            report.busy += done.busy;
            report.tables.push(done);
            if stop.is_cancelled() {
                report.interrupted = true;
                break;
            }
        }
        retention_unlock(conn).await?;
        report.took = started.elapsed();
        Ok(report)
    }

    /// Walks `table` once, a batch per statement, pausing between statements.
    async fn prune_table(
        &self,
        conn: &mut PgConnection,
        table: Table,
        before: chrono::DateTime<chrono::Utc>,
        stop: &CancellationToken,
    ) -> Result<TableReport, RetentionError> {
        let mut done = TableReport {
            table,
            pruned: 0,
            scanned: 0,
            statements: 0,
            largest_statement: 0,
            busy: Duration::ZERO,
        };
        let mut cursor = Cursor::start(table);
        loop {
            let t0 = Instant::now();
            let step = self.step(conn, &cursor, before).await?;
            let took = t0.elapsed();
            done.busy += took;
            done.statements += 1;
            done.scanned += step.scanned;
            done.pruned += step.pruned;
            done.largest_statement = done.largest_statement.max(step.pruned);
            metrics::retention_pruned(table.as_str(), step.pruned);
            let Some(next) = step.next else {
                return Ok(done);
            };
            cursor = next;
            tokio::select! {
                _ = stop.cancelled() => return Ok(done),
                _ = tokio::time::sleep(self.config.pause.max(took)) => {}
            }
        }
    }

    /// One prune statement of `cursor`'s table.
    async fn step(
        &self,
        conn: &mut PgConnection,
        cursor: &Cursor,
        before: chrono::DateTime<chrono::Utc>,
    ) -> Result<Step, StoreError> {
        let batch = self.config.batch as u64;
        let limit = self.config.batch as i64;
        Ok(match cursor {
            Cursor::Unit(after) => Step::from(
                work_events_prune(conn, *after, before, limit).await?,
                batch,
                Cursor::Unit,
            ),
            Cursor::Request(tenant, id) => Step::from(
                api_requests_prune(conn, (tenant, id), before, limit).await?,
                batch,
                |(t, r)| Cursor::Request(t, r),
            ),
            Cursor::Key(after) => Step::from(
                side_effects_prune(conn, after, before, limit).await?,
                batch,
                Cursor::Key,
            ),
            Cursor::Instance(after) => Step::from(
                tombstones_prune(conn, *after, before, limit).await?,
                batch,
                Cursor::Instance,
            ),
        })
    }
}
