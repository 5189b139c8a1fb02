//! The audit log: one JSON line per request and per token event, written by a dedicated thread.
//! The request path only moves what it knows into a [`RequestEntry`] (reference counts, no
//! formatting) and enqueues it; timestamps and JSON are made on the writer thread. Never holds a
//! secret: tokens appear only as 8-hex-character fingerprints, client keys not at all.
//!
//! Integrity (docs/audit-integrity.md): [`chain`] gives every line `seq` and `prev` and signs
//! checkpoints; [`sink`] writes whole lines only; the writer holds records in bounded memory
//! while the sink fails, and [`Audit::refusal`] turns new requests away meanwhile
//! (`on_failure = "refuse"`); [`verify`] walks the files.
//!
//! Sinks: the file (or standard output) and, if configured, [`syslog`]. Each has its own writer
//! thread, queue, chain and [`Health`]; a request is refused while any of them fails.

pub mod chain;
pub mod sink;
pub mod syslog;
pub mod verify;
mod writer;

use crate::config::{AuditConfig, Client, OnFailure};
use crate::refusal::Refusal;
use crate::token::events::TokenEvent;
use http::HeaderValue;
use serde::Serialize;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
pub use writer::Health;
use writer::{Msg, Writer};

/// Records queued for the writer at most; beyond, a record is lost (counted) rather than the
/// request thread made to wait.
const QUEUE: usize = 65_536;

/// A proxy request id: random, 16 hex digits on the wire and in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestId(pub u64);

impl RequestId {
    /// A fresh random id.
    pub fn new() -> Self {
        RequestId(rand::random())
    }

    /// The 16 hex digits, without allocating.
    pub fn hex(self) -> HexId {
        let mut out = [0u8; 16];
        // 8 bytes always fit 16 digits.
        let _ = hex::encode_to_slice(self.0.to_be_bytes(), &mut out);
        HexId(out)
    }
}

/// A [`RequestId`] as text.
pub struct HexId([u8; 16]);

