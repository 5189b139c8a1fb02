//! Clients that hold the proxy's resources, and requests its HTTP parser refuses, against the
//! real binary on loopback (issue 23; issue 21 item 5): each answered in Meraki's shape (or
//! closed where HTTP allows nothing else), audited and counted, while a legitimate client is
//! served throughout. Loops are bounded; waits are on conditions. A test that needs a shorter
//! timeout than the shipped default sets it itself, next to what it asserts.

mod support;

use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::harness::*;
use support::raw::{self, errors_body, header, status_of};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Sends `raw` on a new connection; what comes back within 5 s or until the server closes.
async fn exchange(port: u16, raw: &[u8]) -> String {
    let five = Duration::from_secs(5);
    raw::exchange(port, raw, five, five).await
}

/// What the server sends until it closes the connection, or `within` passes.
async fn read_to_close(c: &mut TcpStream, within: Duration) -> String {
    raw::read_until(c, within, within).await
}

/// The proxy's audit records with this request id.
fn record_of(s: &Scenario, id: &str) -> Option<Value> {
    s.audit()
        .into_iter()
        .find(|r| r["kind"] == "request" && r["request_id"] == id)
}

async fn started(server: &str) -> (Scenario, ProxyProcess) {
    let s = Scenario::new(Options {
        server: server.into(),
        ..Options::default()
    })
    .await;
    s.import().await;
    let p = s.start().await;
    (s, p)
}

/// A legitimate script: GETs every 100 ms until told to stop; the statuses it got and its
/// slowest answer.
fn legitimate_client(
    s: &Scenario,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<u16>, Duration)> {
    let request = s.script(reqwest::Method::GET, "/organizations/111", ALICE_KEY);
    tokio::spawn(async move {
        let mut statuses = Vec::new();
        let mut slowest = Duration::ZERO;
        // Bounded: at most 60 s of requests.
        for _ in 0..600 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let t = Instant::now();
            let status = request
                .try_clone()
                .unwrap()
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            slowest = slowest.max(t.elapsed());
            statuses.push(status);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (statuses, slowest)
    })
}

