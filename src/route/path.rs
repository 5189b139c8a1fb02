//! Parsing and normalizing a request path: pure, no I/O.

use super::RouteError;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

/// Characters encoded when a decoded segment is written back into a path.
pub(super) const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}')
    .add(b'[')
    .add(b']');

/// A byte that percent-decoding leaves as it is, that [`segment`] never refuses and that
/// [`SEGMENT`] does not encode: a segment of these alone is its own decoding and its own
/// re-encoding (the fast path of [`parse`]; `plain_bytes_are_their_own_spelling` checks it).
fn plain(b: u8) -> bool {
    matches!(b,
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9'
        | b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')'
        | b'*' | b'+' | b',' | b'=' | b':' | b'@')
}

/// What the path acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `GET /organizations`: answered by the proxy with the client's organizations.
    OrganizationList,
    /// `/organizations/{id}/...`
    Organization(String),
    /// `/networks/{id}/...`
    Network(String),
    /// `/devices/{serial}/...`
    Device(String),
    /// Anything else: refused.
    Unscoped,
}

/// A normalized request path below `/api/v1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The path to append to the upstream API base, re-encoded, starting with `/`.
    pub path: String,
    /// What it acts on.
    pub target: Target,
    /// The decoded segments below the API base, as forwarded (the collection name in the
    /// spelling that was authorized): what Meraki's API table is matched against.
    pub segments: Vec<String>,
}

/// Normalizes a request path (without query) and finds its target.
pub fn parse(raw_path: &str, method: &http::Method) -> Result<Route, RouteError> {
    // Meraki's paths have a dozen segments at most (with `/api/v1`): one allocation.
    let mut segments: Vec<String> = Vec::with_capacity(12);
    for raw in raw_path.split('/') {
        if raw.is_empty() {
            continue;
        }
        segments.push(segment(raw)?);
    }
    strip_api_prefix(&segments).ok_or(RouteError::NotUnderApi)?;
    // A Link rewritten by the proxy is `/api/v1/...`; the official SDK appends it to its base
    // URL (`.../api/v1`), so the prefix arrives twice. Meraki has no `/api/v1/api/v1` paths.
    let prefix = if strip_api_prefix(&segments[2..]).is_some() {
        4
    } else {
        2
    };
    if strip_api_prefix(&segments[prefix..]).is_some() {
        // Folded once for the SDK; a third prefix is no path a client has a reason to send,
        // and folding it again would make the forwarded path mean something else.
        return Err(RouteError::Malformed("repeated /api/v1 prefix"));
    }
    segments.drain(..prefix);
    let rest = &segments[..];

    let collection = rest.first().map(|s| s.to_ascii_lowercase());
    let id = rest.get(1).cloned();
    if id
        .as_deref()
        .is_some_and(|id| id.chars().any(char::is_whitespace))
    {
        // No Meraki id holds a space, and URL parsers trim or fold them (the same rule as for
        // action-batch resources; a property test found a case).
        return Err(RouteError::Malformed("whitespace in an id"));
    }
    let target = match (collection.as_deref(), id) {
        (Some("organizations"), None)
            if rest.len() == 1 && (method == http::Method::GET || method == http::Method::HEAD) =>
        {
            Target::OrganizationList
        }
        (Some("organizations"), Some(id)) => Target::Organization(id),
        (Some("networks"), Some(id)) => Target::Network(id),
        (Some("devices"), Some(id)) => Target::Device(id),
        _ => Target::Unscoped,
    };

    let mut path = String::with_capacity(raw_path.len());
    for (i, seg) in rest.iter().enumerate() {
        path.push('/');
        // The collection name is forwarded in the spelling that was authorized.
        if i == 0
            && collection.is_some()
            && matches!(
                target,
                Target::Organization(_)
                    | Target::Network(_)
                    | Target::Device(_)
                    | Target::OrganizationList
            )
        {
            path.push_str(collection.as_deref().unwrap_or(seg));
        } else {
            if seg.bytes().all(plain) {
                path.push_str(seg);
            } else {
                path.extend(utf8_percent_encode(seg, SEGMENT));
            }
        }
    }
    if path.is_empty() {
        path.push('/');
    }
    if let (Some(first), Some(c)) = (segments.first_mut(), collection) {
        *first = c;
    }
    Ok(Route {
        path,
        target,
        segments,
    })
}

