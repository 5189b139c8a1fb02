//! TLS both ways.
//!
//! **Outbound** ([`Outbound`]): one trust policy for every connection the proxy makes — forwarded
//! API requests and the redirects it follows (Pingora), token and revocation calls, its own
//! lookups and the consent flow's organization list (reqwest, every client built by
//! [`Outbound::http_client`]): the platform's roots plus `[upstream] ca_file`, host names
//! verified against each host's own SNI, through the egress proxy when one is configured
//! ([`crate::egress`]). A failed handshake is classified ([`TlsFailure`]) so the log, the audit
//! record and the client's 502 name the cause instead of "error sending request".
//!
//! **Inbound**: the listener's certificate ([`ServerCert`]) is part of the validated
//! configuration and is picked per handshake from the live snapshot ([`CertResolver`]), so a
//! reload that re-reads the files swaps it without a restart and without failing a connection.
//! Mutual TLS ([`ClientCa`], [`ClientVerifier`]): a presented client certificate must chain to
//! `tls_client_ca_file` (and be in its validity period) or the handshake is refused and audited;
//! its subject and DNS names ([`PeerCert`]) are read once per connection, after the handshake, for
//! [`crate::identity`] to map to a client.

use crate::egress::Egress;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Why certificates or keys could not be loaded. Never quotes a key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: String },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: String },
    #[error("{path}: {reason}")]
    Unusable { path: String, reason: String },
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: String, key: String },
    #[error("the platform certificate store cannot be read: {0}")]
    Platform(String),
}

/// The crypto provider of every TLS configuration the proxy builds (the one Pingora's rustls
/// backend installs).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// PEM files larger than this are refused (a certificate bundle is kilobytes; a path to a
/// device or a huge file must not hang or exhaust the proxy).
const MAX_PEM_FILE: u64 = 4 << 20;

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let failed = |source| TlsError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut out = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_FILE + 1).read_to_end(&mut out))
        .map_err(failed)?;
    if out.len() as u64 > MAX_PEM_FILE {
        return Err(TlsError::Unusable {
            path: path.display().to_string(),
            reason: format!("larger than {} MiB: not a PEM file", MAX_PEM_FILE >> 20),
        });
    }
    Ok(out)
}

/// The certificates of a PEM file, in order (a chain: leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Unusable {
            path: path.display().to_string(),
            reason: format!("not a PEM certificate file ({e})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    // The parser's error could echo file content: report the class only.
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(TlsError::NoKey {
            path: path.display().to_string(),
        }),
        Err(_) => Err(TlsError::Unusable {
            path: path.display().to_string(),
            reason: "not a readable PEM private key".into(),
        }),
    }
}

/// SHA-256 of a DER certificate, hex: how certificates are named in logs and audit records.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

// ---------------------------------------------------------------------------------------------
// Outbound

/// Extra roots from `[upstream] ca_file`, compared by content (a reload that changes them
/// needs a restart, like every upstream setting).
#[derive(Clone)]
pub struct CaBundle {
    pub path: PathBuf,
    pub certs: Arc<Vec<CertificateDer<'static>>>,
}

impl CaBundle {
    /// Reads a PEM file of CA certificates.
    pub fn load(path: &Path) -> Result<CaBundle, TlsError> {
        let certs = load_certs(path)?;
        // Every one must be usable as a trust anchor, or the operator's CA would be silently
        // ignored and the failure shown much later as "unknown issuer".
        let mut store = RootCertStore::empty();
        for (i, c) in certs.iter().enumerate() {
            store.add(c.clone()).map_err(|e| TlsError::Unusable {
                path: path.display().to_string(),
                reason: format!("certificate {} is not a usable CA certificate ({e})", i + 1),
            })?;
            if x509_parser::parse_x509_certificate(c.as_ref()).is_err() {
                return Err(TlsError::Unusable {
                    path: path.display().to_string(),
                    reason: format!("certificate {} cannot be parsed", i + 1),
                });
            }
        }
        Ok(CaBundle {
            path: path.to_path_buf(),
            certs: Arc::new(certs),
        })
    }
}

