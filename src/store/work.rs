//! SQL of the `work` table: enqueue, claim, heartbeat, fenced completion and failure, operator
//! retry and cancel. One function per statement (or per statement group run in one
//! transaction). Every state change writes its `work_events` row in the same statement.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use setpoint_adapter::IdempotencyToken;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::StoreError;

/// The NOTIFY channel that wakes idle workers when work is enqueued or made due.
pub const WORK_CHANNEL: &str = "setpoint_work";

/// The claim's lanes, taken in this order: a due unit of a lower lane is always claimed before
/// any unit of a higher one, so a user's change never waits behind drift checks or an import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    /// A user's change (and the chain it starts): the default.
    #[default]
    Change,
    /// A drift check and what it starts.
    Drift,
    /// Bulk work: a mass update or an import a client marked as bulk.
    Bulk,
}

impl Lane {
    /// The value stored in `work.lane`.
    pub fn db(self) -> i16 {
        match self {
            Lane::Change => 0,
            Lane::Drift => 1,
            Lane::Bulk => 2,
        }
    }

    /// The lane stored as `v`; an unknown value (a later release's lane) is bulk.
    pub fn from_db(v: i16) -> Lane {
        match v {
            0 => Lane::Change,
            1 => Lane::Drift,
            _ => Lane::Bulk,
        }
    }
}

/// How far apart an enqueue places consecutive units of one tenant of weight 1 in their lane
/// (`work.fair_at`; a tenant of weight w: this divided by w): a tenant with no units waiting
/// gets `now()`, one with a backlog the place after its last unit plus this. A tenant's burst of N units thus lies N seconds into the
/// future, and another tenant's single unit enqueued a moment later sorts before all but the
/// first few of them, while the claim stays one index scan.
pub const FAIR_SPACING_MS: i64 = 1000;

/// A unit of work to enqueue.
#[derive(Debug, Clone)]
pub struct NewWork {
    /// The work kind; a handler registered under it runs the unit.
    pub kind: String,
    /// The unit's spec, checked by its handler.
    pub spec: Value,
    /// The unit's idempotency token (unique in the table).
    pub token: IdempotencyToken,
    /// The resource the unit works on.
    pub resource_id: Option<Uuid>,
    /// The tenant owning the resource.
    pub tenant: Option<String>,
    /// The unit whose completion enqueued this one.
    pub parent_id: Option<i64>,
    /// Not before this time (default: now).
    pub run_at: Option<DateTime<Utc>>,
    /// How many claims it may take before it is parked (default: the table's default, 20).
    pub max_attempts: Option<i32>,
    /// True when `token` was generated for this unit ([`NewWork::new`]) rather than given or
    /// derived. Such a token cannot be in the table yet, so the insert skips the conflict
    /// check; should one collide all the same, the enqueue fails instead of dropping the unit.
    pub fresh_token: bool,
    /// False for a unit that runs beside its resource (a notification, a drift check): the
    /// resource's status and its changes do not wait for it. Default true.
    pub holds_resource: bool,
    /// The lane the unit is claimed in (default [`Lane::Change`]).
    pub lane: Lane,
}

impl NewWork {
    /// A unit of `kind` with a fresh token.
    pub fn new(kind: impl Into<String>, spec: Value) -> Self {
        Self {
            kind: kind.into(),
            spec,
            token: IdempotencyToken::generate(),
            resource_id: None,
            tenant: None,
            parent_id: None,
            run_at: None,
            max_attempts: None,
            fresh_token: true,
            holds_resource: true,
            lane: Lane::Change,
        }
    }

    /// Sets the lane.
    pub fn in_lane(mut self, lane: Lane) -> Self {
        self.lane = lane;
        self
    }

    /// Sets the token (e.g. a derived one).
    pub fn with_token(mut self, token: IdempotencyToken) -> Self {
        self.token = token;
        self.fresh_token = false;
        self
    }

    /// Sets the resource and its tenant.
    pub fn for_resource(mut self, resource_id: Uuid, tenant: impl Into<String>) -> Self {
        self.resource_id = Some(resource_id);
        self.tenant = Some(tenant.into());
        self
    }

    /// Sets the earliest run time.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }

    /// Sets the attempt limit.
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Makes the unit run beside its resource instead of holding it (see
    /// [`NewWork::holds_resource`]).
    pub fn beside_resource(mut self) -> Self {
        self.holds_resource = false;
        self
    }
}

/// One enqueued unit: its id and token. Units whose token was already present are not
/// returned (they were not inserted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The new row's id.
    pub id: i64,
    /// Its token.
    pub token: String,
}

/// Units of `lane` not finished (queued, pending or running; parked ones excluded): a lane's
/// backlog (`setpoint bench scale` reads the drift lane's at the start and end of its window).
///
/// # Errors
/// Database errors.
pub async fn work_lane_backlog(conn: &mut PgConnection, lane: Lane) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM work WHERE lane = $1 AND state IN ('queued', 'pending', 'running')",
    )
    .bind(lane.db())
    .fetch_one(conn)
    .await?)
}

/// Inserts `units` in one statement, with their `enqueued` events, and notifies idle workers
/// when the caller's transaction commits. A unit whose token is already in the table is
/// skipped, which is what makes a follow-up impossible to enqueue twice.
///
/// # Errors
/// Database errors; a violated constraint (bad token, empty kind) fails the whole statement.
pub async fn work_enqueue(
    conn: &mut PgConnection,
    units: &[NewWork],
) -> Result<Vec<Enqueued>, StoreError> {
    let done = work_enqueue_quiet(conn, units).await?;
    if !done.is_empty() {
        notify_workers(conn).await?;
    }
    Ok(done)
}

