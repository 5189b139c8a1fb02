//! Who is calling: the proxy client key, sent the way scripts send Meraki keys
//! (`X-Cisco-Meraki-API-Key: <key>` or `Authorization: Bearer <key>`), matched by SHA-256 digest.

use crate::config::Client;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The Meraki API-key header.
pub const API_KEY_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-cisco-meraki-api-key");

/// Why a caller could not be identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// No key in either header.
    #[error("missing API key: send your proxy client key as X-Cisco-Meraki-API-Key or Authorization: Bearer")]
    Missing,
    /// A key no client has.
    #[error("invalid API key")]
    Unknown,
    /// Both headers, with different keys: ambiguous, so refused.
    #[error("conflicting API keys: the credential headers carry different keys")]
    Conflicting,
    /// A header that is not a usable key (not visible ASCII, or not a Bearer credential).
    #[error("malformed credentials header")]
    Malformed,
    /// A key past the expiry its operator set while rotating it.
    #[error("API key expired: ask the proxy's operator for this client's new key")]
    Expired,
    /// Mutual TLS: no client certificate, where one is required (always, or for this client).
    #[error("a client certificate is required: connect with the certificate the proxy's operator issued for this client")]
    CertificateRequired,
    /// Mutual TLS: a valid client certificate that no client is configured with.
    #[error("the client certificate identifies no client of this proxy")]
    UnknownCertificate,
    /// Mutual TLS: a certificate whose subject and DNS names name different clients.
    #[error("the client certificate matches more than one client")]
    AmbiguousCertificate,
    /// Mutual TLS: the key belongs to another client than the certificate.
    #[error("conflicting credentials: the API key belongs to another client than the client certificate")]
    CertificateKeyMismatch,
}

/// How a caller was identified, for the audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// Its key alone.
    Key,
    /// Its TLS client certificate alone.
    Certificate,
    /// Its certificate, and a key of the same client.
    CertificateAndKey,
}

impl IdentitySource {
    /// The audit log's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentitySource::Key => "key",
            IdentitySource::Certificate => "certificate",
            IdentitySource::CertificateAndKey => "certificate+key",
        }
    }
}

/// Mutual TLS on the connection's listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mtls {
    /// No client CA: callers are identified by key.
    Off,
    /// A certificate identifies its client; without one, a key does (for clients that have
    /// no certificate configured).
    Optional,
    /// Every request needs a client certificate.
    Required,
}

impl Mtls {
    /// The mode of a configuration.
    pub fn of(config: &crate::config::Config) -> Mtls {
        match &config.tls {
            Some(t) if t.client_ca.is_some() => {
                if t.client_cert_required {
                    Mtls::Required
                } else {
                    Mtls::Optional
                }
            }
            _ => Mtls::Off,
        }
    }
}

impl IdentityError {
    /// The HTTP status this error is answered with.
    pub fn status(self) -> u16 {
        match self {
            IdentityError::Missing
            | IdentityError::Unknown
            | IdentityError::Expired
            | IdentityError::CertificateRequired
            | IdentityError::UnknownCertificate
            | IdentityError::AmbiguousCertificate => 401,
            IdentityError::Conflicting
            | IdentityError::Malformed
            | IdentityError::CertificateKeyMismatch => 400,
        }
    }

    /// A short fixed label for metrics and audit.
    pub fn reason(self) -> &'static str {
        match self {
            IdentityError::Missing => "missing_key",
            IdentityError::Unknown => "unknown_key",
            IdentityError::Conflicting => "conflicting_keys",
            IdentityError::Malformed => "malformed_key",
            IdentityError::Expired => "expired_key",
            IdentityError::CertificateRequired => "client_certificate_required",
            IdentityError::UnknownCertificate => "unknown_certificate",
            IdentityError::AmbiguousCertificate => "ambiguous_certificate",
            IdentityError::CertificateKeyMismatch => "certificate_key_mismatch",
        }
    }
}

/// The clients, indexed for lookup by key digest.
pub struct Identities {
    clients: crate::FastMap<[u8; 32], (Arc<Client>, Option<i64>)>,
    /// Clients with a certificate binding (mutual TLS): few, searched in order.
    by_cert: Vec<Arc<Client>>,
}

