//! The engine's row in `engines`: registered at start, renewed while it runs, marked stopped
//! at shutdown. Other engines and the API read it to know what is served.

use std::time::Duration;

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::store::StoreError;
use crate::store::engines::{EngineRecord, engine_heartbeat, engine_register, engine_stopped};

/// How often the engine says it is alive (well under [`crate::store::engines::LIVE_FOR_SECS`]).
const BEAT: Duration = Duration::from_secs(10);

/// Registers `record`, then renews it every few seconds until `shutdown`, then marks it
/// stopped.
///
/// # Errors
/// When the first registration fails.
pub async fn start(
    pool: PgPool,
    record: EngineRecord,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, StoreError> {
    {
        let mut conn = pool.acquire().await?;
        engine_register(&mut conn, &record).await?;
    }
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(BEAT) => {}
            }
            let beat = async {
                let mut conn = pool.acquire().await?;
                if !engine_heartbeat(&mut conn, &record.id).await? {
                    engine_register(&mut conn, &record).await?;
                }
                Ok::<_, StoreError>(())
            };
            if let Err(e) = beat.await {
                tracing::warn!(error = %e, "cannot renew this engine's registration; retrying");
            }
        }
        let stopped = async {
            let mut conn = pool.acquire().await?;
            engine_stopped(&mut conn, &record.id).await
        };
        if let Err(e) = stopped.await {
            tracing::debug!(error = %e, "cannot mark this engine stopped; it expires by itself");
        }
    }))
}
