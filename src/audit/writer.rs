//! The writer thread and the health it reports. Request threads only enqueue (never waiting);
//! the writer frames records into the chain, writes them in batches, holds them in bounded
//! memory while the sink fails, and says so: [`Health`] is what readiness, the status page, the
//! metrics and the request path's refusal read.

use super::chain::{Cause, Position};
use super::sink::{FileSink, Sink};
use crate::config::{AuditConfig, Fsync, SyslogConfig};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Opts};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the writer thread wakes to write what was queued. A sleeping writer is never woken
/// by a request (no futex, no context switch per record), and a batch costs one `write()`.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(20);
/// A batch buffer larger than this after a write is not kept for the next batch (after a long
/// failure episode the held records are written at once).
const BATCH_KEEP: usize = 4 << 20;
/// A record's JSON body is serialized into this much room at first: a typical request record is
/// 600-700 bytes, so it is written without growing.
const BODY_CAPACITY: usize = 1024;
/// While the sink fails, how often one record is tried.
const RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// A writer that has not come round its loop for this long is stuck (a hung disk).
const STALL: Duration = Duration::from_secs(5);

/// What request threads hand the writer.
pub enum Msg {
    Line(Arc<str>),
    Request(Arc<super::RequestEntry>),
    /// Acknowledged once everything queued before it was tried.
    Flush(SyncSender<()>),
    /// Writes the shutdown checkpoint, syncs, then acknowledges.
    Seal(SyncSender<()>),
}

/// The audit sink's health, shared by the writer and everything that reports it.
pub struct Health {
    /// The sink failed its last write and has not written since.
    failing: AtomicBool,
    /// Milliseconds since `epoch` when the writer last came round its loop.
    beat: AtomicU64,
    epoch: Instant,
    /// Why the sink fails, and since when (unix seconds), for readiness and the status page.
    problem: Mutex<Option<(String, i64)>>,
    /// Records lost and not yet said in the log by a `records_lost` record.
    pub(super) lost_unreported: AtomicU64,
    pub(super) written: AtomicU64,
    pub sink: String,
    /// The `sink` label of the metrics: `file`, `stdout` or `syslog`.
    pub label: &'static str,
    pub write_failures: IntCounter,
    pub records_lost: IntCounter,
    pub records_held: IntGauge,
    pub sink_up: IntGauge,
    pub refused: IntCounter,
    pub fsync_seconds: Histogram,
}

