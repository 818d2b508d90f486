//! Batched steps: the units of a [`BatchStep`] that run at the same moment share one call.
//!
//! A drift round claims hundreds of checks at once; each runs as its own unit (own attempt,
//! lease and history), but their step waits here for the others of the same batch key, and
//! one call to the peer observes them all. Each unit then gets back its own item's result and
//! records it as if it had run alone.
//!
//! A gathering is called when it is full, when no item of *any* key joined the batcher for
//! [`BATCH_WINDOW`] (the claims that feed it have paused: the round is over), or
//! [`BATCH_MAX_WAIT`] after its first item, whichever comes first. The quiet window is the
//! batcher's, not the key's: a round claims the checks of many keys (regions) interleaved, so
//! each key's items arrive far apart while the round still runs.
//!
//! An item waiting in a gathering gives its slot of the engine's concurrency back as it joins
//! (up to [`MAX_HELD_BATCHES`] full batches of items per batcher; beyond that an item keeps
//! its slot, and the engine's concurrency bounds the rest). Otherwise a batch could never be
//! larger than the units the engine runs at once (32 in `setpoint dev`) whatever its step
//! declares, and the claims that would fill it could not come while its items hold every slot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use setpoint_adapter::{AdapterError, BatchStep, StepInput, StepResult, WorkContext};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How long the batcher waits for one more item (of any key) before it calls its partial
/// gatherings. A claim's units reach it within milliseconds of each other, and the next claim
/// follows as soon as slots are free; waiting longer only delays a lone check.
pub const BATCH_WINDOW: Duration = Duration::from_millis(100);

/// The longest the first item of a gathering waits, however steadily others keep joining. A
/// drift round claims the checks of every key interleaved: a key's gathering fills only as fast
/// as the whole round is claimed (5,000 checks over 25 regions took a debug engine on two busy
/// cores more than 5 s). A drift check is not urgent, and its lease is renewed while it waits.
pub const BATCH_MAX_WAIT: Duration = Duration::from_secs(30);

/// How many full batches of items one batcher holds without their slots.
pub const MAX_HELD_BATCHES: usize = 50;

type Reply = oneshot::Sender<Result<StepResult, AdapterError>>;

/// Items gathered for one batch key, and which gathering this is (a timer flushes only the
/// gathering it was started for, never a later one under the same key).
struct Gathering {
    round: u64,
    items: Vec<(WorkContext, StepInput)>,
    replies: Vec<Reply>,
    /// How many of its items gave their slot back (counted in [`Open::held`] until the call
    /// ends).
    released: usize,
    /// When the first item joined.
    opened: Instant,
}

/// The open gatherings of a batcher.
#[derive(Default)]
struct Open {
    gatherings: HashMap<String, Gathering>,
    /// When the last item (of any key) joined.
    last: Option<Instant>,
    /// Items waiting (in a gathering or its call) without their slot.
    held: usize,
}

impl Open {
    /// When gathering `g` is due if no other item joins.
    fn due(&self, g: &Gathering, window: Duration, max_wait: Duration) -> Instant {
        let last = self.last.unwrap_or(g.opened);
        (last + window).min(g.opened + max_wait)
    }
}

/// Gathers the items of one batch step into calls of at most `max` items per batch key.
pub struct Batcher {
    work_kind: String,
    step: Arc<dyn BatchStep>,
    max: usize,
    window: Duration,
    max_wait: Duration,
    open: Mutex<Open>,
    rounds: AtomicU64,
}

impl Batcher {
    /// A batcher running `step` (registered for `work_kind`) with at most `max` items per call.
    pub fn new(work_kind: impl Into<String>, step: Arc<dyn BatchStep>, max: usize) -> Arc<Self> {
        Arc::new(Self {
            work_kind: work_kind.into(),
            step,
            max: max.max(1),
            window: BATCH_WINDOW,
            max_wait: BATCH_MAX_WAIT,
            open: Mutex::default(),
            rounds: AtomicU64::new(0),
        })
    }

    /// Runs the step for one item, in a call shared with the other items of its batch key
    /// that arrive while the gathering is open (see the module), and returns this item's
    /// result. The item gives its slot back while it waits, unless the batcher already holds
    /// [`MAX_HELD_BATCHES`] batches of items. The call runs on its own task: a unit that stops
    /// waiting (its attempt was fenced off) does not cut the call short for the others.
    ///
    /// # Errors
    /// This item's error; a transient error if the batch call ended without answering it.
    pub async fn run(
        self: &Arc<Self>,
        ctx: &WorkContext,
        input: &StepInput,
    ) -> Result<StepResult, AdapterError> {
        let key = self.step.batch_key(input);
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let (full, timer) = {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            open.last = Some(now);
            let release = open.held < self.max.saturating_mul(MAX_HELD_BATCHES);
            if release {
                open.held += 1;
                ctx.slot.release();
            }
            let g = open
                .gatherings
                .entry(key.clone())
                .or_insert_with(|| Gathering {
                    round: self.rounds.fetch_add(1, Ordering::Relaxed),
                    items: Vec::new(),
                    replies: Vec::new(),
                    released: 0,
                    opened: now,
                });
            g.items.push((ctx.clone(), input.clone()));
            g.replies.push(tx);
            g.released += usize::from(release);
            let first = g.items.len() == 1;
            if g.items.len() >= self.max {
                (open.gatherings.remove(&key), None)
            } else {
                (None, first.then_some(g.round))
            }
        };
        if let Some(g) = full {
            tokio::spawn(self.clone().call(g));
        } else if let Some(round) = timer {
            tokio::spawn(self.clone().flush_when_due(key, round));
        }
        rx.await.unwrap_or_else(|_| {
            Err(AdapterError::transient(
                "the batched call ended without an answer for this item",
            ))
        })
    }

