//! The fleet on PostgreSQL, measured (issue: "a fleet on PostgreSQL"):
//!
//! 1. the refresh path with 1 and 3 instances on one PostgreSQL, short tokens (6 s) and a slow
//!    token endpoint (300 ms), under load spread over the instances: token calls per expiry,
//!    `invalid_grant` answers (replays), client errors, and the lease wait (p50/p99, from the
//!    instances' `meraki_proxy_store_operation_duration_seconds{op="lease"}` histograms);
//! 2. the request path's throughput with the PostgreSQL store and with the embedded one, one
//!    instance each, same load, same run: the hot path does not touch the database, so they
//!    should match within noise;
//! 3. the database load of a fleet at its defaults (rate shaping on, the demand exchange every
//!    250 ms): transactions per second per instance (`pg_stat_database.xact_commit`) and demand
//!    exchanges per second per instance, under load and whatever the request rate.
//!
//! ```text
//! cargo bench --bench fleet              # 24-s refresh runs, 10-s throughput runs
//! QUICK=1 cargo bench --bench fleet      # CI: 8-s and 3-s runs; fails only on errors
//! ```
//!
//! Real processes on loopback (the release binary), a throwaway PostgreSQL cluster (initdb in
//! a temporary directory), the Rust Meraki stand-in. Every loop is bounded in time.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::harness::*;
use support::pg::PgCluster;

fn quick() -> bool {
    std::env::var("QUICK").is_ok_and(|v| v == "1")
}

/// Closed-loop GETs from `workers` connections over `bases` for `secs`: (ok, errors).
async fn load(bases: &[String], workers: usize, secs: f64) -> (usize, usize) {
    let ok = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let base = bases[w % bases.len()].clone();
            let (ok, bad) = (ok.clone(), bad.clone());
            tokio::spawn(async move {
                let http = http();
                for i in 0..10_000_000u64 {
                    if Instant::now() >= until {
                        break;
                    }
                    let (path, key) = if (w as u64 + i) % 2 == 0 {
                        ("/organizations/111/networks", ALICE_KEY)
                    } else {
                        ("/organizations/222/networks", BOB_KEY)
                    };
                    let r = http
                        .get(format!("{base}{path}"))
                        .header("X-Cisco-Meraki-API-Key", key)
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
        t.await.unwrap();
    }
    (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed))
}

/// The `op="lease"` histogram of every instance, merged: (upper bound → count), total count.
async fn lease_buckets(procs: &[ProxyProcess]) -> (BTreeMap<u64, u64>, u64) {
    let mut buckets: BTreeMap<u64, u64> = BTreeMap::new();
    let mut count = 0;
    for p in procs {
        let (_, m) = p.admin("/metrics").await;
        for line in m.lines() {
            let Some(rest) =
                line.strip_prefix("meraki_proxy_store_operation_duration_seconds_bucket{")
            else {
                if let Some(v) = line.strip_prefix(
                    "meraki_proxy_store_operation_duration_seconds_count{op=\"lease\"} ",
                ) {
                    count += v.parse::<u64>().unwrap_or(0);
                }
                continue;
            };
            if !rest.contains("op=\"lease\"") {
                continue;
            }
            let le = rest.split("le=\"").nth(1).and_then(|r| r.split('"').next());
            let value = line.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok());
            if let (Some(le), Some(v)) = (le, value) {
                let micros = if le == "+Inf" {
                    u64::MAX
                } else {
                    (le.parse::<f64>().unwrap_or(0.0) * 1e6) as u64
                };
                *buckets.entry(micros).or_default() += v;
            }
        }
    }
    (buckets, count)
}

/// The bucket bound under which `q` of the observations fall.
fn quantile(buckets: &BTreeMap<u64, u64>, total: u64, q: f64) -> String {
    if total == 0 {
        return "-".into();
    }
    let want = (total as f64 * q).ceil() as u64;
    for (bound, cumulative) in buckets {
        if *cumulative >= want {
            return if *bound == u64::MAX {
                "> 30 s".into()
            } else {
                format!("≤ {} ms", *bound as f64 / 1000.0)
            };
        }
    }
    "-".into()
}

struct RefreshRun {
    instances: usize,
    secs: f64,
    requests: usize,
    errors: usize,
    token_calls: usize,
    refused: usize,
    lease_waits: u64,
    p50: String,
    p99: String,
}

async fn refresh_run(pg: &PgCluster, instances: usize, secs: f64) -> RefreshRun {
    let s = Scenario::new(Options {
        store_url: Some(pg.create_db(&format!("bench_fleet_{instances}"))),
        store: "sync_secs = 1".into(),
        // The load is far above Meraki's 10/s per organization on purpose: this bench counts
        // token calls under load, not the rate shaping.
        rate_limits: UNSHAPED.into(),
        ..Default::default()
    })
    .await;
    s.standin.set_access_ttl(6);
    s.import().await;
    s.standin.set_token_delay(Duration::from_millis(300));
    let mut procs = Vec::new();
    for i in 0..instances {
        procs.push(s.start_instance(i, &[]).await);
    }
    let bases: Vec<String> = procs.iter().map(|p| p.base()).collect();
    let calls_before = s.standin.token_calls();
    let (requests, errors) = load(&bases, 16, secs).await;
    let (buckets, lease_waits) = lease_buckets(&procs).await;
    RefreshRun {
        instances,
        secs,
        requests,
        errors,
        token_calls: s.standin.token_calls() - calls_before,
        refused: s.standin.refused_refreshes(),
        lease_waits,
        p50: quantile(&buckets, lease_waits, 0.5),
        p99: quantile(&buckets, lease_waits, 0.99),
    }
}

