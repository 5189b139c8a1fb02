//! The `meraki-oauth-proxy` binary: see `cli`.

fn main() -> std::process::ExitCode {
    // Fail points act only in builds with the `failpoints` feature (the tests') and only when
    // FAILPOINTS names them.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    meraki_oauth_proxy::cli::main()
}
