//! [`TestApiServer`]: a Kubernetes API server stand-in for tests and `setpoint dev`.
//!
//! No Kubernetes API server can run on the machines this project is built on (no container
//! runtime, no API server binary in the registries), so the adapter is tested against this
//! server, which follows the documented API behaviour for everything the adapter uses:
//!
//! - **Resources**: `namespaces` (cluster-scoped); `services`, `secrets`, `configmaps` (core
//!   `v1`); `deployments`, `statefulsets` (`apps/v1`).
//! - **GET** one object; **LIST** with an equality-based `labelSelector` (`a=b`, `a==b`,
//!   `a!=b`, `a`, `!a`) and a `fieldSelector` on `metadata.name` / `metadata.namespace`
//!   (other fields: 400 `field label not supported`), per namespace or across all; a missing
//!   namespace lists as empty. A list's `metadata.resourceVersion` is the store's revision at
//!   that moment: every later write gets a greater version.
//! - **PATCH** with `application/apply-patch+yaml` (server-side apply; the body must be JSON,
//!   which is valid YAML — kube-rs sends JSON) with `fieldManager` and `force`: creates (201)
//!   or updates (200); records `metadata.managedFields` per manager; bumps `resourceVersion`
//!   only when something changed and `generation` only when content outside metadata changed;
//!   removes fields a manager stops applying unless another manager owns them; answers
//!   **409 Conflict** (`Status` with one `FieldManagerConflict` cause per field, message
//!   `Apply failed with 1 conflict: conflict with "kubectl": .spec.replicas`) when another
//!   manager owns a field whose value would change, unless `force=true`, which takes it over.
//!   Applying the same value as another manager co-owns the field, as on a real server.
//! - **`resourceVersion` preconditions** (optimistic concurrency, as the real server's
//!   generic registry implements them):
//!   - an apply body whose `metadata.resourceVersion` is set (not `""`, not `"0"`) and differs
//!     from the stored object's answers **409 Conflict**, reason `Conflict`, details `{name,
//!     group, kind: <resource>}`, message `Operation cannot be fulfilled on deployments.apps
//!     "NAME": the object has been modified; please apply your changes to the latest version
//!     and try again`, and changes nothing. It is checked after field-manager conflicts (which
//!     win) and before validation; a no-op apply is checked too. The version in the body is
//!     never stored;
//!   - when the object does not exist, the version in the body is not compared with anything
//!     and the apply creates the object (the real server's create-on-apply path does the same),
//!     so a client that read "absent" from a list at version N and sends N learns of a
//!     concurrent create by a 409 instead of merging into it;
//!   - a `metadata.uid` in an apply body names the object the write is for: when no object
//!     exists, **409 Conflict** `Operation cannot be fulfilled on deployments.apps "NAME": uid
//!     mismatch: the provided object specified uid UID, and no existing object was found`
//!     (checked first, as the real server checks it before admission); when the stored object
//!     has another uid, 422 Invalid (`metadata.uid`: field is immutable), after the version;
//!   - a DELETE whose body carries `DeleteOptions.preconditions` (`uid`, `resourceVersion`)
//!     that the stored object does not meet answers **409 Conflict**, message `Operation
//!     cannot be fulfilled on deployments.apps "NAME": StorageError: invalid object, Code: 4,
//!     Key: /registry/deployments/NS/NAME, ResourceVersion: 0, AdditionalErrorMsg:
//!     Precondition failed: ResourceVersion in precondition: 5, ResourceVersion in object
//!     meta: 6` (uid first, then version), and deletes nothing; an absent object is 404 either
//!     way.
//! - **DELETE**: `Status` Success (a namespace answers with itself, phase `Terminating`, and
//!   takes its objects with it at once); **404 NotFound** `Status` when absent.
//! - **404 NotFound** for a namespaced write into a missing namespace (`details.kind =
//!   "namespaces"`), **422 Invalid** for objects failing basic validation (see
//!   `validate.rs`), **400 BadRequest** for a mismatched name/kind or an unparsable body,
//!   **415** for other patch types, **405** for other verbs (create and update go through
//!   apply here).
//! - `/version`, `/api` and `/apis` answer minimal discovery documents.
//!
//! Simplifications (documented, not hidden): lists are atomic for field ownership (the real
//! server tracks keyed lists such as `containers` item by item); no defaulting beyond a
//! Service's cluster IP, a Secret's type and a Namespace's phase; workload controllers are
//! simulated by marking Deployments and StatefulSets fully ready at once; no watch, no
//! authentication beyond an optional bearer token ([`TestApiServer::require_token`]: 401
//! without it), no authorization, no admission. Tests that need those run against a real cluster (see the
//! crate README).
//!
//! Faults can be injected ([`TestApiServer::inject`]) to exercise error classes end to end:
//! the next requests answer a given status (e.g. 429 with `Retry-After`, 500), are delayed, or
//! have their connection closed without an answer. A concurrent writer can be placed exactly
//! between a client's read and its write ([`TestApiServer::before_request`]), and every answered
//! request is logged ([`TestApiServer::requests`]).
//!
//! Further simplifications: a resourceVersion that is not a number is compared as a string
//! (the real server refuses it as invalid); `fieldSelector` knows only the two metadata
//! fields every resource serves.