    /// Calls gathering `round` of `key` once it is due, unless it was called full before.
    async fn flush_when_due(self: Arc<Self>, key: String, round: u64) {
        loop {
            let due = {
                let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
                match open.gatherings.get(&key) {
                    Some(g) if g.round == round => open.due(g, self.window, self.max_wait),
                    _ => return,
                }
            };
            tokio::time::sleep_until(due).await;
            let ready = {
                let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
                match open.gatherings.get(&key) {
                    Some(g) if g.round == round => {
                        if open.due(g, self.window, self.max_wait) <= Instant::now() {
                            open.gatherings.remove(&key)
                        } else {
                            // Another item joined meanwhile: wait on from it.
                            None
                        }
                    }
                    _ => return,
                }
            };
            if let Some(g) = ready {
                self.call(g).await;
                return;
            }
        }
    }

    /// Makes one call for `g` and hands each item its result.
    async fn call(self: Arc<Self>, g: Gathering) {
        let Gathering {
            items,
            replies,
            released,
            ..
        } = g;
        let n = items.len();
        let started = std::time::Instant::now();
        let mut results = self.step.run_batch(&items).await;
        {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            open.held = open.held.saturating_sub(released);
        }
        crate::metrics::batch_call(&self.work_kind, n);
        tracing::debug!(work_kind = %self.work_kind, items = n,
            elapsed_ms = started.elapsed().as_millis() as u64, "batched step call");
        if results.len() != n {
            tracing::error!(work_kind = %self.work_kind, items = n, results = results.len(),
                "a batch step answered a different number of items than it was given");
            results = (0..n)
                .map(|_| {
                    Err(AdapterError::transient(
                        "the batch step answered a different number of items than it was given",
                    ))
                })
                .collect();
        }
        for (reply, result) in replies.into_iter().zip(results) {
            // A unit that stopped waiting has dropped its receiver: nothing to hand it.
            let _ = reply.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicUsize;

    use serde_json::json;
    use setpoint_adapter::{
        BoxFuture, IdempotencyToken, MemoryJournal, ResourceRef, Secrets, Slot, StepResult,
    };
    use uuid::Uuid;

    use super::*;

    /// Answers each item with its resource name as output; keys by the spec's `region`.
    #[derive(Default)]
    struct Echo {
        calls: AtomicUsize,
        sizes: Mutex<Vec<usize>>,
    }

    impl BatchStep for Echo {
        fn batch_key(&self, input: &StepInput) -> String {
            input.spec["region"].as_str().unwrap_or_default().to_owned()
        }

        fn run_batch<'a>(
            &'a self,
            items: &'a [(WorkContext, StepInput)],
        ) -> BoxFuture<'a, Vec<Result<StepResult, AdapterError>>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                self.sizes.lock().unwrap().push(items.len());
                items
                    .iter()
                    .map(|(ctx, i)| {
                        if i.resource.name == "broken" {
                            Err(AdapterError::permanent("broken"))
                        } else {
                            Ok(StepResult::next().output(json!([i.resource.name, ctx.work_id])))
                        }
                    })
                    .collect()
            })
        }
    }

    fn item(n: i64, name: &str, region: &str) -> (WorkContext, StepInput) {
        let ctx = WorkContext::new(
            n,
            "test.observe",
            IdempotencyToken::parse(format!("tok-{n}")).unwrap(),
            1,
            std::time::Instant::now() + Duration::from_secs(30),
            Arc::new(MemoryJournal::default()),
        );
        let input = StepInput {
            resource: ResourceRef {
                id: Uuid::new_v4(),
                tenant: "acme".into(),
                kind: "test.thing".into(),
                name: name.into(),
                generation: 1,
            },
            chain: "observe".into(),
            step: "observe".into(),
            spec: json!({ "region": region }),
            outputs: BTreeMap::new(),
            secrets: Secrets::default(),
        };
        (ctx, input)
    }

    #[tokio::test]
    async fn items_arriving_together_share_calls_per_key_and_get_their_own_results() {
        let step = Arc::new(Echo::default());
        let b = Batcher::new("test.observe", step.clone(), 4);
        let mut tasks = Vec::new();
        for n in 0..10 {
            let b = b.clone();
            let region = if n % 2 == 0 { "a" } else { "b" };
            let name = if n == 3 {
                "broken".to_owned()
            } else {
                format!("r{n}")
            };
            tasks.push(tokio::spawn(async move {
                let (ctx, input) = item(n, &name, region);
                (n, b.run(&ctx, &input).await)
            }));
        }
        for t in tasks {
            let (n, r) = t.await.unwrap();
            if n == 3 {
                assert_eq!(r.unwrap_err().message, "broken");
            } else {
                assert_eq!(r.unwrap().output, Some(json!([format!("r{n}"), n])));
            }
        }
        // Five items per key, at most four per call: two calls per key.
        assert_eq!(step.calls.load(Ordering::SeqCst), 4);
        let mut sizes = step.sizes.lock().unwrap().clone();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![1, 1, 4, 4]);
    }

    #[tokio::test]
    async fn a_lone_item_runs_after_the_window() {
        let step = Arc::new(Echo::default());
        let b = Batcher::new("test.observe", step.clone(), 100);
        let (ctx, input) = item(7, "solo", "a");
        let r = b.run(&ctx, &input).await.unwrap();
        assert_eq!(r.output, Some(json!(["solo", 7])));
        // A second gathering under the same key is a new call.
        let r = b.run(&ctx, &input).await.unwrap();
        assert_eq!(r.output, Some(json!(["solo", 7])));
        assert_eq!(step.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn items_joining_steadily_keep_the_gathering_open_until_it_is_full() {
        let step = Arc::new(Echo::default());
        let b = Batcher::new("test.observe", step.clone(), 8);
        let mut tasks = Vec::new();
        // Ten items 15 ms apart: each joins within the window of the one before.
        for n in 0..10 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(15 * n as u64)).await;
                let (ctx, input) = item(n, &format!("r{n}"), "a");
                b.run(&ctx, &input).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(
            *step.sizes.lock().unwrap(),
            vec![8, 2],
            "full at 8, then the rest"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_is_called_at_the_longest_wait() {
        let step = Arc::new(Echo::default());
        let b = Batcher::new("test.observe", step.clone(), 10_000);
        let every = Duration::from_millis(20);
        let n = (BATCH_MAX_WAIT.as_millis() / every.as_millis()) as usize + 50;
        let mut tasks = Vec::new();
        // An item every 20 ms for longer than the longest wait: the first gathering is called
        // at BATCH_MAX_WAIT, the rest once the stream ends.
        for i in 0..n {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(every * i as u32).await;
                let (ctx, input) = item(i as i64, &format!("r{i}"), "a");
                b.run(&ctx, &input).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let sizes = step.sizes.lock().unwrap().clone();
        let wait_items = (BATCH_MAX_WAIT.as_millis() / every.as_millis()) as usize;
        assert_eq!(sizes.len(), 2, "{sizes:?}");
        assert!(
            sizes[0].abs_diff(wait_items) <= 1,
            "the first call takes what joined within {BATCH_MAX_WAIT:?}: {sizes:?}"
        );
        assert_eq!(sizes.iter().sum::<usize>(), n);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_interleaved_in_one_stream_each_fill_their_own_call() {
        let step = Arc::new(Echo::default());
        let b = Batcher::new("test.observe", step.clone(), 1000);
        // Two keys alternating every 60 ms: each key's items are 120 ms apart, longer than the
        // window, but the batcher hears of an item every 60 ms, so the round is not over.
        let gap = Duration::from_millis(60);
        assert!(gap < BATCH_WINDOW && gap * 2 > BATCH_WINDOW);
        let mut tasks = Vec::new();
        for i in 0..20u32 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(gap * i).await;
                let region = if i % 2 == 0 { "a" } else { "b" };
                let (ctx, input) = item(i64::from(i), &format!("r{i}"), region);
                b.run(&ctx, &input).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(
            *step.sizes.lock().unwrap(),
            vec![10, 10],
            "one call per key"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn items_waiting_in_a_gathering_hold_no_slot() {
        let step = Arc::new(Echo::default());
        let b = Batcher::new("test.observe", step.clone(), 100);
        // Three slots, as an engine running three units at once; ten items, each run only
        // once it holds a slot, as the engine's claims do.
        let slots = Arc::new(tokio::sync::Semaphore::new(3));
        let mut tasks = Vec::new();
        for n in 0..10 {
            let permit = slots.clone().acquire_owned().await.unwrap();
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                let (ctx, input) = item(n, &format!("r{n}"), "a");
                let ctx = ctx.with_slot(Slot::holding(permit));
                let r = b.run(&ctx, &input).await;
                ctx.slot.release();
                r
            }));
            tokio::task::yield_now().await;
        }
        assert_eq!(
            slots.available_permits(),
            3,
            "waiting items gave their slots back"
        );
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(
            *step.sizes.lock().unwrap(),
            vec![10],
            "one call for all ten"
        );
        assert_eq!(b.open.lock().unwrap().held, 0);
    }
}
