//! Least privilege that Meraki cannot give an OAuth integration (issue 24), against the real
//! binary: a client used only from its `source_addresses` (raw sockets bound to 127.0.0.2,
//! 127.0.0.3 and ::1; `X-Forwarded-For` believed only from `trusted_proxies`; PROXY protocol v1
//! and v2 on the plain and the TLS listener), and operations refused locally when the grant
//! lacks the OAuth scope Meraki's API index says they need (every product family, table-driven
//! from `src/endpoints/meraki-api-v1.tsv`), with what `check` and the status page say.

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use support::harness::{
    http, sha256_hex, Options, ProxyProcess, Scenario, ALICE_KEY, CLIENT_ID, UNSHAPED,
};
use support::raw::{errors_body, header, read_until, status_of};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

const CAROL_KEY: &str = "carol-proxy-key-3c9d1e0f";

/// A `[[clients]]` block for carol (org 111, every method) with these source addresses.
fn carol(addresses: &str) -> String {
    format!(
        "[[clients]]\nname = \"carol\"\nkey_sha256 = \"{}\"\nintegration = \"netops\"\norganizations = [\"111\"]\nsource_addresses = {addresses}\n",
        sha256_hex(CAROL_KEY)
    )
}

/// A connection to `port` on `to`, from the loopback address `from`.
async fn connect_from(from: &str, to: IpAddr, port: u16) -> TcpStream {
    let from: IpAddr = from.parse().unwrap();
    let sock = match from {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    sock.connect(SocketAddr::new(to, port)).await.unwrap()
}

/// `prefix` then a GET of `path` as `key` (`Connection: close`, `extra` header lines), from
/// `from`; what comes back.
async fn send(from: &str, port: u16, prefix: &[u8], path: &str, key: &str, extra: &str) -> String {
    let to: IpAddr = if from.contains(':') {
        "::1".parse().unwrap()
    } else {
        "127.0.0.1".parse().unwrap()
    };
    let mut c = connect_from(from, to, port).await;
    let mut bytes = prefix.to_vec();
    bytes.extend_from_slice(
        format!("GET /api/v1{path} HTTP/1.1\r\nHost: proxy\r\nX-Cisco-Meraki-API-Key: {key}\r\nConnection: close\r\n{extra}\r\n")
            .as_bytes(),
    );
    let _ = c.write_all(&bytes).await;
    read_until(&mut c, Duration::from_secs(5), Duration::from_secs(20)).await
}

/// Waits (bounded) for `what` to hold.
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The audit record of the response `resp` (by its `X-Proxy-Request-Id`).
async fn record_of(s: &Scenario, resp: &str) -> Value {
    let id = header(resp, "x-proxy-request-id")
        .unwrap_or_else(|| panic!("no request id in {resp}"))
        .to_owned();
    eventually("the audit record", || {
        s.audit()
            .into_iter()
            .find(|r| r["request_id"] == id.as_str())
    })
    .await
}

async fn metrics(p: &ProxyProcess) -> String {
    http()
        .get(format!("http://127.0.0.1:{}/metrics", p.admin_port))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn reload(s: &Scenario, p: &ProxyProcess) {
    let r = http()
        .post(format!("http://127.0.0.1:{}/admin/reload", p.admin_port))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "reload: {body}");
    let _ = s;
}

/// The refusal carol gets from an address outside her `source_addresses`.
fn source_refusal(address: &str) -> Value {
    serde_json::json!({"errors": [format!("client carol may not be used from {address}")]})
}

/// A client is served from its addresses only: raw sockets from 127.0.0.2 (allowed), 127.0.0.3
/// and 127.0.0.1 (refused, audited with the address, counted, nothing forwarded); a client
/// without the key is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_is_served_only_from_its_source_addresses() {
    let s = Scenario::new(Options {
        clients: carol("[\"127.0.0.2/32\", \"2001:db8::/48\"]"),
        ..Options::default()
    })
    .await;
    s.import().await;
    let p = s.start().await;
    let path = "/organizations/111/networks";

    let ok = send("127.0.0.2", p.port, b"", path, CAROL_KEY, "").await;
    assert_eq!(status_of(&ok), 200, "{ok}");
    let rec = record_of(&s, &ok).await;
    assert_eq!(rec["client_address"], "127.0.0.2");
    assert!(rec["source"].as_str().unwrap().starts_with("127.0.0.2:"));

    s.standin.clear_requests();
    for from in ["127.0.0.3", "127.0.0.1"] {
        let no = send(from, p.port, b"", path, CAROL_KEY, "").await;
        assert_eq!(status_of(&no), 403, "{no}");
        assert_eq!(errors_body(&no), source_refusal(from));
        let rec = record_of(&s, &no).await;
        assert_eq!(rec["decision"], "denied");
        assert_eq!(rec["reason"], "source_address");
        assert_eq!(rec["client"], "carol");
        assert_eq!(rec["client_address"], from);
    }
    assert_eq!(s.standin.request_count(), 0, "nothing forwarded");
    // alice has no source_addresses: anywhere.
    let alice = send("127.0.0.3", p.port, b"", path, ALICE_KEY, "").await;
    assert_eq!(status_of(&alice), 200, "{alice}");
    assert_eq!(record_of(&s, &alice).await["client_address"], "127.0.0.3");
    let m = metrics(&p).await;
    assert!(
        m.contains("meraki_proxy_denials_total{client=\"carol\",reason=\"source_address\"} 2"),
        "{m}"
    );
}

