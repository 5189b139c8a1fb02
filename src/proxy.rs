//! The Pingora hooks: glue of a few lines each. Admission is [`crate::admission`], the wire
//! rules are [`crate::forward`], refusals are [`crate::refusal`]; `logging`, which Pingora runs
//! once per request on every path, records metrics and the audit record.

use crate::admission::{self, Action, Forward, State};
use crate::audit::{Audit, RequestEntry, RequestId};
use crate::config::Client;
use crate::forward::{FaultPhase, RedirectTarget, REDIRECTS};
use crate::metrics::{Metrics, NONE};
use crate::refusal::{self, upstream, Decision, Refusal};
use crate::route;
use crate::shaping::{Outcome, Shaper, Ticket};
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
/// Response header on proxy-made failures: whether the request reached Meraki.
pub const UPSTREAM_OUTCOME_HEADER: HeaderName = HeaderName::from_static("x-proxy-upstream");
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

/// Per-request state, kept across retries.
pub struct Ctx {
    start: Instant,
    request_id: RequestId,
    client: Option<Arc<Client>>,
    org: Option<Arc<str>>,
    /// The normalized path and query below the API base, once parsed.
    path: Option<String>,
    /// The operationId of Meraki's API table, once matched.
    operation: Option<&'static str>,
    /// The expiry of the client key used, when it has one (a key being rotated out).
    key_expires_at: Option<i64>,
    forward: Option<Forward>,
    decision: Decision,
    refusal: Option<Refusal>,
    /// A reason recorded for a forwarded request (e.g. a 401 passed through).
    note: Option<&'static str>,
    retried_401: bool,
    /// Where the last upstream redirect led, if one was followed.
    redirect: Option<RedirectTarget>,
    redirects: u32,
    /// Set just before an error that must be retried (401 after a refresh, a redirect).
    retry_requested: bool,
    upstream_status: Option<u16>,
    upstream_request_id: Option<http::HeaderValue>,
    upstream_sent: Option<Instant>,
    upstream_elapsed: Option<Duration>,
    /// How long the request waited for its turn in the organization's rate budget.
    queue_wait: Option<Duration>,
    counted_in_flight: bool,
    /// Attempts repeated after an upstream connection fault (at most one).
    fault_retries: u8,
    /// What identified the client (`key`, `certificate`, `certificate+key`).
    identity: Option<&'static str>,
    /// The subject of the connection's client certificate (mutual TLS).
    client_cert: Option<Arc<str>>,
}

impl Ctx {
    /// A fresh context (what Pingora's `new_ctx` returns).
    pub fn new() -> Self {
        Ctx {
            start: Instant::now(),
            request_id: RequestId::new(),
            client: None,
            org: None,
            path: None,
            operation: None,
            key_expires_at: None,
            forward: None,
            decision: Decision::Forwarded,
            refusal: None,
            note: None,
            retried_401: false,
            redirect: None,
            redirects: 0,
            retry_requested: false,
            upstream_status: None,
            upstream_request_id: None,
            upstream_sent: None,
            upstream_elapsed: None,
            queue_wait: None,
            counted_in_flight: false,
            fault_retries: 0,
            identity: None,
            client_cert: None,
        }
    }

    /// The decision recorded so far.
    pub fn decision(&self) -> Decision {
        self.decision
    }

    /// The refusal written, if any.
    pub fn refusal(&self) -> Option<&Refusal> {
        self.refusal.as_ref()
    }

    fn integration(&self) -> &str {
        self.client
            .as_deref()
            .map_or(NONE, |c| c.integration.as_str())
    }
}

impl Default for Ctx {
    fn default() -> Self {
        Self::new()
    }
}

impl MerakiProxy {
    /// Writes a refusal and records it.
    async fn refuse(&self, session: &mut Session, ctx: &mut Ctx, r: Refusal) -> Result<bool> {
        ctx.decision = r.decision();
        if ctx.decision == Decision::Denied {
            let client = ctx.client.as_ref().map_or(NONE, |c| c.name.as_str());
            self.metrics.denial(client, r.reason);
            if r.reason == refusal::RATE_LIMITED {
                self.metrics
                    .rate_limited(client, ctx.org.as_deref().unwrap_or(NONE));
            }
        }
        write_refusal(session, ctx.request_id, &r).await?;
        ctx.refusal = Some(r);
        Ok(true)
    }