impl HexId {
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// What the request path knows of one finished request, handed to the writer thread as is.
#[derive(Debug)]
pub struct RequestEntry {
    pub at: SystemTime,
    pub request_id: RequestId,
    pub upstream_request_id: Option<HeaderValue>,
    pub client: Option<Arc<Client>>,
    pub organization: Option<Arc<str>>,
    pub method: http::Method,
    /// The normalized path and query below the API base (the raw one if it did not parse).
    pub path: String,
    /// The operationId of Meraki's API table the request matched.
    pub operation: Option<&'static str>,
    /// When the client key used expires, if its operator set an expiry (unix seconds).
    pub key_expires_at: Option<i64>,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub decision: &'static str,
    pub reason: Option<&'static str>,
    pub retried_after_401: bool,
    pub redirects_followed: u32,
    /// The fingerprint of the access token the request used (never the token).
    pub token_fingerprint: Option<Arc<str>>,
    pub duration: Duration,
    pub upstream_duration: Option<Duration>,
    /// How long the request waited for its turn in its organization's rate budget.
    pub queue_wait: Option<Duration>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The connection's peer: the TCP peer, or the address a trusted load balancer's PROXY
    /// protocol header gave.
    pub source: Option<SocketAddr>,
    /// The client's address as `crate::source` decides it (`X-Forwarded-For` believed only
    /// from `[server] trusted_proxies`): what `source_addresses` is checked against.
    pub client_address: Option<std::net::IpAddr>,
    pub user_agent: Option<HeaderValue>,
    /// What identified the client: `key`, `certificate`, `certificate+key`.
    pub identity: Option<&'static str>,
    /// The subject of the connection's TLS client certificate (mutual TLS), if it sent one.
    pub client_certificate: Option<Arc<str>>,
    /// What was wrong, from a fixed set, when `reason` alone does not say: what the HTTP parser
    /// refused (`malformed_request`), the phase a client was too slow in (`request_timeout`).
    pub detail: Option<&'static str>,
}

impl RequestEntry {
    /// Writes the entry as one JSON line (the [`RequestRecord`] schema).
    pub fn write_json<W: Write + ?Sized>(&self, out: &mut W) -> serde_json::Result<()> {
        let id = self.request_id.hex();
        let record = RequestRecord {
            time: system_rfc3339(self.at),
            kind: "request",
            request_id: id.as_str(),
            upstream_request_id: self
                .upstream_request_id
                .as_ref()
                .and_then(|v| v.to_str().ok()),
            client: self.client.as_deref().map(|c| c.name.as_str()),
            integration: self.client.as_deref().map(|c| c.integration.as_str()),
            organization: self.organization.as_deref(),
            method: self.method.as_str(),
            path: &self.path,
            operation: self.operation,
            key_expires_at: self.key_expires_at.map(rfc3339),
            status: self.status,
            upstream_status: self.upstream_status,
            decision: self.decision,
            reason: self.reason,
            retried_after_401: self.retried_after_401,
            redirects_followed: self.redirects_followed,
            token_fingerprint: self.token_fingerprint.as_deref(),
            duration_ms: self.duration.as_secs_f64() * 1000.0,
            upstream_duration_ms: self.upstream_duration.map(|d| d.as_secs_f64() * 1000.0),
            queue_wait_ms: self.queue_wait.map(|d| d.as_secs_f64() * 1000.0),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            source: self.source,
            client_address: self.client_address,
            user_agent: self.user_agent.as_ref().and_then(|v| v.to_str().ok()),
            identity: self.identity,
            client_certificate: self.client_certificate.as_deref(),
            detail: self.detail,
        };
        serde_json::to_writer(&mut *out, &record)
    }
}

/// One request, as the audit log records it: the JSON view of a [`RequestEntry`].
#[derive(Serialize)]
struct RequestRecord<'a> {
    time: String,
    kind: &'static str,
    request_id: &'a str,
    upstream_request_id: Option<&'a str>,
    client: Option<&'a str>,
    integration: Option<&'a str>,
    organization: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    operation: Option<&'static str>,
    key_expires_at: Option<String>,
    status: u16,
    upstream_status: Option<u16>,
    /// `forwarded`, `answered` (by the proxy itself, e.g. the organization list), `denied`, `error`.
    decision: &'static str,
    reason: Option<&'a str>,
    retried_after_401: bool,
    redirects_followed: u32,
    token_fingerprint: Option<&'a str>,
    duration_ms: f64,
    upstream_duration_ms: Option<f64>,
    /// Time waited for a turn in the organization's rate budget (absent: not shaped).
    queue_wait_ms: Option<f64>,
    bytes_in: u64,
    bytes_out: u64,
    /// Written as `Display` writes them (serde's human-readable form), without allocating.
    source: Option<std::net::SocketAddr>,
    client_address: Option<std::net::IpAddr>,
    user_agent: Option<&'a str>,
    identity: Option<&'static str>,
    client_certificate: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'static str>,
}

/// A TLS event on the proxy listener: a client certificate refused in the handshake.
#[derive(Debug, Serialize)]
pub struct TlsRecord<'a> {
    pub time: String,
    pub kind: &'static str,
    /// `client_certificate_refused`.
    pub event: &'static str,
    /// `unknown_issuer`, `expired`, `not_yet_valid`, `bad_certificate`, ...
    pub cause: &'static str,
    /// The presented certificate's subject, RFC 4514.
    pub subject: Option<&'a str>,
    /// SHA-256 of the presented certificate, hex.
    pub fingerprint: &'a str,
    pub detail: &'a str,
}

impl<'a> TlsRecord<'a> {
    /// The record of a client certificate refused in the handshake.
    pub fn refused(r: &'a crate::tls::RefusedClientCert) -> Self {
        TlsRecord {
            time: now_rfc3339(),
            kind: "tls",
            event: "client_certificate_refused",
            cause: r.cause.label(),
            subject: r.subject.as_deref(),
            fingerprint: &r.fingerprint,
            detail: &r.detail,
        }
    }
}

