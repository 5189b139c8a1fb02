//! `meraki-oauth-proxy audit verify FILE...`: walks audit files (rotated ones first, in order)
//! along the hash chain, checks each checkpoint's HMAC, and names the first line that was
//! deleted, inserted, edited or moved, or where the chain ends without its closing checkpoint.

use super::chain::{line_hash, verify_tag, HMAC_MARK};
use crate::secret::Secret;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// What is wrong at a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Not a chained JSON record (no `seq`/`prev`): edited, torn or foreign.
    Unparsable,
    /// Records `from..=to` of the run are missing just before this line.
    Deleted { from: u64, to: u64 },
    /// This line is not part of the chain (a copy, or forged).
    Inserted { seq: u64 },
    /// This line was changed after it was written.
    Edited { seq: u64 },
    /// This line is a genuine record out of its place.
    Reordered { seq: u64 },
    /// A checkpoint whose HMAC does not verify under the key (or is missing).
    BadSignature { seq: u64 },
    /// The chain ends at this line without the run's closing checkpoint (shutdown, or rotation
    /// at a file's end): the lines after it were deleted, or the proxy crashed or still runs.
    MissingTail { after: u64 },
    /// The files begin in the middle of a run: its first records are missing.
    MissingHead { first: u64 },
}

/// The first problem found: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    pub problem: Problem,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        match &self.problem {
            Problem::Unparsable => write!(f, "not a chained audit record (edited, torn or foreign)"),
            Problem::Deleted { from, to } if from == to => write!(f, "record seq {from} deleted before this line"),
            Problem::Deleted { from, to } => write!(f, "records seq {from} to {to} deleted before this line"),
            Problem::Inserted { seq } => write!(f, "inserted line (claims seq {seq}; not part of the chain)"),
            Problem::Edited { seq } => write!(f, "record seq {seq} edited (its SHA-256 no longer matches the chain)"),
            Problem::Reordered { seq } => write!(f, "record seq {seq} out of order (moved)"),
            Problem::BadSignature { seq } => write!(f, "checkpoint seq {seq}: HMAC does not verify (the checkpoint or the records before it were rewritten, or the key is wrong)"),
            Problem::MissingTail { after } => write!(f, "missing tail: the chain ends after seq {after} without its closing checkpoint (lines deleted, or the proxy crashed or is still writing)"),
            Problem::MissingHead { first } => write!(f, "missing head: the chain starts at seq {first}, not at a run's start (records deleted, or an earlier file not given)"),
        }
    }
}

/// What a walk found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    pub lines: usize,
    pub checkpoints: usize,
    /// Checkpoints whose HMAC was checked (a key was given and they were signed).
    pub signed: usize,
    /// Runs of the writer (start checkpoints).
    pub runs: usize,
    pub finding: Option<Finding>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.finding {
            Some(found) => writeln!(f, "{found}")?,
            None => writeln!(
                f,
                "OK: {} lines in {} run(s), chain intact, {} checkpoint(s), {} HMAC(s) verified",
                self.lines, self.runs, self.checkpoints, self.signed
            )?,
        }
        if self.signed == 0 && self.checkpoints > 0 {
            writeln!(f, "note: no checkpoint HMAC was checked (no key given, or unsigned checkpoints): anyone able to write the files could have rewritten the whole chain")?;
        }
        Ok(())
    }
}

/// One line of the files, parsed as far as the chain needs.
struct Entry {
    file: usize,
    line: usize,
    hash: [u8; 32],
    rec: Option<Rec>,
}

struct Rec {
    seq: u64,
    prev: [u8; 32],
    /// For checkpoints: the cause, and whether the signature checked out (None: unsigned).
    checkpoint: Option<(String, Option<bool>)>,
}

impl Rec {
    fn cause(&self) -> Option<&str> {
        self.checkpoint.as_ref().map(|(c, _)| c.as_str())
    }
}

/// Verifies `files` in the order given.
pub fn verify_files(files: &[PathBuf], key: Option<&Secret>) -> std::io::Result<Report> {
    let mut texts = Vec::with_capacity(files.len());
    for f in files {
        texts.push((f.clone(), std::fs::read(f)?));
    }
    let named: Vec<(&Path, &[u8])> = texts.iter().map(|(p, t)| (p.as_path(), &t[..])).collect();
    Ok(verify(&named, key))
}

