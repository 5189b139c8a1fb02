//! The refresh engine: one token call per need, whatever the traffic.
//!
//! Invariants (each has a unit test below, with paused time):
//! - requests only ever see committed tokens: a rotation is stored before its access token is
//!   handed out, and a rotation the store did not take is retried before anything else;
//! - at most one refresh per grant runs at a time, and a request that waited for it re-checks
//!   what it needs against the state it finds: a fresh token committed while it waited is used,
//!   and a 401 leads to a refresh only if the rejected generation is still the current one;
//! - a 401 leads to at most one refresh per token generation, whatever the token's age; a
//!   refusal a refresh cannot cure is known by evidence, not by age: a token obtained because of
//!   a 401 at an operation and refused again at that operation makes the grant remember the
//!   operation for `refused_operation_memory`; its 401s then pass through without a refresh,
//!   but only while the grant's current token is seen working (a 2xx with this generation in
//!   the last [`EVIDENCE`], or a probe Meraki answers 2xx): a token that really died is
//!   refreshed even for a script that calls nothing but the remembered operation;
//! - after a failed token call, no token call is made before a capped, jittered exponential
//!   backoff has passed: requests whose token is still valid go on, others get a 503 with an
//!   honest `Retry-After`.

use super::events::{EventKind, EventSink, RefreshCause, StoreOp};
use super::grant::{Flight, Grant, Pending};
use super::oauth::{OAuthError, TokenEndpoint};
use super::probe::{Probe, TokenProbe};
use super::state::TokenState;
use super::store::{GrantStatus, Rotation, Store};
use super::TokenError;
use crate::clock::Clock;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

/// When and how the engine refreshes.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Refresh this long before expiry (but never before half the lifetime).
    pub refresh_ahead: Duration,
    /// How long "Meraki refuses this grant's tokens at this operation" is remembered.
    pub refused_operation_memory: Duration,
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
            refused_operation_memory: Duration::from_secs(600),
            min_lifetime: Duration::from_secs(30),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            lease_wait: Duration::from_secs(35),
        }
    }
}

/// How recent a 2xx (or a probe) must be to count as evidence that a grant's token works.
/// Short, because a token can die at any moment: a script that calls nothing but a remembered
/// operation has a dead token refreshed within this long, at the cost of at most one probe per
/// grant in that time.
pub const EVIDENCE: Duration = Duration::from_secs(2);

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

