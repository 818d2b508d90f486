//! `setpoint.v1.WorkService`: the operators' view of units of work. Every call needs an admin
//! token; admins see the units of every tenant.

use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::auth::Caller;
use super::convert;
use super::errors::{ApiError, Violation};
use super::page_token::{self, Scope};
use super::proto::work_service_server::WorkService;
use super::proto::{
    CancelWorkRequest, GetWorkRequest, ListWorkRequest, ListWorkResponse, RetryWorkRequest,
    WorkUnit,
};
use super::validate::{self, MAX_KIND_CHARS, MAX_REASON_CHARS};
use crate::queue::{self, UnitReport, WorkFilter};
use crate::store::StoreError;
use crate::store::events::events_for_work;

/// The service.
#[derive(Debug, Clone)]
pub struct Work {
    pool: PgPool,
    hooks: std::sync::Arc<crate::kinds::Chains>,
}

impl Work {
    /// The service on `pool`; an operator's retry or cancel reaches resources through
    /// `hooks` (the chain runner's).
    pub fn new(pool: PgPool, hooks: std::sync::Arc<crate::kinds::Chains>) -> Self {
        Self { pool, hooks }
    }

    async fn report(&self, id: i64) -> Result<WorkUnit, ApiError> {
        let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
        let report = queue::show(&mut conn, &id.to_string()).await?;
        Ok(unit_of(&report))
    }
}

/// The name operator actions are recorded under: the token's row id and tenant.
fn operator(caller: &Caller) -> String {
    format!("api:token-{}@{}", caller.token_id, caller.tenant)
}

fn unit_of(report: &UnitReport) -> WorkUnit {
    let mut unit = match &report.row {
        Some(row) => convert::work_unit(row),
        None => WorkUnit {
            id: report.id,
            state: "finished".into(),
            token: report
                .events
                .first()
                .map(|e| e.token.clone())
                .unwrap_or_default(),
            ..WorkUnit::default()
        },
    };
    unit.events = report.events.iter().map(convert::work_event).collect();
    unit
}

fn admin<T>(request: &Request<T>) -> Result<Caller, ApiError> {
    let caller = Caller::of(request)?;
    caller.require_admin()?;
    Ok(caller)
}

fn check_id(id: i64, v: &mut Vec<Violation>) {
    if id <= 0 {
        v.push(Violation::new(
            "id",
            "must be a unit id (a positive number)",
        ));
    }
}

