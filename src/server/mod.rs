//! The one place that turns a [`Config`] into a running Pingora server.
//!
//! [`run`] takes listeners that are already bound, so a test binds `127.0.0.1:0`, reads the
//! port and runs the real server in-process with no race for the port (mini-redis style); the
//! binary binds the configured addresses with [`Listeners::bind`] and runs the same function.
//!
//! Shutdown (SIGTERM or SIGINT, [`Signals`]): Pingora closes the listeners and idle
//! connections, [`Drain`] waits for in-flight requests (at most `shutdown_grace_secs`),
//! records the last use of grants, flushes the audit log and ends the process. SIGHUP reopens
//! the audit log and reloads the configuration ([`crate::reload`]).
//!
//! A file per job:
//! - `wiring`: [`parts`] (the shared state), [`Listeners`], [`Launch`], [`build`] and [`run`]:
//!   configuration in, services out, the listener's TLS, the refusal to proxy to itself.
//! - `prebound`: the adapter that hands already-bound sockets to Pingora (`Prebound`).
//! - `tasks`: the background services: upstream DNS, grant keep-alive, store sync, SIGHUP, and
//!   what a reload reports to the audit log and metrics.
//! - `drain`: shutdown: the binary's [`Signals`] and the drain of in-flight requests.
//! - `fleet`: the `fleet-shares` service: the demand exchange through the store every 250 ms
//!   and this instance's part of Meraki's budgets (`crate::shaping::fleet`).

mod drain;
mod fleet;
mod prebound;
mod tasks;
mod wiring;

pub use drain::Signals;
pub use wiring::{build, parts, run, Launch, Listeners, Parts};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("audit log")]
    Audit(#[source] std::io::Error),
    #[error("metrics")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Store(#[from] crate::token::StoreError),
    #[error("upstream")]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("authorization server client")]
    OAuth(#[source] crate::token::OAuthError),
    #[error("API client")]
    Http(#[source] reqwest::Error),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("start-up runtime")]
    Runtime(#[source] std::io::Error),
    #[error("outbound TLS")]
    Tls(#[source] crate::tls::TlsError),
    #[error("the upstream {upstream} is this proxy's own listener {listen}: requests would loop (in split-horizon DNS, the proxy host must resolve Meraki's names to Meraki: see [upstream] resolve or egress_proxy)")]
    Loop { upstream: String, listen: String },
    #[error("inbound TLS")]
    InboundTls(#[source] pingora::BError),
}
