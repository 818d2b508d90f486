//! Steps of a resource's chains: what the engine hands a step, and what a step hands back.
//!
//! The engine runs each step of a [`crate::kind::ResourceKind`]'s chain as a unit of work. A
//! [`Step`] gets the resource (identity, generation), its spec, and the outputs recorded by
//! earlier steps (visible ones and, decrypted, secret ones); it returns its own output and
//! what comes next. The engine commits the output, the conditions and the next step in the
//! unit's fenced completion: a step never reads or writes the database itself.
//!
//! A step follows every rule of a [`crate::Handler`]: it runs at least once with the same
//! token (observe before act), classifies its errors, and checks `ctx.fence` before every side
//! effect.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;
use uuid::Uuid;

use crate::context::WorkContext;
use crate::error::AdapterError;
use crate::handler::BoxFuture;

/// The resource a step works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRef {
    /// Its id.
    pub id: Uuid,
    /// Its tenant.
    pub tenant: String,
    /// Its kind (`dns.zone`).
    pub kind: String,
    /// Its name within the tenant and kind.
    pub name: String,
    /// The spec generation this chain works towards.
    pub generation: i64,
}

/// Secret values (passwords, keys), by output name. `Debug` shows the names only; the values
/// never reach a log.
#[derive(Clone, Default, PartialEq)]
pub struct Secrets(pub BTreeMap<String, Value>);

impl Secrets {
    /// The secret output `name`, if recorded.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// What the engine hands a step.
#[derive(Debug, Clone)]
pub struct StepInput {
    /// The resource.
    pub resource: ResourceRef,
    /// The chain being run: `create`, `update`, `delete`, `observe`, or a named chain.
    pub chain: String,
    /// This step's name in the chain.
    pub step: String,
    /// The desired spec (valid against the kind's schema, at its current version).
    pub spec: Value,
    /// The visible outputs recorded so far, by output name (this chain's earlier steps, and
    /// earlier chains': a delete sees what the create recorded).
    pub outputs: BTreeMap<String, Value>,
    /// The secret outputs recorded so far, decrypted, by output name.
    pub secrets: Secrets,
}

impl StepInput {
    /// The visible output `name`, deserialised as `T`; `None` when absent or of another shape.
    pub fn output<T: serde::de::DeserializeOwned>(&self, name: &str) -> Option<T> {
        self.outputs
            .get(name)
            .cloned()
            .and_then(|v| serde_json::from_value(v).ok())
    }

    /// The spec as `T`.
    ///
    /// # Errors
    /// A permanent error naming the kind when the spec does not deserialise (a bug: the engine
    /// validated it against the schema).
    pub fn spec<T: serde::de::DeserializeOwned>(&self) -> Result<T, AdapterError> {
        serde_json::from_value(self.spec.clone()).map_err(|e| {
            AdapterError::permanent(format!(
                "the spec of {} {} does not fit its step {:?}: {e}",
                self.resource.kind, self.resource.name, self.step
            ))
            .with_code("invalid-spec")
        })
    }
}

/// Whether a condition holds (as in Kubernetes status conditions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConditionStatus {
    /// It holds.
    True,
    /// It does not hold.
    False,
    /// Not known (yet).
    Unknown,
}

/// A condition a step sets on its resource: the engine records it with its generation and the
/// time its status last changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionUpdate {
    /// What the condition is about (`MachineAvailable`).
    pub kind: String,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// A CamelCase reason, for programs.
    pub reason: String,
    /// A sentence for the resource's owner: no provider error text, no secrets.
    pub message: String,
}

/// What comes after a step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Then {
    /// The chain's next step (or the chain's end after its last).
    #[default]
    Next,
    /// End this chain and run the kind's chain of this name (an observe step that found drift
    /// starts `heal`).
    Chain(String),
    /// End the chain here.
    End,
}

/// What a step hands back.
#[derive(Clone, Default, PartialEq)]
pub struct StepResult {
    /// Shown to the resource's tenant (Get, List, Watch), kept under the step's output name.
    pub output: Option<Value>,
    /// Kept encrypted under the step's output name; handed to later steps and to the tenant's
    /// connection-details call only. Never shown, listed, logged or watched.
    pub secret: Option<Value>,
    /// Conditions to set on the resource.
    pub conditions: Vec<ConditionUpdate>,
    /// What comes next.
    pub then: Then,
}

impl StepResult {
    /// Nothing recorded; the chain goes on.
    pub fn next() -> Self {
        Self::default()
    }

    /// Records `output` (visible).
    pub fn output(mut self, output: Value) -> Self {
        self.output = Some(output);
        self
    }

    /// Records `secret` (encrypted).
    pub fn secret(mut self, secret: Value) -> Self {
        self.secret = Some(secret);
        self
    }

    /// Sets a condition.
    pub fn condition(
        mut self,
        kind: impl Into<String>,
        status: ConditionStatus,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        self.conditions.push(ConditionUpdate {
            kind: kind.into(),
            status,
            reason: reason.into(),
            message: message.into(),
        });
        self
    }

    /// Says what comes next.
    pub fn then(mut self, then: Then) -> Self {
        self.then = then;
        self
    }
}

impl fmt::Debug for StepResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepResult")
            .field("output", &self.output)
            .field("secret", &self.secret.as_ref().map(|_| "<secret>"))
            .field("conditions", &self.conditions)
            .field("then", &self.then)
            .finish()
    }
}

/// Runs one step of a kind's chains. A plugin registers it with the engine under the work
/// kind a [`crate::kind::StepDecl`] names (one implementation may serve several steps).
pub trait Step: Send + Sync + 'static {
    /// Runs one attempt of the step.
    fn run<'a>(
        &'a self,
        ctx: &'a WorkContext,
        input: &'a StepInput,
    ) -> BoxFuture<'a, Result<StepResult, AdapterError>>;
}

/// Runs one step for many resources with one call to its peer: a drift check that observes
/// every machine of a region with one describe instead of one describe per machine. A kind
/// declares such a step with [`crate::kind::StepDecl::batched`] and a plugin registers it with
/// the engine as a batch step.
///
/// The engine gathers the units of the step that run at the same moment (a drift round claims
/// many at once), grouped by [`BatchStep::batch_key`], into calls of at most the declared
/// number of items, and records each item's result for its own unit as if the step had run for
/// it alone: its output, conditions, next chain, or its error (retried or parked like any
/// other). Meant for steps that change nothing (observation): a batch runs on behalf of every
/// unit in it, under no single unit's fence.
pub trait BatchStep: Send + Sync + 'static {
    /// Items with the same key may share a call (the region, the account, the endpoint).
    fn batch_key(&self, input: &StepInput) -> String;

    /// Runs the step for every item: one result per item, in the order of `items`. An item's
    /// [`WorkContext`] is its own unit's (token, attempt, recorded calls).
    fn run_batch<'a>(
        &'a self,
        items: &'a [(WorkContext, StepInput)],
    ) -> BoxFuture<'a, Vec<Result<StepResult, AdapterError>>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug() {
        let r = StepResult::next().secret(serde_json::json!({"password": "hunter2"}));
        assert!(!format!("{r:?}").contains("hunter2"));
        let s = Secrets(BTreeMap::from([(
            "credentials".to_owned(),
            serde_json::json!("hunter2"),
        )]));
        let d = format!("{s:?}");
        assert!(d.contains("credentials") && !d.contains("hunter2"), "{d}");
    }
}
