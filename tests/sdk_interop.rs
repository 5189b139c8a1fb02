//! Wire compatibility with real clients: the official Meraki Python SDK (`meraki` on PyPI,
//! pinned in tests/sdk/requirements.txt) and a plain RFC 8288 client (`requests`), run as a
//! legacy script would be, against the real proxy binary in front of the Meraki stand-in.
//!
//! The Python side is tests/sdk/sdk_client.py; its interpreter is `MERAKI_SDK_PYTHON`, by default
//! `<repo>/.venv/bin/python`, which `scripts/python-env.sh` creates. Without it these tests fail
//! (they are never skipped): run `bash scripts/python-env.sh` first.

mod support;

use serde_json::Value;
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;
use support::harness::*;
use support::python::run_bounded;
use support::standin::{Recorded, Standin};

/// The stand-in adds this to every pagination link; it must reach upstream byte for byte.
const T0: &str = "t0=2026-11-23T00%3A00%3A00Z";
/// The SDK's version the tests were written against.
const SDK_VERSION: &str = "4.7.0";
/// Hard limit on one run of the Python script.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Running the Python side

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The interpreter with the pinned SDK; panics with what to do when it is missing.
fn python() -> PathBuf {
    static CHECKED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let checked = CHECKED.get_or_init(|| {
        let py = std::env::var_os("MERAKI_SDK_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join(".venv/bin/python"));
        let fix = "run `bash scripts/python-env.sh` (or set MERAKI_SDK_PYTHON to a Python with \
                   the packages of tests/sdk/requirements.txt)";
        if !py.exists() {
            return Err(format!("no Python interpreter at {}: {fix}", py.display()));
        }
        let out = Command::new(&py)
            .args(["-c", "import meraki, requests; print(meraki.__version__)"])
            .output()
            .map_err(|e| format!("cannot run {}: {e}; {fix}", py.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} cannot import meraki and requests ({}): {fix}",
                py.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if version != SDK_VERSION {
            return Err(format!(
                "{} has meraki {version}, these tests pin {SDK_VERSION}: {fix}",
                py.display()
            ));
        }
        Ok(py)
    });
    match checked {
        Ok(py) => py.clone(),
        Err(message) => panic!("{message}"),
    }
}

/// What one run of tests/sdk/sdk_client.py printed.
struct Run {
    ok: bool,
    out: Value,
    stderr: String,
    elapsed: Duration,
}

impl Run {
    /// The successful run's output; panics with the script's report otherwise.
    fn success(&self) -> &Value {
        assert!(
            self.ok && self.out.get("error").is_none(),
            "the script failed: {}\n--- stderr ---\n{}",
            self.out,
            self.stderr
        );
        &self.out
    }

    /// Every HTTP exchange the client made (`via` "sdk" or "requests").
    fn seen(&self) -> Vec<Value> {
        self.out["seen"].as_array().cloned().unwrap_or_default()
    }
}

/// Runs `sdk_client.py <scenario>` against the proxy of `s` with `key`, off the async runtime.
async fn run_script(s: &Scenario, key: &str, scenario: &str, env: &[(&str, &str)]) -> Run {
    let py = python();
    let script = repo().join("tests/sdk/sdk_client.py");
    // Several runs may be under way at once.
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let stdout_path = s.dir.path().join(format!("{scenario}-{run}.stdout"));
    let stderr_path = s.dir.path().join(format!("{scenario}-{run}.stderr"));
    let mut cmd = Command::new(py);
    cmd.arg(&script)
        .arg(scenario)
        .current_dir(s.dir.path())
        .env("PROXY_BASE", s.base())
        .env("PROXY_KEY", key)
        // Nothing may write outside the temporary directory (the SDK's caches, logs).
        .env("HOME", s.dir.path())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // httpx and requests honour proxy variables: loopback must be reached directly.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env_remove("MERAKI_DASHBOARD_API_KEY")
        .env_remove("MERAKI_PYTHON_SDK_CALLER");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let ran = run_bounded(cmd, scenario, stdout_path, stderr_path, SCRIPT_TIMEOUT).await;
    let (stdout, stderr) = (ran.stdout, ran.stderr);
    let out: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{scenario}: stdout is not one JSON object ({e}):\n{stdout}\n--- stderr ---\n{stderr}"
        )
    });
    Run {
        ok: ran.status.success(),
        out,
        stderr,
        elapsed: ran.elapsed,
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios and assertions

async fn started(s: &Scenario) -> ProxyProcess {
    s.import().await;
    let p = s.start().await;
    s.standin.clear_requests();
    p
}

/// The default scenario plus 12 networks in org 111 (15 in all: five pages of three).
async fn with_many_networks(opts: Options) -> (Scenario, Vec<String>) {
    let s = Scenario::new(opts).await;
    for i in 0..12 {
        s.standin.add_network(
            "111",
            &format!("N_111_{i:02}"),
            &format!("alice branch {i:02}"),
        );
    }
    let mut ids: Vec<String> = (0..3).map(|i| format!("L_111_{i}")).collect();
    ids.extend((0..12).map(|i| format!("N_111_{i:02}")));
    // The stand-in lists by id, like Meraki.
    ids.sort();
    (s, ids)
}

fn redirect_options() -> Options {
    Options {
        upstream: r#"redirect_hosts = ["127.0.0.1"]"#.into(),
        ..Default::default()
    }
}

/// A client that shows redirects instead of following them, with a bounded wait.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn ids_of(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|o| o[field].as_str().unwrap().to_string())
        .collect()
}

