//! Scale, measured (issue 25, "built for MSPs"): the real binary in front of the Meraki stand-in
//! at 10 / 1,000 / 2,000 / 10,000 organizations and 10 / 5,000 / 20,000 / 50,000 client keys.
//!
//! Each size: one grant over every organization (an MSP's consent), one key on every
//! organization (client `i` on organization `i mod N`), and one key on all of them. Measured:
//!
//! - **start**: from spawning the process to its admin listener answering;
//! - **RSS** after the load;
//! - **CPU per request**: the proxy process's user + system CPU (`/proc/PID/stat`) over a
//!   closed-loop load of `GET /organizations/{id}/networks` spread over every key, divided by
//!   the requests; and its ratio to the first size's (the bar: ≤ 1.3× at 2,000 organizations and
//!   20,000 keys against 10 and 10);
//! - **`GET /organizations`** for the all-organizations key: upstream calls and time, cold (the
//!   first after start) and warm (cached listing);
//! - **`/metrics`**: series and bytes after the load; **status page** bytes; **reload** time
//!   (`POST /admin/reload`, which re-reads the whole configuration).
//!
//! ```text
//! cargo bench --bench scale                          # the four sizes
//! QUICK=1 cargo bench --bench scale                  # CI: 10x10 and 200x1000
//! SIZES=10x10,2000x20000,10x10,2000x20000 cargo bench --bench scale
//! PERF_RECORD=/tmp SIZES=10x10,2000x20000 cargo bench --bench scale   # perf record of each load
//! ```
//!
//! Rate shaping is set out of the way (`harness::UNSHAPED`): the load is far above Meraki's 10
//! requests/s per organization on purpose, and the subject is the proxy's own cost. Every loop is
//! bounded; nothing is asserted about timings.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::harness::*;

fn quick() -> bool {
    std::env::var("QUICK").is_ok_and(|v| v == "1")
}

/// (organizations, keys) to run.
fn sizes() -> Vec<(usize, usize)> {
    if let Ok(list) = std::env::var("SIZES") {
        return list
            .split(',')
            .filter_map(|s| {
                let (o, k) = s.trim().split_once('x')?;
                Some((o.parse().ok()?, k.parse().ok()?))
            })
            .collect();
    }
    if quick() {
        vec![(10, 10), (200, 1000)]
    } else {
        vec![(10, 10), (1000, 5000), (2000, 20_000), (10_000, 50_000)]
    }
}

/// The process's user + system CPU time, from `/proc/PID/stat`.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) — utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / clock_ticks())
}

/// Clock ticks per second (`getconf CLK_TCK`), read once.
fn clock_ticks() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Row {
    orgs: usize,
    keys: usize,
    start: Duration,
    rss: f64,
    cpu_per_request: Duration,
    requests: usize,
    errors: usize,
    list_cold: (usize, Duration),
    list_warm: (usize, Duration),
    listed: usize,
    series: usize,
    metrics_bytes: usize,
    status_bytes: usize,
    reload: Duration,
}

/// Closed-loop GETs, `workers` at once, `total` in all, request `i` as key `i * 7919 mod keys`
/// on its organization: (ok, errors).
async fn load(base: String, keys: usize, orgs: Arc<Vec<String>>, total: usize) -> (usize, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(AtomicUsize::new(0));
    let workers = 16;
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (next, ok, bad, base, orgs) = (
                next.clone(),
                ok.clone(),
                bad.clone(),
                base.clone(),
                orgs.clone(),
            );
            tokio::spawn(async move {
                let http = http();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let k = (i * 7919) % keys;
                    let org = &orgs[k % orgs.len()];
                    let r = http
                        .get(format!("{base}/organizations/{org}/networks"))
                        .header("X-Cisco-Meraki-API-Key", format!("c-key-{k}"))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.bytes().await;
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed))
}

/// Upstream listings the stand-in saw.
fn listings(s: &Scenario) -> usize {
    s.standin
        .requests()
        .iter()
        .filter(|r| r.path_and_query.split('?').next() == Some("/api/v1/organizations"))
        .count()
}

