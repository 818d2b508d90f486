//! Field paths over JSON objects: what server-side apply tracks per field manager.
//!
//! A field is the path of a *leaf* of an applied object: a scalar, an array (lists are treated
//! as atomic, a simplification of the real keyed-list tracking) or an empty object. Paths are
//! rendered `.spec.replicas` in messages, and as nested `f:` maps in `managedFields.fieldsV1`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

/// The path of one field: its JSON keys from the root.
pub type Path = Vec<String>;

/// The fields one manager owns.
pub type FieldSet = BTreeSet<Path>;

/// Fields never tracked: identity and server-owned metadata, and status.
fn ignored(path: &[String]) -> bool {
    match path {
        [first] if first == "apiVersion" || first == "kind" || first == "status" => true,
        [first, ..] if first == "status" => true,
        [m, f, ..] if m == "metadata" => matches!(
            f.as_str(),
            "name"
                | "namespace"
                | "uid"
                | "resourceVersion"
                | "generation"
                | "creationTimestamp"
                | "managedFields"
                | "deletionTimestamp"
                | "selfLink"
        ),
        _ => false,
    }
}

/// The leaf paths of `value` (an object), minus the ignored ones.
pub fn leaves(value: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    let mut path = Vec::new();
    collect(value, &mut path, &mut out);
    out
}

fn collect(value: &Value, path: &mut Path, out: &mut FieldSet) {
    if ignored(path) {
        return;
    }
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                path.push(k.clone());
                collect(v, path, out);
                path.pop();
            }
        }
        _ => {
            if !path.is_empty() {
                out.insert(path.clone());
            }
        }
    }
}

/// The value at `path`, if any.
pub fn get<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, k| v.get(k))
}

/// Sets the value at `path`, creating objects on the way (replacing non-objects).
pub fn set(value: &mut Value, path: &[String], leaf: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = value;
    for k in parents {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Some(map) = cur.as_object_mut() else {
            return;
        };
        cur = map
            .entry(k.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !cur.is_object() {
        *cur = Value::Object(Map::new());
    }
    if let Some(map) = cur.as_object_mut() {
        map.insert(last.clone(), leaf);
    }
}

/// Removes the value at `path`, then every parent object the removal left empty (below the
/// top-level sections).
pub fn remove(value: &mut Value, path: &[String]) {
    fn go(cur: &mut Value, path: &[String], depth: usize) {
        let Some(map) = cur.as_object_mut() else {
            return;
        };
        match path {
            [] => {}
            [last] => {
                map.remove(last);
            }
            [first, rest @ ..] => {
                if let Some(child) = map.get_mut(first) {
                    go(child, rest, depth + 1);
                    if depth >= 1 && child.as_object().is_some_and(Map::is_empty) {
                        map.remove(first);
                    }
                }
            }
        }
    }
    go(value, path, 0);
}

/// `.spec.replicas`: a path as server-side apply messages render it.
pub fn render(path: &[String]) -> String {
    path.iter().map(|k| format!(".{k}")).collect()
}

/// A field set as `managedFields[].fieldsV1`: nested `{"f:key": {...}}` maps, `{}` at leaves.
pub fn fields_v1(set: &FieldSet) -> Value {
    let mut root = Value::Object(Map::new());
    for path in set {
        let keyed: Vec<String> = path.iter().map(|k| format!("f:{k}")).collect();
        let existing = get(&root, &keyed).is_some();
        if !existing {
            set_leaf_keep(&mut root, &keyed);
        }
    }
    root
}

fn set_leaf_keep(root: &mut Value, path: &[String]) {
    let mut cur = root;
    for k in path {
        let Some(map) = cur.as_object_mut() else {
            return;
        };
        cur = map
            .entry(k.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// One manager's entry in the store: what it owns and when that last changed.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagerEntry {
    /// The fields it owns.
    pub fields: FieldSet,
    /// The API version it applied with.
    pub api_version: String,
    /// When its entry last changed (RFC 3339).
    pub time: String,
}

/// `metadata.managedFields` for a set of managers.
pub fn managed_fields(managers: &BTreeMap<String, ManagerEntry>) -> Value {
    Value::Array(
        managers
            .iter()
            .map(|(name, e)| {
                serde_json::json!({
                    "manager": name,
                    "operation": "Apply",
                    "apiVersion": e.api_version,
                    "time": e.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": fields_v1(&e.fields),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn p(s: &str) -> Path {
        s.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn leaves_skip_identity_and_treat_arrays_as_atomic() {
        let v = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "x", "labels": {"a": "1"}},
            "data": {"k": "dg=="},
            "spec": {"ports": [{"port": 1}], "empty": {}},
            "status": {"x": 1},
        });
        let l = leaves(&v);
        assert_eq!(
            l,
            FieldSet::from([
                p("metadata.labels.a"),
                p("data.k"),
                p("spec.ports"),
                p("spec.empty")
            ])
        );
        assert_eq!(render(&p("spec.replicas")), ".spec.replicas");
    }

    #[test]
    fn set_and_remove_prune_empty_parents() {
        let mut v = json!({"metadata": {"name": "x"}});
        set(&mut v, &p("metadata.labels.a"), json!("1"));
        assert_eq!(get(&v, &p("metadata.labels.a")), Some(&json!("1")));
        remove(&mut v, &p("metadata.labels.a"));
        assert_eq!(v, json!({"metadata": {"name": "x"}}));
    }

    #[test]
    fn fields_v1_nests_f_keys() {
        let set = FieldSet::from([p("spec.replicas"), p("metadata.labels.a")]);
        assert_eq!(
            fields_v1(&set),
            json!({"f:spec": {"f:replicas": {}}, "f:metadata": {"f:labels": {"f:a": {}}}})
        );
    }
}
