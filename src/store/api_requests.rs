//! SQL of the `api_requests` table: client request ids of mutating RPCs, so that a repeated
//! request returns the first answer instead of acting twice.
//!
//! The row is inserted first in the request's transaction. A concurrent duplicate blocks on the
//! primary key until the first transaction ends: if it committed, the duplicate finds the row
//! (and the stored answer); if it rolled back, the duplicate goes ahead as the first.

use sqlx::{PgConnection, Row};

use super::StoreError;

/// What claiming a request id found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestClaim {
    /// The id is new: this transaction owns it and must store the answer before committing.
    New,
    /// The id was used before (and committed).
    Seen {
        /// The RPC it was used with.
        method: String,
        /// sha256 of that request's body.
        body_hash: Vec<u8>,
        /// The encoded answer.
        response: Option<Vec<u8>>,
    },
}

/// Claims `(tenant, request_id)` for `method` with `body_hash` in the caller's transaction.
pub async fn api_request_claim(
    conn: &mut PgConnection,
    tenant: &str,
    request_id: &str,
    method: &str,
    body_hash: &[u8],
) -> Result<RequestClaim, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO api_requests (tenant, request_id, method, body_hash) VALUES ($1, $2, $3, $4)
         ON CONFLICT (tenant, request_id) DO NOTHING",
    )
    .bind(tenant)
    .bind(request_id)
    .bind(method)
    .bind(body_hash)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(RequestClaim::New);
    }
    let r = sqlx::query(
        "SELECT method, body_hash, response FROM api_requests WHERE tenant = $1 AND request_id = $2",
    )
    .bind(tenant)
    .bind(request_id)
    .fetch_one(conn)
    .await?;
    Ok(RequestClaim::Seen {
        method: r.try_get("method")?,
        body_hash: r.try_get("body_hash")?,
        response: r.try_get("response")?,
    })
}

/// Stores the answer of a claimed request id, in the same transaction as the claim.
pub async fn api_request_store_response(
    conn: &mut PgConnection,
    tenant: &str,
    request_id: &str,
    response: &[u8],
) -> Result<(), StoreError> {
    sqlx::query("UPDATE api_requests SET response = $3 WHERE tenant = $1 AND request_id = $2")
        .bind(tenant)
        .bind(request_id)
        .bind(response)
        .execute(conn)
        .await?;
    Ok(())
}
