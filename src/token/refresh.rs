//! The refresh engine: one token call per need, whatever the traffic.
//!
//! Invariants (each has a unit test below, with paused time):
//! - requests only ever see committed tokens: a rotation is stored before its access token is
//!   handed out, and a rotation the store did not take is retried before anything else;
//! - at most one refresh per grant runs at a time, and a request that waited for it re-checks
//!   what it needs against the state it finds: a fresh token committed while it waited is used,
//!   and a 401 leads to a refresh only if the rejected generation is still the current one;
//! - a token minted moments ago that Meraki refuses is not refreshed again (the refusal is not
//!   about the token's age, and refreshing would rotate the grant for nothing);
//! - after a failed token call, no token call is made before a capped, jittered exponential
//!   backoff has passed: requests whose token is still valid go on, others get a 503 with an
//!   honest `Retry-After`.

use super::events::{EventKind, EventSink, RefreshCause, StoreOp};
use super::map::Grant;
use super::oauth::{OAuthError, TokenEndpoint};
use super::state::TokenState;
use super::store::{GrantStatus, Rotation, Store};
use super::TokenError;
use crate::clock::Clock;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// When and how the engine refreshes.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Refresh this long before expiry (but never before half the lifetime).
    pub refresh_ahead: Duration,
    /// A token younger than this that Meraki refuses is not refreshed again.
    pub rejected_grace: Duration,
    /// Access tokens shorter-lived than this are logged and counted.
    pub min_lifetime: Duration,
    /// The first backoff after a failed token call; doubles per failure.
    pub backoff_base: Duration,
    /// The longest backoff.
    pub backoff_max: Duration,
    /// How long a request whose token has expired waits for another instance's refresh (the
    /// lease) before it is answered 503.
    pub lease_wait: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            refresh_ahead: Duration::from_secs(300),
            rejected_grace: Duration::from_secs(30),
            min_lifetime: Duration::from_secs(30),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            lease_wait: Duration::from_secs(35),
        }
    }
}

/// Per-grant refresh state, behind the grant's single-flight lock.
#[derive(Default)]
pub(crate) struct Flight {
    /// A rotation the authorization server made that the store has not taken yet.
    pending: Option<Pending>,
    /// Consecutive failed token calls.
    failures: u32,
    /// The failure class of the last one, for the 503 body.
    last_failure: Option<&'static str>,
}

struct Pending {
    rotation: Rotation,
    from: i64,
    cause: RefreshCause,
    rotated: bool,
    took: Duration,
}

/// What the caller needs.
#[derive(Debug, Clone, Copy)]
enum Need {
    /// A usable token (the one it saw is past its refresh point).
    Fresh,
    /// A token other than generation `generation`, which Meraki refused.
    Replacing { generation: i64 },
    /// A refresh whatever the token's age, unless one happened since `generation`.
    Rotation { generation: i64 },
}

/// How often a request whose token has expired looks again while another instance holds the
/// grant's lease.
const LEASE_POLL: Duration = Duration::from_millis(50);

/// A held lease, and a refresh intent another instance left on the stored generation.
struct Leased {
    lease: Box<dyn super::store::Lease>,
    prior: Option<super::store::RefreshIntent>,
}

/// Refreshes grants.
pub struct Refresher {
    store: Arc<dyn Store>,
    endpoint: Arc<dyn TokenEndpoint>,
    events: Arc<dyn EventSink>,
    clock: Clock,
    policy: Policy,
}

impl Refresher {
    /// An engine over this store and authorization server.
    pub fn new(
        store: Arc<dyn Store>,
        endpoint: Arc<dyn TokenEndpoint>,
        events: Arc<dyn EventSink>,
        clock: Clock,
        policy: Policy,
    ) -> Self {
        Refresher {
            store,
            endpoint,
            events,
            clock,
            policy,
        }
    }

    /// A usable access token of `grant`, refreshed first if it is past its refresh point.
    /// `org` is the requesting organization (for events).
    pub async fn token(&self, grant: &Grant, org: &str) -> Result<Arc<TokenState>, TokenError> {
        let st = grant.state();
        if st.usable(self.clock.now(), self.policy.refresh_ahead) {
            return Ok(st);
        }
        self.refresh(grant, Some(org), Need::Fresh, RefreshCause::Expiring)
            .await
    }

