//! Authentication: bearer tokens mapped to a tenant (and an admin flag), stored as sha256
//! hashes in `api_tokens`. [`AuthService`] wraps every gRPC service except `grpc.health.v1`,
//! checks the `authorization: Bearer …` header and hands the [`Caller`] to the services in the
//! request's extensions. Tokens never appear in logs or errors; a token is named by its row id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Service};

use super::errors::{ApiError, Violation};
use super::validate;
use crate::store::StoreError;
use crate::store::tokens::{TokenRow, token_get_by_hash, token_insert};

/// Prefix of every token (so that leaked tokens are easy to recognise and scan for).
pub const TOKEN_PREFIX: &str = "spt_";

/// How long a looked-up token is trusted without asking the database again (a revoked token
/// stops working within this time; an expired one at once).
pub const CACHE_TTL: Duration = Duration::from_secs(5);

/// Who is calling: set by [`AuthService`] for every authenticated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The tenant whose instances the caller sees and changes.
    pub tenant: String,
    /// May use `WorkService`.
    pub admin: bool,
    /// The token's row id (for logs; never the token).
    pub token_id: i64,
}

impl Caller {
    /// The caller of an authenticated request.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` when the request did not pass through [`AuthService`].
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Caller, ApiError> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or(ApiError::Unauthenticated("no bearer token"))
    }

    /// `PERMISSION_DENIED` unless the caller is an admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied(
                "this call needs an admin token (setpoint tokens create --admin)",
            ))
        }
    }
}

/// sha256 of a token's text: what the table stores.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token: `spt_` and 64 hex digits (256 bits).
pub fn generate_token() -> String {
    format!("{TOKEN_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()))
}

/// A token just made; `token` is shown once and not stored.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// The token text.
    pub token: String,
    /// Its row id.
    pub id: i64,
    /// Its tenant.
    pub tenant: String,
    /// Admin flag.
    pub admin: bool,
    /// When it expires, if ever.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Makes and stores a token for `tenant`.
///
/// # Errors
/// `INVALID_ARGUMENT` for a tenant that is not a DNS label; database errors.
pub async fn create_token(
    pool: &PgPool,
    tenant: &str,
    admin: bool,
    expires_in: Option<Duration>,
) -> Result<NewToken, ApiError> {
    let mut v = Vec::new();
    validate::dns_label("tenant", tenant, &mut v);
    validate::finish(v)?;
    let expires_at = match expires_in {
        Some(d) => Some(
            Utc::now()
                + chrono::Duration::from_std(d).map_err(|_| {
                    ApiError::Invalid(vec![Violation::new("expires_in", "is too long")])
                })?,
        ),
        None => None,
    };
    let token = generate_token();
    let mut conn = pool.acquire().await.map_err(StoreError::from)?;
    let id = token_insert(&mut conn, &hash_token(&token), tenant, admin, expires_at).await?;
    tracing::info!(token_id = id, tenant, admin, "API token created");
    Ok(NewToken {
        token,
        id,
        tenant: tenant.to_owned(),
        admin,
        expires_at,
    })
}

/// Checks bearer tokens against `api_tokens`, with a short cache.
#[derive(Debug)]
pub struct Authenticator {
    pool: PgPool,
    cache: Mutex<HashMap<[u8; 32], (TokenRow, Instant)>>,
}

impl Authenticator {
    /// An authenticator on `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The caller named by an `authorization` header value.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` for a missing, malformed, unknown, revoked or expired token.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Caller, ApiError> {
        let header = header.ok_or(ApiError::Unauthenticated(
            "missing bearer token: send the metadata `authorization: Bearer <token>`",
        ))?;
        let token = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::Unauthenticated(
                "malformed authorization metadata: expected `Bearer <token>`",
            ))?;
        let hash = hash_token(token);
        let row = self.lookup(&hash).await?;
        let Some(row) = row else {
            return Err(ApiError::Unauthenticated("invalid token"));
        };
        if row.revoked_at.is_some() {
            return Err(ApiError::Unauthenticated("token revoked"));
        }
        if row.expires_at.is_some_and(|e| e <= Utc::now()) {
            return Err(ApiError::Unauthenticated(
                "token expired: ask for a new one (setpoint tokens create)",
            ));
        }
        Ok(Caller {
            tenant: row.tenant,
            admin: row.admin,
            token_id: row.id,
        })
    }

    async fn lookup(&self, hash: &[u8; 32]) -> Result<Option<TokenRow>, ApiError> {
        if let Ok(cache) = self.cache.lock()
            && let Some((row, at)) = cache.get(hash)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(Some(row.clone()));
        }
        let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
        let row = token_get_by_hash(&mut conn, hash).await?;
        if let (Some(row), Ok(mut cache)) = (&row, self.cache.lock()) {
            if cache.len() > 10_000 {
                cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
            }
            cache.insert(*hash, (row.clone(), Instant::now()));
        }
        Ok(row)
    }
}

/// Wraps the gRPC routes: every request but `grpc.health.v1` must carry a valid token.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S> AuthService<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, auth: Arc<Authenticator>) -> Self {
        Self { inner, auth }
    }
}

impl<S> Service<Request<Body>> for AuthService<S>
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

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // The ready service answers this call; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        let method = req.uri().path().to_owned();
        Box::pin(async move {
            let answer = if method.starts_with("/grpc.health.v1.") {
                inner.call(req).await
            } else {
                let header = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok());
                match auth.authenticate(header).await {
                    Ok(caller) => {
                        req.extensions_mut().insert(caller);
                        inner.call(req).await
                    }
                    Err(e) => Ok(tonic::Status::from(e).into_http()),
                }
            };
            if let Ok(response) = &answer {
                crate::metrics::api_request(&method, response_code(response));
            }
            answer
        })
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
