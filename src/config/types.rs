//! The validated configuration and its parts: what the rest of the program reads.

use crate::secret::Secret;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// Meraki's API domains: the default allow-list for upstream redirects.
pub const MERAKI_API_DOMAINS: &[&str] = &[
    "meraki.com",
    "meraki.ca",
    "meraki.cn",
    "meraki.in",
    "gov-meraki.com",
];

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: PathBuf,
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub threads: usize,
    pub upstream_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    /// On SIGTERM/SIGINT: how long in-flight requests may take to finish.
    pub shutdown_grace: Duration,
    pub upstream: UpstreamConfig,
    pub store_path: PathBuf,
    /// PostgreSQL instead of the embedded store (the URL holds a password: a [`Secret`]).
    pub store_url: Option<Secret>,
    pub store_pool_size: usize,
    /// How often an instance re-reads the grants and records its heartbeat.
    pub store_sync: Duration,
    pub store_key: crate::seal::StoreKey,
    pub audit_path: Option<PathBuf>,
    /// `[audit]`: failure policy, durability, checkpoint signing.
    pub audit: crate::config::AuditConfig,
    pub refresh_ahead: Duration,
    /// How long "Meraki refuses this grant's tokens at this operation" is remembered.
    pub refused_operation_memory: Duration,
    /// The longest backoff between failed token calls.
    pub refresh_backoff_max: Duration,
    pub token_timeout: Duration,
    pub keepalive_idle: Duration,
    pub keepalive_check: Duration,
    /// Protects the admin listener (all but `/healthz`, `/readyz` and the OAuth callback).
    pub admin_token: Option<Secret>,
    pub reauth_fails_readiness: bool,
    /// Requests matching no operation of Meraki's API table: refused or forwarded.
    pub unknown_endpoints: UnknownEndpoints,
    /// The proxy listener's TLS (`[server] tls_*`); `None`: plain HTTP.
    pub tls: Option<InboundTls>,
    /// The origins clients know the proxy by (`[server] public_base_url`), the first the
    /// default; empty: `Link` targets stay path-absolute.
    pub public_origins: Vec<PublicOrigin>,
    /// `[rate_limits]`: the share of Meraki's rate limits requests wait for.
    pub rate_limits: RateLimits,
    /// `[server]`'s timeouts and connection limits for what clients control.
    pub client_limits: ClientLimits,
    /// `[server] trusted_proxies`: the peers whose `X-Forwarded-For` and PROXY protocol
    /// headers are believed (`crate::source`).
    pub trusted_proxies: crate::source::Cidrs,
    /// `[server] proxy_protocol`: connections start with a PROXY protocol header.
    pub proxy_protocol: bool,
    /// `[metrics]`: per-client and per-organization detail of `/metrics`.
    pub metrics: MetricsConfig,
    pub integrations: Vec<Arc<Integration>>,
    pub clients: Vec<Arc<Client>>,
}

/// `[rate_limits]`: Meraki's published limits, which the proxy shapes its upstream traffic to
/// (see [`crate::shaping`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    pub enabled: bool,
    /// Requests per second per organization.
    pub organization_rps: f64,
    /// Requests an organization may burst beyond its rate (the bucket's depth).
    pub organization_burst: f64,
    /// Requests per second from the proxy's source IP, all organizations together.
    pub source_rps: f64,
    /// A request whose expected wait is longer is answered 429 at once.
    pub max_wait: Duration,
    /// Requests one client may have waiting for one organization.
    pub queue_per_client: usize,
    /// Whether a fleet's instances share one source address, hence one source budget
    /// (divided by demand like an organization's), or each has its own.
    pub source_shared: bool,
}

impl Default for RateLimits {
    /// Meraki's published figures: 10 requests/s per organization with about 10 extra in the
    /// first second, 100 requests/s per source IP.
    fn default() -> Self {
        RateLimits {
            enabled: true,
            organization_rps: 10.0,
            organization_burst: 10.0,
            source_rps: 100.0,
            max_wait: Duration::from_millis(2000),
            queue_per_client: 64,
            source_shared: true,
        }
    }
}

