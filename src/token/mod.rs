//! Grants and their tokens, split by job:
//!
//! - [`grant`]: one grant, its single-flight lock, and what Meraki's answers taught about it;
//! - [`map`]: which grant serves an (integration, organization), re-read from the store;
//! - [`refresh`]: the refresh engine (single flight, refresh points, the 401 rule, backoff,
//!   commit before use);
//! - [`probe`]: asking Meraki whether a token works, behind the [`TokenProbe`] trait;
//! - [`lifecycle`]: adding, importing, revoking and keeping grants alive;
//! - [`store`]: the durable store behind the async [`Store`] trait;
//! - [`oauth`]: the authorization server behind the [`TokenEndpoint`] trait;
//! - [`events`]: what the module reports, to an [`EventSink`] wired in `server.rs`.
//!
//! Time comes from a [`Clock`], so tests run the engine with tokio's paused time.

pub mod events;
pub mod grant;
pub mod lifecycle;
pub mod map;
pub mod oauth;
pub mod postgres;
pub mod probe;
pub mod refresh;
pub mod sqlite;
pub mod state;
pub mod store;

use crate::clock::Clock;
use crate::config::{Config, Integration};
pub use events::{EventKind, EventSink, RefreshCause, StoreOp, TokenEvent};
pub use grant::{Grant, RefusedOperation};
pub use lifecycle::{ImportError, RevokeError};
pub use map::GrantMap;
pub use oauth::{OAuthClient, OAuthError, TokenEndpoint};
pub use postgres::PgStore;
pub use probe::{Probe, TokenProbe};
pub use refresh::{Policy, Refresher};
pub use sqlite::SqliteStore;
pub use state::TokenState;
use std::sync::Arc;
use std::time::Duration;
pub use store::{GrantStatus, Lease, RefreshIntent, Rotation, Store, StoreError, StoredGrant};

/// Why no access token could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No grant covers this organization for this integration.
    #[error("no OAuth grant for organization {org} in integration {integration}: an organization admin must connect it")]
    NoGrant { integration: String, org: String },
    /// The authorization server said `invalid_grant`.
    #[error("the OAuth grant for organization {org} (integration {integration}) needs re-authorization by an organization admin")]
    NeedsReauth { integration: String, org: String },
    /// The token call failed; the next one waits `retry_after`.
    #[error("could not refresh the OAuth token: {source}")]
    AuthServer {
        #[source]
        source: OAuthError,
        retry_after: Duration,
    },
    /// Token calls are backing off after failures and the access token has expired.
    #[error("the OAuth token could not be refreshed ({last_failure}); the proxy retries the authorization server with backoff")]
    BackingOff {
        retry_after: Duration,
        last_failure: &'static str,
    },
    /// Meraki refuses this grant's tokens at this operation (a token obtained because of a 401
    /// there was refused there again) while the token works elsewhere: a refresh would not help.
    #[error("Meraki refuses this grant's access tokens at operation {operation} (a token obtained because of a 401 there was refused again) while they work elsewhere; the proxy did not refresh (the grant may lack the OAuth scope this operation needs)")]
    RefusedAtOperation { operation: String },
    /// The store could not durably record a rotated token.
    #[error("the token store is unavailable")]
    Store(#[source] StoreError),
    /// The store holds a generation this process cannot explain.
    #[error("conflicting token generations in the store")]
    Conflict,
    /// Another instance sharing the store is refreshing the grant (or holds a rotation it has
    /// not stored yet) and the access token has expired.
    #[error("another instance of the proxy is refreshing this grant's token; retry shortly")]
    OtherInstance { retry_after: Duration },
}

impl TokenError {
    /// How long a client should wait before trying again, when the proxy knows.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::AuthServer { retry_after, .. }
            | TokenError::BackingOff { retry_after, .. } => Some(*retry_after),
            TokenError::Store(_) | TokenError::Conflict => Some(Duration::from_secs(1)),
            TokenError::OtherInstance { retry_after } => Some(*retry_after),
            _ => None,
        }
    }
}

/// The token module's settings, from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub integrations: Vec<Arc<Integration>>,
    pub policy: Policy,
}

impl Settings {
    /// The settings a configuration gives.
    pub fn from_config(config: &Config) -> Self {
        Settings {
            integrations: config.integrations.clone(),
            policy: Policy {
                refresh_ahead: config.refresh_ahead,
                refused_operation_memory: config.refused_operation_memory,
                backoff_max: config.refresh_backoff_max,
                // A lease is held for one token call and one commit.
                lease_wait: config.token_timeout * 2 + Duration::from_secs(5),
                ..Policy::default()
            },
        }
    }
}

