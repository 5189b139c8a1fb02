//! Micro-benchmarks of the work the proxy does for every request, through the library's public
//! API: key lookup, routing, the cached organization lookup, upstream header rewriting, `Link`
//! rewriting, metrics, the audit record, and shaping's turn when the budget is not contended.
//!
//! ```text
//! cargo bench --bench hot_path              # measure
//! cargo bench --bench hot_path -- --test    # run each benchmark once (CI)
//! ```
//!
//! The end-to-end numbers (throughput, latency, memory against nginx and a bare Pingora
//! pass-through) come from `benches/load.sh`.

use async_trait::async_trait;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use meraki_oauth_proxy::audit::{Audit, RequestEntry, RequestId};
use meraki_oauth_proxy::config::Client;
use meraki_oauth_proxy::forward;
use meraki_oauth_proxy::identity::{Identities, API_KEY_HEADER};
use meraki_oauth_proxy::metrics::Metrics;
use meraki_oauth_proxy::route::{self, Lookup, LookupError, Resolver};
use pingora::http::RequestHeader;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const KEY: &str = "bench-client-key-0123456789abcdef";
const ORG: &str = "111111";

fn client(i: usize, key: &str) -> Arc<Client> {
    Arc::new(Client {
        name: format!("client-{i}"),
        keys: vec![meraki_oauth_proxy::config::ClientKey {
            digest: Sha256::digest(key.as_bytes()).into(),
            expires_at: None,
        }],
        cert: None,
        integration: "netops".into(),
        organizations: vec![ORG.into()],
        methods: None,
        operations: None,
        weight: 1,
        source_addresses: None,
    })
}

/// `n` clients; the one holding [`KEY`] is the last, though the scan visits every client anyway.
fn clients(n: usize) -> Vec<Arc<Client>> {
    let mut v: Vec<_> = (0..n - 1)
        .map(|i| client(i, &format!("other-key-{i}")))
        .collect();
    v.push(client(n - 1, KEY));
    v
}

fn identity(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert(API_KEY_HEADER, HeaderValue::from_static(KEY));
    headers.insert(
        "user-agent",
        HeaderValue::from_static("python-meraki/1.53.0"),
    );
    headers.insert("accept", HeaderValue::from_static("application/json"));
    let mut g = c.benchmark_group("identify");
    for n in [10, 10_000] {
        let ids = Identities::new(&clients(n));
        assert!(ids.identify(&headers).is_ok());
        g.bench_with_input(BenchmarkId::new("clients", n), &ids, |b, ids| {
            b.iter(|| ids.identify(black_box(&headers)))
        });
    }
    g.finish();
}

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_parse");
    // (name, path, accepted)
    let cases = [
        ("organization", "/api/v1/organizations/123/networks", true),
        // The proxy hands `route::parse` the path without its query (`uri.path()`).
        (
            "network_with_query",
            "/api/v1/networks/L_1/clients?perPage=10",
            true,
        ),
        (
            "sdk_encoded_mac",
            "/api/v1/networks/L_1/clients/00%3A11%3A22%3A33%3A44%3A55",
            true,
        ),
        // Refused (dot segments are not resolved): the cost of saying no.
        (
            "refused_dot_segments",
            "/api/v1/organizations/123/%2e%2e/999/networks//../networks",
            false,
        ),
    ];
    for (name, uri, accepted) in cases {
        let path = uri.split('?').next().unwrap_or(uri);
        assert_eq!(route::parse(path, &Method::GET).is_ok(), accepted, "{uri}");
        g.bench_function(name, |b| {
            b.iter(|| route::parse(black_box(path), &Method::GET))
        });
    }
    g.finish();
}

fn endpoints(c: &mut Criterion) {
    let mut g = c.benchmark_group("endpoint_find");
    let table = meraki_oauth_proxy::endpoints::EndpointTable::builtin();
    let cases: [(&str, Method, &[&str]); 3] = [
        ("getDevice", Method::GET, &["devices", "Q2XX-AAAA-BBBB"]),
        (
            "getOrganizationNetworks",
            Method::GET,
            &["organizations", "123", "networks"],
        ),
        (
            "unknown",
            Method::GET,
            &["organizations", "123", "notAnEndpoint", "x"],
        ),
    ];
    for (name, method, segments) in cases {
        assert_eq!(
            table
                .find(&method, segments)
                .map(|m| m.operation().operation_id.as_str()),
            (name != "unknown").then_some(name)
        );
        g.bench_function(name, |b| {
            b.iter(|| table.find(&method, black_box(segments)).is_some())
        });
    }
    g.finish();
}