#[tokio::test]
async fn requests_the_parser_refuses_are_answered_in_merakis_shape_audited_and_counted() {
    let (s, p) = started("").await;
    let post = |extra: &str| {
        format!(
            "POST /api/v1/organizations/111/networks HTTP/1.1\r\nHost: p\r\nX-Cisco-Meraki-API-Key: {ALICE_KEY}\r\n{extra}\r\n"
        )
    };
    let many_headers: String = (0..300).map(|i| format!("X-Pad-{i}: a\r\n")).collect();
    let huge_header = format!("X-Pad: {}\r\n", "a".repeat(1100 * 1024));
    // (what is wrong, request, status, the record's detail)
    let table: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("TE not ending in chunked", post("Transfer-Encoding: chunked, identity\r\n").into(), 400, "transfer_encoding"),
        ("unknown TE", post("Transfer-Encoding: xchunked\r\n").into(), 400, "transfer_encoding"),
        ("TE on HTTP/1.0", b"POST /api/v1/organizations/111/networks HTTP/1.0\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400, "transfer_encoding"),
        ("two different CLs", (post("Content-Length: 5\r\nContent-Length: 7\r\n") + "hello").into(), 400, "content_length"),
        ("negative CL", post("Content-Length: -1\r\n").into(), 400, "content_length"),
        ("CL with a space", (post("Content-Length: 5 5\r\n") + "hello").into(), 400, "content_length"),
        ("Host against the absolute target", b"GET http://a.example/api/v1/organizations/111 HTTP/1.1\r\nHost: b.example\r\n\r\n".to_vec(), 400, "host"),
        ("a 70 KiB URI", format!("GET /api/v1/organizations/{} HTTP/1.1\r\nHost: p\r\n\r\n", "1".repeat(70 * 1024)).into(), 400, "request_target"),
        ("300 headers", post(&many_headers).into(), 400, "too_many_headers"),
        ("a header over 1 MiB", post(&huge_header).into(), 400, "header_too_large"),
        ("NUL in a header value", b"GET /api/v1/organizations/111 HTTP/1.1\r\nHost: p\r\nX-A: a\x00b\r\n\r\n".to_vec(), 400, "header_syntax"),
        ("a space in a header name", post("Bad Header: x\r\n").into(), 400, "header_syntax"),
        ("not HTTP", b"HELLO\r\n\r\n".to_vec(), 400, "request_line"),
        ("CONNECT", b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n".to_vec(), 405, "connect_method"),
    ];
    let mut failures = Vec::new();
    for (what, raw, status, detail) in &table {
        let r = exchange(p.port, raw).await;
        let id = header(&r, "x-proxy-request-id").unwrap_or("").to_owned();
        let shaped = errors_body(&r)["errors"][0].is_string();
        eprintln!("{what}: {} id={id} shaped={shaped}", status_of(&r));
        if status_of(&r) != *status || !shaped || id.len() != 16 {
            failures.push(format!(
                "{what}: expected {status} with an errors body and a request id, got {r:.300}"
            ));
            continue;
        }
        if r.contains(ALICE_KEY) {
            failures.push(format!("{what}: the answer quotes the client key"));
        }
        eventually(&format!("the audit record of {what}"), || {
            record_of(&s, &id).is_some()
        })
        .await;
        let rec = record_of(&s, &id).unwrap();
        for (field, want) in [
            ("decision", Value::from("denied")),
            ("reason", Value::from("malformed_request")),
            ("detail", Value::from(*detail)),
            ("status", Value::from(*status)),
        ] {
            if rec[field] != want {
                failures.push(format!(
                    "{what}: audit {field} = {}, expected {want}",
                    rec[field]
                ));
            }
        }
        if !rec["source"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))
        {
            failures.push(format!("{what}: no peer address in {rec}"));
        }
        if rec.to_string().contains(ALICE_KEY) {
            failures.push(format!("{what}: the record quotes the client key"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let counted = p.metric("meraki_proxy_malformed_requests_total").await;
    assert_eq!(counted as usize, table.len());
    // Still serving.
    assert_eq!(s.status("/organizations/111", ALICE_KEY).await, 200);
}

#[tokio::test]
async fn slowloris_is_answered_408_at_the_header_deadline_while_a_client_is_served() {
    // A 2 s deadline instead of the shipped 20 s, so that the test is short.
    let (s, p) = started("header_timeout_secs = 2").await;
    let stop = Arc::new(AtomicBool::new(false));
    let legit = legitimate_client(&s, stop.clone());
    const DRIPPERS: usize = 100;
    let port = p.port;
    let drippers: Vec<_> = (0..DRIPPERS)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                let began = Instant::now();
                c.write_all(b"GET /api/v1/organizations/111 HTTP/1.1\r\nHost: p\r\n")
                    .await
                    .unwrap();
                // One header byte every 200 ms, until the server answers or closes (bounded: 10 s).
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                for _ in 0..50 {
                    match tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                        Err(_) => {
                            if c.write_all(b"X").await.is_err() {
                                break;
                            }
                        }
                    }
                }
                (String::from_utf8_lossy(&got).into_owned(), began.elapsed())
            })
        })
        .collect();
    let mut ends = Vec::new();
    for d in drippers {
        let (r, took) = d.await.unwrap();
        assert_eq!(status_of(&r), 408, "{r}");
        assert!(errors_body(&r)["errors"][0].is_string(), "{r}");
        assert!(header(&r, "x-proxy-request-id").is_some(), "{r}");
        ends.push(took);
    }
    stop.store(true, Ordering::Relaxed);
    let (statuses, slowest) = legit.await.unwrap();
    let longest = ends.iter().max().unwrap();
    eprintln!(
        "{DRIPPERS} drippers answered 408 after {:?}..{longest:?}; the legitimate client: {} requests, slowest {slowest:?}",
        ends.iter().min().unwrap(),
        statuses.len()
    );
    assert!(*longest < Duration::from_secs(4), "{longest:?}");
    assert!(
        ends.iter().all(|t| *t >= Duration::from_millis(1900)),
        "{ends:?}"
    );
    assert!(
        statuses.len() >= 10 && statuses.iter().all(|s| *s == 200),
        "{statuses:?}"
    );
    assert!(slowest < Duration::from_millis(500), "{slowest:?}");
    eventually("an audit record per dripper", || {
        s.audit()
            .iter()
            .filter(|r| r["reason"] == "request_timeout" && r["detail"] == "header")
            .count()
            == DRIPPERS
    })
    .await;
    assert_eq!(
        p.metric("meraki_proxy_client_timeouts_total{phase=\"header\"}")
            .await as usize,
        DRIPPERS
    );
}