    /// Answers `GET /organizations` itself.
    async fn list_organizations(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let Some(client) = ctx.client.clone() else {
            return Ok(false);
        };
        let ua = admission::user_agent(session.req_header()).map(str::to_owned);
        match admission::list_organizations(&self.state, &client, ua.as_deref()).await {
            Ok(body) => {
                ctx.decision = Decision::Answered;
                write_json(session, ctx.request_id, 200, body).await?;
                Ok(true)
            }
            Err(r) => self.refuse(session, ctx, r).await,
        }
    }

    /// Reads an action batch body whole (into Pingora's retry buffer, which then sends it
    /// upstream) and checks its resources before anything goes upstream.
    async fn check_batch(&self, session: &mut Session, ctx: &Ctx) -> Result<(), Refusal> {
        let body = read_body(session, route::MAX_BATCH_BODY).await?;
        let (Some(client), Some(f)) = (ctx.client.as_deref(), ctx.forward.as_ref()) else {
            return Ok(());
        };
        let ua = admission::user_agent(session.req_header()).map(str::to_owned);
        admission::check_batch(&self.state, client, &f.org, &body, ua.as_deref()).await
    }

    /// Waits for the request's turn in its organization's rate budget ([`crate::shaping`]), or
    /// answers why not. A client that goes away while its request waits gives its place up.
    async fn wait_turn(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Option<Refusal>> {
        let (Some(client), Some(org)) = (ctx.client.as_deref(), ctx.org.as_deref()) else {
            return Ok(None);
        };
        let turn = match self.shaper.request(org, &client.name, client.weight) {
            Ticket::Go(turn) => Ok(turn),
            Ticket::Refused(e) => Err(e),
            // Only a request whose body is read (or empty) can watch its connection: reading
            // more would consume the body.
            Ticket::Wait(w) if session.as_mut().is_body_done() => {
                tokio::select! {
                    biased;
                    turn = w.wait() => turn,
                    gone = session.as_mut().read_body_or_idle(true) => {
                        // Recorded as such; nothing is written to a closed connection.
                        ctx.decision = Decision::Failed;
                        ctx.refusal = Some(Refusal::new(
                            499,
                            "client_closed",
                            "the client closed the connection while its request waited for its turn",
                        ));
                        return Err(gone.err().unwrap_or_else(|| {
                            Error::explain(ErrorType::ConnectionClosed, "client left while its request waited")
                        }).into_down());
                    }
                }
            }
            Ticket::Wait(w) => w.wait().await,
        };
        match turn {
            Ok(turn) => {
                ctx.queue_wait = Some(turn.waited);
                self.metrics.queue_wait(org, turn.waited);
                Ok(None)
            }
            Err(e) => Ok(Some(Refusal::from(&e))),
        }
    }

    /// After an upstream 401: the one retry rule ([`crate::token::Grants::rejected`]) decides
    /// whether there is a newer token; with one, Pingora retries (the body is replayed from
    /// its buffer). Returns Ok to pass Meraki's 401 through.
    async fn after_401(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(f) = ctx.forward.as_ref() else {
            return Ok(());
        };
        ctx.retried_401 = true;
        let replayable = !session.as_ref().retry_buffer_truncated();
        let outcome = self.state.grants.rejected(&f.grant, &f.org, &f.token).await;
        let integration = ctx.integration().to_owned();
        match outcome {
            Ok(fresh) if replayable => {
                if let Some(f) = ctx.forward.as_mut() {
                    f.token = fresh;
                    // The retry goes upstream at once: it is charged, not queued.
                    self.shaper.charge(&f.org);
                }
                ctx.retry_requested = true;
                let mut e = Error::explain(
                    HTTPStatus(401),
                    "Meraki answered 401; retrying once with a refreshed token",
                );
                e.set_retry(true);
                Err(e)
            }
            Ok(_) => {
                // Refreshed, but the body is gone: the client's own retry will succeed.
                self.metrics.retry(&integration, "body_not_replayable");
                let r = Refusal::new(
                    503,
                    "body_not_replayable",
                    "Meraki refused the access token; the proxy refreshed it, but this request's body is over 64 KiB and could not be replayed, so it was not applied: retry it",
                )
                .upstream(upstream::REJECTED_401);
                self.fail_with(
                    ctx,
                    Refusal {
                        retry_after: Some(1),
                        ..r
                    },
                )
            }
            Err(crate::token::TokenError::RejectedFresh { .. }) => {
                // Meraki's own 401 goes to the client, marked.
                self.metrics.retry(&integration, "fresh_token_rejected");
                ctx.note = Some("fresh_token_rejected");
                resp.insert_header(UPSTREAM_OUTCOME_HEADER, upstream::REJECTED_401)?;
                Ok(())
            }
            Err(e) => {
                self.metrics.retry(&integration, "refresh_failed");
                let r = Refusal::from(&e).upstream(upstream::REJECTED_401);
                self.fail_with(ctx, r)
            }
        }
    }

    /// Ends the request with `r`, written by `fail_to_proxy`.
    fn fail_with(&self, ctx: &mut Ctx, r: Refusal) -> Result<()> {
        let status = r.status;
        ctx.decision = r.decision();
        ctx.refusal = Some(r);
        Error::e_explain(HTTPStatus(status), "the proxy answers this request itself")
    }

    /// Follows an upstream redirect inside the proxy (clients mishandle them): Pingora retries
    /// towards the target. The client never sees an upstream 3xx.
    fn redirect(&self, session: &mut Session, resp: &ResponseHeader, ctx: &mut Ctx) -> Result<()> {
        let s = &self.state;
        let current = match (&ctx.redirect, &ctx.forward) {
            (Some(t), _) => format!("{}{}", t.origin(), t.path_and_query),
            (None, Some(f)) => format!("{}{}", s.upstream.origin(), f.upstream_path),
            (None, None) => s.upstream.origin(),
        };
        let location = resp
            .headers
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok());
        match crate::forward::follow(
            location,
            &current,
            &s.live.config().upstream.redirect_hosts,
            &s.upstream.host,
            ctx.redirects,
            !session.as_ref().retry_buffer_truncated(),
        ) {
            Ok(target) => {
                ctx.redirects += 1;
                if let Some(org) = &ctx.org {
                    self.shaper.charge(org);
                }
                self.metrics.redirect(ctx.integration());
                tracing::debug!(host = %target.host, "following an upstream redirect");
                ctx.redirect = Some(target);
                ctx.retry_requested = true;
                let mut e = Error::explain(HTTPStatus(502), "following an upstream redirect");
                e.set_retry(true);
                Err(e)
            }
            Err(e) => self.fail_with(ctx, Refusal::from(&e)),
        }
    }
}

