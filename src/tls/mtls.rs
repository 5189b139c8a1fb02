//! Mutual TLS: the client CA and its verifier, the client certificate of a connection
//! ([`PeerCert`]) and distinguished names ([`Subject`]), which configured clients are matched by.

use super::failure::TlsFailure;
use super::pem::{fingerprint, load_certs, TlsError};
use super::provider;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

pub(super) fn dns_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
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
}
