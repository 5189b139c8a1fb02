//! Day-one operations against the real binary: a configuration reload under load, SIGTERM
//! under load, and a bounded chaos run of upstream connection faults.

mod support;

use nix::sys::signal::Signal;
use reqwest::Method;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::chaos::Chaos;
use support::harness::*;

const CAROL_KEY: &str = "carol-proxy-key-77a0c3e1";

/// Alice's requests from `workers` connections, `each` per worker: their statuses.
fn alice_load(
    s: &Arc<Scenario>,
    workers: usize,
    each: usize,
) -> Vec<tokio::task::JoinHandle<Vec<u16>>> {
    (0..workers)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut statuses = Vec::with_capacity(each);
                for i in 0..each {
                    let path = format!("/networks/L_111_{}", (w + i) % 3);
                    let r = s.script(Method::GET, &path, ALICE_KEY).send().await;
                    statuses.push(r.map_or(0, |r| r.status().as_u16()));
                }
                statuses
            })
        })
        .collect()
}

async fn post_reload(p: &ProxyProcess) -> (u16, serde_json::Value) {
    let r = http()
        .post(format!("http://127.0.0.1:{}/admin/reload", p.admin_port))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Reload under load: a client added by SIGHUP works, a removed one is refused, a restart-only
/// change is reported, an invalid file (POST /admin/reload) changes nothing, and not one of
/// the requests running meanwhile fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_applies_clients_and_refuses_an_invalid_file() {
    // 1,200 requests back to back at one organization: 100 times Meraki's 10/s, lifted here
    // because this test is about the reload, not the rate.
    let s = Arc::new(
        Scenario::new(Options {
            rate_limits: UNSHAPED.into(),
            ..Default::default()
        })
        .await,
    );
    s.import().await;
    let p = s.start().await;
    assert_eq!(s.status("/networks/L_222_0", BOB_KEY).await, 200);
    assert_eq!(s.status("/networks/L_111_0", CAROL_KEY).await, 401);

    let load = alice_load(&s, 8, 150);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Bob out, carol in, and a setting a running server cannot change.
    let text = std::fs::read_to_string(&s.config).unwrap();
    let bob_at = text.find("[[clients]]\nname = \"bob\"").unwrap();
    let valid = format!(
        "{}[[clients]]\nname = \"carol\"\nkey_sha256 = \"{}\"\nintegration = \"netops\"\norganizations = [\"111\"]\nmethods = [\"GET\"]\n",
        &text[..bob_at].replace("[server]\n", "[server]\nthreads = 3\n"),
        sha256_hex(CAROL_KEY)
    );
    std::fs::write(&s.config, &valid).unwrap();
    p.signal(Signal::SIGHUP);
    let mut carol = 0;
    for _ in 0..200 {
        carol = s.status("/networks/L_111_1", CAROL_KEY).await;
        if carol == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(carol, 200, "the client added by the reload is served");
    assert_eq!(s.status("/networks/L_222_0", BOB_KEY).await, 401);
    assert_eq!(
        s.script(Method::PUT, "/networks/L_111_1", CAROL_KEY)
            .json(&serde_json::json!({"name": "x"}))
            .send()
            .await
            .unwrap()
            .status(),
        403,
        "the new client's permissions apply"
    );

    // An invalid file: refused with the key named, the running configuration kept.
    std::fs::write(
        &s.config,
        valid.replace(
            "organizations = [\"111\"]\nmethods",
            "organizations = []\nmethods",
        ),
    )
    .unwrap();
    let (status, body) = post_reload(&p).await;
    assert_eq!(status, 422, "{body}");
    let why = body["errors"][0].as_str().unwrap();
    assert!(why.contains("clients[1].organizations"), "{why}");
    assert_eq!(s.status("/networks/L_111_1", CAROL_KEY).await, 200);
    assert_eq!(s.status("/networks/L_222_0", BOB_KEY).await, 401);

    // The valid file again, through the admin API: the next generation.
    std::fs::write(&s.config, &valid).unwrap();
    let (status, body) = post_reload(&p).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["generation"], 3);
    assert_eq!(body["clients"], 2);
    assert_eq!(
        body["restartRequired"],
        serde_json::json!(["server.threads"])
    );

    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for t in load {
        for st in t.await.unwrap() {
            *statuses.entry(st).or_default() += 1;
        }
    }
    assert_eq!(
        statuses,
        HashMap::from([(200, 1200)]),
        "every request during the reloads succeeded"
    );

    let (_, metrics) = p.admin("/metrics").await;
    assert!(metrics.contains("meraki_proxy_config_reloads_total{result=\"applied\"} 2"));
    assert!(metrics.contains("meraki_proxy_config_reloads_total{result=\"refused\"} 1"));
    assert!(metrics.contains("meraki_proxy_config_generation 3"));
    let (_, page) = p.admin("/").await;
    assert!(page.contains("generation 3"));
    eventually("the reload records", || {
        let audit = s.audit();
        let events: Vec<(String, String)> = audit
            .iter()
            .filter(|r| r["kind"] == "server")
            .map(|r| {
                (
                    r["event"].as_str().unwrap().to_owned(),
                    r["trigger"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        events
            == [
                ("config_reloaded".into(), "sighup".into()),
                ("config_reload_refused".into(), "admin".into()),
                ("config_reloaded".into(), "admin".into()),
            ]
    })
    .await;
    let refused = s
        .audit()
        .into_iter()
        .find(|r| r["event"] == "config_reload_refused")
        .unwrap();
    assert!(refused["detail"]
        .as_str()
        .unwrap()
        .contains("clients[1].organizations"));
    drop(p);
}

/// SIGTERM while requests are in flight on a slow upstream: the listener closes, the slow
/// requests finish, every response a client received has its audit record, the process ends
/// once drained (well before the grace period), and the store holds the latest rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_requests_and_loses_no_audit_record() {
    let s = Arc::new(
        Scenario::new(Options {
            server: "shutdown_grace_secs = 30".into(),
            ..Default::default()
        })
        .await,
    );
    // Short tokens: rotations happen during the load.
    s.standin.set_access_ttl(4);
    s.import().await;
    let mut p = s.start().await;
    // Longer than Pingora's default grace period (1 s): a drain that honours only that cuts them.
    s.standin.set_api_delay(Duration::from_millis(2500));

    let started = Instant::now();
    // Workers stop sending once the proxy is told to stop. The harness keeps the listening
    // socket it handed the proxy (as a socket-activating supervisor does), so a request sent
    // after the exit waits in the kernel's queue: the client gives up after 10 s.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let workers: Vec<_> = (0..12)
        .map(|w| {
            let (s, stop, client) = (s.clone(), stop.clone(), client.clone());
            tokio::spawn(async move {
                // (request id, status, sent at, answered at)
                let mut seen = Vec::new();
                for i in 0..200 {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    let sent = started.elapsed();
                    // Paths naming their organization: no lookup before the (slow) request.
                    let path = if (w + i) % 2 == 0 {
                        "/organizations/111/networks"
                    } else {
                        "/organizations/111"
                    };
                    let req = client
                        .get(format!("{}{path}", s.base()))
                        .header("X-Cisco-Meraki-API-Key", ALICE_KEY);
                    match req.send().await {
                        Ok(r) => {
                            let id = r
                                .headers()
                                .get("x-proxy-request-id")
                                .map(|v| v.to_str().unwrap().to_owned());
                            seen.push((id, r.status().as_u16(), sent, started.elapsed()));
                        }
                        // Refused or given up on after the exit: this worker is done.
                        Err(_) => break,
                    }
                }
                seen
            })
        })
        .collect();
    // Two rounds answered (12 requests each, 2.5 s apiece upstream), the third in flight:
    // the stand-in has received some of it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.standin.request_count() <= 24 {
        assert!(
            Instant::now() < deadline,
            "the third round never reached Meraki"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let term_at = started.elapsed();
    p.signal(Signal::SIGTERM);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let status = p.wait_exit(Duration::from_secs(20)).await;
    let exited_after = started.elapsed() - term_at;
    assert!(status.success(), "exit status {status:?}");

    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.unwrap());
    }
    assert!(
        seen.len() >= 30,
        "the load ran: {} responses: {seen:?}",
        seen.len()
    );
    let bad: Vec<_> = seen.iter().filter(|r| r.1 != 200).collect();
    assert!(
        bad.is_empty(),
        "every answered request succeeded; not: {bad:?}"
    );
    let in_flight_at_term = seen
        .iter()
        .filter(|(_, _, sent, done)| *sent < term_at && *done > term_at)
        .count();
    assert!(
        in_flight_at_term >= 6,
        "requests were in flight at SIGTERM and finished: {in_flight_at_term}"
    );
    assert!(
        exited_after < Duration::from_secs(15),
        "drained and exited in {exited_after:?}, not after the 30 s grace period"
    );

    let audit = s.audit();
    let recorded: HashMap<&str, u64> = audit
        .iter()
        .filter(|r| r["kind"] == "request")
        .map(|r| {
            (
                r["request_id"].as_str().unwrap(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let missing: Vec<_> = seen
        .iter()
        .filter(|(id, status, ..)| {
            id.as_deref()
                .is_none_or(|id| recorded.get(id) != Some(&(*status as u64)))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} responses have no audit record: {:?}",
        missing.len(),
        seen.len(),
        &missing[..missing.len().min(5)]
    );
    let events: Vec<&str> = audit
        .iter()
        .filter(|r| r["kind"] == "server")
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["shutdown_started", "shutdown_drained"]);
    let rotations = audit
        .iter()
        .filter(|r| r["event"] == "token_refreshed")
        .count();
    assert!(
        rotations >= 2,
        "tokens rotated during the load: {rotations}"
    );

    // The store holds the latest rotation: a new process refreshes with it.
    s.standin.set_api_delay(Duration::ZERO);
    s.standin.expire_all_access_tokens();
    let calls = s.standin.token_calls();
    let _p = s.start().await;
    assert_eq!(s.status("/networks/L_111_0", ALICE_KEY).await, 200);
    assert_eq!(s.status("/networks/L_222_0", BOB_KEY).await, 200);
    assert!(s.standin.token_calls() > calls);
    assert!(
        !s.audit()
            .iter()
            .any(|r| r["event"] == "needs_reauthorization"),
        "no grant was lost"
    );
}

/// What one chaos request was and what its client got.
#[derive(Debug)]
struct Outcome {
    #[allow(dead_code)] // shown in failure messages
    method: Method,
    marker: Option<String>,
    status: u16,
    upstream: Option<String>,
}

/// A bounded chaos run: with upstream connections reset before and after requests are
/// written and answers slower than the timeout, every client gets either Meraki's answer or
/// one of the documented 502/504s; a success never hides a second application of a write, a
/// "not sent" never hides an applied one; and after the faults stop, everything succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_upstream_faults_get_documented_answers_and_hide_no_write() {
    let s = Arc::new(
        Scenario::new(Options {
            server: "upstream_timeout_secs = 1".into(),
            ..Default::default()
        })
        .await,
    );
    let chaos = Chaos::start(
        s.standin.addr(),
        [80, 80, 40],
        Duration::from_millis(1500),
        0x5eed_c4a0_5eed,
    );
    s.set_api_base(&format!("http://{}/api/v1", chaos.addr));
    s.import().await;
    let p = s.start().await;
    chaos.set_on(true);

    let run = |round: &'static str, workers: usize, each: usize| {
        let s = s.clone();
        (0..workers)
            .map(move |w| {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut out = Vec::with_capacity(each);
                    for i in 0..each {
                        let net = format!("L_111_{}", (w + i) % 3);
                        let marker = format!("{round}-{w}-{i}");
                        let (method, req, marker) = match i % 3 {
                            0 => (
                                Method::GET,
                                s.script(Method::GET, &format!("/networks/{net}"), ALICE_KEY),
                                None,
                            ),
                            1 => (
                                Method::PUT,
                                s.script(Method::PUT, &format!("/networks/{net}"), ALICE_KEY)
                                    .json(&serde_json::json!({ "name": marker })),
                                Some(marker),
                            ),
                            _ => (
                                Method::POST,
                                s.script(
                                    Method::POST,
                                    "/organizations/111/actionBatches",
                                    ALICE_KEY,
                                )
                                .json(&serde_json::json!({
                                    "confirmed": true,
                                    "synchronous": true,
                                    "actions": [{
                                        "resource": format!("/networks/{net}"),
                                        "operation": "update",
                                        "body": { "name": marker },
                                    }],
                                })),
                                Some(marker),
                            ),
                        };
                        let r = req.send().await.expect("the proxy answers");
                        out.push(Outcome {
                            method,
                            marker,
                            status: r.status().as_u16(),
                            upstream: r
                                .headers()
                                .get("x-proxy-upstream")
                                .map(|v| v.to_str().unwrap().to_owned()),
                        });
                    }
                    out
                })
            })
            .collect::<Vec<_>>()
    };

    let mut outcomes = Vec::new();
    for t in run("chaos", 12, 30) {
        outcomes.extend(t.await.unwrap());
    }
    chaos.set_on(false);
    let mut after = Vec::new();
    for t in run("calm", 6, 9) {
        after.extend(t.await.unwrap());
    }

    let injected = chaos.injected();
    let (rb, ra, slow) = (
        injected
            .reset_before
            .load(std::sync::atomic::Ordering::Relaxed),
        injected
            .reset_after
            .load(std::sync::atomic::Ordering::Relaxed),
        injected.slow.load(std::sync::atomic::Ordering::Relaxed),
    );
    assert!(
        rb > 5 && ra > 5 && slow > 2,
        "faults were injected: {rb} {ra} {slow}"
    );

    // Applications of each write, as the stand-in saw them.
    let recorded = s.standin.requests();
    let applied = |marker: &str| {
        let needle = format!("\"{marker}\"");
        recorded
            .iter()
            .filter(|r| {
                (200..300).contains(&r.status) && String::from_utf8_lossy(&r.body).contains(&needle)
            })
            .count()
    };
    let mut seen: HashMap<(u16, Option<String>), usize> = HashMap::new();
    for o in &outcomes {
        *seen.entry((o.status, o.upstream.clone())).or_default() += 1;
        let n = o.marker.as_deref().map_or(0, applied);
        match (o.status, o.upstream.as_deref()) {
            (200..=299, None) if o.marker.is_some() => {
                assert_eq!(n, 1, "a success is one application: {o:?}")
            }
            (200..=299, None) => {}
            (502, Some("not-sent")) => assert_eq!(n, 0, "not sent, yet applied: {o:?}"),
            (502 | 504, Some("sent-no-answer")) => {
                assert!(n <= 1, "applied twice: {o:?}");
            }
            _ => panic!("an undocumented answer: {o:?}"),
        }
    }
    eprintln!(
        "chaos: injected reset-before {rb}, reset-after {ra}, slow {slow}; clients saw {seen:?}"
    );
    assert!(
        seen.keys()
            .any(|(st, u)| *st == 504 && u.as_deref() == Some("sent-no-answer")),
        "a slow answer surfaced as a 504: {seen:?}"
    );
    assert!(
        seen.keys()
            .any(|(st, u)| *st == 502 && u.as_deref() == Some("sent-no-answer")),
        "a reset surfaced as a 502: {seen:?}"
    );
    let failed_after: Vec<_> = after.iter().filter(|o| o.status >= 300).collect();
    assert!(
        failed_after.is_empty(),
        "after the faults stop, everything succeeds: {failed_after:?}"
    );
    assert!(
        !s.audit()
            .iter()
            .any(|r| r["kind"] == "request" && r["status"] == 500),
        "no internal error"
    );
    drop(p);
}
