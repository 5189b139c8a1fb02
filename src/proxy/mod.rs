//! The Pingora hooks. Each reads as a short sequence of named steps over the modules that do
//! the work; this folder owns only what is about the hooks themselves:
//!
//! - `ctx.rs`: what a request carries through the hooks, grouped by phase;
//! - `steps.rs`: what `request_filter` does after admission (refuse, answer the organization
//!   list, check an action batch, wait the request's turn);
//! - `retry.rs`: Meraki's answer and the attempts it leads to (401, redirects, faults);
//! - `respond.rs`: what the proxy writes itself (the one refusal → response mapping);
//! - `record.rs`: the metrics and the audit record of every request;
//! - `connections.rs`: the connection gate (limits, and the PROXY protocol header on the plain
//!   listener); `proxy_protocol.rs`: reading PROXY v1/v2 headers (also before the TLS
//!   handshake).
//!
//! Admission is [`crate::admission`], the wire rules [`crate::forward`], refusals
//! [`crate::refusal`].

mod connections;
mod ctx;
mod guard;
mod proxy_protocol;
mod record;
mod respond;
mod retry;
mod steps;

pub use connections::Gate;
pub use ctx::Ctx;
pub use proxy_protocol::PreTls;

use crate::admission::{self, Action, Admission, State};
use crate::audit::Audit;
use crate::forward::REDIRECTS;
use crate::metrics::Metrics;
use crate::refusal::{self, Decision};
use crate::shaping::Shaper;
use async_trait::async_trait;
use http::header::HeaderName;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Response header naming the proxy's id for the request (also in the audit record).
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-proxy-request-id");
/// Response header on proxy-made failures: whether the request reached Meraki.
pub const UPSTREAM_OUTCOME_HEADER: HeaderName = HeaderName::from_static("x-proxy-upstream");
/// The audit reason and retry outcome of a 401 passed through at a remembered operation.
const REFUSED_AT_OPERATION: &str = "refused_at_operation";
/// Meraki's id for a request, kept for the audit record.
const UPSTREAM_REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The proxy service.
pub struct MerakiProxy {
    pub state: Arc<State>,
    pub audit: Arc<Audit>,
    pub metrics: Arc<Metrics>,
    /// Meraki's rate budget, which forwarded requests wait their turn in.
    pub shaper: Shaper,
}

#[async_trait]
impl ProxyHttp for MerakiProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new()
    }

    /// The whole request header's deadline (`[server] header_timeout_secs`).
    fn request_header_timeout(&self, _session: &ServerSession) -> Option<Duration> {
        Some(self.header_deadline())
    }

    /// A request Pingora's parser refused, a header too slow, CONNECT: answered in Meraki's
    /// shape, recorded and counted.
    async fn request_header_error(&self, session: &mut ServerSession, e: &Error) -> bool {
        self.answer_early(session, e).await;
        true
    }

    /// The request's timeouts and deadline, before anything else.
    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        self.bound_request(session, ctx);
        Ok(())
    }

    /// Admission, then: refuse, answer the organization list, or prepare the forward.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // Clients may pipeline (RFC 9112 9.3.2): answered in order, one at a time.
        session.as_mut().set_pipelining_enabled(true);
        self.metrics.in_flight().inc();
        ctx.counted_in_flight = true;
        // Nothing is forwarded while its audit record cannot be written ([audit] on_failure).
        // The rare paths below (refusals, the organization list) are boxed: inline, their
        // state would make this hook's future, boxed and copied by `async_trait` for every
        // request, kilobytes larger (issue 26).
        if let Some(r) = self.audit.refusal(ctx.start) {
            return Box::pin(self.refuse(session, ctx, r)).await;
        }
        if connections::over_peer_limit() {
            let limit = self
                .state
                .live
                .config()
                .client_limits
                .max_connections_per_peer;
            return Box::pin(self.refuse(session, ctx, connections::peer_refusal(limit))).await;
        }
        let cert = crate::tls::peer_cert(session.digest());
        ctx.client_cert = cert.map(|c| c.subject.clone());
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let Admission { seen, verdict } =
            admission::admit(&self.state, session.req_header(), peer, cert).await;
        ctx.seen = seen;
        match verdict {
            Err(r) => Box::pin(self.refuse(session, ctx, r)).await,
            Ok(Action::ListOrganizations) => Box::pin(self.list_organizations(session, ctx)).await,
            Ok(Action::Forward(f)) => self.prepare_forward(session, ctx, f).await,
        }
    }

    /// Meraki's host, or the shard host of a redirect being followed.
    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(t) = &ctx.upstream.redirect else {
            return Ok(self.state.upstream.peer());
        };
        self.state
            .upstream
            .redirect_peer(&t.host, t.port, t.tls)
            .await
    }

    /// The request Meraki gets: the client's credentials replaced by the grant's bearer.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut pingora::http::RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(f) = ctx.forward.as_ref() else {
            return Error::e_explain(ErrorType::InternalError, "forwarding an unadmitted request");
        };
        let Some(bearer) = f.token.bearer() else {
            return Error::e_explain(
                ErrorType::InternalError,
                "no access token for an admitted request",
            );
        };
        let (authority, path) = self.destination(ctx, f)?;
        crate::forward::prepare_request(req, bearer, &authority, path)?;
        ctx.upstream.sent = Some(Instant::now());
        Ok(())
    }

    /// Meraki's answer: noted; a redirect followed; the rate budget and the refresh engine
    /// told; a 401 refreshed for; the response made the client's.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        self.note_answer(resp, ctx);
        if REDIRECTS.contains(&status) {
            return self.redirect(session, resp, ctx);
        }
        self.learn_from_answer(session, ctx, status);
        if ctx.upstream.retried_401 {
            self.after_retry(session, resp, ctx)?;
        } else if status == 401 {
            // Boxed: a refresh and a retry, rare; inline they would enlarge every answer's
            // future (see `request_filter`).
            Box::pin(self.after_401(session, resp, ctx)).await?;
        }
        self.prepare_response(session, resp, ctx)
    }

    /// The client's body: within the whole request's deadline.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        _body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.body_within_deadline(session, ctx)
    }

    /// The response's body: within the whole request's deadline.
    fn response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        self.response_within_deadline(ctx)?;
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let again = retry::retry_connect(peer, ctx, &e);
        e.set_retry(again);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let again = retry::retry_fault(session, ctx, &e);
        e.set_retry(again);
        e
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &Ctx,
        _e: &Error,
        _w: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        ctx.upstream.retried_401 || ctx.upstream.redirects > 0 || ctx.outcome.refusal.is_some()
    }

    /// The refusal a hook recorded, or the one a Pingora error maps to, written unless the
    /// client is gone.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let r = match ctx.outcome.refusal.clone() {
            Some(r) => r,
            None => guard::read_timeout_refusal(e, ctx).unwrap_or_else(|| refusal::from_pingora(e)),
        };
        if ctx.outcome.decision != Decision::Failed {
            ctx.outcome.decision = r.decision();
        }
        let gone = matches!(e.esource(), pingora::ErrorSource::Downstream)
            && matches!(
                e.etype(),
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
            );
        if !gone {
            if let Err(err) = respond::write_refusal(session, ctx.request_id, &r).await {
                tracing::debug!(error = %err, "could not send the error response");
            }
        }
        let code = if gone { 0 } else { r.status };
        ctx.outcome.refusal = Some(r);
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        self.record(session, ctx);
    }
}

