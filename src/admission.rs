//! Admission: SPEC.md's steps 1–4 as plain functions, testable without a socket. A request is
//! identified ([`crate::identity`]), checked against the addresses it may call from
//! ([`check_source`], the address from [`crate::source`]), routed to an organization
//! ([`crate::route`]), authorized (the client's organizations, methods and operations, and the
//! OAuth scope the operation needs: [`check_scope`]) and given an access token
//! ([`crate::token`]), or
//! refused with a [`Refusal`] that says only what the client may know. Either way, [`Seen`]
//! holds what it learnt, for the audit record.

use crate::config::{Client, UnknownEndpoints};
use crate::endpoints::{EndpointTable, Operation};
use crate::lookup::{ApiClient, LookupWith};
use crate::refusal::{Refusal, Refuse};
use crate::reload::Live;
use crate::route::{self, Resolver, RouteError, Target};
use crate::token::{Grant, Grants, TokenState};
use crate::upstream::Upstream;
use http::header::USER_AGENT;
use pingora::http::RequestHeader;
use std::net::IpAddr;
use std::sync::Arc;

/// Everything admission and the hooks need, built once by [`crate::server`].
pub struct State {
    /// The configuration and key index; a request reads them once, at admission, and keeps
    /// what it read (its client) however many reloads happen meanwhile.
    pub live: Arc<Live>,
    pub resolver: Resolver,
    pub grants: Arc<Grants>,
    pub upstream: Arc<Upstream>,
    pub api: ApiClient,
    /// The grants' organization listings, for `GET /organizations`.
    pub orgs: crate::orglist::OrgList,
}

/// What admission learnt about a request, step by step, whether it admitted it or not: the
/// audit record and the metrics of every request are made from it.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// What identified the client: its key, its TLS certificate, or both.
    pub identity: Option<crate::identity::IdentitySource>,
    pub client: Option<Arc<Client>>,
    /// The organization the request acts on.
    pub org: Option<Arc<str>>,
    /// The normalized path and query below the API base.
    pub path: Option<String>,
    /// The operation of Meraki's API table the request is (none: not known, or an unknown
    /// endpoint allowed by `unknown_endpoints = "allow"`).
    pub operation: Option<&'static Operation>,
    /// The expiry of the key used, when it has one (a key being rotated out).
    pub key_expires_at: Option<i64>,
    /// The client's address as [`crate::source`] decides it (the peer, or `X-Forwarded-For`
    /// behind a trusted proxy).
    pub client_address: Option<IpAddr>,
}

/// Admission's answer: what it learnt, and what to do or why not.
#[derive(Debug)]
pub struct Admission {
    pub seen: Seen,
    pub verdict: Result<Action, Refusal>,
}

/// What the proxy does with an admitted request.
#[derive(Debug)]
pub enum Action {
    /// `GET /organizations`: answered by the proxy with the client's organizations.
    ListOrganizations,
    /// Sent to Meraki.
    Forward(Forward),
}

/// A request to forward.
pub struct Forward {
    pub org: Arc<str>,
    pub grant: Arc<Grant>,
    pub token: Arc<TokenState>,
    /// The path and query Meraki gets: the upstream base path plus the normalized path.
    pub upstream_path: String,
    /// An action batch, whose body is checked before anything goes upstream.
    pub action_batch: bool,
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("org", &self.org)
            .field("grant", &self.grant.id)
            .field("generation", &self.token.generation)
            .field("upstream_path", &self.upstream_path)
            .field("action_batch", &self.action_batch)
            .finish()
    }
}

/// A request that is no operation of Meraki's API.
#[derive(Debug, thiserror::Error)]
#[error("{method} {path} is not an operation of the Meraki Dashboard API known to this proxy (API table: meraki-sdk {version})")]
pub struct UnknownEndpoint {
    pub method: http::Method,
    pub path: String,
    pub version: &'static str,
}

impl Refuse for UnknownEndpoint {
    fn status(&self) -> u16 {
        404
    }
    fn reason(&self) -> &'static str {
        "unknown_endpoint"
    }
}

