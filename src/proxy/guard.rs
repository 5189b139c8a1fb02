//! What a client controls, bounded (`[server]` timeouts, docs/operating.md): the whole-header
//! deadline; requests Pingora ends before `request_filter` (a header its parser refused, one that
//! did not arrive in time, CONNECT), answered in Meraki's shape and recorded; the per-request
//! read, write and keep-alive timeouts; the whole-request deadline.
//!
//! The first two are hooks of the patched pingora-proxy (vendor/pingora-proxy/PATCH.md).

use super::connections;
use super::ctx::Ctx;
use super::respond::refusal_response;
use super::MerakiProxy;
use crate::audit::{RequestEntry, RequestId};
use crate::metrics::NONE;
use crate::refusal::{timed_out, Decision, Refusal, TIMED_OUT};
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::ErrorType;
use std::time::{Duration, Instant};

/// The audit reason of a request the HTTP parser refused.
pub const MALFORMED: &str = "malformed_request";

impl MerakiProxy {
    /// The whole-header deadline: `header_timeout`, plus `idle_timeout` on a kept-alive
    /// connection (its wait for the next request counts from the end of the previous response).
    pub(super) fn header_deadline(&self) -> Duration {
        let l = self.state.live.config().client_limits;
        if connections::requests_begun() > 0 {
            l.header_timeout + l.idle_timeout
        } else {
            l.header_timeout
        }
    }

    /// Answers, records and counts a request Pingora ended before the other hooks.
    pub(super) async fn answer_early(&self, session: &mut ServerSession, e: &Error) {
        let early = Early::of(e);
        let request_id = RequestId::new();
        match refusal_response(request_id, &early.refusal) {
            Ok((resp, body)) => {
                if let Err(err) = session.write_error_response(resp, body).await {
                    tracing::debug!(error = %err, "could not answer a refused request header");
                }
            }
            Err(err) => tracing::warn!(error = %err, "could not build a refusal"),
        }
        let (method, path) = match e.etype() {
            // Only a CONNECT request got as far as a parsed header.
            ErrorType::HTTPStatus(_) => {
                let req = session.req_header();
                (req.method.clone(), req.uri.to_string())
            }
            _ => (unknown_method(), "-".to_owned()),
        };
        let source = session.client_addr().and_then(|a| a.as_inet()).copied();
        let status = early.refusal.status;
        tracing::debug!(peer = ?source, detail = early.detail, error = %e, "request refused before the hooks");
        match early.refusal.reason {
            TIMED_OUT => self.metrics.client_timeout(early.detail),
            _ => self.metrics.malformed(early.detail),
        }
        self.metrics.denial(NONE, early.refusal.reason);
        self.metrics
            .request(NONE, NONE, NONE, &method, status, early.waited);
        self.audit.request(RequestEntry {
            at: std::time::SystemTime::now(),
            request_id,
            upstream_request_id: None,
            client: None,
            organization: None,
            method,
            path,
            operation: None,
            key_expires_at: None,
            status,
            upstream_status: None,
            decision: Decision::Denied.as_str(),
            reason: Some(early.refusal.reason),
            retried_after_401: false,
            redirects_followed: 0,
            token_fingerprint: None,
            duration: early.waited,
            upstream_duration: None,
            queue_wait: None,
            bytes_in: 0,
            bytes_out: session.body_bytes_sent() as u64,
            source,
            client_address: source.map(|s| crate::source::canonical(s.ip())),
            user_agent: None,
            identity: None,
            client_certificate: None,
            detail: Some(early.detail),
        });
    }

    /// Each request's bounds, set before anything is read of its body: no body progress for
    /// `body_timeout` (either way), the kept-alive connection's wait for its next request, the
    /// whole request's deadline.
    pub(super) fn bound_request(&self, session: &mut Session, ctx: &mut Ctx) {
        connections::begin_request();
        let l = self.state.live.config().client_limits;
        session.set_read_timeout(Some(l.body_timeout));
        session.set_write_timeout(Some(l.body_timeout));
        // Pingora keeps an HTTP/1.1 connection open forever between requests unless told.
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(l.idle_timeout.as_secs().max(1)));
        }
        ctx.deadline = Some(ctx.start + l.request_timeout);
    }

    /// While the client's body arrives: past the deadline the request ends with a 408; before
    /// it, the next read may wait only until the deadline.
    pub(super) fn body_within_deadline(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        let Some(deadline) = ctx.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            ctx.outcome.detail = Some("request");
            return ctx.fail_with(timed_out("request"));
        }
        let body = self.state.live.config().client_limits.body_timeout;
        session.set_read_timeout(Some(body.min(left)));
        Ok(())
    }

    /// While the response goes out: past the deadline the connection is closed (the status is
    /// already sent).
    pub(super) fn response_within_deadline(&self, ctx: &mut Ctx) -> Result<()> {
        match ctx.deadline {
            Some(d) if Instant::now() >= d => {
                ctx.outcome.detail = Some("request");
                ctx.fail_with(timed_out("request"))
            }
            _ => Ok(()),
        }
    }
}

