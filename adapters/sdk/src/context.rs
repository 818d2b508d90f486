//! What a handler knows about the unit of work it runs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::budget::{Budget, BudgetKey, Budgets, Limit, Unlimited};
use crate::fence::Fence;
use crate::journal::Journal;
use crate::slot::Slot;
use crate::token::IdempotencyToken;

/// The unit of work a handler is running: its identity, its attempt and its deadline.
///
/// The engine keeps the unit's lease alive while the handler runs (heartbeat), up to
/// [`WorkContext::deadline`]; past it the engine stops waiting and treats the attempt as a
/// transient failure, so a handler that polls (e.g. for an instance to become `running`) should
/// stop in time and return a transient error or a follow-up.
#[derive(Clone)]
pub struct WorkContext {
    /// The work row's id (stable across retries).
    pub work_id: i64,
    /// The work kind the unit was dispatched by.
    pub kind: String,
    /// The unit's idempotency token; pass it to every call that changes the world.
    pub token: IdempotencyToken,
    /// The resource (instance) the unit works on, if any.
    pub resource_id: Option<Uuid>,
    /// The tenant owning the resource, if any.
    pub tenant: Option<String>,
    /// 1 on the first run, 2 on the first retry, and so on.
    pub attempt: i32,
    /// When the engine stops waiting for this attempt.
    pub deadline: Instant,
    /// Durable at-most-once records for side effects that cannot be made idempotent.
    pub journal: Arc<dyn Journal>,
    /// Whether this attempt still holds the unit: check it immediately before every side
    /// effect ([`Fence::check`]). Unbounded unless the engine sets one ([`WorkContext::with_fence`]).
    pub fence: Fence,
    /// Where request budgets come from: the engine's, shared by every engine through
    /// PostgreSQL; [`Unlimited`] unless the engine sets it ([`WorkContext::with_budgets`]).
    /// A handler takes a token before each call to its peer ([`WorkContext::budget`]).
    pub budgets: Arc<dyn Budgets>,
    /// The unit's slot among the units its engine runs at once: a handler that only waits for
    /// work done on its behalf elsewhere may take it or give it back (see [`Slot`]). Empty
    /// unless the engine sets it ([`WorkContext::with_slot`]).
    pub slot: Slot,
    /// Adapter calls made by this attempt, recorded in the unit's history when it ends.
    calls: Arc<Mutex<Vec<String>>>,
}

impl WorkContext {
    /// A context for one attempt of a unit. The engine builds these; adapter tests build their
    /// own (with a [`crate::MemoryJournal`]).
    pub fn new(
        work_id: i64,
        kind: impl Into<String>,
        token: IdempotencyToken,
        attempt: i32,
        deadline: Instant,
        journal: Arc<dyn Journal>,
    ) -> Self {
        Self {
            work_id,
            kind: kind.into(),
            token,
            resource_id: None,
            tenant: None,
            attempt,
            deadline,
            journal,
            fence: Fence::unbounded(),
            budgets: Arc::new(Unlimited),
            slot: Slot::default(),
            calls: Arc::default(),
        }
    }

    /// Sets the resource the unit works on.
    pub fn with_resource(mut self, resource_id: Uuid, tenant: Option<String>) -> Self {
        self.resource_id = Some(resource_id);
        self.tenant = tenant;
        self
    }

    /// Sets the attempt's fence (the engine does, from the unit's lease).
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// Sets where the unit's request budgets come from (the engine does).
    pub fn with_budgets(mut self, budgets: Arc<dyn Budgets>) -> Self {
        self.budgets = budgets;
        self
    }

    /// Sets the unit's slot (the engine does, holding its concurrency permit).
    pub fn with_slot(mut self, slot: Slot) -> Self {
        self.slot = slot;
        self
    }

    /// The budget `key` at `limit`, drawn from [`WorkContext::budgets`]: take a token with
    /// `ctx.budget(key, limit).take().await?` (a waiting error when there is none), or wrap the
    /// call with [`Budget::call`] so that a throttling answer lowers the shared rate too.
    pub fn budget(&self, key: BudgetKey, limit: Limit) -> Budget {
        Budget::new(self.budgets.clone(), key, limit)
    }

    /// Records that the adapter is about to call `call` (e.g. `"ec2:RunInstances"`) with this
    /// unit's token; the engine writes the list into the unit's history (`work_events`).
    pub fn record_call(&self, call: impl Into<String>) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call.into());
        }
    }

    /// The calls recorded so far by [`WorkContext::record_call`].
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Time left before [`WorkContext::deadline`] (zero once it has passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

impl std::fmt::Debug for WorkContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkContext")
            .field("work_id", &self.work_id)
            .field("kind", &self.kind)
            .field("token", &self.token)
            .field("resource_id", &self.resource_id)
            .field("tenant", &self.tenant)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}