/// An operation the client may not run.
#[derive(Debug, thiserror::Error)]
#[error("operation {0} is not allowed for this client")]
pub struct ForbiddenOperation(pub &'static str);

impl Refuse for ForbiddenOperation {
    fn status(&self) -> u16 {
        403
    }
    fn reason(&self) -> &'static str {
        "forbidden_operation"
    }
}

/// A method that is not the Meraki Dashboard API's (TRACE, CONNECT, PATCH, OPTIONS, ...).
#[derive(Debug, thiserror::Error)]
#[error("method {0} is not used by the Meraki Dashboard API")]
pub struct NotAnApiMethod(pub http::Method);

impl Refuse for NotAnApiMethod {
    fn status(&self) -> u16 {
        405
    }
    fn reason(&self) -> &'static str {
        "method_not_allowed"
    }
}

/// The methods forwarded: Meraki's (HEAD answered like GET).
pub fn is_api_method(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::POST
            | http::Method::PUT
            | http::Method::DELETE
    )
}

/// A method the client may not use.
#[derive(Debug, thiserror::Error)]
#[error("method {0} is not allowed for this client")]
pub struct MethodNotAllowed(pub http::Method);

impl Refuse for MethodNotAllowed {
    fn status(&self) -> u16 {
        403
    }
    fn reason(&self) -> &'static str {
        "forbidden_method"
    }
}

/// A client used from an address outside its `source_addresses`.
#[derive(Debug, thiserror::Error)]
#[error("client {client} may not be used from {address}")]
pub struct SourceRefused {
    pub client: String,
    pub address: IpAddr,
}

impl Refuse for SourceRefused {
    fn status(&self) -> u16 {
        403
    }
    fn reason(&self) -> &'static str {
        "source_address"
    }
}

/// An operation that needs an OAuth scope the grant was not given.
#[derive(Debug, thiserror::Error)]
#[error("operation {operation} needs the OAuth scope {scope}, which integration {integration} was not granted")]
pub struct MissingScope {
    pub operation: &'static str,
    pub scope: crate::scope::Scope,
    pub integration: String,
}

impl Refuse for MissingScope {
    fn status(&self) -> u16 {
        403
    }
    fn reason(&self) -> &'static str {
        "missing_scope"
    }
}

/// The client may be used from `address` (`[[clients]] source_addresses`; none: anywhere).
#[inline]
pub fn check_source(client: &Client, address: IpAddr) -> Result<(), SourceRefused> {
    if client.may_call_from(address) {
        Ok(())
    } else {
        Err(SourceRefused {
            client: client.name.clone(),
            address,
        })
    }
}

