//! `setpoint.v1.ResourceService`: resources of every declared kind, with the rules of
//! [`super::instances`] — one transaction for the desired state, the first unit of its chain
//! and the request id's answer; tenant isolation; curated errors for tenants — and specs
//! checked against their kind's schema ([`crate::kinds::Kind::check_spec`]).
//!
//! A KVX instance is a resource of kind `kvx.instance` here too: InstanceService is a typed
//! front for the same rows.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use sqlx::PgPool;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::auth::Caller;
use super::convert::{json_to_struct, struct_to_json, timestamp};
use super::errors::{ApiError, Violation};
use super::idempotency::{self, Begun};
use super::listing;
use super::operations::ServedRegions;
use super::page_token::Scope;
use super::proto::resource_service_server::ResourceService;
use super::proto::{
    ConnectionDetails, CreateResourceRequest, DeleteResourceRequest, GetConnectionDetailsRequest,
    GetResourceRequest, Kind as KindMessage, ListKindsRequest, ListKindsResponse,
    ListResourceHistoryRequest, ListResourceHistoryResponse, ListResourcesRequest,
    ListResourcesResponse, Resource, ResourceStatus, UpdateResourceRequest, WatchResourceRequest,
};
use super::quota::{ChangeQuota, lane_of};
use super::status::InstanceState;
use super::tenant_view::{self, Audience};
use super::validate::{self, Access, MAX_MASK_PATH_CHARS, MAX_MASK_PATHS, Tenants};
use super::wake::WorkerWaker;
use super::watch::InstanceEvents;
use super::watch_limit::WatchSlots;
use crate::kinds::{Chains, Kind, KindCatalog, SecretBox, SpecViolation};
use crate::queue;
use crate::store::instances::{
    InstanceRow, NewResource, instance_get, instance_insert, instance_start_operation,
    new_instance_id, resource_secrets, resource_start_operation,
};
use crate::store::work::work_supersede_for_resource;

/// The longest kind name a request may carry.
const MAX_KIND_CHARS: usize = 128;
/// How deep a spec may nest: deeper is refused before its schema is asked.
const MAX_SPEC_DEPTH: usize = 32;

/// The service.
#[derive(Debug, Clone)]
pub struct Resources {
    pool: PgPool,
    catalog: Arc<KindCatalog>,
    chains: Arc<Chains>,
    secrets: Arc<SecretBox>,
    events: Arc<InstanceEvents>,
    shutdown: CancellationToken,
    waker: WorkerWaker,
    watches: WatchSlots,
    regions: Arc<Mutex<HashMap<String, Arc<ServedRegions>>>>,
    quota: ChangeQuota,
}

/// What the service shares with the rest of the API.
#[derive(Debug, Clone)]
pub struct ResourcesParts {
    /// The declared kinds.
    pub catalog: Arc<KindCatalog>,
    /// Their chains.
    pub chains: Arc<Chains>,
    /// The keys of secret outputs.
    pub secrets: Arc<SecretBox>,
    /// Changes of resources, for Watch.
    pub events: Arc<InstanceEvents>,
    /// Open streams per tenant (shared with InstanceService).
    pub watches: WatchSlots,
    /// The per-tenant quota on changes in flight (shared with InstanceService).
    pub quota: ChangeQuota,
}

impl Resources {
    /// The service on `pool`; Watch streams end at `shutdown`.
    pub fn new(pool: PgPool, parts: ResourcesParts, shutdown: CancellationToken) -> Self {
        let waker = WorkerWaker::start(pool.clone());
        Self {
            pool,
            catalog: parts.catalog,
            chains: parts.chains,
            secrets: parts.secrets,
            events: parts.events,
            shutdown,
            waker,
            watches: parts.watches,
            quota: parts.quota,
            regions: Arc::default(),
        }
    }