/// A caller, identified.
#[derive(Debug, Clone)]
pub struct Caller {
    pub client: Arc<Client>,
    /// When the key used expires (unix seconds), if its operator set an expiry: a key being
    /// rotated out, whose uses are counted.
    pub key_expires_at: Option<i64>,
    /// What identified it.
    pub source: IdentitySource,
}

impl Caller {
    /// Whether the key used is past its expiry at `now` (unix seconds).
    pub fn expired(&self, now: i64) -> bool {
        self.key_expires_at.is_some_and(|at| now >= at)
    }
}

impl Identities {
    /// Builds the index from the configured clients.
    pub fn new(clients: &[Arc<Client>]) -> Self {
        Identities {
            clients: clients
                .iter()
                .flat_map(|c| c.keys.iter().map(|k| (k.digest, (c.clone(), k.expires_at))))
                .collect(),
            by_cert: clients
                .iter()
                .filter(|c| c.cert.is_some())
                .cloned()
                .collect(),
        }
    }

    /// Identifies a caller on a listener with mutual TLS `mtls`, which presented `cert` (a
    /// certificate the handshake verified against the client CA):
    ///
    /// - with a certificate, it must be a client's (else 401), and a key, if sent too, must be
    ///   the same client's (else 400);
    /// - without one, `Required` refuses (401), `Optional` identifies by key, except a client
    ///   configured with a certificate, which must present it;
    /// - `Off`: by key, as [`Identities::identify`].
    pub fn identify_on(
        &self,
        headers: &http::HeaderMap,
        mtls: Mtls,
        cert: Option<&crate::tls::PeerCert>,
    ) -> Result<Caller, IdentityError> {
        let cert = match (mtls, cert) {
            (Mtls::Off, _) => return self.identify(headers),
            (Mtls::Required, None) => return Err(IdentityError::CertificateRequired),
            (Mtls::Optional, None) => {
                let caller = self.identify(headers)?;
                if caller.client.cert.is_some() {
                    return Err(IdentityError::CertificateRequired);
                }
                return Ok(caller);
            }
            (_, Some(cert)) => cert,
        };
        let mut matching = self
            .by_cert
            .iter()
            .filter(|c| c.cert.as_ref().is_some_and(|binding| binding.matches(cert)));
        let client = matching.next().ok_or(IdentityError::UnknownCertificate)?;
        if matching.next().is_some() {
            return Err(IdentityError::AmbiguousCertificate);
        }
        match extract_key(headers) {
            Err(IdentityError::Missing) => Ok(Caller {
                client: client.clone(),
                key_expires_at: None,
                source: IdentitySource::Certificate,
            }),
            Err(e) => Err(e),
            Ok(key) => {
                let by_key = self.by_key(key).ok_or(IdentityError::Unknown)?;
                if !Arc::ptr_eq(&by_key.client, client) {
                    return Err(IdentityError::CertificateKeyMismatch);
                }
                Ok(Caller {
                    source: IdentitySource::CertificateAndKey,
                    ..by_key
                })
            }
        }
    }

    /// Finds the client whose key is in the request headers. A key past its expiry is still
    /// identified (so its refusal names the client); see [`Caller::expired`].
    pub fn identify(&self, headers: &http::HeaderMap) -> Result<Caller, IdentityError> {
        let key = extract_key(headers)?;
        self.by_key(key).ok_or(IdentityError::Unknown)
    }

    /// Finds the client with this key. The index is keyed by the key's SHA-256, so lookup time
    /// can depend only on the digest, which reveals nothing usable about the key; the match is
    /// then confirmed with a constant-time comparison. Cost does not grow with the number of
    /// clients.
    pub fn by_key(&self, key: &[u8]) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        let (stored, (client, expires)) = self.clients.get_key_value(&digest)?;
        bool::from(stored.ct_eq(&digest)).then(|| Caller {
            client: client.clone(),
            key_expires_at: *expires,
            source: IdentitySource::Key,
        })
    }
}

