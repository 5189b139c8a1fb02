//! Hostile clients, as raw bytes on a socket against the real binary and the Meraki stand-in.
//! For each attack: the documented status and a Meraki-style errors body (or Meraki's answer for
//! what is allowed), no effect on another organization at the stand-in, an audit record where
//! the proxy saw the request, and the proxy still serving afterwards.

mod support;

use std::time::Duration;
use support::harness::*;
use support::raw::{self, errors_body, status_of};

/// Sends `raw` on a new connection; what comes back until the server closes or is quiet for
/// 1.5 s (a kept-alive connection).
async fn exchange(port: u16, raw: &[u8]) -> String {
    raw::exchange(
        port,
        raw,
        Duration::from_millis(1500),
        Duration::from_secs(30),
    )
    .await
}

fn req(method: &str, target: &str, key: &str, extra: &str) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: proxy\r\nX-Cisco-Meraki-API-Key: {key}\r\n{extra}Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

async fn ready() -> (Scenario, ProxyProcess) {
    let s = Scenario::new(Options::default()).await;
    s.import().await;
    let p = s.start().await;
    (s, p)
}

/// Alice's requests had no effect on organization 222: at most a lookup that Meraki refused
/// (her grant cannot see it), never a write, never an answer.
fn bob_untouched_by_alice(s: &Scenario) {
    for r in s.standin.requests() {
        let of_alice = r.header("user-agent").is_some_and(|u| u.contains("alice"));
        if of_alice && (r.path_and_query.contains("222") || r.path_and_query.contains("L_222")) {
            assert!(
                r.method == "GET" && r.status >= 400,
                "alice reached organization 222: {r:?}"
            );
        }
    }
    assert_eq!(s.standin.network("L_222_0").unwrap()["name"], "bob net");
}

#[tokio::test]
async fn path_spellings_that_another_parser_reads_differently_are_refused() {
    let (s, p) = ready().await;
    let ua = "User-Agent: alice-attacker\r\n";
    let cases: &[(&str, u16)] = &[
        ("/api/v1/organizations/111/..%2F..%2Forganizations/222", 400),
        ("/api/v1/organizations/111/%2e%2e/222/networks", 400),
        ("/api/v1/organizations/111/%252e%252e/222/networks", 400),
        ("/api/v1/organizations/111/%25252e/222", 400),
        ("/api/v1/organizations/111/..;/222/networks", 400),
        ("/api/v1/organizations/222;x=111/networks", 400),
        ("/api/v1/organizations/111/%EF%BC%8E%EF%BC%8E/222", 400),
        ("/api/v1/organizations/111%5C..%5C222", 400),
        ("/api/v1/organizations/111/%C0%AE%C0%AE/222", 400),
        ("/api/v1/organizations/111%3F/../222", 400),
        ("/api/v1/organizations/111%23/../222", 400),
        ("/api/v1/Organizations/222/networks", 403),
        ("/API/V1/organizations/222", 403),
        ("//api//v1//organizations//222", 403),
        ("/api/v1/api/v1/organizations/222", 403),
        ("/api/v1/networks/L_222_0", 403),
        ("/api/v1/devices/Q222-BBBB-0001", 403),
    ];
    for (target, status) in cases {
        let r = exchange(p.port, &req("GET", target, ALICE_KEY, ua)).await;
        assert_eq!(status_of(&r), *status, "{target}: {r}");
        assert!(
            errors_body(&r)["errors"][0].is_string(),
            "{target}: not a Meraki errors body: {r}"
        );
        assert!(r.to_ascii_lowercase().contains("x-proxy-request-id"), "{r}");
    }
    bob_untouched_by_alice(&s);
    eventually("an audit record for each attack", || {
        s.audit()
            .iter()
            .filter(|r| r["kind"] == "request" && r["decision"] == "denied")
            .count()
            >= cases.len()
    })
    .await;
    // Still serving.
    let r = exchange(
        p.port,
        &req("GET", "/api/v1/organizations/111", ALICE_KEY, ""),
    )
    .await;
    assert_eq!(status_of(&r), 200, "{r}");
}

