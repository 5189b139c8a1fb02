//! What a request carries through the hooks, grouped by phase: who and what (admission), the
//! forward (grant and token), the upstream exchange (attempts, retries, Meraki's answer), and
//! how it ended. Kept across Pingora's retries.

use crate::admission::{Forward, Seen};
use crate::audit::RequestId;
use crate::forward::RedirectTarget;
use crate::metrics::NONE;
use crate::refusal::{Decision, Refusal};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per-request state.
pub struct Ctx {
    pub(super) start: Instant,
    pub(super) request_id: RequestId,
    /// Counted in the in-flight gauge (a draining server waits for it).
    pub(super) counted_in_flight: bool,
    /// What admission learnt: identity, client, organization, path, operation.
    pub(super) seen: Seen,
    /// The subject of the connection's client certificate (mutual TLS).
    pub(super) client_cert: Option<Arc<str>>,
    /// The request being forwarded: organization, grant, token, upstream path.
    pub(super) forward: Option<Forward>,
    /// How long the request waited for its turn in the organization's rate budget.
    /// When the whole request must be done by (`[server] request_timeout_secs`).
    pub(super) deadline: Option<Instant>,
    pub(super) queue_wait: Option<Duration>,
    /// The exchange with Meraki.
    pub(super) upstream: Exchange,
    /// How the request ended.
    pub(super) outcome: Outcome,
}

/// The exchange with Meraki, across attempts.
#[derive(Default)]
pub(super) struct Exchange {
    /// Retried once after a 401 and a refresh.
    pub(super) retried_401: bool,
    /// Set just before an error that must be retried (401 after a refresh, a redirect).
    pub(super) retry_requested: bool,
    /// Where the last upstream redirect led, if one was followed.
    pub(super) redirect: Option<RedirectTarget>,
    pub(super) redirects: u32,
    /// Attempts repeated after an upstream connection fault (at most one).
    pub(super) fault_retries: u8,
    pub(super) sent: Option<Instant>,
    pub(super) elapsed: Option<Duration>,
    pub(super) status: Option<u16>,
    /// Meraki's `X-Request-Id`.
    pub(super) request_id: Option<http::HeaderValue>,
}

/// How the request ended.
pub(super) struct Outcome {
    pub(super) decision: Decision,
    /// The refusal written, if the proxy answered itself.
    pub(super) refusal: Option<Refusal>,
    /// A reason recorded for a forwarded request (e.g. a 401 passed through).
    pub(super) note: Option<&'static str>,
    /// What was wrong, beyond the refusal's reason (the audit record's `detail`).
    pub(super) detail: Option<&'static str>,
}

impl Ctx {
    /// A fresh context (what Pingora's `new_ctx` returns).
    pub fn new() -> Self {
        Ctx {
            start: Instant::now(),
            request_id: RequestId::new(),
            counted_in_flight: false,
            seen: Seen::default(),
            client_cert: None,
            forward: None,
            queue_wait: None,
            deadline: None,
            upstream: Exchange::default(),
            outcome: Outcome {
                decision: Decision::Forwarded,
                refusal: None,
                note: None,
                detail: None,
            },
        }
    }

    /// The decision recorded so far.
    pub fn decision(&self) -> Decision {
        self.outcome.decision
    }

    /// The refusal written, if any.
    pub fn refusal(&self) -> Option<&Refusal> {
        self.outcome.refusal.as_ref()
    }

    /// The operationId admission matched, if any.
    pub fn operation(&self) -> Option<&'static str> {
        self.seen.operation.map(|o| o.operation_id.as_str())
    }

    pub(super) fn integration(&self) -> &str {
        self.seen
            .client
            .as_deref()
            .map_or(NONE, |c| c.integration.as_str())
    }

    pub(super) fn client_name(&self) -> &str {
        self.seen
            .client
            .as_deref()
            .map_or(NONE, |c| c.name.as_str())
    }

    pub(super) fn org(&self) -> &str {
        self.seen.org.as_deref().unwrap_or(NONE)
    }

    /// The operation the refresh engine remembers refusals under: Meraki's operationId, else
    /// the path template.
    pub(super) fn operation_key(&self, method: &http::Method) -> String {
        match (self.operation(), &self.seen.path) {
            (Some(op), _) => op.to_owned(),
            (None, Some(path)) => crate::endpoints::template_of(method, path),
            (None, None) => method.as_str().to_owned(),
        }
    }

    /// Ends the request with `r`: recorded here, written by `fail_to_proxy`.
    pub(super) fn fail_with(&mut self, r: Refusal) -> pingora::Result<()> {
        let status = r.status;
        self.outcome.decision = r.decision();
        self.outcome.refusal = Some(r);
        pingora::Error::e_explain(
            pingora::HTTPStatus(status),
            "the proxy answers this request itself",
        )
    }
}

impl Default for Ctx {
    fn default() -> Self {
        Self::new()
    }
}
