//! Which organization a request acts on.
//!
//! The path is normalized first (percent-decoding, dot segments, doubled slashes, case of the
//! collection name) and the path that is authorized is the very path that is forwarded, so no
//! spelling trick can move a request into another organization. Requests whose organization
//! cannot be determined are refused: the proxy never forwards what it cannot authorize.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use std::sync::Arc;
use std::time::Duration;

/// Characters encoded when a decoded segment is written back into a path.
const SEGMENT: &AsciiSet = &CONTROLS
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

/// Why a request could not be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// A path the proxy refuses to interpret (encoded slash, invalid encoding, `..` above root).
    #[error("malformed request path: {0}")]
    Malformed(&'static str),
    /// Not under `/api/v1`.
    #[error("not found: the proxy serves the Meraki Dashboard API under /api/v1")]
    NotUnderApi,
    /// A path that names no organization, network or device.
    #[error(
        "the proxy cannot tell which organization this request acts on, so it is not forwarded"
    )]
    NoOrganization,
    /// An organization the client may not touch.
    #[error("organization {0} is not one this client may access")]
    ForbiddenOrganization(String),
    /// A network or device not found in any of the client's organizations.
    #[error("{kind} {id} is not in an organization this client may access")]
    NotInClientOrganizations { kind: &'static str, id: String },
    /// An action batch names a resource outside the batch's organization.
    #[error("action batch resource {resource} is not in organization {org}")]
    ActionOutsideOrganization { resource: String, org: String },
    /// An action batch resource that is not canonical.
    #[error("action batch resource {resource:?} is refused: {why}")]
    NonCanonicalResource { resource: String, why: &'static str },
    /// An action batch body the proxy cannot check.
    #[error("malformed action batch: {0}")]
    BadActionBatch(&'static str),
    /// The lookup of a network or device failed (upstream fault, or no usable token).
    #[error("could not look up {kind} {id}: {}", .cause.message)]
    LookupFailed {
        kind: &'static str,
        id: String,
        cause: LookupError,
    },
}

impl RouteError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            RouteError::Malformed(_)
            | RouteError::BadActionBatch(_)
            | RouteError::NonCanonicalResource { .. } => 400,
            RouteError::ActionOutsideOrganization { .. } => 403,
            RouteError::NotUnderApi => 404,
            RouteError::NoOrganization
            | RouteError::ForbiddenOrganization(_)
            | RouteError::NotInClientOrganizations { .. } => 403,
            RouteError::LookupFailed { cause, .. } => cause.status,
        }
    }

    /// A short fixed label for metrics and audit.
    pub fn reason(&self) -> &'static str {
        match self {
            RouteError::Malformed(_)
            | RouteError::BadActionBatch(_)
            | RouteError::NonCanonicalResource { .. } => "bad_request",
            RouteError::ActionOutsideOrganization { .. } => "forbidden_organization",
            RouteError::NotUnderApi => "not_found",
            RouteError::NoOrganization => "no_organization",
            RouteError::ForbiddenOrganization(_) | RouteError::NotInClientOrganizations { .. } => {
                "forbidden_organization"
            }
            RouteError::LookupFailed { cause, .. } => cause.reason,
        }
    }
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
    let mut segments: Vec<String> = Vec::new();
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
            path.extend(utf8_percent_encode(seg, SEGMENT));
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

/// Why a lookup failed, with the status the client is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupError {
    pub status: u16,
    pub reason: &'static str,
    pub message: String,
    /// Seconds for `Retry-After` (an upstream 429, a token backoff).
    pub retry_after: Option<u64>,
}

impl LookupError {
    /// An upstream fault (`reason` "upstream_error").
    pub fn upstream(status: u16, message: &str) -> Self {
        LookupError {
            status,
            reason: "upstream_error",
            message: message.to_owned(),
            retry_after: None,
        }
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

/// Looks a network or a device up upstream, with the token of one of the client's grants.
#[async_trait::async_trait]
pub trait Lookup: Send + Sync {
    /// `GET {api_base}{path}` with the grant of `org`; `Ok(None)` when upstream says 404.
    async fn get_json(
        &self,
        org: &str,
        path: &str,
    ) -> Result<Option<serde_json::Value>, LookupError>;
}

/// A bounded, expiring cache of network and device → organization.
pub struct Resolver {
    networks: moka::future::Cache<String, Arc<str>>,
    devices: moka::future::Cache<String, Arc<str>>,
}

impl Resolver {
    /// A cache of at most `capacity` entries of each kind, each kept for `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        let build = || {
            moka::future::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build()
        };
        Resolver {
            networks: build(),
            devices: build(),
        }
    }