impl Health {
    fn new(sink: String, label: &'static str) -> prometheus::Result<Health> {
        // One set of metrics per sink, told apart by the `sink` label.
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("sink", label);
        let up = IntGauge::with_opts(opts(
            "meraki_proxy_audit_sink_up",
            "1 while the audit sink writes, 0 while it fails (requests are refused, on_failure = refuse).",
        ))?;
        up.set(1);
        Ok(Health {
            failing: AtomicBool::new(false),
            beat: AtomicU64::new(0),
            epoch: Instant::now(),
            problem: Mutex::new(None),
            lost_unreported: AtomicU64::new(0),
            written: AtomicU64::new(0),
            sink,
            label,
            write_failures: IntCounter::with_opts(opts(
                "meraki_proxy_audit_write_failures_total",
                "Failed writes (or fdatasyncs, or sends) of the audit sink.",
            ))?,
            records_lost: IntCounter::with_opts(opts(
                "meraki_proxy_audit_records_lost_total",
                "Audit records dropped: the writer's queue or its bounded memory was full (or, syslog, the record was too long).",
            ))?,
            records_held: IntGauge::with_opts(opts(
                "meraki_proxy_audit_records_held",
                "Audit records held in memory, waiting for the sink to write again.",
            ))?,
            sink_up: up,
            refused: IntCounter::with_opts(opts(
                "meraki_proxy_audit_refused_requests_total",
                "Requests refused (503, not sent) because the audit sink could not be written.",
            ))?,
            fsync_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "meraki_proxy_audit_fsync_seconds",
                    "Duration of the audit log's fdatasync calls.",
                )
                .const_label("sink", label)
                .buckets(vec![
                    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
                ]),
            )?,
        })
    }

    /// The collectors, for the metrics registry.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        let mut all: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.write_failures.clone()),
            Box::new(self.records_lost.clone()),
            Box::new(self.records_held.clone()),
            Box::new(self.sink_up.clone()),
            Box::new(self.refused.clone()),
        ];
        if self.label == "file" {
            all.push(Box::new(self.fsync_seconds.clone()));
        }
        all
    }

    /// Why the sink cannot write now, if it cannot: a failed write, or a writer that stopped
    /// coming round (a hung disk never returns an error).
    pub fn problem(&self) -> Option<String> {
        if self.failing.load(Ordering::Acquire) {
            let p = self.problem.lock().map(|p| p.clone()).unwrap_or_default();
            return Some(p.map_or_else(|| "write failed".into(), |(e, _)| e));
        }
        let age = self.since_beat(Instant::now());
        (age > STALL).then(|| format!("the writer has not written for {} s", age.as_secs()))
    }

    /// Whether the sink cannot write now (what [`Health::problem`] says, without making the
    /// message): for the request path, at `now` (the request's start: no clock read of its own).
    pub fn blocked(&self, now: Instant) -> bool {
        self.failing.load(Ordering::Acquire) || self.since_beat(now) > STALL
    }

    /// How long before `now` the writer last came round its loop.
    fn since_beat(&self, now: Instant) -> Duration {
        let beat = Duration::from_millis(self.beat.load(Ordering::Relaxed));
        now.saturating_duration_since(self.epoch)
            .saturating_sub(beat)
    }

    /// Since when (unix seconds) the sink fails, if it does.
    pub fn failing_since(&self) -> Option<i64> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        self.problem
            .lock()
            .ok()
            .and_then(|p| p.as_ref().map(|p| p.1))
    }

    /// One more record lost.
    pub(super) fn lose(&self) {
        self.lose_many(1);
    }

    fn lose_many(&self, n: u64) {
        self.records_lost.inc_by(n);
        self.lost_unreported.fetch_add(n, Ordering::Relaxed);
    }

    fn beat(&self) {
        self.beat
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// A record waiting to be written.
enum Pending {
    /// A record of a caller: `refused` for the 503s of an unwritable log, which may use only half
    /// the memory, so the records of requests that were forwarded always have room.
    Record {
        body: Vec<u8>,
        refused: bool,
    },
    /// The writer's own note (records lost, sink recovered): not counted as written.
    Note(Vec<u8>),
    Checkpoint(Cause),
}

/// Where a batch could end: after a line, with what writing up to there commits.
struct Mark {
    /// Bytes of the batch up to the end of the line.
    end: usize,
    position: Position,
    /// Pending items the lines up to here consume.
    items: usize,
    records: u64,
    refused: usize,
}

/// Why a failure episode began, and what it cost so far.
struct Episode {
    since: Instant,
    failures: u64,
}

/// The writer thread's state.
pub struct Writer {
    sink: Sink,
    path: Option<PathBuf>,
    position: Position,
    pending: VecDeque<Pending>,
    /// Of `pending`, records of refused requests.
    refused_held: usize,
    config: AuditConfig,
    health: Arc<Health>,
    episode: Option<Episode>,
    next_try: Instant,
    /// Written since the last fdatasync.
    unsynced: bool,
    last_sync: Instant,
    /// The last line written is a shutdown checkpoint: the next record starts a new run.
    sealed: bool,
    /// The batch buffer and its marks, kept from one batch to the next (no allocation, and no
    /// page faults, per batch).
    batch: Vec<u8>,
    marks: Vec<Mark>,
}

impl Writer {
    /// Opens the sink (`None`: standard output); the run starts with a checkpoint that links to
    /// the file's last line.
    pub fn open(path: Option<PathBuf>, config: AuditConfig) -> std::io::Result<Writer> {
        let (sink, prev) = match &path {
            None => (Sink::Stdout, super::chain::GENESIS),
            Some(p) => {
                let (f, tail) = FileSink::open(p)?;
                if tail.cut > 0 {
                    tracing::warn!(path = %p.display(), bytes = tail.cut, "the audit log ended in a torn line (a crash during a write); cut it off");
                }
                (
                    Sink::File(f),
                    tail.last_line.unwrap_or(super::chain::GENESIS),
                )
            }
        };
        Writer::new(sink, path, prev, config)
    }

    /// A writer for the syslog sink: its own chain, from [`super::chain::GENESIS`] each run.
    pub fn syslog(syslog: &SyslogConfig, config: AuditConfig) -> std::io::Result<Writer> {
        let sink = Sink::Syslog(super::syslog::SyslogSink::new(syslog));
        Writer::new(sink, None, super::chain::GENESIS, config)
    }

    fn new(
        sink: Sink,
        path: Option<PathBuf>,
        prev: [u8; 32],
        config: AuditConfig,
    ) -> std::io::Result<Writer> {
        let health = Health::new(sink.describe(), sink.label()).map_err(std::io::Error::other)?;
        let mut pending = VecDeque::new();
        pending.push_back(Pending::Checkpoint(Cause::Start));
        let now = Instant::now();
        Ok(Writer {
            sink,
            path,
            position: Position::new(prev),
            pending,
            refused_held: 0,
            config,
            health: Arc::new(health),
            episode: None,
            next_try: now,
            unsynced: false,
            last_sync: now,
            sealed: false,
            batch: Vec::new(),
            marks: Vec::new(),
        })
    }

    /// The health this writer reports.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// The thread's loop: wake, drain the queue, write, sync; until every sender is gone.
    pub fn run(mut self, rx: Receiver<Msg>, reopen: Arc<AtomicBool>) {
        loop {
            self.health.beat();
            std::thread::sleep(BATCH_INTERVAL);
            if reopen.swap(false, Ordering::SeqCst) {
                self.rotate();
            }
            let mut acks = Vec::new();
            let mut seal = false;
            let mut gone = false;
            loop {
                match rx.try_recv() {
                    Ok(Msg::Line(line)) => self.admit(line.as_bytes().to_vec(), false),
                    Ok(Msg::Request(entry)) => {
                        let refused = entry.reason == Some(super::AUDIT_UNAVAILABLE);
                        let mut body = Vec::with_capacity(BODY_CAPACITY);
                        match entry.write_json(&mut body) {
                            Ok(()) => self.admit(body, refused),
                            Err(e) => {
                                tracing::error!(error = %e, "could not serialize an audit record")
                            }
                        }
                    }
                    Ok(Msg::Flush(ack)) => acks.push(ack),
                    Ok(Msg::Seal(ack)) => {
                        seal = true;
                        acks.push(ack);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        seal = true;
                        gone = true;
                        break;
                    }
                }
            }
            if seal && !self.sealed {
                self.pending.push_back(Pending::Checkpoint(Cause::Shutdown));
                self.sealed = true;
            }
            self.write_pending();
            self.probe();
            self.sync_if_due(seal || !acks.is_empty());
            for ack in acks {
                let _ = ack.try_send(());
            }
            if gone {
                return;
            }
        }
    }

    /// Holds a caller's record, or counts it lost when memory is full.
    fn admit(&mut self, body: Vec<u8>, refused: bool) {
        let limit = if refused {
            self.config.buffer_records / 2
        } else {
            self.config.buffer_records
        };
        let held = if refused {
            self.refused_held
        } else {
            self.pending.len()
        };
        if held >= limit {
            self.health.lose();
            return;
        }
        if self.sealed {
            // Something after the shutdown checkpoint (a test's audit log living on): a new run.
            self.pending.push_back(Pending::Checkpoint(Cause::Start));
            self.sealed = false;
        }
        self.refused_held += usize::from(refused);
        self.pending.push_back(Pending::Record { body, refused });
        self.health.records_held.set(self.pending.len() as i64);
    }

    /// Log rotation: the old file ends with a rotation checkpoint, the chain goes on in the new.
    fn rotate(&mut self) {
        let Some(path) = self.path.clone() else {
            return;
        };
        if !self.sealed {
            self.pending.push_back(Pending::Checkpoint(Cause::Rotation));
        }
        self.write_pending();
        self.sync_if_due(true);
        match FileSink::open(&path) {
            Ok((f, _)) => {
                self.sink = Sink::File(f);
                self.unsynced = false;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not reopen the audit log; still writing to the old file")
            }
        }
    }

    /// Writes what is held: everything at once while the sink works; one record at a time,
    /// every [`RETRY_INTERVAL`], while it fails.
    fn write_pending(&mut self) {
        loop {
            if self.episode.is_none() {
                let lost = self.health.lost_unreported.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    self.pending.push_back(Pending::Note(note(
                        "records_lost",
                        &format!(",\"count\":{lost}"),
                    )));
                }
            }
            if self.pending.is_empty() {
                return;
            }
            let now = Instant::now();
            if self.episode.is_some() && now < self.next_try {
                return;
            }
            let take = if self.episode.is_some() {
                1
            } else {
                self.pending.len()
            };
            let mut position = self.position;
            let mut buf = std::mem::take(&mut self.batch);
            buf.clear();
            buf.reserve(take * 800);
            // After each line: what is written if the sink delivered the batch up to there.
            let mut marks = std::mem::take(&mut self.marks);
            marks.clear();
            marks.reserve(take + 1);
            let (mut records, mut refused) = (0u64, 0usize);
            let key = self.config.hmac_key.as_ref();
            let time = super::now_rfc3339();
            for (i, p) in self.pending.iter().take(take).enumerate() {
                match p {
                    Pending::Record { body, refused: r } => {
                        position.frame(body, &mut buf);
                        records += 1;
                        refused += usize::from(*r);
                    }
                    Pending::Note(body) => position.frame(body, &mut buf),
                    Pending::Checkpoint(cause) => position.checkpoint(*cause, &time, key, &mut buf),
                }
                let mark = |buf: &Vec<u8>, position| Mark {
                    end: buf.len(),
                    position,
                    items: i + 1,
                    records,
                    refused,
                };
                marks.push(mark(&buf, position));
                if position.since_checkpoint >= self.config.checkpoint_every {
                    position.checkpoint(Cause::Interval, &time, key, &mut buf);
                    marks.push(mark(&buf, position));
                }
            }
            let (delivered, result) = self.sink.write(&buf);
            let skipped = self.sink.take_skipped();
            if skipped > 0 {
                self.health.lose_many(skipped);
            }
            if let Some(m) = marks.iter().rev().find(|m| m.end <= delivered) {
                self.position = m.position;
                self.pending.drain(..m.items);
                self.refused_held -= m.refused;
                self.health.records_held.set(self.pending.len() as i64);
                self.health.written.fetch_add(m.records, Ordering::Release);
                self.unsynced = true;
            }
            if buf.capacity() <= BATCH_KEEP {
                self.batch = buf;
                self.marks = marks;
            }
            match result {
                Ok(()) => {
                    if self.config.fsync == Fsync::Always {
                        self.sync_if_due(true);
                    }
                    if self.episode.is_some() && self.health.failing.load(Ordering::Acquire) {
                        self.recovered();
                    }
                }
                Err(e) => {
                    self.failed(&e);
                    return;
                }
            }
        }
    }

    /// A sink that can tell it cannot take records without being sent one (a syslog receiver
    /// that closed its TCP connection) fails, or recovers, while there is nothing to write: so
    /// readiness says so before a request is forwarded, and recovers in a quiet period.
    fn probe(&mut self) {
        if !self.pending.is_empty() || Instant::now() < self.next_try {
            return;
        }
        self.next_try = Instant::now() + RETRY_INTERVAL;
        match self.sink.probe() {
            Some(Ok(())) if self.episode.is_some() => self.recovered(),
            Some(Err(e)) => self.failed(&e),
            _ => {}
        }
    }

    /// `fdatasync` when the interval is over (or `force`); a failure counts as a write failure.
    fn sync_if_due(&mut self, force: bool) {
        if !self.unsynced {
            return;
        }
        let due = match self.config.fsync {
            Fsync::Always => true,
            Fsync::Interval(d) => force || self.last_sync.elapsed() >= d,
        };
        if !due {
            return;
        }
        let start = Instant::now();
        match self.sink.sync() {
            Ok(()) => {
                self.health
                    .fsync_seconds
                    .observe(start.elapsed().as_secs_f64());
                self.unsynced = false;
                self.last_sync = start;
            }
            Err(e) => self.failed(&e),
        }
    }

    /// A write or sync failed: counted every time, logged once per episode.
    fn failed(&mut self, e: &std::io::Error) {
        self.health.write_failures.inc();
        self.next_try = Instant::now() + RETRY_INTERVAL;
        match &mut self.episode {
            Some(ep) => ep.failures += 1,
            None => {
                tracing::error!(
                    sink = %self.health.sink,
                    error = %e,
                    held = self.pending.len(),
                    on_failure = ?self.config.on_failure,
                    "the audit log cannot be written; records are held in memory until it can (logged once per episode)"
                );
                if let Ok(mut p) = self.health.problem.lock() {
                    *p = Some((e.to_string(), crate::clock::now_unix()));
                }
                self.health.sink_up.set(0);
                self.health.failing.store(true, Ordering::Release);
                self.episode = Some(Episode {
                    since: Instant::now(),
                    failures: 1,
                });
            }
        }
    }

    /// The first write after an episode went through.
    fn recovered(&mut self) {
        let Some(ep) = self.episode.take() else {
            return;
        };
        let lost = self.health.lost_unreported.load(Ordering::Relaxed);
        let down_ms = ep.since.elapsed().as_millis() as u64;
        tracing::warn!(
            sink = %self.health.sink,
            down_ms,
            failures = ep.failures,
            held = self.pending.len(),
            lost,
            "the audit log writes again"
        );
        self.pending.push_back(Pending::Note(note(
            "sink_recovered",
            &format!(",\"down_ms\":{down_ms},\"failures\":{}", ep.failures),
        )));
        self.health.failing.store(false, Ordering::Release);
        self.health.sink_up.set(1);
        if let Ok(mut p) = self.health.problem.lock() {
            *p = None;
        }
    }
}

/// A note of the writer's own (`kind: "audit"`).
fn note(event: &str, fields: &str) -> Vec<u8> {
    format!(
        "{{\"time\":\"{}\",\"kind\":\"audit\",\"event\":\"{event}\"{fields}}}",
        super::now_rfc3339()
    )
    .into_bytes()
}