/// Reads the whole request body, up to `limit` bytes, into Pingora's retry buffer (so it is
/// still sent upstream).
async fn read_body(session: &mut Session, limit: usize) -> Result<Vec<u8>, Refusal> {
    let too_large = || {
        Refusal::new(
            413,
            "bad_request",
            format!("action batch bodies over {limit} bytes are refused"),
        )
    };
    session.as_mut().enable_retry_buffering();
    let mut body = Vec::new();
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|_| Refusal::new(400, "bad_request", "could not read the request body"))?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    if session.as_ref().get_retry_buffer().is_none() && !body.is_empty() {
        return Err(too_large());
    }
    Ok(body)
}

/// Writes a refusal through Pingora's `write_error_response`: it says `Connection: close` (the
/// request body may be unread) and is skipped when a response header already went out.
async fn write_refusal(session: &mut Session, request_id: RequestId, r: &Refusal) -> Result<()> {
    let body = r.body();
    let mut resp = ResponseHeader::build(r.status, Some(6))?;
    resp.insert_header(CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(REQUEST_ID_HEADER, request_id.hex().as_str())?;
    if let Some(u) = r.upstream {
        resp.insert_header(UPSTREAM_OUTCOME_HEADER, u)?;
    }
    // Clients (the Python SDK) do int(Retry-After).
    match (r.retry_after, r.status) {
        (Some(secs), _) => resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?,
        (None, 429) => resp.insert_header(http::header::RETRY_AFTER, "1")?,
        _ => {}
    }
    session.as_mut().write_error_response(resp, body).await
}

/// Writes a JSON answer of the proxy's own.
async fn write_json(
    session: &mut Session,
    request_id: RequestId,
    status: u16,
    body: Bytes,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header(CONTENT_TYPE, "application/json")?;
    resp.insert_header(REQUEST_ID_HEADER, request_id.hex().as_str())?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    let head = session.req_header().method == http::Method::HEAD;
    session.write_response_header(Box::new(resp), head).await?;
    if !head {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

#[async_trait]
impl ProxyHttp for MerakiProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // Clients may pipeline (RFC 9112 9.3.2): answered in order, one at a time.
        session.as_mut().set_pipelining_enabled(true);
        self.metrics.in_flight().inc();
        ctx.counted_in_flight = true;
        let cert = crate::tls::peer_cert(session.digest());
        ctx.client_cert = cert.map(|c| c.subject.clone());
        match admission::admit_on(&self.state, session.req_header(), cert).await {
            Err(rejection) => {
                ctx.identity = rejection.identity.map(|i| i.as_str());
                ctx.client = rejection.client;
                ctx.org = rejection.org;
                ctx.path = rejection.path;
                ctx.operation = rejection.operation.map(|o| o.operation_id.as_str());
                ctx.key_expires_at = rejection.key_expires_at;
                self.refuse(session, ctx, rejection.refusal).await
            }
            Ok(admitted) => {
                ctx.identity = Some(admitted.identity.as_str());
                ctx.client = Some(admitted.client);
                ctx.path = Some(admitted.path);
                ctx.operation = admitted.operation.map(|o| o.operation_id.as_str());
                ctx.key_expires_at = admitted.key_expires_at;
                match admitted.action {
                    Action::ListOrganizations => self.list_organizations(session, ctx).await,
                    Action::Forward(f) => {
                        ctx.org = Some(f.org.clone());
                        let batch = f.action_batch;
                        ctx.forward = Some(f);
                        if batch {
                            if let Err(r) = self.check_batch(session, ctx).await {
                                return self.refuse(session, ctx, r).await;
                            }
                        }
                        if let Some(r) = self.wait_turn(session, ctx).await? {
                            return self.refuse(session, ctx, r).await;
                        }
                        Ok(false)
                    }
                }
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(t) = &ctx.redirect else {
            return Ok(self.state.upstream.peer());
        };
        self.state
            .upstream
            .redirect_peer(&t.host, t.port, t.tls)
            .await
    }

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
        let (authority, path) = match &ctx.redirect {
            Some(t) => (t.authority.as_str(), t.path_and_query.as_str()),
            None => (
                self.state.upstream.host_header.as_str(),
                f.upstream_path.as_str(),
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
        if let Some(e) = ctx.upstream_elapsed {
            self.metrics.upstream(ctx.integration(), e);
        }
        if REDIRECTS.contains(&status) {
            return self.redirect(session, resp, ctx);
        }
        if status == 429 {
            self.metrics
                .upstream_429(ctx.org.as_deref().unwrap_or(NONE));
        }
        if let Some(org) = &ctx.org {
            self.shaper.upstream_answered(org, status);
        }
        if ctx.retried_401 {
            let outcome = if status == 401 {
                "rejected_again"
            } else {
                "succeeded"
            };
            self.metrics.retry(ctx.integration(), outcome);
        } else if status == 401 {
            self.after_401(session, resp, ctx).await?;
        }
        // Split-horizon: links lead back to the origin the client used (one of the proxy's
        // public origins); otherwise they stay path-absolute.
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

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let tls = crate::tls::TlsFailure::of_pingora(&e);
        if let Some(failure) = tls {
            tracing::warn!(
                host = %peer.sni,
                cause = failure.label(),
                error = %e,
                "TLS handshake with the upstream failed"
            );
        }
        // Nothing was sent: one more attempt is safe for every method; a certificate verdict
        // would be the same again.
        let certificate = tls.is_some_and(|f| f != crate::tls::TlsFailure::Handshake);
        let again = ctx.fault_retries == 0 && !certificate;
        if again {
            ctx.fault_retries += 1;
        }
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
        let replayable = !session.as_ref().retry_buffer_truncated();
        if std::mem::take(&mut ctx.retry_requested) {
            // Meraki rejected authentication (or redirected) before acting on the request, so
            // replaying it is safe for every method, as long as the body is still buffered.
            e.set_retry(replayable);
            return e;
        }
        let method = &session.req_header().method;
        let retry = replayable
            && ctx.fault_retries == 0
            && match crate::forward::fault_phase(e.etype(), e.esource()) {
                // Not (completely) written: Meraki cannot have acted on it.
                FaultPhase::NotWritten => method.is_idempotent(),
                // Written, no answer: it may have been applied. Only a read is repeated (a
                // repeated DELETE would answer 404 and hide that the first one was applied).
                FaultPhase::Unanswered => method.is_safe(),
                FaultPhase::TimedOut | FaultPhase::Other => false,
            };
        if retry {
            ctx.fault_retries += 1;
        }
        e.set_retry(retry);
        e
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &Ctx,
        _e: &Error,
        _w: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        ctx.retried_401 || ctx.redirects > 0 || ctx.refusal.is_some()
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let r = ctx
            .refusal
            .clone()
            .unwrap_or_else(|| refusal::from_pingora(e));
        if ctx.decision != Decision::Failed {
            ctx.decision = r.decision();
        }
        // A client that went away gets nothing written.
        let gone = matches!(e.esource(), pingora::ErrorSource::Downstream)
            && matches!(
                e.etype(),
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
            );
        if !gone {
            if let Err(err) = write_refusal(session, ctx.request_id, &r).await {
                tracing::debug!(error = %err, "could not send the error response");
            }
        }
        let code = if gone { 0 } else { r.status };
        ctx.refusal = Some(r);
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let req = session.req_header();
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or_else(|| ctx.refusal.as_ref().map(|r| r.status))
            .unwrap_or(0);
        let elapsed = ctx.start.elapsed();
        let client = ctx.client.as_deref();
        if let Some(c) = client {
            self.shaper.record(
                &c.name,
                match &ctx.refusal {
                    Some(r) if r.reason == refusal::RATE_LIMITED => Outcome::Throttled,
                    Some(_) if ctx.decision == Decision::Denied => Outcome::Denied,
                    _ => Outcome::Served,
                },
            );
        }
        if let (Some(_), Some(c)) = (ctx.key_expires_at, client) {
            // Uses until the expiry; a refused expired key is not one.
            if ctx
                .refusal
                .as_ref()
                .is_none_or(|r| r.reason != "expired_key")
            {
                self.metrics.expiring_key_use(&c.name);
            }
        }
        self.metrics.request(
            ctx.integration(),
            client.map_or(NONE, |c| c.name.as_str()),
            ctx.org.as_deref().unwrap_or(NONE),
            &req.method,
            status,
            elapsed,
        );
        let path = ctx.path.take().unwrap_or_else(|| {
            req.uri
                .path_and_query()
                .map_or("", |p| p.as_str())
                .to_owned()
        });
        self.audit.request(RequestEntry {
            at: std::time::SystemTime::now(),
            request_id: ctx.request_id,
            upstream_request_id: ctx.upstream_request_id.take(),
            client: ctx.client.clone(),
            organization: ctx.org.clone(),
            method: req.method.clone(),
            path,
            operation: ctx.operation,
            key_expires_at: ctx.key_expires_at,
            status,
            upstream_status: ctx.upstream_status,
            decision: ctx.decision.as_str(),
            reason: ctx.refusal.as_ref().map(|r| r.reason).or(ctx.note),
            retried_after_401: ctx.retried_401,
            redirects_followed: ctx.redirects,
            token_fingerprint: ctx
                .forward
                .as_ref()
                .and_then(|f| f.token.fingerprint().cloned()),
            duration: elapsed,
            upstream_duration: ctx.upstream_elapsed,
            queue_wait: ctx.queue_wait,
            bytes_in: session.body_bytes_read() as u64,
            bytes_out: session.body_bytes_sent() as u64,
            source: session.client_addr().and_then(|a| a.as_inet()).copied(),
            user_agent: req.headers.get(USER_AGENT).cloned(),
            identity: ctx.identity,
            client_certificate: ctx.client_cert.take(),
        });
        // Last: a draining server waits for this count, then flushes the audit log, so the
        // record is queued before the request stops counting.
        if ctx.counted_in_flight {
            self.metrics.in_flight().dec();
        }
    }
}

#[cfg(test)]
#[path = "proxy_tests.rs"]
mod tests;
