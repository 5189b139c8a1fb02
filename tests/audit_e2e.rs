//! The audit log on a filesystem that fills, with the real binary: nothing is forwarded without
//! its record, the proxy says the sink fails (503s, `/readyz`, metrics, status page), recovers
//! when space returns without a torn line or a lost record, and `audit verify` finds the chain
//! intact and signed. The small filesystem is a tmpfs the test mounts (root only).

mod support;

use nix::sys::signal::Signal;
use reqwest::Method;
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::harness::*;

const HMAC_KEY: &str = "audit-hmac-key-5ecret-0123456789abcdef";

/// A tmpfs mounted for the test, unmounted on drop (also when an assertion fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs failed");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fills the filesystem of `dir` until a write fails for want of space.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = [0x5a_u8; 4096];
    // Bounded: the filesystem is 256 KiB.
    for _ in 0..1024 {
        if f.write_all(&block).and_then(|()| f.flush()).is_err() {
            return path;
        }
    }
    panic!("the filesystem did not fill");
}

/// One GET of a path no other request uses; its status, `Retry-After`, `X-Proxy-Upstream`, body.
async fn get(s: &Scenario, n: usize) -> (u16, Option<String>, Option<String>, String) {
    let r = s
        .script(
            Method::GET,
            &format!("/networks/L_111_{}?audit_probe={n}", n % 3),
            ALICE_KEY,
        )
        .send()
        .await
        .unwrap();
    let header = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (retry, upstream) = (header("retry-after"), header("x-proxy-upstream"));
    (
        r.status().as_u16(),
        retry,
        upstream,
        r.text().await.unwrap(),
    )
}

