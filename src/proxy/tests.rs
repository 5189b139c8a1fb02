//! The hooks on an in-memory session (pingap's way): a request's bytes go in through one end of
//! a duplex pipe, the hooks run as Pingora would call them, and the other end shows what the
//! client got. No socket, no binary; the token engine runs with paused time against the
//! in-memory authorization server.

use super::*;
use crate::clock::Clock;
use crate::config::{Config, ConfigError};
use crate::identity::hash_key;
use crate::lookup::ApiClient;
use crate::observe::Observer;
use crate::reload::Live;
use crate::route::Resolver;
use crate::secret::Secret;
use crate::testing::Authority;
use crate::token::{Grants, Settings, SqliteStore};
use crate::upstream::Upstream;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const ALICE: &str = "alice-key-0123456789";
const BOB: &str = "bob-key-0123456789";
const CAROL: &str = "carol-key-0123456789";

struct Rig {
    proxy: MerakiProxy,
    authority: Arc<Authority>,
    audit_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:1"
[upstream]
api_base = "http://127.0.0.1:9/api/v1"
token_url = "http://127.0.0.1:9/oauth/token"
[store]
key_env = "KEY"
[[integrations]]
name = "netops"
client_id = "id"
client_secret_env = "SECRET"
[[clients]]
name = "alice"
key_sha256 = "{alice}"
integration = "netops"
organizations = ["111", "444"]
[[clients]]
name = "bob"
key_sha256 = "{bob}"
integration = "netops"
organizations = ["222"]
methods = ["GET"]
[[clients]]
name = "carol"
key_sha256 = "{carol}"
integration = "netops"
organizations = ["111"]
operations = ["getOrganization", "wireless:read"]
"#,
        alice = hash_key(ALICE),
        bob = hash_key(BOB),
        carol = hash_key(CAROL),
    );
    let env = |name: &str| match name {
        "KEY" => Some("11".repeat(32)),
        "SECRET" => Some("client-secret-value".into()),
        _ => None,
    };
    std::fs::write(dir.path().join("proxy.toml"), &text).unwrap();
    let config = Arc::new(Config::parse(&text, &dir.path().join("proxy.toml"), &env).unwrap());
    let audit_path = dir.path().join("audit.jsonl");
    let audit = Arc::new(Audit::open(Some(&audit_path)).unwrap());
    let metrics = Arc::new(Metrics::new().unwrap());
    let authority = Authority::new(3600);
    let grants = Arc::new(
        Grants::load(
            Settings::from_config(&config),
            Arc::new(SqliteStore::in_memory(config.store_key.clone()).unwrap()),
            authority.clone(),
            Arc::new(Observer {
                audit: audit.clone(),
                metrics: metrics.clone(),
            }),
            Clock::tokio(),
        )
        .await
        .unwrap(),
    );
    grants
        .import("netops", &["111".into()], Secret::new(authority.issue()))
        .await
        .unwrap();
    grants.set_probe(authority.clone());
    let outbound = Arc::new(crate::tls::Outbound::from_config(&config.upstream).unwrap());
    let upstream = Arc::new(
        Upstream::new(
            &config.upstream.api_base,
            Duration::from_secs(5),
            Duration::from_secs(5),
            outbound.clone(),
        )
        .unwrap(),
    );
    let observer = Arc::new(Observer {
        audit: audit.clone(),
        metrics: metrics.clone(),
    });
    let path = dir.path().join("proxy.toml");
    let live = Arc::new(Live::new(
        config.clone(),
        Arc::new(move || {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                file: path.display().to_string(),
                source,
            })?;
            Config::parse(&text, &path, &env)
        }),
        grants.clone(),
        observer,
    ));
    let shaper = crate::shaping::Shaper::new(config.rate_limits);
    let state = Arc::new(State {
        live,
        resolver: Resolver::new(100, Duration::from_secs(60)),
        api: ApiClient::new(
            &config.upstream.api_base,
            grants.clone(),
            Duration::from_secs(5),
            &outbound,
        )
        .unwrap(),
        grants,
        upstream,
        orgs: Default::default(),
    });
    Rig {
        proxy: MerakiProxy {
            state,
            audit,
            metrics,
            shaper,
        },
        authority,
        audit_path,
        _dir: dir,
    }
}

