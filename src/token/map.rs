//! Which grant serves an (integration, organization): the in-memory map, re-read from the store
//! when another process (the `grants` CLI, a consent callback, another instance) changed it.

use super::events::{EventKind, EventSink, StoreOp};
use super::grant::Grant;
use super::state::TokenState;
use super::store::{Store, StoreError};
use crate::config::Integration;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A miss re-reads the store at most this often.
const RELOAD_ON_MISS_EVERY: Duration = Duration::from_secs(5);

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
    /// Reloads that changed which grant serves which (integration, organization): caches of
    /// what a grant sees compare it ([`GrantMap::changes`]).
    changes: AtomicU64,
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
            changes: AtomicU64::new(0),
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
                    grant.set_integration(it);
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
                    grant.learn_scopes(&g.scope);
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
        if !same_assignment(&old, &map) {
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
        self.map.store(Arc::new(map));
        Ok(())
    }

    /// How many reloads so far changed which grant serves which (integration, organization).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
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

/// Whether two maps give every (integration, organization) the same grant.
fn same_assignment(a: &Map, b: &Map) -> bool {
    a.len() == b.len()
        && a.iter().all(|(it, orgs)| {
            b.get(it).is_some_and(|other| {
                orgs.len() == other.len()
                    && orgs
                        .iter()
                        .all(|(org, g)| other.get(org).is_some_and(|h| h.id == g.id))
            })
        })
}

fn by_name(integrations: &[Arc<Integration>]) -> HashMap<String, Arc<Integration>> {
    integrations
        .iter()
        .map(|i| (i.name.clone(), i.clone()))
        .collect()
}
