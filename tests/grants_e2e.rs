//! Grant lifecycle end to end: onboarding through the consent flow, revocation, keep-alive,
//! encryption at rest, and the status page in a real headless Chromium.

mod support;

use std::collections::HashMap;
use std::time::Duration;
use support::browser::dump_dom;
use support::harness::*;

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn admin_url(s: &Scenario, path: &str) -> String {
    format!("http://127.0.0.1:{}{}", s.admin_port, path)
}

fn location(r: &reqwest::Response) -> String {
    r.headers()["location"].to_str().unwrap().to_string()
}

fn query(url: &str) -> HashMap<String, String> {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

async fn alice_status(s: &Scenario, path: &str) -> u16 {
    no_redirects()
        .get(format!("{}{}", s.base(), path))
        .header("X-Cisco-Meraki-API-Key", ALICE_KEY)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn consent_flow_stores_a_grant_that_serves_requests_and_state_cannot_be_replayed() {
    let s = Scenario::new(Options::default()).await;
    let _p = s.start().await;
    assert_eq!(
        alice_status(&s, "/organizations/111").await,
        503,
        "no grant yet"
    );

    let r = no_redirects()
        .get(admin_url(&s, "/oauth/connect?integration=netops"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let authorize = location(&r);
    assert!(
        authorize.starts_with(&s.standin.authorize_url()),
        "{authorize}"
    );
    let q = query(&authorize);
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["redirect_uri"], admin_url(&s, "/oauth/callback"));
    assert_eq!(
        q["scope"],
        "dashboard:general:config:read dashboard:general:config:write"
    );
    assert_eq!(q["state"].len(), 48);

    // The stand-in's consent page approves at once and sends the browser back.
    let r = no_redirects().get(&authorize).send().await.unwrap();
    assert_eq!(r.status(), 302);
    let callback = location(&r);
    assert!(
        callback.starts_with(&admin_url(&s, "/oauth/callback?")),
        "{callback}"
    );
    let r = no_redirects().get(&callback).send().await.unwrap();
    let body = r.text().await.unwrap();
    assert!(
        body.contains("id=\"connected\"") && body.contains("111"),
        "{body}"
    );
    assert_eq!(s.standin.code_exchanges(), 1);
    assert_eq!(alice_status(&s, "/organizations/111").await, 200);

    // Replaying the callback (same state) or forging one stores nothing more.
    let r = no_redirects().get(&callback).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("already used"));
    let forged = callback.replace(&q["state"], &"ab".repeat(24));
    let r = no_redirects().get(&forged).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = no_redirects()
        .get(admin_url(&s, "/oauth/callback?code=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(s.standin.code_exchanges(), 1, "no further code exchange");
    let grants = s.run(&["grants", "list"]).await;
    let listing = String::from_utf8_lossy(&grants.stdout);
    assert_eq!(
        listing.lines().filter(|l| l.contains("netops")).count(),
        1,
        "{listing}"
    );
    // The audit writer batches on a short timer: wait for the record, do not race it.
    eventually("the grant_added audit record", || {
        s.audit()
            .iter()
            .any(|r| r["event"] == "grant_added" && r["detail"] == "connect")
    })
    .await;
}

#[tokio::test]
async fn authorization_server_errors_show_a_page_and_store_nothing() {
    let s = Scenario::new(Options::default()).await;
    let _p = s.start().await;
    let r = no_redirects()
        .get(admin_url(&s, "/oauth/connect?integration=netops"))
        .send()
        .await
        .unwrap();
    let state = query(&location(&r))["state"].clone();
    let r = no_redirects()
        .get(admin_url(
            &s,
            &format!("/oauth/callback?error=access_denied&state={state}"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("access_denied") && page.contains("declined"),
        "{page}"
    );
    let r = no_redirects()
        .get(admin_url(&s, "/oauth/connect?integration=nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(s.standin.code_exchanges(), 0);
    assert!(
        String::from_utf8_lossy(&s.run(&["grants", "list"]).await.stdout)
            .lines()
            .count()
            <= 1
    );
}

#[tokio::test]
async fn revoke_calls_the_as_then_deletes_and_an_as_failure_keeps_the_grant() {
    let s = Scenario::new(Options::default()).await;
    s.import().await;
    let p = s.start().await;
    assert_eq!(alice_status(&s, "/organizations/111").await, 200);
    let out = s
        .run(&[
            "grants",
            "revoke",
            "--integration",
            "netops",
            "--org",
            "111",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.standin.revocations(), 1);
    assert!(
        s.standin
            .current_refresh_token(&s.initial_refresh[0])
            .is_none(),
        "revoked at the AS"
    );
    let listing = String::from_utf8_lossy(&s.run(&["grants", "list"]).await.stdout).to_string();
    assert!(
        !listing.contains(" 111 ") && listing.contains("222"),
        "{listing}"
    );
    // The running proxy drops the grant on its next store read (keep-alive tick or a miss).
    drop(p);
    let _p = s.start().await;
    assert_eq!(alice_status(&s, "/organizations/111").await, 503);

    s.standin.shutdown();
    let out = s
        .run(&[
            "grants",
            "revoke",
            "--integration",
            "netops",
            "--org",
            "222",
        ])
        .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the grant is kept"));
    assert!(String::from_utf8_lossy(&s.run(&["grants", "list"]).await.stdout).contains("222"));
}

#[tokio::test]
async fn idle_grants_are_kept_alive_without_traffic() {
    let s = Scenario::new(Options {
        tokens: "keepalive_idle_secs = 2\nkeepalive_check_secs = 1".into(),
        ..Default::default()
    })
    .await;
    s.import().await;
    let before = s.standin.token_calls();
    let _p = s.start().await;
    eventually("both idle grants refreshed by the keep-alive", || {
        s.standin.token_calls() >= before + 2
    })
    .await;
    // The audit writer batches on a short timer, so the records may trail the AS calls.
    eventually("a keep-alive audit record for each grant", || {
        let orgs: std::collections::BTreeSet<String> = s
            .audit()
            .into_iter()
            .filter(|r| r["event"] == "token_refreshed" && r["detail"] == "keep-alive")
            .map(|r| r["organization"].to_string())
            .collect();
        orgs.len() == 2
    })
    .await;
    // The rotated tokens are the AS's current ones: requests still work.
    assert_eq!(alice_status(&s, "/organizations/111").await, 200);
}

#[tokio::test]
async fn the_store_holds_no_token_in_clear_and_a_wrong_key_is_refused() {
    let s = Scenario::new(Options::default()).await;
    s.import().await;
    let p = s.start().await;
    assert_eq!(alice_status(&s, "/organizations/111").await, 200);
    drop(p);
    let mut tokens: Vec<String> = s
        .initial_refresh
        .iter()
        .map(|t| s.standin.current_refresh_token(t).unwrap())
        .collect();
    for r in s.standin.requests() {
        if let Some(a) = r.header("authorization") {
            tokens.push(a.trim_start_matches("Bearer ").to_string());
        }
    }
    assert!(tokens.len() >= 3);
    for f in ["tokens.db", "tokens.db-wal"] {
        let bytes = std::fs::read(s.dir.path().join(f)).unwrap_or_default();
        for t in &tokens {
            assert!(
                !bytes.windows(t.len()).any(|w| w == t.as_bytes()),
                "a token is in clear in {f}"
            );
        }
    }
    let out = s
        .serving_command()
        .env("MERAKI_PROXY_STORE_KEY", "ab".repeat(32))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sealed with another key"), "{err}");
    // Key rotation: re-seal, then the new key works and the old one is refused.
    let new_key = "cd".repeat(32);
    let out = s
        .command(&["store", "rotate-key", "--new-key-env", "NEW_KEY"])
        .env("NEW_KEY", &new_key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = s
        .command(&["grants", "list"])
        .env("MERAKI_PROXY_STORE_KEY", &new_key)
        .output()
        .unwrap();
    assert!(list.status.success() && String::from_utf8_lossy(&list.stdout).contains("111"));
    assert!(!s
        .command(&["grants", "list"])
        .output()
        .unwrap()
        .status
        .success());
}

#[tokio::test]
async fn status_page_in_chromium_shows_grants_and_connect_leads_through_consent() {
    let s = Scenario::new(Options::default()).await;
    s.import().await;
    let p = s.start().await;
    // Grant of org 222 dies at the AS: it must show as needing re-authorization.
    let bob_token = s
        .standin
        .current_refresh_token(&s.initial_refresh[1])
        .unwrap();
    s.standin.revoke_grant_of(&bob_token);
    let st = no_redirects()
        .get(format!("{}/organizations/222", s.base()))
        .header("X-Cisco-Meraki-API-Key", BOB_KEY)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 503);

    let profile = s.dir.path().join("chromium-profile");
    let dom = dump_dom(admin_url(&s, "/"), profile.clone()).await;
    assert!(
        dom.contains("<table id=\"grants\">"),
        "status page did not render: {dom}"
    );
    let grants = &dom[dom.find("id=\"grants\"").unwrap()..dom.find("id=\"clients\"").unwrap()];
    assert_eq!(grants.matches("<tr data-grant=").count(), 2, "{grants}");
    assert!(
        grants.contains(">ok<") && grants.contains("needs re-authorization"),
        "{grants}"
    );
    assert!(dom.contains("not ready"));
    assert!(dom.contains("alice") && dom.contains("bob"));
    for secret in [CLIENT_SECRET, ALICE_KEY, BOB_KEY] {
        assert!(!dom.contains(secret));
    }
    let href = "/oauth/connect?integration=netops";
    assert!(
        dom.contains(&format!("href=\"{href}\"")),
        "Connect button: {dom}"
    );

    // Following the Connect button in the browser: consent (auto-approved) and back.
    let dom = dump_dom(admin_url(&s, href), profile).await;
    assert!(dom.contains("id=\"connected\""), "{dom}");
    assert_eq!(s.standin.code_exchanges(), 1);
    let st = no_redirects()
        .get(format!("{}/organizations/222", s.base()))
        .header("X-Cisco-Meraki-API-Key", BOB_KEY)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 200, "reconnected grant serves bob again");
    let (ready, _) = p.admin("/readyz").await;
    assert_eq!(ready, 200);
}

#[tokio::test]
async fn an_admin_token_protects_the_admin_listener_but_not_probes_or_the_callback() {
    let s = Scenario::new(Options {
        server: "admin_token_env = \"ADMIN_TOKEN\"".into(),
        ..Default::default()
    })
    .await;
    let token = "admin-token-0123456789abcdef";
    let mut cmd = s.serving_command();
    let log = std::fs::File::create(s.dir.path().join("admin.log")).unwrap();
    let child = cmd.env("ADMIN_TOKEN", token).stderr(log).spawn().unwrap();
    let mut p = ProxyProcess {
        child,
        port: s.port,
        admin_port: s.admin_port,
        log: s.dir.path().join("admin.log"),
        tls: false,
        _sockets: s.sockets.clone(),
    };
    eventually_async(|| async { reqwest::get(admin_url(&s, "/healthz")).await.is_ok() }).await;
    enum Auth {
        None,
        Bearer(&'static str),
        Basic(&'static str),
    }
    // (path, credentials, expected status)
    let cases = [
        ("/", Auth::None, 401),
        ("/metrics", Auth::None, 401),
        ("/metrics", Auth::Bearer("wrong-token-wrong-token"), 401),
        ("/metrics", Auth::Bearer(token), 200),
        ("/", Auth::Basic(token), 200),
        ("/oauth/connect?integration=netops", Auth::None, 401),
        ("/healthz", Auth::None, 200),
        // Reachable without the token, guarded by its single-use state instead.
        ("/oauth/callback?state=x&code=y", Auth::None, 400),
    ];
    for (path, auth, want) in cases {
        let req = no_redirects().get(admin_url(&s, path));
        let req = match auth {
            Auth::None => req,
            Auth::Bearer(t) => req.bearer_auth(t),
            Auth::Basic(t) => req.basic_auth("ops", Some(t)),
        };
        assert_eq!(req.send().await.unwrap().status(), want, "{path}");
    }
    p.kill9();
}
