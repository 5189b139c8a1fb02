//! Configuration: `proxy.toml` parsed ([`file`]) and validated into [`Config`], which is what the
//! rest of the program reads. Every error names the file, the key and what was expected.

pub mod file;

use crate::secret::Secret;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, a missing key or a wrong type.
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    /// A value that parsed but makes no sense.
    #[error("{file}: {key}: {problem}")]
    Invalid {
        file: String,
        key: String,
        problem: String,
    },
}

/// Meraki's API domains: the default allow-list for upstream redirects.
pub const MERAKI_API_DOMAINS: &[&str] = &[
    "meraki.com",
    "meraki.ca",
    "meraki.cn",
    "meraki.in",
    "gov-meraki.com",
];

/// HTTP methods a client may be limited to.
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"];

/// Scopes Meraki defines (SPEC.md): `dashboard:{general,iam,licensing}:...` and product scopes.
fn scope_is_known(scope: &str) -> bool {
    let parts: Vec<&str> = scope.split(':').collect();
    let (area, rest) = match parts.as_slice() {
        ["dashboard", area, kind, access] => (*area, [*kind, *access]),
        [product, kind, access] => (*product, [*kind, *access]),
        _ => return false,
    };
    let area_ok = if parts[0] == "dashboard" {
        matches!(area, "general" | "iam" | "licensing")
    } else {
        matches!(
            area,
            "sdwan" | "switch" | "wireless" | "camera" | "sensor" | "sm"
        )
    };
    area_ok && matches!(rest[0], "config" | "telemetry") && matches!(rest[1], "read" | "write")
}

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
    pub refresh_ahead: Duration,
    /// A token younger than this that Meraki refuses with 401 is not refreshed again.
    pub rejected_grace: Duration,
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
    rules: Vec<OperationRule>,
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

    /// Whether the client may run this operation.
    pub fn may_run(&self, op: &crate::endpoints::Operation) -> bool {
        self.operations.as_ref().is_none_or(|o| o.allows(op))
    }
}

impl Config {
    /// Reads, parses and validates a configuration file. Environment variables and files named
    /// by `client_secret_env`/`client_secret_file` are read here.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// Parses and validates configuration text; `env` looks up environment variables.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let raw: file::File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.clone(),
            message: parse_message(text, &e),
        })?;
        let base_dir = path.parent().unwrap_or_else(|| Path::new("."));
        Validator {
            file,
            base_dir,
            env,
        }
        .validate(raw, path)
    }

    /// The integration with this name.
    pub fn integration(&self, name: &str) -> Option<&Arc<Integration>> {
        self.integrations.iter().find(|i| i.name == name)
    }
}

/// `host:port/database as user`, from a PostgreSQL URL: never the password.
pub fn describe_pg_url(url: &Secret) -> String {
    match url.expose().parse::<tokio_postgres::Config>() {
        Ok(c) => {
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_default();
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!(
                "{host}:{port}/{} as {}",
                c.get_dbname().unwrap_or("-"),
                c.get_user().unwrap_or("-")
            )
        }
        Err(_) => "(unparseable URL)".into(),
    }
}

/// A TOML error as `line L, column C: message`, without quoting the file: the offending line
/// may hold a secret pasted where it does not belong (`client_secret = "..."`), and the message
/// reaches logs, the audit log and the admin API.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim_end();
    let Some(span) = e.span() else {
        return msg.to_owned();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.len() - line_start + 1;
    // The key (left of `=`, never the value) and the table it is in name the setting.
    let line_text = text[line_start..].lines().next().unwrap_or("");
    let key = line_text
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))
        .filter(|k| !k.is_empty() && k.len() <= 100);
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match (table, key) {
        (Some(t), Some(k)) => format!("line {line}, column {column}: {t}.{k}: {msg}"),
        (None, Some(k)) => format!("line {line}, column {column}: {k}: {msg}"),
        _ => format!("line {line}, column {column}: {msg}"),
    }
}