    /// The kind named `name`, if the caller may use it (else `PERMISSION_DENIED`); a name no
    /// kind has is a violation of `field`.
    fn kind(
        &self,
        caller: &Caller,
        field: &str,
        name: &str,
        v: &mut Vec<Violation>,
    ) -> Result<Option<Arc<Kind>>, ApiError> {
        if name.is_empty() {
            v.push(Violation::new(field, "required: one of ListKinds' names"));
            return Ok(None);
        }
        if !validate::text(field, name, MAX_KIND_CHARS, v) {
            return Ok(None);
        }
        match self.catalog.get(name) {
            Some(kind) => {
                caller.require_kind(name)?;
                Ok(Some(kind.clone()))
            }
            None => {
                v.push(Violation::new(
                    field,
                    format!("no kind {name:?} is served here; ListKinds shows the kinds"),
                ));
                Ok(None)
            }
        }
    }

    /// Parses `tenants/{tenant}/{collection}/{resource}` (`tenants/-` for the caller's own):
    /// the kind, the tenant and the short name. Another tenant is `NOT_FOUND` for a tenant's
    /// token; an admin may name any tenant's resource to read it ([`Access::Read`]), and only
    /// its own tenant's to change it. A kind the token may not use is `PERMISSION_DENIED`.
    fn name(
        &self,
        caller: &Caller,
        access: Access,
        field: &str,
        name: &str,
        v: &mut Vec<Violation>,
    ) -> Result<Option<Named>, ApiError> {
        let parts: Vec<&str> = name.split('/').collect();
        let ["tenants", t, collection, n] = parts.as_slice() else {
            v.push(Violation::new(
                field,
                "must be tenants/{tenant}/{collection}/{resource} (ListKinds shows each kind's \
                 collection)",
            ));
            return Ok(None);
        };
        if !(*t == "-" || validate::is_dns_label(t)) || !validate::is_dns_label(n) {
            v.push(Violation::new(
                field,
                "must be tenants/{tenant}/{collection}/{resource}, tenant and resource DNS labels",
            ));
            return Ok(None);
        }
        let tenant = validate::name_tenant(t, name, caller, access)?;
        let Some(kind) = self.catalog.by_collection(collection) else {
            v.push(Violation::new(
                field,
                format!(
                    "no kind has the collection {:?}; ListKinds shows the collections",
                    super::errors::clip(collection, 64)
                ),
            ));
            return Ok(None);
        };
        caller.require_kind(kind.name())?;
        Ok(Some(Named {
            kind: kind.clone(),
            tenant,
            name: (*n).to_owned(),
        }))
    }

    /// FAILED_PRECONDITION unless a live engine serves `kind` in the spec's `region`, for a
    /// kind whose schema has a top-level `region` property.
    async fn ensure_region_served(&self, kind: &Kind, spec: &Value) -> Result<(), ApiError> {
        let has_region = kind
            .decl
            .schema
            .get("properties")
            .and_then(|p| p.get("region"))
            .is_some();
        let Some(region) = spec.get("region").and_then(Value::as_str) else {
            return Ok(());
        };
        if !has_region {
            return Ok(());
        }
        let served = {
            let mut map = self
                .regions
                .lock()
                .map_err(|_| ApiError::Internal("the served regions' cache is poisoned".into()))?;
            map.entry(kind.name().to_owned())
                .or_insert_with(|| Arc::new(ServedRegions::new(self.pool.clone(), kind.name())))
                .clone()
        };
        let regions = served.get().await?;
        if regions.iter().any(|r| r == region) {
            return Ok(());
        }
        Err(ApiError::NotServed {
            what: format!("region {region} for {}", kind.name()),
            served: regions.to_vec(),
        })
    }
}

/// A resource a request names.
struct Named {
    /// Its kind.
    kind: Arc<Kind>,
    /// Its tenant (the caller's, or for an admin's read any tenant's).
    tenant: String,
    /// Its short name.
    name: String,
}

/// `tenants/{tenant}/{collection}/{name}`.
fn resource_name(kind: &Kind, tenant: &str, name: &str) -> String {
    format!("tenants/{tenant}/{}/{name}", kind.decl.collection)
}

