//! Runs the Meraki stand-in (OAuth authorization server + Dashboard API) on its own, with demo
//! data, so the proxy can be tried without a Meraki account:
//!
//! ```text
//! cargo run --example meraki_standin -- --listen 127.0.0.1:9400
//! ```
//!
//! It prints the URLs, the demo OAuth client and a refresh token for organization 111111, then
//! serves until Ctrl-C. `--enforce-rate-limit RPS,BURST` enforces Meraki's per-organization
//! limit (e.g. `10,10`); on SIGTERM or Ctrl-C it then prints `rate_limited=N` (the 429s it served)
//! and `rate_allowed=N` before exiting.

#[allow(dead_code)] // the tests use more of the stand-in than this example does
#[path = "../tests/support/standin.rs"]
mod standin;

use std::net::SocketAddr;
use std::process::ExitCode;

use standin::Standin;

const DEFAULT_LISTEN: &str = "127.0.0.1:9400";
const CLIENT_ID: &str = "demo-client";
const CLIENT_SECRET: &str = "demo-secret";
const USAGE: &str = "usage: meraki_standin [--listen ADDR] [--enforce-rate-limit RPS,BURST]   (default ADDR: 127.0.0.1:9400)";

struct Args {
    listen: SocketAddr,
    rate: Option<(f64, f64)>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let Args { listen, rate } = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
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
    if let Some((rps, burst)) = rate {
        standin.enforce_rate_limit(rps, burst);
        println!("rate_limit={rps}/s burst {burst} per organization");
    }

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

    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("meraki_standin: cannot listen for SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => if let Err(e) = r {
            eprintln!("meraki_standin: cannot wait for Ctrl-C: {e}");
        },
        _ = term.recv() => {}
    }
    if rate.is_some() {
        let log = standin.rate_log();
        let limited = log.iter().filter(|d| !d.allowed).count();
        println!("rate_limited={limited}");
        println!("rate_allowed={}", log.len() - limited);
    }
    standin.shutdown();
    ExitCode::SUCCESS
}

/// `Ok(None)` asks for the usage text.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut listen = DEFAULT_LISTEN.to_owned();
    let mut rate = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?,
            "--enforce-rate-limit" => {
                let v = args.next().ok_or("--enforce-rate-limit needs RPS,BURST")?;
                rate = Some(parse_rate(&v)?);
            }
            "-h" | "--help" => return Ok(None),
            other => {
                if let Some(value) = other.strip_prefix("--listen=") {
                    listen = value.to_owned();
                } else if let Some(value) = other.strip_prefix("--enforce-rate-limit=") {
                    rate = Some(parse_rate(value)?);
                } else {
                    return Err(format!("unknown argument {other:?}"));
                }
            }
        }
    }
    let listen = listen
        .parse()
        .map_err(|_| format!("--listen: {listen:?} is not an IP:PORT address"))?;
    Ok(Some(Args { listen, rate }))
}

fn parse_rate(v: &str) -> Result<(f64, f64), String> {
    let bad = || format!("--enforce-rate-limit: expected RPS,BURST such as 10,10, got {v:?}");
    let (rps, burst) = v.split_once(',').ok_or_else(bad)?;
    let rps: f64 = rps.trim().parse().map_err(|_| bad())?;
    let burst: f64 = burst.trim().parse().map_err(|_| bad())?;
    if rps > 0.0 && burst >= 1.0 {
        Ok((rps, burst))
    } else {
        Err(bad())
    }
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
