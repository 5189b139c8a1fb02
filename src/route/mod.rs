//! Which organization a request acts on.
//!
//! The path is normalized first (percent-decoding, dot segments, doubled slashes, case of the
//! collection name) and the path that is authorized is the very path that is forwarded, so no
//! spelling trick can move a request into another organization. Requests whose organization
//! cannot be determined are refused: the proxy never forwards what it cannot authorize.
//!
//! Two files: `path` is pure (parsing and normalizing a path, action batch bodies; no I/O,
//! fuzzed by `fuzz/` and property-tested in `tests/properties.rs`); `resolver` answers which
//! organization a network or a device belongs to, through a cached [`Lookup`]. The errors both
//! answer with ([`RouteError`], [`LookupError`]) live here.

mod path;
mod resolver;

pub use path::{batch_resources, canonical_resource, parse, Route, Target, MAX_BATCH_BODY};
pub use resolver::{Lookup, Resolver};

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
