//! Forwarding rules that touch the wire: what the request Meraki gets looks like, what the
//! client gets back (hop-by-hop headers, `Link` rewriting so every page leads back through the
//! proxy), and the decision to follow an upstream redirect.

use crate::identity::API_KEY_HEADER;
use http::header::{AUTHORIZATION, HOST, LINK, PROXY_AUTHORIZATION, TE, UPGRADE, USER_AGENT};
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

/// Upstream redirects followed for one request, at most.
pub const MAX_REDIRECTS: u32 = 3;
/// The statuses followed as redirects.
pub const REDIRECTS: &[u16] = &[301, 302, 303, 307, 308];

/// Hop-by-hop headers (RFC 9110 7.6.1) that travel in neither direction; Pingora manages
/// `Connection` and framing itself. Names are parsed once, here, not per request.
const HOP_BY_HOP: [HeaderName; 6] = [
    PROXY_AUTHORIZATION,
    http::header::PROXY_AUTHENTICATE,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    TE,
    UPGRADE,
];
/// Headers that would make a server read another method than the one authorized.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];
/// Credential header names, as servers that fold `_` into `-` (Rack, CGI) read them.
const CREDENTIALS: [&str; 3] = [
    "x-cisco-meraki-api-key",
    "authorization",
    "proxy-authorization",
];

/// How far a request got when its upstream connection failed: what decides whether it may be
/// repeated and what the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPhase {
    /// The request could not be completely written: Meraki cannot have acted on it.
    NotWritten,
    /// Written, then the connection was reset or closed before an answer: it may have been
    /// applied.
    Unanswered,
    /// Written, and no answer within the upstream timeout: it may have been applied.
    TimedOut,
    /// Anything else (a malformed answer, an error of the proxy's own).
    Other,
}

/// The phase of an upstream error.
pub fn fault_phase(etype: &pingora::ErrorType, source: &pingora::ErrorSource) -> FaultPhase {
    use pingora::ErrorType as E;
    if !matches!(source, pingora::ErrorSource::Upstream) {
        return FaultPhase::Other;
    }
    match etype {
        E::WriteError | E::WriteTimedout => FaultPhase::NotWritten,
        E::ReadError | E::ConnectionClosed => FaultPhase::Unanswered,
        E::ReadTimedout => FaultPhase::TimedOut,
        _ => FaultPhase::Other,
    }
}

/// Also dropped from responses: a trailer announcement without the trailers.
const TRAILER: HeaderName = http::header::TRAILER;

/// Turns the client's request header into the one Meraki gets: both inbound credential headers
/// removed (Meraki accepts either, so either would carry the client's key upstream), the bearer
/// attached, `Host` and path set, and the proxy's token appended to the User-Agent.
pub fn prepare_request(
    req: &mut RequestHeader,
    bearer: &HeaderValue,
    authority: &HeaderValue,
    path: &str,
) -> pingora::Result<()> {
    // The credential, hop-by-hop headers, and names that fold (case, `_` for `-`) into a
    // credential or a method override: another server could read them as the client's key or
    // as another method.
    for name in names_where(&req.headers, dropped_upstream) {
        req.remove_header(&name);
    }
    req.insert_header(AUTHORIZATION, bearer.clone())?;
    req.insert_header(HOST, authority.clone())?;
    let uri = path.parse::<http::Uri>().map_err(|_| {
        pingora::Error::explain(
            pingora::ErrorType::InternalError,
            "upstream path is not a valid URI",
        )
    })?;
    req.set_uri(uri);
    let ua = user_agent_value(req.headers.get(USER_AGENT).and_then(|v| v.to_str().ok()));
    req.insert_header(USER_AGENT, ua)?;
    Ok(())
}