#[tokio::test]
async fn a_stalled_body_is_answered_408_and_a_dripping_one_meets_the_request_deadline() {
    // Shorter than the shipped 30 s and 300 s, so that the test is short.
    let (s, p) = started("body_timeout_secs = 1\nrequest_timeout_secs = 3").await;
    let post = format!(
        "POST /api/v1/organizations/111/networks HTTP/1.1\r\nHost: p\r\nX-Cisco-Meraki-API-Key: {ALICE_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\":"
    );
    // Stalled: part of the body, then nothing.
    let mut c = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    let began = Instant::now();
    c.write_all(post.as_bytes()).await.unwrap();
    let r = read_to_close(&mut c, Duration::from_secs(10)).await;
    let took = began.elapsed();
    assert_eq!(status_of(&r), 408, "{r}");
    assert!(errors_body(&r)["errors"][0].is_string(), "{r}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let id = header(&r, "x-proxy-request-id").unwrap().to_owned();
    eventually("the stalled body's record", || record_of(&s, &id).is_some()).await;
    let rec = record_of(&s, &id).unwrap();
    assert_eq!(
        (rec["reason"].as_str(), rec["detail"].as_str()),
        (Some("request_timeout"), Some("body")),
        "{rec}"
    );

    // Dripping: a byte every 400 ms is progress, but the whole request has 3 s.
    let mut c = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    let began = Instant::now();
    c.write_all(post.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    for _ in 0..25 {
        match tokio::time::timeout(Duration::from_millis(400), c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => {
                if c.write_all(b"a").await.is_err() {
                    break;
                }
            }
        }
    }
    let took = began.elapsed();
    let r = String::from_utf8_lossy(&got);
    assert_eq!(status_of(&r), 408, "{r}");
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let id = header(&r, "x-proxy-request-id").unwrap().to_owned();
    eventually("the dripping body's record", || {
        record_of(&s, &id).is_some()
    })
    .await;
    assert_eq!(record_of(&s, &id).unwrap()["detail"], "request");
    assert_eq!(
        p.metric("meraki_proxy_client_timeouts_total{phase=\"body\"}")
            .await,
        1.0
    );
    assert_eq!(
        p.metric("meraki_proxy_client_timeouts_total{phase=\"request\"}")
            .await,
        1.0
    );
    // Nothing went upstream half-read, and the proxy still serves.
    assert_eq!(s.status("/organizations/111", ALICE_KEY).await, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    // 1 s instead of the shipped 30 s.
    let (_s, p) = started("idle_timeout_secs = 1").await;
    let mut c = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    let get = format!("GET /api/v1/organizations/111 HTTP/1.1\r\nHost: p\r\nX-Cisco-Meraki-API-Key: {ALICE_KEY}\r\n\r\n");
    c.write_all(get.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = c.read(&mut buf).await.unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&buf[..n])), 200);
    let began = Instant::now();
    let rest = read_to_close(&mut c, Duration::from_secs(10)).await;
    let took = began.elapsed();
    assert!(
        rest.is_empty(),
        "nothing is sent on an idle connection: {rest}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

/// Waits until the proxy counts `n` open connections (bounded: 5 s): the listener accepts on
/// several tasks, so connections opened one after another may be admitted in another order.
/// Raises this process's open-file limit to its hard limit (the proxy it spawns inherits it).
fn raise_nofile(need: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < need {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
}

/// The proxy's resident memory, KiB.
fn rss_kib(p: &ProxyProcess) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A connection from `source` (a loopback address: each is a peer of its own).
async fn connect_from(source: [u8; 4], port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
}

#[tokio::test]
async fn an_idle_flood_is_held_then_let_go_and_memory_comes_back_while_a_client_is_served() {
    const PEERS: u8 = 8;
    const PER_PEER: usize = 250;
    raise_nofile(3 * PEERS as u64 * PER_PEER as u64 + 512);
    // A 3 s header deadline instead of the shipped 20 s, so that the flood ends soon.
    let (s, p) = started("header_timeout_secs = 3").await;
    assert_eq!(s.status("/organizations/111", ALICE_KEY).await, 200);
    let resting = rss_kib(&p);
    let stop = Arc::new(AtomicBool::new(false));
    let legit = legitimate_client(&s, stop.clone());
    let mut flood = Vec::new();
    for peer in 0..PEERS {
        for _ in 0..PER_PEER {
            flood.push(connect_from([127, 0, 1, 1 + peer], p.port).await.unwrap());
        }
    }
    let n = flood.len();
    p.wait_open(n).await;
    let held = p.metric("meraki_proxy_connections_open").await;
    let during = rss_kib(&p);
    eprintln!(
        "{n} idle connections held ({held}); RSS {resting} KiB resting, {during} KiB with them: {:.1} KiB each",
        (during.saturating_sub(resting)) as f64 / n as f64
    );
    // Each is answered 408 at the header deadline and closed.
    let mut answered = 0;
    for c in flood.iter_mut() {
        let r = read_to_close(c, Duration::from_secs(8)).await;
        if status_of(&r) == 408 {
            answered += 1;
        }
    }
    assert_eq!(answered, n);
    drop(flood);
    stop.store(true, Ordering::Relaxed);
    let (statuses, slowest) = legit.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(slowest < Duration::from_millis(500), "{slowest:?}");
    // jemalloc's background threads purge freed pages after about 10 s (bounded: 20 s).
    let mut after = u64::MAX;
    for _ in 0..400 {
        after = rss_kib(&p);
        if after <= resting + 20 * 1024 && p.metric("meraki_proxy_connections_open").await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "after the flood: RSS {after} KiB ({:+} KiB from resting); the legitimate client: {} requests, slowest {slowest:?}",
        after as i64 - resting as i64,
        statuses.len()
    );
    assert!(
        after <= resting + 20 * 1024,
        "RSS {after} KiB, resting {resting} KiB"
    );
}

#[tokio::test]
async fn a_peer_over_its_connection_limit_is_answered_429_and_others_are_not() {
    // 4 per peer instead of the shipped 256, so that the test opens few connections.
    let (s, p) = started("max_connections_per_peer = 4").await;
    let get = format!("GET /api/v1/organizations/111 HTTP/1.1\r\nHost: p\r\nX-Cisco-Meraki-API-Key: {ALICE_KEY}\r\n\r\n");
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from([127, 0, 2, 1], p.port).await.unwrap());
    }
    p.wait_open(4).await;
    let mut fifth = connect_from([127, 0, 2, 1], p.port).await.unwrap();
    fifth.write_all(get.as_bytes()).await.unwrap();
    let r = read_to_close(&mut fifth, Duration::from_secs(5)).await;
    assert_eq!(status_of(&r), 429, "{r}");
    assert_eq!(header(&r, "retry-after"), Some("1"), "{r}");
    assert!(
        errors_body(&r)["errors"][0]
            .as_str()
            .unwrap()
            .contains("connections"),
        "{r}"
    );
    let id = header(&r, "x-proxy-request-id").unwrap().to_owned();
    eventually("the refusal's record", || record_of(&s, &id).is_some()).await;
    assert_eq!(
        record_of(&s, &id).unwrap()["reason"],
        "too_many_connections"
    );
    // Another address is not affected; the held connections are served.
    let mut other = connect_from([127, 0, 2, 2], p.port).await.unwrap();
    other.write_all(get.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = other.read(&mut buf).await.unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&buf[..n])), 200);
    held[0].write_all(get.as_bytes()).await.unwrap();
    let n = held[0].read(&mut buf).await.unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&buf[..n])), 200);
    assert_eq!(
        p.metric("meraki_proxy_connections_refused_total{limit=\"peer\"}")
            .await,
        1.0
    );
    // Once one closes, the address has room again (bounded: until the close is counted).
    drop(held.pop());
    let mut served = false;
    for _ in 0..100 {
        let mut c = connect_from([127, 0, 2, 1], p.port).await.unwrap();
        c.write_all(get.as_bytes()).await.unwrap();
        let n = c.read(&mut buf).await.unwrap_or(0);
        if status_of(&String::from_utf8_lossy(&buf[..n])) == 200 {
            served = true;
            break;
        }
    }
    assert!(served, "the address never had room again");
}