/// A grant or token event, as the audit log records it.
#[derive(Debug, Serialize)]
struct TokenRecord<'a> {
    time: String,
    kind: &'static str,
    /// `grant_added`, `token_refreshed`, `refresh_failed`, `needs_reauthorization`,
    /// `commit_failed`, `short_token_lifetime`, `grant_revoked`, `operation_refused`,
    /// `operation_refusal_forgotten`, `token_probed`.
    event: &'static str,
    integration: &'a str,
    /// The requesting organization, or every organization of the grant.
    organization: String,
    grant_id: i64,
    generation: i64,
    /// Why a refresh was made: `expiring`, `rejected_by_meraki`, `keep-alive`, `import`.
    cause: Option<&'static str>,
    rotated: Option<bool>,
    token_fingerprint: Option<&'a str>,
    expires_at: Option<String>,
    token_call_ms: Option<f64>,
    /// The operation a refusal is remembered (or forgotten) at.
    #[serde(skip_serializing_if = "Option::is_none")]
    operation: Option<&'a str>,
    detail: Option<String>,
}

impl<'a> TokenRecord<'a> {
    fn of(e: &'a TokenEvent) -> Self {
        use crate::token::EventKind as K;
        let detail = match &e.kind {
            K::Added { how } => Some((*how).to_owned()),
            // Kept from the first schema: a refresh's detail is its cause.
            K::Refreshed { .. } => e.cause.map(|c| c.as_str().to_owned()),
            K::RefreshFailed { label, retry_in } => Some(format!(
                "{label}: {} (next attempt in {} ms)",
                e.detail.as_deref().unwrap_or(""),
                retry_in.as_millis()
            )),
            K::RefusalForgotten { why, .. } => Some(format!("forgotten: {why}")),
            K::Probed { verdict } => Some(format!(
                "GET /organizations with the token: {}",
                verdict.as_str()
            )),
            _ => e.detail.clone(),
        };
        let operation = match &e.kind {
            K::OperationRefused { operation, .. } | K::RefusalForgotten { operation, .. } => {
                Some(&**operation)
            }
            _ => None,
        };
        TokenRecord {
            time: now_rfc3339(),
            kind: "token",
            event: e.kind.name(),
            integration: &e.integration,
            organization: e
                .organization
                .clone()
                .unwrap_or_else(|| e.organizations.join(",")),
            grant_id: e.grant_id,
            generation: e.generation,
            cause: e.cause.map(|c| c.as_str()),
            rotated: match e.kind {
                K::Refreshed { rotated } => Some(rotated),
                _ => None,
            },
            token_fingerprint: e.fingerprint.as_deref(),
            expires_at: (e.expires_at > 0).then(|| rfc3339(e.expires_at)),
            token_call_ms: e.call_duration.map(|d| d.as_secs_f64() * 1000.0),
            operation,
            detail,
        }
    }
}

/// A record about the proxy itself: a configuration reload, a shutdown.
#[derive(Debug, Serialize)]
pub struct ServerRecord<'a> {
    pub time: String,
    pub kind: &'static str,
    /// `config_reloaded`, `config_reload_refused`, `shutdown_started`, `shutdown_drained`,
    /// `shutdown_grace_expired`.
    pub event: &'static str,
    /// What asked: `sighup`, `admin`, `sigterm`, `sigint`.
    pub trigger: &'a str,
    pub generation: Option<u64>,
    pub clients: Option<usize>,
    pub integrations: Option<usize>,
    pub restart_required: &'a [&'static str],
    /// Requests still in flight (shutdown).
    pub in_flight: Option<i64>,
    pub detail: Option<String>,
}

impl<'a> ServerRecord<'a> {
    /// A record of `event`, the other fields empty.
    pub fn new(event: &'static str, trigger: &'a str) -> Self {
        ServerRecord {
            time: now_rfc3339(),
            kind: "server",
            event,
            trigger,
            generation: None,
            clients: None,
            integrations: None,
            restart_required: &[],
            in_flight: None,
            detail: None,
        }
    }
}

/// The reason of a request refused because the audit log cannot be written.
pub const AUDIT_UNAVAILABLE: &str = "audit_unavailable";
/// Seconds a client refused for an unwritable audit log is told to wait.
const REFUSED_RETRY_AFTER_SECS: u64 = 5;

/// One sink's writer thread, as the request path sees it.
struct Lane {
    tx: SyncSender<Msg>,
    reopen: Arc<AtomicBool>,
    health: Arc<Health>,
}

impl Lane {
    fn start(writer: Writer) -> io::Result<Lane> {
        let health = writer.health();
        let (tx, rx) = sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let r = reopen.clone();
        std::thread::Builder::new()
            .name(format!("audit-{}", health.label))
            .spawn(move || writer.run(rx, r))?;
        Ok(Lane { tx, reopen, health })
    }

