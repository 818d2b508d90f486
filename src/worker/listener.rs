//! LISTEN for "work enqueued" notifications and wake the fetcher. Notifications only save
//! latency: the fetcher also polls, so a notification lost while the connection was down costs
//! at most one poll interval.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::work::WORK_CHANNEL;

/// Runs until `shutdown`, waking `wake` on every notification and after every reconnect.
pub async fn run(pool: PgPool, wake: Arc<Notify>, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the LISTEN connection; retrying");
                sleep_or_cancel(delay, &shutdown).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(e) = listener.listen(WORK_CHANNEL).await {
            tracing::warn!(error = %e, "LISTEN failed; retrying");
            sleep_or_cancel(delay, &shutdown).await;
            delay = (delay * 2).min(Duration::from_secs(5));
            continue;
        }
        delay = Duration::from_millis(100);
        // Whatever was notified while we were not listening: look now.
        wake.notify_one();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                n = listener.try_recv() => match n {
                    Ok(Some(_)) => wake.notify_one(),
                    Ok(None) => {
                        // The connection was lost; sqlx reconnects on the next call.
                        tracing::debug!("LISTEN connection lost; reconnecting");
                        wake.notify_one();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                        break;
                    }
                }
            }
        }
        sleep_or_cancel(delay, &shutdown).await;
    }
}

async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.cancelled() => {}
    }
}
