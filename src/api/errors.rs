//! What can go wrong in an API call, and how each case becomes a gRPC status with
//! `google.rpc` details. Database details never reach the client (they are logged).
//!
//! Every error stays small whatever the request was: a status message is a summary (never the
//! list of violations, which the `BadRequest` details carry), the details hold at most
//! [`MAX_VIOLATIONS`] violations, and each description is cut at [`MAX_DESCRIPTION_CHARS`].

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::queue::QueueError;
use crate::store::StoreError;

/// The `ErrorInfo.domain` of setpoint's errors.
pub const ERROR_DOMAIN: &str = "setpoint.dev";
/// Most field violations one error carries in its `BadRequest` details; its message says how
/// many there were in all.
pub const MAX_VIOLATIONS: usize = 20;
/// Longest description of a violation (characters); a longer one is cut and ends with `…`.
pub const MAX_DESCRIPTION_CHARS: usize = 200;
/// Longest field path of a violation (characters).
const MAX_FIELD_CHARS: usize = 100;
/// Most distinct field names the summary of an `INVALID_ARGUMENT` message names.
const SUMMARY_FIELDS: usize = 5;

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
    /// Bad input: `INVALID_ARGUMENT` with `BadRequest` field violations (the first
    /// [`MAX_VIOLATIONS`]); the message summarises them.
    #[error("{}", summary(.0))]
    Invalid(Vec<Violation>),
    /// No, a malformed, an unknown, a revoked or an expired token: `UNAUTHENTICATED`.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The server cannot take this call now; the same call may work in a moment:
    /// `UNAVAILABLE`.
    #[error("{0}")]
    Unavailable(&'static str),
    /// A limit of the server or of the caller's tenant is reached: `RESOURCE_EXHAUSTED` with a
    /// `QuotaFailure` naming the limit, and a `RetryInfo` when a delay is known.
    #[error("{description}")]
    Exhausted {
        /// What the limit applies to, e.g. `tenants/acme`.
        subject: String,
        /// The limit, with its value and the setting that changes it.
        description: String,
        /// How long the caller should wait before trying again (`google.rpc.RetryInfo`),
        /// when the server knows.
        retry_after: Option<std::time::Duration>,
    },
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
    /// No live engine serves what the request asks for (a region, a kind):
    /// `FAILED_PRECONDITION` naming what is served.
    #[error("{what} is not served by any running engine (served: {})", if served.is_empty() { "none".to_owned() } else { served.join(", ") })]
    NotServed {
        /// What is not served (`region us-west-2`).
        what: String,
        /// What is.
        served: Vec<String>,
    },
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

/// `s` cut to at most `max` characters (the last one then `…`).
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some(_) => {
            let keep: String = s.chars().take(max.saturating_sub(1)).collect();
            format!("{keep}…")
        }
    }
}

/// The message of an `INVALID_ARGUMENT`: how many violations, which fields (a few), and where
/// the details are — never the descriptions, which the details carry.
fn summary(v: &[Violation]) -> String {
    let mut fields: Vec<&str> = Vec::new();
    for violation in v {
        if !fields.contains(&violation.field.as_str()) {
            fields.push(&violation.field);
        }
    }
    let mut named: Vec<String> = fields
        .iter()
        .take(SUMMARY_FIELDS)
        .map(|f| clip(f, MAX_FIELD_CHARS))
        .collect();
    if fields.len() > SUMMARY_FIELDS {
        named.push("…".into());
    }
    let n = v.len();
    let what = if n == 1 {
        "1 field violation".to_owned()
    } else {
        format!("{n} field violations")
    };
    let details = if n > MAX_VIOLATIONS {
        format!("the BadRequest details list the first {MAX_VIOLATIONS}")
    } else {
        "see the BadRequest details".to_owned()
    };
    format!("invalid request: {what} ({}); {details}", named.join(", "))
}

/// The `BadRequest` details of `violations`: the first [`MAX_VIOLATIONS`], clipped.
fn bad_request(violations: &[Violation]) -> ErrorDetails {
    let mut d = ErrorDetails::new();
    for v in violations.iter().take(MAX_VIOLATIONS) {
        d.add_bad_request_violation(
            clip(&v.field, MAX_FIELD_CHARS),
            clip(&v.description, MAX_DESCRIPTION_CHARS),
        );
    }
    d
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
                Status::with_error_details(Code::InvalidArgument, message, bad_request(&violations))
            }
            ApiError::Unauthenticated(_) => Status::unauthenticated(message),
            ApiError::Unavailable(_) => Status::unavailable(message),
            ApiError::Exhausted {
                subject,
                description,
                retry_after,
            } => {
                let mut d = ErrorDetails::new();
                d.add_quota_failure_violation(subject, description);
                if let Some(delay) = retry_after {
                    d.set_retry_info(Some(delay));
                }
                Status::with_error_details(Code::ResourceExhausted, message, d)
            }
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
            ApiError::NotServed { what, served } => {
                let mut d = ErrorDetails::new();
                d.add_precondition_failure_violation(
                    "NOT_SERVED",
                    what.clone(),
                    format!("served: {}", served.join(", ")),
                );
                d.set_error_info(
                    "NOT_SERVED",
                    ERROR_DOMAIN,
                    HashMap::from([("served".to_owned(), served.join(","))]),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn size(s: &Status) -> usize {
        s.message().len() + s.details().len()
    }

    #[test]
    fn thousands_of_violations_make_a_small_error_that_says_how_many() {
        let many: Vec<Violation> = (0..32_000)
            .map(|i| Violation::new("update_mask", format!("path {i} is {}", "x".repeat(1000))))
            .collect();
        let s = Status::from(ApiError::Invalid(many));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "invalid request: 32000 field violations (update_mask); the BadRequest details \
             list the first 20"
        );
        let details = s.get_details_bad_request().unwrap();
        assert_eq!(details.field_violations.len(), MAX_VIOLATIONS);
        assert!(
            details
                .field_violations
                .iter()
                .all(|v| v.description.chars().count() <= MAX_DESCRIPTION_CHARS
                    && v.description.ends_with('…'))
        );
        assert!(size(&s) < 6 * 1024, "{}", size(&s));
    }

    #[test]
    fn the_message_names_a_few_fields_and_never_the_descriptions() {
        let v = vec![
            Violation::new("instance_id", "must be a DNS label"),
            Violation::new("request_id", "required"),
            Violation::new("request_id", "again"),
        ];
        let s = Status::from(ApiError::Invalid(v));
        assert_eq!(
            s.message(),
            "invalid request: 3 field violations (instance_id, request_id); see the BadRequest \
             details"
        );
        assert_eq!(
            s.get_details_bad_request().unwrap().field_violations.len(),
            3
        );
        let one = Status::from(ApiError::Invalid(vec![Violation::new("name", "bad")]));
        assert_eq!(
            one.message(),
            "invalid request: 1 field violation (name); see the BadRequest details"
        );
        let fields: Vec<Violation> = (0..8)
            .map(|i| Violation::new(format!("f{i}"), "x"))
            .collect();
        assert!(
            Status::from(ApiError::Invalid(fields))
                .message()
                .contains("(f0, f1, f2, f3, f4, …)")
        );
    }

    #[test]
    fn clip_counts_characters() {
        assert_eq!(clip("ééé", 3), "ééé");
        assert_eq!(clip("éééé", 3), "éé…");
        assert_eq!(clip("", 3), "");
    }
}
