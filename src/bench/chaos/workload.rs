//! The soak's API workload: a few concurrent clients create, update and delete KVX instances
//! through any engine's API, at a pace that spreads the wanted number of operations over the
//! fault phase. The seed decides each operation and its target.
//!
//! A call that gets no answer (the engine was killed or paused, PostgreSQL restarting) is sent
//! again, to the next engine, with the same request id and body, until it is answered: the
//! API then answers as it first did, so a request is never applied twice. An update is sent to
//! an instance that looked idle; one refused because a chain is running
//! (`FAILED_PRECONDITION`) is an answer, counted apart.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::world::{REGION, TENANT};
use super::{ChaosConfig, ChaosError};
use crate::api::proto::instance_service_client::InstanceServiceClient;
use crate::api::proto::{
    CreateInstanceRequest, DeleteInstanceRequest, GetInstanceRequest, Instance, InstanceSpec,
    InstanceStatus, UpdateInstanceRequest,
};

/// Concurrent API clients.
const CLIENTS: usize = 4;
/// How long one request is retried before it counts as unanswered.
const REQUEST_DEADLINE: Duration = Duration::from_secs(180);
/// How long one call may take before it is sent again elsewhere.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The least time the clients go on after the fault phase to reach the wanted operations.
const CATCH_UP: Duration = Duration::from_secs(120);
/// The plans the workload moves instances between.
const PLANS: [&str; 3] = ["kvx.small", "kvx.medium", "kvx.large"];

/// The operations done and how the API answered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OpCounts {
    /// Creates accepted.
    pub creates: usize,
    /// Updates accepted.
    pub updates: usize,
    /// Deletes accepted.
    pub deletes: usize,
    /// Updates refused because the instance was busy (an answer, not a failure).
    pub refused_busy: usize,
    /// Calls sent again because the first got no answer.
    pub retried_calls: usize,
    /// Requests that needed at least one retry.
    pub retried_requests: usize,
    /// Requests never answered within their deadline.
    pub unanswered: usize,
    /// Answers no correct engine gives to these requests.
    pub unexpected: Vec<String>,
}

/// One instance as the workload knows it.
#[derive(Debug, Clone, Serialize)]
pub struct Inst {
    /// Its short name.
    pub name: String,
    /// Its id, once created.
    pub uid: Option<String>,
    /// Its generation: 1 plus the updates accepted.
    pub generation: i64,
    /// Deleted (accepted).
    pub deleted: bool,
}

/// What the workload did to each instance, for the checks.
#[derive(Debug, Clone, Default)]
pub struct Model {
    /// Every instance ever created, by name.
    pub instances: BTreeMap<String, Inst>,
}

struct State {
    rng: StdRng,
    model: Model,
    next: usize,
    busy: HashSet<String>,
    counts: OpCounts,
}

struct Inner {
    channels: Vec<Channel>,
    auth: MetadataValue<Ascii>,
    ops: usize,
    max_live: usize,
    pace: Duration,
    verbose: bool,
    state: Mutex<State>,
}

/// The workload; clones share it.
#[derive(Clone)]
pub struct Workload {
    inner: Arc<Inner>,
}

/// An operation, chosen under the lock.
enum Op {
    Create {
        name: String,
        plan: &'static str,
    },
    Update {
        name: String,
        plan: &'static str,
        size: i32,
    },
    Delete {
        name: String,
    },
}

/// How a request ended.
enum Answer<T> {
    Ok(T),
    Refused(tonic::Status),
    Unanswered,
}

impl Workload {
    /// A workload over the engines at `endpoints`, as tenant `token`.
    ///
    /// # Errors
    /// A bad endpoint or token.
    pub fn new(
        config: &ChaosConfig,
        endpoints: Vec<String>,
        token: String,
    ) -> Result<Self, ChaosError> {
        let mut channels = Vec::new();
        for e in endpoints {
            let ep = Endpoint::from_shared(e)
                .map_err(|e| ChaosError::Setup(format!("endpoint: {e}")))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(CALL_TIMEOUT);
            // Lazy: connects at the first call and again after the engine came back.
            channels.push(ep.connect_lazy());
        }
        let auth = format!("Bearer {token}")
            .parse()
            .map_err(|_| ChaosError::Setup("the token is not ASCII".into()))?;
        // Some operations end without a request (an update of a busy instance is skipped):
        // aim a little higher than asked.
        let planned = (config.ops as f64 * 1.3).max(1.0);
        let pace =
            Duration::from_secs_f64(config.duration.as_secs_f64() * CLIENTS as f64 / planned);
        Ok(Self {
            inner: Arc::new(Inner {
                channels,
                auth,
                ops: config.ops,
                max_live: config.max_live,
                pace,
                verbose: config.verbose,
                state: Mutex::new(State {
                    rng: StdRng::seed_from_u64(config.seed),
                    model: Model::default(),
                    next: 0,
                    busy: HashSet::new(),
                    counts: OpCounts::default(),
                }),
            }),
        })
    }

    /// What was done to each instance.
    pub fn model(&self) -> Model {
        self.state(|s| s.model.clone())
    }