#[tokio::test]
async fn only_merakis_methods_are_forwarded() {
    let (s, p) = ready().await;
    s.standin.clear_requests();
    for method in ["TRACE", "OPTIONS", "PATCH", "PROPFIND", "FOO"] {
        let r = exchange(
            p.port,
            &req(method, "/api/v1/organizations/111/networks", ALICE_KEY, ""),
        )
        .await;
        assert_eq!(status_of(&r), 405, "{method}: {r}");
        assert!(errors_body(&r)["errors"][0]
            .as_str()
            .unwrap()
            .contains(method));
        assert!(!r.contains("Bearer"), "{r}");
    }
    assert!(s.standin.requests().is_empty(), "nothing forwarded");
    let r = exchange(
        p.port,
        &req("HEAD", "/api/v1/organizations/111", ALICE_KEY, ""),
    )
    .await;
    assert_eq!(status_of(&r), 200, "{r}");
}

#[tokio::test]
async fn credential_header_games_never_carry_a_key_upstream_or_pick_a_client() {
    let (s, p) = ready().await;
    // Two key headers with different keys, in either header: ambiguous, refused.
    for extra in [
        format!("X-Cisco-Meraki-API-Key: {BOB_KEY}\r\n"),
        format!("Authorization: Bearer {ALICE_KEY}\r\nAuthorization: Bearer {BOB_KEY}\r\n"),
    ] {
        let raw = if extra.starts_with("Authorization") {
            format!("GET /api/v1/organizations/111 HTTP/1.1\r\nHost: p\r\n{extra}\r\n").into_bytes()
        } else {
            req("GET", "/api/v1/organizations/111", ALICE_KEY, &extra)
        };
        let r = exchange(p.port, &raw).await;
        assert_eq!(status_of(&r), 400, "{extra}: {r}");
    }
    // The same key twice is fine.
    let r = exchange(
        p.port,
        &req(
            "GET",
            "/api/v1/organizations/111",
            ALICE_KEY,
            &format!("X-Cisco-Meraki-API-Key: {ALICE_KEY}\r\n"),
        ),
    )
    .await;
    assert_eq!(status_of(&r), 200, "{r}");
    // Underscore spellings (read as the same header by Rack and CGI) and method overrides from
    // a GET-only client never travel upstream.
    s.standin.clear_requests();
    let extra = format!(
        "X_Cisco_Meraki_API_Key: {ALICE_KEY}\r\nX-HTTP-Method-Override: DELETE\r\nX_HTTP_Method_Override: PUT\r\nX-Method-Override: DELETE\r\n"
    );
    let r = exchange(
        p.port,
        &req("GET", "/api/v1/organizations/222", BOB_KEY, &extra),
    )
    .await;
    assert_eq!(status_of(&r), 200, "{r}");
    let seen = s.standin.requests();
    assert_eq!(seen.len(), 1);
    for (name, value) in &seen[0].headers {
        assert!(
            !value.contains(ALICE_KEY) && !value.contains(BOB_KEY),
            "{name}: {value}"
        );
        assert!(!name.contains("method"), "{name} forwarded");
    }
}

#[tokio::test]
async fn refusals_say_the_same_whether_or_not_another_client_looked_the_object_up() {
    let (s, p) = ready().await;
    let ask = |target: &'static str| {
        let raw = req("GET", target, ALICE_KEY, "");
        async move { exchange(p.port, &raw).await }
    };
    let before_net = errors_body(&ask("/api/v1/networks/L_222_0").await);
    let before_dev = errors_body(&ask("/api/v1/devices/Q222-BBBB-0001").await);
    // Bob's requests put his network and device in the shared lookup cache.
    for target in ["/api/v1/networks/L_222_0", "/api/v1/devices/Q222-BBBB-0001"] {
        let r = exchange(p.port, &req("GET", target, BOB_KEY, "")).await;
        assert_eq!(status_of(&r), 200, "{r}");
    }
    let after_net = errors_body(&ask("/api/v1/networks/L_222_0").await);
    let after_dev = errors_body(&ask("/api/v1/devices/Q222-BBBB-0001").await);
    assert_eq!(before_net, after_net);
    assert_eq!(before_dev, after_dev);
    for body in [&after_net, &after_dev] {
        assert!(!body.to_string().contains("222\""), "{body}");
        assert!(!body.to_string().contains("organization 222"), "{body}");
    }
    drop(s);
}