fn assert_unique(ids: &[String]) {
    let set: HashSet<&String> = ids.iter().collect();
    assert_eq!(set.len(), ids.len(), "duplicates in {ids:?}");
}

/// Every request that reached the stand-in came through the proxy: it carries the proxy's
/// User-Agent token and a bearer access token, and neither the client's key nor its header.
fn assert_all_through_the_proxy(reqs: &[Recorded], client_key: &str) {
    assert!(!reqs.is_empty(), "nothing reached the stand-in");
    for r in reqs {
        assert!(
            r.header("x-cisco-meraki-api-key").is_none(),
            "client key header forwarded: {r:?}"
        );
        let auth = r
            .header("authorization")
            .unwrap_or_else(|| panic!("no Authorization upstream: {r:?}"));
        assert!(
            auth.starts_with("Bearer ") && auth.len() > "Bearer ".len(),
            "{auth}"
        );
        for (name, value) in &r.headers {
            assert!(
                !value.contains(client_key),
                "the client key reached upstream in {name}: {r:?}"
            );
        }
        let ua = r.header("user-agent").unwrap_or_default();
        assert!(
            ua.contains("meraki-oauth-proxy/"),
            "a request reached the stand-in without passing the proxy (User-Agent {ua:?}): {r:?}"
        );
        assert!(
            r.path_and_query.starts_with("/api/v1/")
                && !r.path_and_query.starts_with("/api/v1/api/v1"),
            "upstream path: {}",
            r.path_and_query
        );
    }
}

/// Whatever the client saw came from the proxy: no 3xx, no `Location`, and no `Link` target that
/// leads anywhere but back through the proxy.
fn assert_client_stayed_on_the_proxy(run: &Run, s: &Scenario) {
    let origin = format!("http://127.0.0.1:{}/", s.port);
    let upstream_hosts = [
        s.standin.base_url(),
        s.standin
            .shard_api_base()
            .trim_end_matches("/api/v1")
            .to_string(),
    ];
    let seen = run.seen();
    assert!(!seen.is_empty(), "the client made no request: {}", run.out);
    for e in &seen {
        let url = e["url"].as_str().unwrap();
        assert!(url.starts_with(&origin), "the client left the proxy: {e}");
        let status = e["status"].as_u64().unwrap();
        assert!(
            !(300..400).contains(&status) && e["location"].is_null(),
            "the client was shown a redirect: {e}"
        );
        if let Some(link) = e["link"].as_str() {
            for host in &upstream_hosts {
                let host = format!("{}/", host.trim_start_matches("http://"));
                assert!(
                    !link.contains(&host),
                    "a Link leads around the proxy ({host}): {link}"
                );
            }
        }
    }
    if let Some(base) = run.out.get("base_url_after") {
        assert_eq!(
            base.as_str().unwrap(),
            s.base(),
            "the SDK changed its base URL"
        );
    }
}

