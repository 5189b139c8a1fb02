//! What the token module tells the rest of the program: plain events, emitted after the store
//! committed (or failed to commit) what they report, to a sink wired in `server.rs`. The token
//! module never reaches into the audit log or the metrics itself.

use super::probe::Probe;
use super::store::GrantStatus;
use std::sync::Arc;
use std::time::Duration;

/// Why a refresh was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshCause {
    /// The access token is missing or past its refresh point.
    Expiring,
    /// Meraki answered 401 to the current token generation.
    Rejected,
    /// The grant has been idle long enough that Meraki's 90-day idle revocation must be headed off.
    KeepAlive,
    /// A refresh token imported by an operator, exchanged at once.
    Import,
}

impl RefreshCause {
    /// A label for the audit record and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshCause::Expiring => "expiring",
            RefreshCause::Rejected => "rejected_by_meraki",
            RefreshCause::KeepAlive => "keep-alive",
            RefreshCause::Import => "import",
        }
    }

    /// Every cause, for metrics initialized at zero.
    pub const ALL: [RefreshCause; 4] = [
        RefreshCause::Expiring,
        RefreshCause::Rejected,
        RefreshCause::KeepAlive,
        RefreshCause::Import,
    ];
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A grant was loaded from the store (at start or when another process added it).
    Loaded,
    /// A token call succeeded and its rotation is committed.
    Refreshed { rotated: bool },
    /// A token call failed (not `invalid_grant`); `label` is the fixed failure class, `retry_in`
    /// the backoff before the next attempt.
    RefreshFailed {
        label: &'static str,
        retry_in: Duration,
    },
    /// The authorization server said `invalid_grant`: an admin must connect again.
    NeedsReauth,
    /// A rotation the authorization server made could not be committed (kept in memory and
    /// retried before the token is used).
    CommitFailed,
    /// The authorization server issued an access token shorter than the proxy's minimum.
    ShortLifetime,
    /// A grant was stored (`how`: import, connect).
    Added { how: &'static str },
    /// A grant was revoked at the authorization server and deleted.
    Revoked,
    /// Meraki refused, at `operation`, a token obtained because of a 401 there: the operation's
    /// 401s pass through without a refresh while the token works elsewhere. `remembered`: how
    /// many operations the grant remembers now.
    OperationRefused {
        operation: Arc<str>,
        remembered: usize,
    },
    /// A remembered refusal was forgotten (`why`: `2xx`, `expired`, `reload`).
    RefusalForgotten {
        operation: Arc<str>,
        why: &'static str,
        remembered: usize,
    },
    /// The engine asked Meraki whether the grant's token works.
    Probed { verdict: Probe },
}

impl EventKind {
    /// The audit log's `event` value.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Loaded => "grant_loaded",
            EventKind::Refreshed { .. } => "token_refreshed",
            EventKind::RefreshFailed { .. } => "refresh_failed",
            EventKind::NeedsReauth => "needs_reauthorization",
            EventKind::CommitFailed => "commit_failed",
            EventKind::ShortLifetime => "short_token_lifetime",
            EventKind::Added { .. } => "grant_added",
            EventKind::Revoked => "grant_revoked",
            EventKind::OperationRefused { .. } => "operation_refused",
            EventKind::RefusalForgotten { .. } => "operation_refusal_forgotten",
            EventKind::Probed { .. } => "token_probed",
        }
    }
}

/// One event about one grant. Carries no secret: tokens appear as fingerprints only.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub kind: EventKind,
    pub grant_id: i64,
    pub integration: Arc<str>,
    /// Every organization the grant serves.
    pub organizations: Arc<[String]>,
    /// The organization of the request that caused it, when a request did.
    pub organization: Option<String>,
    pub cause: Option<RefreshCause>,
    /// The generation after the event.
    pub generation: i64,
    pub status: GrantStatus,
    /// Unix seconds the current access token expires at.
    pub expires_at: i64,
    pub fingerprint: Option<Arc<str>>,
    /// How long the token call took, for events that made one.
    pub call_duration: Option<Duration>,
    /// Human-readable detail (the authorization server's description, a store error).
    pub detail: Option<String>,
}

/// A store operation, timed (for metrics).
#[derive(Debug, Clone, Copy)]
pub struct StoreOp {
    pub op: &'static str,
    pub elapsed: Duration,
    pub ok: bool,
}

/// Where events go.
pub trait EventSink: Send + Sync {
    /// A grant or token event.
    fn token(&self, event: TokenEvent);
    /// A store operation's duration and result.
    fn store(&self, op: StoreOp);
}
