//! `setpoint.v1.InstanceService`: the user-facing resource. Create, Update and Delete write
//! the desired state, the first unit of work and `has_active_work = true` in one transaction
//! (together with the request id's stored answer), then answer. Concurrent Creates share their
//! transaction (group commit, see [`super::batch`]); what a batch cannot settle runs on its own
//! and gets the same answer. Status changes after that are the trigger's (see
//! [`super::status`]).

use std::pin::Pin;
use std::sync::Arc;

use sqlx::PgPool;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::ApiConfig;
use super::auth::Caller;
use super::batch::{CREATE_METHOD, CreateBatcher, NewCreate, Settled};
use super::convert::{self, instance_name};
use super::errors::{ApiError, Violation};
use super::idempotency::{self, Begun};
use super::listing;
use super::operations::{FirstUnits, ServedRegions};
use super::page_token::Scope;
use super::proto::instance_service_server::InstanceService;
use super::proto::{
    CreateInstanceRequest, DeleteInstanceRequest, GetInstanceRequest, Instance, InstanceSpec,
    InstanceStatus, ListInstancesRequest, ListInstancesResponse, RotateInstanceCredentialsRequest,
    UpdateInstanceRequest, WatchInstanceRequest,
};
use super::quota::{ChangeQuota, lane_of};
use super::status::InstanceState;
use super::tenant_view::Audience;
use super::validate::{self, Access, MAX_MASK_PATH_CHARS, MAX_MASK_PATHS, SpecFields, Tenants};
use super::wake::WorkerWaker;
use super::watch::InstanceEvents;
use super::watch_limit::WatchSlots;
use crate::plugins::kvx::KIND as KVX_KIND;
use crate::queue;
use crate::store::instances::{
    InstanceRow, NewResource, instance_get, instance_insert, instance_start_operation,
    new_instance_id,
};
use crate::store::work::work_supersede_for_resource;

/// The service.
#[derive(Debug, Clone)]
pub struct Instances {
    pool: PgPool,
    events: Arc<InstanceEvents>,
    /// Ends every Watch stream when the server shuts down (a graceful shutdown waits for open
    /// streams).
    shutdown: CancellationToken,
    /// Wakes the workers after a committed change, off the request's path. Units are enqueued
    /// without a NOTIFY in the request's transaction (which would make concurrent commits
    /// queue up behind one another); workers also poll, so a lost wake-up only costs latency.
    waker: WorkerWaker,
    /// Group commit of Creates; `None` runs every Create on its own.
    creates: Option<CreateBatcher>,
    /// Open Watch streams per tenant, up to [`ApiConfig::max_watches_per_tenant`].
    watches: WatchSlots,
    /// How an operation starts: the KVX kind's chains, or stand-in kinds.
    first: FirstUnits,
    /// The regions live engines serve KVX instances in (checked only with the kind declared).
    regions: Arc<ServedRegions>,
    /// The per-tenant quota on changes in flight (shared with ResourceService).
    quota: ChangeQuota,
}

