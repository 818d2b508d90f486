//! Cross-site request forgery: every form carries a token that another site cannot know, and
//! every POST is refused unless it brings the right one.
//!
//! - A signed-in session has its own token ([`super::session::Session::csrf`]), put into each
//!   form it is shown and compared on each POST.
//! - The sign-in form has no session yet: it uses a double-submit token instead, a random value
//!   in a cookie of its own (`HttpOnly; SameSite=Strict`) and in the form, which must match.
//!   This stops another site from signing a browser in with the attacker's token.
//!
//! The `SameSite=Strict` cookies already keep other sites' POSTs from carrying a session; the
//! token is the second lock, and a POST whose `Origin` header names another origin is refused
//! as well ([`super::routes`]).

/// The sign-in form's cookie over plain HTTP.
pub const SIGN_IN_COOKIE: &str = "setpoint_sign_in";
/// The sign-in form's cookie over HTTPS (see [`super::session::SECURE_COOKIE`]).
pub const SECURE_SIGN_IN_COOKIE: &str = "__Host-setpoint_sign_in";

/// A new random token: 256 bits as 64 hex digits, from the thread's CSPRNG (seeded by the OS).
pub fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Whether `given` is `expected`, in time that does not depend on where they differ. An empty
/// `expected` matches nothing.
pub fn matches(expected: &str, given: &str) -> bool {
    if expected.is_empty() || expected.len() != given.len() {
        return false;
    }
    expected
        .bytes()
        .zip(given.bytes())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_compared_whole() {
        let a = random_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, random_token());
        assert!(matches(&a, &a.clone()));
        assert!(!matches(&a, &a[..63]));
        assert!(!matches(&a, &random_token()));
        assert!(!matches("", ""));
    }
}