struct Validator<'a> {
    file: String,
    base_dir: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Validator<'_> {
    fn invalid(&self, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    fn addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.invalid(
                key,
                format!(
                    "expected an IP address and port such as \"127.0.0.1:8080\", got {value:?}"
                ),
            )
        })
    }

    fn url(&self, key: &str, value: &str) -> Result<Url, ConfigError> {
        let url = Url::parse(value).map_err(|e| {
            self.invalid(
                key,
                format!("expected an absolute http(s) URL, got {value:?} ({e})"),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(self.invalid(
                key,
                format!("expected an absolute http(s) URL with a host, got {value:?}"),
            ));
        }
        Ok(url)
    }

    fn path(&self, value: &str) -> PathBuf {
        let p = PathBuf::from(value);
        if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        }
    }

    fn validate(&self, mut raw: file::File, source: &Path) -> Result<Config, ConfigError> {
        let listen = self.addr("server.listen", &raw.server.listen)?;
        let admin_listen = raw
            .server
            .admin_listen
            .as_deref()
            .map(|a| self.addr("server.admin_listen", a))
            .transpose()?;
        let threads = raw.server.threads.unwrap_or(2);
        if !(1..=256).contains(&threads) {
            return Err(self.invalid(
                "server.threads",
                format!("expected 1 to 256, got {threads}"),
            ));
        }
        let upstream_timeout = secs(raw.server.upstream_timeout_secs.unwrap_or(60));
        if upstream_timeout.is_zero() {
            return Err(self.invalid("server.upstream_timeout_secs", "expected at least 1"));
        }
        let upstream_connect_timeout = secs(raw.server.upstream_connect_timeout_secs.unwrap_or(10));
        if upstream_connect_timeout.is_zero() || upstream_connect_timeout > Duration::from_secs(120)
        {
            return Err(self.invalid("server.upstream_connect_timeout_secs", "expected 1 to 120"));
        }
        let shutdown_grace = secs(raw.server.shutdown_grace_secs.unwrap_or(30));
        if shutdown_grace > Duration::from_secs(3600) {
            return Err(self.invalid(
                "server.shutdown_grace_secs",
                "expected 0 to 3600: how long in-flight requests may take to finish on SIGTERM",
            ));
        }

        let api_base = self.url("upstream.api_base", &raw.upstream.api_base)?;
        if api_base.query().is_some() || api_base.fragment().is_some() {
            return Err(self.invalid(
                "upstream.api_base",
                "expected a base such as \"https://api.meraki.com/api/v1\", without query or fragment",
            ));
        }
        let token_url = self.url("upstream.token_url", &raw.upstream.token_url)?;
        let authorize_url = raw
            .upstream
            .authorize_url
            .as_deref()
            .map(|u| self.url("upstream.authorize_url", u))
            .transpose()?;
        let revoke_url = raw
            .upstream
            .revoke_url
            .as_deref()
            .map(|u| self.url("upstream.revoke_url", u))
            .transpose()?;
        let egress = self.egress(&raw.upstream)?;
        let redirect_hosts = match raw.upstream.redirect_hosts.take() {
            Some(hosts) => {
                for (i, h) in hosts.iter().enumerate() {
                    if h.is_empty() || h.contains(['/', ':', ' ']) {
                        return Err(self.invalid(
                            format!("upstream.redirect_hosts[{i}]"),
                            format!(
                                "expected a host name or domain such as \"meraki.com\", got {h:?}"
                            ),
                        ));
                    }
                }
                hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect()
            }
            None => MERAKI_API_DOMAINS.iter().map(|s| s.to_string()).collect(),
        };
        let upstream = UpstreamConfig {
            api_base,
            token_url,
            authorize_url,
            revoke_url,
            redirect_hosts,
            lookup_cache_ttl: secs(raw.upstream.lookup_cache_ttl_secs.unwrap_or(600)),
            lookup_cache_capacity: raw.upstream.lookup_cache_capacity.unwrap_or(100_000),
            ca: raw
                .upstream
                .ca_file
                .as_deref()
                .map(|f| {
                    crate::tls::CaBundle::load(&self.path(f))
                        .map_err(|e| self.invalid("upstream.ca_file", crate::report::chain(&e)))
                })
                .transpose()?,
            egress,
            resolve: self.resolve(raw.upstream.resolve.as_ref())?,
        };
        let tls = self.inbound_tls(&raw.server)?;
        let public_origins = self.public_origins(raw.server.public_base_url.as_ref())?;

        let refresh_ahead = secs(raw.tokens.refresh_ahead_secs.unwrap_or(300));
        if refresh_ahead >= Duration::from_secs(3000) {
            return Err(self.invalid(
                "tokens.refresh_ahead_secs",
                "expected well under Meraki's 3600-second access token lifetime (at most 2999)",
            ));
        }
        let token_timeout = secs(raw.tokens.token_timeout_secs.unwrap_or(15));
        if token_timeout.is_zero() {
            return Err(self.invalid("tokens.token_timeout_secs", "expected at least 1"));
        }

        let rejected_grace = secs(raw.tokens.rejected_grace_secs.unwrap_or(30));
        if rejected_grace > Duration::from_secs(600) {
            return Err(self.invalid(
                "tokens.rejected_grace_secs",
                "expected 0 to 600: how long a freshly issued token that Meraki refuses is trusted not to need another refresh",
            ));
        }
        let refresh_backoff_max = secs(raw.tokens.refresh_backoff_max_secs.unwrap_or(60));
        if refresh_backoff_max.is_zero() || refresh_backoff_max > Duration::from_secs(3600) {
            return Err(self.invalid("tokens.refresh_backoff_max_secs", "expected 1 to 3600"));
        }

        let keepalive_idle = secs(raw.tokens.keepalive_idle_secs.unwrap_or(7 * 86_400));
        if keepalive_idle.is_zero() || keepalive_idle > Duration::from_secs(60 * 86_400) {
            return Err(self.invalid(
                "tokens.keepalive_idle_secs",
                "expected 1 to 5184000 (60 days): well under Meraki's 90-day idle revocation",
            ));
        }
        let keepalive_check = secs(raw.tokens.keepalive_check_secs.unwrap_or(3600));
        if keepalive_check.is_zero()
            || keepalive_check > keepalive_idle.max(Duration::from_secs(3600))
        {
            return Err(self.invalid(
                "tokens.keepalive_check_secs",
                "expected at least 1 and at most keepalive_idle_secs",
            ));
        }
        let admin_token = match &raw.server.admin_token_env {
            None => None,
            Some(var) => match (self.env)(var) {
                Some(v) if v.trim().len() >= 16 => Some(Secret::new(v.trim().to_owned())),
                _ => {
                    return Err(self.invalid(
                        "server.admin_token_env",
                        format!(
                            "environment variable {var} is not set or shorter than 16 characters"
                        ),
                    ))
                }
            },
        };
        if let Some(a) = admin_listen {
            if !a.ip().is_loopback() && admin_token.is_none() {
                return Err(self.invalid(
                    "server.admin_listen",
                    format!("{a} is not a loopback address: set server.admin_token_env so the admin listener (status page, grant onboarding) is protected"),
                ));
            }
        }
        let unknown_endpoints = match raw.server.unknown_endpoints.as_deref() {
            None | Some("deny") => UnknownEndpoints::Deny,
            Some("allow") => UnknownEndpoints::Allow,
            Some(other) => {
                return Err(self.invalid(
                    "server.unknown_endpoints",
                    format!("expected \"deny\" or \"allow\", got {other:?}"),
                ))
            }
        };
        let rate_limits = self.rate_limits(&raw.rate_limits)?;
        let store_key = self.store_key(&raw.store)?;
        let store_url = self.store_url(&raw.store)?;
        let store_pool_size = raw.store.pool_size.unwrap_or(8);
        if !(2..=100).contains(&store_pool_size) {
            return Err(self.invalid("store.pool_size", "expected 2 to 100"));
        }
        let store_sync = secs(raw.store.sync_secs.unwrap_or(5));
        if store_sync.is_zero() || store_sync > Duration::from_secs(300) {
            return Err(self.invalid("store.sync_secs", "expected 1 to 300"));
        }
        let integrations = self.integrations(raw.integrations)?;
        let clients = self.clients(raw.clients, &integrations)?;
        if let Some(i) = clients.iter().position(|c| c.cert.is_some()) {
            if tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
                return Err(self.invalid(
                    format!("clients[{i}].cert_subject"),
                    "a client certificate is only checked with mutual TLS: set server.tls_cert_file, tls_key_file and tls_client_ca_file",
                ));
            }
        }

        Ok(Config {
            source: source.to_path_buf(),
            listen,
            admin_listen,
            threads,
            upstream_timeout,
            upstream_connect_timeout,
            shutdown_grace,
            upstream,
            store_path: self.path(raw.store.path.as_deref().unwrap_or("tokens.db")),
            store_url,
            store_pool_size,
            store_sync,
            store_key,
            audit_path: match raw.audit.path.as_deref() {
                None | Some("-") => None,
                Some(p) => Some(self.path(p)),
            },
            refresh_ahead,
            rejected_grace,
            refresh_backoff_max,
            token_timeout,
            keepalive_idle,
            keepalive_check,
            admin_token,
            reauth_fails_readiness: raw.server.reauth_fails_readiness.unwrap_or(true),
            unknown_endpoints,
            tls,
            public_origins,
            rate_limits,
            integrations,
            clients,
        })
    }

    /// `[upstream] egress_proxy` and `no_proxy`, by default from `HTTPS_PROXY`/`NO_PROXY`.
    fn egress(&self, up: &file::Upstream) -> Result<Option<crate::egress::Egress>, ConfigError> {
        let env = |a: &str, b: &str| {
            (self.env)(a)
                .or_else(|| (self.env)(b))
                .filter(|v| !v.trim().is_empty())
        };
        let no_proxy: Vec<String> = match &up.no_proxy {
            Some(list) => list.clone(),
            None => env("NO_PROXY", "no_proxy").into_iter().collect(),
        };
        let (value, key, from_env) = match up.egress_proxy.as_deref().map(str::trim) {
            Some("" | "none") => return Ok(None),
            Some(v) => (v.to_owned(), "upstream.egress_proxy", false),
            None => match env("HTTPS_PROXY", "https_proxy") {
                Some(v) => (v, "upstream.egress_proxy (from HTTPS_PROXY)", true),
                None => return Ok(None),
            },
        };
        crate::egress::Egress::parse(&value, &no_proxy, from_env)
            .map(Some)
            .map_err(|e| self.invalid(key, e.to_string()))
    }

    /// `[upstream] resolve`: host name → IP address.
    fn resolve(
        &self,
        raw: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Result<std::collections::BTreeMap<String, std::net::IpAddr>, ConfigError> {
        let mut out = std::collections::BTreeMap::new();
        for (host, ip) in raw.into_iter().flatten() {
            let key = format!("upstream.resolve.{host}");
            if host.is_empty() || host.contains(['/', ':', ' ']) {
                return Err(self.invalid(key, "expected a host name such as \"api.meraki.com\""));
            }
            let ip: std::net::IpAddr = ip.trim().parse().map_err(|_| {
                self.invalid(key.clone(), format!("expected an IP address, got {ip:?}"))
            })?;
            out.insert(host.to_ascii_lowercase(), ip);
        }
        Ok(out)
    }

    /// `[server] tls_cert_file`, `tls_key_file`, `tls_client_ca_file`, `tls_client_auth`.
    fn inbound_tls(&self, server: &file::Server) -> Result<Option<InboundTls>, ConfigError> {
        let (cert_file, key_file) = match (&server.tls_cert_file, &server.tls_key_file) {
            (None, None) => {
                for (set, key) in [
                    (
                        server.tls_client_ca_file.is_some(),
                        "server.tls_client_ca_file",
                    ),
                    (server.tls_client_auth.is_some(), "server.tls_client_auth"),
                ] {
                    if set {
                        return Err(self.invalid(
                            key,
                            "mutual TLS needs server.tls_cert_file and tls_key_file",
                        ));
                    }
                }
                return Ok(None);
            }
            (Some(_), None) => {
                return Err(self.invalid(
                    "server.tls_key_file",
                    "expected the PEM private key of server.tls_cert_file",
                ))
            }
            (None, Some(_)) => {
                return Err(self.invalid(
                    "server.tls_cert_file",
                    "expected the PEM certificate chain of server.tls_key_file",
                ))
            }
            (Some(c), Some(k)) => (self.path(c), self.path(k)),
        };
        let cert = crate::tls::ServerCert::load(&cert_file, &key_file).map_err(|e| {
            let key = match e {
                crate::tls::TlsError::NoKey { .. } | crate::tls::TlsError::KeyMismatch { .. } => {
                    "server.tls_key_file"
                }
                crate::tls::TlsError::Unusable { ref path, .. }
                    if *path == key_file.display().to_string() =>
                {
                    "server.tls_key_file"
                }
                crate::tls::TlsError::Read { ref path, .. }
                    if *path == key_file.display().to_string() =>
                {
                    "server.tls_key_file"
                }
                _ => "server.tls_cert_file",
            };
            self.invalid(key, crate::report::chain(&e))
        })?;
        let client_ca = server
            .tls_client_ca_file
            .as_deref()
            .map(|f| {
                crate::tls::ClientCa::load(&self.path(f))
                    .map(Arc::new)
                    .map_err(|e| {
                        self.invalid("server.tls_client_ca_file", crate::report::chain(&e))
                    })
            })
            .transpose()?;
        let client_cert_required = match server.tls_client_auth.as_deref() {
            None | Some("required") => true,
            Some("optional") => false,
            Some(other) => {
                return Err(self.invalid(
                    "server.tls_client_auth",
                    format!("expected \"required\" or \"optional\", got {other:?}"),
                ))
            }
        };
        if server.tls_client_auth.is_some() && client_ca.is_none() {
            return Err(self.invalid("server.tls_client_auth", "needs server.tls_client_ca_file"));
        }
        Ok(Some(InboundTls {
            cert_file,
            key_file,
            cert: Arc::new(cert),
            client_ca,
            client_cert_required,
        }))
    }

    /// `[server] public_base_url`: `scheme://host[:port]/api/v1`, one or several.
    fn public_origins(
        &self,
        raw: Option<&file::OneOrMany>,
    ) -> Result<Vec<PublicOrigin>, ConfigError> {
        let Some(raw) = raw else {
            return Ok(Vec::new());
        };
        let many = matches!(raw, file::OneOrMany::Many(_));
        let list = raw.list();
        if list.is_empty() {
            return Err(self.invalid("server.public_base_url", "expected at least one URL"));
        }
        let mut out: Vec<PublicOrigin> = Vec::with_capacity(list.len());
        for (i, v) in list.iter().enumerate() {
            let key = if many {
                format!("server.public_base_url[{i}]")
            } else {
                "server.public_base_url".to_owned()
            };
            let url = self.url(&key, v)?;
            if url.path().trim_end_matches('/') != "/api/v1"
                || url.query().is_some()
                || !url.username().is_empty()
            {
                return Err(self.invalid(
                    key,
                    format!("expected a base URL ending in /api/v1, such as \"https://api.meraki.com/api/v1\", got {v:?}"),
                ));
            }
            let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
            let authority = match url.port() {
                Some(p) => format!("{host}:{p}"),
                None => host,
            };
            let origin = format!("{}://{authority}", url.scheme());
            if out.iter().any(|o| o.authority == authority) {
                return Err(self.invalid(key, format!("{authority} is listed twice")));
            }
            out.push(PublicOrigin { origin, authority });
        }
        Ok(out)
    }

    /// `[rate_limits]`.
    fn rate_limits(&self, raw: &file::RateLimits) -> Result<RateLimits, ConfigError> {
        let d = RateLimits::default();
        let rate = |key: &str, v: Option<f64>, default: f64, max: f64| match v {
            None => Ok(default),
            Some(v) if v.is_finite() && v > 0.0 && v <= max => Ok(v),
            Some(v) => Err(self.invalid(
                format!("rate_limits.{key}"),
                format!("expected requests per second above 0 and at most {max}, got {v}"),
            )),
        };
        let organization_rps = rate(
            "organization_rps",
            raw.organization_rps,
            d.organization_rps,
            1e6,
        )?;
        let source_rps = rate("source_rps", raw.source_rps, d.source_rps, 1e7)?;
        let organization_burst = match raw.organization_burst {
            None => d.organization_burst,
            Some(v) if v.is_finite() && (1.0..=1e6).contains(&v) => v,
            Some(v) => {
                return Err(self.invalid(
                    "rate_limits.organization_burst",
                    format!("expected the requests an organization may send at once, 1 to 1000000 (Meraki: 10), got {v}"),
                ))
            }
        };
        let max_wait = match raw.max_wait_ms {
            None => d.max_wait,
            Some(ms) if (1..=60_000).contains(&ms) => Duration::from_millis(ms),
            Some(ms) => {
                return Err(self.invalid(
                    "rate_limits.max_wait_ms",
                    format!("expected 1 to 60000 milliseconds (scripts time out), got {ms}"),
                ))
            }
        };
        let queue_per_client = match raw.queue_per_client {
            None => d.queue_per_client,
            Some(n) if (1..=100_000).contains(&n) => n,
            Some(n) => {
                return Err(self.invalid(
                    "rate_limits.queue_per_client",
                    format!("expected 1 to 100000 waiting requests, got {n}"),
                ))
            }
        };
        Ok(RateLimits {
            enabled: raw.enabled.unwrap_or(d.enabled),
            organization_rps,
            organization_burst,
            source_rps,
            max_wait,
            queue_per_client,
        })
    }

    fn store_key(&self, store: &file::Store) -> Result<crate::seal::StoreKey, ConfigError> {
        let (key, text) = match (&store.key_env, &store.key_file) {
            (Some(_), Some(_)) => return Err(self.invalid("store.key_env", "set key_env or key_file, not both")),
            (None, None) => {
                return Err(self.invalid(
                    "store.key_env",
                    "expected the name of an environment variable (or store.key_file) holding the key that encrypts tokens at rest; generate one with `meraki-oauth-proxy store gen-key`",
                ))
            }
            (Some(var), None) => match (self.env)(var) {
                Some(v) if !v.trim().is_empty() => ("store.key_env", v),
                _ => return Err(self.invalid("store.key_env", format!("environment variable {var} is not set or empty"))),
            },
            (None, Some(f)) => {
                let p = self.path(f);
                match std::fs::read_to_string(&p) {
                    Ok(v) => ("store.key_file", v),
                    Err(e) => return Err(self.invalid("store.key_file", format!("cannot read {}: {e}", p.display()))),
                }
            }
        };
        crate::seal::StoreKey::parse(&text).map_err(|e| self.invalid(key, e.to_string()))
    }

    /// `[store] url`, `url_env` or `url_file`: PostgreSQL. The URL is checked without ever
    /// being quoted (it holds a password).
    fn store_url(&self, store: &file::Store) -> Result<Option<Secret>, ConfigError> {
        let given = [
            store.url.as_ref().map(|_| "store.url"),
            store.url_env.as_ref().map(|_| "store.url_env"),
            store.url_file.as_ref().map(|_| "store.url_file"),
        ];
        let given: Vec<&str> = given.into_iter().flatten().collect();
        let key = match given.as_slice() {
            [] => return Ok(None),
            [one] => *one,
            [first, ..] => {
                return Err(self.invalid(*first, "set one of store.url, url_env and url_file"))
            }
        };
        if store.path.is_some() {
            return Err(self.invalid(
                "store.path",
                "store.path is the embedded store's file; with a PostgreSQL store.url leave it out",
            ));
        }
        let text = match (&store.url, &store.url_env, &store.url_file) {
            (Some(u), _, _) => u.clone(),
            (_, Some(var), _) => match (self.env)(var) {
                Some(v) if !v.trim().is_empty() => v,
                _ => {
                    return Err(self.invalid(
                        key,
                        format!("environment variable {var} is not set or empty"),
                    ))
                }
            },
            (_, _, Some(f)) => {
                let p = self.path(f);
                std::fs::read_to_string(&p)
                    .map_err(|e| self.invalid(key, format!("cannot read {}: {e}", p.display())))?
            }
            _ => return Ok(None),
        };
        let text = text.trim().to_owned();
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://"))
            || text.parse::<tokio_postgres::Config>().is_err()
        {
            return Err(self.invalid(
                key,
                "expected a URL such as postgres://user:password@host:5432/database (not shown here: it may hold a password)",
            ));
        }
        Ok(Some(Secret::new(text)))
    }

    fn integrations(
        &self,
        raw: Vec<file::Integration>,
    ) -> Result<Vec<Arc<Integration>>, ConfigError> {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, it) in raw.into_iter().enumerate() {
            let key = |k: &str| format!("integrations[{i}].{k}");
            if !valid_name(&it.name) {
                return Err(self.invalid(
                    key("name"),
                    format!("expected letters, digits, '-' or '_', got {:?}", it.name),
                ));
            }
            if !seen.insert(it.name.clone()) {
                return Err(self.invalid(
                    key("name"),
                    format!("integration {:?} is defined twice", it.name),
                ));
            }
            if it.client_id.trim().is_empty() {
                return Err(self.invalid(
                    key("client_id"),
                    "expected the integration's OAuth client ID, got an empty string",
                ));
            }
            let client_secret = match (&it.client_secret_env, &it.client_secret_file) {
                (Some(_), Some(_)) => {
                    return Err(self.invalid(key("client_secret_env"), "set client_secret_env or client_secret_file, not both"))
                }
                (None, None) => {
                    return Err(self.invalid(
                        key("client_secret_env"),
                        "expected the name of an environment variable (or client_secret_file) holding the client secret; secrets never sit in proxy.toml",
                    ))
                }
                (Some(var), None) => match (self.env)(var) {
                    Some(v) if !v.trim().is_empty() => Secret::new(v.trim().to_string()),
                    _ => {
                        return Err(self.invalid(
                            key("client_secret_env"),
                            format!("environment variable {var} is not set or empty"),
                        ))
                    }
                },
                (None, Some(f)) => {
                    let p = self.path(f);
                    match std::fs::read_to_string(&p) {
                        Ok(v) if !v.trim().is_empty() => Secret::new(v.trim().to_string()),
                        Ok(_) => return Err(self.invalid(key("client_secret_file"), format!("{} is empty", p.display()))),
                        Err(e) => return Err(self.invalid(key("client_secret_file"), format!("cannot read {}: {e}", p.display()))),
                    }
                }
            };
            let redirect_uri = it
                .redirect_uri
                .as_deref()
                .map(|u| self.url(&key("redirect_uri"), u))
                .transpose()?;
            for (j, s) in it.scopes.iter().enumerate() {
                if !scope_is_known(s) {
                    return Err(self.invalid(
                        format!("integrations[{i}].scopes[{j}]"),
                        format!("expected a Meraki scope such as \"dashboard:general:config:read\" or \"wireless:telemetry:read\", got {s:?}"),
                    ));
                }
            }
            out.push(Arc::new(Integration {
                name: it.name,
                client_id: it.client_id,
                client_secret,
                redirect_uri,
                scopes: it.scopes,
            }));
        }
        Ok(out)
    }

    /// Parses `clients[i].operations` against Meraki's API table.
    fn operations(&self, i: usize, entries: &[String]) -> Result<Operations, ConfigError> {
        let table = crate::endpoints::EndpointTable::builtin();
        let families = table.families();
        let mut rules = Vec::with_capacity(entries.len());
        for (j, e) in entries.iter().enumerate() {
            let key = format!("clients[{i}].operations[{j}]");
            let rule = match e.split_once(':') {
                None => {
                    if table.by_operation_id(e).is_none() {
                        return Err(self.invalid(
                            key,
                            format!(
                                "no operation {e:?} in Meraki's API table (meraki-sdk {}); expected an operationId such as \"getOrganizationNetworks\" or \"family:read\"",
                                table.sdk_version()
                            ),
                        ));
                    }
                    OperationRule::Id(e.clone())
                }
                Some((family, access)) => {
                    let family = match family {
                        "*" => None,
                        f if families.contains(&f) => Some(f.to_owned()),
                        f => {
                            return Err(self.invalid(
                                key,
                                format!(
                                "no product family {f:?}; expected \"*\" or one of {families:?}"
                            ),
                            ))
                        }
                    };
                    let (read, write) = match access {
                        "read" => (true, false),
                        "write" => (false, true),
                        "*" => (true, true),
                        a => {
                            return Err(
                                self.invalid(key, format!("expected read, write or *, got {a:?}"))
                            )
                        }
                    };
                    OperationRule::Family {
                        family,
                        read,
                        write,
                    }
                }
            };
            rules.push(rule);
        }
        if rules.is_empty() {
            return Err(self.invalid(
                format!("clients[{i}].operations"),
                "expected at least one entry (leave the key out to allow every operation)",
            ));
        }
        Ok(Operations { rules })
    }

    /// `clients[i].cert_subject` and `cert_san`, each naming one client only.
    fn cert_binding(
        &self,
        i: usize,
        c: &file::Client,
        subjects: &mut HashMap<String, String>,
        sans: &mut HashMap<String, String>,
    ) -> Result<Option<CertBinding>, ConfigError> {
        let subject = match &c.cert_subject {
            None => None,
            Some(text) => {
                let key = format!("clients[{i}].cert_subject");
                let s = crate::tls::Subject::parse(text).map_err(|p| {
                    self.invalid(
                        key.clone(),
                        format!("{p} (expected a subject such as \"CN=backup-script,O=netops\")"),
                    )
                })?;
                if let Some(other) = subjects.insert(s.key.clone(), c.name.clone()) {
                    return Err(self.invalid(
                        key,
                        format!("the same certificate subject is used by client {other:?}"),
                    ));
                }
                Some(s)
            }
        };
        let san = match &c.cert_san {
            None => None,
            Some(name) => {
                let key = format!("clients[{i}].cert_san");
                let n = name.trim().to_ascii_lowercase();
                if n.is_empty() || n.contains(['/', ':', ' ', ',']) {
                    return Err(self.invalid(
                        key,
                        format!(
                            "expected a DNS name such as \"backup.netops.example\", got {name:?}"
                        ),
                    ));
                }
                if let Some(other) = sans.insert(n.clone(), c.name.clone()) {
                    return Err(self.invalid(
                        key,
                        format!("the same certificate name is used by client {other:?}"),
                    ));
                }
                Some(n)
            }
        };
        Ok((subject.is_some() || san.is_some()).then_some(CertBinding { subject, san }))
    }

    fn clients(
        &self,
        raw: Vec<file::Client>,
        integrations: &[Arc<Integration>],
    ) -> Result<Vec<Arc<Client>>, ConfigError> {
        let mut names = HashSet::new();
        let mut digests: HashMap<[u8; 32], String> = HashMap::new();
        let mut subjects: HashMap<String, String> = HashMap::new();
        let mut sans: HashMap<String, String> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, c) in raw.into_iter().enumerate() {
            let key = |k: &str| format!("clients[{i}].{k}");
            if !valid_name(&c.name) {
                return Err(self.invalid(
                    key("name"),
                    format!("expected letters, digits, '-' or '_', got {:?}", c.name),
                ));
            }
            if !names.insert(c.name.clone()) {
                return Err(
                    self.invalid(key("name"), format!("client {:?} is defined twice", c.name))
                );
            }
            let cert = self.cert_binding(i, &c, &mut subjects, &mut sans)?;
            let listed = c.key_sha256.as_ref().map(|d| d.list()).unwrap_or_default();
            if listed.is_empty() && (c.key_sha256.is_some() || cert.is_none()) {
                return Err(self.invalid(
                    key("key_sha256"),
                    if c.key_sha256.is_some() {
                        "expected at least one digest"
                    } else {
                        "expected the digest of the client's key (or, with mutual TLS, cert_subject or cert_san)"
                    },
                ));
            }
            let mut keys = Vec::with_capacity(listed.len());
            for (j, d) in listed.iter().enumerate() {
                let at = if matches!(c.key_sha256, Some(file::Digests::One(_))) {
                    key("key_sha256")
                } else {
                    format!("clients[{i}].key_sha256[{j}]")
                };
                let digest = parse_digest(d).ok_or_else(|| {
                    self.invalid(
                        at.clone(),
                        format!(
                            "expected 64 hex characters (the SHA-256 of the client's key, from `meraki-oauth-proxy hash-key` or `clients new`), got {} characters",
                            d.len()
                        ),
                    )
                })?;
                if let Some(other) = digests.insert(digest, c.name.clone()) {
                    return Err(self.invalid(
                        at,
                        format!("the same key digest is used by client {other:?}"),
                    ));
                }
                keys.push(ClientKey {
                    digest,
                    expires_at: None,
                });
            }
            for (d, when) in c.key_expires.iter().flatten() {
                let at = format!("clients[{i}].key_expires.{d}");
                let digest = parse_digest(d)
                    .filter(|digest| keys.iter().any(|k| k.digest == *digest))
                    .ok_or_else(|| {
                        self.invalid(at.clone(), "names no digest listed in key_sha256")
                    })?;
                let t = time::OffsetDateTime::parse(
                    when,
                    &time::format_description::well_known::Rfc3339,
                )
                .map_err(|_| {
                    self.invalid(
                        at.clone(),
                        format!("expected an RFC 3339 time such as \"2026-12-31T00:00:00Z\", got {when:?}"),
                    )
                })?;
                if let Some(k) = keys.iter_mut().find(|k| k.digest == digest) {
                    k.expires_at = Some(t.unix_timestamp());
                }
            }
            if !integrations.iter().any(|it| it.name == c.integration) {
                let known: Vec<&str> = integrations.iter().map(|i| i.name.as_str()).collect();
                return Err(self.invalid(
                    key("integration"),
                    format!(
                        "no integration named {:?} (defined: {known:?})",
                        c.integration
                    ),
                ));
            }
            if c.organizations.is_empty() {
                return Err(self.invalid(
                    key("organizations"),
                    "expected at least one Meraki organization ID",
                ));
            }
            for (j, o) in c.organizations.iter().enumerate() {
                if !valid_org_id(o) {
                    return Err(self.invalid(
                        format!("clients[{i}].organizations[{j}]"),
                        format!("expected a Meraki organization ID (digits), got {o:?}"),
                    ));
                }
            }
            let methods = match c.methods {
                None => None,
                Some(ms) => {
                    let mut parsed = Vec::with_capacity(ms.len());
                    for (j, m) in ms.iter().enumerate() {
                        let upper = m.to_ascii_uppercase();
                        if !METHODS.contains(&upper.as_str()) {
                            return Err(self.invalid(
                                format!("clients[{i}].methods[{j}]"),
                                format!("expected one of {METHODS:?}, got {m:?}"),
                            ));
                        }
                        parsed.push(http::Method::from_bytes(upper.as_bytes()).map_err(|_| {
                            self.invalid(format!("clients[{i}].methods[{j}]"), "not an HTTP method")
                        })?);
                    }
                    // HEAD is a GET without a body: allowing GET allows HEAD.
                    if parsed.contains(&http::Method::GET) && !parsed.contains(&http::Method::HEAD)
                    {
                        parsed.push(http::Method::HEAD);
                    }
                    Some(parsed)
                }
            };
            let operations = c
                .operations
                .map(|entries| self.operations(i, &entries))
                .transpose()?;
            let weight = match c.weight {
                None => 1,
                Some(w) if (1..=1000).contains(&w) => w,
                Some(w) => {
                    return Err(self.invalid(
                        key("weight"),
                        format!("expected 1 to 1000 (a share relative to other clients', default 1), got {w}"),
                    ))
                }
            };
            out.push(Arc::new(Client {
                name: c.name,
                keys,
                cert,
                integration: c.integration,
                organizations: c.organizations,
                methods,
                operations,
                weight,
            }));
        }
        Ok(out)
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Meraki organization IDs are decimal numbers.
pub fn valid_org_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_digit())
}

