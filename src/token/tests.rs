//! The token engine under tokio's paused time, over the real SQLite store (in memory) and an
//! in-memory authorization server that rotates and revokes refresh tokens as Meraki's does.

use super::*;
use crate::secret::Secret;
use crate::testing::{integration, store_key, Authority, FleetStore, Recorder};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A store whose next `n` commits fail, over the real one.
/// Also: while `hold` is set, `load_all` blocks its (blocking-pool) thread until released, as
/// a locked database file does.
struct Flaky {
    inner: SqliteStore,
    fail_commits: Arc<AtomicUsize>,
    hold: Arc<Hold>,
}

#[derive(Default)]
struct Hold {
    held: std::sync::Mutex<bool>,
    released: std::sync::Condvar,
    loads: AtomicUsize,
}

impl Hold {
    fn set(&self, held: bool) {
        *self.held.lock().unwrap() = held;
        self.released.notify_all();
    }
}

#[async_trait::async_trait]
impl Store for Flaky {
    async fn load_all(&self) -> Result<Vec<StoredGrant>, StoreError> {
        self.hold.loads.fetch_add(1, Ordering::SeqCst);
        let hold = self.hold.clone();
        tokio::task::spawn_blocking(move || {
            let mut held = hold.held.lock().unwrap();
            while *held {
                held = hold.released.wait(held).unwrap();
            }
        })
        .await
        .unwrap();
        Store::load_all(&self.inner).await
    }
    async fn load(&self, id: i64) -> Result<Option<StoredGrant>, StoreError> {
        Store::load(&self.inner, id).await
    }
    async fn insert_pending(&self, i: &str, r: &Secret) -> Result<i64, StoreError> {
        Store::insert_pending(&self.inner, i, r).await
    }
    async fn assign(&self, id: i64, i: &str, o: &[String]) -> Result<(), StoreError> {
        Store::assign(&self.inner, id, i, o).await
    }
    async fn commit_rotation(&self, id: i64, from: i64, t: &Rotation) -> Result<bool, StoreError> {
        if self
            .fail_commits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Open {
                path: "test".into(),
                reason: "disk full".into(),
            });
        }
        Store::commit_rotation(&self.inner, id, from, t).await
    }
    async fn set_status(&self, id: i64, s: GrantStatus) -> Result<(), StoreError> {
        Store::set_status(&self.inner, id, s).await
    }
    async fn touch(&self, id: i64, at: i64) -> Result<(), StoreError> {
        Store::touch(&self.inner, id, at).await
    }
    async fn delete(&self, id: i64) -> Result<bool, StoreError> {
        Store::delete(&self.inner, id).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Store::ping(&self.inner).await
    }
    fn instance(&self) -> &str {
        Store::instance(&self.inner)
    }
    async fn try_lease(&self, id: i64) -> Result<Option<Box<dyn Lease>>, StoreError> {
        Store::try_lease(&self.inner, id).await
    }
    async fn alive(&self, name: &str) -> Result<bool, StoreError> {
        Store::alive(&self.inner, name).await
    }
    async fn heartbeat(&self) -> Result<usize, StoreError> {
        Store::heartbeat(&self.inner).await
    }
}

struct Rig {
    grants: Arc<Grants>,
    authority: Arc<Authority>,
    events: Arc<Recorder>,
    store: SqliteStore,
}

impl Rig {
    /// One grant for organization "1", imported (one token call), with tokens living
    /// `expires_in` seconds; `store` wraps the real in-memory store.
    async fn new(
        expires_in: u64,
        policy: Policy,
        wrap: impl FnOnce(SqliteStore) -> Arc<dyn Store>,
    ) -> Rig {
        let store = SqliteStore::in_memory(store_key()).unwrap();
        let authority = Authority::new(expires_in);
        let events = Arc::new(Recorder::default());
        let grants = Grants::load(
            Settings {
                integrations: vec![integration()],
                policy,
            },
            wrap(store.clone()),
            authority.clone(),
            events.clone(),
            Clock::tokio(),
        )
        .await
        .unwrap();
        let refresh = authority.issue();
        grants
            .import("netops", &["1".to_string()], Secret::new(refresh))
            .await
            .unwrap();
        assert_eq!(authority.calls(), 1, "the import rotates once");
        Rig {
            grants: Arc::new(grants),
            authority,
            events,
            store,
        }
    }

    async fn plain(expires_in: u64) -> Rig {
        Self::new(expires_in, Policy::default(), |s| Arc::new(s)).await
    }

    fn grant(&self) -> Arc<Grant> {
        self.grants.map.lookup("netops", "1").unwrap()
    }

    /// Calls made since the import.
    fn calls(&self) -> usize {
        self.authority.calls() - 1
    }

    async fn token(&self) -> Result<Arc<TokenState>, TokenError> {
        self.grants.token(&self.grant(), "1").await
    }
}

