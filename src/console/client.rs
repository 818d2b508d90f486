//! The console's calls of the API: tonic clients over the API's gate in-process
//! ([`crate::api::InProcessApi`]), each request carrying the session's bearer token. An error
//! is kept as the API gave it ([`CallError`]): its code decides the page (404, 403, sign-in
//! again), and its message and field violations are what the person reads.

use tonic::service::Routes;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::api::gate::Gate;
use crate::api::proto::resource_service_client::ResourceServiceClient;
use crate::api::proto::work_service_client::WorkServiceClient;

/// The API's services as the console calls them.
#[derive(Debug, Clone)]
pub struct Api {
    service: Gate<Routes>,
}

/// A ResourceService client over the gate.
pub type Resources = ResourceServiceClient<Gate<Routes>>;
/// A WorkService client over the gate.
pub type Work = WorkServiceClient<Gate<Routes>>;

impl Api {
    /// The API behind `service` (the gate of [`crate::api::InProcessApi`]).
    pub fn new(service: Gate<Routes>) -> Self {
        Self { service }
    }

    /// A ResourceService client.
    pub fn resources(&self) -> Resources {
        ResourceServiceClient::new(self.service.clone())
    }

    /// A WorkService client.
    pub fn work(&self) -> Work {
        WorkServiceClient::new(self.service.clone())
    }
}

/// `msg` with `authorization: Bearer token`.
///
/// # Errors
/// When the token cannot be a header value (then it was never a valid token either).
pub fn authed<T>(token: &str, msg: T) -> Result<tonic::Request<T>, CallError> {
    let mut r = tonic::Request::new(msg);
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| CallError::from(Status::unauthenticated("malformed token")))?;
    r.metadata_mut().insert("authorization", value);
    Ok(r)
}

/// One field the API refused, as BadRequest named it (`resource.spec.size_gb`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The request field.
    pub field: String,
    /// Why.
    pub description: String,
}

/// An API call that failed: its code, its message, and the field violations it carried.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    /// The gRPC code.
    pub code: Code,
    /// The API's message.
    pub message: String,
    /// Field violations (`INVALID_ARGUMENT`).
    pub fields: Vec<FieldError>,
}

impl From<Status> for CallError {
    fn from(s: Status) -> Self {
        let fields = s
            .get_details_bad_request()
            .map(|b| {
                b.field_violations
                    .into_iter()
                    .map(|v| FieldError {
                        field: v.field,
                        description: v.description,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            code: s.code(),
            message: s.message().to_owned(),
            fields,
        }
    }
}
