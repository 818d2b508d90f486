//! Batched, fenced completion of successful units.
//!
//! Handlers finish one by one; committing each in its own transaction would cap throughput at
//! the database's commit rate. The completer gathers what finished while the previous batch was
//! committing and completes it in one transaction: the fenced delete with `succeeded` events,
//! the follow-up units, and the resource hooks — all or nothing, and only for attempts this
//! worker still holds.
//!
//! A batch that fails to commit is retried for as long as its attempts hold their units: the
//! heartbeat keeps renewing an attempt until its completion is written, so a unit that ran
//! longer than one lease is not given up at the first commit error.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use setpoint_adapter::{BoxFuture, Fence, IdempotencyToken, Outcome};
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::hooks::{CompletedUnit, Hooks};
use super::inflight::InFlight;
use crate::store::StoreError;
use crate::store::work::{
    Completion, Lane, NewWork, work_abandon, work_complete_if_leased, work_enqueue,
};

/// A unit whose handler succeeded, waiting to be committed.
#[derive(Debug)]
pub struct Finished {
    /// Row id.
    pub id: i64,
    /// The attempt that ran.
    pub attempt: i32,
    /// Its work kind.
    pub kind: String,
    /// Its spec as enqueued.
    pub spec: Value,
    /// The unit's token (follow-up tokens derive from it).
    pub token: IdempotencyToken,
    /// The unit's resource and tenant.
    pub resource_id: Option<Uuid>,
    /// Tenant of the resource.
    pub tenant: Option<String>,
    /// The lane it ran in; its follow-ups run in the same one.
    pub lane: Lane,
    /// It holds its resource (false: it runs beside it, as a drift check does).
    pub holds_resource: bool,
    /// What the handler returned.
    pub outcome: Outcome,
    /// Event detail: adapter calls, duration.
    pub detail: Value,
    /// The attempt's fence: while it holds, committing is still worth trying.
    pub fence: Fence,
}

/// The database side of completions: a trait so that the retry policy can be tested under
/// tokio's paused clock.
pub trait CompletionStore: Send + Sync + 'static {
    /// Commits `batch` in one transaction; returns how many units were fenced off.
    fn commit<'a>(&'a self, batch: &'a [Finished]) -> BoxFuture<'a, Result<usize, StoreError>>;

    /// Records that `f`'s result was discarded because its attempt lost the unit.
    fn discard<'a>(&'a self, f: &'a Finished) -> BoxFuture<'a, ()>;
}

/// Completions on PostgreSQL, on the runtime's own connections.
pub struct PgCompletions {
    /// The runtime's control pool.
    pub pool: PgPool,
    /// This worker's name in leases.
    pub worker: String,
    /// What completions do to resources.
    pub hooks: Hooks,
}

impl CompletionStore for PgCompletions {
    fn commit<'a>(&'a self, batch: &'a [Finished]) -> BoxFuture<'a, Result<usize, StoreError>> {
        Box::pin(commit(&self.pool, &self.worker, &self.hooks, batch))
    }

    fn discard<'a>(&'a self, f: &'a Finished) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let why = "its result was discarded: the attempt lost its lease before the result \
                       was committed; another attempt redoes the unit";
            let done = async {
                let mut conn = self.pool.acquire().await?;
                work_abandon(
                    &mut conn,
                    &self.worker,
                    f.id,
                    f.attempt,
                    f.token.as_str(),
                    why,
                )
                .await
            };
            if let Err(e) = done.await {
                tracing::warn!(work_id = f.id, token = %f.token, error = %e,
                    "could not record a discarded result");
            }
        })
    }
}

/// Runs until `rx` closes, committing what arrives in batches of at most `max_batch`.
///
/// Batches are formed in lane order, as claims are: of the completions waiting, a user's
/// changes go first, then drift checks, then bulk work, each lane in arrival order. Without
/// it a create's completion waited behind every drift check that finished before it, and a
/// READY that the claim had put first came after a whole drift round.
pub async fn run(
    store: impl CompletionStore,
    inflight: InFlight,
    mut rx: mpsc::Receiver<Finished>,
    max_batch: usize,
) {
    let mut waiting = Waiting::default();
    let mut batch: Vec<Finished> = Vec::with_capacity(max_batch);
    loop {
        if waiting.is_empty() {
            match rx.recv().await {
                Some(f) => waiting.push(f),
                None => return,
            }
        }
        // Everything that finished meanwhile (bounded by the channel's capacity).
        while let Ok(f) = rx.try_recv() {
            waiting.push(f);
        }
        waiting.take(max_batch, &mut batch);
        commit_with_retry(&store, &inflight, &mut batch).await;
        for f in batch.drain(..) {
            inflight.remove((f.id, f.attempt));
        }
    }
}