/// A session that has read `raw`, and the client's end of the connection.
async fn session(raw: &str) -> (Session, DuplexStream) {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    client.write_all(raw.as_bytes()).await.unwrap();
    let mut s = Session::new_h1(Box::new(server));
    assert!(s.read_request().await.unwrap(), "the request parses");
    (s, client)
}

fn get(path: &str, key: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: proxy\r\nX-Cisco-Meraki-API-Key: {key}\r\n\r\n")
}

/// Everything the client received, once the session is gone.
async fn received(session: Session, mut client: DuplexStream) -> String {
    drop(session);
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

impl Rig {
    fn audit(&self) -> Vec<serde_json::Value> {
        self.audit_all()
            .into_iter()
            .filter(|v: &serde_json::Value| v["kind"] == "request")
            .collect()
    }

    /// Every audit record, token events included.
    fn audit_all(&self) -> Vec<serde_json::Value> {
        self.proxy.audit.flush();
        std::fs::read_to_string(&self.audit_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Runs `request_filter` and `logging` on `raw`, returning the hook's answer, the context
    /// and what the client got.
    async fn filter(&self, raw: &str) -> (bool, Ctx, String) {
        let (mut s, client) = session(raw).await;
        let mut ctx = self.proxy.new_ctx();
        let done = self.proxy.request_filter(&mut s, &mut ctx).await.unwrap();
        self.proxy.logging(&mut s, None, &mut ctx).await;
        (done, ctx, received(s, client).await)
    }
}

#[tokio::test(start_paused = true)]
async fn refusals_are_meraki_shaped_audited_and_forward_nothing() {
    let rig = rig().await;
    let cases: &[(String, u16, &str, &str)] = &[
        (
            "GET /api/v1/organizations/111/networks HTTP/1.1\r\nHost: p\r\n\r\n".into(),
            401,
            "missing_key",
            "denied",
        ),
        (get("/api/v1/organizations/111/networks", "nobody"), 401, "unknown_key", "denied"),
        (
            format!("POST /api/v1/organizations/222/networks HTTP/1.1\r\nHost: p\r\nX-Cisco-Meraki-API-Key: {BOB}\r\nContent-Length: 0\r\n\r\n"),
            403,
            "forbidden_method",
            "denied",
        ),
        (get("/api/v1/organizations/222/networks", ALICE), 403, "forbidden_organization", "denied"),
        (get("/v1/organizations", ALICE), 404, "not_found", "denied"),
        (get("/api/v1/administered/identities/me", ALICE), 403, "no_organization", "denied"),
        (get("/api/v1/organizations/111%2F..%2F222", ALICE), 400, "bad_request", "denied"),
        (get("/api/v1/organizations/444/networks", ALICE), 503, "no_grant", "error"),
        (get("/api/v1/organizations/111/notAnEndpoint", ALICE), 404, "unknown_endpoint", "denied"),
        (
            format!("TRACE /api/v1/organizations/111 HTTP/1.1\r\nHost: p\r\nX-Cisco-Meraki-API-Key: {ALICE}\r\n\r\n"),
            405,
            "method_not_allowed",
            "denied",
        ),
        (get("/api/v1/organizations/111/networks", CAROL), 403, "forbidden_operation", "denied"),
        (
            format!("PUT /api/v1/organizations/111/wireless/devices/provisioning/deployments HTTP/1.1\r\nHost: p\r\nX-Cisco-Meraki-API-Key: {CAROL}\r\nContent-Length: 0\r\n\r\n"),
            403,
            "forbidden_operation",
            "denied",
        ),
    ];
    for (raw, status, reason, decision) in cases {
        let (done, ctx, got) = rig.filter(raw).await;
        assert!(done, "{raw}: answered by the proxy");
        assert_eq!(
            ctx.refusal().map(|r| (r.status, r.reason)),
            Some((*status, *reason)),
            "{raw}"
        );
        assert!(
            got.starts_with(&format!("HTTP/1.1 {status} ")),
            "{raw}: {got}"
        );
        assert!(
            got.to_ascii_lowercase().contains("x-proxy-request-id: "),
            "{got}"
        );
        let body: serde_json::Value =
            serde_json::from_str(got.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert!(!body["errors"][0].as_str().unwrap().is_empty(), "{got}");
        assert_eq!(ctx.decision().as_str(), *decision, "{raw}");
        if *status >= 500 {
            assert!(
                got.to_ascii_lowercase()
                    .contains("x-proxy-upstream: not-sent"),
                "{got}"
            );
        }
        // Refusals never name another tenant's data.
        assert!(!got.contains(BOB) && !got.contains(ALICE), "{got}");
    }
    let audit = rig.audit();
    assert_eq!(audit.len(), cases.len(), "one audit record per request");
    for (record, (_, status, reason, decision)) in audit.iter().zip(cases) {
        assert_eq!(
            (
                record["status"].as_u64(),
                record["reason"].as_str(),
                record["decision"].as_str()
            ),
            (Some(u64::from(*status)), Some(*reason), Some(*decision))
        );
    }
    assert_eq!(
        rig.authority.calls(),
        1,
        "only the import called the token endpoint"
    );
}

/// The forwarded request carries the grant's bearer and nothing of the client's key.
#[tokio::test(start_paused = true)]
async fn an_admitted_request_is_forwarded_with_the_bearer_only() {
    let rig = rig().await;
    let raw = format!(
        "GET /api/v1/Organizations/111/networks?perPage=5 HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {ALICE}\r\nKeep-Alive: timeout=5\r\n\r\n"
    );
    let (mut s, _client) = session(&raw).await;
    let mut ctx = rig.proxy.new_ctx();
    assert!(!rig.proxy.request_filter(&mut s, &mut ctx).await.unwrap());
    let mut upstream_req = s.req_header().clone();
    rig.proxy
        .upstream_request_filter(&mut s, &mut upstream_req, &mut ctx)
        .await
        .unwrap();
    assert_eq!(
        upstream_req.uri.to_string(),
        "/api/v1/organizations/111/networks?perPage=5"
    );
    let auth: Vec<_> = upstream_req
        .headers
        .get_all("authorization")
        .iter()
        .collect();
    assert_eq!(auth.len(), 1);
    assert!(auth[0].to_str().unwrap().starts_with("Bearer access-"));
    assert!(!format!("{:?}", upstream_req.headers).contains(ALICE));
    assert!(upstream_req.headers.get("keep-alive").is_none());
    assert_eq!(upstream_req.headers["host"], "127.0.0.1:9");
    rig.proxy.logging(&mut s, None, &mut ctx).await;
    let audit = rig.audit();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["decision"], "forwarded");
    assert_eq!(audit[0]["client"], "alice");
    assert_eq!(audit[0]["organization"], "111");
    assert_eq!(audit[0]["token_fingerprint"].as_str().unwrap().len(), 8);
}

async fn admitted(rig: &Rig) -> (Session, DuplexStream, Ctx) {
    let (mut s, client) = session(&get("/api/v1/organizations/111/networks", ALICE)).await;
    let mut ctx = rig.proxy.new_ctx();
    assert!(!rig.proxy.request_filter(&mut s, &mut ctx).await.unwrap());
    (s, client, ctx)
}

fn upstream_response(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
    let mut r = ResponseHeader::build(status, None).unwrap();
    for (k, v) in headers {
        r.insert_header(k.to_string(), *v).unwrap();
    }
    r
}

#[tokio::test(start_paused = true)]
async fn a_401_refreshes_once_and_asks_pingora_to_retry() {
    let rig = rig().await;
    let (mut s, _c, mut ctx) = admitted(&rig).await;
    let before = ctx.forward.as_ref().unwrap().token.generation;
    let mut resp = upstream_response(401, &[]);
    let e = rig
        .proxy
        .upstream_response_filter(&mut s, &mut resp, &mut ctx)
        .await
        .unwrap_err();
    assert!(e.retry(), "Pingora retries the request");
    assert_eq!(ctx.forward.as_ref().unwrap().token.generation, before + 1);
    assert_eq!(rig.authority.calls(), 2, "the import and one refresh");
    // The retried attempt's 401 goes to the client: no second refresh.
    let mut resp = upstream_response(401, &[]);
    rig.proxy
        .upstream_response_filter(&mut s, &mut resp, &mut ctx)
        .await
        .unwrap();
    assert_eq!(rig.authority.calls(), 2);
}

/// Issue 19: a token refused the moment it was issued is refreshed like any other; when the
/// token minted for that 401 is refused at the same operation again, the retry's 401 passes
/// through marked and the next request's 401 there does not refresh.
#[tokio::test(start_paused = true)]
async fn a_401_at_an_operation_that_refuses_every_token_passes_through_marked() {
    let rig = rig().await;
    let (mut s, _c, mut ctx) = admitted(&rig).await;
    let mut resp = upstream_response(401, &[]);
    let e = rig
        .proxy
        .upstream_response_filter(&mut s, &mut resp, &mut ctx)
        .await
        .unwrap_err();
    assert!(
        e.retry(),
        "a token 0 s old is refreshed and the request retried"
    );
    assert_eq!(rig.authority.calls(), 2, "the import and one refresh");
    let mut resp = upstream_response(401, &[("content-type", "application/json")]);
    rig.proxy
        .upstream_response_filter(&mut s, &mut resp, &mut ctx)
        .await
        .unwrap();
    assert_eq!(resp.headers["x-proxy-upstream"], "rejected-401");
    rig.proxy.logging(&mut s, None, &mut ctx).await;
    assert_eq!(
        rig.audit().last().unwrap()["reason"],
        "refused_at_operation"
    );

    let (mut s, _c, mut ctx) = admitted(&rig).await;
    let mut resp = upstream_response(401, &[("content-type", "application/json")]);
    rig.proxy
        .upstream_response_filter(&mut s, &mut resp, &mut ctx)
        .await
        .unwrap();
    assert_eq!(resp.headers["x-proxy-upstream"], "rejected-401");
    assert_eq!(
        rig.authority.calls(),
        2,
        "no refresh: the probe says the token works"
    );
    rig.proxy.logging(&mut s, None, &mut ctx).await;
    let audit = rig.audit_all();
    let last = audit.iter().rev().find(|r| r["kind"] == "request").unwrap();
    assert_eq!(last["reason"], "refused_at_operation");
    assert_eq!(last["retried_after_401"], false);
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "operation_refused"
                && r["operation"] == "getOrganizationNetworks"),
        "{audit:#?}"
    );
    let metrics = rig.proxy.metrics.render();
    // The first request's retry was refused again; the second passed through without one.
    for (outcome, n) in [("rejected_again", 1), ("refused_at_operation", 1)] {
        let line = format!(
            r#"meraki_proxy_upstream_401_retries_total{{integration="netops",outcome="{outcome}"}} {n}"#
        );
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
    assert!(
        metrics.contains(r#"meraki_proxy_refused_operations{grant="1",integration="netops"} 1"#)
    );

    // Meraki serves the operation again: a 2xx there forgets it.
    let (mut s, _c, mut ctx) = admitted(&rig).await;
    let mut resp = upstream_response(200, &[]);
    rig.proxy
        .upstream_response_filter(&mut s, &mut resp, &mut ctx)
        .await
        .unwrap();
    let metrics = rig.proxy.metrics.render();
    assert!(
        metrics.contains(r#"meraki_proxy_refused_operations{grant="1",integration="netops"} 0"#)
    );
}

#[tokio::test(start_paused = true)]
async fn redirects_are_followed_to_allowed_hosts_only() {
    let rig = rig().await;
    let (mut s, _c, mut ctx) = admitted(&rig).await;
    let mut resp = upstream_response(
        302,
        &[(
            "location",
            "http://127.0.0.1:9/api/v1/organizations/111/networks?x=1",
        )],
    );
    let e = rig
        .proxy
        .upstream_response_filter(&mut s, &mut resp, &mut ctx)
        .await
        .unwrap_err();
    assert!(e.retry());
    assert_eq!(
        ctx.upstream.redirect.as_ref().unwrap().path_and_query,
        "/api/v1/organizations/111/networks?x=1"
    );
    let mut resp = upstream_response(307, &[("location", "https://evil.test/api/v1/x")]);
    let e = rig
        .proxy
        .upstream_response_filter(&mut s, &mut resp, &mut ctx)
        .await
        .unwrap_err();
    assert!(!e.retry());
    let r = ctx.refusal().unwrap();
    assert_eq!(
        (r.status, r.reason, r.upstream),
        (502, "redirect_not_allowed", Some("redirected"))
    );
}

#[tokio::test(start_paused = true)]
async fn responses_get_links_through_the_proxy_and_the_request_id() {
    let rig = rig().await;
    let (mut s, _c, mut ctx) = admitted(&rig).await;
    let mut resp = upstream_response(
        200,
        &[
            ("link", "<http://127.0.0.1:9/api/v1/organizations/111/networks?startingAfter=N_1>; rel=next"),
            ("x-request-id", "meraki-1"),
        ],
    );
    rig.proxy
        .upstream_response_filter(&mut s, &mut resp, &mut ctx)
        .await
        .unwrap();
    assert_eq!(
        resp.headers["link"],
        "</api/v1/organizations/111/networks?startingAfter=N_1>; rel=next"
    );
    assert_eq!(resp.headers["x-proxy-request-id"].len(), 16);
    rig.proxy.logging(&mut s, None, &mut ctx).await;
    assert_eq!(rig.audit()[0]["upstream_request_id"], "meraki-1");
}

/// Per-client operations: an operationId and a family's reads are allowed, nothing else; the
/// audit record names the operation.
#[tokio::test(start_paused = true)]
async fn a_client_runs_only_its_operations() {
    let rig = rig().await;
    let (done, ctx, _) = rig.filter(&get("/api/v1/organizations/111", CAROL)).await;
    assert!(!done, "getOrganization is carol's");
    assert_eq!(ctx.operation(), Some("getOrganization"));
    let (done, _, got) = rig
        .filter(&get("/api/v1/organizations/111/networks", CAROL))
        .await;
    assert!(
        done && got.contains("operation getOrganizationNetworks is not allowed"),
        "{got}"
    );
    let audit = rig.audit();
    assert_eq!(audit[1]["operation"], "getOrganizationNetworks");
    assert_eq!(audit[1]["reason"], "forbidden_operation");
}

/// Meraki's rate budget: the burst goes at once, the next request waits its turn (and says so
/// in its audit record), and one that would wait too long is a local 429 that says when to retry
/// and that nothing was sent.
#[tokio::test(start_paused = true)]
async fn requests_wait_their_turn_or_get_an_honest_local_429() {
    let rig = rig().await;
    let path = "/api/v1/organizations/111/networks";
    for _ in 0..9 {
        let (done, ctx, _) = rig.filter(&get(path, ALICE)).await;
        assert!(!done);
        assert_eq!(ctx.queue_wait, Some(Duration::ZERO));
    }
    let started = tokio::time::Instant::now();
    let (done, ctx, _) = rig.filter(&get(path, ALICE)).await;
    assert!(!done, "forwarded after its wait");
    assert_eq!(ctx.queue_wait, Some(Duration::from_millis(100)));
    assert_eq!(started.elapsed(), Duration::from_millis(100));

    rig.proxy.shaper.set_limits(crate::config::RateLimits {
        max_wait: Duration::from_millis(50),
        ..Default::default()
    });
    let (done, ctx, got) = rig.filter(&get(path, ALICE)).await;
    assert!(done);
    let r = ctx.refusal().unwrap();
    assert_eq!((r.status, r.reason), (429, "rate_limited"));
    let lower = got.to_ascii_lowercase();
    assert!(got.starts_with("HTTP/1.1 429 "), "{got}");
    assert!(lower.contains("retry-after: 1\r\n"), "{got}");
    assert!(lower.contains("x-proxy-upstream: not-sent"), "{got}");
    let body: serde_json::Value =
        serde_json::from_str(got.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .contains("rate limit exceeded for organization 111"),
        "{body}"
    );
    let audit = rig.audit();
    let last = audit.last().unwrap();
    assert_eq!(
        (
            last["status"].as_u64(),
            last["reason"].as_str(),
            last["decision"].as_str()
        ),
        (Some(429), Some("rate_limited"), Some("denied"))
    );
    assert_eq!(audit[9]["queue_wait_ms"].as_f64(), Some(100.0));
    let metrics = rig.proxy.metrics.render();
    assert!(
        metrics.contains(r#"meraki_proxy_rate_limited_total{client="alice",organization="111"} 1"#),
        "{metrics}"
    );
    let c = rig.proxy.shaper.clients();
    assert_eq!((c[0].requests_5m, c[0].throttled_5m), (11, 1));
}

/// A client that closes its connection while its request waits gives its place up.
#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_while_waiting_gives_its_place_up() {
    let rig = rig().await;
    let path = "/api/v1/organizations/111/networks";
    for _ in 0..9 {
        rig.filter(&get(path, ALICE)).await;
    }
    let (mut s, client) = session(&get(path, ALICE)).await;
    let mut ctx = rig.proxy.new_ctx();
    drop(client);
    let e = rig
        .proxy
        .request_filter(&mut s, &mut ctx)
        .await
        .unwrap_err();
    assert_eq!(e.esource(), &pingora::ErrorSource::Downstream);
    assert_eq!(rig.proxy.shaper.organizations()[0].queued, 0);
    assert_eq!(ctx.refusal().unwrap().reason, "client_closed");
}
