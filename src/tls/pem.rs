//! Reading PEM files: certificates and private keys, each file capped in size; [`TlsError`]
//! says which file and why, never quoting a key.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::io;
use std::path::Path;

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

pub(super) fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
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
