//! Test certificates, generated in the test (rcgen): CAs, server certificates for host names,
//! client certificates for subjects and DNS names, expired ones.

use super::standin::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// A certificate authority that issues certificates.
pub struct Ca {
    pub cert: rcgen::Certificate,
    key: KeyPair,
}

/// How long an issued certificate is valid around now.
#[derive(Clone, Copy)]
pub enum Validity {
    /// From a day ago for a month.
    Current,
    /// Ended a day ago.
    Expired,
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.distinguished_name
            .push(DnType::OrganizationName, "meraki-oauth-proxy tests");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::days(2);
        p.not_after = now + Duration::days(365);
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate to `dir/name` and returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.pem()).unwrap();
        p
    }

    fn issue(
        &self,
        cn: &str,
        org: Option<&str>,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Identity {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        if let Some(o) = org {
            p.distinguished_name.push(DnType::OrganizationName, o);
        }
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![usage];
        p.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        (p.not_before, p.not_after) = match validity {
            Validity::Current => (now - Duration::days(1), now + Duration::days(30)),
            Validity::Expired => (now - Duration::days(30), now - Duration::days(1)),
        };
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str], validity: Validity) -> Identity {
        self.issue(
            names[0],
            None,
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            validity,
        )
    }

    /// A client certificate with subject `CN=cn[,O=org]` and DNS names `names`.
    pub fn client(
        &self,
        cn: &str,
        org: Option<&str>,
        names: &[&str],
        validity: Validity,
    ) -> Identity {
        self.issue(
            cn,
            org,
            names,
            ExtendedKeyUsagePurpose::ClientAuth,
            validity,
        )
    }
}

/// Writes a certificate and key as `dir/stem.pem` and `dir/stem.key`; returns both paths.
pub fn write_identity(dir: &Path, stem: &str, id: &Identity) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, &id.cert_pem).unwrap();
    std::fs::write(&key, &id.key_pem).unwrap();
    (cert, key)
}

/// SHA-256 of the first certificate of a PEM chain, hex.
pub fn fingerprint(id: &Identity) -> String {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap();
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der.as_ref()))
}

/// A rustls client configuration trusting `ca` (only), presenting `client` if given.
pub fn client_config(ca: &Ca, client: Option<&Identity>) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match client {
        None => b.with_no_client_auth(),
        Some(id) => {
            let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
    }
}

/// An HTTPS client for the tests: trusts `ca`, presents `client`, resolves `pins` (host →
/// loopback port) for itself alone, never follows redirects, opens a new connection per request
/// when `fresh` (so each request is a new handshake).
pub fn https_client(
    ca: &Ca,
    client: Option<&Identity>,
    pins: &[(&str, std::net::SocketAddr)],
    fresh: bool,
) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(client_config(ca, client))
        .timeout(std::time::Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    for (host, addr) in pins {
        b = b.resolve(host, *addr);
    }
    if fresh {
        b = b.pool_max_idle_per_host(0);
    }
    b.build().unwrap()
}

/// The SHA-256 of the certificate a TLS server at `addr` presents for `name`.
pub async fn presented_fingerprint(addr: std::net::SocketAddr, name: &str, ca: &Ca) -> String {
    let config = std::sync::Arc::new(client_config(ca, None));
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let tls = connector.connect(server_name, tcp).await.unwrap();
    let (_, conn) = tls.get_ref();
    let leaf = &conn.peer_certificates().unwrap()[0];
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(leaf.as_ref()))
}
