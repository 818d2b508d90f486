//! The web console: resources and work in a browser, on an HTTP listener of its own
//! (`--console-listen`, `[console] listen`; off by default in `setpoint serve`, on in
//! `setpoint dev`). See `docs/console.md`.
//!
//! The console is a client of the engine's own gRPC API: every page calls the services through
//! the API's gate in-process ([`crate::api::InProcessApi`]) with the signed-in user's token, so
//! validation, tenancy, admin rules, request ids and the curated messages tenants read are
//! exactly the API's. It has no SQL of its own.
//!
//! # Layout
//! - [`server`]: the listener (plain HTTP, or HTTPS with the API's TLS material) and its
//!   shutdown.
//! - [`routes`]: the pages and forms.
//! - [`session`]: server-side sessions: a random id in a cookie, mapped in memory to the API
//!   token it signed in with.
//! - [`csrf`]: the per-session token every form carries, and the sign-in form's own.
//! - [`client`]: typed calls of the API with a session's token; errors as a person reads them.
//! - [`forms`]: create and update forms generated from a kind's JSON Schema.
//! - [`live`]: server-sent events of resource changes, fed by the Watch feed.
//! - [`views`]: the templates (askama, escaped by default) and what they show.
//! - [`assets`]: the style sheet and script, part of the binary.

pub mod assets;
pub mod client;
pub mod csrf;
pub mod forms;
pub mod live;
pub mod routes;
pub mod server;
pub mod session;
pub mod views;

use std::time::Duration;

pub use server::{ConsoleError, RunningConsole, start};

/// Default [`ConsoleConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(8 * 3600);
/// Default [`ConsoleConfig::max_sessions`].
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;

/// The console's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// A session unused this long ends (the user signs in again).
    pub idle_timeout: Duration,
    /// Most sessions kept at once; beyond it the least recently used one ends.
    pub max_sessions: usize,
    /// Serve plain HTTP even when the API serves TLS (behind a load balancer that ends TLS).
    /// The session cookie then still carries `Secure` when `secure_cookies` says so.
    pub plaintext: bool,
    /// Mark the session cookie `Secure` (always true when the console serves TLS itself).
    pub secure_cookies: bool,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_sessions: DEFAULT_MAX_SESSIONS,
            plaintext: false,
            secure_cookies: false,
        }
    }
}