impl PartialEq for CaBundle {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.certs == other.certs
    }
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CaBundle({}, {} certificates)",
            self.path.display(),
            self.certs.len()
        )
    }
}

/// The outbound TLS policy: roots, egress and pinned addresses, shared by Pingora's peers and
/// every reqwest client.
pub struct Outbound {
    client: Arc<rustls::ClientConfig>,
    /// The same roots for Pingora, set on each peer when `ca_file` adds roots (without it,
    /// Pingora's connector already holds exactly the platform store, loaded the same way).
    peer_ca: Option<Arc<pingora::protocols::tls::CaType>>,
    platform_roots: usize,
    extra_roots: usize,
    egress: Option<Arc<Egress>>,
    resolve: BTreeMap<String, IpAddr>,
}

impl fmt::Debug for Outbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbound")
            .field("platform_roots", &self.platform_roots)
            .field("extra_roots", &self.extra_roots)
            .field("egress", &self.egress)
            .field("resolve", &self.resolve)
            .finish()
    }
}

impl Outbound {
    /// The policy of a configuration's `[upstream]` section.
    pub fn from_config(upstream: &crate::config::UpstreamConfig) -> Result<Outbound, TlsError> {
        Outbound::new(
            upstream.ca.as_ref(),
            upstream.egress.clone().map(Arc::new),
            upstream.resolve.clone(),
        )
    }

    /// The platform roots plus `ca` (if any), with this egress proxy and these pinned addresses.
    pub fn new(
        ca: Option<&CaBundle>,
        egress: Option<Arc<Egress>>,
        resolve: BTreeMap<String, IpAddr>,
    ) -> Result<Outbound, TlsError> {
        let mut roots = RootCertStore::empty();
        // rustls-native-certs 0.7, as Pingora's connector: the OS store, or SSL_CERT_FILE /
        // SSL_CERT_DIR when set.
        let platform = rustls_native_certs::load_native_certs()
            .map_err(|e| TlsError::Platform(e.to_string()))?;
        let mut usable: Vec<CertificateDer<'static>> = Vec::with_capacity(platform.len());
        for c in platform {
            // Pingora parses every per-peer root with x509-parser and adds it strictly: keep
            // only certificates both accept, so both sides trust the same set.
            if x509_parser::parse_x509_certificate(c.as_ref()).is_ok()
                && roots.add(c.clone()).is_ok()
            {
                usable.push(c);
            }
        }
        let platform_roots = usable.len();
        let extra_roots = ca.map_or(0, |b| b.certs.len());
        if let Some(b) = ca {
            for c in b.certs.iter() {
                // Checked when the configuration was loaded.
                let _ = roots.add(c.clone());
                usable.push(c.clone());
            }
        }
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Platform(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let peer_ca = ca.map(|_| {
            let wrapped: Vec<_> = usable
                .iter()
                .map(|c| {
                    pingora::utils::tls::WrappedX509::new(
                        c.as_ref().to_vec(),
                        pingora::utils::tls::parse_x509,
                    )
                })
                .collect();
            Arc::<pingora::protocols::tls::CaType>::from(wrapped)
        });
        Ok(Outbound {
            client: Arc::new(client),
            peer_ca,
            platform_roots,
            extra_roots,
            egress,
            resolve,
        })
    }

    /// Every HTTP client the proxy uses for its own calls is built here: the policy's roots
    /// (no bundled root store), its egress proxy and pinned addresses, no redirects, the proxy's
    /// User-Agent, a total `timeout` and a connect timeout of at most 10 s.
    pub fn http_client(&self, timeout: Duration) -> reqwest::Result<reqwest::Client> {
        let mut b = reqwest::Client::builder()
            .use_preconfigured_tls(rustls::ClientConfig::clone(&self.client))
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(crate::PRODUCT)
            .redirect(reqwest::redirect::Policy::none())
            // Proxies come from the policy only (not reqwest's own reading of the environment),
            // so token calls and API calls take the same way out.
            .no_proxy();
        if let Some(e) = &self.egress {
            b = b.proxy(e.reqwest_proxy());
        }
        for (host, ip) in &self.resolve {
            // Port 0: the URL's port is used.
            b = b.resolve(host, std::net::SocketAddr::new(*ip, 0));
        }
        b.build()
    }

    /// Applies the roots to a Pingora peer (hostname verification and SNI are the peer's).
    pub fn configure_peer(&self, peer: &mut pingora::upstreams::peer::HttpPeer) {
        if let Some(ca) = &self.peer_ca {
            peer.options.ca = Some(ca.clone());
        }
    }

    /// The egress proxy, when connections go through one.
    pub fn egress(&self) -> Option<&Arc<Egress>> {
        self.egress.as_ref()
    }

    /// The address `host` is pinned to (`[upstream] resolve`), if it is.
    pub fn pinned(&self, host: &str) -> Option<IpAddr> {
        self.resolve.get(&host.to_ascii_lowercase()).copied()
    }

    /// The rustls client configuration (for tests and tools that speak TLS themselves).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// How many roots are trusted: (platform, `ca_file`).
    pub fn roots(&self) -> (usize, usize) {
        (self.platform_roots, self.extra_roots)
    }
}

/// Why a TLS handshake failed, as far as the proxy can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// The certificate chains to no trusted root.
    UnknownIssuer,
    /// The certificate is not valid for the host name asked for.
    NameMismatch,
    /// The certificate (or one in its chain) has expired.
    Expired,
    /// The certificate is not valid yet.
    NotYetValid,
    /// The certificate was revoked.
    Revoked,
    /// A certificate is malformed, badly signed, or not meant for this use.
    BadCertificate,
    /// The peer sent no certificate.
    NoCertificate,
    /// Anything else in the handshake (protocol versions, alerts, ...).
    Handshake,
}