mod fields;
mod store;
mod validate;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tracing::debug;

use crate::config::KubernetesConfig;
use store::{ApplyRequest, Kind, Preconditions, Reply, Store};

/// A fault to inject into the next requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and a matching `Status` body, without touching the store.
    /// A `retry_after` sets both the `Retry-After` header and `details.retryAfterSeconds`, as
    /// the real server does when it throttles.
    Status {
        /// The HTTP status, e.g. 429, 500, 503.
        code: u16,
        /// Seconds to ask the client to wait.
        retry_after: Option<u32>,
    },
    /// Wait this long, then handle the request normally (to exercise client timeouts).
    Delay(Duration),
    /// Close the connection without answering (a reset as the client sees it).
    Hangup,
}

/// A write another client makes, which the server itself carries out just before it handles a
/// matching request ([`TestApiServer::before_request`]): a concurrent writer that wins a race,
/// placed exactly where a test wants it.
#[derive(Debug, Clone, PartialEq)]
pub enum ConcurrentWrite {
    /// A server-side apply of `body` to the object at `path` (an API path such as
    /// `/apis/apps/v1/namespaces/NS/deployments/NAME`) by field manager `manager`.
    Apply {
        /// The object's API path.
        path: String,
        /// The field manager.
        manager: String,
        /// Whether to force conflicts.
        force: bool,
        /// The apply body.
        body: Value,
    },
    /// A delete of the object at `path`.
    Delete {
        /// The object's API path.
        path: String,
    },
}

/// One request the server answered ([`TestApiServer::requests`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    /// `GET`, `PATCH`, `DELETE`, …
    pub method: String,
    /// The request path, without the query.
    pub path: String,
    /// The HTTP status of the answer.
    pub code: u16,
}

/// Writes to carry out before the first later request with this method and path.
#[derive(Debug)]
struct Hook {
    method: String,
    path: String,
    writes: Vec<ConcurrentWrite>,
}

/// The state shared by all connections.
#[derive(Debug, Default)]
struct Shared {
    store: Mutex<Store>,
    faults: Mutex<VecDeque<Fault>>,
    /// When set, every request must carry `Authorization: Bearer <token>`.
    token: Mutex<Option<String>>,
    /// Concurrent writes waiting for their request.
    hooks: Mutex<Vec<Hook>>,
    /// Every answered request, in order.
    log: Mutex<Vec<LoggedRequest>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the store half-written in a way that matters
    // to tests (each write is one insert), so a poisoned lock is used as it is.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running Kubernetes API test server on 127.0.0.1.
///
/// Stops when [`TestApiServer::stop`] is called or when dropped; either way the port is closed
/// and open connections are cut, so a client then sees "connection refused".
#[derive(Debug)]
pub struct TestApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestApiServer {
    /// Starts a server on `127.0.0.1` at a free port.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a server on `addr` (port 0 picks a free port).
    ///
    /// # Errors
    /// When `addr` cannot be bound.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(serve(listener, Arc::clone(&shared), rx));
        debug!(%addr, "kubernetes test API server started");
        Ok(Self {
            addr,
            shared,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An adapter configuration pointing at this server.
    pub fn config(&self) -> KubernetesConfig {
        KubernetesConfig::for_url(self.url())
    }

    /// A kubeconfig file's content pointing at this server (context `setpoint-test`), for
    /// tools that want one.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: setpoint-test\n  cluster:\n    server: {}\ncontexts:\n- name: setpoint-test\n  context:\n    cluster: setpoint-test\n    user: setpoint-test\nusers:\n- name: setpoint-test\n  user: {{}}\ncurrent-context: setpoint-test\n",
            self.url()
        )
    }

    /// Makes each of the next `times` requests suffer `fault` (after faults already queued).
    pub fn inject(&self, fault: Fault, times: usize) {
        let mut q = lock(&self.shared.faults);
        for _ in 0..times {
            q.push_back(fault.clone());
        }
    }