/// Networks and devices in memory; the benchmark only measures warm-cache hits.
struct Memory(HashMap<String, serde_json::Value>);

#[async_trait]
impl Lookup for Memory {
    async fn get_json(
        &self,
        _org: &str,
        path: &str,
    ) -> Result<Option<serde_json::Value>, LookupError> {
        Ok(self.0.get(path).cloned())
    }
}

fn resolver(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let lookup = Memory(HashMap::from([
        (
            "/networks/L_1".to_owned(),
            serde_json::json!({ "id": "L_1", "organizationId": ORG }),
        ),
        (
            "/devices/Q2XX-AAAA-BBBB".to_owned(),
            serde_json::json!({ "serial": "Q2XX-AAAA-BBBB", "networkId": "L_1" }),
        ),
    ]));
    let resolver = Resolver::new(100_000, Duration::from_secs(600));
    let orgs = vec!["222222".to_owned(), ORG.to_owned()];
    rt.block_on(async {
        let org = resolver.network_org("L_1", &orgs, &lookup).await;
        assert_eq!(org.as_deref().ok(), Some(ORG));
        let org = resolver.device_org("Q2XX-AAAA-BBBB", &orgs, &lookup).await;
        assert_eq!(org.as_deref().ok(), Some(ORG));
    });
    let mut g = c.benchmark_group("resolver_warm");
    g.bench_function("network_org", |b| {
        b.to_async(&rt)
            .iter(|| resolver.network_org(black_box("L_1"), &orgs, &lookup))
    });
    g.bench_function("device_org", |b| {
        b.to_async(&rt)
            .iter(|| resolver.device_org(black_box("Q2XX-AAAA-BBBB"), &orgs, &lookup))
    });
    g.finish();
}

fn client_request() -> RequestHeader {
    let mut req = RequestHeader::build(Method::GET, b"/api/v1/organizations/111111/networks", None)
        .expect("request header");
    for (k, v) in [
        ("host", "127.0.0.1:8080"),
        (
            "user-agent",
            "python-meraki/1.53.0 MyInventoryScript/2.1 Acme",
        ),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate"),
        ("content-type", "application/json"),
    ] {
        req.insert_header(k, v).expect("header");
    }
    req.insert_header(API_KEY_HEADER, KEY).expect("header");
    req
}

fn headers(c: &mut Criterion) {
    let bearer = HeaderValue::from_static("Bearer at-0123456789abcdef0123456789abcdef0123456789");
    let template = client_request();
    let path = "/api/v1/organizations/111111/networks?perPage=1000";
    let host = HeaderValue::from_static("api.meraki.com");
    let mut g = c.benchmark_group("forward");
    // The clone is part of the measurement; `clone_only` gives its share.
    g.bench_function("clone_only", |b| b.iter(|| black_box(&template).clone()));
    g.bench_function("prepare_request", |b| {
        b.iter(|| {
            let mut req = template.clone();
            forward::prepare_request(&mut req, &bearer, &host, black_box(path)).expect("prepare");
            req
        })
    });
    let link = "<https://api.meraki.com/api/v1/organizations/111111/networks?perPage=10&startingAfter=a000000>; rel=first, \
                <https://api.meraki.com/api/v1/organizations/111111/networks?perPage=10&endingBefore=L_111111_10>; rel=prev, \
                <https://api.meraki.com/api/v1/organizations/111111/networks?perPage=10&startingAfter=L_111111_19>; rel=next, \
                <https://api.meraki.com/api/v1/organizations/111111/networks?perPage=10&endingBefore=zzzzzzz>; rel=last";
    assert_eq!(
        forward::rewrite_link(link, "/api/v1").map(|l| l.matches("rel=").count()),
        Some(4)
    );
    g.bench_function("rewrite_link_4_rels", |b| {
        b.iter(|| forward::rewrite_link(black_box(link), "/api/v1"))
    });
    g.finish();
}

