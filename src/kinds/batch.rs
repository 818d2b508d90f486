//! Batched steps: the units of a [`BatchStep`] that run at the same moment share one call.
//!
//! A drift round claims hundreds of checks at once; each runs as its own unit (own attempt,
//! lease and history), but their step waits here a short moment for the others of the same
//! batch key, and one call to the peer observes them all. Each unit then gets back its own
//! item's result and records it as if it had run alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use setpoint_adapter::{AdapterError, BatchStep, StepInput, StepResult, WorkContext};
use tokio::sync::oneshot;

/// How long the first item of a batch waits for others. The units of one claim start within
/// a few milliseconds of each other; waiting longer only delays a lone check.
pub const BATCH_WINDOW: Duration = Duration::from_millis(20);

type Reply = oneshot::Sender<Result<StepResult, AdapterError>>;

/// Items gathered for one batch key, and which gathering this is (a timer flushes only the
/// gathering it was started for, never a later one under the same key).
#[derive(Default)]
struct Gathering {
    round: u64,
    items: Vec<(WorkContext, StepInput)>,
    replies: Vec<Reply>,
}

/// Gathers the items of one batch step into calls of at most `max` items per batch key.
pub struct Batcher {
    work_kind: String,
    step: Arc<dyn BatchStep>,
    max: usize,
    window: Duration,
    open: Mutex<HashMap<String, Gathering>>,
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
            open: Mutex::default(),
            rounds: AtomicU64::new(0),
        })
    }

    /// Runs the step for one item, in a call shared with the other items of its batch key
    /// that arrive within the window (or until the batch is full), and returns this item's
    /// result. The call runs on its own task: a unit that stops waiting (its attempt was
    /// fenced off) does not cut the call short for the others.
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
        let (full, timer) = {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            let g = open.entry(key.clone()).or_insert_with(|| Gathering {
                round: self.rounds.fetch_add(1, Ordering::Relaxed),
                ..Gathering::default()
            });
            g.items.push((ctx.clone(), input.clone()));
            g.replies.push(tx);
            let first = g.items.len() == 1;
            if g.items.len() >= self.max {
                let g = open.remove(&key).unwrap_or_default();
                (Some(g), None)
            } else {
                (None, first.then_some(g.round))
            }
        };
        if let Some(g) = full {
            tokio::spawn(self.clone().call(g));
        } else if let Some(round) = timer {
            let this = self.clone();
            let key = key.clone();
            tokio::spawn(async move {
                tokio::time::sleep(this.window).await;
                let due = {
                    let mut open = this.open.lock().unwrap_or_else(PoisonError::into_inner);
                    match open.get(&key) {
                        Some(g) if g.round == round => open.remove(&key),
                        _ => None,
                    }
                };
                if let Some(g) = due {
                    this.call(g).await;
                }
            });
        }
        rx.await.unwrap_or_else(|_| {
            Err(AdapterError::transient(
                "the batched call ended without an answer for this item",
            ))
        })
    }

    /// Makes one call for `g` and hands each item its result.
    async fn call(self: Arc<Self>, g: Gathering) {
        let n = g.items.len();
        let started = std::time::Instant::now();
        let mut results = self.step.run_batch(&g.items).await;
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
        for (reply, result) in g.replies.into_iter().zip(results) {
            // A unit that stopped waiting has dropped its receiver: nothing to hand it.
            let _ = reply.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    use serde_json::json;
    use setpoint_adapter::{
        BoxFuture, IdempotencyToken, MemoryJournal, ResourceRef, Secrets, StepResult,
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
            Instant::now() + Duration::from_secs(30),
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
}
