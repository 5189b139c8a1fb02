//! The admin listener's routing: the admin token, `/admin/reload`, and which path goes where.

use super::*;
use crate::report::chain;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::collections::HashMap;
use subtle::ConstantTimeEq;

impl Admin {
    /// Whether the request carries the admin token (Bearer, or Basic with it as password).
    fn authorized(&self, headers: &http::HeaderMap) -> bool {
        let config = self.live.config();
        let Some(token) = &config.admin_token else {
            return true;
        };
        let Some(value) = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let presented = if let Some(b) = value.strip_prefix("Bearer ") {
            b.trim().to_owned()
        } else if let Some(b) = value.strip_prefix("Basic ") {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .unwrap_or_default();
            let text = String::from_utf8(decoded).unwrap_or_default();
            text.split_once(':')
                .map(|(_, p)| p.to_owned())
                .unwrap_or_default()
        } else {
            return false;
        };
        presented.len() == token.expose().len()
            && bool::from(presented.as_bytes().ct_eq(token.expose().as_bytes()))
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_owned();
        let query: HashMap<String, String> = req
            .uri
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        // Probes and the browser coming back from Meraki cannot carry the admin token; the
        // callback is protected by its single-use state instead.
        let open = matches!(path.as_str(), "/healthz" | "/readyz" | "/oauth/callback");
        if !open && !self.authorized(&req.headers) {
            let mut r = respond(
                401,
                "application/json",
                crate::refusal::body("admin token required").to_vec(),
            );
            r.headers_mut().insert(
                "www-authenticate",
                http::HeaderValue::from_static("Basic realm=\"meraki-oauth-proxy admin\""),
            );
            return r;
        }
        if path == "/admin/reload" {
            if req.method != http::Method::POST {
                return respond(
                    405,
                    "application/json",
                    crate::refusal::body("use POST /admin/reload").to_vec(),
                );
            }
            return match self.live.reload("admin").await {
                Ok(r) => respond(
                    200,
                    "application/json",
                    serde_json::json!({ "reloaded": true, "generation": r.generation, "clients": r.clients, "integrations": r.integrations, "restartRequired": r.restart_required, "storeWarning": r.store_warning }).to_string(),
                ),
                Err(e) => respond(
                    422,
                    "application/json",
                    crate::refusal::body(&format!(
                        "configuration not reloaded, the running one stays: {}",
                        chain(&e)
                    ))
                    .to_vec(),
                ),
            };
        }
        if req.method != http::Method::GET && req.method != http::Method::HEAD {
            return respond(
                405,
                "application/json",
                crate::refusal::body("method not allowed").to_vec(),
            );
        }
        match path.as_str() {
            "/" => self.status_page(&query).await,
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
            "/oauth/connect" => self.connect(&query),
            "/oauth/callback" => self.callback(&query).await,
            _ => respond(
                404,
                "application/json",
                crate::refusal::body("not found").to_vec(),
            ),
        }
    }
}