async fn run_size(orgs_n: usize, keys: usize, requests: usize) -> Row {
    let first = 500_000u64;
    let orgs: Vec<String> = (first..first + orgs_n as u64)
        .map(|i| i.to_string())
        .collect();
    let mut clients = many_clients("c", keys, |i| vec![orgs[i % orgs_n].clone()]);
    let all = orgs
        .iter()
        .map(|o| format!("\"{o}\""))
        .collect::<Vec<_>>()
        .join(", ");
    clients.push_str(&format!(
        "[[clients]]\nname = \"msp-all\"\nkey_sha256 = \"{}\"\nintegration = \"netops\"\norganizations = [{all}]\n",
        digest_hex("msp-all-key")
    ));
    let s = Scenario::new(Options {
        clients,
        rate_limits: UNSHAPED.into(),
        ..Options::default()
    })
    .await;
    s.import().await;
    s.import_many(first, orgs_n).await;

    // Start: spawn to the admin listener answering (polled every 2 ms).
    let log = s.dir.path().join("proxy-bench.log");
    let out = std::fs::File::create(&log).unwrap();
    let started = Instant::now();
    let mut child = s
        .serving_command()
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap();
    let pid = child.id();
    let health = format!("http://127.0.0.1:{}/healthz", s.admin_port);
    let probe = reqwest::Client::new();
    let start = loop {
        if probe.get(&health).send().await.is_ok() {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the proxy did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let admin = |path: &str| format!("http://127.0.0.1:{}{path}", s.admin_port);

    // GET /organizations for the all-organizations key: cold, then warm.
    s.standin.clear_requests();
    // Every page, by the proxy's `Link rel=next` (9,000 organizations a page at most).
    let list = || async {
        let t = Instant::now();
        let mut listed = 0;
        let mut url = format!("{}/organizations", s.base());
        for _ in 0..100 {
            let r = http()
                .get(&url)
                .header("X-Cisco-Meraki-API-Key", "msp-all-key")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let next = r
                .headers()
                .get("link")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.split(", ").find(|l| l.ends_with("rel=next")).map(|l| {
                        l.split('>')
                            .next()
                            .unwrap_or("")
                            .trim_start_matches('<')
                            .to_owned()
                    })
                });
            let body: serde_json::Value = r.json().await.unwrap();
            listed += body.as_array().map_or(0, Vec::len);
            match next {
                Some(n) => url = format!("http://127.0.0.1:{}{n}", s.port),
                None => break,
            }
        }
        (t.elapsed(), listed)
    };
    let (cold, listed) = list().await;
    let cold_calls = listings(&s);
    let (warm, _) = list().await;
    let warm_calls = listings(&s) - cold_calls;

    // CPU per request: a warm-up, then the measured load.
    let orgs = Arc::new(orgs);
    let _ = load(s.base(), keys, orgs.clone(), requests / 10).await;
    let perf = std::env::var("PERF_RECORD").ok().map(|dir| {
        let data = format!("{dir}/perf-{orgs_n}x{keys}.data");
        std::process::Command::new("perf")
            .args([
                "record",
                "-F",
                "1999",
                "-g",
                "-o",
                &data,
                "-p",
                &pid.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("perf")
    });
    let cpu0 = cpu(pid);
    let (ok, errors) = load(s.base(), keys, orgs.clone(), requests).await;
    let cpu_used = cpu(pid).saturating_sub(cpu0);
    if let Some(mut perf) = perf {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait();
    }
    let rss = rss_mib(pid);

    let metrics = http()
        .get(admin("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = metrics
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    let status = http()
        .get(admin("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let t = Instant::now();
    let r = http().post(admin("/admin/reload")).send().await.unwrap();
    let reload = t.elapsed();
    assert!(r.status().is_success(), "reload: {}", r.status());
    let _ = child.kill();
    let _ = child.wait();
    Row {
        orgs: orgs_n,
        keys,
        start,
        rss,
        cpu_per_request: cpu_used / ok.max(1) as u32,
        requests: ok,
        errors,
        list_cold: (cold_calls, cold),
        list_warm: (warm_calls, warm),
        listed,
        series,
        metrics_bytes: metrics.len(),
        status_bytes: status.len(),
        reload,
    }
}

fn ms(d: Duration) -> String {
    if d < Duration::from_millis(10) {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.0} ms", d.as_secs_f64() * 1000.0)
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let requests = if quick() { 2_000 } else { 20_000 };
    println!(
        "scale bench: {} requests per size, 16 connections, release binary {BIN}",
        requests
    );
    println!();
    println!("| orgs | keys | start | RSS | CPU/request | ratio | `GET /organizations` cold (calls, time) | warm (calls, time) | `/metrics` series, bytes | status page | reload |");
    println!("|---:|---:|---:|---:|---:|---:|---|---|---|---:|---:|");
    let mut base: Option<Duration> = None;
    let mut rows = Vec::new();
    for (orgs, keys) in sizes() {
        let r = run_size(orgs, keys, requests).await;
        let b = *base.get_or_insert(r.cpu_per_request);
        let ratio = r.cpu_per_request.as_secs_f64() / b.as_secs_f64().max(1e-9);
        println!(
            "| {} | {} | {:.2} s | {:.0} MiB | {:.0} µs | {ratio:.2}× | {}, {} | {}, {} | {}, {} kB | {} kB | {} |",
            r.orgs,
            r.keys,
            r.start.as_secs_f64(),
            r.rss,
            r.cpu_per_request.as_secs_f64() * 1e6,
            r.list_cold.0,
            ms(r.list_cold.1),
            r.list_warm.0,
            ms(r.list_warm.1),
            r.series,
            r.metrics_bytes / 1000,
            r.status_bytes / 1000,
            ms(r.reload),
        );
        if r.errors > 0 || r.listed != r.orgs {
            eprintln!(
                "   {}x{}: {} requests failed of {}, {} organizations listed of {}",
                r.orgs,
                r.keys,
                r.errors,
                r.errors + r.requests,
                r.listed,
                r.orgs
            );
        }
        rows.push(r);
    }
    let failed = rows.iter().any(|r| r.errors > 0 || r.listed != r.orgs);
    if failed {
        eprintln!("scale bench: some requests failed (see above)");
        std::process::exit(1);
    }
}
