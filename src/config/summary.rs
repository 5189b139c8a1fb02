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
        if self.trusted_proxies.is_empty() {
            writeln!(f, "client addresses: the connection's peer (no trusted proxies; X-Forwarded-For ignored) (reloadable)")?;
        } else {
            writeln!(
                f,
                "client addresses: X-Forwarded-For believed from trusted proxies [{}]; PROXY protocol {} (reloadable)",
                self.trusted_proxies,
                if self.proxy_protocol { "required from them" } else { "off" }
            )?;
        }
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
                "rate limits: {} requests/s per organization (burst {}), {} requests/s in all ({}); a request waits at most {} ms, {} per client and organization",
                r.organization_rps,
                r.organization_burst,
                r.source_rps,
                if r.source_shared {
                    "shared by a fleet's instances"
                } else {
                    "per instance"
                },
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
        let mut unserved = Unserved::default();
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
                "  {} keys={}{} integration={} organizations=[{}] methods={} operations=[{}] ({effective} of {} API operations allowed) weight={} from={}",
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
                c.weight,
                c.source_addresses
                    .as_ref()
                    .map_or("anywhere".to_owned(), |a| format!("[{a}]"))
            )?;
            unserved.write(f, self, c)?;
        }
        Ok(())
    }
}

/// The operations a client may otherwise run that its integration's configured `scopes`
/// cannot serve, grouped by the scope they need; a client with the same integration,
/// methods and operations as one listed before says so instead of repeating the list.
#[derive(Default)]
struct Unserved {
    /// (integration, methods, operations) → the first client with them.
    seen: Vec<(String, String, String, String)>,
}

impl Unserved {
    fn write(
        &mut self,
        f: &mut fmt::Formatter<'_>,
        config: &Config,
        c: &crate::config::Client,
    ) -> fmt::Result {
        let Some(it) = config.integration(&c.integration) else {
            return Ok(());
        };
        if it.scope_set.is_empty() {
            return writeln!(
                f,
                "    scopes: integration {} lists none; only Meraki's token responses limit operations",
                it.name
            );
        }
        let key = (
            c.integration.clone(),
            format!("{:?}", c.methods),
            format!("{:?}", c.operations),
        );
        if let Some((_, _, _, first)) = self
            .seen
            .iter()
            .find(|(i, m, o, _)| (i, m, o) == (&key.0, &key.1, &key.2))
        {
            return writeln!(
                f,
                "    operations its scopes cannot serve: as for client {first}"
            );
        }
        self.seen.push((key.0, key.1, key.2, c.name.clone()));
        let mut by_scope: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
        for op in crate::endpoints::EndpointTable::builtin().operations() {
            if let Some(need) = op.scope {
                if c.may_use(&op.method) && c.may_run(op) && !it.scope_set.contains(need) {
                    by_scope
                        .entry(need.name())
                        .or_default()
                        .push(&op.operation_id);
                }
            }
        }
        let total: usize = by_scope.values().map(Vec::len).sum();
        if total == 0 {
            return writeln!(f, "    operations its scopes cannot serve: none");
        }
        writeln!(
            f,
            "    operations its scopes cannot serve ({total}, refused with 403 missing_scope unless Meraki's token response grants more):"
        )?;
        for (scope, ops) in by_scope {
            writeln!(f, "      {scope} ({}): {}", ops.len(), ops.join(", "))?;
        }
        Ok(())
    }
}