/// Reads the key from either credential header.
pub fn extract_key(headers: &http::HeaderMap) -> Result<&[u8], IdentityError> {
    let api_key = single(headers, &API_KEY_HEADER)?.map(|v| trim(v.as_bytes()));
    let bearer = match single(headers, &http::header::AUTHORIZATION)? {
        None => None,
        Some(v) => {
            let v = trim(v.as_bytes());
            match v.get(..7) {
                Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => Some(trim(&v[7..])),
                _ => return Err(IdentityError::Malformed),
            }
        }
    };
    let key = match (api_key, bearer) {
        (None, None) => return Err(IdentityError::Missing),
        (Some(k), None) | (None, Some(k)) => k,
        (Some(a), Some(b)) if a == b => a,
        (Some(_), Some(_)) => return Err(IdentityError::Conflicting),
    };
    if key.is_empty() {
        return Err(IdentityError::Missing);
    }
    if !key.iter().all(|b| b.is_ascii_graphic()) {
        return Err(IdentityError::Malformed);
    }
    Ok(key)
}

/// The one value of a credential header: repeated with different values it is ambiguous (which
/// one a server reads differs), so refused.
fn single<'h>(
    headers: &'h http::HeaderMap,
    name: &http::HeaderName,
) -> Result<Option<&'h http::HeaderValue>, IdentityError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    match first {
        Some(f) if values.any(|v| trim(v.as_bytes()) != trim(f.as_bytes())) => {
            Err(IdentityError::Conflicting)
        }
        _ => Ok(first),
    }
}

