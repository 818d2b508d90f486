//! `setpoint.v1.WorkService`: the operators' view of units of work. Every call needs an admin
//! token; admins see the units of every tenant.
//!
//! RetryWork and CancelWork take an optional `request_id` ([`super::idempotency`]): with one,
//! the action and its stored answer commit together, so a repeat (a double click in the
//! console, a client's retry after a lost answer) replays the answer and acts once. Without
//! one they act as before, for clients written before the field existed.

use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::auth::Caller;
use super::convert;
use super::errors::{ApiError, Violation};
use super::idempotency::{self, Begun};
use super::page_token::{self, Scope};
use super::proto::work_service_server::WorkService;
use super::proto::{
    CancelWorkRequest, GetWorkRequest, GetWorkStatsRequest, ListWorkRequest, ListWorkResponse,
    RetryWorkRequest, WorkCount, WorkStats, WorkUnit,
};
use super::validate::{self, MAX_KIND_CHARS, MAX_REASON_CHARS};
use crate::queue::{self, UnitReport, WorkFilter};
use crate::store::StoreError;
use crate::store::events::events_for_work;
use crate::store::work::work_stats;

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

    /// The transaction of an operator's action: with a request id, claimed for it (or the
    /// first answer to replay); without one, a plain transaction.
    async fn begin(
        &self,
        caller: &Caller,
        request_id: &str,
        method: &str,
        hash: &[u8; 32],
    ) -> Result<Begun<WorkUnit>, ApiError> {
        if request_id.is_empty() {
            let tx = self.pool.begin().await.map_err(StoreError::from)?;
            return Ok(Begun::New(tx));
        }
        idempotency::begin(&self.pool, &caller.tenant, request_id, method, hash).await
    }

    /// Commits an operator's action, with its answer under the request id when there is one.
    async fn commit(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Postgres>,
        caller: &Caller,
        request_id: &str,
        answer: &WorkUnit,
    ) -> Result<(), ApiError> {
        if request_id.is_empty() {
            tx.commit().await.map_err(StoreError::from)?;
            Ok(())
        } else {
            idempotency::finish(tx, &caller.tenant, request_id, answer).await
        }
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
        if !r.request_id.is_empty() {
            validate::request_id(&r.request_id, &mut v);
        }
        validate::finish(v)?;
        let extra = if r.extra_attempts == 0 {
            5
        } else {
            r.extra_attempts
        };
        let hash = idempotency::body_hash(
            "RetryWork",
            &RetryWorkRequest {
                request_id: String::new(),
                ..r.clone()
            },
        );
        let mut tx = match self
            .begin(&caller, &r.request_id, "RetryWork", &hash)
            .await?
        {
            Begun::Replay(answer) => return Ok(Response::new(answer)),
            Begun::New(tx) => tx,
        };
        queue::retry_parked(
            &mut tx,
            self.hooks.as_ref(),
            r.id,
            &operator(&caller),
            extra,
        )
        .await
        .map_err(ApiError::from)?;
        // The answer is read in the request's transaction: it is what a repeat replays.
        let report = queue::show(&mut tx, &r.id.to_string())
            .await
            .map_err(ApiError::from)?;
        let unit = unit_of(&report);
        self.commit(tx, &caller, &r.request_id, &unit).await?;
        tracing::info!(
            work_id = r.id,
            token_id = caller.token_id,
            "parked unit retried via the API"
        );
        Ok(Response::new(unit))
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
        if !r.request_id.is_empty() {
            validate::request_id(&r.request_id, &mut v);
        }
        validate::finish(v)?;
        let reason = if r.reason.is_empty() {
            "cancelled by an operator".to_owned()
        } else {
            r.reason.clone()
        };
        let hash = idempotency::body_hash(
            "CancelWork",
            &CancelWorkRequest {
                request_id: String::new(),
                ..r.clone()
            },
        );
        let mut tx = match self
            .begin(&caller, &r.request_id, "CancelWork", &hash)
            .await?
        {
            Begun::Replay(answer) => return Ok(Response::new(answer)),
            Begun::New(tx) => tx,
        };
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
        self.commit(tx, &caller, &r.request_id, &unit).await?;
        tracing::info!(
            work_id = r.id,
            token = %row.token,
            token_id = caller.token_id,
            "parked unit cancelled via the API"
        );
        Ok(Response::new(unit))
    }

    async fn get_work_stats(
        &self,
        request: Request<GetWorkStatsRequest>,
    ) -> Result<Response<WorkStats>, Status> {
        admin(&request)?;
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(StoreError::from)
            .map_err(ApiError::from)?;
        let stats = work_stats(&mut conn).await.map_err(ApiError::from)?;
        Ok(Response::new(WorkStats {
            counts: stats
                .counts
                .into_iter()
                .map(|(state, kind, count)| WorkCount { kind, state, count })
                .collect(),
            oldest_pending_age_seconds: stats.oldest_pending_age_secs,
        }))
    }
}
