//! The outbound trust policy: one for every connection the proxy makes.
//!
//! `Outbound::from_config`, the policy of a configuration's `[upstream]` section, is in
//! `config/upstream.rs`: TLS reads no configuration.

use super::pem::{load_certs, TlsError};
use super::provider;
use crate::egress::Egress;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_policy_loads_the_platform_store_and_the_extra_ca() {
        let o = Outbound::new(None, None, BTreeMap::new()).unwrap();
        assert_eq!(o.roots().1, 0);
        assert!(o.peer_ca.is_none(), "no extra roots: Pingora's own store");
        assert!(o.http_client(Duration::from_secs(1)).is_ok());
    }
}
