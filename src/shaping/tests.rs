//! The shaper with tokio's paused clock: buckets, fair shares, weights, refusals, cancellation,
//! AIMD. Time only moves when every task waits, so the figures are exact, not timing-dependent.

use super::*;
use std::sync::atomic::AtomicU64;

fn limits() -> RateLimits {
    RateLimits::default()
}

fn shaper() -> Shaper {
    Shaper::new(limits())
}

fn go(t: Ticket) -> Turn {
    match t {
        Ticket::Go(t) => t,
        Ticket::Wait(_) => panic!("expected to go at once, was queued"),
        Ticket::Refused(e) => panic!("expected to go at once, was refused: {e}"),
    }
}

fn waiting(t: Ticket) -> Waiting {
    match t {
        Ticket::Wait(w) => w,
        Ticket::Go(_) => panic!("expected to wait, went at once"),
        Ticket::Refused(e) => panic!("expected to wait, was refused: {e}"),
    }
}

fn refused(t: Ticket) -> Throttled {
    match t {
        Ticket::Refused(e) => e,
        Ticket::Go(_) => panic!("expected a refusal, went at once"),
        Ticket::Wait(_) => panic!("expected a refusal, was queued"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_fresh_organization_bursts_to_its_depth_less_the_headroom_then_paces() {
    let s = shaper();
    for _ in 0..9 {
        go(s.request("1", "a", 1));
    }
    let t0 = Instant::now();
    let w = waiting(s.request("1", "a", 1));
    let turn = w.wait().await.unwrap();
    // One token at 10/s.
    assert_eq!(turn.waited, Duration::from_millis(100));
    assert_eq!(t0.elapsed(), Duration::from_millis(100));
    // Another organization has its own bucket.
    go(s.request("2", "a", 1));
}

#[tokio::test(start_paused = true)]
async fn steady_demand_is_served_at_the_configured_rate() {
    let s = shaper();
    let served = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    // 20 requests/s for 10 s against 10/s: the queue stays short enough to wait (2 s max).
    for i in 0..200u64 {
        let (s, served) = (s.clone(), served.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + Duration::from_millis(50 * i)).await;
            if s.acquire("1", "a", 1).await.is_ok() {
                served.fetch_add(1, Ordering::Relaxed);
            }
            Instant::now()
        }));
    }
    let mut last = start;
    for t in tasks {
        last = last.max(t.await.unwrap());
    }
    let served = served.load(Ordering::Relaxed) as f64;
    let secs = (last - start).as_secs_f64();
    // The burst (9) plus 10/s.
    assert!(
        served <= 9.0 + 10.0 * secs + 1.0,
        "served {served} in {secs} s"
    );
    assert!(served >= 100.0, "served only {served}");
}

#[tokio::test(start_paused = true)]
async fn a_light_client_is_served_within_one_round_of_a_heavy_clients_backlog() {
    let s = shaper();
    for _ in 0..9 {
        go(s.request("1", "heavy", 1));
    }
    // The heavy client queues 15 (1.5 s of budget).
    let heavy: Vec<Waiting> = (0..15)
        .map(|_| waiting(s.request("1", "heavy", 1)))
        .collect();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, w) in heavy.into_iter().enumerate() {
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            w.wait().await.unwrap();
            order.lock().unwrap().push(format!("h{i}"));
        }));
    }
    // Let two heavy requests through, then the light client asks.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let light = waiting(s.request("1", "light", 1));
    let waited = light.wait().await.unwrap().waited;
    order.lock().unwrap().push("light".into());
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let pos = order.iter().position(|x| x == "light").unwrap();
    assert!(
        pos <= 3,
        "the light request came {pos}th after 13 heavy ones were queued: {order:?}"
    );
    assert!(waited <= Duration::from_millis(200), "{waited:?}");
}

/// Clients keep their queues full for `secs`; returns what each was granted after the first
/// three seconds (the burst goes to whoever asks first).
async fn saturate(s: &Shaper, clients: &[(&'static str, u32)], secs: u64) -> Vec<u64> {
    let warm = Instant::now() + Duration::from_secs(3);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for &(name, weight) in clients {
        // Eight workers per client, each sending again as soon as it is answered (a refusal
        // is retried after 50 ms): the queue never empties.
        for _ in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut granted = 0u64;
                while Instant::now() < until {
                    match s.acquire("1", name, weight).await {
                        Ok(_) if Instant::now() >= warm && Instant::now() < until => granted += 1,
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                (name, granted)
            }));
        }
    }
    let mut totals = vec![0u64; clients.len()];
    for t in tasks {
        let (name, g) = t.await.unwrap();
        let i = clients.iter().position(|(n, _)| *n == name).unwrap();
        totals[i] += g;
    }
    totals
}

