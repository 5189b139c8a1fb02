//! The syslog sink against a real `rsyslogd` the test starts (Debian's rsyslog): every record
//! arrives whole and parses, with its structured data; while rsyslogd is stopped the proxy says
//! the sink fails (`/readyz` 503, requests refused) and holds the records, which arrive when it
//! is back; the MSGs received form a chain `audit verify` finds intact. Skipped, with a message,
//! where rsyslogd is not installed.

mod support;

use nix::sys::signal::Signal;
use reqwest::Method;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::harness::*;

const HMAC_KEY: &str = "audit-hmac-key-5ecret-0123456789abcdef";
const RSYSLOGD: &str = "/usr/sbin/rsyslogd";

/// What rsyslogd listens on.
#[derive(Clone, Copy, PartialEq)]
enum Input {
    Tcp,
    Udp,
    /// An imuxsock socket in the temporary directory (`log.sock`).
    Unix,
}

/// An `rsyslogd -n` of the test's own, writing what it receives as `%jsonmesg%` (every property,
/// the structured data and MSG included) to `received.jsonl`; killed on drop.
struct Rsyslog {
    dir: PathBuf,
    input: Input,
    port: u16,
    child: Option<Child>,
}

impl Rsyslog {
    /// Starts rsyslogd on a loopback port no one else holds: a port is tried by rsyslogd itself
    /// (no bind-and-release race); one in use is another try.
    fn start(dir: &Path, input: Input) -> Rsyslog {
        std::fs::create_dir_all(dir).unwrap();
        let mut r = Rsyslog {
            dir: dir.to_path_buf(),
            input,
            port: 0,
            child: None,
        };
        let mut last = String::new();
        for _ in 0..20 {
            r.port = rand::random::<u16>() % 10_000 + 30_000;
            match r.try_start() {
                Ok(()) => return r,
                Err(why) => last = why,
            }
        }
        panic!("rsyslogd did not start on any of 20 ports: {last}");
    }

    fn received(&self) -> PathBuf {
        self.dir.join("received.jsonl")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("log.sock")
    }