/// The status of a resource in the API's terms.
fn status(state: InstanceState) -> ResourceStatus {
    match state {
        InstanceState::Creating => ResourceStatus::Creating,
        InstanceState::Ready => ResourceStatus::Ready,
        InstanceState::Updating => ResourceStatus::Updating,
        InstanceState::Deleting => ResourceStatus::Deleting,
        InstanceState::Deleted => ResourceStatus::Deleted,
        InstanceState::Failed => ResourceStatus::Failed,
        InstanceState::Unknown => ResourceStatus::Unspecified,
    }
}

/// The database status of a filter; `None` for every status.
fn status_filter(s: ResourceStatus) -> Option<&'static str> {
    let state = match s {
        ResourceStatus::Unspecified => return None,
        ResourceStatus::Creating => InstanceState::Creating,
        ResourceStatus::Ready => InstanceState::Ready,
        ResourceStatus::Updating => InstanceState::Updating,
        ResourceStatus::Deleting => InstanceState::Deleting,
        ResourceStatus::Deleted => InstanceState::Deleted,
        ResourceStatus::Failed => InstanceState::Failed,
    };
    state.db()
}

/// `row` as `audience` sees it. The spec is shown as stored; secret outputs never are.
fn resource_for(kind: &Kind, row: &InstanceRow, audience: Audience) -> Resource {
    let (last_error, observed) = match audience {
        Audience::Tenant => (
            tenant_view::last_error(row),
            tenant_view::observed(&row.observed),
        ),
        Audience::Operator => (
            row.last_error.clone().unwrap_or_default(),
            row.observed.clone(),
        ),
    };
    Resource {
        name: resource_name(kind, &row.tenant, &row.name),
        uid: row.id.to_string(),
        kind: row.kind.clone(),
        spec: Some(json_to_struct(&row.spec)),
        status: status(InstanceState::from_db(&row.status)) as i32,
        generation: row.generation,
        observed_generation: row.observed_generation,
        observed: Some(json_to_struct(&observed)),
        has_active_work: row.has_active_work,
        active_work_id: row.active_work_id.unwrap_or(0),
        last_error,
        create_time: Some(timestamp(row.created_at)),
        update_time: Some(timestamp(row.updated_at)),
    }
}

/// Violations of the kind's rules, named from the request (`resource.spec.records[0].ttl`).
fn spec_violations(found: Vec<SpecViolation>, v: &mut Vec<Violation>) {
    for s in found {
        let field = if s.path.is_empty() {
            "resource.spec".to_owned()
        } else {
            format!("resource.spec.{}", s.path)
        };
        v.push(Violation::new(field, s.message));
    }
}

/// Strings of `spec` holding control characters, and nesting deeper than
/// [`MAX_SPEC_DEPTH`]: refused before the schema is asked (PostgreSQL cannot store a NUL in
/// JSON, and no kind's field means one).
fn check_spec_text(path: &str, value: &Value, depth: usize, v: &mut Vec<Violation>) {
    if depth > MAX_SPEC_DEPTH {
        v.push(Violation::new(
            path,
            format!("nests deeper than {MAX_SPEC_DEPTH} levels"),
        ));
        return;
    }
    match value {
        Value::String(s) if s.chars().any(char::is_control) => {
            v.push(Violation::new(
                path,
                "holds control characters (NUL, line breaks, tabs, escapes)",
            ));
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_spec_text(&format!("{path}[{i}]"), item, depth + 1, v);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                if k.chars().any(char::is_control) {
                    v.push(Violation::new(path, "has a key with control characters"));
                    continue;
                }
                check_spec_text(&format!("{path}.{k}"), item, depth + 1, v);
            }
        }
        _ => {}
    }
}

/// The spec of a request: `resource.spec`, checked for text; `None` after a violation.
fn request_spec(resource: Option<&Resource>, v: &mut Vec<Violation>) -> Option<Value> {
    let Some(spec) = resource.and_then(|r| r.spec.as_ref()) else {
        v.push(Violation::new(
            "resource.spec",
            "required (ListKinds shows the kind's schema)",
        ));
        return None;
    };
    let spec = struct_to_json(spec);
    let before = v.len();
    check_spec_text("resource.spec", &spec, 0, v);
    (v.len() == before).then_some(spec)
}

