//! The test server's object store and the API semantics on top of it: get, list by label and
//! by name, server-side apply with field managers, conflicts and a `resourceVersion`
//! precondition, delete with preconditions — and the `Status` answers the real API server
//! gives when they fail.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use super::fields::{self, FieldSet, ManagerEntry};
use super::validate;

/// A resource type the server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// The plural resource name in URLs, e.g. `deployments`.
    pub resource: &'static str,
    /// The object kind, e.g. `Deployment`.
    pub kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
}

impl Kind {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> &'static str {
        if self.group.is_empty() {
            "v1"
        } else {
            "apps/v1"
        }
    }

    /// `deployments.apps` or `secrets`, as messages name a resource.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.to_owned()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    /// `Deployment.apps` or `Secret`, as validation messages name a kind.
    fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_owned()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
}

/// Every resource type served.
pub const KINDS: &[Kind] = &[
    Kind {
        group: "",
        resource: "namespaces",
        kind: "Namespace",
        namespaced: false,
    },
    Kind {
        group: "",
        resource: "services",
        kind: "Service",
        namespaced: true,
    },
    Kind {
        group: "",
        resource: "secrets",
        kind: "Secret",
        namespaced: true,
    },
    Kind {
        group: "",
        resource: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
    },
    Kind {
        group: "apps",
        resource: "deployments",
        kind: "Deployment",
        namespaced: true,
    },
    Kind {
        group: "apps",
        resource: "statefulsets",
        kind: "StatefulSet",
        namespaced: true,
    },
];

/// The kind served at `group`/`resource`, if any.
pub fn kind(group: &str, resource: &str) -> Option<Kind> {
    KINDS
        .iter()
        .copied()
        .find(|k| k.group == group && k.resource == resource)
}

/// An HTTP answer: status code and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// HTTP status.
    pub code: u16,
    /// The body (an object or a `Status`).
    pub body: Value,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self { code: 200, body }
    }
}

/// A failure `Status` object as the API server sends it.
pub fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Reply {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    Reply { code, body }
}

fn not_found(kind: &Kind, name: &str) -> Reply {
    status(
        404,
        "NotFound",
        &format!("{} {name:?} not found", kind.qualified()),
        Some(json!({"name": name, "group": kind.group, "kind": kind.resource})),
    )
}

/// A request's selector term.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
}

/// Parses an equality-based label selector (`a=b,c!=d,e,!f`).
fn parse_selector(s: &str) -> Result<Vec<Term>, String> {
    let mut terms = Vec::new();
    for raw in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if raw.contains('(') || raw.contains(' ') {
            return Err(format!(
                "unable to parse requirement {raw:?}: set-based selectors are not supported by this test server"
            ));
        }
        let term = if let Some((k, v)) = raw.split_once("!=") {
            Term::Ne(k.to_owned(), v.to_owned())
        } else if let Some((k, v)) = raw.split_once("==") {
            Term::Eq(k.to_owned(), v.to_owned())
        } else if let Some((k, v)) = raw.split_once('=') {
            Term::Eq(k.to_owned(), v.to_owned())
        } else if let Some(k) = raw.strip_prefix('!') {
            Term::NotExists(k.to_owned())
        } else {
            Term::Exists(raw.to_owned())
        };
        terms.push(term);
    }
    Ok(terms)
}

fn selects(terms: &[Term], obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    terms.iter().all(|t| match t {
        Term::Eq(k, v) => label(k) == Some(v.as_str()),
        Term::Ne(k, v) => label(k) != Some(v.as_str()),
        Term::Exists(k) => label(k).is_some(),
        Term::NotExists(k) => label(k).is_none(),
    })
}

/// Parses a field selector over the fields every resource serves (`metadata.name`,
/// `metadata.namespace`; `=`, `==` or `!=`), as terms over those paths.
fn parse_field_selector(s: &str) -> Result<Vec<Term>, String> {
    let mut terms = Vec::new();
    for raw in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (key, term) = if let Some((k, v)) = raw.split_once("!=") {
            (k, Term::Ne(k.to_owned(), v.to_owned()))
        } else if let Some((k, v)) = raw.split_once("==") {
            (k, Term::Eq(k.to_owned(), v.to_owned()))
        } else if let Some((k, v)) = raw.split_once('=') {
            (k, Term::Eq(k.to_owned(), v.to_owned()))
        } else {
            return Err(format!(
                "invalid selector: '{raw}'; can't understand '{raw}'"
            ));
        };
        if key != "metadata.name" && key != "metadata.namespace" {
            return Err(format!("field label not supported: {key}"));
        }
        terms.push(term);
    }
    Ok(terms)
}

