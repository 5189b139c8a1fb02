//! The proxy listener's connections: counted in all and per peer address, and held to
//! `[server] max_connections` (beyond it a new connection gets a 503 and is closed at once) and
//! `max_connections_per_peer` (beyond it the connection is served only to answer its requests
//! 429). With `[server] proxy_protocol` on the plain listener, the gate reads each connection's
//! PROXY header first (`proxy_protocol.rs`; meanwhile the connection counts against
//! `max_connections` only, and its peer is then the header's source). [`Gate`] wraps Pingora's HTTP application and sees each connection begin and end;
//! the hooks learn about the connection they serve through a task-local, as Pingora serves an
//! HTTP/1 connection's requests one after another in the task that accepted it.

use super::respond::refusal_response;
use crate::audit::RequestId;
use crate::config::ClientLimits;
use crate::metrics::Metrics;
use crate::refusal::Refusal;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use std::cell::Cell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The audit reason and refusal of a request on a connection over a limit.
pub const TOO_MANY_CONNECTIONS: &str = "too_many_connections";

tokio::task_local! {
    static CONNECTION: Connection;
}

/// What the hooks of a request know of its connection.
struct Connection {
    over_peer_limit: bool,
    requests: Cell<u32>,
}

/// Whether the current connection is one more than its peer address may hold: its requests are
/// refused.
pub fn over_peer_limit() -> bool {
    CONNECTION.try_with(|c| c.over_peer_limit).unwrap_or(false)
}

/// Requests already begun on the current connection (0 on a new one, or outside a [`Gate`]).
pub fn requests_begun() -> u32 {
    CONNECTION.try_with(|c| c.requests.get()).unwrap_or(0)
}

/// Counts a request begun on the current connection.
pub fn begin_request() {
    let _ = CONNECTION.try_with(|c| c.requests.set(c.requests.get().saturating_add(1)));
}

/// The refusal of a request on a connection over its peer's limit.
pub fn peer_refusal(limit: usize) -> Refusal {
    Refusal {
        retry_after: Some(1),
        ..Refusal::new(
            429,
            TOO_MANY_CONNECTIONS,
            format!(
                "this address has more than {limit} connections open to the proxy; close some and retry"
            ),
        )
    }
}

/// The open connections, in all and per peer address.
#[derive(Default)]
pub struct Counts {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    open: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub struct ListenerFull;

/// An admitted connection; it stops counting when dropped.
pub struct Ticket {
    counts: Arc<Counts>,
    peer: Option<IpAddr>,
    /// More connections from this peer than its limit, this one included.
    pub over_peer_limit: bool,
}

impl Counts {
    /// Counts a new connection from `peer`, or refuses it when the listener is full.
    pub fn admit(
        self: &Arc<Self>,
        peer: Option<IpAddr>,
        limits: &ClientLimits,
    ) -> Result<Ticket, ListenerFull> {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if t.open >= limits.max_connections {
            return Err(ListenerFull);
        }
        t.open += 1;
        let over_peer_limit = match peer {
            Some(ip) => {
                let n = t.per_peer.entry(ip).or_insert(0);
                *n += 1;
                *n > limits.max_connections_per_peer
            }
            None => false,
        };
        Ok(Ticket {
            counts: self.clone(),
            peer,
            over_peer_limit,
        })
    }

    /// Counts `ticket`'s connection as `peer`'s (once its PROXY header named the client).
    pub fn attribute(&self, ticket: &mut Ticket, peer: IpAddr, limits: &ClientLimits) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.per_peer.entry(peer).or_insert(0);
        *n += 1;
        ticket.over_peer_limit = *n > limits.max_connections_per_peer;
        ticket.peer = Some(peer);
    }

    /// Connections open now: in all, and from `peer`.
    #[cfg(test)]
    fn open(&self, peer: IpAddr) -> (usize, usize) {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        (t.open, t.per_peer.get(&peer).copied().unwrap_or(0))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut t = self.counts.table.lock().unwrap_or_else(|p| p.into_inner());
        t.open = t.open.saturating_sub(1);
        if let Some(ip) = self.peer {
            if let Some(n) = t.per_peer.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    t.per_peer.remove(&ip);
                }
            }
        }
    }
}

/// Pingora's HTTP application behind the connection limits.
pub struct Gate<A> {
    app: Arc<A>,
    counts: Arc<Counts>,
    /// The limits in force (read per connection: a reload applies to the next one).
    limits: Box<dyn Fn() -> ClientLimits + Send + Sync>,
    metrics: Arc<Metrics>,
    /// `[server] proxy_protocol` on the plain listener: the trusted proxies when each
    /// connection must start with a PROXY header (read per connection).
    proxy_protocol: Option<ProxyProtocolRule>,
}

/// When connections start with a PROXY header: the trusted proxies, or `None` when not.
type ProxyProtocolRule = Box<dyn Fn() -> Option<crate::source::Cidrs> + Send + Sync>;

impl<A> Gate<A> {
    /// `app` behind the limits `limits` returns.
    pub fn new(
        app: A,
        limits: impl Fn() -> ClientLimits + Send + Sync + 'static,
        metrics: Arc<Metrics>,
    ) -> Self {
        Gate {
            app: Arc::new(app),
            counts: Arc::new(Counts::default()),
            limits: Box::new(limits),
            metrics,
            proxy_protocol: None,
        }
    }

