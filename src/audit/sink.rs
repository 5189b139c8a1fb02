//! Where audit lines go: a file (the default in production) or standard output. A file is only
//! ever left ending with a whole line: a batch is written with one `write_all`, and if that fails
//! part-way (a full disk) the file is cut back to the length it had before the batch, so no
//! fragment can join the next line. A file found ending in a fragment at start (a crash in the
//! middle of a write) is cut back the same way.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// An audit log file opened for appending whole lines.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: File,
    /// The file's length after the last whole line written (or found at open).
    committed: u64,
    /// A cut-back that failed and must succeed before the next write.
    needs_repair: bool,
}

/// What opening a file found at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    /// The SHA-256 of the last whole line, if the file has one.
    pub last_line: Option<[u8; 32]>,
    /// Bytes of a torn last line that were cut off.
    pub cut: u64,
}

impl FileSink {
    /// Opens (creating) `path` for appending, cutting off a torn last line.
    pub fn open(path: &Path) -> io::Result<(FileSink, Tail)> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)?;
        let len = file.metadata()?.len();
        let (end, last_line) = last_whole_line(&mut file, len)?;
        if end < len {
            file.set_len(end)?;
        }
        Ok((
            FileSink {
                path: path.to_path_buf(),
                file,
                committed: end,
                needs_repair: false,
            },
            Tail {
                last_line,
                cut: len - end,
            },
        ))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends whole lines; on failure the file is cut back to where it was.
    pub fn write(&mut self, lines: &[u8]) -> io::Result<()> {
        if self.needs_repair {
            let len = self.file.metadata()?.len();
            self.file.set_len(self.committed.min(len))?;
            self.needs_repair = false;
        }
        // Where this batch starts: appends go to the end, which may have moved if the file was
        // truncated by another program (copytruncate rotation).
        self.committed = self.file.metadata()?.len();
        match self.file.write_all(lines) {
            Ok(()) => {
                self.committed += lines.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Truncating frees space, so it works on a full disk; if it fails anyway, the
                // next write tries again first.
                self.needs_repair = self.file.set_len(self.committed).is_err();
                Err(e)
            }
        }
    }

    /// `fdatasync`: what was written survives a power cut.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Where the last whole line ends (just after its newline) and its hash, read backwards from
/// the end in blocks: a log of any size costs a few reads.
fn last_whole_line(file: &mut File, len: u64) -> io::Result<(u64, Option<[u8; 32]>)> {
    const BLOCK: u64 = 64 * 1024;
    let mut tail: Vec<u8> = Vec::new();
    let mut from = len;
    loop {
        // Newlines in what was read so far (the tail starts at `from`).
        let newlines: Vec<usize> = tail
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .map(|(i, _)| i)
            .collect();
        let enough = match newlines.len() {
            0 => from == 0,
            1 => from == 0,
            _ => true,
        };
        if enough || from == 0 {
            let Some(&last) = newlines.last() else {
                return Ok((0, None));
            };
            let start = newlines.len().checked_sub(2).map_or(0, |i| newlines[i] + 1);
            let hash = super::chain::line_hash(&tail[start..last]);
            return Ok((from + last as u64 + 1, Some(hash)));
        }
        let step = BLOCK.min(from);
        from -= step;
        let mut block = vec![0; step as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut block)?;
        block.extend_from_slice(&tail);
        tail = block;
    }
}

/// Where a writer thread's lines go.
#[derive(Debug)]
pub enum Sink {
    Stdout,
    File(FileSink),
    Syslog(super::syslog::SyslogSink),
}

impl Sink {
    /// Writes whole lines; returns how many bytes of `lines` were delivered (whole lines only:
    /// none for a file, whose failed batch is cut back) and the error that stopped the rest.
    pub fn write(&mut self, lines: &[u8]) -> (usize, io::Result<()>) {
        let all = |r: io::Result<()>| match r {
            Ok(()) => (lines.len(), Ok(())),
            Err(e) => (0, Err(e)),
        };
        match self {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                all(out.write_all(lines).and_then(|()| out.flush()))
            }
            Sink::File(f) => all(f.write(lines)),
            Sink::Syslog(s) => s.write(lines),
        }
    }

    /// Forces what was written to the disk (nothing to do for standard output or syslog).
    pub fn sync(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout | Sink::Syslog(_) => Ok(()),
            Sink::File(f) => f.sync(),
        }
    }

    /// Whether the sink can take records, where that can be told without writing one.
    pub fn probe(&mut self) -> Option<io::Result<()>> {
        match self {
            Sink::Syslog(s) => s.probe(),
            _ => None,
        }
    }

    /// Records skipped as too long for the sink since the last call (counted lost).
    pub fn take_skipped(&mut self) -> u64 {
        match self {
            Sink::Syslog(s) => s.take_oversized(),
            _ => 0,
        }
    }

    /// How the sink is named in readiness and logs.
    pub fn describe(&self) -> String {
        match self {
            Sink::Stdout => "stdout".into(),
            Sink::File(f) => f.path.display().to_string(),
            Sink::Syslog(s) => s.describe(),
        }
    }

    /// The `sink` label of its metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Sink::Stdout => "stdout",
            Sink::File(_) => "file",
            Sink::Syslog(_) => "syslog",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::line_hash;

    #[test]
    fn a_torn_last_line_is_cut_off_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        // Lines longer than a read block, so the backwards reader crosses blocks.
        let long = "x".repeat(100_000);
        let text = format!("{{\"a\":1}}\n{{\"b\":\"{long}\"}}\n{{\"c\":");
        std::fs::write(&path, &text).unwrap();
        let (_, tail) = FileSink::open(&path).unwrap();
        let kept = std::fs::read_to_string(&path).unwrap();
        assert_eq!(kept, text[..text.len() - 5]);
        assert_eq!(tail.cut, 5);
        let last = format!("{{\"b\":\"{long}\"}}");
        assert_eq!(tail.last_line, Some(line_hash(last.as_bytes())));
    }

    #[test]
    fn files_without_a_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        for (text, hash) in [
            ("", None),
            ("{\"torn\"", None),
            ("{}\n", Some(line_hash(b"{}"))),
        ] {
            let path = dir.path().join("b.jsonl");
            std::fs::write(&path, text).unwrap();
            let (mut sink, tail) = FileSink::open(&path).unwrap();
            assert_eq!(tail.last_line, hash, "{text:?}");
            sink.write(b"{\"n\":1}\n").unwrap();
            let now = std::fs::read_to_string(&path).unwrap();
            assert!(
                now.ends_with("{\"n\":1}\n") && !now.contains("torn"),
                "{now:?}"
            );
        }
    }
}