    /// Never waits: a request thread must not stall on the disk or the network. A full queue
    /// (the writer is far behind) loses the record, counted.
    fn enqueue(&self, msg: Msg) {
        if self.tx.try_send(msg).is_err() {
            self.health.lose();
        }
    }
}

/// The audit log: its file (or standard output), and the syslog sink if configured.
pub struct Audit {
    /// The file's lane first.
    lanes: Vec<Lane>,
    on_failure: OnFailure,
}

impl Audit {
    /// Opens the log (`None`: standard output) with the default settings.
    pub fn open(path: Option<&Path>) -> io::Result<Audit> {
        Audit::start(path, AuditConfig::default())
    }

    /// Opens the log (`None`: standard output) and starts its writer thread.
    pub fn start(path: Option<&Path>, config: AuditConfig) -> io::Result<Audit> {
        let on_failure = config.on_failure;
        let mut lanes = Vec::with_capacity(2);
        if let Some(syslog) = &config.syslog {
            // Built before the file's writer takes the configuration; started after it.
            let writer = Writer::syslog(syslog, config.clone())?;
            lanes.push(Lane::start(Writer::open(
                path.map(Path::to_path_buf),
                config,
            )?)?);
            lanes.push(Lane::start(writer)?);
        } else {
            lanes.push(Lane::start(Writer::open(
                path.map(Path::to_path_buf),
                config,
            )?)?);
        }
        Ok(Audit { lanes, on_failure })
    }

    /// Queues a request record.
    pub fn request(&self, entry: RequestEntry) {
        let entry = Arc::new(entry);
        for lane in &self.lanes {
            lane.enqueue(Msg::Request(entry.clone()));
        }
    }

    /// Queues a token event's record.
    pub fn token_event(&self, event: &TokenEvent) {
        self.send(serde_json::to_string(&TokenRecord::of(event)));
    }

    /// Queues a record about the proxy itself.
    pub fn server_event(&self, record: &ServerRecord<'_>) {
        self.send(serde_json::to_string(record));
    }

    /// Queues a TLS event's record.
    pub fn tls_event(&self, record: &TlsRecord<'_>) {
        self.send(serde_json::to_string(record));
    }

    fn send(&self, line: serde_json::Result<String>) {
        match line {
            Ok(l) => {
                let line: Arc<str> = l.into();
                for lane in &self.lanes {
                    lane.enqueue(Msg::Line(line.clone()));
                }
            }
            Err(e) => tracing::error!(error = %e, "could not serialize an audit record"),
        }
    }

    /// The refusal for a new request while the log cannot be written (`on_failure = "refuse"`):
    /// nothing is forwarded that could not be recorded.
    pub fn refusal(&self, now: std::time::Instant) -> Option<Refusal> {
        if self.on_failure != OnFailure::Refuse {
            return None;
        }
        let failing = self.lanes.iter().find(|l| l.health.blocked(now))?;
        failing.health.refused.inc();
        Some(Refusal {
            status: 503,
            reason: AUDIT_UNAVAILABLE,
            message: "The proxy cannot write its audit log; the request was not sent to Meraki. Retry later.".into(),
            upstream: Some(crate::refusal::upstream::NOT_SENT),
            retry_after: Some(REFUSED_RETRY_AFTER_SECS),
        })
    }

    /// The file sink's health (the first sink).
    pub fn health(&self) -> &Health {
        &self.lanes[0].health
    }

    /// Every sink's health, the file's first: readiness, the status page and the metrics read
    /// them.
    pub fn healths(&self) -> impl Iterator<Item = &Health> {
        self.lanes.iter().map(|l| &*l.health)
    }