/// [`work_enqueue`] without the notification: for callers that commit many small transactions
/// at once (API requests). A transaction that has sent a NOTIFY holds a database-wide lock
/// through its commit's disk flush, so such commits cannot share flushes; these callers wake
/// the workers after commit instead ([`notify_workers`] outside the transaction).
pub async fn work_enqueue_quiet(
    conn: &mut PgConnection,
    units: &[NewWork],
) -> Result<Vec<Enqueued>, StoreError> {
    if units.is_empty() {
        return Ok(Vec::new());
    }
    let n = units.len();
    let mut kinds = Vec::with_capacity(n);
    let mut specs = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut resources = Vec::with_capacity(n);
    let mut tenants = Vec::with_capacity(n);
    let mut parents = Vec::with_capacity(n);
    let mut run_ats = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut holds = Vec::with_capacity(n);
    let mut lanes = Vec::with_capacity(n);
    for u in units {
        kinds.push(u.kind.as_str());
        specs.push(&u.spec);
        tokens.push(u.token.as_str());
        resources.push(u.resource_id);
        tenants.push(u.tenant.as_deref());
        parents.push(u.parent_id);
        run_ats.push(u.run_at);
        max_attempts.push(u.max_attempts);
        holds.push(u.holds_resource);
        lanes.push(u.lane.db());
    }
    // ON CONFLICT makes every row a speculative insertion (an extra WAL record and a second
    // pass over the unique index), about a fifth of the insert's cost; it is only needed when
    // a token may already be there (given or derived ones: follow-ups, retried requests).
    let sql = if units.iter().all(|u| u.fresh_token) {
        ENQUEUE_FRESH
    } else {
        ENQUEUE_SKIP_EXISTING
    };
    let rows = sqlx::query(sql)
        .bind(&kinds)
        .bind(&specs)
        .bind(&tokens)
        .bind(&resources)
        .bind(&tenants)
        .bind(&parents)
        .bind(&run_ats)
        .bind(&max_attempts)
        .bind(&holds)
        .bind(&lanes)
        .bind(FAIR_SPACING_MS)
        .fetch_all(&mut *conn)
        .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Enqueued {
                id: r.try_get("id")?,
                token: r.try_get("token")?,
            })
        })
        .collect()
}

/// The enqueue statement; `{conflict}` is empty or skips tokens already in the table.
///
/// Each unit's `fair_at` is its tenant's place in its kind and lane: after the tenant's last
/// unit still waiting there (one backward probe of `work_tenant_fair_idx` per tenant, kind
/// and lane of the call), or `now()` for a tenant with none, plus [`FAIR_SPACING_MS`] divided
/// by the tenant's weight (`tenant_weights`, 1 without a row) per unit of the same tenant
/// before it in this call; never before its `run_at`, so that the units
/// the claim's scan passes before reaching those it takes are due ones.
macro_rules! enqueue_sql {
    ($conflict:literal) => {
        concat!(
            "WITH u AS (
                 SELECT k, s, t, r, tn, p, coalesce(ra, now()) AS ra, coalesce(m, 20) AS m, h, l,
                        row_number() OVER (PARTITION BY coalesce(tn, ''), k, l ORDER BY o) AS nth
                 FROM unnest($1::text[], $2::jsonb[], $3::text[], $4::uuid[], $5::text[],
                             $6::bigint[], $7::timestamptz[], $8::int[], $9::bool[],
                             $10::smallint[])
                      WITH ORDINALITY AS u(k, s, t, r, tn, p, ra, m, h, l, o)
             ), g AS (
                 SELECT DISTINCT coalesce(tn, '') AS tn, k, l FROM u
             ), last AS MATERIALIZED (
                 -- Materialized: inlined into the insert's join, the probe would run once per
                 -- unit instead of once per group, and each probe may have to pass the index
                 -- entries of concurrent enqueues of the same tenant (not visible to it).
                 SELECT g.tn, g.k, g.l, wt.spacing,
                        greatest(now() - make_interval(secs => wt.spacing),
                                 (SELECT w.fair_at FROM work w
                                  WHERE coalesce(w.tenant, '') = g.tn AND w.kind = g.k
                                    AND w.lane = g.l AND w.state IN ('pending', 'queued')
                                  ORDER BY w.fair_at DESC LIMIT 1)) AS base
                 FROM g
                 -- The tenant's weight (tenant_weights, 1 without a row) divides its spacing.
                 CROSS JOIN LATERAL (
                     SELECT $11::float8 / 1000 / coalesce(
                                (SELECT tw.weight FROM tenant_weights tw WHERE tw.tenant = g.tn),
                                1) AS spacing
                 ) wt
             ), ins AS (
                 INSERT INTO work (kind, spec, token, resource_id, tenant, parent_id, run_at,
                                   max_attempts, holds_resource, state, lane, fair_at)
                 SELECT u.k, u.s, u.t, u.r, u.tn, u.p, u.ra, u.m, u.h, 'queued', u.l,
                        greatest(u.ra, last.base + make_interval(secs => u.nth * last.spacing))
                 FROM u JOIN last ON last.tn = coalesce(u.tn, '') AND last.k = u.k AND last.l = u.l ",
            $conflict,
            "
                 RETURNING id, token, parent_id, resource_id, kind
             ), ev AS (
                 INSERT INTO work_events (work_id, token, event, detail, resource_id, kind)
                 SELECT id, token, 'enqueued',
                        CASE WHEN parent_id IS NULL THEN NULL ELSE jsonb_build_object('parent_id', parent_id) END,
                        resource_id, kind
                 FROM ins
             )
             SELECT id, token FROM ins"
        )
    };
}
const ENQUEUE_FRESH: &str = enqueue_sql!("");
const ENQUEUE_SKIP_EXISTING: &str = enqueue_sql!("ON CONFLICT (token) DO NOTHING");