    /// After Meraki answered 401 to `used`: a token of a newer generation, refreshing only if
    /// `used` is still the current one and not minted moments ago.
    pub async fn rejected(
        &self,
        grant: &Grant,
        org: &str,
        used: &TokenState,
    ) -> Result<Arc<TokenState>, TokenError> {
        self.refresh(
            grant,
            Some(org),
            Need::Replacing {
                generation: used.generation,
            },
            RefreshCause::Rejected,
        )
        .await
    }

    /// Rotates the grant (keep-alive, import) unless it was rotated since `generation`.
    pub async fn rotate(
        &self,
        grant: &Grant,
        generation: i64,
        cause: RefreshCause,
    ) -> Result<Arc<TokenState>, TokenError> {
        self.refresh(grant, None, Need::Rotation { generation }, cause)
            .await
    }

    async fn refresh(
        &self,
        grant: &Grant,
        org: Option<&str>,
        need: Need,
        cause: RefreshCause,
    ) -> Result<Arc<TokenState>, TokenError> {
        if let Some(answer) = self.while_backing_off(grant, need, None) {
            return answer;
        }
        let mut flight = grant.flight.lock().await;
        if let Some(p) = flight.pending.take() {
            // Durable before anything else: the authorization server already revoked the
            // refresh token the state in memory holds.
            self.commit(grant, org, &mut flight, p).await?;
        }
        let st = grant.state();
        if let Some(answer) = self.satisfied(grant, org, &st, need) {
            return answer;
        }
        if let Some(answer) = self.while_backing_off(grant, need, flight.last_failure) {
            return answer;
        }
        // Another process sharing the store may have rotated already: adopt, do not refresh.
        if let Some(adopted) = self.adopt_newer(grant).await {
            if let Some(answer) = self.satisfied(grant, org, &adopted, need) {
                return answer;
            }
        }
        // Across instances: the grant's lease. Under it, the stored state is read again, so a
        // rotation another instance committed meanwhile is adopted instead of repeated.
        let Leased { lease, prior } = match self.lease(grant, org, need, &mut flight).await {
            Ok(l) => l,
            Err(answer) => return answer,
        };
        let st = grant.state();
        if let Err(e) = lease.intend(st.generation).await {
            lease.release().await;
            return self.store_failed(grant, need, &mut flight, e);
        }
        fail::fail_point!("before-token-call");
        let started = Instant::now();
        let answer = self
            .endpoint
            .refresh(&grant.integration(), st.refresh_token())
            .await;
        let took = started.elapsed();
        match answer {
            Ok(resp) => {
                fail::fail_point!("after-token-answer");
                flight.failures = 0;
                flight.last_failure = None;
                grant.retry_at_ms.store(0, Ordering::Relaxed);
                let issued = self.clock.now();
                let rotated = resp.refresh_token.is_some();
                if Duration::from_secs(resp.expires_in) < self.policy.min_lifetime {
                    tracing::warn!(grant = %grant.label(), expires_in = resp.expires_in, "the authorization server issued a very short-lived access token");
                    let mut e = grant.event(EventKind::ShortLifetime);
                    e.detail = Some(format!("expires_in {} s", resp.expires_in));
                    self.events.token(e);
                }
                let pending = Pending {
                    rotation: Rotation {
                        refresh_token: resp
                            .refresh_token
                            .unwrap_or_else(|| st.refresh_token().clone()),
                        access_token: resp.access_token,
                        access_expires_at: issued + resp.expires_in as i64,
                        scope: resp.scope,
                        refreshed_at: issued,
                    },
                    from: st.generation,
                    cause,
                    rotated,
                    took,
                };
                // Nothing but the commit between the answer and the commit.
                let committed = self.commit(grant, org, &mut flight, pending).await;
                fail::fail_point!("after-commit");
                lease.release().await;
                committed
            }
            Err(OAuthError::InvalidGrant(description)) => {
                if let Some(adopted) = self.adopt_newer(grant).await {
                    lease.release().await;
                    return Ok(adopted);
                }
                // Was the refresh token rotated by a refresh that was never stored?
                let detail = match prior {
                    Some(i) if self.store.alive(&i.holder).await.unwrap_or(true) => {
                        // A live instance lost its lease during its token call and holds the
                        // new token in memory; it stores it at its next sync. Not a lost grant.
                        tracing::warn!(grant = %grant.label(), holder = %i.holder, "invalid_grant while another live instance holds an unstored rotation; waiting for it");
                        lease.release().await;
                        return Err(TokenError::OtherInstance {
                            retry_after: Duration::from_secs(2),
                        });
                    }
                    Some(i) => format!(
                        "invalid_grant: {description}; instance {} began a refresh at {} and stopped before storing the rotated refresh token (the crash window): an organization admin must connect the integration again",
                        i.holder,
                        crate::clock::rfc3339(i.since)
                    ),
                    None => format!("invalid_grant: {description}"),
                };
                self.mark_needs_reauth(grant, org, &detail, took).await;
                lease.release().await;
                Err(needs_reauth(grant, org))
            }
            Err(e) => {
                lease.release().await;
                flight.failures += 1;
                flight.last_failure = Some(e.label());
                let wait = self.backoff(flight.failures);
                grant.retry_at_ms.store(
                    self.clock.now_ms() + wait.as_millis() as i64,
                    Ordering::Relaxed,
                );
                tracing::warn!(grant = %grant.label(), error = %crate::report::chain(&e), retry_in_ms = wait.as_millis() as u64, "token refresh failed");
                let mut ev = grant.event(EventKind::RefreshFailed {
                    label: e.label(),
                    retry_in: wait,
                });
                ev.organization = org.map(str::to_owned);
                ev.cause = Some(cause);
                ev.call_duration = Some(took);
                ev.detail = Some(crate::report::chain(&e));
                self.events.token(ev);
                // A proactive refresh that failed leaves a still-valid token usable.
                if matches!(need, Need::Fresh) && st.alive(self.clock.now()) {
                    return Ok(st);
                }
                Err(TokenError::AuthServer {
                    source: e,
                    retry_after: wait,
                })
            }
        }
    }