    /// The metrics of every sink.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        self.healths().flat_map(Health::collectors).collect()
    }

    /// Waits until every record queued so far was tried and, if written, synced (bounded: 5 s).
    pub fn flush(&self) {
        self.ask(Msg::Flush);
    }

    /// Writes what is queued, then the shutdown checkpoint, and syncs (bounded: 5 s). Records
    /// queued later start a new run in the log.
    pub fn close(&self) {
        self.ask(Msg::Seal);
    }

    /// Asks every writer at once, then waits for each (bounded: 5 s in all).
    fn ask(&self, msg: fn(SyncSender<()>) -> Msg) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let waits: Vec<_> = self
            .lanes
            .iter()
            .filter_map(|lane| {
                let (ack, done) = sync_channel(1);
                lane.tx.send(msg(ack)).is_ok().then_some(done)
            })
            .collect();
        for done in waits {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let _ = done.recv_timeout(left);
        }
    }

    /// Reopens the file at its path (after log rotation moved it), before the next write; the
    /// old file ends with a rotation checkpoint.
    pub fn reopen(&self) {
        for lane in &self.lanes {
            lane.reopen.store(true, Ordering::SeqCst);
        }
    }

    /// Records written to the file sink so far (checkpoints and the writer's notes not counted).
    pub fn written(&self) -> u64 {
        self.health().written.load(Ordering::Acquire)
    }
}

/// The audit sinks' part of `/readyz`: whether they all write, and a JSON object naming the
/// first that fails (or the file's, when none fails); with a syslog sink, `sinks` lists each.
pub fn readiness_of(audit: &Audit) -> (bool, serde_json::Value) {
    let each: Vec<(bool, serde_json::Value)> = audit.healths().map(readiness).collect();
    let ready = each.iter().all(|(ok, _)| *ok);
    let first = each
        .iter()
        .find(|(ok, _)| !ok)
        .unwrap_or(&each[0])
        .1
        .clone();
    if each.len() == 1 {
        return (ready, first);
    }
    let mut v = first;
    v["sinks"] = each.into_iter().map(|(_, v)| v).collect();
    (ready, v)
}

/// The status page's banners: one per failing sink.
pub fn banners(audit: &Audit) -> Vec<String> {
    audit.healths().filter_map(banner).collect()
}

/// The audit sink's part of `/readyz`: whether it writes, and a JSON object naming it.
pub fn readiness(h: &Health) -> (bool, serde_json::Value) {
    match h.problem() {
        None => (true, serde_json::json!({ "sink": h.sink, "state": "ok" })),
        Some(error) => (
            false,
            serde_json::json!({
                "sink": h.sink,
                "state": "failing",
                "error": error,
                "since": h.failing_since().map(rfc3339),
                "records_held": h.records_held.get(),
                "records_lost": h.records_lost.get(),
            }),
        ),
    }
}

/// The status page's banner while the audit sink fails.
pub fn banner(h: &Health) -> Option<String> {
    let error = h.problem()?;
    Some(format!(
        "The audit sink {} cannot be written ({error}). Records held in memory: {}; lost: {}. New requests are refused with 503 unless [audit] on_failure = \"serve\".",
        h.sink,
        h.records_held.get(),
        h.records_lost.get()
    ))
}