/// Reserves `n` ids of the work table's id sequence for units inserted with explicit ids (the
/// API's batched creates, which must know a unit's id before their one statement runs). A
/// reserved id is never handed out again, whether or not it is used.
pub async fn work_reserve_ids(conn: &mut PgConnection, n: usize) -> Result<Vec<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT nextval(pg_get_serial_sequence('work', 'id')) FROM generate_series(1, $1)",
    )
    .bind(i64::try_from(n).unwrap_or(i64::MAX))
    .fetch_all(conn)
    .await?)
}

/// Wakes idle workers once the surrounding transaction commits (PostgreSQL folds identical
/// notifications of one transaction into one); outside a transaction, at once.
pub async fn notify_workers(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(WORK_CHANNEL)
        .execute(conn)
        .await?;
    Ok(())
}

/// A unit a worker has claimed: it holds the lease until `lease_expires_at` (renewed by
/// heartbeats) and must complete or fail it with the same `attempt`.
#[derive(Debug, Clone)]
pub struct ClaimedWork {
    /// Row id.
    pub id: i64,
    /// Work kind.
    pub kind: String,
    /// Spec as enqueued.
    pub spec: Value,
    /// Idempotency token.
    pub token: String,
    /// Resource worked on.
    pub resource_id: Option<Uuid>,
    /// Tenant of the resource.
    pub tenant: Option<String>,
    /// This claim's attempt number (1 for the first), the completion fence.
    pub attempt: i32,
    /// The attempt limit.
    pub max_attempts: i32,
    /// When the unit became due.
    pub run_at: DateTime<Utc>,
    /// False for a unit that runs beside its resource.
    pub holds_resource: bool,
    /// True when the unit was taken over from a worker whose lease expired.
    pub rescued: bool,
    /// The lane it was claimed in.
    pub lane: Lane,
    /// Its place in the lane (see [`FAIR_SPACING_MS`]).
    pub fair_at: DateTime<Utc>,
}

/// Where a claim's scan starts: a position in the claim order (`lane`, `fair_at`, then `id`).
///
/// A claim that starts after the last unit its worker claimed skips the units that worker
/// is running and the index entries of units already finished (they stay in the index until
/// vacuum), which on a large backlog is most of what a scan from the start reads. It also
/// skips whatever became claimable behind that position: a unit whose lease expired, one
/// whose enqueue committed after a later unit was claimed, and a unit of a lower lane or of a
/// tenant placed before the position (a user's change while drift checks are claimed). The
/// caller must therefore scan from the start regularly; [`ClaimFrom::Start`] sees every
/// claimable unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimFrom {
    /// The first claimable unit: sees every due unit and every expired lease.
    Start,
    /// Only units after this (`lane`, `fair_at`, `id`) in the claim order.
    After(i16, DateTime<Utc>, i64),
}

impl ClaimFrom {
    /// The position just after the last of `units` in the claim order; `Start` when empty.
    pub fn after_last(units: &[ClaimedWork]) -> ClaimFrom {
        units
            .iter()
            .map(|u| (u.lane.db(), u.fair_at, u.id))
            .max()
            .map_or(ClaimFrom::Start, |(lane, at, id)| {
                ClaimFrom::After(lane, at, id)
            })
    }
}