/// ::1 as the source: the proxy listener on [::1] (a socket of the test's own, passed like the
/// harness's), a client allowed from ::1/128 and another from 127.0.0.0/8 only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_source_address_is_checked() {
    let mut s = Scenario::new(Options {
        clients: carol("[\"127.0.0.0/8\"]"),
        ..Options::default()
    })
    .await;
    let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (port, admin_port) = (
        v6.local_addr().unwrap().port(),
        admin.local_addr().unwrap().port(),
    );
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace(
            &format!("listen = \"127.0.0.1:{}\"", s.port),
            &format!("listen = \"[::1]:{port}\""),
        )
        .replace(
            &format!("admin_listen = \"127.0.0.1:{}\"", s.admin_port),
            &format!("admin_listen = \"127.0.0.1:{admin_port}\""),
        )
        + &format!(
            "[[clients]]\nname = \"dave\"\nkey_sha256 = \"{}\"\nintegration = \"netops\"\norganizations = [\"111\"]\nsource_addresses = [\"::1\"]\n",
            sha256_hex("dave-proxy-key-77aa01")
        );
    std::fs::write(&s.config, text).unwrap();
    s.sockets = Some(std::sync::Arc::new(support::harness::Sockets {
        proxy: v6,
        admin,
    }));
    s.port = port;
    s.admin_port = admin_port;
    s.import().await;
    let log = s.dir.path().join("proxy-v6.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = s
        .serving_command()
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let _p = ProxyProcess {
        child,
        port,
        admin_port,
        log: log.clone(),
        tls: false,
        _sockets: s.sockets.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while http()
        .get(format!("http://127.0.0.1:{admin_port}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let path = "/organizations/111/networks";
    let dave = send("::1", port, b"", path, "dave-proxy-key-77aa01", "").await;
    assert_eq!(status_of(&dave), 200, "{dave}");
    assert_eq!(record_of(&s, &dave).await["client_address"], "::1");
    let no = send("::1", port, b"", path, CAROL_KEY, "").await;
    assert_eq!(status_of(&no), 403, "{no}");
    assert_eq!(errors_body(&no), source_refusal("::1"));
}

/// `X-Forwarded-For` is believed only from `trusted_proxies`, read from the right: a client
/// cannot claim an address by writing the header itself, directly or through a trusted proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    // Set here: the proxy at 127.0.0.2 is a trusted reverse proxy.
    let s = Scenario::new(Options {
        server: "trusted_proxies = [\"127.0.0.2/32\"]".into(),
        clients: carol("[\"198.51.100.0/24\", \"2001:db8::/48\"]"),
        ..Options::default()
    })
    .await;
    s.import().await;
    let p = s.start().await;
    let path = "/organizations/111/networks";
    // (from, X-Forwarded-For, status, client address)
    let cases: &[(&str, Option<&str>, u16, &str)] = &[
        ("127.0.0.2", Some("198.51.100.7"), 200, "198.51.100.7"),
        ("127.0.0.2", Some("2001:db8::7"), 200, "2001:db8::7"),
        // Spoofing: an untrusted peer's header is ignored.
        ("127.0.0.3", Some("198.51.100.7"), 403, "127.0.0.3"),
        // Spoofing through the trusted proxy: it appended the real address on the right.
        (
            "127.0.0.2",
            Some("198.51.100.7, 203.0.113.5"),
            403,
            "203.0.113.5",
        ),
        (
            "127.0.0.2",
            Some("203.0.113.5, 198.51.100.7"),
            200,
            "198.51.100.7",
        ),
        // Not an address: the nearest trusted hop.
        ("127.0.0.2", Some("garbage"), 403, "127.0.0.2"),
        ("127.0.0.2", None, 403, "127.0.0.2"),
    ];
    for &(from, xff, status, address) in cases {
        let extra = xff.map_or(String::new(), |v| format!("X-Forwarded-For: {v}\r\n"));
        let resp = send(from, p.port, b"", path, CAROL_KEY, &extra).await;
        assert_eq!(status_of(&resp), status, "{from} {xff:?}: {resp}");
        if status == 403 {
            assert_eq!(
                errors_body(&resp),
                source_refusal(address),
                "{from} {xff:?}"
            );
        }
        let rec = record_of(&s, &resp).await;
        assert_eq!(rec["client_address"], address, "{from} {xff:?}");
        assert!(rec["source"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{from}:")));
    }
}

fn v2(source: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (source, dest),
    )
    .build()
    .unwrap()
}

/// PROXY protocol on the plain listener, switched on by a reload: v1 and v2 headers from the
/// trusted load balancer name the client; a malformed, missing or untrusted header closes the
/// connection without an answer and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_headers_name_the_client_on_the_plain_listener() {
    let s = Scenario::new(Options {
        server: "trusted_proxies = [\"127.0.0.2/32\"]".into(),
        clients: carol("[\"198.51.100.0/24\", \"2001:db8::/48\"]"),
        ..Options::default()
    })
    .await;
    s.import().await;
    let p = s.start().await;
    // Set here, by a reload (the harness's readiness check speaks plain HTTP).
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        "trusted_proxies = [\"127.0.0.2/32\"]",
        "trusted_proxies = [\"127.0.0.2/32\"]\nproxy_protocol = true",
    );
    std::fs::write(&s.config, text).unwrap();
    reload(&s, &p).await;
    let path = "/organizations/111/networks";
    let dest: SocketAddr = format!("127.0.0.1:{}", p.port).parse().unwrap();
    let v1 = |src: &str| format!("PROXY TCP4 {src} 127.0.0.1 40001 {}\r\n", p.port).into_bytes();
    // (name, from, header, status, source, client address)
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("v1", "127.0.0.2", v1("198.51.100.7"), 200, "198.51.100.7"),
        (
            "v1 other",
            "127.0.0.2",
            v1("203.0.113.9"),
            403,
            "203.0.113.9",
        ),
        (
            "v1 tcp6",
            "127.0.0.2",
            format!("PROXY TCP6 2001:db8::5 ::1 40001 {}\r\n", p.port).into_bytes(),
            200,
            "2001:db8::5",
        ),
        (
            "v1 unknown",
            "127.0.0.2",
            b"PROXY UNKNOWN\r\n".to_vec(),
            403,
            "127.0.0.2",
        ),
        (
            "v2",
            "127.0.0.2",
            v2("198.51.100.8:5000".parse().unwrap(), dest),
            200,
            "198.51.100.8",
        ),
        (
            "v2 ipv6",
            "127.0.0.2",
            v2(
                "[2001:db8::9]:5000".parse().unwrap(),
                "[::1]:8080".parse().unwrap(),
            ),
            200,
            "2001:db8::9",
        ),
        (
            "v2 other",
            "127.0.0.2",
            v2("203.0.113.10:5000".parse().unwrap(), dest),
            403,
            "203.0.113.10",
        ),
    ];
    for (name, from, prefix, status, address) in &cases {
        let resp = send(from, p.port, prefix, path, CAROL_KEY, "").await;
        assert_eq!(status_of(&resp), *status, "{name}: {resp}");
        if *status == 403 {
            assert_eq!(errors_body(&resp), source_refusal(address), "{name}");
        }
        let rec = record_of(&s, &resp).await;
        assert_eq!(rec["client_address"], *address, "{name}");
        if *name != "v1 unknown" {
            assert!(
                rec["source"].as_str().unwrap().contains(address),
                "{name}: the header's source is the connection's peer: {rec}"
            );
        }
    }
    // Refused headers: the connection closes with no answer.
    let records = s.audit().len();
    let refused: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "malformed",
            "127.0.0.2",
            b"PROXY TCP4 nonsense here\r\n".to_vec(),
        ),
        ("missing", "127.0.0.2", Vec::new()),
        ("untrusted", "127.0.0.3", v1("198.51.100.7")),
        (
            "untrusted v2",
            "127.0.0.1",
            v2("198.51.100.8:5000".parse().unwrap(), dest),
        ),
    ];
    for (name, from, prefix) in &refused {
        let resp = send(from, p.port, prefix, path, CAROL_KEY, "").await;
        assert_eq!(resp, "", "{name}: closed without an answer");
    }
    let m = metrics(&p).await;
    assert!(
        m.contains("meraki_proxy_connections_refused_total{limit=\"proxy_protocol\"} 4"),
        "{m}"
    );
    assert_eq!(s.audit().len(), records, "no request was read");
    let logs = s.logs();
    assert!(logs.contains("PROXY protocol header refused"), "{logs}");
    assert!(
        !logs.contains(CAROL_KEY),
        "the request after a refused header is never logged"
    );
}