#[tokio::test(start_paused = true)]
async fn many_waiters_cause_one_token_call() {
    let rig = Arc::new(Rig::plain(3600).await);
    rig.authority.set(|s| s.delay = Duration::from_millis(300));
    tokio::time::advance(Duration::from_secs(3600 - 200)).await;
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let rig = rig.clone();
            tokio::spawn(async move { rig.token().await.map(|t| t.generation) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 2);
    }
    assert_eq!(rig.calls(), 1);
}

/// Issue 11, case 1: requests that saw the rotation while it was being made (a 401 on the
/// old token, or the old token expiring) arrive at the lock one after another, before and
/// after the commit; none of them refreshes again.
#[tokio::test(start_paused = true)]
async fn a_burst_across_a_rotation_makes_one_token_call() {
    let rig = Arc::new(Rig::plain(3600).await);
    rig.authority.set(|s| s.delay = Duration::from_millis(200));
    let old = rig.token().await.unwrap();
    tokio::time::advance(Duration::from_secs(3600 - 250)).await;
    let mut tasks = Vec::new();
    for i in 0..400u64 {
        let rig = rig.clone();
        let old = old.clone();
        tasks.push(tokio::spawn(async move {
            // Spread over 800 ms: before, during and after the token call and its commit.
            tokio::time::sleep(Duration::from_millis(i * 2)).await;
            let g = rig.grant();
            if i % 2 == 0 {
                rig.grants
                    .rejected(&g, "1", &old, "getNetwork")
                    .await
                    .map(|t| t.generation)
            } else {
                rig.grants.token(&g, "1").await.map(|t| t.generation)
            }
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), old.generation + 1);
    }
    assert_eq!(rig.calls(), 1);
    let refreshed = rig
        .events
        .kinds()
        .iter()
        .filter(|k| **k == "token_refreshed")
        .count();
    assert_eq!(refreshed, 2, "the import and the one refresh");
}

/// Issue 11, case 2: the refresh point adapts to the lifetime (half of it at most), so short
/// tokens are not born "expiring"; steady traffic makes one call per half-lifetime.
#[tokio::test(start_paused = true)]
async fn steady_traffic_refreshes_once_per_half_lifetime() {
    for (lifetime, run_secs) in [(60u64, 120u64), (10, 30), (3600, 7200)] {
        let rig = Rig::plain(lifetime).await;
        let step = Duration::from_millis(100.max(lifetime * 10));
        let steps = run_secs * 1000 / step.as_millis() as u64;
        for _ in 0..steps {
            rig.token().await.unwrap();
            tokio::time::advance(step).await;
        }
        // A token is used until `lifetime - min(refresh_ahead, lifetime / 2)` after issue.
        let interval = lifetime - 300.min(lifetime / 2);
        let expected = (run_secs / interval) as usize;
        assert!(
            (expected.saturating_sub(1)..=expected + 1).contains(&rig.calls()),
            "{lifetime}-s tokens over {run_secs} s: {} calls, expected about {expected}",
            rig.calls()
        );
        if lifetime < 30 {
            assert!(rig.events.kinds().contains(&"short_token_lifetime"));
        }
    }
}

/// What one request at `op` came to, made as the proxy makes it (see [`request`]).
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Meraki answered 2xx to this generation.
    Served(i64),
    /// Meraki's 401 passed through: the operation is remembered as refused.
    PassedThrough,
    /// The one retry was refused too.
    RetryRefused,
}

/// One request at `op` as the proxy makes it: the current token; Meraki refuses it when the
/// token was killed or `op` is one of `always_401`; on a 401 the engine decides, and the
/// request is retried once with what it gives.
async fn request(
    grants: &Grants,
    authority: &Authority,
    op: &str,
    always_401: &[&str],
) -> Result<Answer, TokenError> {
    let g = grants.get("netops", "1").await.unwrap();
    let meraki = |t: &TokenState| authority.accepts(t) && !always_401.contains(&op);
    let used = grants.token(&g, "1").await?;
    if meraki(&used) {
        grants.succeeded(&g, &used, || op.to_owned());
        return Ok(Answer::Served(used.generation));
    }
    match grants.rejected(&g, "1", &used, op).await {
        Err(TokenError::RefusedAtOperation { .. }) => Ok(Answer::PassedThrough),
        Err(e) => Err(e),
        Ok(fresh) if meraki(&fresh) => {
            grants.succeeded(&g, &fresh, || op.to_owned());
            Ok(Answer::Served(fresh.generation))
        }
        Ok(fresh) => {
            grants.refused_again(&g, "1", &fresh, op);
            Ok(Answer::RetryRefused)
        }
    }
}