fn metrics(c: &mut Criterion) {
    let m = Metrics::new().expect("metrics");
    let mut g = c.benchmark_group("metrics");
    g.bench_function("request", |b| {
        b.iter(|| {
            m.request(
                black_box("netops"),
                "inventory-script",
                ORG,
                &Method::GET,
                200,
                Duration::from_micros(850),
            )
        })
    });
    // What `proxy.rs` records for one forwarded request.
    g.bench_function("per_request_total", |b| {
        b.iter(|| {
            m.in_flight().inc();
            m.upstream(black_box("netops"), Duration::from_micros(400));
            m.request(
                "netops",
                "inventory-script",
                ORG,
                &Method::GET,
                200,
                Duration::from_micros(850),
            );
            m.in_flight().dec();
        })
    });
    g.finish();
}

/// What `proxy.rs` hands the audit log for one forwarded request.
fn entry(who: &Arc<Client>, org: &Arc<str>) -> RequestEntry {
    RequestEntry {
        at: std::time::SystemTime::now(),
        request_id: RequestId::new(),
        upstream_request_id: Some(HeaderValue::from_static("8d3c2e0f4a5b6c7d8e9f0a1b2c3d4e5f")),
        client: Some(who.clone()),
        organization: Some(org.clone()),
        method: Method::GET,
        path: "/organizations/111111/networks?perPage=1000".to_owned(),
        operation: Some("getOrganizationNetworks"),
        key_expires_at: None,
        status: 200,
        upstream_status: Some(200),
        decision: "forwarded",
        reason: None,
        retried_after_401: false,
        redirects_followed: 0,
        token_fingerprint: None,
        duration: Duration::from_micros(853),
        upstream_duration: Some(Duration::from_micros(412)),
        queue_wait: Some(Duration::ZERO),
        bytes_in: 0,
        bytes_out: 1536,
        source: Some(([127, 0, 0, 1], 51234).into()),
        client_address: None,
        user_agent: Some(HeaderValue::from_static(
            "python-meraki/1.53.0 MyInventoryScript/2.1 Acme",
        )),
        identity: Some("key"),
        client_certificate: None,
        detail: None,
    }
}

fn audit(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let audit = Audit::open(Some(&dir.path().join("audit.jsonl"))).expect("audit log");
    let who = client(0, KEY);
    let org: Arc<str> = ORG.into();
    let mut g = c.benchmark_group("audit");
    // The request path's share: build the entry (reference counts, one path string).
    g.bench_function("build_entry", |b| b.iter(|| black_box(entry(&who, &org))));
    // Build and enqueue, back to back: the queue fills, so this measures the writer thread's
    // sustained rate (it shares the machine's cores with the benchmark), not the request path.
    g.bench_function("request", |b| b.iter(|| audit.request(entry(&who, &org))));
    // The writer thread's share: timestamp and JSON for one entry.
    let mut line = Vec::with_capacity(1024);
    g.bench_function("serialize_on_writer", |b| {
        let e = entry(&who, &org);
        b.iter(|| {
            line.clear();
            e.write_json(&mut line).expect("serializes");
        })
    });
    g.finish();
    drop(audit);
}

