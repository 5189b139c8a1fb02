//! What durability costs the audit writer: appending chained lines to a file on the disk the
//! bench runs on, with no `fdatasync`, one per line (`fsync = "always"` at its worst: one record
//! per batch), and one per 100-line batch (a busy writer's 20 ms batch, either policy).
//!
//! ```text
//! cargo bench --bench audit_fsync                 # in the package directory (a real disk)
//! AUDIT_BENCH_DIR=/var/log cargo bench --bench audit_fsync
//! cargo bench --bench audit_fsync -- --test       # run each once (CI)
//! ```
//!
//! A tmpfs makes `fdatasync` free: run it where the audit log will live.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meraki_oauth_proxy::audit::chain::{Position, GENESIS};
use meraki_oauth_proxy::audit::sink::FileSink;

/// A request record of typical size (about 600 bytes framed).
const BODY: &str = r#"{"time":"2025-01-01T00:00:00.000Z","kind":"request","request_id":"00abcdef01234567","upstream_request_id":"c0ffee00-1234","client":"netops-script","integration":"netops","organization":"111111","method":"GET","path":"/organizations/111111/networks?perPage=1000","operation":"getOrganizationNetworks","key_expires_at":null,"status":200,"upstream_status":200,"decision":"forwarded","reason":null,"retried_after_401":false,"redirects_followed":0,"token_fingerprint":"1a2b3c4d","duration_ms":41.2,"upstream_duration_ms":39.9,"queue_wait_ms":null,"bytes_in":0,"bytes_out":18234,"source":"10.0.0.7:51234","user_agent":"python-meraki/1.53.0","identity":"key","client_certificate":null}"#;

fn lines(position: &mut Position, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 700);
    for _ in 0..n {
        position.frame(BODY.as_bytes(), &mut out);
    }
    out
}

fn fsync(c: &mut Criterion) {
    let base = std::env::var("AUDIT_BENCH_DIR").unwrap_or_else(|_| ".".into());
    let dir = tempfile::tempdir_in(base).expect("a directory for the bench's audit log");
    let (mut sink, _) = FileSink::open(&dir.path().join("audit.jsonl")).expect("open");
    let mut position = Position::new(GENESIS);
    let mut g = c.benchmark_group("audit_append");
    g.throughput(Throughput::Elements(1));
    g.bench_function("line_no_sync", |b| {
        b.iter(|| sink.write(&lines(&mut position, 1)).expect("write"))
    });
    g.bench_function("line_fdatasync_each", |b| {
        b.iter(|| {
            sink.write(&lines(&mut position, 1)).expect("write");
            sink.sync().expect("fdatasync");
        })
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("batch100_fdatasync_once", |b| {
        b.iter(|| {
            sink.write(&lines(&mut position, 100)).expect("write");
            sink.sync().expect("fdatasync");
        })
    });
    g.finish();
}

criterion_group!(benches, fsync);
criterion_main!(benches);
