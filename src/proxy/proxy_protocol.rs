//! PROXY protocol v1 and v2 (HAProxy's), for `[server] proxy_protocol = true` behind an L4 load
//! balancer: each connection from a `[server] trusted_proxies` peer starts with a header naming
//! the client's address, which then stands for the connection's peer (`crate::source` starts from
//! it, the audit record's `source` shows it, per-peer connection limits count it).
//!
//! Only the header's own bytes are read: the request (or, on the TLS listener, the handshake)
//! after it stays in the stream. The plain listener reads it in the connection gate
//! (`connections.rs`), the TLS listener before the handshake ([`PreTls`], Pingora's pre-TLS
//! callback). A missing, malformed, slow or untrusted header closes the connection without an
//! answer (there is no HTTP yet to answer in): logged with the peer and the reason only, and
//! counted in `meraki_proxy_connections_refused_total{limit="proxy_protocol"}`.

use crate::metrics::Metrics;
use crate::source::Cidrs;
use async_trait::async_trait;
use pingora::protocols::{GetSocketDigest, SocketDigest, UniqueID};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header's longest form, CRLF included.
const V1_MAX: usize = 107;
/// The longest v2 header taken (address block and TLVs); load balancers send far less.
const V2_MAX_PAYLOAD: usize = 1024;

/// Why a connection's PROXY header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The connection did not start with a PROXY header.
    Missing,
    /// It started like one but did not parse.
    Malformed,
    /// The peer is not one of `trusted_proxies`.
    Untrusted,
    /// The header did not arrive within `header_timeout_secs`.
    Timeout,
    /// The connection closed or failed first.
    Closed,
}

impl Refused {
    /// For the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Missing => "missing",
            Refused::Malformed => "malformed",
            Refused::Untrusted => "untrusted",
            Refused::Timeout => "timeout",
            Refused::Closed => "closed",
        }
    }
}

/// Reads one PROXY header from `r` and nothing after it. `Ok(Some(source))`: the client's
/// address; `Ok(None)`: a header that names none (v1 `UNKNOWN`, v2 `LOCAL` or a non-IP
/// family: health checks), so the peer stands.
pub async fn read_header<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<Option<SocketAddr>, Refused> {
    // A v1 header is at least 15 bytes ("PROXY UNKNOWN\r\n"), a v2 one at least 16.
    let mut head = [0u8; 12];
    read_exact(r, &mut head).await?;
    if head == V2_SIGNATURE {
        let mut fixed = [0u8; 4];
        read_exact(r, &mut fixed).await?;
        let len = u16::from_be_bytes([fixed[2], fixed[3]]) as usize;
        if len > V2_MAX_PAYLOAD {
            return Err(Refused::Malformed);
        }
        let mut all = Vec::with_capacity(16 + len);
        all.extend_from_slice(&head);
        all.extend_from_slice(&fixed);
        all.resize(16 + len, 0);
        read_exact(r, &mut all[16..]).await?;
        return v2_source(&all);
    }
    if !head.starts_with(b"PROXY ") {
        return Err(Refused::Missing);
    }
    let mut line = Vec::with_capacity(V1_MAX);
    line.extend_from_slice(&head);
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(Refused::Malformed);
        }
        let mut b = [0u8; 1];
        read_exact(r, &mut b).await?;
        line.push(b[0]);
    }
    v1_source(&line)
}

async fn read_exact<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), Refused> {
    r.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|_| Refused::Closed)
}

/// The source of a whole v1 line.
fn v1_source(line: &[u8]) -> Result<Option<SocketAddr>, Refused> {
    let text = std::str::from_utf8(line).map_err(|_| Refused::Malformed)?;
    let header = ppp::v1::Header::try_from(text).map_err(|_| Refused::Malformed)?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Unknown => None,
        ppp::v1::Addresses::Tcp4(a) => {
            Some(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        ppp::v1::Addresses::Tcp6(a) => {
            Some(SocketAddr::new(a.source_address.into(), a.source_port))
        }
    })
}

/// The source of a whole v2 header.
fn v2_source(bytes: &[u8]) -> Result<Option<SocketAddr>, Refused> {
    let header = ppp::v2::Header::try_from(bytes).map_err(|_| Refused::Malformed)?;
    if header.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            Some(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        ppp::v2::Addresses::IPv6(a) => {
            Some(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    })
}

/// What a connection from `peer` must start with, and how long it may take.
pub struct Expect<'a> {
    pub trusted: &'a Cidrs,
    pub timeout: Duration,
}

