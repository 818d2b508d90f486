//! Kinds of resources: what a plugin offers API consumers, declared rather than written into the
//! engine.
//!
//! A [`ResourceKind`] names a kind (`dns.zone`), its collection in resource names
//! (`tenants/{tenant}/zones/{name}`), a JSON Schema (draft 2020-12) of its spec, which spec
//! fields cannot change after create, and the chains of steps that create, update and delete
//! a resource of the kind (plus an optional observe step for drift, and named chains that a
//! step may start, such as a heal). Each step names the work kind of the [`crate::Step`] that
//! runs it. The engine validates specs against the schema, runs the chains one unit per step,
//! and keeps each step's output under the step's output name.
//!
//! ```
//! use serde_json::json;
//! use setpoint_adapter::kind::{ResourceKind, StepDecl};
//!
//! let zone = ResourceKind::new("dns.zone", "zones")
//!     .describe("A hosted zone and its records")
//!     .schema(1, json!({
//!         "type": "object",
//!         "required": ["name"],
//!         "properties": { "name": { "type": "string" } },
//!         "additionalProperties": false
//!     }))
//!     .immutable(["name"])
//!     .create([StepDecl::new("zone", "dns.zone.ensure"), StepDecl::new("records", "dns.records.sync")])
//!     .update([StepDecl::new("records", "dns.records.sync")])
//!     .delete([StepDecl::new("delete", "dns.zone.delete")]);
//! assert_eq!(zone.name, "dns.zone");
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

/// How stored specs written for an older version of a kind's schema become specs of the current
/// version: called with the version the spec was written for and the spec, it returns the spec
/// for the next version (the engine calls it once per version step). An error is a message a
/// person can act on; the engine then refuses to change the resource until an operator fixes it.
pub type SpecUpgrade = Arc<dyn Fn(u32, Value) -> Result<Value, String> + Send + Sync>;

/// Rules of a kind that its JSON Schema cannot say (a size that may only grow, values that
/// depend on each other): called with the stored spec (`None` on create) and the new one,
/// after the schema passed; returns every violation as (path inside the spec, message).
pub type SpecCheck = Arc<dyn Fn(Option<&Value>, &Value) -> Vec<(String, String)> + Send + Sync>;

/// One step of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepDecl {
    /// The step's name within its chain (`zone`, `records`): unique in the chain; follow-up
    /// tokens derive from it.
    pub name: String,
    /// The work kind of the [`crate::Step`] that runs it (`dns.zone.ensure`).
    pub work_kind: String,
    /// Where its output is kept on the resource (default: the step's name). Steps of different
    /// chains that produce the same thing (a create's and a heal's `machine`) share a name.
    pub output: String,
    /// True for a step that runs beside the resource instead of holding it (a notification):
    /// the resource reaches its state (READY, DELETED) and takes changes while it runs, and a
    /// failure of it is a condition on the resource, not a failed resource. Only the last
    /// steps of a chain may run beside it.
    pub beside: bool,
    /// For a step beside the resource: the condition (`Notified`) the engine sets on the
    /// resource when the step is parked (`Unknown`) or cancelled (`False`); the step sets it
    /// itself when it succeeds.
    pub condition: Option<String>,
    /// For a step that batches (see [`crate::step::BatchStep`]): the most items one call takes.
    /// Only an observe step may batch.
    pub batch: Option<usize>,
}

impl StepDecl {
    /// A step `name` run by the work kind `work_kind`, holding the resource, whose output is
    /// kept under `name`.
    pub fn new(name: impl Into<String>, work_kind: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            output: name.clone(),
            name,
            work_kind: work_kind.into(),
            beside: false,
            condition: None,
            batch: None,
        }
    }

    /// Keeps the step's output under `output` instead of its name.
    pub fn output(mut self, output: impl Into<String>) -> Self {
        self.output = output.into();
        self
    }

    /// Makes the step a batch step taking at most `max` items per call (see
    /// [`crate::step::BatchStep`]; at least 1).
    pub fn batched(mut self, max: usize) -> Self {
        self.batch = Some(max.max(1));
        self
    }

    /// Makes the step run beside the resource (see [`StepDecl::beside`]); `condition` is the
    /// resource's condition that says how it went (see [`StepDecl::condition`]).
    pub fn beside(mut self, condition: impl Into<String>) -> Self {
        self.beside = true;
        self.condition = Some(condition.into());
        self
    }
}