/// The value of a series: a metric's name with its labels, as `/metrics` spells them.
async fn metric(p: &ProxyProcess, name: &str) -> f64 {
    let (_, text) = p.admin("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_requests_and_loses_no_record() {
    if !nix::unistd::Uid::effective().is_root() {
        println!("skipped: mounting a small tmpfs for the audit log needs root");
        return;
    }
    let s = Scenario::new(Options::default()).await;
    let fs_dir = s.dir.path().join("auditfs");
    let _mount = Tmpfs::mount(&fs_dir, "256k");
    let log = fs_dir.join("audit.jsonl");
    let key_file = s.dir.path().join("audit.key");
    std::fs::write(&key_file, HMAC_KEY).unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        "[audit]\npath = \"audit.jsonl\"",
        &format!(
            "[audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\ncheckpoint_every = 25",
            log.display(),
            key_file.display()
        ),
    );
    std::fs::write(&s.config, text).unwrap();
    s.import().await;
    let mut p = s.start().await;

    let mut n = 0;
    for _ in 0..10 {
        assert_eq!(get(&s, n).await.0, 200);
        n += 1;
    }
    let (ready, _) = p.admin("/readyz").await;
    assert_eq!(ready, 200);
    eventually("the first records written", || {
        read_jsonl(&log)
            .iter()
            .filter(|r| r["decision"] == "forwarded")
            .count()
            == 10
    })
    .await;

    // The disk fills. Requests already answered keep their records in memory; the first write
    // that fails turns the proxy to refusing.
    let filler = fill(&fs_dir);
    let mut outage = Vec::new();
    for _ in 0..200 {
        let r = get(&s, n).await;
        n += 1;
        let refused = r.0 == 503;
        outage.push(r);
        if refused {
            break;
        }
    }
    let (first_503, _, _, _) = outage.last().unwrap();
    assert_eq!(*first_503, 503, "the proxy went on forwarding: {outage:?}");
    for _ in 0..30 {
        outage.push(get(&s, n).await);
        n += 1;
    }
    let forwarded_in_outage = outage.iter().filter(|r| r.0 == 200).count();
    let refused: Vec<_> = outage.iter().filter(|r| r.0 == 503).collect();
    assert_eq!(
        forwarded_in_outage + refused.len(),
        outage.len(),
        "{outage:?}"
    );
    assert!(refused.len() >= 31);
    for (_, retry, upstream, body) in &refused {
        let secs: u64 = retry.as_deref().expect("Retry-After").parse().unwrap();
        assert!(secs >= 1);
        assert_eq!(upstream.as_deref(), Some("not-sent"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(
            v["errors"][0].as_str().unwrap().contains("audit log"),
            "{body}"
        );
    }
    let (ready, body) = p.admin("/readyz").await;
    assert_eq!(ready, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["audit"]["state"], "failing", "{body}");
    assert_eq!(v["audit"]["sink"], log.display().to_string(), "{body}");
    assert!(
        v["audit"]["error"].as_str().unwrap().contains("space"),
        "{body}"
    );
    assert_eq!(
        metric(&p, "meraki_proxy_audit_sink_up{sink=\"file\"}").await,
        0.0
    );
    assert!(metric(&p, "meraki_proxy_audit_write_failures_total{sink=\"file\"}").await >= 1.0);
    assert!(
        metric(
            &p,
            "meraki_proxy_audit_refused_requests_total{sink=\"file\"}"
        )
        .await
            >= 31.0
    );
    let (_, page) = p.admin("/").await;
    assert!(
        page.contains("id=\"audit-banner\""),
        "no banner on the status page"
    );

    // Space returns: the held records are written, requests are served again.
    std::fs::remove_file(&filler).unwrap();
    let mut ready = 0;
    for _ in 0..200 {
        ready = p.admin("/readyz").await.0;
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(ready, 200, "the proxy did not recover");
    assert_eq!(
        metric(&p, "meraki_proxy_audit_sink_up{sink=\"file\"}").await,
        1.0
    );
    for _ in 0..20 {
        assert_eq!(get(&s, n).await.0, 200);
        n += 1;
    }
    let lost = metric(&p, "meraki_proxy_audit_records_lost_total{sink=\"file\"}").await;
    assert_eq!(lost, 0.0);
    let logs_before_stop = s.logs() + &p.admin("/metrics").await.1;

    p.signal(Signal::SIGTERM);
    p.wait_exit(Duration::from_secs(20)).await;

    // Every line parses; every request the stand-in received has its `forwarded` record, and
    // every refused one its `audit_unavailable` record.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.ends_with('\n'));
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: torn line {l:?}")))
        .collect();
    let audited: HashSet<String> = records
        .iter()
        .filter(|r| r["kind"] == "request" && r["decision"] == "forwarded")
        .map(|r| r["path"].as_str().unwrap().to_owned())
        .collect();
    let received: Vec<String> = s
        .standin
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query.contains("audit_probe="))
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(received.len(), 10 + forwarded_in_outage + 20);
    let unaudited: Vec<&String> = received
        .iter()
        .filter(|p| !audited.iter().any(|a| p.ends_with(a.as_str())))
        .collect();
    assert!(
        unaudited.is_empty(),
        "forwarded without a record: {unaudited:?}"
    );
    let refused_records = records
        .iter()
        .filter(|r| r["reason"] == "audit_unavailable")
        .count();
    assert_eq!(refused_records, refused.len());
    assert!(records.iter().any(|r| r["event"] == "sink_recovered"));
    println!(
        "disk full: {} requests during the outage, {} forwarded (all audited), {} refused; {} lost; {} lines",
        outage.len(),
        forwarded_in_outage,
        refused.len(),
        lost,
        records.len()
    );

    // The chain is intact and signed; one edited line is named.
    let verify = |files: &[&Path]| {
        let mut cmd = Command::new(BIN);
        cmd.args(["audit", "verify", "--key-file"])
            .arg(&key_file)
            .args(files);
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, said) = verify(&[&log]);
    assert!(ok, "{said}");
    assert!(said.starts_with("OK"), "{said}");
    let edited_path = s.dir.path().join("edited.jsonl");
    let line = 1 + text
        .lines()
        .position(|l| l.contains("\"decision\":\"forwarded\"") && l.contains("\"status\":200"))
        .unwrap();
    let edited: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i + 1 == line {
                l.replace("\"status\":200", "\"status\":201")
            } else {
                l.to_owned()
            }
        })
        .collect();
    std::fs::write(&edited_path, edited.join("\n") + "\n").unwrap();
    let (ok, said) = verify(&[&edited_path]);
    assert!(!ok);
    assert!(
        said.contains(&format!("edited.jsonl:{line}:")) && said.contains("edited"),
        "{said}"
    );

    // The key is never shown: not in logs, metrics, the audit log or `check`.
    let check = s.run(&["check", "--no-connect"]).await;
    let shown = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr)
        + &logs_before_stop
        + &text;
    assert!(check.status.success(), "{shown}");
    assert!(!shown.contains("5ecret"), "the HMAC key leaked");
}
