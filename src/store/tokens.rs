//! SQL of the `api_tokens` table: bearer tokens of the gRPC API, stored as sha256 hashes.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

use super::StoreError;

/// A stored token: everything but the token itself, which is never stored (its hash is the
/// key and is not shown either).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenRow {
    /// Row id: names the token in logs and in `setpoint tokens revoke`, without revealing it.
    pub id: i64,
    /// The tenant the token acts for.
    pub tenant: String,
    /// Whether the token may use the operators' `WorkService`.
    pub admin: bool,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// The kinds of resources it may use (glob patterns), or `None` for every kind.
    pub kinds: Option<Vec<String>>,
}

fn token_row(r: &sqlx::postgres::PgRow) -> Result<TokenRow, StoreError> {
    Ok(TokenRow {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        admin: r.try_get("admin")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        revoked_at: r.try_get("revoked_at")?,
        kinds: r.try_get("kinds")?,
    })
}

/// Stores a new token's hash. Returns the row id.
pub async fn token_insert(
    conn: &mut PgConnection,
    token_hash: &[u8],
    tenant: &str,
    admin: bool,
    expires_at: Option<DateTime<Utc>>,
    kinds: Option<&[String]>,
) -> Result<i64, StoreError> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO api_tokens (token_hash, tenant, admin, expires_at, kinds)
         VALUES ($1, $2, $3, $4, $5)
         RETURNING id",
    )
    .bind(token_hash)
    .bind(tenant)
    .bind(admin)
    .bind(expires_at)
    .bind(kinds)
    .fetch_one(conn)
    .await?;
    Ok(id)
}

/// The token whose hash is `token_hash`, if any (expired and revoked ones included: the
/// caller decides).
pub async fn token_get_by_hash(
    conn: &mut PgConnection,
    token_hash: &[u8],
) -> Result<Option<TokenRow>, StoreError> {
    let row = sqlx::query(
        "SELECT id, tenant, admin, created_at, expires_at, revoked_at, kinds FROM api_tokens
         WHERE token_hash = $1",
    )
    .bind(token_hash)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(token_row).transpose()
}

/// Whether token `id` still lets its holder in: it exists, is not revoked and has not expired.
pub async fn token_still_valid(conn: &mut PgConnection, id: i64) -> Result<bool, StoreError> {
    let valid: Option<bool> = sqlx::query_scalar(
        "SELECT revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
         FROM api_tokens WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?;
    Ok(valid.unwrap_or(false))
}

/// Every token (of `tenant` only, when given), oldest first; revoked and expired ones included.
pub async fn tokens_list(
    conn: &mut PgConnection,
    tenant: Option<&str>,
) -> Result<Vec<TokenRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, tenant, admin, created_at, expires_at, revoked_at, kinds FROM api_tokens
         WHERE $1::text IS NULL OR tenant = $1 ORDER BY id",
    )
    .bind(tenant)
    .fetch_all(conn)
    .await?;
    rows.iter().map(token_row).collect()
}

/// Revokes token `id` (a token revoked before keeps its first revocation time). Returns the
/// token as it is now, or `None` when no such token exists.
pub async fn token_revoke(
    conn: &mut PgConnection,
    id: i64,
) -> Result<Option<TokenRow>, StoreError> {
    let row = sqlx::query(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
         RETURNING id, tenant, admin, created_at, expires_at, revoked_at, kinds",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(token_row).transpose()
}