impl Instances {
    /// The service on `pool`, fed by `events` for Watch; Watch streams end at `shutdown`.
    /// Starts the Create batch executors of `config` (none when
    /// [`ApiConfig::create_batch_executors`] is 0). Watch streams count in `watches` (shared
    /// with ResourceService), and so do changes in flight (`quota`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: PgPool,
        config: Arc<ApiConfig>,
        first: FirstUnits,
        events: Arc<InstanceEvents>,
        watches: WatchSlots,
        quota: ChangeQuota,
        shutdown: CancellationToken,
    ) -> Self {
        let waker = WorkerWaker::start(pool.clone());
        let regions = Arc::new(ServedRegions::new(pool.clone(), KVX_KIND));
        let creates = (config.create_batch_executors > 0).then(|| {
            CreateBatcher::start(
                pool.clone(),
                first.clone(),
                config.create_batch_executors,
                config.create_batch_max,
                waker.clone(),
            )
        });
        Self {
            pool,
            events,
            shutdown,
            waker,
            creates,
            watches,
            first,
            regions,
            quota,
        }
    }

    /// FAILED_PRECONDITION unless a live engine serves KVX instances in `region` (only when
    /// the KVX kind is declared: stand-in kinds serve any region).
    async fn ensure_region_served(&self, region: &str) -> Result<(), ApiError> {
        if !matches!(self.first, FirstUnits::Declared(_)) {
            return Ok(());
        }
        let served = self.regions.get().await?;
        if served.iter().any(|r| r == region) {
            return Ok(());
        }
        Err(ApiError::NotServed {
            what: format!("region {region}"),
            served: served.to_vec(),
        })
    }

    /// A Create on its own: its own transaction, with the request id claimed first.
    async fn create_alone(&self, c: &NewCreate) -> Result<Instance, ApiError> {
        let tenant = c.tenant.as_str();
        let mut tx = match idempotency::begin::<Instance>(
            &self.pool,
            tenant,
            &c.request_id,
            CREATE_METHOD,
            &c.body_hash,
        )
        .await?
        {
            Begun::Replay(answer) => return Ok(answer),
            Begun::New(tx) => tx,
        };
        self.quota.admit(&mut tx, tenant).await?;
        let id = new_instance_id();
        let new = NewResource {
            id,
            tenant,
            kind: KVX_KIND,
            name: &c.name,
            spec: &c.spec,
            spec_version: 1,
        };
        let Some(mut row) = instance_insert(&mut tx, new).await? else {
            return Err(ApiError::AlreadyExists(instance_name(tenant, &c.name)));
        };
        let first = self
            .first
            .first(&row, "create")
            .ok_or_else(|| ApiError::Internal("the instance kind declares no create".into()))?
            .in_lane(lane_of(c.bulk));
        let unit = queue::enqueue_quiet(&mut tx, first).await?;
        row.active_work_id = Some(unit.id);
        // A new instance has no failure and no conditions: every audience sees the same.
        let answer = convert::instance_for(&row, Audience::Tenant);
        idempotency::finish(tx, tenant, &c.request_id, &answer).await?;
        self.waker.wake();
        tracing::debug!(tenant, instance = %id, work_id = unit.id, "instance create accepted");
        Ok(answer)
    }
}

/// FAILED_PRECONDITION when a unit of the instance is still in the queue.
fn ensure_idle(row: &InstanceRow) -> Result<(), ApiError> {
    if row.has_active_work || row.active_work_id.is_some() {
        return Err(ApiError::Busy {
            resource: instance_name(&row.tenant, &row.name),
            work_id: row.active_work_id.unwrap_or(0),
            parked: !row.has_active_work,
        });
    }
    Ok(())
}

async fn lock_live(
    tx: &mut sqlx::PgConnection,
    tenant: &str,
    name: &str,
) -> Result<InstanceRow, ApiError> {
    instance_get(tx, tenant, KVX_KIND, name, true)
        .await?
        .ok_or_else(|| ApiError::NotFound(instance_name(tenant, name)))
}