/// PROXY protocol on the TLS listener: the header comes before the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_headers_come_before_the_tls_handshake() {
    use support::pki::{write_identity, Ca, Validity};
    let s = Scenario::new(Options {
        server: "tls_cert_file = \"proxy.pem\"\ntls_key_file = \"proxy.key\"\ntrusted_proxies = [\"127.0.0.2/32\"]\nproxy_protocol = true".into(),
        clients: carol("[\"198.51.100.0/24\"]"),
        ..Options::default()
    })
    .await;
    let ca = Ca::new("access test CA");
    write_identity(
        s.dir.path(),
        "proxy",
        &ca.server(&["proxy.test"], Validity::Current),
    );
    s.import().await;
    let p = s.start().await;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        support::pki::client_config(&ca, None),
    ));
    let over_tls = |src: &'static str| {
        let connector = connector.clone();
        let port = p.port;
        async move {
            let mut tcp = connect_from("127.0.0.2", "127.0.0.1".parse().unwrap(), port).await;
            tcp.write_all(format!("PROXY TCP4 {src} 127.0.0.1 40001 {port}\r\n").as_bytes())
                .await
                .unwrap();
            let name = rustls::pki_types::ServerName::try_from("proxy.test").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            tls.write_all(
                format!("GET /api/v1/organizations/111/networks HTTP/1.1\r\nHost: proxy.test\r\nX-Cisco-Meraki-API-Key: {CAROL_KEY}\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(
                Duration::from_secs(20),
                tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut out),
            )
            .await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let ok = over_tls("198.51.100.7").await;
    assert_eq!(status_of(&ok), 200, "{ok}");
    assert_eq!(record_of(&s, &ok).await["client_address"], "198.51.100.7");
    let no = over_tls("203.0.113.9").await;
    assert_eq!(status_of(&no), 403, "{no}");
    assert_eq!(errors_body(&no), source_refusal("203.0.113.9"));
    // No header before the handshake: the connection is closed.
    let tcp = connect_from("127.0.0.2", "127.0.0.1".parse().unwrap(), p.port).await;
    let name = rustls::pki_types::ServerName::try_from("proxy.test").unwrap();
    let handshake =
        tokio::time::timeout(Duration::from_secs(30), connector.connect(name, tcp)).await;
    assert!(
        matches!(handshake, Ok(Err(_))),
        "a handshake without a PROXY header fails"
    );
}

