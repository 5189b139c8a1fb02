//! Where forwarded requests go: the Meraki API base (or a stand-in) as a Pingora peer, its
//! address kept fresh off the request path, with the outbound TLS policy ([`Outbound`]: roots,
//! egress proxy, pinned addresses) applied to every peer, redirect targets included.

use crate::tls::Outbound;
use arc_swap::ArcSwap;
use pingora::upstreams::peer::HttpPeer;
use std::hash::{Hash, Hasher};
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
    /// `host_header` as the `Host` header value forwarded (made once).
    pub host_value: http::HeaderValue,
    /// Where connections to the API host go: its address, or the egress proxy's.
    addr: ArcSwap<SocketAddr>,
    /// The egress proxy's address, when there is one.
    egress_addr: Option<ArcSwap<SocketAddr>>,
    connect_timeout: Duration,
    timeout: Duration,
    outbound: Arc<Outbound>,
}

impl Upstream {
    /// Parses the base URL and resolves its host once (or the egress proxy's, when the egress
    /// proxy carries it: the proxy then never resolves Meraki's names itself). `connect_timeout`
    /// bounds the TCP (and TLS) connection, `timeout` each wait for the upstream's answer.
    pub fn new(
        api_base: &Url,
        connect_timeout: Duration,
        timeout: Duration,
        outbound: Arc<Outbound>,
    ) -> Result<Self, UpstreamError> {
        let host = api_base
            .host_str()
            .ok_or_else(|| UpstreamError::NoHost(api_base.to_string()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = api_base.scheme() == "https";
        let port = api_base
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        let host_header = match api_base.port() {
            Some(p) => format!("{}:{p}", api_base.host_str().unwrap_or_default()),
            None => api_base.host_str().unwrap_or_default().to_owned(),
        };
        let egress_addr = match outbound.egress() {
            Some(e) => {
                let (h, p) = e.host_port();
                Some(ArcSwap::from_pointee(resolve(h, p)?))
            }
            None => None,
        };
        let me = Upstream {
            base_path: api_base.path().trim_end_matches('/').to_owned(),
            host,
            port,
            tls,
            // A parsed URL's host is ASCII (IDNA): always a header value.
            host_value: http::HeaderValue::from_str(&host_header)
                .map_err(|_| UpstreamError::NoHost(api_base.to_string()))?,
            host_header,
            addr: ArcSwap::from_pointee(SocketAddr::from(([0, 0, 0, 0], 0))),
            egress_addr,
            connect_timeout,
            timeout,
            outbound,
        };
        me.addr
            .store(Arc::new(me.address_of(&me.host, me.port, me.tls)?));
        Ok(me)
    }

    /// Whether the egress proxy carries connections to `host`.
    fn via_egress(&self, tls: bool, host: &str) -> Option<&ArcSwap<SocketAddr>> {
        match (self.outbound.egress(), &self.egress_addr) {
            (Some(e), Some(a)) if e.carries(tls, host) => Some(a),
            _ => None,
        }
    }

    /// Where a connection to `host:port` goes: the egress proxy, a pinned address, or DNS.
    fn address_of(&self, host: &str, port: u16, tls: bool) -> Result<SocketAddr, UpstreamError> {
        if let Some(a) = self.via_egress(tls, host) {
            return Ok(**a.load());
        }
        if let Some(ip) = self.outbound.pinned(host) {
            return Ok(SocketAddr::new(ip, port));
        }
        resolve(host, port)
    }

    /// Resolves the host (and the egress proxy) again (DNS answers change); runs off the
    /// request path.
    pub fn refresh_address(&self) -> Result<(), UpstreamError> {
        if let (Some(e), Some(a)) = (self.outbound.egress(), &self.egress_addr) {
            let (h, p) = e.host_port();
            let addr = resolve(h, p)?;
            if **a.load() != addr {
                tracing::info!(egress = %e.authority(), %addr, "egress proxy address changed");
                a.store(Arc::new(addr));
            }
        }
        let addr = self.address_of(&self.host, self.port, self.tls)?;
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
        self.peer_at(**self.addr.load(), self.tls, &self.host, self.port)
    }

    /// The peer of a redirect target (resolved here: pinned, through the egress proxy, or DNS).
    pub async fn redirect_peer(
        &self,
        host: &str,
        port: u16,
        tls: bool,
    ) -> pingora::Result<Box<HttpPeer>> {
        let addr = match self.via_egress(tls, host) {
            Some(a) => **a.load(),
            None => match self.outbound.pinned(host) {
                Some(ip) => SocketAddr::new(ip, port),
                None => tokio::net::lookup_host((host, port))
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| {
                        pingora::Error::explain(
                            pingora::ErrorType::ConnectNoRoute,
                            "cannot resolve the redirect target",
                        )
                    })?,
            },
        };
        Ok(self.peer_at(addr, tls, host, port))
    }

    /// A peer with the upstream's timeouts and TLS policy at `addr` (the target's, or the
    /// egress proxy's when it carries `host`).
    pub fn peer_at(&self, addr: SocketAddr, tls: bool, host: &str, port: u16) -> Box<HttpPeer> {
        let mut peer = HttpPeer::new(addr, tls, host.to_owned());
        self.outbound.configure_peer(&mut peer);
        if let (Some(e), Some(_)) = (self.outbound.egress(), self.via_egress(tls, host)) {
            // One pool per target behind the one proxy address (the SNI alone would not
            // separate two ports of a host).
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (host, port).hash(&mut h);
            peer.group_key = h.finish();
            peer.options.custom_l4 = Some(e.connector(host, port, self.connect_timeout));
        }
        let o = &mut peer.options;
        o.connection_timeout = Some(self.connect_timeout);
        // TCP plus the TLS handshake.
        o.total_connection_timeout = Some(self.connect_timeout + self.connect_timeout / 2);
        // A read timeout bounds a silent upstream; writes are bounded by the kernel's buffers and
        // the read that follows, and each timeout costs a timer per I/O operation.
        o.read_timeout = Some(self.timeout);
        o.idle_timeout = Some(Duration::from_secs(55));
        Box::new(peer)
    }

    /// Whether the API host is reached at `addr` directly (not through the egress proxy): used
    /// to refuse a configuration that would forward to the proxy itself.
    pub fn direct_address(&self) -> Option<SocketAddr> {
        self.via_egress(self.tls, &self.host)
            .is_none()
            .then(|| **self.addr.load())
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
