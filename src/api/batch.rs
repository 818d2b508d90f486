//! Group commit for CreateInstance.
//!
//! A Create that passed authentication and validation is handed to the [`CreateBatcher`]. A
//! few executors, each with a database connection of its own (outside the pool, opened on first
//! use and again after a failure, statements with generic plans), take everything that is
//! waiting, up to a cap, and write it with ONE statement that commits on its own
//! ([`instances_create_batch`]): it claims the request ids with their answers, inserts the
//! instances, and enqueues the first unit of each. The executor decides every value of an
//! answer beforehand (instance id, creation time, the unit's id from a block of reserved ids,
//! its token), so the answer can be stored with the claim. Then it answers every waiting
//! request and wakes the workers once.
//!
//! What a batch cannot settle cleanly is answered exactly as a Create on its own would be,
//! because it then runs on its own ([`Settled::Alone`], after the batch's statement ended): a
//! request id that is already taken (a repeat, replayed, or a reuse with another body,
//! refused), a name that is live already (`ALREADY_EXISTS`), a request id or a name that
//! appears twice in one batch (the second runs after the first committed), and every create of
//! a batch whose statement failed (nothing of it was written; a commit whose outcome is unknown
//! is safe too, since a request that did commit replays its stored answer).
//!
//! A batch takes its request ids in (tenant, request id) order, all before the first name, and
//! its names in (tenant, name) order, so batches and single creates never wait for each other
//! in a cycle. A batch that fails because a transaction it waited for took one of its request
//! ids or names is tried once more (that row is committed then, so the second try leaves just
//! that create out); should a batch fail otherwise (a deadlock, a lost connection), its creates
//! run on their own.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use chrono::{SubsecRound, Utc};

use prost::Message;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::convert;
use super::errors::ApiError;
use super::operations::FirstUnits;
use super::proto::Instance;
use super::status::InstanceState;
use super::wake::WorkerWaker;
use crate::queue::NewWork;
use crate::store;
use crate::store::create_batch::{BatchCreate, instances_create_batch, prepare_batch_connection};
use crate::store::instances::{InstanceRow, new_instance_id};
use crate::store::work::work_reserve_ids;

/// The method name stored with a Create's request id (as the one-request path stores it).
pub const CREATE_METHOD: &str = "CreateInstance";

/// Default number of batch executors (concurrent batch transactions): one runs its statements
/// while the other waits for its commit to reach the disk. More executors make smaller batches;
/// on the 2-core benchmark machine 2 beat 4 (see the `bench api` figures in docs/benchmarks.md).
pub const DEFAULT_EXECUTORS: usize = 2;
/// Default largest batch.
pub const DEFAULT_MAX_BATCH: usize = 256;
/// Unit ids an executor reserves at a time (one round trip per this many creates).
const RESERVED_IDS: usize = 1024;

/// A validated Create, ready to be written.
#[derive(Debug, Clone)]
pub struct NewCreate {
    /// The caller's tenant.
    pub tenant: String,
    /// The client's request id.
    pub request_id: String,
    /// The instance's name.
    pub name: String,
    /// The desired spec as stored.
    pub spec: Value,
    /// sha256 of the request without its request id ([`super::idempotency::body_hash`]).
    pub body_hash: [u8; 32],
    /// A bulk create: its unit runs in the bulk lane. Batches only take changes of the
    /// change lane; a bulk create runs on its own.
    pub bulk: bool,
}

/// How a batch settled one Create.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    /// Created and committed: the answer (also stored under the request id).
    Created(Box<Instance>),
    /// Not settled by the batch: run the Create on its own.
    Alone,
}

#[derive(Debug)]
struct Job {
    create: NewCreate,
    /// How the batch settled the create, and the create back (for a Create that runs on its
    /// own, or an error that names it).
    reply: oneshot::Sender<(Settled, NewCreate)>,
}

/// Hands Creates to the batch executors.
#[derive(Debug, Clone)]
pub struct CreateBatcher {
    jobs: mpsc::Sender<Job>,
}

