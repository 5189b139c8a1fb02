//! Encryption at rest: tokens in the store are sealed with ChaCha20-Poly1305 under a 32-byte key
//! from the environment or a file. A wrong key is detected at open time (a sealed check value),
//! never discovered later as "every grant is broken".

use crate::secret::Secret;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::Digest as _;
use std::fmt;

const PREFIX: &str = "v1.";

/// Why a key or a sealed value is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Not 32 bytes in base64 or hex.
    #[error("expected a 32-byte key, base64 or 64 hex characters (generate one with `meraki-oauth-proxy store gen-key`)")]
    BadKey,
    /// Authentication failed: another key sealed this, or it was tampered with.
    #[error("cannot decrypt: the store was sealed with another key, or tampered with")]
    Open,
}

/// The store key. `Debug` shows a fingerprint only.
#[derive(Clone)]
pub struct StoreKey {
    cipher: ChaCha20Poly1305,
    fingerprint: String,
    /// SHA-256 of the key: tells two keys apart (a configuration reload) without keeping the
    /// key's bytes outside the cipher.
    digest: [u8; 32],
}

impl PartialEq for StoreKey {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.digest.ct_eq(&other.digest))
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey(sha256:{}…)", self.fingerprint)
    }
}

impl StoreKey {
    /// Parses a key written as base64 (standard) or hex.
    pub fn parse(text: &str) -> Result<StoreKey, SealError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).map_err(|_| SealError::BadKey)?
        } else {
            B64.decode(text).map_err(|_| SealError::BadKey)?
        };
        let key: [u8; 32] = bytes.try_into().map_err(|_| SealError::BadKey)?;
        Ok(StoreKey {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
            fingerprint: crate::secret::fingerprint(&key),
            digest: sha2::Sha256::digest(key).into(),
        })
    }

    /// A fresh random key, base64.
    pub fn generate() -> String {
        B64.encode(rand::random::<[u8; 32]>())
    }

    /// Seals `plain`; `context` (e.g. the column) is authenticated, so values cannot be swapped.
    pub fn seal(&self, plain: &str, context: &str) -> String {
        let nonce: [u8; 12] = rand::random();
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            // Encryption only fails for plaintexts over 256 GiB.
            .unwrap_or_default();
        let mut out = Vec::with_capacity(12 + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        format!("{PREFIX}{}", B64.encode(out))
    }

    /// Opens a value sealed by [`StoreKey::seal`] with the same context.
    pub fn open(&self, sealed: &str, context: &str) -> Result<Secret, SealError> {
        let raw = sealed.strip_prefix(PREFIX).ok_or(SealError::Open)?;
        let bytes = B64.decode(raw).map_err(|_| SealError::Open)?;
        if bytes.len() < 12 + 16 {
            return Err(SealError::Open);
        }
        let (nonce, ct) = bytes.split_at(12);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| SealError::Open)?;
        String::from_utf8(plain)
            .map(Secret::new)
            .map_err(|_| SealError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let k = StoreKey::parse(&StoreKey::generate()).unwrap();
        let sealed = k.seal("refresh-token-value", "refresh_token");
        assert!(!sealed.contains("refresh-token-value"));
        assert_eq!(
            k.open(&sealed, "refresh_token").unwrap().expose(),
            "refresh-token-value"
        );
        assert_eq!(
            k.open(&sealed, "access_token"),
            Err(SealError::Open),
            "context is bound"
        );
        let other = StoreKey::parse(&"ab".repeat(32)).unwrap();
        assert_eq!(other.open(&sealed, "refresh_token"), Err(SealError::Open));
        assert_eq!(StoreKey::parse("too-short").unwrap_err(), SealError::BadKey);
        assert!(format!("{k:?}").starts_with("StoreKey(sha256:"));
    }
}
