//! Grants and their tokens: which grant serves an organization, a fresh access token for it,
//! single-flight refresh, and the durable store.
//!
//! Invariants:
//! - at most one refresh per grant runs at a time, and a refresh starts only if the token the
//!   caller saw is still the current one (its `generation`), so a thousand requests that find the
//!   token expiring, or a thousand that saw the same 401, cause one token call;
//! - a rotated refresh token is committed to the store before the access token that came with
//!   it is handed out (`TokenState::persisted`).

pub mod oauth;
pub mod seal;
pub mod store;

use crate::audit::{Audit, TokenEvent};
use crate::config::{Config, Integration};
use crate::metrics::Metrics;
use crate::secret::Secret;
use arc_swap::ArcSwap;
use oauth::{OAuthClient, OAuthError};
pub use seal::StoreKey;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
pub use store::{GrantStatus, Rotation, SqliteStore, StoreError, StoredGrant};

/// Why no access token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// No grant covers this organization for this integration.
    #[error("no OAuth grant for organization {org} in integration {integration}: an organization admin must connect it")]
    NoGrant { integration: String, org: String },
    /// The AS said `invalid_grant`.
    #[error("the OAuth grant for organization {org} (integration {integration}) needs re-authorization by an organization admin")]
    NeedsReauth { integration: String, org: String },
    /// The AS could not be used.
    #[error("could not refresh the OAuth token: {0}")]
    AuthServer(OAuthError),
    /// The store could not durably record a rotated token.
    #[error("the token store is unavailable: {0}")]
    Store(String),
}

impl TokenError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            TokenError::NoGrant { .. } | TokenError::NeedsReauth { .. } | TokenError::Store(_) => {
                503
            }
            TokenError::AuthServer(OAuthError::Timeout) => 504,
            TokenError::AuthServer(_) => 502,
        }
    }

    /// A short fixed label for metrics and audit.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::NoGrant { .. } => "no_grant",
            TokenError::NeedsReauth { .. } => "needs_reauthorization",
            TokenError::AuthServer(_) => "auth_server_error",
            TokenError::Store(_) => "store_error",
        }
    }
}

/// Why a refresh is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshCause {
    /// The access token is missing or close to expiry.
    Expiring,
    /// Meraki answered 401 to this token generation.
    Rejected,
    /// The grant has been idle long enough that Meraki's 90-day idle revocation must be headed off.
    KeepAlive,
}

impl RefreshCause {
    /// A label for the audit record.
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshCause::Expiring => "expiring",
            RefreshCause::Rejected => "rejected_by_meraki",
            RefreshCause::KeepAlive => "keep-alive",
        }
    }
}

/// The tokens of a grant at one generation. Replaced whole, never mutated.
#[derive(Debug)]
pub struct TokenState {
    pub access: Option<Secret>,
    /// Unix seconds.
    pub expires_at: i64,
    pub generation: i64,
    pub status: GrantStatus,
    pub refreshed_at: Option<i64>,
    refresh: Secret,
    persisted: bool,
    /// `Bearer <access>`, built once per token rather than once per request.
    bearer: std::sync::OnceLock<Option<http::HeaderValue>>,
    /// The access token's fingerprint, likewise computed once.
    fingerprint: std::sync::OnceLock<Option<String>>,
}

impl TokenState {
    /// The `Authorization` header value for this access token (marked sensitive).
    pub fn bearer(&self) -> Option<&http::HeaderValue> {
        self.bearer
            .get_or_init(|| {
                let access = self.access.as_ref()?;
                let mut v =
                    http::HeaderValue::from_str(&format!("Bearer {}", access.expose())).ok()?;
                v.set_sensitive(true);
                Some(v)
            })
            .as_ref()
    }

    fn from_stored(g: &StoredGrant) -> Self {
        TokenState {
            access: g.access_token.clone(),
            expires_at: g.access_expires_at,
            generation: g.generation,
            status: g.status,
            refreshed_at: g.refreshed_at,
            refresh: g.refresh_token.clone(),
            persisted: true,
            bearer: Default::default(),
            fingerprint: Default::default(),
        }
    }

    /// A stored state with these tokens, for tests elsewhere in the crate.
    #[cfg(test)]
    pub(crate) fn for_test(access: &str, refresh: &str) -> Self {
        TokenState {
            access: Some(Secret::new(access)),
            expires_at: 4_000_000_000,
            generation: 1,
            status: GrantStatus::Ok,
            refreshed_at: None,
            refresh: Secret::new(refresh),
            persisted: true,
            bearer: Default::default(),
            fingerprint: Default::default(),
        }
    }