/// The upstream requests for a listing, as (listener, path and query, status).
fn listing_requests(reqs: &[Recorded], path: &str) -> Vec<(String, String, u16)> {
    reqs.iter()
        .filter(|r| r.method == "GET" && r.path_and_query.split('?').next() == Some(path))
        .map(|r| (r.listener.to_string(), r.path_and_query.clone(), r.status))
        .collect()
}

/// What Meraki's pagination asks for, page after page: the first query, then one
/// `startingAfter=<last id of the previous page>` per further page, with `t0` as the stand-in
/// put it in the `Link` (byte for byte).
fn expected_pages(path: &str, ids: &[String], per_page: usize) -> Vec<String> {
    let mut pages = vec![format!("{path}?perPage={per_page}")];
    let mut end = per_page;
    while end < ids.len() {
        pages.push(format!(
            "{path}?perPage={per_page}&startingAfter={}&{T0}",
            ids[end - 1]
        ));
        end += per_page;
    }
    pages
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn sdk_get_organizations_sees_only_its_own_organizations() {
    let s = Scenario::new(Options::default()).await;
    let _p = started(&s).await;

    let alice = run_script(&s, ALICE_KEY, "getOrganizations", &[]).await;
    assert_eq!(ids_of(&alice.success()["result"], "id"), ["111"]);
    assert_eq!(alice.success()["result"][0]["name"], "Alice Org");
    assert_client_stayed_on_the_proxy(&alice, &s);
    let for_alice = s.standin.requests();
    assert_all_through_the_proxy(&for_alice, ALICE_KEY);
    assert!(
        for_alice
            .iter()
            .all(|r| !r.path_and_query.contains("/organizations/222")),
        "bob's organization was asked for alice: {for_alice:?}"
    );

    s.standin.clear_requests();
    let bob = run_script(&s, BOB_KEY, "getOrganizations", &[]).await;
    assert_eq!(ids_of(&bob.success()["result"], "id"), ["222"]);
    assert_client_stayed_on_the_proxy(&bob, &s);
    let for_bob = s.standin.requests();
    assert_all_through_the_proxy(&for_bob, BOB_KEY);
    assert!(
        for_bob
            .iter()
            .all(|r| !r.path_and_query.contains("/organizations/111")),
        "alice's organization was asked for bob: {for_bob:?}"
    );
    // Each organization is asked with its own grant's token.
    let tokens = |reqs: &[Recorded]| -> HashSet<String> {
        reqs.iter()
            .filter_map(|r| r.header("authorization").map(str::to_string))
            .collect()
    };
    assert!(tokens(&for_alice).is_disjoint(&tokens(&for_bob)));
}

#[tokio::test]
async fn sdk_walks_an_msps_organizations_by_the_proxys_links_from_one_listing() {
    // 251 organizations of one grant, the client's: six pages of 50 for the SDK, one upstream
    // listing for the proxy (plus the one of alice's own grant).
    let ids: Vec<String> = (300_000..300_250u64).map(|i| i.to_string()).collect();
    let orgs = ids
        .iter()
        .map(|o| format!("\"{o}\""))
        .chain(["\"111\"".to_owned()])
        .collect::<Vec<_>>()
        .join(", ");
    let key = "msp-sdk-key-1";
    let s = Scenario::new(Options {
        clients: format!(
            "[[clients]]\nname = \"msp\"\nkey_sha256 = \"{}\"\nintegration = \"netops\"\norganizations = [{orgs}]\n",
            digest_hex(key)
        ),
        ..Options::default()
    })
    .await;
    s.import().await;
    s.import_many(300_000, 250).await;
    let _p = s.start().await;
    s.standin.clear_requests();

    let run = run_script(&s, key, "getOrganizations_all", &[]).await;
    let got = ids_of(&run.success()["result"], "id");
    let mut want = ids.clone();
    want.push("111".into());
    want.sort();
    assert_eq!(got, want, "all 251 organizations, in order");
    assert_unique(&got);
    assert_client_stayed_on_the_proxy(&run, &s);
    let pages = run
        .seen()
        .into_iter()
        .filter(|e| e["url"].as_str().unwrap().contains("/organizations"))
        .count();
    assert_eq!(pages, 6, "six pages of 50: {:?}", run.seen());
    let reqs = s.standin.requests();
    assert_all_through_the_proxy(&reqs, key);
    let listings: Vec<&str> = reqs.iter().map(|r| r.path_and_query.as_str()).collect();
    assert_eq!(
        listings, ["/api/v1/organizations?perPage=9000"; 2],
        "one listing per grant, nothing per organization"
    );
}

#[tokio::test]
async fn sdk_fetches_every_page_through_the_proxy_with_cursors_untouched() {
    let (s, ids) = with_many_networks(Options::default()).await;
    let _p = started(&s).await;

    let run = run_script(&s, ALICE_KEY, "getOrganizationNetworks_all", &[]).await;
    let got = ids_of(&run.success()["result"], "id");
    assert_eq!(got, ids, "all 15 networks, in order");
    assert_unique(&got);
    assert_client_stayed_on_the_proxy(&run, &s);
    let pages: Vec<Value> = run
        .seen()
        .into_iter()
        .filter(|e| {
            e["url"]
                .as_str()
                .unwrap()
                .contains("/organizations/111/networks")
        })
        .collect();
    assert!(pages.len() >= 4, "several pages: {pages:?}");
    assert!(pages.iter().all(|e| e["status"] == 200), "{pages:?}");

    let reqs = s.standin.requests();
    assert_all_through_the_proxy(&reqs, ALICE_KEY);
    let path = "/api/v1/organizations/111/networks";
    let upstream: Vec<String> = listing_requests(&reqs, path)
        .into_iter()
        .map(|(listener, pq, status)| {
            assert_eq!((listener.as_str(), status), ("main", 200), "{pq}");
            pq
        })
        .collect();
    assert_eq!(upstream, expected_pages(path, &ids, 3));
}

#[tokio::test]
async fn rfc8288_client_resolving_links_against_the_request_url_walks_every_page() {
    let (s, ids) = with_many_networks(Options::default()).await;
    let _p = started(&s).await;

    let run = run_script(&s, ALICE_KEY, "rfc8288_walk", &[]).await;
    let got = ids_of(&run.success()["result"], "id");
    assert_eq!(got, ids);
    assert_unique(&got);
    assert_client_stayed_on_the_proxy(&run, &s);
    // Resolved against the request URL, each `next` is the proxy's own URL for the page.
    let urls: Vec<String> = run
        .seen()
        .iter()
        .map(|e| e["url"].as_str().unwrap().to_string())
        .collect();
    let proxy_origin = format!("http://127.0.0.1:{}", s.port);
    let expected: Vec<String> = expected_pages("/api/v1/organizations/111/networks", &ids, 3)
        .into_iter()
        .map(|pq| format!("{proxy_origin}{pq}"))
        .collect();
    assert_eq!(urls, expected);

    let reqs = s.standin.requests();
    assert_all_through_the_proxy(&reqs, ALICE_KEY);
    let path = "/api/v1/organizations/111/networks";
    let upstream: Vec<String> = listing_requests(&reqs, path)
        .into_iter()
        .map(|(_, pq, _)| pq)
        .collect();
    assert_eq!(upstream, expected_pages(path, &ids, 3));
}

#[tokio::test]
async fn upstream_redirect_is_followed_by_the_proxy_and_never_reaches_the_sdk() {
    let s = Scenario::new(redirect_options()).await;
    // Seven devices in org 111: three pages, the first of them served by the shard.
    for i in 2..=7 {
        s.standin.add_device(
            "L_111_1",
            &format!("Q111-AAAA-{i:04}"),
            &format!("alice ap {i}"),
        );
    }
    let serials: Vec<String> = (1..=7).map(|i| format!("Q111-AAAA-{i:04}")).collect();
    let _p = started(&s).await;
    s.standin.redirect_next_to_shard(1);

    let run = run_script(&s, ALICE_KEY, "getOrganizationDevices", &[]).await;
    let out = run.success();
    let got = ids_of(&out["result"], "serial");
    assert_eq!(got, serials);
    assert_unique(&got);
    assert_eq!(
        out["second"]["id"], "111",
        "a second call after the redirect still works"
    );
    assert_client_stayed_on_the_proxy(&run, &s);

    let reqs = s.standin.requests();
    assert_all_through_the_proxy(&reqs, ALICE_KEY);
    let path = "/api/v1/organizations/111/devices";
    let pages = expected_pages(path, &serials, 3);
    let got: Vec<(&str, &str, u16)> = reqs
        .iter()
        .map(|r| (r.listener, r.path_and_query.as_str(), r.status))
        .collect();
    assert_eq!(
        got,
        [
            ("main", pages[0].as_str(), 302),
            ("shard", pages[0].as_str(), 200),
            ("main", pages[1].as_str(), 200),
            ("main", pages[2].as_str(), 200),
            ("main", "/api/v1/organizations/111", 200),
        ],
        "redirect followed to the shard, then every request through the proxy to the upstream"
    );
}

#[tokio::test]
async fn sdk_update_after_token_expiry_is_refreshed_and_retried_once() {
    let s = Scenario::new(Options::default()).await;
    let _p = started(&s).await;
    let calls = s.standin.token_calls();
    s.standin.expire_all_access_tokens();

    let run = run_script(&s, ALICE_KEY, "updateNetwork", &[]).await;
    let out = run.success();
    assert_eq!(out["result"]["name"], "renamed by the sdk");
    assert_client_stayed_on_the_proxy(&run, &s);
    // The SDK never saw the 401. (Its smart flow, on by default, first looks the network up and
    // loads the organization's networks and inventory; the stand-in has no inventoryDevices
    // endpoint, and the SDK ignores that 404.)
    for e in run.seen() {
        let url = e["url"].as_str().unwrap();
        assert!(
            e["status"] == 200 || (e["status"] == 404 && url.contains("/inventoryDevices?")),
            "the SDK saw an error: {e}"
        );
    }
    assert!(
        run.seen()
            .iter()
            .any(|e| e["method"] == "PUT" && e["status"] == 200),
        "{:?}",
        run.seen()
    );
    let network = s.standin.network("L_111_0").unwrap();
    assert_eq!(network["name"], "renamed by the sdk");
    assert_eq!(network["tags"], serde_json::json!(["sdk", "interop"]));
    assert_eq!(s.standin.token_calls(), calls + 1, "one refresh");

    let reqs = s.standin.requests();
    assert_all_through_the_proxy(&reqs, ALICE_KEY);
    let statuses: Vec<u16> = reqs.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses.iter().filter(|&&st| st == 401).count(),
        1,
        "one 401, then the retry with the new token: {statuses:?}"
    );
    let first_401 = reqs.iter().position(|r| r.status == 401).unwrap();
    let (failed, retried) = (&reqs[first_401], &reqs[first_401 + 1]);
    assert_eq!(
        (&failed.method, &failed.path_and_query),
        (&retried.method, &retried.path_and_query),
        "the request that saw the 401 is the one retried"
    );
    assert_eq!(retried.status, 200);
    assert_ne!(
        failed.header("authorization"),
        retried.header("authorization")
    );
    let puts: Vec<&Recorded> = reqs.iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(puts.len(), 1, "the write reached Meraki once: {reqs:?}");
    assert_eq!(puts[0].path_and_query, "/api/v1/networks/L_111_0");
    assert_eq!(puts[0].status, 200);
    let body: Value = serde_json::from_slice(&puts[0].body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"name": "renamed by the sdk", "tags": ["sdk", "interop"]})
    );
}

