//! The Pingora hooks. Each one is thin: it calls [`crate::identity`], [`crate::route`],
//! [`crate::token`], and records through [`crate::audit`] and [`crate::metrics`] in `logging`,
//! which Pingora runs once per request on every path.

use crate::audit::{Audit, RequestEntry, RequestId};
use crate::config::{Client, Config};
use crate::errors;
use crate::forward::{RedirectError, RedirectTarget};
use crate::identity::Identities;
use crate::metrics::{Metrics, NONE};
use crate::route::{self, Resolver, RouteError, Target};
use crate::token::{Grant, Grants, RefreshCause, TokenError, TokenState};
use crate::upstream::{ApiClient, LookupWith, Upstream};
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderName, CONTENT_TYPE, USER_AGENT};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorType, HTTPStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Response header naming the proxy's id for the request (also in the audit record).
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-proxy-request-id");
/// Response header on proxy-generated 5xx: whether the request reached Meraki.
pub const UPSTREAM_OUTCOME_HEADER: HeaderName = HeaderName::from_static("x-proxy-upstream");
/// Meraki's id for a request, kept for the audit record.
const UPSTREAM_REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// Upstream redirects followed for one request, at most.
pub const MAX_REDIRECTS: u32 = 3;
const REDIRECTS: &[u16] = &[301, 302, 303, 307, 308];
/// Hop-by-hop response headers not to hand to the client.
const HOP_BY_HOP_RESPONSE: [HeaderName; 5] = [
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    http::header::TRAILER,
    http::header::UPGRADE,
    http::header::PROXY_AUTHENTICATE,
];

/// Everything the hooks need, built once by [`crate::server`].
pub struct AppState {
    pub config: Arc<Config>,
    pub identities: Identities,
    pub resolver: Resolver,
    pub grants: Arc<Grants>,
    pub upstream: Arc<Upstream>,
    pub api: ApiClient,
    pub audit: Arc<Audit>,
    pub metrics: Arc<Metrics>,
}

/// The proxy service.
pub struct MerakiProxy {
    pub state: Arc<AppState>,
}

/// What the proxy decided for a request, for the audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Forwarded,
    Answered,
    Denied,
    Failed,
}

impl Decision {
    fn as_str(self) -> &'static str {
        match self {
            Decision::Forwarded => "forwarded",
            Decision::Answered => "answered",
            Decision::Denied => "denied",
            Decision::Failed => "error",
        }
    }
}

/// A response the proxy writes itself.
#[derive(Debug, Clone)]
struct Refusal {
    status: u16,
    reason: &'static str,
    message: String,
    /// For proxy-generated 5xx: did the request reach Meraki?
    upstream: Option<&'static str>,
}

/// Per-request state, kept across retries.
pub struct Ctx {
    start: Instant,
    request_id: RequestId,
    client: Option<Arc<Client>>,
    org: Option<Arc<str>>,
    grant: Option<Arc<Grant>>,
    token: Option<Arc<TokenState>>,
    upstream_path: String,
    /// The normalized path and query below the API base, once parsed.
    path: Option<String>,
    decision: Decision,
    refusal: Option<Refusal>,
    retried_401: bool,
    /// Where the last upstream redirect led, if one was followed.
    redirect: Option<RedirectTarget>,
    redirects: u32,
    /// Set just before an error that must be retried (401 after a refresh).
    retry_requested: bool,
    upstream_status: Option<u16>,
    upstream_request_id: Option<http::HeaderValue>,
    upstream_sent: Option<Instant>,
    upstream_elapsed: Option<Duration>,
    counted_in_flight: bool,
    /// An action batch, whose body is checked before anything goes upstream.
    batch: bool,
}