/// `spec` with the value at dotted `path` (below `spec.`) taken from `from`, or removed when
/// `from` has none there.
fn apply_path(spec: &mut Value, from: &Value, path: &[&str]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let source = parents
        .iter()
        .try_fold(from, |v, k| v.get(*k))
        .and_then(|v| v.get(*last))
        .cloned();
    let mut target = spec;
    for key in parents {
        if !target.is_object() {
            *target = Value::Object(Map::new());
        }
        let Some(map) = target.as_object_mut() else {
            return;
        };
        target = map
            .entry((*key).to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(map) = target.as_object_mut() {
        match source {
            Some(value) => {
                map.insert((*last).to_owned(), value);
            }
            None => {
                map.remove(*last);
            }
        }
    }
}

/// The scope of a ListResources page token: the caller's tenant, the kind and the status
/// filter, and the parent when it is not the caller's own tenant.
fn list_scope(caller_tenant: &str, tenants: &Tenants, kind: &str, status_filter: i32) -> Scope {
    listing::scope(
        "ListResources",
        caller_tenant,
        tenants,
        &[kind, &status_filter.to_string()],
    )
}

/// FAILED_PRECONDITION when a unit of the resource is still in the queue.
fn ensure_idle(kind: &Kind, row: &InstanceRow) -> Result<(), ApiError> {
    if row.has_active_work || row.active_work_id.is_some() {
        return Err(ApiError::Busy {
            resource: resource_name(kind, &row.tenant, &row.name),
            work_id: row.active_work_id.unwrap_or(0),
            parked: !row.has_active_work,
        });
    }
    Ok(())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<Resource, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ResourceService for Resources {
    async fn list_kinds(
        &self,
        request: Request<ListKindsRequest>,
    ) -> Result<Response<ListKindsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let mut kinds: Vec<KindMessage> = self
            .catalog
            .kinds()
            .filter(|k| caller.may_use_kind(k.name()))
            .map(|k| KindMessage {
                name: k.decl.name.clone(),
                collection: k.decl.collection.clone(),
                description: k.decl.description.clone(),
                schema: Some(json_to_struct(&k.decl.schema)),
                schema_version: k.decl.schema_version,
                immutable_fields: k.decl.immutable.clone(),
                has_connection_details: k.decl.secret_outputs,
                observed: k.decl.observe.is_some(),
            })
            .collect();
        kinds.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(ListKindsResponse { kinds }))
    }

    async fn create_resource(
        &self,
        request: Request<CreateResourceRequest>,
    ) -> Result<Response<Resource>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        validate::parent(&r.parent, &caller, Access::Change, &mut v)?;
        let kind = self.kind(&caller, "kind", &r.kind, &mut v)?;
        validate::dns_label("resource_id", &r.resource_id, &mut v);
        validate::request_id(&r.request_id, &mut v);
        let spec = request_spec(r.resource.as_ref(), &mut v);
        if let (Some(kind), Some(spec)) = (&kind, &spec) {
            spec_violations(kind.check_spec(None, spec), &mut v);
        }
        validate::finish(v)?;
        let (Some(kind), Some(spec)) = (kind, spec) else {
            return Err(ApiError::Internal("a checked create lost its kind or spec".into()).into());
        };
        self.ensure_region_served(&kind, &spec).await?;
        let hash = idempotency::body_hash(
            "CreateResource",
            &CreateResourceRequest {
                parent: String::new(),
                kind: r.kind.clone(),
                resource_id: r.resource_id.clone(),
                resource: Some(Resource {
                    spec: Some(json_to_struct(&spec)),
                    ..Resource::default()
                }),
                request_id: String::new(),
                bulk: false,
            },
        );
        let tenant = caller.tenant.as_str();
        let mut tx = match idempotency::begin::<Resource>(
            &self.pool,
            tenant,
            &r.request_id,
            "CreateResource",
            &hash,
        )
        .await?
        {
            Begun::Replay(answer) => return Ok(Response::new(answer)),
            Begun::New(tx) => tx,
        };
        self.quota.admit(&mut tx, tenant).await?;
        let id = new_instance_id();
        let version = i32::try_from(kind.decl.schema_version).unwrap_or(i32::MAX);
        let new = NewResource {
            id,
            tenant,
            kind: kind.name(),
            name: &r.resource_id,
            spec: &spec,
            spec_version: version,
        };
        let Some(mut row) = instance_insert(&mut tx, new)
            .await
            .map_err(ApiError::from)?
        else {
            return Err(
                ApiError::AlreadyExists(resource_name(&kind, tenant, &r.resource_id)).into(),
            );
        };
        let first = self
            .chains
            .first_unit(kind.name(), "create", row.id, tenant, row.generation)
            .ok_or_else(|| {
                ApiError::Internal(format!("kind {} declares no create chain", kind.name()))
            })?
            .in_lane(lane_of(r.bulk));
        let unit = queue::enqueue_quiet(&mut tx, first)
            .await
            .map_err(ApiError::from)?;
        row.active_work_id = Some(unit.id);
        let answer = resource_for(&kind, &row, Audience::Tenant);
        idempotency::finish(tx, tenant, &r.request_id, &answer).await?;
        self.waker.wake();
        tracing::info!(tenant, kind = kind.name(), resource = %id, work_id = unit.id,
            "resource create accepted");
        Ok(Response::new(answer))
    }

    async fn get_resource(
        &self,
        request: Request<GetResourceRequest>,
    ) -> Result<Response<Resource>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let named = self.name(&caller, Access::Read, "name", &r.name, &mut v)?;
        validate::finish(v)?;
        let Some(Named { kind, tenant, name }) = named else {
            return Err(ApiError::NotFound(r.name).into());
        };
        let mut conn = self.pool.acquire().await.map_err(ApiError::from)?;
        let row = instance_get(&mut conn, &tenant, kind.name(), &name, false)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(r.name.clone()))?;
        Ok(Response::new(resource_for(
            &kind,
            &row,
            Audience::of(&caller),
        )))
    }

    async fn list_resources(
        &self,
        request: Request<ListResourcesRequest>,
    ) -> Result<Response<ListResourcesResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let tenants = validate::parent(&r.parent, &caller, Access::Read, &mut v)?;
        let kind = self.kind(&caller, "kind", &r.kind, &mut v)?;
        let limit = validate::page_size(r.page_size, 50, &mut v);
        let filter = match ResourceStatus::try_from(r.status_filter) {
            Ok(s) => status_filter(s),
            Err(_) => {
                v.push(Violation::new("status_filter", "unknown status"));
                None
            }
        };
        let scope = list_scope(&caller.tenant, &tenants, &r.kind, r.status_filter);
        let after = if r.page_token.is_empty() {
            None
        } else {
            let t = listing::cursor(&scope, &tenants, &r.page_token);
            if t.is_none() {
                v.push(Violation::new(
                    "page_token",
                    "not a page token of this listing: it must be the next_page_token of the \
                     page before, asked for by the same tenant with the same parent, kind and \
                     status_filter",
                ));
            }
            t
        };
        validate::finish(v)?;
        let Some(kind) = kind else {
            return Err(ApiError::Internal("a checked list lost its kind".into()).into());
        };
        let mut conn = self.pool.acquire().await.map_err(ApiError::from)?;
        let (rows, next_page_token) = listing::page(
            &mut conn,
            &scope,
            &tenants,
            kind.name(),
            filter,
            after.as_ref(),
            limit,
        )
        .await
        .map_err(ApiError::from)?;
        let audience = Audience::of(&caller);
        Ok(Response::new(ListResourcesResponse {
            resources: rows
                .iter()
                .map(|row| resource_for(&kind, row, audience))
                .collect(),
            next_page_token,
        }))
    }

    async fn update_resource(
        &self,
        request: Request<UpdateResourceRequest>,
    ) -> Result<Response<Resource>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let given = r.resource.clone().unwrap_or_default();
        let named = self.name(
            &caller,
            Access::Change,
            "resource.name",
            &given.name,
            &mut v,
        )?;
        validate::request_id(&r.request_id, &mut v);
        let paths = r
            .update_mask
            .as_ref()
            .map(|m| m.paths.clone())
            .unwrap_or_default();
        let mut mask: Vec<Vec<String>> = Vec::new();
        let mut whole = paths.is_empty();
        if paths.len() > MAX_MASK_PATHS {
            v.push(Violation::new(
                "update_mask",
                format!("at most {MAX_MASK_PATHS} paths: spec, or paths inside it (spec.ttl)"),
            ));
        } else {
            for p in &paths {
                if !validate::text("update_mask", p, MAX_MASK_PATH_CHARS, &mut v) {
                    continue;
                }
                if p == "spec" {
                    whole = true;
                    continue;
                }
                match p.strip_prefix("spec.") {
                    Some(inner) if !inner.is_empty() && inner.split('.').all(|k| !k.is_empty()) => {
                        mask.push(inner.split('.').map(str::to_owned).collect());
                    }
                    _ => v.push(Violation::new(
                        "update_mask",
                        format!(
                            "{:?} is not spec or a path inside it (spec.ttl, spec.records)",
                            super::errors::clip(p, 64)
                        ),
                    )),
                }
            }
        }
        let spec = request_spec(Some(&given), &mut v);
        validate::finish(v)?;
        let (Some(Named { kind, name, .. }), Some(spec)) = (named, spec) else {
            return Err(ApiError::Internal("a checked update lost its name or spec".into()).into());
        };
        let tenant = caller.tenant.as_str();
        let hash = idempotency::body_hash(
            "UpdateResource",
            &UpdateResourceRequest {
                resource: Some(Resource {
                    name: resource_name(&kind, tenant, &name),
                    spec: Some(json_to_struct(&spec)),
                    ..Resource::default()
                }),
                update_mask: r.update_mask.clone(),
                request_id: String::new(),
                bulk: false,
            },
        );
        let mut tx = match idempotency::begin::<Resource>(
            &self.pool,
            tenant,
            &r.request_id,
            "UpdateResource",
            &hash,
        )
        .await?
        {
            Begun::Replay(answer) => return Ok(Response::new(answer)),
            Begun::New(tx) => tx,
        };
        let row = instance_get(&mut tx, tenant, kind.name(), &name, true)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(resource_name(&kind, tenant, &name)))?;
        let version = u32::try_from(row.spec_version).unwrap_or(0);
        let current = kind
            .upgrade(version, row.spec.clone())
            .map_err(ApiError::Internal)?;
        let new = if whole {
            spec
        } else {
            let mut new = current.clone();
            for path in &mask {
                let keys: Vec<&str> = path.iter().map(String::as_str).collect();
                apply_path(&mut new, &spec, &keys);
            }
            new
        };
        let mut v = Vec::new();
        spec_violations(kind.check_spec(Some(&current), &new), &mut v);
        validate::finish(v)?;
        let audience = Audience::of(&caller);
        let (answer, stored) = if new == current {
            (
                resource_for(&kind, &row, audience),
                resource_for(&kind, &row, Audience::Tenant),
            )
        } else {
            ensure_idle(&kind, &row)?;
            if kind.chain("update").is_empty() {
                return Err(ApiError::Invalid(vec![Violation::new(
                    "resource",
                    format!(
                        "{} resources cannot be changed; create a new one",
                        kind.name()
                    ),
                )])
                .into());
            }
            self.quota.admit(&mut tx, tenant).await?;
            let schema_version = i32::try_from(kind.decl.schema_version).unwrap_or(i32::MAX);
            let mut row = resource_start_operation(&mut tx, row.id, "update", &new, schema_version)
                .await
                .map_err(ApiError::from)?;
            let first = self
                .chains
                .first_unit(kind.name(), "update", row.id, tenant, row.generation)
                .ok_or_else(|| {
                    ApiError::Internal(format!("kind {} declares no update chain", kind.name()))
                })?
                .in_lane(lane_of(r.bulk));
            let unit = queue::enqueue_quiet(&mut tx, first)
                .await
                .map_err(ApiError::from)?;
            row.active_work_id = Some(unit.id);
            tracing::info!(tenant, kind = kind.name(), resource = %row.id, work_id = unit.id,
                "resource update accepted");
            (
                resource_for(&kind, &row, audience),
                resource_for(&kind, &row, Audience::Tenant),
            )
        };
        idempotency::finish(tx, tenant, &r.request_id, &stored).await?;
        self.waker.wake();
        Ok(Response::new(answer))
    }

    async fn delete_resource(
        &self,
        request: Request<DeleteResourceRequest>,
    ) -> Result<Response<Resource>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let named = self.name(&caller, Access::Change, "name", &r.name, &mut v)?;
        validate::request_id(&r.request_id, &mut v);
        validate::finish(v)?;
        let Some(Named { kind, name, .. }) = named else {
            return Err(ApiError::NotFound(r.name).into());
        };
        let tenant = caller.tenant.as_str();
        let hash = idempotency::body_hash(
            "DeleteResource",
            &DeleteResourceRequest {
                name: resource_name(&kind, tenant, &name),
                request_id: String::new(),
                bulk: false,
            },
        );
        let mut tx = match idempotency::begin::<Resource>(
            &self.pool,
            tenant,
            &r.request_id,
            "DeleteResource",
            &hash,
        )
        .await?
        {
            Begun::Replay(answer) => return Ok(Response::new(answer)),
            Begun::New(tx) => tx,
        };
        let row = instance_get(&mut tx, tenant, kind.name(), &name, true)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(resource_name(&kind, tenant, &name)))?;
        // A resource whose change is in flight already counts: deleting it adds nothing.
        if !row.has_active_work {
            self.quota.admit(&mut tx, tenant).await?;
        }
        let superseded = work_supersede_for_resource(
            &mut tx,
            row.id,
            "superseded: the resource is being deleted",
        )
        .await
        .map_err(ApiError::from)?;
        let mut row = instance_start_operation(&mut tx, row.id, "delete", None)
            .await
            .map_err(ApiError::from)?;
        let mut first = self
            .chains
            .first_unit(kind.name(), "delete", row.id, tenant, row.generation)
            .ok_or_else(|| {
                ApiError::Internal(format!("kind {} declares no delete chain", kind.name()))
            })?
            .in_lane(lane_of(r.bulk));
        if let Some(until) = superseded.running_until {
            first = first.run_at(until);
        }
        let unit = queue::enqueue_quiet(&mut tx, first)
            .await
            .map_err(ApiError::from)?;
        row.active_work_id = Some(unit.id);
        let answer = resource_for(&kind, &row, Audience::of(&caller));
        let stored = resource_for(&kind, &row, Audience::Tenant);
        idempotency::finish(tx, tenant, &r.request_id, &stored).await?;
        self.waker.wake();
        tracing::info!(tenant, kind = kind.name(), resource = %row.id, work_id = unit.id,
            "resource delete accepted");
        Ok(Response::new(answer))
    }

    type WatchResourceStream = WatchStream;

    async fn watch_resource(
        &self,
        request: Request<WatchResourceRequest>,
    ) -> Result<Response<Self::WatchResourceStream>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let named = self.name(&caller, Access::Read, "name", &r.name, &mut v)?;
        validate::finish(v)?;
        let Some(Named { kind, tenant, name }) = named else {
            return Err(ApiError::NotFound(r.name).into());
        };
        // Streams count against the caller's own tenant, whichever tenant's resource it watches.
        let slot = self.watches.open(&caller.tenant)?;
        let audience = Audience::of(&caller);
        let changes = self.events.subscribe();
        let mut conn = self.pool.acquire().await.map_err(ApiError::from)?;
        let first = instance_get(&mut conn, &tenant, kind.name(), &name, false)
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
            view: move |row: &InstanceRow| resource_for(&kind, row, audience),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_resource_history(
        &self,
        request: Request<ListResourceHistoryRequest>,
    ) -> Result<Response<ListResourceHistoryResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let named = self.name(&caller, Access::Read, "name", &r.name, &mut v)?;
        let page = super::history::page(&caller, &r, &mut v);
        validate::finish(v)?;
        let Some(Named { kind, tenant, name }) = named else {
            return Err(ApiError::NotFound(r.name).into());
        };
        let shown = resource_name(&kind, &tenant, &name);
        let answer = super::history::list(
            &self.pool,
            &caller,
            &tenant,
            kind.name(),
            &name,
            &shown,
            page,
        )
        .await?;
        Ok(Response::new(answer))
    }

    async fn get_connection_details(
        &self,
        request: Request<GetConnectionDetailsRequest>,
    ) -> Result<Response<ConnectionDetails>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let named = self.name(&caller, Access::Change, "name", &r.name, &mut v)?;
        validate::finish(v)?;
        let Some(Named { kind, name, .. }) = named else {
            return Err(ApiError::NotFound(r.name).into());
        };
        let details =
            connection_details(&self.pool, &self.secrets, &kind, &caller.tenant, &name).await?;
        // Never logged: only that they were read, and by which token.
        tracing::info!(tenant = %caller.tenant, token_id = caller.token_id, kind = kind.name(),
            resource = %name, "connection details read");
        Ok(Response::new(ConnectionDetails {
            name: resource_name(&kind, &caller.tenant, &name),
            details: Some(json_to_struct(&details)),
        }))
    }
}

