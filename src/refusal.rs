//! Answers the proxy writes itself: one [`Refuse`] trait that every refusal-producing error
//! implements (status, fixed reason label, whether the request reached Meraki, message), the
//! [`Refusal`] it becomes, and the Meraki-style body (`{"errors": ["..."]}`) clients such as the
//! official Python SDK read (`errors[0]`) to decide what to do.

use bytes::Bytes;
use std::error::Error;
use std::time::Duration;

/// `X-Proxy-Upstream` values: whether a request the proxy failed reached Meraki, so a client
/// knows whether a write may have been applied.
pub mod upstream {
    /// Nothing was sent to Meraki.
    pub const NOT_SENT: &str = "not-sent";
    /// Sent, and the connection failed before an answer: it may have been applied.
    pub const SENT_NO_ANSWER: &str = "sent-no-answer";
    /// Meraki redirected and the proxy did not follow: not applied.
    pub const REDIRECTED: &str = "redirected";
    /// Meraki answered 401 and no retry was possible: not applied.
    pub const REJECTED_401: &str = "rejected-401";
}

/// What the proxy decided for a request, for the audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Sent to Meraki (whatever Meraki answered).
    Forwarded,
    /// Answered by the proxy itself (the organization list).
    Answered,
    /// Refused: a client error.
    Denied,
    /// Failed on the way: an upstream, token or internal fault.
    Failed,
}

impl Decision {
    /// The audit log's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Forwarded => "forwarded",
            Decision::Answered => "answered",
            Decision::Denied => "denied",
            Decision::Failed => "error",
        }
    }
}

/// An error the proxy answers a request with.
pub trait Refuse: Error {
    /// The HTTP status.
    fn status(&self) -> u16;
    /// A short fixed label for metrics and audit.
    fn reason(&self) -> &'static str;
    /// For failures: whether the request reached Meraki (see [`upstream`]).
    fn upstream(&self) -> Option<&'static str> {
        (self.status() >= 500).then_some(upstream::NOT_SENT)
    }
    /// How long to wait before trying again, when known.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
    /// The message in the errors body; never a secret.
    fn message(&self) -> String {
        self.to_string()
    }
}

/// The reason of a request ended because the client was too slow (`[server] *_timeout_secs`).
pub const TIMED_OUT: &str = "request_timeout";

/// A 408 for a client too slow in `phase` (one of [`crate::metrics::TIMEOUT_PHASES`]).
pub fn timed_out(phase: &'static str) -> Refusal {
    let what = match phase {
        "header" => "the request header did not arrive in time",
        "body" => "the request body stopped arriving",
        _ => "the request took longer than the proxy allows",
    };
    Refusal::new(408, TIMED_OUT, what)
}

/// A response the proxy writes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    pub message: String,
    pub upstream: Option<&'static str>,
    /// Whole seconds for `Retry-After` (at least 1 when present).
    pub retry_after: Option<u64>,
}

impl Refusal {
    /// A refusal with no upstream outcome and no retry hint.
    pub fn new(status: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            reason,
            message: message.into(),
            upstream: None,
            retry_after: None,
        }
    }

    /// The same, marked with an `X-Proxy-Upstream` outcome.
    pub fn upstream(mut self, outcome: &'static str) -> Self {
        self.upstream = Some(outcome);
        self
    }

    /// 4xx are refusals of the request; 5xx failures on the way.
    pub fn decision(&self) -> Decision {
        if self.status >= 500 {
            Decision::Failed
        } else {
            Decision::Denied
        }
    }

    /// The Meraki-style body.
    pub fn body(&self) -> Bytes {
        body(&self.message)
    }
}

impl<E: Refuse> From<&E> for Refusal {
    fn from(e: &E) -> Self {
        Refusal {
            status: e.status(),
            reason: e.reason(),
            message: e.message(),
            upstream: e.upstream(),
            // Clients do int(Retry-After): whole seconds, rounded up, at least 1.
            retry_after: e
                .retry_after()
                .map(|d| d.as_millis().div_ceil(1000).max(1) as u64),
        }
    }
}

/// Serializes one message as a Meraki error body.
pub fn body(message: &str) -> Bytes {
    let value = serde_json::json!({ "errors": [message] });
    Bytes::from(value.to_string())
}

impl Refuse for crate::identity::IdentityError {
    fn status(&self) -> u16 {
        crate::identity::IdentityError::status(*self)
    }
    fn reason(&self) -> &'static str {
        crate::identity::IdentityError::reason(*self)
    }
}