    /// Whether the access token may be used now without refreshing first.
    fn fresh(&self, now: i64, ahead: Duration) -> bool {
        self.persisted && self.access.is_some() && self.expires_at - now > ahead.as_secs() as i64
    }

    /// Whether the access token has not expired yet (maybe close to it).
    fn alive(&self, now: i64) -> bool {
        self.persisted && self.access.is_some() && self.expires_at > now + 5
    }

    /// The access token's fingerprint, for audit records.
    pub fn fingerprint(&self) -> Option<String> {
        self.fingerprint_str().map(str::to_owned)
    }

    /// The access token's fingerprint, borrowed (computed once per token).
    pub fn fingerprint_str(&self) -> Option<&str> {
        self.fingerprint
            .get_or_init(|| self.access.as_ref().map(Secret::fingerprint))
            .as_deref()
    }
}

/// One grant: a refresh token an org admin gave an integration, covering some organizations.
pub struct Grant {
    pub id: i64,
    pub integration: Arc<Integration>,
    pub organizations: Vec<String>,
    pub created_at: i64,
    state: ArcSwap<TokenState>,
    refreshing: tokio::sync::Mutex<()>,
    last_used: AtomicI64,
}

impl Grant {
    /// The current token state.
    pub fn state(&self) -> Arc<TokenState> {
        self.state.load_full()
    }

    /// Unix seconds of the last request served with this grant (0: none since start).
    pub fn last_used(&self) -> i64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// A label for logs: never a secret.
    pub fn label(&self) -> String {
        format!("{}/{}", self.integration.name, self.organizations.join(","))
    }
}

type GrantMap = HashMap<String, HashMap<String, Arc<Grant>>>;

/// All grants, by integration and organization.
pub struct Grants {
    map: ArcSwap<GrantMap>,
    store: Arc<SqliteStore>,
    oauth: OAuthClient,
    integrations: HashMap<String, Arc<Integration>>,
    refresh_ahead: Duration,
    audit: Arc<Audit>,
    metrics: Arc<Metrics>,
    last_reload: std::sync::Mutex<Option<Instant>>,
}