/// One row of the API table.
struct Row {
    method: String,
    path: String,
    operation: String,
    family: String,
    scope: String,
}

fn table() -> Vec<Row> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/endpoints/meraki-api-v1.tsv"),
    )
    .unwrap();
    text.lines()
        .skip(2)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Row {
                method: f[0].into(),
                path: f[1].into(),
                operation: f[2].into(),
                family: f[3].split(',').next().unwrap().into(),
                scope: f[4].into(),
            }
        })
        .collect()
}

/// The path of `template` with the scenario's ids: organization 111, its network and device.
fn concrete(template: &str) -> Option<String> {
    let mut out = String::new();
    let mut first = true;
    for seg in template.split('/').skip(1) {
        out.push('/');
        if seg.starts_with('{') {
            let v = match (first, seg) {
                (false, "{organizationId}") => "111",
                (false, "{networkId}") => "L_111_0",
                (false, "{serial}") => "Q111-AAAA-0001",
                (false, _) => "x1",
                _ => return None,
            };
            out.push_str(v);
        } else {
            out.push_str(seg);
        }
        first = false;
    }
    let root = template.split('/').nth(1)?;
    let id = template.split('/').nth(2)?;
    let ok = matches!(
        (root, id),
        ("organizations", "{organizationId}")
            | ("networks", "{networkId}")
            | ("devices", "{serial}")
    );
    ok.then_some(out)
}

