//! Property tests of `audit verify`: logs built as the writer builds them, mutated the ways an
//! intruder would, and each mutation expected named at its line.

use super::*;
use crate::audit::chain::{Cause, Position, GENESIS};
use proptest::prelude::*;

const KEY: &str = "proptest-audit-hmac-key-0123456789";

/// One run of the writer: records, checkpoint interval, records after which the file rotates.
type Run = (usize, u64, Vec<usize>);

/// A log as the writer makes it: runs of records with interval checkpoints, rotations that
/// start a new file, each run sealed at shutdown. Lines (without newlines) with their file.
fn build(runs: &[Run]) -> Vec<(usize, String)> {
    let key = Secret::new(KEY);
    let mut lines: Vec<(usize, String)> = Vec::new();
    let mut file = 0;
    let mut n = 0;
    let emit = |buf: &mut Vec<u8>, file: usize, lines: &mut Vec<(usize, String)>| {
        for l in String::from_utf8(std::mem::take(buf)).unwrap().lines() {
            lines.push((file, l.to_owned()));
        }
    };
    for (records, every, rotations) in runs {
        let prev = lines
            .last()
            .map_or(GENESIS, |(_, l)| line_hash(l.as_bytes()));
        let mut p = Position::new(prev);
        let mut buf = Vec::new();
        p.checkpoint(Cause::Start, "t", Some(&key), &mut buf);
        for k in 0..*records {
            n += 1;
            let body = format!(r#"{{"kind":"request","n":{n},"client":"c{k}","status":200}}"#);
            p.frame(body.as_bytes(), &mut buf);
            if p.since_checkpoint >= *every {
                p.checkpoint(Cause::Interval, "t", Some(&key), &mut buf);
            }
            if rotations.contains(&k) {
                p.checkpoint(Cause::Rotation, "t", Some(&key), &mut buf);
                emit(&mut buf, file, &mut lines);
                file += 1;
            }
        }
        p.checkpoint(Cause::Shutdown, "t", Some(&key), &mut buf);
        emit(&mut buf, file, &mut lines);
    }
    lines
}

/// Verifies the lines as files; the finding as (index in `lines`, problem).
fn check(lines: &[(usize, String)]) -> Option<(usize, Problem)> {
    let files = lines.iter().map(|(f, _)| f + 1).max().unwrap_or(0);
    let names: Vec<PathBuf> = (0..files)
        .map(|f| PathBuf::from(format!("audit.{f}")))
        .collect();
    let texts: Vec<Vec<u8>> = (0..files)
        .map(|f| {
            lines
                .iter()
                .filter(|(g, _)| *g == f)
                .flat_map(|(_, l)| format!("{l}\n").into_bytes())
                .collect()
        })
        .collect();
    let named: Vec<(&Path, &[u8])> = names
        .iter()
        .zip(&texts)
        .map(|(n, t)| (n.as_path(), &t[..]))
        .collect();
    let report = verify(&named, Some(&Secret::new(KEY)));
    let f = report.finding?;
    let file: usize = f.file.display().to_string()["audit.".len()..]
        .parse()
        .unwrap();
    let index = lines
        .iter()
        .enumerate()
        .filter(|(_, (g, _))| *g == file)
        .nth(f.line - 1)
        .map(|(i, _)| i)
        .unwrap();
    Some((index, f.problem))
}

fn runs() -> impl Strategy<Value = Vec<Run>> {
    prop::collection::vec(
        (3usize..25, 2u64..8, prop::collection::vec(0usize..25, 0..3)),
        1..3,
    )
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize),
    /// A copy of one line (the second index) put elsewhere.
    InsertCopy(usize, usize),
    /// A forged record with the right `seq` and `prev` for where it goes.
    InsertForged(usize),
    InsertJunk(usize),
    Edit(usize),
    Swap(usize),
    /// Drops lines of the last run's end.
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let i = any::<prop::sample::Index>();
    let at = |i: prop::sample::Index| i.index(1 << 20);
    prop_oneof![
        i.clone().prop_map(move |i| Mutation::Delete(at(i))),
        (i.clone(), i.clone()).prop_map(move |(a, b)| Mutation::InsertCopy(at(a), at(b))),
        i.clone().prop_map(move |i| Mutation::InsertForged(at(i))),
        i.clone().prop_map(move |i| Mutation::InsertJunk(at(i))),
        i.clone().prop_map(move |i| Mutation::Edit(at(i))),
        i.clone().prop_map(move |i| Mutation::Swap(at(i))),
        i.prop_map(move |i| Mutation::Truncate(at(i))),
    ]
}