/// Verifies the contents of files, in order.
pub fn verify(files: &[(&Path, &[u8])], key: Option<&Secret>) -> Report {
    let mut entries = Vec::new();
    for (fi, (_, text)) in files.iter().enumerate() {
        for (li, raw) in text.split(|b| *b == b'\n').enumerate() {
            if raw.is_empty() {
                continue;
            }
            entries.push(Entry {
                file: fi,
                line: li + 1,
                hash: line_hash(raw),
                rec: parse(raw, key),
            });
        }
        // A last line without its newline is torn: the writer never leaves one.
        if !text.is_empty() && !text.ends_with(b"\n") {
            if let Some(e) = entries.last_mut() {
                e.rec = None;
            }
        }
    }
    let (mut report, found) = Walk::new(&entries).run();
    report.finding = found.map(|(i, problem)| Finding {
        file: files[entries[i].file].0.to_path_buf(),
        line: entries[i].line,
        problem,
    });
    report
}

fn parse(raw: &[u8], key: Option<&Secret>) -> Option<Rec> {
    let v: serde_json::Value = serde_json::from_slice(raw).ok()?;
    let seq = v.get("seq")?.as_u64()?;
    let mut prev = [0u8; 32];
    hex::decode_to_slice(v.get("prev")?.as_str()?, &mut prev).ok()?;
    let checkpoint = (v.get("kind")?.as_str()? == "audit"
        && v.get("event").and_then(|e| e.as_str()) == Some("checkpoint"))
    .then(|| {
        let cause = v
            .get("cause")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_owned();
        let signed = match (v.get("hmac").and_then(|h| h.as_str()), key) {
            (Some(tag), Some(k)) => Some(signed_part(raw).is_some_and(|d| verify_tag(k, d, tag))),
            // A key was given, so every checkpoint must be signed.
            (None, Some(_)) => Some(false),
            (_, None) => None,
        };
        (cause, signed)
    });
    Some(Rec {
        seq,
        prev,
        checkpoint,
    })
}

/// The bytes a checkpoint's HMAC covers: everything before `,"hmac":`.
fn signed_part(raw: &[u8]) -> Option<&[u8]> {
    let at = raw.windows(HMAC_MARK.len()).rposition(|w| w == HMAC_MARK)?;
    Some(&raw[..at])
}

struct Walk<'a> {
    e: &'a [Entry],
    by_hash: HashMap<[u8; 32], Vec<usize>>,
    /// The last line accepted into the chain.
    last: Option<usize>,
    report: Report,
}

type Found = (usize, Problem);

impl<'a> Walk<'a> {
    fn new(e: &'a [Entry]) -> Self {
        let mut by_hash: HashMap<[u8; 32], Vec<usize>> = HashMap::new();
        for (i, x) in e.iter().enumerate() {
            by_hash.entry(x.hash).or_default().push(i);
        }
        Walk {
            e,
            by_hash,
            last: None,
            report: Report::default(),
        }
    }