fn fields_select(terms: &[Term], obj: &Value) -> bool {
    let field = |k: &str| {
        let v = match k {
            "metadata.name" => obj["metadata"]["name"].as_str(),
            _ => obj["metadata"]["namespace"].as_str(),
        };
        v.unwrap_or_default().to_owned()
    };
    terms.iter().all(|t| match t {
        Term::Eq(k, v) => field(k) == *v,
        Term::Ne(k, v) => field(k) != *v,
        Term::Exists(_) | Term::NotExists(_) => true,
    })
}

/// `DeleteOptions.preconditions`: the delete happens only if the stored object still has this
/// uid and this resourceVersion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preconditions {
    /// The uid the object must have.
    pub uid: Option<String>,
    /// The resourceVersion the object must have.
    pub resource_version: Option<String>,
}

/// One stored object and its field managers.
#[derive(Debug, Clone)]
struct Entry {
    object: Value,
    managers: BTreeMap<String, ManagerEntry>,
}

type Key = (&'static str, String, String);

/// All objects, keyed by (resource, namespace or "", name), and the resource version counter.
#[derive(Debug)]
pub struct Store {
    objects: BTreeMap<Key, Entry>,
    /// The revision of the last write. Starts at 1, as etcd's does, so no list ever reports
    /// `"0"` (which a client sending it back would mean as "no precondition").
    revision: u64,
    cluster_ips: u32,
    /// While set, workloads applied report no ready replica (a rollout that has not finished).
    hold_rollouts: bool,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            revision: 1,
            cluster_ips: 0,
            hold_rollouts: false,
        }
    }
}

/// The parameters of an apply request.
#[derive(Debug, Clone)]
pub struct ApplyRequest<'a> {
    /// What is applied.
    pub kind: Kind,
    /// The namespace in the URL (empty for cluster-scoped kinds).
    pub namespace: &'a str,
    /// The name in the URL.
    pub name: &'a str,
    /// The `fieldManager` query parameter.
    pub manager: &'a str,
    /// The `force` query parameter.
    pub force: bool,
    /// The request body, parsed.
    pub intent: Value,
}

/// Top-level sections that are content (a change bumps `generation`); metadata and status
/// are not.
fn content(obj: &Value) -> Value {
    let mut out = obj.clone();
    if let Some(map) = out.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    out
}