/// Decodes one path segment, refusing every spelling that another parser could read as a
/// different path: the proxy authorizes and forwards only canonical paths. Ids the official SDK
/// percent-encodes (a MAC address's `%3A`) decode to themselves and pass.
fn segment(raw: &str) -> Result<String, RouteError> {
    if raw.bytes().all(plain) {
        // Nearly every segment: it decodes to itself and passes every check below but the last.
        if raw == "." || raw == ".." {
            return Err(RouteError::Malformed("dot segment in path"));
        }
        return Ok(raw.to_owned());
    }
    if raw.contains([';', '\\']) {
        // Matrix parameters (`..;`) and backslashes: servers disagree on what they mean.
        return Err(RouteError::Malformed("';' or '\\' in path"));
    }
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| RouteError::Malformed("invalid percent-encoding"))?;
    if decoded.contains(['/', '\\']) {
        return Err(RouteError::Malformed("encoded slash in path"));
    }
    if decoded.contains(['%', '?', '#', ';']) {
        // `%252e` is `%2e` after one decoding and `.` after two.
        return Err(RouteError::Malformed(
            "percent-encoded '%', '?', '#' or ';' in path",
        ));
    }
    if decoded.chars().any(char::is_control) {
        return Err(RouteError::Malformed("control character in path"));
    }
    if !decoded.is_ascii() {
        // Unicode look-alikes (a fullwidth dot) normalize to ASCII in some servers.
        return Err(RouteError::Malformed("non-ASCII character in path"));
    }
    if decoded == "." || decoded == ".." {
        return Err(RouteError::Malformed("dot segment in path"));
    }
    Ok(decoded.into_owned())
}

/// Checks that an action batch resource is canonical: what the proxy checks is byte for byte
/// what Meraki receives in the body, so no query, fragment, empty or dot segment, and no
/// spelling [`parse`] would refuse in a request path.
pub fn canonical_resource(resource: &str) -> Result<(), RouteError> {
    let bad = |why: &'static str| RouteError::NonCanonicalResource {
        resource: resource.chars().take(200).collect(),
        why,
    };
    let Some(rest) = resource.strip_prefix('/') else {
        return Err(bad("it does not start with '/'"));
    };
    if resource.contains(['?', '#']) {
        return Err(bad("it has a query or fragment"));
    }
    if resource
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        // URL parsers trim or drop these (found by fuzzing: a trailing space).
        return Err(bad("it contains whitespace or a control character"));
    }
    for raw in rest.split('/') {
        if raw.is_empty() {
            return Err(bad("it has an empty segment"));
        }
        let decoded = segment(raw).map_err(|e| match e {
            RouteError::Malformed(why) => bad(why),
            other => other,
        })?;
        if decoded.chars().any(char::is_whitespace) {
            // Encoded (`%20`): the same rule, after decoding.
            return Err(bad("it contains whitespace or a control character"));
        }
    }
    Ok(())
}

fn strip_api_prefix(segments: &[String]) -> Option<&[String]> {
    match segments {
        [api, v1, rest @ ..]
            if api.eq_ignore_ascii_case("api") && v1.eq_ignore_ascii_case("v1") =>
        {
            Some(rest)
        }
        _ => None,
    }
}

/// An action batch body is checked whole before it is forwarded, from Pingora's retry buffer,
/// so bodies above that buffer (64 KiB) are refused. Meraki's batches hold at most 20
/// (synchronous) or 100 actions: well below.
pub const MAX_BATCH_BODY: usize = 64 * 1024;

impl Route {
    /// `POST /organizations/{id}/actionBatches`: its body names resources to check.
    pub fn is_action_batch(&self, method: &http::Method) -> bool {
        method == http::Method::POST
            && matches!(self.target, Target::Organization(_))
            && self
                .path
                .split('/')
                .nth(3)
                .is_some_and(|s| s.eq_ignore_ascii_case("actionBatches"))
            && self.path.split('/').count() == 4
    }
}