/// Reads the header of a connection from `peer` on a stream `io`, and makes its source the
/// stream's peer address. Refusals are logged and counted here; the caller closes.
pub async fn accept<S>(
    io: &mut S,
    peer: Option<SocketAddr>,
    expect: Expect<'_>,
    metrics: &Metrics,
) -> Result<(), Refused>
where
    S: AsyncRead + GetSocketDigest + UniqueID + Unpin + ?Sized,
{
    let result = match peer {
        Some(p) if expect.trusted.contains(crate::source::canonical(p.ip())) => {
            match tokio::time::timeout(expect.timeout, read_header(io)).await {
                Ok(r) => r,
                Err(_) => Err(Refused::Timeout),
            }
        }
        _ => Err(Refused::Untrusted),
    };
    match result {
        Ok(Some(source)) => {
            let digest = SocketDigest::from_raw_fd(io.id());
            let _ = digest
                .peer_addr
                .set(Some(pingora::protocols::l4::socket::SocketAddr::Inet(
                    canonical_socket(source),
                )));
            io.set_socket_digest(digest);
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(why) => {
            metrics.connection_refused("proxy_protocol");
            match why {
                Refused::Closed => {
                    tracing::debug!(peer = ?peer, reason = why.as_str(), "PROXY protocol header refused; connection closed")
                }
                _ => {
                    tracing::warn!(peer = ?peer, reason = why.as_str(), "PROXY protocol header refused; connection closed")
                }
            }
            Err(why)
        }
    }
}

fn canonical_socket(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(crate::source::canonical(a.ip()), a.port())
}

/// The peer address of a stream, as an IP socket address.
pub fn peer_of<S: GetSocketDigest + ?Sized>(io: &S) -> Option<SocketAddr> {
    io.get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied())
}

/// The PROXY header on the TLS listener, read before the handshake. What it expects is read
/// from the live configuration per connection (a reload applies to the next one).
pub struct PreTls {
    pub expect: Box<dyn Fn() -> Option<(Cidrs, Duration)> + Send + Sync>,
    pub metrics: Arc<Metrics>,
}

#[async_trait]
impl pingora::listeners::PreTlsProcess for PreTls {
    async fn process(
        &self,
        stream: &mut pingora::protocols::l4::stream::Stream,
    ) -> pingora::Result<()> {
        let Some((trusted, timeout)) = (self.expect)() else {
            return Ok(());
        };
        let peer = peer_of(stream);
        accept(
            stream,
            peer,
            Expect {
                trusted: &trusted,
                timeout,
            },
            &self.metrics,
        )
        .await
        .map_err(|why| {
            pingora::Error::explain(
                pingora::ErrorType::HandshakeError,
                format!("PROXY protocol header {}", why.as_str()),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    async fn parse(bytes: &[u8]) -> (Result<Option<SocketAddr>, Refused>, Vec<u8>) {
        let mut r = bytes;
        let got = read_header(&mut r).await;
        (got, r.to_vec())
    }

    fn v2(source: SocketAddr, dest: SocketAddr) -> Vec<u8> {
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (source, dest),
        )
        .build()
        .unwrap()
    }

    #[tokio::test]
    async fn v1_and_v2_headers_give_the_source_and_leave_the_rest() {
        let (got, rest) =
            parse(b"PROXY TCP4 198.51.100.7 10.0.0.1 40001 8080\r\nGET / HTTP/1.1\r\n").await;
        assert_eq!(got, Ok(Some("198.51.100.7:40001".parse().unwrap())));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let (got, _) = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 8080\r\n").await;
        assert_eq!(got, Ok(Some("[2001:db8::7]:40001".parse().unwrap())));
        let (got, rest) = parse(b"PROXY UNKNOWN\r\nX").await;
        assert_eq!((got, rest), (Ok(None), b"X".to_vec()));

        let mut bytes = v2(
            "198.51.100.8:5000".parse().unwrap(),
            "10.0.0.1:8080".parse().unwrap(),
        );
        bytes.extend_from_slice(b"GET");
        let (got, rest) = parse(&bytes).await;
        assert_eq!(got, Ok(Some("198.51.100.8:5000".parse().unwrap())));
        assert_eq!(rest, b"GET");
        let bytes = v2(
            "[2001:db8::8]:5000".parse().unwrap(),
            "[2001:db8::1]:8080".parse().unwrap(),
        );
        assert_eq!(
            parse(&bytes).await.0.unwrap().unwrap().ip(),
            ip("2001:db8::8")
        );
        let local = ppp::v2::Builder::new(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(parse(&local).await.0, Ok(None));
    }

    #[tokio::test]
    async fn anything_else_is_refused_without_reading_past_its_bound() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.0,
            Err(Refused::Missing)
        );
        assert_eq!(
            parse(b"PROXY TCP4 nonsense\r\n").await.0,
            Err(Refused::Malformed)
        );
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n").await.0,
            Err(Refused::Closed)
        );
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        let (got, rest) = parse(long.as_bytes()).await;
        assert_eq!(got, Err(Refused::Malformed));
        assert!(rest.len() > 50, "stopped at the v1 bound");
        let mut bad = V2_SIGNATURE.to_vec();
        bad.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&bad).await.0, Err(Refused::Malformed));
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 0x02, 1, 2]);
        assert_eq!(parse(&short).await.0, Err(Refused::Malformed));
        assert_eq!(parse(b"PROXY").await.0, Err(Refused::Closed));
    }
}
