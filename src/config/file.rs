//! The serde-facing shape of `proxy.toml`. Nothing here is validated beyond types; see
//! [`super::Config`] for the checked configuration the program uses.

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub server: Server,
    pub upstream: Upstream,
    #[serde(default)]
    pub store: Store,
    #[serde(default)]
    pub audit: Audit,
    #[serde(default)]
    pub tokens: Tokens,
    #[serde(default)]
    pub rate_limits: RateLimits,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default)]
    pub integrations: Vec<Integration>,
    #[serde(default)]
    pub clients: Vec<Client>,
}

/// `[server]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub listen: String,
    pub admin_listen: Option<String>,
    pub threads: Option<usize>,
    /// Hard cap on one upstream exchange, seconds.
    pub upstream_timeout_secs: Option<u64>,
    /// How long connecting to the upstream may take, seconds.
    pub upstream_connect_timeout_secs: Option<u64>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish, seconds.
    pub shutdown_grace_secs: Option<u64>,
    /// How long a whole request header may take to arrive, seconds.
    pub header_timeout_secs: Option<u64>,
    /// The longest a request body (or the response being written) may make no progress, seconds.
    pub body_timeout_secs: Option<u64>,
    /// How long a kept-alive connection may wait for its next request, seconds.
    pub idle_timeout_secs: Option<u64>,
    /// How long one request may take, from its header to the end of its response, seconds.
    pub request_timeout_secs: Option<u64>,
    /// Connections the proxy listener holds open at most.
    pub max_connections: Option<usize>,
    /// Connections one peer address may hold open at once.
    pub max_connections_per_peer: Option<usize>,
    /// Environment variable holding a token that protects the admin listener.
    pub admin_token_env: Option<String>,
    /// Whether `/readyz` fails while a grant needs re-authorization (default true).
    pub reauth_fails_readiness: Option<bool>,
    /// `"deny"` (default) or `"allow"`: requests matching no operation of Meraki's API table.
    pub unknown_endpoints: Option<String>,
    /// PEM certificate chain of the proxy listener (TLS when set, with `tls_key_file`).
    pub tls_cert_file: Option<String>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<String>,
    /// PEM CAs that client certificates must chain to (mutual TLS).
    pub tls_client_ca_file: Option<String>,
    /// `"required"` (default with `tls_client_ca_file`) or `"optional"`.
    pub tls_client_auth: Option<String>,
    /// The URL(s) clients reach the proxy by, e.g. `"https://api.meraki.com/api/v1"`
    /// (split-horizon): `Link` targets become absolute URLs of it.
    pub public_base_url: Option<OneOrMany>,
    /// CIDRs of the load balancers and reverse proxies whose `X-Forwarded-For` (and PROXY
    /// protocol headers) are believed.
    pub trusted_proxies: Option<Vec<String>>,
    /// Whether each connection starts with a PROXY protocol v1/v2 header (from an L4 load
    /// balancer in `trusted_proxies`).
    pub proxy_protocol: Option<bool>,
}

/// `[upstream]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub api_base: String,
    pub token_url: String,
    pub authorize_url: Option<String>,
    pub revoke_url: Option<String>,
    /// Hosts the proxy may follow redirects to; default: Meraki's API domains.
    pub redirect_hosts: Option<Vec<String>>,
    /// How long a network/device → organization lookup stays cached, seconds.
    pub lookup_cache_ttl_secs: Option<u64>,
    /// How many lookups the cache holds.
    pub lookup_cache_capacity: Option<u64>,
    /// PEM CAs trusted for outbound TLS in addition to the platform store.
    pub ca_file: Option<String>,
    /// `http://host:port` of an HTTP proxy for outbound HTTPS (CONNECT); default `HTTPS_PROXY`;
    /// `"none"` to ignore the environment.
    pub egress_proxy: Option<String>,
    /// Hosts reached without the egress proxy; default `NO_PROXY`.
    pub no_proxy: Option<Vec<String>>,
    /// Host name → IP address, used instead of DNS (like curl's `--resolve`).
    pub resolve: Option<std::collections::BTreeMap<String, String>>,
}

/// `[store]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    pub path: Option<String>,
    /// PostgreSQL instead of the embedded file: `postgres://user:password@host:port/db`.
    pub url: Option<String>,
    /// Environment variable holding the PostgreSQL URL (it carries a password).
    pub url_env: Option<String>,
    /// File holding the PostgreSQL URL.
    pub url_file: Option<String>,
    /// Most PostgreSQL connections per instance.
    pub pool_size: Option<usize>,
    /// How often an instance re-reads the grants and says it is alive, seconds.
    pub sync_secs: Option<u64>,
    /// Environment variable holding the token encryption key.
    pub key_env: Option<String>,
    /// File holding the token encryption key.
    pub key_file: Option<String>,
}

