//! The durable at-most-once journal handed to adapters, on PostgreSQL.

use serde_json::Value;
use setpoint_adapter::{AdapterError, Begun, BoxFuture, CODE_LEASE_LOST, Entry, Journal};
use sqlx::PgPool;

use crate::store::journal::{
    Holder, SideEffectRecord, SideEffectState, side_effect_begin, side_effect_find,
    side_effect_finish,
};

/// A [`Journal`] whose records are committed to the `side_effects` table before `begin`
/// returns, so they survive a crash of the engine between a side effect and its completion.
/// `begin` is fenced by the unit's lease: an attempt that lost its unit cannot open a record.
pub struct PgJournal {
    pool: PgPool,
    work_id: i64,
    attempt: i32,
    worker: String,
    token: String,
}

impl PgJournal {
    /// A journal writing on behalf of attempt `attempt` of unit `work_id`, leased by `worker`.
    pub fn new(pool: PgPool, work_id: i64, attempt: i32, worker: String, token: String) -> Self {
        Self {
            pool,
            work_id,
            attempt,
            worker,
            token,
        }
    }
}

fn db_error(e: crate::store::StoreError) -> AdapterError {
    AdapterError::transient(format!("the side-effect journal is unavailable: {e}"))
        .with_code("journal-unavailable")
}

impl Journal for PgJournal {
    fn look<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Entry, AdapterError>> {
        Box::pin(async move {
            Ok(
                match side_effect_find(&self.pool, key).await.map_err(db_error)? {
                    None => Entry::Absent,
                    Some(SideEffectRecord::Started) => Entry::Started,
                    Some(SideEffectRecord::Finished(v)) => Entry::Finished(v),
                },
            )
        })
    }

    fn begin<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Begun, AdapterError>> {
        Box::pin(async move {
            Ok(
                match side_effect_begin(
                    &self.pool,
                    key,
                    Holder {
                        work_id: self.work_id,
                        attempt: self.attempt,
                        worker: &self.worker,
                        token: &self.token,
                    },
                )
                .await
                .map_err(db_error)?
                {
                    SideEffectState::Fresh => Begun::Fresh,
                    SideEffectState::Started => Begun::Unknown,
                    SideEffectState::Finished(v) => Begun::Finished(v),
                    SideEffectState::NotHeld => {
                        return Err(AdapterError::transient(
                            "this attempt no longer holds its unit; it records and sends nothing",
                        )
                        .with_code(CODE_LEASE_LOST));
                    }
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::dev::testdb::test_db;

    #[tokio::test]
    async fn look_reads_what_begin_and_finish_wrote_and_writes_nothing() {
        let db = test_db().await.expect("test database");
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO work (kind, spec, token, attempt, lease_owner, lease_expires_at)
             VALUES ('t', '{}', 'tok', 1, 'w', now() + interval '1 hour') RETURNING id",
        )
        .fetch_one(&db.pool)
        .await
        .expect("unit");
        let journal = PgJournal::new(db.pool.clone(), id, 1, "w".into(), "tok".into());
        let rows = || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM side_effects")
                .fetch_one(&db.pool)
                .await
                .expect("count")
        };

        assert_eq!(journal.look("email:tok:1").await.unwrap(), Entry::Absent);
        assert_eq!(rows().await, 0, "looking opens no record");

        assert_eq!(journal.begin("email:tok:1").await.unwrap(), Begun::Fresh);
        assert_eq!(journal.look("email:tok:1").await.unwrap(), Entry::Started);
        assert_eq!(journal.begin("email:tok:1").await.unwrap(), Begun::Unknown);

        let sent = json!({"sent": true, "message_id": "<tok@x>"});
        journal.finish("email:tok:1", &sent).await.unwrap();
        assert_eq!(
            journal.look("email:tok:1").await.unwrap(),
            Entry::Finished(sent.clone())
        );
        assert_eq!(
            journal.begin("email:tok:1").await.unwrap(),
            Begun::Finished(sent)
        );
        assert_eq!(journal.look("email:tok:2").await.unwrap(), Entry::Absent);
        assert_eq!(rows().await, 1);

        // Another attempt took the unit over: this one can open nothing more.
        sqlx::query("UPDATE work SET attempt = 2, lease_owner = 'other' WHERE id = $1")
            .bind(id)
            .execute(&db.pool)
            .await
            .expect("takeover");
        let err = journal.begin("email:tok:2").await.unwrap_err();
        assert_eq!(err.code.as_deref(), Some(CODE_LEASE_LOST));
        assert_eq!(journal.look("email:tok:2").await.unwrap(), Entry::Absent);
        // What is recorded is still read as it is.
        assert!(matches!(
            journal.begin("email:tok:1").await.unwrap(),
            Begun::Finished(_)
        ));
    }
}
