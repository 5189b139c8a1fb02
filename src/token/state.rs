//! The tokens of a grant at one generation, and when they need refreshing.

use super::store::{GrantStatus, Rotation, StoredGrant};
use crate::secret::Secret;
use std::sync::Arc;
use std::time::Duration;

/// The tokens of a grant at one generation. Replaced whole, never mutated; every instance a
/// request can see has been committed to the store.
#[derive(Debug)]
pub struct TokenState {
    access: Option<Secret>,
    refresh: Secret,
    /// Unix seconds the access token expires at (0: none).
    pub expires_at: i64,
    /// Unix seconds the authorization server issued it at (its answer's arrival).
    pub issued_at: Option<i64>,
    /// Counts the rotations of the grant; a refresh starts only from the generation it replaces.
    pub generation: i64,
    pub status: GrantStatus,
    /// `Bearer <access>`, marked sensitive, built once per token.
    bearer: Option<http::HeaderValue>,
    /// The access token's 8-hex fingerprint, computed once per token.
    fingerprint: Option<Arc<str>>,
}

impl TokenState {
    /// The one constructor: every other way of making a state goes through it.
    pub fn new(
        access: Option<Secret>,
        refresh: Secret,
        expires_at: i64,
        issued_at: Option<i64>,
        generation: i64,
        status: GrantStatus,
    ) -> Self {
        let bearer = access.as_ref().and_then(bearer);
        let fingerprint = access.as_ref().map(|a| Arc::from(a.fingerprint()));
        TokenState {
            access,
            refresh,
            expires_at,
            issued_at,
            generation,
            status,
            bearer,
            fingerprint,
        }
    }

    /// The state as the store holds it.
    pub fn from_stored(g: &StoredGrant) -> Self {
        Self::new(
            g.access_token.clone(),
            g.refresh_token.clone(),
            g.access_expires_at,
            g.refreshed_at,
            g.generation,
            g.status,
        )
    }

    /// The state after committing `rotation` on top of generation `from`.
    pub fn rotated(rotation: &Rotation, from: i64) -> Self {
        Self::new(
            Some(rotation.access_token.clone()),
            rotation.refresh_token.clone(),
            rotation.access_expires_at,
            Some(rotation.refreshed_at),
            from + 1,
            GrantStatus::Ok,
        )
    }

    /// A refresh token not yet used: no access token, generation 0 (an import in progress).
    pub fn unused(refresh: Secret) -> Self {
        Self::new(None, refresh, 0, None, 0, GrantStatus::Ok)
    }

    /// The same tokens with another health.
    pub fn with_status(&self, status: GrantStatus) -> Self {
        Self::new(
            self.access.clone(),
            self.refresh.clone(),
            self.expires_at,
            self.issued_at,
            self.generation,
            status,
        )
    }

    /// The `Authorization` header value for this access token.
    pub fn bearer(&self) -> Option<&http::HeaderValue> {
        self.bearer.as_ref()
    }

    /// The access token's fingerprint (8 hex), for audit records and the status page.
    pub fn fingerprint(&self) -> Option<&Arc<str>> {
        self.fingerprint.as_ref()
    }

    /// Whether there is an access token at all.
    pub fn has_access(&self) -> bool {
        self.access.is_some()
    }

    pub(crate) fn refresh_token(&self) -> &Secret {
        &self.refresh
    }

    /// The access token's lifetime as issued, in seconds (unknown: one hour, Meraki's).
    pub fn lifetime(&self) -> i64 {
        match self.issued_at {
            Some(at) if self.expires_at > at => self.expires_at - at,
            _ => 3600,
        }
    }

    /// When to refresh: `ahead` before expiry, but never earlier than half the lifetime, so a
    /// token shorter than `ahead` is not born "expiring" (Envoy refreshes at half life too).
    pub fn refresh_at(&self, ahead: Duration) -> i64 {
        let ahead = (ahead.as_secs() as i64).min(self.lifetime() / 2);
        self.expires_at - ahead
    }

    /// Whether the access token may be used now without refreshing first.
    pub fn usable(&self, now: i64, ahead: Duration) -> bool {
        self.status == GrantStatus::Ok && self.has_access() && now < self.refresh_at(ahead)
    }

    /// Whether the access token has not expired yet (maybe past its refresh point).
    pub fn alive(&self, now: i64) -> bool {
        self.status == GrantStatus::Ok && self.has_access() && self.expires_at > now + 5
    }
}

/// `Bearer <token>` as a header value marked sensitive (kept out of HPACK tables and debug
/// output). The one place a bearer header is built.
pub fn bearer(access: &Secret) -> Option<http::HeaderValue> {
    let mut v = http::HeaderValue::from_str(&format!("Bearer {}", access.expose())).ok()?;
    v.set_sensitive(true);
    Some(v)
}

#[cfg(test)]
impl TokenState {
    /// A committed state with these tokens, valid for an hour from `now`.
    pub(crate) fn for_test(access: &str, refresh: &str, now: i64) -> Self {
        Self::new(
            Some(Secret::new(access)),
            Secret::new(refresh),
            now + 3600,
            Some(now),
            1,
            GrantStatus::Ok,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_lifetime(secs: i64) -> TokenState {
        TokenState::new(
            Some(Secret::new("a")),
            Secret::new("r"),
            1000 + secs,
            Some(1000),
            1,
            GrantStatus::Ok,
        )
    }

    #[test]
    fn the_refresh_point_is_at_most_half_the_lifetime() {
        let ahead = Duration::from_secs(300);
        // An hour: 300 s ahead.
        assert_eq!(with_lifetime(3600).refresh_at(ahead), 1000 + 3300);
        // A minute: half of it, not "born expiring".
        let t = with_lifetime(60);
        assert_eq!(t.refresh_at(ahead), 1030);
        assert!(t.usable(1000, ahead) && t.usable(1029, ahead) && !t.usable(1030, ahead));
        // Ten seconds: five.
        assert_eq!(with_lifetime(10).refresh_at(ahead), 1005);
    }

    #[test]
    fn debug_shows_no_token() {
        let t = TokenState::for_test("access-secret-value", "refresh-secret-value", 0);
        let shown = format!("{t:?}");
        assert!(!shown.contains("access-secret-value"), "{shown}");
        assert!(!shown.contains("refresh-secret-value"), "{shown}");
        assert!(t.bearer().is_some_and(|b| b.is_sensitive()));
    }
}