/// `[audit]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    pub path: Option<String>,
    /// `refuse` (default) or `serve` while the log cannot be written.
    pub on_failure: Option<String>,
    /// `interval` (default) or `always`.
    pub fsync: Option<String>,
    pub fsync_interval_ms: Option<u64>,
    pub checkpoint_every: Option<u64>,
    pub buffer_records: Option<usize>,
    /// Environment variable holding the checkpoints' HMAC key.
    pub hmac_key_env: Option<String>,
    /// File holding the checkpoints' HMAC key.
    pub hmac_key_file: Option<String>,
    /// A second sink: `udp://host:port`, `tcp://host:port` or `unix:/dev/log`.
    pub syslog: Option<String>,
    /// The syslog facility's name (`auth` by default).
    pub syslog_facility: Option<String>,
    /// The syslog APP-NAME (`meraki-oauth-proxy` by default).
    pub syslog_app_name: Option<String>,
}

/// `[tokens]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tokens {
    /// Refresh an access token this many seconds before it expires.
    pub refresh_ahead_secs: Option<u64>,
    /// Timeout of one call to the token endpoint, seconds.
    pub token_timeout_secs: Option<u64>,
    /// Refresh grants idle this long, so Meraki's 90-day idle revocation never hits.
    pub keepalive_idle_secs: Option<u64>,
    /// How often to look for idle grants (and re-read the store), seconds.
    pub keepalive_check_secs: Option<u64>,
    /// How long the proxy remembers that Meraki refuses a grant's tokens at one operation
    /// (a token minted for a 401 there was refused there again), seconds.
    pub refused_operation_memory_secs: Option<u64>,
    /// Removed (a rule on a token's age); kept here only to name what replaced it.
    pub rejected_grace_secs: Option<serde::de::IgnoredAny>,
    /// The longest wait between token calls after failures, seconds.
    pub refresh_backoff_max_secs: Option<u64>,
}

/// `[metrics]`: how much per-client and per-organization detail `/metrics` carries.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// `"top"` (default), `"on"` or `"off"`.
    pub per_client: Option<String>,
    /// `"top"` (default), `"on"` or `"off"`.
    pub per_organization: Option<String>,
    /// With `per_client = "top"`: how many clients keep their name (default 10).
    pub top_clients: Option<usize>,
    /// With `per_organization = "top"`: how many organizations keep their id (default 25).
    pub top_organizations: Option<usize>,
}

/// `[rate_limits]`: the proxy's share of Meraki's rate limits (see `crate::shaping`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Shaping on (default) or off.
    pub enabled: Option<bool>,
    /// Meraki's per-organization rate, requests per second (default 10).
    pub organization_rps: Option<f64>,
    /// Meraki's per-organization burst, requests beyond the rate (default 10).
    pub organization_burst: Option<f64>,
    /// Meraki's per-source-IP rate, requests per second (default 100).
    pub source_rps: Option<f64>,
    /// The longest a request waits for its turn before it is answered 429, milliseconds.
    pub max_wait_ms: Option<u64>,
    /// Requests of one client waiting for one organization at most.
    pub queue_per_client: Option<usize>,
    /// Whether the instances of a fleet send from one address (NAT: one source budget for the
    /// fleet, divided by demand) or each from its own (default true).
    pub source_shared: Option<bool>,
}

/// `[[integrations]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Integration {
    pub name: String,
    pub client_id: String,
    pub client_secret_env: Option<String>,
    pub client_secret_file: Option<String>,
    pub redirect_uri: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// `[[clients]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    pub name: String,
    /// One digest, or several while a key is being rotated.
    pub key_sha256: Option<Digests>,
    /// The subject of the client's TLS certificate (mutual TLS), e.g. `"CN=backup-script,O=netops"`.
    pub cert_subject: Option<String>,
    /// A DNS name of the client's TLS certificate (subjectAltName).
    pub cert_san: Option<String>,
    /// Digest → RFC 3339 time after which that key is refused.
    pub key_expires: Option<std::collections::BTreeMap<String, String>>,
    pub integration: String,
    pub organizations: Vec<String>,
    pub methods: Option<Vec<String>>,
    /// operationIds and `family:read|write|*` (family `*` for every family).
    pub operations: Option<Vec<String>>,
    /// The client's share of a contended organization budget, relative to others (default 1).
    pub weight: Option<u32>,
    /// CIDRs the client may call from (absent: anywhere).
    pub source_addresses: Option<Vec<String>>,
}

/// One string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values as a list.
    pub fn list(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(d) => vec![d.as_str()],
            OneOrMany::Many(ds) => ds.iter().map(String::as_str).collect(),
        }
    }
}

/// `key_sha256`: one digest or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Digests {
    One(String),
    Many(Vec<String>),
}

impl Digests {
    /// The digests as a list.
    pub fn list(&self) -> Vec<&str> {
        match self {
            Digests::One(d) => vec![d.as_str()],
            Digests::Many(ds) => ds.iter().map(String::as_str).collect(),
        }
    }
}
