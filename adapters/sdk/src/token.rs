//! Idempotency tokens: the identity of a unit of work that every adapter call carries.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The longest token accepted, in bytes (EC2 `ClientToken` takes at most 64 ASCII characters).
pub const MAX_TOKEN_LEN: usize = 64;

/// An idempotency token: 1 to 64 characters from `[A-Za-z0-9._-]`.
///
/// A token is made once, when its unit of work is enqueued, and never changes across retries.
/// The character set is the intersection of what EC2 client tokens, EC2 tag values, Kubernetes
/// label values and e-mail `Message-ID` local parts accept, so an adapter can use it verbatim.
/// Tokens are not secrets: they may be logged.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdempotencyToken(String);

/// Why a string is not a valid [`IdempotencyToken`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The string is empty.
    #[error("an idempotency token must not be empty")]
    Empty,
    /// The string is longer than [`MAX_TOKEN_LEN`].
    #[error("an idempotency token has at most {MAX_TOKEN_LEN} characters, this one has {0}")]
    TooLong(usize),
    /// The string holds a character outside `[A-Za-z0-9._-]`.
    #[error("an idempotency token may only hold A-Z, a-z, 0-9, '.', '_' and '-' (found {0:?})")]
    BadCharacter(char),
}

impl IdempotencyToken {
    /// A fresh token (32 lowercase hex digits), unique with overwhelming probability: 12
    /// digits of milliseconds since the Unix epoch, then 20 random digits (80 random bits).
    pub fn generate() -> Self {
        // Time-ordered rather than fully random (the layout of a UUIDv7): the unique index on
        // tokens then grows at its right edge like the id index, instead of writing into a
        // random page of a large index for every enqueued unit.
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let random = uuid::Uuid::new_v4().simple().to_string();
        Self(format!(
            "{:012x}{}",
            millis & 0xffff_ffff_ffff,
            &random[..20]
        ))
    }

    /// Validates `s` as a token.
    pub fn parse(s: impl Into<String>) -> Result<Self, TokenError> {
        let s = s.into();
        if s.is_empty() {
            return Err(TokenError::Empty);
        }
        if s.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong(s.chars().count()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(TokenError::BadCharacter(c));
        }
        Ok(Self(s))
    }

    /// The token of the follow-up step `step` of the unit holding this token.
    ///
    /// The same parent and step always give the same token, and different steps give different
    /// tokens, so a parent that completes twice cannot enqueue its follow-up twice (tokens are
    /// unique in the work table).
    pub fn derive(&self, step: &str) -> Self {
        let mut hash = Sha256::new();
        hash.update(self.0.as_bytes());
        hash.update([0u8]);
        hash.update(step.as_bytes());
        let digest = hash.finalize();
        let mut out = String::with_capacity(32);
        for byte in &digest[..16] {
            out.push_str(&format!("{byte:02x}"));
        }
        Self(out)
    }

    /// The token as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for IdempotencyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyToken({})", self.0)
    }
}

impl TryFrom<String> for IdempotencyToken {
    type Error = TokenError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<IdempotencyToken> for String {
    fn from(t: IdempotencyToken) -> Self {
        t.0
    }
}

impl std::str::FromStr for IdempotencyToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_valid_and_distinct() {
        let a = IdempotencyToken::generate();
        let b = IdempotencyToken::generate();
        assert_ne!(a, b);
        assert_eq!(IdempotencyToken::parse(a.as_str()).unwrap(), a);
    }

    #[test]
    fn derive_is_deterministic_and_step_specific() {
        let p = IdempotencyToken::parse("parent-1").unwrap();
        assert_eq!(p.derive("k8s"), p.derive("k8s"));
        assert_ne!(p.derive("k8s"), p.derive("mail"));
        assert_ne!(p.derive("k8s"), p);
        assert!(p.derive("x").as_str().len() <= MAX_TOKEN_LEN);
    }

    #[test]
    fn rejects_bad_tokens() {
        assert_eq!(IdempotencyToken::parse(""), Err(TokenError::Empty));
        assert_eq!(
            IdempotencyToken::parse("a".repeat(65)),
            Err(TokenError::TooLong(65))
        );
        assert_eq!(
            IdempotencyToken::parse("a b"),
            Err(TokenError::BadCharacter(' '))
        );
        assert!(IdempotencyToken::parse("a".repeat(64)).is_ok());
        assert!(serde_json::from_str::<IdempotencyToken>("\"é\"").is_err());
    }
}