fn trim(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

/// Hex SHA-256 of a key, as `key_sha256` in the configuration expects it.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.trim().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn digest(key: &str) -> [u8; 32] {
        let mut d = [0u8; 32];
        hex::decode_to_slice(hash_key(key), &mut d).unwrap();
        d
    }

    fn client(name: &str, key: &str) -> Arc<Client> {
        client_with(name, &[(key, None)])
    }

    fn client_with(name: &str, keys: &[(&str, Option<i64>)]) -> Arc<Client> {
        Arc::new(Client {
            name: name.into(),
            keys: keys
                .iter()
                .map(|(k, expires_at)| crate::config::ClientKey {
                    digest: digest(k),
                    expires_at: *expires_at,
                })
                .collect(),
            cert: None,
            integration: "i".into(),
            organizations: vec!["1".into()],
            methods: None,
            operations: None,
            weight: 1,
            source_addresses: None,
        })
    }

    static API_KEY: http::HeaderName = API_KEY_HEADER;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::try_from(*k).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn both_headers_identify() {
        let ids = Identities::new(&[client("a", "key-a"), client("b", "key-b")]);
        let by_api_key = ids
            .identify(&headers(&[(API_KEY.as_str(), "key-b")]))
            .unwrap();
        assert_eq!(by_api_key.client.name, "b");
        let by_bearer = ids
            .identify(&headers(&[("authorization", "Bearer key-a")]))
            .unwrap();
        assert_eq!(by_bearer.client.name, "a");
        let lower = ids
            .identify(&headers(&[("authorization", "bearer  key-a ")]))
            .unwrap();
        assert_eq!(lower.client.name, "a");
        let same = ids
            .identify(&headers(&[
                (API_KEY.as_str(), "key-a"),
                ("authorization", "Bearer key-a"),
            ]))
            .unwrap();
        assert_eq!(same.client.name, "a");
    }

    #[test]
    fn a_rotated_key_works_until_its_expiry() {
        let now = crate::clock::now_unix();
        let ids = Identities::new(&[client_with(
            "a",
            &[
                ("new", None),
                ("old", Some(now + 3600)),
                ("gone", Some(now - 1)),
            ],
        )]);
        let by = |k: &str| ids.identify(&headers(&[(API_KEY.as_str(), k)]));
        assert_eq!(by("new").unwrap().key_expires_at, None);
        assert_eq!(by("old").unwrap().key_expires_at, Some(now + 3600));
        assert_eq!(by("old").unwrap().client.name, "a");
        assert!(!by("old").unwrap().expired(now));
        assert!(by("old").unwrap().expired(now + 3600));
        assert!(by("gone").unwrap().expired(now));
        assert_eq!(by("gone").unwrap().client.name, "a");
        assert_eq!(IdentityError::Expired.status(), 401);
    }

    #[test]
    fn refusals() {
        let ids = Identities::new(&[client("a", "key-a"), client("b", "key-b")]);
        let e = |h: &[(&'static str, &str)]| ids.identify(&headers(h)).unwrap_err();
        assert_eq!(e(&[]), IdentityError::Missing);
        assert_eq!(e(&[(API_KEY.as_str(), "nope")]), IdentityError::Unknown);
        assert_eq!(
            e(&[
                (API_KEY.as_str(), "key-a"),
                ("authorization", "Bearer key-b")
            ]),
            IdentityError::Conflicting
        );
        assert_eq!(
            e(&[("authorization", "Basic a2V5")]),
            IdentityError::Malformed
        );
        assert_eq!(e(&[(API_KEY.as_str(), "")]), IdentityError::Missing);
        assert_eq!(IdentityError::Unknown.status(), 401);
        assert_eq!(IdentityError::Conflicting.status(), 400);
    }

    fn cert(subject: &str, names: &[&str]) -> crate::tls::PeerCert {
        let s = crate::tls::Subject::parse(subject).unwrap();
        crate::tls::PeerCert {
            subject: s.display.into(),
            subject_key: s.key,
            dns_names: names.iter().map(|n| n.to_string()).collect(),
            fingerprint: "00".into(),
        }
    }

    fn bound(name: &str, key: &str, subject: Option<&str>, san: Option<&str>) -> Arc<Client> {
        let mut c = Arc::try_unwrap(client(name, key)).unwrap();
        c.cert = Some(crate::config::CertBinding {
            subject: subject.map(|s| crate::tls::Subject::parse(s).unwrap()),
            san: san.map(str::to_owned),
        });
        Arc::new(c)
    }

    #[test]
    fn client_certificates_identify_and_keys_must_agree() {
        let ids = Identities::new(&[
            bound("backup", "key-b", Some("CN=backup-script,O=netops"), None),
            bound("monitor", "key-m", None, Some("monitor.netops.example")),
            client("plain", "key-p"),
        ]);
        let none = headers(&[]);
        let backup = cert("O=netops,CN=backup-script", &[]);
        let by =
            |h: &HeaderMap, mode, c: Option<&crate::tls::PeerCert>| ids.identify_on(h, mode, c);
        let c = by(&none, Mtls::Required, Some(&backup)).unwrap();
        assert_eq!(
            (c.client.name.as_str(), c.source),
            ("backup", IdentitySource::Certificate)
        );
        let monitor = cert("CN=whatever", &["monitor.netops.example"]);
        assert_eq!(
            by(&none, Mtls::Required, Some(&monitor))
                .unwrap()
                .client
                .name,
            "monitor"
        );
        let own_key = headers(&[(API_KEY.as_str(), "key-b")]);
        let c = by(&own_key, Mtls::Required, Some(&backup)).unwrap();
        assert_eq!(c.source, IdentitySource::CertificateAndKey);
        let other_key = headers(&[(API_KEY.as_str(), "key-p")]);
        assert_eq!(
            by(&other_key, Mtls::Required, Some(&backup)).unwrap_err(),
            IdentityError::CertificateKeyMismatch
        );
        assert_eq!(IdentityError::CertificateKeyMismatch.status(), 400);
        let stranger = cert("CN=stranger", &["stranger.example"]);
        assert_eq!(
            by(&own_key, Mtls::Required, Some(&stranger)).unwrap_err(),
            IdentityError::UnknownCertificate
        );
        assert_eq!(
            by(&own_key, Mtls::Required, None).unwrap_err(),
            IdentityError::CertificateRequired
        );
        // Optional: keys for clients without a certificate; a bound client needs its own.
        let plain = headers(&[(API_KEY.as_str(), "key-p")]);
        assert_eq!(
            by(&plain, Mtls::Optional, None).unwrap().client.name,
            "plain"
        );
        assert_eq!(
            by(&own_key, Mtls::Optional, None).unwrap_err(),
            IdentityError::CertificateRequired
        );
        assert_eq!(
            by(&own_key, Mtls::Off, None).unwrap().source,
            IdentitySource::Key
        );
        let both = cert("CN=backup-script,O=netops", &["monitor.netops.example"]);
        assert_eq!(
            by(&none, Mtls::Required, Some(&both)).unwrap_err(),
            IdentityError::AmbiguousCertificate
        );
    }

    #[test]
    fn hash_key_matches_sha256sum() {
        // printf 'abc' | sha256sum
        assert_eq!(
            hash_key("abc\n"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
