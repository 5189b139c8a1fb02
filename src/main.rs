//! The `meraki-oauth-proxy` binary: see `cli`.

/// jemalloc with background threads that hand freed pages back to the system: after a flood of
/// connections closes, the proxy's memory comes back (glibc's malloc kept what 2,000 idle
/// connections had used; figures in docs/performance.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options ([`meraki_oauth_proxy::JEMALLOC_CONF`]), read before `main`; the
/// `background_thread:true` of the crate's feature comes first.
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: Option<&'static u8> = Some(&meraki_oauth_proxy::JEMALLOC_CONF[0]);

fn main() -> std::process::ExitCode {
    // Fail points act only in builds with the `failpoints` feature (the tests') and only when
    // FAILPOINTS names them.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    meraki_oauth_proxy::cli::main()
}