    /// From now on, answers **401 Unauthorized** (a `Status` as the real server sends) to every
    /// request that does not carry `Authorization: Bearer <token>`; `None` accepts any request
    /// again (the default: no authentication).
    pub fn require_token(&self, token: Option<&str>) {
        *lock(&self.shared.token) = token.map(str::to_owned);
    }

    /// While `hold` is true, workloads applied from now on report no ready replica, as a
    /// rollout that has not finished; `false` finishes every held rollout (the workloads report
    /// all their replicas ready, as their controllers would).
    pub fn hold_rollouts(&self, hold: bool) {
        lock(&self.shared.store).hold_rollouts(hold);
    }

    /// Drops all queued faults.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// Carries out `writes`, in order, just before the server handles the first later request
    /// with this `method` (`"PATCH"`, `"DELETE"`, …) and exactly this `path` — as if another
    /// client had written between the requesting client's read and its write. Hooks wait in
    /// the order they were added; each runs once.
    pub fn before_request(&self, method: &str, path: &str, writes: Vec<ConcurrentWrite>) {
        lock(&self.shared.hooks).push(Hook {
            method: method.to_ascii_uppercase(),
            path: path.to_owned(),
            writes,
        });
    }

    /// Every request answered so far (faults included, hang-ups and the hooks' own writes
    /// not), in order.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        lock(&self.shared.log).clone()
    }

    /// Stops accepting, cuts open connections and waits for the server task to end.
    /// Stopping twice, or dropping after stopping, is harmless.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: oneshot::Receiver<()>) {
    // Connections live in the set, so ending this task (stop or drop) aborts them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = Arc::clone(&shared);
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(Arc::clone(&shared), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
}

/// The error that makes hyper close a connection without answering ([`Fault::Hangup`]).
#[derive(Debug, thiserror::Error)]
#[error("connection closed by fault injection")]
struct Hangup;

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Hangup> {
    let fault = lock(&shared.faults).pop_front();
    match fault {
        Some(Fault::Status { code, retry_after }) => {
            log(&shared, req.method(), req.uri().path(), code);
            return Ok(fault_reply(code, retry_after));
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Hangup) => return Err(Hangup),
        None => {}
    }
    let (parts, body) = req.into_parts();
    if let Some(token) = lock(&shared.token).as_deref() {
        let sent = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if sent != Some(token) {
            debug!(method = %parts.method, path = parts.uri.path(), "test API request without the required token");
            log(&shared, &parts.method, parts.uri.path(), 401);
            return Ok(respond(
                store::status(401, "Unauthorized", "Unauthorized", None),
                None,
            ));
        }
    }
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(Hangup),
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let query: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    run_hooks(&shared, &parts.method, parts.uri.path());
    let reply = route(
        &shared,
        &parts.method,
        parts.uri.path(),
        &query,
        &content_type,
        &body,
    );
    debug!(method = %parts.method, path = parts.uri.path(), code = reply.code, "test API request");
    log(&shared, &parts.method, parts.uri.path(), reply.code);
    Ok(respond(reply, None))
}

fn log(shared: &Shared, method: &Method, path: &str, code: u16) {
    lock(&shared.log).push(LoggedRequest {
        method: method.to_string(),
        path: path.to_owned(),
        code,
    });
}

/// Carries out the concurrent writes of the first hook waiting for this request, if any.
fn run_hooks(shared: &Shared, method: &Method, path: &str) {
    let hook = {
        let mut hooks = lock(&shared.hooks);
        let at = hooks
            .iter()
            .position(|h| h.method == method.as_str() && h.path == path);
        at.map(|i| hooks.remove(i))
    };
    for write in hook.map(|h| h.writes).unwrap_or_default() {
        let reply = match &write {
            ConcurrentWrite::Apply {
                path,
                manager,
                force,
                body,
            } => {
                let query = [
                    ("fieldManager".to_owned(), manager.clone()),
                    ("force".to_owned(), force.to_string()),
                ];
                let body = serde_json::to_vec(body).unwrap_or_default();
                route(
                    shared,
                    &Method::PATCH,
                    path,
                    &query,
                    "application/apply-patch+yaml",
                    &body,
                )
            }
            ConcurrentWrite::Delete { path } => route(shared, &Method::DELETE, path, &[], "", &[]),
        };
        debug!(?write, code = reply.code, "test API concurrent write");
    }
}

fn respond(reply: Reply, retry_after: Option<u32>) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&reply.body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() =
        StatusCode::from_u16(reply.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    if let Some(s) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(s));
    }
    resp
}

