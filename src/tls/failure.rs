//! Classifying TLS failures, so the log, the audit record and the client's 502 name the cause
//! instead of "error sending request".

use std::fmt;

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

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::UnixTime;
    use std::time::Duration;

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
}
