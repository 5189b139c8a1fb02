//! `[upstream]`: where Meraki is, redirects, the lookup cache, extra CA roots (read by
//! [`crate::tls::CaBundle::load`]), the egress proxy and pinned addresses.

use super::{secs, Validator};
use crate::config::{file, ConfigError, UpstreamConfig, MERAKI_API_DOMAINS};

impl Validator<'_> {
    /// The `[upstream]` section.
    pub(super) fn upstream(&self, up: &mut file::Upstream) -> Result<UpstreamConfig, ConfigError> {
        let api_base = self.url("upstream.api_base", &up.api_base)?;
        if api_base.query().is_some() || api_base.fragment().is_some() {
            return Err(self.invalid(
                "upstream.api_base",
                "expected a base such as \"https://api.meraki.com/api/v1\", without query or fragment",
            ));
        }
        let token_url = self.url("upstream.token_url", &up.token_url)?;
        let authorize_url = up
            .authorize_url
            .as_deref()
            .map(|u| self.url("upstream.authorize_url", u))
            .transpose()?;
        let revoke_url = up
            .revoke_url
            .as_deref()
            .map(|u| self.url("upstream.revoke_url", u))
            .transpose()?;
        let egress = self.egress(up)?;
        let redirect_hosts = match up.redirect_hosts.take() {
            Some(hosts) => {
                for (i, h) in hosts.iter().enumerate() {
                    if h.is_empty() || h.contains(['/', ':', ' ']) {
                        return Err(self.invalid(
                            format!("upstream.redirect_hosts[{i}]"),
                            format!(
                                "expected a host name or domain such as \"meraki.com\", got {h:?}"
                            ),
                        ));
                    }
                }
                hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect()
            }
            None => MERAKI_API_DOMAINS.iter().map(|s| s.to_string()).collect(),
        };
        Ok(UpstreamConfig {
            api_base,
            token_url,
            authorize_url,
            revoke_url,
            redirect_hosts,
            lookup_cache_ttl: secs(up.lookup_cache_ttl_secs.unwrap_or(600)),
            lookup_cache_capacity: up.lookup_cache_capacity.unwrap_or(100_000),
            ca: up
                .ca_file
                .as_deref()
                .map(|f| {
                    crate::tls::CaBundle::load(&self.path(f))
                        .map_err(|e| self.invalid("upstream.ca_file", crate::report::chain(&e)))
                })
                .transpose()?,
            egress,
            resolve: self.resolve(up.resolve.as_ref())?,
        })
    }

    /// `[upstream] egress_proxy` and `no_proxy`, by default from `HTTPS_PROXY`/`NO_PROXY`.
    fn egress(&self, up: &file::Upstream) -> Result<Option<crate::egress::Egress>, ConfigError> {
        let env = |a: &str, b: &str| {
            (self.env)(a)
                .or_else(|| (self.env)(b))
                .filter(|v| !v.trim().is_empty())
        };
        let no_proxy: Vec<String> = match &up.no_proxy {
            Some(list) => list.clone(),
            None => env("NO_PROXY", "no_proxy").into_iter().collect(),
        };
        let (value, key, from_env) = match up.egress_proxy.as_deref().map(str::trim) {
            Some("" | "none") => return Ok(None),
            Some(v) => (v.to_owned(), "upstream.egress_proxy", false),
            None => match env("HTTPS_PROXY", "https_proxy") {
                Some(v) => (v, "upstream.egress_proxy (from HTTPS_PROXY)", true),
                None => return Ok(None),
            },
        };
        crate::egress::Egress::parse(&value, &no_proxy, from_env)
            .map(Some)
            .map_err(|e| self.invalid(key, e.to_string()))
    }

    /// `[upstream] resolve`: host name → IP address.
    fn resolve(
        &self,
        raw: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Result<std::collections::BTreeMap<String, std::net::IpAddr>, ConfigError> {
        let mut out = std::collections::BTreeMap::new();
        for (host, ip) in raw.into_iter().flatten() {
            let key = format!("upstream.resolve.{host}");
            if host.is_empty() || host.contains(['/', ':', ' ']) {
                return Err(self.invalid(key, "expected a host name such as \"api.meraki.com\""));
            }
            let ip: std::net::IpAddr = ip.trim().parse().map_err(|_| {
                self.invalid(key.clone(), format!("expected an IP address, got {ip:?}"))
            })?;
            out.insert(host.to_ascii_lowercase(), ip);
        }
        Ok(out)
    }
}
