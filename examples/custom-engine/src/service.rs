//! `webhook.v1.DeliveryService`: a tenant reads its own deliveries over the engine's gRPC API.
//!
//! The engine serves it on its API listener behind the same gate as setpoint's services, so
//! every call is authenticated before it gets here; [`Caller::of`] says who is calling, and
//! the answer holds only that tenant's rows.

use prost_types::Timestamp;
use setpoint::api::ApiError;
use setpoint::api::auth::Caller;
use setpoint::api::errors::Violation;
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use crate::deliveries;
use crate::proto::delivery_service_server::DeliveryService;
use crate::proto::{Delivery, ListDeliveriesRequest, ListDeliveriesResponse};

/// Rows returned when the request names no limit.
pub const DEFAULT_LIMIT: i32 = 50;
/// Most rows one call returns.
pub const MAX_LIMIT: i32 = 500;

/// The service.
#[derive(Debug, Clone)]
pub struct Deliveries {
    pool: PgPool,
}

impl Deliveries {
    /// The service over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

#[tonic::async_trait]
impl DeliveryService for Deliveries {
    async fn list_deliveries(
        &self,
        request: Request<ListDeliveriesRequest>,
    ) -> Result<Response<ListDeliveriesResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_LIMIT,
            l if (1..=MAX_LIMIT).contains(&l) => l,
            _ => {
                return Err(ApiError::Invalid(vec![Violation::new(
                    "limit",
                    format!("must be between 1 and {MAX_LIMIT} (0 means {DEFAULT_LIMIT})"),
                )])
                .into());
            }
        };
        let work_id = (req.work_id != 0).then_some(req.work_id);
        let rows = deliveries::list(&self.pool, &caller.tenant, work_id, i64::from(limit))
            .await
            .map_err(ApiError::Store)?;
        Ok(Response::new(ListDeliveriesResponse {
            deliveries: rows
                .into_iter()
                .map(|d| Delivery {
                    work_id: d.work_id,
                    attempt: d.attempt,
                    idempotency_key: d.idempotency_key,
                    event: d.event,
                    status_code: d.status_code,
                    answered_at: Some(timestamp(d.answered_at)),
                    delivered_at: d.delivered_at.map(timestamp),
                })
                .collect(),
        }))
    }
}
