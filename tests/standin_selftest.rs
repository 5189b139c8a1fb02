//! Checks the Meraki stand-in itself (tests/support/standin.rs), talking to it with reqwest, so
//! that the proxy's tests can trust it.

mod support;

use std::time::Duration;

use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use support::standin::Standin;

const CLIENT: &str = "client-1";
const SECRET: &str = "secret-1";
const SCOPES: &[&str] = &[
    "dashboard:general:config:read",
    "dashboard:general:config:write",
];

/// Org 1 with 12 networks and 3 devices, org 2 with one of each, and a grant for org 1.
async fn seeded() -> (Standin, String) {
    let s = Standin::start().await;
    s.add_client(CLIENT, SECRET);
    s.add_org("1", "One");
    s.add_org("2", "Two");
    for i in 0..12 {
        s.add_network("1", &format!("L_1_{i:02}"), &format!("Net {i:02}"));
    }
    s.add_network("2", "L_2_00", "Other");
    s.add_device("L_1_00", "Q2AA-0001", "ap one");
    s.add_device("L_1_03", "Q2AA-0002", "ap two");
    s.add_device("L_1_03", "Q2AA-0003", "ap three");
    s.add_device("L_2_00", "Q2BB-0001", "other ap");
    let refresh = s.issue_grant(CLIENT, &["1"], SCOPES);
    (s, refresh)
}

fn http() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn refresh(s: &Standin, refresh_token: &str) -> Response {
    http()
        .post(s.token_url())
        .basic_auth(CLIENT, Some(SECRET))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ])
        .send()
        .await
        .unwrap()
}

/// Refreshes and returns (access token, new refresh token).
async fn tokens(s: &Standin, refresh_token: &str) -> (String, String) {
    let response = refresh(s, refresh_token).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    (
        body["access_token"].as_str().unwrap().to_owned(),
        body["refresh_token"].as_str().unwrap().to_owned(),
    )
}

async fn api_get(s: &Standin, access_token: &str, path: &str) -> Response {
    http()
        .get(format!("{}{path}", s.api_base()))
        .bearer_auth(access_token)
        .send()
        .await
        .unwrap()
}

async fn error_of(response: Response) -> Value {
    response.json().await.unwrap()
}

#[tokio::test]
async fn refresh_rotates_and_the_old_refresh_token_is_invalid_grant() {
    let (s, r1) = seeded().await;
    let response = refresh(&s, &r1).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], SCOPES.join(" "));
    let a1 = body["access_token"].as_str().unwrap().to_owned();
    let r2 = body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(r1, r2);
    assert_ne!(
        &a1[..3],
        &r2[..3],
        "access and refresh tokens look different"
    );
    assert_eq!(s.current_refresh_token(&r1).as_deref(), Some(r2.as_str()));

    let reused = refresh(&s, &r1).await;
    assert_eq!(reused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_of(reused).await["error"], "invalid_grant");

    // The new refresh token works, and the first access token is still good until it expires.
    let (a2, r3) = tokens(&s, &r2).await;
    assert_ne!(a1, a2);
    assert_eq!(s.current_refresh_token(&r1), Some(r3));
    assert_eq!(
        api_get(&s, &a1, "/organizations").await.status(),
        StatusCode::OK
    );
    assert_eq!(s.token_calls(), 3);
}

