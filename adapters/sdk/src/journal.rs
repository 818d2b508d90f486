//! At-most-once records for side effects that no peer makes idempotent (plain SMTP).
//!
//! A record goes through three states, keyed by a string the adapter derives from its token:
//! absent, *started* ([`Journal::begin`], committed before the side effect) and *finished*
//! ([`Journal::finish`], with the result). [`Journal::look`] reads a record without changing
//! it, so an adapter can find out what earlier attempts did and open its own record only at the
//! last moment, immediately before the side effect: a failure before that moment leaves no
//! record behind, and so no "outcome unknown" for something that certainly did not happen.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;

use crate::error::AdapterError;
use crate::handler::BoxFuture;

/// What the journal knew about a side effect when [`Journal::begin`] was called.
#[derive(Debug, Clone, PartialEq)]
pub enum Begun {
    /// No earlier attempt: the start is now recorded durably and the caller may act.
    Fresh,
    /// An earlier attempt started and recorded no result: it may or may not have taken effect.
    /// The caller must not act again; it should report "outcome unknown" (a permanent error).
    Unknown,
    /// An earlier attempt finished with this result: the caller must not act again and may
    /// reuse the result.
    Finished(Value),
}

/// What the journal holds for a side effect, as [`Journal::look`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// No attempt has begun it.
    Absent,
    /// An attempt began it and recorded no result (it may or may not have taken effect, or it
    /// is taking effect right now).
    Started,
    /// An attempt finished it with this result.
    Finished(Value),
}

/// A durable record of side effects, keyed by a string the adapter derives from its token.
///
/// [`Journal::begin`] commits "attempt started" *before* it returns, outside the unit's
/// completion transaction: that is what makes a crash between the side effect and the
/// completion detectable on retry. Call it as late as possible — after everything that can
/// fail without the side effect having happened (connecting, authenticating, the peer's checks)
/// and after [`crate::Fence::check`] — so that an attempt that fails or dies before acting
/// leaves no open record.
pub trait Journal: Send + Sync {
    /// Reads what the journal holds for `key`. Changes nothing, so it may be called any number
    /// of times, by any attempt; what it returns may be out of date by the time the caller
    /// acts on it (a concurrent attempt may begin the key), which is why acting still needs a
    /// [`Journal::begin`] that returns [`Begun::Fresh`].
    fn look<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Entry, AdapterError>>;
    /// Records that the side effect `key` is about to start, unless it was recorded before.
    fn begin<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Begun, AdapterError>>;
    /// Records the result of the side effect `key`.
    fn finish<'a>(
        &'a self,
        key: &'a str,
        result: &'a Value,
    ) -> BoxFuture<'a, Result<(), AdapterError>>;
}

/// A journal in memory, for adapter unit tests. It forgets everything with the process, so it
/// gives no at-most-once guarantee across crashes; the engine supplies a durable one.
#[derive(Debug, Default)]
pub struct MemoryJournal {
    entries: Mutex<HashMap<String, Option<Value>>>,
}

impl MemoryJournal {
    fn entries(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, HashMap<String, Option<Value>>>, AdapterError> {
        self.entries
            .lock()
            .map_err(|_| AdapterError::transient("journal lock poisoned"))
    }
}

impl Journal for MemoryJournal {
    fn look<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Entry, AdapterError>> {
        Box::pin(async move {
            Ok(match self.entries()?.get(key) {
                None => Entry::Absent,
                Some(None) => Entry::Started,
                Some(Some(v)) => Entry::Finished(v.clone()),
            })
        })
    }

    fn begin<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Begun, AdapterError>> {
        Box::pin(async move {
            let mut entries = self.entries()?;
            Ok(match entries.get(key) {
                None => {
                    entries.insert(key.to_owned(), None);
                    Begun::Fresh
                }
                Some(None) => Begun::Unknown,
                Some(Some(v)) => Begun::Finished(v.clone()),
            })
        })
    }

    fn finish<'a>(
        &'a self,
        key: &'a str,
        result: &'a Value,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            self.entries()?.insert(key.to_owned(), Some(result.clone()));
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn look_reads_every_state_and_changes_nothing() {
        let j = MemoryJournal::default();
        assert_eq!(j.look("k").await.unwrap(), Entry::Absent);
        assert_eq!(
            j.look("k").await.unwrap(),
            Entry::Absent,
            "looking opens nothing"
        );
        assert_eq!(j.begin("k").await.unwrap(), Begun::Fresh);
        assert_eq!(j.look("k").await.unwrap(), Entry::Started);
        j.finish("k", &json!({"sent": true})).await.unwrap();
        assert_eq!(
            j.look("k").await.unwrap(),
            Entry::Finished(json!({"sent": true}))
        );
        assert_eq!(
            j.begin("k").await.unwrap(),
            Begun::Finished(json!({"sent": true}))
        );
    }
}
