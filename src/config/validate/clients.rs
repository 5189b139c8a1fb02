//! `[[clients]]`: who may call, with which keys or certificate, on which organizations,
//! methods and operations, with which weight.

use super::{valid_name, Validator};
use crate::config::{
    file, CertBinding, Client, ClientKey, ConfigError, InboundTls, Integration, OperationRule,
    Operations,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// HTTP methods a client may be limited to.
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"];

impl Validator<'_> {
    /// Parses `clients[i].operations` against Meraki's API table.
    fn operations(&self, i: usize, entries: &[String]) -> Result<Operations, ConfigError> {
        let table = crate::endpoints::EndpointTable::builtin();
        let families = table.families();
        let mut rules = Vec::with_capacity(entries.len());
        for (j, e) in entries.iter().enumerate() {
            let key = format!("clients[{i}].operations[{j}]");
            let rule = match e.split_once(':') {
                None => {
                    if table.by_operation_id(e).is_none() {
                        return Err(self.invalid(
                            key,
                            format!(
                                "no operation {e:?} in Meraki's API table (meraki-sdk {}); expected an operationId such as \"getOrganizationNetworks\" or \"family:read\"",
                                table.sdk_version()
                            ),
                        ));
                    }
                    OperationRule::Id(e.clone())
                }
                Some((family, access)) => {
                    let family = match family {
                        "*" => None,
                        f if families.contains(&f) => Some(f.to_owned()),
                        f => {
                            return Err(self.invalid(
                                key,
                                format!(
                                "no product family {f:?}; expected \"*\" or one of {families:?}"
                            ),
                            ))
                        }
                    };
                    let (read, write) = match access {
                        "read" => (true, false),
                        "write" => (false, true),
                        "*" => (true, true),
                        a => {
                            return Err(
                                self.invalid(key, format!("expected read, write or *, got {a:?}"))
                            )
                        }
                    };
                    OperationRule::Family {
                        family,
                        read,
                        write,
                    }
                }
            };
            rules.push(rule);
        }
        if rules.is_empty() {
            return Err(self.invalid(
                format!("clients[{i}].operations"),
                "expected at least one entry (leave the key out to allow every operation)",
            ));
        }
        Ok(Operations { rules })
    }

    /// `clients[i].cert_subject` and `cert_san`, each naming one client only.
    fn cert_binding(
        &self,
        i: usize,
        c: &file::Client,
        subjects: &mut HashMap<String, String>,
        sans: &mut HashMap<String, String>,
    ) -> Result<Option<CertBinding>, ConfigError> {
        let subject = match &c.cert_subject {
            None => None,
            Some(text) => {
                let key = format!("clients[{i}].cert_subject");
                let s = crate::tls::Subject::parse(text).map_err(|p| {
                    self.invalid(
                        key.clone(),
                        format!("{p} (expected a subject such as \"CN=backup-script,O=netops\")"),
                    )
                })?;
                if let Some(other) = subjects.insert(s.key.clone(), c.name.clone()) {
                    return Err(self.invalid(
                        key,
                        format!("the same certificate subject is used by client {other:?}"),
                    ));
                }
                Some(s)
            }
        };
        let san = match &c.cert_san {
            None => None,
            Some(name) => {
                let key = format!("clients[{i}].cert_san");
                let n = name.trim().to_ascii_lowercase();
                if n.is_empty() || n.contains(['/', ':', ' ', ',']) {
                    return Err(self.invalid(
                        key,
                        format!(
                            "expected a DNS name such as \"backup.netops.example\", got {name:?}"
                        ),
                    ));
                }
                if let Some(other) = sans.insert(n.clone(), c.name.clone()) {
                    return Err(self.invalid(
                        key,
                        format!("the same certificate name is used by client {other:?}"),
                    ));
                }
                Some(n)
            }
        };
        Ok((subject.is_some() || san.is_some()).then_some(CertBinding { subject, san }))
    }

    pub(super) fn clients(
        &self,
        raw: Vec<file::Client>,
        integrations: &[Arc<Integration>],
    ) -> Result<Vec<Arc<Client>>, ConfigError> {
        let mut names = HashSet::new();
        let mut digests: HashMap<[u8; 32], String> = HashMap::new();
        let mut subjects: HashMap<String, String> = HashMap::new();
        let mut sans: HashMap<String, String> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, c) in raw.into_iter().enumerate() {
            let key = |k: &str| format!("clients[{i}].{k}");
            if !valid_name(&c.name) {
                return Err(self.invalid(
                    key("name"),
                    format!("expected letters, digits, '-' or '_', got {:?}", c.name),
                ));
            }
            if !names.insert(c.name.clone()) {
                return Err(
                    self.invalid(key("name"), format!("client {:?} is defined twice", c.name))
                );
            }
            let cert = self.cert_binding(i, &c, &mut subjects, &mut sans)?;
            let listed = c.key_sha256.as_ref().map(|d| d.list()).unwrap_or_default();
            if listed.is_empty() && (c.key_sha256.is_some() || cert.is_none()) {
                return Err(self.invalid(
                    key("key_sha256"),
                    if c.key_sha256.is_some() {
                        "expected at least one digest"
                    } else {
                        "expected the digest of the client's key (or, with mutual TLS, cert_subject or cert_san)"
                    },
                ));
            }
            let mut keys = Vec::with_capacity(listed.len());
            for (j, d) in listed.iter().enumerate() {
                let at = if matches!(c.key_sha256, Some(file::Digests::One(_))) {
                    key("key_sha256")
                } else {
                    format!("clients[{i}].key_sha256[{j}]")
                };
                let digest = parse_digest(d).ok_or_else(|| {
                    self.invalid(
                        at.clone(),
                        format!(
                            "expected 64 hex characters (the SHA-256 of the client's key, from `meraki-oauth-proxy hash-key` or `clients new`), got {} characters",
                            d.len()
                        ),
                    )
                })?;
                if let Some(other) = digests.insert(digest, c.name.clone()) {
                    return Err(self.invalid(
                        at,
                        format!("the same key digest is used by client {other:?}"),
                    ));
                }
                keys.push(ClientKey {
                    digest,
                    expires_at: None,
                });
            }
            for (d, when) in c.key_expires.iter().flatten() {
                let at = format!("clients[{i}].key_expires.{d}");
                let digest = parse_digest(d)
                    .filter(|digest| keys.iter().any(|k| k.digest == *digest))
                    .ok_or_else(|| {
                        self.invalid(at.clone(), "names no digest listed in key_sha256")
                    })?;
                let t = time::OffsetDateTime::parse(
                    when,
                    &time::format_description::well_known::Rfc3339,
                )
                .map_err(|_| {
                    self.invalid(
                        at.clone(),
                        format!("expected an RFC 3339 time such as \"2026-12-31T00:00:00Z\", got {when:?}"),
                    )
                })?;
                if let Some(k) = keys.iter_mut().find(|k| k.digest == digest) {
                    k.expires_at = Some(t.unix_timestamp());
                }
            }
            if !integrations.iter().any(|it| it.name == c.integration) {
                let known: Vec<&str> = integrations.iter().map(|i| i.name.as_str()).collect();
                return Err(self.invalid(
                    key("integration"),
                    format!(
                        "no integration named {:?} (defined: {known:?})",
                        c.integration
                    ),
                ));
            }
            if c.organizations.is_empty() {
                return Err(self.invalid(
                    key("organizations"),
                    "expected at least one Meraki organization ID",
                ));
            }
            for (j, o) in c.organizations.iter().enumerate() {
                if !valid_org_id(o) {
                    return Err(self.invalid(
                        format!("clients[{i}].organizations[{j}]"),
                        format!("expected a Meraki organization ID (digits), got {o:?}"),
                    ));
                }
            }
            let methods = match c.methods {
                None => None,
                Some(ms) => {
                    let mut parsed = Vec::with_capacity(ms.len());
                    for (j, m) in ms.iter().enumerate() {
                        let upper = m.to_ascii_uppercase();
                        if !METHODS.contains(&upper.as_str()) {
                            return Err(self.invalid(
                                format!("clients[{i}].methods[{j}]"),
                                format!("expected one of {METHODS:?}, got {m:?}"),
                            ));
                        }
                        parsed.push(http::Method::from_bytes(upper.as_bytes()).map_err(|_| {
                            self.invalid(format!("clients[{i}].methods[{j}]"), "not an HTTP method")
                        })?);
                    }
                    // HEAD is a GET without a body: allowing GET allows HEAD.
                    if parsed.contains(&http::Method::GET) && !parsed.contains(&http::Method::HEAD)
                    {
                        parsed.push(http::Method::HEAD);
                    }
                    Some(parsed)
                }
            };
            let operations = c
                .operations
                .map(|entries| self.operations(i, &entries))
                .transpose()?;
            let weight = match c.weight {
                None => 1,
                Some(w) if (1..=1000).contains(&w) => w,
                Some(w) => {
                    return Err(self.invalid(
                        key("weight"),
                        format!("expected 1 to 1000 (a share relative to other clients', default 1), got {w}"),
                    ))
                }
            };
            let source_addresses = self.source_addresses(i, c.source_addresses.as_ref())?;
            out.push(Arc::new(Client {
                name: c.name,
                keys,
                cert,
                integration: c.integration,
                organizations: c.organizations,
                methods,
                operations,
                weight,
                source_addresses,
            }));
        }
        Ok(out)
    }

    /// A client certificate is only checked with mutual TLS.
    pub(super) fn client_certs_need_mutual_tls(
        &self,
        clients: &[Arc<Client>],
        tls: Option<&InboundTls>,
    ) -> Result<(), ConfigError> {
        if let Some(i) = clients.iter().position(|c| c.cert.is_some()) {
            if tls.is_none_or(|t| t.client_ca.is_none()) {
                return Err(self.invalid(
                    format!("clients[{i}].cert_subject"),
                    "a client certificate is only checked with mutual TLS: set server.tls_cert_file, tls_key_file and tls_client_ca_file",
                ));
            }
        }
        Ok(())
    }
}

/// Meraki organization IDs are decimal numbers.
pub fn valid_org_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_digit())
}

fn parse_digest(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out).ok()?;
    Some(out)
}
