//! Secret outputs sealed at rest: the secret outputs of a resource are kept in its `secrets`
//! column as one AEAD-sealed JSON object, readable only with a key the database never sees.
//!
//! Keys come from the environment (`SETPOINT_SECRETS_KEY`, see [`SecretBox::from_keys`]): a
//! comma-separated list of `id:base64` keys, the first of which seals; the others only open,
//! so a key is rotated by putting a new one first and keeping the old one until every
//! resource was sealed again. A sealed value is bound to its resource's id (the AEAD's
//! associated data): copied to another row it does not open.
//!
//! Sealed format: `spk1`, the key id's length (one byte), the key id, a 96-bit random nonce,
//! then ChaCha20-Poly1305's ciphertext and tag.

use std::collections::BTreeMap;
use std::fmt;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;
use uuid::Uuid;

const MAGIC: &[u8] = b"spk1";

/// Why secrets could not be sealed or opened. Never holds a key or a secret value.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// No key is configured, and a secret was to be sealed or opened.
    #[error(
        "no secrets key is configured: set SETPOINT_SECRETS_KEY (e.g. `setpoint secrets-key` \
         prints a new one) to keep secret outputs"
    )]
    NoKey,
    /// The configured keys are malformed.
    #[error("SETPOINT_SECRETS_KEY: {0}")]
    BadKey(String),
    /// The sealed value was made with a key that is not configured.
    #[error(
        "the secrets were sealed with key {0:?}, which is not configured (SETPOINT_SECRETS_KEY)"
    )]
    UnknownKey(String),
    /// The sealed value is damaged, was made for another resource, or its key is wrong.
    #[error(
        "the sealed secrets cannot be opened (damaged, moved from another resource, or a wrong key)"
    )]
    Corrupt,
}

/// The keys that seal and open secret outputs.
pub struct SecretBox {
    /// (id, key); the first seals.
    keys: Vec<(String, LessSafeKey)>,
    rng: SystemRandom,
}

