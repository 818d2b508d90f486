//! Authentication: bearer tokens mapped to a tenant (and an admin flag), stored as sha256
//! hashes in `api_tokens`. The gate ([`super::gate`]) checks the `authorization: Bearer …`
//! header of every call except `grpc.health.v1` with the [`Authenticator`] and hands the
//! [`Caller`] to the services in the request's extensions. Tokens never appear in logs or
//! errors; a token is named by its row id.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::errors::{ApiError, Violation};
use super::token_cache::{Lookup, LookupError, TokenCache, TokenLimits};
use super::validate;
use crate::store::StoreError;
use crate::store::tokens::token_insert;

/// Prefix of every token (so that leaked tokens are easy to recognise and scan for).
pub const TOKEN_PREFIX: &str = "spt_";

/// How long a looked-up token is trusted without asking the database again (a revoked token
/// stops working within this time; an expired one at once).
pub const CACHE_TTL: Duration = super::token_cache::DEFAULT_KNOWN_TTL;

/// Who is calling: set by the gate ([`super::gate`]) for every authenticated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The tenant whose instances the caller sees and changes.
    pub tenant: String,
    /// May use `WorkService`.
    pub admin: bool,
    /// The token's row id (for logs; never the token).
    pub token_id: i64,
    /// The kinds of resources the token may use (glob patterns); `None`: every kind.
    pub kinds: Option<Vec<String>>,
}

impl Caller {
    /// The caller of an authenticated request.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` when the request did not pass through the gate.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Caller, ApiError> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or(ApiError::Unauthenticated("no bearer token"))
    }

    /// Whether the token may use resources of kind `kind`.
    pub fn may_use_kind(&self, kind: &str) -> bool {
        match &self.kinds {
            None => true,
            Some(patterns) => patterns
                .iter()
                .any(|p| globset::Glob::new(p).is_ok_and(|g| g.compile_matcher().is_match(kind))),
        }
    }

    /// `PERMISSION_DENIED` unless the token may use resources of kind `kind`.
    pub fn require_kind(&self, kind: &str) -> Result<(), ApiError> {
        if self.may_use_kind(kind) {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied(
                "this token is limited to other kinds of resources (setpoint tokens list shows                  its kinds)",
            ))
        }
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
    /// The kinds it may use, or `None` for every kind.
    pub kinds: Option<Vec<String>>,
}

/// Makes and stores a token for `tenant` that may use every kind of resource.
///
/// # Errors
/// `INVALID_ARGUMENT` for a tenant that is not a DNS label; database errors.
pub async fn create_token(
    pool: &PgPool,
    tenant: &str,
    admin: bool,
    expires_in: Option<Duration>,
) -> Result<NewToken, ApiError> {
    create_token_for_kinds(pool, tenant, admin, expires_in, None).await
}

/// Makes and stores a token for `tenant`, limited to the kinds of resources `kinds` matches
/// (glob patterns such as `dns.*`) when given.
///
/// # Errors
/// `INVALID_ARGUMENT` for a tenant that is not a DNS label or a pattern that is not a glob
/// over kind names; database errors.
pub async fn create_token_for_kinds(
    pool: &PgPool,
    tenant: &str,
    admin: bool,
    expires_in: Option<Duration>,
    kinds: Option<Vec<String>>,
) -> Result<NewToken, ApiError> {
    let mut v = Vec::new();
    validate::dns_label("tenant", tenant, &mut v);
    if let Some(patterns) = &kinds {
        if patterns.is_empty() {
            v.push(Violation::new(
                "kinds",
                "name at least one kind pattern (e.g. dns.*), or leave kinds out for every kind",
            ));
        }
        for p in patterns {
            let ok = !p.is_empty()
                && p.len() <= 128
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-_*?[]{},".contains(c))
                && globset::Glob::new(p).is_ok();
            if !ok {
                v.push(Violation::new(
                    "kinds",
                    format!(
                        "{:?} is not a pattern of kind names (e.g. dns.* or kvx.instance)",
                        super::errors::clip(p, 64)
                    ),
                ));
            }
        }
    }
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
    let id = token_insert(
        &mut conn,
        &hash_token(&token),
        tenant,
        admin,
        expires_at,
        kinds.as_deref(),
    )
    .await?;
    tracing::info!(token_id = id, tenant, admin, kinds = ?kinds, "API token created");
    Ok(NewToken {
        token,
        id,
        tenant: tenant.to_owned(),
        admin,
        expires_at,
        kinds,
    })
}

/// Checks bearer tokens against `api_tokens`, through the caches and the lookup budget of
/// [`TokenCache`].
#[derive(Debug)]
pub struct Authenticator {
    tokens: TokenCache,
}

impl Authenticator {
    /// An authenticator on `pool` with the default [`TokenLimits`].
    pub fn new(pool: PgPool) -> Self {
        Self::with_limits(pool, TokenLimits::default())
    }

    /// An authenticator on `pool` within `limits`.
    pub fn with_limits(pool: PgPool, limits: TokenLimits) -> Self {
        Self {
            tokens: TokenCache::new(pool, limits),
        }
    }

    /// The caller named by an `authorization` header value.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` for a missing, malformed, unknown, revoked or expired token;
    /// `UNAVAILABLE` when the token would need a database lookup beyond the budget, or the
    /// database fails.
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
        let row = match self.tokens.lookup(&hash_token(token)).await {
            Ok(Lookup::Known(row)) => row,
            Ok(Lookup::Unknown) => return Err(ApiError::Unauthenticated("invalid token")),
            Err(LookupError::OverBudget) => {
                return Err(ApiError::Unavailable(
                    "the server is checking too many unknown tokens right now; try again in a \
                     moment",
                ));
            }
            Err(LookupError::Store(e)) => return Err(ApiError::Store(e)),
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
            kinds: row.kinds,
        })
    }
}
