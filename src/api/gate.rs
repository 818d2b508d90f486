//! The gate every gRPC call passes before it reaches a service, in this order:
//!
//! 1. **Label** the call for `setpoint_api_requests_total` by its method, when it names a known
//!    one ([`super::methods`]), else `unknown`: no label value ever comes from a client.
//! 2. **Health** (`grpc.health.v1`) passes at once: no token, no limit, so a busy server still
//!    answers its health checks.
//! 3. **In-flight limit**: at most [`GateLimits::max_in_flight`] calls are past this point at
//!    once; one more is refused at once with `RESOURCE_EXHAUSTED` (never queued: a queue
//!    without bound only turns overload into latency and memory).
//! 4. **Timeout**: the call must produce its answer (for a stream: its first answer) within
//!    [`GateLimits::request_timeout`], or it is dropped (its transaction rolls back) and
//!    answered with `DEADLINE_EXCEEDED`.
//! 5. **Token**: the [`Authenticator`] names the caller, handed to the services in the
//!    request's extensions.
//! 6. **Framing**: the body of a call that sends one message is read and checked
//!    ([`super::frames`]), so that only well-formed frames reach tonic.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Service};

use super::auth::Authenticator;
use super::errors::ApiError;
use super::frames;
use super::methods::{Method, Methods, UNKNOWN_LABEL};

/// The gate's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateLimits {
    /// Most calls in progress at once (Watch streams count until their first answer).
    pub max_in_flight: usize,
    /// Longest time to a call's (first) answer.
    pub request_timeout: Duration,
    /// Largest request message (bytes).
    pub max_message_bytes: usize,
}

#[derive(Debug)]
struct Shared {
    methods: Methods,
    auth: Arc<Authenticator>,
    in_flight: Arc<Semaphore>,
    limits: GateLimits,
}

/// Wraps the gRPC routes; see the module documentation.
#[derive(Debug, Clone)]
pub struct Gate<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Gate<S> {
    /// Wraps `inner`, which serves `methods`.
    pub fn new(inner: S, methods: Methods, auth: Arc<Authenticator>, limits: GateLimits) -> Self {
        Self {
            inner,
            shared: Arc::new(Shared {
                methods,
                auth,
                in_flight: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
                limits,
            }),
        }
    }
}

impl<S> Service<Request<Body>> for Gate<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The ready service answers this call; a fresh clone takes its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let method = shared.methods.get(req.uri().path()).cloned();
        Box::pin(async move {
            let label = method.as_ref().map_or(UNKNOWN_LABEL, |m| m.path.as_str());
            let answer = pass(&shared, method.as_ref(), inner, req).await;
            if let Ok(response) = &answer {
                crate::metrics::api_request(label, response_code(response));
            }
            answer
        })
    }
}

/// Steps 2 to 6 of the module documentation.
async fn pass<S>(
    shared: &Shared,
    method: Option<&Method>,
    mut inner: S,
    req: Request<Body>,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    if method.is_some_and(Method::is_health) {
        return inner.call(req).await;
    }
    let Ok(_permit) = shared.in_flight.clone().try_acquire_owned() else {
        let e = ApiError::Exhausted {
            subject: "server".into(),
            description: format!(
                "the server has {} calls in progress, its limit (api.max_in_flight); try again \
                 shortly",
                shared.limits.max_in_flight
            ),
            retry_after: None,
        };
        return Ok(Status::from(e).into_http());
    };
    let timeout = shared.limits.request_timeout;
    match tokio::time::timeout(timeout, admit(shared, method, inner, req)).await {
        Ok(answer) => answer,
        Err(_) => Ok(Status::deadline_exceeded(format!(
            "the call took longer than the server's limit of {} (api.request_timeout); a change \
             may still have been applied: repeat it with the same request_id to learn its \
             outcome",
            humanize(timeout)
        ))
        .into_http()),
    }
}

/// Steps 5 and 6: the token, then the framing.
async fn admit<S>(
    shared: &Shared,
    method: Option<&Method>,
    mut inner: S,
    mut req: Request<Body>,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    match shared.auth.authenticate(header).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
        }
        Err(e) => return Ok(Status::from(e).into_http()),
    }
    if let Some(m) = method
        && !m.client_streaming
    {
        req = match frames::buffer(req, shared.limits.max_message_bytes).await {
            Ok(req) => req,
            Err(e) => return Ok(Status::from(e).into_http()),
        };
    }
    inner.call(req).await
}

/// `30s`, `1.5s`, `250ms`.
fn humanize(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// The gRPC status of a response as far as its headers tell: failures are sent "trailers-only",
/// with `grpc-status` in the headers; a response without it carries its status in the trailers,
/// which for unary calls and healthy streams is OK.
fn response_code(response: &Response<Body>) -> &'static str {
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
        .unwrap_or(tonic::Code::Ok);
    code_name(code)
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_configured() {
        assert_eq!(humanize(Duration::from_secs(30)), "30s");
        assert_eq!(humanize(Duration::from_millis(250)), "250ms");
        assert_eq!(humanize(Duration::from_millis(1500)), "1.5s");
    }
}