impl Refuse for crate::shaping::Throttled {
    fn status(&self) -> u16 {
        429
    }
    fn reason(&self) -> &'static str {
        RATE_LIMITED
    }
    fn upstream(&self) -> Option<&'static str> {
        Some(upstream::NOT_SENT)
    }
    fn retry_after(&self) -> Option<Duration> {
        Some(self.expected_wait)
    }
}

/// The reason of a local 429: the request was refused for want of rate budget, never sent.
pub const RATE_LIMITED: &str = "rate_limited";

impl Refuse for crate::route::RouteError {
    fn status(&self) -> u16 {
        crate::route::RouteError::status(self)
    }
    fn reason(&self) -> &'static str {
        crate::route::RouteError::reason(self)
    }
    fn upstream(&self) -> Option<&'static str> {
        match self {
            // A lookup refused for want of rate budget was not sent either.
            crate::route::RouteError::LookupFailed { cause, .. }
                if cause.reason == RATE_LIMITED =>
            {
                Some(upstream::NOT_SENT)
            }
            e => (e.status() >= 500).then_some(upstream::NOT_SENT),
        }
    }
    fn retry_after(&self) -> Option<Duration> {
        match self {
            crate::route::RouteError::LookupFailed { cause, .. } => {
                cause.retry_after.map(Duration::from_secs)
            }
            _ => None,
        }
    }
}

impl Refuse for crate::token::TokenError {
    fn status(&self) -> u16 {
        use crate::token::TokenError as T;
        match self {
            T::RefusedAtOperation { .. } => 401,
            _ => 503,
        }
    }
    fn reason(&self) -> &'static str {
        use crate::token::TokenError as T;
        match self {
            T::NoGrant { .. } => "no_grant",
            T::NeedsReauth { .. } => "needs_reauthorization",
            T::AuthServer { .. } | T::BackingOff { .. } => "auth_server_error",
            T::RefusedAtOperation { .. } => "refused_at_operation",
            T::Store(_) | T::Conflict => "store_error",
            T::OtherInstance { .. } => "refresh_in_progress",
        }
    }
    fn upstream(&self) -> Option<&'static str> {
        Some(match self {
            crate::token::TokenError::RefusedAtOperation { .. } => upstream::REJECTED_401,
            _ => upstream::NOT_SENT,
        })
    }
    fn retry_after(&self) -> Option<Duration> {
        crate::token::TokenError::retry_after(self)
    }
    fn message(&self) -> String {
        // The authorization server's failure class is useful to the client; its details (and
        // store errors) stay in the proxy's log.
        match self {
            crate::token::TokenError::AuthServer { source, .. } => {
                format!("{self} ({})", source.label())
            }
            _ => self.to_string(),
        }
    }
}

impl Refuse for crate::forward::RedirectError {
    fn status(&self) -> u16 {
        502
    }
    fn reason(&self) -> &'static str {
        match self {
            crate::forward::RedirectError::HostNotAllowed(_) => "redirect_not_allowed",
            crate::forward::RedirectError::BadLocation => "bad_redirect",
            crate::forward::RedirectError::TooMany => "too_many_redirects",
            crate::forward::RedirectError::BodyTooLarge => "redirect_body_too_large",
        }
    }
    fn upstream(&self) -> Option<&'static str> {
        Some(upstream::REDIRECTED)
    }
}

/// What a Pingora error the proxy did not raise itself means for the client.
pub fn from_pingora(e: &pingora::Error) -> Refusal {
    use pingora::ErrorType as E;
    let etype = e.etype();
    if let E::HTTPStatus(code) = etype {
        return Refusal::new(
            *code,
            "proxy_error",
            format!("request failed with status {code}"),
        );
    }
    use crate::forward::{fault_phase, FaultPhase};
    if matches!(e.esource(), pingora::ErrorSource::Upstream) {
        if let Some(r) = upstream_connect_refusal(e) {
            return r;
        }
    }
    match e.esource() {
        pingora::ErrorSource::Upstream if never_sent(etype) => Refusal::new(
            502,
            "upstream_unreachable",
            "could not connect to the Meraki API; the request was not sent",
        )
        .upstream(upstream::NOT_SENT),
        pingora::ErrorSource::Upstream => match fault_phase(etype, e.esource()) {
            FaultPhase::NotWritten => Refusal::new(
                502,
                "upstream_write_failed",
                "the Meraki API connection failed before the request was completely sent; it was not applied",
            )
            .upstream(upstream::NOT_SENT),
            FaultPhase::TimedOut => Refusal::new(
                504,
                "upstream_timeout",
                "the Meraki API did not answer in time; the request was sent and may have been applied",
            )
            .upstream(upstream::SENT_NO_ANSWER),
            FaultPhase::Unanswered | FaultPhase::Other => Refusal::new(
                502,
                "upstream_error",
                "the Meraki API connection failed after the request was sent; it may have been applied",
            )
            .upstream(upstream::SENT_NO_ANSWER),
        },
        pingora::ErrorSource::Downstream => {
            Refusal::new(400, "malformed_request", "malformed request")
        }
        _ => Refusal::new(500, "internal_error", "internal proxy error"),
    }
}

