//! Client keys an operator hands out and rotates: `clients new` prints a key once and its
//! `[[clients]]` block; a client may hold several digests while a script moves to a new key,
//! the old one refused after its expiry and its uses counted until then.

mod support;

use reqwest::Method;
use support::harness::*;

/// The key and the `[[clients]]` block `clients new` printed.
async fn new_client(s: &Scenario, name: &str) -> (String, String) {
    let out = s
        .run(&[
            "clients",
            "new",
            "--name",
            name,
            "--integration",
            "netops",
            "--org",
            "111",
            "--method",
            "get",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("mop_"))
        .unwrap()
        .to_string();
    let block = text[text.find("[[clients]]").unwrap()..].to_string();
    assert!(
        !block.contains(&key),
        "the block holds the digest, never the key"
    );
    (key, block)
}

fn digest_of(block: &str) -> String {
    block
        .lines()
        .find_map(|l| l.strip_prefix("key_sha256 = "))
        .unwrap()
        .trim_matches('"')
        .to_string()
}

#[tokio::test]
async fn keys_are_handed_out_and_rotated_without_downtime() {
    let s = Scenario::new(Options::default()).await;
    s.import().await;
    // A new client, as printed.
    let (carol_key, carol) = new_client(&s, "carol").await;
    // Dave moves from an old key to a new one: both listed, the old one expiring in an hour;
    // a third, already expired, is refused.
    let (dave_old, old_block) = new_client(&s, "dave").await;
    let (dave_new, new_block) = new_client(&s, "dave").await;
    let (dave_gone, gone_block) = new_client(&s, "dave").await;
    let in_an_hour = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let an_hour_ago = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let rfc = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let dave = format!(
        "[[clients]]\nname = \"dave\"\nkey_sha256 = [\"{}\", \"{}\", \"{}\"]\nkey_expires = {{ \"{}\" = \"{}\", \"{}\" = \"{}\" }}\nintegration = \"netops\"\norganizations = [\"111\"]\n",
        digest_of(&new_block),
        digest_of(&old_block),
        digest_of(&gone_block),
        digest_of(&old_block),
        rfc(in_an_hour),
        digest_of(&gone_block),
        rfc(an_hour_ago),
    );
    let mut config = std::fs::read_to_string(&s.config).unwrap();
    config.push('\n');
    config.push_str(&carol);
    config.push('\n');
    config.push_str(&dave);
    std::fs::write(&s.config, config).unwrap();
    let check = s.run(&["check"]).await;
    let summary = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{summary}");
    assert!(summary.contains("dave keys=3"), "{summary}");
    let p = s.start().await;

    let status = |key: String| {
        let r = s.script(Method::GET, "/organizations/111", &key);
        async move { r.send().await.unwrap() }
    };
    assert_eq!(status(carol_key.clone()).await.status(), 200);
    let r = s
        .script(Method::PUT, "/organizations/111", &carol_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "carol may only GET");
    for _ in 0..3 {
        assert_eq!(status(dave_new.clone()).await.status(), 200);
        assert_eq!(status(dave_old.clone()).await.status(), 200);
    }
    let r = status(dave_gone.clone()).await;
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["errors"][0].as_str().unwrap().contains("expired"),
        "{body}"
    );
    let (_, metrics) = p.admin("/metrics").await;
    assert!(
        metrics.contains("meraki_proxy_expiring_key_requests_total{client=\"dave\"} 3"),
        "uses of the expiring key are counted: {}",
        metrics
            .lines()
            .filter(|l| l.contains("expiring"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eventually(
        "audit records of the expiring key and the expired one",
        || {
            let audit = s.audit();
            audit
                .iter()
                .filter(|r| r["client"] == "dave" && r["key_expires_at"].is_string())
                .count()
                == 3 + 1
                && audit.iter().any(|r| r["reason"] == "expired_key")
        },
    )
    .await;
    // No key appears in the proxy's logs or audit log.
    let all = s.logs() + &std::fs::read_to_string(s.dir.path().join("audit.jsonl")).unwrap();
    for key in [&carol_key, &dave_old, &dave_new, &dave_gone] {
        assert!(!all.contains(key.as_str()), "a client key leaked");
    }
}
