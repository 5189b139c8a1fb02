//! One grant: a refresh token an org admin gave an integration, covering some organizations.
//! It owns its current token state, its single-flight lock (and what the refresh engine keeps
//! behind it), and what Meraki's answers have taught about it: when its token was last seen
//! working, and at which operations Meraki refuses its tokens whatever their age.

use super::events::{EventKind, RefreshCause, TokenEvent};
use super::probe::Probe;
use super::state::TokenState;
use super::store::{Rotation, StoredGrant};
use crate::config::Integration;
use crate::scope::ScopeSet;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// At most this many operations are remembered as refused per grant; the one remembered
/// longest ago is forgotten first.
pub const MAX_REFUSED_OPERATIONS: usize = 64;

/// How many operations a generation remembers having been minted (or adopted) for.
const MAX_MINTED_FOR: usize = 16;

/// One grant.
pub struct Grant {
    pub id: i64,
    /// The integration's settings; swapped when a configuration reload changes them.
    integration: ArcSwap<Integration>,
    pub organizations: Arc<[String]>,
    pub created_at: i64,
    pub(super) state: ArcSwap<TokenState>,
    /// Single flight: held while a refresh (token call and commit) or a probe runs.
    pub(super) flight: tokio::sync::Mutex<Flight>,
    /// Clock milliseconds before which no token call is made (backoff after a failure); read
    /// without the lock so an outage does not queue every request behind it.
    pub(super) retry_at_ms: AtomicI64,
    last_used: AtomicI64,
    /// The last time Meraki answered 2xx to this grant's token, packed as
    /// `(unix seconds << 32) | (generation as u32)`: written at most once a second per thread.
    works: AtomicU64,
    /// Evidence from Meraki's 401s (see [`Learnt`]); `refused_count` lets the 2xx path skip the
    /// lock while nothing is remembered.
    learnt: Mutex<Learnt>,
    refused_count: AtomicUsize,
    /// Operations a generation was minted for that have not answered since (lets the 2xx path
    /// skip the lock once each has).
    minted_count: AtomicUsize,
    /// The scopes Meraki's last token response named (`scope`), as [`ScopeSet`] bits with
    /// [`SCOPES_KNOWN`] set; 0 while Meraki has named none.
    scopes: AtomicU64,
}

/// Marks [`Grant::scopes`] as Meraki's word (bit 63; scopes use the low 36 bits).
const SCOPES_KNOWN: u64 = 1 << 63;

/// Per-grant refresh state, behind the grant's single-flight lock.
#[derive(Default)]
pub(crate) struct Flight {
    /// A rotation the authorization server made that the store has not taken yet.
    pub(super) pending: Option<Pending>,
    /// Consecutive failed token calls.
    pub(super) failures: u32,
    /// The failure class of the last one, for the 503 body.
    pub(super) last_failure: Option<&'static str>,
    /// The last probe of the token: its generation, clock ms, and what Meraki said.
    pub(super) probed: Option<(i64, i64, Probe)>,
}

/// A rotation the authorization server made, until the store takes it.
pub(super) struct Pending {
    pub(super) rotation: Rotation,
    pub(super) from: i64,
    pub(super) cause: RefreshCause,
    pub(super) rotated: bool,
    pub(super) took: Duration,
}

/// One operation at which Meraki refuses the grant's tokens.
#[derive(Debug, Clone)]
pub struct RefusedOperation {
    pub operation: Arc<str>,
    /// Clock ms it was remembered at, and until when.
    pub since_ms: i64,
    pub until_ms: i64,
    /// The generation refused there again.
    pub generation: i64,
}

