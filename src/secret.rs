//! Secrets (keys, tokens, client secrets) as a type that cannot be printed by accident.

use sha2::{Digest, Sha256};
use std::fmt;

/// A secret string. `Debug` and `Display` print only an 8-hex-character fingerprint.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; call only where it must go on the wire or into the store.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The first 8 hex characters of the value's SHA-256: enough to correlate, useless to replay.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.0.as_bytes())
    }
}

/// The first 8 hex characters of the SHA-256 of `bytes`.
pub fn fingerprint(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(&digest[..4])
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(sha256:{}…)", self.fingerprint())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}…", self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("super-secret-refresh-token-value");
        let shown = format!("{s:?} {s} {:?}", Some(&s));
        assert!(!shown.contains("super-secret"), "{shown}");
        assert!(shown.contains(&s.fingerprint()));
        assert_eq!(s.fingerprint().len(), 8);
    }
}
