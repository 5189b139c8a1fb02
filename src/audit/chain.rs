//! Tamper evidence: every line carries `seq` and `prev` (the SHA-256 of the line before it), and
//! checkpoint records carry an HMAC-SHA256 over their own line, whose `prev` pins everything
//! written before. Editing, deleting, inserting or reordering a line breaks the chain at that
//! line; rewriting the chain from there on breaks the next checkpoint's HMAC, which needs the key.

use crate::secret::Secret;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::io::Write;

/// The `prev` of the first line of a file with nothing before it.
pub const GENESIS: [u8; 32] = [0; 32];

/// What a checkpoint line ends with before its HMAC: the HMAC covers every byte before it.
pub const HMAC_MARK: &[u8] = b",\"hmac\":";

/// Why a checkpoint was written (its `cause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The first line of a run of the writer (`seq` 0): `prev` links to the file's last line.
    Start,
    /// Every `checkpoint_every` records.
    Interval,
    /// Before the file is closed for log rotation (SIGHUP): the file's last line.
    Rotation,
    /// At shutdown: the run's last line.
    Shutdown,
}

impl Cause {
    /// The `cause` field's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Start => "start",
            Cause::Interval => "interval",
            Cause::Rotation => "rotation",
            Cause::Shutdown => "shutdown",
        }
    }
}

/// The chain's position: the next line's `seq` and `prev`. Cheap to copy, so a batch is framed
/// on a copy that is kept only once the batch is in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub next_seq: u64,
    pub prev: [u8; 32],
    /// Records since the last checkpoint.
    pub since_checkpoint: u64,
}

impl Position {
    /// A position before any line, `prev` the hash of what precedes (or [`GENESIS`]).
    pub fn new(prev: [u8; 32]) -> Self {
        Position {
            next_seq: 0,
            prev,
            since_checkpoint: 0,
        }
    }

    /// Appends `body` (one JSON object, `{...}`) to `out` as a chained line with its newline.
    pub fn frame(&mut self, body: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        self.head(out);
        match body.strip_prefix(b"{") {
            Some(rest) if rest != b"}" => {
                out.push(b',');
                out.extend_from_slice(rest);
            }
            _ => out.push(b'}'),
        }
        self.advance(start, out);
        self.since_checkpoint += 1;
    }

    /// Appends a checkpoint line, signed when a key is given.
    pub fn checkpoint(
        &mut self,
        cause: Cause,
        time: &str,
        key: Option<&Secret>,
        out: &mut Vec<u8>,
    ) {
        if cause == Cause::Start {
            self.next_seq = 0;
        }
        let start = out.len();
        self.head(out);
        let _ = write!(
            out,
            ",\"time\":\"{time}\",\"kind\":\"audit\",\"event\":\"checkpoint\",\"cause\":\"{}\",\"records_since_checkpoint\":{}",
            cause.as_str(),
            self.since_checkpoint
        );
        match key {
            Some(k) => {
                let _ = write!(out, ",\"key_id\":\"{}\"", k.fingerprint());
                let tag = sign(k, &out[start..]);
                out.extend_from_slice(HMAC_MARK);
                let _ = write!(out, "\"{}\"}}", hex::encode(tag));
            }
            None => out.extend_from_slice(b",\"key_id\":null,\"hmac\":null}"),
        }
        self.advance(start, out);
        self.since_checkpoint = 0;
    }

    fn head(&self, out: &mut Vec<u8>) {
        let mut prev = [0u8; 64];
        // 32 bytes always fit 64 digits.
        let _ = hex::encode_to_slice(self.prev, &mut prev);
        let _ = write!(out, "{{\"seq\":{},\"prev\":\"", self.next_seq);
        out.extend_from_slice(&prev);
        out.push(b'"');
    }

    /// Hashes the line just written (without its newline), then ends it.
    fn advance(&mut self, start: usize, out: &mut Vec<u8>) {
        self.prev = line_hash(&out[start..]);
        self.next_seq += 1;
        out.push(b'\n');
    }
}

/// The SHA-256 of a line without its newline.
pub fn line_hash(line: &[u8]) -> [u8; 32] {
    Sha256::digest(line).into()
}

/// HMAC-SHA256 of `data` under `key`.
pub fn sign(key: &Secret, data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Whether `tag` (hex) is the HMAC of `data`, compared in constant time.
pub fn verify_tag(key: &Secret, data: &[u8], tag_hex: &str) -> bool {
    let Ok(tag) = hex::decode(tag_hex) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key.expose().as_bytes()) else {
        return false;
    };
    mac.update(data);
    mac.verify_slice(&tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_chain_and_checkpoints_sign() {
        let key = Secret::new("0123456789abcdef0123");
        let mut p = Position::new(GENESIS);
        let mut out = Vec::new();
        p.checkpoint(Cause::Start, "t0", Some(&key), &mut out);
        p.frame(br#"{"kind":"request","status":200}"#, &mut out);
        p.frame(b"{}", &mut out);
        let text = String::from_utf8(out.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let v: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(v[0]["seq"], 0);
        assert_eq!(v[0]["prev"], hex::encode(GENESIS));
        assert_eq!(v[1]["seq"], 1);
        assert_eq!(v[1]["prev"], hex::encode(line_hash(lines[0].as_bytes())));
        assert_eq!(v[1]["status"], 200);
        assert_eq!(v[2]["prev"], hex::encode(line_hash(lines[1].as_bytes())));
        let (signed, _) = lines[0].split_at(lines[0].rfind(",\"hmac\":").unwrap());
        assert!(verify_tag(
            &key,
            signed.as_bytes(),
            v[0]["hmac"].as_str().unwrap()
        ));
        assert!(!verify_tag(
            &Secret::new("another-key-0123456"),
            signed.as_bytes(),
            v[0]["hmac"].as_str().unwrap()
        ));
        assert!(!text.contains(key.expose()));
        assert_eq!(p.next_seq, 3);
    }
}