impl MerakiProxy {
    /// Where the request goes: Meraki's host (its `Host` value made once) and the admitted
    /// path, or the target of a redirect being followed.
    fn destination<'a>(
        &'a self,
        ctx: &'a Ctx,
        f: &'a admission::Forward,
    ) -> Result<(std::borrow::Cow<'a, http::HeaderValue>, &'a str)> {
        let Some(t) = &ctx.upstream.redirect else {
            let host = &self.state.upstream.host_value;
            return Ok((std::borrow::Cow::Borrowed(host), f.upstream_path.as_str()));
        };
        let authority = http::HeaderValue::from_str(&t.authority).map_err(|_| {
            Error::explain(
                ErrorType::InternalError,
                "redirect authority is not a header value",
            )
        })?;
        Ok((
            std::borrow::Cow::Owned(authority),
            t.path_and_query.as_str(),
        ))
    }

    /// Notes Meraki's answer: status, time, request id; the upstream latency metric.
    fn note_answer(&self, resp: &ResponseHeader, ctx: &mut Ctx) {
        ctx.upstream.status = Some(resp.status.as_u16());
        ctx.upstream.elapsed = ctx.upstream.sent.map(|t| t.elapsed());
        if let Some(id) = resp.headers.get(&UPSTREAM_REQUEST_ID_HEADER) {
            ctx.upstream.request_id = Some(id.clone());
        }
        if let Some(e) = ctx.upstream.elapsed {
            self.metrics.upstream(ctx.integration(), e);
        }
    }

    /// What the answer teaches: the organization's rate budget (Meraki's 429s slow it), the
    /// refresh engine (a 2xx is evidence the token works), and the grant's cached organization
    /// listing (dropped on a 404 to `GET /organizations/{id}`).
    fn learn_from_answer(&self, session: &Session, ctx: &Ctx, status: u16) {
        if status == 429 {
            self.metrics.upstream_429(ctx.org());
        }
        if let Some(org) = &ctx.seen.org {
            self.shaper.upstream_answered(org, status);
        }
        // Meraki no longer knows an organization the grant's cached listing may still hold.
        if let (404, Some(op), Some(f)) = (status, ctx.seen.operation, ctx.forward.as_ref()) {
            if op.operation_id == "getOrganization" {
                self.state.orgs.forget(f.grant.id);
            }
        }
        if let (true, Some(f)) = ((200..300).contains(&status), ctx.forward.as_ref()) {
            let method = &session.req_header().method;
            self.state
                .grants
                .succeeded(&f.grant, &f.token, || ctx.operation_key(method));
        }
    }

    /// The response the client gets: hop-by-hop headers dropped, `Link` rewritten back
    /// through the proxy (to the public origin the client used, for split-horizon), the
    /// proxy's request id.
    fn prepare_response(
        &self,
        session: &Session,
        resp: &mut ResponseHeader,
        ctx: &Ctx,
    ) -> Result<()> {
        let public = if resp.headers.contains_key(http::header::LINK) {
            let config = self.state.live.config();
            let host = session
                .req_header()
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok());
            crate::forward::public_origin(&config.public_origins, host).map(str::to_owned)
        } else {
            None
        };
        crate::forward::prepare_response_for(
            resp,
            &self.state.upstream.base_path,
            public.as_deref(),
        )?;
        resp.insert_header(REQUEST_ID_HEADER, ctx.request_id.hex().as_str())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