impl Rig {
    /// A plain rig whose engine can probe tokens at the in-memory Meraki.
    async fn probing(expires_in: u64) -> Rig {
        let rig = Self::plain(expires_in).await;
        rig.grants.set_probe(rig.authority.clone());
        rig
    }
}

/// Issue 19: a token Meraki stops accepting 0, 1 or 29 s after it was issued is refreshed
/// once, and every request that saw the 401 retries with the new one: 400 at once, one call.
#[tokio::test(start_paused = true)]
async fn a_token_killed_at_any_age_is_refreshed_once_for_every_waiter() {
    for age in [0u64, 1, 29] {
        let rig = Arc::new(Rig::probing(3600).await);
        rig.authority.set(|s| s.delay = Duration::from_millis(200));
        tokio::time::advance(Duration::from_secs(age)).await;
        rig.authority.kill_access_tokens();
        let tasks: Vec<_> = (0..400)
            .map(|i| {
                let rig = rig.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(i % 50)).await;
                    let op = ["getNetwork", "getDevice", "updateNetwork"][i as usize % 3];
                    request(&rig.grants, &rig.authority, op, &[]).await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(
                t.await.unwrap().unwrap(),
                Answer::Served(2),
                "killed at {age} s"
            );
        }
        assert_eq!(rig.calls(), 1, "killed at {age} s: one token call");
    }
}

/// Issue 19: an operation Meraki refuses whatever the token (a scope the grant lacks) costs one
/// token call per memory period; each of its 401s passes through; other operations are served.
#[tokio::test(start_paused = true)]
async fn an_always_refused_operation_costs_one_call_per_memory_period() {
    let rig = Rig::probing(3600).await;
    let refused = ["getOrganizationAdmins"];
    // The first 401 is refreshed for (Meraki's answer is all the proxy knows) and retried once;
    // the retry's refusal is the evidence.
    let first = request(&rig.grants, &rig.authority, refused[0], &refused).await;
    assert_eq!(first.unwrap(), Answer::RetryRefused);
    assert_eq!(rig.calls(), 1);
    assert!(rig.events.kinds().contains(&"operation_refused"));
    for i in 0..30 {
        let a = request(&rig.grants, &rig.authority, refused[0], &refused).await;
        assert_eq!(a.unwrap(), Answer::PassedThrough, "request {i}");
        if i % 3 == 0 {
            let other = request(&rig.grants, &rig.authority, "getNetwork", &refused).await;
            assert_eq!(other.unwrap(), Answer::Served(2));
        }
        tokio::time::advance(Duration::from_millis(500)).await;
    }
    assert_eq!(rig.calls(), 1, "no call while remembered");
    // A probe only where no 2xx of this generation was recent: at most one per EVIDENCE over
    // these 15 s, against 30 passed-through 401s.
    assert!(
        rig.authority.probes() as u64 <= 15 / refresh::EVIDENCE.as_secs(),
        "{} probes",
        rig.authority.probes()
    );
    // After the memory period: one more refresh, then remembered again.
    tokio::time::advance(Duration::from_secs(600)).await;
    let again = request(&rig.grants, &rig.authority, refused[0], &refused).await;
    assert_eq!(again.unwrap(), Answer::RetryRefused);
    for _ in 0..10 {
        let a = request(&rig.grants, &rig.authority, refused[0], &refused).await;
        assert_eq!(a.unwrap(), Answer::PassedThrough);
    }
    assert_eq!(rig.calls(), 2, "one call per memory period");
}

/// Issue 19: a script that calls nothing but a remembered operation still gets a token that
/// really died refreshed: the probe says it is dead.
#[tokio::test(start_paused = true)]
async fn a_dead_token_is_refreshed_even_at_a_remembered_operation() {
    let rig = Rig::probing(3600).await;
    let refused = ["getOrganizationAdmins"];
    request(&rig.grants, &rig.authority, refused[0], &refused)
        .await
        .unwrap();
    assert_eq!(rig.calls(), 1);
    // The token works (a probe says so): the operation's 401 passes through.
    tokio::time::advance(Duration::from_secs(30)).await;
    let a = request(&rig.grants, &rig.authority, refused[0], &refused).await;
    assert_eq!(a.unwrap(), Answer::PassedThrough);
    // Then it dies: once the evidence is older than EVIDENCE, the probe finds it dead.
    rig.authority.kill_access_tokens();
    tokio::time::advance(refresh::EVIDENCE).await;
    let a = request(&rig.grants, &rig.authority, refused[0], &refused).await;
    assert_eq!(a.unwrap(), Answer::RetryRefused, "refreshed and retried");
    assert_eq!(rig.calls(), 2, "the dead token was refreshed");
    assert_eq!(rig.grant().state().generation, 3);
    // Still remembered (the new token was refused there too), and other operations work.
    let a = request(&rig.grants, &rig.authority, refused[0], &refused).await;
    assert_eq!(a.unwrap(), Answer::PassedThrough);
    let b = request(&rig.grants, &rig.authority, "getNetwork", &refused).await;
    assert_eq!(b.unwrap(), Answer::Served(3));
    assert_eq!(rig.calls(), 2);
}

