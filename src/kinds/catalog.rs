//! The kinds of resources an engine serves: declarations checked once, schemas compiled once,
//! and the map from a chain step's work kind to its place in its kind's chains.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;
use setpoint_adapter::{ResourceKind, StepDecl};

/// A spec refused by its kind: where (a dotted path inside the spec, `records[2].ttl`; empty
/// for the spec itself) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecViolation {
    /// The path inside the spec.
    pub path: String,
    /// What is wrong, in words a person can act on.
    pub message: String,
}

/// A declaration the engine cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum KindError {
    /// A name, collection or step does not follow the rules.
    #[error("resource kind {kind:?}: {message}")]
    Invalid {
        /// The kind.
        kind: String,
        /// What is wrong.
        message: String,
    },
    /// Two declarations use the same name, collection or step work kind.
    #[error("{0}")]
    Duplicate(String),
}

/// The largest spec accepted, in bytes of JSON: a spec is desired state, not data.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;

/// Where a chain step's work kind runs: which kind, which chain, which step of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The resource kind.
    pub kind: String,
    /// The chain (`create`, `update`, `delete`, `observe` or a named one).
    pub chain: String,
    /// The step's index in the chain.
    pub index: usize,
}

/// A declared kind, ready to validate specs.
pub struct Kind {
    /// The declaration.
    pub decl: ResourceKind,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kind")
            .field("decl", &self.decl)
            .finish_non_exhaustive()
    }
}

impl Kind {
    /// The kind's name.
    pub fn name(&self) -> &str {
        &self.decl.name
    }

    /// Every way `spec` breaks the kind's schema (all of them, not just the first), or its size
    /// limit; empty when it is valid.
    pub fn validate(&self, spec: &Value) -> Vec<SpecViolation> {
        let size = serde_json::to_vec(spec).map_or(usize::MAX, |v| v.len());
        if size > MAX_SPEC_BYTES {
            return vec![SpecViolation {
                path: String::new(),
                message: format!("is {size} bytes of JSON; at most {MAX_SPEC_BYTES} are allowed"),
            }];
        }
        let mut out: Vec<SpecViolation> = self
            .validator
            .iter_errors(spec)
            .flat_map(|e| {
                let at = dotted(e.instance_path().as_str());
                match e.kind() {
                    // Named after the field that is wrong, not the object holding it.
                    jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected }
                    | jsonschema::error::ValidationErrorKind::UnevaluatedProperties {
                        unexpected,
                    } => unexpected
                        .iter()
                        .map(|p| SpecViolation {
                            path: join(&at, p),
                            message: "is not a field of this kind's spec".into(),
                        })
                        .collect::<Vec<_>>(),
                    jsonschema::error::ValidationErrorKind::Required { property } => {
                        vec![SpecViolation {
                            path: join(&at, property.as_str().unwrap_or_default()),
                            message: "is required".into(),
                        }]
                    }
                    _ => vec![SpecViolation {
                        path: at,
                        message: e.to_string(),
                    }],
                }
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out.dedup();
        out
    }

    /// Every way `new` cannot be a spec of this kind, on create (`old` is `None`) or as a
    /// change of `old`: the schema and the immutable fields (all at once), then the kind's own
    /// rules (for a spec the schema accepts). Empty when it is fine.
    pub fn check_spec(&self, old: Option<&Value>, new: &Value) -> Vec<SpecViolation> {
        let mut out = self.validate(new);
        let schema_valid = out.is_empty();
        if let Some(old) = old {
            out.extend(
                self.immutable_changes(old, new)
                    .into_iter()
                    .map(|path| SpecViolation {
                        path,
                        message: "cannot be changed once the resource exists; create a new one"
                            .into(),
                    }),
            );
        }
        // The kind's own rules read the spec as its type: only a spec its schema accepts.
        if schema_valid && let Some(check) = &self.decl.check {
            out.extend(
                check(old, new)
                    .into_iter()
                    .map(|(path, message)| SpecViolation { path, message }),
            );
        }
        out
    }

    /// The immutable fields whose value differs between `old` and `new`.
    pub fn immutable_changes(&self, old: &Value, new: &Value) -> Vec<String> {
        self.decl
            .immutable
            .iter()
            .filter(|field| lookup(old, field) != lookup(new, field))
            .cloned()
            .collect()
    }

    /// `spec`, written for schema version `version`, upgraded to the current version.
    ///
    /// # Errors
    /// The kind's upgrade function's message, or a message saying the kind has none.
    pub fn upgrade(&self, version: u32, mut spec: Value) -> Result<Value, String> {
        let mut v = version;
        while v < self.decl.schema_version {
            let up = self.decl.upgrade.as_ref().ok_or_else(|| {
                format!(
                    "the spec was written for version {version} of {}'s schema, and the kind \
                     declares no upgrade to version {}",
                    self.decl.name, self.decl.schema_version
                )
            })?;
            spec = up(v, spec)?;
            v += 1;
        }
        Ok(spec)
    }

    /// The steps of chain `chain`.
    pub fn chain(&self, chain: &str) -> &[StepDecl] {
        self.decl.chain_steps(chain).unwrap_or(&[])
    }
}

/// The value at dotted `path` in `v`.
fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, key| v.get(key))
}

