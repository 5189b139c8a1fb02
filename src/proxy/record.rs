//! The end of every request, whatever path it took (Pingora runs `logging` once on each):
//! the shaper's per-client activity, the metrics, and the audit record.

use super::ctx::Ctx;
use super::MerakiProxy;
use crate::audit::RequestEntry;
use crate::refusal::{self, Decision};
use crate::shaping::Outcome;
use http::header::USER_AGENT;
use pingora::prelude::*;

impl MerakiProxy {
    /// Records the request: activity, metrics, then the audit record. Last, the in-flight
    /// count: a draining server waits for it, then flushes the audit log, so the record is
    /// queued before the request stops counting.
    pub(super) fn record(&self, session: &Session, ctx: &mut Ctx) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or_else(|| ctx.outcome.refusal.as_ref().map(|r| r.status))
            .unwrap_or(0);
        // One clock read for the metrics and the record.
        // One clock read for the request's end: its duration, the metrics, the activity.
        let end = std::time::Instant::now();
        let elapsed = end.saturating_duration_since(ctx.start);
        self.count(session, ctx, status, elapsed, end);
        self.audit.request(entry(session, ctx, status, elapsed));
        if ctx.counted_in_flight {
            self.metrics.in_flight().dec();
        }
    }

    /// The shaper's per-client activity and the request metrics.
    fn count(
        &self,
        session: &Session,
        ctx: &Ctx,
        status: u16,
        elapsed: std::time::Duration,
        end: std::time::Instant,
    ) {
        let refusal = ctx.outcome.refusal.as_ref();
        if refusal.is_some_and(|r| r.reason == refusal::TIMED_OUT) {
            self.metrics
                .client_timeout(ctx.outcome.detail.unwrap_or("body"));
        }
        if let Some(c) = ctx.seen.client.as_deref() {
            self.shaper.record(
                &c.name,
                match refusal {
                    Some(r) if r.reason == refusal::RATE_LIMITED => Outcome::Throttled,
                    Some(_) if ctx.outcome.decision == Decision::Denied => Outcome::Denied,
                    _ => Outcome::Served,
                },
                tokio::time::Instant::from_std(end),
            );
            // Uses of a key until its expiry; a refused expired key is not one.
            if ctx.seen.key_expires_at.is_some()
                && refusal.is_none_or(|r| r.reason != "expired_key")
            {
                self.metrics.expiring_key_use(&c.name);
            }
        }
        self.metrics.request(
            ctx.integration(),
            ctx.client_name(),
            ctx.org(),
            &session.req_header().method,
            status,
            elapsed,
        );
    }
}

/// The audit record of a request: what admission learnt, the forward, the exchange with
/// Meraki and the outcome.
fn entry(
    session: &Session,
    ctx: &mut Ctx,
    status: u16,
    elapsed: std::time::Duration,
) -> RequestEntry {
    let req = session.req_header();
    let path = ctx.seen.path.take().unwrap_or_else(|| {
        req.uri
            .path_and_query()
            .map_or("", |p| p.as_str())
            .to_owned()
    });
    let source = session.client_addr().and_then(|a| a.as_inet()).copied();
    RequestEntry {
        at: std::time::SystemTime::now(),
        request_id: ctx.request_id,
        upstream_request_id: ctx.upstream.request_id.take(),
        client: ctx.seen.client.clone(),
        organization: ctx.seen.org.clone(),
        method: req.method.clone(),
        path,
        operation: ctx.operation(),
        key_expires_at: ctx.seen.key_expires_at,
        status,
        upstream_status: ctx.upstream.status,
        decision: ctx.outcome.decision.as_str(),
        reason: ctx
            .outcome
            .refusal
            .as_ref()
            .map(|r| r.reason)
            .or(ctx.outcome.note),
        retried_after_401: ctx.upstream.retried_401,
        redirects_followed: ctx.upstream.redirects,
        token_fingerprint: ctx
            .forward
            .as_ref()
            .and_then(|f| f.token.fingerprint().cloned()),
        duration: elapsed,
        upstream_duration: ctx.upstream.elapsed,
        queue_wait: ctx.queue_wait,
        bytes_in: session.body_bytes_read() as u64,
        bytes_out: session.body_bytes_sent() as u64,
        source,
        client_address: ctx
            .seen
            .client_address
            .or_else(|| source.map(|s| crate::source::canonical(s.ip()))),
        user_agent: req.headers.get(USER_AGENT).cloned(),
        identity: ctx.seen.identity.map(|i| i.as_str()),
        client_certificate: ctx.client_cert.take(),
        detail: ctx.outcome.detail,
    }
}
