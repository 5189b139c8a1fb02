//! The adapter between the token module's events and what operators read: each
//! [`TokenEvent`] becomes an audit record and metric updates. Wired in `server.rs`; the token
//! module itself knows neither the audit log nor the metrics.

use crate::audit::{Audit, ServerRecord};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::reload::{ReloadSink, Reloaded};
use crate::token::{EventKind, EventSink, GrantStatus, RefreshCause, StoreOp, TokenEvent};
use std::sync::Arc;

/// Turns token events into audit records and metrics.
pub struct Observer {
    pub audit: Arc<Audit>,
    pub metrics: Arc<Metrics>,
}

impl EventSink for Observer {
    fn token(&self, e: TokenEvent) {
        let m = &self.metrics;
        let integration = &*e.integration;
        let orgs = &e.organizations[..];
        let org = e
            .organization
            .clone()
            .or_else(|| orgs.first().cloned())
            .unwrap_or_default();
        let cause = e.cause.map_or("expiring", RefreshCause::as_str);
        match &e.kind {
            EventKind::Loaded => {
                let causes: Vec<&str> = RefreshCause::ALL.iter().map(|c| c.as_str()).collect();
                m.init_grant(integration, e.grant_id, orgs, &causes);
            }
            EventKind::Refreshed { .. } => {
                m.refresh(integration, e.grant_id, orgs, &org, "ok");
                m.token_call(integration, e.grant_id, cause, "ok");
            }
            EventKind::RefreshFailed { label, .. } => {
                m.refresh(integration, e.grant_id, orgs, &org, label);
                m.token_call(integration, e.grant_id, cause, label);
            }
            EventKind::NeedsReauth => {
                m.refresh(integration, e.grant_id, orgs, &org, "invalid_grant");
                m.token_call(integration, e.grant_id, cause, "invalid_grant");
            }
            EventKind::OperationRefused { remembered, .. }
            | EventKind::RefusalForgotten { remembered, .. } => {
                m.refused_operations(integration, e.grant_id, *remembered);
            }
            EventKind::Probed { verdict } => m.token_probe(integration, verdict.as_str()),
            _ => {}
        }
        if let Some(d) = e.call_duration {
            m.token_call_duration(integration, d);
        }
        m.grant_state(
            integration,
            e.grant_id,
            orgs,
            e.expires_at,
            e.status == GrantStatus::NeedsReauth,
        );
        // Loading a grant is not an event for the security team.
        if e.kind != EventKind::Loaded {
            self.audit.token_event(&e);
        }
    }

    fn store(&self, op: StoreOp) {
        self.metrics.store_op(op.op, op.elapsed, op.ok);
    }
}

impl ReloadSink for Observer {
    fn reloaded(&self, trigger: &'static str, outcome: &Result<Reloaded, String>, config: &Config) {
        match outcome {
            Ok(r) => {
                self.metrics.init_labels(config);
                self.metrics.reload(true, r.generation);
                self.audit.server_event(&ServerRecord {
                    generation: Some(r.generation),
                    clients: Some(r.clients),
                    integrations: Some(r.integrations),
                    restart_required: &r.restart_required,
                    detail: r.store_warning.clone(),
                    ..ServerRecord::new("config_reloaded", trigger)
                });
            }
            Err(why) => {
                self.metrics.reload(false, self.metrics.config_generation());
                self.audit.server_event(&ServerRecord {
                    detail: Some(why.clone()),
                    ..ServerRecord::new("config_reload_refused", trigger)
                });
            }
        }
    }
}
