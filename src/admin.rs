//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and a small status page.

use crate::metrics::Metrics;
use crate::token::{GrantStatus, Grants};
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::Arc;

/// The admin HTTP app.
pub struct Admin {
    pub grants: Arc<Grants>,
    pub metrics: Arc<Metrics>,
}

fn respond(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response<Vec<u8>> {
    let body = body.into();
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

impl Admin {
    /// Readiness: the store answers and no grant needs re-authorization.
    pub async fn readiness(&self) -> (bool, serde_json::Value) {
        let store = self.grants.store().clone();
        let store_ok = matches!(
            tokio::task::spawn_blocking(move || store.ping()).await,
            Ok(Ok(()))
        );
        let reauth: Vec<String> = self
            .grants
            .all()
            .iter()
            .filter(|g| g.state().status == GrantStatus::NeedsReauth)
            .map(|g| g.label())
            .collect();
        let ready = store_ok && reauth.is_empty();
        (
            ready,
            serde_json::json!({ "ready": ready, "store": if store_ok { "ok" } else { "unreachable" }, "grants_needing_reauthorization": reauth }),
        )
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_owned();
        match path.as_str() {
            "/metrics" => respond(200, "text/plain; version=0.0.4", self.metrics.render()),
            "/healthz" => respond(200, "text/plain", "ok\n"),
            "/readyz" => {
                let (ready, body) = self.readiness().await;
                respond(
                    if ready { 200 } else { 503 },
                    "application/json",
                    body.to_string(),
                )
            }
            _ => respond(
                404,
                "application/json",
                crate::errors::body("not found").to_vec(),
            ),
        }
    }
}