/// Grants and their tokens: the map, the refresh engine and the lifecycle, over one store and
/// one authorization server.
pub struct Grants {
    map: GrantMap,
    refresher: Refresher,
    store: Arc<dyn Store>,
    endpoint: Arc<dyn TokenEndpoint>,
    events: Arc<dyn EventSink>,
    clock: Clock,
}

impl Grants {
    /// Loads the grants from the store.
    pub async fn load(
        settings: Settings,
        store: Arc<dyn Store>,
        endpoint: Arc<dyn TokenEndpoint>,
        events: Arc<dyn EventSink>,
        clock: Clock,
    ) -> Result<Self, StoreError> {
        let grants = Grants {
            map: GrantMap::new(&settings.integrations, store.clone(), events.clone()),
            refresher: Refresher::new(
                store.clone(),
                endpoint.clone(),
                events.clone(),
                clock,
                settings.policy,
            ),
            store,
            endpoint,
            events,
            clock,
        };
        grants.map.reload().await?;
        Ok(grants)
    }

    /// Re-reads the grant list from the store.
    pub async fn reload(&self) -> Result<(), StoreError> {
        self.map.reload().await
    }

    /// The grant for this integration and organization (re-reading the store on a miss).
    pub async fn get(&self, integration: &str, org: &str) -> Option<Arc<Grant>> {
        self.map.get(integration, org).await
    }

    /// The grant for this integration and organization, or why there is none.
    pub async fn require(&self, integration: &str, org: &str) -> Result<Arc<Grant>, TokenError> {
        self.get(integration, org)
            .await
            .ok_or_else(|| TokenError::NoGrant {
                integration: integration.to_owned(),
                org: org.to_owned(),
            })
    }

    /// Every grant, once each.
    pub fn all(&self) -> Vec<Arc<Grant>> {
        self.map.all()
    }

    /// The grant for this integration and organization, from memory (no store read).
    pub fn lookup(&self, integration: &str, org: &str) -> Option<Arc<Grant>> {
        self.map.lookup(integration, org)
    }

    /// How many reloads so far changed which grant serves which organization.
    pub fn changes(&self) -> u64 {
        self.map.changes()
    }

    /// A usable access token of `grant` for a request on `org`; the grant is marked used.
    pub async fn token(&self, grant: &Grant, org: &str) -> Result<Arc<TokenState>, TokenError> {
        // One clock read for both: whether the token is still usable, and the grant's use.
        let now = self.clock.now();
        let st = self.refresher.token(grant, org, now).await?;
        grant.set_last_used(now);
        Ok(st)
    }

    /// The one rule after Meraki answered 401 to `used` at `operation`: a newer token to retry
    /// with once, or why there is none (see [`Refresher::rejected`]).
    pub async fn rejected(
        &self,
        grant: &Grant,
        org: &str,
        used: &TokenState,
        operation: &str,
    ) -> Result<Arc<TokenState>, TokenError> {
        self.refresher.rejected(grant, org, used, operation).await
    }

    /// Meraki answered 401 to a retry: remembers the operation when the retry's token was
    /// obtained because of a 401 there (see [`Refresher::refused_again`]).
    pub fn refused_again(
        &self,
        grant: &Grant,
        org: &str,
        used: &TokenState,
        operation: &str,
    ) -> bool {
        self.refresher.refused_again(grant, org, used, operation)
    }

    /// Meraki answered 2xx to `used`: evidence that the token works; forgets a refusal
    /// remembered at the operation (computed only when the grant remembers any).
    pub fn succeeded(&self, grant: &Grant, used: &TokenState, operation: impl Fn() -> String) {
        self.refresher.succeeded(grant, used, operation)
    }

    /// Gives the engine a way to ask Meraki whether a token works.
    pub fn set_probe(&self, probe: Arc<dyn TokenProbe>) {
        self.refresher.set_probe(probe);
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The authorization server.
    pub fn endpoint(&self) -> &Arc<dyn TokenEndpoint> {
        &self.endpoint
    }

    /// The configured integration with this name.
    pub fn integration(&self, name: &str) -> Option<Arc<Integration>> {
        self.map.integration(name)
    }

    /// A configuration reload: the integrations' new settings, then the grants re-read.
    pub async fn set_integrations(
        &self,
        integrations: &[Arc<Integration>],
    ) -> Result<(), StoreError> {
        self.map.set_integrations(integrations);
        // What 401s taught is forgotten: the reload may have changed the integration's scopes.
        for g in self.map.all() {
            self.refresher.forget_refusals(&g);
        }
        self.map.reload().await
    }

    /// The clock the engine reads.
    pub fn clock(&self) -> Clock {
        self.clock
    }
}

#[cfg(test)]
mod tests;
