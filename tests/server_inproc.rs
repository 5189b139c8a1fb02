//! `server::run` called in-process on listeners bound to port 0: the server a test can call,
//! with no port raced for, stopped by a shutdown signal of the test's own.

mod support;

use std::time::Duration;
use support::harness::*;
use support::inproc::{bind, InProcess};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_on_prebound_listeners_and_stops_on_request() {
    let (proxy, admin) = bind();
    let ports = (
        proxy.local_addr().unwrap().port(),
        admin.local_addr().unwrap().port(),
    );
    let s = Scenario::new(Options {
        ports: Some(ports),
        // A server inside the test process waits out its grace period when stopped (the
        // binary exits as soon as it is drained); this test stops it.
        server: "shutdown_grace_secs = 1".into(),
        ..Default::default()
    })
    .await;
    s.import().await;
    let server = InProcess::start(&s.config, proxy, admin);
    let health = format!("http://127.0.0.1:{}/healthz", ports.1);
    eventually_async(|| async {
        http()
            .get(&health)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let r = s
        .script(
            reqwest::Method::GET,
            "/organizations/111/networks",
            ALICE_KEY,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, _) = (r.status(), r.text().await.unwrap());
    assert_eq!(status, 200);
    let stopped = tokio::task::spawn_blocking(move || server.stop());
    tokio::time::timeout(Duration::from_secs(30), stopped)
        .await
        .expect("the server stops when asked")
        .unwrap();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", ports.0)).is_err(),
        "the listener is closed"
    );
    let audit = s.audit();
    assert!(audit
        .iter()
        .any(|r| r["kind"] == "request" && r["status"] == 200 && r["client"] == "alice"));
}
