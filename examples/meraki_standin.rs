//! Runs the Meraki stand-in (OAuth authorization server + Dashboard API) on its own, with demo
//! data, so the proxy can be tried without a Meraki account:
//!
//! ```text
//! cargo run --example meraki_standin -- --listen 127.0.0.1:9400
//! ```
//!
//! It prints the URLs, the demo OAuth client and a refresh token for organization 111111, then
//! serves until Ctrl-C.

#[allow(dead_code)] // the tests use more of the stand-in than this example does
#[path = "../tests/support/standin.rs"]
mod standin;

use std::net::SocketAddr;
use std::process::ExitCode;

use standin::Standin;

const DEFAULT_LISTEN: &str = "127.0.0.1:9400";
const CLIENT_ID: &str = "demo-client";
const CLIENT_SECRET: &str = "demo-secret";
const USAGE: &str = "usage: meraki_standin [--listen ADDR]   (default ADDR: 127.0.0.1:9400)";

#[tokio::main]
async fn main() -> ExitCode {
    let listen = match parse_args(std::env::args().skip(1)) {
        Ok(Some(listen)) => listen,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("meraki_standin: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };

    let standin = match Standin::try_start_on(listen).await {
        Ok(standin) => standin,
        Err(e) => {
            eprintln!("meraki_standin: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let refresh_token = seed(&standin);

    let token_url = standin.token_url();
    println!("Meraki stand-in running (Ctrl-C to stop). Demo org 111111 \"Demo Org\", second org 222222.");
    println!("api_base={}", standin.api_base());
    println!("shard_api_base={}", standin.shard_api_base());
    println!("token_url={token_url}");
    println!("authorize_url={}", standin.authorize_url());
    println!("revoke_url={}", standin.revoke_url());
    println!("client_id={CLIENT_ID}");
    println!("client_secret={CLIENT_SECRET}");
    println!("refresh_token={refresh_token}");
    println!("# Get an access token (this rotates the refresh token: use the new one next time):");
    println!(
        "#   curl -s -u {CLIENT_ID}:{CLIENT_SECRET} -d grant_type=refresh_token \
         -d refresh_token={refresh_token} {token_url}"
    );
    println!(
        "#   curl -s -H 'Authorization: Bearer ACCESS_TOKEN' {}/organizations",
        standin.api_base()
    );

    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("meraki_standin: cannot wait for Ctrl-C: {e}");
    }
    standin.shutdown();
    ExitCode::SUCCESS
}

/// `Ok(None)` asks for the usage text.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<SocketAddr>, String> {
    let mut listen = DEFAULT_LISTEN.to_owned();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?,
            "-h" | "--help" => return Ok(None),
            other => match other.strip_prefix("--listen=") {
                Some(value) => listen = value.to_owned(),
                None => return Err(format!("unknown argument {other:?}")),
            },
        }
    }
    listen
        .parse()
        .map(Some)
        .map_err(|_| format!("--listen: {listen:?} is not an IP:PORT address"))
}

/// Demo data; returns the refresh token of a grant for org 111111.
fn seed(standin: &Standin) -> String {
    standin.add_client(CLIENT_ID, CLIENT_SECRET);

    standin.add_org("111111", "Demo Org");
    for i in 0..12 {
        standin.add_network(
            "111111",
            &format!("L_111111_{i:02}"),
            &format!("Demo Network {i:02}"),
        );
    }
    standin.add_device("L_111111_00", "Q2XX-DEMO-0001", "Lobby AP");
    standin.add_device("L_111111_00", "Q2XX-DEMO-0002", "Office AP");
    standin.add_device("L_111111_01", "Q2XX-DEMO-0003", "Warehouse AP");
    standin.add_device("L_111111_05", "Q2XX-DEMO-0004", "Lab AP");

    standin.add_org("222222", "Second Org");
    standin.add_network("222222", "L_222222_00", "Second Org Network");
    standin.add_device("L_222222_00", "Q2XX-OTHR-0001", "Other AP");

    standin.issue_grant(
        CLIENT_ID,
        &["111111"],
        &[
            "dashboard:general:config:read",
            "dashboard:general:config:write",
            "wireless:config:read",
        ],
    )
}
