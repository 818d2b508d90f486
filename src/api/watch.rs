//! The feed behind `WatchInstance`: one LISTEN connection per server on the
//! `setpoint_instances` channel (a trigger notifies it with the instance id on every insert
//! and update), fanned out to every watcher through a broadcast channel. A watcher re-reads
//! its instance on each notification for it, so it never depends on what a notification
//! carries; after a lost connection (notifications may have been missed) every watcher
//! re-reads.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;

use super::auth::CACHE_TTL;
use super::errors::ApiError;
use super::watch_limit::WatchSlot;
use crate::store::StoreError;
use crate::store::instances::{INSTANCE_CHANNEL, InstanceRow, instance_get_by_id};
use crate::store::tokens::token_still_valid;

/// Fan-out of instance change notifications. [`Uuid::nil`] means "re-read everything".
#[derive(Debug, Clone)]
pub struct InstanceEvents {
    sender: broadcast::Sender<Uuid>,
}

impl InstanceEvents {
    /// Starts listening (the LISTEN is in place when this returns) until `shutdown`.
    ///
    /// # Errors
    /// When the listening connection cannot be opened.
    pub async fn start(
        pool: &PgPool,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StoreError> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(INSTANCE_CHANNEL).await?;
        let (sender, _) = broadcast::channel(4096);
        let events = Arc::new(Self { sender });
        let out = events.sender.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    n = listener.try_recv() => n,
                };
                match next {
                    Ok(Some(n)) => {
                        if let Ok(id) = n.payload().parse::<Uuid>() {
                            let _ = out.send(id);
                        }
                    }
                    Ok(None) => {
                        tracing::warn!("instance notifications: connection lost; reconnecting");
                        let _ = out.send(Uuid::nil());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "instance notifications failed; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        let _ = out.send(Uuid::nil());
                    }
                }
            }
        });
        Ok(events)
    }

    /// A receiver of every notification from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.sender.subscribe()
    }
}

/// Whether token `token_id` no longer lets its holder in. A database error counts as "not
/// known to be revoked": the check runs again, and the stream cannot send anything new
/// without the database either.
async fn token_revoked(pool: &PgPool, token_id: i64) -> bool {
    let valid = match pool.acquire().await {
        Ok(mut c) => token_still_valid(&mut c, token_id).await,
        Err(e) => Err(StoreError::from(e)),
    };
    match valid {
        Ok(valid) => !valid,
        Err(e) => {
            tracing::debug!(error = %e, token_id, "cannot check a watcher's token now");
            false
        }
    }
}

/// What one watcher follows: the resource as first read, and how the service shows it.
pub struct Follow<F> {
    /// The database.
    pub pool: PgPool,
    /// Change notifications, subscribed to before `first` was read (so none is missed).
    pub changes: broadcast::Receiver<Uuid>,
    /// Ends the stream with `UNAVAILABLE` when the server stops.
    pub shutdown: CancellationToken,
    /// The caller's token, checked again as often as a unary call would check it.
    pub token_id: i64,
    /// The tenant's watch slot, held while the stream is open.
    pub slot: WatchSlot,
    /// The resource as first read.
    pub first: InstanceRow,
    /// The resource as the service answers it (an `Instance` or a `Resource`).
    pub view: F,
}

/// Streams the followed resource: its first state, then each state that differs from the
/// last one sent, until it is deleted, the client goes, its token is revoked or the server
/// stops. The stream's end (the client's cancel included) frees the slot.
pub fn follow<T, F>(f: Follow<F>) -> ReceiverStream<Result<T, Status>>
where
    T: Clone + PartialEq + Send + 'static,
    F: Fn(&InstanceRow) -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<T, Status>>(16);
    tokio::spawn(async move {
        let Follow {
            pool,
            mut changes,
            shutdown,
            token_id,
            slot,
            first,
            view,
        } = f;
        let _slot = slot;
        let id = first.id;
        let mut last = view(&first);
        if tx.send(Ok(last.clone())).await.is_err() {
            return;
        }
        let mut recheck =
            tokio::time::interval_at(tokio::time::Instant::now() + CACHE_TTL, CACHE_TTL);
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return,
                _ = shutdown.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("the server is shutting down; watch again"))).await;
                    return;
                }
                _ = recheck.tick() => {
                    if token_revoked(&pool, token_id).await {
                        let e = ApiError::Unauthenticated("token revoked or expired: watch again with a valid token");
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                    continue;
                }
                n = changes.recv() => n,
            };
            match next {
                Ok(changed) if changed == id || changed.is_nil() => {}
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
            let row = match pool.acquire().await {
                Ok(mut c) => instance_get_by_id(&mut c, id).await,
                Err(e) => Err(StoreError::from(e)),
            };
            match row {
                Ok(Some(row)) => {
                    let now = view(&row);
                    if now != last {
                        last = now.clone();
                        if tx.send(Ok(now)).await.is_err() {
                            return;
                        }
                    }
                    if row.deleted_at.is_some() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(ApiError::from(e).into())).await;
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
