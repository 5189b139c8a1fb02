//! The client's address: which host a request comes from, as `[[clients]] source_addresses`
//! is checked against and every audit record names (`client_address`).
//!
//! It is the connection's peer (with PROXY protocol, the address a trusted load balancer
//! reported: `proxy/proxy_protocol.rs`), unless that peer is one of `[server] trusted_proxies`:
//! then `X-Forwarded-For` is read from the right, each trusted hop giving way to the address it
//! names, and the first address that is not a trusted proxy is the client's. Only the trusted
//! proxies' own entries are believed: whatever a client wrote further left is never reached
//! while an untrusted hop stands in between. An entry that is not an address stops the walk at
//! the nearest trusted hop. IPv4-mapped IPv6 addresses count as the IPv4 address.

use http::header::HeaderMap;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// The header load balancers and reverse proxies append the address they served to.
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// A list of CIDRs, checked by linear scan (a client lists a handful).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cidrs(pub Vec<IpNet>);

impl Cidrs {
    /// Whether `ip` is in one of the networks.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for Cidrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

/// `ip`, with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address.
#[inline]
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address: `peer`, or, when `peer` is a trusted proxy, the rightmost address of
/// `X-Forwarded-For` that is not one.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &Cidrs) -> IpAddr {
    let mut addr = canonical(peer);
    if trusted.is_empty() || !trusted.contains(addr) {
        return addr;
    }
    // Several X-Forwarded-For fields are one list, in order (RFC 9110 5.3): walk them from
    // the last field's last entry.
    for field in headers.get_all(X_FORWARDED_FOR).iter().rev() {
        let Ok(text) = field.to_str() else {
            return addr;
        };
        for entry in text.rsplit(',') {
            match parse_entry(entry) {
                Some(ip) => addr = ip,
                None => return addr,
            }
            if !trusted.contains(addr) {
                return addr;
            }
        }
    }
    addr
}

/// An `X-Forwarded-For` entry: an address, optionally with a port (`a.b.c.d:p`, `[v6]:p`).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let e = entry.trim();
    let ip = e
        .parse::<IpAddr>()
        .ok()
        .or_else(|| e.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            e.strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|r| r.parse().ok())
        })?;
    Some(canonical(ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cidrs(list: &[&str]) -> Cidrs {
        Cidrs(list.iter().map(|c| c.parse().unwrap()).collect())
    }

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append(X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = cidrs(&["10.0.0.0/24", "2001:db8::/64"]);
        for (peer, xff, want, why) in [
            (
                "192.0.2.7",
                &["198.51.100.1"][..],
                "192.0.2.7",
                "untrusted peer: header ignored",
            ),
            (
                "10.0.0.5",
                &[][..],
                "10.0.0.5",
                "trusted peer without header: the peer",
            ),
            ("10.0.0.5", &["198.51.100.1"][..], "198.51.100.1", "one hop"),
            (
                "10.0.0.5",
                &["203.0.113.9, 198.51.100.1"][..],
                "198.51.100.1",
                "spoofed left entry not reached",
            ),
            (
                "10.0.0.5",
                &["203.0.113.9, 198.51.100.1, 10.0.0.6"][..],
                "198.51.100.1",
                "two trusted hops",
            ),
            (
                "10.0.0.5",
                &["203.0.113.9", "198.51.100.1,10.0.0.6"][..],
                "198.51.100.1",
                "several fields are one list",
            ),
            (
                "10.0.0.5",
                &["10.0.0.7, 10.0.0.6"][..],
                "10.0.0.7",
                "all trusted: the leftmost",
            ),
            (
                "10.0.0.5",
                &["203.0.113.9, unknown"][..],
                "10.0.0.5",
                "garbage stops at the nearest trusted hop",
            ),
            (
                "10.0.0.5",
                &["203.0.113.9, garbage, 10.0.0.6"][..],
                "10.0.0.6",
                "garbage behind a trusted hop",
            ),
            (
                "10.0.0.5",
                &["198.51.100.1:4711"][..],
                "198.51.100.1",
                "with a port",
            ),
            (
                "10.0.0.5",
                &["[2001:db8:1::1]:4711"][..],
                "2001:db8:1::1",
                "IPv6 with a port",
            ),
            (
                "10.0.0.5",
                &["[2001:db8:1::2]"][..],
                "2001:db8:1::2",
                "IPv6 in brackets",
            ),
            (
                "2001:db8::9",
                &["::ffff:198.51.100.3"][..],
                "198.51.100.3",
                "IPv4-mapped entry",
            ),
            (
                "::ffff:10.0.0.5",
                &["198.51.100.4"][..],
                "198.51.100.4",
                "IPv4-mapped peer is trusted as IPv4",
            ),
            ("10.0.0.5", &[""][..], "10.0.0.5", "empty header"),
        ] {
            let got = client_address(ip(peer), &headers(xff), &trusted);
            assert_eq!(got, ip(want), "{why}: {peer} {xff:?}");
        }
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client() {
        let got = client_address(
            ip("10.0.0.5"),
            &headers(&["198.51.100.1"]),
            &Cidrs::default(),
        );
        assert_eq!(got, ip("10.0.0.5"));
        assert_eq!(canonical(ip("::ffff:127.0.0.2")), ip("127.0.0.2"));
        assert!(cidrs(&["127.0.0.2/32"]).contains(ip("127.0.0.2")));
        assert!(!cidrs(&["127.0.0.2/32"]).contains(ip("127.0.0.3")));
        assert_eq!(
            cidrs(&["10.0.0.0/8", "::1/128"]).to_string(),
            "10.0.0.0/8, ::1/128"
        );
    }
}