#[tokio::test]
async fn sdk_honours_a_passed_through_429_and_retry_after() {
    let s = Scenario::new(Options::default()).await;
    let _p = started(&s).await;
    s.standin.rate_limit_next(1, 1);

    let run = run_script(&s, ALICE_KEY, "getOrganization", &[]).await;
    let out = run.success();
    assert_eq!(out["result"]["id"], "111");
    assert_client_stayed_on_the_proxy(&run, &s);
    let statuses: Vec<u64> = run
        .seen()
        .iter()
        .map(|e| e["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [429, 200],
        "the SDK saw the 429, waited and retried: {:?}",
        run.seen()
    );
    assert_eq!(
        run.seen()[0]["retry_after"],
        "1",
        "integer Retry-After passed through"
    );
    assert!(
        run.elapsed >= Duration::from_secs(1),
        "the SDK waited Retry-After: {:?}",
        run.elapsed
    );

    let reqs = s.standin.requests();
    assert_all_through_the_proxy(&reqs, ALICE_KEY);
    // The SDK's own User-Agent (with its caller) travels on, the proxy's token appended.
    let sdk_ua =
        format!("python-meraki/{SDK_VERSION} Caller/(SdkInteropTest/1.0 MerakiOAuthProxy)");
    for r in &reqs {
        let ua = r.header("user-agent").unwrap();
        assert!(
            ua.starts_with(&sdk_ua) && ua.contains(" meraki-oauth-proxy/"),
            "{ua}"
        );
    }
    let got: Vec<(&str, u16)> = reqs
        .iter()
        .map(|r| (r.path_and_query.as_str(), r.status))
        .collect();
    assert_eq!(
        got,
        [
            ("/api/v1/organizations/111", 429),
            ("/api/v1/organizations/111", 200)
        ],
        "the proxy passed the 429 on instead of retrying itself"
    );
}

/// Issue 15: three SDK processes (each with its own smart flow at 9 requests/s: 27/s in all)
/// on one organization behind the proxy, against a stand-in enforcing Meraki's 10 requests/s:
/// the proxy's shaping keeps Meraki from answering 429 at all, and every script completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sdk_processes_on_one_organization_complete_with_no_upstream_429() {
    let s = Scenario::new(Options {
        rate_limits: "enabled = true".into(),
        ..Default::default()
    })
    .await;
    let p = started(&s).await;
    s.standin.enforce_rate_limit(10.0, 10.0);
    let calls = 30;
    let env = [("SDK_CALLS", "30"), ("SDK_NETWORK_ID", "L_111_1")];
    let (a, b, c) = tokio::join!(
        run_script(&s, ALICE_KEY, "workload", &env),
        run_script(&s, ALICE_KEY, "workload", &env),
        run_script(&s, ALICE_KEY, "workload", &env),
    );
    for run in [&a, &b, &c] {
        assert_eq!(run.success()["result"]["calls"], calls);
        assert_client_stayed_on_the_proxy(run, &s);
    }
    let local_429s: usize = [&a, &b, &c]
        .iter()
        .flat_map(|r| r.seen())
        .filter(|e| e["status"] == 429)
        .count();
    let log = s.standin.rate_log();
    println!(
        "3 SDK processes x {calls} calls: {:?} {:?} {:?}; stand-in: {} requests, {} 429s; SDK saw {local_429s} local 429s",
        a.elapsed,
        b.elapsed,
        c.elapsed,
        log.len(),
        s.standin.rate_limited()
    );
    assert_eq!(s.standin.rate_limited(), 0, "Meraki answered 429");
    assert!(log.len() >= 3 * calls as usize);
    let (_, metrics) = p.admin("/metrics").await;
    assert!(metrics.contains("meraki_proxy_upstream_429_total{organization=\"111\"} 0"));
}

