//! A TCP fault injector between the proxy and the Meraki stand-in (toxiproxy's idea, in a page):
//! it relays bytes both ways and, per request, may reset the connection before the request
//! reaches the stand-in, reset it after the stand-in answered (the request was applied, the
//! answer is lost), or hold the answer back longer than the proxy's upstream timeout.
//!
//! It sees bytes, not HTTP: a request starts with the first bytes the proxy sends after the
//! previous answer began (Pingora does not pipeline upstream, so requests and answers
//! alternate on a connection). Like the stand-in, it runs on a runtime and thread of its own.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What happens to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// The connection is reset before the request reaches the stand-in.
    ResetBefore,
    /// The request reaches the stand-in (which applies it); the connection is reset instead of
    /// relaying the answer.
    ResetAfter,
    /// The answer is held back this long.
    Slow(Duration),
}

/// Counts of the faults injected, in the order of [`Fault`]'s variants.
#[derive(Debug, Default)]
pub struct Injected {
    pub pass: AtomicUsize,
    pub reset_before: AtomicUsize,
    pub reset_after: AtomicUsize,
    pub slow: AtomicUsize,
}

struct Shared {
    upstream: SocketAddr,
    /// While false, every request passes.
    on: AtomicBool,
    /// Per mille of requests given each fault: reset before, reset after, slow.
    rates: [u64; 3],
    slow: Duration,
    /// xorshift state: a reproducible sequence of decisions.
    rng: AtomicU64,
    injected: Injected,
}

impl Shared {
    fn decide(&self) -> Fault {
        if !self.on.load(Ordering::SeqCst) {
            self.injected.pass.fetch_add(1, Ordering::Relaxed);
            return Fault::Pass;
        }
        let mut x = self.rng.load(Ordering::Relaxed);
        loop {
            let mut n = x;
            n ^= n << 13;
            n ^= n >> 7;
            n ^= n << 17;
            match self
                .rng
                .compare_exchange(x, n, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    x = n;
                    break;
                }
                Err(cur) => x = cur,
            }
        }
        let roll = x % 1000;
        let [before, after, slow] = self.rates;
        let i = &self.injected;
        if roll < before {
            i.reset_before.fetch_add(1, Ordering::Relaxed);
            Fault::ResetBefore
        } else if roll < before + after {
            i.reset_after.fetch_add(1, Ordering::Relaxed);
            Fault::ResetAfter
        } else if roll < before + after + slow {
            i.slow.fetch_add(1, Ordering::Relaxed);
            Fault::Slow(self.slow)
        } else {
            i.pass.fetch_add(1, Ordering::Relaxed);
            Fault::Pass
        }
    }
}

/// A running fault injector; stops with the test process.
pub struct Chaos {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Chaos {
    /// Relays 127.0.0.1:ephemeral → `upstream`; of the requests made while [`Chaos::set_on`],
    /// `rates` per mille are reset before, reset after, and slowed by `slow`.
    pub fn start(upstream: SocketAddr, rates: [u64; 3], slow: Duration, seed: u64) -> Chaos {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            on: AtomicBool::new(false),
            rates,
            slow,
            rng: AtomicU64::new(seed | 1),
            injected: Injected::default(),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("chaos".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener).unwrap();
                    while let Ok((conn, _)) = listener.accept().await {
                        tokio::spawn(relay(conn, s.clone()));
                    }
                });
            })
            .unwrap();
        Chaos { addr, shared }
    }

    /// Turns fault injection on or off (off: a plain relay).
    pub fn set_on(&self, on: bool) {
        self.shared.on.store(on, Ordering::SeqCst);
    }

    /// The faults injected so far.
    pub fn injected(&self) -> &Injected {
        &self.shared.injected
    }
}

/// Resets (RST, not FIN) a connection.
// A zero linger does not block on drop (the deprecation is about non-zero ones): the kernel
// discards the buffers and sends RST at once.
#[allow(deprecated)]
fn reset(conn: TcpStream) {
    let _ = conn.set_linger(Some(Duration::ZERO));
    drop(conn);
}

async fn relay(mut client: TcpStream, shared: Arc<Shared>) {
    let Ok(mut upstream) = TcpStream::connect(shared.upstream).await else {
        reset(client);
        return;
    };
    let mut from_client = vec![0u8; 64 << 10];
    let mut from_upstream = vec![0u8; 64 << 10];
    // The fault of the request in progress; None between an answer and the next request.
    let mut current: Option<Fault> = None;
    // Whether the answer to the current request has begun.
    let mut answering = false;
    loop {
        tokio::select! {
            r = client.read(&mut from_client) => {
                let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                if current.is_none() || answering {
                    current = Some(shared.decide());
                    answering = false;
                }
                if current == Some(Fault::ResetBefore) {
                    reset(client);
                    return;
                }
                if upstream.write_all(&from_client[..n]).await.is_err() {
                    reset(client);
                    return;
                }
            }
            r = upstream.read(&mut from_upstream) => {
                let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                if !answering {
                    answering = true;
                    match current {
                        Some(Fault::ResetAfter) => {
                            reset(client);
                            return;
                        }
                        Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
                        _ => {}
                    }
                }
                if client.write_all(&from_upstream[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