    fn state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut guard = match self.inner.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    fn accepted(&self) -> usize {
        self.state(|s| s.counts.creates + s.counts.updates + s.counts.deletes)
    }

    /// Runs the clients: paced until `until`, then unpaced until the wanted number of
    /// operations was accepted (for at most half the phase again, and at least
    /// [`CATCH_UP`]: on a busy machine the count is reached a little later, never missed).
    /// Returns the counts.
    pub async fn run(self, until: Instant) -> OpCounts {
        let hard_stop = until + ((until - Instant::now()) / 2).max(CATCH_UP);
        let mut clients = Vec::new();
        for c in 0..CLIENTS {
            let me = self.clone();
            clients.push(tokio::spawn(async move {
                // Clients start a little apart.
                tokio::time::sleep(me.inner.pace * c as u32 / CLIENTS as u32).await;
                loop {
                    let now = Instant::now();
                    if now >= hard_stop || (now >= until && me.accepted() >= me.inner.ops) {
                        return;
                    }
                    let started = Instant::now();
                    me.one().await;
                    if Instant::now() < until {
                        let jitter = me.state(|s| s.rng.random_range(0.5..1.5));
                        let nap = me
                            .inner
                            .pace
                            .mul_f64(jitter)
                            .saturating_sub(started.elapsed());
                        tokio::time::sleep(nap).await;
                    }
                }
            }));
        }
        for c in clients {
            let _ = c.await;
        }
        self.state(|s| s.counts.clone())
    }