/// Every product family: an operation needing a scope the grant lacks is refused by the proxy
/// with Meraki's words, nothing forwarded, no token call; one needing a scope it holds is not.
/// The grant holds what the harness gives it: dashboard:general:config:read and write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_needing_a_scope_the_grant_lacks_are_refused_in_every_family() {
    let s = Scenario::new(Options::default()).await;
    s.import().await;
    let p = s.start().await;
    let held = [
        "dashboard:general:config:read",
        "dashboard:general:config:write",
    ];
    let rows = table();
    let mut by_family: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
    for r in &rows {
        by_family.entry(r.family.clone()).or_default().push(r);
    }
    // Families whose every operation lists no scope or names no organization.
    let mut untested = Vec::new();
    let mut tested = 0;
    let calls = s.standin.token_calls();
    for (family, ops) in &by_family {
        let refused = ops.iter().find_map(|r| {
            let path = concrete(&r.path)?;
            (!r.scope.is_empty() && !held.contains(&r.scope.as_str())).then_some((r, path))
        });
        let Some((r, path)) = refused else {
            untested.push(family.clone());
            continue;
        };
        s.standin.clear_requests();
        let method = reqwest::Method::from_bytes(r.method.as_bytes()).unwrap();
        let resp = s
            .script(method.clone(), &path, ALICE_KEY)
            .header("content-type", "application/json")
            .body(if method == reqwest::Method::GET {
                ""
            } else {
                "{}"
            })
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 403, "{family}: {} {path}", r.method);
        let id = resp.headers()["x-proxy-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body,
            serde_json::json!({"errors": [format!(
                "operation {} needs the OAuth scope {}, which integration netops was not granted",
                r.operation, r.scope
            )]}),
            "{family}"
        );
        // A network or device path costs its organization lookup (getNetwork / getDevice),
        // never the refused operation itself.
        let forwarded: Vec<String> = s
            .standin
            .requests()
            .into_iter()
            .map(|q| q.path_and_query)
            .filter(|q| {
                !q.ends_with("/networks/L_111_0") && !q.ends_with("/devices/Q111-AAAA-0001")
            })
            .collect();
        assert!(forwarded.is_empty(), "{family}: forwarded {forwarded:?}");
        let rec = eventually("the audit record", || {
            s.audit()
                .into_iter()
                .find(|x| x["request_id"] == id.as_str())
        })
        .await;
        assert_eq!(rec["reason"], "missing_scope", "{family}");
        assert_eq!(rec["operation"], r.operation.as_str(), "{family}");
        tested += 1;
    }
    assert_eq!(s.standin.token_calls(), calls, "a refusal costs no refresh");
    assert_eq!(
        untested,
        vec!["administered", "spaces"],
        "families not covered"
    );
    // 16 families in meraki-sdk 4.7.0's table, 14 with such an operation.
    assert_eq!(tested, 14, "families tested");
    // A scope the grant holds: forwarded.
    assert_eq!(
        s.status("/organizations/111/networks", ALICE_KEY).await,
        200
    );
    let m = metrics(&p).await;
    assert!(
        m.contains(&format!(
            "meraki_proxy_denials_total{{client=\"alice\",reason=\"missing_scope\"}} {tested}"
        )),
        "{m}"
    );
}