    fn rec(&self, i: usize) -> Option<&'a Rec> {
        self.e.get(i).and_then(|x| x.rec.as_ref())
    }

    /// The last accepted line closes its run.
    fn sealed(&self) -> bool {
        self.last
            .and_then(|l| self.rec(l))
            .is_some_and(|r| r.cause() == Some("shutdown"))
    }

    /// Whether line `j` is what the chain expects next.
    fn fits(&self, j: usize) -> bool {
        let Some(r) = self.rec(j) else { return false };
        let Some(l) = self.last else { return true };
        if self.sealed() {
            return r.cause() == Some("start");
        }
        let last = self.rec(l).map_or(0, |x| x.seq);
        r.seq == last + 1 && r.prev == self.e[l].hash && r.cause() != Some("start")
    }

    fn run(mut self) -> (Report, Option<Found>) {
        let found = self.walk();
        self.report.lines = self.e.len();
        (self.report, found.err())
    }

    fn walk(&mut self) -> Result<(), Found> {
        for i in 0..self.e.len() {
            let Some(r) = self.rec(i) else {
                return Err((i, Problem::Unparsable));
            };
            if let Some((_, signed)) = &r.checkpoint {
                if *signed == Some(false) {
                    return Err((i, Problem::BadSignature { seq: r.seq }));
                }
            }
            if let Some(l) = self.last {
                let closes_file = self
                    .rec(l)
                    .is_some_and(|x| matches!(x.cause(), Some("rotation" | "shutdown")));
                if self.e[l].file != self.e[i].file && !closes_file {
                    return Err((l, self.tail(l)));
                }
            } else if r.cause() != Some("start")
                || r.seq != 0
                // A later run's start copied to the front (its original links to a line).
                || (self.duplicate(i) && r.prev != super::chain::GENESIS)
            {
                return Err(self.head(i, r));
            }
            // A copy of an earlier line, even where it would fit (a run's start after a seal).
            if self.by_hash[&self.e[i].hash][0] < i {
                return Err((i, Problem::Inserted { seq: r.seq }));
            }
            if !self.fits(i) {
                return Err(self.explain(i, r));
            }
            self.accept(i, r);
        }
        match self.last {
            Some(l) if !self.sealed() => Err((l, self.tail(l))),
            _ => Ok(()),
        }
    }

    /// The first line is not a run's start.
    fn head(&self, i: usize, r: &Rec) -> Found {
        if self.duplicate(i) {
            return (i, Problem::Inserted { seq: r.seq });
        }
        match self.rec(i + 1) {
            Some(n) if n.cause() == Some("start") && n.seq == 0 => {
                if r.prev == self.e[i + 1].hash && r.seq == 1 {
                    (i, Problem::Reordered { seq: r.seq })
                } else {
                    (i, Problem::Inserted { seq: r.seq })
                }
            }
            _ => (i, Problem::MissingHead { first: r.seq }),
        }
    }

    /// Line `i` is an exact copy of another line.
    fn duplicate(&self, i: usize) -> bool {
        self.by_hash
            .get(&self.e[i].hash)
            .is_some_and(|v| v.len() > 1)
    }

    fn tail(&self, l: usize) -> Problem {
        Problem::MissingTail {
            after: self.rec(l).map_or(0, |r| r.seq),
        }
    }

    fn accept(&mut self, i: usize, r: &Rec) {
        if let Some((cause, signed)) = &r.checkpoint {
            self.report.checkpoints += 1;
            self.report.signed += usize::from(signed.is_some());
            self.report.runs += usize::from(cause == "start");
        }
        self.last = Some(i);
    }

    /// Line `i` is not what the chain expects: says why, as precisely as the lines allow.
    fn explain(&self, i: usize, r: &Rec) -> Found {
        let Some(l) = self.last else {
            return (i, Problem::MissingHead { first: r.seq });
        };
        let inserted = (i, Problem::Inserted { seq: r.seq });
        let start = r.cause() == Some("start");
        // An exact copy of another line.
        if self.duplicate(i) {
            return inserted;
        }
        // Two lines claim the same predecessor: the one accepted was forged in between.
        if let Some(lr) = self.rec(l) {
            if lr.prev == r.prev && lr.seq == r.seq && !start {
                return (l, Problem::Inserted { seq: lr.seq });
            }
        }
        // A genuine line whose predecessor is elsewhere in the files: moved.
        let predecessor = self
            .by_hash
            .get(&r.prev)
            .into_iter()
            .flatten()
            .any(|&m| m != l && (start || self.rec(m).is_some_and(|p| p.seq + 1 == r.seq)));
        if predecessor {
            return (i, Problem::Reordered { seq: r.seq });
        }
        // A run begins while the last one was not closed: its tail is gone (or it crashed).
        if start {
            return (l, self.tail(l));
        }
        let last = self.rec(l).map_or(0, |x| x.seq);
        if self.sealed() {
            return if i + 1 == self.e.len() || self.fits(i + 1) {
                inserted
            } else {
                (
                    i,
                    Problem::Deleted {
                        from: 0,
                        to: r.seq.saturating_sub(1),
                    },
                )
            };
        }
        if self.fits(i + 1) {
            return inserted;
        }
        if r.seq == last + 1 {
            // The right place, the wrong `prev`: the line before changed, unless it is a signed
            // checkpoint that verified, or the line after shows this one changed.
            let before_verified = self
                .rec(l)
                .and_then(|x| x.checkpoint.as_ref())
                .is_some_and(|(_, s)| *s == Some(true));
            let this_changed = self
                .rec(i + 1)
                .is_some_and(|n| n.seq == r.seq + 1 && n.prev != self.e[i].hash);
            return if before_verified || this_changed {
                (i, Problem::Edited { seq: r.seq })
            } else {
                (l, Problem::Edited { seq: last })
            };
        }
        let expected_later = self.e[i + 1..]
            .iter()
            .filter_map(|x| x.rec.as_ref())
            .take_while(|x| x.cause() != Some("start"))
            .any(|x| x.seq == last + 1);
        if expected_later {
            return (i, Problem::Reordered { seq: r.seq });
        }
        if r.seq > last + 1 {
            return (
                i,
                Problem::Deleted {
                    from: last + 1,
                    to: r.seq - 1,
                },
            );
        }
        inserted
    }
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