/// The claim statement; `{bound}` is empty or starts the scan after ($7, $4, $5). `$6` lists
/// the kinds the claiming worker serves.
macro_rules! claim_sql {
    ($bound:literal) => {
        concat!(
            // Candidates kind by kind (work_claim_idx), merged in claim order: units of a kind
            // this worker does not serve are never read, however many lie at the head of the
            // queue. A leased unit stays `pending` (migration 0004): the scan passes over the
            // units that are running and takes the due ones and those whose lease has expired
            // (their worker died), in claim order: lane first (a user's change, then drift
            // checks, then bulk work), then each unit's place among its lane's tenants
            // (`fair_at`, see `work_enqueue`), on work_fair_claim_idx. Since `fair_at` is never
            // before `run_at`, the scan passes over no unit that is not due until it has taken
            // every due unit placed up to now.
            "WITH picked AS (
                 SELECT c.tid, c.id, c.rescued, c.exhausted
                 FROM unnest($6::text[]) AS k(kind)
                 CROSS JOIN LATERAL (
                     SELECT w.ctid AS tid, w.lane, w.fair_at, w.id,
                            w.lease_owner IS NOT NULL AS rescued,
                            w.attempt >= w.max_attempts AS exhausted
                     FROM work w
                     WHERE w.kind = k.kind AND w.state IN ('pending', 'queued')
                       AND w.run_at <= now() ",
            $bound,
            "
                       AND (w.lease_expires_at IS NULL OR w.lease_expires_at < now())
                     ORDER BY w.lane, w.fair_at, w.id
                     LIMIT $2
                     -- Locked as the index scan finds them, skipping rows another worker is
                     -- claiming at this moment, so a short claim means nothing more is due.
                     -- Rows of one kind beyond the merged limit stay locked only until this
                     -- statement's transaction ends; they are not claimed.
                     FOR UPDATE SKIP LOCKED
                 ) c
                 ORDER BY c.lane, c.fair_at, c.id
                 LIMIT $2
             ), claimed AS (
                 -- No indexed column changes: a HOT update, found by the ctid the lock kept
                 -- valid.
                 UPDATE work w
                 SET attempt = w.attempt + 1, lease_owner = $1,
                     lease_expires_at = now() + make_interval(secs => $3::float8 / 1000)
                 FROM picked p
                 WHERE w.ctid = p.tid
                   AND w.ctid = ANY(ARRAY(SELECT tid FROM picked WHERE NOT exhausted))
                 RETURNING w.id, w.kind, w.spec, w.token, w.resource_id, w.tenant, w.attempt,
                           w.max_attempts, w.run_at, w.holds_resource, p.rescued,
                           false AS poisoned, NULL::text AS reason, w.lane, w.fair_at
             ),
             -- A picked unit that has used all its attempts is parked instead of claimed: its
             -- last attempt never reported back (its process died — an abort, an OOM kill —
             -- or could not record its failure), and claiming it again would take the next
             -- process down the same way.
             poisoned AS (
                 UPDATE work w
                 SET state = 'parked', lease_owner = NULL, lease_expires_at = NULL,
                     last_error_class = 'transient',
                     last_error = 'gave up after ' || w.attempt || ' attempts: the last attempt '
                         || 'never reported back (its engine stopped while running it: killed, '
                         || 'out of memory, or cut off from the database); look for this unit''s '
                         || 'token in the engine logs, fix the cause, then retry it'
                 WHERE w.ctid = ANY(ARRAY(SELECT tid FROM picked WHERE exhausted))
                 RETURNING w.id, w.kind, w.spec, w.token, w.resource_id, w.tenant, w.attempt,
                           w.max_attempts, w.run_at, w.holds_resource, true AS rescued,
                           true AS poisoned, w.last_error AS reason, w.lane, w.fair_at
             ), ev AS (
                 INSERT INTO work_events (work_id, token, event, attempt, worker, error_class, message)
                 SELECT id, token, CASE WHEN rescued THEN 'rescued' ELSE 'claimed' END, attempt,
                        $1, NULL, NULL
                 FROM claimed
                 UNION ALL
                 SELECT id, token, 'parked', attempt, $1, 'transient', reason FROM poisoned
             )
             SELECT * FROM claimed UNION ALL SELECT * FROM poisoned"
        )
    };
}
const CLAIM_FROM_START: &str = claim_sql!("");
// A row comparison is a btree scan key: the scan descends straight to the position.
const CLAIM_AFTER: &str = claim_sql!("AND (w.lane, w.fair_at, w.id) > ($7, $4, $5)");

/// What one claim statement did: the units it claimed, and the units it parked because they
/// had used all their attempts without reporting back (`poisoned`).
#[derive(Debug, Default)]
pub struct Claimed {
    /// Units now leased to the claiming worker.
    pub units: Vec<ClaimedWork>,
    /// Units parked instead, with the reason recorded (their resource needs its parked hook).
    pub poisoned: Vec<(ClaimedWork, String)>,
}

/// Claims up to `limit` due units of the `kinds` `worker` serves: pending units whose
/// `run_at` has passed, oldest first, and running units whose lease has expired (their worker
/// died), skipping rows other workers are claiming; with [`ClaimFrom::After`], only those
/// after that position. Each claim increments `attempt`, sets the lease, and writes a
/// `claimed` (or `rescued`) event. A picked unit that has no attempt left is parked instead
/// (event `parked`). Run it in a transaction when the parked units' resources must change
/// with it.
pub async fn work_claim(
    conn: &mut PgConnection,
    worker: &str,
    kinds: &[String],
    limit: i64,
    lease_ms: i64,
    from: ClaimFrom,
) -> Result<Claimed, StoreError> {
    let query = match from {
        ClaimFrom::Start => sqlx::query(CLAIM_FROM_START),
        ClaimFrom::After(..) => sqlx::query(CLAIM_AFTER),
    };
    let mut query = query.bind(worker).bind(limit).bind(lease_ms);
    query = match from {
        ClaimFrom::After(lane, at, id) => query.bind(at).bind(id).bind(kinds).bind(lane),
        // $4 and $5 are unused by the statement, but its parameter numbers are fixed.
        ClaimFrom::Start => query
            .bind(None::<DateTime<Utc>>)
            .bind(None::<i64>)
            .bind(kinds),
    };
    let rows = query.fetch_all(conn).await?;
    let mut out = Claimed::default();
    for r in rows {
        let unit = ClaimedWork {
            id: r.try_get("id")?,
            kind: r.try_get("kind")?,
            spec: r.try_get("spec")?,
            token: r.try_get("token")?,
            resource_id: r.try_get("resource_id")?,
            tenant: r.try_get("tenant")?,
            attempt: r.try_get("attempt")?,
            max_attempts: r.try_get("max_attempts")?,
            run_at: r.try_get("run_at")?,
            holds_resource: r.try_get("holds_resource")?,
            rescued: r.try_get("rescued")?,
            lane: Lane::from_db(r.try_get("lane")?),
            fair_at: r.try_get("fair_at")?,
        };
        if r.try_get::<bool, _>("poisoned")? {
            let reason: Option<String> = r.try_get("reason")?;
            out.poisoned.push((unit, reason.unwrap_or_default()));
        } else {
            out.units.push(unit);
        }
    }
    Ok(out)
}