fn fault_reply(code: u16, retry_after: Option<u32>) -> Response<Full<Bytes>> {
    let reason = match code {
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        401 => "Unauthorized",
        403 => "Forbidden",
        _ => "",
    };
    let details = retry_after.map(|s| json!({"retryAfterSeconds": s}));
    let message = match code {
        429 => "Too many requests, please try again later.".to_owned(),
        _ => format!("injected fault {code}"),
    };
    respond(store::status(code, reason, &message, details), retry_after)
}

/// The preconditions of a DELETE's `DeleteOptions` body (an empty body has none).
fn delete_preconditions(body: &[u8]) -> Result<Preconditions, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Preconditions::default());
    }
    let options: Value = serde_json::from_slice(body).map_err(|e| {
        store::status(
            400,
            "BadRequest",
            &format!("error decoding DeleteOptions: {e}"),
            None,
        )
    })?;
    let text = |key: &str| options["preconditions"][key].as_str().map(str::to_owned);
    Ok(Preconditions {
        uid: text("uid"),
        resource_version: text("resourceVersion"),
    })
}

fn query_value<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Where a request goes: a kind, and optionally a namespace and a name.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", "apps", "v1", rest @ ..] => ("apps", rest),
        _ => return None,
    };
    match rest {
        // /namespaces, /namespaces/{name}: the namespace resource itself.
        [r] => Some(Target {
            kind: store::kind(group, r)?,
            namespace: None,
            name: None,
        }),
        ["namespaces", name] if group.is_empty() => Some(Target {
            kind: store::kind("", "namespaces")?,
            namespace: None,
            name: Some((*name).to_owned()),
        }),
        ["namespaces", ns, r] => Some(Target {
            kind: store::kind(group, r).filter(|k| k.namespaced)?,
            namespace: Some((*ns).to_owned()),
            name: None,
        }),
        ["namespaces", ns, r, name] => Some(Target {
            kind: store::kind(group, r).filter(|k| k.namespaced)?,
            namespace: Some((*ns).to_owned()),
            name: Some((*name).to_owned()),
        }),
        _ => None,
    }
}

fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: &[(String, String)],
    content_type: &str,
    body: &[u8],
) -> Reply {
    match path {
        "/version" => {
            return Reply {
                code: 200,
                body: json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-setpoint-test"}),
            };
        }
        "/api" => {
            return Reply {
                code: 200,
                body: json!({"kind": "APIVersions", "versions": ["v1"]}),
            };
        }
        "/apis" => {
            return Reply {
                code: 200,
                body: json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
                    "name": "apps",
                    "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
                    "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"},
                }]}),
            };
        }
        _ => {}
    }
    let Some(target) = parse_path(path) else {
        return store::status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            None,
        );
    };
    let ns = target.namespace.as_deref().unwrap_or_default();
    let mut store = lock(&shared.store);
    match (method, target.name.as_deref()) {
        (&Method::GET, Some(name)) => store.get(&target.kind, ns, name),
        (&Method::GET, None) => store.list(
            &target.kind,
            target.namespace.as_deref(),
            query_value(query, "labelSelector").unwrap_or_default(),
            query_value(query, "fieldSelector").unwrap_or_default(),
        ),
        (&Method::DELETE, Some(name)) => match delete_preconditions(body) {
            Ok(p) => store.delete(&target.kind, ns, name, &p),
            Err(reply) => reply,
        },
        (&Method::PATCH, Some(name)) => {
            if !content_type.starts_with("application/apply-patch") {
                return store::status(
                    415,
                    "UnsupportedMediaType",
                    &format!(
                        "the body of the request was in an unknown format - accepted media types here: application/apply-patch+yaml (got {content_type:?})"
                    ),
                    None,
                );
            }
            let Some(manager) = query_value(query, "fieldManager").filter(|m| !m.is_empty()) else {
                return store::status(
                    400,
                    "BadRequest",
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    None,
                );
            };
            let intent: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => {
                    return store::status(
                        400,
                        "BadRequest",
                        &format!(
                            "error decoding apply patch (this test server takes the JSON form of YAML): {e}"
                        ),
                        None,
                    );
                }
            };
            store.apply(ApplyRequest {
                kind: target.kind,
                namespace: ns,
                name,
                manager,
                force: query_value(query, "force") == Some("true"),
                intent,
            })
        }
        _ => store::status(
            405,
            "MethodNotAllowed",
            &format!(
                "{method} {path} is not supported by this test server (it serves GET, LIST, DELETE and server-side apply)"
            ),
            None,
        ),
    }
}