/// Metadata that users write (labels, annotations, …), without server-owned fields.
fn user_metadata(obj: &Value) -> Value {
    let mut meta = obj["metadata"].clone();
    if let Some(map) = meta.as_object_mut() {
        for k in [
            "resourceVersion",
            "generation",
            "managedFields",
            "uid",
            "creationTimestamp",
        ] {
            map.remove(k);
        }
    }
    meta
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Store {
    fn key(kind: &Kind, namespace: &str, name: &str) -> Key {
        (kind.resource, namespace.to_owned(), name.to_owned())
    }

    fn namespace_exists(&self, ns: &str) -> bool {
        self.objects
            .contains_key(&("namespaces", String::new(), ns.to_owned()))
    }

    /// GET one object.
    pub fn get(&self, kind: &Kind, namespace: &str, name: &str) -> Reply {
        match self.objects.get(&Self::key(kind, namespace, name)) {
            Some(e) => Reply::ok(e.object.clone()),
            None => not_found(kind, name),
        }
    }

    /// LIST objects of `kind` in `namespace` (all namespaces when `None`) matching
    /// `label_selector` and `field_selector`. A missing namespace lists as empty, as on a real
    /// server. The list's `metadata.resourceVersion` is the store's current revision: every
    /// object written later gets a greater one.
    pub fn list(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        label_selector: &str,
        field_selector: &str,
    ) -> Reply {
        let terms = match parse_selector(label_selector) {
            Ok(t) => t,
            Err(m) => return status(400, "BadRequest", &m, None),
        };
        let field_terms = match parse_field_selector(field_selector) {
            Ok(t) => t,
            Err(m) => return status(400, "BadRequest", &m, None),
        };
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|((r, ns, _), _)| *r == kind.resource && namespace.is_none_or(|n| n == ns))
            .filter(|(_, e)| selects(&terms, &e.object))
            .filter(|(_, e)| fields_select(&field_terms, &e.object))
            .map(|(_, e)| {
                // List items carry no apiVersion/kind of their own.
                let mut o = e.object.clone();
                if let Some(m) = o.as_object_mut() {
                    m.remove("apiVersion");
                    m.remove("kind");
                }
                o
            })
            .collect();
        Reply::ok(json!({
            "kind": format!("{}List", kind.kind),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": self.revision.to_string()},
            "items": items,
        }))
    }

    /// DELETE one object, if it still meets `preconditions` (409 Conflict otherwise, with the
    /// real server's storage-error message). Deleting a namespace deletes everything in it (at
    /// once: the real server finalizes namespaces asynchronously).
    pub fn delete(
        &mut self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        preconditions: &Preconditions,
    ) -> Reply {
        let key = Self::key(kind, namespace, name);
        let Some(stored) = self.objects.get(&key) else {
            return not_found(kind, name);
        };
        let meta = &stored.object["metadata"];
        let failed = |what: &str, wanted: &str, actual: &str| {
            precondition_failed(kind, namespace, name, what, wanted, actual)
        };
        let uid = meta["uid"].as_str().unwrap_or_default();
        if let Some(wanted) = preconditions.uid.as_deref()
            && wanted != uid
        {
            return failed("UID", wanted, uid);
        }
        let version = meta["resourceVersion"].as_str().unwrap_or_default();
        if let Some(wanted) = preconditions.resource_version.as_deref()
            && wanted != version
        {
            return failed("ResourceVersion", wanted, version);
        }
        let Some(entry) = self.objects.remove(&key) else {
            return not_found(kind, name);
        };
        self.revision += 1;
        if kind.resource == "namespaces" {
            self.objects.retain(|(_, ns, _), _| ns != name);
            let mut obj = entry.object;
            obj["status"] = json!({"phase": "Terminating"});
            return Reply::ok(obj);
        }
        Reply::ok(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {
                "name": name,
                "group": kind.group,
                "kind": kind.resource,
                "uid": entry.object["metadata"]["uid"],
            },
        }))
    }

    /// Server-side apply: creates or updates, tracks field managers, reports conflicts.
    pub fn apply(&mut self, req: ApplyRequest<'_>) -> Reply {
        let ApplyRequest {
            kind,
            namespace,
            name,
            manager,
            force,
            mut intent,
        } = req;

        // 1. The intent must be an object of this kind, with this name and namespace.
        if !intent.is_object() {
            return status(400, "BadRequest", "the apply patch must be an object", None);
        }
        if intent["apiVersion"].as_str() != Some(kind.api_version())
            || intent["kind"].as_str() != Some(kind.kind)
        {
            return status(
                400,
                "BadRequest",
                &format!(
                    "the apply patch must have apiVersion {:?} and kind {:?} (got {} and {})",
                    kind.api_version(),
                    kind.kind,
                    intent["apiVersion"],
                    intent["kind"]
                ),
                None,
            );
        }
        if let Some(n) = intent["metadata"]["name"].as_str()
            && n != name
        {
            return status(
                400,
                "BadRequest",
                &format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                ),
                None,
            );
        }
        if let Some(n) = intent["metadata"]["namespace"].as_str()
            && kind.namespaced
            && n != namespace
        {
            return status(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
                None,
            );
        }
        // Status is not applied through the main resource.
        if let Some(m) = intent.as_object_mut() {
            m.remove("status");
        }

        // 1b. A uid in the body names the object the write is for. With no object stored,
        //     that object is gone: 409, as the real server's create-on-apply path answers
        //     (before admission, so before the namespace check).
        let key = Self::key(&kind, namespace, name);
        let wanted_uid = intent["metadata"]["uid"]
            .as_str()
            .filter(|u| !u.is_empty())
            .map(str::to_owned);
        if let Some(uid) = &wanted_uid
            && !self.objects.contains_key(&key)
        {
            return status(
                409,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} {name:?}: uid mismatch: the provided \
                     object specified uid {uid}, and no existing object was found",
                    kind.qualified()
                ),
                Some(json!({"name": name, "group": kind.group, "kind": kind.resource})),
            );
        }

        // 2. A namespaced object needs its namespace.
        if kind.namespaced && !self.namespace_exists(namespace) {
            return status(
                404,
                "NotFound",
                &format!("namespaces {namespace:?} not found"),
                Some(json!({"name": namespace, "kind": "namespaces"})),
            );
        }

        let existing = self.objects.get(&key).cloned();
        let wanted = fields::leaves(&intent);

        // 3. Conflicts: fields another manager owns whose value would change.
        let mut managers = existing
            .as_ref()
            .map(|e| e.managers.clone())
            .unwrap_or_default();
        let live = existing.as_ref().map(|e| &e.object);
        let mut conflicts: Vec<(String, fields::Path)> = Vec::new();
        for (other, entry) in &managers {
            if other == manager {
                continue;
            }
            for path in wanted.intersection(&entry.fields) {
                let current = live.and_then(|l| fields::get(l, path));
                if current != fields::get(&intent, path) {
                    conflicts.push((other.clone(), path.clone()));
                }
            }
        }
        if !conflicts.is_empty() {
            if !force {
                return conflict(&kind, name, &conflicts);
            }
            for (other, path) in &conflicts {
                if let Some(e) = managers.get_mut(other) {
                    e.fields.remove(path);
                }
            }
        }

        // 3b. A resourceVersion in the body is a precondition on the stored object, checked
        //     (as on the real server) after the merge found no field conflict: another version
        //     is 409. An absent object has nothing to compare with, so the apply creates it
        //     and the version is ignored; "" and "0" mean "no precondition".
        if let Some(e) = &existing
            && let Some(wanted) = intent["metadata"]["resourceVersion"]
                .as_str()
                .filter(|v| !v.is_empty() && *v != "0")
            && Some(wanted) != e.object["metadata"]["resourceVersion"].as_str()
        {
            return modified(&kind, name);
        }
        // 3c. Another uid than the stored object's: uid is immutable (the real server's update
        //     validation answers 422).
        if let (Some(e), Some(uid)) = (&existing, &wanted_uid)
            && Some(uid.as_str()) != e.object["metadata"]["uid"].as_str()
        {
            let violation = validate::Violation {
                reason: "FieldValueInvalid",
                field: "metadata.uid".to_owned(),
                message: format!("Invalid value: {uid:?}: field is immutable"),
            };
            return invalid(&kind, name, &[violation]);
        }

        // 4. Merge: drop fields only this manager owned and no longer wants, set the rest.
        let mut object = match &existing {
            Some(e) => e.object.clone(),
            None => json!({
                "apiVersion": kind.api_version(),
                "kind": kind.kind,
                "metadata": {"name": name},
            }),
        };
        if kind.namespaced {
            object["metadata"]["namespace"] = json!(namespace);
        }
        let previously: FieldSet = managers
            .get(manager)
            .map(|e| e.fields.clone())
            .unwrap_or_default();
        let others: BTreeSet<&fields::Path> = managers
            .iter()
            .filter(|(m, _)| m.as_str() != manager)
            .flat_map(|(_, e)| e.fields.iter())
            .collect();
        for path in previously.difference(&wanted) {
            if !others.contains(path) {
                fields::remove(&mut object, path);
            }
        }
        for path in &wanted {
            if let Some(v) = fields::get(&intent, path) {
                fields::set(&mut object, path, v.clone());
            }
        }
        let time = now();
        let kept_time = managers
            .get(manager)
            .filter(|_| previously == wanted)
            .map(|e| e.time.clone());
        managers.insert(
            manager.to_owned(),
            ManagerEntry {
                fields: wanted,
                api_version: kind.api_version().to_owned(),
                time: kept_time.unwrap_or_else(|| time.clone()),
            },
        );
        managers.retain(|_, e| !e.fields.is_empty());

        // 5. Validate the result.
        let violations = validate::validate(kind.kind, &object, live);
        if !violations.is_empty() {
            return invalid(&kind, name, &violations);
        }

        // 6. No change at all: answer with the stored object as it is.
        if let Some(e) = &existing
            && content(&e.object) == content(&object)
            && user_metadata(&e.object) == user_metadata(&object)
            && field_sets(&e.managers) == field_sets(&managers)
        {
            return Reply::ok(e.object.clone());
        }

        // 7. Write: bump resourceVersion, and generation when content changed.
        self.revision += 1;
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(self.revision.to_string());
        meta["managedFields"] = fields::managed_fields(&managers);
        match &existing {
            None => {
                meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
                meta["creationTimestamp"] = json!(time);
                meta["generation"] = json!(1);
                self.server_defaults(&kind, &mut object);
            }
            Some(e) => {
                let generation = e.object["metadata"]["generation"].as_i64().unwrap_or(1);
                let bumped = if content(&e.object) != content(&object) {
                    generation + 1
                } else {
                    generation
                };
                object["metadata"]["generation"] = json!(bumped);
            }
        }
        Self::simulate_controllers(&kind, &mut object, !self.hold_rollouts);
        let created = existing.is_none();
        self.objects.insert(
            key,
            Entry {
                object: object.clone(),
                managers,
            },
        );
        Reply {
            code: if created { 201 } else { 200 },
            body: object,
        }
    }

    /// What the server fills in on create: a Service's cluster IP, a Secret's type, a
    /// Namespace's phase.
    fn server_defaults(&mut self, kind: &Kind, object: &mut Value) {
        match kind.kind {
            "Service" if object["spec"]["type"].as_str() != Some("ExternalName") => {
                self.cluster_ips += 1;
                let n = self.cluster_ips;
                let ip = format!("10.96.{}.{}", (n >> 8) & 0xff, n & 0xff);
                object["spec"]["clusterIP"] = json!(ip);
                object["spec"]["clusterIPs"] = json!([ip]);
            }
            "Secret" if object["type"].is_null() => object["type"] = json!("Opaque"),
            "Namespace" => object["status"] = json!({"phase": "Active"}),
            _ => {}
        }
    }

    /// Holds rollouts (`hold`: workloads applied from now on have no ready replica) or lets
    /// them finish: every held workload becomes ready, as its controller would report (a status
    /// update: a new resourceVersion, the same generation).
    pub(super) fn hold_rollouts(&mut self, hold: bool) {
        self.hold_rollouts = hold;
        if hold {
            return;
        }
        for entry in self.objects.values_mut() {
            let object = &mut entry.object;
            let workload = matches!(object["kind"].as_str(), Some("Deployment" | "StatefulSet"));
            let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
            if workload && object["status"]["readyReplicas"].as_i64() != Some(replicas) {
                self.revision += 1;
                object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
                object["status"]["readyReplicas"] = json!(replicas);
                object["status"]["availableReplicas"] = json!(replicas);
            }
        }
    }

    /// Stands in for the workload controllers: a Deployment or StatefulSet is immediately
    /// observed and, when `ready`, fully ready at its desired replica count; otherwise its pods
    /// exist and none is ready yet (as while images are pulled).
    fn simulate_controllers(kind: &Kind, object: &mut Value, ready: bool) {
        if matches!(kind.kind, "Deployment" | "StatefulSet") {
            let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
            let ready = if ready { replicas } else { 0 };
            object["status"] = json!({
                "observedGeneration": object["metadata"]["generation"],
                "replicas": replicas,
                "readyReplicas": ready,
                "availableReplicas": ready,
                "updatedReplicas": replicas,
            });
        }
    }
}

