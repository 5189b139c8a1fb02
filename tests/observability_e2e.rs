//! Metrics and the audit log, end to end: complete on every path, agreeing with each other,
//! bounded in cardinality, rotated without loss.

mod support;

use reqwest::Method;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use support::harness::*;

async fn send(s: &Scenario, key: &str, path: &str) -> u16 {
    s.status(path, key).await
}

/// `name{labels}` → value, for every sample of the exposition.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn sum(samples: &BTreeMap<String, f64>, name: &str, label_filter: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| {
            k.starts_with(&format!("{name}{{")) && label_filter.iter().all(|f| k.contains(f))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Requests the harness's readiness probe made (no key), to leave out of counts.
fn is_probe(r: &Value) -> bool {
    r["reason"] == "missing_key"
}

#[tokio::test]
async fn audit_and_metrics_agree_for_a_scripted_mix() {
    let s = Scenario::new(Options::default()).await;
    s.import().await;
    let p = s.start().await;
    let mut expected: Vec<(&str, u16)> = Vec::new();
    for _ in 0..5 {
        expected.push((
            "alice",
            send(&s, ALICE_KEY, "/organizations/111/networks").await,
        ));
    }
    for _ in 0..3 {
        expected.push(("alice", send(&s, ALICE_KEY, "/organizations/222").await));
    }
    for i in 0..2 {
        expected.push((
            "-",
            send(&s, &format!("unknown-{i}"), "/organizations/111").await,
        ));
    }
    for _ in 0..2 {
        s.standin
            .fail_next_api(1, 401, r#"{"errors":["Invalid API key"]}"#);
        expected.push(("bob", send(&s, BOB_KEY, "/organizations/222").await));
    }
    for _ in 0..2 {
        s.standin.fail_next_api(1, 500, r#"{"errors":["boom"]}"#);
        expected.push((
            "bob",
            send(&s, BOB_KEY, "/organizations/222/networks").await,
        ));
    }
    s.standin.rate_limit_next(1, 1);
    expected.push(("alice", send(&s, ALICE_KEY, "/organizations/111").await));
    let statuses: Vec<u16> = expected.iter().map(|e| e.1).collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 403, 403, 403, 401, 401, 200, 200, 500, 500, 429]
    );

    let n = expected.len();
    eventually("one audit record per request", || {
        s.audit()
            .iter()
            .filter(|r| r["kind"] == "request" && !is_probe(r))
            .count()
            == n
    })
    .await;
    let audit = s.audit();
    let records: Vec<&Value> = audit
        .iter()
        .filter(|r| r["kind"] == "request" && !is_probe(r))
        .collect();
    // `logging` runs after the response went out, so records of back-to-back requests may be
    // written in either order: compare as multisets.
    let mut got: Vec<(String, u16)> = records
        .iter()
        .map(|r| {
            (
                r["client"].as_str().unwrap_or("-").to_string(),
                r["status"].as_u64().unwrap() as u16,
            )
        })
        .collect();
    let mut want: Vec<(String, u16)> = expected
        .iter()
        .map(|(c, st)| (c.to_string(), *st))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    for r in &records {
        let status = r["status"].as_u64().unwrap();
        for field in [
            "time",
            "request_id",
            "method",
            "path",
            "decision",
            "duration_ms",
            "bytes_out",
            "source",
        ] {
            assert!(!r[field].is_null(), "{field} missing in {r}");
        }
        let decision = r["decision"].as_str().unwrap();
        match status {
            403 | 401 => assert_eq!(decision, "denied"),
            _ => assert_eq!(decision, "forwarded"),
        }
        if decision == "forwarded" {
            assert!(
                r["upstream_request_id"].is_string() && r["upstream_status"].is_number(),
                "{r}"
            );
            assert_eq!(r["token_fingerprint"].as_str().unwrap().len(), 8);
        }
    }
    assert_eq!(
        records
            .iter()
            .filter(|r| r["retried_after_401"] == true)
            .count(),
        2
    );
    let probes = audit
        .iter()
        .filter(|r| r["kind"] == "request" && is_probe(r))
        .count() as f64;

    let m = samples(&p.admin("/metrics").await.1);
    assert_eq!(
        sum(&m, "meraki_proxy_requests_total", &[]),
        n as f64 + probes
    );
    for client in ["alice", "bob"] {
        let in_audit = records.iter().filter(|r| r["client"] == client).count() as f64;
        assert_eq!(
            sum(
                &m,
                "meraki_proxy_requests_total",
                &[&format!("client=\"{client}\"")]
            ),
            in_audit,
            "{client}"
        );
    }
    assert_eq!(
        sum(&m, "meraki_proxy_requests_total", &["status_class=\"5xx\""]),
        2.0
    );
    assert_eq!(
        sum(
            &m,
            "meraki_proxy_denials_total",
            &["client=\"alice\"", "reason=\"forbidden_organization\""]
        ),
        3.0
    );
    assert_eq!(
        sum(
            &m,
            "meraki_proxy_denials_total",
            &["client=\"-\"", "reason=\"unknown_key\""]
        ),
        2.0
    );
    assert_eq!(
        sum(
            &m,
            "meraki_proxy_upstream_401_retries_total",
            &["outcome=\"succeeded\""]
        ),
        2.0
    );
    assert_eq!(
        sum(
            &m,
            "meraki_proxy_upstream_429_total",
            &["organization=\"111\""]
        ),
        1.0
    );
    let refreshes = audit
        .iter()
        .filter(|r| r["event"] == "token_refreshed")
        .count() as f64;
    assert_eq!(
        sum(&m, "meraki_proxy_token_refreshes_total", &["result=\"ok\""]),
        2.0,
        "two 401-triggered refreshes in this process"
    );
    assert!(refreshes >= 2.0);
    assert_eq!(sum(&m, "meraki_proxy_in_flight_requests", &[]), 0.0);
    assert!(m.keys().any(|k| k.starts_with("meraki_proxy_access_token_expiry_timestamp_seconds{integration=\"netops\",organization=\"111\"}")));
}

