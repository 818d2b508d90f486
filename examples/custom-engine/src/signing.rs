//! The body's signature and the idempotency key: what the endpoint checks.
//!
//! Every POST carries `X-Setpoint-Signature: sha256=<hex>`, the HMAC-SHA256 of the exact body
//! bytes under the shared secret, and `Idempotency-Key`, derived from the unit's token. A
//! receiver verifies the signature before it trusts the body ([`verify`]) and keeps the keys it
//! has processed, so a retry (which carries the same key and the same body) is recognised as
//! the notification it already has.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use setpoint_adapter::IdempotencyToken;
use sha2::Sha256;

/// The header of the body's signature.
pub const SIGNATURE_HEADER: &str = "X-Setpoint-Signature";
/// The header of the idempotency key.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// The shared signing secret, kept as the keyed HMAC state. Its bytes are never shown:
/// `Debug` prints `Secret(***)`, and it has no `Display`.
#[derive(Clone)]
pub struct Secret(Hmac<Sha256>);

/// Why bytes cannot be a signing secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Fewer bytes than [`Secret::MIN_LEN`] (the message never shows them).
    #[error("the signing secret is {0} bytes long; it needs at least {min}", min = Secret::MIN_LEN)]
    TooShort(usize),
}

impl Secret {
    /// The shortest secret accepted: 16 bytes (128 bits, if they are random).
    pub const MIN_LEN: usize = 16;

    /// A secret of these bytes.
    ///
    /// # Errors
    /// [`SecretError::TooShort`] under [`Secret::MIN_LEN`] bytes.
    pub fn new(bytes: &[u8]) -> Result<Self, SecretError> {
        if bytes.len() < Self::MIN_LEN {
            return Err(SecretError::TooShort(bytes.len()));
        }
        // HMAC takes keys of any length (a long one is hashed first), so only a short key is
        // refused, by us, above.
        <Hmac<Sha256> as KeyInit>::new_from_slice(bytes)
            .map(Self)
            .map_err(|_| SecretError::TooShort(bytes.len()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The value of [`SIGNATURE_HEADER`] for `body`: `sha256=` and the HMAC-SHA256 in lower-case hex.
pub fn sign(secret: &Secret, body: &[u8]) -> String {
    let mut m = secret.0.clone();
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

/// True when `header` is the signature of `body` under `secret` (compared in constant time):
/// what a receiver checks before it trusts a notification.
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(given) = header
        .strip_prefix("sha256=")
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    let Ok(mut m) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret) else {
        return false;
    };
    m.update(body);
    m.verify_slice(&given).is_ok()
}

/// The `Idempotency-Key` of the unit holding `token`: the same for every attempt of the unit,
/// different for every unit. Derived rather than the token itself, so that the key names this
/// side effect only (another side effect of the same unit would derive its own).
pub fn idempotency_key(token: &IdempotencyToken) -> IdempotencyToken {
    token.derive(crate::notify::KIND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_body_and_secret() {
        let secret = Secret::new(b"0123456789abcdef").expect("16 bytes");
        assert!(Secret::new(b"short").is_err());
        let sig = sign(&secret, b"{\"a\":1}");
        assert!(verify(b"0123456789abcdef", b"{\"a\":1}", &sig));
        assert!(!verify(b"0123456789abcdef", b"{\"a\":2}", &sig));
        assert!(!verify(b"another-secret!!", b"{\"a\":1}", &sig));
        assert!(!verify(b"0123456789abcdef", b"{\"a\":1}", "sha256=zz"));
        assert_eq!(format!("{secret:?}"), "Secret(***)");
    }

    #[test]
    fn the_key_is_stable_per_token_and_differs_between_tokens() {
        let a = IdempotencyToken::parse("unit-a").expect("token");
        let b = IdempotencyToken::parse("unit-b").expect("token");
        assert_eq!(idempotency_key(&a), idempotency_key(&a));
        assert_ne!(idempotency_key(&a), idempotency_key(&b));
        assert_ne!(idempotency_key(&a), a);
    }
}