impl MerakiProxy {
    /// Writes a Meraki-style error and records why.
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        decision: Decision,
        r: Refusal,
    ) -> Result<bool> {
        let client = ctx.client.as_ref().map_or(NONE, |c| c.name.as_str());
        if decision == Decision::Denied {
            self.state.metrics.denial(client, r.reason);
        }
        ctx.decision = decision;
        write_error(
            session,
            ctx.request_id,
            r.status,
            errors::body(&r.message),
            r.upstream,
        )
        .await?;
        ctx.refusal = Some(r);
        Ok(true)
    }

    /// Identify, route, authorize, attach a token. `Err(refusal)` ends the request.
    async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> std::result::Result<Option<Target>, (Decision, Refusal)> {
        let s = &self.state;
        let req = session.req_header();
        let client = s.identities.identify(&req.headers).map_err(|e| {
            (
                Decision::Denied,
                Refusal {
                    status: e.status(),
                    reason: e.reason(),
                    message: e.to_string(),
                    upstream: None,
                },
            )
        })?;
        ctx.client = Some(client.clone());
        let method = req.method.clone();
        if !client.may_use(&method) {
            return Err((
                Decision::Denied,
                Refusal {
                    status: 403,
                    reason: "forbidden_method",
                    message: format!("method {method} is not allowed for this client"),
                    upstream: None,
                },
            ));
        }
        let r = route::parse(req.uri.path(), &method).map_err(route_refusal)?;
        let path = match req.uri.query() {
            Some(q) => format!("{}?{q}", r.path),
            None => r.path.to_string(),
        };
        let user_agent = req.headers.get(USER_AGENT).and_then(|v| v.to_str().ok());
        let lookup = LookupWith {
            api: &s.api,
            integration: &client.integration,
            user_agent,
        };
        ctx.path = Some(path);
        if r.target == Target::OrganizationList {
            return Ok(Some(Target::OrganizationList));
        }
        let org = s
            .resolver
            .organization_of(&r.target, &client.organizations, &lookup)
            .await
            .map_err(route_refusal)?;
        if !client.may_access(&org) {
            return Err(route_refusal(RouteError::ForbiddenOrganization(
                org.to_string(),
            )));
        }
        ctx.org = Some(org.clone());
        let grant = s
            .grants
            .get(&client.integration, &org)
            .await
            .ok_or_else(|| {
                token_refusal(TokenError::NoGrant {
                    integration: client.integration.clone(),
                    org: org.to_string(),
                })
            })?;
        let token = s.grants.token(&grant, &org).await.map_err(token_refusal)?;
        s.grants.mark_used(&grant);
        ctx.grant = Some(grant);
        ctx.token = Some(token);
        let path = ctx.path.as_deref().unwrap_or_default();
        ctx.upstream_path = format!("{}{path}", s.upstream.base_path);
        ctx.batch = r.is_action_batch(&method);
        Ok(None)
    }

    /// `GET /organizations`: the client's organizations only, each fetched with its grant.
    async fn organization_list(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let Some(client) = ctx.client.clone() else {
            return Ok(false);
        };
        let mut orgs = Vec::with_capacity(client.organizations.len());
        let mut failure = None;
        let user_agent = session
            .req_header()
            .headers
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        for org in &client.organizations {
            match self
                .state
                .api
                .get_json(
                    &client.integration,
                    org,
                    &format!("/organizations/{org}"),
                    user_agent.as_deref(),
                )
                .await
            {
                Ok(Some(v)) => orgs.push(v),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(client = %client.name, org = %org, error = %e.message, "organization not listed");
                    failure = Some(e);
                }
            }
        }
        if let (true, Some(e)) = (orgs.is_empty(), failure) {
            let r = Refusal {
                status: e.status,
                reason: e.reason,
                message: e.message,
                upstream: None,
            };
            return self.refuse(session, ctx, Decision::Failed, r).await;
        }
        ctx.decision = Decision::Answered;
        let body = Bytes::from(serde_json::Value::Array(orgs).to_string());
        let mut resp = ResponseHeader::build(200, Some(4))?;
        resp.insert_header(CONTENT_TYPE, "application/json")?;
        resp.insert_header(REQUEST_ID_HEADER, ctx.request_id.hex().as_str())?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        let head = session.req_header().method == http::Method::HEAD;
        session.write_response_header(Box::new(resp), head).await?;
        if !head {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(true)
    }
}