impl TlsFailure {
    /// Classifies an error's text. Pingora keeps only the text of a handshake error, so text is
    /// what both the API path and the reqwest clients classify; the unit tests pin the texts
    /// rustls produces, so an upgrade that changes them is noticed.
    pub fn classify(text: &str) -> Option<TlsFailure> {
        let t = text;
        let has = |s: &str| t.contains(s);
        Some(
            if has("UnknownIssuer") || has("unknown issuer") || has("UnknownCA") {
                TlsFailure::UnknownIssuer
            } else if has("not valid for name") || has("NotValidForName") {
                TlsFailure::NameMismatch
            } else if has("ExpiredRevocationList") || has("revocation list expired") {
                TlsFailure::BadCertificate
            } else if has("certificate expired") || has("Expired") || has("CertificateExpired") {
                TlsFailure::Expired
            } else if has("not valid yet") || has("NotValidYet") {
                TlsFailure::NotYetValid
            } else if has("Revoked") {
                TlsFailure::Revoked
            } else if has("peer sent no certificates") || has("CertificateRequired") {
                TlsFailure::NoCertificate
            } else if has("invalid peer certificate")
                || has("BadCertificate")
                || has("BadSignature")
            {
                TlsFailure::BadCertificate
            } else if has("TLS") || has("tls") || has("handshake") || has("received fatal alert") {
                TlsFailure::Handshake
            } else {
                return None;
            },
        )
    }

    /// Classifies a Pingora connect error: `None` unless it is a TLS one.
    pub fn of_pingora(e: &pingora::Error) -> Option<TlsFailure> {
        use pingora::ErrorType as E;
        match e.etype() {
            E::TLSHandshakeFailure | E::TLSHandshakeTimedout | E::InvalidCert => {
                Some(TlsFailure::classify(&e.to_string()).unwrap_or(TlsFailure::Handshake))
            }
            _ => None,
        }
    }