/// A kind of resource, as a plugin declares it.
#[derive(Clone)]
pub struct ResourceKind {
    /// The kind's name: lower-case words joined by dots (`kvx.instance`, `dns.zone`).
    pub name: String,
    /// The collection in resource names: `tenants/{tenant}/{collection}/{name}`.
    pub collection: String,
    /// One sentence for people browsing the kinds (ListKinds, the console).
    pub description: String,
    /// The JSON Schema (draft 2020-12) every spec must satisfy.
    pub schema: Value,
    /// The schema's version; stored specs carry the version they were written for.
    pub schema_version: u32,
    /// Turns a spec of an older version into one of the next version (see [`SpecUpgrade`]).
    pub upgrade: Option<SpecUpgrade>,
    /// Spec fields (dotted paths: `region`, `network.cidr`) that cannot change after create.
    pub immutable: Vec<String>,
    /// Rules beyond the schema (see [`SpecCheck`]).
    pub check: Option<SpecCheck>,
    /// The steps that create a resource.
    pub create: Vec<StepDecl>,
    /// The steps that apply a changed spec.
    pub update: Vec<StepDecl>,
    /// The steps that remove a resource; "already gone" is success at every step.
    pub delete: Vec<StepDecl>,
    /// The step that checks a ready resource for drift, if any; it may start a named chain.
    pub observe: Option<StepDecl>,
    /// Chains a step may start by name (`heal`).
    pub chains: BTreeMap<String, Vec<StepDecl>>,
    /// True when its steps produce secret outputs: an engine then refuses to start without a
    /// key to seal them with.
    pub secret_outputs: bool,
}

impl ResourceKind {
    /// A kind `name` in collection `collection`, with an empty object schema and no steps.
    pub fn new(name: impl Into<String>, collection: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            collection: collection.into(),
            description: String::new(),
            schema: serde_json::json!({ "type": "object" }),
            schema_version: 1,
            upgrade: None,
            immutable: Vec::new(),
            check: None,
            create: Vec::new(),
            update: Vec::new(),
            delete: Vec::new(),
            observe: None,
            chains: BTreeMap::new(),
            secret_outputs: false,
        }
    }

    /// Says its steps produce secret outputs (see [`ResourceKind::secret_outputs`]).
    pub fn with_secret_outputs(mut self) -> Self {
        self.secret_outputs = true;
        self
    }

    /// Sets the description.
    pub fn describe(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Sets the schema and its version.
    pub fn schema(mut self, version: u32, schema: Value) -> Self {
        self.schema_version = version;
        self.schema = schema;
        self
    }

    /// Sets how stored specs of older versions are upgraded.
    pub fn upgrade(
        mut self,
        upgrade: impl Fn(u32, Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        self.upgrade = Some(Arc::new(upgrade));
        self
    }

    /// Sets the rules beyond the schema.
    pub fn check(
        mut self,
        check: impl Fn(Option<&Value>, &Value) -> Vec<(String, String)> + Send + Sync + 'static,
    ) -> Self {
        self.check = Some(Arc::new(check));
        self
    }

    /// Sets the fields that cannot change after create.
    pub fn immutable<S: Into<String>>(mut self, fields: impl IntoIterator<Item = S>) -> Self {
        self.immutable = fields.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the create chain.
    pub fn create(mut self, steps: impl IntoIterator<Item = StepDecl>) -> Self {
        self.create = steps.into_iter().collect();
        self
    }

    /// Sets the update chain.
    pub fn update(mut self, steps: impl IntoIterator<Item = StepDecl>) -> Self {
        self.update = steps.into_iter().collect();
        self
    }

    /// Sets the delete chain.
    pub fn delete(mut self, steps: impl IntoIterator<Item = StepDecl>) -> Self {
        self.delete = steps.into_iter().collect();
        self
    }

    /// Sets the observe step (drift).
    pub fn observe(mut self, step: StepDecl) -> Self {
        self.observe = Some(step);
        self
    }

    /// Adds a named chain a step may start.
    pub fn chain(
        mut self,
        name: impl Into<String>,
        steps: impl IntoIterator<Item = StepDecl>,
    ) -> Self {
        self.chains.insert(name.into(), steps.into_iter().collect());
        self
    }

    /// The chain called `name`: `create`, `update`, `delete`, `observe` (the observe step
    /// alone) or a named one.
    pub fn chain_steps(&self, name: &str) -> Option<&[StepDecl]> {
        match name {
            "create" => Some(&self.create),
            "update" => Some(&self.update),
            "delete" => Some(&self.delete),
            "observe" => self.observe.as_ref().map(std::slice::from_ref),
            other => self.chains.get(other).map(Vec::as_slice),
        }
    }

    /// Every step of every chain.
    pub fn steps(&self) -> impl Iterator<Item = &StepDecl> {
        self.create
            .iter()
            .chain(&self.update)
            .chain(&self.delete)
            .chain(self.observe.iter())
            .chain(self.chains.values().flatten())
    }
}

impl fmt::Debug for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceKind")
            .field("name", &self.name)
            .field("collection", &self.collection)
            .field("schema_version", &self.schema_version)
            .field("immutable", &self.immutable)
            .field("create", &self.create)
            .field("update", &self.update)
            .field("delete", &self.delete)
            .field("observe", &self.observe)
            .field("chains", &self.chains)
            .finish_non_exhaustive()
    }
}