#[tokio::test(start_paused = true)]
async fn saturating_clients_share_in_proportion_to_their_weights() {
    let s = shaper();
    let got = saturate(&s, &[("one", 1), ("three", 3)], 30).await;
    let ratio = got[1] as f64 / got[0] as f64;
    assert!((2.7..=3.3).contains(&ratio), "{got:?}: {ratio}");
    // And together they used the whole budget: 10/s.
    let total = got[0] + got[1];
    assert!((269..=271).contains(&total), "{got:?}");
    let equal = saturate(&shaper(), &[("a", 1), ("b", 1)], 20).await;
    let ratio = equal[0] as f64 / equal[1] as f64;
    assert!((0.95..=1.05).contains(&ratio), "{equal:?}");
}

#[tokio::test(start_paused = true)]
async fn a_heavy_client_cannot_take_what_light_clients_ask_within_their_share() {
    // Two light clients at 3/s, one heavy at 30/s, against 10/s: the light ones are under
    // their fair share (10/3) and get everything; the heavy one gets the rest.
    let s = shaper();
    let start = Instant::now();
    let secs = 20u64;
    let mut tasks = Vec::new();
    for (name, per_sec) in [("light1", 3u64), ("light2", 3), ("heavy", 30)] {
        for i in 0..per_sec * secs {
            let s = s.clone();
            let at = start + Duration::from_micros(i * 1_000_000 / per_sec + 7_000);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                (name, s.acquire("1", name, 1).await)
            }));
        }
    }
    let mut ok: HashMap<&str, u64> = HashMap::new();
    let mut refusals = Vec::new();
    let tasks: Vec<_> = tasks.into_iter().collect();
    for t in tasks {
        let (name, r) = t.await.unwrap();
        match r {
            Ok(_) => *ok.entry(name).or_default() += 1,
            Err(e) => refusals.push((name, e)),
        }
    }
    let asked = 3 * secs;
    for light in ["light1", "light2"] {
        assert!(
            ok.get(light).copied().unwrap_or(0) as f64 >= 0.9 * asked as f64,
            "{light}: {ok:?}, refusals: {:?}",
            refusals
                .iter()
                .filter(|(n, _)| *n == light)
                .collect::<Vec<_>>()
        );
    }
    let total: u64 = ok.values().sum();
    // Queued requests of the last second are served after it.
    let budget = 9.0 + 10.0 * start.elapsed().as_secs_f64();
    assert!(
        total as f64 >= 0.85 * budget && total as f64 <= budget + 1.0,
        "{ok:?}"
    );
    // Every refusal was the heavy client's, with an honest Retry-After.
    for (name, e) in &refusals {
        assert_eq!(*name, "heavy", "{e}");
        assert!(e.retry_after_secs() >= 1);
    }
    assert!(!refusals.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_or_a_long_wait_is_refused_at_once_with_the_expected_wait() {
    let s = Shaper::new(RateLimits {
        queue_per_client: 4,
        max_wait: Duration::from_secs(10),
        ..limits()
    });
    for _ in 0..9 {
        go(s.request("1", "a", 1));
    }
    let queued: Vec<Waiting> = (0..4).map(|_| waiting(s.request("1", "a", 1))).collect();
    let e = refused(s.request("1", "a", 1));
    assert_eq!(e.cause, Cause::QueueFull);
    // Four ahead, plus itself, at 10/s.
    assert_eq!(e.expected_wait, Duration::from_millis(500));
    assert_eq!(e.retry_after_secs(), 1);
    assert!(e.to_string().contains("organization 1"), "{e}");
    // Another client is not affected by a's full queue.
    let other = waiting(s.request("1", "b", 1));
    drop(other);
    drop(queued);

    let s = Shaper::new(RateLimits {
        max_wait: Duration::from_millis(1000),
        ..limits()
    });
    for _ in 0..9 {
        go(s.request("1", "a", 1));
    }
    let mut queued = Vec::new();
    let e = loop {
        match s.request("1", "a", 1) {
            Ticket::Wait(w) => queued.push(w),
            Ticket::Refused(e) => break e,
            Ticket::Go(_) => panic!("the bucket is empty"),
        }
    };
    assert_eq!(e.cause, Cause::WaitTooLong);
    // Ten queued (1 s), the eleventh would wait 1.1 s: Retry-After 2.
    assert_eq!(queued.len(), 10);
    assert_eq!(e.expected_wait, Duration::from_millis(1100));
    assert_eq!(e.retry_after_secs(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_goes_away_gives_its_place_up() {
    let s = shaper();
    for _ in 0..9 {
        go(s.request("1", "a", 1));
    }
    let first = waiting(s.request("1", "a", 1));
    let second = waiting(s.request("1", "b", 1));
    assert_eq!(s.organizations()[0].queued, 2);
    drop(first);
    assert_eq!(s.organizations()[0].queued, 1);
    // The second takes the first's place: one token's time, not two.
    assert_eq!(
        second.wait().await.unwrap().waited,
        Duration::from_millis(100)
    );

    // Granted, then dropped before it was used: the token comes back.
    let s = shaper();
    for _ in 0..9 {
        go(s.request("1", "a", 1));
    }
    let w = waiting(s.request("1", "a", 1));
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(w);
    // 0.5 tokens left over after the grant at 100 ms, plus the one given back.
    let level = s.organizations()[0].tokens;
    assert!((level - 1.5).abs() < 1e-6, "{level}");
    go(s.request("1", "a", 1));
}

#[tokio::test(start_paused = true)]
async fn upstream_429s_slow_the_organization_and_successes_speed_it_back_up() {
    let s = shaper();
    go(s.request("1", "a", 1));
    s.upstream_answered("1", 429);
    let o = &s.organizations()[0];
    assert!((o.rps - 7.0).abs() < 1e-9, "{}", o.rps);
    assert!(o.tokens <= 0.0);
    // Several 429s within a second are one signal.
    s.upstream_answered("1", 429);
    s.upstream_answered("1", 429);
    assert!((s.organizations()[0].rps - 7.0).abs() < 1e-9);
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.upstream_answered("1", 429);
    assert!((s.organizations()[0].rps - 4.9).abs() < 1e-9);
    assert_eq!(s.organizations()[0].upstream_429_total, 4);
    // +0.2/s per success back to 10.
    for _ in 0..10 {
        s.upstream_answered("1", 200);
    }
    assert!((s.organizations()[0].rps - 6.9).abs() < 1e-9);
    for _ in 0..100 {
        s.upstream_answered("1", 200);
    }
    assert_eq!(s.organizations()[0].rps, 10.0);
    assert_eq!(s.shared.slowed.load(Ordering::Relaxed), 0);
    // Another organization is untouched.
    go(s.request("2", "a", 1));
    assert_eq!(s.organizations()[1].rps, 10.0);
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_is_refused_when_the_budget_shrinks_under_it() {
    let s = Shaper::new(RateLimits {
        max_wait: Duration::from_millis(1000),
        ..limits()
    });
    for _ in 0..9 {
        go(s.request("1", "a", 1));
    }
    let ws: Vec<Waiting> = (0..5).map(|_| waiting(s.request("1", "a", 1))).collect();
    // Thirty requests went out without waiting (retries, redirects): 3 s of debt.
    for _ in 0..30 {
        s.charge("1");
    }
    let started = Instant::now();
    for w in ws {
        let e = w.wait().await.unwrap_err();
        assert_eq!(e.cause, Cause::TimedOut);
        assert!(e.retry_after_secs() >= 1);
    }
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(s.organizations()[0].queued, 0);
}

#[tokio::test(start_paused = true)]
async fn charges_and_share_and_turning_off() {
    let s = shaper();
    for _ in 0..9 {
        go(s.request("1", "a", 1));
    }
    // A retry after a 401 went out without waiting: the next request waits for two tokens.
    s.charge("1");
    let w = waiting(s.request("1", "a", 1));
    assert_eq!(w.wait().await.unwrap().waited, Duration::from_millis(200));

    // Half the budget (two instances).
    let s = shaper();
    s.set_shares(&Shares::even(2));
    for _ in 0..4 {
        go(s.request("1", "a", 1));
    }
    let w = waiting(s.request("1", "a", 1));
    assert_eq!(w.wait().await.unwrap().waited, Duration::from_millis(200));

    // Off: everything goes, and whatever waited is let go.
    let s = shaper();
    for _ in 0..9 {
        go(s.request("1", "a", 1));
    }
    let w = waiting(s.request("1", "a", 1));
    s.set_limits(RateLimits {
        enabled: false,
        ..limits()
    });
    assert_eq!(w.wait().await.unwrap().waited, Duration::ZERO);
    for _ in 0..1000 {
        go(s.request("1", "a", 1));
    }
}

#[tokio::test(start_paused = true)]
async fn the_source_budget_is_shared_across_organizations() {
    let s = Shaper::new(RateLimits {
        source_rps: 20.0,
        ..limits()
    });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for org in ["1", "2", "3", "4"] {
        for i in 0..40u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(start + Duration::from_millis(100 * i)).await;
                (org, s.acquire(org, "a", 1).await.is_ok())
            }));
        }
    }
    let mut per_org: HashMap<&str, u64> = HashMap::new();
    for t in tasks {
        let (org, ok) = t.await.unwrap();
        *per_org.entry(org).or_default() += u64::from(ok);
    }
    let total: u64 = per_org.values().sum();
    let secs = start.elapsed().as_secs_f64();
    assert!(total as f64 <= 2.0 + 20.0 * secs, "{per_org:?} in {secs}");
    let (min, max) = (
        per_org.values().min().unwrap(),
        per_org.values().max().unwrap(),
    );
    assert!(max - min <= 4, "{per_org:?}");
}

#[test]
fn windows_count_the_last_slots_only() {
    let mut w = Window::default();
    w.add(0);
    w.add(0);
    w.add(5);
    assert_eq!(w.sum(5, 6), 3);
    assert_eq!(w.sum(5, 1), 1);
    assert_eq!(w.sum(40, SLOTS), 0);
    w.add(40);
    assert_eq!(w.sum(40, SLOTS), 1);
    assert_eq!(w.sum(41, 2), 1);
}

#[tokio::test(start_paused = true)]
async fn activity_is_recorded_per_client() {
    let s = shaper();
    s.record("a", Outcome::Served, Instant::now());
    s.record("a", Outcome::Denied, Instant::now());
    s.record("a", Outcome::Throttled, Instant::now());
    s.record("b", Outcome::Served, Instant::now());
    let c = s.clients();
    assert_eq!(c.len(), 2);
    assert_eq!(
        (c[0].requests_5m, c[0].denied_5m, c[0].throttled_5m),
        (3, 1, 1)
    );
    tokio::time::advance(Duration::from_secs(301)).await;
    assert_eq!(s.clients()[0].requests_5m, 0);
}

fn shares(default: f64, orgs: &[(&str, f64)]) -> Shares {
    Shares {
        default,
        orgs: orgs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        source: 1.0,
        demand: HashMap::new(),
        instances: 2,
    }
}

#[tokio::test(start_paused = true)]
async fn a_per_organization_share_sets_only_that_organizations_bucket() {
    let s = shaper();
    s.set_shares(&shares(1.0, &[("1", 0.5)]));
    // Half of organization 1's budget: 10 × 0.5 − the headroom = 4 at once, then 5/s.
    for _ in 0..4 {
        go(s.request("1", "a", 1));
    }
    let w = waiting(s.request("1", "a", 1));
    assert_eq!(w.wait().await.unwrap().waited, Duration::from_millis(200));
    // Organization 2 keeps the default, the whole budget.
    for _ in 0..9 {
        go(s.request("2", "a", 1));
    }
    let snap = s.organizations();
    assert_eq!(snap[0].share, 0.5);
    assert_eq!(snap[1].share, 1.0);
    assert_eq!(snap[0].configured_rps, 5.0);
    // A later division that no longer names organization 1 gives it the default.
    s.set_shares(&shares(0.25, &[]));
    assert!(s.organizations().iter().all(|o| o.share == 0.25));
}

#[tokio::test(start_paused = true)]
async fn demand_reports_each_clients_rate_and_hunger_over_the_last_second() {
    let s = shaper();
    for _ in 0..5 {
        go(s.request("1", "light", 1));
    }
    // The heavy client finds the bucket empty: its requests wait (hungry).
    for _ in 0..4 {
        go(s.request("2", "heavy", 3));
    }
    let held: Vec<Waiting> = (0..5)
        .filter_map(|_| match s.request("2", "heavy", 3) {
            Ticket::Go(_) => None,
            Ticket::Wait(w) => Some(w),
            Ticket::Refused(e) => panic!("{e}"),
        })
        .collect();
    assert!(!held.is_empty());
    tokio::time::advance(Duration::from_millis(250)).await;
    let d = s.demand();
    let light = &d.orgs["1"][0];
    assert_eq!(light.client, "light");
    assert!((light.rps - 20.0).abs() < 1e-6, "{light:?}");
    assert!((light.asked - 20.0).abs() < 1e-6, "{light:?}");
    assert!(!light.hungry);
    let heavy = &d.orgs["2"][0];
    assert!(heavy.hungry, "{heavy:?}");
    assert_eq!(heavy.weight, 3.0);
    assert!((heavy.asked - 9.0 / 0.25).abs() < 1e-6, "{heavy:?}");
    assert!(d.source_rps >= 9.0 / 0.25, "{d:?}");
    drop(held);
    // A second later, with nothing asked: nobody is published.
    for _ in 0..4 {
        tokio::time::advance(Duration::from_millis(250)).await;
        s.demand();
    }
    tokio::time::advance(Duration::from_millis(250)).await;
    assert!(s.demand().orgs.is_empty());
}

/// Three shapers ("instances") exchanging their demand every 250 ms through `fleet::allocate`,
/// in front of a simulated Meraki bucket (10/s, 10 deep): a noisy client (10 tasks back to
/// back) on instance 0, clients at 2/s on instances 1 and 2.
#[tokio::test(start_paused = true)]
async fn three_instances_exchanging_demand_use_the_budget_and_never_exceed_it() {
    use std::sync::atomic::AtomicBool;
    let instances: Vec<Shaper> = (0..3).map(|_| shaper()).collect();
    for s in &instances {
        s.set_shares(&Shares::even(3));
    }
    // Meraki's bucket for the organization.
    let meraki = Arc::new(Mutex::new((10.0f64, Instant::now(), 0u64)));
    let spend = {
        let meraki = meraki.clone();
        move || {
            let mut m = meraki.lock().unwrap();
            let now = Instant::now();
            m.0 = (m.0 + (now - m.1).as_secs_f64() * 10.0).min(10.0);
            m.1 = now;
            if m.0 >= 1.0 {
                m.0 -= 1.0;
            } else {
                m.2 += 1;
            }
        }
    };
    let start = Instant::now();
    let end = start + Duration::from_secs(20);
    let warm = start + Duration::from_secs(2);
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let mut tasks = Vec::new();
    for k in 0..10 {
        let (s, spend, counts) = (instances[0].clone(), spend.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                match s.acquire("o", "noisy", 1).await {
                    Ok(_) => {
                        spend();
                        if Instant::now() >= warm {
                            counts[0].fetch_add(1, Ordering::Relaxed);
                        }
                        // A round trip to Meraki.
                        tokio::time::sleep(Duration::from_millis(20 + k)).await;
                    }
                    Err(t) => tokio::time::sleep(Duration::from_secs(t.retry_after_secs())).await,
                }
            }
        }));
    }
    for i in 1..3 {
        let (s, spend, counts) = (instances[i].clone(), spend.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            let mut next = Instant::now();
            while next < end {
                tokio::time::sleep_until(next).await;
                if s.acquire("o", &format!("light{i}"), 1).await.is_ok() {
                    spend();
                    if Instant::now() >= warm {
                        counts[i].fetch_add(1, Ordering::Relaxed);
                    }
                }
                next += Duration::from_millis(500);
            }
        }));
    }
    let exchange = {
        let (instances, stop) = (instances.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(fleet::CYCLE);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let docs: Vec<(String, Demand)> = instances
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (format!("i{i}"), s.demand()))
                    .collect();
                for (i, s) in instances.iter().enumerate() {
                    s.set_shares(&fleet::allocate(&format!("i{i}"), &docs, 10.0, 100.0, true));
                }
            }
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    exchange.await.unwrap();
    let secs = (end - warm).as_secs_f64();
    let got: Vec<f64> = counts
        .iter()
        .map(|c| c.load(Ordering::Relaxed) as f64 / secs)
        .collect();
    let used = got.iter().sum::<f64>() / 10.0;
    let over = meraki.lock().unwrap().2;
    eprintln!(
        "served/s {got:?}; budget used {:.1} %; Meraki's 429s {over}",
        used * 100.0
    );
    assert_eq!(over, 0, "the fleet asked Meraki for more than its budget");
    assert!(used >= 0.90, "budget used {used}");
    assert!(got[1] >= 1.9 && got[2] >= 1.9, "light clients {got:?}");
}
