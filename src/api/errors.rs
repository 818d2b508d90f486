//! What can go wrong in an API call, and how each case becomes a gRPC status with
//! `google.rpc` details. Database details never reach the client (they are logged).

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::queue::QueueError;
use crate::store::StoreError;

/// The `ErrorInfo.domain` of setpoint's errors.
pub const ERROR_DOMAIN: &str = "setpoint.dev";

/// One bad field of a request: its path (e.g. `instance.spec.plan`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field path.
    pub field: String,
    /// What is wrong and what is allowed.
    pub description: String,
}

impl Violation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// An API failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad input: `INVALID_ARGUMENT` with `BadRequest` field violations.
    #[error("invalid request: {}", describe(.0))]
    Invalid(Vec<Violation>),
    /// No, a malformed, an unknown, a revoked or an expired token: `UNAUTHENTICATED`.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The token may not do this: `PERMISSION_DENIED`.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// The resource does not exist for this caller: `NOT_FOUND`.
    #[error("{0} not found")]
    NotFound(String),
    /// The name is taken: `ALREADY_EXISTS`.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A unit of work of the resource is still queued, running or parked:
    /// `FAILED_PRECONDITION` with `PreconditionFailure` and `ErrorInfo` naming the unit.
    #[error(
        "{resource} has work in progress (unit {work_id}); try again when it has finished \
         (watch it with `setpoint instances watch`)"
    )]
    Busy {
        /// The resource name.
        resource: String,
        /// The newest unit in the queue.
        work_id: i64,
        /// Whether the unit is waiting for an operator (parked) rather than running.
        parked: bool,
    },
    /// The request id was used before with another method or body: `INVALID_ARGUMENT` with a
    /// `BadRequest` violation of `request_id` and `ErrorInfo` reason `REQUEST_ID_REUSED`.
    #[error(
        "request_id {0:?} was already used for a different request; use a new request id \
         for a new request"
    )]
    RequestIdReused(String),
    /// An operator action on a unit that does not allow it.
    #[error(transparent)]
    Queue(QueueError),
    /// The database failed.
    #[error("database error")]
    Store(#[from] StoreError),
    /// Something that cannot happen did (a stored answer that does not decode).
    #[error("internal error: {0}")]
    Internal(String),
}

fn describe(v: &[Violation]) -> String {
    v.iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Store(s) => ApiError::Store(s),
            other => ApiError::Queue(other),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let message = e.to_string();
        match e {
            ApiError::Invalid(violations) => {
                let mut d = ErrorDetails::new();
                for v in &violations {
                    d.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
                Status::with_error_details(Code::InvalidArgument, message, d)
            }
            ApiError::Unauthenticated(_) => Status::unauthenticated(message),
            ApiError::PermissionDenied(_) => Status::permission_denied(message),
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::AlreadyExists(_) => Status::already_exists(message),
            ApiError::Busy {
                resource,
                work_id,
                parked,
            } => {
                let mut d = ErrorDetails::new();
                let kind = if parked { "WORK_PARKED" } else { "ACTIVE_WORK" };
                d.add_precondition_failure_violation(
                    kind,
                    resource.clone(),
                    if parked {
                        format!("unit {work_id} failed and waits for an operator (retry or cancel)")
                    } else {
                        format!("unit {work_id} is queued or running")
                    },
                );
                d.set_error_info(
                    kind,
                    ERROR_DOMAIN,
                    HashMap::from([
                        ("resource".to_owned(), resource),
                        ("work_id".to_owned(), work_id.to_string()),
                    ]),
                );
                Status::with_error_details(Code::FailedPrecondition, message, d)
            }
            ApiError::RequestIdReused(id) => {
                let mut d = ErrorDetails::new();
                d.add_bad_request_violation("request_id", "already used for a different request");
                d.set_error_info(
                    "REQUEST_ID_REUSED",
                    ERROR_DOMAIN,
                    HashMap::from([("request_id".to_owned(), id)]),
                );
                Status::with_error_details(Code::InvalidArgument, message, d)
            }
            ApiError::Queue(q) => match q {
                QueueError::NotFound(_) => Status::not_found(message),
                QueueError::NotParked { .. } | QueueError::Finished(_) => {
                    Status::failed_precondition(message)
                }
                QueueError::DuplicateToken(_) => Status::already_exists(message),
                QueueError::Store(_) => Status::internal("internal error"),
            },
            ApiError::Store(s) => {
                tracing::error!(error = %s, "database error in an API call");
                if s.is_transient() {
                    Status::unavailable("the database is unavailable; try again")
                } else {
                    Status::internal("internal error")
                }
            }
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error in an API call");
                Status::internal("internal error")
            }
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Store(StoreError::from(e))
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        ApiError::Store(e).into()
    }
}

impl From<QueueError> for Status {
    fn from(e: QueueError) -> Status {
        ApiError::from(e).into()
    }
}