    /// Classifies an error and its causes (a reqwest or I/O error chain).
    pub fn of_chain(e: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
        let text = crate::report::chain(e);
        // Only certificate verdicts and handshakes are TLS failures; "tls" alone in a message
        // that is about a refused TCP connection is not.
        let tlsish = text.contains("certificate")
            || text.contains("received fatal alert")
            || text.contains("handshake")
            || text.contains("peer sent no certificates");
        if tlsish {
            TlsFailure::classify(&text)
        } else {
            None
        }
    }

    /// A fixed label for metrics and audit `reason`s.
    pub fn label(self) -> &'static str {
        match self {
            TlsFailure::UnknownIssuer => "unknown_issuer",
            TlsFailure::NameMismatch => "name_mismatch",
            TlsFailure::Expired => "expired",
            TlsFailure::NotYetValid => "not_yet_valid",
            TlsFailure::Revoked => "revoked",
            TlsFailure::BadCertificate => "bad_certificate",
            TlsFailure::NoCertificate => "no_certificate",
            TlsFailure::Handshake => "handshake_failed",
        }
    }

    /// The audit `reason` of a request that failed on an upstream handshake.
    pub fn upstream_reason(self) -> &'static str {
        match self {
            TlsFailure::UnknownIssuer => "upstream_tls_unknown_issuer",
            TlsFailure::NameMismatch => "upstream_tls_name_mismatch",
            TlsFailure::Expired => "upstream_tls_expired",
            TlsFailure::NotYetValid => "upstream_tls_not_yet_valid",
            TlsFailure::Revoked => "upstream_tls_revoked",
            TlsFailure::BadCertificate => "upstream_tls_bad_certificate",
            TlsFailure::NoCertificate => "upstream_tls_no_certificate",
            TlsFailure::Handshake => "upstream_tls_handshake_failed",
        }
    }

    /// What it means, for people.
    pub fn describe(self) -> &'static str {
        match self {
            TlsFailure::UnknownIssuer => "certificate issuer unknown: it chains to no CA of the platform store or [upstream] ca_file",
            TlsFailure::NameMismatch => "certificate name mismatch: the certificate is not valid for this host name",
            TlsFailure::Expired => "certificate expired",
            TlsFailure::NotYetValid => "certificate not valid yet",
            TlsFailure::Revoked => "certificate revoked",
            TlsFailure::BadCertificate => "bad certificate",
            TlsFailure::NoCertificate => "no certificate presented",
            TlsFailure::Handshake => "TLS handshake failed",
        }
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

// ---------------------------------------------------------------------------------------------
// Inbound: the listener's certificate

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

// ---------------------------------------------------------------------------------------------
// Inbound: mutual TLS

/// `[server] tls_client_ca_file`: the CAs client certificates must chain to.
pub struct ClientCa {
    pub path: PathBuf,
    pub count: usize,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl ClientCa {
    /// Reads the CA certificates and builds their verifier. A client without a certificate
    /// still completes the handshake; the request hook then decides (401, audited), which a
    /// handshake refusal could not.
    pub fn load(path: &Path) -> Result<ClientCa, TlsError> {
        let certs = load_certs(path)?;
        let mut roots = RootCertStore::empty();
        for (i, c) in certs.iter().enumerate() {
            roots.add(c.clone()).map_err(|e| TlsError::Unusable {
                path: path.display().to_string(),
                reason: format!("certificate {} is not a usable CA certificate ({e})", i + 1),
            })?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Unusable {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(ClientCa {
            path: path.to_path_buf(),
            count: certs.len(),
            verifier,
        })
    }
}

impl fmt::Debug for ClientCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClientCa({}, {} certificates)",
            self.path.display(),
            self.count
        )
    }
}

/// A client certificate refused in the handshake, for the audit log.
#[derive(Debug, Clone)]
pub struct RefusedClientCert {
    pub cause: TlsFailure,
    /// The presented certificate's subject, when it parses.
    pub subject: Option<String>,
    pub fingerprint: String,
    /// rustls's account of it.
    pub detail: String,
}

