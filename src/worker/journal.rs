//! The durable at-most-once journal handed to adapters, on PostgreSQL.

use serde_json::Value;
use setpoint_adapter::{AdapterError, Begun, BoxFuture, Journal};
use sqlx::PgPool;

use crate::store::journal::{SideEffectState, side_effect_begin, side_effect_finish};

/// A [`Journal`] whose records are committed to the `side_effects` table before `begin`
/// returns, so they survive a crash of the engine between a side effect and its completion.
pub struct PgJournal {
    pool: PgPool,
    work_id: i64,
    token: String,
}

impl PgJournal {
    /// A journal writing on behalf of unit `work_id`.
    pub fn new(pool: PgPool, work_id: i64, token: String) -> Self {
        Self {
            pool,
            work_id,
            token,
        }
    }
}

fn db_error(e: crate::store::StoreError) -> AdapterError {
    AdapterError::transient(format!("the side-effect journal is unavailable: {e}"))
        .with_code("journal-unavailable")
}

impl Journal for PgJournal {
    fn begin<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Begun, AdapterError>> {
        Box::pin(async move {
            Ok(
                match side_effect_begin(&self.pool, key, self.work_id, &self.token)
                    .await
                    .map_err(db_error)?
                {
                    SideEffectState::Fresh => Begun::Fresh,
                    SideEffectState::Started => Begun::Unknown,
                    SideEffectState::Finished(v) => Begun::Finished(v),
                },
            )
        })
    }

    fn finish<'a>(
        &'a self,
        key: &'a str,
        result: &'a Value,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            side_effect_finish(&self.pool, key, result)
                .await
                .map_err(db_error)
        })
    }
}
