//! The summary `check` prints: what the configuration does, without secrets.

use super::{describe_pg_url, Config, UnknownEndpoints};
use std::fmt;

impl fmt::Display for Config {
    /// A summary without secrets, printed by `check`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "config: {}", self.source.display())?;
        match &self.tls {
            None => writeln!(f, "proxy listener: http://{}/api/v1", self.listen)?,
            Some(t) => {
                writeln!(
                    f,
                    "proxy listener: https://{}/api/v1 (certificate {} for {}, expires {}, sha256 {})",
                    self.listen,
                    t.cert.subject,
                    t.cert.names.join(", "),
                    crate::clock::rfc3339(t.cert.not_after),
                    &t.cert.fingerprint[..16]
                )?;
                if let Some(ca) = &t.client_ca {
                    writeln!(
                        f,
                        "mutual TLS: client certificates from {} ({} CA certificates), {}",
                        ca.path.display(),
                        ca.count,
                        if t.client_cert_required {
                            "required"
                        } else {
                            "optional"
                        }
                    )?;
                }
            }
        }
        if !self.public_origins.is_empty() {
            let list: Vec<&str> = self
                .public_origins
                .iter()
                .map(|o| o.origin.as_str())
                .collect();
            writeln!(f, "answers as (Link targets): {}", list.join(", "))?;
        }
        match self.admin_listen {
            Some(a) => writeln!(
                f,
                "admin listener: http://{a}/ (/metrics, /healthz, /readyz)"
            )?,
            None => writeln!(f, "admin listener: off")?,
        }
        writeln!(f, "worker threads: {}", self.threads)?;
        let l = &self.client_limits;
        writeln!(
            f,
            "client timeouts: header {} s, body progress {} s, idle keep-alive {} s, whole request {} s (reloadable)",
            l.header_timeout.as_secs(),
            l.body_timeout.as_secs(),
            l.idle_timeout.as_secs(),
            l.request_timeout.as_secs()
        )?;
        writeln!(
            f,
            "connections: at most {} open, {} per peer address (reloadable)",
            l.max_connections, l.max_connections_per_peer
        )?;
        writeln!(f, "upstream: {}", self.upstream.api_base)?;
        writeln!(f, "token endpoint: {}", self.upstream.token_url)?;
        if let Some(ca) = &self.upstream.ca {
            writeln!(
                f,
                "outbound TLS trusts: the platform store and {} ({} certificates)",
                ca.path.display(),
                ca.certs.len()
            )?;
        }
        match &self.upstream.egress {
            Some(e) => writeln!(f, "egress proxy (HTTPS, CONNECT): {}", e.url)?,
            None => writeln!(f, "egress proxy: none (direct connections)")?,
        }
        for (host, ip) in &self.upstream.resolve {
            writeln!(f, "resolves {host} to {ip}")?;
        }
        writeln!(
            f,
            "redirects allowed to: {}",
            self.upstream.redirect_hosts.join(", ")
        )?;
        match &self.store_url {
            Some(url) => writeln!(
                f,
                "token store: PostgreSQL {} (pool {}, sync every {} s; tokens sealed with key {:?})",
                describe_pg_url(url),
                self.store_pool_size,
                self.store_sync.as_secs(),
                self.store_key
            )?,
            None => writeln!(
                f,
                "token store: {} (tokens sealed with key {:?})",
                self.store_path.display(),
                self.store_key
            )?,
        }
        match &self.audit_path {
            Some(p) => writeln!(f, "audit log: {}", p.display())?,
            None => writeln!(f, "audit log: stdout")?,
        }
        write!(f, "{}", self.audit)?;
        writeln!(f, "integrations ({}):", self.integrations.len())?;
        for it in &self.integrations {
            writeln!(
                f,
                "  {} client_id={} secret={} scopes=[{}]",
                it.name,
                it.client_id,
                it.client_secret,
                it.scopes.join(" ")
            )?;
        }
        let table = crate::endpoints::EndpointTable::builtin();
        writeln!(
            f,
            "API table: meraki-sdk {} ({} operations); unknown endpoints: {}",
            table.sdk_version(),
            table.len(),
            match self.unknown_endpoints {
                UnknownEndpoints::Deny => "refused (404)",
                UnknownEndpoints::Allow => "forwarded",
            }
        )?;
        let r = &self.rate_limits;
        if r.enabled {
            writeln!(
                f,
                "rate limits: {} requests/s per organization (burst {}), {} requests/s in all; a request waits at most {} ms, {} per client and organization",
                r.organization_rps,
                r.organization_burst,
                r.source_rps,
                r.max_wait.as_millis(),
                r.queue_per_client
            )?;
        } else {
            writeln!(f, "rate limits: off (requests are not shaped)")?;
        }
        let m = &self.metrics;
        writeln!(
            f,
            "metrics: per client {}{}, per organization {}{}",
            m.per_client.as_str(),
            if m.per_client == crate::config::Detail::Top {
                format!(" ({})", m.top_clients)
            } else {
                String::new()
            },
            m.per_organization.as_str(),
            if m.per_organization == crate::config::Detail::Top {
                format!(" ({})", m.top_organizations)
            } else {
                String::new()
            },
        )?;
        writeln!(f, "clients ({}):", self.clients.len())?;
        for c in &self.clients {
            let methods = match &c.methods {
                None => "all".to_string(),
                Some(m) => m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(","),
            };
            let operations = match &c.operations {
                None => "all".to_string(),
                Some(o) => o
                    .rules()
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            };
            // Effective: what the method list and the operation list together allow.
            let effective = table
                .operations()
                .filter(|op| c.may_use(&op.method) && c.may_run(op))
                .count();
            let now = crate::clock::now_unix();
            let expiring: Vec<String> = c
                .keys
                .iter()
                .filter_map(|k| k.expires_at)
                .map(|t| {
                    if t <= now {
                        format!("a key expired {}", crate::clock::rfc3339(t))
                    } else {
                        format!("a key expires {}", crate::clock::rfc3339(t))
                    }
                })
                .collect();
            writeln!(
                f,
                "  {} keys={}{} integration={} organizations=[{}] methods={} operations=[{}] ({effective} of {} API operations allowed) weight={}",
                c.name,
                c.keys.len(),
                if expiring.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", expiring.join(", "))
                },
                c.integration,
                c.organizations.join(","),
                methods,
                operations,
                table.len(),
                c.weight
            )?;
        }
        Ok(())
    }
}