/// Issue 19: an always-refused operation while the grant's token really dies: the death still
/// costs exactly one call, whoever sees it first.
#[tokio::test(start_paused = true)]
async fn an_expiry_beside_a_remembered_operation_costs_one_call() {
    let rig = Arc::new(Rig::probing(3600).await);
    let refused = ["getOrganizationAdmins"];
    request(&rig.grants, &rig.authority, refused[0], &refused)
        .await
        .unwrap();
    assert_eq!(rig.calls(), 1);
    tokio::time::advance(Duration::from_secs(60)).await;
    rig.authority.set(|s| s.delay = Duration::from_millis(200));
    rig.authority.kill_access_tokens();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let rig = rig.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(i % 40)).await;
                let op = if i % 2 == 0 { "getNetwork" } else { refused[0] };
                (op, request(&rig.grants, &rig.authority, op, &refused).await)
            })
        })
        .collect();
    for t in tasks {
        let (op, a) = t.await.unwrap();
        match (op, a.unwrap()) {
            ("getNetwork", a) => assert_eq!(a, Answer::Served(3)),
            (_, a) => assert!(
                matches!(a, Answer::PassedThrough | Answer::RetryRefused),
                "{a:?}"
            ),
        }
    }
    assert_eq!(rig.calls(), 2, "the expiry cost exactly one call");
}

/// A probe without a verdict (Meraki unreachable, 429) does not condemn the token; with no way
/// to probe at all, a remembered refusal never suppresses a refresh.
#[tokio::test(start_paused = true)]
async fn without_evidence_either_way_a_probe_does_not_rotate_and_no_probe_refreshes() {
    let rig = Rig::probing(3600).await;
    let refused = ["getOrganizationAdmins"];
    request(&rig.grants, &rig.authority, refused[0], &refused)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(30)).await;
    rig.authority.set(|s| s.probe_unknown = true);
    let a = request(&rig.grants, &rig.authority, refused[0], &refused).await;
    assert_eq!(a.unwrap(), Answer::PassedThrough);
    assert_eq!(rig.calls(), 1);

    let blind = Rig::plain(3600).await;
    request(&blind.grants, &blind.authority, refused[0], &refused)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(30)).await;
    let a = request(&blind.grants, &blind.authority, refused[0], &refused).await;
    assert_eq!(a.unwrap(), Answer::RetryRefused, "no evidence: refreshed");
    assert_eq!(blind.calls(), 2);
}

/// The memory clears on a 2xx at the operation and on a configuration reload, is bounded per
/// grant, and `refused_operation_memory = 0` turns it off (every 401 refreshes once per
/// generation).
#[tokio::test(start_paused = true)]
async fn the_memory_clears_is_bounded_and_can_be_turned_off() {
    let rig = Rig::probing(3600).await;
    let g = rig.grant();
    let refused = ["getOrganizationAdmins"];
    request(&rig.grants, &rig.authority, refused[0], &refused)
        .await
        .unwrap();
    assert_eq!(g.refused_operations(rig.grants.clock().now_ms()).len(), 1);
    // Meraki serves the operation now (the integration was given the scope).
    let a = request(&rig.grants, &rig.authority, refused[0], &[]).await;
    assert_eq!(a.unwrap(), Answer::Served(2));
    assert!(g.refused_operations(rig.grants.clock().now_ms()).is_empty());
    assert!(rig.events.kinds().contains(&"operation_refusal_forgotten"));

    request(&rig.grants, &rig.authority, refused[0], &refused)
        .await
        .unwrap();
    assert_eq!(g.refused_operations(rig.grants.clock().now_ms()).len(), 1);
    rig.grants.set_integrations(&[integration()]).await.unwrap();
    assert!(
        g.refused_operations(rig.grants.clock().now_ms()).is_empty(),
        "reload forgets"
    );

    // Bounded: the operation remembered longest ago goes first.
    let now = rig.grants.clock().now_ms();
    for i in 0..grant::MAX_REFUSED_OPERATIONS + 5 {
        g.remember_refused(&format!("op{i}"), 1, now + i as i64, now + 600_000);
    }
    let ops = g.refused_operations(now);
    assert_eq!(ops.len(), grant::MAX_REFUSED_OPERATIONS);
    assert!(!ops.iter().any(|r| &*r.operation == "op0"));

    let off = Rig::new(
        3600,
        Policy {
            refused_operation_memory: Duration::ZERO,
            ..Policy::default()
        },
        |s| Arc::new(s),
    )
    .await;
    off.grants.set_probe(off.authority.clone());
    for _ in 0..5 {
        let a = request(&off.grants, &off.authority, refused[0], &refused).await;
        assert_eq!(a.unwrap(), Answer::RetryRefused);
    }
    assert_eq!(
        off.calls(),
        5,
        "memory off: one refresh per refused generation"
    );
}

