//! Client request ids: a mutating call runs in a transaction that first claims its
//! `(tenant, request_id)` row in `api_requests` and, before committing, stores its encoded
//! answer there. A repeated request finds the row and gets the stored answer; a request that
//! reuses an id with another method or body is refused ([`ApiError::RequestIdReused`]). A
//! concurrent duplicate blocks on the row's primary key until the first commits, then replays.
//! A request that fails stores nothing (its transaction rolls back), so retrying it runs it
//! again.

use prost::Message;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres, Transaction};

use super::errors::ApiError;
use crate::store::StoreError;
use crate::store::api_requests::{RequestClaim, api_request_claim, api_request_store_response};

/// sha256 over the method and the request's encoding (the caller clears `request_id` first,
/// so the hash covers exactly what the request asks for).
pub fn body_hash(method: &str, request: &impl Message) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update([0u8]);
    h.update(request.encode_to_vec());
    h.finalize().into()
}

/// What [`begin`] found.
#[derive(Debug)]
pub enum Begun<R> {
    /// A new request: do the work in this transaction, then call [`finish`].
    New(Transaction<'static, Postgres>),
    /// A repeated request: its first answer.
    Replay(R),
}

/// Opens the request's transaction and claims its id.
///
/// # Errors
/// [`ApiError::RequestIdReused`] when the id was used for another request; database errors.
pub async fn begin<R: Message + Default>(
    pool: &PgPool,
    tenant: &str,
    request_id: &str,
    method: &str,
    hash: &[u8; 32],
) -> Result<Begun<R>, ApiError> {
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    match api_request_claim(&mut tx, tenant, request_id, method, hash).await? {
        RequestClaim::New => Ok(Begun::New(tx)),
        RequestClaim::Seen {
            method: m,
            body_hash,
            response,
        } => {
            if m != method || body_hash.as_slice() != hash.as_slice() {
                return Err(ApiError::RequestIdReused(request_id.to_owned()));
            }
            let bytes = response.ok_or_else(|| {
                ApiError::Internal(format!("request {request_id} has no stored answer"))
            })?;
            let answer = R::decode(bytes.as_slice())
                .map_err(|e| ApiError::Internal(format!("stored answer does not decode: {e}")))?;
            tracing::debug!(method, "replayed a repeated request");
            Ok(Begun::Replay(answer))
        }
    }
}

/// Stores `answer` under the request id and commits.
///
/// # Errors
/// Database errors (then nothing of the request is kept).
pub async fn finish<R: Message>(
    mut tx: Transaction<'static, Postgres>,
    tenant: &str,
    request_id: &str,
    answer: &R,
) -> Result<(), ApiError> {
    api_request_store_response(&mut tx, tenant, request_id, &answer.encode_to_vec()).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(())
}
