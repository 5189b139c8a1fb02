//! meraki-oauth-proxy: lets scripts written for static Meraki Dashboard API keys keep working
//! after their organization moves to OAuth 2.0 integrations.
//!
//! A request travels through the modules in this order, and each step of SPEC.md's "What the
//! proxy does with a request" lives in the module named after it:
//!
//! - [`config`]: the TOML file (`config::file`) and the validated configuration the rest of the
//!   program reads (`config::Config`), with one validator per section (`config/validate/`) and
//!   the summary `check` prints; [`reload`] holds the live one and swaps in a new one on SIGHUP
//!   or `POST /admin/reload`.
//! - [`identity`]: who is calling: the proxy client key, matched by SHA-256 digest.
//! - [`source`]: where the client calls from: the connection's peer, or `X-Forwarded-For`
//!   behind `[server] trusted_proxies` (PROXY protocol headers: `proxy/proxy_protocol.rs`),
//!   checked against `[[clients]] source_addresses`.
//! - [`route`]: which organization the request acts on: path normalization (`route/path.rs`,
//!   pure and fuzzed), and the cached lookup of networks and devices (`route/resolver.rs`, made
//!   through [`lookup`], the proxy's own API client).
//! - [`admission`]: identify → route → authorize → token, as one plain function (`admit`) that
//!   answers `Admitted` or a refusal; testable without a socket. Authorizing includes the
//!   client's source addresses (`check_source`) and the OAuth scope the operation needs
//!   (`check_scope`, with Meraki's scopes as bits: [`scope`]).
//! - [`orglist`]: `GET /organizations`, answered from one cached listing per grant, filtered
//!   to the client's organizations and paginated like Meraki's.
//! - [`token`]: grants and their tokens, split by job: the grant (its single-flight lock and what
//!   Meraki's answers taught about it), the grant map, the refresh engine (single flight,
//!   refresh points, the 401 rule decided by evidence, backoff, commit before use), the
//!   lifecycle (add, import, revoke, keep-alive), the store behind a trait, the authorization
//!   server and the token probe behind traits, events.
//! - [`shaping`]: Meraki's rate limits: a token bucket per organization and for the source IP,
//!   fair queueing of a contended organization's budget among clients by weight, local 429s
//!   with an honest `Retry-After`, slowing down on Meraki's own 429s (a file each for the
//!   bucket, the fair queue, the waiter and the snapshots the status page reads).
//! - [`forward`]: what forwarding does to the wire: the request Meraki gets, the response the
//!   client gets (hop-by-hop headers, `Link` rewriting), the redirect decision.
//! - [`refusal`]: the one trait every refusal-producing error implements, and Meraki-style
//!   error bodies.
//! - [`proxy`]: the Pingora hooks; glue of a few lines each over the modules above.
//! - [`audit`] and [`metrics`]: one audit record and the metrics of every request;
//!   [`observe`] turns the token module's events into both. The audit log is hash-chained with
//!   signed checkpoints (`audit::chain`), written whole-line (`audit::sink`) by a thread that
//!   never blocks a request (`audit::writer`), and checked by `audit verify` (`audit::verify`).
//! - [`admin`]: the admin listener: health (`/healthz`, `/readyz`), consent (grant onboarding),
//!   the status page, and the routing between them and `/metrics`.
//! - [`server`]: the one place that turns a configuration into a running Pingora server;
//!   `server::run` takes already-bound listeners and a shutdown signal. Its files: the wiring,
//!   the pre-bound listener adapter, the background tasks, and the drain on shutdown.
//! - [`cli`]: the command line.
//! - [`endpoints`]: Meraki's API operations (method, path template, operationId, tags),
//!   generated from the official SDK by `scripts/gen-endpoint-table.py`, with the OAuth scope
//!   each needs joined from Meraki's API index (`data/meraki-api-oauth-scopes.tsv`).
//! - [`tls`]: TLS both ways, a file per job: PEM reading (size-capped), one trust policy for
//!   every outbound connection (and every HTTP client of the proxy's own), the classification of
//!   handshake failures, the listener's certificate (reloadable) and mutual TLS. It reads no
//!   configuration: [`config`] depends on it, never the reverse;
//!   [`egress`]: outbound HTTPS through an HTTP `CONNECT` proxy.
//! - [`clock`], [`report`], [`seal`], [`secret`], [`upstream`]: time and its formatting, error
//!   chains for logs, sealing tokens at rest, secrets that never print, the upstream peer.
//!
//! Nothing below [`proxy`] imports [`audit`] or [`metrics`]; the import graph between files
//! (`crate::` and `super::` paths) has no cycle.
//!
//! Secrets travel as [`secret::Secret`], whose `Debug` and `Display` show a fingerprint only.

pub mod admin;
pub mod admission;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod egress;
pub mod endpoints;
pub mod forward;
pub mod identity;
pub mod lookup;
pub mod metrics;
pub mod observe;
pub mod orglist;
pub mod proxy;
pub mod refusal;
pub mod reload;
pub mod report;
pub mod route;
pub mod scope;
pub mod seal;
pub mod secret;
pub mod server;
pub mod shaping;
pub mod source;
pub mod tls;
pub mod token;
pub mod upstream;

#[cfg(test)]
mod testing;

/// jemalloc's options for the binary (`src/main.rs`), NUL-terminated as jemalloc reads them.
/// `tcache_max:65536`: Pingora takes a 64 KiB buffer for every response body it reads; above
/// jemalloc's default thread-cache limit (32 KiB) each one went through the arena's extent
/// bookkeeping (about 1,300 instructions a request, `bash benches/load.sh callgrind`); cached per
/// thread it costs a few dozen. The environment (`_RJEM_MALLOC_CONF`) still overrides.
/// A hash map for lookups on the request path (identities by key digest, the shaper's lanes and
/// organizations, the metrics' folded names): foldhash, seeded per process, instead of SipHash. Keys are digests or names
/// from the configuration, not chosen by clients.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub const JEMALLOC_CONF: &[u8] = b"tcache_max:65536\0";

/// The proxy's product token, appended to the client's User-Agent and sent to the AS.
pub const PRODUCT: &str = concat!("meraki-oauth-proxy/", env!("CARGO_PKG_VERSION"));