/// Meraki's `scope` in the token response outranks the integration's configured scopes; the
/// status page shows each grant's scopes and where they come from; `check` lists, per client,
/// the operations the integration's scopes cannot serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merakis_scope_outranks_the_configuration_and_check_lists_what_cannot_be_served() {
    let s = Scenario::new(Options {
        clients: format!(
            "[[clients]]\nname = \"erin\"\nkey_sha256 = \"{}\"\nintegration = \"netops\"\norganizations = [\"333\"]\n",
            sha256_hex("erin-proxy-key-4e5f6a")
        ),
        ..Options::default()
    })
    .await;
    s.standin.add_org("333", "Erin Org");
    s.standin.add_network("333", "L_333_0", "erin net");
    // Set here: the admin gave org 333's grant read only, though the integration lists write.
    let refresh = s
        .standin
        .issue_grant(CLIENT_ID, &["333"], &["dashboard:general:config:read"]);
    s.import().await;
    s.import_grant(&refresh, &["333"]).await;
    let p = s.start().await;
    let put = |key: &'static str, net: &'static str| {
        s.script(reqwest::Method::PUT, &format!("/networks/{net}"), key)
            .header("content-type", "application/json")
            .body("{\"name\":\"renamed\"}")
            .send()
    };
    let refused = put("erin-proxy-key-4e5f6a", "L_333_0").await.unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body["errors"][0],
        "operation updateNetwork needs the OAuth scope dashboard:general:config:write, which integration netops was not granted"
    );
    assert_eq!(
        s.status("/networks/L_333_0", "erin-proxy-key-4e5f6a").await,
        200
    );
    // Org 111's grant was given write: alice's PUT goes through.
    assert_eq!(
        put(ALICE_KEY, "L_111_0").await.unwrap().status().as_u16(),
        200
    );

    let page = http()
        .get(format!("http://127.0.0.1:{}/", p.admin_port))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let section = &page[page
        .find("id=\"grant-scopes\"")
        .expect("a Grant scopes table")..];
    assert!(
        section.contains("dashboard:general:config:read</td><td>Meraki&#39;s token response")
            || section.contains("dashboard:general:config:read</td><td>Meraki's token response"),
        "{section}"
    );

    let out = s.run(&["check"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let alice = &text[text.find("  alice ").unwrap()..];
    let alice = &alice[..alice.find("  bob ").unwrap()];
    assert!(
        alice.contains("operations its scopes cannot serve ("),
        "{alice}"
    );
    assert!(
        alice.contains("      dashboard:iam:config:read ("),
        "{alice}"
    );
    assert!(alice.contains("getOrganizationAdmins"), "{alice}");
    assert!(alice.contains("createOrganizationAdmin"), "{alice}");
    let bob = &text[text.find("  bob ").unwrap()..];
    let bob = &bob[..bob.find("  erin ").unwrap()];
    assert!(bob.contains("getOrganizationAdmins"), "{bob}");
    assert!(
        !bob.contains("createOrganizationAdmin"),
        "bob may only GET: {bob}"
    );
    let erin = &text[text.find("  erin ").unwrap()..];
    assert!(
        erin.contains("operations its scopes cannot serve: as for client alice"),
        "{erin}"
    );
}

/// A reload changes a client's addresses while it is under load from two addresses: every
/// answer is a 200 or the refusal naming the address, and once the reload is in force the
/// roles are swapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_a_clients_addresses_under_load() {
    // Set here: the load is far above Meraki's 10 requests/s and the test is about the reload.
    let s = Scenario::new(Options {
        rate_limits: UNSHAPED.into(),
        clients: carol("[\"127.0.0.2/32\"]"),
        ..Options::default()
    })
    .await;
    s.import().await;
    let p = s.start().await;
    let url = format!("{}/organizations/111/networks", p.base());
    let client_from = |ip: &str| {
        reqwest::Client::builder()
            .local_address(ip.parse::<IpAddr>().unwrap())
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .unwrap()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3"] {
        for _ in 0..2 {
            let (c, url, stop) = (client_from(from), url.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                // Bounded: at most 400 requests per task.
                for _ in 0..400 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let r = c
                        .get(&url)
                        .header("X-Cisco-Meraki-API-Key", CAROL_KEY)
                        .send()
                        .await
                        .unwrap();
                    let status = r.status().as_u16();
                    let body = r.text().await.unwrap();
                    seen.push((from, status, body));
                }
                seen
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        "source_addresses = [\"127.0.0.2/32\"]",
        "source_addresses = [\"127.0.0.3/32\"]",
    );
    std::fs::write(&s.config, text).unwrap();
    reload(&s, &p).await;
    // After the reload returned: the new rule is in force for every new request.
    let after_2 = send(
        "127.0.0.2",
        p.port,
        b"",
        "/organizations/111/networks",
        CAROL_KEY,
        "",
    )
    .await;
    let after_3 = send(
        "127.0.0.3",
        p.port,
        b"",
        "/organizations/111/networks",
        CAROL_KEY,
        "",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(status_of(&after_2), 403, "{after_2}");
    assert_eq!(errors_body(&after_2), source_refusal("127.0.0.2"));
    assert_eq!(status_of(&after_3), 200, "{after_3}");
    let mut counts: BTreeMap<(&str, u16), usize> = BTreeMap::new();
    for t in tasks {
        for (from, status, body) in t.await.unwrap() {
            match status {
                200 => {}
                403 => assert_eq!(
                    serde_json::from_str::<Value>(&body).unwrap(),
                    source_refusal(from)
                ),
                other => panic!("{from}: {other} {body}"),
            }
            *counts.entry((from, status)).or_default() += 1;
        }
    }
    for key in [
        ("127.0.0.2", 200),
        ("127.0.0.2", 403),
        ("127.0.0.3", 403),
        ("127.0.0.3", 200),
    ] {
        assert!(
            counts.get(&key).copied().unwrap_or(0) > 0,
            "{key:?} never seen: {counts:?}"
        );
    }
}

/// With PROXY protocol, a connection still waiting for its header counts against
/// `max_connections`: three silent connections fill a listener of three, a fourth is answered
/// 503 at once; once they are gone, the listener serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_waiting_for_their_proxy_header_count_against_max_connections() {
    // Set here: a listener of three connections; a header deadline (10 s) longer than the test
    // needs, so the silent connections are still held when the fourth comes.
    let s = Scenario::new(Options {
        server: "trusted_proxies = [\"127.0.0.2/32\"]\nmax_connections = 3\nmax_connections_per_peer = 3\nheader_timeout_secs = 10".into(),
        ..Options::default()
    })
    .await;
    s.import().await;
    let p = s.start().await;
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        "trusted_proxies = [\"127.0.0.2/32\"]",
        "trusted_proxies = [\"127.0.0.2/32\"]\nproxy_protocol = true",
    );
    std::fs::write(&s.config, text).unwrap();
    reload(&s, &p).await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(connect_from("127.0.0.2", "127.0.0.1".parse().unwrap(), p.port).await);
    }
    p.wait_open(3).await;
    let fourth = answer_of_a_full_listener(&p).await;
    assert_eq!(status_of(&fourth), 503, "{fourth}");
    drop(silent);
    // The listener takes connections again: a header and a request are served.
    let header = format!("PROXY TCP4 198.51.100.7 127.0.0.1 40001 {}\r\n", p.port);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = send(
            "127.0.0.2",
            p.port,
            header.as_bytes(),
            "/organizations/111/networks",
            ALICE_KEY,
            "",
        )
        .await;
        if status_of(&r) == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "not served again: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fourth connection's answer while three wait for their headers (they are accepted by the
/// kernel at once but counted by the proxy only once its gate sees them: retried, bounded).
async fn answer_of_a_full_listener(p: &ProxyProcess) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = connect_from("127.0.0.2", "127.0.0.1".parse().unwrap(), p.port).await;
        let r = read_until(&mut c, Duration::from_secs(1), Duration::from_secs(5)).await;
        if !r.is_empty() {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "the listener never reported full"
        );
    }
}
