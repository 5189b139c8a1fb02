//! `/healthz` and `/readyz`: liveness and readiness.

use super::*;
use crate::token::GrantStatus;

impl Admin {
    /// Readiness: the audit log writes, the store answers and (unless configured otherwise) no grant needs
    /// re-authorization.
    pub async fn readiness(&self) -> (bool, serde_json::Value) {
        let store_ok = self.grants.store().ping().await.is_ok();
        let reauth: Vec<String> = self
            .grants
            .all()
            .iter()
            .filter(|g| g.state().status == GrantStatus::NeedsReauth)
            .map(|g| g.label())
            .collect();
        let audit = self.audit.as_ref().map(|a| crate::audit::readiness_of(a));
        let audit_ok = audit.as_ref().is_none_or(|(ok, _)| *ok);
        let ready = audit_ok
            && store_ok
            && (reauth.is_empty() || !self.live.config().reauth_fails_readiness);
        (
            ready,
            serde_json::json!({ "ready": ready, "store": if store_ok { "ok" } else { "unreachable" }, "audit": audit.map(|(_, v)| v), "grants_needing_reauthorization": reauth }),
        )
    }
}