fn parse_digest(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out).ok()?;
    Some(out)
}

impl fmt::Display for Config {
    /// A summary without secrets, printed by `check`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "config: {}", self.source.display())?;
        match &self.tls {
            None => writeln!(f, "proxy listener: http://{}/api/v1", self.listen)?,
            Some(t) => {
                writeln!(
                    f,
                    "proxy listener: https://{}/api/v1 (certificate {} for {}, expires {}, sha256 {})",
                    self.listen,
                    t.cert.subject,
                    t.cert.names.join(", "),
                    crate::clock::rfc3339(t.cert.not_after),
                    &t.cert.fingerprint[..16]
                )?;
                if let Some(ca) = &t.client_ca {
                    writeln!(
                        f,
                        "mutual TLS: client certificates from {} ({} CA certificates), {}",
                        ca.path.display(),
                        ca.count,
                        if t.client_cert_required {
                            "required"
                        } else {
                            "optional"
                        }
                    )?;
                }
            }
        }
        if !self.public_origins.is_empty() {
            let list: Vec<&str> = self
                .public_origins
                .iter()
                .map(|o| o.origin.as_str())
                .collect();
            writeln!(f, "answers as (Link targets): {}", list.join(", "))?;
        }
        match self.admin_listen {
            Some(a) => writeln!(
                f,
                "admin listener: http://{a}/ (/metrics, /healthz, /readyz)"
            )?,
            None => writeln!(f, "admin listener: off")?,
        }
        writeln!(f, "worker threads: {}", self.threads)?;
        writeln!(f, "upstream: {}", self.upstream.api_base)?;
        writeln!(f, "token endpoint: {}", self.upstream.token_url)?;
        if let Some(ca) = &self.upstream.ca {
            writeln!(
                f,
                "outbound TLS trusts: the platform store and {} ({} certificates)",
                ca.path.display(),
                ca.certs.len()
            )?;
        }
        match &self.upstream.egress {
            Some(e) => writeln!(f, "egress proxy (HTTPS, CONNECT): {}", e.url)?,
            None => writeln!(f, "egress proxy: none (direct connections)")?,
        }
        for (host, ip) in &self.upstream.resolve {
            writeln!(f, "resolves {host} to {ip}")?;
        }
        writeln!(
            f,
            "redirects allowed to: {}",
            self.upstream.redirect_hosts.join(", ")
        )?;
        match &self.store_url {
            Some(url) => writeln!(
                f,
                "token store: PostgreSQL {} (pool {}, sync every {} s; tokens sealed with key {:?})",
                describe_pg_url(url),
                self.store_pool_size,
                self.store_sync.as_secs(),
                self.store_key
            )?,
            None => writeln!(
                f,
                "token store: {} (tokens sealed with key {:?})",
                self.store_path.display(),
                self.store_key
            )?,
        }
        match &self.audit_path {
            Some(p) => writeln!(f, "audit log: {}", p.display())?,
            None => writeln!(f, "audit log: stdout")?,
        }
        writeln!(f, "integrations ({}):", self.integrations.len())?;
        for it in &self.integrations {
            writeln!(
                f,
                "  {} client_id={} secret={} scopes=[{}]",
                it.name,
                it.client_id,
                it.client_secret,
                it.scopes.join(" ")
            )?;
        }
        let table = crate::endpoints::EndpointTable::builtin();
        writeln!(
            f,
            "API table: meraki-sdk {} ({} operations); unknown endpoints: {}",
            table.sdk_version(),
            table.len(),
            match self.unknown_endpoints {
                UnknownEndpoints::Deny => "refused (404)",
                UnknownEndpoints::Allow => "forwarded",
            }
        )?;
        let r = &self.rate_limits;
        if r.enabled {
            writeln!(
                f,
                "rate limits: {} requests/s per organization (burst {}), {} requests/s in all; a request waits at most {} ms, {} per client and organization",
                r.organization_rps,
                r.organization_burst,
                r.source_rps,
                r.max_wait.as_millis(),
                r.queue_per_client
            )?;
        } else {
            writeln!(f, "rate limits: off (requests are not shaped)")?;
        }
        writeln!(f, "clients ({}):", self.clients.len())?;
        for c in &self.clients {
            let methods = match &c.methods {
                None => "all".to_string(),
                Some(m) => m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(","),
            };
            let operations = match &c.operations {
                None => "all".to_string(),
                Some(o) => o
                    .rules()
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            };
            // Effective: what the method list and the operation list together allow.
            let effective = table
                .operations()
                .filter(|op| c.may_use(&op.method) && c.may_run(op))
                .count();
            let now = crate::clock::now_unix();
            let expiring: Vec<String> = c
                .keys
                .iter()
                .filter_map(|k| k.expires_at)
                .map(|t| {
                    if t <= now {
                        format!("a key expired {}", crate::clock::rfc3339(t))
                    } else {
                        format!("a key expires {}", crate::clock::rfc3339(t))
                    }
                })
                .collect();
            writeln!(
                f,
                "  {} keys={}{} integration={} organizations=[{}] methods={} operations=[{}] ({effective} of {} API operations allowed) weight={}",
                c.name,
                c.keys.len(),
                if expiring.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", expiring.join(", "))
                },
                c.integration,
                c.organizations.join(","),
                methods,
                operations,
                table.len(),
                c.weight
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9090"
[upstream]
api_base = "https://api.meraki.com/api/v1"
token_url = "https://as.meraki.com/oauth/token"
[store]
key_env = "STORE_KEY"
[[integrations]]
name = "netops"
client_id = "cid"
client_secret_env = "SECRET_VAR"
scopes = ["dashboard:general:config:read", "wireless:telemetry:read"]
[[clients]]
name = "backup"
key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
integration = "netops"
organizations = ["123"]
methods = ["get"]
"#;

    #[test]
    fn the_example_proxy_toml_is_valid() {
        let text = include_str!("../../proxy.toml");
        // Every variable the file names is set; the proxy variables of the environment are not.
        let c = Config::parse(text, Path::new("/etc/proxy.toml"), &|v| {
            (!v.to_ascii_lowercase().ends_with("_proxy")).then(|| "11".repeat(32))
        })
        .unwrap();
        assert!(!c.clients.is_empty() && !c.integrations.is_empty());
    }

    #[test]
    fn a_client_may_hold_several_keys_each_with_an_expiry() {
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let c = parse(&GOOD.replace(
            "key_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"",
            &format!("key_sha256 = [\"{a}\", \"{b}\"]\nkey_expires = {{ \"{b}\" = \"2026-12-31T00:00:00Z\" }}"),
        ))
        .unwrap();
        let keys = &c.clients[0].keys;
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].expires_at, None);
        assert_eq!(keys[1].expires_at, Some(1_798_675_200));
        assert!(c.to_string().contains("keys=2 (a key expire"), "{c}");
        for (replacement, key, problem) in [
            (format!("key_sha256 = [\"{a}\", \"x\"]"), "clients[0].key_sha256[1]", "64 hex"),
            ("key_sha256 = []".to_string(), "clients[0].key_sha256", "at least one"),
            (
                format!("key_sha256 = [\"{a}\"]\nkey_expires = {{ \"{b}\" = \"2026-12-31T00:00:00Z\" }}"),
                "key_expires",
                "names no digest",
            ),
            (
                format!("key_sha256 = [\"{a}\"]\nkey_expires = {{ \"{a}\" = \"next tuesday\" }}"),
                "key_expires",
                "RFC 3339",
            ),
        ] {
            let e = parse(&GOOD.replace(
                "key_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"",
                &replacement,
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(key) && e.contains(problem), "{replacement}: {e}");
        }
    }