#[tokio::test]
async fn token_endpoint_checks_client_and_request() {
    let (s, r1) = seeded().await;
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", r1.as_str()),
    ];

    let no_auth = http().post(s.token_url()).form(&form).send().await.unwrap();
    assert_eq!(no_auth.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(no_auth).await["error"], "invalid_client");

    let bad_secret = http()
        .post(s.token_url())
        .basic_auth(CLIENT, Some("wrong"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_secret.status(), StatusCode::UNAUTHORIZED);

    let json_body = http()
        .post(s.token_url())
        .basic_auth(CLIENT, Some(SECRET))
        .json(&json!({"grant_type": "refresh_token", "refresh_token": r1}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_body.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_of(json_body).await["error"], "invalid_request");

    let no_grant_type = http()
        .post(s.token_url())
        .basic_auth(CLIENT, Some(SECRET))
        .form(&[("refresh_token", r1.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(no_grant_type.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_of(no_grant_type).await["error"], "invalid_request");

    // Another client cannot use this grant's refresh token.
    s.add_client("client-2", "secret-2");
    let other_client = http()
        .post(s.token_url())
        .basic_auth("client-2", Some("secret-2"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(other_client).await["error"], "invalid_grant");

    // None of that rotated anything.
    assert_eq!(s.current_refresh_token(&r1), Some(r1.clone()));
    // Every call whose form carried grant_type=refresh_token counts, whatever its outcome (the
    // JSON one carried no form).
    assert_eq!(s.token_calls(), 3);
}

#[tokio::test]
async fn api_requires_a_valid_bearer_and_scopes_to_the_grant() {
    let (s, r1) = seeded().await;
    let (access, _) = tokens(&s, &r1).await;

    let missing = http()
        .get(format!("{}/organizations", s.api_base()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert!(missing.headers().contains_key("x-request-id"));
    assert_eq!(missing.headers()["content-type"], "application/json");
    assert_eq!(
        error_of(missing).await,
        json!({"errors": ["Invalid API key"]})
    );

    // Meraki would take the API key header; the stand-in records it but wants a bearer.
    let api_key_only = http()
        .get(format!("{}/organizations", s.api_base()))
        .header("X-Cisco-Meraki-API-Key", &access)
        .send()
        .await
        .unwrap();
    assert_eq!(api_key_only.status(), StatusCode::UNAUTHORIZED);
    let last = s.requests().pop().unwrap();
    assert_eq!(last.header("X-Cisco-Meraki-API-Key"), Some(access.as_str()));
    assert_eq!(last.status, 401);

    let unknown = api_get(&s, "at-nope", "/organizations").await;
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);

    let orgs: Value = api_get(&s, &access, "/organizations")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(orgs.as_array().unwrap().len(), 1);
    assert_eq!(orgs[0]["id"], "1");
    assert_eq!(orgs[0]["api"]["enabled"], true);

    for path in [
        "/organizations/2",
        "/organizations/2/networks",
        "/networks/L_2_00",
        "/devices/Q2BB-0001",
        "/nothing/here",
        "/organizations/1/networks/",
    ] {
        let response = api_get(&s, &access, path).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(error_of(response).await, json!({"errors": ["Not found"]}));
    }

    let network: Value = api_get(&s, &access, "/networks/L_1_03")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(network["organizationId"], "1");
    assert_eq!(network["timeZone"], "America/Los_Angeles");
    let device: Value = api_get(&s, &access, "/devices/Q2AA-0002")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(device["networkId"], "L_1_03");
    assert_eq!(device["model"], "MR46");
    assert!(device.get("organizationId").is_none());
    let devices: Value = api_get(&s, &access, "/organizations/1/devices")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(devices.as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn access_tokens_expire_and_die_with_their_grant() {
    let (s, r1) = seeded().await;
    let (a1, r2) = tokens(&s, &r1).await;
    s.expire_all_access_tokens();
    assert_eq!(
        api_get(&s, &a1, "/organizations").await.status(),
        StatusCode::UNAUTHORIZED
    );

    // A TTL of zero gives tokens that are expired as soon as they are issued.
    s.set_access_ttl(0);
    let response = refresh(&s, &r2).await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["expires_in"], 0);
    let a2 = body["access_token"].as_str().unwrap();
    let r3 = body["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(
        api_get(&s, a2, "/organizations").await.status(),
        StatusCode::UNAUTHORIZED
    );

    s.set_access_ttl(3600);
    let (a3, r4) = tokens(&s, &r3).await;
    assert_eq!(
        api_get(&s, &a3, "/organizations").await.status(),
        StatusCode::OK
    );
    // Revoking by any (even rotated-out) refresh token of the grant kills it all.
    s.revoke_grant_of(&r1);
    assert_eq!(s.current_refresh_token(&r4), None);
    assert_eq!(
        api_get(&s, &a3, "/organizations").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let after = refresh(&s, &r4).await;
    assert_eq!(after.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_of(after).await["error"], "invalid_grant");
}

/// Parses `<url>; rel=name, ...` into (rel, url) pairs.
fn links(response: &Response) -> Vec<(String, String)> {
    let header = response.headers()["link"].to_str().unwrap();
    header
        .split(", ")
        .map(|part| {
            let (url, rel) = part.split_once("; rel=").unwrap();
            (
                rel.to_owned(),
                url.trim_start_matches('<').trim_end_matches('>').to_owned(),
            )
        })
        .collect()
}

fn link<'a>(links: &'a [(String, String)], rel: &str) -> Option<&'a str> {
    links
        .iter()
        .find(|(r, _)| r == rel)
        .map(|(_, u)| u.as_str())
}

fn ids(page: &Value) -> Vec<String> {
    page.as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn pagination_follows_absolute_links_with_untouched_cursors() {
    let (s, r1) = seeded().await;
    let (access, _) = tokens(&s, &r1).await;
    let get = |url: String| {
        let access = access.clone();
        async move { http().get(url).bearer_auth(access).send().await.unwrap() }
    };

    let mut url = format!("{}/organizations/1/networks?perPage=5", s.api_base());
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let response = get(url.clone()).await;
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        let links = links(&response);
        assert!(link(&links, "first").is_some() && link(&links, "last").is_some());
        assert_eq!(link(&links, "prev").is_some(), pages > 0);
        for (_, u) in &links {
            assert!(
                u.starts_with(&s.api_base()),
                "absolute link on own base: {u}"
            );
            assert!(u.contains("&t0=2026-11-23T00%3A00%3A00Z"), "{u}");
        }
        seen.extend(ids(&response.json::<Value>().await.unwrap()));
        pages += 1;
        match link(&links, "next") {
            Some(next) => url = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..12).map(|i| format!("L_1_{i:02}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(
        s.requests()[2].path_and_query,
        "/api/v1/organizations/1/networks?perPage=5&startingAfter=L_1_09&t0=2026-11-23T00%3A00%3A00Z"
    );

    // `last` and then `prev` walk backwards.
    let first = get(format!(
        "{}/organizations/1/networks?perPage=5",
        s.api_base()
    ))
    .await;
    let last_url = link(&links(&first), "last").unwrap().to_owned();
    let last = get(last_url).await;
    let prev_url = link(&links(&last), "prev").unwrap().to_owned();
    assert!(link(&links(&last), "next").is_none());
    assert_eq!(ids(&last.json().await.unwrap()), expected[7..].to_vec());
    let prev = get(prev_url).await;
    assert_eq!(ids(&prev.json().await.unwrap()), expected[2..7].to_vec());

    // A cursor that is not one the stand-in issued, byte for byte, is refused.
    for bad in [
        "startingAfter=L_1_99",
        "startingAfter=L%5F1%5F04",
        "endingBefore=x",
    ] {
        let response = get(format!(
            "{}/organizations/1/networks?perPage=5&{bad}",
            s.api_base()
        ))
        .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    let bad_per_page = get(format!(
        "{}/organizations/1/networks?perPage=2",
        s.api_base()
    ))
    .await;
    assert_eq!(bad_per_page.status(), StatusCode::BAD_REQUEST);

    // Links use the base of the listener that served the request.
    let on_shard = http()
        .get(format!(
            "{}/organizations/1/networks?perPage=5",
            s.shard_api_base()
        ))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert!(link(&links(&on_shard), "next")
        .unwrap()
        .starts_with(&s.shard_api_base()));
}

#[tokio::test]
async fn the_organization_list_pages_like_merakis_up_to_nine_thousand() {
    let s = Standin::start().await;
    s.add_client(CLIENT, SECRET);
    let orgs: Vec<String> = (0..9005).map(|i| format!("{}", 100_000 + i)).collect();
    for o in &orgs {
        s.add_org(o, "Customer");
    }
    s.add_org("999", "Not in the grant");
    let refs: Vec<&str> = orgs.iter().map(String::as_str).collect();
    let (access, _) = tokens(&s, &s.issue_grant(CLIENT, &refs, SCOPES)).await;
    let get = |url: String| {
        let access = access.clone();
        async move { http().get(url).bearer_auth(access).send().await.unwrap() }
    };
    // Default perPage 9000: two pages, the second found by the absolute next link.
    let first = get(format!("{}/organizations", s.api_base())).await;
    let l = links(&first);
    let page1 = ids(&first.json().await.unwrap());
    assert_eq!(page1.len(), 9000);
    let next = link(&l, "next").unwrap().to_owned();
    assert!(next.starts_with(&s.api_base()), "{next}");
    let page2 = ids(&get(next).await.json().await.unwrap());
    assert_eq!(page2, orgs[9000..]);
    assert!(
        !page1.contains(&"999".to_owned()),
        "only the grant's organizations"
    );
    let small = get(format!("{}/organizations?perPage=3", s.api_base())).await;
    assert_eq!(ids(&small.json().await.unwrap()).len(), 3);
    for bad in ["perPage=2", "perPage=9001"] {
        let r = get(format!("{}/organizations?{bad}", s.api_base())).await;
        assert_eq!(r.status(), 400, "{bad}");
    }
}

#[tokio::test]
async fn injected_failures_count_down_and_come_before_the_bearer_check() {
    let (s, _) = seeded().await;
    s.fail_next_api(2, 401, r#"{"errors":["Invalid API key"]}"#);
    for _ in 0..2 {
        let response = api_get(&s, "not-even-a-token", "/organizations").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.text().await.unwrap(),
            r#"{"errors":["Invalid API key"]}"#
        );
    }
    s.fail_next_api(1, 503, r#"{"errors":["busy"]}"#);
    assert_eq!(
        api_get(&s, "x", "/organizations").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );

    s.rate_limit_next(2, 7);
    for _ in 0..2 {
        let response = api_get(&s, "x", "/organizations/1").await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "7");
        assert_eq!(
            error_of(response).await,
            json!({"errors": ["API rate limit exceeded for organization"]})
        );
    }
    // Used up: the next request is judged on its (missing) credentials again.
    assert_eq!(
        api_get(&s, "x", "/organizations").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let statuses: Vec<u16> = s.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [401, 401, 503, 429, 429, 401]);
}

#[tokio::test]
async fn redirects_to_the_shard_keep_path_query_and_method_semantics() {
    let (s, r1) = seeded().await;
    let (access, _) = tokens(&s, &r1).await;
    s.redirect_next_to_shard(2);

    let get = api_get(&s, &access, "/organizations/1/networks?perPage=3").await;
    assert_eq!(get.status(), StatusCode::FOUND);
    let location = get.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(
        location,
        format!("{}/organizations/1/networks?perPage=3", s.shard_api_base())
    );

    let put = http()
        .put(format!("{}/networks/L_1_01", s.api_base()))
        .bearer_auth(&access)
        .json(&json!({"name": "renamed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::TEMPORARY_REDIRECT);
    let put_location = put.headers()["location"].to_str().unwrap().to_owned();
    let followed = http()
        .put(put_location)
        .bearer_auth(&access)
        .json(&json!({"name": "renamed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(followed.status(), StatusCode::OK);
    assert_eq!(s.network("L_1_01").unwrap()["name"], "renamed");

    let listeners: Vec<(&str, u16)> = s
        .requests()
        .iter()
        .map(|r| (r.listener, r.status))
        .collect();
    assert_eq!(listeners, [("main", 302), ("main", 307), ("shard", 200)]);

    s.set_redirect_location(1, "http://evil.example/api/v1/organizations");
    let evil = api_get(&s, &access, "/organizations").await;
    assert_eq!(evil.status(), StatusCode::FOUND);
    assert_eq!(
        evil.headers()["location"],
        "http://evil.example/api/v1/organizations"
    );
    assert_eq!(
        api_get(&s, &access, "/organizations").await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn requests_are_recorded_with_headers_and_body() {
    let (s, r1) = seeded().await;
    let (access, _) = tokens(&s, &r1).await;
    let body = json!({"name": "New name", "tags": ["a", "b"], "timeZone": "Europe/Paris"});
    let response = http()
        .put(format!("{}/networks/L_1_02?x=%2F", s.api_base()))
        .bearer_auth(&access)
        .header("User-Agent", "SelfTest/1.0 Tester")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let updated: Value = response.json().await.unwrap();
    assert_eq!(updated["tags"], json!(["a", "b"]));
    assert_eq!(s.network("L_1_02").unwrap(), updated);

    let recorded = s.requests();
    assert_eq!(recorded.len(), 1);
    let r = &recorded[0];
    assert_eq!(r.method, "PUT");
    assert_eq!(r.path_and_query, "/api/v1/networks/L_1_02?x=%2F");
    assert_eq!(r.header("user-agent"), Some("SelfTest/1.0 Tester"));
    assert_eq!(
        r.header("Authorization"),
        Some(format!("Bearer {access}").as_str())
    );
    assert_eq!(serde_json::from_slice::<Value>(&r.body).unwrap(), body);
    assert!(r.headers.iter().all(|(n, _)| *n == n.to_lowercase()));

    let not_json = http()
        .put(format!("{}/networks/L_1_02", s.api_base()))
        .bearer_auth(&access)
        .body("name=x")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    assert!(error_of(not_json).await["errors"][0].is_string());

    // HEAD answers like GET, without a body.
    let head = http()
        .head(format!("{}/organizations/1", s.api_base()))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert!(head.headers().contains_key("x-request-id"));
    assert!(head.bytes().await.unwrap().is_empty());

    s.clear_requests();
    assert!(s.requests().is_empty());
}

#[tokio::test]
async fn action_batches_apply_updates_within_the_org() {
    let (s, r1) = seeded().await;
    let (access, _) = tokens(&s, &r1).await;
    let batch = |resource: &str| {
        json!({
            "confirmed": true,
            "synchronous": true,
            "actions": [{"resource": resource, "operation": "update", "body": {"name": "batched"}}],
        })
    };
    let post = |org: &str, body: Value| {
        http()
            .post(format!(
                "{}/organizations/{org}/actionBatches",
                s.api_base()
            ))
            .bearer_auth(&access)
            .json(&body)
            .send()
    };

    let created = post("1", batch("/networks/L_1_05")).await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    assert_eq!(created["organizationId"], "1");
    assert_eq!(created["status"]["completed"], true);
    assert_eq!(created["actions"][0]["resource"], "/networks/L_1_05");
    assert_eq!(s.network("L_1_05").unwrap()["name"], "batched");

    let foreign = post("1", batch("/networks/L_2_00")).await.unwrap();
    assert_eq!(foreign.status(), StatusCode::BAD_REQUEST);
    assert_eq!(s.network("L_2_00").unwrap()["name"], "Other");
    let other_org = post("2", batch("/networks/L_2_00")).await.unwrap();
    assert_eq!(other_org.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn authorization_code_flow() {
    let (s, _) = seeded().await;
    let redirect_uri = "http://127.0.0.1:1/callback";
    let authorize = |extra: &str| {
        http()
            .get(format!(
                "{}?response_type=code&client_id={CLIENT}&redirect_uri={}&state=st%201{extra}",
                s.authorize_url(),
                "http%3A%2F%2F127.0.0.1%3A1%2Fcallback",
            ))
            .send()
    };
    let response = authorize("&scope=dashboard%3Ageneral%3Aconfig%3Aread&org_ids=2")
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let location = url::Url::parse(response.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with(redirect_uri));
    let param = |name: &str| {
        location
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    assert_eq!(param("state").as_deref(), Some("st 1"));
    let code = param("code").unwrap();

    let exchange = |code: String, redirect_uri: &'static str| {
        http()
            .post(s.token_url())
            .basic_auth(CLIENT, Some(SECRET))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", redirect_uri),
            ])
            .send()
    };
    let tokens: Value = exchange(code.clone(), "http://127.0.0.1:1/callback")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tokens["scope"], "dashboard:general:config:read");
    let access = tokens["access_token"].as_str().unwrap();
    let orgs: Value = api_get(&s, access, "/organizations")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(orgs[0]["id"], "2");
    assert_eq!(orgs.as_array().unwrap().len(), 1);

    // Single use.
    let again = exchange(code, "http://127.0.0.1:1/callback").await.unwrap();
    assert_eq!(error_of(again).await["error"], "invalid_grant");

    // The redirect_uri must match the one given to /authorize.
    let response = authorize("&scope=x").await.unwrap();
    let location = url::Url::parse(response.headers()["location"].to_str().unwrap()).unwrap();
    let code = location
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    let mismatch = exchange(code, "http://127.0.0.1:1/other").await.unwrap();
    assert_eq!(error_of(mismatch).await["error"], "invalid_grant");
    assert_eq!(s.code_exchanges(), 3);

    let invalid_scope = authorize("&scope=invalid").await.unwrap();
    let location = invalid_scope.headers()["location"].to_str().unwrap();
    assert!(location.contains("error=invalid_scope"), "{location}");
    assert!(location.contains("state=st+1"), "{location}");

    let unknown_client = http()
        .get(format!(
            "{}?response_type=code&client_id=nobody&redirect_uri=http%3A%2F%2Fx%2F",
            s.authorize_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_client.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn revoke_endpoint_removes_the_grant() {
    let (s, r1) = seeded().await;
    let (access, r2) = tokens(&s, &r1).await;
    let revoke = |token: String| {
        http()
            .post(s.revoke_url())
            .basic_auth(CLIENT, Some(SECRET))
            .form(&[
                ("token", token.as_str()),
                ("token_type_hint", "refresh_token"),
            ])
            .send()
    };
    // A rotated-out token changes nothing (and still answers 200).
    assert_eq!(revoke(r1.clone()).await.unwrap().status(), StatusCode::OK);
    assert_eq!(s.current_refresh_token(&r1), Some(r2.clone()));

    assert_eq!(revoke(r2.clone()).await.unwrap().status(), StatusCode::OK);
    assert_eq!(s.current_refresh_token(&r1), None);
    assert_eq!(
        api_get(&s, &access, "/organizations").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        error_of(refresh(&s, &r2).await).await["error"],
        "invalid_grant"
    );

    let no_client = http()
        .post(s.revoke_url())
        .form(&[("token", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(no_client.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(s.revocations(), 3);
}

#[tokio::test]
async fn token_delay_holds_the_answer() {
    let (s, r1) = seeded().await;
    s.set_token_delay(Duration::from_millis(150));
    let started = std::time::Instant::now();
    let (_, _) = tokens(&s, &r1).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn big_bodies_are_exactly_the_size_asked_and_valid_json() {
    let (s, r1) = seeded().await;
    let (access, _) = tokens(&s, &r1).await;
    for n in [4_u64, 5, 15, 16, 65_536, 1_000_003] {
        let response = api_get(&s, &access, &format!("/organizations/1/big?bytes={n}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.content_length(), Some(n));
        let body = response.bytes().await.unwrap();
        assert_eq!(body.len() as u64, n);
        let parsed: Value = serde_json::from_slice(&body).unwrap();
        assert!(parsed.is_array());
    }
    let too_small = api_get(&s, &access, "/organizations/1/big?bytes=3").await;
    assert_eq!(too_small.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn shutdown_closes_the_listeners() {
    let (s, _) = seeded().await;
    let url = format!("{}/organizations", s.api_base());
    assert_eq!(
        http().get(&url).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    s.shutdown();
    assert!(http().get(&url).send().await.is_err());
}

#[tokio::test]
async fn the_enforced_rate_limit_is_a_token_bucket_per_organization() {
    let (s, refresh_token) = seeded().await;
    let (access, _) = tokens(&s, &refresh_token).await;
    // Slow enough that no token comes back during the test's few requests.
    s.enforce_rate_limit(0.5, 3.0);
    // A network and a device count against their organization.
    for path in ["/organizations/1", "/networks/L_1_00", "/devices/Q2AA-0001"] {
        assert_eq!(api_get(&s, &access, path).await.status(), StatusCode::OK);
    }
    let refused = api_get(&s, &access, "/organizations/1/networks").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    // Two seconds to the next token at 0.5/s, as an integer.
    assert_eq!(refused.headers()["retry-after"], "2");
    assert_eq!(
        error_of(refused).await,
        json!({"errors": ["API rate limit exceeded for organization"]})
    );
    // Another organization has its own bucket (org 2 is not the grant's: 404, not 429).
    assert_eq!(
        api_get(&s, &access, "/organizations/2").await.status(),
        StatusCode::NOT_FOUND
    );
    let log = s.rate_log();
    assert_eq!(log.len(), 5);
    assert_eq!(s.rate_limited(), 1);
    assert!(log.iter().take(4).all(|d| d.org == "1"));
    assert!(log[4].org == "2" && log[4].allowed);
}

/// Every suite runs the product users run: the configuration the harness generates for every
/// suite sets only where things are and who the clients are; no tuning key overrides a
/// product default for every suite (a test that needs another value sets it itself).
#[tokio::test]
async fn the_harness_overrides_no_product_default() {
    use support::harness::{Options, Scenario, ENVIRONMENT_KEYS};
    let s = Scenario::new(Options::default()).await;
    let text = std::fs::read_to_string(&s.config).unwrap();
    let doc: toml::Table = text.parse().unwrap();
    let mut overridden = Vec::new();
    for (table, value) in &doc {
        let allowed = ENVIRONMENT_KEYS
            .iter()
            .find(|(t, _)| t == table)
            .map_or(&[][..], |(_, keys)| *keys);
        let entries: Vec<&toml::Table> = match value {
            toml::Value::Table(t) => vec![t],
            toml::Value::Array(a) => a.iter().filter_map(|v| v.as_table()).collect(),
            _ => {
                overridden.push(table.clone());
                continue;
            }
        };
        for entry in entries {
            for key in entry.keys() {
                if !allowed.contains(&key.as_str()) {
                    overridden.push(format!("{table}.{key}"));
                }
            }
        }
    }
    assert!(
        overridden.is_empty(),
        "the harness sets {overridden:?} for every suite; set such values in the test that needs them\n{text}"
    );
    // And the file is one the product accepts as it is.
    let out = s.run(&["check", "--no-connect"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