#[tokio::test]
async fn sdk_action_batch_is_applied() {
    let s = Scenario::new(Options::default()).await;
    let _p = started(&s).await;

    let run = run_script(&s, ALICE_KEY, "createOrganizationActionBatch", &[]).await;
    let out = run.success();
    let batch = &out["result"];
    assert_eq!(batch["organizationId"], "111");
    assert_eq!(batch["confirmed"], true);
    assert_eq!(batch["status"]["completed"], true, "{batch}");
    assert_eq!(batch["status"]["failed"], false, "{batch}");
    assert_client_stayed_on_the_proxy(&run, &s);
    let network = s.standin.network("L_111_0").unwrap();
    assert_eq!(network["name"], "renamed by an action batch");
    assert_eq!(network["tags"], serde_json::json!(["batched"]));

    let reqs = s.standin.requests();
    assert_all_through_the_proxy(&reqs, ALICE_KEY);
    let posts: Vec<&Recorded> = reqs.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(posts.len(), 1, "{reqs:?}");
    assert_eq!(
        posts[0].path_and_query,
        "/api/v1/organizations/111/actionBatches"
    );
    assert_eq!(posts[0].status, 201);
    let body: Value = serde_json::from_slice(&posts[0].body).unwrap();
    assert_eq!(body["confirmed"], true);
    assert_eq!(body["synchronous"], true);
    assert_eq!(body["actions"][0]["resource"], "/networks/L_111_0");
}