/// The refusal a downstream read timeout is (the whole request's deadline when it has passed,
/// else no body progress), with its phase noted for the record.
pub(super) fn read_timeout_refusal(e: &Error, ctx: &mut Ctx) -> Option<Refusal> {
    if *e.etype() != ErrorType::ReadTimedout || !matches!(e.esource(), ErrorSource::Downstream) {
        return None;
    }
    let past = ctx.deadline.is_some_and(|d| Instant::now() >= d);
    let phase = if past { "request" } else { "body" };
    ctx.outcome.detail = Some(phase);
    Some(timed_out(phase))
}

/// A request Pingora ended before the hooks: its answer, what was wrong, how long it took.
struct Early {
    refusal: Refusal,
    /// From a fixed set (a metric label and the audit `detail`).
    detail: &'static str,
    waited: Duration,
}

impl Early {
    fn of(e: &Error) -> Early {
        match e.etype() {
            ErrorType::ReadTimedout => Early {
                refusal: timed_out("header"),
                detail: "header",
                waited: Duration::ZERO,
            },
            ErrorType::HTTPStatus(405) => Early {
                refusal: Refusal::new(405, MALFORMED, "CONNECT is not a method of the Meraki API"),
                detail: "connect_method",
                waited: Duration::ZERO,
            },
            _ => {
                let detail = malformed_kind(e);
                Early {
                    refusal: Refusal::new(400, MALFORMED, malformed_message(detail)),
                    detail,
                    waited: Duration::ZERO,
                }
            }
        }
    }
}

/// What the parser refused, from Pingora's error. Its context may quote the request (and so a
/// client key): only fixed words leave this function.
fn malformed_kind(e: &Error) -> &'static str {
    let context = e.context.as_ref().map(|c| c.as_str()).unwrap_or("");
    let cause = e.cause.as_ref().map(|c| c.to_string()).unwrap_or_default();
    // httparse's verdicts, with the request bytes as context.
    if context.starts_with("buf:") {
        return match cause.as_str() {
            "too many headers" => "too_many_headers",
            "invalid header name" | "invalid header value" => "header_syntax",
            "invalid new line" => "line_ending",
            _ => "request_line",
        };
    }
    let has = |s: &str| context.contains(s) || cause.contains(s);
    if has("larger than") {
        "header_too_large"
    } else if has("Transfer-Encoding") {
        "transfer_encoding"
    } else if has("Content-Length") {
        "content_length"
    } else if has("Host") || has("authority") {
        "host"
    } else if has("uri") || has("Uri") || has("URI") {
        "request_target"
    } else {
        "other"
    }
}

/// The client's message for a kind of malformed request.
fn malformed_message(kind: &str) -> &'static str {
    match kind {
        "too_many_headers" => "malformed request: too many header fields",
        "header_too_large" => "malformed request: the request header is too large",
        "header_syntax" => "malformed request: an invalid header field",
        "line_ending" => "malformed request: invalid line endings",
        "request_line" => "malformed request: an invalid request line",
        "transfer_encoding" => "malformed request: invalid Transfer-Encoding",
        "content_length" => "malformed request: invalid or conflicting Content-Length",
        "host" => "malformed request: a missing, repeated or conflicting Host",
        "request_target" => "malformed request: an invalid request target",
        _ => "malformed request",
    }
}

/// The method recorded when the request line could not be read.
fn unknown_method() -> http::Method {
    http::Method::from_bytes(b"-").unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser_error(context: &'static str, cause: Option<&'static str>) -> Box<Error> {
        let mut e = Error::explain(ErrorType::InvalidHTTPHeader, context);
        if let Some(c) = cause {
            e.cause = Some(c.into());
        }
        e
    }

    #[test]
    fn what_the_parser_refused_is_named_without_quoting_the_request() {
        for (context, cause, kind) in [
            (
                "buf: GET / HTTP/1.1\\r\\nX-Cisco-Meraki-API-Key: secret",
                Some("too many headers"),
                "too_many_headers",
            ),
            (
                "buf: GET /\\xff HTTP/1.1",
                Some("invalid token"),
                "request_line",
            ),
            (
                "buf: GET / HTTP/1.1\\r\\nContent-Length: 1",
                Some("invalid header name"),
                "header_syntax",
            ),
            (
                "Request header larger than 1048575",
                None,
                "header_too_large",
            ),
            (
                "non-chunked final Transfer-Encoding",
                None,
                "transfer_encoding",
            ),
            (
                "HTTP/1.0 requests cannot include Transfer-Encoding header",
                None,
                "transfer_encoding",
            ),
            (
                "invalid Content-Length header value: 1, 2",
                None,
                "content_length",
            ),
            (
                "Host header differs from request-target authority",
                None,
                "host",
            ),
            ("something new", None, "other"),
        ] {
            let e = parser_error(context, cause);
            let early = Early::of(&e);
            assert_eq!(early.detail, kind, "{context}");
            assert_eq!(early.refusal.status, 400);
            assert_eq!(early.refusal.reason, MALFORMED);
            assert!(!early.refusal.message.contains("secret"));
        }
        let connect = Error::explain(ErrorType::HTTPStatus(405), "CONNECT");
        assert_eq!(Early::of(&connect).refusal.status, 405);
        let slow = Error::explain(ErrorType::ReadTimedout, "header");
        let early = Early::of(&slow);
        assert_eq!(
            (early.refusal.status, early.refusal.reason),
            (408, TIMED_OUT)
        );
        assert_eq!(early.detail, "header");
        assert_eq!(unknown_method().as_str(), "-");
    }
}
