//! Test support shared by the unit tests: an in-memory authorization server that rotates like
//! Meraki's, an event recorder, and small fixtures.

use crate::config::Integration;
use crate::secret::Secret;
use crate::token::oauth::{OAuthError, TokenEndpoint, TokenResponse};
use crate::token::{EventSink, StoreOp, TokenEvent};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An authorization server that behaves like Meraki's: every refresh returns a new refresh
/// token and revokes the one presented; a revoked one gets `invalid_grant`.
#[derive(Default)]
pub struct Authority {
    pub state: Mutex<AuthorityState>,
    calls: AtomicUsize,
}

#[derive(Default)]
pub struct AuthorityState {
    /// Valid refresh token → grant number.
    pub valid: HashMap<String, u64>,
    pub issued: u64,
    pub delay: Duration,
    pub expires_in: u64,
    pub down: bool,
    /// The client secret of the last refresh call.
    pub last_secret: Option<String>,
}

impl Authority {
    pub fn new(expires_in: u64) -> Arc<Self> {
        let a = Authority::default();
        a.state.lock().unwrap().expires_in = expires_in;
        Arc::new(a)
    }

    pub fn issue(&self) -> String {
        let mut s = self.state.lock().unwrap();
        s.issued += 1;
        let token = format!("refresh-{}", s.issued);
        let grant = s.issued;
        s.valid.insert(token.clone(), grant);
        token
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn set(&self, f: impl FnOnce(&mut AuthorityState)) {
        f(&mut self.state.lock().unwrap());
    }

    /// Rotates out of band (as another instance would), returning the new refresh token.
    pub fn rotate_now(&self, refresh: &str) -> Option<(String, String)> {
        let mut s = self.state.lock().unwrap();
        let grant = s.valid.remove(refresh)?;
        s.issued += 1;
        let next = format!("refresh-{}", s.issued);
        s.valid.insert(next.clone(), grant);
        Some((next, format!("access-{}", s.issued)))
    }
}

#[async_trait::async_trait]
impl TokenEndpoint for Authority {
    async fn refresh(
        &self,
        it: &Integration,
        refresh_token: &Secret,
    ) -> Result<TokenResponse, OAuthError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.state.lock().unwrap().last_secret = Some(it.client_secret.expose().to_owned());
        let (delay, down) = {
            let s = self.state.lock().unwrap();
            (s.delay, s.down)
        };
        tokio::time::sleep(delay).await;
        if down {
            return Err(OAuthError::Refused {
                status: 503,
                error: "temporarily_unavailable".into(),
            });
        }
        let mut s = self.state.lock().unwrap();
        let Some(grant) = s.valid.remove(refresh_token.expose()) else {
            return Err(OAuthError::InvalidGrant("revoked".into()));
        };
        s.issued += 1;
        let next = format!("refresh-{}", s.issued);
        s.valid.insert(next.clone(), grant);
        Ok(TokenResponse {
            access_token: Secret::new(format!("access-{}", s.issued)),
            refresh_token: Some(Secret::new(next)),
            expires_in: s.expires_in,
            scope: None,
            organization_id: None,
        })
    }

    async fn exchange_code(
        &self,
        _it: &Integration,
        _code: &Secret,
        _redirect_uri: &str,
    ) -> Result<TokenResponse, OAuthError> {
        Err(OAuthError::NotConfigured("code exchange"))
    }

    async fn revoke(&self, _it: &Integration, refresh_token: &Secret) -> Result<(), OAuthError> {
        self.state
            .lock()
            .unwrap()
            .valid
            .remove(refresh_token.expose());
        Ok(())
    }
}

/// Records events.
#[derive(Default)]
pub struct Recorder(Mutex<Vec<TokenEvent>>);

impl Recorder {
    pub fn kinds(&self) -> Vec<&'static str> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.kind.name())
            .collect()
    }
}

impl EventSink for Recorder {
    fn token(&self, event: TokenEvent) {
        self.0.lock().unwrap().push(event);
    }
    fn store(&self, _: StoreOp) {}
}

/// The integration every unit test uses.
pub fn integration() -> Arc<Integration> {
    Arc::new(Integration {
        name: "netops".into(),
        client_id: "id".into(),
        client_secret: Secret::new("secret"),
        redirect_uri: None,
        scopes: vec![],
    })
}

/// A store key for tests.
pub fn store_key() -> crate::seal::StoreKey {
    crate::seal::StoreKey::parse(&"11".repeat(32)).unwrap()
}