    #[test]
    fn client_operations_are_checked_against_the_api_table() {
        let with = |ops: &str| parse(&format!("{GOOD}operations = {ops}\n"));
        let c = with(r#"["getOrganizationNetworks", "wireless:read", "*:read"]"#).unwrap();
        let table = crate::endpoints::EndpointTable::builtin();
        let client = &c.clients[0];
        let op = |id: &str| table.by_operation_id(id).unwrap();
        assert!(client.may_run(op("getOrganizationNetworks")));
        assert!(client.may_run(op("getNetworkWirelessSsids")));
        assert!(!client.may_run(op("updateNetworkWirelessSsid")));
        let c = with(r#"["wireless:write"]"#).unwrap();
        assert!(c.clients[0].may_run(op("updateNetworkWirelessSsid")));
        assert!(!c.clients[0].may_run(op("getNetworkWirelessSsids")));
        assert!(c.to_string().contains("operations=[wireless:write]"), "{c}");
        for (ops, key, problem) in [
            (
                r#"["getOrganizationNetwork"]"#,
                "clients[0].operations[0]",
                "no operation",
            ),
            (
                r#"["getOrganizations", "wifi:read"]"#,
                "clients[0].operations[1]",
                "no product family",
            ),
            (
                r#"["wireless:delete"]"#,
                "clients[0].operations[0]",
                "expected read, write or *",
            ),
            ("[]", "clients[0].operations", "at least one"),
        ] {
            let e = with(ops).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(problem), "{ops}: {e}");
        }
        let e = parse(&GOOD.replace(
            "admin_listen",
            "unknown_endpoints = \"maybe\"\nadmin_listen",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("server.unknown_endpoints"), "{e}");
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/proxy.toml"), &|v| match v {
            "SECRET_VAR" => Some("s3cret-value".to_string()),
            "STORE_KEY" => Some("11".repeat(32)),
            "SHORT_KEY" => Some("abc".to_string()),
            _ => None,
        })
    }