/// How much detail one label of `/metrics` carries (`[metrics] per_client`, `per_organization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// The busiest by traffic keep their name; the others count as `"other"` (the default).
    Top,
    /// Every one by name (series grow with the configuration).
    On,
    /// None by name: every one counts as `"other"`.
    Off,
}

impl Detail {
    /// The configuration's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Detail::Top => "top",
            Detail::On => "on",
            Detail::Off => "off",
        }
    }
}

/// `[metrics]`: bounded cardinality for proxies with thousands of clients and organizations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    pub per_client: Detail,
    pub per_organization: Detail,
    /// With [`Detail::Top`]: how many clients keep their name.
    pub top_clients: usize,
    /// With [`Detail::Top`]: how many organizations keep their id.
    pub top_organizations: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            per_client: Detail::Top,
            per_organization: Detail::Top,
            top_clients: 10,
            top_organizations: 25,
        }
    }
}

/// `[server]`'s bounds on what a client controls: how long each phase of a request may take
/// and how many connections may be open. All are read per connection or per request, so a
/// reload changes them for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// The whole request header, from accept (or the end of the previous response plus
    /// `idle_timeout` on a kept-alive connection) to its last byte.
    pub header_timeout: Duration,
    /// The longest a request body, or a response being written, may go without progress.
    pub body_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// One request, from its header to the end of its response.
    pub request_timeout: Duration,
    /// Connections the proxy listener holds open at most; beyond, new ones get a 503.
    pub max_connections: usize,
    /// Connections one peer address may hold open; its requests beyond get a 429.
    pub max_connections_per_peer: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            header_timeout: Duration::from_secs(20),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(300),
            max_connections: 4096,
            max_connections_per_peer: 256,
        }
    }
}

/// Where Meraki is.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub api_base: Url,
    pub token_url: Url,
    pub authorize_url: Option<Url>,
    pub revoke_url: Option<Url>,
    pub redirect_hosts: Vec<String>,
    pub lookup_cache_ttl: Duration,
    pub lookup_cache_capacity: u64,
    /// Roots trusted for outbound TLS besides the platform store (`ca_file`).
    pub ca: Option<crate::tls::CaBundle>,
    /// The egress HTTP proxy for outbound HTTPS, if any.
    pub egress: Option<crate::egress::Egress>,
    /// Host names pinned to addresses instead of DNS (lowercase).
    pub resolve: std::collections::BTreeMap<String, std::net::IpAddr>,
}

impl crate::tls::Outbound {
    /// The policy of a configuration's `[upstream]` section. It lives with the section, not in
    /// `tls/outbound.rs`, so that TLS takes plain values ([`crate::tls::Outbound::new`]) and
    /// never reads the configuration.
    pub fn from_config(
        upstream: &UpstreamConfig,
    ) -> Result<crate::tls::Outbound, crate::tls::TlsError> {
        crate::tls::Outbound::new(
            upstream.ca.as_ref(),
            upstream.egress.clone().map(Arc::new),
            upstream.resolve.clone(),
        )
    }
}

/// The proxy listener's TLS: its certificate, and mutual TLS when a client CA is set. The
/// certificate files are read with the rest of the configuration, so a reload re-reads them.
#[derive(Debug, Clone)]
pub struct InboundTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub cert: Arc<crate::tls::ServerCert>,
    /// Mutual TLS: the CAs client certificates must chain to.
    pub client_ca: Option<Arc<crate::tls::ClientCa>>,
    /// Whether every request needs a client certificate (`tls_client_auth = "required"`).
    pub client_cert_required: bool,
}

/// An origin the proxy answers as (split-horizon), e.g. `https://api.meraki.com`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicOrigin {
    /// `scheme://host[:port]`, as absolute `Link` targets start.
    pub origin: String,
    /// `host[:port]` as a `Host` header names it (lowercase; the scheme's default port omitted).
    pub authority: String,
}

/// An OAuth integration registered in the Meraki Dashboard.
#[derive(Debug, Clone)]
pub struct Integration {
    pub name: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub redirect_uri: Option<Url>,
    pub scopes: Vec<String>,
    /// `scopes` as a set: what a grant holds when Meraki's token response names none.
    pub scope_set: crate::scope::ScopeSet,
}

