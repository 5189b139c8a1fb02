//! The admin listener: `/metrics`, `/healthz`, `/readyz`, the status page (`/`), and grant
//! onboarding through Meraki's consent page (`/oauth/connect`, `/oauth/callback`).
//!
//! A file per job: `health` (`/healthz`, `/readyz`), `consent` (the OAuth connect/callback
//! flow that onboards a grant), `status` (the HTML status page and its helpers), `routing`
//! (the `ServeHttp` impl: the admin token, `/admin/reload`, and which path goes where).
//! [`Admin`] and the small response helpers live here, shared by all four.

mod consent;
mod health;
mod routing;
mod status;

pub use status::escape;
use status::{error_page, page};

use crate::metrics::Metrics;
use crate::reload::Live;
use crate::shaping::Shaper;
use crate::token::Grants;
use dashmap::DashMap;
use http::Response;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an onboarding `state` stays valid (Meraki's authorization codes live 10 minutes).
pub const STATE_TTL: Duration = Duration::from_secs(600);
/// Pending `state`s kept at most, so unauthenticated callers cannot grow memory.
const MAX_PENDING: usize = 1024;

/// The admin HTTP app.
pub struct Admin {
    pub live: Arc<Live>,
    pub grants: Arc<Grants>,
    pub metrics: Arc<Metrics>,
    http: reqwest::Client,
    /// Onboarding states: single use, bound to an integration, expiring.
    pending: DashMap<String, (String, Instant)>,
    /// The rate budgets, for the status page.
    shaper: Option<Shaper>,
    /// The audit log, whose health readiness and the status page report.
    audit: Option<Arc<crate::audit::Audit>>,
}

fn respond(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response<Vec<u8>> {
    let body = body.into();
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

fn redirect(location: &str) -> Response<Vec<u8>> {
    Response::builder()
        .status(302)
        .header("location", location)
        .header("content-length", 0)
        .header("cache-control", "no-store")
        .body(Vec::new())
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

impl Admin {
    /// The admin app over the proxy's shared state; its own calls (the consent flow's
    /// organization list) follow the outbound TLS policy.
    pub fn new(
        live: Arc<Live>,
        grants: Arc<Grants>,
        metrics: Arc<Metrics>,
        outbound: &crate::tls::Outbound,
    ) -> Result<Self, reqwest::Error> {
        let config = live.config();
        let http = outbound.http_client(config.token_timeout)?;
        Ok(Admin {
            live,
            grants,
            metrics,
            http,
            pending: DashMap::new(),
            shaper: None,
            audit: None,
        })
    }

    /// The same app, its status page showing `shaper`'s budgets, queues and shares.
    pub fn with_shaper(mut self, shaper: Shaper) -> Self {
        self.shaper = Some(shaper);
        self
    }

    /// The same app, reporting `audit`'s health in readiness and on the status page.
    pub fn with_audit(mut self, audit: Arc<crate::audit::Audit>) -> Self {
        self.audit = Some(audit);
        self
    }
}