#[tokio::test]
async fn a_307_on_a_write_is_followed_with_its_method_and_body() {
    let s = Scenario::new(redirect_options()).await;
    let _p = started(&s).await;
    // Warm the proxy's network lookup, so that the redirect lands on the POST itself.
    let r = reqwest::Client::new()
        .get(format!("{}/networks/L_111_0", s.base()))
        .header("X-Cisco-Meraki-API-Key", ALICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.standin.clear_requests();
    s.standin.redirect_next_to_shard(1);

    let run = run_script(&s, ALICE_KEY, "createOrganizationActionBatch", &[]).await;
    assert_eq!(run.success()["result"]["status"]["completed"], true);
    assert_client_stayed_on_the_proxy(&run, &s);
    assert_eq!(
        s.standin.network("L_111_0").unwrap()["name"],
        "renamed by an action batch"
    );
    let reqs = s.standin.requests();
    assert_all_through_the_proxy(&reqs, ALICE_KEY);
    let posts: Vec<&Recorded> = reqs.iter().filter(|r| r.method == "POST").collect();
    let got: Vec<(&str, u16)> = posts.iter().map(|r| (r.listener, r.status)).collect();
    assert_eq!(got, [("main", 307), ("shard", 201)], "{reqs:?}");
    assert_eq!(posts[0].body, posts[1].body, "the same body to the shard");
    assert!(!posts[1].body.is_empty());
}

#[tokio::test]
async fn sdk_gets_a_meraki_style_error_for_another_organization() {
    let s = Scenario::new(Options::default()).await;
    let _p = started(&s).await;

    let run = run_script(&s, BOB_KEY, "getOrganization", &[("SDK_ORG_ID", "111")]).await;
    assert!(!run.ok, "exit status 1: {}", run.out);
    assert_eq!(run.out["error"], "APIError", "{}", run.out);
    assert_eq!(run.out["status"], 403, "{}", run.out);
    assert!(
        run.out["message"]["errors"][0].is_string(),
        "the SDK read errors[0]: {}",
        run.out
    );
    assert!(
        s.standin.requests().is_empty(),
        "nothing forwarded: {:?}",
        s.standin.requests()
    );
}

#[tokio::test]
async fn redirect_to_a_host_that_is_not_allowed_is_a_502_and_is_not_followed() {
    let s = Scenario::new(redirect_options()).await;
    let _p = started(&s).await;
    // Another server on loopback, by a host name that is not allowed ("localhost", not
    // "127.0.0.1"), to see that nothing reaches it.
    let evil = Standin::start().await;
    let evil_url = format!(
        "http://localhost:{}/api/v1/organizations/111",
        evil.addr().port()
    );

    for location in [
        "http://evil.example.test/api/v1/organizations/111",
        evil_url.as_str(),
    ] {
        s.standin.clear_requests();
        s.standin.set_redirect_location(1, location);
        // A new connection each time: what happens to a reused one is the next test's subject.
        let r = no_redirects()
            .get(format!("{}/organizations/111", s.base()))
            .header("X-Cisco-Meraki-API-Key", ALICE_KEY)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{location}: no answer from the proxy ({e})\n--- proxy log ---\n{}",
                    s.logs()
                )
            });
        assert_eq!(r.status(), 502, "{location}");
        assert!(
            r.headers().get("location").is_none(),
            "no redirect shown: {location}"
        );
        let body: Value = r.json().await.unwrap();
        assert!(
            body["errors"][0].as_str().is_some_and(|e| !e.is_empty()),
            "Meraki-style error body: {body}"
        );
        let reqs = s.standin.requests();
        let got: Vec<(&str, &str, u16)> = reqs
            .iter()
            .map(|r| (r.listener, r.path_and_query.as_str(), r.status))
            .collect();
        assert_eq!(
            got,
            [("main", "/api/v1/organizations/111", 302)],
            "{location}"
        );
    }
    assert!(
        evil.requests().is_empty(),
        "the disallowed host was contacted: {:?}",
        evil.requests()
    );
}