/// What shaping costs a request that does not wait (the budget is not contended): the turn,
/// Meraki's answer fed back, the status page's activity. Shaping on with limits this loop
/// never reaches, as in `load.sh`'s (d).
fn shaping(c: &mut Criterion) {
    use meraki_oauth_proxy::config::RateLimits;
    use meraki_oauth_proxy::shaping::{Outcome, Shaper, Ticket};
    let mut g = c.benchmark_group("shaping");
    for (name, orgs) in [("1_org", 1usize), ("1000_orgs", 1000)] {
        let shaper = Shaper::new(RateLimits {
            // Beyond anything this loop (millions a second) reaches.
            organization_rps: 1e12,
            organization_burst: 1e12,
            source_rps: 1e13,
            ..RateLimits::default()
        });
        let ids: Vec<String> = (0..orgs).map(|i| (111_111 + i).to_string()).collect();
        for id in &ids {
            assert!(matches!(shaper.request(id, "client-0", 1), Ticket::Go(_)));
        }
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("per_request_total", name), |b| {
            b.iter(|| {
                i = (i + 1) % ids.len();
                let org = &ids[i];
                match shaper.request(black_box(org), "inventory-script", 1) {
                    Ticket::Go(t) => black_box(t),
                    _ => panic!("the budget is never taken here"),
                };
                shaper.upstream_answered(org, 200);
                shaper.record(
                    "inventory-script",
                    Outcome::Served,
                    tokio::time::Instant::now(),
                );
            })
        });
    }
    let off = Shaper::new(RateLimits {
        enabled: false,
        ..RateLimits::default()
    });
    g.bench_function("off", |b| {
        b.iter(|| black_box(off.request(black_box(ORG), "inventory-script", 1)))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

/// Issue 24's two checks per request: the client's address against its `source_addresses`
/// (with the address rule of `source.rs`: the peer, or `X-Forwarded-For` behind a trusted
/// proxy), and the operation's OAuth scope against the grant's.
fn access_checks(c: &mut Criterion) {
    use meraki_oauth_proxy::admission::{check_scope, check_source};
    use meraki_oauth_proxy::scope::{Scope, ScopeSet};
    use meraki_oauth_proxy::source::{client_address, Cidrs};
    use std::net::IpAddr;
    let mut g = c.benchmark_group("access_checks");
    let cidrs = |list: &[&str]| Cidrs(list.iter().map(|c| c.parse().unwrap()).collect());
    let anywhere = client(0, KEY);
    let restricted = Arc::new(Client {
        name: "restricted".into(),
        keys: vec![],
        cert: None,
        integration: "netops".into(),
        organizations: vec![ORG.into()],
        methods: None,
        operations: None,
        weight: 1,
        source_addresses: Some(cidrs(&["10.1.0.0/16", "192.0.2.0/24", "2001:db8::/48"])),
    });
    let trusted = cidrs(&["10.0.0.0/24"]);
    let none = Cidrs::default();
    let peer: IpAddr = "192.0.2.77".parse().unwrap();
    let direct = HeaderMap::new();
    let mut forwarded = HeaderMap::new();
    forwarded.insert(
        "x-forwarded-for",
        HeaderValue::from_static("203.0.113.9, 192.0.2.77, 10.0.0.6"),
    );
    let lb: IpAddr = "10.0.0.5".parse().unwrap();
    assert_eq!(client_address(lb, &forwarded, &trusted), peer);
    g.bench_function("source_no_rule", |b| {
        b.iter(|| {
            let ip = client_address(black_box(peer), black_box(&direct), &none);
            check_source(black_box(&anywhere), ip).is_ok()
        })
    });
    g.bench_function("source_direct_3_cidrs", |b| {
        b.iter(|| {
            let ip = client_address(black_box(peer), black_box(&direct), &trusted);
            check_source(black_box(&restricted), ip).is_ok()
        })
    });
    g.bench_function("source_x_forwarded_for", |b| {
        b.iter(|| {
            let ip = client_address(black_box(lb), black_box(&forwarded), &trusted);
            check_source(black_box(&restricted), ip).is_ok()
        })
    });
    let table = meraki_oauth_proxy::endpoints::EndpointTable::builtin();
    let op = table.by_operation_id("updateNetwork").unwrap();
    let write: ScopeSet = [
        "dashboard:general:config:read",
        "dashboard:general:config:write",
    ]
    .iter()
    .map(|s| Scope::parse(s).unwrap())
    .collect();
    let read: ScopeSet = [Scope::parse("dashboard:general:config:read").unwrap()]
        .into_iter()
        .collect();
    assert!(check_scope(op, Some(write), "netops").is_ok());
    assert!(check_scope(op, Some(read), "netops").is_err());
    g.bench_function("scope_granted", |b| {
        b.iter(|| check_scope(black_box(op), black_box(Some(write)), "netops").is_ok())
    });
    // The refusal's fields are built (one String); its message is formatted once per refused
    // request, outside this figure.
    g.bench_function("scope_refused", |b| {
        b.iter(|| check_scope(black_box(op), black_box(Some(read)), "netops").is_err())
    });
    g.finish();
}

criterion_group! {
    name = hot_path;
    config = config();
    targets = identity, routing, endpoints, resolver, headers, metrics, audit, shaping, access_checks
}
criterion_main!(hot_path);