/// What a lease renewal found, per attempt asked about.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Renewals {
    /// Attempts whose lease now runs `lease_ms` from the statement.
    pub renewed: Vec<(i64, i32)>,
    /// Attempts that no longer hold their unit: it was taken over (another attempt), finished
    /// or removed. They must stop acting.
    pub lost: Vec<(i64, i32)>,
}

/// Extends the leases of `units` (id, attempt) held by `worker`. An attempt missing from both
/// lists of the answer still holds its unit, but its row was locked at that moment (being
/// completed or failed right now); the next renewal tells.
pub async fn work_heartbeat(
    conn: &mut PgConnection,
    worker: &str,
    units: &[(i64, i32)],
    lease_ms: i64,
) -> Result<Renewals, StoreError> {
    let ids: Vec<i64> = units.iter().map(|(id, _)| *id).collect();
    // `held` reads the rows without locking them: a row another transaction is completing is
    // still there (and ours) in this snapshot, so it is not reported lost. SKIP LOCKED in
    // `mine`: waiting for such a row would only delay the others' renewals (and could
    // deadlock with a batch completion).
    let rows: Vec<(i64, i32, bool)> = sqlx::query_as(
        "WITH held AS (
             SELECT w.id, w.attempt FROM work w
             WHERE w.id = ANY($2) AND w.lease_owner = $1 AND w.state IN ('pending', 'queued')
         ), mine AS (
             SELECT w.id FROM work w
             WHERE w.id = ANY(ARRAY(SELECT id FROM held)) AND w.lease_owner = $1
             FOR UPDATE SKIP LOCKED
         ), renewed AS (
             UPDATE work w
             SET lease_expires_at = now() + make_interval(secs => $3::float8 / 1000)
             WHERE w.id = ANY(ARRAY(SELECT id FROM mine))
             RETURNING w.id
         )
         SELECT h.id, h.attempt, h.id IN (SELECT id FROM renewed) FROM held h",
    )
    .bind(worker)
    .bind(&ids)
    .bind(lease_ms)
    .fetch_all(conn)
    .await?;
    let mut out = Renewals::default();
    for &(id, attempt) in units {
        match rows.iter().find(|(rid, _, _)| *rid == id) {
            Some(&(_, held_attempt, renewed)) if held_attempt == attempt => {
                if renewed {
                    out.renewed.push((id, attempt));
                }
            }
            _ => out.lost.push((id, attempt)),
        }
    }
    Ok(out)
}

/// Records that attempt `attempt` of unit `id` (token `token`) was abandoned by `worker`
/// because `why` (its lease was lost, or the engine is shutting down), and releases the
/// unit's lease if this attempt still holds it, so that any worker may take it over at once
/// instead of after the lease runs out. The event is written either way: the unit's history
/// shows every attempt that stopped without a result.
pub async fn work_abandon(
    conn: &mut PgConnection,
    worker: &str,
    id: i64,
    attempt: i32,
    token: &str,
    why: &str,
) -> Result<bool, StoreError> {
    let released: bool = sqlx::query_scalar(
        "WITH rel AS (
             UPDATE work SET lease_owner = NULL, lease_expires_at = NULL
             WHERE id = $2 AND attempt = $3 AND lease_owner = $1
             RETURNING id
         ), ev AS (
             INSERT INTO work_events (work_id, token, event, attempt, worker, message)
             VALUES ($2, $4, 'abandoned', $3, $1, $5)
         )
         SELECT EXISTS (SELECT 1 FROM rel)",
    )
    .bind(worker)
    .bind(id)
    .bind(attempt)
    .bind(token)
    .bind(why)
    .fetch_one(conn)
    .await?;
    Ok(released)
}

/// A unit that finished successfully, to be completed under its fence.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Row id.
    pub id: i64,
    /// The attempt that ran it.
    pub attempt: i32,
    /// What goes into the `succeeded` event's detail (adapter calls, duration).
    pub detail: Value,
}

/// A unit whose completion applied.
#[derive(Debug, Clone)]
pub struct Completed {
    /// Row id.
    pub id: i64,
    /// Token.
    pub token: String,
    /// Resource worked on.
    pub resource_id: Option<Uuid>,
    /// Tenant of the resource.
    pub tenant: Option<String>,
}

/// Deletes the units of `batch` that `worker` still holds at the same attempt, writing their
/// `succeeded` events. Units not returned were fenced off: their lease was lost, and this
/// completion must change nothing else either.
pub async fn work_complete_if_leased(
    conn: &mut PgConnection,
    worker: &str,
    batch: &[Completion],
) -> Result<Vec<Completed>, StoreError> {
    // Sorted by id, so that a row finds its place in the arrays by binary search
    // (width_bucket) rather than by a linear array_position: with 1000 units a batch, the
    // linear search was a visible share of the completion's CPU.
    let mut sorted: Vec<&Completion> = batch.iter().collect();
    sorted.sort_unstable_by_key(|c| c.id);
    sorted.dedup_by_key(|c| c.id);
    let ids: Vec<i64> = sorted.iter().map(|c| c.id).collect();
    let attempts: Vec<i32> = sorted.iter().map(|c| c.attempt).collect();
    // One JSON array rather than a jsonb[]: PostgreSQL reaches element i of an array of a
    // variable-length type by walking the i-1 before it (quadratic over a batch), while a jsonb
    // array keeps offsets and finds it at once.
    let details = sqlx::types::Json(sorted.iter().map(|c| &c.detail).collect::<Vec<_>>());
    let rows = sqlx::query(
        // No join with the unnested arrays: with a batch on both sides the planner picks a
        // nested loop that re-reads the arrays once per row (quadratic in the batch, ~0.6 s for
        // 1000 units). width_bucket on the sorted ids is the row's index in the arrays.
        "WITH done AS (
             DELETE FROM work w
             WHERE w.id = ANY($2) AND w.attempt = ($3::int[])[width_bucket(w.id, $2)]
               AND w.lease_owner = $1
             RETURNING w.id, w.token, w.attempt, w.resource_id, w.tenant,
                       $4::jsonb -> (width_bucket(w.id, $2) - 1) AS detail
         ), ev AS (
             INSERT INTO work_events (work_id, token, event, attempt, worker, detail)
             SELECT id, token, 'succeeded', attempt, $1, detail FROM done
         )
         SELECT id, token, resource_id, tenant FROM done",
    )
    .bind(worker)
    .bind(&ids)
    .bind(&attempts)
    .bind(&details)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Completed {
                id: r.try_get("id")?,
                token: r.try_get("token")?,
                resource_id: r.try_get("resource_id")?,
                tenant: r.try_get("tenant")?,
            })
        })
        .collect()
}