#[tokio::test]
async fn a_proxy_made_502_keeps_the_connection_it_announces() {
    let s = Scenario::new(redirect_options()).await;
    let _p = started(&s).await;
    s.standin
        .set_redirect_location(1, "http://evil.example.test/api/v1/organizations/111");
    let mut conn = RawConnection::open(s.port).await;
    let (status, headers, body) = conn.get("/api/v1/organizations/111", ALICE_KEY).await;
    assert_eq!(status, 502, "{body}");
    let close = headers
        .iter()
        .any(|(n, v)| n == "connection" && v.eq_ignore_ascii_case("close"));
    if close {
        return; // Announced: a client opens a new connection.
    }
    // Keep-alive announced (explicitly or by HTTP/1.1 default): a client reuses the connection,
    // possibly a moment later.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let next = conn.try_get("/api/v1/organizations/111", ALICE_KEY).await;
    assert!(
        matches!(next, Ok((200, _, _))),
        "the 502 announced keep-alive ({headers:?}), but the next request on that connection \
         got {next:?}"
    );
}

/// One HTTP/1.1 client connection, by hand, to see what the proxy does with it.
struct RawConnection {
    stream: tokio::net::TcpStream,
    port: u16,
}

impl RawConnection {
    async fn open(port: u16) -> RawConnection {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        RawConnection { stream, port }
    }

