//! Fair sharing of Meraki's rate limits (issue 15), end to end: the real binary in front of the
//! stand-in enforcing Meraki's per-organization limit (a token bucket: 10 requests/s, 10 deep;
//! 429 with an integer `Retry-After` beyond), with the proxy's `[rate_limits]` at Meraki's
//! published figures. Several clients on one organization, real concurrency (dozens of
//! connections), bounded durations. The only figures asserted are the product's guarantees:
//! shares, ratios, counts of 429s.

mod support;

use reqwest::{Method, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::harness::*;

const CAROL_KEY: &str = "carol-proxy-key-3c7d1e9f";
const DAVE_KEY: &str = "dave-proxy-key-7a4b2c8e";
/// Meraki's per-organization limit, which the stand-in enforces and the proxy defaults to.
const RPS: f64 = 10.0;
const BURST: f64 = 10.0;

/// Org 111 for alice (weight 1), carol and dave with these weights.
async fn scenario(carol_weight: u32, dave_weight: u32, rate_limits: &str) -> Scenario {
    let clients = format!(
        r#"
[[clients]]
name = "carol"
key_sha256 = "{}"
integration = "netops"
organizations = ["111"]
weight = {carol_weight}

[[clients]]
name = "dave"
key_sha256 = "{}"
integration = "netops"
organizations = ["111"]
weight = {dave_weight}
"#,
        sha256_hex(CAROL_KEY),
        sha256_hex(DAVE_KEY)
    );
    let s = Scenario::new(Options {
        rate_limits: rate_limits.into(),
        clients,
        ..Default::default()
    })
    .await;
    s.import().await;
    s
}

/// What one client got.
#[derive(Default, Debug, Clone)]
struct Tally {
    asked: u64,
    ok: u64,
    /// Local 429s: (Retry-After, X-Proxy-Upstream).
    refused: Vec<(Option<String>, Option<String>)>,
    other: Vec<u16>,
}

/// Sends `per_sec` requests a second for `secs` as `key` to `path`, each on its own task (an
/// open loop, like a script's worker threads: a slow answer does not slow the sending).
fn open_loop(
    s: &Scenario,
    key: &'static str,
    path: &'static str,
    per_sec: u64,
    secs: u64,
    start: tokio::time::Instant,
    tally: Arc<Mutex<Tally>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let http = http();
    let url = format!("{}{path}", s.base());
    (0..per_sec * secs)
        .map(|i| {
            let (http, url, tally) = (http.clone(), url.clone(), tally.clone());
            let at = start + Duration::from_micros(i * 1_000_000 / per_sec);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                tally.lock().unwrap().asked += 1;
                let r = http
                    .get(&url)
                    .header("X-Cisco-Meraki-API-Key", key)
                    .send()
                    .await
                    .expect("the proxy answers");
                let status = r.status();
                let header = |n: &str| {
                    r.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let mut t = tally.lock().unwrap();
                match status {
                    StatusCode::OK => t.ok += 1,
                    StatusCode::TOO_MANY_REQUESTS => t
                        .refused
                        .push((header("retry-after"), header("x-proxy-upstream"))),
                    other => t.other.push(other.as_u16()),
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ten_times_as_fast_cannot_crowd_out_the_others_and_meraki_serves_no_429() {
    let s = scenario(1, 1, "enabled = true").await;
    s.standin.enforce_rate_limit(RPS, BURST);
    let p = s.start().await;
    s.standin.clear_requests();
    // Two light clients at 2 requests/s (under their fair share, 10/3), one heavy at 20: 24/s
    // asked of a 10/s organization, for 20 s. The light ones use the organization's network and
    // device paths, which the proxy resolves (and its lookups count too).
    let secs = 20;
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let tallies: Vec<(&str, Arc<Mutex<Tally>>)> = ["alice", "carol", "dave"]
        .iter()
        .map(|n| (*n, Arc::default()))
        .collect();
    let mut tasks = Vec::new();
    tasks.extend(open_loop(
        &s,
        ALICE_KEY,
        "/networks/L_111_1",
        2,
        secs,
        start,
        tallies[0].1.clone(),
    ));
    tasks.extend(open_loop(
        &s,
        CAROL_KEY,
        "/devices/Q111-AAAA-0001",
        2,
        secs,
        start,
        tallies[1].1.clone(),
    ));
    tasks.extend(open_loop(
        &s,
        DAVE_KEY,
        "/organizations/111",
        20,
        secs,
        start,
        tallies[2].1.clone(),
    ));
    for t in tasks {
        t.await.unwrap();
    }
    let got: HashMap<&str, Tally> = tallies
        .iter()
        .map(|(n, t)| (*n, t.lock().unwrap().clone()))
        .collect();

    let log = s.standin.rate_log();
    let first = log.first().expect("requests reached the stand-in").at;
    let last = log.last().unwrap().at;
    let late_429s = log
        .iter()
        .filter(|d| !d.allowed && d.at > first + Duration::from_secs(1))
        .count();
    // The organization's limit over the run: Meraki's bucket allows its depth plus its rate.
    let secs_run = (last - first).as_secs_f64();
    let served = log.iter().filter(|d| d.allowed).count() as f64;
    let use_of_budget = served / (BURST + RPS * secs_run);
    println!(
        "served/asked: alice {}/{}, carol {}/{}, dave {}/{} ({} local 429s); stand-in: {} requests, {} 429s ({} after the first second); organization's limit used: {:.1}% of {BURST} + {RPS}/s over {secs_run:.1} s",
        got["alice"].ok,
        got["alice"].asked,
        got["carol"].ok,
        got["carol"].asked,
        got["dave"].ok,
        got["dave"].asked,
        got["dave"].refused.len(),
        log.len(),
        s.standin.rate_limited(),
        late_429s,
        100.0 * use_of_budget
    );
    assert_eq!(
        late_429s, 0,
        "the stand-in answered 429 after the first second"
    );
    for light in ["alice", "carol"] {
        let t = &got[light];
        assert!(
            t.ok as f64 >= 0.9 * t.asked as f64,
            "{light} got {} of {}: {t:?}",
            t.ok,
            t.asked
        );
        assert!(t.other.is_empty(), "{light}: {t:?}");
    }
    assert!(got["dave"].other.is_empty(), "{:?}", got["dave"].other);
    assert!(
        (0.85..=1.0).contains(&use_of_budget),
        "the organization's budget was used at {:.1}%",
        100.0 * use_of_budget
    );
    // The heavy client's refusals are honest local 429s.
    assert!(!got["dave"].refused.is_empty());
    for (retry_after, upstream) in &got["dave"].refused {
        let secs: u64 = retry_after.as_deref().unwrap().parse().unwrap();
        assert!((1..=4).contains(&secs), "{retry_after:?}");
        assert_eq!(upstream.as_deref(), Some("not-sent"));
    }

    // The status page shows the organization, the heavy client's local 429s, the shares.
    let (status, page) = p.admin("/").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("id=\"rate-organizations\"") && page.contains("data-org=\"111\""),
        "{page}"
    );
    assert!(page.contains("<span data-client=\"dave\">dave: "), "{page}");
    let (_, metrics) = p.admin("/metrics").await;
    let local_429s = format!(
        "meraki_proxy_rate_limited_total{{client=\"dave\",organization=\"111\"}} {}",
        got["dave"].refused.len()
    );
    assert!(
        metrics.contains(&local_429s),
        "{local_429s} not in:\n{metrics}"
    );
    assert!(metrics.contains("meraki_proxy_rate_queue_wait_seconds_bucket{organization=\"111\""));
    assert!(metrics.contains("meraki_proxy_rate_bucket_tokens{organization=\"111\"}"));
    assert!(metrics.contains("meraki_proxy_upstream_429_total{organization=\"111\"} 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturating_clients_weighted_1_and_3_share_1_to_3() {
    let s = scenario(1, 3, "enabled = true").await;
    s.standin.enforce_rate_limit(RPS, BURST);
    let _p = s.start().await;
    let http = http();
    // Each client keeps eight requests outstanding, sending the next as soon as one is answered
    // (after a local 429, 50 ms later): both always have requests waiting. Counted from 3 s on
    // (the first burst goes to whoever asks first) to 23 s.
    let t0 = Instant::now();
    let (from, until) = (t0 + Duration::from_secs(3), t0 + Duration::from_secs(23));
    let mut tasks = Vec::new();
    for (name, key) in [("carol", CAROL_KEY), ("dave", DAVE_KEY)] {
        for _ in 0..8 {
            let http = http.clone();
            let url = format!("{}/organizations/111", s.base());
            tasks.push(tokio::spawn(async move {
                let mut ok = 0u64;
                while Instant::now() < until {
                    let r = http
                        .get(&url)
                        .header("X-Cisco-Meraki-API-Key", key)
                        .send()
                        .await
                        .expect("the proxy answers");
                    let now = Instant::now();
                    match r.status() {
                        StatusCode::OK if now >= from && now < until => ok += 1,
                        StatusCode::OK => {}
                        StatusCode::TOO_MANY_REQUESTS => {
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        other => panic!("{name}: {other}"),
                    }
                }
                (name, ok)
            }));
        }
    }
    let mut got: HashMap<&str, u64> = HashMap::new();
    for t in tasks {
        let (name, ok) = t.await.unwrap();
        *got.entry(name).or_default() += ok;
    }
    let ratio = got["dave"] as f64 / got["carol"] as f64;
    println!(
        "weights 1:3 -> carol {} dave {} (1:{ratio:.2}); stand-in 429s: {}",
        got["carol"],
        got["dave"],
        s.standin.rate_limited()
    );
    assert!(
        (2.7..=3.3).contains(&ratio),
        "shares {got:?} are 1:{ratio:.2}, not within 10% of 1:3"
    );
    let total = (got["carol"] + got["dave"]) as f64 / 20.0;
    assert!(total >= 0.85 * RPS, "{total} requests/s");
    let late = s
        .standin
        .rate_log()
        .iter()
        .filter(|d| !d.allowed && d.at > t0 + Duration::from_secs(1))
        .count();
    assert_eq!(late, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_the_queue_gets_immediate_local_429s_with_a_correct_retry_after() {
    let s = scenario(1, 1, "queue_per_client = 8").await;
    s.standin.enforce_rate_limit(RPS, BURST);
    let p = s.start().await;
    s.standin.clear_requests();
    // 40 at once from one client: the bucket's 9 go, 8 wait their turn, the rest are refused.
    let started = Instant::now();
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let req = s.script(Method::GET, "/organizations/111", ALICE_KEY);
            tokio::spawn(async move {
                let r = req.send().await.unwrap();
                let retry_after = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_owned());
                let upstream = r
                    .headers()
                    .get("x-proxy-upstream")
                    .map(|v| v.to_str().unwrap().to_owned());
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.unwrap();
                (status, retry_after, upstream, body)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    println!(
        "40 at once: {ok} served, {} local 429s (Retry-After {:?}), in {:?}",
        refused.len(),
        refused
            .iter()
            .map(|a| a.1.clone())
            .collect::<std::collections::BTreeSet<_>>(),
        started.elapsed()
    );
    assert_eq!(ok + refused.len(), 40, "{answers:?}");
    // 9 + 8, give or take the tokens that came while the 40 connections were opened.
    assert!((17..=21).contains(&ok), "{ok} served");
    let mut max_retry_after = 0;
    for (_, retry_after, upstream, body) in &refused {
        // A full queue of 8 at 10/s: the refused request expected to wait 0.9 s.
        let secs: u64 = retry_after.as_deref().unwrap().parse().unwrap();
        assert!((1..=2).contains(&secs), "{retry_after:?}");
        max_retry_after = max_retry_after.max(secs);
        assert_eq!(upstream.as_deref(), Some("not-sent"));
        assert!(
            body["errors"][0]
                .as_str()
                .unwrap()
                .contains("rate limit exceeded for organization 111"),
            "{body}"
        );
    }
    assert_eq!(s.standin.rate_limited(), 0, "Meraki saw no excess");
    assert_eq!(
        s.standin.requests().len(),
        ok,
        "the refused requests were not sent"
    );
    // Retry-After was right: retried after it, the client is served without a queue.
    tokio::time::sleep(Duration::from_secs(max_retry_after)).await;
    for _ in 0..5 {
        let r = s
            .script(Method::GET, "/organizations/111", ALICE_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    eventually("the audit records", || {
        s.audit()
            .iter()
            .filter(|r| r["kind"] == "request" && r["client"] == "alice")
            .count()
            >= 45
    })
    .await;
    let audit: Vec<_> = s
        .audit()
        .into_iter()
        .filter(|r| r["kind"] == "request" && r["client"] == "alice")
        .collect();
    let denied = audit
        .iter()
        .filter(|r| {
            r["reason"] == "rate_limited" && r["decision"] == "denied" && r["status"] == 429
        })
        .count();
    assert_eq!(denied, refused.len());
    let waited = audit
        .iter()
        .filter(|r| r["queue_wait_ms"].as_f64().is_some_and(|w| w > 0.0))
        .count();
    assert!(waited >= 8, "{waited} audit records with a queue wait");
    drop(p);
}