/// Verifies client certificates against the CA of the live configuration (re-read on reload).
/// Refusals are reported to `refused` (the audit log) before the handshake fails.
pub struct ClientVerifier {
    current: Box<dyn Fn() -> Option<Arc<ClientCa>> + Send + Sync>,
    refused: Box<dyn Fn(&RefusedClientCert) + Send + Sync>,
}

impl ClientVerifier {
    /// A verifier for the CA `current` returns (none: no client certificate is asked for).
    pub fn new(
        current: impl Fn() -> Option<Arc<ClientCa>> + Send + Sync + 'static,
        refused: impl Fn(&RefusedClientCert) + Send + Sync + 'static,
    ) -> Self {
        ClientVerifier {
            current: Box::new(current),
            refused: Box::new(refused),
        }
    }
}

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientVerifier")
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        (self.current)().is_some()
    }

    fn client_auth_mandatory(&self) -> bool {
        // Enforced per request (see `ClientCa::load`).
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The CA can change on reload and this returns a borrow: no hints, which TLS allows
        // (clients then offer the certificate they have).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let Some(ca) = (self.current)() else {
            // Not asked for, yet sent: nothing to trust it with.
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ));
        };
        ca.verifier
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| {
                let detail = e.to_string();
                (self.refused)(&RefusedClientCert {
                    cause: TlsFailure::classify(&detail).unwrap_or(TlsFailure::BadCertificate),
                    subject: PeerCert::parse(end_entity.as_ref()).map(|p| p.subject.to_string()),
                    fingerprint: fingerprint(end_entity.as_ref()),
                    detail,
                });
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A verified client certificate, as the request hooks see it: read once per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The subject, RFC 4514 (`CN=backup-script,O=netops`), for audit records.
    pub subject: Arc<str>,
    /// The subject in the form [`Subject::parse`] gives configured subjects, for matching.
    pub subject_key: String,
    /// DNS names of the subjectAltName extension, lowercase.
    pub dns_names: Vec<String>,
    /// SHA-256 of the certificate, hex.
    pub fingerprint: Arc<str>,
}

impl PeerCert {
    /// Reads a DER certificate; `None` if it does not parse.
    pub fn parse(der: &[u8]) -> Option<PeerCert> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = Subject::of(cert.subject());
        Some(PeerCert {
            subject: subject.display.into(),
            subject_key: subject.key,
            dns_names: dns_names(&cert),
            fingerprint: fingerprint(der).into(),
        })
    }
}

/// After each inbound handshake: reads the client certificate (if any) into the connection's
/// TLS digest, where [`peer_cert`] finds it for every request of the connection.
pub struct HandshakeCallbacks;

#[async_trait::async_trait]
impl pingora::listeners::TlsAccept for HandshakeCallbacks {
    async fn handshake_complete_callback(
        &self,
        tls: &pingora::protocols::tls::TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let der = tls.peer_certificate_der()?;
        PeerCert::parse(der).map(|p| Arc::new(p) as Arc<dyn std::any::Any + Send + Sync>)
    }
}

/// The client certificate of a downstream connection, if it presented one.
pub fn peer_cert(digest: Option<&pingora::protocols::Digest>) -> Option<&PeerCert> {
    digest?.ssl_digest.as_ref()?.extension.get::<PeerCert>()
}

fn dns_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Distinguished names

/// Attribute names accepted in `cert_subject`, with their OIDs.
const ATTRIBUTES: &[(&str, &str)] = &[
    ("CN", "2.5.4.3"),
    ("O", "2.5.4.10"),
    ("OU", "2.5.4.11"),
    ("C", "2.5.4.6"),
    ("L", "2.5.4.7"),
    ("ST", "2.5.4.8"),
    ("STREET", "2.5.4.9"),
    ("SERIALNUMBER", "2.5.4.5"),
    ("DC", "0.9.2342.19200300.100.1.25"),
    ("UID", "0.9.2342.19200300.100.1.1"),
    ("EMAILADDRESS", "1.2.840.113549.1.9.1"),
];