/// The scope of a ListInstances page token: the caller's tenant, the status filter, and the
/// parent when it is not the caller's own tenant (an admin's listing of another tenant, or of
/// every tenant).
fn list_scope(caller_tenant: &str, tenants: &Tenants, status_filter: i32) -> Scope {
    listing::scope(
        "ListInstances",
        caller_tenant,
        tenants,
        &[&status_filter.to_string()],
    )
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<Instance, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl InstanceService for Instances {
    async fn create_instance(
        &self,
        request: Request<CreateInstanceRequest>,
    ) -> Result<Response<Instance>, Status> {
        let caller = Caller::of(&request)?;
        caller.require_kind(KVX_KIND)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        validate::parent(&r.parent, &caller, Access::Change, &mut v)?;
        validate::dns_label("instance_id", &r.instance_id, &mut v);
        validate::request_id(&r.request_id, &mut v);
        let spec = r.instance.as_ref().and_then(|i| i.spec.clone());
        match &spec {
            Some(s) => validate::spec("instance.spec", s, SpecFields::ALL, &mut v),
            None => v.push(Violation::new("instance.spec", "required")),
        }
        validate::finish(v)?;
        let spec = spec.unwrap_or_default();
        self.ensure_region_served(&spec.region).await?;
        // The hash covers what the request asks for, in one spelling: the parent resolved and
        // only the instance's spec (the rest of `instance` is output only and ignored).
        let body_hash = idempotency::body_hash(
            CREATE_METHOD,
            &CreateInstanceRequest {
                parent: String::new(),
                instance_id: r.instance_id.clone(),
                instance: Some(Instance {
                    spec: Some(spec.clone()),
                    ..Instance::default()
                }),
                request_id: String::new(),
                bulk: false,
            },
        );
        let create = NewCreate {
            tenant: caller.tenant,
            request_id: r.request_id,
            name: r.instance_id,
            spec: convert::spec_to_json(&spec),
            body_hash,
            bulk: r.bulk,
        };
        // A batch cannot refuse one of its creates, so only a tenant known to have room goes
        // into one; any other create counts its tenant's changes on its own.
        let create = match &self.creates {
            Some(batcher) if !create.bulk && self.quota.admit_known(&create.tenant) => {
                match batcher.submit(create).await? {
                    (Settled::Created(answer), _) => return Ok(Response::new(*answer)),
                    (Settled::Alone, c) => c,
                }
            }
            _ => create,
        };
        // Boxed: the one-request path's future is large, and this function's own future would
        // otherwise be as large (and copied) for every Create.
        Ok(Response::new(Box::pin(self.create_alone(&create)).await?))
    }

    async fn get_instance(
        &self,
        request: Request<GetInstanceRequest>,
    ) -> Result<Response<Instance>, Status> {
        let caller = Caller::of(&request)?;
        caller.require_kind(KVX_KIND)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let name = validate::instance_name("name", &r.name, &caller, Access::Read, &mut v)?;
        validate::finish(v)?;
        let (tenant, name) = name.unwrap_or_default();
        let mut conn = self.pool.acquire().await.map_err(ApiError::from)?;
        let row = instance_get(&mut conn, &tenant, KVX_KIND, &name, false)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(r.name.clone()))?;
        Ok(Response::new(convert::instance_for(
            &row,
            Audience::of(&caller),
        )))
    }

    async fn list_instances(
        &self,
        request: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        let caller = Caller::of(&request)?;
        caller.require_kind(KVX_KIND)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let tenants = validate::parent(&r.parent, &caller, Access::Read, &mut v)?;
        let limit = validate::page_size(r.page_size, 50, &mut v);
        let status = match InstanceStatus::try_from(r.status_filter) {
            Ok(s) => InstanceState::from_proto(s).and_then(InstanceState::db),
            Err(_) => {
                v.push(Violation::new("status_filter", "unknown status"));
                None
            }
        };
        let scope = list_scope(&caller.tenant, &tenants, r.status_filter);
        let after = if r.page_token.is_empty() {
            None
        } else {
            let t = listing::cursor(&scope, &tenants, &r.page_token);
            if t.is_none() {
                v.push(Violation::new(
                    "page_token",
                    "not a page token of this listing: it must be the next_page_token of the \
                     page before, asked for by the same tenant with the same parent and \
                     status_filter",
                ));
            }
            t
        };
        validate::finish(v)?;
        let mut conn = self.pool.acquire().await.map_err(ApiError::from)?;
        let (rows, next_page_token) = listing::page(
            &mut conn,
            &scope,
            &tenants,
            KVX_KIND,
            status,
            after.as_ref(),
            limit,
        )
        .await
        .map_err(ApiError::from)?;
        let audience = Audience::of(&caller);
        Ok(Response::new(ListInstancesResponse {
            instances: rows
                .iter()
                .map(|row| convert::instance_for(row, audience))
                .collect(),
            next_page_token,
        }))
    }

    async fn update_instance(
        &self,
        request: Request<UpdateInstanceRequest>,
    ) -> Result<Response<Instance>, Status> {
        let caller = Caller::of(&request)?;
        caller.require_kind(KVX_KIND)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let instance = r.instance.clone().unwrap_or_default();
        let name = validate::instance_name(
            "instance.name",
            &instance.name,
            &caller,
            Access::Change,
            &mut v,
        )?
        .map(|(_, name)| name);
        validate::request_id(&r.request_id, &mut v);
        let paths = r
            .update_mask
            .as_ref()
            .map(|m| m.paths.clone())
            .unwrap_or_default();
        let mut which = SpecFields {
            plan: false,
            region: false,
            size_gb: false,
            owner_email: false,
        };
        if paths.is_empty() {
            which = SpecFields {
                region: false,
                ..SpecFields::ALL
            };
        }
        // Too many paths is one violation, not one per path: an error stays small whatever
        // the request holds.
        let checked = if paths.len() > MAX_MASK_PATHS {
            v.push(Violation::new(
                "update_mask",
                format!(
                    "at most {MAX_MASK_PATHS} paths; allowed: spec, spec.plan, spec.size_gb, \
                     spec.owner_email"
                ),
            ));
            &paths[..0]
        } else {
            &paths[..]
        };
        for p in checked {
            if !validate::text("update_mask", p, MAX_MASK_PATH_CHARS, &mut v) {
                continue;
            }
            match p.as_str() {
                "spec" => {
                    which.plan = true;
                    which.size_gb = true;
                    which.owner_email = true;
                }
                "spec.plan" => which.plan = true,
                "spec.size_gb" => which.size_gb = true,
                "spec.owner_email" => which.owner_email = true,
                "spec.region" => v.push(Violation::new(
                    "update_mask",
                    "spec.region cannot be changed; create a new instance in the other region",
                )),
                other => v.push(Violation::new(
                    "update_mask",
                    format!(
                        "unknown or read-only field {other:?}; allowed: spec, spec.plan, \
                         spec.size_gb, spec.owner_email"
                    ),
                )),
            }
        }
        let spec = instance.spec.clone();
        match &spec {
            Some(s) => validate::spec("instance.spec", s, which, &mut v),
            None => v.push(Violation::new("instance.spec", "required")),
        }
        validate::finish(v)?;
        let spec = spec.unwrap_or_default();
        let name = name.unwrap_or_default();
        // As for Create: the name resolved (`tenants/-/…`), and only the spec of `instance`.
        let hash = idempotency::body_hash(
            "UpdateInstance",
            &UpdateInstanceRequest {
                instance: Some(Instance {
                    name: convert::instance_name(&caller.tenant, &name),
                    spec: Some(spec.clone()),
                    ..Instance::default()
                }),
                update_mask: r.update_mask.clone(),
                request_id: String::new(),
                bulk: false,
            },
        );
        let tenant = caller.tenant.as_str();
        let mut tx = match idempotency::begin::<Instance>(
            &self.pool,
            tenant,
            &r.request_id,
            "UpdateInstance",
            &hash,
        )
        .await?
        {
            Begun::Replay(answer) => return Ok(Response::new(answer)),
            Begun::New(tx) => tx,
        };
        let row = lock_live(&mut tx, tenant, &name).await?;
        let current = convert::spec_from_json(&row.spec);
        // A mask that means the whole spec (empty, or `spec`) carries a region too: it must be
        // the instance's own (or empty), never silently dropped.
        let whole_spec = paths.is_empty() || paths.iter().any(|p| p == "spec");
        if whole_spec && !spec.region.is_empty() && spec.region != current.region {
            return Err(ApiError::Invalid(vec![Violation::new(
                "instance.spec.region",
                "cannot be changed; create a new instance in the other region",
            )])
            .into());
        }
        let new = InstanceSpec {
            plan: if which.plan {
                spec.plan
            } else {
                current.plan.clone()
            },
            region: current.region.clone(),
            size_gb: if which.size_gb {
                spec.size_gb
            } else {
                current.size_gb
            },
            owner_email: if which.owner_email {
                spec.owner_email
            } else {
                current.owner_email.clone()
            },
        };
        if new.size_gb < current.size_gb {
            return Err(ApiError::Invalid(vec![Violation::new(
                "instance.spec.size_gb",
                format!(
                    "can only grow: the data volume has {} GiB, and a volume cannot shrink \
                     (create a new instance and move the data to make it smaller)",
                    current.size_gb
                ),
            )])
            .into());
        }
        let audience = Audience::of(&caller);
        let (answer, stored) = if new == current {
            // Nothing to change: no new generation, no work, and nothing to wait for.
            (
                convert::instance_for(&row, audience),
                convert::instance_for(&row, Audience::Tenant),
            )
        } else {
            ensure_idle(&row)?;
            self.quota.admit(&mut tx, tenant).await?;
            let mut row = instance_start_operation(
                &mut tx,
                row.id,
                "update",
                Some(&convert::spec_to_json(&new)),
            )
            .await
            .map_err(ApiError::from)?;
            let first = self
                .first
                .first(&row, "update")
                .ok_or_else(|| ApiError::Internal("the instance kind declares no update".into()))?
                .in_lane(lane_of(r.bulk));
            let unit = queue::enqueue_quiet(&mut tx, first)
                .await
                .map_err(ApiError::from)?;
            row.active_work_id = Some(unit.id);
            tracing::info!(tenant, instance = %row.id, work_id = unit.id, "instance update accepted");
            (
                convert::instance_for(&row, audience),
                convert::instance_for(&row, Audience::Tenant),
            )
        };
        // The stored answer is the tenant's view: a repeat may come with another token of the
        // tenant, and an admin's answer must not hand raw error text to it.
        idempotency::finish(tx, tenant, &r.request_id, &stored).await?;
        self.waker.wake();
        Ok(Response::new(answer))
    }

    async fn delete_instance(
        &self,
        request: Request<DeleteInstanceRequest>,
    ) -> Result<Response<Instance>, Status> {
        let caller = Caller::of(&request)?;
        caller.require_kind(KVX_KIND)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let name = validate::instance_name("name", &r.name, &caller, Access::Change, &mut v)?
            .map(|(_, name)| name);
        validate::request_id(&r.request_id, &mut v);
        validate::finish(v)?;
        let name = name.unwrap_or_default();
        let hash = idempotency::body_hash(
            "DeleteInstance",
            &DeleteInstanceRequest {
                name: convert::instance_name(&caller.tenant, &name),
                request_id: String::new(),
                bulk: false,
            },
        );
        let tenant = caller.tenant.as_str();
        let mut tx = match idempotency::begin::<Instance>(
            &self.pool,
            tenant,
            &r.request_id,
            "DeleteInstance",
            &hash,
        )
        .await?
        {
            Begun::Replay(answer) => return Ok(Response::new(answer)),
            Begun::New(tx) => tx,
        };
        let row = lock_live(&mut tx, tenant, &name).await?;
        // A resource whose change is in flight already counts: deleting it adds nothing.
        if !row.has_active_work {
            self.quota.admit(&mut tx, tenant).await?;
        }
        // A delete supersedes the chain in flight: its units are removed (a running one
        // stops at its next lease renewal) and the delete chain starts once that attempt
        // can no longer act.
        let superseded = work_supersede_for_resource(
            &mut tx,
            row.id,
            "superseded: the instance is being deleted",
        )
        .await
        .map_err(ApiError::from)?;
        let mut row = instance_start_operation(&mut tx, row.id, "delete", None)
            .await
            .map_err(ApiError::from)?;
        let mut first = self
            .first
            .first(&row, "delete")
            .ok_or_else(|| ApiError::Internal("the instance kind declares no delete".into()))?
            .in_lane(lane_of(r.bulk));
        if let Some(until) = superseded.running_until {
            first = first.run_at(until);
        }
        let unit = queue::enqueue_quiet(&mut tx, first)
            .await
            .map_err(ApiError::from)?;
        row.active_work_id = Some(unit.id);
        // As for Update: the tenant's view is stored, the caller's is answered.
        let answer = convert::instance_for(&row, Audience::of(&caller));
        let stored = convert::instance_for(&row, Audience::Tenant);
        idempotency::finish(tx, tenant, &r.request_id, &stored).await?;
        self.waker.wake();
        tracing::info!(tenant, instance = %row.id, work_id = unit.id, "instance delete accepted");
        Ok(Response::new(answer))
    }

    async fn rotate_instance_credentials(
        &self,
        request: Request<RotateInstanceCredentialsRequest>,
    ) -> Result<Response<Instance>, Status> {
        let caller = Caller::of(&request)?;
        caller.require_kind(KVX_KIND)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let name = validate::instance_name("name", &r.name, &caller, Access::Change, &mut v)?
            .map(|(_, name)| name);
        validate::request_id(&r.request_id, &mut v);
        validate::finish(v)?;
        let name = name.unwrap_or_default();
        if !matches!(self.first, FirstUnits::Declared(_)) {
            return Err(ApiError::NotServed {
                what: "credentials of KVX instances".into(),
                served: Vec::new(),
            }
            .into());
        }
        let hash = idempotency::body_hash(
            "RotateInstanceCredentials",
            &RotateInstanceCredentialsRequest {
                name: convert::instance_name(&caller.tenant, &name),
                request_id: String::new(),
            },
        );
        let tenant = caller.tenant.as_str();
        let mut tx = match idempotency::begin::<Instance>(
            &self.pool,
            tenant,
            &r.request_id,
            "RotateInstanceCredentials",
            &hash,
        )
        .await?
        {
            Begun::Replay(answer) => return Ok(Response::new(answer)),
            Begun::New(tx) => tx,
        };
        let row = lock_live(&mut tx, tenant, &name).await?;
        ensure_idle(&row)?;
        self.quota.admit(&mut tx, tenant).await?;
        let mut row = instance_start_operation(&mut tx, row.id, "update", None)
            .await
            .map_err(ApiError::from)?;
        let first = self
            .first
            .first(&row, "rotate-credentials")
            .ok_or_else(|| {
                ApiError::Internal("the instance kind declares no rotate-credentials chain".into())
            })?;
        let unit = queue::enqueue_quiet(&mut tx, first)
            .await
            .map_err(ApiError::from)?;
        row.active_work_id = Some(unit.id);
        let answer = convert::instance_for(&row, Audience::of(&caller));
        let stored = convert::instance_for(&row, Audience::Tenant);
        idempotency::finish(tx, tenant, &r.request_id, &stored).await?;
        self.waker.wake();
        tracing::info!(tenant, instance = %row.id, work_id = unit.id,
            "instance credential rotation accepted");
        Ok(Response::new(answer))
    }

    type WatchInstanceStream = WatchStream;

    async fn watch_instance(
        &self,
        request: Request<WatchInstanceRequest>,
    ) -> Result<Response<Self::WatchInstanceStream>, Status> {
        let caller = Caller::of(&request)?;
        caller.require_kind(KVX_KIND)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let name = validate::instance_name("name", &r.name, &caller, Access::Read, &mut v)?;
        validate::finish(v)?;
        let (tenant, name) = name.unwrap_or_default();
        // The slot first: a tenant at its limit costs no database work. Streams count against
        // the caller's own tenant, whichever tenant's instance it watches.
        let slot = self.watches.open(&caller.tenant)?;
        let audience = Audience::of(&caller);
        // Subscribe before reading, so that no change after the first read is missed.
        let changes = self.events.subscribe();
        let mut conn = self.pool.acquire().await.map_err(ApiError::from)?;
        let first = instance_get(&mut conn, &tenant, KVX_KIND, &name, false)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(r.name.clone()))?;
        drop(conn);
        let stream = super::watch::follow(super::watch::Follow {
            pool: self.pool.clone(),
            changes,
            shutdown: self.shutdown.clone(),
            token_id: caller.token_id,
            slot,
            first,
            view: move |row: &InstanceRow| convert::instance_for(row, audience),
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_bind_the_tenant_and_the_filter() {
        let acme = Tenants::One("acme".into());
        let globex = Tenants::One("globex".into());
        let t = crate::api::page_token::encode(&list_scope("acme", &acme, 2), "web-1");
        assert!(listing::cursor(&list_scope("acme", &acme, 2), &acme, &t).is_some());
        assert!(listing::cursor(&list_scope("acme", &acme, 0), &acme, &t).is_none());
        assert!(listing::cursor(&list_scope("globex", &globex, 2), &globex, &t).is_none());
        assert!(listing::cursor(&list_scope("ops", &acme, 2), &acme, &t).is_none());
        assert!(listing::cursor(&list_scope("acme", &acme, 0), &acme, "zz").is_none());
        let not_a_name = crate::api::page_token::encode(&list_scope("acme", &acme, 0), "x\0y");
        assert!(listing::cursor(&list_scope("acme", &acme, 0), &acme, &not_a_name).is_none());
    }
}
