//! meraki-oauth-proxy: lets scripts written for static Meraki Dashboard API keys keep working
//! after their organization moves to OAuth 2.0 integrations.
//!
//! A request travels through the modules in this order, and each step of SPEC.md's "What the
//! proxy does with a request" lives in the module named after it:
//!
//! - [`config`]: the TOML file (`config::file`) and the validated configuration the rest of the
//!   program reads (`config::Config`).
//! - [`identity`]: who is calling: the proxy client key, matched by SHA-256 digest.
//! - [`route`]: which organization the request acts on: path normalization, and the cached
//!   lookup of networks and devices.
//! - [`token`]: grants, the OAuth token endpoint, single-flight refresh and the durable store.
//! - [`forward`]: what forwarding does to the wire: `Link` rewriting, following redirects.
//! - [`proxy`]: the Pingora hooks; thin, they call the modules above.
//! - [`audit`] and [`metrics`]: one audit record and the metrics of every request.
//! - [`admin`]: the admin listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`server`]: the one place that turns a configuration into a running Pingora server.
//! - [`cli`]: the command line.
//!
//! Secrets travel as [`secret::Secret`], whose `Debug` and `Display` show a fingerprint only.

pub mod admin;
pub mod admission;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod endpoints;
pub mod forward;
pub mod identity;
pub mod lookup;
pub mod metrics;
pub mod observe;
pub mod proxy;
pub mod refusal;
pub mod route;
pub mod seal;
pub mod secret;
pub mod server;
pub mod token;
pub mod upstream;

#[cfg(test)]
mod testing;

/// The proxy's product token, appended to the client's User-Agent and sent to the AS.
pub const PRODUCT: &str = concat!("meraki-oauth-proxy/", env!("CARGO_PKG_VERSION"));