/// What a failed attempt turns into.
#[derive(Debug, Clone)]
pub enum FailureAction {
    /// Back to pending, due again after `delay_ms`.
    Retry {
        /// Backoff before the next attempt.
        delay_ms: i64,
    },
    /// Back to pending, due again after `delay_ms`, and the attempt does not count: the unit
    /// waits for something outside it (a cooldown, a budget), nothing failed.
    Wait {
        /// How long to wait.
        delay_ms: i64,
    },
    /// Parked for an operator.
    Park,
}

/// A failed attempt to record under its fence.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Row id.
    pub id: i64,
    /// The attempt that failed.
    pub attempt: i32,
    /// `transient` or `permanent`.
    pub class: String,
    /// What went wrong.
    pub message: String,
    /// Event detail (adapter calls, error code).
    pub detail: Value,
    /// Retry later or park.
    pub action: FailureAction,
}

/// A failure that applied: the unit's resource, and whether the unit holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureApplied {
    /// The unit's resource.
    pub resource_id: Option<Uuid>,
    /// The resource's tenant.
    pub tenant: Option<String>,
    /// False for a unit beside its resource.
    pub holds_resource: bool,
}

/// Records a failed attempt if `worker` still holds the unit at the same attempt: back to
/// pending with backoff, or parked. Writes `failed` (and `parked`) events. Returns what the
/// hooks need when the failure applied, `None` when it was fenced off.
pub async fn work_fail_if_leased(
    conn: &mut PgConnection,
    worker: &str,
    f: &Failure,
) -> Result<Option<FailureApplied>, StoreError> {
    let (state, delay_ms, event) = match f.action {
        FailureAction::Retry { delay_ms } => ("queued", delay_ms, "failed"),
        FailureAction::Wait { delay_ms } => ("queued", delay_ms, "waiting"),
        FailureAction::Park => ("parked", 0, "failed"),
    };
    // What PostgreSQL refuses (a NUL byte) or what would bloat every read of the row (a
    // megabyte of peer output) never reaches the table: a unit whose failure cannot be
    // recorded would be claimed again and again.
    let message = super::storable_text(&f.message, super::MAX_STORED_MESSAGE);
    let detail = super::storable_json(&f.detail);
    let row = sqlx::query(
        // A wait gives its attempt back (attempt - 1): it was not a failure. The event keeps
        // the attempt number it ran under.
        "WITH upd AS (
             UPDATE work
             SET state = $4::work_state, lease_owner = NULL, lease_expires_at = NULL,
                 run_at = now() + make_interval(secs => $5::float8 / 1000),
                 -- A unit waiting out its backoff must not lie at the head of the claim's
                 -- order, where every scan would pass it; it keeps its place otherwise.
                 fair_at = greatest(fair_at, now() + make_interval(secs => $5::float8 / 1000)),
                 attempt = CASE WHEN $9 = 'waiting' THEN attempt - 1 ELSE attempt END,
                 last_error = $6, last_error_class = $7
             WHERE id = $2 AND attempt = $3 AND lease_owner = $1
             RETURNING id, token, resource_id, tenant, holds_resource
         ), ev AS (
             INSERT INTO work_events (work_id, token, event, attempt, worker, error_class, message, detail)
             SELECT id, token, $9, $3, $1, $7, $6,
                    $8::jsonb || jsonb_build_object('retry_in_ms', CASE WHEN $4 = 'queued' THEN $5 END)
             FROM upd
             UNION ALL
             SELECT id, token, 'parked', $3, $1, $7, $6, NULL FROM upd WHERE $4 = 'parked'
         )
         SELECT resource_id, tenant, holds_resource FROM upd",
    )
    .bind(worker)
    .bind(f.id)
    .bind(f.attempt)
    .bind(state)
    .bind(delay_ms)
    .bind(&message)
    .bind(&f.class)
    .bind(&detail)
    .bind(event)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        Ok(FailureApplied {
            resource_id: r.try_get("resource_id")?,
            tenant: r.try_get("tenant")?,
            holds_resource: r.try_get("holds_resource")?,
        })
    })
    .transpose()
}