    /// The organization a target acts on, resolving networks and devices among `orgs` (the
    /// client's organizations).
    pub async fn organization_of(
        &self,
        target: &Target,
        orgs: &[String],
        lookup: &dyn Lookup,
    ) -> Result<Arc<str>, RouteError> {
        match target {
            Target::Organization(id) => Ok(Arc::from(id.as_str())),
            Target::Network(id) => self.network_org(id, orgs, lookup).await,
            Target::Device(serial) => self.device_org(serial, orgs, lookup).await,
            Target::OrganizationList | Target::Unscoped => Err(RouteError::NoOrganization),
        }
    }

    /// Checks that every resource of an action batch lies in `org`, the batch's organization.
    pub async fn check_batch(
        &self,
        body: &[u8],
        org: &str,
        orgs: &[String],
        lookup: &dyn Lookup,
    ) -> Result<(), RouteError> {
        for resource in batch_resources(body)? {
            canonical_resource(&resource)?;
            let outside = || RouteError::ActionOutsideOrganization {
                resource: resource.clone(),
                org: org.to_owned(),
            };
            let route =
                parse(&format!("/api/v1{resource}"), &http::Method::GET).map_err(|_| outside())?;
            match self.organization_of(&route.target, orgs, lookup).await {
                Ok(o) if &*o == org => {}
                Ok(_)
                | Err(RouteError::NoOrganization | RouteError::NotInClientOrganizations { .. }) => {
                    return Err(outside())
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The organization of a network, among `orgs` (the client's). Only found results are
    /// cached: a miss for one client says nothing about another client's grants.
    pub async fn network_org(
        &self,
        id: &str,
        orgs: &[String],
        lookup: &dyn Lookup,
    ) -> Result<Arc<str>, RouteError> {
        if let Some(org) = self.networks.get(id).await {
            return Ok(org);
        }
        let path = format!("/networks/{}", utf8_percent_encode(id, SEGMENT));
        let org = self
            .find(&path, orgs, lookup, "network", id, |v| {
                v.get("organizationId")
                    .and_then(|o| o.as_str())
                    .map(str::to_owned)
            })
            .await?;
        let org: Arc<str> = Arc::from(org);
        self.networks.insert(id.to_owned(), org.clone()).await;
        Ok(org)
    }

    /// The organization of a device, through its network.
    pub async fn device_org(
        &self,
        serial: &str,
        orgs: &[String],
        lookup: &dyn Lookup,
    ) -> Result<Arc<str>, RouteError> {
        if let Some(org) = self.devices.get(serial).await {
            return Ok(org);
        }
        let path = format!("/devices/{}", utf8_percent_encode(serial, SEGMENT));
        let network = self
            .find(&path, orgs, lookup, "device", serial, |v| {
                v.get("networkId")
                    .and_then(|o| o.as_str())
                    .map(str::to_owned)
            })
            .await?;
        let org = self
            .network_org(&network, orgs, lookup)
            .await
            .map_err(|e| match e {
                RouteError::NotInClientOrganizations { .. } => {
                    RouteError::NotInClientOrganizations {
                        kind: "device",
                        id: serial.to_owned(),
                    }
                }
                other => other,
            })?;
        self.devices.insert(serial.to_owned(), org.clone()).await;
        Ok(org)
    }

    async fn find(
        &self,
        path: &str,
        orgs: &[String],
        lookup: &dyn Lookup,
        kind: &'static str,
        id: &str,
        field: impl Fn(&serde_json::Value) -> Option<String>,
    ) -> Result<String, RouteError> {
        let mut failure = None;
        for org in orgs {
            match lookup.get_json(org, path).await {
                Ok(Some(v)) => {
                    return field(&v).ok_or_else(|| RouteError::LookupFailed {
                        kind,
                        id: id.to_owned(),
                        cause: LookupError::upstream(502, "Meraki's answer names no owner"),
                    })
                }
                Ok(None) => {}
                Err(cause) => failure = Some(cause),
            }
        }
        Err(match failure {
            Some(cause) => RouteError::LookupFailed {
                kind,
                id: id.to_owned(),
                cause,
            },
            None => RouteError::NotInClientOrganizations {
                kind,
                id: id.to_owned(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn get(p: &str) -> Result<Route, RouteError> {
        parse(p, &Method::GET)
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

    struct FakeUpstream {
        objects: HashMap<(&'static str, &'static str), serde_json::Value>,
        calls: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Lookup for FakeUpstream {
        async fn get_json(
            &self,
            org: &str,
            path: &str,
        ) -> Result<Option<serde_json::Value>, LookupError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(self
                .objects
                .iter()
                .find(|((o, p), _)| *o == org && *p == path)
                .map(|(_, v)| v.clone()))
        }
    }

    #[tokio::test]
    async fn action_batch_resources_must_stay_in_the_batch_organization() {
        let up = FakeUpstream {
            objects: HashMap::from([
                (
                    ("1", "/networks/N1"),
                    serde_json::json!({"id": "N1", "organizationId": "1"}),
                ),
                (
                    ("2", "/networks/N2"),
                    serde_json::json!({"id": "N2", "organizationId": "2"}),
                ),
            ]),
            calls: AtomicUsize::new(0),
        };
        let r = Resolver::new(100, Duration::from_secs(60));
        let orgs = vec!["1".to_string(), "2".to_string()];
        let batch = |res: &str| {
            serde_json::json!({"actions": [{"resource": "/networks/N1/appliance/vlans", "operation": "create"}, {"resource": res, "operation": "update"}]}).to_string()
        };
        assert!(r
            .check_batch(batch("/networks/N1").as_bytes(), "1", &orgs, &up)
            .await
            .is_ok());
        assert!(r
            .check_batch(batch("/organizations/1/admins").as_bytes(), "1", &orgs, &up)
            .await
            .is_ok());
        for bad in [
            "/networks/N2",
            "/organizations/2/admins",
            "/administered/identities/me",
            "/networks/N9",
        ] {
            let e = r
                .check_batch(batch(bad).as_bytes(), "1", &orgs, &up)
                .await
                .unwrap_err();
            assert!(
                matches!(e, RouteError::ActionOutsideOrganization { .. }),
                "{bad}: {e:?}"
            );
        }
        assert!(matches!(
            r.check_batch(b"not json", "1", &orgs, &up).await,
            Err(RouteError::BadActionBatch(_))
        ));
        // What a URL parser upstream would read differently from the proxy's check is refused
        // before any lookup, naming the resource.
        for spelling in [
            "/networks/N2?/../../networks/N1",
            "/networks/N2#/../../networks/N1",
            "/organizations/2?/../../organizations/1/networks",
            "/networks/N1/../../organizations/2",
            "/networks/N1/%2e%2e/%2e%2e/organizations/2",
            "/networks/N1/..;/..;/organizations/2",
            "//networks/N1",
            "networks/N1",
            "/networks/N1\\..\\..\\organizations\\2",
            "/networks/N1 ",
            "/networks/N 1",
            "/networks/N1\t",
        ] {
            let e = r
                .check_batch(batch(spelling).as_bytes(), "1", &orgs, &up)
                .await
                .unwrap_err();
            assert!(
                matches!(&e, RouteError::NonCanonicalResource { resource, .. } if resource == spelling),
                "{spelling}: {e:?}"
            );
        }
        let route = parse("/api/v1/organizations/1/actionBatches", &Method::POST).unwrap();
        assert!(route.is_action_batch(&Method::POST));
        assert!(
            !parse("/api/v1/organizations/1/actionBatches/7", &Method::POST)
                .unwrap()
                .is_action_batch(&Method::POST)
        );
    }

    #[tokio::test]
    async fn resolver_caches_found_objects_only() {
        let up = FakeUpstream {
            objects: HashMap::from([
                (
                    ("1", "/networks/N1"),
                    serde_json::json!({"id": "N1", "organizationId": "1"}),
                ),
                (
                    ("1", "/devices/Q-1"),
                    serde_json::json!({"serial": "Q-1", "networkId": "N1"}),
                ),
            ]),
            calls: AtomicUsize::new(0),
        };
        let r = Resolver::new(100, Duration::from_secs(60));
        let orgs = vec!["1".to_string()];
        assert_eq!(&*r.network_org("N1", &orgs, &up).await.unwrap(), "1");
        assert_eq!(&*r.network_org("N1", &orgs, &up).await.unwrap(), "1");
        assert_eq!(up.calls.load(Ordering::SeqCst), 1);
        assert_eq!(&*r.device_org("Q-1", &orgs, &up).await.unwrap(), "1");
        assert!(matches!(
            r.network_org("N2", &orgs, &up).await.unwrap_err(),
            RouteError::NotInClientOrganizations {
                kind: "network",
                ..
            }
        ));
        let before = up.calls.load(Ordering::SeqCst);
        let _ = r.network_org("N2", &orgs, &up).await;
        assert_eq!(
            up.calls.load(Ordering::SeqCst),
            before + 1,
            "misses are not cached"
        );
    }
}