    /// Chooses and does one operation.
    async fn one(&self) {
        let Some(op) = self.choose() else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        };
        match op {
            Op::Create { name, plan } => self.create(name, plan).await,
            Op::Update { name, plan, size } => self.update(name, plan, size).await,
            Op::Delete { name } => self.delete(name).await,
        }
    }

    fn choose(&self) -> Option<Op> {
        let max_live = self.inner.max_live;
        self.state(|s| {
            let live: Vec<String> = s
                .model
                .instances
                .values()
                .filter(|i| !i.deleted && i.uid.is_some() && !s.busy.contains(&i.name))
                .map(|i| i.name.clone())
                .collect();
            let alive = s.model.instances.values().filter(|i| !i.deleted).count();
            let roll = s.rng.random_range(0..100);
            let pick = |s: &mut State| -> Option<String> {
                if live.is_empty() {
                    None
                } else {
                    Some(live[s.rng.random_range(0..live.len())].clone())
                }
            };
            let op = if (roll < 45 && alive < max_live) || live.is_empty() {
                if alive >= max_live {
                    return None;
                }
                let name = format!("chaos-{:04}", s.next);
                s.next += 1;
                let plan = PLANS[s.rng.random_range(0..PLANS.len())];
                Op::Create { name, plan }
            } else if roll < 82 {
                let name = pick(s)?;
                let plan = PLANS[s.rng.random_range(0..PLANS.len())];
                let size = s.rng.random_range(10..40);
                Op::Update { name, plan, size }
            } else {
                Op::Delete { name: pick(s)? }
            };
            let name = match &op {
                Op::Create { name, .. } | Op::Update { name, .. } | Op::Delete { name } => name,
            };
            s.busy.insert(name.clone());
            Some(op)
        })
    }

    fn release(&self, name: &str) {
        self.state(|s| {
            s.busy.remove(name);
        });
    }

    fn unexpected(&self, what: String) {
        if self.inner.verbose {
            eprintln!("chaos: unexpected answer: {what}");
        }
        self.state(|s| s.counts.unexpected.push(what));
    }

    async fn create(&self, name: String, plan: &'static str) {
        let request = CreateInstanceRequest {
            parent: format!("tenants/{TENANT}"),
            instance_id: name.clone(),
            instance: Some(Instance {
                spec: Some(spec(plan, 10)),
                ..Instance::default()
            }),
            request_id: uuid::Uuid::new_v4().to_string(),
            bulk: false,
        };
        self.state(|s| {
            s.model.instances.insert(
                name.clone(),
                Inst {
                    name: name.clone(),
                    uid: None,
                    generation: 1,
                    deleted: false,
                },
            );
        });
        let answer = self
            .call(|mut c, auth| {
                let request = request.clone();
                async move { c.create_instance(with_auth(request, auth)).await }
            })
            .await;
        match answer {
            Answer::Ok(i) => self.state(|s| {
                s.counts.creates += 1;
                if let Some(inst) = s.model.instances.get_mut(&name) {
                    inst.uid = Some(i.uid.clone());
                }
            }),
            Answer::Refused(st) => {
                self.unexpected(format!("create {name}: {:?} {}", st.code(), st.message()));
                // Never created: not an instance the checks expect.
                self.state(|s| {
                    s.model.instances.remove(&name);
                });
            }
            Answer::Unanswered => self.state(|s| {
                s.counts.unanswered += 1;
            }),
        }
        self.release(&name);
    }

    async fn update(&self, name: String, plan: &'static str, size: i32) {
        let full = format!("tenants/{TENANT}/instances/{name}");
        // Only an instance that looks idle: a busy one refuses the change anyway.
        let current = self
            .call(|mut c, auth| {
                let full = full.clone();
                async move {
                    c.get_instance(with_auth(GetInstanceRequest { name: full }, auth))
                        .await
                }
            })
            .await;
        let current = match current {
            Answer::Ok(i) => i,
            Answer::Refused(st) => {
                self.unexpected(format!("get {name}: {:?} {}", st.code(), st.message()));
                self.release(&name);
                return;
            }
            Answer::Unanswered => {
                self.state(|s| s.counts.unanswered += 1);
                self.release(&name);
                return;
            }
        };
        let old = current.spec.clone().unwrap_or_default();
        if current.has_active_work || current.status != InstanceStatus::Ready as i32 {
            self.release(&name);
            return;
        }
        // A change of the plan, and a data volume that may grow (never shrink).
        let plan = if old.plan == plan {
            PLANS[(PLANS.iter().position(|p| *p == plan).unwrap_or(0) + 1) % PLANS.len()]
        } else {
            plan
        };
        let size = size.max(old.size_gb);
        let request = UpdateInstanceRequest {
            instance: Some(Instance {
                name: full.clone(),
                spec: Some(spec(plan, size)),
                ..Instance::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["spec.plan".into(), "spec.size_gb".into()],
            }),
            request_id: uuid::Uuid::new_v4().to_string(),
            bulk: false,
        };
        let answer = self
            .call(|mut c, auth| {
                let request = request.clone();
                async move { c.update_instance(with_auth(request, auth)).await }
            })
            .await;
        match answer {
            Answer::Ok(i) => {
                let expected = self.state(|s| {
                    s.counts.updates += 1;
                    let inst = s.model.instances.get_mut(&name)?;
                    inst.generation += 1;
                    Some(inst.generation)
                });
                if expected != Some(i.generation) {
                    self.unexpected(format!(
                        "update {name} answered generation {}, expected {expected:?}",
                        i.generation
                    ));
                }
            }
            Answer::Refused(st) if st.code() == Code::FailedPrecondition => {
                self.state(|s| s.counts.refused_busy += 1);
            }
            Answer::Refused(st) => {
                self.unexpected(format!("update {name}: {:?} {}", st.code(), st.message()));
            }
            Answer::Unanswered => self.state(|s| s.counts.unanswered += 1),
        }
        self.release(&name);
    }

    async fn delete(&self, name: String) {
        let request = DeleteInstanceRequest {
            name: format!("tenants/{TENANT}/instances/{name}"),
            request_id: uuid::Uuid::new_v4().to_string(),
            bulk: false,
        };
        let answer = self
            .call(|mut c, auth| {
                let request = request.clone();
                async move {
                    c.delete_instance(with_auth(request, auth))
                        .await
                        .map(|r| r.map(|_| ()))
                }
            })
            .await;
        match answer {
            Answer::Ok(()) => self.state(|s| {
                s.counts.deletes += 1;
                if let Some(inst) = s.model.instances.get_mut(&name) {
                    inst.deleted = true;
                }
            }),
            Answer::Refused(st) => {
                self.unexpected(format!("delete {name}: {:?} {}", st.code(), st.message()));
            }
            Answer::Unanswered => self.state(|s| s.counts.unanswered += 1),
        }
        // A deleted instance is never chosen again; it stays busy.
        let deleted = self.state(|s| s.model.instances.get(&name).is_some_and(|i| i.deleted));
        if !deleted {
            self.release(&name);
        }
    }

    /// Sends one request until an engine answers it: a call that times out or finds its engine
    /// gone is sent to the next engine, the same request each time.
    async fn call<T, F, Fut>(&self, f: F) -> Answer<T>
    where
        F: Fn(InstanceServiceClient<Channel>, MetadataValue<Ascii>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let n = self.inner.channels.len();
        let first = self.state(|s| s.rng.random_range(0..n));
        let mut delay = Duration::from_millis(100);
        for attempt in 0.. {
            let channel = self.inner.channels[(first + attempt) % n].clone();
            let client = InstanceServiceClient::new(channel);
            let result =
                tokio::time::timeout(CALL_TIMEOUT, f(client, self.inner.auth.clone())).await;
            match result {
                Ok(Ok(r)) => return Answer::Ok(r.into_inner()),
                Ok(Err(st)) if !retryable(st.code()) => return Answer::Refused(st),
                Ok(Err(_)) | Err(_) => {}
            }
            if started.elapsed() > REQUEST_DEADLINE {
                return Answer::Unanswered;
            }
            self.state(|s| {
                s.counts.retried_calls += 1;
                if attempt == 0 {
                    s.counts.retried_requests += 1;
                }
            });
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        Answer::Unanswered
    }
}

/// Codes that mean "no answer from this engine now": the same request goes again, to the
/// next engine.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
            | Code::ResourceExhausted
            | Code::Aborted
    )
}

fn spec(plan: &str, size_gb: i32) -> InstanceSpec {
    InstanceSpec {
        plan: plan.into(),
        region: REGION.into(),
        size_gb,
        owner_email: "owner@example.com".into(),
    }
}

fn with_auth<T>(msg: T, auth: MetadataValue<Ascii>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", auth);
    r
}