/// Unix time in seconds.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Grants {
    /// Loads the grants from the store.
    pub fn new(
        config: &Config,
        store: Arc<SqliteStore>,
        oauth: OAuthClient,
        audit: Arc<Audit>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let grants = Grants {
            map: ArcSwap::from_pointee(GrantMap::new()),
            store,
            oauth,
            integrations: config
                .integrations
                .iter()
                .map(|i| (i.name.clone(), i.clone()))
                .collect(),
            refresh_ahead: config.refresh_ahead,
            audit,
            metrics,
            last_reload: std::sync::Mutex::new(None),
        };
        grants.reload()?;
        Ok(grants)
    }

    /// Re-reads the grant list from the store (grants added by `grants import` or another
    /// instance). Token state of grants already known is kept.
    pub fn reload(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let stored = self.store.load_all();
        self.metrics
            .store_op("reload", started.elapsed(), stored.is_ok());
        let stored = stored?;
        let old = self.map.load();
        let mut map = GrantMap::new();
        for g in stored {
            if g.organizations.is_empty() {
                continue;
            }
            let Some(it) = self.integrations.get(&g.integration) else {
                tracing::warn!(integration = %g.integration, grant = g.id, "stored grant for an integration not in the configuration; ignored");
                continue;
            };
            let existing = old
                .get(&g.integration)
                .and_then(|orgs| orgs.values().find(|x| x.id == g.id))
                .cloned();
            let grant = existing.unwrap_or_else(|| {
                Arc::new(Grant {
                    id: g.id,
                    integration: it.clone(),
                    organizations: g.organizations.clone(),
                    created_at: g.created_at,
                    state: ArcSwap::from_pointee(TokenState::from_stored(&g)),
                    refreshing: tokio::sync::Mutex::new(()),
                    last_used: AtomicI64::new(g.last_used_at.unwrap_or(0)),
                })
            });
            self.metrics.init_grant(&grant);
            self.metrics.grant_state(&grant);
            for org in &g.organizations {
                map.entry(g.integration.clone())
                    .or_default()
                    .insert(org.clone(), grant.clone());
            }
        }
        self.map.store(Arc::new(map));
        if let Ok(mut t) = self.last_reload.lock() {
            *t = Some(Instant::now());
        }
        Ok(())
    }

    /// The grant for this integration and organization. On a miss, re-reads the store (at most
    /// every few seconds), so a grant imported while the proxy runs is found.
    pub async fn get(&self, integration: &str, org: &str) -> Option<Arc<Grant>> {
        if let Some(g) = self.lookup(integration, org) {
            return Some(g);
        }
        let due = self
            .last_reload
            .lock()
            .map(|t| t.is_none_or(|t| t.elapsed() > Duration::from_secs(5)))
            .unwrap_or(false);
        if due {
            // Mark first so a burst of misses causes one reload. The reload is a short SQLite
            // read on this thread, at most every few seconds, and only on a miss.
            if let Ok(mut t) = self.last_reload.lock() {
                *t = Some(Instant::now());
            }
            if let Err(e) = self.reload() {
                tracing::warn!(error = %e, "reloading grants from the store failed");
            }
        }
        self.lookup(integration, org)
    }

    fn lookup(&self, integration: &str, org: &str) -> Option<Arc<Grant>> {
        self.map
            .load()
            .get(integration)
            .and_then(|m| m.get(org))
            .cloned()
    }

    /// Every grant, once each.
    pub fn all(&self) -> Vec<Arc<Grant>> {
        let mut out: Vec<Arc<Grant>> = Vec::new();
        for orgs in self.map.load().values() {
            for g in orgs.values() {
                if !out.iter().any(|x| x.id == g.id) {
                    out.push(g.clone());
                }
            }
        }
        out.sort_by_key(|g| g.id);
        out
    }

    /// The store.
    pub fn store(&self) -> &Arc<SqliteStore> {
        &self.store
    }

    /// The authorization server client.
    pub fn oauth(&self) -> &OAuthClient {
        &self.oauth
    }

    /// The configured integration with this name.
    pub fn integration(&self, name: &str) -> Option<&Arc<Integration>> {
        self.integrations.get(name)
    }

    /// Stores a grant fresh from a code exchange (`how`: "connect"), for these organizations.
    pub async fn add(
        &self,
        integration: &str,
        organizations: &[String],
        tokens: oauth::TokenResponse,
        how: &str,
    ) -> Result<Arc<Grant>, ImportError> {
        let refresh = tokens.refresh_token.clone().ok_or_else(|| {
            ImportError::Refresh(TokenError::AuthServer(OAuthError::BadResponse(
                "no refresh_token in the answer".into(),
            )))
        })?;
        let rotation = Rotation {
            refresh_token: refresh.clone(),
            access_token: tokens.access_token,
            access_expires_at: now_unix() + tokens.expires_in as i64,
            scope: tokens.scope,
            refreshed_at: now_unix(),
        };
        let store = self.store.clone();
        let (integ, orgs) = (integration.to_owned(), organizations.to_vec());
        let id = tokio::task::spawn_blocking(move || -> Result<i64, StoreError> {
            let id = store.insert_pending(&integ, &refresh)?;
            store.commit_rotation(id, 0, &rotation)?;
            store.assign(id, &integ, &orgs)?;
            Ok(id)
        })
        .await
        .map_err(|e| ImportError::Store(e.to_string()))?
        .map_err(|e| ImportError::Store(e.to_string()))?;
        self.reload()
            .map_err(|e| ImportError::Store(e.to_string()))?;
        let grant = self
            .all()
            .into_iter()
            .find(|g| g.id == id)
            .ok_or_else(|| ImportError::Store("the new grant is not in the store".into()))?;
        self.audit.token_event(TokenEvent::added(&grant, how));
        Ok(grant)
    }

    /// Revokes a grant at the AS (RFC 7009), then deletes it. An AS failure keeps the grant.
    pub async fn revoke(&self, grant: &Arc<Grant>) -> Result<(), RevokeError> {
        let st = grant.state.load_full();
        self.oauth
            .revoke(&grant.integration, &st.refresh)
            .await
            .map_err(RevokeError::AuthServer)?;
        let store = self.store.clone();
        let id = grant.id;
        tokio::task::spawn_blocking(move || store.delete(id))
            .await
            .map_err(|e| RevokeError::Store(e.to_string()))?
            .map_err(|e| RevokeError::Store(e.to_string()))?;
        self.audit.token_event(TokenEvent::revoked(grant));
        self.reload()
            .map_err(|e| RevokeError::Store(e.to_string()))?;
        Ok(())
    }

    /// Refreshes every healthy grant idle for `idle` or longer (plus up to 10% jitter each, so
    /// grants imported together do not refresh together). Returns how many were refreshed.
    pub async fn keep_alive(&self, idle: Duration) -> usize {
        let now = now_unix();
        let mut refreshed = 0;
        for grant in self.all() {
            let st = grant.state();
            if st.status != GrantStatus::Ok {
                continue;
            }
            let active = grant
                .last_used()
                .max(st.refreshed_at.unwrap_or(0))
                .max(grant.created_at);
            let jitter = rand::random::<u64>() % (idle.as_secs() / 10 + 1);
            if now - active < (idle.as_secs() + jitter) as i64 {
                continue;
            }
            let org = grant.organizations.first().cloned().unwrap_or_default();
            if self
                .refresh(&grant, &org, st.generation, RefreshCause::KeepAlive)
                .await
                .is_ok()
            {
                refreshed += 1;
            }
        }
        refreshed
    }

    /// Writes last-use times to the store, so idleness survives restarts.
    pub async fn flush_last_used(&self) {
        let uses: Vec<(i64, i64)> = self
            .all()
            .iter()
            .map(|g| (g.id, g.last_used()))
            .filter(|(_, t)| *t > 0)
            .collect();
        let store = self.store.clone();
        let started = Instant::now();
        let res = tokio::task::spawn_blocking(move || {
            uses.iter().try_for_each(|(id, t)| store.touch(*id, *t))
        })
        .await;
        self.metrics
            .store_op("touch", started.elapsed(), matches!(res, Ok(Ok(()))));
    }

    /// An access token for `org` of `grant`, refreshed first if it is close to expiry.
    pub async fn token(
        &self,
        grant: &Arc<Grant>,
        org: &str,
    ) -> Result<Arc<TokenState>, TokenError> {
        let st = grant.state.load_full();
        if st.status == GrantStatus::NeedsReauth {
            return Err(self.needs_reauth(grant, org));
        }
        if st.fresh(now_unix(), self.refresh_ahead) {
            return Ok(st);
        }
        self.refresh(grant, org, st.generation, RefreshCause::Expiring)
            .await
    }

    /// Notes that a request used the grant now.
    pub fn mark_used(&self, grant: &Grant) {
        grant.last_used.store(now_unix(), Ordering::Relaxed);
    }

    /// Refreshes `grant` unless its generation has moved past `seen` (someone else refreshed).
    pub async fn refresh(
        &self,
        grant: &Arc<Grant>,
        org: &str,
        seen: i64,
        cause: RefreshCause,
    ) -> Result<Arc<TokenState>, TokenError> {
        let _only_one = grant.refreshing.lock().await;
        let st = grant.state.load_full();
        if st.status == GrantStatus::NeedsReauth {
            return Err(self.needs_reauth(grant, org));
        }
        let now = now_unix();
        if st.generation != seen && st.persisted {
            return Ok(st);
        }
        if !st.persisted {
            // A rotation the store did not take yet: it must be durable before it is used.
            return self.persist_pending(grant, st).await;
        }
        // Another process sharing the store may have rotated already.
        if let Some(adopted) = self.adopt_newer(grant, st.generation).await {
            if cause == RefreshCause::Rejected || adopted.fresh(now, self.refresh_ahead) {
                return Ok(adopted);
            }
        }
        let st = grant.state.load_full();
        let started = Instant::now();
        let result = self.oauth.refresh(&grant.integration, &st.refresh).await;
        self.metrics
            .token_call_duration(&grant.integration.name, started.elapsed());
        match result {
            Ok(resp) => {
                let rotated = resp.refresh_token.is_some();
                let rotation = Rotation {
                    refresh_token: resp.refresh_token.unwrap_or_else(|| st.refresh.clone()),
                    access_token: resp.access_token,
                    access_expires_at: now_unix() + resp.expires_in as i64,
                    scope: resp.scope,
                    refreshed_at: now_unix(),
                };
                self.metrics.refresh(&grant.integration.name, org, "ok");
                let next = Arc::new(TokenState {
                    access: Some(rotation.access_token.clone()),
                    expires_at: rotation.access_expires_at,
                    generation: st.generation + 1,
                    status: GrantStatus::Ok,
                    refreshed_at: Some(rotation.refreshed_at),
                    refresh: rotation.refresh_token.clone(),
                    persisted: false,
                    bearer: Default::default(),
                    fingerprint: Default::default(),
                });
                self.audit.token_event(TokenEvent::refreshed(
                    grant,
                    org,
                    &next,
                    rotated,
                    cause.as_str(),
                ));
                grant.state.store(next.clone());
                self.persist_pending_rotation(grant, next, st.generation, &rotation)
                    .await
            }
            Err(OAuthError::InvalidGrant(description)) => {
                if let Some(adopted) = self.adopt_newer(grant, st.generation).await {
                    return Ok(adopted);
                }
                self.metrics
                    .refresh(&grant.integration.name, org, "invalid_grant");
                self.mark_needs_reauth(grant, org, &description).await;
                Err(self.needs_reauth(grant, org))
            }
            Err(e) => {
                self.metrics
                    .refresh(&grant.integration.name, org, e.label());
                self.audit
                    .token_event(TokenEvent::failed(grant, org, e.label(), &e.to_string()));
                tracing::warn!(grant = %grant.label(), error = %e, "token refresh failed");
                // A proactive refresh that failed leaves a still-valid token usable.
                if cause == RefreshCause::Expiring && st.alive(now_unix()) {
                    return Ok(st);
                }
                Err(TokenError::AuthServer(e))
            }
        }
    }

    async fn persist_pending(
        &self,
        grant: &Arc<Grant>,
        st: Arc<TokenState>,
    ) -> Result<Arc<TokenState>, TokenError> {
        let rotation = Rotation {
            refresh_token: st.refresh.clone(),
            access_token: st.access.clone().unwrap_or_else(|| Secret::new("")),
            access_expires_at: st.expires_at,
            scope: None,
            refreshed_at: st.refreshed_at.unwrap_or_else(now_unix),
        };
        self.persist_pending_rotation(grant, st.clone(), st.generation - 1, &rotation)
            .await
    }

    async fn persist_pending_rotation(
        &self,
        grant: &Arc<Grant>,
        next: Arc<TokenState>,
        from_generation: i64,
        rotation: &Rotation,
    ) -> Result<Arc<TokenState>, TokenError> {
        let store = self.store.clone();
        let id = grant.id;
        let rot = rotation.clone();
        let started = Instant::now();
        let res =
            tokio::task::spawn_blocking(move || store.commit_rotation(id, from_generation, &rot))
                .await
                .map_err(|e| TokenError::Store(e.to_string()))
                .and_then(|r| r.map_err(|e| TokenError::Store(e.to_string())));
        self.metrics
            .store_op("commit_rotation", started.elapsed(), res.is_ok());
        match res {
            Ok(true) => {
                let done = Arc::new(TokenState {
                    access: next.access.clone(),
                    expires_at: next.expires_at,
                    generation: next.generation,
                    status: GrantStatus::Ok,
                    refreshed_at: next.refreshed_at,
                    refresh: next.refresh.clone(),
                    persisted: true,
                    bearer: Default::default(),
                    fingerprint: Default::default(),
                });
                grant.state.store(done.clone());
                self.metrics.grant_state(grant);
                Ok(done)
            }
            Ok(false) => {
                // Only possible if the AS did not rotate and another process refreshed too.
                tracing::error!(grant = %grant.label(), "the store holds a newer token generation than this refresh; adopting it");
                self.adopt_newer(grant, from_generation)
                    .await
                    .ok_or_else(|| TokenError::Store("conflicting token generations".into()))
            }
            Err(e) => {
                // `next` stays in memory, unpersisted: the next request retries the commit before
                // using the token, and the rotated refresh token is not lost while we run.
                tracing::error!(grant = %grant.label(), error = %e, "could not store a rotated refresh token");
                Err(e)
            }
        }
    }

    /// Adopts the stored state if it is newer than `generation`.
    async fn adopt_newer(&self, grant: &Arc<Grant>, generation: i64) -> Option<Arc<TokenState>> {
        let store = self.store.clone();
        let id = grant.id;
        let stored = tokio::task::spawn_blocking(move || store.load(id))
            .await
            .ok()?
            .ok()??;
        if stored.generation > generation {
            let st = Arc::new(TokenState::from_stored(&stored));
            grant.state.store(st.clone());
            self.metrics.grant_state(grant);
            return Some(st);
        }
        None
    }

    async fn mark_needs_reauth(&self, grant: &Arc<Grant>, org: &str, description: &str) {
        let st = grant.state.load_full();
        grant.state.store(Arc::new(TokenState {
            access: None,
            expires_at: 0,
            generation: st.generation,
            status: GrantStatus::NeedsReauth,
            refreshed_at: st.refreshed_at,
            refresh: st.refresh.clone(),
            persisted: st.persisted,
            bearer: Default::default(),
            fingerprint: Default::default(),
        }));
        let store = self.store.clone();
        let id = grant.id;
        let res =
            tokio::task::spawn_blocking(move || store.set_status(id, GrantStatus::NeedsReauth))
                .await;
        if !matches!(res, Ok(Ok(()))) {
            tracing::error!(grant = %grant.label(), "could not record that the grant needs re-authorization");
        }
        self.metrics.grant_state(grant);
        self.audit
            .token_event(TokenEvent::needs_reauth(grant, org, description));
        tracing::warn!(grant = %grant.label(), "grant needs re-authorization (invalid_grant)");
    }

    fn needs_reauth(&self, grant: &Grant, org: &str) -> TokenError {
        TokenError::NeedsReauth {
            integration: grant.integration.name.clone(),
            org: org.to_owned(),
        }
    }

    /// Seeds a grant from an existing refresh token: refreshes it at once (which rotates it) and
    /// stores the result for `organizations`. The imported token is durable before the call.
    pub async fn import(
        &self,
        integration: &str,
        organizations: &[String],
        refresh_token: Secret,
    ) -> Result<Arc<Grant>, ImportError> {
        let it = self
            .integrations
            .get(integration)
            .cloned()
            .ok_or_else(|| ImportError::UnknownIntegration(integration.to_owned()))?;
        let store = self.store.clone();
        let (integ, token) = (integration.to_owned(), refresh_token.clone());
        let id = tokio::task::spawn_blocking(move || store.insert_pending(&integ, &token))
            .await
            .map_err(|e| ImportError::Store(e.to_string()))?
            .map_err(|e| ImportError::Store(e.to_string()))?;
        let grant = Arc::new(Grant {
            id,
            integration: it.clone(),
            organizations: organizations.to_vec(),
            created_at: now_unix(),
            state: ArcSwap::from_pointee(TokenState {
                access: None,
                expires_at: 0,
                generation: 0,
                status: GrantStatus::Ok,
                refreshed_at: None,
                refresh: refresh_token,
                persisted: true,
                bearer: Default::default(),
                fingerprint: Default::default(),
            }),
            refreshing: tokio::sync::Mutex::new(()),
            last_used: AtomicI64::new(0),
        });
        let org = organizations.first().cloned().unwrap_or_default();
        let outcome = self.refresh(&grant, &org, 0, RefreshCause::Expiring).await;
        let store = self.store.clone();
        match outcome {
            Ok(_) => {
                let (integ, orgs) = (integration.to_owned(), organizations.to_vec());
                tokio::task::spawn_blocking(move || store.assign(id, &integ, &orgs))
                    .await
                    .map_err(|e| ImportError::Store(e.to_string()))?
                    .map_err(|e| ImportError::Store(e.to_string()))?;
                self.audit.token_event(TokenEvent::added(&grant, "import"));
                self.reload()
                    .map_err(|e| ImportError::Store(e.to_string()))?;
                Ok(self.lookup(integration, &org).unwrap_or(grant))
            }
            Err(e) => {
                if matches!(
                    e,
                    TokenError::NeedsReauth { .. } | TokenError::AuthServer(_)
                ) {
                    let _ = tokio::task::spawn_blocking(move || store.delete(id)).await;
                }
                Err(ImportError::Refresh(e))
            }
        }
    }
}

/// Why a revocation failed.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("the authorization server did not revoke the token ({0}); the grant is kept")]
    AuthServer(OAuthError),
    #[error("revoked at the authorization server, but the store could not delete the grant: {0}")]
    Store(String),
}

/// Why `grants import` failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("no integration named {0:?} in the configuration")]
    UnknownIntegration(String),
    #[error("the imported refresh token could not be used: {0}")]
    Refresh(TokenError),
    #[error("token store: {0}")]
    Store(String),
}
