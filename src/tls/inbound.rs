//! The listener's certificate: loaded with the configuration, picked per handshake from the
//! live configuration, so a reload that re-reads the files swaps it without a restart.

use super::mtls::{dns_names, Subject};
use super::pem::{fingerprint, load_certs, load_key, TlsError};
use super::provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// The listener's certificate chain and key (`[server] tls_cert_file`, `tls_key_file`). Its
/// `Debug` names the certificate, never the key.
pub struct ServerCert {
    pub certified: Arc<CertifiedKey>,
    /// The leaf's subject, RFC 4514.
    pub subject: String,
    /// The leaf's DNS names (subjectAltName).
    pub names: Vec<String>,
    /// The leaf's `notAfter`, unix seconds.
    pub not_after: i64,
    /// SHA-256 of the leaf, hex.
    pub fingerprint: String,
}

impl ServerCert {
    /// Loads a PEM chain (leaf first, intermediates after it) and its private key, and checks
    /// that they belong together.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerCert, TlsError> {
        let chain = load_certs(cert)?;
        let der = load_key(key)?;
        let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_ref()).map_err(|_| {
            TlsError::Unusable {
                path: cert.display().to_string(),
                reason: "the first certificate cannot be parsed".into(),
            }
        })?;
        let subject = Subject::of(leaf.subject()).display;
        let names = dns_names(&leaf);
        let not_after = leaf.validity().not_after.timestamp();
        let fingerprint = fingerprint(chain[0].as_ref());
        let certified = CertifiedKey::from_der(chain, der, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
            },
            other => TlsError::Unusable {
                path: key.display().to_string(),
                reason: format!("the private key is not usable ({other})"),
            },
        })?;
        Ok(ServerCert {
            certified: Arc::new(certified),
            subject,
            names,
            not_after,
            fingerprint,
        })
    }
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("subject", &self.subject)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Picks the listener's certificate per handshake from the live configuration: a reload that
/// read new files is in force for the next handshake, and connections already open keep theirs.
pub struct CertResolver {
    current: Box<dyn Fn() -> Option<Arc<CertifiedKey>> + Send + Sync>,
}

impl CertResolver {
    /// A resolver reading the certificate from `current`.
    pub fn new(current: impl Fn() -> Option<Arc<CertifiedKey>> + Send + Sync + 'static) -> Self {
        CertResolver {
            current: Box::new(current),
        }
    }
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertResolver")
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (self.current)()
    }
}

/// Whether a [`ServerCert::load`] error is about the key file rather than the certificate file,
/// so the configuration error names the right setting.
pub fn blames_key(e: &TlsError, key_file: &Path) -> bool {
    match e {
        TlsError::NoKey { .. } | TlsError::KeyMismatch { .. } => true,
        TlsError::Unusable { path, .. } | TlsError::Read { path, .. } => {
            *path == key_file.display().to_string()
        }
        _ => false,
    }
}