    /// Reads a PROXY protocol header at the start of each connection while `rule` names the
    /// trusted proxies (the plain listener; the TLS listener reads it before the handshake).
    pub fn with_proxy_protocol(
        mut self,
        rule: impl Fn() -> Option<crate::source::Cidrs> + Send + Sync + 'static,
    ) -> Self {
        self.proxy_protocol = Some(Box::new(rule));
        self
    }
}

/// Counts a connection in `meraki_proxy_connections_open` while it lives (however the task ends).
struct Held(prometheus::IntGauge);

impl Held {
    fn new(gauge: &prometheus::IntGauge) -> Held {
        gauge.inc();
        Held(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Gate<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let tcp_peer = super::proxy_protocol::peer_of(&*stream);
        let limits = (self.limits)();
        let trusted = self.proxy_protocol.as_ref().and_then(|rule| rule());
        // With PROXY protocol the peer is known once the header is read; meanwhile the
        // connection counts against max_connections only.
        let counted_peer = match trusted {
            Some(_) => None,
            None => tcp_peer.map(|a| a.ip()),
        };
        let Ok(mut ticket) = self.counts.admit(counted_peer, &limits) else {
            self.metrics.connection_refused("listener");
            refuse_full(&mut stream, limits.max_connections).await;
            return None;
        };
        // Open from here, a PROXY header still to come included, until this returns.
        let _open = Held::new(self.metrics.connections_open());
        if let Some(trusted) = trusted {
            let expect = super::proxy_protocol::Expect {
                trusted: &trusted,
                timeout: limits.header_timeout,
            };
            if super::proxy_protocol::accept(&mut *stream, tcp_peer, expect, &self.metrics)
                .await
                .is_err()
            {
                return None;
            }
            if let Some(peer) = super::proxy_protocol::peer_of(&*stream) {
                self.counts.attribute(&mut ticket, peer.ip(), &limits);
            }
        }
        if ticket.over_peer_limit {
            self.metrics.connection_refused("peer");
        }
        let connection = Connection {
            over_peer_limit: ticket.over_peer_limit,
            requests: Cell::new(0),
        };
        let reused = CONNECTION
            .scope(connection, self.app.process_new(stream, shutdown))
            .await;
        drop(ticket);
        reused
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// Answers a connection the full listener cannot take: a 503 written at once (the request is
/// not read: reading it is what the limit saves), then closed.
async fn refuse_full(stream: &mut Stream, limit: usize) {
    let r = Refusal {
        retry_after: Some(1),
        ..Refusal::new(
            503,
            TOO_MANY_CONNECTIONS,
            format!("the proxy holds its limit of {limit} connections; retry shortly"),
        )
    };
    let Ok(bytes) = wire(RequestId::new(), &r) else {
        return;
    };
    let write = async {
        stream.write_all(&bytes).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(Duration::from_secs(1), write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        tracing::debug!(error = %e, "could not answer a connection over server.max_connections");
    }
}

/// A refusal as HTTP/1.1 bytes, `Connection: close`.
fn wire(id: RequestId, r: &Refusal) -> pingora::Result<Vec<u8>> {
    let (resp, body) = refusal_response(id, r)?;
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        resp.status.as_u16(),
        resp.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in resp.headers.iter() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out.extend_from_slice(&body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(all: usize, per_peer: usize) -> ClientLimits {
        ClientLimits {
            max_connections: all,
            max_connections_per_peer: per_peer,
            ..ClientLimits::default()
        }
    }

    #[test]
    fn a_peer_over_its_limit_is_marked_and_the_listener_refuses_when_full() {
        let counts = Arc::new(Counts::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let l = limits(4, 2);
        let a1 = counts.admit(Some(a), &l).unwrap();
        let a2 = counts.admit(Some(a), &l).unwrap();
        let a3 = counts.admit(Some(a), &l).unwrap();
        assert!(!a1.over_peer_limit && !a2.over_peer_limit && a3.over_peer_limit);
        let b1 = counts.admit(Some(b), &l).unwrap();
        assert!(!b1.over_peer_limit, "another address has its own count");
        assert_eq!(counts.admit(Some(b), &l).err(), Some(ListenerFull));
        assert_eq!(counts.open(a), (4, 3));
        drop(a3);
        drop(a1);
        assert_eq!(counts.open(a), (2, 1));
        let a4 = counts.admit(Some(a), &l).unwrap();
        assert!(!a4.over_peer_limit, "room again once connections close");
        drop((a2, a4, b1));
        assert_eq!(counts.open(a), (0, 0));
        assert!(counts.table.lock().unwrap().per_peer.is_empty());
    }

    #[test]
    fn the_listener_refusal_is_meraki_shaped_http() {
        let bytes = wire(RequestId(1), &peer_refusal(3)).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{text}"
        );
        assert!(
            text.contains("x-proxy-request-id: 0000000000000001\r\n"),
            "{text}"
        );
        assert!(text.contains("retry-after: 1\r\n"), "{text}");
        assert!(
            text.contains("connection: close\r\n\r\n{\"errors\":["),
            "{text}"
        );
    }
}