    /// Takes the grant's lease. While another instance holds it, the store is re-read until
    /// that instance's rotation shows up (then it is used), for at most `lease_wait`; a request
    /// whose token still works does not wait at all.
    async fn lease(
        &self,
        grant: &Grant,
        org: Option<&str>,
        need: Need,
        flight: &mut Flight,
    ) -> Result<Leased, Result<Arc<TokenState>, TokenError>> {
        let started = Instant::now();
        let deadline = started + self.policy.lease_wait;
        loop {
            let attempt = self.store.try_lease(grant.id).await;
            match attempt {
                Ok(Some(lease)) => {
                    let stored = self.store.load(grant.id).await;
                    self.events.store(StoreOp {
                        op: "lease",
                        elapsed: started.elapsed(),
                        ok: stored.is_ok(),
                    });
                    let stored = match stored {
                        Ok(Some(s)) => s,
                        Ok(None) => {
                            lease.release().await;
                            return Err(Err(TokenError::Conflict));
                        }
                        Err(e) => {
                            lease.release().await;
                            return Err(self.store_failed(grant, need, flight, e));
                        }
                    };
                    if grant.adopt(&stored).is_some() {
                        self.events.token(grant.event(EventKind::Loaded));
                    }
                    // Against the state now in memory, however it got there (adopted here, or
                    // by a change notification meanwhile): what the lease's last holder did.
                    if let Some(answer) = self.satisfied(grant, org, &grant.state(), need) {
                        lease.release().await;
                        return Err(answer);
                    }
                    let prior = stored.refreshing.filter(|i| {
                        i.holder != self.store.instance() && i.from_generation == stored.generation
                    });
                    return Ok(Leased { lease, prior });
                }
                Ok(None) => {
                    self.adopt_newer(grant).await;
                    let st = grant.state();
                    let waited = |ok| StoreOp {
                        op: "lease",
                        elapsed: started.elapsed(),
                        ok,
                    };
                    if let Some(answer) = self.satisfied(grant, org, &st, need) {
                        // The holder's rotation arrived: the wait is over.
                        self.events.store(waited(true));
                        return Err(answer);
                    }
                    let now = self.clock.now();
                    if matches!(need, Need::Fresh) && st.alive(now) {
                        // Another instance is refreshing; this token serves meanwhile.
                        self.events.store(waited(true));
                        return Err(Ok(st));
                    }
                    if Instant::now() >= deadline {
                        self.events.store(waited(false));
                        return Err(Err(TokenError::OtherInstance {
                            retry_after: Duration::from_secs(1),
                        }));
                    }
                    tokio::time::sleep(LEASE_POLL).await;
                }
                Err(e) => return Err(self.store_failed(grant, need, flight, e)),
            }
        }
    }

