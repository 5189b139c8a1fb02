//! The audit log: one JSON line per request and per token event, written by a dedicated thread.
//! The request path only moves what it knows into a [`RequestEntry`] (reference counts, no
//! formatting) and enqueues it; timestamps and JSON are made on the writer thread. Never holds a
//! secret: tokens appear only as 8-hex-character fingerprints, client keys not at all.

use crate::config::Client;
use crate::token::events::TokenEvent;
use http::HeaderValue;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Records queued beyond this make writers wait: audit completeness over latency.
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
    pub source: Option<SocketAddr>,
    pub user_agent: Option<HeaderValue>,
    /// What identified the client: `key`, `certificate`, `certificate+key`.
    pub identity: Option<&'static str>,
    /// The subject of the connection's TLS client certificate (mutual TLS), if it sent one.
    pub client_certificate: Option<Arc<str>>,
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
            source: self.source.map(|a| a.to_string()),
            user_agent: self.user_agent.as_ref().and_then(|v| v.to_str().ok()),
            identity: self.identity,
            client_certificate: self.client_certificate.as_deref(),
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
    source: Option<String>,
    user_agent: Option<&'a str>,
    identity: Option<&'static str>,
    client_certificate: Option<&'a str>,
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
    /// `commit_failed`, `short_token_lifetime`, `grant_revoked`.
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
            _ => e.detail.clone(),
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

/// How often the writer thread wakes to write what was queued. A sleeping writer is never woken
/// by a request (no futex, no context switch per record), and a batch costs one `write()`.
const BATCH_INTERVAL: Duration = Duration::from_millis(20);

enum Msg {
    Line(String),
    Request(Box<RequestEntry>),
    Flush(SyncSender<()>),
}

/// The audit log.
pub struct Audit {
    tx: SyncSender<Msg>,
    reopen: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
}

impl Audit {
    /// Opens the log (`None`: standard output) and starts its writer thread.
    pub fn open(path: Option<&Path>) -> io::Result<Audit> {
        let sink = Sink::open(path.map(Path::to_path_buf))?;
        let (tx, rx) = sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (r, w) = (reopen.clone(), written.clone());
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer(sink, rx, r, w))?;
        Ok(Audit {
            tx,
            reopen,
            written,
        })
    }

    /// Queues a request record.
    pub fn request(&self, entry: RequestEntry) {
        self.enqueue(Msg::Request(Box::new(entry)));
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
            Ok(l) => self.enqueue(Msg::Line(l)),
            Err(e) => tracing::error!(error = %e, "could not serialize an audit record"),
        }
    }

    fn enqueue(&self, msg: Msg) {
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => {
                // The disk is slower than the traffic: wait rather than drop a record.
                let _ = self.tx.send(msg);
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("audit writer is gone; record lost")
            }
        }
    }

    /// Waits until every record queued so far is written and flushed (bounded: 5 s).
    pub fn flush(&self) {
        let (ack, done) = sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(Duration::from_secs(5));
        }
    }

    /// Reopens the file at its path (after log rotation moved it), before the next write.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::SeqCst);
    }

    /// Records written and flushed to the sink so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }
}

enum Sink {
    Stdout(io::Stdout),
    File { path: PathBuf, out: BufWriter<File> },
}

impl Sink {
    fn open(path: Option<PathBuf>) -> io::Result<Sink> {
        Ok(match path {
            None => Sink::Stdout(io::stdout()),
            Some(path) => {
                let f = OpenOptions::new().create(true).append(true).open(&path)?;
                Sink::File {
                    path,
                    out: BufWriter::new(f),
                }
            }
        })
    }

    /// Writes one line: `write` puts the record straight into the file's buffer (or into
    /// standard output under its lock), then the newline.
    fn write_line(
        &mut self,
        write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<()> {
        match self {
            Sink::Stdout(s) => {
                let mut l = s.lock();
                write(&mut l)?;
                l.write_all(b"\n")
            }
            Sink::File { out, .. } => {
                write(out)?;
                out.write_all(b"\n")
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout(s) => s.flush(),
            Sink::File { out, .. } => out.flush(),
        }
    }
}

fn writer(mut sink: Sink, rx: Receiver<Msg>, reopen: Arc<AtomicBool>, written: Arc<AtomicU64>) {
    loop {
        std::thread::sleep(BATCH_INTERVAL);
        if reopen.swap(false, Ordering::SeqCst) {
            let _ = sink.flush();
            if let Sink::File { path, .. } = &sink {
                match Sink::open(Some(path.clone())) {
                    Ok(s) => sink = s,
                    Err(e) => {
                        tracing::error!(error = %e, "could not reopen the audit log; still writing to the old file")
                    }
                }
            }
        }
        // Records written to the buffer since the last flush; `written` counts only flushed ones,
        // so a reader that sees the count also sees the lines in the file.
        let mut unflushed = 0u64;
        loop {
            match rx.try_recv() {
                Ok(Msg::Line(line)) => match sink.write_line(|w| w.write_all(line.as_bytes())) {
                    Ok(()) => unflushed += 1,
                    Err(e) => tracing::error!(error = %e, "audit write failed"),
                },
                Ok(Msg::Request(entry)) => match sink.write_line(|w| Ok(entry.write_json(w)?)) {
                    Ok(()) => unflushed += 1,
                    Err(e) => tracing::error!(error = %e, "audit write failed"),
                },
                Ok(Msg::Flush(ack)) => {
                    flush(&mut sink, &mut unflushed, &written);
                    let _ = ack.try_send(());
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    flush(&mut sink, &mut unflushed, &written);
                    return;
                }
            }
        }
        if unflushed > 0 {
            flush(&mut sink, &mut unflushed, &written);
        }
    }
}

/// Flushes the sink and, once the lines are in the file, counts them as written.
fn flush(sink: &mut Sink, unflushed: &mut u64, written: &AtomicU64) {
    match sink.flush() {
        Ok(()) => {
            written.fetch_add(*unflushed, Ordering::Release);
        }
        Err(e) => tracing::error!(error = %e, "audit flush failed"),
    }
    *unflushed = 0;
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
            user_agent: Some(HeaderValue::from_static("curl/8")),
            identity: Some("key"),
            client_certificate: None,
        };
        audit.request(entry());
        wait_for(|| audit.written() == 1);
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        audit.reopen();
        audit.request(entry());
        wait_for(|| audit.written() == 2);
        let new = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap();
        assert_eq!((old.lines().count(), new.lines().count()), (1, 1));
        let v: serde_json::Value = serde_json::from_str(new.lines().next().unwrap()).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["time"], "2023-11-14T22:13:20Z");
        assert_eq!(v["request_id"], "00abcdef01234567");
        assert_eq!(v["source"], "127.0.0.1:50000");
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
            user_agent: None,
            identity: None,
            client_certificate: None,
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
