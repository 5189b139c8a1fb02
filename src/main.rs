//! The `meraki-oauth-proxy` binary: see `cli`.

/// jemalloc with background threads that hand freed pages back to the system: after a flood of
/// connections closes, the proxy's memory comes back (glibc's malloc kept what 2,000 idle
/// connections had used; figures in docs/performance.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (the `background_thread:true` of the crate's feature
/// comes first). `tcache_max:65536`: Pingora takes a 64 KiB buffer for every response body it
/// reads; above jemalloc's default thread-cache limit (32 KiB) each one went through the arena's
/// extent bookkeeping (about 1,300 instructions a request, `bash benches/load.sh callgrind`),
/// cached per thread it costs a few dozen. The environment (`_RJEM_MALLOC_CONF`) still overrides.
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: Option<&'static u8> = Some(&b"tcache_max:65536\0"[0]);

fn main() -> std::process::ExitCode {
    // Fail points act only in builds with the `failpoints` feature (the tests') and only when
    // FAILPOINTS names them.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    meraki_oauth_proxy::cli::main()
}