/// Issue 11, case 4: the token endpoint down while every access token is refused: token calls
/// follow the backoff schedule, not the requests; each refusal says when to retry; the first
/// attempt after the endpoint returns succeeds.
#[tokio::test(start_paused = true)]
async fn an_outage_backs_off_and_recovers_within_one_step() {
    let rig = Rig::new(3600, Policy::default(), |s| Arc::new(s)).await;
    let g = rig.grant();
    rig.authority.set(|s| s.down = true);
    let mut refusals = 0;
    // 6 s of requests, 20 per second, each refused by Meraki.
    for _ in 0..120 {
        let used = g.state();
        match rig.grants.rejected(&g, "1", &used, "getNetwork").await {
            Err(e @ (TokenError::AuthServer { .. } | TokenError::BackingOff { .. })) => {
                let after = e.retry_after().unwrap();
                assert!(after > Duration::ZERO && after <= Duration::from_secs(60));
                refusals += 1;
            }
            other => panic!("{other:?}"),
        }
        tokio::time::advance(Duration::from_millis(50)).await;
    }
    assert_eq!(refusals, 120);
    // 1 + 2 + 4 s (±20%) fit in 6 s: three or four attempts, not 120.
    assert!((3..=4).contains(&rig.calls()), "{} calls", rig.calls());
    rig.authority.set(|s| s.down = false);
    let until = g.retry_at_ms.load(Ordering::Relaxed);
    let now = rig.grants.clock().now_ms();
    tokio::time::advance(Duration::from_millis((until - now).max(0) as u64 + 1)).await;
    let used = g.state();
    let fresh = rig
        .grants
        .rejected(&g, "1", &used, "getNetwork")
        .await
        .unwrap();
    assert_eq!(fresh.generation, used.generation + 1);
    assert_eq!(g.state().status, GrantStatus::Ok, "no grant lost");
}

