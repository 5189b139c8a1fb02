//! Where requests go: the Meraki API base (or a stand-in), as a Pingora peer, and a small JSON
//! client for the proxy's own calls (network/device lookups, the organization list).

use crate::route::{Lookup, LookupError};
use crate::token::{Grants, RefreshCause, TokenError};
use arc_swap::ArcSwap;
use pingora::upstreams::peer::HttpPeer;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// A failure of the upstream side, distinct from client errors.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream base {0} has no host")]
    NoHost(String),
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
}

/// The upstream API: address, TLS, base path.
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// The base path without trailing slash, e.g. `/api/v1`.
    pub base_path: String,
    /// The `Host` header to send.
    pub host_header: String,
    addr: ArcSwap<SocketAddr>,
    timeout: Duration,
}

impl Upstream {
    /// Parses the base URL and resolves its host once.
    pub fn new(api_base: &Url, timeout: Duration) -> Result<Self, UpstreamError> {
        let host = api_base
            .host_str()
            .ok_or_else(|| UpstreamError::NoHost(api_base.to_string()))?
            .to_owned();
        let tls = api_base.scheme() == "https";
        let port = api_base
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        let host_header = match api_base.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let addr = resolve(&host, port)?;
        Ok(Upstream {
            base_path: api_base.path().trim_end_matches('/').to_owned(),
            host,
            port,
            tls,
            host_header,
            addr: ArcSwap::from_pointee(addr),
            timeout,
        })
    }

    /// Resolves the host again (DNS answers change); runs off the request path.
    pub fn refresh_address(&self) -> Result<(), UpstreamError> {
        let addr = resolve(&self.host, self.port)?;
        if *self.addr.load_full() != addr {
            tracing::info!(host = %self.host, %addr, "upstream address changed");
            self.addr.store(Arc::new(addr));
        }
        Ok(())
    }

    /// `scheme://authority` of the upstream.
    pub fn origin(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.host_header
        )
    }

    /// The peer for one request.
    pub fn peer(&self) -> Box<HttpPeer> {
        self.peer_at(**self.addr.load(), self.tls, &self.host)
    }

    /// A peer with the upstream's timeouts at another address (a redirect target).
    pub fn peer_at(&self, addr: SocketAddr, tls: bool, sni: &str) -> Box<HttpPeer> {
        let mut peer = HttpPeer::new(addr, tls, sni.to_owned());
        let o = &mut peer.options;
        o.connection_timeout = Some(Duration::from_secs(10));
        o.total_connection_timeout = Some(Duration::from_secs(15));
        // A read timeout bounds a silent upstream; writes are bounded by the kernel's buffers and
        // the read that follows, and each timeout costs a timer per I/O operation.
        o.read_timeout = Some(self.timeout);
        o.idle_timeout = Some(Duration::from_secs(55));
        Box::new(peer)
    }
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, UpstreamError> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| UpstreamError::Resolve {
            host: host.to_owned(),
            reason: e.to_string(),
        })?
        .next()
        .ok_or_else(|| UpstreamError::Resolve {
            host: host.to_owned(),
            reason: "no address".into(),
        })
}

/// The proxy's own calls to the API, with a grant's token and the same refresh-on-401 rule.
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    grants: Arc<Grants>,
}

impl ApiClient {
    /// A client for `api_base`.
    pub fn new(api_base: &Url, grants: Arc<Grants>, timeout: Duration) -> reqwest::Result<Self> {
        Ok(ApiClient {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .user_agent(crate::PRODUCT)
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            base: api_base.as_str().trim_end_matches('/').to_owned(),
            grants,
        })
    }

    /// `GET base + path` with the grant serving `org` for `integration`: `Ok(None)` on 404.
    /// `user_agent` is the calling script's, so Meraki's request log names it (with the proxy's
    /// token appended, as on forwarded requests).
    pub async fn get_json(
        &self,
        integration: &str,
        org: &str,
        path: &str,
        user_agent: Option<&str>,
    ) -> Result<Option<serde_json::Value>, LookupError> {
        let ua = crate::forward::user_agent(user_agent);
        let grant = self.grants.get(integration, org).await.ok_or_else(|| {
            token_failure(TokenError::NoGrant {
                integration: integration.to_owned(),
                org: org.to_owned(),
            })
        })?;
        let mut token = self
            .grants
            .token(&grant, org)
            .await
            .map_err(token_failure)?;
        for attempt in 0..2 {
            let bearer = token
                .access
                .as_ref()
                .map(|a| a.expose().to_owned())
                .unwrap_or_default();
            let resp = self
                .http
                .get(format!("{}{}", self.base, path))
                .bearer_auth(bearer)
                .header(http::header::USER_AGENT, ua.as_str())
                .send()
                .await
                .map_err(|e| LookupError {
                    status: if e.is_timeout() { 504 } else { 502 },
                    reason: "upstream_error",
                    message: format!("Meraki did not answer: {}", e.without_url()),
                })?;
            match resp.status().as_u16() {
                200 => {
                    self.grants.mark_used(&grant);
                    return resp.json().await.map(Some).map_err(|_| LookupError {
                        status: 502,
                        reason: "upstream_error",
                        message: "Meraki sent a body that is not JSON".into(),
                    });
                }
                404 => return Ok(None),
                401 if attempt == 0 => {
                    token = self
                        .grants
                        .refresh(&grant, org, token.generation, RefreshCause::Rejected)
                        .await
                        .map_err(token_failure)?;
                }
                status => {
                    return Err(LookupError {
                        status: if status == 429 { 429 } else { 502 },
                        reason: "upstream_error",
                        message: format!("Meraki answered {status}"),
                    })
                }
            }
        }
        Err(LookupError {
            status: 502,
            reason: "upstream_error",
            message: "Meraki refused the refreshed token".into(),
        })
    }
}

fn token_failure(e: TokenError) -> LookupError {
    LookupError {
        status: e.status(),
        reason: e.reason(),
        message: e.to_string(),
    }
}

/// [`ApiClient`] as a [`Lookup`] for one integration.
pub struct LookupWith<'a> {
    pub api: &'a ApiClient,
    pub integration: &'a str,
    pub user_agent: Option<&'a str>,
}

#[async_trait::async_trait]
impl Lookup for LookupWith<'_> {
    async fn get_json(
        &self,
        org: &str,
        path: &str,
    ) -> Result<Option<serde_json::Value>, LookupError> {
        self.api
            .get_json(self.integration, org, path, self.user_agent)
            .await
    }
}