/// What taking the lease came to: held, or the need answered meanwhile (another instance's
/// rotation arrived, the token still serves, the wait ran out, the store failed).
enum Leasing {
    Held(Leased),
    Answered(Result<Arc<TokenState>, TokenError>),
}

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
    /// Asks Meraki whether a token works (set once the API client exists).
    probe: OnceLock<Arc<dyn TokenProbe>>,
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
            probe: OnceLock::new(),
        }
    }

    /// Gives the engine a way to ask Meraki whether a token works. Without one, a remembered
    /// refusal never suppresses a refresh (there is no evidence the token works).
    pub fn set_probe(&self, probe: Arc<dyn TokenProbe>) {
        let _ = self.probe.set(probe);
    }

    /// A usable access token of `grant`, refreshed first if it is past its refresh point at
    /// `now` (unix seconds, the caller's clock read). `org` is the requesting organization (for
    /// events).
    pub async fn token(
        &self,
        grant: &Grant,
        org: &str,
        now: i64,
    ) -> Result<Arc<TokenState>, TokenError> {
        let st = grant.state();
        if st.usable(now, self.policy.refresh_ahead) {
            return Ok(st);
        }
        // Boxed: the refresh (a token endpoint call) is rare, and its state inline would make
        // every request's future, which Pingora boxes and copies per hook, kilobytes larger.
        Box::pin(self.refresh(grant, Some(org), Need::Fresh, RefreshCause::Expiring)).await
    }

    /// After Meraki answered 401 to `used` at `operation` (an operationId, or a path template):
    /// a token of a newer generation to retry with — refreshing once per generation, whatever
    /// its age — or [`TokenError::RefusedAtOperation`] when the grant's tokens are known to be
    /// refused there while the token works elsewhere.
    pub async fn rejected(
        &self,
        grant: &Grant,
        org: &str,
        used: &TokenState,
        operation: &str,
    ) -> Result<Arc<TokenState>, TokenError> {
        if !self.policy.refused_operation_memory.is_zero() {
            self.refused_again(grant, org, used, operation);
            if grant.state().generation == used.generation
                && grant.is_refused(operation, self.clock.now_ms())
                && self.token_works(grant, org, used).await
            {
                return Err(TokenError::RefusedAtOperation {
                    operation: operation.to_owned(),
                });
            }
        }
        let fresh = self
            .refresh(
                grant,
                Some(org),
                Need::Replacing {
                    generation: used.generation,
                },
                RefreshCause::Rejected,
            )
            .await?;
        if fresh.generation != used.generation {
            // Minted (or adopted) because of a 401 here: if Meraki refuses it here again, a
            // refresh does not cure this operation.
            grant.minted_for(fresh.generation, operation);
        }
        Ok(fresh)
    }

    /// Meraki answered 401 to `used` at `operation`: when `used` was obtained because of a 401
    /// at that same operation, the grant remembers the operation (returns true). Called by
    /// [`Refresher::rejected`], and after a retry's 401, which is passed through either way.
    pub fn refused_again(
        &self,
        grant: &Grant,
        org: &str,
        used: &TokenState,
        operation: &str,
    ) -> bool {
        let memory = self.policy.refused_operation_memory;
        if memory.is_zero() || !grant.take_minted_for(used.generation, operation) {
            return false;
        }
        let now = self.clock.now_ms();
        let until = now + memory.as_millis() as i64;
        if let Some(r) = grant.remember_refused(operation, used.generation, now, until) {
            tracing::warn!(grant = %grant.label(), operation, generation = used.generation, "Meraki refused a token obtained for a 401 at this operation again; its 401s pass through without refreshing while the token works elsewhere");
            let mut e = grant.event(EventKind::OperationRefused {
                operation: r.operation.clone(),
                remembered: grant.refused_operations(now).len(),
            });
            e.organization = Some(org.to_owned());
            e.detail = Some(format!(
                "Meraki refused generation {} at operation {operation} although it was obtained because of a 401 there: remembered until {}; the grant may lack the OAuth scope this operation needs",
                used.generation,
                crate::clock::rfc3339(until.div_euclid(1000))
            ));
            self.events.token(e);
        }
        true
    }

    /// Meraki answered 2xx to `used` at `operation`: evidence that the token works, and the
    /// end of any remembered refusal there (and of those whose time is up).
    pub fn succeeded(&self, grant: &Grant, used: &TokenState, operation: impl Fn() -> String) {
        grant.answered(used.generation, self.clock.now(), &operation);
        if grant.has_refusals() {
            let now = self.clock.now_ms();
            let forgotten = grant.forget_refused(&operation(), now);
            for r in forgotten {
                let why = if r.until_ms > now { "2xx" } else { "expired" };
                self.forgotten(grant, r.operation, why, now);
            }
        }
    }

    /// Forgets every remembered refusal of `grant` (a configuration reload).
    pub fn forget_refusals(&self, grant: &Grant) {
        if grant.forget_refusals() > 0 {
            self.forgotten(grant, Arc::from("*"), "reload", self.clock.now_ms());
        }
    }

    fn forgotten(&self, grant: &Grant, operation: Arc<str>, why: &'static str, now_ms: i64) {
        tracing::info!(grant = %grant.label(), operation = %operation, why, "a remembered refusal was forgotten");
        self.events.token(grant.event(EventKind::RefusalForgotten {
            operation,
            why,
            remembered: grant.refused_operations(now_ms).len(),
        }));
    }

    /// Whether there is evidence that `used` (the current generation) works: a recent 2xx, or
    /// a probe (one per grant at a time, its verdict good for [`EVIDENCE`]). A probe without a
    /// verdict (Meraki unreachable, 429) does not condemn the token; no way to probe does.
    async fn token_works(&self, grant: &Grant, org: &str, used: &TokenState) -> bool {
        let since = self.clock.now() - EVIDENCE.as_secs() as i64;
        if grant.works_since(used.generation, since) {
            return true;
        }
        let Some(probe) = self.probe.get() else {
            return false;
        };
        let mut flight = grant.flight.lock().await;
        if grant.state().generation != used.generation {
            // Refreshed while this request waited: the caller retries with the new token.
            return false;
        }
        if grant.works_since(
            used.generation,
            self.clock.now() - EVIDENCE.as_secs() as i64,
        ) {
            return true;
        }
        let now = self.clock.now_ms();
        if let Some((g, at, verdict)) = flight.probed {
            if g == used.generation && now - at < EVIDENCE.as_millis() as i64 {
                return verdict != Probe::Refused;
            }
        }
        let verdict = probe.probe(used).await;
        flight.probed = Some((used.generation, self.clock.now_ms(), verdict));
        if verdict == Probe::Works {
            grant.saw_working(used.generation, self.clock.now());
        }
        let mut e = grant.event(EventKind::Probed { verdict });
        e.organization = Some(org.to_owned());
        self.events.token(e);
        verdict != Probe::Refused
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

    /// One need, one token call at most: under the grant's single-flight lock, what is
    /// already known is checked first, then the grant's lease is taken, the intent recorded,
    /// the authorization server called, and its answer committed (or the failure recorded)
    /// before the lease is released.
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
        if let Some(answer) = self.before_call(grant, org, need, &mut flight).await {
            return answer;
        }
        let Leased { lease, prior } = match self.lease(grant, org, need, &mut flight).await {
            Leasing::Held(leased) => leased,
            Leasing::Answered(answer) => return answer,
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
        let result = match answer {
            Ok(resp) => {
                fail::fail_point!("after-token-answer");
                let pending = self.answered(grant, &mut flight, &st, resp, cause, took);
                // Nothing but the commit between the answer and the commit.
                let committed = self.commit(grant, org, &mut flight, pending).await;
                fail::fail_point!("after-commit");
                committed
            }
            Err(OAuthError::InvalidGrant(description)) => {
                self.invalid_grant(grant, org, prior, &description, took)
                    .await
            }
            Err(e) => self.call_failed(grant, org, need, cause, &mut flight, &st, e, took),
        };
        lease.release().await;
        result
    }

    /// Under the grant's lock, before any token call: a rotation the store did not take is
    /// committed first (the authorization server already revoked the refresh token in
    /// memory); then whether what is in memory, or what another process stored, already
    /// answers `need`, or a backoff forbids a call.
    async fn before_call(
        &self,
        grant: &Grant,
        org: Option<&str>,
        need: Need,
        flight: &mut Flight,
    ) -> Option<Result<Arc<TokenState>, TokenError>> {
        if let Some(p) = flight.pending.take() {
            if let Err(e) = self.commit(grant, org, flight, p).await {
                return Some(Err(e));
            }
        }
        if let Some(answer) = self.satisfied(grant, org, &grant.state(), need) {
            return Some(answer);
        }
        if let Some(answer) = self.while_backing_off(grant, need, flight.last_failure) {
            return Some(answer);
        }
        let adopted = self.adopt_newer(grant).await?;
        self.satisfied(grant, org, &adopted, need)
    }

    /// The authorization server answered: failures reset, a short lifetime reported, and the
    /// rotation to commit (the old refresh token kept when the server did not rotate it).
    fn answered(
        &self,
        grant: &Grant,
        flight: &mut Flight,
        st: &TokenState,
        resp: super::oauth::TokenResponse,
        cause: RefreshCause,
        took: Duration,
    ) -> Pending {
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
        Pending {
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
        }
    }

    /// `invalid_grant`: another process's stored rotation is adopted; a live instance's
    /// unstored rotation is waited for; otherwise the grant needs re-authorization, and the
    /// detail names the crash window when an intent another instance left explains it.
    async fn invalid_grant(
        &self,
        grant: &Grant,
        org: Option<&str>,
        prior: Option<super::store::RefreshIntent>,
        description: &str,
        took: Duration,
    ) -> Result<Arc<TokenState>, TokenError> {
        if let Some(adopted) = self.adopt_newer(grant).await {
            return Ok(adopted);
        }
        let detail = match prior {
            Some(i) if self.store.alive(&i.holder).await.unwrap_or(true) => {
                // A live instance lost its lease during its token call and holds the new
                // token in memory; it stores it at its next sync. Not a lost grant.
                tracing::warn!(grant = %grant.label(), holder = %i.holder, "invalid_grant while another live instance holds an unstored rotation; waiting for it");
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
        Err(needs_reauth(grant, org))
    }

    /// Any other failed token call: the next call waits a backoff; a proactive refresh leaves
    /// a still-valid token serving.
    #[allow(clippy::too_many_arguments)]
    fn call_failed(
        &self,
        grant: &Grant,
        org: Option<&str>,
        need: Need,
        cause: RefreshCause,
        flight: &mut Flight,
        st: &Arc<TokenState>,
        e: OAuthError,
        took: Duration,
    ) -> Result<Arc<TokenState>, TokenError> {
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
        if matches!(need, Need::Fresh) && st.alive(self.clock.now()) {
            return Ok(st.clone());
        }
        Err(TokenError::AuthServer {
            source: e,
            retry_after: wait,
        })
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
    ) -> Leasing {
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
                            return Leasing::Answered(Err(TokenError::Conflict));
                        }
                        Err(e) => {
                            lease.release().await;
                            return Leasing::Answered(self.store_failed(grant, need, flight, e));
                        }
                    };
                    if grant.adopt(&stored).is_some() {
                        self.events.token(grant.event(EventKind::Loaded));
                    }
                    // Against the state now in memory, however it got there (adopted here, or
                    // by a change notification meanwhile): what the lease's last holder did.
                    if let Some(answer) = self.satisfied(grant, org, &grant.state(), need) {
                        lease.release().await;
                        return Leasing::Answered(answer);
                    }
                    let prior = stored.refreshing.filter(|i| {
                        i.holder != self.store.instance() && i.from_generation == stored.generation
                    });
                    return Leasing::Held(Leased { lease, prior });
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
                        return Leasing::Answered(answer);
                    }
                    let now = self.clock.now();
                    if matches!(need, Need::Fresh) && st.alive(now) {
                        // Another instance is refreshing; this token serves meanwhile.
                        self.events.store(waited(true));
                        return Leasing::Answered(Ok(st));
                    }
                    if Instant::now() >= deadline {
                        self.events.store(waited(false));
                        return Leasing::Answered(Err(TokenError::OtherInstance {
                            retry_after: Duration::from_secs(1),
                        }));
                    }
                    tokio::time::sleep(LEASE_POLL).await;
                }
                Err(e) => return Leasing::Answered(self.store_failed(grant, need, flight, e)),
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
                if let Some(scope) = &p.rotation.scope {
                    grant.learn_scopes(scope);
                }
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
