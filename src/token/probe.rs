//! Asking Meraki whether an access token still works, with a call that needs no OAuth scope.
//! The refresh engine probes only when a remembered refusal would otherwise suppress a refresh
//! and nothing recent says the grant's token works (see `refresh.rs`).

use super::state::TokenState;

/// What a probe of an access token found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Meraki accepted the token.
    Works,
    /// Meraki answered 401: the token is dead.
    Refused,
    /// No verdict (Meraki unreachable, 429, 5xx).
    Unknown,
}

impl Probe {
    /// A label for events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Probe::Works => "works",
            Probe::Refused => "refused",
            Probe::Unknown => "unknown",
        }
    }
}

/// Something that can ask Meraki about a token: the proxy's API client in production, the
/// in-memory authorization server in unit tests.
#[async_trait::async_trait]
pub trait TokenProbe: Send + Sync {
    /// Whether Meraki accepts `token`'s access token now.
    async fn probe(&self, token: &TokenState) -> Probe;
}