async fn throughput(store_url: Option<String>, secs: f64) -> (f64, usize) {
    let s = Scenario::new(Options {
        store_url,
        // Measures the request path at saturation, not Meraki's 10/s.
        rate_limits: UNSHAPED.into(),
        ..Default::default()
    })
    .await;
    s.import().await;
    let p = s.start_instance(0, &[]).await;
    // Warm the connection pools and caches.
    let _ = load(std::slice::from_ref(&p.base()), 8, 0.5).await;
    let (ok, bad) = load(&[p.base()], 32, secs).await;
    (ok as f64 / secs, bad)
}

/// Three instances at their defaults under load for `secs`: (transactions/s per instance,
/// demand exchanges/s per instance, requests served).
async fn database_load(pg: &PgCluster, secs: f64) -> (f64, f64, usize, usize) {
    let db = "bench_dbload";
    let s = Scenario::new(Options {
        store_url: Some(pg.create_db(db)),
        ..Default::default()
    })
    .await;
    s.import().await;
    let mut procs = Vec::new();
    for i in 0..3 {
        procs.push(s.start_instance(i, &[]).await);
    }
    let bases: Vec<String> = procs.iter().map(|p| p.base()).collect();
    let commits = || -> f64 {
        pg.psql(
            db,
            &format!("SELECT xact_commit FROM pg_stat_database WHERE datname = '{db}'"),
        )
        .parse()
        .unwrap_or(0.0)
    };
    let exchanges = |m: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with("meraki_proxy_fleet_exchanges_total{outcome=\"ok\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let mut before = 0.0;
    for p in &procs {
        before += exchanges(&p.admin("/metrics").await.1);
    }
    let c0 = commits();
    let t0 = Instant::now();
    let (ok, bad) = load(&bases, 8, secs).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let c1 = commits();
    let mut after = 0.0;
    for p in &procs {
        after += exchanges(&p.admin("/metrics").await.1);
    }
    // The statistics collector reports with a delay; the psql calls are themselves counted.
    (
        (c1 - c0) / 3.0 / elapsed,
        (after - before) / 3.0 / elapsed,
        ok,
        bad,
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let (refresh_secs, tput_secs) = if quick() { (8.0, 3.0) } else { (24.0, 10.0) };
    let pg = PgCluster::start();
    let mut failed = false;

    println!("== refresh path: 6-s tokens, 300-ms token endpoint, 16 connections, 2 grants");
    println!(
        "{:>9} {:>9} {:>7} {:>12} {:>17} {:>14} {:>11} {:>10} {:>10}",
        "instances",
        "requests",
        "errors",
        "token calls",
        "calls/lifetime",
        "invalid_grant",
        "lease waits",
        "wait p50",
        "wait p99"
    );
    for n in [1, 3] {
        let r = refresh_run(&pg, n, refresh_secs).await;
        // Token lifetimes elapsed, both grants together. Tokens shorter than refresh_ahead_secs
        // are refreshed at half-life: two calls per lifetime is one call per need, and the
        // figure must not grow with the number of instances.
        let expiries = 2.0 * r.secs / 6.0;
        println!(
            "{:>9} {:>9} {:>7} {:>12} {:>17.2} {:>14} {:>11} {:>10} {:>10}",
            r.instances,
            r.requests,
            r.errors,
            r.token_calls,
            r.token_calls as f64 / expiries,
            r.refused,
            r.lease_waits,
            r.p50,
            r.p99
        );
        failed |= r.errors > 0 || r.refused > 0;
    }

    println!("== request path: one instance, 32 connections, tokens valid throughout");
    let (sqlite, e1) = throughput(None, tput_secs).await;
    let (postgres, e2) = throughput(Some(pg.create_db("bench_tput")), tput_secs).await;
    println!("embedded store: {sqlite:>9.0} req/s");
    println!(
        "PostgreSQL:     {postgres:>9.0} req/s  ({:.2}x the embedded store)",
        postgres / sqlite
    );
    failed |= e1 > 0 || e2 > 0;

    let db_secs = if quick() { 6.0 } else { 20.0 };
    println!(
        "== database load: three instances at their defaults (shaped), 8 connections, {db_secs} s"
    );
    let (tps, exchanges, ok, refused) = database_load(&pg, db_secs).await;
    println!(
        "transactions/s per instance: {tps:.1}; demand exchanges/s per instance: {exchanges:.2}; requests: {ok} served, {refused} other (local 429s: Meraki's 10/s per organization)"
    );
    failed |= exchanges < 1.0;
    if failed {
        eprintln!("fleet bench: errors or invalid_grant answers (see above)");
        std::process::exit(1);
    }
}