/// The opened secret outputs of the tenant's live resource `name` of `kind` (an empty object
/// when it has none yet).
///
/// # Errors
/// `NOT_FOUND`; `UNAVAILABLE` when this server has no key to open them; database errors.
pub async fn connection_details(
    pool: &PgPool,
    secrets: &SecretBox,
    kind: &Kind,
    tenant: &str,
    name: &str,
) -> Result<Value, ApiError> {
    let mut conn = pool.acquire().await.map_err(ApiError::from)?;
    let row = instance_get(&mut conn, tenant, kind.name(), name, false)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::NotFound(resource_name(kind, tenant, name)))?;
    if !kind.decl.secret_outputs {
        return Ok(Value::Object(Map::new()));
    }
    let Some(sealed) = resource_secrets(&mut conn, row.id)
        .await
        .map_err(ApiError::from)?
    else {
        return Ok(Value::Object(Map::new()));
    };
    let opened = secrets.open(row.id, &sealed).map_err(|e| {
        // The reason (no key, an unknown key id) is the operator's to see, not the tenant's.
        tracing::error!(error = %e, resource = %row.id, "cannot open a resource's secret outputs");
        ApiError::Unavailable(
            "the connection details cannot be read on this server now; try again, or ask an \
             operator",
        )
    })?;
    Ok(Value::Object(opened.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mask_paths_copy_or_remove_one_field() {
        let mut spec = json!({"name": "a.example", "comment": "old", "records": []});
        apply_path(&mut spec, &json!({"comment": "new"}), &["comment"]);
        assert_eq!(spec["comment"], "new");
        apply_path(&mut spec, &json!({}), &["comment"]);
        assert!(spec.get("comment").is_none());
        apply_path(&mut spec, &json!({"a": {"b": 1}}), &["a", "b"]);
        assert_eq!(spec["a"]["b"], 1);
        assert_eq!(spec["name"], "a.example");
    }

    #[test]
    fn control_characters_and_deep_nesting_are_named() {
        let mut v = Vec::new();
        check_spec_text(
            "resource.spec",
            &json!({"a": ["ok", "bad\u{0}"], "b": {"c\n": 1}}),
            0,
            &mut v,
        );
        let fields: Vec<_> = v.iter().map(|v| v.field.clone()).collect();
        assert_eq!(fields, ["resource.spec.a[1]", "resource.spec.b"]);
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!({ "x": deep });
        }
        let mut v = Vec::new();
        check_spec_text("resource.spec", &deep, 0, &mut v);
        assert_eq!(v.len(), 1);
    }
}
