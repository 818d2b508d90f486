//! The generic handler trait: how the engine runs a unit of work of a given kind.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::Deserialize as _;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::context::WorkContext;
use crate::error::AdapterError;

/// A boxed, sendable future: the return type of the object-safe traits in this crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a successful unit hands back to the engine. The engine commits all of it in the unit's
/// completion transaction, and only if the unit still holds its lease.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// A JSON object merged (top-level keys) into the resource's observed state.
    pub observed: Option<Value>,
    /// Units to enqueue next, on the same resource.
    pub follow_ups: Vec<FollowUp>,
    /// What a step of a resource's chain produced (set by the engine's wrapper around a
    /// [`crate::Step`]); the engine records it and enqueues the chain's next step.
    pub step: Option<crate::step::StepResult>,
}

impl Outcome {
    /// Nothing to record, nothing to do next.
    pub fn done() -> Self {
        Self::default()
    }

    /// Merges `observed` (a JSON object) into the resource's observed state.
    pub fn observed(mut self, observed: Value) -> Self {
        self.observed = Some(observed);
        self
    }

    /// Enqueues `follow_up` when this unit completes.
    pub fn then(mut self, follow_up: FollowUp) -> Self {
        self.follow_ups.push(follow_up);
        self
    }
}

/// A unit to enqueue when the current one completes. Its token is derived from the parent's
/// token and `step` ([`crate::IdempotencyToken::derive`]), so `step` must be unique among a
/// unit's follow-ups.
#[derive(Debug, Clone, PartialEq)]
pub struct FollowUp {
    /// The step's name within the workflow, e.g. `"k8s-apply"`.
    pub step: String,
    /// The work kind that runs it.
    pub kind: String,
    /// The unit's spec, checked by the kind's handler.
    pub spec: Value,
    /// Run no sooner than this after the completion.
    pub delay: Option<Duration>,
}

impl FollowUp {
    /// A follow-up to run as soon as possible.
    pub fn new(step: impl Into<String>, kind: impl Into<String>, spec: Value) -> Self {
        Self {
            step: step.into(),
            kind: kind.into(),
            spec,
            delay: None,
        }
    }

    /// Runs the follow-up no sooner than `delay` after the completion.
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

/// Runs units of one work kind. Registered with the engine under [`Handler::kind`].
///
/// A handler must be safe to run again for the same token at any time (the engine runs a unit
/// at least once): observe what an earlier attempt made, by token, before making anything.
pub trait Handler: Send + Sync + 'static {
    /// The work kind this handler runs, e.g. `"ec2.ensure-instance"`.
    fn kind(&self) -> &str;

    /// Runs one attempt of a unit. `spec` is the unit's JSON spec as enqueued.
    fn handle<'a>(
        &'a self,
        ctx: &'a WorkContext,
        spec: &'a Value,
    ) -> BoxFuture<'a, Result<Outcome, AdapterError>>;
}

/// A handler whose spec is a typed value: implement this and register it with [`typed`].
///
/// A spec that does not deserialize into [`TypedHandler::Spec`] fails permanently with a
/// message naming the kind and the serde error, so a malformed unit is parked, not retried.
pub trait TypedHandler: Send + Sync + 'static {
    /// The spec of this kind's units.
    type Spec: DeserializeOwned + Send;

    /// The work kind this handler runs.
    const KIND: &'static str;

    /// Runs one attempt of a unit.
    fn run(
        &self,
        ctx: &WorkContext,
        spec: Self::Spec,
    ) -> impl Future<Output = Result<Outcome, AdapterError>> + Send;
}

/// Wraps a [`TypedHandler`] as a [`Handler`].
pub fn typed<T: TypedHandler>(handler: T) -> Typed<T> {
    Typed(handler)
}

/// A [`TypedHandler`] seen as a [`Handler`]; made by [`typed`].
#[derive(Debug)]
pub struct Typed<T>(pub T);

impl<T: TypedHandler> Handler for Typed<T> {
    fn kind(&self) -> &str {
        T::KIND
    }

    fn handle<'a>(
        &'a self,
        ctx: &'a WorkContext,
        spec: &'a Value,
    ) -> BoxFuture<'a, Result<Outcome, AdapterError>> {
        Box::pin(async move {
            let spec = T::Spec::deserialize(spec).map_err(|e| {
                AdapterError::permanent(format!(
                    "the spec of this {} unit is not valid for its kind: {e}",
                    T::KIND
                ))
                .with_code("invalid-spec")
            })?;
            self.0.run(ctx, spec).await
        })
    }
}