impl CreateBatcher {
    /// Starts `executors` executors (at least one) on `pool` that enqueue the first units of
    /// `first`'s creates, batches of at most `max_batch`; they end when the last clone of the
    /// batcher is dropped.
    ///
    /// The executors run on a thread of their own (one runtime for all of them), so that the
    /// wake-up after each batch's statement does not queue behind the tasks of all the
    /// requests in flight. (Since a batch became one statement, the measurements in docs/benchmarks.md show
    /// no difference in rate either way.)
    pub fn start(
        pool: PgPool,
        first: FirstUnits,
        executors: usize,
        max_batch: usize,
        waker: WorkerWaker,
    ) -> Self {
        let max_batch = max_batch.max(1);
        let executors = executors.max(1);
        let (jobs, rx) = mpsc::channel::<Job>(max_batch * executors * 4);
        let rx = Arc::new(Mutex::new(rx));
        let kind: Arc<FirstUnits> = Arc::new(first);
        let loops = move || {
            (0..executors)
                .map(|_| {
                    executor(
                        pool.clone(),
                        rx.clone(),
                        kind.clone(),
                        max_batch,
                        waker.clone(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let fallback = loops.clone();
        let spawned = std::thread::Builder::new()
            .name("setpoint-create-batches".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(async move {
                        let running: Vec<_> = loops().into_iter().map(tokio::spawn).collect();
                        for r in running {
                            let _ = r.await;
                        }
                    }),
                    // Dropping the executors closes the queue: every Create runs on its own.
                    Err(e) => tracing::error!(error = %e,
                        "cannot start the create batch executors; creates run one by one"),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e,
                "no thread for the create batch executors; they share the server's runtime");
            for l in fallback() {
                tokio::spawn(l);
            }
        }
        Self { jobs }
    }

    /// Settles `create` in the next batch; returns how, with the create.
    ///
    /// # Errors
    /// [`ApiError::Internal`] when the executor stopped before answering (only if it panicked
    /// or the server is going away): the batch may have committed, so a retry with the same
    /// request id gets its answer.
    pub async fn submit(&self, create: NewCreate) -> Result<(Settled, NewCreate), ApiError> {
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(Job { create, reply }).await {
            return Ok((Settled::Alone, job.create));
        }
        answer.await.map_err(|_| {
            ApiError::Internal("the create batch executor stopped before answering".into())
        })
    }
}

/// One executor: takes what is waiting (one executor at a time), runs it as a batch, repeats
/// until the queue is closed.
async fn executor(
    pool: PgPool,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    kind: Arc<FirstUnits>,
    max_batch: usize,
    waker: WorkerWaker,
) {
    let mut state = Executor {
        conn: None,
        work_ids: VecDeque::new(),
    };
    loop {
        let mut jobs = Vec::new();
        {
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut jobs, max_batch).await == 0 {
                return;
            }
        }
        run(&pool, &mut state, &kind, jobs, &waker).await;
    }
}

/// An executor's database connection (opened on first use; dropped after a failure) and the
/// unit ids it has reserved and not used yet.
struct Executor {
    conn: Option<PgConnection>,
    work_ids: VecDeque<i64>,
}

/// Runs one batch on the executor's connection and answers each of its jobs.
async fn run(
    pool: &PgPool,
    state: &mut Executor,
    kind: &FirstUnits,
    mut jobs: Vec<Job>,
    waker: &WorkerWaker,
) {
    jobs.sort_by(|a, b| {
        (&a.create.tenant, &a.create.request_id).cmp(&(&b.create.tenant, &b.create.request_id))
    });
    // The first of each request id and of each name is a member; the others run on their own
    // once the batch has committed (they then replay it, or find the name taken).
    let first: Vec<bool> = {
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        jobs.iter()
            .map(|j| {
                let c = &j.create;
                let id = ids.insert((c.tenant.as_str(), c.request_id.as_str()));
                let name = names.insert((c.tenant.as_str(), c.name.as_str()));
                id && name
            })
            .collect()
    };
    let (mut members, mut later) = (Vec::new(), Vec::new());
    for (job, first) in jobs.into_iter().zip(first) {
        if first {
            members.push(job);
        } else {
            later.push(job);
        }
    }
    let creates: Vec<&NewCreate> = members.iter().map(|j| &j.create).collect();
    let mut outcome = settle(pool, state, kind, &creates).await;
    if let Err(ApiError::Store(e)) = &outcome
        && e.is_unique_violation()
    {
        // A request id or name of the batch was taken by a transaction the statement waited
        // for (a client retrying while its first try was in another batch, say). That row is
        // committed now, so a second try leaves just that create out, instead of sending the
        // whole batch down the one-by-one path.
        outcome = settle(pool, state, kind, &creates).await;
    }
    let settled = match outcome {
        Ok(settled) => {
            crate::metrics::api_create_batch("committed", members.len());
            if settled.iter().any(|s| matches!(s, Settled::Created(_))) {
                waker.wake();
            }
            settled
        }
        Err(e) => {
            // The connection may be broken or in an unknown state: open a new one next time.
            state.conn = None;
            crate::metrics::api_create_batch("failed", members.len());
            tracing::warn!(error = %e, creates = members.len(),
                "a batch of creates failed and was rolled back; each runs on its own");
            vec![Settled::Alone; members.len()]
        }
    };
    tracing::debug!(
        creates = members.len() + later.len(),
        created = settled
            .iter()
            .filter(|s| matches!(s, Settled::Created(_)))
            .count(),
        alone = later.len()
            + settled
                .iter()
                .filter(|s| matches!(s, Settled::Alone))
                .count(),
        "batch of creates settled"
    );
    for (job, s) in members.into_iter().zip(settled) {
        let _ = job.reply.send((s, job.create));
    }
    for job in later {
        let _ = job.reply.send((Settled::Alone, job.create));
    }
}

/// The batch's statement; one answer per create, in order. On an error nothing was written,
/// unless the commit's outcome is unknown.
async fn settle(
    pool: &PgPool,
    state: &mut Executor,
    first: &FirstUnits,
    creates: &[&NewCreate],
) -> Result<Vec<Settled>, ApiError> {
    let c = match &mut state.conn {
        Some(c) => c,
        None => {
            let mut c = store::connect_dedicated(pool).await?;
            prepare_batch_connection(&mut c).await?;
            state.conn.insert(c)
        }
    };
    if state.work_ids.len() < creates.len() {
        let more = work_reserve_ids(c, RESERVED_IDS.max(creates.len())).await?;
        state.work_ids.extend(more);
    }
    // PostgreSQL keeps microseconds: the answer must show the time the row will hold.
    let created_at = Utc::now().trunc_subsecs(6);
    let mut rows = Vec::with_capacity(creates.len());
    for create in creates {
        let work_id = state
            .work_ids
            .pop_front()
            .ok_or_else(|| ApiError::Internal("no reserved unit id left".into()))?;
        // The row exactly as the insert (and its status trigger) writes it.
        rows.push(InstanceRow {
            id: new_instance_id(),
            tenant: create.tenant.clone(),
            kind: crate::plugins::kvx::KIND.to_owned(),
            name: create.name.clone(),
            spec: create.spec.clone(),
            spec_version: 1,
            generation: 1,
            observed: Value::Object(serde_json::Map::new()),
            observed_generation: 0,
            status: InstanceState::Creating.db().unwrap_or_default().into(),
            has_active_work: true,
            operation: Some("create".into()),
            active_work_id: Some(work_id),
            last_error: None,
            created_at,
            updated_at: created_at,
            deleted_at: None,
        });
    }
    let units: Vec<NewWork> = rows
        .iter()
        .map(|row| {
            first
                .first(row, "create")
                .ok_or_else(|| ApiError::Internal("the instance kind declares no create".into()))
        })
        .collect::<Result<_, _>>()?;
    let kind = units.first().map(|u| u.kind.clone()).unwrap_or_default();
    let answers: Vec<Instance> = rows.iter().map(convert::instance).collect();
    let encoded: Vec<Vec<u8>> = answers.iter().map(Message::encode_to_vec).collect();
    let batch: Vec<BatchCreate<'_>> = creates
        .iter()
        .zip(&rows)
        .zip(&units)
        .zip(&encoded)
        .map(|(((create, row), unit), response)| BatchCreate {
            tenant: &create.tenant,
            request_id: &create.request_id,
            body_hash: &create.body_hash,
            response,
            id: row.id,
            name: &create.name,
            spec: &create.spec,
            work_id: row.active_work_id.unwrap_or_default(),
            token: unit.token.as_str(),
            work_spec: &unit.spec,
        })
        .collect();
    let written = instances_create_batch(
        c,
        CREATE_METHOD,
        crate::plugins::kvx::KIND,
        &kind,
        created_at,
        &batch,
    )
    .await?;
    Ok(written
        .into_iter()
        .zip(answers)
        .map(|(written, answer)| {
            if written {
                Settled::Created(Box::new(answer))
            } else {
                Settled::Alone
            }
        })
        .collect())
}
