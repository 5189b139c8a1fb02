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
    probes: AtomicUsize,
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
    /// Meraki's API side: access tokens numbered up to this are refused (killed early).
    pub dead_up_to: u64,
    /// The API answers probes with this instead of judging the token (a 429, an outage).
    pub probe_unknown: bool,
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

    /// Probes Meraki's API side answered.
    pub fn probes(&self) -> usize {
        self.probes.load(Ordering::SeqCst)
    }

    /// Meraki stops accepting every access token issued so far (not the refresh tokens).
    pub fn kill_access_tokens(&self) {
        let mut s = self.state.lock().unwrap();
        s.dead_up_to = s.issued;
    }

    /// Whether Meraki's API accepts `token`'s access token.
    pub fn accepts(&self, token: &crate::token::TokenState) -> bool {
        let n = token
            .bearer()
            .and_then(|b| b.to_str().ok())
            .and_then(|b| b.strip_prefix("Bearer access-"))
            .and_then(|n| n.parse::<u64>().ok());
        n.is_some_and(|n| n > self.state.lock().unwrap().dead_up_to)
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

#[async_trait::async_trait]
impl crate::token::TokenProbe for Authority {
    async fn probe(&self, token: &crate::token::TokenState) -> crate::token::Probe {
        self.probes.fetch_add(1, Ordering::SeqCst);
        if self.state.lock().unwrap().probe_unknown {
            crate::token::Probe::Unknown
        } else if self.accepts(token) {
            crate::token::Probe::Works
        } else {
            crate::token::Probe::Refused
        }
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

impl Recorder {
    /// The details of the events of kind `name`.
    pub fn details(&self, name: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.kind.name() == name)
            .filter_map(|e| e.detail.clone())
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
        scope_set: crate::scope::ScopeSet::EMPTY,
    })
}

/// A store key for tests.
pub fn store_key() -> crate::seal::StoreKey {
    crate::seal::StoreKey::parse(&"11".repeat(32)).unwrap()
}

/// Several instances on one shared store, as PostgreSQL gives them, in memory: the grants live
/// in one (in-memory SQLite) store, leases are a shared table released when their holder's
/// lease is dropped (a dead session), and instances can be declared dead or made to fail
/// commits.
#[derive(Clone)]
pub struct FleetStore {
    inner: crate::token::SqliteStore,
    name: Arc<str>,
    shared: Arc<FleetShared>,
    fail_commits: Arc<AtomicUsize>,
}

#[derive(Default)]
struct FleetShared {
    leases: Mutex<HashMap<i64, String>>,
    dead: Mutex<std::collections::HashSet<String>>,
}

impl FleetStore {
    /// The first instance of a new fleet.
    pub fn new(name: &str) -> Self {
        FleetStore {
            inner: crate::token::SqliteStore::in_memory(store_key()).unwrap(),
            name: name.into(),
            shared: Arc::default(),
            fail_commits: Arc::default(),
        }
    }

    /// Another instance on the same store.
    pub fn instance(&self, name: &str) -> Self {
        FleetStore {
            name: name.into(),
            fail_commits: Arc::default(),
            ..self.clone()
        }
    }

    /// Declares this instance dead (its heartbeat stops); its leases go with its tasks.
    pub fn kill(&self) {
        self.shared
            .dead
            .lock()
            .unwrap()
            .insert(self.name.to_string());
    }

    /// This instance's next `n` commits fail.
    pub fn fail_commits(&self, n: usize) {
        self.fail_commits.store(n, Ordering::SeqCst);
    }

    /// Who holds grant `id`'s lease.
    pub fn holder(&self, id: i64) -> Option<String> {
        self.shared.leases.lock().unwrap().get(&id).cloned()
    }
}

struct FleetLease {
    store: FleetStore,
    id: i64,
}

impl Drop for FleetLease {
    fn drop(&mut self) {
        let mut leases = self.store.shared.leases.lock().unwrap();
        if leases.get(&self.id).map(String::as_str) == Some(&*self.store.name) {
            leases.remove(&self.id);
        }
    }
}

#[async_trait::async_trait]
impl crate::token::Lease for FleetLease {
    async fn intend(&self, generation: i64) -> Result<(), crate::token::StoreError> {
        let (id, holder) = (self.id, self.store.name.to_string());
        self.store
            .inner
            .blocking(move |s| s.intend(id, generation, &holder))
            .await
    }
    async fn release(self: Box<Self>) {}
}

#[async_trait::async_trait]
impl crate::token::Store for FleetStore {
    async fn load_all(&self) -> Result<Vec<crate::token::StoredGrant>, crate::token::StoreError> {
        crate::token::Store::load_all(&self.inner).await
    }
    async fn load(
        &self,
        id: i64,
    ) -> Result<Option<crate::token::StoredGrant>, crate::token::StoreError> {
        crate::token::Store::load(&self.inner, id).await
    }
    async fn insert_pending(
        &self,
        i: &str,
        r: &crate::secret::Secret,
    ) -> Result<i64, crate::token::StoreError> {
        crate::token::Store::insert_pending(&self.inner, i, r).await
    }
    async fn assign(&self, id: i64, i: &str, o: &[String]) -> Result<(), crate::token::StoreError> {
        crate::token::Store::assign(&self.inner, id, i, o).await
    }
    async fn commit_rotation(
        &self,
        id: i64,
        from: i64,
        t: &crate::token::Rotation,
    ) -> Result<bool, crate::token::StoreError> {
        if self
            .fail_commits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(crate::token::StoreError::Pool("connection lost".into()));
        }
        crate::token::Store::commit_rotation(&self.inner, id, from, t).await
    }
    async fn set_status(
        &self,
        id: i64,
        s: crate::token::GrantStatus,
    ) -> Result<(), crate::token::StoreError> {
        crate::token::Store::set_status(&self.inner, id, s).await
    }
    async fn touch(&self, id: i64, at: i64) -> Result<(), crate::token::StoreError> {
        crate::token::Store::touch(&self.inner, id, at).await
    }
    async fn delete(&self, id: i64) -> Result<bool, crate::token::StoreError> {
        crate::token::Store::delete(&self.inner, id).await
    }
    async fn ping(&self) -> Result<(), crate::token::StoreError> {
        Ok(())
    }
    fn instance(&self) -> &str {
        &self.name
    }
    async fn try_lease(
        &self,
        id: i64,
    ) -> Result<Option<Box<dyn crate::token::Lease>>, crate::token::StoreError> {
        let mut leases = self.shared.leases.lock().unwrap();
        if leases.contains_key(&id) {
            return Ok(None);
        }
        leases.insert(id, self.name.to_string());
        Ok(Some(Box::new(FleetLease {
            store: self.clone(),
            id,
        })))
    }
    async fn alive(&self, name: &str) -> Result<bool, crate::token::StoreError> {
        Ok(!self.shared.dead.lock().unwrap().contains(name))
    }
    async fn heartbeat(&self) -> Result<usize, crate::token::StoreError> {
        Ok(1)
    }
}