/// A distinguished name: how it is shown, and the key it is matched by (its attributes as
/// `OID=value`, sorted: the order of RDNs and the spelling of attribute names do not matter,
/// values are compared exactly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub display: String,
    pub key: String,
}

impl Subject {
    /// Parses an RFC 4514 string such as `CN=backup-script,O=netops` (`\,` escapes a comma).
    pub fn parse(text: &str) -> Result<Subject, String> {
        let mut attrs: Vec<(String, String)> = Vec::new();
        let mut cur = String::new();
        let mut parts = Vec::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(n) => {
                        cur.push('\\');
                        cur.push(n);
                    }
                    None => return Err("ends with a lone backslash".into()),
                },
                ',' | '+' | ';' => parts.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        parts.push(cur);
        for p in parts {
            let Some((name, value)) = split_unescaped_eq(&p) else {
                return Err(format!(
                    "expected NAME=value pairs separated by commas, got {:?}",
                    p.trim()
                ));
            };
            let name = name.trim();
            let oid = oid_of(name).ok_or_else(|| {
                format!(
                    "unknown attribute {name:?}; expected one of CN, O, OU, C, L, ST, STREET, serialNumber, DC, UID, emailAddress or a dotted OID"
                )
            })?;
            let value = unescape(value.trim());
            if value.is_empty() {
                return Err(format!("attribute {name} has an empty value"));
            }
            attrs.push((oid, value));
        }
        if attrs.is_empty() {
            return Err("expected at least one attribute, such as CN=name".into());
        }
        Ok(Subject::from_attrs(attrs, None))
    }

    /// The subject of a certificate.
    pub fn of(name: &x509_parser::x509::X509Name<'_>) -> Subject {
        let mut attrs = Vec::new();
        let mut rdns: Vec<String> = Vec::new();
        for rdn in name.iter() {
            let mut shown = Vec::new();
            for a in rdn.iter() {
                let oid = a.attr_type().to_id_string();
                let value = match a.as_str() {
                    Ok(s) => s.to_owned(),
                    // BMPString and friends: not matchable by text, shown as hex.
                    Err(_) => format!("#{}", hex::encode(a.as_slice())),
                };
                shown.push(format!("{}={}", name_of(&oid), escape(&value)));
                attrs.push((oid, value));
            }
            rdns.push(shown.join("+"));
        }
        // RFC 4514 writes the last RDN first.
        rdns.reverse();
        Subject::from_attrs(attrs, Some(rdns.join(",")))
    }

    fn from_attrs(mut attrs: Vec<(String, String)>, display: Option<String>) -> Subject {
        let display = display.unwrap_or_else(|| {
            attrs
                .iter()
                .map(|(o, v)| format!("{}={}", name_of(o), escape(v)))
                .collect::<Vec<_>>()
                .join(",")
        });
        attrs.sort();
        let key = attrs
            .iter()
            .map(|(o, v)| format!("{o}={v}"))
            .collect::<Vec<_>>()
            .join("\u{1}");
        Subject { display, key }
    }
}

fn split_unescaped_eq(s: &str) -> Option<(&str, &str)> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '=' if !escaped => return Some((&s[..i], &s[i + 1..])),
            _ => escaped = false,
        }
    }
    None
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, ',' | '+' | '\\' | '"' | '<' | '>' | ';' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn oid_of(name: &str) -> Option<String> {
    if !name.is_empty() && name.split('.').count() > 1 {
        let numeric = name
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        return numeric.then(|| name.to_owned());
    }
    ATTRIBUTES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, o)| (*o).to_owned())
}