/// What 401s taught about a grant.
#[derive(Default)]
struct Learnt {
    /// The operations whose 401s led to this generation being minted or adopted (a token
    /// obtained because of a 401 there).
    minted_for: Option<(i64, Vec<Arc<str>>)>,
    /// Operations where such a token was refused again.
    refused: HashMap<Arc<str>, RefusedOperation>,
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
            works: AtomicU64::new(0),
            learnt: Mutex::new(Learnt::default()),
            refused_count: AtomicUsize::new(0),
            minted_count: AtomicUsize::new(0),
            scopes: AtomicU64::new(0),
        }
    }

    /// The scopes the grant holds: those Meraki's token response named, else the
    /// integration's configured `scopes`; `None` when neither says (no scope is checked).
    #[inline]
    pub fn scopes(&self) -> Option<ScopeSet> {
        let bits = self.scopes.load(Ordering::Relaxed);
        if bits & SCOPES_KNOWN != 0 {
            return Some(ScopeSet::from_bits(bits));
        }
        let configured = self.integration.load().scope_set;
        (!configured.is_empty()).then_some(configured)
    }

    /// Whether [`Grant::scopes`] are Meraki's word (else the configuration's).
    pub fn scopes_from_meraki(&self) -> bool {
        self.scopes.load(Ordering::Relaxed) & SCOPES_KNOWN != 0
    }

    /// Takes the `scope` of a token response (or the store's copy of it). A blank one says
    /// nothing and changes nothing; words that are no scope of Meraki's are logged and left
    /// out.
    pub(super) fn learn_scopes(&self, scope: &str) {
        if scope.trim().is_empty() {
            return;
        }
        let (set, unknown) = ScopeSet::parse_list(scope);
        let bits = set.bits() | SCOPES_KNOWN;
        // The store's copy is read again at every sync: say it once per change.
        if self.scopes.swap(bits, Ordering::Relaxed) != bits && !unknown.is_empty() {
            tracing::warn!(grant = %self.label(), unknown = ?unknown, "the token response names scopes this proxy does not know; they are left out of the scope check");
        }
    }

    /// The integration this grant belongs to, as currently configured.
    pub fn integration(&self) -> Arc<Integration> {
        self.integration.load_full()
    }

    pub(super) fn set_integration(&self, it: &Arc<Integration>) {
        if !Arc::ptr_eq(&self.integration.load(), it) {
            self.integration.store(it.clone());
        }
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
    /// or marked the grant). Never goes back to an older generation. A change of health (a
    /// re-authorization, or a grant marked as needing one) forgets what 401s taught.
    pub(super) fn adopt(&self, stored: &StoredGrant) -> Option<Arc<TokenState>> {
        self.learn_scopes(&stored.scope);
        let mut adopted = None;
        let mut health_changed = false;
        self.state.rcu(|cur| {
            let newer = stored.generation > cur.generation
                || (stored.generation == cur.generation && stored.status != cur.status);
            health_changed = stored.status != cur.status;
            if newer {
                let st = Arc::new(TokenState::from_stored(stored));
                adopted = Some(st.clone());
                st
            } else {
                adopted = None;
                cur.clone()
            }
        });
        if adopted.is_some() && health_changed {
            self.forget_refusals();
        }
        adopted
    }

    // ---- what Meraki's answers taught ----

    /// Meraki answered 2xx to generation `generation` at unix second `now`, at the operation
    /// `operation` names (computed only when something was minted for an operation).
    pub(super) fn answered(&self, generation: i64, now: i64, operation: &dyn Fn() -> String) {
        self.saw_working(generation, now);
        self.answered_where_minted(generation, operation);
    }

    /// Meraki answered 2xx to generation `generation` at unix second `now`.
    pub(super) fn saw_working(&self, generation: i64, now: i64) {
        let packed = ((now.max(0) as u64) << 32) | (generation as u32 as u64);
        if self.works.load(Ordering::Relaxed) != packed {
            self.works.store(packed, Ordering::Relaxed);
        }
    }

    /// Whether Meraki answered 2xx to generation `generation` after unix second `since`.
    pub(super) fn works_since(&self, generation: i64, since: i64) -> bool {
        let packed = self.works.load(Ordering::Relaxed);
        let (at, generation_bits) = ((packed >> 32) as i64, packed as u32);
        packed != 0 && generation_bits == generation as u32 && at > since
    }

    /// Records that `generation` was minted or adopted because Meraki refused the previous
    /// token at `operation`.
    pub(super) fn minted_for(&self, generation: i64, operation: &str) {
        let mut l = self.lock_learnt();
        match &mut l.minted_for {
            Some((g, ops)) if *g == generation => {
                if !ops.iter().any(|o| &**o == operation) && ops.len() < MAX_MINTED_FOR {
                    ops.push(Arc::from(operation));
                }
            }
            Some((g, _)) if *g > generation => {}
            _ => l.minted_for = Some((generation, vec![Arc::from(operation)])),
        }
        self.minted_count.store(
            l.minted_for.as_ref().map_or(0, |m| m.1.len()),
            Ordering::Relaxed,
        );
    }

    /// Meraki answered 2xx at `operation` to `generation`: a token minted for a 401 there
    /// works there, so a later 401 there is no evidence of a lasting refusal.
    fn answered_where_minted(&self, generation: i64, operation: &dyn Fn() -> String) {
        if self.minted_count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let op = operation();
        let mut l = self.lock_learnt();
        if let Some((g, ops)) = &mut l.minted_for {
            if *g == generation {
                ops.retain(|o| **o != *op);
            }
        }
        self.minted_count.store(
            l.minted_for.as_ref().map_or(0, |m| m.1.len()),
            Ordering::Relaxed,
        );
    }

    /// Whether `generation` was obtained because of a 401 at `operation`; the mark is used up
    /// (one piece of evidence remembers an operation once, so a memory that runs out is
    /// checked again with one refresh).
    pub(super) fn take_minted_for(&self, generation: i64, operation: &str) -> bool {
        let mut l = self.lock_learnt();
        let Some((g, ops)) = &mut l.minted_for else {
            return false;
        };
        let Some(i) = ops.iter().position(|o| &**o == operation) else {
            return false;
        };
        if *g != generation {
            return false;
        }
        ops.swap_remove(i);
        let left = ops.len();
        self.minted_count.store(left, Ordering::Relaxed);
        true
    }

    /// Remembers that Meraki refuses this grant's tokens at `operation` until `until_ms`.
    /// Returns the entry when it is new (not a renewal).
    pub(super) fn remember_refused(
        &self,
        operation: &str,
        generation: i64,
        now_ms: i64,
        until_ms: i64,
    ) -> Option<RefusedOperation> {
        let mut l = self.lock_learnt();
        l.refused.retain(|_, r| r.until_ms > now_ms);
        if let Some(r) = l.refused.get_mut(operation) {
            r.until_ms = until_ms;
            r.generation = generation;
            self.refused_count.store(l.refused.len(), Ordering::Relaxed);
            return None;
        }
        if l.refused.len() >= MAX_REFUSED_OPERATIONS {
            if let Some(oldest) = l
                .refused
                .values()
                .min_by_key(|r| r.since_ms)
                .map(|r| r.operation.clone())
            {
                l.refused.remove(&oldest);
            }
        }
        let r = RefusedOperation {
            operation: Arc::from(operation),
            since_ms: now_ms,
            until_ms,
            generation,
        };
        l.refused.insert(r.operation.clone(), r.clone());
        self.refused_count.store(l.refused.len(), Ordering::Relaxed);
        Some(r)
    }

    /// Whether Meraki's refusals at `operation` are remembered at clock ms `now_ms`.
    pub(super) fn is_refused(&self, operation: &str, now_ms: i64) -> bool {
        if self.refused_count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.lock_learnt()
            .refused
            .get(operation)
            .is_some_and(|r| r.until_ms > now_ms)
    }

    /// Whether any refusal is remembered (the 2xx path's fast check).
    pub(super) fn has_refusals(&self) -> bool {
        self.refused_count.load(Ordering::Relaxed) > 0
    }

    /// Forgets `operation` (Meraki answered 2xx there) and any refusal whose time is up;
    /// returns what was forgotten.
    pub(super) fn forget_refused(&self, operation: &str, now_ms: i64) -> Vec<RefusedOperation> {
        let mut l = self.lock_learnt();
        let mut gone = Vec::new();
        l.refused.retain(|op, r| {
            let keep = r.until_ms > now_ms && &**op != operation;
            if !keep {
                gone.push(r.clone());
            }
            keep
        });
        self.refused_count.store(l.refused.len(), Ordering::Relaxed);
        gone
    }

    /// Forgets everything 401s taught (a configuration reload, a re-authorization).
    pub(super) fn forget_refusals(&self) -> usize {
        let mut l = self.lock_learnt();
        let n = l.refused.len();
        *l = Learnt::default();
        self.refused_count.store(0, Ordering::Relaxed);
        self.minted_count.store(0, Ordering::Relaxed);
        n
    }

    /// The operations remembered as refused at clock ms `now_ms`, by operation.
    pub fn refused_operations(&self, now_ms: i64) -> Vec<RefusedOperation> {
        if !self.has_refusals() {
            return Vec::new();
        }
        let l = self.lock_learnt();
        let mut out: Vec<RefusedOperation> = l
            .refused
            .values()
            .filter(|r| r.until_ms > now_ms)
            .cloned()
            .collect();
        out.sort_by(|a, b| a.operation.cmp(&b.operation));
        out
    }

    fn lock_learnt(&self) -> std::sync::MutexGuard<'_, Learnt> {
        // What is learnt stays consistent at every step; a panic elsewhere does not spoil it.
        self.learnt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
