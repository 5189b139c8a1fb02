//! The `jq` queries docs/audit-fields.md gives, run as the doc writes them on an audit log the
//! real binary wrote: each must return what the doc says it returns. The queries are read from
//! the doc (the blocks after `<!-- checked by tests/audit_jq.rs: NAME -->`), so neither can drift.

mod support;

use nix::sys::signal::Signal;
use reqwest::Method;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::harness::*;

const HMAC_KEY: &str = "audit-hmac-key-5ecret-0123456789abcdef";
const DOC: &str = "docs/audit-fields.md";
const CAROL_KEY: &str = "carol-proxy-key-3c9d1e0f";

/// The doc's checked blocks: (name, shell text).
fn checked_blocks(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(l) = lines.next() {
        let Some(name) = l
            .strip_prefix("<!-- checked by tests/audit_jq.rs: ")
            .and_then(|r| r.strip_suffix(" -->"))
        else {
            continue;
        };
        assert_eq!(lines.next(), Some("```sh"), "{name}: a ```sh block follows");
        let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        out.push((name.to_owned(), body.join("\n")));
    }
    out
}

/// Runs a block with `sh` in `dir` (where `audit.jsonl` and `audit.key` are), the binary on PATH.
fn run(dir: &Path, text: &str) -> (bool, String) {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(text)
        .current_dir(dir)
        .env("PATH", path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_documented_jq_queries_answer_what_the_doc_says() {
    if Command::new("jq").arg("--version").output().is_err() {
        println!("skipped: jq is not installed (apt-get install jq)");
        return;
    }
    // carol may call only from 127.0.0.2: the test's requests (from 127.0.0.1) are refused.
    let s = Scenario::new(Options {
        clients: format!(
            "[[clients]]\nname = \"carol\"\nkey_sha256 = \"{}\"\nintegration = \"netops\"\norganizations = [\"111\"]\nsource_addresses = [\"127.0.0.2/32\"]\n",
            support::harness::sha256_hex(CAROL_KEY)
        ),
        ..Options::default()
    })
    .await;
    let key_file = s.dir.path().join("audit.key");
    std::fs::write(&key_file, HMAC_KEY).unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        "[audit]\npath = \"audit.jsonl\"",
        "[audit]\npath = \"audit.jsonl\"\nhmac_key_file = \"audit.key\"",
    );
    std::fs::write(&s.config, text).unwrap();
    s.import().await;
    let mut p = s.start().await;

    // Reads and writes of alice's organization; denials; 401s at an operation Meraki refuses.
    let send = |method: Method, path: &'static str, key: &'static str| {
        let r = s.script(method.clone(), path, key);
        let r = if method == Method::PUT {
            r.json(&json!({"name": "renamed"}))
        } else {
            r
        };
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(
        send(Method::GET, "/organizations/111/networks", ALICE_KEY).await,
        200
    );
    assert_eq!(send(Method::PUT, "/networks/L_111_1", ALICE_KEY).await, 200);
    assert_eq!(send(Method::PUT, "/networks/L_111_2", ALICE_KEY).await, 200);
    assert_eq!(send(Method::GET, "/networks/L_222_0", BOB_KEY).await, 200);
    assert_eq!(send(Method::PUT, "/networks/L_222_0", BOB_KEY).await, 403);
    assert_eq!(send(Method::PUT, "/networks/L_222_0", ALICE_KEY).await, 403);
    for _ in 0..2 {
        assert_eq!(send(Method::GET, "/organizations", "not-a-key").await, 401);
    }
    // The grant holds dashboard:general:config:*; getOrganizationAdmins needs
    // dashboard:iam:config:read.
    assert_eq!(
        send(Method::GET, "/organizations/111/admins", ALICE_KEY).await,
        403
    );
    assert_eq!(
        send(Method::GET, "/organizations/111/networks", CAROL_KEY).await,
        403
    );
    s.standin
        .refuse_every_token_at("/organizations/111/actionBatches");
    for _ in 0..3 {
        assert_eq!(
            send(Method::GET, "/organizations/111/actionBatches", ALICE_KEY).await,
            401
        );
    }
    p.signal(Signal::SIGTERM);
    p.wait_exit(Duration::from_secs(20)).await;
    let records = s.audit();
    let dir = s.dir.path();

    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(DOC)).unwrap();
    let blocks = checked_blocks(&doc);
    let names: Vec<&str> = blocks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "writes",
            "denials",
            "access",
            "grant",
            "refused_at_operation",
            "verify"
        ],
        "the doc's checked queries"
    );
    for (name, text) in &blocks {
        let (ok, out) = run(dir, text);
        assert!(ok, "{name}: {text}\n{out}");
        match name.as_str() {
            "writes" => {
                let got = json_lines(&out);
                let paths: Vec<&str> = got.iter().map(|v| v["path"].as_str().unwrap()).collect();
                assert_eq!(paths, ["/networks/L_111_1", "/networks/L_111_2"], "{out}");
                assert!(got
                    .iter()
                    .all(|v| v["method"] == "PUT" && v["status"] == 200));
            }
            "denials" => {
                let got: Value = serde_json::from_str(&out).unwrap();
                let denied = records.iter().filter(|r| r["decision"] == "denied").count();
                let counts = got.as_array().unwrap();
                let total: u64 = counts.iter().map(|c| c["count"].as_u64().unwrap()).sum();
                assert_eq!(total as usize, denied, "{out}");
                assert!(
                    counts.contains(&json!({"reason": "unknown_key", "count": 2})),
                    "{out}"
                );
                assert!(counts.len() >= 2, "{out}");
            }
            "access" => {
                let got = json_lines(&out);
                assert_eq!(got.len(), 2, "{out}");
                assert_eq!(got[0]["reason"], "missing_scope", "{out}");
                assert_eq!(got[0]["client"], "alice", "{out}");
                assert_eq!(got[0]["operation"], "getOrganizationAdmins", "{out}");
                assert_eq!(got[0]["client_address"], "127.0.0.1", "{out}");
                assert_eq!(got[1]["reason"], "source_address", "{out}");
                assert_eq!(got[1]["client"], "carol", "{out}");
                assert_eq!(got[1]["client_address"], "127.0.0.1", "{out}");
            }
            "grant" => {
                let events: Vec<String> = json_lines(&out)
                    .iter()
                    .map(|v| v["event"].as_str().unwrap().to_owned())
                    .collect();
                for e in ["grant_added", "token_refreshed", "operation_refused"] {
                    assert!(events.iter().any(|x| x == e), "{e} in {out}");
                }
            }
            "refused_at_operation" => {
                let got = json_lines(&out);
                let requests = got.iter().filter(|v| v["kind"] == "request").count();
                let events = got
                    .iter()
                    .filter(|v| v["event"] == "operation_refused")
                    .count();
                assert_eq!((requests, events), (3, 1), "{out}");
                assert!(
                    got.iter()
                        .all(|v| v["operation"] == "getOrganizationActionBatches"),
                    "{out}"
                );
            }
            "verify" => assert!(out.starts_with("OK: "), "{out}"),
            other => panic!("no expectation for {other}"),
        }
    }
}
