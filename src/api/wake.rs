//! Waking the workers after the API committed new work, coalesced.
//!
//! The API enqueues units without a NOTIFY in the request's transaction (a transaction that
//! has sent a NOTIFY holds a database-wide lock through its commit's disk flush, so such
//! commits cannot share a flush). It wakes the workers after the commit instead, with a NOTIFY
//! in a transaction of its own, and that NOTIFY is serialized in the same way. So the
//! [`WorkerWaker`] sends at most one at a time: wake-ups asked for while one is on its way
//! fold into a single next one, sent on a connection the waker keeps. Workers also poll, so a
//! lost wake-up only costs latency.

use sqlx::PgPool;
use tokio::sync::mpsc;

use crate::queue;
use crate::store;

/// Wakes the workers of every engine process, at most one NOTIFY in flight.
#[derive(Debug, Clone)]
pub struct WorkerWaker {
    /// Holds at most one wake-up not yet started; more asks fold into it.
    wanted: mpsc::Sender<()>,
}

impl WorkerWaker {
    /// Starts the waking task, which opens a connection of its own with `pool`'s settings when
    /// it first needs one (and again after a failure); it ends when the last clone of the waker
    /// is dropped.
    pub fn start(pool: PgPool) -> Self {
        let (wanted, mut asks) = mpsc::channel::<()>(1);
        tokio::spawn(async move {
            let mut conn = None;
            while asks.recv().await.is_some() {
                let woke = match &mut conn {
                    Some(c) => queue::wake_workers_on(c).await,
                    None => match store::connect_dedicated(&pool).await {
                        Ok(c) => queue::wake_workers_on(conn.insert(c)).await,
                        Err(e) => Err(e.into()),
                    },
                };
                if let Err(e) = woke {
                    conn = None;
                    tracing::debug!(error = %e, "waking workers failed; they will poll");
                }
            }
        });
        Self { wanted }
    }

    /// Asks for a wake-up: one NOTIFY soon, shared with every other ask until it is sent.
    pub fn wake(&self) {
        // A full channel means a wake-up is already due; it will see this commit too.
        let _ = self.wanted.try_send(());
    }
}
