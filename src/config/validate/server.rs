//! `[server]`: the listeners, threads and timeouts, the listener's TLS, the origins clients
//! know the proxy by, the admin token and what happens to unknown endpoints.

use super::{secs, Validator};
use crate::config::{file, ClientLimits, ConfigError, InboundTls, PublicOrigin, UnknownEndpoints};
use crate::secret::Secret;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// `[server]`'s listeners, threads and timeouts.
pub(super) struct Server {
    pub(super) listen: SocketAddr,
    pub(super) admin_listen: Option<SocketAddr>,
    pub(super) threads: usize,
    pub(super) upstream_timeout: Duration,
    pub(super) upstream_connect_timeout: Duration,
    pub(super) shutdown_grace: Duration,
}

/// `[server]`'s admin token and request policy.
pub(super) struct Admin {
    pub(super) admin_token: Option<Secret>,
    pub(super) reauth_fails_readiness: bool,
    pub(super) unknown_endpoints: UnknownEndpoints,
}

impl Validator<'_> {
    /// `[server] listen`, `admin_listen`, `threads` and the timeouts.
    pub(super) fn server(&self, server: &file::Server) -> Result<Server, ConfigError> {
        let listen = self.addr("server.listen", &server.listen)?;
        let admin_listen = server
            .admin_listen
            .as_deref()
            .map(|a| self.addr("server.admin_listen", a))
            .transpose()?;
        let threads = server.threads.unwrap_or(2);
        if !(1..=256).contains(&threads) {
            return Err(self.invalid(
                "server.threads",
                format!("expected 1 to 256, got {threads}"),
            ));
        }
        let upstream_timeout = secs(server.upstream_timeout_secs.unwrap_or(60));
        if upstream_timeout.is_zero() {
            return Err(self.invalid("server.upstream_timeout_secs", "expected at least 1"));
        }
        let upstream_connect_timeout = secs(server.upstream_connect_timeout_secs.unwrap_or(10));
        if upstream_connect_timeout.is_zero() || upstream_connect_timeout > Duration::from_secs(120)
        {
            return Err(self.invalid("server.upstream_connect_timeout_secs", "expected 1 to 120"));
        }
        let shutdown_grace = secs(server.shutdown_grace_secs.unwrap_or(30));
        if shutdown_grace > Duration::from_secs(3600) {
            return Err(self.invalid(
                "server.shutdown_grace_secs",
                "expected 0 to 3600: how long in-flight requests may take to finish on SIGTERM",
            ));
        }
        Ok(Server {
            listen,
            admin_listen,
            threads,
            upstream_timeout,
            upstream_connect_timeout,
            shutdown_grace,
        })
    }

    /// `[server]`'s client timeouts (`header_timeout_secs`, `body_timeout_secs`,
    /// `idle_timeout_secs`, `request_timeout_secs`) and connection limits (`max_connections`,
    /// `max_connections_per_peer`).
    pub(super) fn client_limits(&self, server: &file::Server) -> Result<ClientLimits, ConfigError> {
        let d = ClientLimits::default();
        let timeout =
            |key: &str, raw: Option<u64>, default: Duration, max: u64, what: &str| match raw {
                None => Ok(default),
                Some(s) if (1..=max).contains(&s) => Ok(secs(s)),
                Some(s) => Err(self.invalid(
                    key,
                    format!("expected 1 to {max} (seconds: {what}), got {s}"),
                )),
            };
        let header_timeout = timeout(
            "server.header_timeout_secs",
            server.header_timeout_secs,
            d.header_timeout,
            300,
            "how long a whole request header may take to arrive",
        )?;
        let body_timeout = timeout(
            "server.body_timeout_secs",
            server.body_timeout_secs,
            d.body_timeout,
            3600,
            "the longest a request body or a response may go without progress",
        )?;
        let idle_timeout = timeout(
            "server.idle_timeout_secs",
            server.idle_timeout_secs,
            d.idle_timeout,
            3600,
            "how long a kept-alive connection may wait for its next request",
        )?;
        let request_timeout = timeout(
            "server.request_timeout_secs",
            server.request_timeout_secs,
            d.request_timeout,
            86_400,
            "how long one request may take, header to end of response",
        )?;
        let max_connections = server.max_connections.unwrap_or(d.max_connections);
        if !(1..=1_000_000).contains(&max_connections) {
            return Err(self.invalid(
                "server.max_connections",
                format!("expected 1 to 1000000 connections, got {max_connections}"),
            ));
        }
        let max_connections_per_peer = server
            .max_connections_per_peer
            .unwrap_or(d.max_connections_per_peer.min(max_connections));
        if !(1..=max_connections).contains(&max_connections_per_peer) {
            return Err(self.invalid(
                "server.max_connections_per_peer",
                format!(
                    "expected 1 to server.max_connections ({max_connections}), got {max_connections_per_peer}"
                ),
            ));
        }
        Ok(ClientLimits {
            header_timeout,
            body_timeout,
            idle_timeout,
            request_timeout,
            max_connections,
            max_connections_per_peer,
        })
    }

    /// `[server] admin_token_env` (required when the admin listener is not on loopback),
    /// `reauth_fails_readiness` and `unknown_endpoints`.
    pub(super) fn admin(
        &self,
        server: &file::Server,
        admin_listen: Option<SocketAddr>,
    ) -> Result<Admin, ConfigError> {
        let admin_token = match &server.admin_token_env {
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
        let unknown_endpoints = match server.unknown_endpoints.as_deref() {
            None | Some("deny") => UnknownEndpoints::Deny,
            Some("allow") => UnknownEndpoints::Allow,
            Some(other) => {
                return Err(self.invalid(
                    "server.unknown_endpoints",
                    format!("expected \"deny\" or \"allow\", got {other:?}"),
                ))
            }
        };
        Ok(Admin {
            admin_token,
            reauth_fails_readiness: server.reauth_fails_readiness.unwrap_or(true),
            unknown_endpoints,
        })
    }

    /// `[server] tls_cert_file`, `tls_key_file`, `tls_client_ca_file`, `tls_client_auth`.
    pub(super) fn inbound_tls(
        &self,
        server: &file::Server,
    ) -> Result<Option<InboundTls>, ConfigError> {
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
            let key = if crate::tls::inbound::blames_key(&e, &key_file) {
                "server.tls_key_file"
            } else {
                "server.tls_cert_file"
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
    pub(super) fn public_origins(
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
}