/// The header names of `headers` that `drop` picks: one pass over the names present (a
/// request usually carries only its key), cheaper than a lookup and removal attempt for each
/// forbidden name. `keys()` yields each name once, whatever its number of values.
fn names_where(headers: &http::HeaderMap, drop: impl Fn(&HeaderName) -> bool) -> Vec<HeaderName> {
    headers.keys().filter(|n| drop(n)).cloned().collect()
}

/// Whether a client's header never reaches Meraki (see [`prepare_request`]); `Authorization`
/// is replaced, not dropped.
fn dropped_upstream(name: &HeaderName) -> bool {
    if *name == API_KEY_HEADER || HOP_BY_HOP.contains(name) {
        return true;
    }
    let n = name.as_str();
    if n.contains('_') {
        let f = n.replace('_', "-");
        CREDENTIALS.contains(&f.as_str()) || METHOD_OVERRIDES.contains(&f.as_str())
    } else {
        METHOD_OVERRIDES.contains(&n)
    }
}

/// Turns Meraki's response header into the client's: hop-by-hop headers removed, `Link`
/// rewritten to lead back through the proxy (see [`rewrite_link`]).
pub fn prepare_response(
    resp: &mut ResponseHeader,
    upstream_base_path: &str,
) -> pingora::Result<()> {
    prepare_response_for(resp, upstream_base_path, None)
}

/// [`prepare_response`] for a client that reached the proxy at `public_origin`
/// (split-horizon, e.g. `https://api.meraki.com`): `Link` targets become absolute URLs of it
/// (see [`rewrite_link_to`]).
pub fn prepare_response_for(
    resp: &mut ResponseHeader,
    upstream_base_path: &str,
    public_origin: Option<&str>,
) -> pingora::Result<()> {
    for name in names_where(&resp.headers, |n| *n == TRAILER || HOP_BY_HOP.contains(n)) {
        resp.remove_header(&name);
    }
    if let Some(link) = resp.headers.get(LINK).and_then(|v| v.to_str().ok()) {
        match rewrite_link_to(link, upstream_base_path, public_origin) {
            Some(rewritten) => resp.insert_header(LINK, rewritten)?,
            None => {
                resp.remove_header(&LINK);
            }
        }
    }
    Ok(())
}

/// The User-Agent sent upstream: the script's, with the proxy's product token appended (Meraki's
/// `ApplicationName/Version VendorName` convention), so Meraki's API request log shows both.
pub fn user_agent(inbound: Option<&str>) -> String {
    match inbound.map(str::trim) {
        Some(ua) if !ua.is_empty() => {
            let mut s = String::with_capacity(ua.len() + 1 + crate::PRODUCT.len());
            s.push_str(ua);
            s.push(' ');
            s.push_str(crate::PRODUCT);
            s
        }
        _ => crate::PRODUCT.to_owned(),
    }
}

/// [`user_agent`] as the header value forwarded: the product alone (most scripts send none)
/// without an allocation.
fn user_agent_value(inbound: Option<&str>) -> HeaderValue {
    const ALONE: HeaderValue = HeaderValue::from_static(crate::PRODUCT);
    match inbound.map(str::trim) {
        // A header value that was valid text is valid with a suffix of visible ASCII.
        Some(ua) if !ua.is_empty() => HeaderValue::try_from(user_agent(Some(ua))).unwrap_or(ALONE),
        _ => ALONE,
    }
}

/// Rewrites an upstream `Link` header value so that every target leads back through the proxy.
///
/// Each URL whose path lies under the upstream base path (`/api/v1`) becomes the path-absolute
/// reference `/api/v1/<rest>?<query>`, the query copied byte for byte (cursors are opaque). Both
/// kinds of clients then stay on the proxy: RFC 8288 clients resolve it against the request URL
/// (`http://proxy/api/v1/...`), and the official Python SDK, which prefixes any non-Meraki URL
/// with its base URL, requests `http://proxy/api/v1/api/v1/...`, which [`crate::route::parse`]
/// folds back. Links elsewhere are dropped rather than handed to the client. Returns `None`
/// when no link is left.
pub fn rewrite_link(value: &str, upstream_base_path: &str) -> Option<String> {
    rewrite_link_to(value, upstream_base_path, None)
}