    #[test]
    fn good_config_parses_and_summary_hides_the_secret() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            c.clients[0].methods.as_ref().unwrap(),
            &[http::Method::GET, http::Method::HEAD]
        );
        assert_eq!(c.store_path, PathBuf::from("/etc/tokens.db"));
        let summary = format!("{c}\n{c:?}");
        assert!(!summary.contains("s3cret-value"), "{summary}");
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&GOOD.replace("[server]\n", "[server]\nlisten_port = 1\n"));
        assert!(
            e.contains("/etc/proxy.toml") && e.contains("listen_port"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_the_key_and_the_expectation() {
        let cases = [
            (GOOD.replace("127.0.0.1:8080", "localhost"), "server.listen"),
            (
                GOOD.replace(
                    "000000000000000000000000000000000000000000000000000000000000000\"",
                    "zz\"",
                ),
                "clients[0].key_sha256",
            ),
            (
                GOOD.replace("integration = \"netops\"", "integration = \"other\""),
                "clients[0].integration",
            ),
            (
                GOOD.replace("\"123\"", "\"abc\""),
                "clients[0].organizations[0]",
            ),
            (
                GOOD.replace("[\"get\"]", "[\"FETCH\"]"),
                "clients[0].methods[0]",
            ),
            (
                GOOD.replace("SECRET_VAR", "MISSING_VAR"),
                "integrations[0].client_secret_env",
            ),
            (
                GOOD.replace("wireless:telemetry:read", "wireless:all"),
                "integrations[0].scopes[1]",
            ),
            (
                GOOD.replace("https://api.meraki.com/api/v1", "api.meraki.com"),
                "upstream.api_base",
            ),
        ];
        for (text, key) in cases {
            let e = err(&text);
            assert!(e.contains(key), "expected {key} in: {e}");
            assert!(e.starts_with("/etc/proxy.toml: "), "{e}");
        }
    }

    /// A CA and a server certificate for `api.meraki.com` signed by it, written to `dir`.
    fn write_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["api.meraki.com".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let (c, k, a) = (
            dir.join("proxy.pem"),
            dir.join("proxy.key"),
            dir.join("ca.pem"),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        std::fs::write(&a, ca.pem()).unwrap();
        (c, k, a, key.serialize_pem())
    }

    #[test]
    fn tls_settings_load_their_files_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, ca, key_pem) = write_pki(dir.path());
        let server = format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_client_ca_file = \"{}\"\npublic_base_url = [\"https://api.meraki.com/api/v1\", \"https://api.meraki.ca:8443/api/v1/\"]\nadmin_listen",
            cert.display(),
            key.display(),
            ca.display()
        );
        let upstream = format!(
            "[upstream]\nca_file = \"{}\"\nresolve = {{ \"API.meraki.com\" = \"192.0.2.10\" }}\n",
            ca.display()
        );
        let bound = "\n[[clients]]\nname = \"appliance\"\ncert_subject = \"CN=backup-script,O=netops\"\nintegration = \"netops\"\norganizations = [\"123\"]\n";
        let text = format!("{GOOD}{bound}")
            .replace("admin_listen", &server)
            .replace("[upstream]\n", &upstream);
        let c = parse(&text).unwrap();
        let tls = c.tls.as_ref().unwrap();
        assert_eq!(tls.cert.names, ["api.meraki.com"]);
        assert!(tls.client_cert_required);
        assert_eq!(
            c.public_origins
                .iter()
                .map(|o| (o.origin.as_str(), o.authority.as_str()))
                .collect::<Vec<_>>(),
            [
                ("https://api.meraki.com", "api.meraki.com"),
                ("https://api.meraki.ca:8443", "api.meraki.ca:8443")
            ]
        );
        assert_eq!(c.upstream.ca.as_ref().unwrap().certs.len(), 1);
        assert_eq!(
            c.upstream.resolve.get("api.meraki.com"),
            Some(&"192.0.2.10".parse().unwrap())
        );
        assert!(c.clients[1].cert.is_some() && c.clients[1].keys.is_empty());
        let shown = format!("{c}\n{c:?}");
        assert!(shown.contains("proxy listener: https://"), "{shown}");
        let key_body = key_pem.lines().nth(1).unwrap();
        assert!(
            !shown.contains(key_body) && !shown.contains("PRIVATE KEY"),
            "{shown}"
        );

        let missing = dir.path().join("missing.key");
        for (from, to, key, problem) in [
            (
                key.display().to_string(),
                missing.display().to_string(),
                "server.tls_key_file",
                "cannot read",
            ),
            (
                key.display().to_string(),
                cert.display().to_string(),
                "server.tls_key_file",
                "no PEM private key",
            ),
            (
                cert.display().to_string(),
                key.display().to_string(),
                "server.tls_cert_file",
                "no PEM certificate",
            ),
            (
                "tls_client_ca_file".into(),
                "tls_client_auth = \"maybe\"\ntls_client_ca_file".into(),
                "server.tls_client_auth",
                "\"required\" or \"optional\"",
            ),
            (
                "https://api.meraki.ca:8443/api/v1/".into(),
                "https://api.meraki.ca/v2".into(),
                "server.public_base_url[1]",
                "ending in /api/v1",
            ),
            (
                "CN=backup-script,O=netops".into(),
                "CN=backup-script,XX=netops".into(),
                "clients[1].cert_subject",
                "unknown attribute",
            ),
            (
                "192.0.2.10".into(),
                "not-an-ip".into(),
                "upstream.resolve.API.meraki.com",
                "IP address",
            ),
        ] {
            let e = parse(&text.replace(&from, &to)).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(problem), "{key}: {e}");
            assert!(!e.contains(key_body), "{e}");
        }
        // A certificate binding without mutual TLS can never match: refused.
        let e = parse(&text.replace(&format!("tls_client_ca_file = \"{}\"\n", ca.display()), ""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("clients[1].cert_subject") && e.contains("mutual TLS"),
            "{e}"
        );
    }

    #[test]
    fn the_egress_proxy_comes_from_the_file_or_https_proxy() {
        let with_env = |text: &str, https_proxy: Option<&str>| {
            Config::parse(text, Path::new("/etc/proxy.toml"), &|v| match v {
                "SECRET_VAR" => Some("s".into()),
                "STORE_KEY" => Some("11".repeat(32)),
                "HTTPS_PROXY" => https_proxy.map(str::to_owned),
                "NO_PROXY" => Some("internal.example".into()),
                _ => None,
            })
        };
        let c = with_env(GOOD, None).unwrap();
        assert!(c.upstream.egress.is_none());
        let c = with_env(GOOD, Some("http://user:pa55word@proxy.corp:3128")).unwrap();
        let e = c.upstream.egress.as_ref().unwrap();
        assert_eq!(e.authority(), "proxy.corp:3128");
        assert!(e.bypasses("a.internal.example"));
        let shown = format!("{c}\n{c:?}");
        assert!(
            !shown.contains("pa55word") && !shown.contains("user:"),
            "{shown}"
        );
        let file = GOOD.replace("[upstream]\n", "[upstream]\negress_proxy = \"none\"\n");
        assert!(with_env(&file, Some("http://proxy.corp:3128"))
            .unwrap()
            .upstream
            .egress
            .is_none());
        let file = GOOD.replace(
            "[upstream]\n",
            "[upstream]\negress_proxy = \"http://u:p@proxy:1\"\n",
        );
        let e = with_env(&file, None).unwrap_err().to_string();
        assert!(
            e.contains("upstream.egress_proxy") && e.contains("credentials"),
            "{e}"
        );
        assert!(!e.contains("u:p@"), "{e}");
    }

    #[test]
    fn rate_limits_default_to_merakis_figures_and_bad_values_name_the_key() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.rate_limits, RateLimits::default());
        assert_eq!(c.clients[0].weight, 1);
        assert!(
            c.to_string()
                .contains("rate limits: 10 requests/s per organization (burst 10)"),
            "{c}"
        );
        let with = |section: &str| format!("{GOOD}weight = 3\n[rate_limits]\n{section}\n");
        let c = parse(&with(
            "enabled = false\norganization_rps = 4.5\norganization_burst = 2\nsource_rps = 50\nmax_wait_ms = 500\nqueue_per_client = 8",
        ))
        .unwrap();
        let r = c.rate_limits;
        assert_eq!(
            (
                r.enabled,
                r.organization_rps,
                r.organization_burst,
                r.source_rps
            ),
            (false, 4.5, 2.0, 50.0)
        );
        assert_eq!(
            (r.max_wait, r.queue_per_client),
            (Duration::from_millis(500), 8)
        );
        assert_eq!(c.clients[0].weight, 3);
        assert!(c.to_string().contains("rate limits: off"), "{c}");
        for (section, key, problem) in [
            (
                "organization_rps = 0",
                "rate_limits.organization_rps",
                "above 0",
            ),
            (
                "organization_rps = -3",
                "rate_limits.organization_rps",
                "above 0",
            ),
            ("source_rps = 0.0", "rate_limits.source_rps", "above 0"),
            (
                "organization_burst = 0.5",
                "rate_limits.organization_burst",
                "1 to 1000000",
            ),
            ("max_wait_ms = 0", "rate_limits.max_wait_ms", "1 to 60000"),
            (
                "queue_per_client = 0",
                "rate_limits.queue_per_client",
                "1 to 100000",
            ),
            ("queue = 3", "queue", "unknown field"),
            ("enabled = \"yes\"", "enabled", "bool"),
        ] {
            let e = parse(&with(section)).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(problem), "{section}: {e}");
        }
        let e = parse(&format!("{GOOD}weight = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("clients[0].weight") && e.contains("1 to 1000"),
            "{e}"
        );
        let e = parse(&format!("{GOOD}weight = 1.5\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("weight"), "{e}");
    }

    #[test]
    fn scopes_follow_meraki() {
        assert!(scope_is_known("dashboard:iam:config:write"));
        assert!(scope_is_known("sm:telemetry:read"));
        assert!(!scope_is_known("dashboard:wireless:config:read"));
        assert!(!scope_is_known("switch:config:admin"));
    }

    #[test]
    fn a_syntax_error_names_the_line_without_quoting_it() {
        let text = "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\napi_base = \"https://api.meraki.com/api/v1\"\ntoken_url = \"https://as.meraki.com/oauth/token\"\n[[integrations]]\nname = \"n\"\nclient_id = \"i\"\nclient_secret = \"pasted-secret-value-1234\"\n";
        let e = parse(text).unwrap_err().to_string();
        assert!(e.contains("line 9") && e.contains("client_secret"), "{e}");
        assert!(!e.contains("pasted-secret-value"), "{e}");
    }
}
