//! Sockets bound before the server starts, handed to Pingora by descriptor.

use super::StartError;
use async_trait::async_trait;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service;
use std::net::TcpListener;
use std::os::fd::{IntoRawFd, RawFd};

/// A listening service whose sockets were bound before the server started: their descriptors
/// go into Pingora's listener table under the service's addresses, where Pingora takes them
/// over (the mechanism of its zero-downtime upgrades) instead of binding again.
pub(super) struct Prebound<S> {
    pub(super) inner: S,
    pub(super) fds: Vec<(String, RawFd)>,
}

impl<S> Prebound<S> {
    pub(super) fn new(inner: S, listeners: Vec<(String, TcpListener)>) -> Result<Self, StartError> {
        let mut fds = Vec::with_capacity(listeners.len());
        for (addr, l) in listeners {
            // Pingora's accept loop runs on tokio, which needs non-blocking sockets.
            l.set_nonblocking(true)
                .map_err(|source| StartError::Listen {
                    addr: addr.clone(),
                    source,
                })?;
            fds.push((addr, l.into_raw_fd()));
        }
        Ok(Prebound { inner, fds })
    }
}

#[async_trait]
impl<S: Service> Service for Prebound<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        match &fds {
            Some(table) => {
                let mut table = table.lock();
                for (addr, fd) in self.fds.drain(..) {
                    table.add(addr, fd);
                }
            }
            None => tracing::error!("no listener table: the service binds its addresses again"),
        }
        self.inner
            .start_service(fds, shutdown, listeners_per_fd)
            .await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}