/// [`rewrite_link`], with targets made absolute under `public_origin` when one is given: in
/// split-horizon mode the proxy answers as `https://api.meraki.com`, and clients that follow a
/// Meraki-host link as it is (the official SDK's page walks, `meraki-client`) get
/// `https://api.meraki.com/api/v1/<rest>?<query>`, which leads back to the proxy.
#[inline(never)] // its own row in profiles (`bash benches/load.sh callgrind`)
pub fn rewrite_link_to(
    value: &str,
    upstream_base_path: &str,
    public_origin: Option<&str>,
) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let close = after.find('>')?;
        let target = &after[..close];
        let tail = &after[close + 1..];
        // Parameters run to the next comma outside a quoted string.
        // Bytes, not chars: both delimiters are ASCII, which no byte of a multi-byte UTF-8
        // character equals, so `end` is always a character boundary.
        let mut in_quotes = false;
        let mut end = tail.len();
        for (i, b) in tail.bytes().enumerate() {
            match b {
                b'"' => in_quotes = !in_quotes,
                b',' if !in_quotes => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        let params = tail[..end].trim_end();
        if in_quotes || params.bytes().any(|b| b == b'<' || b == b'>') {
            // A malformed value (found by fuzzing: an unterminated quoted string swallowed the
            // next link, which a lenient client would then follow around the proxy): keep the
            // well-formed links before it, drop the rest.
            break;
        }
        rest = tail.get(end + 1..).unwrap_or("");
        if let Some(below) = target_below(target, upstream_base_path) {
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push('<');
            if let Some(origin) = public_origin {
                out.push_str(origin);
            }
            out.push_str("/api/v1");
            out.push_str(below);
            out.push('>');
            out.push_str(params);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// What a `Link` target leads to below the upstream base path (the path's rest and the query,
/// as sent), when it leads there: the proxy's target is `/api/v1` followed by it.
fn target_below<'a>(target: &'a str, base_path: &str) -> Option<&'a str> {
    let path_and_query = if let Some(after_scheme) = target
        .strip_prefix("https://")
        .or_else(|| target.strip_prefix("http://"))
    {
        // Bytes: the delimiters are ASCII, so the position is a character boundary.
        let start = after_scheme
            .bytes()
            .position(|b| matches!(b, b'/' | b'?' | b'#'))
            .unwrap_or(after_scheme.len());
        &after_scheme[start..]
    } else if target.starts_with('/') && !target.starts_with("//") {
        target
    } else {
        return None;
    };
    let below = path_and_query.strip_prefix(base_path)?;
    if !(below.is_empty() || below.starts_with(['/', '?'])) {
        return None;
    }
    Some(below)
}

/// The public origin a client used: the one whose authority is the request's `Host` (the
/// scheme's default port ignored), else the first configured; `None` when none is configured.
pub fn public_origin<'a>(
    origins: &'a [crate::config::PublicOrigin],
    host: Option<&str>,
) -> Option<&'a str> {
    let first = origins.first()?;
    let host = host.map(|h| {
        let h = h.trim().to_ascii_lowercase();
        match h.strip_suffix(":443").or_else(|| h.strip_suffix(":80")) {
            Some(bare) => bare.to_owned(),
            None => h,
        }
    });
    let chosen = host
        .and_then(|h| origins.iter().find(|o| o.authority == h))
        .unwrap_or(first);
    Some(&chosen.origin)
}

/// Where an upstream redirect leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectTarget {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// `Host` header value.
    pub authority: String,
    /// Path and query, as the `Location` gave them.
    pub path_and_query: String,
}

impl RedirectTarget {
    /// `scheme://authority`, to resolve a relative `Location` of a later hop.
    pub fn origin(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.authority
        )
    }
}