#[tokio::test]
async fn action_batch_resources_are_checked_as_meraki_would_read_them() {
    let (s, p) = ready().await;
    s.standin.clear_requests();
    for resource in [
        "/networks/L_222_0?/../../networks/L_111_0",
        "/networks/L_222_0#/../../networks/L_111_0",
        "/organizations/222?/../../organizations/111/networks",
        "/networks/L_111_0/../../networks/L_222_0",
        "/networks/L_111_0/%2e%2e/%2e%2e/networks/L_222_0",
        "/networks/L_111_0/..;/..;/networks/L_222_0",
        "//networks/L_222_0",
    ] {
        let body = serde_json::json!({"confirmed": true, "synchronous": true, "actions": [
            {"resource": resource, "operation": "update", "body": {"name": "pwned"}}]})
        .to_string();
        let raw = format!(
            "POST /api/v1/organizations/111/actionBatches HTTP/1.1\r\nHost: p\r\nX-Cisco-Meraki-API-Key: {ALICE_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let r = exchange(p.port, raw.as_bytes()).await;
        assert_eq!(status_of(&r), 400, "{resource}: {r}");
        let msg = errors_body(&r)["errors"][0].as_str().unwrap().to_owned();
        assert!(
            msg.contains(resource),
            "the refusal names the resource: {msg}"
        );
    }
    assert!(
        !s.standin.requests().iter().any(|r| r.method == "POST"),
        "no batch reached Meraki"
    );
    assert_eq!(s.standin.network("L_222_0").unwrap()["name"], "bob net");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (_s, p) = ready().await;
    let mut raw = Vec::new();
    for i in 0..20 {
        raw.extend(req(
            "GET",
            &format!("/api/v1/organizations/111?n={i}"),
            ALICE_KEY,
            "",
        ));
    }
    let r = exchange(p.port, &raw).await;
    let answers = r.matches("HTTP/1.1 200").count();
    assert_eq!(answers, 20, "{r}");
}

#[tokio::test]
async fn smuggling_and_oversized_requests_are_answered_and_the_proxy_keeps_serving() {
    let (s, p) = ready().await;
    s.standin.clear_requests();
    let h = |extra: &str| {
        format!(
            "POST /api/v1/organizations/222/networks HTTP/1.1\r\nHost: p\r\nX-Cisco-Meraki-API-Key: {ALICE_KEY}\r\n{extra}\r\n"
        )
    };
    let big_headers: String = (0..300)
        .map(|i| format!("X-Pad-{i}: {}\r\n", "a".repeat(3000)))
        .collect();
    let attacks = vec![
        h("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n") + "0\r\n\r\nGET /api/v1/organizations/222 HTTP/1.1\r\nHost: p\r\n\r\n",
        h("Transfer-Encoding: chunked, identity\r\n") + "0\r\n\r\n",
        h("Transfer-Encoding: xchunked\r\n") + "0\r\n\r\n",
        h("Content-Length: 5\r\nContent-Length: 7\r\n") + "hello",
        h("Content-Length: -1\r\n"),
        h("Content-Length: 5 5\r\n") + "hello",
        h("Host: other\r\nContent-Length: 0\r\n"),
        format!("GET /api/v1/organizations/{} HTTP/1.1\r\nHost: p\r\n\r\n", "1".repeat(70 * 1024)),
        h(&big_headers),
        "CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n".to_string(),
        format!("GET http://127.0.0.1:1/api/v1/organizations/222 HTTP/1.1\r\nHost: p\r\nX-Cisco-Meraki-API-Key: {ALICE_KEY}\r\n\r\n"),
        "GET /api/v1/organizations/\u{0}222 HTTP/1.1\r\nHost: p\r\n\r\n".to_string(),
    ];
    for a in &attacks {
        let r = exchange(p.port, a.as_bytes()).await;
        let status = status_of(&r);
        eprintln!(
            "attack {:?} -> {status} meraki-shaped={}",
            &a[..a.len().min(70)],
            errors_body(&r)["errors"].is_array()
        );
        assert!(
            r.is_empty() || (400..500).contains(&status) || status == 200,
            "{}: {r}",
            &a[..a.len().min(120)]
        );
        assert_ne!(
            status,
            200,
            "an attack was served: {}",
            &a[..a.len().min(120)]
        );
    }
    // Nothing reached organization 222, and the proxy still serves.
    assert!(
        !s.standin
            .requests()
            .iter()
            .any(|r| r.path_and_query.contains("222")),
        "{:?}",
        s.standin.requests()
    );
    let r = exchange(
        p.port,
        &req("GET", "/api/v1/organizations/111", ALICE_KEY, ""),
    )
    .await;
    assert_eq!(status_of(&r), 200, "{r}");
}