/// The `resource` paths of an action batch body.
pub fn batch_resources(body: &[u8]) -> Result<Vec<String>, RouteError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| RouteError::BadActionBatch("the body is not JSON"))?;
    let actions = v
        .get("actions")
        .and_then(|a| a.as_array())
        .ok_or(RouteError::BadActionBatch("no \"actions\" list"))?;
    actions
        .iter()
        .map(|a| {
            a.get("resource")
                .and_then(|r| r.as_str())
                .map(str::to_owned)
                .ok_or(RouteError::BadActionBatch(
                    "an action has no \"resource\" string",
                ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn get(p: &str) -> Result<Route, RouteError> {
        parse(p, &Method::GET)
    }

    /// The full checks of `segment`, without its fast path.
    fn slow_segment(raw: &str) -> Result<String, RouteError> {
        let decoded = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| RouteError::Malformed("invalid percent-encoding"))?;
        let refused = raw.contains([';', '\\'])
            || decoded.contains(['/', '\\', '%', '?', '#', ';'])
            || decoded.chars().any(char::is_control)
            || !decoded.is_ascii()
            || decoded == "."
            || decoded == "..";
        if refused {
            return Err(RouteError::Malformed("refused"));
        }
        Ok(decoded.into_owned())
    }

    #[test]
    fn plain_bytes_are_their_own_spelling() {
        let mut plain_count = 0;
        for b in 0u8..=255 {
            if !plain(b) {
                continue;
            }
            plain_count += 1;
            let raw = format!("a{}b", b as char);
            // Decoded to itself, never refused, and not re-encoded.
            assert_eq!(
                slow_segment(&raw).as_deref(),
                Ok(raw.as_str()),
                "byte {b:#04x}"
            );
            assert_eq!(segment(&raw).as_deref(), Ok(raw.as_str()), "byte {b:#04x}");
            assert_eq!(
                utf8_percent_encode(&raw, SEGMENT).to_string(),
                raw,
                "byte {b:#04x}"
            );
        }
        // The unreserved characters and the sub-delimiters but ';', with ':' and '@'.
        assert_eq!(plain_count, 26 * 2 + 10 + 4 + 10 + 2);
        for dots in [".", ".."] {
            assert!(segment(dots).is_err(), "{dots}");
        }
        // A segment with any other byte takes the full path and gets its verdict.
        for raw in ["a%2Fb", "a;b", "a%3Ab", "%2e", "a b", "caf\u{e9}"] {
            assert_eq!(segment(raw).is_ok(), slow_segment(raw).is_ok(), "{raw}");
        }
    }

    #[test]
    fn targets() {
        assert_eq!(
            get("/api/v1/organizations").unwrap().target,
            Target::OrganizationList
        );
        assert_eq!(
            parse("/api/v1/organizations", &Method::POST)
                .unwrap()
                .target,
            Target::Unscoped
        );
        assert_eq!(
            get("/api/v1/organizations/123/networks").unwrap().target,
            Target::Organization("123".into())
        );
        assert_eq!(
            get("/api/v1/networks/L_1/clients").unwrap().target,
            Target::Network("L_1".into())
        );
        assert_eq!(
            get("/api/v1/devices/Q2XX-AAAA-BBBB").unwrap().target,
            Target::Device("Q2XX-AAAA-BBBB".into())
        );
        assert_eq!(
            get("/api/v1/administered/identities/me").unwrap().target,
            Target::Unscoped
        );
        assert_eq!(get("/api/v1").unwrap().target, Target::Unscoped);
        assert_eq!(
            get("/v1/organizations").unwrap_err(),
            RouteError::NotUnderApi
        );
    }

    #[test]
    fn tricks_cannot_change_the_organization() {
        // Each of these would reach organization 999 if taken naively; the target and the
        // forwarded path must agree.
        let cases = ["//api//v1//organizations//999", "/API/V1/Organizations/999"];
        for c in cases {
            let r = get(c).unwrap();
            assert_eq!(r.target, Target::Organization("999".into()), "{c}");
            assert!(
                r.path.starts_with("/organizations/999"),
                "{c} -> {}",
                r.path
            );
        }
        assert_eq!(
            get("/api/v1/organizations/123%2F..%2F999").unwrap_err(),
            RouteError::Malformed("encoded slash in path")
        );
        assert_eq!(
            get("/api/v1/organizations/123%5C999").unwrap_err(),
            RouteError::Malformed("encoded slash in path")
        );
        // Dot segments, double encoding, matrix parameters, look-alikes: refused, not resolved.
        for bad in [
            "/api/v1/organizations/123/../999/networks",
            "/api/v1/organizations/123/%2e%2e/999/networks",
            "/api/v1/organizations/123/networks/../../999",
            "/api/v1/organizations/123/%252e%252e/999",
            "/api/v1/organizations/123/..;/999",
            "/api/v1/organizations/123;x=1/networks",
            "/api/v1/organizations/123/\u{ff0e}\u{ff0e}/999",
            "/api/v1/organizations/123/%EF%BC%8E%EF%BC%8E/999",
            "/api/v1/organizations/123%3F/networks",
            "/api/v1/organizations/123%23/networks",
            "/api/../../etc",
        ] {
            assert!(matches!(get(bad), Err(RouteError::Malformed(_))), "{bad}");
        }
        // The SDK's percent-encoded MAC address passes, decoded once.
        assert_eq!(
            get("/api/v1/networks/N_1/clients/00%3A11%3A22%3A33%3A44%3A55")
                .unwrap()
                .path,
            "/networks/N_1/clients/00:11:22:33:44:55"
        );
        assert!(matches!(
            get("/api/v1/organizations/%ff").unwrap_err(),
            RouteError::Malformed(_)
        ));
        assert!(matches!(
            get("/api/v1/organizations/1%00").unwrap_err(),
            RouteError::Malformed(_)
        ));
    }

    #[test]
    fn forwarded_path_is_reencoded_and_prefix_doubling_is_undone() {
        assert_eq!(
            get("/api/v1/networks/L_1/a%20b").unwrap().path,
            "/networks/L_1/a%20b"
        );
        assert_eq!(
            get("/api/v1/api/v1/organizations/1/networks").unwrap().path,
            "/organizations/1/networks"
        );
        // Found by fuzzing: a third prefix used to route as "api" (refused) while its forwarded
        // form would fold again into a network.
        assert_eq!(
            get("/api/v1//api/v1/api/v1/networks/L_1").unwrap_err(),
            RouteError::Malformed("repeated /api/v1 prefix")
        );
    }
}