/// Why a redirect is not followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedirectError {
    #[error("Meraki redirected to {0}, which is not an allowed upstream host; the redirect was not followed")]
    HostNotAllowed(String),
    #[error("Meraki sent a redirect without a usable Location")]
    BadLocation,
    #[error("Meraki redirected more than {MAX_REDIRECTS} times; not followed")]
    TooMany,
    #[error("Meraki redirected a request whose body is over 64 KiB, which the proxy cannot replay; it was not applied")]
    BodyTooLarge,
}

/// Decides whether to follow a redirect: the target must be allowed ([`redirect_target`]), fewer
/// than [`MAX_REDIRECTS`] followed so far, and the request body still replayable.
pub fn follow(
    location: Option<&str>,
    current: &str,
    allowed: &[String],
    upstream_host: &str,
    followed: u32,
    body_replayable: bool,
) -> Result<RedirectTarget, RedirectError> {
    let location = location
        .filter(|l| !l.trim().is_empty())
        .ok_or(RedirectError::BadLocation)?;
    let target = redirect_target(location, current, allowed, upstream_host)?;
    if followed >= MAX_REDIRECTS {
        return Err(RedirectError::TooMany);
    }
    if !body_replayable {
        return Err(RedirectError::BodyTooLarge);
    }
    Ok(target)
}

