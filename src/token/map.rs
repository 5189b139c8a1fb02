//! Which grant serves an (integration, organization): the in-memory map, re-read from the store
//! when another process (the `grants` CLI, a consent callback, another instance) changed it.

use super::events::{EventKind, EventSink, StoreOp, TokenEvent};
use super::refresh::Flight;
use super::state::TokenState;
use super::store::{Store, StoreError, StoredGrant};
use crate::config::Integration;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A miss re-reads the store at most this often.
const RELOAD_ON_MISS_EVERY: Duration = Duration::from_secs(5);

/// One grant: a refresh token an org admin gave an integration, covering some organizations.
pub struct Grant {
    pub id: i64,
    /// The integration's settings; swapped when a configuration reload changes them.
    integration: ArcSwap<Integration>,
    pub organizations: Arc<[String]>,
    pub created_at: i64,
    pub(super) state: ArcSwap<TokenState>,
    /// Single flight: held while a refresh (token call and commit) runs.
    pub(super) flight: tokio::sync::Mutex<Flight>,
    /// Clock milliseconds before which no token call is made (backoff after a failure); read
    /// without the lock so an outage does not queue every request behind it.
    pub(super) retry_at_ms: AtomicI64,
    last_used: AtomicI64,
}

impl Grant {
    /// A grant at this state.
    pub(super) fn new(
        id: i64,
        integration: Arc<Integration>,
        organizations: Vec<String>,
        created_at: i64,
        state: TokenState,
        last_used: i64,
    ) -> Self {
        Grant {
            id,
            integration: ArcSwap::new(integration),
            organizations: organizations.into(),
            created_at,
            state: ArcSwap::from_pointee(state),
            flight: tokio::sync::Mutex::new(Flight::default()),
            retry_at_ms: AtomicI64::new(0),
            last_used: AtomicI64::new(last_used),
        }
    }

    /// The integration this grant belongs to, as currently configured.
    pub fn integration(&self) -> Arc<Integration> {
        self.integration.load_full()
    }

    /// The current (committed) token state.
    pub fn state(&self) -> Arc<TokenState> {
        self.state.load_full()
    }

    /// Unix seconds of the last request served with this grant (0: none since it was stored).
    pub fn last_used(&self) -> i64 {
        self.last_used.load(Ordering::Relaxed)
    }

    pub(super) fn set_last_used(&self, at: i64) {
        self.last_used.fetch_max(at, Ordering::Relaxed);
    }

    /// A label for logs: never a secret.
    pub fn label(&self) -> String {
        format!(
            "{}/{}",
            self.integration.load().name,
            self.organizations.join(",")
        )
    }

    /// An event about this grant at its current state.
    pub fn event(&self, kind: EventKind) -> TokenEvent {
        let st = self.state();
        TokenEvent {
            kind,
            grant_id: self.id,
            integration: Arc::from(self.integration.load().name.as_str()),
            organizations: self.organizations.clone(),
            organization: None,
            cause: None,
            generation: st.generation,
            status: st.status,
            expires_at: st.expires_at,
            fingerprint: st.fingerprint().cloned(),
            call_duration: None,
            detail: None,
        }
    }

    /// Adopts `stored` if it is newer than what this process holds (another process rotated,
    /// or marked the grant). Never goes back to an older generation.
    pub(super) fn adopt(&self, stored: &StoredGrant) -> Option<Arc<TokenState>> {
        let mut adopted = None;
        self.state.rcu(|cur| {
            let newer = stored.generation > cur.generation
                || (stored.generation == cur.generation && stored.status != cur.status);
            if newer {
                let st = Arc::new(TokenState::from_stored(stored));
                adopted = Some(st.clone());
                st
            } else {
                adopted = None;
                cur.clone()
            }
        });
        adopted
    }
}

type Map = HashMap<String, HashMap<String, Arc<Grant>>>;

/// All grants, by integration and organization.
pub struct GrantMap {
    map: ArcSwap<Map>,
    /// The configured integrations, by name (replaced by a configuration reload).
    integrations: ArcSwap<HashMap<String, Arc<Integration>>>,
    store: Arc<dyn Store>,
    events: Arc<dyn EventSink>,
    /// Single flight for reloads on a miss, and when the last one ran.
    reloading: tokio::sync::Mutex<Option<Instant>>,
}

