//! Who may call from where: `[server] trusted_proxies` and `proxy_protocol`, and
//! `[[clients]] source_addresses` (see `crate::source`).

use super::Validator;
use crate::config::{file, ConfigError};
use crate::source::Cidrs;
use ipnet::IpNet;
use std::net::IpAddr;

impl Validator<'_> {
    /// A list of CIDRs (a bare address is its own /32 or /128), each error naming
    /// `key[j]`.
    pub(super) fn cidrs(&self, key: &str, list: &[String]) -> Result<Cidrs, ConfigError> {
        let mut out = Vec::with_capacity(list.len());
        for (j, text) in list.iter().enumerate() {
            let at = format!("{key}[{j}]");
            let t = text.trim();
            let net = match t.parse::<IpNet>() {
                Ok(n) => n,
                Err(_) => match t.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(crate::source::canonical(ip)),
                    Err(_) => {
                        return Err(self.invalid(
                            at,
                            format!("expected an IPv4 or IPv6 network such as \"10.1.2.0/24\" or \"2001:db8::/48\" (or one address), got {text:?}"),
                        ))
                    }
                },
            };
            if net.trunc() != net {
                return Err(self.invalid(
                    at,
                    format!("{net} has host bits set: did you mean {}?", net.trunc()),
                ));
            }
            out.push(net);
        }
        Ok(Cidrs(out))
    }

    /// `[server] trusted_proxies` and `proxy_protocol`.
    pub(super) fn access(&self, server: &file::Server) -> Result<(Cidrs, bool), ConfigError> {
        let trusted = match &server.trusted_proxies {
            None => Cidrs::default(),
            Some(list) => self.cidrs("server.trusted_proxies", list)?,
        };
        let proxy_protocol = server.proxy_protocol.unwrap_or(false);
        if proxy_protocol && trusted.is_empty() {
            return Err(self.invalid(
                "server.proxy_protocol",
                "needs server.trusted_proxies: the load balancers whose PROXY protocol headers are believed",
            ));
        }
        Ok((trusted, proxy_protocol))
    }

    /// `clients[i].source_addresses`.
    pub(super) fn source_addresses(
        &self,
        i: usize,
        list: Option<&Vec<String>>,
    ) -> Result<Option<Cidrs>, ConfigError> {
        let Some(list) = list else {
            return Ok(None);
        };
        let key = format!("clients[{i}].source_addresses");
        if list.is_empty() {
            return Err(self.invalid(
                key,
                "expected at least one network (leave the key out to allow any address)",
            ));
        }
        self.cidrs(&key, list).map(Some)
    }
}