    async fn get(&mut self, path: &str, key: &str) -> (u16, Vec<(String, String)>, String) {
        self.try_get(path, key).await.unwrap()
    }

    /// GET `path`; the status, the headers (names lowercase) and the body (Content-Length).
    async fn try_get(
        &mut self,
        path: &str,
        key: &str,
    ) -> Result<(u16, Vec<(String, String)>, String), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-Cisco-Meraki-API-Key: {key}\r\n\r\n",
            self.port
        );
        let exchange = async {
            self.stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let mut lines = head.split("\r\n");
                    let status: u16 = lines
                        .next()
                        .and_then(|l| l.split(' ').nth(1))
                        .and_then(|c| c.parse().ok())
                        .ok_or_else(|| format!("bad status line: {head}"))?;
                    let headers: Vec<(String, String)> = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .collect();
                    let len: usize = headers
                        .iter()
                        .find(|(n, _)| n == "content-length")
                        .and_then(|(_, v)| v.parse().ok())
                        .ok_or_else(|| format!("no Content-Length: {head}"))?;
                    while buf.len() < end + 4 + len {
                        let n = self
                            .stream
                            .read(&mut chunk)
                            .await
                            .map_err(|e| format!("read body: {e}"))?;
                        if n == 0 {
                            return Err("closed in the body".to_string());
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                    return Ok((status, headers, body));
                }
                let n = self
                    .stream
                    .read(&mut chunk)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    return Err("connection closed by the proxy before an answer".to_string());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| "no answer within 10 s".to_string())?
    }
}