    /// The store failed before a token call: no call is made (its rotation could not be
    /// stored); the next attempt waits a backoff, and a still-valid token keeps serving.
    fn store_failed(
        &self,
        grant: &Grant,
        need: Need,
        flight: &mut Flight,
        e: super::StoreError,
    ) -> Result<Arc<TokenState>, TokenError> {
        flight.failures += 1;
        flight.last_failure = Some("store_unavailable");
        let wait = self.backoff(flight.failures);
        grant.retry_at_ms.store(
            self.clock.now_ms() + wait.as_millis() as i64,
            Ordering::Relaxed,
        );
        tracing::warn!(grant = %grant.label(), error = %crate::report::chain(&e), retry_in_ms = wait.as_millis() as u64, "the token store is unavailable; refresh postponed");
        let st = grant.state();
        if matches!(need, Need::Fresh) && st.alive(self.clock.now()) {
            return Ok(st);
        }
        Err(TokenError::Store(e))
    }

    /// Commits a rotation the store did not take earlier (its lease was lost, or the store was
    /// down), without waiting for a request to need the grant. Skips a grant being refreshed.
    pub async fn commit_pending(&self, grant: &Grant) {
        let Ok(mut flight) = grant.flight.try_lock() else {
            return;
        };
        if let Some(p) = flight.pending.take() {
            let _ = self.commit(grant, None, &mut flight, p).await;
        }
    }

    /// Whether `st` already answers `need` (someone refreshed while the caller waited), or why
    /// no refresh may be made for it.
    fn satisfied(
        &self,
        grant: &Grant,
        org: Option<&str>,
        st: &Arc<TokenState>,
        need: Need,
    ) -> Option<Result<Arc<TokenState>, TokenError>> {
        if st.status == GrantStatus::NeedsReauth {
            return Some(Err(needs_reauth(grant, org)));
        }
        let now = self.clock.now();
        match need {
            Need::Fresh if st.usable(now, self.policy.refresh_ahead) => Some(Ok(st.clone())),
            Need::Replacing { generation } if st.generation != generation => Some(Ok(st.clone())),
            Need::Replacing { .. }
                if st.has_access()
                    && st.issued_at.is_some_and(|at| {
                        now - at < self.policy.rejected_grace.as_secs() as i64
                    }) =>
            {
                // Said by the request's audit record and a metric; no token event per request.
                Some(Err(TokenError::RejectedFresh {
                    age_secs: st.issued_at.map_or(0, |at| now - at),
                }))
            }
            Need::Rotation { generation } if st.generation != generation => Some(Ok(st.clone())),
            _ => None,
        }
    }

    /// During a backoff: the current token if it still serves, else a 503 with `Retry-After`.
    fn while_backing_off(
        &self,
        grant: &Grant,
        need: Need,
        last: Option<&'static str>,
    ) -> Option<Result<Arc<TokenState>, TokenError>> {
        let until = grant.retry_at_ms.load(Ordering::Relaxed);
        let now_ms = self.clock.now_ms();
        if until <= now_ms {
            return None;
        }
        let st = grant.state();
        let serves = match need {
            Need::Fresh => st.alive(now_ms / 1000),
            Need::Replacing { generation } => {
                st.generation != generation && st.alive(now_ms / 1000)
            }
            Need::Rotation { .. } => false,
        };
        if serves {
            return Some(Ok(st));
        }
        Some(Err(TokenError::BackingOff {
            retry_after: Duration::from_millis((until - now_ms) as u64),
            last_failure: last.unwrap_or("auth_server_error"),
        }))
    }