/// `/records/2/ttl` → `records[2].ttl` (JSON pointer escapes undone).
fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            out = join(&out, &seg);
        }
    }
    out
}

fn join(base: &str, field: &str) -> String {
    if base.is_empty() {
        field.to_owned()
    } else {
        format!("{base}.{field}")
    }
}

/// The kinds an engine serves.
#[derive(Debug, Default)]
pub struct KindCatalog {
    kinds: BTreeMap<String, Arc<Kind>>,
    positions: HashMap<String, Position>,
}

impl KindCatalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `decl` after checking it: names (`a-z0-9` words joined by dots, a collection that
    /// is a DNS label), a schema that compiles, create and delete chains with steps, unique
    /// step names per chain and work kinds across the catalog, and steps beside the resource
    /// only at the ends of chains.
    ///
    /// # Errors
    /// [`KindError`] saying what is wrong.
    pub fn add(&mut self, decl: ResourceKind) -> Result<(), KindError> {
        let invalid = |message: String| KindError::Invalid {
            kind: decl.name.clone(),
            message,
        };
        if !crate::names::is_kind_name(&decl.name) {
            return Err(invalid(
                "the name must be lower-case words of a-z and 0-9 joined by dots, such as \
                 dns.zone"
                    .into(),
            ));
        }
        if !crate::names::is_dns_label(&decl.collection) {
            return Err(invalid(format!(
                "the collection {:?} must be a DNS label (it is part of resource names)",
                decl.collection
            )));
        }
        if self.kinds.contains_key(&decl.name) {
            return Err(KindError::Duplicate(format!(
                "resource kind {:?} is declared twice",
                decl.name
            )));
        }
        if let Some(other) = self
            .kinds
            .values()
            .find(|k| k.decl.collection == decl.collection)
        {
            return Err(KindError::Duplicate(format!(
                "resource kinds {:?} and {:?} both use the collection {:?}",
                other.decl.name, decl.name, decl.collection
            )));
        }
        if decl.create.is_empty() || decl.delete.is_empty() {
            return Err(invalid(
                "the create and delete chains need at least one step each".into(),
            ));
        }
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&decl.schema)
            .map_err(|e| invalid(format!("its schema is not a valid JSON Schema: {e}")))?;
        let mut chains: Vec<(&str, &[StepDecl])> = vec![
            ("create", &decl.create),
            ("update", &decl.update),
            ("delete", &decl.delete),
        ];
        if let Some(o) = &decl.observe {
            chains.push(("observe", std::slice::from_ref(o)));
        }
        for (name, steps) in &decl.chains {
            if matches!(name.as_str(), "create" | "update" | "delete" | "observe") {
                return Err(invalid(format!(
                    "{name:?} cannot be the name of an extra chain"
                )));
            }
            chains.push((name, steps));
        }
        let mut positions = Vec::new();
        for (chain, steps) in chains {
            let mut names = std::collections::BTreeSet::new();
            let mut beside_seen = false;
            for (index, step) in steps.iter().enumerate() {
                if !names.insert(step.name.as_str()) {
                    return Err(invalid(format!(
                        "chain {chain:?} has two steps named {:?}",
                        step.name
                    )));
                }
                if step.beside {
                    beside_seen = true;
                } else if beside_seen {
                    return Err(invalid(format!(
                        "in chain {chain:?}, step {:?} holds the resource after a step beside \
                         it: steps beside the resource come last",
                        step.name
                    )));
                }
                if step.batch.is_some() && chain != "observe" {
                    return Err(invalid(format!(
                        "in chain {chain:?}, step {:?} batches: only the observe step may \
                         (a batch runs under no single unit's fence, so it must change nothing)",
                        step.name
                    )));
                }
                if step.output == "conditions" {
                    return Err(invalid(
                        "no step output may be called \"conditions\" (the engine keeps the \
                         conditions there)"
                            .into(),
                    ));
                }
                let work_kind = step.work_kind.as_str();
                if self.positions.contains_key(work_kind)
                    || positions
                        .iter()
                        .any(|(k, _): &(String, Position)| k == work_kind)
                {
                    return Err(KindError::Duplicate(format!(
                        "work kind {work_kind:?} runs two steps; each step needs its own"
                    )));
                }
                positions.push((
                    work_kind.to_owned(),
                    Position {
                        kind: decl.name.clone(),
                        chain: chain.to_owned(),
                        index,
                    },
                ));
            }
        }
        self.positions.extend(positions);
        self.kinds
            .insert(decl.name.clone(), Arc::new(Kind { decl, validator }));
        Ok(())
    }

    /// The kind called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Kind>> {
        self.kinds.get(name)
    }

    /// The kind whose collection is `collection`.
    pub fn by_collection(&self, collection: &str) -> Option<&Arc<Kind>> {
        self.kinds
            .values()
            .find(|k| k.decl.collection == collection)
    }

    /// Where the step run by `work_kind` sits, if a declared chain runs it.
    pub fn position(&self, work_kind: &str) -> Option<&Position> {
        self.positions.get(work_kind)
    }

    /// The declared step at `position`.
    pub fn step(&self, position: &Position) -> Option<&StepDecl> {
        self.kinds
            .get(&position.kind)?
            .chain(&position.chain)
            .get(position.index)
    }

    /// Every kind, by name.
    pub fn kinds(&self) -> impl Iterator<Item = &Arc<Kind>> {
        self.kinds.values()
    }

    /// Every work kind a declared chain runs.
    pub fn step_work_kinds(&self) -> impl Iterator<Item = &str> {
        self.positions.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use setpoint_adapter::StepDecl;

    use super::*;

    fn zone() -> ResourceKind {
        ResourceKind::new("dns.zone", "zones")
            .schema(
                1,
                json!({
                    "type": "object",
                    "required": ["name", "records"],
                    "additionalProperties": false,
                    "properties": {
                        "name": {"type": "string", "maxLength": 253},
                        "records": {"type": "array", "items": {
                            "type": "object",
                            "properties": {"ttl": {"type": "integer", "minimum": 1}}
                        }}
                    }
                }),
            )
            .immutable(["name"])
            .create([
                StepDecl::new("zone", "dns.zone.ensure"),
                StepDecl::new("notify", "dns.zone.notify").beside("Notified"),
            ])
            .delete([StepDecl::new("delete", "dns.zone.delete")])
    }

    #[test]
    fn specs_are_refused_with_every_violation_named() {
        let mut c = KindCatalog::new();
        c.add(zone()).unwrap();
        let k = c.get("dns.zone").unwrap();
        assert!(
            k.validate(&json!({"name": "a.example", "records": []}))
                .is_empty()
        );
        let v = k.validate(&json!({"records": [{"ttl": "x"}, {"ttl": 0}], "colour": "red"}));
        let paths: Vec<&str> = v.iter().map(|v| v.path.as_str()).collect();
        assert_eq!(
            paths,
            ["colour", "name", "records[0].ttl", "records[1].ttl"],
            "{v:?}"
        );
        assert_eq!(v[0].message, "is not a field of this kind's spec");
        assert_eq!(v[1].message, "is required");
        let big = json!({"name": "x".repeat(MAX_SPEC_BYTES), "records": []});
        assert!(k.validate(&big)[0].message.contains("bytes of JSON"));
    }

    #[test]
    fn immutable_fields_and_positions() {
        let mut c = KindCatalog::new();
        c.add(zone()).unwrap();
        let k = c.get("dns.zone").unwrap();
        assert_eq!(
            k.immutable_changes(&json!({"name": "a"}), &json!({"name": "b"})),
            ["name"]
        );
        assert!(
            k.immutable_changes(&json!({"name": "a"}), &json!({"name": "a", "x": 1}))
                .is_empty()
        );
        let p = c.position("dns.zone.notify").unwrap();
        assert_eq!((p.chain.as_str(), p.index), ("create", 1));
        assert!(c.step(p).unwrap().beside);
        assert!(c.by_collection("zones").is_some());
    }

    #[test]
    fn bad_declarations_are_refused() {
        let mut c = KindCatalog::new();
        c.add(zone()).unwrap();
        assert!(matches!(c.add(zone()), Err(KindError::Duplicate(_))));
        let reused = ResourceKind::new("dns.other", "others")
            .create([StepDecl::new("x", "dns.zone.ensure")])
            .delete([StepDecl::new("y", "dns.other.delete")]);
        assert!(
            c.add(reused)
                .unwrap_err()
                .to_string()
                .contains("runs two steps")
        );
        let bad_order = ResourceKind::new("a.b", "bs")
            .create([
                StepDecl::new("n", "a.n").beside("Notified"),
                StepDecl::new("m", "a.m"),
            ])
            .delete([StepDecl::new("d", "a.d")]);
        assert!(
            c.add(bad_order)
                .unwrap_err()
                .to_string()
                .contains("come last")
        );
        let bad_schema = ResourceKind::new("a.c", "cs")
            .schema(1, json!({"type": 12}))
            .create([StepDecl::new("n", "a.c.n")])
            .delete([StepDecl::new("d", "a.c.d")]);
        assert!(
            c.add(bad_schema)
                .unwrap_err()
                .to_string()
                .contains("not a valid JSON Schema")
        );
        let batched_create = ResourceKind::new("a.d", "ds")
            .create([StepDecl::new("n", "a.d.n").batched(10)])
            .delete([StepDecl::new("d", "a.d.d")]);
        assert!(
            c.add(batched_create)
                .unwrap_err()
                .to_string()
                .contains("only the observe step may")
        );
        let batched_observe = ResourceKind::new("a.e", "es")
            .create([StepDecl::new("n", "a.e.n")])
            .delete([StepDecl::new("d", "a.e.d")])
            .observe(StepDecl::new("o", "a.e.o").batched(10));
        c.add(batched_observe).unwrap();
    }

    #[test]
    fn upgrades_run_one_version_at_a_time() {
        let k = ResourceKind::new("a.b", "bs")
            .schema(3, json!({"type": "object"}))
            .upgrade(|from, mut spec| {
                spec[format!("v{}", from + 1)] = json!(true);
                Ok(spec)
            })
            .create([StepDecl::new("n", "a.b.n")])
            .delete([StepDecl::new("d", "a.b.d")]);
        let mut c = KindCatalog::new();
        c.add(k).unwrap();
        let up = c.get("a.b").unwrap().upgrade(1, json!({})).unwrap();
        assert_eq!(up, json!({"v2": true, "v3": true}));
    }
}
