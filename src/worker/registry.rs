//! Which handler runs which kind of work.

use std::collections::BTreeMap;
use std::sync::Arc;

use setpoint_adapter::Handler;

/// The handlers an engine process runs, keyed by work kind. Built once at start-up; a
/// platform team registers its own adapters' handlers here without editing the engine.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Arc<dyn Handler>>,
}

/// Two handlers claimed the same kind.
#[derive(Debug, thiserror::Error)]
#[error("a handler for work kind {0:?} is already registered")]
pub struct DuplicateKind(pub String);

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` under its kind.
    ///
    /// # Errors
    /// When another handler already serves that kind.
    pub fn register(&mut self, handler: impl Handler) -> Result<&mut Self, DuplicateKind> {
        self.register_arc(Arc::new(handler))
    }

    /// Registers a shared handler under its kind.
    ///
    /// # Errors
    /// When another handler already serves that kind.
    pub fn register_arc(&mut self, handler: Arc<dyn Handler>) -> Result<&mut Self, DuplicateKind> {
        let kind = handler.kind().to_owned();
        if self.handlers.contains_key(&kind) {
            return Err(DuplicateKind(kind));
        }
        self.handlers.insert(kind, handler);
        Ok(self)
    }

    /// The handler for `kind`.
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Handler>> {
        self.handlers.get(kind)
    }

    /// The registered kinds, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        self.handlers.keys().map(String::as_str).collect()
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds())
            .finish()
    }
}