/// Completions waiting for a batch, one queue per lane.
#[derive(Default)]
struct Waiting {
    lanes: [std::collections::VecDeque<Finished>; 3],
}

impl Waiting {
    fn lane(lane: Lane) -> usize {
        match lane {
            Lane::Change => 0,
            Lane::Drift => 1,
            Lane::Bulk => 2,
        }
    }

    fn push(&mut self, f: Finished) {
        self.lanes[Self::lane(f.lane)].push_back(f);
    }

    fn is_empty(&self) -> bool {
        self.lanes.iter().all(std::collections::VecDeque::is_empty)
    }

    /// Moves up to `max` completions into `batch`, the first lanes first.
    fn take(&mut self, max: usize, batch: &mut Vec<Finished>) {
        for lane in &mut self.lanes {
            while batch.len() < max {
                match lane.pop_front() {
                    Some(f) => batch.push(f),
                    None => break,
                }
            }
        }
    }
}

/// Commits `batch`, retrying while its attempts hold their units. What is left in `batch`
/// when it returns is done with (committed or fenced off); what was given up has already been
/// forgotten.
async fn commit_with_retry(
    store: &impl CompletionStore,
    inflight: &InFlight,
    batch: &mut Vec<Finished>,
) {
    keep_live(store, inflight, batch).await;
    let mut delay = Duration::from_millis(50);
    while !batch.is_empty() {
        match store.commit(batch).await {
            Ok(fenced) => {
                if fenced > 0 {
                    tracing::warn!(fenced, "completions discarded: their leases were lost");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, units = batch.len(), "completing units failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                // Completions are fenced, so retrying the same batch is always safe; once an
                // attempt lost its unit another worker may redo it, so stop holding it.
                keep_live(store, inflight, batch).await;
            }
        }
    }
}

/// Drops from `batch` the attempts that lost their unit (recording the discarded results),
/// and all but the newest attempt of a unit that appears twice.
async fn keep_live(store: &impl CompletionStore, inflight: &InFlight, batch: &mut Vec<Finished>) {
    let mut newest: BTreeMap<i64, i32> = BTreeMap::new();
    for f in batch.iter() {
        let a = newest.entry(f.id).or_insert(f.attempt);
        *a = (*a).max(f.attempt);
    }
    let mut dropped = Vec::new();
    let mut i = 0;
    while i < batch.len() {
        let f = &batch[i];
        if f.fence.is_held() && newest.get(&f.id) == Some(&f.attempt) {
            i += 1;
        } else {
            dropped.push(batch.swap_remove(i));
        }
    }
    for f in dropped {
        tracing::warn!(work_id = f.id, token = %f.token, attempt = f.attempt,
            "result discarded: the attempt lost its lease before the completion was committed; \
             another attempt redoes the unit");
        store.discard(&f).await;
        inflight.remove((f.id, f.attempt));
    }
}

/// Commits `batch`; returns how many units were fenced off.
async fn commit(
    pool: &PgPool,
    worker: &str,
    hooks: &Hooks,
    batch: &[Finished],
) -> Result<usize, StoreError> {
    let completions: Vec<Completion> = batch
        .iter()
        .map(|f| Completion {
            id: f.id,
            attempt: f.attempt,
            detail: crate::store::storable_json(&f.detail),
        })
        .collect();
    let mut tx = pool.begin().await?;
    let done = work_complete_if_leased(&mut tx, worker, &completions).await?;
    let applied: std::collections::HashSet<i64> = done.iter().map(|d| d.id).collect();
    let mut follow_ups = Vec::new();
    let mut completed = Vec::new();
    for f in batch.iter().filter(|f| applied.contains(&f.id)) {
        if let Some(resource) = f.resource_id {
            completed.push(CompletedUnit {
                work_id: f.id,
                kind: &f.kind,
                token: &f.token,
                resource_id: resource,
                tenant: f.tenant.as_deref(),
                spec: &f.spec,
                lane: f.lane,
                holds_resource: f.holds_resource,
                outcome: &f.outcome,
            });
        }
        for step in &f.outcome.follow_ups {
            follow_ups.push(NewWork {
                kind: step.kind.clone(),
                spec: step.spec.clone(),
                token: f.token.derive(&step.step),
                resource_id: f.resource_id,
                tenant: f.tenant.clone(),
                parent_id: Some(f.id),
                run_at: step
                    .delay
                    .and_then(|d| chrono::Duration::from_std(d).ok())
                    .map(|d| Utc::now() + d),
                max_attempts: None,
                fresh_token: false,
                holds_resource: true,
                lane: f.lane,
            });
        }
    }
    work_enqueue(&mut tx, &follow_ups).await?;
    if !completed.is_empty() {
        hooks.completed(&mut tx, &completed).await?;
    }
    tx.commit().await?;
    Ok(batch.len() - applied.len())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::time::Instant;

    use super::*;

    /// The (unit, attempt) pairs of each committed batch.
    type Batches = Arc<Mutex<Vec<Vec<(i64, i32)>>>>;

    /// Fails the first `failures` commits, then commits; counts calls and discards.
    #[derive(Clone, Default)]
    struct Flaky {
        failures: Arc<Mutex<u32>>,
        commits: Batches,
        discarded: Arc<Mutex<Vec<(i64, i32)>>>,
    }

    impl CompletionStore for Flaky {
        fn commit<'a>(&'a self, batch: &'a [Finished]) -> BoxFuture<'a, Result<usize, StoreError>> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let mut left = self.failures.lock().expect("lock");
                if *left > 0 {
                    *left -= 1;
                    return Err(StoreError::Database(sqlx::Error::PoolTimedOut));
                }
                self.commits
                    .lock()
                    .expect("lock")
                    .push(batch.iter().map(|f| (f.id, f.attempt)).collect());
                Ok(0)
            })
        }

        fn discard<'a>(&'a self, f: &'a Finished) -> BoxFuture<'a, ()> {
            Box::pin(async move {
                self.discarded.lock().expect("lock").push((f.id, f.attempt));
            })
        }
    }

    fn finished(id: i64, attempt: i32, fence: Fence) -> Finished {
        Finished {
            id,
            attempt,
            kind: "test".into(),
            spec: Value::Null,
            token: IdempotencyToken::generate(),
            resource_id: None,
            tenant: None,
            lane: Lane::Change,
            holds_resource: true,
            outcome: Outcome::done(),
            detail: Value::Null,
            fence,
        }
    }

    /// Defect 5: the completer gave up on a unit at start + lease, although the heartbeat had
    /// renewed its lease since: a unit that ran longer than one lease was abandoned at the first
    /// commit error and ran again. Now the deadline is the attempt's fence, renewed with the
    /// lease.
    #[tokio::test(start_paused = true)]
    async fn a_renewed_long_unit_is_committed_after_commit_errors() {
        let lease = Duration::from_secs(30);
        let claimed = Instant::now();
        let fence = Fence::until(claimed + lease);
        // The unit ran for 45 s; its lease was renewed meanwhile, at 20 s and at 40 s.
        for _ in 0..2 {
            tokio::time::advance(Duration::from_secs(20)).await;
            fence.extend(Instant::now() + lease);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        let store = Flaky {
            failures: Arc::new(Mutex::new(5)),
            ..Flaky::default()
        };
        let inflight = InFlight::default();
        inflight.insert((1, 1), fence.clone(), Instant::now());
        let mut batch = vec![finished(1, 1, fence)];
        commit_with_retry(&store, &inflight, &mut batch).await;
        assert_eq!(*store.commits.lock().expect("lock"), vec![vec![(1, 1)]]);
        assert!(store.discarded.lock().expect("lock").is_empty());
    }

    /// Renews whatever it is asked to and counts the renewals.
    #[derive(Clone, Default)]
    struct Renewing {
        renewals: Arc<Mutex<u32>>,
    }

    impl super::super::heartbeat::LeaseStore for Renewing {
        fn renew<'a>(
            &'a self,
            units: &'a [super::super::inflight::AttemptKey],
        ) -> BoxFuture<'a, Result<crate::store::work::Renewals, StoreError>> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                *self.renewals.lock().expect("lock") += units.len() as u32;
                Ok(crate::store::work::Renewals {
                    renewed: units.to_vec(),
                    lost: Vec::new(),
                })
            })
        }
    }

    /// Defect 5 with the real heartbeat: a unit that runs 45 s on a 30 s lease is renewed by
    /// the heartbeat all along (the renewals are counted), and its completion, refused five
    /// times by the database, is retried until it commits: never given up at claim + lease.
    #[tokio::test(start_paused = true)]
    async fn a_unit_longer_than_its_lease_is_renewed_and_committed_after_errors() {
        use super::super::heartbeat::{Timing, run as heartbeat};
        let lease = Duration::from_secs(30);
        let timing = Timing {
            interval: Duration::from_secs(10),
            hold: lease - lease / 5,
        };
        let leases = Renewing::default();
        let inflight = InFlight::default();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(heartbeat(
            leases.clone(),
            inflight.clone(),
            timing,
            stop.clone(),
        ));
        // Claimed just after the heartbeat's first (empty) round.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let claimed = Instant::now();
        let fence = Fence::until(claimed + timing.hold);
        inflight.insert((1, 1), fence.clone(), claimed);
        // The handler runs for 45 s: past the lease, and past the fence it was claimed with.
        tokio::time::sleep(Duration::from_secs(45)).await;
        let renewals = *leases.renewals.lock().expect("lock");
        assert!(renewals >= 4, "renewed {renewals} times in 45 s");
        assert!(fence.is_held(), "the renewals kept the attempt's fence");
        let store = Flaky {
            failures: Arc::new(Mutex::new(5)),
            ..Flaky::default()
        };
        let mut batch = vec![finished(1, 1, fence.clone())];
        commit_with_retry(&store, &inflight, &mut batch).await;
        assert_eq!(*store.commits.lock().expect("lock"), vec![vec![(1, 1)]]);
        assert!(store.discarded.lock().expect("lock").is_empty());
        assert!(
            claimed.elapsed() > lease,
            "committed after claim + lease, at {:?}",
            claimed.elapsed()
        );
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn commits_stop_once_the_fence_is_lost() {
        let fence = Fence::until(Instant::now() + Duration::from_secs(1));
        let store = Flaky {
            failures: Arc::new(Mutex::new(1000)),
            ..Flaky::default()
        };
        let inflight = InFlight::default();
        let mut batch = vec![finished(1, 1, fence)];
        commit_with_retry(&store, &inflight, &mut batch).await;
        assert!(batch.is_empty());
        assert!(store.commits.lock().expect("lock").is_empty());
        assert_eq!(*store.discarded.lock().expect("lock"), vec![(1, 1)]);
    }

    /// A user's change finished after a drift round is committed in the first batch.
    #[tokio::test(start_paused = true)]
    async fn batches_are_formed_in_lane_order() {
        let held = || Fence::until(Instant::now() + Duration::from_secs(30));
        let store = Flaky::default();
        let (tx, rx) = mpsc::channel(100);
        for id in 1..=5 {
            let mut f = finished(id, 1, held());
            f.lane = if id == 5 {
                Lane::Change
            } else if id == 1 {
                Lane::Bulk
            } else {
                Lane::Drift
            };
            tx.send(f).await.expect("send");
        }
        drop(tx);
        run(store.clone(), InFlight::default(), rx, 2).await;
        assert_eq!(
            *store.commits.lock().expect("lock"),
            vec![vec![(5, 1), (2, 1)], vec![(3, 1), (4, 1)], vec![(1, 1)]]
        );
    }

    /// Defect 4: a batch holding a stale and a live attempt of one unit kept the first it saw.
    #[tokio::test(start_paused = true)]
    async fn the_newest_attempt_of_a_unit_is_the_one_committed() {
        let held = || Fence::until(Instant::now() + Duration::from_secs(30));
        let store = Flaky::default();
        let inflight = InFlight::default();
        let mut batch = vec![finished(1, 2, held()), finished(1, 3, held())];
        commit_with_retry(&store, &inflight, &mut batch).await;
        assert_eq!(*store.commits.lock().expect("lock"), vec![vec![(1, 3)]]);
        assert_eq!(*store.discarded.lock().expect("lock"), vec![(1, 2)]);
    }
}