/// A row of the work table, as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkRow {
    /// Row id.
    pub id: i64,
    /// Work kind.
    pub kind: String,
    /// `pending`, `running` or `parked`.
    pub state: String,
    /// Idempotency token.
    pub token: String,
    /// Resource worked on.
    pub resource_id: Option<Uuid>,
    /// Tenant of the resource.
    pub tenant: Option<String>,
    /// Claims so far.
    pub attempt: i32,
    /// Attempt limit.
    pub max_attempts: i32,
    /// When it is (or was) due.
    pub run_at: DateTime<Utc>,
    /// Worker holding the lease.
    pub lease_owner: Option<String>,
    /// Lease expiry.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Last failure.
    pub last_error: Option<String>,
    /// Class of the last failure.
    pub last_error_class: Option<String>,
    /// The unit that enqueued this one.
    pub parent_id: Option<i64>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// Spec as enqueued.
    pub spec: Value,
    /// False for a unit that runs beside its resource.
    pub holds_resource: bool,
}

/// The state operators see: a leased unit is `running` (in the table it stays `pending`, see
/// migration 0004).
macro_rules! state_expr {
    () => {
        // `queued` is what this release writes for `pending` (migration 0007): one state to
        // operators.
        "CASE WHEN lease_owner IS NOT NULL THEN 'running' WHEN state = 'queued' THEN 'pending' \
         ELSE state::text END"
    };
}
const STATE_EXPR: &str = state_expr!();

const WORK_COLUMNS: &str = concat!(
    "id, kind, ",
    state_expr!(),
    " AS state, token, resource_id, tenant, attempt, max_attempts, run_at, lease_owner, \
     lease_expires_at, last_error, last_error_class, parent_id, created_at, spec, holds_resource"
);

fn work_row(r: sqlx::postgres::PgRow) -> Result<WorkRow, StoreError> {
    Ok(WorkRow {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        state: r.try_get("state")?,
        token: r.try_get("token")?,
        resource_id: r.try_get("resource_id")?,
        tenant: r.try_get("tenant")?,
        attempt: r.try_get("attempt")?,
        max_attempts: r.try_get("max_attempts")?,
        run_at: r.try_get("run_at")?,
        lease_owner: r.try_get("lease_owner")?,
        lease_expires_at: r.try_get("lease_expires_at")?,
        last_error: r.try_get("last_error")?,
        last_error_class: r.try_get("last_error_class")?,
        parent_id: r.try_get("parent_id")?,
        created_at: r.try_get("created_at")?,
        spec: r.try_get("spec")?,
        holds_resource: r.try_get("holds_resource")?,
    })
}

/// Filters for [`work_list`].
#[derive(Debug, Clone, Default)]
pub struct WorkFilter {
    /// Only this state.
    pub state: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this resource.
    pub resource_id: Option<Uuid>,
    /// Only ids greater than this (paging).
    pub after_id: Option<i64>,
    /// At most this many rows.
    pub limit: i64,
}

/// Units still in the table, oldest first.
pub async fn work_list(
    conn: &mut PgConnection,
    filter: &WorkFilter,
) -> Result<Vec<WorkRow>, StoreError> {
    let sql = format!(
        "SELECT {WORK_COLUMNS} FROM work
         WHERE ($1::text IS NULL OR {STATE_EXPR} = $1)
           AND ($2::text IS NULL OR kind = $2)
           AND ($3::uuid IS NULL OR resource_id = $3)
           AND ($4::bigint IS NULL OR id > $4)
         ORDER BY id LIMIT $5"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&filter.state)
        .bind(&filter.kind)
        .bind(filter.resource_id)
        .bind(filter.after_id)
        .bind(filter.limit)
        .fetch_all(conn)
        .await?;
    rows.into_iter().map(work_row).collect()
}

/// Waiting units (pending or queued) of the kinds `kinds`, oldest first: what `setpoint work
/// list --unserved` shows of the kinds [`super::engines::units_unserved`] names.
pub async fn work_list_of_kinds(
    conn: &mut PgConnection,
    kinds: &[String],
    limit: i64,
) -> Result<Vec<WorkRow>, StoreError> {
    let sql = format!(
        "SELECT {WORK_COLUMNS} FROM work
         WHERE state IN ('pending', 'queued') AND kind = ANY($1)
         ORDER BY id LIMIT $2"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(kinds)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.into_iter().map(work_row).collect()
}

/// Units still to run: every unit but parked ones and those of `except_kind` (a kind that keeps
/// coming back, such as a drift check, and never holds its resource), oldest first, at most
/// `limit` of them, and how many there are in all. What "settled" means to the chaos soak.
///
/// # Errors
/// Database errors.
pub async fn work_open(
    conn: &mut PgConnection,
    except_kind: &str,
    limit: i64,
) -> Result<(i64, Vec<WorkRow>), StoreError> {
    let total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM work WHERE state <> 'parked' AND kind <> $1")
            .bind(except_kind)
            .fetch_one(&mut *conn)
            .await?;
    let sql = format!(
        "SELECT {WORK_COLUMNS} FROM work WHERE state <> 'parked' AND kind <> $1
         ORDER BY id LIMIT $2"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(except_kind)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    let rows = rows.into_iter().map(work_row).collect::<Result<_, _>>()?;
    Ok((total, rows))
}

/// Every parked unit of a resource: `(resource id, kind, last error)`, by id.
///
/// # Errors
/// Database errors.
pub async fn work_parked_of_resources(
    conn: &mut PgConnection,
) -> Result<Vec<(Uuid, String, String)>, StoreError> {
    let rows = sqlx::query(
        "SELECT resource_id, kind, coalesce(last_error, '') AS last_error
           FROM work WHERE state = 'parked' AND resource_id IS NOT NULL ORDER BY id",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("resource_id")?,
                r.try_get("kind")?,
                r.try_get("last_error")?,
            ))
        })
        .collect()
}