impl MerakiProxy {
    /// Reads a whole action batch body (into Pingora's retry buffer, which then sends it as the
    /// request body) and checks that every resource lies in the batch's organization, before
    /// anything goes upstream.
    async fn check_batch(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> std::result::Result<(), (Decision, Refusal)> {
        let too_large = || {
            (
                Decision::Denied,
                Refusal {
                    status: 413,
                    reason: "bad_request",
                    message: format!(
                        "action batch bodies over {} bytes are refused",
                        route::MAX_BATCH_BODY
                    ),
                    upstream: None,
                },
            )
        };
        let read_failed = || {
            (
                Decision::Denied,
                Refusal {
                    status: 400,
                    reason: "bad_request",
                    message: "could not read the request body".into(),
                    upstream: None,
                },
            )
        };
        session.as_mut().enable_retry_buffering();
        let mut body = Vec::new();
        while let Some(chunk) = session
            .read_request_body()
            .await
            .map_err(|_| read_failed())?
        {
            if body.len() + chunk.len() > route::MAX_BATCH_BODY {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        if session.as_ref().get_retry_buffer().is_none() && !body.is_empty() {
            return Err(too_large());
        }
        let (Some(client), Some(org)) = (ctx.client.clone(), ctx.org.clone()) else {
            return Ok(());
        };
        let user_agent = session
            .req_header()
            .headers
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok());
        let lookup = LookupWith {
            api: &self.state.api,
            integration: &client.integration,
            user_agent,
        };
        self.state
            .resolver
            .check_batch(&body, &org, &client.organizations, &lookup)
            .await
            .map_err(route_refusal)
    }

    /// After an upstream 401: refresh (once per token generation) and ask Pingora to retry.
    /// Returns Ok when there is nothing to retry with, so Meraki's own 401 goes to the client.
    async fn retry_after_401(&self, ctx: &mut Ctx, integration: &str) -> Result<()> {
        let (Some(grant), Some(token), Some(org)) =
            (ctx.grant.clone(), ctx.token.clone(), ctx.org.clone())
        else {
            return Ok(());
        };
        ctx.retried_401 = true;
        match self
            .state
            .grants
            .refresh(&grant, &org, token.generation, RefreshCause::Rejected)
            .await
        {
            Ok(fresh) => {
                ctx.token = Some(fresh);
                ctx.retry_requested = true;
                let mut e = Error::explain(
                    HTTPStatus(401),
                    "Meraki answered 401; retrying once with a refreshed token",
                );
                e.set_retry(true);
                Err(e)
            }
            Err(err) => {
                self.state.metrics.retry(integration, "refresh_failed");
                let (_, r) = token_refusal(err);
                let status = r.status;
                ctx.refusal = Some(Refusal {
                    upstream: Some("rejected-401"),
                    ..r
                });
                ctx.decision = Decision::Failed;
                Error::e_explain(HTTPStatus(status), "refresh after an upstream 401 failed")
            }
        }
    }

    /// Follows an upstream redirect inside the proxy (clients mishandle them), only to allowed
    /// hosts and at most [`MAX_REDIRECTS`] times; the client never sees an upstream 3xx.
    fn follow_redirect(
        &self,
        session: &mut Session,
        resp: &ResponseHeader,
        ctx: &mut Ctx,
        integration: &str,
    ) -> Result<()> {
        let s = &self.state;
        let current = match &ctx.redirect {
            Some(t) => format!("{}{}", t.origin(), t.path_and_query),
            None => format!("{}{}", s.upstream.origin(), ctx.upstream_path),
        };
        let location = resp
            .headers
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let decision = crate::forward::redirect_target(
            location,
            &current,
            &s.config.upstream.redirect_hosts,
            &s.upstream.host,
        );
        let refusal = match decision {
            Ok(_) if ctx.redirects >= MAX_REDIRECTS => Refusal {
                status: 502,
                reason: "too_many_redirects",
                message: format!("Meraki redirected more than {MAX_REDIRECTS} times; not followed"),
                upstream: Some("redirected"),
            },
            Ok(_) if session.as_ref().retry_buffer_truncated() => Refusal {
                status: 502,
                reason: "redirect_body_too_large",
                message: "Meraki redirected a request whose body is over 64 KiB, which the proxy cannot replay; it was not applied".into(),
                upstream: Some("redirected"),
            },
            Ok(target) => {
                ctx.redirects += 1;
                s.metrics.redirect(integration);
                tracing::debug!(host = %target.host, "following an upstream redirect");
                ctx.redirect = Some(target);
                ctx.retry_requested = true;
                let mut e = Error::explain(HTTPStatus(502), "following an upstream redirect");
                e.set_retry(true);
                return Err(e);
            }
            Err(e) => Refusal {
                status: 502,
                reason: if matches!(e, RedirectError::HostNotAllowed(_)) { "redirect_not_allowed" } else { "bad_redirect" },
                message: e.to_string(),
                upstream: Some("redirected"),
            },
        };
        let status = refusal.status;
        ctx.refusal = Some(refusal);
        ctx.decision = Decision::Failed;
        Error::e_explain(HTTPStatus(status), "upstream redirect not followed")
    }
}

fn route_refusal(e: RouteError) -> (Decision, Refusal) {
    let status = e.status();
    let decision = if status >= 500 {
        Decision::Failed
    } else {
        Decision::Denied
    };
    let upstream = (status >= 500).then_some("not-sent");
    (
        decision,
        Refusal {
            status,
            reason: e.reason(),
            message: e.to_string(),
            upstream,
        },
    )
}

fn token_refusal(e: TokenError) -> (Decision, Refusal) {
    (
        Decision::Failed,
        Refusal {
            status: e.status(),
            reason: e.reason(),
            message: e.to_string(),
            upstream: Some("not-sent"),
        },
    )
}

/// Writes a proxy-made error response. Through Pingora's `write_error_response`, so it says
/// `Connection: close` (the request body may be unread; the connection is not reused) and is
/// skipped when a response header already went out (a failure mid-body).
async fn write_error(
    session: &mut Session,
    request_id: RequestId,
    status: u16,
    body: Bytes,
    upstream: Option<&str>,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(5))?;
    resp.insert_header(CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(REQUEST_ID_HEADER, request_id.hex().as_str())?;
    if let Some(u) = upstream {
        resp.insert_header(UPSTREAM_OUTCOME_HEADER, u)?;
    }
    if status == 429 {
        // Clients (the Python SDK) do int(Retry-After).
        resp.insert_header(http::header::RETRY_AFTER, "1")?;
    }
    session.as_mut().write_error_response(resp, body).await
}

/// Connection-level failures happen before anything is sent upstream.
fn never_sent(e: &ErrorType) -> bool {
    matches!(
        e,
        ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::ConnectProxyFailure
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::TLSWantX509Lookup
            | ErrorType::InvalidCert
            | ErrorType::HandshakeError
            | ErrorType::SocketError
            | ErrorType::BindError
    )
}

#[async_trait]
impl ProxyHttp for MerakiProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            request_id: RequestId::new(),
            client: None,
            org: None,
            grant: None,
            token: None,
            upstream_path: String::new(),
            path: None,
            decision: Decision::Forwarded,
            refusal: None,
            retried_401: false,
            redirect: None,
            redirects: 0,
            retry_requested: false,
            upstream_status: None,
            upstream_request_id: None,
            upstream_sent: None,
            upstream_elapsed: None,
            counted_in_flight: false,
            batch: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        self.state.metrics.in_flight().inc();
        ctx.counted_in_flight = true;
        match self.admit(session, ctx).await {
            Ok(None) if ctx.batch => match self.check_batch(session, ctx).await {
                Ok(()) => Ok(false),
                Err((decision, refusal)) => self.refuse(session, ctx, decision, refusal).await,
            },
            Ok(None) => Ok(false),
            Ok(Some(Target::OrganizationList)) => self.organization_list(session, ctx).await,
            Ok(Some(_)) => Ok(false),
            Err((decision, refusal)) => self.refuse(session, ctx, decision, refusal).await,
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        match &ctx.redirect {
            None => Ok(self.state.upstream.peer()),
            Some(t) => {
                let addr = tokio::net::lookup_host((t.host.as_str(), t.port))
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| {
                        Error::explain(
                            ErrorType::ConnectNoRoute,
                            "cannot resolve the redirect target",
                        )
                    })?;
                Ok(self.state.upstream.peer_at(addr, t.tls, &t.host))
            }
        }
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut pingora::http::RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(bearer) = ctx.token.as_ref().and_then(|t| t.bearer()) else {
            return Error::e_explain(
                ErrorType::InternalError,
                "no access token for an admitted request",
            );
        };
        let (authority, path) = match &ctx.redirect {
            Some(t) => (t.authority.as_str(), t.path_and_query.as_str()),
            None => (
                self.state.upstream.host_header.as_str(),
                ctx.upstream_path.as_str(),
            ),
        };
        crate::forward::prepare_request(req, bearer, authority, path)?;
        ctx.upstream_sent = Some(Instant::now());
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        ctx.upstream_status = Some(status);
        ctx.upstream_elapsed = ctx.upstream_sent.map(|t| t.elapsed());
        if let Some(id) = resp.headers.get(&UPSTREAM_REQUEST_ID_HEADER) {
            ctx.upstream_request_id = Some(id.clone());
        }
        let client = ctx.client.clone();
        let integration = client.as_deref().map_or(NONE, |c| c.integration.as_str());
        if let Some(e) = ctx.upstream_elapsed {
            self.state.metrics.upstream(integration, e);
        }
        if REDIRECTS.contains(&status) {
            return self.follow_redirect(session, resp, ctx, integration);
        }
        if status == 429 {
            self.state
                .metrics
                .upstream_429(ctx.org.as_deref().unwrap_or(NONE));
        }
        if ctx.retried_401 {
            let outcome = if status == 401 {
                "rejected_again"
            } else {
                "succeeded"
            };
            self.state.metrics.retry(integration, outcome);
        } else if status == 401 && !session.as_ref().retry_buffer_truncated() {
            self.retry_after_401(ctx, integration).await?;
        }
        for h in &HOP_BY_HOP_RESPONSE {
            resp.remove_header(h);
        }
        if let Some(link) = resp
            .headers
            .get(http::header::LINK)
            .and_then(|v| v.to_str().ok())
        {
            match crate::forward::rewrite_link(link, &self.state.upstream.base_path) {
                Some(rewritten) => resp.insert_header(http::header::LINK, rewritten)?,
                None => {
                    resp.remove_header(&http::header::LINK);
                }
            }
        }
        resp.insert_header(REQUEST_ID_HEADER, ctx.request_id.hex().as_str())?;
        Ok(())
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if std::mem::take(&mut ctx.retry_requested) {
            // Meraki rejected authentication before acting on the request, so replaying it is
            // safe for every method, as long as the body is still in the retry buffer.
            e.set_retry(!session.as_ref().retry_buffer_truncated());
        } else if !session.req_header().method.is_idempotent()
            || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &Ctx,
        _e: &Error,
        _w: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        ctx.retried_401 || ctx.redirects > 0
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let refusal = ctx.refusal.clone().unwrap_or_else(|| {
            let etype = e.etype();
            if let HTTPStatus(code) = etype {
                return Refusal { status: *code, reason: "proxy_error", message: format!("request failed with status {code}"), upstream: None };
            }
            match e.esource() {
                pingora::ErrorSource::Upstream if never_sent(etype) => Refusal {
                    status: 502,
                    reason: "upstream_unreachable",
                    message: "could not connect to the Meraki API; the request was not sent".into(),
                    upstream: Some("not-sent"),
                },
                pingora::ErrorSource::Upstream => Refusal {
                    status: if matches!(etype, ErrorType::ReadTimedout | ErrorType::WriteTimedout) { 504 } else { 502 },
                    reason: "upstream_error",
                    message: "the Meraki API connection failed after the request was sent; it may have been applied".into(),
                    upstream: Some("sent-no-answer"),
                },
                pingora::ErrorSource::Downstream => Refusal { status: 400, reason: "bad_request", message: "malformed request".into(), upstream: None },
                _ => Refusal { status: 500, reason: "internal_error", message: "internal proxy error".into(), upstream: None },
            }
        });
        // 4xx the proxy answers are refusals of the request; 5xx are failures on the way.
        if ctx.decision != Decision::Failed {
            ctx.decision = if refusal.status < 500 {
                Decision::Denied
            } else {
                Decision::Failed
            };
        }
        let code = match e.esource() {
            pingora::ErrorSource::Downstream
                if matches!(
                    e.etype(),
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
                ) =>
            {
                0
            }
            _ => refusal.status,
        };
        if code > 0 {
            if let Err(err) = write_error(
                session,
                ctx.request_id,
                code,
                errors::body(&refusal.message),
                refusal.upstream,
            )
            .await
            {
                tracing::debug!(error = %err, "could not send the error response");
            }
        }
        ctx.refusal = Some(refusal);
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let s = &self.state;
        if ctx.counted_in_flight {
            s.metrics.in_flight().dec();
        }
        let req = session.req_header();
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or_else(|| ctx.refusal.as_ref().map(|r| r.status))
            .unwrap_or(0);
        let elapsed = ctx.start.elapsed();
        let client = ctx.client.as_deref();
        let integration = client.map_or(NONE, |c| c.integration.as_str());
        let org = ctx.org.as_deref();
        s.metrics.request(
            integration,
            client.map_or(NONE, |c| c.name.as_str()),
            org.unwrap_or(NONE),
            &req.method,
            status,
            elapsed,
        );
        let path = match ctx.path.take() {
            Some(p) => p,
            None => req
                .uri
                .path_and_query()
                .map_or("", |p| p.as_str())
                .to_owned(),
        };
        s.audit.request(RequestEntry {
            at: std::time::SystemTime::now(),
            request_id: ctx.request_id,
            upstream_request_id: ctx.upstream_request_id.take(),
            client: ctx.client.clone(),
            organization: ctx.org.clone(),
            method: req.method.clone(),
            path,
            status,
            upstream_status: ctx.upstream_status,
            decision: ctx.decision.as_str(),
            reason: ctx.refusal.as_ref().map(|r| r.reason),
            retried_after_401: ctx.retried_401,
            redirects_followed: ctx.redirects,
            token: ctx.token.clone(),
            duration: elapsed,
            upstream_duration: ctx.upstream_elapsed,
            bytes_in: session.body_bytes_read() as u64,
            bytes_out: session.body_bytes_sent() as u64,
            source: session.client_addr().and_then(|a| a.as_inet()).copied(),
            user_agent: req.headers.get(USER_AGENT).cloned(),
        });
    }
}
