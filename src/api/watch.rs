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
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::StoreError;
use crate::store::instances::INSTANCE_CHANNEL;

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
