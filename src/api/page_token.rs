//! Page tokens of the List calls, bound to the listing they came from.
//!
//! A token carries the cursor (where its page ended) and a digest of the listing's *scope*:
//! the call, the caller's tenant where the listing is a tenant's, and every filter. A token is
//! accepted only by a request of the same scope, so another tenant's token, or a token of the
//! same tenant's listing with another filter, is refused (`INVALID_ARGUMENT` on `page_token`)
//! instead of silently paging through something else.
//!
//! Tokens are opaque to clients (URL-safe base64) but not secret and not signed: a client
//! that crafts one for its own scope can only start its listing somewhere else in a list it
//! may read anyway. The digest is there to catch a token used in the wrong listing.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// The version byte of the current token format.
const VERSION: u8 = 2;
/// Bytes of the scope digest a token carries.
const DIGEST_BYTES: usize = 12;
/// Longest page token accepted (characters); the tokens the server makes are far shorter.
pub const MAX_PAGE_TOKEN_CHARS: usize = 512;

/// The scope of a listing: the call and the values it is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope([u8; DIGEST_BYTES]);

impl Scope {
    /// The scope of call `listing` with `parts` (the tenant, the filters), in order.
    pub fn new(listing: &str, parts: &[&str]) -> Self {
        let mut h = Sha256::new();
        // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
        for part in std::iter::once(listing).chain(parts.iter().copied()) {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        let digest = h.finalize();
        let mut out = [0; DIGEST_BYTES];
        out.copy_from_slice(&digest[..DIGEST_BYTES]);
        Self(out)
    }
}

/// A token for the page after `cursor` in `scope`.
pub fn encode(scope: &Scope, cursor: &str) -> String {
    let mut raw = Vec::with_capacity(1 + DIGEST_BYTES + cursor.len());
    raw.push(VERSION);
    raw.extend_from_slice(&scope.0);
    raw.extend_from_slice(cursor.as_bytes());
    URL_SAFE_NO_PAD.encode(raw)
}

/// The cursor of `token`, when it is a token of `scope` (`None` for anything else: another
/// scope, another format, not base64, too long).
pub fn decode(scope: &Scope, token: &str) -> Option<String> {
    if token.len() > MAX_PAGE_TOKEN_CHARS {
        return None;
    }
    let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
    let (head, cursor) = raw.split_at_checked(1 + DIGEST_BYTES)?;
    if head[0] != VERSION || head[1..] != scope.0 {
        return None;
    }
    String::from_utf8(cursor.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_works_only_in_its_own_scope() {
        let acme = Scope::new("ListInstances", &["acme", "0"]);
        let t = encode(&acme, "web-1");
        assert_eq!(decode(&acme, &t).as_deref(), Some("web-1"));
        for other in [
            Scope::new("ListInstances", &["globex", "0"]),
            Scope::new("ListInstances", &["acme", "2"]),
            Scope::new("ListWork", &["acme", "0"]),
            Scope::new("ListInstances", &["acm", "e0"]),
        ] {
            assert_eq!(decode(&other, &t), None);
        }
        for junk in ["", "zz", "\0", &"A".repeat(600), "djEKMAp3ZWItMQ"] {
            assert_eq!(decode(&acme, junk), None, "{junk:?}");
        }
        assert!(
            t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }
}
