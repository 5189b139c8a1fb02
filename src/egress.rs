//! Egress through an HTTP proxy (`[upstream] egress_proxy`, by default `HTTPS_PROXY`, with
//! `NO_PROXY`): every HTTPS connection the proxy makes — Pingora's to the API and to redirect
//! targets, reqwest's to the token and revocation endpoints and the API — opens a `CONNECT`
//! tunnel to its host and port, and TLS runs end to end inside it, verified by the one trust
//! policy ([`crate::tls::Outbound`]). A TLS-inspecting egress proxy re-signs with its corporate
//! CA: that CA goes into `[upstream] ca_file`, and then API and token calls trust it alike.
//!
//! Pingora 0.9's own CONNECT support (`HttpPeer::proxy`) reaches the proxy through a Unix
//! socket only, so Pingora's connections use a custom L4 connector ([`Tunnel`]) that speaks
//! CONNECT over TCP; reqwest speaks CONNECT itself, pointed by [`Egress::reqwest_proxy`] with
//! the same `NO_PROXY` rule ([`Egress::bypasses`]). Plain-HTTP upstreams (a local stand-in) are
//! reached directly: the egress is for TLS traffic, which is all Meraki serves.

use crate::secret::Secret;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use url::Url;

/// The longest `CONNECT` answer header read.
const MAX_CONNECT_RESPONSE: usize = 8 << 10;

/// An egress proxy and the hosts that bypass it.
#[derive(Clone, PartialEq, Eq)]
pub struct Egress {
    /// `http://host:port`, without credentials.
    pub url: Url,
    host: String,
    port: u16,
    /// `Proxy-Authorization` value, from credentials in `HTTPS_PROXY` (never from proxy.toml).
    auth: Option<Secret>,
    /// `NO_PROXY` entries, lowercase, without leading dots.
    no_proxy: Vec<String>,
}

impl fmt::Debug for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Egress")
            .field("url", &self.url.as_str())
            .field("credentials", &self.auth.is_some())
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

/// Why an egress proxy setting is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressConfigError {
    #[error("expected an http:// proxy URL such as \"http://proxy.corp:3128\"")]
    NotHttp,
    #[error("credentials may not sit in proxy.toml; put them in HTTPS_PROXY's environment value")]
    CredentialsInFile,
    #[error("expected http://host:port without a path")]
    HasPath,
}

impl Egress {
    /// Parses a proxy URL (`http://[user:pass@]host[:port]`, port 3128 by default when absent
    /// and not 80). `credentials_allowed` is false for proxy.toml, where secrets never sit.
    pub fn parse(
        value: &str,
        no_proxy: &[String],
        credentials_allowed: bool,
    ) -> Result<Egress, EgressConfigError> {
        let mut url = Url::parse(value.trim()).map_err(|_| EgressConfigError::NotHttp)?;
        if url.scheme() != "http" || url.host_str().is_none() {
            return Err(EgressConfigError::NotHttp);
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return Err(EgressConfigError::HasPath);
        }
        let auth = if url.username().is_empty() && url.password().is_none() {
            None
        } else if !credentials_allowed {
            return Err(EgressConfigError::CredentialsInFile);
        } else {
            use base64::Engine;
            let user = percent_encoding::percent_decode_str(url.username()).decode_utf8_lossy();
            let pass = percent_encoding::percent_decode_str(url.password().unwrap_or(""))
                .decode_utf8_lossy();
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            Some(Secret::new(format!("Basic {basic}")))
        };
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let host = url
            .host_str()
            .ok_or(EgressConfigError::NotHttp)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url.port().unwrap_or(80);
        Ok(Egress {
            url,
            host,
            port,
            auth,
            no_proxy: no_proxy
                .iter()
                .flat_map(|e| e.split(','))
                .map(|e| e.trim().trim_start_matches('.').to_ascii_lowercase())
                .filter(|e| !e.is_empty())
                .collect(),
        })
    }

