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
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            refresh_ahead: Duration::from_secs(300),
            rejected_grace: Duration::from_secs(30),
            min_lifetime: Duration::from_secs(30),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
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
        let st = grant.state();
        let started = Instant::now();
        let answer = self
            .endpoint
            .refresh(&grant.integration(), st.refresh_token())
            .await;
        let took = started.elapsed();
        match answer {
            Ok(resp) => {
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
                self.commit(grant, org, &mut flight, pending).await
            }
            Err(OAuthError::InvalidGrant(description)) => {
                if let Some(adopted) = self.adopt_newer(grant).await {
                    return Ok(adopted);
                }
                self.mark_needs_reauth(grant, org, &description, took).await;
                Err(needs_reauth(grant, org))
            }
            Err(e) => {
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
        description: &str,
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
        e.detail = Some(format!("invalid_grant: {description}"));
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
