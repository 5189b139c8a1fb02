//! The refresh engine from outside: the real binary and the Meraki stand-in, under the four
//! conditions that used to cost a token call per request (or two or three per expiry).

mod support;

use reqwest::{Method, StatusCode};
use std::time::{Duration, Instant};
use support::harness::*;

async fn ready(opts: Options, access_ttl: u64) -> (Scenario, ProxyProcess) {
    let s = Scenario::new(opts).await;
    s.standin.set_access_ttl(access_ttl);
    s.import().await;
    let p = s.start().await;
    (s, p)
}

/// `n` GETs spread over `connections` connections (one client each, sending one after another).
async fn over_connections(
    s: &Scenario,
    n: usize,
    connections: usize,
    path: &str,
) -> Vec<StatusCode> {
    let per = n.div_ceil(connections);
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let url = format!("{}{path}", s.base());
            let todo = per.min(n.saturating_sub(c * per));
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                let mut out = Vec::with_capacity(todo);
                for _ in 0..todo {
                    let r = client
                        .get(&url)
                        .header("X-Cisco-Meraki-API-Key", ALICE_KEY)
                        .send()
                        .await
                        .unwrap();
                    out.push(r.status());
                }
                out
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Case 1: Meraki starts refusing the current token; 400 requests on 64 connections arrive
/// before, during and after the refresh and its commit. Five times. (With an instant token
/// endpoint, requests keep arriving while the rotation is committed: the build before the refresh
/// engine made 1, 2, 4, 2 and 1 token calls in these five rounds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_across_a_rotation_makes_one_token_call_every_time() {
    let (s, _p) = ready(Options::default(), 3600).await;
    for round in 0..5 {
        let before = s.standin.token_calls();
        s.standin.expire_all_access_tokens();
        let statuses = over_connections(&s, 400, 64, "/organizations/111").await;
        assert!(
            statuses.iter().all(|st| *st == 200),
            "round {round}: {statuses:?}"
        );
        let calls = s.standin.token_calls() - before;
        eprintln!("burst round {round}: {calls} token calls");
        assert_eq!(calls, 1, "round {round}");
    }
    let refreshes: Vec<_> = s
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "token_refreshed" && r["organization"] == "111")
        .collect();
    assert_eq!(
        refreshes.len(),
        1 + 5,
        "the import and one refresh per round"
    );
    assert!(refreshes[1..]
        .iter()
        .all(|r| r["cause"] == "rejected_by_meraki"));
}

/// Case 2: access tokens shorter than `refresh_ahead_secs` (10 s against 300 s): one token call
/// per half-lifetime under steady traffic, not one per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_lived_tokens_are_refreshed_once_per_half_lifetime() {
    let (s, _p) = ready(Options::default(), 10).await;
    let before = s.standin.token_calls();
    let start = Instant::now();
    let run = Duration::from_secs(12);
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let req = s.script(Method::GET, "/organizations/111", ALICE_KEY);
            tokio::spawn(async move {
                let mut n = 0;
                // Bounded in time and count.
                while start.elapsed() < run && n < 2_000 {
                    let r = req.try_clone().unwrap().send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                n
            })
        })
        .collect();
    let mut sent = 0;
    for l in loops {
        sent += l.await.unwrap();
    }
    let calls = s.standin.token_calls() - before;
    eprintln!("10-s tokens: {calls} token calls for {sent} requests");
    // A 10-s token is used for 5 s: 12 s of traffic needs two or three refreshes.
    assert!(sent > 100, "{sent} requests");
    assert!(
        (1..=3).contains(&calls),
        "{calls} token calls for {sent} requests"
    );
}

/// Case 3: an endpoint Meraki refuses whatever the token: a token issued moments ago is not
/// refreshed again; Meraki's 401 passes through, marked.
#[tokio::test]
async fn an_endpoint_refused_whatever_the_token_costs_no_token_calls() {
    let (s, _p) = ready(
        Options {
            tokens: "rejected_grace_secs = 30".into(),
            ..Default::default()
        },
        3600,
    )
    .await;
    let before = s.standin.token_calls();
    s.standin
        .fail_next_api(30, 401, r#"{"errors":["Invalid API key"]}"#);
    for _ in 0..30 {
        let r = s
            .script(Method::GET, "/organizations/111/networks", ALICE_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["x-proxy-upstream"], "rejected-401");
    }
    let calls = s.standin.token_calls() - before;
    eprintln!("always 401: {calls} token calls for 30 requests");
    assert!(calls <= 1, "{calls} token calls for 30 requests");
    eventually("an audit reason for each passed-through 401", || {
        s.audit()
            .iter()
            .filter(|r| r["kind"] == "request" && r["reason"] == "fresh_token_rejected")
            .count()
            == 30
    })
    .await;
    // The grant is fine: the next request succeeds.
    let r = s
        .script(Method::GET, "/organizations/111/networks", ALICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Case 4: the token endpoint down for 6 s while Meraki refuses every access token: token
/// calls follow the backoff schedule, every answer is a 503 with an integer `Retry-After`, the
/// grant is kept, and service is back within one backoff step.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_endpoint_outage_backs_off_and_recovers() {
    let (s, _p) = ready(Options::default(), 3600).await;
    let before = s.standin.token_calls();
    s.standin.set_token_endpoint_down(true);
    s.standin.expire_all_access_tokens();
    let start = Instant::now();
    let mut answers: Vec<(StatusCode, Option<u64>, String)> = Vec::new();
    while start.elapsed() < Duration::from_secs(6) && answers.len() < 600 {
        let r = s
            .script(Method::GET, "/organizations/111", ALICE_KEY)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let after = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        answers.push((status, after, r.text().await.unwrap()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = s.standin.token_calls() - before;
    eprintln!("outage: {calls} token calls for {} requests", answers.len());
    // Backoff 1, 2, 4 s (±20%): at most four calls in 6 s, against one per request before.
    assert!(
        (2..=4).contains(&calls),
        "{calls} token calls for {} requests",
        answers.len()
    );
    assert!(answers.len() > 50, "{} answers", answers.len());
    for (status, after, body) in &answers {
        assert_eq!(*status, 503, "{body}");
        assert!(
            after.is_some_and(|a| (1..=60).contains(&a)),
            "an integer Retry-After: {after:?}"
        );
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(
            body["errors"][0].as_str().unwrap().contains("refresh"),
            "{body}"
        );
    }
    let last_retry_after = answers.last().and_then(|a| a.1).unwrap_or(1);
    s.standin.set_token_endpoint_down(false);
    tokio::time::sleep(Duration::from_secs(last_retry_after) + Duration::from_millis(200)).await;
    let recovered = Instant::now();
    loop {
        let r = s
            .script(Method::GET, "/organizations/111", ALICE_KEY)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(10),
            "not back within one backoff step"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = s.run(&["grants", "list"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(" ok "),
        "no grant lost"
    );
}