fn seq_of(line: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(line).unwrap()["seq"]
        .as_u64()
        .unwrap()
}

/// Applies `m`; the indices where the finding may be and the problems that name it.
fn mutate(lines: &mut Vec<(usize, String)>, m: &Mutation) -> (Vec<usize>, &'static [&'static str]) {
    let n = lines.len();
    let file_at = |lines: &[(usize, String)], i: usize| lines.get(i).or(lines.last()).unwrap().0;
    match *m {
        Mutation::Delete(i) => {
            let i = i % n;
            lines.remove(i);
            (
                vec![i.saturating_sub(1), i],
                &["Deleted", "MissingTail", "MissingHead"],
            )
        }
        Mutation::InsertCopy(i, from) => {
            let (i, from) = (i % (n + 1), from % n);
            let line = lines[from].1.clone();
            let f = file_at(lines, i);
            lines.insert(i, (f, line));
            // A copy put just before its original: the original is the line out of place.
            let at = if from == i { vec![i, i + 1] } else { vec![i] };
            (at, &["Inserted"])
        }
        Mutation::InsertForged(i) => {
            let i = 1 + i % n;
            let before = &lines[i - 1].1;
            let line = format!(
                r#"{{"seq":{},"prev":"{}","kind":"request","client":"mallory","status":200}}"#,
                seq_of(before) + 1,
                hex::encode(line_hash(before.as_bytes()))
            );
            let f = file_at(lines, i);
            lines.insert(i, (f, line));
            (vec![i], &["Inserted"])
        }
        Mutation::InsertJunk(i) => {
            let i = i % (n + 1);
            let line = format!(
                r#"{{"seq":999999,"prev":"{}","kind":"request"}}"#,
                "ab".repeat(32)
            );
            let f = file_at(lines, i);
            lines.insert(i, (f, line));
            (vec![i], &["Inserted"])
        }
        Mutation::Edit(i) => {
            let i = i % n;
            let l = &mut lines[i].1;
            *l = if l.contains("\"client\":\"") {
                l.replace("\"client\":\"", "\"client\":\"x")
            } else {
                l.replace("\"time\":\"t\"", "\"time\":\"u\"")
            };
            (vec![i], &["Edited", "BadSignature"])
        }
        Mutation::Swap(i) => {
            let i = i % (n - 1);
            let (a, b) = (lines[i].1.clone(), lines[i + 1].1.clone());
            lines[i].1 = b;
            lines[i + 1].1 = a;
            (vec![i, i + 1], &["Reordered"])
        }
        Mutation::Truncate(k) => {
            // Dropping a whole last run leaves a sealed log: undetectable from the files alone.
            let last_run = lines
                .iter()
                .rposition(|(_, l)| l.contains("\"cause\":\"start\""))
                .unwrap();
            let k = 1 + k % (n - last_run - 1);
            lines.truncate(n - k);
            (vec![n - k - 1], &["MissingTail"])
        }
    }
}

#[test]
fn an_untouched_log_verifies_and_a_wrong_key_does_not() {
    let lines = build(&[(10, 3, vec![4]), (5, 2, vec![])]);
    assert_eq!(check(&lines), None);
    let text: Vec<u8> = lines
        .iter()
        .flat_map(|(_, l)| format!("{l}\n").into_bytes())
        .collect();
    let wrong = Secret::new("not-the-key-0123456789");
    let report = verify(&[(Path::new("a"), &text)], Some(&wrong));
    assert_eq!(
        report.finding.map(|f| (f.line, f.problem)),
        Some((1, Problem::BadSignature { seq: 0 }))
    );
    let unsigned = verify(&[(Path::new("a"), &text)], None);
    assert_eq!(unsigned.finding, None);
    assert!(unsigned
        .to_string()
        .contains("no checkpoint HMAC was checked"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Every mutation is named, at the line it touched (for a deletion: next to it).
    #[test]
    fn every_mutation_is_named(runs in runs(), m in mutation()) {
        let mut lines = build(&runs);
        prop_assert_eq!(check(&lines), None);
        let (expect, allowed) = mutate(&mut lines, &m);
        let found = check(&lines);
        let Some((at, problem)) = found.clone() else {
            return Err(TestCaseError::fail(format!("{m:?}: not detected")));
        };
        let kind = format!("{problem:?}");
        let kind = kind.split([' ', '{']).next().unwrap_or_default();
        prop_assert!(
            expect.contains(&at) && allowed.contains(&kind),
            "{:?}: found {:?}, expected one of {:?} at {:?}", m, found, allowed, expect
        );
    }
}