pub use crate::clock::{now_rfc3339, rfc3339, system_rfc3339};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_reach_the_file_and_survive_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(Some(&path)).unwrap();
        let entry = || RequestEntry {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            request_id: RequestId(0x00ab_cdef_0123_4567),
            upstream_request_id: None,
            client: None,
            organization: Some("123".into()),
            method: http::Method::GET,
            path: "/organizations".into(),
            operation: Some("getOrganizations"),
            key_expires_at: None,
            status: 200,
            upstream_status: None,
            decision: "answered",
            reason: None,
            retried_after_401: false,
            redirects_followed: 0,
            token_fingerprint: None,
            duration: Duration::from_micros(1500),
            upstream_duration: None,
            queue_wait: None,
            bytes_in: 0,
            bytes_out: 2,
            source: Some(([127, 0, 0, 1], 50000).into()),
            client_address: Some([198, 51, 100, 7].into()),
            user_agent: Some(HeaderValue::from_static("curl/8")),
            identity: Some("key"),
            client_certificate: None,
            detail: None,
        };
        audit.request(entry());
        wait_for(|| audit.written() == 1);
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        audit.reopen();
        audit.request(entry());
        wait_for(|| audit.written() == 2);
        let new = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap();
        // The old file: the run's start checkpoint, the record, the rotation checkpoint.
        let events = |text: &str| -> Vec<String> {
            text.lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    format!("{}:{}", v["kind"], v["cause"]).replace('"', "")
                })
                .collect()
        };
        assert_eq!(
            events(&old),
            ["audit:start", "request:null", "audit:rotation"]
        );
        assert_eq!(events(&new), ["request:null"]);
        let files = [dir.path().join("audit.jsonl.1"), path.clone()];
        let open = verify::verify_files(&files, None).unwrap();
        assert!(
            matches!(
                open.finding.as_ref().map(|f| &f.problem),
                Some(verify::Problem::MissingTail { after: 3 })
            ),
            "{open}"
        );
        audit.close();
        let sealed = verify::verify_files(&files, None).unwrap();
        assert_eq!(sealed.finding, None, "{sealed}");
        assert_eq!((sealed.runs, sealed.checkpoints), (1, 3));
        let v: serde_json::Value = serde_json::from_str(new.lines().next().unwrap()).unwrap();
        assert_eq!(v["seq"], 3);
        assert_eq!(v["status"], 200);
        assert_eq!(v["time"], "2023-11-14T22:13:20Z");
        assert_eq!(v["request_id"], "00abcdef01234567");
        assert_eq!(v["source"], "127.0.0.1:50000");
        assert_eq!(v["client_address"], "198.51.100.7");
        assert_eq!(v["user_agent"], "curl/8");
        assert_eq!(v["organization"], "123");
        assert_eq!(v["duration_ms"], 1.5);
    }

    #[test]
    fn an_entry_shows_the_token_only_as_its_fingerprint() {
        let (access, refresh) = ("access-5ecret-0123456789", "refresh-5ecret-9876543210");
        let token = Arc::new(crate::token::TokenState::for_test(access, refresh, 0));
        assert!(
            token.bearer().is_some(),
            "the bearer header is built and cached"
        );
        let entry = RequestEntry {
            at: SystemTime::now(),
            request_id: RequestId::new(),
            upstream_request_id: None,
            client: None,
            organization: None,
            method: http::Method::POST,
            path: "/organizations/1/networks".into(),
            operation: None,
            key_expires_at: None,
            status: 201,
            upstream_status: Some(201),
            decision: "forwarded",
            reason: None,
            retried_after_401: false,
            redirects_followed: 0,
            token_fingerprint: token.fingerprint().cloned(),
            duration: Duration::ZERO,
            upstream_duration: None,
            queue_wait: None,
            bytes_in: 10,
            bytes_out: 20,
            source: None,
            client_address: None,
            user_agent: None,
            identity: None,
            client_certificate: None,
            detail: None,
        };
        let mut json = Vec::new();
        entry.write_json(&mut json).unwrap();
        let json = String::from_utf8(json).unwrap();
        let debug = format!("{entry:?}");
        for text in [&json, &debug] {
            assert!(!text.contains("5ecret"), "a token leaked: {text}");
        }
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let fp = v["token_fingerprint"].as_str().unwrap();
        assert_eq!(fp.len(), 8);
        assert_eq!(Some(fp), token.fingerprint().map(|f| &**f));
    }

    #[test]
    fn records_go_to_the_file_and_to_syslog() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = AuditConfig {
            syslog: Some(crate::config::SyslogConfig {
                target: crate::config::SyslogTarget::Tcp {
                    host: "127.0.0.1".into(),
                    port: listener.local_addr().unwrap().port(),
                },
                facility: 4,
                app_name: "test".into(),
            }),
            ..AuditConfig::default()
        };
        let audit = Audit::start(Some(&path), config).unwrap();
        audit.server_event(&ServerRecord::new("config_reloaded", "sighup"));
        let (mut peer, _) = listener.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = String::new();
        let mut buf = [0u8; 4096];
        while !got.contains("config_reloaded") {
            let n = peer.read(&mut buf).unwrap();
            assert!(n > 0, "{got}");
            got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        assert!(
            got.contains(
                " server [meraki-proxy@32473 seq=\"1\" event=\"config_reloaded\"] {\"seq\":1,"
            ),
            "{got}"
        );
        wait_for(|| {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .contains("config_reloaded")
        });
        let (ready, v) = readiness_of(&audit);
        assert!(ready, "{v}");
        assert_eq!(
            v["sinks"][1]["sink"],
            format!("syslog tcp://{}", listener.local_addr().unwrap())
        );
    }

    fn wait_for(f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("condition not reached");
    }
}