#[tokio::test]
async fn random_keys_and_paths_add_no_label_values() {
    let s = Scenario::new(Options::default()).await;
    s.import().await;
    let p = s.start().await;
    let series = |text: &str| -> BTreeSet<String> {
        samples(text)
            .into_keys()
            .map(|k| k.replace(|c: char| c.is_ascii_digit(), ""))
            .collect()
    };
    let random = |i: u64| {
        let r = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xdead_beef;
        (
            format!("key-{r:x}"),
            format!("/organizations/{}/x{r:x}/{}", r % 1000, i),
        )
    };
    // Warm-up: the fixed series for unknown keys exist after the first few.
    for i in 0..20 {
        let (k, path) = random(i);
        send(&s, &k, &path).await;
    }
    let before = series(&p.admin("/metrics").await.1);
    let mut tasks = Vec::new();
    for batch in 0..10u64 {
        let base = s.base();
        tasks.push(tokio::spawn(async move {
            for i in 0..100u64 {
                let (k, path) = random(1000 + batch * 100 + i);
                let st = http()
                    .get(format!("{base}{path}"))
                    .header("X-Cisco-Meraki-API-Key", k)
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert_eq!(st, 401);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let text = p.admin("/metrics").await.1;
    let after = series(&text);
    assert_eq!(before, after, "new label values appeared");
    assert_eq!(
        sum(
            &samples(&text),
            "meraki_proxy_denials_total",
            &["client=\"-\"", "reason=\"unknown_key\""]
        ),
        1020.0
    );
}

#[tokio::test]
async fn sighup_reopens_the_audit_log_without_losing_records() {
    let s = Scenario::new(Options::default()).await;
    s.import().await;
    let p = s.start().await;
    let path = s.dir.path().join("audit.jsonl");
    let rotated = s.dir.path().join("audit.jsonl.1");
    let count = |p: &std::path::Path| {
        read_jsonl(p)
            .iter()
            .filter(|r| r["kind"] == "request" && !is_probe(r))
            .count()
    };
    // Traffic runs while the file is renamed and the process told to reopen it: 150 requests
    // one after another, which Meraki's 10/s (the default shaping) spreads over 15 s.
    let base = s.base();
    let traffic = tokio::spawn(async move {
        for _ in 0..150 {
            let st = http()
                .get(format!("{base}/organizations/111"))
                .header("X-Cisco-Meraki-API-Key", ALICE_KEY)
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(st, 200);
        }
    });
    eventually("some records before rotation", || count(&path) > 20).await;
    std::fs::rename(&path, &rotated).unwrap();
    // Records go on landing in the moved file until the proxy reopens it.
    let moved = count(&rotated);
    eventually("records written to the moved file", || {
        count(&rotated) > moved
    })
    .await;
    p.signal(nix::sys::signal::Signal::SIGHUP);
    traffic.await.unwrap();
    eventually("the new file to appear and every record written", || {
        path.exists() && count(&path) + count(&rotated) == 150
    })
    .await;
    assert!(count(&path) > 0, "records continue in the new file");
    assert!(count(&rotated) > 0);
}

#[tokio::test]
async fn dashboards_and_alerts_name_only_metrics_that_exist() {
    let s = Scenario::new(Options::default()).await;
    s.import().await;
    let p = s.start().await;
    let _ = send(&s, ALICE_KEY, "/organizations/111").await;
    let exposed = p.admin("/metrics").await.1;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut text = String::new();
    for f in ["prometheus/alerts.yml", "grafana/meraki-oauth-proxy.json"] {
        text.push_str(&std::fs::read_to_string(root.join(f)).unwrap());
    }
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("meraki_proxy_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_count")
            .trim_end_matches("_sum")
            .to_string();
        names.insert(base);
    }
    assert!(names.len() >= 10, "{names:?}");
    for n in names {
        assert!(
            exposed.contains(&format!("# HELP {n} ")),
            "{n} is not exposed by /metrics"
        );
    }
}

#[tokio::test]
async fn audit_to_standard_output_writes_whole_json_lines() {
    let s = Scenario::new(Options::default()).await;
    let text = std::fs::read_to_string(&s.config).unwrap();
    let text = text.replace("path = \"audit.jsonl\"", "path = \"-\"");
    std::fs::write(&s.config, text).unwrap();
    s.import().await;
    let p = s.start().await;
    let r = s
        .script(Method::GET, "/organizations/111/networks", ALICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-proxy-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(send(&s, "no-such-key", "/organizations/111").await, 401);
    // Standard output and standard error share the log file: records are whole lines of their own.
    let records = || -> Vec<Value> {
        std::fs::read_to_string(&p.log)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["kind"] == "request" && !is_probe(v))
            .collect()
    };
    eventually("two request records on standard output", || {
        records().len() == 2
    })
    .await;
    let recs = records();
    assert_eq!(recs[0]["request_id"], id.as_str());
    assert_eq!(recs[0]["client"], "alice");
    assert_eq!(recs[0]["status"], 200);
    assert_eq!(recs[1]["decision"], "denied");
    assert!(!std::fs::read_to_string(&p.log).unwrap().contains(ALICE_KEY));
    assert!(!s.dir.path().join("audit.jsonl").exists());
}
