//! TLS both ways, end to end, with certificates generated in the test (rcgen) and everything on
//! loopback:
//!
//! - **outbound**: the stand-in serves HTTPS (API, token and revocation endpoints as
//!   `api.standin.test`/`as.standin.test`, a redirect shard as `n1.standin.test`, each with a
//!   certificate of its own name from a test CA that only `[upstream] ca_file` names); the real
//!   binary imports a grant, refreshes, follows the redirect, paginates and revokes over TLS; a
//!   certificate from another CA, for another name or expired is refused with the cause named in
//!   the 502, the audit record, the log and the CLI's error;
//! - **egress**: a CONNECT proxy in the test carries API and token traffic (configured, and from
//!   `HTTPS_PROXY` with credentials), and the stand-in sees no direct connection;
//! - **inbound**: the proxy listener over TLS and mutual TLS: client certificates mapped to
//!   clients, a contradicting key, an unknown certificate, no certificate, a certificate from
//!   another CA and an expired one; the listener's certificate replaced on disk and picked up on
//!   reload under load with no failed request; the official SDK over HTTPS (`certificate_path`);
//! - **split-horizon**: an unmodified `meraki-client` (PyPI) and the official SDK with its default
//!   base URL reach the proxy as `https://api.meraki.com` (and `api.meraki.ca`), the name resolved
//!   to loopback for the Python process alone, and paginate and update through it.

mod support;

use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use support::connect::ConnectProxy;
use support::harness::*;
use support::pki::{self, Ca, Validity};
use support::python::run_bounded;
use support::standin::{Https, Identity};

const API_HOST: &str = "api.standin.test";
const AS_HOST: &str = "as.standin.test";
const SHARD_HOST: &str = "n1.standin.test";
const MONITOR_KEY: &str = "monitor-proxy-key-61be02f4";
const CAROL_KEY: &str = "carol-proxy-key-0c9d2a11";
/// Hard limit on one run of the Python clients.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Outbound: the stand-in over HTTPS

/// The stand-in's CA and its HTTPS identities: one certificate for the API and authorization
/// server names, one for the shard.
fn standin_pki() -> (Ca, Https) {
    let ca = Ca::new("stand-in test CA");
    let https = Https {
        main_host: API_HOST.into(),
        main: ca.server(&[API_HOST, AS_HOST], Validity::Current),
        shard_host: SHARD_HOST.into(),
        shard: ca.server(&[SHARD_HOST], Validity::Current),
    };
    (ca, https)
}

/// `[upstream]` lines: the stand-in's CA, its shard allowed, and (without an egress proxy) its
/// names pinned to loopback: the machine's resolver knows none of them.
fn upstream_lines(pinned: bool) -> String {
    let mut s = String::from("ca_file = \"standin-ca.pem\"\nredirect_hosts = [\"standin.test\"]\n");
    if pinned {
        s.push_str(&format!(
            "resolve = {{ \"{API_HOST}\" = \"127.0.0.1\", \"{AS_HOST}\" = \"127.0.0.1\", \"{SHARD_HOST}\" = \"127.0.0.1\" }}\n"
        ));
    }
    s
}

/// A scenario whose stand-in speaks HTTPS, the authorization server under its own name.
async fn https_scenario(upstream: String) -> (Scenario, Ca) {
    let (ca, https) = standin_pki();
    let s = Scenario::new(Options {
        https: Some(https),
        upstream,
        ..Default::default()
    })
    .await;
    ca.write(s.dir.path(), "standin-ca.pem");
    for n in 0..7 {
        s.standin
            .add_network("111", &format!("N_111_{n}"), &format!("alice branch {n}"));
    }
    // The token, authorize and revoke URLs name the authorization server's host.
    let text = std::fs::read_to_string(&s.config).unwrap();
    let api_origin = s.standin.base_url();
    let as_origin = api_origin.replace(API_HOST, AS_HOST);
    let text = text.replace(
        &format!("{api_origin}/oauth/"),
        &format!("{as_origin}/oauth/"),
    );
    std::fs::write(&s.config, text).unwrap();
    (s, ca)
}

