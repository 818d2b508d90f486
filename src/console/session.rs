//! Server-side sessions. Signing in with an API token makes a session: a random id (256 bits)
//! goes to the browser in a cookie (`HttpOnly; SameSite=Strict; Path=/`, and `Secure` with
//! the `__Host-` prefix over TLS), and the token stays here, in memory, never in a page or a
//! URL. A restart of the engine therefore signs everyone out; several engines behind a load
//! balancer need sticky sessions (see `docs/console.md`).
//!
//! A session is only a handle on its token: every request authenticates the token again
//! through the API's authenticator, so a revoked or expired token ends the session at its next
//! request. Sessions also end when unused for the idle timeout, and the least recently used
//! one ends when the store is full.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::csrf;

/// The cookie's name over plain HTTP.
pub const COOKIE: &str = "setpoint_session";
/// The cookie's name over HTTPS: the `__Host-` prefix makes the browser refuse it unless it is
/// `Secure`, has `Path=/` and no `Domain`, so no other site or subdomain can set it.
pub const SECURE_COOKIE: &str = "__Host-setpoint_session";

/// One signed-in browser.
#[derive(Clone)]
pub struct Session {
    /// The API token it signed in with.
    pub token: String,
    /// The token every form of this session carries.
    pub csrf: String,
    last_used: Instant,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the token nor the CSRF token is ever printed.
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

/// The sessions of one console.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<String, Session>>>,
    idle: Duration,
    max: usize,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("idle", &self.idle)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// An empty store: sessions end after `idle` unused; at most `max` at once.
    pub fn new(idle: Duration, max: usize) -> Self {
        Self {
            inner: Arc::default(),
            idle,
            max: max.max(1),
        }
    }

    /// Makes a session for `token`; returns its id (for the cookie).
    pub fn create(&self, token: String) -> String {
        let id = csrf::random_token();
        let session = Session {
            token,
            csrf: csrf::random_token(),
            last_used: Instant::now(),
        };
        let mut map = self.lock();
        let now = Instant::now();
        map.retain(|_, s| now.duration_since(s.last_used) < self.idle);
        while map.len() >= self.max {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(id.clone(), session);
        id
    }

    /// The session `id`, if it exists and has not been idle too long; marks it used.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.lock();
        let now = Instant::now();
        let expired = map
            .get(id)
            .is_some_and(|s| now.duration_since(s.last_used) >= self.idle);
        if expired {
            map.remove(id);
            return None;
        }
        let s = map.get_mut(id)?;
        s.last_used = now;
        Some(s.clone())
    }

    /// Ends session `id` (sign-out, or its token no longer works).
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// How many sessions there are.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding the lock leaves the map as it was: still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The value of cookie `name` in a `Cookie` request header, if present.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|part| part.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// A `Set-Cookie` value for `name=value` with the console's flags; `max_age` 0 deletes it.
pub fn set_cookie(name: &str, value: &str, secure: bool, max_age: Option<u64>) -> String {
    let mut c = format!("{name}={value}; HttpOnly; SameSite=Strict; Path=/");
    if secure {
        c.push_str("; Secure");
    }
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={age}"));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_when_idle_or_evicted_and_never_print_their_token() {
        let s = Sessions::new(Duration::from_secs(60), 2);
        let a = s.create("spt_a".into());
        let b = s.create("spt_b".into());
        assert_eq!(s.get(&a).map(|x| x.token), Some("spt_a".into()));
        // `b` is now the least recently used: a third session evicts it.
        let c = s.create("spt_c".into());
        assert!(s.get(&b).is_none());
        assert!(s.get(&a).is_some() && s.get(&c).is_some());
        assert!(!format!("{:?}", s.get(&a)).contains("spt_a"));
        s.remove(&a);
        assert!(s.get(&a).is_none());
        let idle = Sessions::new(Duration::ZERO, 2);
        let d = idle.create("spt_d".into());
        assert!(idle.get(&d).is_none());
    }

    #[test]
    fn cookies_are_found_by_name_and_set_with_every_flag() {
        let h = "a=1; setpoint_session=abc; b=2";
        assert_eq!(cookie(h, COOKIE), Some("abc"));
        assert_eq!(cookie(h, "x"), None);
        assert_eq!(
            set_cookie(SECURE_COOKIE, "v", true, None),
            "__Host-setpoint_session=v; HttpOnly; SameSite=Strict; Path=/; Secure"
        );
        assert!(set_cookie(COOKIE, "", false, Some(0)).ends_with("Max-Age=0"));
    }
}
