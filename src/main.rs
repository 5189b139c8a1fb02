//! The `meraki-oauth-proxy` binary: see `cli`.

/// jemalloc with background threads that hand freed pages back to the system: after a flood of
/// connections closes, the proxy's memory comes back (glibc's malloc kept what 2,000 idle
/// connections had used; figures in docs/performance.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    // Fail points act only in builds with the `failpoints` feature (the tests') and only when
    // FAILPOINTS names them.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    meraki_oauth_proxy::cli::main()
}