/// Replaces or adds a line of `[upstream]`.
fn set_upstream_line(s: &Scenario, line: &str) {
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace("[upstream]\n", &format!("[upstream]\n{line}\n")),
    )
    .unwrap();
}

/// Follows `rel=next` links (path-absolute, resolved against the proxy) from `first`; the ids
/// of every page.
async fn walk(s: &Scenario, first: &str, key: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut next = Some(format!("{}{first}", s.base()));
    let mut pages = 0;
    while let Some(url) = next.take() {
        pages += 1;
        assert!(pages < 20, "the walk does not end");
        let r = http()
            .get(&url)
            .header("X-Cisco-Meraki-API-Key", key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let link = r
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_owned());
        let page: Vec<Value> = r.json().await.unwrap();
        ids.extend(page.iter().map(|n| n["id"].as_str().unwrap().to_owned()));
        if let Some(link) = link {
            for part in link.split(", ") {
                if part.ends_with("rel=next") {
                    let target = &part[1..part.find('>').unwrap()];
                    assert!(target.starts_with("/api/v1/"), "{target}");
                    next = Some(format!("http://127.0.0.1:{}{target}", s.port));
                }
            }
        }
    }
    ids
}

fn request_records(s: &Scenario) -> Vec<Value> {
    s.audit()
        .into_iter()
        .filter(|r| r["kind"] == "request")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_production_path_over_tls_import_refresh_redirect_paginate_revoke() {
    let (s, _ca) = https_scenario(upstream_lines(true)).await;
    // The grant import's refresh goes to https://as.standin.test over TLS.
    s.import().await;
    assert_eq!(s.standin.token_calls(), 2);
    let p = s.start().await;

    assert_eq!(
        s.status("/organizations/111/networks", ALICE_KEY).await,
        200
    );

    // Pagination over TLS: ten networks, four pages of three.
    let ids = walk(&s, "/organizations/111/networks?perPage=3", ALICE_KEY).await;
    assert_eq!(ids.len(), 10, "{ids:?}");

    // A redirect to the shard host, followed over TLS with the shard's own name.
    s.standin.redirect_next_to_shard(1);
    assert_eq!(s.status("/organizations/111", ALICE_KEY).await, 200);
    let last = s.standin.requests().pop().unwrap();
    assert_eq!(last.listener, "shard");
    assert_eq!(
        last.header("host"),
        Some(format!("{SHARD_HOST}:{}", s.standin.shard_addr().port()).as_str())
    );

    // A refresh after Meraki refuses the token, over TLS.
    let calls = s.standin.token_calls();
    s.standin.expire_all_access_tokens();
    assert_eq!(
        s.status("/organizations/111/networks", ALICE_KEY).await,
        200
    );
    assert_eq!(s.standin.token_calls(), calls + 1);
    drop(p);

    // Revocation (RFC 7009) over TLS.
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.standin.revocations(), 1);

    // Every connection the stand-in accepted was TLS (it has no plain listener), and each
    // handshake verified against the test CA named only by ca_file.
    assert!(!s.standin.connections().is_empty());
    let logs = s.logs();
    assert!(
        !logs.contains("TLS handshake with the upstream failed"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_certificates_name_their_cause_everywhere() {
    let (s, ca) = https_scenario(upstream_lines(true)).await;
    s.import().await;
    let other = Ca::new("another CA");
    let cases: [(&str, Identity, &str, &str, &str); 3] = [
        (
            "a certificate from another CA",
            other.server(&[API_HOST, AS_HOST], Validity::Current),
            "unknown_issuer",
            "issuer unknown",
            "UnknownIssuer",
        ),
        (
            "a certificate for another name",
            ca.server(&["other.standin.test"], Validity::Current),
            "name_mismatch",
            "name mismatch",
            "not valid for name",
        ),
        (
            "an expired certificate",
            ca.server(&[API_HOST, AS_HOST], Validity::Expired),
            "expired",
            "expired",
            "expired",
        ),
    ];
    for (what, id, label, words, detail) in cases {
        s.standin.set_certificate("main", &id);
        let p = s.start().await;
        let before = s.standin.requests().len();
        let r = s
            .script(
                reqwest::Method::GET,
                "/organizations/111/networks",
                ALICE_KEY,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502, "{what}");
        assert_eq!(r.headers()["x-proxy-upstream"], "not-sent", "{what}");
        let body: Value = r.json().await.unwrap();
        let message = body["errors"][0].as_str().unwrap();
        assert!(
            message.contains(words) && message.contains(API_HOST),
            "{what}: {message}"
        );
        assert_eq!(
            s.standin.requests().len(),
            before,
            "{what}: nothing reached the API"
        );
        let reason = format!("upstream_tls_{label}");
        eventually(&format!("{what}: audit record"), || {
            request_records(&s)
                .iter()
                .any(|r| r["reason"] == reason.as_str() && r["status"] == 502)
        })
        .await;
        drop(p);
        let logs = s.logs();
        assert!(
            logs.contains("TLS handshake with the upstream failed") && logs.contains(label),
            "{what}: {logs}"
        );

        // The CLI's token call names the cause too (the issue: "error sending request" alone).
        let token = s
            .standin
            .issue_grant(CLIENT_ID, &["111"], &["dashboard:general:config:read"]);
        let file = s.dir.path().join("rt-bad");
        std::fs::write(&file, token).unwrap();
        let out = s
            .run(&[
                "grants",
                "import",
                "--integration",
                "netops",
                "--org",
                "444",
                "--refresh-token-file",
                file.to_str().unwrap(),
            ])
            .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}");
        assert!(
            stderr.contains("authorization server TLS")
                && stderr.contains(words)
                && stderr.contains(detail),
            "{what}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_proxy_carries_api_and_token_traffic_and_nothing_goes_direct() {
    let egress = ConnectProxy::start(&[API_HOST, AS_HOST, SHARD_HOST]).await;
    // No `resolve`: the names resolve nowhere on this machine, so only the egress proxy can
    // reach them.
    let (s, _ca) = https_scenario(upstream_lines(false)).await;

    // The import takes its egress proxy from HTTPS_PROXY, with credentials.
    let creds_url = format!("http://tester:s3cret-egress-pass@{}", egress.addr);
    for (org, token) in [
        ("111", &s.initial_refresh[0]),
        ("222", &s.initial_refresh[1]),
    ] {
        let file = s.dir.path().join(format!("rt-{org}"));
        std::fs::write(&file, token).unwrap();
        let mut cmd = s.command(&[
            "grants",
            "import",
            "--integration",
            "netops",
            "--org",
            org,
            "--refresh-token-file",
            file.to_str().unwrap(),
        ]);
        cmd.env("HTTPS_PROXY", &creds_url);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let through_env = egress.tunnels();
    assert_eq!(through_env.len(), 2, "{through_env:?}");
    assert!(through_env.iter().all(|t| t.target.starts_with(AS_HOST)
        && t.auth.as_deref().is_some_and(|a| a.starts_with("Basic "))));

    // The proxy takes it from proxy.toml.
    set_upstream_line(&s, &format!("egress_proxy = \"{}\"", egress.url()));
    let p = s.start().await;
    let ids = walk(&s, "/organizations/111/networks?perPage=3", ALICE_KEY).await;
    assert_eq!(ids.len(), 10);
    s.standin.redirect_next_to_shard(1);
    assert_eq!(s.status("/organizations/111", ALICE_KEY).await, 200);
    // A refresh from the running proxy, and a lookup (its own API client) through the tunnel.
    s.standin.expire_all_access_tokens();
    assert_eq!(s.status("/networks/L_111_0", ALICE_KEY).await, 200);
    let (_, metrics) = p.admin("/metrics").await;
    assert!(metrics.contains("meraki_proxy_requests_total"));
    drop(p);

    let tunnels = egress.tunnels();
    let targets: Vec<&str> = tunnels
        .iter()
        .map(|t| t.target.split(':').next().unwrap())
        .collect();
    for host in [API_HOST, AS_HOST, SHARD_HOST] {
        assert!(targets.contains(&host), "no tunnel to {host}: {targets:?}");
    }
    assert!(egress.refused().is_empty(), "{:?}", egress.refused());
    // The stand-in saw no direct connection: every peer is an outgoing socket of the egress
    // proxy.
    let outgoing: Vec<SocketAddr> = tunnels.iter().map(|t| t.outgoing).collect();
    let connections = s.standin.connections();
    assert!(connections.len() >= 4, "{connections:?}");
    for (listener, peer) in connections {
        assert!(
            outgoing.contains(&peer),
            "a direct connection to the stand-in's {listener} listener from {peer}"
        );
    }
    // The credentials never show.
    let everything = format!(
        "{}{}{metrics}",
        s.logs(),
        std::fs::read_to_string(s.dir.path().join("audit.jsonl")).unwrap()
    );
    assert!(!everything.contains("s3cret-egress-pass"));
    assert!(
        !everything.contains("dGVzdGVyOnMzY3JldC1lZ3Jlc3MtcGFzcw"),
        "base64 of the credentials"
    );
}

// ---------------------------------------------------------------------------------------------
// Inbound: the proxy listener over TLS

/// Writes the proxy's certificate (for `names`) and returns the `[server]` lines.
fn listener_tls(s: &Scenario, ca: &Ca, names: &[&str]) -> Identity {
    let id = ca.server(names, Validity::Current);
    pki::write_identity(s.dir.path(), "proxy", &id);
    id
}

const TLS_SERVER: &str = "tls_cert_file = \"proxy.pem\"\ntls_key_file = \"proxy.key\"\n";

fn https_url(s: &Scenario, path: &str) -> String {
    format!("https://localhost:{}/api/v1{path}", s.port)
}

fn pin(s: &Scenario) -> [(&'static str, SocketAddr); 1] {
    [("localhost", SocketAddr::from(([127, 0, 0, 1], s.port)))]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_maps_certificates_to_clients_and_refuses_the_rest() {
    let proxy_ca = Ca::new("proxy CA");
    let clients_ca = Ca::new("clients CA");
    let rogue_ca = Ca::new("rogue CA");
    let s = Scenario::new(Options {
        server: format!("{TLS_SERVER}tls_client_ca_file = \"clients-ca.pem\"\n"),
        ..Default::default()
    })
    .await;
    listener_tls(&s, &proxy_ca, &["localhost", "127.0.0.1"]);
    clients_ca.write(s.dir.path(), "clients-ca.pem");
    let mut text = std::fs::read_to_string(&s.config).unwrap();
    text.push_str(&format!(
        r#"
[[clients]]
name = "backup"
cert_subject = "CN=backup-script,O=netops"
integration = "netops"
organizations = ["111"]

[[clients]]
name = "monitor"
key_sha256 = "{}"
cert_san = "monitor.netops.test"
integration = "netops"
organizations = ["222"]
methods = ["GET"]
"#,
        sha256_hex(MONITOR_KEY)
    ));
    std::fs::write(&s.config, text).unwrap();
    s.import().await;
    let p = s.start().await;

    let backup = clients_ca.client("backup-script", Some("netops"), &[], Validity::Current);
    let monitor = clients_ca.client(
        "monitor",
        Some("netops"),
        &["monitor.netops.test"],
        Validity::Current,
    );
    let stranger = clients_ca.client(
        "stranger",
        Some("netops"),
        &["stranger.netops.test"],
        Validity::Current,
    );
    let rogue = rogue_ca.client("backup-script", Some("netops"), &[], Validity::Current);
    let expired = clients_ca.client("backup-script", Some("netops"), &[], Validity::Expired);

    let get = |cert: Option<&Identity>, key: Option<&str>, path: &str| {
        let c = pki::https_client(&proxy_ca, cert, &pin(&s), true);
        let mut r = c.get(https_url(&s, path));
        if let Some(k) = key {
            r = r.header("X-Cisco-Meraki-API-Key", k);
        }
        r.send()
    };
    /// One request: what the client presents, what it gets, what the audit record says.
    struct Case<'a> {
        what: &'a str,
        cert: Option<&'a Identity>,
        key: Option<&'a str>,
        path: &'a str,
        status: u16,
        reason: Option<&'a str>,
        identity: Option<&'a str>,
    }
    let case = |what, cert, key, path, status, reason, identity| Case {
        what,
        cert,
        key,
        path,
        status,
        reason,
        identity,
    };
    const NETS_111: &str = "/organizations/111/networks";
    let cases = [
        case(
            "certificate alone",
            Some(&backup),
            None,
            NETS_111,
            200,
            None,
            Some("certificate"),
        ),
        case(
            "certificate and its client's key",
            Some(&monitor),
            Some(MONITOR_KEY),
            "/organizations/222/networks",
            200,
            None,
            Some("certificate+key"),
        ),
        case(
            "another client's key",
            Some(&backup),
            Some(BOB_KEY),
            NETS_111,
            400,
            Some("certificate_key_mismatch"),
            None,
        ),
        case(
            "a certificate of no client",
            Some(&stranger),
            None,
            NETS_111,
            401,
            Some("unknown_certificate"),
            None,
        ),
        case(
            "a certificate of no client, with a key",
            Some(&stranger),
            Some(ALICE_KEY),
            NETS_111,
            401,
            Some("unknown_certificate"),
            None,
        ),
        case(
            "no certificate",
            None,
            Some(ALICE_KEY),
            NETS_111,
            401,
            Some("client_certificate_required"),
            None,
        ),
        case(
            "the certificate's client, another organization",
            Some(&backup),
            None,
            "/organizations/222/networks",
            403,
            Some("forbidden_organization"),
            Some("certificate"),
        ),
    ];
    for c in &cases {
        let r = get(c.cert, c.key, c.path)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.what));
        assert_eq!(r.status().as_u16(), c.status, "{}", c.what);
        if c.status != 200 {
            let body: Value = r.json().await.unwrap();
            assert!(body["errors"][0].is_string(), "{}: {body}", c.what);
        }
    }
    // Refused in the handshake: a certificate of another CA, an expired one.
    for (what, cert) in [("another CA", &rogue), ("expired", &expired)] {
        assert!(get(Some(cert), None, NETS_111).await.is_err(), "{what}");
    }
    eventually("every request audited", || {
        request_records(&s).len() >= cases.len()
    })
    .await;
    let records = request_records(&s);
    for c in &cases {
        let r = records
            .iter()
            .find(|r| {
                r["status"] == c.status
                    && r["reason"].as_str() == c.reason
                    && r["path"]
                        .as_str()
                        .is_some_and(|p| p == c.path || p == format!("/api/v1{}", c.path))
            })
            .unwrap_or_else(|| panic!("{}: no audit record in {records:#?}", c.what));
        if let Some(id) = c.identity {
            assert_eq!(r["identity"], id, "{}", c.what);
        }
    }
    let by_cert = records
        .iter()
        .find(|r| r["identity"] == "certificate" && r["status"] == 200)
        .unwrap();
    assert_eq!(by_cert["client"], "backup");
    assert!(
        by_cert["client_certificate"]
            .as_str()
            .unwrap()
            .contains("CN=backup-script"),
        "{by_cert}"
    );
    eventually("handshake refusals audited", || {
        let tls: Vec<Value> = s
            .audit()
            .into_iter()
            .filter(|r| r["kind"] == "tls")
            .collect();
        tls.iter().any(|r| r["cause"] == "unknown_issuer")
            && tls.iter().any(|r| {
                r["cause"] == "expired"
                    && r["subject"]
                        .as_str()
                        .is_some_and(|s| s.contains("backup-script"))
            })
    })
    .await;
    drop(p);
    let logs = s.logs();
    assert!(
        logs.contains("client certificate refused in the TLS handshake"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_certificate_is_replaced_on_reload_without_a_failed_request() {
    let ca = Ca::new("proxy CA");
    let s = Scenario::new(Options {
        server: TLS_SERVER.into(),
        ..Default::default()
    })
    .await;
    let first = listener_tls(&s, &ca, &["localhost", "127.0.0.1"]);
    s.import().await;
    let p = s.start().await;
    let addr = SocketAddr::from(([127, 0, 0, 1], s.port));
    assert_eq!(
        pki::presented_fingerprint(addr, "localhost", &ca).await,
        pki::fingerprint(&first)
    );

    // Requests on new connections (one handshake each) all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, client) = (stop.clone(), pki::https_client(&ca, None, &pin(&s), true));
        let url = https_url(&s, "/organizations/111/networks");
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            loop {
                let stopped = stop.load(std::sync::atomic::Ordering::SeqCst);
                if (stopped && ok >= 20) || failed.len() > 20 || ok > 5_000 {
                    break;
                }
                match client
                    .get(&url)
                    .header("X-Cisco-Meraki-API-Key", ALICE_KEY)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(format!("status {}", r.status())),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };
    let standin = &s.standin;
    let served = |more: usize| {
        let at = standin.request_count() + more;
        move || standin.request_count() >= at
    };
    eventually("requests served with the first certificate", served(10)).await;
    let second = listener_tls(&s, &ca, &["localhost", "127.0.0.1"]);
    p.signal(nix::sys::signal::Signal::SIGHUP);
    let want = pki::fingerprint(&second);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pki::presented_fingerprint(addr, "localhost", &ca).await != want {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("requests served with the second certificate", served(10)).await;

    // A broken pair (a key of another certificate) is refused; the running certificate stays.
    let third = ca.server(&["localhost"], Validity::Current);
    std::fs::write(s.dir.path().join("proxy.key"), &third.key_pem).unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/admin/reload", s.admin_port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("server.tls_key_file") || body.contains("does not belong"),
        "{body}"
    );
    assert!(!body.contains("PRIVATE KEY"), "{body}");
    assert_eq!(
        pki::presented_fingerprint(addr, "localhost", &ca).await,
        want
    );
    let (_, metrics) = p.admin("/metrics").await;
    for key in [&first, &second, &third] {
        assert!(!metrics.contains(key.key_pem.lines().nth(1).unwrap()));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed of {}: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
    assert!(ok >= 20, "{ok}");
    eventually("both reloads audited", || {
        s.audit()
            .iter()
            .filter(|r| {
                r["kind"] == "server"
                    && r["event"]
                        .as_str()
                        .is_some_and(|e| e.starts_with("config_reload"))
            })
            .count()
            == 2
    })
    .await;
    drop(p);

    // No private key anywhere the proxy writes.
    let key_line = second.key_pem.lines().nth(1).unwrap().to_owned();
    let everything = format!(
        "{}{}",
        s.logs(),
        std::fs::read_to_string(s.dir.path().join("audit.jsonl")).unwrap()
    );
    assert!(!everything.contains(&key_line) && !everything.contains("PRIVATE KEY"));
    // `check` names the mismatched key file, and with the right key summarizes the listener;
    // neither prints key material.
    let check = s.run(&["check"]).await;
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        !check.status.success() && out.contains("server.tls_key_file"),
        "{out}"
    );
    assert!(
        !out.contains("PRIVATE KEY") && !out.contains(third.key_pem.lines().nth(1).unwrap()),
        "{out}"
    );
    std::fs::write(s.dir.path().join("proxy.key"), &second.key_pem).unwrap();
    let check = s.run(&["check"]).await;
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{out}");
    assert!(
        out.contains("proxy listener: https://") && out.contains(&want[..16]),
        "{out}"
    );
    assert!(
        !out.contains("PRIVATE KEY") && !out.contains(&key_line),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// Python clients

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let py = std::env::var_os("MERAKI_SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(
        py.exists(),
        "no Python interpreter at {}: run `bash scripts/python-env.sh` (or set MERAKI_SDK_PYTHON)",
        py.display()
    );
    py
}

/// Runs `tls_clients.py <scenario>` with `env`; its JSON output.
async fn run_client(s: &Scenario, scenario: &str, env: Vec<(&str, String)>) -> Value {
    let py = python();
    let stdout = s.dir.path().join(format!(
        "{scenario}-{}.out",
        Instant::now().elapsed().as_nanos()
    ));
    let stderr = stdout.with_extension("err");
    let mut cmd = Command::new(py);
    cmd.arg(repo().join("tests/sdk/tls_clients.py"))
        .arg(scenario)
        .current_dir(s.dir.path())
        .env("HOME", s.dir.path())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("MERAKI_DASHBOARD_API_KEY")
        .env_remove("MERAKI_PYTHON_SDK_CALLER")
        .env_remove("SSL_CERT_FILE")
        .env_remove("REQUESTS_CA_BUNDLE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let ran = run_bounded(cmd, scenario, stdout, stderr, SCRIPT_TIMEOUT).await;
    let (out, err) = (ran.stdout, ran.stderr);
    let v: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("{scenario}: not JSON ({e}): {out}\n--- stderr ---\n{err}"));
    assert!(
        ran.status.success() && v.get("error").is_none(),
        "{scenario} failed: {v:#}\n--- stderr ---\n{err}"
    );
    v
}

/// The ten networks of org 111, sorted.
fn org_111_networks() -> Vec<String> {
    let mut ids: Vec<String> = (0..3).map(|i| format!("L_111_{i}")).collect();
    ids.extend((0..7).map(|i| format!("N_111_{i}")));
    ids.sort();
    ids
}

/// Checks a client run: every page, the update applied at the stand-in, every exchange with
/// the proxy at `origin`, and (split-horizon) every link absolute under it.
fn check_run(s: &Scenario, out: &Value, origin: &str, new_name: &str, absolute_links: bool) {
    let mut ids: Vec<String> = out["networks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, org_111_networks(), "{out:#}");
    assert_eq!(out["updated"]["name"], new_name);
    assert_eq!(s.standin.network("L_111_0").unwrap()["name"], new_name);
    let seen = out["seen"].as_array().unwrap();
    let pages = seen
        .iter()
        .filter(|e| {
            e["url"]
                .as_str()
                .unwrap()
                .contains("/organizations/111/networks?")
        })
        .count();
    assert!(pages >= 4, "{seen:#?}");
    for e in seen {
        let url = e["url"].as_str().unwrap();
        assert!(url.starts_with(origin), "an exchange off the proxy: {url}");
        if absolute_links {
            // Absolute links are followed as they are, never prefixed with the base URL.
            assert!(!url.contains("/api/v1/api/v1"), "{url}");
        }
        if let (true, Some(link)) = (absolute_links, e["link"].as_str()) {
            for part in link.split(", ") {
                assert!(part.starts_with(&format!("<{origin}/api/v1/")), "{link}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_over_https_with_certificate_path() {
    let ca = Ca::new("proxy CA");
    let s = Scenario::new(Options {
        server: TLS_SERVER.into(),
        ..Default::default()
    })
    .await;
    for n in 0..7 {
        s.standin
            .add_network("111", &format!("N_111_{n}"), &format!("alice branch {n}"));
    }
    listener_tls(&s, &ca, &["localhost", "127.0.0.1"]);
    let bundle = ca.write(s.dir.path(), "proxy-ca.pem");
    s.import().await;
    let p = s.start().await;
    let origin = format!("https://localhost:{}", s.port);
    let out = run_client(
        &s,
        "sdk",
        vec![
            ("PROXY_BASE", format!("{origin}/api/v1")),
            ("PROXY_KEY", ALICE_KEY.into()),
            ("CA_BUNDLE", bundle.display().to_string()),
            ("NEW_NAME", "renamed over https".into()),
        ],
    )
    .await;
    check_run(&s, &out, &origin, "renamed over https", false);
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_horizon_meraki_client_and_the_sdk_default_base_url_go_through_the_proxy() {
    let ca = Ca::new("private CA for split-horizon");
    let s = Scenario::new(Options {
        server: format!(
            "{TLS_SERVER}public_base_url = [\"https://api.meraki.com/api/v1\", \"https://api.meraki.ca/api/v1\"]\n"
        ),
        ..Default::default()
    })
    .await;
    for n in 0..7 {
        s.standin
            .add_network("111", &format!("N_111_{n}"), &format!("alice branch {n}"));
    }
    listener_tls(&s, &ca, &["api.meraki.com", "api.meraki.ca"]);
    let bundle = ca.write(s.dir.path(), "private-ca.pem");
    // A third organization with more networks than one page of 1,000 holds, for the SDK's
    // smart-flow page walk; carol may write there.
    s.standin.add_org("333", "Carol Org");
    for i in 0..1005 {
        s.standin
            .add_network("333", &format!("N_333_{i:04}"), &format!("carol site {i}"));
    }
    let carol = s.standin.issue_grant(
        CLIENT_ID,
        &["333"],
        // The SDK script lists networks (read) and renames one (write); a grant without
        // read would be refused locally (missing_scope).
        &[
            "dashboard:general:config:read",
            "dashboard:general:config:write",
        ],
    );
    let mut text = std::fs::read_to_string(&s.config).unwrap();
    text.push_str(&format!(
        "\n[[clients]]\nname = \"carol\"\nkey_sha256 = \"{}\"\nintegration = \"netops\"\norganizations = [\"333\"]\n",
        sha256_hex(CAROL_KEY)
    ));
    std::fs::write(&s.config, text).unwrap();
    s.import().await;
    s.import_grant(&carol, &["333"]).await;
    let p = s.start().await;
    let split = format!("api.meraki.com,api.meraki.ca=127.0.0.1:{}", s.port);
    let py = python();
    let has_client = Command::new(&py)
        .args(["-c", "import meraki_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_client,
        "{} cannot import meraki_client (it needs Python >= 3.11): run `PYTHON=python3.11 bash scripts/python-env.sh`",
        py.display()
    );
    let common = |name: &str| {
        vec![
            ("PROXY_KEY", ALICE_KEY.to_owned()),
            ("CA_BUNDLE", bundle.display().to_string()),
            ("SPLIT_HORIZON", split.clone()),
            ("NEW_NAME", name.to_owned()),
        ]
    };

    // The official SDK, base URL left at its default.
    let out = run_client(&s, "sdk", common("renamed by the sdk")).await;
    check_run(
        &s,
        &out,
        "https://api.meraki.com",
        "renamed by the sdk",
        true,
    );

    // meraki-client, which accepts nothing but Meraki's hosts.
    let out = run_client(&s, "meraki_client", common("renamed by meraki-client")).await;
    check_run(
        &s,
        &out,
        "https://api.meraki.com",
        "renamed by meraki-client",
        true,
    );

    // The same through the Canadian cloud's name: links stay on the host the client used.
    let mut env = common("renamed via api.meraki.ca");
    env.push(("MERAKI_REGION", "CANADA".into()));
    let out = run_client(&s, "meraki_client", env).await;
    check_run(
        &s,
        &out,
        "https://api.meraki.ca",
        "renamed via api.meraki.ca",
        true,
    );

    // The SDK's smart flow meets an unknown network: it resolves its organization and walks
    // that organization's networks, requesting each `Link` target as it is; a path-absolute
    // link could not be requested at all.
    let env = vec![
        ("PROXY_KEY", CAROL_KEY.to_owned()),
        ("CA_BUNDLE", bundle.display().to_string()),
        ("SPLIT_HORIZON", split.clone()),
        ("NETWORK_ID", "N_333_0004".to_owned()),
        ("NEW_NAME", "renamed after a page walk".to_owned()),
    ];
    let out = run_client(&s, "sdk_update", env).await;
    assert_eq!(out["updated"]["name"], "renamed after a page walk");
    let seen = out["seen"].as_array().unwrap();
    let walked = seen.iter().any(|e| {
        e["url"].as_str().unwrap().starts_with(
            "https://api.meraki.com/api/v1/organizations/333/networks?perPage=1000&startingAfter=",
        ) && e["status"] == 200
    });
    assert!(walked, "no second page walked: {seen:#?}");
    assert!(seen.iter().all(|e| e["url"]
        .as_str()
        .unwrap()
        .starts_with("https://api.meraki.com/")));
    drop(p);

    // Every request the clients made was audited under their client, identified by key.
    let records = request_records(&s);
    assert!(
        records
            .iter()
            .all(|r| (r["client"] == "alice" || r["client"] == "carol") && r["identity"] == "key"),
        "{records:#?}"
    );
}
