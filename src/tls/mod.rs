//! TLS both ways.
//!
//! **Outbound** ([`outbound`]): one trust policy for every connection the proxy makes — forwarded
//! API requests and the redirects it follows (Pingora), token and revocation calls, its own
//! lookups and the consent flow's organization list (reqwest, every client built by
//! [`Outbound::http_client`]): the platform's roots plus `[upstream] ca_file`, host names
//! verified against each host's own SNI, through the egress proxy when one is configured
//! ([`crate::egress`]). A failed handshake is classified ([`failure`], [`TlsFailure`]) so the
//! log, the audit record and the client's 502 name the cause instead of "error sending request".
//!
//! **Inbound** ([`inbound`]): the listener's certificate ([`ServerCert`]) is part of the validated
//! configuration and is picked per handshake from the live snapshot ([`CertResolver`]), so a
//! reload that re-reads the files swaps it without a restart and without failing a connection.
//! Mutual TLS ([`mtls`]: [`ClientCa`], [`ClientVerifier`]): a presented client certificate must
//! chain to `tls_client_ca_file` (and be in its validity period) or the handshake is refused and
//! audited; its subject and DNS names ([`PeerCert`]) are read once per connection, after the
//! handshake, for [`crate::identity`] to map to a client.
//!
//! [`pem`] reads certificate and key files (size-capped) for all of them. This module reads no
//! configuration: [`crate::config`] keeps what is loaded here and depends on it, never the
//! reverse.

pub mod failure;
pub mod inbound;
pub mod mtls;
pub mod outbound;
pub mod pem;

pub use failure::TlsFailure;
pub use inbound::{CertResolver, ServerCert};
pub use mtls::{
    peer_cert, ClientCa, ClientVerifier, HandshakeCallbacks, PeerCert, RefusedClientCert, Subject,
};
pub use outbound::{CaBundle, Outbound};
pub use pem::{fingerprint, load_certs, TlsError};

use rustls::crypto::CryptoProvider;
use std::sync::{Arc, OnceLock};

/// The crypto provider of every TLS configuration the proxy builds (the one Pingora's rustls
/// backend installs).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}