    /// Whether connections to `host` go directly (`NO_PROXY`: `*`, a host, a domain suffix or
    /// an IP address; a `:port` suffix on an entry is ignored).
    pub fn bypasses(&self, host: &str) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        self.no_proxy.iter().any(|e| {
            let e = match e.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => e.as_str(),
            };
            e == "*" || host == e || host.strip_suffix(e).is_some_and(|rest| rest.ends_with('.'))
        })
    }

    /// Whether a connection to `scheme://host` goes through the egress proxy.
    pub fn carries(&self, tls: bool, host: &str) -> bool {
        tls && !self.bypasses(host)
    }

    /// The proxy's `host:port`.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The same proxy for reqwest: `CONNECT` for HTTPS URLs it carries, nothing else.
    pub fn reqwest_proxy(self: &Arc<Self>) -> reqwest::Proxy {
        let me = self.clone();
        let url = self.url.clone();
        let mut p = reqwest::Proxy::custom(move |target| {
            let host = target.host_str()?;
            me.carries(target.scheme() == "https", host)
                .then(|| url.clone())
        });
        if let Some(auth) = &self.auth {
            if let Ok(v) = http::HeaderValue::from_str(auth.expose()) {
                p = p.custom_http_auth(v);
            }
        }
        p
    }

    /// The proxy's host and port, to resolve.
    pub fn host_port(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    /// Opens a tunnel to `host:port` through the proxy at `proxy_addr` (its resolved address),
    /// within `timeout`.
    pub async fn tunnel(
        &self,
        proxy_addr: std::net::SocketAddr,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, EgressError> {
        tokio::time::timeout(timeout, self.tunnel_unbounded(proxy_addr, host, port))
            .await
            .map_err(|_| EgressError::Timeout(self.authority()))?
    }

    async fn tunnel_unbounded(
        &self,
        proxy_addr: std::net::SocketAddr,
        host: &str,
        port: u16,
    ) -> Result<TcpStream, EgressError> {
        let mut s =
            TcpStream::connect(proxy_addr)
                .await
                .map_err(|source| EgressError::Connect {
                    proxy: self.authority(),
                    source,
                })?;
        let _ = s.set_nodelay(true);
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut req = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: {}\r\n",
            crate::PRODUCT
        );
        if let Some(auth) = &self.auth {
            req.push_str("Proxy-Authorization: ");
            req.push_str(auth.expose());
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|source| EgressError::Connect {
                proxy: self.authority(),
                source,
            })?;
        // TLS speaks first, so nothing follows the proxy's answer until the ClientHello: the
        // header is read whole and nothing past it can be lost.
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 512];
        let end = loop {
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|source| EgressError::Connect {
                    proxy: self.authority(),
                    source,
                })?;
            if n == 0 {
                return Err(EgressError::Malformed(self.authority()));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_CONNECT_RESPONSE {
                return Err(EgressError::Malformed(self.authority()));
            }
        };
        if end != buf.len() {
            return Err(EgressError::Malformed(self.authority()));
        }
        let status = std::str::from_utf8(&buf[..end])
            .ok()
            .and_then(|h| h.lines().next())
            .and_then(|l| {
                let mut parts = l.split_whitespace();
                let version = parts.next()?;
                version.starts_with("HTTP/1.").then_some(())?;
                parts.next()?.parse::<u16>().ok()
            })
            .ok_or_else(|| EgressError::Malformed(self.authority()))?;
        if !(200..300).contains(&status) {
            return Err(EgressError::Refused {
                proxy: self.authority(),
                target,
                status,
            });
        }
        Ok(s)
    }

    /// Pingora's connector for `host:port` through this proxy.
    pub fn connector(self: &Arc<Self>, host: &str, port: u16, timeout: Duration) -> Arc<Tunnel> {
        Arc::new(Tunnel {
            egress: self.clone(),
            host: host.to_owned(),
            port,
            timeout,
        })
    }
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("cannot reach the egress proxy {proxy}")]
    Connect {
        proxy: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the egress proxy {proxy} refused CONNECT {target} with status {status}")]
    Refused {
        proxy: String,
        target: String,
        status: u16,
    },
    #[error("the egress proxy {0} sent an unreadable answer to CONNECT")]
    Malformed(String),
    #[error("the egress proxy {0} did not open the tunnel in time")]
    Timeout(String),
}