#[tokio::test]
async fn a_full_listener_answers_503_at_once() {
    let (_s, p) = started("max_connections = 3\nmax_connections_per_peer = 3").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(("127.0.0.1", p.port)).await.unwrap());
    }
    p.wait_open(3).await;
    let mut extra = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    let r = read_to_close(&mut extra, Duration::from_secs(5)).await;
    assert_eq!(status_of(&r), 503, "{r}");
    assert!(errors_body(&r)["errors"][0].is_string(), "{r}");
    assert!(header(&r, "x-proxy-request-id").is_some(), "{r}");
    assert_eq!(
        p.metric("meraki_proxy_connections_refused_total{limit=\"listener\"}")
            .await,
        1.0
    );
}

/// The memory figures of docs/performance.md: RSS per idle, per slow-header and per active
/// connection, and after each flood closes. Not a CI test (about a minute):
/// `bash benches/memory.sh` runs it on a release build.
#[tokio::test]
#[ignore = "a measurement: bash benches/memory.sh"]
async fn memory_per_connection() {
    const N: usize = 2000;
    const ACTIVE: usize = 200;
    raise_nofile(3 * N as u64 + 512);
    // Room for the flood from one address; a 60 s header deadline outlasts the measurement;
    // the active connections are not held back by Meraki's rate budget.
    let s = Scenario::new(Options {
        server: "header_timeout_secs = 60\nmax_connections_per_peer = 4096".into(),
        rate_limits: UNSHAPED.into(),
        ..Options::default()
    })
    .await;
    s.import().await;
    let p = s.start().await;
    assert_eq!(s.status("/organizations/111", ALICE_KEY).await, 200);
    let resting = rss_kib(&p);
    println!("resting: {resting} KiB");
    let settle = |label: &'static str, p: &ProxyProcess| {
        let pid = p.child.id();
        async move {
            // Bounded: 30 s for the allocator to hand pages back.
            let began = Instant::now();
            let mut last = u64::MAX;
            for _ in 0..60 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
                last = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap();
                if last <= resting + 4 * 1024 {
                    break;
                }
            }
            println!(
                "after the {label} connections closed: {last} KiB ({:+} KiB from resting) after {:.1} s",
                last as i64 - resting as i64,
                began.elapsed().as_secs_f64()
            );
        }
    };
    for (label, prefix) in [
        ("idle", &b""[..]),
        (
            "slow-header",
            &b"GET /api/v1/organizations/111 HTTP/1.1\r\nHost: p\r\nX-Slow: "[..],
        ),
    ] {
        let mut conns = Vec::with_capacity(N);
        for _ in 0..N {
            let mut c = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
            if !prefix.is_empty() {
                c.write_all(prefix).await.unwrap();
            }
            conns.push(c);
        }
        p.wait_open(N).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let with = rss_kib(&p);
        println!(
            "{N} {label} connections: {with} KiB, {:.1} KiB each",
            with.saturating_sub(resting) as f64 / N as f64
        );
        drop(conns);
        settle(label, &p).await;
    }
    // Active: keep-alive connections each sending requests back to back.
    let stop = Arc::new(AtomicBool::new(false));
    let get = format!("GET /api/v1/organizations/111 HTTP/1.1\r\nHost: p\r\nX-Cisco-Meraki-API-Key: {ALICE_KEY}\r\n\r\n");
    let workers: Vec<_> = (0..ACTIVE)
        .map(|_| {
            let (stop, get, port) = (stop.clone(), get.clone(), p.port);
            tokio::spawn(async move {
                let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                let mut buf = vec![0u8; 16384];
                let mut done = 0u32;
                while !stop.load(Ordering::Relaxed) && done < 10_000 {
                    if c.write_all(get.as_bytes()).await.is_err() {
                        break;
                    }
                    match c.read(&mut buf).await {
                        Ok(n) if n > 0 => done += 1,
                        _ => break,
                    }
                }
                done
            })
        })
        .collect();
    p.wait_open(ACTIVE).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let with = rss_kib(&p);
    stop.store(true, Ordering::Relaxed);
    let mut served = 0;
    for w in workers {
        served += w.await.unwrap();
    }
    println!(
        "{ACTIVE} active connections ({served} requests in about 3 s): {with} KiB, {:.1} KiB each",
        with.saturating_sub(resting) as f64 / ACTIVE as f64
    );
    settle("active", &p).await;
    let hwm = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
    println!(
        "peak: {}",
        hwm.lines().find(|l| l.starts_with("VmHWM")).unwrap_or("")
    );
}