fn field_sets(managers: &BTreeMap<String, ManagerEntry>) -> BTreeMap<&String, &FieldSet> {
    managers.iter().map(|(m, e)| (m, &e.fields)).collect()
}

/// 409 Conflict for a write whose `resourceVersion` is not the stored one (the optimistic
/// lock of the real server's update path).
fn modified(kind: &Kind, name: &str) -> Reply {
    status(
        409,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please \
             apply your changes to the latest version and try again",
            kind.qualified()
        ),
        Some(json!({"name": name, "group": kind.group, "kind": kind.resource})),
    )
}

/// 409 Conflict for a delete whose preconditions fail, worded as the real server's storage
/// layer words it.
fn precondition_failed(
    kind: &Kind,
    namespace: &str,
    name: &str,
    what: &str,
    wanted: &str,
    actual: &str,
) -> Reply {
    let key = if kind.namespaced {
        format!("/registry/{}/{namespace}/{name}", kind.resource)
    } else {
        format!("/registry/{}/{name}", kind.resource)
    };
    status(
        409,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on {} {name:?}: StorageError: invalid object, Code: 4, \
             Key: {key}, ResourceVersion: 0, AdditionalErrorMsg: Precondition failed: {what} in \
             precondition: {wanted}, {what} in object meta: {actual}",
            kind.qualified()
        ),
        Some(json!({"name": name, "group": kind.group, "kind": kind.resource})),
    )
}