/// The grant holds the scope `op` needs, when Meraki's index lists one and the grant's scopes
/// are known (Meraki's token response, else the integration's `scopes`); otherwise there is
/// nothing to check.
#[inline]
pub fn check_scope(
    op: &'static Operation,
    scopes: Option<crate::scope::ScopeSet>,
    integration: &str,
) -> Result<(), MissingScope> {
    match (op.scope, scopes) {
        (Some(need), Some(held)) if !held.contains(need) => Err(MissingScope {
            operation: &op.operation_id,
            scope: need,
            integration: integration.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// Identify → route → authorize → token, for a request from the connection peer `peer` on a
/// connection that presented `cert` (mutual TLS: verified by the handshake against the client
/// CA), if any.
pub async fn admit(
    state: &State,
    req: &RequestHeader,
    peer: Option<IpAddr>,
    cert: Option<&crate::tls::PeerCert>,
) -> Admission {
    let mut seen = Seen::default();
    let verdict = decide(state, req, peer, cert, &mut seen).await;
    Admission { seen, verdict }
}

/// The steps of [`admit`], each recording in `seen` what it learnt.
async fn decide(
    state: &State,
    req: &RequestHeader,
    peer: Option<IpAddr>,
    cert: Option<&crate::tls::PeerCert>,
    seen: &mut Seen,
) -> Result<Action, Refusal> {
    let snapshot = state.live.snapshot();
    seen.client_address = peer
        .map(|p| crate::source::client_address(p, &req.headers, &snapshot.config.trusted_proxies));
    if !is_api_method(&req.method) {
        return Err(Refusal::from(&NotAnApiMethod(req.method.clone())));
    }
    let mtls = crate::identity::Mtls::of(&snapshot.config);
    let caller = match snapshot.identities.identify_on(&req.headers, mtls, cert) {
        Ok(c) => c,
        Err(e) => return Err(Refusal::from(&e)),
    };
    let (client, key_expires_at) = (caller.client.clone(), caller.key_expires_at);
    seen.identity = Some(caller.source);
    seen.key_expires_at = key_expires_at;
    seen.client = Some(client.clone());
    if key_expires_at.is_some() && caller.expired(crate::clock::now_unix()) {
        return Err(Refusal::from(&crate::identity::IdentityError::Expired));
    }
    if client.source_addresses.is_some() {
        // Without a peer address (not a TCP connection) the rule cannot hold: refused.
        let address = seen
            .client_address
            .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED));
        if let Err(e) = check_source(&client, address) {
            return Err(Refusal::from(&e));
        }
    }
    let method = &req.method;
    if !client.may_use(method) {
        return Err(Refusal::from(&MethodNotAllowed(method.clone())));
    }
    let r = match route::parse(req.uri.path(), method) {
        Ok(r) => r,
        Err(e) => return Err(Refusal::from(&e)),
    };
    let path = match req.uri.query() {
        Some(q) => format!("{}?{q}", r.path),
        None => r.path.clone(),
    };
    seen.path = Some(path.clone());
    let table = EndpointTable::builtin();
    // Meraki's paths have at most a dozen segments: no allocation for the match.
    let mut buf = [""; 16];
    let n = r.segments.len().min(buf.len());
    for (slot, seg) in buf.iter_mut().zip(&r.segments) {
        *slot = seg;
    }
    let operation = if r.segments.len() <= buf.len() {
        table.find(method, &buf[..n]).map(|m| m.operation())
    } else {
        None
    };
    seen.operation = operation;
    match operation {
        None if snapshot.config.unknown_endpoints == UnknownEndpoints::Deny => {
            let e = UnknownEndpoint {
                method: method.clone(),
                path: r.path.clone(),
                version: table.sdk_version(),
            };
            return Err(Refusal::from(&e));
        }
        Some(op) if !client.may_run(op) => {
            return Err(Refusal::from(&ForbiddenOperation(&op.operation_id)));
        }
        _ => {}
    }
    if r.target == Target::OrganizationList {
        return Ok(Action::ListOrganizations);
    }
    let lookup = LookupWith {
        api: &state.api,
        client: &client,
        user_agent: user_agent(req),
    };
    // An organization's own path names it; a network's or a device's is looked up (a cache,
    // and rarely Meraki), boxed so that its state does not enlarge every request's future
    // (Pingora boxes and copies `request_filter`'s for each request; issue 26).
    let resolved = match &r.target {
        Target::Organization(id) => Ok(Arc::from(id.as_str())),
        target => {
            Box::pin(
                state
                    .resolver
                    .organization_of(target, &client.organizations, &lookup),
            )
            .await
        }
    };
    let org = match resolved {
        Ok(org) => org,
        Err(e) => return Err(Refusal::from(&e)),
    };
    if !client.may_access(&org) {
        // Say only what the client already knows: the id it sent, never the organization a
        // network or device belongs to (the lookup cache is shared by all clients).
        let e = match &r.target {
            Target::Network(id) => RouteError::NotInClientOrganizations {
                kind: "network",
                id: id.clone(),
            },
            Target::Device(id) => RouteError::NotInClientOrganizations {
                kind: "device",
                id: id.clone(),
            },
            _ => RouteError::ForbiddenOrganization(org.to_string()),
        };
        return Err(Refusal::from(&e));
    }
    seen.org = Some(org.clone());
    let grant = match state.grants.require(&client.integration, &org).await {
        Ok(g) => g,
        Err(e) => return Err(Refusal::from(&e)),
    };
    // Before the token: a refusal costs no refresh and no upstream call.
    if let Some(op) = operation {
        if let Err(e) = check_scope(op, grant.scopes(), &client.integration) {
            return Err(Refusal::from(&e));
        }
    }
    let token = match state.grants.token(&grant, &org).await {
        Ok(t) => t,
        Err(e) => return Err(Refusal::from(&e)),
    };
    let upstream_path = format!("{}{path}", state.upstream.base_path);
    Ok(Action::Forward(Forward {
        org,
        grant,
        token,
        upstream_path,
        action_batch: r.is_action_batch(method),
    }))
}

/// Checks that every resource of an action batch body lies in `org`, the batch's organization.
pub async fn check_batch(
    state: &State,
    client: &Client,
    org: &str,
    body: &[u8],
    user_agent: Option<&str>,
) -> Result<(), Refusal> {
    let lookup = LookupWith {
        api: &state.api,
        client,
        user_agent,
    };
    state
        .resolver
        .check_batch(body, org, &client.organizations, &lookup)
        .await
        .map_err(|e| Refusal::from(&e))
}

/// The script's User-Agent, if it is text.
pub fn user_agent(req: &RequestHeader) -> Option<&str> {
    req.headers.get(USER_AGENT).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::{Scope, ScopeSet};

    fn client(addresses: Option<&[&str]>) -> Client {
        Client {
            name: "carol".into(),
            keys: vec![],
            cert: None,
            integration: "netops".into(),
            organizations: vec!["1".into()],
            methods: None,
            operations: None,
            weight: 1,
            source_addresses: addresses
                .map(|a| crate::source::Cidrs(a.iter().map(|c| c.parse().unwrap()).collect())),
        }
    }

    #[test]
    fn a_client_is_refused_outside_its_source_addresses_with_the_address_named() {
        let c = client(Some(&["10.1.2.0/24", "2001:db8::/48"]));
        assert!(check_source(&c, "10.1.2.3".parse().unwrap()).is_ok());
        assert!(check_source(&c, "2001:db8::1".parse().unwrap()).is_ok());
        let e = check_source(&c, "10.1.3.3".parse().unwrap()).unwrap_err();
        let r = Refusal::from(&e);
        assert_eq!((r.status, r.reason), (403, "source_address"));
        assert_eq!(r.message, "client carol may not be used from 10.1.3.3");
        assert!(check_source(&client(None), "192.0.2.1".parse().unwrap()).is_ok());
    }

    #[test]
    fn an_operation_needing_a_scope_the_grant_lacks_is_refused_in_merakis_words() {
        let table = EndpointTable::builtin();
        let update = table.by_operation_id("updateNetwork").unwrap();
        assert_eq!(
            update.scope.unwrap().name(),
            "dashboard:general:config:write"
        );
        let read: ScopeSet = [Scope::parse("dashboard:general:config:read").unwrap()]
            .into_iter()
            .collect();
        let e = check_scope(update, Some(read), "readonly").unwrap_err();
        let r = Refusal::from(&e);
        assert_eq!((r.status, r.reason), (403, "missing_scope"));
        assert_eq!(
            r.message,
            "operation updateNetwork needs the OAuth scope dashboard:general:config:write, which integration readonly was not granted"
        );
        let get = table.by_operation_id("getNetwork").unwrap();
        assert!(check_scope(get, Some(read), "readonly").is_ok());
        assert!(
            check_scope(update, None, "readonly").is_ok(),
            "scopes unknown: no check"
        );
        let unscoped = table.operations().find(|o| o.scope.is_none()).unwrap();
        assert!(check_scope(unscoped, Some(ScopeSet::EMPTY), "x").is_ok());
    }

    #[test]
    fn the_table_column_is_merakis_index() {
        let index = include_str!("../data/meraki-api-oauth-scopes.tsv");
        let mut scoped = 0;
        let table = EndpointTable::builtin();
        for line in index.lines().filter(|l| !l.starts_with('#')).skip(1) {
            let f: Vec<&str> = line.split('\t').collect();
            if let Some(op) = table.by_operation_id(f[0]) {
                assert_eq!(
                    op.scope.map(|s| s.name()).unwrap_or_default(),
                    f[4],
                    "{}",
                    f[0]
                );
                assert_eq!(op.method.as_str(), f[1], "{}", f[0]);
            }
        }
        for op in table.operations() {
            scoped += usize::from(op.scope.is_some());
        }
        assert_eq!(scoped, 844);
    }
}