impl fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretBox")
            .field(
                "key_ids",
                &self.keys.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl SecretBox {
    /// A box without keys: sealing or opening fails with [`SecretsError::NoKey`].
    pub fn none() -> Self {
        Self {
            keys: Vec::new(),
            rng: SystemRandom::new(),
        }
    }

    /// Keys from `spec`: `id:base64key[,id:base64key…]`, or one bare base64 key (id `k1`);
    /// each key 32 bytes.
    ///
    /// # Errors
    /// [`SecretsError::BadKey`] naming what is wrong (never the key).
    pub fn from_keys(spec: &str) -> Result<Self, SecretsError> {
        use base64::Engine as _;
        let mut keys = Vec::new();
        for (i, item) in spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .enumerate()
        {
            let (id, b64) = match item.split_once(':') {
                Some((id, b64)) => (id.trim().to_owned(), b64.trim()),
                None => (format!("k{}", i + 1), item),
            };
            if id.is_empty()
                || id.len() > 32
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(SecretsError::BadKey(format!(
                    "key id {id:?} must be 1 to 32 letters, digits or '-'"
                )));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| SecretsError::BadKey(format!("key {id:?} is not base64")))?;
            let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| {
                SecretsError::BadKey(format!(
                    "key {id:?} must be 32 bytes (it has {})",
                    bytes.len()
                ))
            })?;
            if keys.iter().any(|(k, _): &(String, LessSafeKey)| *k == id) {
                return Err(SecretsError::BadKey(format!("key id {id:?} appears twice")));
            }
            keys.push((id, LessSafeKey::new(key)));
        }
        if keys.is_empty() {
            return Err(SecretsError::BadKey("no key in it".into()));
        }
        Ok(Self {
            keys,
            rng: SystemRandom::new(),
        })
    }

    /// A new random key in the form [`SecretBox::from_keys`] reads, with id `id`.
    ///
    /// # Errors
    /// When the system's random source fails.
    pub fn generate_key(id: &str) -> Result<String, SecretsError> {
        use base64::Engine as _;
        let mut key = [0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| SecretsError::BadKey("the system's random source failed".into()))?;
        Ok(format!(
            "{id}:{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        ))
    }

    /// True when a key is configured.
    pub fn has_key(&self) -> bool {
        !self.keys.is_empty()
    }

    /// `secrets` sealed for resource `resource` with the first key.
    ///
    /// # Errors
    /// [`SecretsError::NoKey`]; a failure of the random source.
    pub fn seal(
        &self,
        resource: Uuid,
        secrets: &BTreeMap<String, Value>,
    ) -> Result<Vec<u8>, SecretsError> {
        let (id, key) = self.keys.first().ok_or(SecretsError::NoKey)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| SecretsError::Corrupt)?;
        let mut data = serde_json::to_vec(secrets).map_err(|_| SecretsError::Corrupt)?;
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(resource.as_bytes()),
            &mut data,
        )
        .map_err(|_| SecretsError::Corrupt)?;
        let mut out = Vec::with_capacity(MAGIC.len() + 1 + id.len() + NONCE_LEN + data.len());
        out.extend_from_slice(MAGIC);
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// The secrets sealed in `sealed` for resource `resource`.
    ///
    /// # Errors
    /// [`SecretsError::NoKey`], [`SecretsError::UnknownKey`], [`SecretsError::Corrupt`].
    pub fn open(
        &self,
        resource: Uuid,
        sealed: &[u8],
    ) -> Result<BTreeMap<String, Value>, SecretsError> {
        let rest = sealed.strip_prefix(MAGIC).ok_or(SecretsError::Corrupt)?;
        let (&len, rest) = rest.split_first().ok_or(SecretsError::Corrupt)?;
        let len = usize::from(len);
        if rest.len() < len + NONCE_LEN {
            return Err(SecretsError::Corrupt);
        }
        let id = std::str::from_utf8(&rest[..len]).map_err(|_| SecretsError::Corrupt)?;
        if self.keys.is_empty() {
            return Err(SecretsError::NoKey);
        }
        let key = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, key)| key)
            .ok_or_else(|| SecretsError::UnknownKey(id.to_owned()))?;
        let nonce: [u8; NONCE_LEN] = rest[len..len + NONCE_LEN]
            .try_into()
            .map_err(|_| SecretsError::Corrupt)?;
        let mut data = rest[len + NONCE_LEN..].to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(resource.as_bytes()),
                &mut data,
            )
            .map_err(|_| SecretsError::Corrupt)?;
        serde_json::from_slice(plain).map_err(|_| SecretsError::Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn sealed_secrets_open_only_for_their_resource_and_keys() {
        let old = SecretBox::generate_key("old").unwrap();
        let new = SecretBox::generate_key("new").unwrap();
        let sealer = SecretBox::from_keys(&old).unwrap();
        let r = Uuid::new_v4();
        let secrets = BTreeMap::from([("credentials".to_owned(), json!({"password": "hunter2"}))]);
        let sealed = sealer.seal(r, &secrets).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("hunter2"));
        assert_eq!(sealer.open(r, &sealed).unwrap(), secrets);
        assert!(matches!(
            sealer.open(Uuid::new_v4(), &sealed),
            Err(SecretsError::Corrupt)
        ));
        // Rotation: the new key seals, the old one still opens.
        let rotated = SecretBox::from_keys(&format!("{new},{old}")).unwrap();
        assert_eq!(rotated.open(r, &sealed).unwrap(), secrets);
        let resealed = rotated.seal(r, &secrets).unwrap();
        assert!(
            matches!(sealer.open(r, &resealed), Err(SecretsError::UnknownKey(id)) if id == "new")
        );
        assert!(matches!(
            SecretBox::none().seal(r, &secrets),
            Err(SecretsError::NoKey)
        ));
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(sealer.open(r, &bad), Err(SecretsError::Corrupt)));
    }

    #[test]
    fn bad_keys_are_refused_without_showing_them() {
        for (spec, want) in [
            ("k:not-base64!", "not base64"),
            ("k:AAAA", "must be 32 bytes"),
            ("bad id:AAAA", "key id"),
            ("", "no key"),
        ] {
            let e = SecretBox::from_keys(spec).unwrap_err().to_string();
            assert!(e.contains(want), "{spec}: {e}");
        }
        let k = SecretBox::generate_key("a").unwrap();
        let dup = SecretBox::from_keys(&format!("{k},{k}"))
            .unwrap_err()
            .to_string();
        assert!(dup.contains("twice") && !dup.contains(&k[2..]), "{dup}");
    }
}
