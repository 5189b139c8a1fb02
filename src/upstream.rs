//! Where forwarded requests go: the Meraki API base (or a stand-in) as a Pingora peer, its
//! address kept fresh off the request path.

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
    connect_timeout: Duration,
    timeout: Duration,
}

impl Upstream {
    /// Parses the base URL and resolves its host once. `connect_timeout` bounds the TCP (and
    /// TLS) connection, `timeout` each wait for the upstream's answer.
    pub fn new(
        api_base: &Url,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, UpstreamError> {
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
            connect_timeout,
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
        o.connection_timeout = Some(self.connect_timeout);
        // TCP plus the TLS handshake.
        o.total_connection_timeout = Some(self.connect_timeout + self.connect_timeout / 2);
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
