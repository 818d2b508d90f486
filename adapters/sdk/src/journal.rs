//! At-most-once records for side effects that no peer makes idempotent (plain SMTP).

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

/// A durable record of side effects, keyed by a string the adapter derives from its token.
///
/// [`Journal::begin`] commits "attempt started" *before* it returns, outside the unit's
/// completion transaction: that is what makes a crash between the side effect and the
/// completion detectable on retry.
pub trait Journal: Send + Sync {
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

impl Journal for MemoryJournal {
    fn begin<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Begun, AdapterError>> {
        Box::pin(async move {
            let mut entries = self
                .entries
                .lock()
                .map_err(|_| AdapterError::transient("journal lock poisoned"))?;
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
            self.entries
                .lock()
                .map_err(|_| AdapterError::transient("journal lock poisoned"))?
                .insert(key.to_owned(), Some(result.clone()));
            Ok(())
        })
    }
}