/// A proxy client: who may call, with which key, on which organizations.
#[derive(Debug)]
pub struct Client {
    pub name: String,
    /// The SHA-256 digests of the client's keys (several while a key is rotated).
    pub keys: Vec<ClientKey>,
    /// The client's TLS certificate, by subject or DNS name (mutual TLS).
    pub cert: Option<CertBinding>,
    pub integration: String,
    pub organizations: Vec<String>,
    /// `None`: every method.
    pub methods: Option<Vec<http::Method>>,
    /// `None`: every operation.
    pub operations: Option<Operations>,
    /// The client's share of a contended organization budget, relative to the others'.
    pub weight: u32,
    /// The addresses the client may call from (`source_addresses`); `None`: anywhere.
    pub source_addresses: Option<crate::source::Cidrs>,
}

/// How a client's certificate is recognized: its subject, or one of its DNS names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertBinding {
    pub subject: Option<crate::tls::Subject>,
    /// Lowercase.
    pub san: Option<String>,
}

impl CertBinding {
    /// Whether `cert` is this client's.
    pub fn matches(&self, cert: &crate::tls::PeerCert) -> bool {
        self.subject
            .as_ref()
            .is_some_and(|s| s.key == cert.subject_key)
            || self
                .san
                .as_ref()
                .is_some_and(|n| cert.dns_names.iter().any(|d| d == n))
    }
}

/// One of a client's keys, by digest, with the time after which it is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKey {
    pub digest: [u8; 32],
    /// Unix seconds; `None`: no expiry.
    pub expires_at: Option<i64>,
}

/// A client's allowed operations (`[[clients]] operations`), finer than Meraki's scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operations {
    pub(in crate::config) rules: Vec<OperationRule>,
}

/// One entry of `operations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperationRule {
    /// An operationId, e.g. `getOrganizationNetworks`.
    Id(String),
    /// `family:access`: a product family (the operation's first tag, `*` for any) and
    /// `read` (GET, HEAD), `write` (the others) or `*`.
    Family {
        family: Option<String>,
        read: bool,
        write: bool,
    },
}

impl Operations {
    /// Whether `op` is allowed.
    pub fn allows(&self, op: &crate::endpoints::Operation) -> bool {
        self.rules.iter().any(|r| match r {
            OperationRule::Id(id) => *id == op.operation_id,
            OperationRule::Family {
                family,
                read,
                write,
            } => {
                family.as_deref().is_none_or(|f| f == op.family())
                    && if op.is_read() { *read } else { *write }
            }
        })
    }

    /// The entries as configured.
    pub fn rules(&self) -> &[OperationRule] {
        &self.rules
    }
}

impl fmt::Display for OperationRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OperationRule::Id(id) => f.write_str(id),
            OperationRule::Family {
                family,
                read,
                write,
            } => write!(
                f,
                "{}:{}",
                family.as_deref().unwrap_or("*"),
                match (read, write) {
                    (true, true) => "*",
                    (true, false) => "read",
                    _ => "write",
                }
            ),
        }
    }
}

/// What happens to requests that match no operation of Meraki's API table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownEndpoints {
    /// Refused with 404 (the default): the proxy forwards only Meraki's operations.
    Deny,
    /// Forwarded (still confined to the client's organizations).
    Allow,
}

impl Client {
    /// Whether the client may act on this organization.
    pub fn may_access(&self, org: &str) -> bool {
        self.organizations.iter().any(|o| o == org)
    }

    /// Whether the client may use this method.
    pub fn may_use(&self, method: &http::Method) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method))
    }

    /// Whether the client may call from `ip` (its address as `crate::source` decides it).
    #[inline]
    pub fn may_call_from(&self, ip: std::net::IpAddr) -> bool {
        self.source_addresses
            .as_ref()
            .is_none_or(|c| c.contains(ip))
    }

    /// Whether the client may run this operation.
    pub fn may_run(&self, op: &crate::endpoints::Operation) -> bool {
        self.operations.as_ref().is_none_or(|o| o.allows(op))
    }
}

impl Config {
    /// The integration with this name.
    pub fn integration(&self, name: &str) -> Option<&Arc<Integration>> {
        self.integrations.iter().find(|i| i.name == name)
    }
}