#[tokio::test(start_paused = true)]
async fn a_valid_token_keeps_serving_while_refreshes_fail() {
    let rig = Rig::plain(3600).await;
    rig.authority.set(|s| s.down = true);
    tokio::time::advance(Duration::from_secs(3600 - 100)).await;
    for _ in 0..50 {
        assert_eq!(rig.token().await.unwrap().generation, 1);
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    assert!(rig.calls() <= 3, "{} calls", rig.calls());
}

/// A rotation made by another process (same store) is adopted, not repeated.
#[tokio::test(start_paused = true)]
async fn a_newer_generation_in_the_store_is_adopted() {
    let rig = Rig::plain(3600).await;
    let g = rig.grant();
    let old = g.state();
    let (refresh, access) = rig
        .authority
        .rotate_now(old.refresh_token().expose())
        .unwrap();
    let now = rig.grants.clock().now();
    let rotation = Rotation {
        refresh_token: Secret::new(refresh),
        access_token: Secret::new(access),
        access_expires_at: now + 3600,
        scope: None,
        refreshed_at: now,
    };
    assert!(
        Store::commit_rotation(&rig.store, g.id, old.generation, &rotation)
            .await
            .unwrap()
    );
    let fresh = rig
        .grants
        .rejected(&g, "1", &old, "getNetwork")
        .await
        .unwrap();
    assert_eq!(fresh.generation, old.generation + 1);
    assert_eq!(rig.calls(), 0, "adopted from the store");
}

/// A rotation the store refused is never handed out; the next request commits it before
/// anything else, without another token call (which would fail: the old token is revoked).
#[tokio::test(start_paused = true)]
async fn a_failed_commit_is_retried_before_the_token_is_used() {
    let fail = Arc::new(AtomicUsize::new(0));
    let f = fail.clone();
    let rig = Rig::new(3600, Policy::default(), move |s| {
        Arc::new(Flaky {
            inner: s,
            fail_commits: f,
            hold: Arc::default(),
        })
    })
    .await;
    let g = rig.grant();
    tokio::time::advance(Duration::from_secs(3600 - 100)).await;
    fail.store(1, Ordering::SeqCst);
    let e = rig.token().await;
    // Nothing unstored is handed out, not even the old (revoked) token.
    assert!(matches!(e, Err(TokenError::Store(_))), "{e:?}");
    assert_eq!(
        g.state().generation,
        1,
        "the uncommitted rotation is not visible"
    );
    assert_eq!(rig.calls(), 1);
    let t = rig.token().await.unwrap();
    assert_eq!(t.generation, 2);
    assert_eq!(rig.calls(), 1, "committed, not refreshed again");
    let stored = Store::load(&rig.store, g.id).await.unwrap().unwrap();
    assert_eq!(stored.generation, 2);
    assert_eq!(stored.refresh_token.expose(), t.refresh_token().expose());
    let kinds = rig.events.kinds();
    let commit_failed = kinds.iter().position(|k| *k == "commit_failed").unwrap();
    let refreshed = kinds.iter().rposition(|k| *k == "token_refreshed").unwrap();
    assert!(commit_failed < refreshed, "{kinds:?}");
}

#[tokio::test(start_paused = true)]
async fn invalid_grant_marks_the_grant_once() {
    let rig = Rig::plain(3600).await;
    let g = rig.grant();
    rig.authority.set(|s| s.valid.clear());
    tokio::time::advance(Duration::from_secs(3600)).await;
    for _ in 0..20 {
        assert!(matches!(
            rig.token().await,
            Err(TokenError::NeedsReauth { .. })
        ));
    }
    assert_eq!(rig.calls(), 1);
    assert_eq!(g.state().status, GrantStatus::NeedsReauth);
    let stored = Store::load(&rig.store, g.id).await.unwrap().unwrap();
    assert_eq!(stored.status, GrantStatus::NeedsReauth);
    assert!(rig.events.kinds().contains(&"needs_reauthorization"));
}

#[tokio::test(start_paused = true)]
async fn keep_alive_refreshes_only_idle_grants() {
    let rig = Rig::plain(3600).await;
    let idle = Duration::from_secs(86_400);
    // Used a moment ago: not idle.
    rig.token().await.unwrap();
    assert_eq!(rig.grants.keep_alive(idle).await, 0);
    // Idle for the period plus the largest jitter (10%): refreshed, once.
    tokio::time::advance(idle + idle / 10 + Duration::from_secs(1)).await;
    assert_eq!(rig.grants.keep_alive(idle).await, 1);
    assert_eq!(rig.grants.keep_alive(idle).await, 0);
    assert_eq!(rig.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_grant_added_elsewhere_is_found_on_a_miss() {
    let rig = Rig::plain(3600).await;
    assert!(rig.grants.get("netops", "2").await.is_none());
    let id = Store::insert_pending(&rig.store, "netops", &Secret::new("r"))
        .await
        .unwrap();
    Store::assign(&rig.store, id, "netops", &["2".into()])
        .await
        .unwrap();
    // Misses re-read the store at most every few seconds.
    assert!(rig.grants.get("netops", "2").await.is_none());
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(rig.grants.get("netops", "2").await.unwrap().id, id);
}

/// A store that does not answer (a locked file) delays only the requests that need it: a
/// miss's reload waits on the blocking pool, once for all the misses, while requests for
/// organizations whose grant is in memory go on, on this single-threaded runtime too.
#[tokio::test]
async fn a_stuck_store_delays_only_the_requests_that_need_it() {
    let hold = Arc::new(Hold::default());
    let h = hold.clone();
    let rig = Arc::new(
        Rig::new(3600, Policy::default(), move |s| {
            Arc::new(Flaky {
                inner: s,
                fail_commits: Arc::default(),
                hold: h,
            })
        })
        .await,
    );
    let loads_before = hold.loads.load(Ordering::SeqCst);
    hold.set(true);
    let misses: Vec<_> = (0..10)
        .map(|_| {
            let rig = rig.clone();
            tokio::spawn(async move { rig.grants.get("netops", "2").await.is_none() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..100 {
        let t = tokio::time::timeout(Duration::from_secs(2), rig.token()).await;
        assert!(
            matches!(t, Ok(Ok(_))),
            "a request for organization 1 waited on the store"
        );
    }
    assert!(
        misses.iter().all(|m| !m.is_finished()),
        "the misses wait for the store"
    );
    hold.set(false);
    for m in misses {
        assert!(m.await.unwrap(), "still no grant for organization 2");
    }
    assert_eq!(
        hold.loads.load(Ordering::SeqCst) - loads_before,
        1,
        "one reload for ten misses"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reload_gives_grants_their_integrations_new_settings() {
    let rig = Rig::plain(3600).await;
    let grant = rig.grant();
    let rotated = Arc::new(Integration {
        client_secret: Secret::new("rotated-secret"),
        ..(*integration()).clone()
    });
    rig.grants.set_integrations(&[rotated]).await.unwrap();
    assert!(
        Arc::ptr_eq(&rig.grant(), &grant),
        "the grant keeps its state and lock"
    );
    tokio::time::advance(Duration::from_secs(3600)).await;
    rig.token().await.unwrap();
    assert_eq!(
        rig.authority.state.lock().unwrap().last_secret.as_deref(),
        Some("rotated-secret"),
        "the refresh uses the reloaded client secret"
    );
    // An integration no longer configured: its grants leave the map (not the store).
    rig.grants.set_integrations(&[]).await.unwrap();
    assert!(rig.grants.map.lookup("netops", "1").is_none());
    assert_eq!(rig.store.load_all().unwrap().len(), 1);
}

// ---- a fleet: several instances on one shared store (leases, intents, adoption) ----

struct Fleet {
    instances: Vec<(FleetStore, Arc<Grants>, Arc<Recorder>)>,
    authority: Arc<Authority>,
}

impl Fleet {
    /// `n` instances; the grant for organization "1" imported by the first (one token call).
    async fn new(n: usize, expires_in: u64) -> Fleet {
        let first = FleetStore::new("i0");
        let authority = Authority::new(expires_in);
        let mut instances = Vec::new();
        for i in 0..n {
            let store = if i == 0 {
                first.clone()
            } else {
                first.instance(&format!("i{i}"))
            };
            let events = Arc::new(Recorder::default());
            let grants = Grants::load(
                Settings {
                    integrations: vec![integration()],
                    policy: Policy::default(),
                },
                Arc::new(store.clone()),
                authority.clone(),
                events.clone(),
                Clock::tokio(),
            )
            .await
            .unwrap();
            instances.push((store, Arc::new(grants), events));
        }
        instances[0]
            .1
            .import("netops", &["1".to_string()], Secret::new(authority.issue()))
            .await
            .unwrap();
        for (_, g, _) in &instances[1..] {
            g.reload().await.unwrap();
        }
        Fleet {
            instances,
            authority,
        }
    }

    fn grants(&self, i: usize) -> Arc<Grants> {
        self.instances[i].1.clone()
    }

    async fn token(&self, i: usize) -> Result<Arc<TokenState>, TokenError> {
        let g = self.grants(i);
        let grant = g.get("netops", "1").await.unwrap();
        g.token(&grant, "1").await
    }
}

#[tokio::test(start_paused = true)]
async fn three_instances_make_one_token_call_per_expiry() {
    let fleet = Arc::new(Fleet::new(3, 3600).await);
    fleet
        .authority
        .set(|s| s.delay = Duration::from_millis(300));
    for round in 0..3i64 {
        tokio::time::advance(Duration::from_secs(3600)).await;
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let fleet = fleet.clone();
                tokio::spawn(async move {
                    // Spread over 600 ms: before, during and after the token call.
                    tokio::time::sleep(Duration::from_millis(i as u64 * 2)).await;
                    fleet.token(i % 3).await.map(|t| t.generation)
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 2 + round);
        }
        assert_eq!(
            fleet.authority.calls(),
            2 + round as usize,
            "one call per expiry"
        );
    }
}

/// Issue 19: three instances with 20-s tokens (shorter than any age rule), Meraki drops every
/// access token: one token call for the grant, every instance's requests served.
#[tokio::test(start_paused = true)]
async fn three_instances_with_short_tokens_refresh_a_dropped_token_once() {
    let fleet = Arc::new(Fleet::new(3, 20).await);
    fleet
        .authority
        .set(|s| s.delay = Duration::from_millis(300));
    for (_, g, _) in &fleet.instances {
        g.set_probe(fleet.authority.clone());
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    fleet.authority.kill_access_tokens();
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let fleet = fleet.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(i as u64 % 100)).await;
                request(&fleet.grants(i % 3), &fleet.authority, "getNetwork", &[]).await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Answer::Served(2));
    }
    assert_eq!(fleet.authority.calls(), 2, "the import and one refresh");
}

#[tokio::test(start_paused = true)]
async fn a_holder_killed_before_the_answer_leaves_the_grant_to_the_others() {
    let fleet = Arc::new(Fleet::new(2, 3600).await);
    fleet.authority.set(|s| s.delay = Duration::from_secs(2));
    tokio::time::advance(Duration::from_secs(3600)).await;
    let f = fleet.clone();
    let holder = tokio::spawn(async move { f.token(0).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fleet.instances[0].0.holder(1).as_deref(), Some("i0"));
    // SIGKILL during the token call: the task goes (its session, and the lease, with it).
    holder.abort();
    let _ = holder.await;
    fleet.instances[0].0.kill();
    assert_eq!(
        fleet.instances[0].0.holder(1),
        None,
        "the lease went with it"
    );
    fleet.authority.set(|s| s.delay = Duration::ZERO);
    let t = fleet.token(1).await.unwrap();
    assert_eq!(
        t.generation, 2,
        "the survivor refreshed with the stored token"
    );
}

#[tokio::test(start_paused = true)]
async fn the_crash_window_is_detected_and_named() {
    let fleet = Fleet::new(2, 3600).await;
    let store = &fleet.instances[0].0;
    // Instance 0 took the lease, recorded its intent, got Meraki's answer (the refresh token
    // rotated) and died before storing it.
    let lease = store.try_lease(1).await.unwrap().unwrap();
    lease.intend(1).await.unwrap();
    let stored = store.load(1).await.unwrap().unwrap();
    fleet
        .authority
        .rotate_now(stored.refresh_token.expose())
        .unwrap();
    drop(lease);
    store.kill();
    tokio::time::advance(Duration::from_secs(3600)).await;
    let e = fleet.token(1).await.unwrap_err();
    assert!(matches!(e, TokenError::NeedsReauth { .. }), "{e}");
    let details = fleet.instances[1].2.details("needs_reauthorization");
    assert_eq!(details.len(), 1);
    assert!(
        details[0].contains("crash window") && details[0].contains("i0"),
        "{details:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_token_call_keeps_the_lease_and_others_wait_then_adopt() {
    let fleet = Arc::new(Fleet::new(2, 3600).await);
    // Slower than the lease wait (35 s): the lease does not expire under the holder.
    fleet.authority.set(|s| s.delay = Duration::from_secs(100));
    tokio::time::advance(Duration::from_secs(3600 - 20)).await;
    let f = fleet.clone();
    let holder = tokio::spawn(async move { f.token(0).await.map(|t| t.generation) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Past the refresh point, still valid: served at once, no call.
    assert_eq!(fleet.token(1).await.unwrap().generation, 1);
    tokio::time::advance(Duration::from_secs(25)).await;
    // Expired: waits for the holder up to the lease wait, then a 503, never a second call.
    let waited = tokio::time::Instant::now();
    let e = fleet.token(1).await.unwrap_err();
    assert!(matches!(e, TokenError::OtherInstance { .. }), "{e}");
    assert!(waited.elapsed() >= Duration::from_secs(35));
    assert_eq!(holder.await.unwrap().unwrap(), 2);
    assert_eq!(fleet.token(1).await.unwrap().generation, 2, "adopted");
    assert_eq!(fleet.authority.calls(), 2, "the import and one refresh");
}

#[tokio::test(start_paused = true)]
async fn a_live_instance_with_an_unstored_rotation_is_not_condemned() {
    let fleet = Fleet::new(2, 3600).await;
    // Instance 0 refreshes but the store does not take the rotation (a lost connection).
    fleet.instances[0].0.fail_commits(1);
    tokio::time::advance(Duration::from_secs(3600)).await;
    let e = fleet.token(0).await.unwrap_err();
    assert!(matches!(e, TokenError::Store(_)), "{e}");
    // Instance 1: the stored refresh token is the rotated-out one; instance 0 is alive.
    let e = fleet.token(1).await.unwrap_err();
    assert!(matches!(e, TokenError::OtherInstance { .. }), "{e}");
    assert!(fleet.instances[1]
        .2
        .details("needs_reauthorization")
        .is_empty());
    // Instance 0's sync stores its rotation; instance 1 adopts it.
    fleet.grants(0).sync().await.unwrap();
    fleet.grants(1).reload().await.unwrap();
    assert_eq!(fleet.token(1).await.unwrap().generation, 2);
    assert_eq!(
        fleet.authority.calls(),
        3,
        "import, refresh, instance 1's refused call"
    );
}

/// The race the three-process test found: a change notification adopts another instance's
/// rotation while this instance waits for the lease, so when the lease comes free there is
/// nothing newer to adopt, yet nothing left to do either.
#[tokio::test(start_paused = true)]
async fn a_rotation_adopted_by_notification_while_waiting_is_not_repeated() {
    let fleet = Arc::new(Fleet::new(2, 3600).await);
    let store0 = fleet.instances[0].0.clone();
    let lease = store0.try_lease(1).await.unwrap().unwrap();
    tokio::time::advance(Duration::from_secs(3600)).await;
    let f = fleet.clone();
    let waiter = tokio::spawn(async move { f.token(1).await.map(|t| t.generation) });
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Instance 0 rotates and commits; instance 1 hears of it (NOTIFY) and re-reads; then
    // instance 0 releases the lease — all between two of instance 1's looks.
    let stored = store0.load(1).await.unwrap().unwrap();
    let (refresh, access) = fleet
        .authority
        .rotate_now(stored.refresh_token.expose())
        .unwrap();
    let now = fleet.grants(0).clock().now();
    assert!(store0
        .commit_rotation(
            1,
            1,
            &Rotation {
                refresh_token: Secret::new(refresh),
                access_token: Secret::new(access),
                access_expires_at: now + 3600,
                scope: None,
                refreshed_at: now,
            },
        )
        .await
        .unwrap());
    fleet.grants(1).reload().await.unwrap();
    drop(lease);
    assert_eq!(waiter.await.unwrap().unwrap(), 2);
    assert_eq!(
        fleet.authority.calls(),
        1,
        "only the import called: nothing repeated"
    );
}