/// Pingora's L4 connector through the egress proxy, for one target host and port. It connects
/// to the peer's address, which is the egress proxy's: Pingora reuses a pooled connection only
/// when its socket's remote address is the peer's.
#[derive(Debug)]
pub struct Tunnel {
    egress: Arc<Egress>,
    host: String,
    port: u16,
    timeout: Duration,
}

#[async_trait::async_trait]
impl pingora::connectors::L4Connect for Tunnel {
    async fn connect(
        &self,
        addr: &pingora::protocols::l4::socket::SocketAddr,
    ) -> pingora::Result<pingora::protocols::l4::stream::Stream> {
        use pingora::ErrorType;
        let Some(proxy) = addr.as_inet().copied() else {
            return pingora::Error::e_explain(
                ErrorType::ConnectError,
                "the egress proxy needs a TCP address",
            );
        };
        match self
            .egress
            .tunnel(proxy, &self.host, self.port, self.timeout)
            .await
        {
            Ok(s) => Ok(s.into()),
            Err(e) => {
                let etype = match &e {
                    EgressError::Timeout(_) => ErrorType::ConnectTimedout,
                    EgressError::Connect { .. } => ErrorType::ConnectError,
                    EgressError::Refused { .. } | EgressError::Malformed(_) => {
                        ErrorType::ConnectProxyFailure
                    }
                };
                let context = crate::report::chain(&e);
                Err(pingora::Error::explain(etype, context))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_matches_hosts_domains_and_star() {
        let e = Egress::parse(
            "http://proxy.corp:3128",
            &["internal.corp, .lab.example".into(), "10.0.0.1:443".into()],
            false,
        )
        .unwrap();
        assert_eq!(e.authority(), "proxy.corp:3128");
        assert!(e.bypasses("internal.corp"));
        assert!(e.bypasses("a.internal.corp"));
        assert!(e.bypasses("x.lab.example"));
        assert!(e.bypasses("10.0.0.1"));
        assert!(!e.bypasses("notinternal.corp"));
        assert!(!e.bypasses("api.meraki.com"));
        assert!(e.carries(true, "api.meraki.com"));
        assert!(!e.carries(false, "api.meraki.com"));
        let all = Egress::parse("http://p:1", &["*".into()], false).unwrap();
        assert!(all.bypasses("api.meraki.com"));
    }

    #[test]
    fn credentials_only_from_the_environment_and_never_printed() {
        assert_eq!(
            Egress::parse("http://u:p@proxy:3128", &[], false),
            Err(EgressConfigError::CredentialsInFile)
        );
        let e = Egress::parse("http://user:s3cr3t-pass@proxy:3128", &[], true).unwrap();
        let shown = format!("{e:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("user"),
            "{shown}"
        );
        assert_eq!(
            Egress::parse("https://proxy:3128", &[], true),
            Err(EgressConfigError::NotHttp)
        );
        assert_eq!(
            Egress::parse("http://proxy:3128/x", &[], true),
            Err(EgressConfigError::HasPath)
        );
    }

    #[tokio::test]
    async fn a_tunnel_is_a_connect_exchange() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut answers = vec![];
            for status in ["200 Connection established", "403 Forbidden"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                answers.push(String::from_utf8_lossy(&buf[..n]).to_string());
                s.write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                if status.starts_with("200") {
                    s.write_all(b"").await.unwrap();
                }
            }
            answers
        });
        let e = Egress::parse(&format!("http://127.0.0.1:{}", addr.port()), &[], false).unwrap();
        e.tunnel(addr, "api.meraki.com", 443, Duration::from_secs(5))
            .await
            .unwrap();
        let refused = e
            .tunnel(addr, "api.meraki.com", 443, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(refused, EgressError::Refused { status: 403, .. }));
        let seen = server.await.unwrap();
        assert!(seen[0]
            .starts_with("CONNECT api.meraki.com:443 HTTP/1.1\r\nHost: api.meraki.com:443\r\n"));
    }
}
