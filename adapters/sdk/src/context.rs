//! What a handler knows about the unit of work it runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::journal::Journal;
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
}

impl WorkContext {
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