/// One unit by id, if it is still in the table.
pub async fn work_get(conn: &mut PgConnection, id: i64) -> Result<Option<WorkRow>, StoreError> {
    let sql = format!("SELECT {WORK_COLUMNS} FROM work WHERE id = $1");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(conn)
        .await?
        .map(work_row)
        .transpose()
}

/// The units among `ids` still in the table, in no particular order.
pub async fn work_get_many(
    conn: &mut PgConnection,
    ids: &[i64],
) -> Result<Vec<WorkRow>, StoreError> {
    let sql = format!("SELECT {WORK_COLUMNS} FROM work WHERE id = ANY($1)");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(ids)
        .fetch_all(conn)
        .await?
        .into_iter()
        .map(work_row)
        .collect()
}

/// One unit by token, if it is still in the table.
pub async fn work_get_by_token(
    conn: &mut PgConnection,
    token: &str,
) -> Result<Option<WorkRow>, StoreError> {
    let sql = format!("SELECT {WORK_COLUMNS} FROM work WHERE token = $1");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(token)
        .fetch_optional(conn)
        .await?
        .map(work_row)
        .transpose()
}

/// Makes a parked unit pending again, due now, with `extra_attempts` more attempts, and writes
/// a `retried` event naming `operator`. Returns the row after the change, or `None` if no
/// parked unit has this id.
pub async fn work_retry_parked(
    conn: &mut PgConnection,
    id: i64,
    operator: &str,
    extra_attempts: i32,
) -> Result<Option<WorkRow>, StoreError> {
    let sql = format!(
        "WITH upd AS (
             UPDATE work SET state = 'queued', run_at = now(),
                 max_attempts = greatest(max_attempts, attempt + $3)
             WHERE id = $1 AND state = 'parked'
             RETURNING *
         ), ev AS (
             INSERT INTO work_events (work_id, token, event, attempt, worker, message)
             SELECT id, token, 'retried', attempt, $2, 'retried by an operator' FROM upd
         ), n AS (SELECT pg_notify('{WORK_CHANNEL}', '') FROM upd)
         SELECT {WORK_COLUMNS} FROM upd"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(operator)
        .bind(extra_attempts)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(work_row).transpose()
}

/// Removes a parked unit, writing a `cancelled` event naming `operator` and `reason`.
/// Returns the removed row, or `None` if no parked unit has this id.
pub async fn work_cancel_parked(
    conn: &mut PgConnection,
    id: i64,
    operator: &str,
    reason: &str,
) -> Result<Option<WorkRow>, StoreError> {
    let sql = format!(
        "WITH del AS (
             DELETE FROM work WHERE id = $1 AND state = 'parked' RETURNING *
         ), ev AS (
             INSERT INTO work_events (work_id, token, event, attempt, worker, message)
             SELECT id, token, 'cancelled', attempt, $2, $3 FROM del
         )
         SELECT {WORK_COLUMNS} FROM del"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(operator)
        .bind(reason)
        .fetch_optional(conn)
        .await?;
    row.map(work_row).transpose()
}

/// What a delete superseding a resource's chain removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Superseded {
    /// The units removed (pending, running or parked ones holding the resource).
    pub removed: Vec<i64>,
    /// The latest lease of a removed unit that was running: its attempt may act until then
    /// (it stops at its next check of its fence), so the delete chain starts after it.
    pub running_until: Option<DateTime<Utc>>,
}

/// Removes every unit holding resource `resource` (the chain a delete supersedes), writing a
/// `cancelled` event for each with `reason`. A running one's attempt finds it gone at its next
/// lease renewal and stops; its completion is fenced off.
pub async fn work_supersede_for_resource(
    conn: &mut PgConnection,
    resource: Uuid,
    reason: &str,
) -> Result<Superseded, StoreError> {
    let rows: Vec<(i64, Option<DateTime<Utc>>)> = sqlx::query_as(
        "WITH del AS (
             DELETE FROM work WHERE resource_id = $1 AND holds_resource
             RETURNING id, token, attempt, lease_expires_at
         ), ev AS (
             INSERT INTO work_events (work_id, token, event, attempt, worker, message)
             SELECT id, token, 'cancelled', attempt, 'setpoint', $2 FROM del
         )
         SELECT id, lease_expires_at FROM del",
    )
    .bind(resource)
    .bind(reason)
    .fetch_all(conn)
    .await?;
    Ok(Superseded {
        removed: rows.iter().map(|(id, _)| *id).collect(),
        running_until: rows.iter().filter_map(|(_, at)| *at).max(),
    })
}

/// Counts of units by state and kind, and the age of the oldest due pending unit.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStats {
    /// (state, kind, count).
    pub counts: Vec<(String, String, i64)>,
    /// Seconds since the oldest due pending unit became due.
    pub oldest_pending_age_secs: f64,
}

/// The queue's current shape (units by state and kind, oldest due pending unit), for metrics.
pub async fn work_stats(conn: &mut PgConnection) -> Result<QueueStats, StoreError> {
    let sql = format!("SELECT {STATE_EXPR}, kind, count(*) FROM work GROUP BY 1, 2 ORDER BY 1, 2");
    let counts = sqlx::query_as::<_, (String, String, i64)>(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await?;
    let age: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - min(run_at))::float8 FROM work
         WHERE state IN ('pending', 'queued') AND lease_owner IS NULL AND run_at <= now()",
    )
    .fetch_one(conn)
    .await?;
    Ok(QueueStats {
        counts,
        oldest_pending_age_secs: age.unwrap_or(0.0).max(0.0),
    })
}