    /// The proxy's `[audit] syslog` value for this receiver.
    fn target(&self) -> String {
        match self.input {
            Input::Tcp => format!("tcp://127.0.0.1:{}", self.port),
            Input::Udp => format!("udp://127.0.0.1:{}", self.port),
            Input::Unix => format!("unix:{}", self.socket().display()),
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        let d = self.dir.display();
        let input = match self.input {
            Input::Tcp => format!(
                "module(load=\"imtcp\")\ninput(type=\"imtcp\" port=\"{}\" address=\"127.0.0.1\")",
                self.port
            ),
            Input::Udp => format!(
                "module(load=\"imudp\")\ninput(type=\"imudp\" port=\"{}\" address=\"127.0.0.1\")",
                self.port
            ),
            // Not the special parser for the local socket's traditional format: the RFC 5424
            // parser, as for the network inputs.
            Input::Unix => format!(
                "module(load=\"imuxsock\" SysSock.Use=\"off\")\ninput(type=\"imuxsock\" Socket=\"{}\" UseSpecialParser=\"off\" ParseHostname=\"on\" CreatePath=\"on\")",
                self.socket().display()
            ),
        };
        let conf = format!(
            r#"global(workDirectory="{d}" maxMessageSize="64k")
{input}
template(name="everything" type="string" string="%jsonmesg%\n")
action(type="omfile" file="{d}/received.jsonl" template="everything")
"#
        );
        let conf_path = self.dir.join("rsyslog.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let stderr = self.dir.join("rsyslogd.err");
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(&conf_path)
            .arg("-i")
            .arg(self.dir.join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .map_err(|e| e.to_string())?;
        let pid = child.id();
        self.child = Some(child);
        // Bounded: 10 s.
        for _ in 0..400 {
            let said = std::fs::read_to_string(&stderr).unwrap_or_default();
            if said.contains("Could not create") || said.contains("Address already in use") {
                self.kill();
                return Err(said);
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!("rsyslogd exited ({status}): {said}"));
            }
            let listening = match self.input {
                Input::Tcp => owns_port(pid, "tcp", self.port),
                Input::Udp => owns_port(pid, "udp", self.port),
                Input::Unix => self.socket().exists(),
            };
            if listening {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        self.kill();
        Err("rsyslogd did not listen within 10 s".into())
    }

    /// SIGTERM and wait: rsyslogd writes what it received and exits.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    /// Starts again on the same port (or socket).
    fn restart(&mut self) {
        self.try_start().unwrap();
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The proxy's messages received so far: each line of `received.jsonl`, parsed (a line
    /// still being written, without its newline, is not yet a message); rsyslogd's own left out.
    fn messages(&self) -> Vec<serde_json::Value> {
        read_jsonl(&self.received())
            .into_iter()
            .filter(|m| m["app-name"] == "meraki-oauth-proxy")
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether process `pid` holds the loopback socket bound to `port` (`/proc/net/{tcp,udp}`).
fn owns_port(pid: u32, proto: &str, port: u16) -> bool {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/net/{proto}")).unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 9 && f[1] == local && inodes.iter().any(|i| i == f[9])
    })
}

/// The audit record a received message carries (its MSG), and its structured data.
fn record(m: &serde_json::Value) -> (serde_json::Value, String) {
    let msg = m["msg"].as_str().expect("a msg");
    let v = serde_json::from_str(msg).unwrap_or_else(|e| panic!("{e}: torn MSG {msg:?}"));
    (v, m["structured-data"].as_str().unwrap_or("").to_owned())
}

/// Rewrites the scenario's `[audit]` for the syslog sink at `target`.
fn configure(s: &Scenario, target: &str, key_file: &Path) {
    let text = std::fs::read_to_string(&s.config).unwrap();
    let audit = text.find("[audit]\n").unwrap();
    let end = audit + text[audit..].find("\n\n").unwrap();
    let section = format!(
        "[audit]\npath = \"audit.jsonl\"\nhmac_key_file = \"{}\"\nsyslog = \"{target}\"\nsyslog_facility = \"local3\"",
        key_file.display()
    );
    std::fs::write(
        &s.config,
        format!("{}{section}{}", &text[..audit], &text[end..]),
    )
    .unwrap();
}

/// A GET that no other request of the test repeats; its status.
async fn get(s: &Scenario, n: usize, key: &str) -> u16 {
    s.script(
        Method::GET,
        &format!("/networks/L_111_{}?syslog_probe={n}", n % 3),
        key,
    )
    .send()
    .await
    .unwrap()
    .status()
    .as_u16()
}

fn rsyslogd_missing() -> bool {
    if Path::new(RSYSLOGD).exists() {
        return false;
    }
    println!("skipped: {RSYSLOGD} is not installed (apt-get install rsyslog)");
    true
}

/// The request ids of the proxy's own file's request records with `syslog_probe` paths.
fn probes_in_file(s: &Scenario) -> Vec<(String, String)> {
    s.audit()
        .iter()
        .filter(|r| {
            r["kind"] == "request" && r["path"].as_str().unwrap_or("").contains("syslog_probe")
        })
        .map(|r| {
            (
                r["request_id"].as_str().unwrap().to_owned(),
                r["decision"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Waits (bounded) until the file holds `n` probe records, each of those from `first` on also
/// received by rsyslogd; says what was where if not.
async fn all_received(what: &str, s: &Scenario, rs: &Rsyslog, first: usize, n: usize) {
    for _ in 0..400 {
        let got = request_ids(rs);
        let file = probes_in_file(s);
        if file.len() == n && file[first..].iter().all(|(id, _)| got.contains(id)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "timed out waiting for {what}: the file has {:?}; rsyslogd received {:?}; rsyslogd said {:?}; config {}; proxy logs: {}",
        probes_in_file(s),
        std::fs::read_to_string(rs.received()).unwrap_or_default(),
        std::fs::read_to_string(rs.dir.join("rsyslogd.err")).unwrap_or_default(),
        std::fs::read_to_string(&s.config).unwrap_or_default(),
        s.logs()
    );
}

fn request_ids(r: &Rsyslog) -> Vec<String> {
    r.messages()
        .iter()
        .map(|m| record(m).0)
        .filter(|v| v["kind"] == "request")
        .map(|v| v["request_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_reach_rsyslog_over_tcp_and_are_held_while_it_is_down() {
    if rsyslogd_missing() {
        return;
    }
    let s = Scenario::new(Options::default()).await;
    let mut rs = Rsyslog::start(&s.dir.path().join("rsyslog"), Input::Tcp);
    let key_file = s.dir.path().join("audit.key");
    std::fs::write(&key_file, HMAC_KEY).unwrap();
    configure(&s, &rs.target(), &key_file);
    s.import().await;
    let mut p = s.start().await;

    // Forwarded, and denied (an unknown key): each record arrives whole, with its SD.
    let mut n = 0;
    for i in 0..12 {
        let (key, want) = if i % 4 == 3 {
            ("not-a-key", 401)
        } else {
            (ALICE_KEY, 200)
        };
        assert_eq!(get(&s, n, key).await, want);
        n += 1;
    }
    all_received("every record at rsyslog", &s, &rs, 0, 12).await;
    for m in rs.messages() {
        let (v, sd) = record(&m);
        // local3 (19), severity informational (6).
        assert_eq!(
            (&m["syslogfacility"], &m["syslogseverity"]),
            (&"19".into(), &"6".into()),
            "{m}"
        );
        assert_eq!(m["app-name"], "meraki-oauth-proxy", "{m}");
        assert_eq!(m["msgid"], v["kind"], "{m}");
        assert!(sd.starts_with("[meraki-proxy@32473 seq=\""), "{sd}");
        if v["kind"] == "request" && v["path"].as_str().unwrap().contains("syslog_probe") {
            let decision = v["decision"].as_str().unwrap();
            assert!(sd.contains(&format!("decision=\"{decision}\"")), "{sd}");
            if decision == "forwarded" {
                assert!(sd.contains("client=\"alice\" organization=\"111\""), "{sd}");
            } else {
                assert_eq!(v["reason"], "unknown_key");
                assert!(sd.contains("reason=\"unknown_key\""), "{sd}");
            }
        }
    }

    // rsyslogd stops: the sink fails before anything is sent (the closed connection is seen),
    // requests are refused, their records are held for syslog (and written to the file).
    rs.stop();
    let mut ready = (200, String::new());
    for _ in 0..200 {
        ready = p.admin("/readyz").await;
        if ready.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(ready.0, 503, "{}", ready.1);
    let v: serde_json::Value = serde_json::from_str(&ready.1).unwrap();
    assert_eq!(v["audit"]["state"], "failing", "{}", ready.1);
    assert_eq!(v["audit"]["sink"], format!("syslog {}", rs.target()));
    assert_eq!(
        v["audit"]["sinks"][0]["state"], "ok",
        "the file still writes"
    );
    let mut refused = 0;
    for _ in 0..8 {
        if get(&s, n, ALICE_KEY).await == 503 {
            refused += 1;
        }
        n += 1;
    }
    assert_eq!(refused, 8);
    // The writer takes queued records every 20 ms: wait until it holds the 8 refusals' records.
    let series = |metrics: &str, name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{{sink=\"syslog\"}} ")))
            .unwrap_or_else(|| panic!("no {name}: {metrics}"))
            .parse()
            .unwrap()
    };
    let mut metrics = String::new();
    for _ in 0..200 {
        metrics = p.admin("/metrics").await.1;
        if series(&metrics, "meraki_proxy_audit_records_held") >= 8.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let held = series(&metrics, "meraki_proxy_audit_records_held");
    assert!(held >= 8.0, "held {held}: {metrics}");
    assert_eq!(series(&metrics, "meraki_proxy_audit_sink_up"), 0.0);
    assert_eq!(
        series(&metrics, "meraki_proxy_audit_refused_requests_total"),
        8.0
    );
    let (_, page) = p.admin("/").await;
    assert!(page.contains("id=\"audit-banner\""), "no banner");

    // rsyslogd is back: the held records arrive, requests are served again.
    rs.restart();
    eventually_async(|| async { p.admin("/readyz").await.0 == 200 }).await;
    for _ in 0..6 {
        assert_eq!(get(&s, n, ALICE_KEY).await, 200);
        n += 1;
    }
    all_received(
        "every record, held ones included, at rsyslog",
        &s,
        &rs,
        0,
        n,
    )
    .await;
    let (_, metrics) = p.admin("/metrics").await;
    assert!(
        metrics.contains("meraki_proxy_audit_records_lost_total{sink=\"syslog\"} 0"),
        "{metrics}"
    );

    // The proxy stops: its shutdown checkpoint arrives, and the MSGs, in the order received,
    // are one chain: nothing lost, repeated or reordered across rsyslogd's restart.
    p.signal(Signal::SIGTERM);
    p.wait_exit(Duration::from_secs(20)).await;
    eventually("the shutdown checkpoint at rsyslog", || {
        rs.messages()
            .iter()
            .any(|m| record(m).0["cause"] == "shutdown")
    })
    .await;
    let msgs: Vec<String> = rs
        .messages()
        .iter()
        .map(|m| m["msg"].as_str().unwrap().to_owned())
        .collect();
    let chain = s.dir.path().join("from-syslog.jsonl");
    std::fs::write(&chain, msgs.join("\n") + "\n").unwrap();
    let out = Command::new(BIN)
        .args(["audit", "verify", "--key-file"])
        .arg(&key_file)
        .arg(&chain)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.starts_with("OK"), "{said}");
    let received = std::fs::read_to_string(rs.received()).unwrap();
    assert!(!received.contains("5ecret"), "the HMAC key reached syslog");
    println!(
        "syslog tcp: {n} requests, {refused} refused while rsyslogd was down ({held} records held), {} messages received, 0 lost; {}",
        msgs.len(),
        said.trim()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_reach_rsyslog_over_udp_and_a_unix_socket() {
    if rsyslogd_missing() {
        return;
    }
    let s = Scenario::new(Options::default()).await;
    let key_file = s.dir.path().join("audit.key");
    std::fs::write(&key_file, HMAC_KEY).unwrap();
    s.import().await;
    let mut n = 0;
    for input in [Input::Udp, Input::Unix] {
        let rs = Rsyslog::start(&s.dir.path().join(format!("rsyslog-{n}")), input);
        configure(&s, &rs.target(), &key_file);
        let mut p = s.start().await;
        let first = n;
        for _ in 0..5 {
            assert_eq!(get(&s, n, ALICE_KEY).await, 200);
            n += 1;
        }
        all_received("the records at rsyslog", &s, &rs, first, n).await;
        for m in rs.messages() {
            let (v, sd) = record(&m);
            assert_eq!(m["msgid"], v["kind"], "{m}");
            assert!(sd.starts_with("[meraki-proxy@32473 "), "{sd}");
        }
        p.signal(Signal::SIGTERM);
        p.wait_exit(Duration::from_secs(20)).await;
    }
}