impl GrantMap {
    /// An empty map; [`GrantMap::reload`] fills it.
    pub fn new(
        integrations: &[Arc<Integration>],
        store: Arc<dyn Store>,
        events: Arc<dyn EventSink>,
    ) -> Self {
        GrantMap {
            map: ArcSwap::from_pointee(Map::new()),
            integrations: ArcSwap::from_pointee(by_name(integrations)),
            store,
            events,
            reloading: tokio::sync::Mutex::new(None),
        }
    }

    /// The configured integration with this name.
    pub fn integration(&self, name: &str) -> Option<Arc<Integration>> {
        self.integrations.load().get(name).cloned()
    }

    /// Replaces the configured integrations (a configuration reload); [`GrantMap::reload`]
    /// then gives known grants their integration's new settings, and drops the grants of
    /// integrations no longer configured from the map (not from the store).
    pub fn set_integrations(&self, integrations: &[Arc<Integration>]) {
        self.integrations.store(Arc::new(by_name(integrations)));
    }

    /// Re-reads the grant list from the store. Grants already known keep their in-memory state
    /// (and their refresh lock) unless the store holds a newer generation.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let stored = self.store.load_all().await;
        self.events.store(StoreOp {
            op: "reload",
            elapsed: started.elapsed(),
            ok: stored.is_ok(),
        });
        let stored = stored?;
        let integrations = self.integrations.load();
        let old = self.map.load();
        let mut map = Map::new();
        for g in stored {
            if g.organizations.is_empty() {
                continue;
            }
            let Some(it) = integrations.get(&g.integration) else {
                tracing::warn!(integration = %g.integration, grant = g.id, "stored grant for an integration not in the configuration; ignored");
                continue;
            };
            let existing = old
                .get(&g.integration)
                .and_then(|orgs| orgs.values().find(|x| x.id == g.id))
                .cloned();
            let grant = match existing {
                Some(grant) => {
                    if !Arc::ptr_eq(&grant.integration.load(), it) {
                        grant.integration.store(it.clone());
                    }
                    if grant.adopt(&g).is_some() {
                        self.events.token(grant.event(EventKind::Loaded));
                    }
                    grant
                }
                None => {
                    let grant = Arc::new(Grant::new(
                        g.id,
                        it.clone(),
                        g.organizations.clone(),
                        g.created_at,
                        TokenState::from_stored(&g),
                        g.last_used_at.unwrap_or(0),
                    ));
                    self.events.token(grant.event(EventKind::Loaded));
                    grant
                }
            };
            for org in &g.organizations {
                map.entry(g.integration.clone())
                    .or_default()
                    .insert(org.clone(), grant.clone());
            }
        }
        self.map.store(Arc::new(map));
        Ok(())
    }

    /// The grant for this integration and organization, from memory.
    pub fn lookup(&self, integration: &str, org: &str) -> Option<Arc<Grant>> {
        self.map
            .load()
            .get(integration)
            .and_then(|m| m.get(org))
            .cloned()
    }

    /// The grant for this integration and organization. On a miss, re-reads the store (single
    /// flight, at most every few seconds, on the blocking pool), so a grant added by another
    /// process is found; requests for other organizations never wait for it.
    pub async fn get(&self, integration: &str, org: &str) -> Option<Arc<Grant>> {
        if let Some(g) = self.lookup(integration, org) {
            return Some(g);
        }
        let mut last = self.reloading.lock().await;
        if let Some(g) = self.lookup(integration, org) {
            return Some(g);
        }
        if last.is_none_or(|t| t.elapsed() >= RELOAD_ON_MISS_EVERY) {
            *last = Some(Instant::now());
            if let Err(e) = self.reload().await {
                tracing::warn!(error = %crate::report::chain(&e), "re-reading grants from the store failed");
            }
        }
        self.lookup(integration, org)
    }

    /// Every grant, once each, by id.
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
}

fn by_name(integrations: &[Arc<Integration>]) -> HashMap<String, Arc<Integration>> {
    integrations
        .iter()
        .map(|i| (i.name.clone(), i.clone()))
        .collect()
}