fn name_of(oid: &str) -> String {
    match ATTRIBUTES.iter().find(|(_, o)| *o == oid) {
        Some(("SERIALNUMBER", _)) => "serialNumber".into(),
        Some(("EMAILADDRESS", _)) => "emailAddress".into(),
        Some((n, _)) => (*n).to_owned(),
        None => oid.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_subjects_match_certificate_subjects_in_any_order() {
        let a = Subject::parse("CN=backup-script,O=netops").unwrap();
        let b = Subject::parse(" o = netops ; cn=backup-script").unwrap();
        assert_eq!(a.key, b.key);
        assert_eq!(a.display, "CN=backup-script,O=netops");
        let c = Subject::parse(r"CN=a\,b,O=x").unwrap();
        assert!(c.key.contains("2.5.4.3=a,b"), "{}", c.key);
        assert_ne!(a.key, Subject::parse("CN=backup-script").unwrap().key);
        assert_ne!(
            a.key,
            Subject::parse("CN=backup-script,O=netops,OU=x")
                .unwrap()
                .key
        );
        assert_ne!(
            a.key,
            Subject::parse("CN=Backup-script,O=netops").unwrap().key
        );
        for bad in ["", "CN", "XX=1", "CN=", "CN=a\\"] {
            assert!(Subject::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Subject::parse("2.5.4.3=x").unwrap().key == Subject::parse("CN=x").unwrap().key);
    }

    #[test]
    fn rustls_certificate_errors_are_classified_by_their_text() {
        use rustls::CertificateError as C;
        let cases = [
            (
                rustls::Error::InvalidCertificate(C::UnknownIssuer),
                TlsFailure::UnknownIssuer,
            ),
            (
                rustls::Error::InvalidCertificate(C::NotValidForNameContext {
                    expected: rustls::pki_types::ServerName::try_from("api.meraki.com")
                        .unwrap()
                        .to_owned(),
                    presented: vec!["other.example".into()],
                }),
                TlsFailure::NameMismatch,
            ),
            (
                rustls::Error::InvalidCertificate(C::NotValidForName),
                TlsFailure::NameMismatch,
            ),
            (
                rustls::Error::InvalidCertificate(C::ExpiredContext {
                    time: UnixTime::since_unix_epoch(Duration::from_secs(2_000)),
                    not_after: UnixTime::since_unix_epoch(Duration::from_secs(1_000)),
                }),
                TlsFailure::Expired,
            ),
            (
                rustls::Error::InvalidCertificate(C::Expired),
                TlsFailure::Expired,
            ),
            (
                rustls::Error::InvalidCertificate(C::NotValidYetContext {
                    time: UnixTime::since_unix_epoch(Duration::from_secs(1_000)),
                    not_before: UnixTime::since_unix_epoch(Duration::from_secs(2_000)),
                }),
                TlsFailure::NotYetValid,
            ),
            (
                rustls::Error::InvalidCertificate(C::Revoked),
                TlsFailure::Revoked,
            ),
            (
                rustls::Error::InvalidCertificate(C::BadSignature),
                TlsFailure::BadCertificate,
            ),
            (
                rustls::Error::NoCertificatesPresented,
                TlsFailure::NoCertificate,
            ),
        ];
        for (e, want) in cases {
            let text = e.to_string();
            assert_eq!(TlsFailure::classify(&text), Some(want), "{text}");
            // As Pingora reports a failed connect.
            let pingora = format!("TLS connect() failed: {text}, SNI: api.meraki.com");
            assert_eq!(TlsFailure::classify(&pingora), Some(want), "{pingora}");
        }
        assert_eq!(
            TlsFailure::classify("Connection refused (os error 111)"),
            None
        );
    }

    #[test]
    fn outbound_policy_loads_the_platform_store_and_the_extra_ca() {
        let o = Outbound::new(None, None, BTreeMap::new()).unwrap();
        assert_eq!(o.roots().1, 0);
        assert!(o.peer_ca.is_none(), "no extra roots: Pingora's own store");
        assert!(o.http_client(Duration::from_secs(1)).is_ok());
    }
}
