//! The core proxy, end to end: the real binary on loopback, the Meraki stand-in behind it.

mod support;

use reqwest::Method;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;
use support::harness::*;

async fn get(s: &Scenario, key: &str, path: &str) -> (StatusCode, Value) {
    let r = s.script(Method::GET, path, key).send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn errors0(v: &Value) -> String {
    v["errors"][0]
        .as_str()
        .unwrap_or_else(|| panic!("not a Meraki error body: {v}"))
        .to_string()
}

async fn ready() -> (Scenario, ProxyProcess) {
    ready_with(Options::default()).await
}

async fn ready_with(opts: Options) -> (Scenario, ProxyProcess) {
    let s = Scenario::new(opts).await;
    s.import().await;
    let p = s.start().await;
    s.standin.clear_requests();
    (s, p)
}

#[tokio::test]
async fn forwards_with_a_bearer_token_and_never_the_client_key() {
    let (s, _p) = ready().await;
    let (status, body) = get(&s, ALICE_KEY, "/organizations/111/networks").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_array().unwrap().len(), 3);
    // Same through `Authorization: Bearer <key>`, the other way scripts send keys.
    let r = http()
        .get(format!("{}/networks/L_111_1", s.base()))
        .bearer_auth(ALICE_KEY)
        .header("User-Agent", "backup-script/1.0 Acme")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("x-request-id").is_some(),
        "upstream X-Request-Id kept"
    );

    let reqs = s.standin.requests();
    let forwarded: Vec<_> = reqs
        .iter()
        .filter(|r| {
            r.path_and_query == "/api/v1/organizations/111/networks"
                || r.path_and_query == "/api/v1/networks/L_111_1"
        })
        .collect();
    assert!(forwarded.len() >= 2, "{reqs:?}");
    for r in &reqs {
        assert!(
            r.header("x-cisco-meraki-api-key").is_none(),
            "client key header forwarded: {r:?}"
        );
        let auth = r.header("authorization").expect("bearer attached");
        assert!(
            auth.starts_with("Bearer ") && !auth.contains(ALICE_KEY),
            "{auth}"
        );
        for (name, value) in &r.headers {
            assert!(
                !value.contains(ALICE_KEY),
                "client key leaked upstream in {name}"
            );
        }
    }
    // The last request for the network is the forwarded one (the first is the proxy's lookup).
    let ua = forwarded
        .iter()
        .rev()
        .find(|r| r.path_and_query.ends_with("L_111_1"))
        .unwrap()
        .header("user-agent")
        .unwrap()
        .to_string();
    assert!(
        ua.starts_with("backup-script/1.0 Acme meraki-oauth-proxy/"),
        "{ua}"
    );
}