#[tonic::async_trait]
impl WorkService for Work {
    async fn list_work(
        &self,
        request: Request<ListWorkRequest>,
    ) -> Result<Response<ListWorkResponse>, Status> {
        admin(&request)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        if !["", "pending", "running", "parked"].contains(&r.state.as_str()) {
            v.push(Violation::new(
                "state",
                "must be pending, running, parked or empty",
            ));
        }
        validate::text("kind", &r.kind, MAX_KIND_CHARS, &mut v);
        let resource_id = if r.resource_id.is_empty() {
            None
        } else {
            // A UUID is at most 45 characters in any spelling the parser takes.
            let id = (r.resource_id.len() <= 64)
                .then(|| r.resource_id.parse::<Uuid>().ok())
                .flatten();
            if id.is_none() {
                v.push(Violation::new(
                    "resource_id",
                    "must be an instance uid (UUID)",
                ));
            }
            id
        };
        let limit = validate::page_size(r.page_size, 100, &mut v);
        // Bound to the filter (admins all see the same units, so not to the caller).
        let scope = Scope::new(
            "ListWork",
            &[
                &r.state,
                &r.kind,
                &resource_id.map(|u| u.to_string()).unwrap_or_default(),
            ],
        );
        let after_id = if r.page_token.is_empty() {
            None
        } else {
            let id = page_token::decode(&scope, &r.page_token)
                .and_then(|cursor| cursor.parse::<i64>().ok())
                .filter(|id| *id > 0);
            if id.is_none() {
                v.push(Violation::new(
                    "page_token",
                    "not a page token of this listing: it must be the next_page_token of the \
                     page before, with the same state, kind and resource_id",
                ));
            }
            id
        };
        validate::finish(v)?;
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(StoreError::from)
            .map_err(ApiError::from)?;
        let mut rows = queue::list(
            &mut conn,
            &WorkFilter {
                state: (!r.state.is_empty()).then(|| r.state.clone()),
                kind: (!r.kind.is_empty()).then(|| r.kind.clone()),
                resource_id,
                after_id,
                limit: limit + 1,
            },
        )
        .await
        .map_err(ApiError::from)?;
        let more = rows.len() as i64 > limit;
        rows.truncate(usize::try_from(limit).unwrap_or(0));
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => page_token::encode(&scope, &last.id.to_string()),
            _ => String::new(),
        };
        Ok(Response::new(ListWorkResponse {
            units: rows.iter().map(convert::work_unit).collect(),
            next_page_token,
        }))
    }

    async fn get_work(
        &self,
        request: Request<GetWorkRequest>,
    ) -> Result<Response<WorkUnit>, Status> {
        admin(&request)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        check_id(r.id, &mut v);
        validate::finish(v)?;
        Ok(Response::new(self.report(r.id).await?))
    }

    async fn retry_work(
        &self,
        request: Request<RetryWorkRequest>,
    ) -> Result<Response<WorkUnit>, Status> {
        let caller = admin(&request)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        check_id(r.id, &mut v);
        if !(0..=100).contains(&r.extra_attempts) {
            v.push(Violation::new(
                "extra_attempts",
                "must be between 0 and 100 (0 means 5)",
            ));
        }
        validate::finish(v)?;
        let extra = if r.extra_attempts == 0 {
            5
        } else {
            r.extra_attempts
        };
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::from)
            .map_err(ApiError::from)?;
        queue::retry_parked(
            &mut tx,
            self.hooks.as_ref(),
            r.id,
            &operator(&caller),
            extra,
        )
        .await
        .map_err(ApiError::from)?;
        tx.commit()
            .await
            .map_err(StoreError::from)
            .map_err(ApiError::from)?;
        tracing::info!(
            work_id = r.id,
            token_id = caller.token_id,
            "parked unit retried via the API"
        );
        Ok(Response::new(self.report(r.id).await?))
    }

    async fn cancel_work(
        &self,
        request: Request<CancelWorkRequest>,
    ) -> Result<Response<WorkUnit>, Status> {
        let caller = admin(&request)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        check_id(r.id, &mut v);
        validate::text("reason", &r.reason, MAX_REASON_CHARS, &mut v);
        validate::finish(v)?;
        let reason = if r.reason.is_empty() {
            "cancelled by an operator".to_owned()
        } else {
            r.reason.clone()
        };
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::from)
            .map_err(ApiError::from)?;
        let row = queue::cancel_parked(
            &mut tx,
            self.hooks.as_ref(),
            r.id,
            &operator(&caller),
            &reason,
        )
        .await
        .map_err(ApiError::from)?;
        // Its history, read in the same transaction (the `cancelled` event included).
        let events = events_for_work(&mut tx, r.id)
            .await
            .map_err(ApiError::from)?;
        tx.commit()
            .await
            .map_err(StoreError::from)
            .map_err(ApiError::from)?;
        tracing::info!(
            work_id = r.id,
            token = %row.token,
            token_id = caller.token_id,
            "parked unit cancelled via the API"
        );
        // The unit as it was when cancelled (its kind, resource, attempts, last error), now
        // finished, with its history.
        let unit = WorkUnit {
            state: "finished".into(),
            events: events.iter().map(convert::work_event).collect(),
            create_time: None,
            spec: None,
            lease_owner: String::new(),
            ..convert::work_unit(&row)
        };
        Ok(Response::new(unit))
    }
}
