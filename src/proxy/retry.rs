//! Meraki's answer and the attempts it leads to: a 401 refreshed for and retried once (or
//! passed through, marked), a redirect followed inside the proxy, and which connection faults
//! are repeated (by how far the request got).

use super::ctx::Ctx;
use super::{MerakiProxy, REFUSED_AT_OPERATION, UPSTREAM_OUTCOME_HEADER};
use crate::forward::FaultPhase;
use crate::refusal::{upstream, Refusal};
use crate::token::TokenError;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;
use pingora::HTTPStatus;

impl MerakiProxy {
    /// After an upstream 401: the one retry rule ([`crate::token::Grants::rejected`]) decides
    /// whether there is a newer token; with one, Pingora retries (the body is replayed from
    /// its buffer). Returns Ok to pass Meraki's 401 through.
    pub(super) async fn after_401(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(f) = ctx.forward.as_ref() else {
            return Ok(());
        };
        let replayable = !session.as_ref().retry_buffer_truncated();
        let operation = ctx.operation_key(&session.req_header().method);
        let outcome = self
            .state
            .grants
            .rejected(&f.grant, &f.org, &f.token, &operation)
            .await;
        let integration = ctx.integration().to_owned();
        match outcome {
            Ok(fresh) if replayable => {
                ctx.upstream.retried_401 = true;
                if let Some(f) = ctx.forward.as_mut() {
                    f.token = fresh;
                    // The retry goes upstream at once: it is charged, not queued.
                    self.shaper.charge(&f.org);
                }
                ctx.upstream.retry_requested = true;
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
                ctx.fail_with(Refusal {
                    retry_after: Some(1),
                    ..r
                })
            }
            Err(TokenError::RefusedAtOperation { .. }) => {
                // Meraki's own 401 goes to the client, marked.
                self.metrics.retry(&integration, REFUSED_AT_OPERATION);
                ctx.outcome.note = Some(REFUSED_AT_OPERATION);
                resp.insert_header(UPSTREAM_OUTCOME_HEADER, upstream::REJECTED_401)?;
                Ok(())
            }
            Err(e) => {
                self.metrics.retry(&integration, "refresh_failed");
                ctx.fail_with(Refusal::from(&e).upstream(upstream::REJECTED_401))
            }
        }
    }

    /// Meraki answered the retry after a refresh: a 401 passes through, marked, and teaches
    /// the refresh engine when the retry's token was obtained because of a 401 at this very
    /// operation; anything else is counted as a retry that succeeded.
    pub(super) fn after_retry(
        &self,
        session: &Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if resp.status.as_u16() != 401 {
            self.metrics.retry(ctx.integration(), "succeeded");
            return Ok(());
        }
        self.metrics.retry(ctx.integration(), "rejected_again");
        if let Some(f) = ctx.forward.as_ref() {
            let operation = ctx.operation_key(&session.req_header().method);
            if self
                .state
                .grants
                .refused_again(&f.grant, &f.org, &f.token, &operation)
            {
                ctx.outcome.note = Some(REFUSED_AT_OPERATION);
            }
        }
        resp.insert_header(UPSTREAM_OUTCOME_HEADER, upstream::REJECTED_401)?;
        Ok(())
    }

    /// Follows an upstream redirect inside the proxy (clients mishandle them): Pingora retries
    /// towards the target. The client never sees an upstream 3xx.
    pub(super) fn redirect(
        &self,
        session: &mut Session,
        resp: &ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let s = &self.state;
        let current = match (&ctx.upstream.redirect, &ctx.forward) {
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
            ctx.upstream.redirects,
            !session.as_ref().retry_buffer_truncated(),
        ) {
            Ok(target) => {
                ctx.upstream.redirects += 1;
                if let Some(org) = &ctx.seen.org {
                    self.shaper.charge(org);
                }
                self.metrics.redirect(ctx.integration());
                tracing::debug!(host = %target.host, "following an upstream redirect");
                ctx.upstream.redirect = Some(target);
                ctx.upstream.retry_requested = true;
                let mut e = Error::explain(HTTPStatus(502), "following an upstream redirect");
                e.set_retry(true);
                Err(e)
            }
            Err(e) => ctx.fail_with(Refusal::from(&e)),
        }
    }
}

/// Whether a connection that could not be made is tried once more: nothing was sent, so it is
/// safe for every method; a certificate verdict would be the same again.
pub(super) fn retry_connect(peer: &HttpPeer, ctx: &mut Ctx, e: &Error) -> bool {
    let tls = crate::tls::TlsFailure::of_pingora(e);
    if let Some(failure) = tls {
        tracing::warn!(
            host = %peer.sni,
            cause = failure.label(),
            error = %e,
            "TLS handshake with the upstream failed"
        );
    }
    let certificate = tls.is_some_and(|f| f != crate::tls::TlsFailure::Handshake);
    let again = ctx.upstream.fault_retries == 0 && !certificate;
    if again {
        ctx.upstream.fault_retries += 1;
    }
    again
}

/// Whether an attempt that failed while proxying is repeated: always after a 401 refreshed
/// for or a redirect (Meraki did not act), else by how far the request got.
pub(super) fn retry_fault(session: &Session, ctx: &mut Ctx, e: &Error) -> bool {
    let replayable = !session.as_ref().retry_buffer_truncated();
    if std::mem::take(&mut ctx.upstream.retry_requested) {
        // Meraki rejected authentication (or redirected) before acting on the request, so
        // replaying it is safe for every method, as long as the body is still buffered.
        return replayable;
    }
    let method = &session.req_header().method;
    let retry = replayable
        && ctx.upstream.fault_retries == 0
        && match crate::forward::fault_phase(e.etype(), e.esource()) {
            // Not (completely) written: Meraki cannot have acted on it.
            FaultPhase::NotWritten => method.is_idempotent(),
            // Written, no answer: it may have been applied. Only a read is repeated (a
            // repeated DELETE would answer 404 and hide that the first one was applied).
            FaultPhase::Unanswered => method.is_safe(),
            FaultPhase::TimedOut | FaultPhase::Other => false,
        };
    if retry {
        ctx.upstream.fault_retries += 1;
    }
    retry
}
