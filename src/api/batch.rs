//! Group commit for CreateInstance.
//!
//! A Create that passed authentication and validation is handed to the [`CreateBatcher`]. A
//! few executors, each with a database connection of its own (outside the pool, opened on first
//! use and again after a failure, statements with generic plans), take everything that is
//! waiting, up to a cap, and settle it in ONE transaction with multi-row statements:
//!
//! 1. claim the request ids and insert the instances
//!    ([`instances_insert_claimed`]: `api_requests` and `instances`, `ON CONFLICT DO NOTHING`);
//! 2. enqueue the first unit of every new instance ([`queue::enqueue_many_quiet`]);
//! 3. store every answer, and release the claims of names that were taken
//!    ([`api_requests_settle`]);
//! 4. commit, answer every waiting request, and wake the workers once.
//!
//! What a batch cannot settle cleanly is answered exactly as a Create on its own would be,
//! because it then runs on its own ([`Settled::Alone`], after the batch's transaction ended):
//! a request id that is already taken (a repeat, replayed, or a reuse with another body,
//! refused), a request id or a name that appears twice in one batch (the second runs after
//! the first committed), and every create of a batch whose transaction failed (nothing of it
//! was written; a commit whose outcome is unknown is safe too, since a request that did commit
//! replays its stored answer). A taken name is `ALREADY_EXISTS`, as on its own, and leaves no
//! claim behind.
//!
//! A batch takes its request ids in (tenant, request id) order, all before the first name, and
//! its names in (tenant, name) order, so batches and single creates never wait for each other
//! in a cycle. Should a batch fail all the same (a deadlock, a lost connection), its creates run
//! on their own.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use prost::Message;
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use super::convert;
use super::errors::ApiError;
use super::instances::work_spec;
use super::proto::Instance;
use super::wake::WorkerWaker;
use crate::queue::{self, NewWork};
use crate::store::api_requests::{Settle, api_requests_settle};
use crate::store::instances::{ClaimedCreate, ClaimedInsert, instances_insert_claimed};
use crate::store::{self, StoreError};

/// The method name stored with a Create's request id (as the one-request path stores it).
pub const CREATE_METHOD: &str = "CreateInstance";

/// Default number of batch executors (concurrent batch transactions): one runs its statements
/// while the other waits for its commit to reach the disk. More executors make smaller batches;
/// on the 2-core benchmark machine 2 beat 4 (see the README's `bench api` figures).
pub const DEFAULT_EXECUTORS: usize = 2;
/// Default largest batch.
pub const DEFAULT_MAX_BATCH: usize = 256;

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
}

/// How a batch settled one Create.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    /// Created and committed: the answer (also stored under the request id).
    Created(Box<Instance>),
    /// The tenant has a live instance of that name: `ALREADY_EXISTS`; nothing was written.
    NameTaken,
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
    /// Starts `executors` executors (at least one) on `pool` that enqueue units of
    /// `create_kind`, batches of at most `max_batch`; they end when the last clone of the
    /// batcher is dropped.
    ///
    /// The executors run on a thread of their own (one runtime for all of them): each batch
    /// waits for the database five times, and on the server's runtime every such wake-up would
    /// queue behind the tasks of all the requests in flight.
    pub fn start(
        pool: PgPool,
        create_kind: String,
        executors: usize,
        max_batch: usize,
        waker: WorkerWaker,
    ) -> Self {
        let max_batch = max_batch.max(1);
        let executors = executors.max(1);
        let (jobs, rx) = mpsc::channel::<Job>(max_batch * executors * 4);
        let rx = Arc::new(Mutex::new(rx));
        let kind: Arc<str> = create_kind.into();
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
    kind: Arc<str>,
    max_batch: usize,
    waker: WorkerWaker,
) {
    let mut conn = None;
    loop {
        let mut jobs = Vec::new();
        {
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut jobs, max_batch).await == 0 {
                return;
            }
        }
        run(&pool, &mut conn, &kind, jobs, &waker).await;
    }
}

/// Runs one batch on the executor's connection `conn` (opened first if `None`; dropped after
/// a failure) and answers each of its jobs.
async fn run(
    pool: &PgPool,
    conn: &mut Option<PgConnection>,
    kind: &str,
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
    let settled = match settle(pool, conn, kind, &creates).await {
        Ok(settled) => {
            crate::metrics::api_create_batch("committed", members.len());
            if settled.iter().any(|s| matches!(s, Settled::Created(_))) {
                waker.wake();
            }
            settled
        }
        Err(e) => {
            // The connection may be broken or in an unknown state: open a new one next time.
            *conn = None;
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
        name_taken = settled
            .iter()
            .filter(|s| matches!(s, Settled::NameTaken))
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

/// The batch's transaction; one answer per create, in order. On an error nothing was
/// committed (the transaction rolls back when dropped), unless the commit itself failed.
async fn settle(
    pool: &PgPool,
    conn: &mut Option<PgConnection>,
    kind: &str,
    creates: &[&NewCreate],
) -> Result<Vec<Settled>, ApiError> {
    let ids: Vec<Uuid> = creates.iter().map(|_| Uuid::new_v4()).collect();
    let claims: Vec<ClaimedCreate<'_>> = creates
        .iter()
        .zip(&ids)
        .map(|(c, id)| ClaimedCreate {
            tenant: &c.tenant,
            request_id: &c.request_id,
            body_hash: &c.body_hash,
            id: *id,
            name: &c.name,
            spec: &c.spec,
        })
        .collect();
    let conn = match conn {
        Some(c) => c,
        None => {
            let mut c = store::connect_dedicated(pool).await?;
            store::use_generic_plans(&mut c).await?;
            conn.insert(c)
        }
    };
    let mut tx = conn.begin().await.map_err(StoreError::from)?;
    let inserted = instances_insert_claimed(&mut tx, CREATE_METHOD, &claims).await?;
    let units: Vec<NewWork> = inserted
        .iter()
        .filter_map(|i| match i {
            ClaimedInsert::Inserted { row, .. } => {
                Some(NewWork::new(kind, work_spec(row, "create")).for_resource(row.id, &row.tenant))
            }
            _ => None,
        })
        .collect();
    let enqueued: HashMap<String, i64> = queue::enqueue_many_quiet(&mut tx, &units)
        .await?
        .into_iter()
        .map(|e| (e.token, e.id))
        .collect();
    let mut units = units.iter();
    let mut settled = Vec::with_capacity(creates.len());
    // (claim, encoded answer or None to release)
    let mut claims: Vec<(String, Option<Vec<u8>>)> = Vec::with_capacity(creates.len());
    for i in inserted {
        match i {
            ClaimedInsert::Seen => settled.push(Settled::Alone),
            ClaimedInsert::NameTaken { claim } => {
                settled.push(Settled::NameTaken);
                claims.push((claim, None));
            }
            ClaimedInsert::Inserted { claim, mut row } => {
                let token = units.next().map(|u| u.token.as_str()).unwrap_or_default();
                let work_id = enqueued.get(token).copied().ok_or_else(|| {
                    ApiError::Internal(format!("unit {token} of a batched create was not queued"))
                })?;
                row.active_work_id = Some(work_id);
                let answer = convert::instance(&row);
                claims.push((claim, Some(answer.encode_to_vec())));
                settled.push(Settled::Created(Box::new(answer)));
            }
        }
    }
    let settles: Vec<Settle<'_>> = claims
        .iter()
        .map(|(claim, answer)| Settle {
            claim,
            response: answer.as_deref(),
        })
        .collect();
    api_requests_settle(&mut tx, &settles).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(settled)
}