/// 409 Conflict as server-side apply reports it.
fn conflict(kind: &Kind, name: &str, conflicts: &[(String, fields::Path)]) -> Reply {
    let n = conflicts.len();
    let lines: Vec<String> = conflicts
        .iter()
        .map(|(m, p)| format!("conflict with {m:?}: {}", fields::render(p)))
        .collect();
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(m, p)| {
            json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with {m:?}"),
                "field": fields::render(p),
            })
        })
        .collect();
    let message = if n == 1 {
        format!("Apply failed with 1 conflict: {}", lines.join(""))
    } else {
        format!("Apply failed with {n} conflicts: {}", lines.join("\n"))
    };
    status(
        409,
        "Conflict",
        &message,
        Some(json!({"name": name, "group": kind.group, "kind": kind.resource, "causes": causes})),
    )
}

/// 422 Invalid with one cause per violation.
fn invalid(kind: &Kind, name: &str, violations: &[validate::Violation]) -> Reply {
    let parts: Vec<String> = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.message))
        .collect();
    let message = format!(
        "{} {name:?} is invalid: {}",
        kind.qualified_kind(),
        if parts.len() == 1 {
            parts.join("")
        } else {
            format!("[{}]", parts.join(", "))
        }
    );
    let causes: Vec<Value> = violations
        .iter()
        .map(|v| json!({"reason": v.reason, "message": v.message, "field": v.field}))
        .collect();
    status(
        422,
        "Invalid",
        &message,
        Some(json!({"name": name, "group": kind.group, "kind": kind.kind, "causes": causes})),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOY: Kind = KINDS[4];
    const NS: Kind = KINDS[0];

    fn deploy(replicas: i64) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "labels": {"app": "x"}},
            "spec": {"replicas": replicas,
                     "selector": {"matchLabels": {"app": "x"}},
                     "template": {"metadata": {"labels": {"app": "x"}},
                                  "spec": {"containers": [{"name": "c", "image": "i"}]}}},
        })
    }

    fn apply(s: &mut Store, manager: &str, force: bool, intent: Value) -> Reply {
        s.apply(ApplyRequest {
            kind: DEPLOY,
            namespace: "ns",
            name: "d",
            manager,
            force,
            intent,
        })
    }

    fn with_namespace() -> Store {
        let mut s = Store::default();
        let r = s.apply(ApplyRequest {
            kind: NS,
            namespace: "",
            name: "ns",
            manager: "m",
            force: false,
            intent: json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}}),
        });
        assert_eq!(r.code, 201, "{r:?}");
        s
    }

    #[test]
    fn missing_namespace_is_not_found() {
        let mut s = Store::default();
        let r = apply(&mut s, "m", false, deploy(1));
        assert_eq!(r.code, 404);
        assert_eq!(r.body["details"]["kind"], "namespaces");
    }

    #[test]
    fn apply_creates_then_is_a_no_op_then_updates() {
        let mut s = with_namespace();
        let r1 = apply(&mut s, "m", false, deploy(1));
        assert_eq!(r1.code, 201);
        assert_eq!(r1.body["metadata"]["generation"], 1);
        assert_eq!(r1.body["metadata"]["managedFields"][0]["manager"], "m");
        let r2 = apply(&mut s, "m", false, deploy(1));
        assert_eq!(r2.code, 200);
        assert_eq!(r1.body, r2.body);
        let r3 = apply(&mut s, "m", false, deploy(2));
        assert_ne!(
            r3.body["metadata"]["resourceVersion"],
            r1.body["metadata"]["resourceVersion"]
        );
        assert_eq!(r3.body["metadata"]["generation"], 2);
        assert_eq!(r3.body["spec"]["replicas"], 2);
    }

    #[test]
    fn another_manager_conflicts_unless_forced_and_co_owns_equal_values() {
        let mut s = with_namespace();
        apply(&mut s, "setpoint", false, deploy(1));
        // Same value: no conflict, shared ownership.
        assert_eq!(apply(&mut s, "kubectl", false, deploy(1)).code, 200);
        // Different value: conflict naming the manager and the field.
        let r = apply(&mut s, "kubectl", false, deploy(3));
        assert_eq!(r.code, 409, "{r:?}");
        assert_eq!(r.body["reason"], "Conflict");
        let msg = r.body["message"].as_str().unwrap();
        assert!(
            msg.contains("conflict with \"setpoint\": .spec.replicas"),
            "{msg}"
        );
        // Forced: kubectl takes the field over; now setpoint conflicts.
        assert_eq!(apply(&mut s, "kubectl", true, deploy(3)).code, 200);
        let r = apply(&mut s, "setpoint", false, deploy(1));
        assert_eq!(r.code, 409);
        assert_eq!(r.body["details"]["causes"][0]["field"], ".spec.replicas");
    }

    #[test]
    fn fields_a_manager_stops_applying_are_removed() {
        let mut s = with_namespace();
        let mut with_label = deploy(1);
        with_label["metadata"]["labels"]["extra"] = json!("y");
        apply(&mut s, "m", false, with_label);
        let r = apply(&mut s, "m", false, deploy(1));
        assert!(r.body["metadata"]["labels"].get("extra").is_none(), "{r:?}");
    }

    #[test]
    fn list_filters_by_label_and_delete_reports_not_found() {
        let mut s = with_namespace();
        apply(&mut s, "m", false, deploy(1));
        assert_eq!(
            s.list(&DEPLOY, Some("ns"), "app=x", "").body["items"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            s.list(&DEPLOY, Some("ns"), "app!=x", "").body["items"]
                .as_array()
                .unwrap()
                .len(),
            0
        );
        assert_eq!(
            s.list(&DEPLOY, Some("other"), "", "").body["items"]
                .as_array()
                .unwrap()
                .len(),
            0
        );
        assert_eq!(
            s.delete(&DEPLOY, "ns", "d", &Preconditions::default()).code,
            200
        );
        assert_eq!(
            s.delete(&DEPLOY, "ns", "d", &Preconditions::default()).code,
            404
        );
        assert_eq!(s.get(&DEPLOY, "ns", "d").body["reason"], "NotFound");
    }

    fn version(r: &Reply) -> String {
        r.body["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn at_version(mut intent: Value, v: &str) -> Value {
        intent["metadata"]["resourceVersion"] = json!(v);
        intent
    }

    #[test]
    fn an_apply_with_another_resource_version_is_409_and_changes_nothing() {
        let mut s = with_namespace();
        let created = apply(&mut s, "m", false, deploy(1));
        let v1 = version(&created);
        // A writer changes the object: version moves on.
        let v2 = version(&apply(&mut s, "m", false, deploy(2)));
        assert_ne!(v1, v2);

        // An apply based on the first read fails, with the real server's wording.
        let r = apply(&mut s, "m", false, at_version(deploy(3), &v1));
        assert_eq!(r.code, 409, "{r:?}");
        assert_eq!(r.body["reason"], "Conflict");
        assert_eq!(
            r.body["message"],
            "Operation cannot be fulfilled on deployments.apps \"d\": the object has been \
             modified; please apply your changes to the latest version and try again"
        );
        assert_eq!(r.body["details"]["kind"], "deployments");
        assert!(r.body["details"].get("causes").is_none());
        let now = s.get(&DEPLOY, "ns", "d");
        assert_eq!(now.body["spec"]["replicas"], 2);
        assert_eq!(version(&now), v2);

        // Based on the current version it applies; the version in the body is not stored.
        let r = apply(&mut s, "m", false, at_version(deploy(3), &v2));
        assert_eq!(r.code, 200, "{r:?}");
        assert_eq!(r.body["spec"]["replicas"], 3);
        assert_ne!(version(&r), v2);
        // "" and "0" are no precondition at all.
        for unset in ["", "0"] {
            assert_eq!(
                apply(&mut s, "m", false, at_version(deploy(4), unset)).code,
                200
            );
        }
        // A no-op apply is checked too.
        let r = apply(&mut s, "m", false, at_version(deploy(4), &v1));
        assert_eq!(r.code, 409);
    }

    #[test]
    fn a_field_manager_conflict_is_reported_before_a_stale_version() {
        let mut s = with_namespace();
        let v = version(&apply(&mut s, "setpoint", false, deploy(1)));
        apply(&mut s, "setpoint", false, deploy(2));
        let r = apply(&mut s, "kubectl", false, at_version(deploy(3), &v));
        assert_eq!(r.code, 409);
        assert_eq!(
            r.body["details"]["causes"][0]["reason"],
            "FieldManagerConflict"
        );
    }

    #[test]
    fn an_apply_with_a_resource_version_creates_an_absent_object() {
        // The real server compares the version with the stored object only; with no object
        // there is nothing to compare, and the apply creates it.
        let fresh = Store::default().list(&DEPLOY, Some("ns"), "", "");
        assert_ne!(
            version(&fresh),
            "0",
            "even an empty store lists at a real version"
        );
        let mut s = with_namespace();
        let listed = s.list(&DEPLOY, Some("ns"), "", "metadata.name=d");
        assert_eq!(listed.body["items"], json!([]));
        let list_version = version(&listed);
        let r = apply(&mut s, "m", false, at_version(deploy(1), &list_version));
        assert_eq!(r.code, 201, "{r:?}");
        assert_ne!(
            version(&r),
            list_version,
            "a later write has a later version"
        );
        // The same body again now meets the object, whose version differs: 409.
        let r = apply(&mut s, "m", false, at_version(deploy(1), &list_version));
        assert_eq!(r.code, 409);
    }

    #[test]
    fn a_uid_in_an_apply_must_name_the_stored_object() {
        let mut s = with_namespace();
        let mut gone = deploy(1);
        gone["metadata"]["uid"] = json!("uid-of-a-deleted-object");
        let r = apply(&mut s, "m", false, gone.clone());
        assert_eq!(r.code, 409, "{r:?}");
        assert_eq!(
            r.body["message"],
            "Operation cannot be fulfilled on deployments.apps \"d\": uid mismatch: the \
             provided object specified uid uid-of-a-deleted-object, and no existing object was \
             found"
        );
        assert_eq!(s.get(&DEPLOY, "ns", "d").code, 404, "nothing was created");

        let created = apply(&mut s, "m", false, deploy(1));
        let mut same = deploy(2);
        same["metadata"]["uid"] = created.body["metadata"]["uid"].clone();
        assert_eq!(apply(&mut s, "m", false, same).code, 200);
        let r = apply(&mut s, "m", false, gone);
        assert_eq!(r.code, 422, "{r:?}");
        assert_eq!(r.body["details"]["causes"][0]["field"], "metadata.uid");
    }

    #[test]
    fn a_delete_with_failing_preconditions_is_409_and_deletes_nothing() {
        let mut s = with_namespace();
        let created = apply(&mut s, "m", false, deploy(1));
        let v1 = version(&created);
        let uid = created.body["metadata"]["uid"].as_str().unwrap().to_owned();
        let v2 = version(&apply(&mut s, "m", false, deploy(2)));

        let stale = Preconditions {
            uid: Some(uid.clone()),
            resource_version: Some(v1.clone()),
        };
        let r = s.delete(&DEPLOY, "ns", "d", &stale);
        assert_eq!(r.code, 409, "{r:?}");
        assert_eq!(r.body["reason"], "Conflict");
        assert_eq!(
            r.body["message"],
            format!(
                "Operation cannot be fulfilled on deployments.apps \"d\": StorageError: invalid \
                 object, Code: 4, Key: /registry/deployments/ns/d, ResourceVersion: 0, \
                 AdditionalErrorMsg: Precondition failed: ResourceVersion in precondition: {v1}, \
                 ResourceVersion in object meta: {v2}"
            )
        );
        let other_uid = Preconditions {
            uid: Some("not-the-uid".into()),
            resource_version: None,
        };
        let r = s.delete(&DEPLOY, "ns", "d", &other_uid);
        assert_eq!(r.code, 409);
        assert!(
            r.body["message"]
                .as_str()
                .unwrap()
                .contains("Precondition failed: UID in precondition: not-the-uid")
        );
        assert_eq!(s.get(&DEPLOY, "ns", "d").code, 200, "still there");

        let current = Preconditions {
            uid: Some(uid),
            resource_version: Some(v2),
        };
        assert_eq!(s.delete(&DEPLOY, "ns", "d", &current).code, 200);
        // Gone: preconditions or not, the answer is 404.
        assert_eq!(s.delete(&DEPLOY, "ns", "d", &current).code, 404);
    }

    #[test]
    fn field_selectors_select_by_name_and_refuse_other_fields() {
        let mut s = with_namespace();
        apply(&mut s, "m", false, deploy(1));
        let items = |r: Reply| r.body["items"].as_array().unwrap().len();
        assert_eq!(items(s.list(&DEPLOY, Some("ns"), "", "metadata.name=d")), 1);
        assert_eq!(
            items(s.list(&DEPLOY, Some("ns"), "", "metadata.name==x")),
            0
        );
        assert_eq!(
            items(s.list(&DEPLOY, None, "", "metadata.namespace!=ns")),
            0
        );
        let r = s.list(&DEPLOY, Some("ns"), "", "spec.replicas=1");
        assert_eq!(r.code, 400);
        assert_eq!(
            r.body["message"],
            "field label not supported: spec.replicas"
        );
    }

    #[test]
    fn deleting_a_namespace_deletes_its_objects() {
        let mut s = with_namespace();
        apply(&mut s, "m", false, deploy(1));
        assert_eq!(s.delete(&NS, "", "ns", &Preconditions::default()).code, 200);
        assert_eq!(s.get(&DEPLOY, "ns", "d").code, 404);
    }
}