/// A failed TLS handshake or egress tunnel, with its cause named: nothing was sent.
fn upstream_connect_refusal(e: &pingora::Error) -> Option<Refusal> {
    use pingora::ErrorType as E;
    let text = e.to_string();
    match e.etype() {
        E::TLSHandshakeFailure | E::TLSHandshakeTimedout | E::InvalidCert => {
            let failure = crate::tls::TlsFailure::of_pingora(e)?;
            let host = text
                .rsplit_once("SNI: ")
                .map(|(_, sni)| sni.split([',', ' ']).next().unwrap_or(sni).to_owned());
            Some(
                Refusal::new(
                    502,
                    failure.upstream_reason(),
                    format!(
                        "could not connect to the Meraki API{}: TLS {}; the request was not sent",
                        host.map(|h| format!(" ({h})")).unwrap_or_default(),
                        failure.describe()
                    ),
                )
                .upstream(upstream::NOT_SENT),
            )
        }
        E::ConnectProxyFailure => Some(
            Refusal::new(
                502,
                "egress_proxy_refused",
                "the egress proxy did not open a tunnel to the Meraki API; the request was not sent",
            )
            .upstream(upstream::NOT_SENT),
        ),
        _ => None,
    }
}

/// Connection-level failures happen before anything is sent upstream.
fn never_sent(e: &pingora::ErrorType) -> bool {
    use pingora::ErrorType as E;
    matches!(
        e,
        E::ConnectTimedout
            | E::ConnectRefused
            | E::ConnectNoRoute
            | E::ConnectError
            | E::ConnectProxyFailure
            | E::TLSHandshakeFailure
            | E::TLSHandshakeTimedout
            | E::TLSWantX509Lookup
            | E::InvalidCert
            | E::HandshakeError
            | E::SocketError
            | E::BindError
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_handshake_failure_names_its_cause() {
        let mut e = pingora::Error::explain(
            pingora::ErrorType::TLSHandshakeFailure,
            "TLS connect() failed: invalid peer certificate: UnknownIssuer, SNI: api.meraki.com",
        );
        e.as_up();
        let r = from_pingora(&e);
        assert_eq!(
            (r.status, r.reason, r.upstream),
            (502, "upstream_tls_unknown_issuer", Some("not-sent"))
        );
        assert!(
            r.message.contains("(api.meraki.com)") && r.message.contains("issuer unknown"),
            "{}",
            r.message
        );
    }

    #[test]
    fn body_is_meraki_shaped_and_escaped() {
        let b = body("bad \"key\"");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["errors"][0], "bad \"key\"");
    }

    #[test]
    fn a_local_429_says_not_sent_and_when_to_retry() {
        let e = crate::shaping::Throttled {
            org: "111".into(),
            cause: crate::shaping::Cause::WaitTooLong,
            expected_wait: Duration::from_millis(2300),
            limit: 2000,
        };
        let r = Refusal::from(&e);
        assert_eq!(
            (r.status, r.reason, r.upstream, r.retry_after),
            (429, "rate_limited", Some("not-sent"), Some(3))
        );
        assert!(r.message.contains("organization 111"), "{}", r.message);
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let e = crate::token::TokenError::BackingOff {
            retry_after: Duration::from_millis(1200),
            last_failure: "unreachable",
        };
        let r = Refusal::from(&e);
        assert_eq!(
            (r.status, r.retry_after, r.upstream),
            (503, Some(2), Some("not-sent"))
        );
        let e = crate::token::TokenError::BackingOff {
            retry_after: Duration::from_millis(10),
            last_failure: "unreachable",
        };
        assert_eq!(Refusal::from(&e).retry_after, Some(1));
    }
}