#[tokio::test]
async fn unknown_missing_and_conflicting_keys_are_refused_and_nothing_is_forwarded() {
    let (s, _p) = ready().await;
    let (status, body) = get(&s, "not-a-known-key", "/organizations/111/networks").await;
    assert_eq!(status, 401);
    assert_eq!(errors0(&body), "invalid API key");
    let r = http()
        .get(format!("{}/organizations/111/networks", s.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(errors0(&r.json().await.unwrap()).contains("missing API key"));
    let r = s
        .script(Method::GET, "/organizations/111/networks", ALICE_KEY)
        .bearer_auth(BOB_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(errors0(&r.json().await.unwrap()).contains("conflicting"));
    assert!(s.standin.requests().is_empty(), "nothing may be forwarded");
}

#[tokio::test]
async fn other_organizations_and_methods_are_refused() {
    let (s, _p) = ready().await;
    for path in [
        "/organizations/222/networks",
        "/organizations/111/../222/networks",
        "/organizations/111/%2e%2e/222",
        "/Organizations/222",
        "/networks/L_222_0",
        "/devices/Q222-BBBB-0001",
        "/administered/identities/me",
    ] {
        let (status, body) = get(&s, ALICE_KEY, path).await;
        assert_eq!(status, 403, "{path}: {body}");
        errors0(&body);
    }
    let (status, body) = get(&s, ALICE_KEY, "/organizations/111%2F..%2F222").await;
    assert_eq!(status, 400, "{body}");
    // Bob may only GET.
    let r = s
        .script(Method::PUT, "/networks/L_222_0", BOB_KEY)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Its body was never read: the refusal must not promise a reusable connection.
    assert_eq!(r.headers()["connection"], "close");
    // Alice may not write bob's network: the lookup runs with alice's grant, which cannot see it.
    let r = s
        .script(Method::PUT, "/networks/L_222_0", ALICE_KEY)
        .json(&json!({"name": "pwned"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let reqs = s.standin.requests();
    assert!(
        reqs.iter().all(|r| r.method == "GET"),
        "only lookups may reach upstream: {reqs:?}"
    );
    assert!(
        !reqs
            .iter()
            .any(|r| r.path_and_query.contains("/organizations/222")),
        "{reqs:?}"
    );
    assert_eq!(s.standin.network("L_222_0").unwrap()["name"], "bob net");
}

#[tokio::test]
async fn networks_and_devices_route_through_a_cached_lookup() {
    let (s, _p) = ready().await;
    for _ in 0..3 {
        let (status, body) = get(&s, ALICE_KEY, "/devices/Q111-AAAA-0001").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["networkId"], "L_111_0");
    }
    let lookups = s
        .standin
        .requests()
        .iter()
        .filter(|r| r.path_and_query == "/api/v1/devices/Q111-AAAA-0001")
        .count();
    // One lookup, then three forwarded requests.
    assert_eq!(lookups, 4);
    let (status, _) = get(&s, BOB_KEY, "/networks/L_222_0").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn organization_list_holds_only_the_clients_organizations() {
    let (s, _p) = ready().await;
    let (status, body) = get(&s, ALICE_KEY, "/organizations").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["111"]);
    let (_, body) = get(&s, BOB_KEY, "/organizations").await;
    assert_eq!(body[0]["id"], "222");
}

#[tokio::test]
async fn concurrent_requests_across_expiry_cause_one_token_call() {
    // 200 requests at once are 20 times Meraki's per-organization rate: lifted here, as this
    // test counts token calls.
    let (s, _p) = ready_with(Options {
        rate_limits: UNSHAPED.into(),
        ..Default::default()
    })
    .await;
    // Meraki revokes/expires every token it issued: all 200 requests see a 401 first.
    s.standin.set_token_delay(Duration::from_millis(300));
    s.standin.expire_all_access_tokens();
    let before = s.standin.token_calls();
    let statuses = s
        .burst(200, ALICE_KEY, |i| {
            format!("/organizations/111/networks?i={i}")
        })
        .await;
    assert!(statuses.iter().all(|st| *st == 200), "{statuses:?}");
    assert_eq!(
        s.standin.token_calls() - before,
        1,
        "one refresh per token generation"
    );
}

#[tokio::test]
async fn proactive_refresh_ahead_of_expiry_is_single_flight() {
    let s = Scenario::new(Options {
        tokens: "refresh_ahead_secs = 60".into(),
        // 200 requests at once: lifted above Meraki's 10/s, as this test counts token calls.
        rate_limits: UNSHAPED.into(),
        ..Default::default()
    })
    .await;
    // Tokens issued now live 4 s: past their refresh point (half the lifetime, as the 60 s
    // refresh-ahead is longer) two seconds later, and not expired yet.
    s.standin.set_access_ttl(4);
    s.import().await;
    let _p = s.start().await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    s.standin.set_token_delay(Duration::from_millis(300));
    s.standin.set_access_ttl(3600);
    let before = s.standin.token_calls();
    let statuses = s
        .burst(200, ALICE_KEY, |_| "/organizations/111".into())
        .await;
    assert!(statuses.iter().all(|st| *st == 200), "{statuses:?}");
    assert_eq!(s.standin.token_calls() - before, 1);
    // No 401 was needed: the token was replaced before Meraki would refuse it.
    assert!(s.standin.requests().iter().all(|r| r.status != 401));
}

#[tokio::test]
async fn put_with_a_body_is_retried_once_after_a_401_and_succeeds() {
    let (s, _p) = ready().await;
    s.standin
        .fail_next_api(1, 401, r#"{"errors":["Invalid API key"]}"#);
    let body = json!({"name": "renamed by script", "tags": ["a", "b"]});
    let r = s
        .script(Method::PUT, "/networks/L_111_1", ALICE_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    // The network lookup consumed the injected 401 (and refreshed): inject again for the PUT.
    assert_eq!(r.status(), 200);
    s.standin
        .fail_next_api(1, 401, r#"{"errors":["Invalid API key"]}"#);
    let calls = s.standin.token_calls();
    let body = json!({"name": "renamed again", "timeZone": "Europe/Berlin"});
    let r = s
        .script(Method::PUT, "/networks/L_111_1", ALICE_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["name"], "renamed again");
    assert_eq!(s.standin.token_calls(), calls + 1);
    let puts: Vec<_> = s
        .standin
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .collect();
    let last_two = &puts[puts.len() - 2..];
    assert_eq!(last_two[0].status, 401);
    assert_eq!(last_two[1].status, 200);
    assert_eq!(
        last_two[0].body, last_two[1].body,
        "the same body is replayed"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&last_two[1].body).unwrap(),
        body
    );
    assert_ne!(
        last_two[0].header("authorization"),
        last_two[1].header("authorization")
    );
    assert_eq!(
        s.standin.network("L_111_1").unwrap()["timeZone"],
        "Europe/Berlin"
    );
}

#[tokio::test]
async fn a_second_401_or_an_unreplayable_body_passes_meraki_401_through() {
    let (s, _p) = ready().await;
    let meraki_401 = r#"{"errors":["Invalid API key (from Meraki)"]}"#;
    s.standin.fail_next_api(2, 401, meraki_401);
    let r = s
        .script(Method::GET, "/organizations/111", ALICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.text().await.unwrap(),
        meraki_401,
        "upstream body byte for byte"
    );

    // Over 64 KiB: Pingora cannot replay it. The proxy still refreshes, and says so with a
    // 503 the client may retry (not a 401, which would read as a bad client key).
    let big = json!({"name": "x".repeat(100 * 1024)});
    // The network's organization is looked up (and cached) first, so the fault hits the PUT.
    assert_eq!(get(&s, ALICE_KEY, "/networks/L_111_1").await.0, 200);
    s.standin.fail_next_api(1, 401, meraki_401);
    let before = s.standin.token_calls();
    let r = s
        .script(Method::PUT, "/networks/L_111_1", ALICE_KEY)
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-proxy-upstream"], "rejected-401");
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert!(errors0(&body).contains("retry"), "{body}");
    assert_eq!(s.standin.token_calls() - before, 1, "refreshed anyway");
    let r = s
        .script(Method::PUT, "/networks/L_111_1", ALICE_KEY)
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the client's own retry succeeds");
}

#[tokio::test]
async fn invalid_grant_marks_the_grant_and_answers_503_without_touching_others() {
    let (s, p) = ready().await;
    let current = s
        .standin
        .current_refresh_token(&s.initial_refresh[0])
        .unwrap();
    s.standin.revoke_grant_of(&current);
    let (status, body) = get(&s, ALICE_KEY, "/organizations/111").await;
    assert_eq!(status, 503, "{body}");
    assert!(errors0(&body).contains("re-authorization"), "{body}");
    let (ready, text) = p.admin("/readyz").await;
    assert_eq!(ready, 503, "{text}");
    assert!(text.contains("netops/111"), "{text}");
    // Bob's grant is untouched.
    let (status, _) = get(&s, BOB_KEY, "/organizations/222").await;
    assert_eq!(status, 200);
    // Later requests do not hammer the AS.
    let calls = s.standin.token_calls();
    let (status, _) = get(&s, ALICE_KEY, "/organizations/111").await;
    assert_eq!(status, 503);
    assert_eq!(s.standin.token_calls(), calls);
    let (_, metrics) = p.admin("/metrics").await;
    assert!(
        metrics.contains(
            r#"meraki_proxy_grant_needs_reauthorization{integration="netops",organization="111"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn sigkill_right_after_a_refresh_loses_no_grant() {
    let s = Scenario::new(Options::default()).await;
    s.import().await;
    let mut p = s.start().await;
    for round in 0..3 {
        // Force a refresh (rotation), then kill the process the moment the answer is back.
        s.standin.expire_all_access_tokens();
        let (status, _) = get(&s, ALICE_KEY, "/organizations/111").await;
        assert_eq!(status, 200, "round {round}");
        p.kill9();
        p = s.start().await;
        let (status, body) = get(&s, ALICE_KEY, "/organizations/111").await;
        assert_eq!(status, 200, "round {round} after restart: {body}");
    }
    // The stored refresh token is the AS's current one: one more forced refresh works.
    s.standin.expire_all_access_tokens();
    let (status, _) = get(&s, ALICE_KEY, "/organizations/111/networks").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_bad_configuration_exits_non_zero_naming_the_key() {
    let s = Scenario::new(Options::default()).await;
    let text = std::fs::read_to_string(&s.config).unwrap();
    let cases = [
        (
            text.replace("[server]\n", "[server]\nworkers = 4\n"),
            "workers",
        ),
        (
            text.replace("organizations = [\"111\"]", "organizations = [\"eleven\"]"),
            "clients[0].organizations[0]",
        ),
        (
            text.replace("key_sha256 = \"", "key_sha256 = \"zz"),
            "clients[0].key_sha256",
        ),
    ];
    for (bad, key) in cases {
        std::fs::write(&s.config, bad).unwrap();
        for cmd in ["run", "check"] {
            let out = s.run(&[cmd]).await;
            assert!(!out.status.success(), "{cmd} must fail");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(key) && err.contains("proxy.toml"),
                "{cmd}: {err}"
            );
        }
    }
    std::fs::write(&s.config, &text).unwrap();
    let out = s
        .command(&["check"])
        .env_remove("NETOPS_CLIENT_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NETOPS_CLIENT_SECRET is not set"));
    let out = s.run(&["check"]).await;
    assert!(out.status.success());
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("alice") && !summary.contains(CLIENT_SECRET),
        "{summary}"
    );
}

#[tokio::test]
async fn audit_records_every_request_and_no_secret_appears_anywhere() {
    let (s, p) = ready().await;
    let _ = get(&s, ALICE_KEY, "/organizations/111").await;
    let _ = get(&s, ALICE_KEY, "/organizations/222").await;
    let _ = get(&s, "wrong-key-123", "/organizations/111").await;
    s.standin
        .fail_next_api(1, 401, r#"{"errors":["Invalid API key"]}"#);
    let _ = get(&s, BOB_KEY, "/organizations/222/networks").await;
    // The harness's readiness probes (no key) are audited too; leave them out.
    let ours = |r: &&Value| r["kind"] == "request" && r["reason"] != "missing_key";
    eventually("4 request records", || {
        s.audit().iter().filter(ours).count() == 4
    })
    .await;
    let audit = s.audit();
    // A record is written once its response is sent, so the next request's record may come
    // first: find each by what it was.
    let reqs: Vec<&Value> = audit.iter().filter(ours).collect();
    let find = |client: &str, path: &str| {
        *reqs
            .iter()
            .find(|r| r["client"] == client && r["path"] == path)
            .unwrap_or_else(|| panic!("no record of {client} {path}: {reqs:#?}"))
    };
    let ok = find("alice", "/organizations/111");
    assert_eq!(ok["decision"], "forwarded");
    assert_eq!(ok["organization"], "111");
    assert_eq!(ok["status"], 200);
    assert!(ok["upstream_request_id"].is_string());
    assert_eq!(ok["token_fingerprint"].as_str().unwrap().len(), 8);
    let denied = find("alice", "/organizations/222");
    assert_eq!(denied["decision"], "denied");
    assert_eq!(denied["reason"], "forbidden_organization");
    let unknown = reqs.iter().find(|r| r["reason"] == "unknown_key").unwrap();
    assert_eq!(unknown["status"], 401);
    let retried = find("bob", "/organizations/222/networks");
    assert_eq!(retried["retried_after_401"], true);
    assert_eq!(retried["status"], 200);
    assert!(audit.iter().any(|r| r["event"] == "token_refreshed"));

    let (_, metrics) = p.admin("/metrics").await;
    drop(p);
    let mut secrets = vec![
        ALICE_KEY.to_string(),
        BOB_KEY.to_string(),
        CLIENT_SECRET.to_string(),
    ];
    secrets.extend(s.initial_refresh.iter().cloned());
    for t in &s.initial_refresh {
        secrets.push(s.standin.current_refresh_token(t).unwrap());
    }
    for r in s.standin.requests() {
        if let Some(a) = r.header("authorization") {
            secrets.push(a.trim_start_matches("Bearer ").to_string());
        }
    }
    let audit_text = std::fs::read_to_string(s.dir.path().join("audit.jsonl")).unwrap();
    let logs = s.logs();
    for secret in &secrets {
        assert!(!audit_text.contains(secret.as_str()), "secret in audit log");
        assert!(!logs.contains(secret.as_str()), "secret in process output");
        assert!(!metrics.contains(secret.as_str()), "secret in metrics");
    }
}

#[tokio::test]
async fn action_batches_may_only_touch_their_own_organization() {
    let (s, _p) = ready().await;
    let batch = |resource: &str| {
        json!({"confirmed": true, "synchronous": true, "actions": [
            {"resource": "/networks/L_111_0", "operation": "update", "body": {"name": "batched"}},
            {"resource": resource, "operation": "update", "body": {"name": "pwned"}}]})
    };
    let post = |body: Value| {
        s.script(Method::POST, "/organizations/111/actionBatches", ALICE_KEY)
            .json(&body)
            .send()
    };
    for outside in ["/networks/L_222_0", "/organizations/222/networks"] {
        let r = post(batch(outside)).await.unwrap();
        assert_eq!(r.status(), 403, "{outside}");
        let v: Value = r.json().await.unwrap();
        assert!(errors0(&v).contains("not in organization 111"), "{v}");
    }
    // A resource that is not canonical is refused before anything is looked up.
    let r = post(batch("/networks/L_111_0/../../networks/L_222_0"))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        !s.standin.requests().iter().any(|r| r.method == "POST"),
        "no refused batch reached Meraki"
    );
    assert_eq!(s.standin.network("L_222_0").unwrap()["name"], "bob net");
    // A batch inside the organization goes through, body intact, even across a 401 retry
    // (the network is looked up first, so the injected 401 hits the batch itself).
    assert_eq!(get(&s, ALICE_KEY, "/networks/L_111_1").await.0, 200);
    s.standin
        .fail_next_api(1, 401, r#"{"errors":["Invalid API key"]}"#);
    let r = post(batch("/networks/L_111_1")).await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(s.standin.network("L_111_1").unwrap()["name"], "pwned");
    let posts: Vec<_> = s
        .standin
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 2);
    assert_eq!(posts[0].body, posts[1].body);
    assert_eq!(
        serde_json::from_slice::<Value>(&posts[1].body).unwrap(),
        batch("/networks/L_111_1")
    );
}
