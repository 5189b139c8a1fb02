//! Wire compatibility through the real binary: pagination, redirects, 429s, streaming, HEAD,
//! and upstream faults reported distinctly from client errors.

mod support;

use reqwest::Method;
use serde_json::{json, Value};
use support::harness::*;

async fn ready(opts: Options) -> (Scenario, ProxyProcess) {
    let s = Scenario::new(opts).await;
    for i in 3..15 {
        s.standin
            .add_network("111", &format!("L_111_{i:02}"), &format!("alice net {i}"));
    }
    s.import().await;
    let p = s.start().await;
    s.standin.clear_requests();
    (s, p)
}

fn shard_allowed() -> Options {
    Options {
        upstream: r#"redirect_hosts = ["127.0.0.1"]"#.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn rfc8288_client_walks_every_page_through_the_proxy() {
    let (s, _p) = ready(Options::default()).await;
    let mut url = url::Url::parse(&format!(
        "{}/organizations/111/networks?perPage=4",
        s.base()
    ))
    .unwrap();
    let mut ids = Vec::new();
    for _page in 0..10 {
        let r = http()
            .get(url.clone())
            .header("X-Cisco-Meraki-API-Key", ALICE_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let link = r
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_string());
        let page: Vec<Value> = r.json().await.unwrap();
        ids.extend(page.iter().map(|n| n["id"].as_str().unwrap().to_string()));
        let Some(link) = link else { break };
        assert!(
            !link.contains("127.0.0.1"),
            "no absolute upstream URL may reach the client: {link}"
        );
        let next = link
            .split(", ")
            .find(|l| l.ends_with("rel=next"))
            .map(|l| l[1..l.find('>').unwrap()].to_string());
        match next {
            Some(n) => url = url.join(&n).unwrap(),
            None => break,
        }
    }
    let mut expected: Vec<String> = (0..3)
        .map(|i| format!("L_111_{i}"))
        .chain((3..15).map(|i| format!("L_111_{i:02}")))
        .collect();
    expected.sort();
    assert_eq!(ids, expected);
    let upstream: Vec<String> = s
        .standin
        .requests()
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    assert!(
        upstream
            .iter()
            .any(|p| p.contains("startingAfter=") && p.contains("t0=2026-11-23T00%3A00%3A00Z")),
        "cursors byte for byte: {upstream:?}"
    );
}

#[tokio::test]
async fn sdk_style_link_following_with_doubled_prefix_works() {
    let (s, _p) = ready(Options::default()).await;
    let r = s
        .script(
            Method::GET,
            "/organizations/111/networks?perPage=3",
            ALICE_KEY,
        )
        .send()
        .await
        .unwrap();
    let link = r.headers()["link"].to_str().unwrap().to_string();
    let next = link.split(", ").find(|l| l.ends_with("rel=next")).unwrap();
    let next = &next[1..next.find('>').unwrap()];
    assert!(
        next.starts_with("/api/v1/organizations/111/networks?"),
        "{next}"
    );
    // The SDK sends base_url + url for a non-Meraki URL.
    let r = s.script(Method::GET, next, ALICE_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Vec<Value>>().await.unwrap().len(), 3);
}

#[tokio::test]
async fn redirects_are_followed_inside_the_proxy_with_method_body_and_bearer() {
    let (s, _p) = ready(shard_allowed()).await;
    s.standin.redirect_next_to_shard(1);
    let r = s
        .script(Method::GET, "/organizations/111/devices", ALICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the client never sees the 3xx");
    // A PUT with a body, redirected with 307, arrives at the shard intact.
    let _ = s
        .script(Method::GET, "/networks/L_111_1", ALICE_KEY)
        .send()
        .await
        .unwrap();
    s.standin.redirect_next_to_shard(1);
    let body = json!({"name": "via shard"});
    let r = s
        .script(Method::PUT, "/networks/L_111_1", ALICE_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.standin.network("L_111_1").unwrap()["name"], "via shard");
    let reqs = s.standin.requests();
    let shard_put = reqs
        .iter()
        .find(|r| r.listener == "shard" && r.method == "PUT")
        .expect("PUT reached the shard");
    assert_eq!(
        serde_json::from_slice::<Value>(&shard_put.body).unwrap(),
        body
    );
    assert!(shard_put
        .header("authorization")
        .unwrap()
        .starts_with("Bearer "));
    assert!(shard_put.header("x-cisco-meraki-api-key").is_none());
}

#[tokio::test]
async fn a_redirect_to_a_host_not_allowed_is_refused_with_502() {
    let (s, _p) = ready(Options::default()).await;
    s.standin
        .set_redirect_location(1, "http://evil.example.test/api/v1/organizations/111");
    let r = s
        .script(Method::GET, "/organizations/111", ALICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-proxy-upstream"], "redirected");
    let v: Value = r.json().await.unwrap();
    assert!(
        v["errors"][0]
            .as_str()
            .unwrap()
            .contains("evil.example.test"),
        "{v}"
    );
    // A redirect loop on an allowed host ends after a few hops.
    let own = format!("{}/organizations/111", s.standin.api_base());
    s.standin.set_redirect_location(10, &own);
    let r = s
        .script(Method::GET, "/organizations/111", ALICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("redirected more than 3 times"));
    assert_eq!(
        s.standin.requests().len(),
        1 + 4,
        "one refused redirect, then four hops of the loop"
    );
}

#[tokio::test]
async fn rate_limits_pass_through_with_an_integer_retry_after() {
    let (s, p) = ready(Options::default()).await;
    s.standin.rate_limit_next(1, 2);
    let r = s
        .script(Method::GET, "/organizations/111", ALICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap(),
        2
    );
    assert!(r.json::<Value>().await.unwrap()["errors"][0].is_string());
    let (_, metrics) = p.admin("/metrics").await;
    assert!(
        metrics.contains(r#"meraki_proxy_upstream_429_total{organization="111"} 1"#),
        "{metrics}"
    );
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_100_mb_response_streams_with_bounded_memory() {
    // The stand-in's test endpoint is no operation of Meraki's API: let it through.
    let (s, p) = ready(Options {
        server: r#"unknown_endpoints = "allow""#.into(),
        ..Default::default()
    })
    .await;
    let pid = p.child.id();
    let before = vm_kib(pid, "VmHWM:");
    let mut r = http()
        .get(format!(
            "{}/organizations/111/big?bytes=100000000",
            s.base()
        ))
        .header("X-Cisco-Meraki-API-Key", ALICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut total = 0usize;
    while let Some(chunk) = r.chunk().await.unwrap() {
        total += chunk.len();
    }
    assert_eq!(total, 100_000_000);
    let after = vm_kib(pid, "VmHWM:");
    let grown_mib = (after.saturating_sub(before)) / 1024;
    assert!(
        grown_mib < 32,
        "peak RSS grew by {grown_mib} MiB for a 100 MB body"
    );
}

#[tokio::test]
async fn head_and_upstream_faults() {
    let (s, _p) = ready(Options::default()).await;
    let r = s
        .script(Method::HEAD, "/organizations/111", ALICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().is_empty());
    // Meraki's own 5xx body passes through untouched, marked as Meraki's by the absence of the
    // proxy's outcome header.
    s.standin
        .fail_next_api(1, 500, r#"{"errors":["Internal server error (Meraki)"]}"#);
    let r = s
        .script(Method::GET, "/organizations/111", ALICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert!(r.headers().get("x-proxy-upstream").is_none());
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"errors":["Internal server error (Meraki)"]}"#
    );
    // Meraki gone: the proxy says the request was not sent.
    s.standin.shutdown();
    let r = s
        .script(Method::GET, "/organizations/111", ALICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-proxy-upstream"], "not-sent");
    assert!(r.json::<Value>().await.unwrap()["errors"][0]
        .as_str()
        .unwrap()
        .contains("not sent"));
}
