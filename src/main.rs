//! The `meraki-oauth-proxy` binary: all logic lives in the library.

fn main() -> std::process::ExitCode {
    meraki_oauth_proxy::cli::main()
}