    /// The wait after `failures` consecutive failures: doubling from the base, capped, with
    /// ±20% jitter so grants that failed together do not retry together.
    fn backoff(&self, failures: u32) -> Duration {
        let base = self.policy.backoff_base.as_millis() as u64;
        let exp = base.saturating_mul(1u64 << failures.saturating_sub(1).min(20));
        let capped = exp.min(self.policy.backoff_max.as_millis() as u64).max(1);
        let jitter = capped / 5;
        let ms = capped - jitter + rand::random::<u64>() % (2 * jitter + 1);
        Duration::from_millis(ms)
    }

    /// Commits a rotation; on success the grant's state becomes it and the event is emitted.
    /// On a store failure the rotation is kept and retried before the token is ever used.
    async fn commit(
        &self,
        grant: &Grant,
        org: Option<&str>,
        flight: &mut Flight,
        p: Pending,
    ) -> Result<Arc<TokenState>, TokenError> {
        let started = Instant::now();
        let res = self
            .store
            .commit_rotation(grant.id, p.from, &p.rotation)
            .await;
        self.events.store(StoreOp {
            op: "commit_rotation",
            elapsed: started.elapsed(),
            ok: res.is_ok(),
        });
        match res {
            Ok(true) => {
                let next = Arc::new(TokenState::rotated(&p.rotation, p.from));
                grant.state.store(next.clone());
                let mut e = grant.event(EventKind::Refreshed { rotated: p.rotated });
                e.organization = org.map(str::to_owned);
                e.cause = Some(p.cause);
                e.call_duration = Some(p.took);
                self.events.token(e);
                Ok(next)
            }
            Ok(false) => {
                // Only possible if the authorization server did not rotate and another process
                // refreshed too: the store's generation is the truth.
                tracing::error!(grant = %grant.label(), "the store holds a newer token generation than this refresh; adopting it");
                self.adopt_newer(grant).await.ok_or(TokenError::Conflict)
            }
            Err(e) => {
                tracing::error!(grant = %grant.label(), error = %crate::report::chain(&e), "could not store a rotated refresh token; kept in memory and retried before use");
                let mut ev = grant.event(EventKind::CommitFailed);
                ev.organization = org.map(str::to_owned);
                ev.detail = Some(crate::report::chain(&e));
                self.events.token(ev);
                flight.pending = Some(p);
                Err(TokenError::Store(e))
            }
        }
    }

    /// Adopts the stored state if it is newer than the one in memory.
    async fn adopt_newer(&self, grant: &Grant) -> Option<Arc<TokenState>> {
        let stored = match self.store.load(grant.id).await {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(grant = %grant.label(), error = %crate::report::chain(&e), "could not re-read the grant from the store");
                return None;
            }
        };
        let adopted = grant.adopt(&stored)?;
        self.events.token(grant.event(EventKind::Loaded));
        Some(adopted)
    }

    async fn mark_needs_reauth(
        &self,
        grant: &Grant,
        org: Option<&str>,
        detail: &str,
        took: Duration,
    ) {
        let st = grant.state();
        grant
            .state
            .store(Arc::new(st.with_status(GrantStatus::NeedsReauth)));
        let started = Instant::now();
        let res = self
            .store
            .set_status(grant.id, GrantStatus::NeedsReauth)
            .await;
        self.events.store(StoreOp {
            op: "set_status",
            elapsed: started.elapsed(),
            ok: res.is_ok(),
        });
        if let Err(e) = res {
            tracing::error!(grant = %grant.label(), error = %crate::report::chain(&e), "could not record that the grant needs re-authorization");
        }
        let mut e = grant.event(EventKind::NeedsReauth);
        e.organization = org.map(str::to_owned);
        e.call_duration = Some(took);
        e.detail = Some(detail.to_owned());
        self.events.token(e);
        tracing::warn!(grant = %grant.label(), "grant needs re-authorization (invalid_grant)");
    }
}

fn needs_reauth(grant: &Grant, org: Option<&str>) -> TokenError {
    TokenError::NeedsReauth {
        integration: grant.integration().name.clone(),
        org: org.map_or_else(|| grant.organizations.join(","), str::to_owned),
    }
}