/// Decides whether to follow `location`, resolved against `current` (`scheme://authority/path`).
/// A host is allowed when it equals an entry of `allowed` or is a subdomain of one, or when it is
/// the configured upstream host itself.
pub fn redirect_target(
    location: &str,
    current: &str,
    allowed: &[String],
    upstream_host: &str,
) -> Result<RedirectTarget, RedirectError> {
    let base = url::Url::parse(current).map_err(|_| RedirectError::BadLocation)?;
    let url = base
        .join(location.trim())
        .map_err(|_| RedirectError::BadLocation)?;
    let tls = match url.scheme() {
        "https" => true,
        "http" => false,
        _ => return Err(RedirectError::BadLocation),
    };
    let host = url
        .host_str()
        .ok_or(RedirectError::BadLocation)?
        .to_ascii_lowercase();
    let allowed_host = host == upstream_host.to_ascii_lowercase()
        || allowed.iter().any(|a| {
            host == *a
                || host
                    .strip_suffix(a.as_str())
                    .is_some_and(|p| p.ends_with('.'))
        });
    if !allowed_host {
        return Err(RedirectError::HostNotAllowed(host));
    }
    let port = url
        .port_or_known_default()
        .ok_or(RedirectError::BadLocation)?;
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    // Keep the query exactly as sent when the Location is absolute: cursors are opaque.
    let raw = location.trim();
    let path_and_query = match raw
        .strip_prefix("https://")
        .or_else(|| raw.strip_prefix("http://"))
    {
        Some(after) => {
            let start = after.find(['/', '?']).unwrap_or(after.len());
            let pq = after[start..].split('#').next().unwrap_or("");
            if pq.is_empty() {
                "/".to_owned()
            } else {
                pq.to_owned()
            }
        }
        None => match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        },
    };
    Ok(RedirectTarget {
        tls,
        host,
        port,
        authority,
        path_and_query,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_request_carries_only_the_bearer() {
        let mut req = RequestHeader::build("PUT", b"/api/v1/networks/N_1?x=1", None).unwrap();
        req.insert_header("x-cisco-meraki-api-key", "client-key")
            .unwrap();
        req.insert_header("authorization", "Bearer client-key")
            .unwrap();
        req.insert_header("proxy-authorization", "Basic abc")
            .unwrap();
        req.insert_header("user-agent", "script/1.0 Acme").unwrap();
        req.insert_header("x_cisco_meraki_api_key", "client-key")
            .unwrap();
        req.insert_header("x-http-method-override", "DELETE")
            .unwrap();
        req.insert_header("x_http_method_override", "DELETE")
            .unwrap();
        let bearer = HeaderValue::from_static("Bearer access-token");
        prepare_request(
            &mut req,
            &bearer,
            &HeaderValue::from_static("api.meraki.com"),
            "/api/v1/networks/N_1?x=1",
        )
        .unwrap();
        assert!(req.headers.get("x-cisco-meraki-api-key").is_none());
        assert!(req.headers.get("x_cisco_meraki_api_key").is_none());
        assert!(req.headers.get("x-http-method-override").is_none());
        assert!(req.headers.get("x_http_method_override").is_none());
        assert!(req.headers.get("proxy-authorization").is_none());
        assert_eq!(
            req.headers
                .get_all("authorization")
                .iter()
                .collect::<Vec<_>>(),
            [&bearer]
        );
        assert_eq!(req.headers["host"], "api.meraki.com");
        assert_eq!(req.uri.to_string(), "/api/v1/networks/N_1?x=1");
        assert_eq!(
            req.headers["user-agent"],
            format!("script/1.0 Acme {}", crate::PRODUCT)
        );
    }

    #[test]
    fn split_horizon_links_are_absolute_under_the_origin_the_client_used() {
        let up = "<https://n123.meraki.com/api/v1/organizations/1/networks?perPage=5&startingAfter=N_9&t0=2026-11-23T00%3A00%3A00Z>; rel=next, <https://elsewhere.example/x>; rel=help";
        assert_eq!(
            rewrite_link_to(up, "/api/v1", Some("https://api.meraki.com")).unwrap(),
            "<https://api.meraki.com/api/v1/organizations/1/networks?perPage=5&startingAfter=N_9&t0=2026-11-23T00%3A00%3A00Z>; rel=next"
        );
        let origins = [
            crate::config::PublicOrigin {
                origin: "https://api.meraki.com".into(),
                authority: "api.meraki.com".into(),
            },
            crate::config::PublicOrigin {
                origin: "https://api.meraki.ca".into(),
                authority: "api.meraki.ca".into(),
            },
        ];
        assert_eq!(
            public_origin(&origins, Some("API.meraki.ca:443")),
            Some("https://api.meraki.ca")
        );
        assert_eq!(
            public_origin(&origins, Some("evil.example")),
            Some("https://api.meraki.com")
        );
        assert_eq!(
            public_origin(&origins, None),
            Some("https://api.meraki.com")
        );
        assert_eq!(public_origin(&[], Some("api.meraki.ca")), None);
    }

    #[test]
    fn link_urls_come_back_through_the_proxy_with_cursors_untouched() {
        let up = "<https://api.meraki.com/api/v1/organizations/1/networks?perPage=5&startingAfter=0000000000000000>; rel=first, \
                  <https://n123.meraki.com/api/v1/organizations/1/networks?perPage=5&startingAfter=N_9&t0=2026-11-23T00%3A00%3A00Z>; rel=next, \
                  <https://api.meraki.com/api/v1/organizations/1/networks?perPage=5&endingBefore=zzzz>; rel=\"last\"";
        let got = rewrite_link(up, "/api/v1").unwrap();
        assert_eq!(
            got,
            "</api/v1/organizations/1/networks?perPage=5&startingAfter=0000000000000000>; rel=first, \
             </api/v1/organizations/1/networks?perPage=5&startingAfter=N_9&t0=2026-11-23T00%3A00%3A00Z>; rel=next, \
             </api/v1/organizations/1/networks?perPage=5&endingBefore=zzzz>; rel=\"last\""
        );
    }

    #[test]
    fn links_outside_the_api_are_dropped_and_a_stand_in_base_is_mapped() {
        assert_eq!(
            rewrite_link("<https://evil.test/other>; rel=next", "/api/v1"),
            None
        );
        assert_eq!(
            rewrite_link(
                "<mailto:x@y>; rel=next, <http://127.0.0.1:9/base/x?a=1>; rel=\"a,b\"",
                "/base"
            )
            .unwrap(),
            "</api/v1/x?a=1>; rel=\"a,b\""
        );
        assert_eq!(rewrite_link("</api/v1x/y>; rel=next", "/api/v1"), None);
        // An unterminated quoted string must not carry a link around the proxy.
        assert_eq!(
            rewrite_link(
                "<https://api.meraki.com/api/v1/a>; rel=next, <https://api.meraki.com/api/v1/b>; rel=\"x, <https://evil.test/c>; rel=last",
                "/api/v1"
            )
            .unwrap(),
            "</api/v1/a>; rel=next"
        );
    }

    #[test]
    fn redirects_are_followed_a_bounded_number_of_times_with_a_replayable_body() {
        let allowed = vec!["meraki.com".to_string()];
        let go = |n, replayable| {
            follow(
                Some("https://n1.meraki.com/api/v1/x"),
                "https://api.meraki.com/api/v1/x",
                &allowed,
                "api.meraki.com",
                n,
                replayable,
            )
        };
        assert!(go(0, true).is_ok() && go(MAX_REDIRECTS - 1, true).is_ok());
        assert_eq!(go(MAX_REDIRECTS, true), Err(RedirectError::TooMany));
        assert_eq!(go(0, false), Err(RedirectError::BodyTooLarge));
        assert_eq!(
            follow(
                None,
                "https://api.meraki.com/",
                &allowed,
                "api.meraki.com",
                0,
                true
            ),
            Err(RedirectError::BadLocation)
        );
    }

    #[test]
    fn responses_lose_hop_by_hop_headers_and_links_lead_back() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("keep-alive", "timeout=5").unwrap();
        resp.insert_header("trailer", "x").unwrap();
        resp.insert_header("x-request-id", "abc").unwrap();
        resp.insert_header(
            "link",
            "<https://api.meraki.com/api/v1/organizations/1/networks?startingAfter=a>; rel=next",
        )
        .unwrap();
        prepare_response(&mut resp, "/api/v1").unwrap();
        assert!(resp.headers.get("keep-alive").is_none() && resp.headers.get("trailer").is_none());
        assert_eq!(resp.headers["x-request-id"], "abc");
        assert_eq!(
            resp.headers["link"],
            "</api/v1/organizations/1/networks?startingAfter=a>; rel=next"
        );
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("link", "<https://evil.test/x>; rel=next")
            .unwrap();
        prepare_response(&mut resp, "/api/v1").unwrap();
        assert!(resp.headers.get("link").is_none());
    }

    #[test]
    fn redirects_only_to_allowed_hosts() {
        let allowed = vec!["meraki.com".to_string()];
        let t = redirect_target(
            "https://n42.meraki.com/api/v1/organizations/1?startingAfter=a%2Fb",
            "https://api.meraki.com/api/v1/organizations/1",
            &allowed,
            "api.meraki.com",
        )
        .unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.tls),
            ("n42.meraki.com", 443, true)
        );
        assert_eq!(
            t.path_and_query,
            "/api/v1/organizations/1?startingAfter=a%2Fb"
        );
        let rel = redirect_target(
            "/api/v1/x",
            "http://127.0.0.1:8000/api/v1/y",
            &allowed,
            "127.0.0.1",
        )
        .unwrap();
        assert_eq!(
            (rel.authority.as_str(), rel.path_and_query.as_str()),
            ("127.0.0.1:8000", "/api/v1/x")
        );
        for bad in [
            "https://meraki.com.evil.test/x",
            "https://evilmeraki.com/x",
            "https://evil.test/api/v1",
        ] {
            assert!(
                matches!(
                    redirect_target(bad, "https://api.meraki.com/", &allowed, "api.meraki.com"),
                    Err(RedirectError::HostNotAllowed(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(
            redirect_target(
                "ftp://meraki.com/x",
                "https://api.meraki.com/",
                &allowed,
                "api.meraki.com"
            ),
            Err(RedirectError::BadLocation)
        );
    }
}
