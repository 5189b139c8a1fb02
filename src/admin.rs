//! The admin listener: `/metrics`, `/healthz`, `/readyz`, the status page (`/`), and grant
//! onboarding through Meraki's consent page (`/oauth/connect`, `/oauth/callback`).

use crate::clock::{describe_expiry, describe_past, now_unix, rfc3339};
use crate::config::Integration;
use crate::metrics::Metrics;
use crate::reload::Live;
use crate::report::chain;
use crate::secret::Secret;
use crate::shaping::Shaper;
use crate::token::{GrantStatus, Grants};
use async_trait::async_trait;
use dashmap::DashMap;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

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

/// Escapes text for HTML.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2rem;color:#1d2530;max-width:72rem}\
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem}table{border-collapse:collapse;width:100%}\
th,td{text-align:left;padding:.4rem .6rem;border-bottom:1px solid #d6dbe1;vertical-align:top}th{background:#f2f4f7}\
.ok{color:#18794e;font-weight:600}.bad{color:#b42318;font-weight:600}code{background:#f2f4f7;padding:0 .2rem}\
a.button{display:inline-block;background:#1f6feb;color:#fff;padding:.3rem .8rem;border-radius:4px;text-decoration:none}\
.note{color:#5b6573;font-size:.9rem}";

fn page(status: u16, title: &str, body: &str) -> Response<Vec<u8>> {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t} · meraki-oauth-proxy</title>\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><style>{STYLE}</style></head>\
         <body><h1>{t}</h1>{body}</body></html>",
        t = escape(title)
    );
    respond(status, "text/html; charset=utf-8", html)
}

fn error_page(status: u16, title: &str, detail: &str) -> Response<Vec<u8>> {
    page(
        status,
        title,
        &format!("<p id=\"error\">{}</p><p><a href=\"/\">Back to the status page</a></p><p class=\"note\">Nothing was stored.</p>", escape(detail)),
    )
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
        })
    }

    /// The same app, its status page showing `shaper`'s budgets, queues and shares.
    pub fn with_shaper(mut self, shaper: Shaper) -> Self {
        self.shaper = Some(shaper);
        self
    }

    /// Readiness: the store answers and (unless configured otherwise) no grant needs
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
        let ready = store_ok && (reauth.is_empty() || !self.live.config().reauth_fails_readiness);
        (
            ready,
            serde_json::json!({ "ready": ready, "store": if store_ok { "ok" } else { "unreachable" }, "grants_needing_reauthorization": reauth }),
        )
    }

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

    /// `GET /oauth/connect?integration=N`: sends the org admin to Meraki's consent page.
    pub fn connect(&self, q: &HashMap<String, String>) -> Response<Vec<u8>> {
        let Some(name) = q.get("integration") else {
            return error_page(
                400,
                "Cannot connect",
                "The link names no integration (?integration=NAME).",
            );
        };
        let config = self.live.config();
        let Some(it) = config.integration(name) else {
            return error_page(
                404,
                "Cannot connect",
                &format!("No integration named {name:?} is configured."),
            );
        };
        let (Some(authorize), Some(redirect_uri)) =
            (&config.upstream.authorize_url, &it.redirect_uri)
        else {
            return error_page(
                400,
                "Cannot connect",
                "Onboarding needs upstream.authorize_url and the integration's redirect_uri in proxy.toml.",
            );
        };
        self.pending.retain(|_, (_, t)| t.elapsed() < STATE_TTL);
        if self.pending.len() >= MAX_PENDING {
            return error_page(
                429,
                "Too many pending connections",
                "Try again in a few minutes.",
            );
        }
        let state = hex::encode(rand::random::<[u8; 24]>());
        self.pending
            .insert(state.clone(), (it.name.clone(), Instant::now()));
        let mut url = authorize.clone();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &it.client_id)
            .append_pair("redirect_uri", redirect_uri.as_str())
            .append_pair("scope", &it.scopes.join(" "))
            .append_pair("state", &state);
        redirect(url.as_str())
    }

    /// `GET /oauth/callback`: checks `state`, exchanges the code, stores the grant.
    pub async fn callback(&self, q: &HashMap<String, String>) -> Response<Vec<u8>> {
        let Some(state) = q.get("state") else {
            return error_page(
                400,
                "Authorization failed",
                "The callback carries no state: it did not come from a connect link of this proxy.",
            );
        };
        // Single use: removed whatever happens next.
        let Some((_, (integration, issued))) = self.pending.remove(state) else {
            return error_page(
                400,
                "Authorization failed",
                "Unknown or already used state: start again from the Connect button.",
            );
        };
        if issued.elapsed() > STATE_TTL {
            return error_page(400, "Authorization failed", "This authorization took longer than 10 minutes and expired: start again from the Connect button.");
        }
        if let Some(error) = q.get("error") {
            let detail = q
                .get("error_description")
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            let meaning = match error.as_str() {
                "access_denied" => "the organization admin declined the consent",
                "invalid_scope" => {
                    "Meraki refused the requested scopes; check the integration's scopes"
                }
                _ => "Meraki's authorization server refused",
            };
            return error_page(
                400,
                "Authorization refused",
                &format!("{error}{detail}: {meaning}."),
            );
        }
        let Some(code) = q.get("code").filter(|c| !c.is_empty()) else {
            return error_page(
                400,
                "Authorization failed",
                "The callback carries no authorization code.",
            );
        };
        let Some(it) = self.grants.integration(&integration) else {
            return error_page(
                404,
                "Authorization failed",
                "The integration is no longer configured.",
            );
        };
        let redirect_uri = it
            .redirect_uri
            .as_ref()
            .map(|u| u.to_string())
            .unwrap_or_default();
        let tokens = match self
            .grants
            .endpoint()
            .exchange_code(&it, &Secret::new(code.clone()), &redirect_uri)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                return error_page(
                    502,
                    "Authorization failed",
                    &format!("Exchanging the code failed: {}.", chain(&e)),
                )
            }
        };
        let orgs = match &tokens.organization_id {
            Some(o) => vec![o.clone()],
            None => match self.organizations_of(&tokens.access_token).await {
                Ok(o) if !o.is_empty() => o,
                Ok(_) => {
                    return error_page(
                        502,
                        "Authorization failed",
                        "The new grant sees no organization.",
                    )
                }
                Err(e) => {
                    return error_page(
                        502,
                        "Authorization failed",
                        &format!("Listing the grant's organizations failed: {e}."),
                    )
                }
            },
        };
        match self.grants.add(&it.name, &orgs, tokens, "connect").await {
            Ok(g) => page(
                200,
                "Connected",
                &format!(
                    "<p id=\"connected\">Integration <b>{}</b> is connected for organization(s) <b>{}</b> (grant {}).</p><p><a href=\"/\">Back to the status page</a></p>",
                    escape(&it.name),
                    escape(&orgs.join(", ")),
                    g.id
                ),
            ),
            Err(e) => {
                tracing::error!(error = %chain(&e), "storing a connected grant failed");
                error_page(500, "Authorization failed", &format!("The grant could not be stored: {}.", chain(&e)))
            }
        }
    }

    async fn organizations_of(&self, access: &Secret) -> Result<Vec<String>, String> {
        let config = self.live.config();
        let url = format!(
            "{}/organizations",
            config.upstream.api_base.as_str().trim_end_matches('/')
        );
        let resp = self
            .http
            .get(url)
            .header(
                http::header::AUTHORIZATION,
                crate::token::state::bearer(access)
                    .ok_or("the access token is not a valid header")?,
            )
            .send()
            .await
            .map_err(|e| chain(&e.without_url()))?;
        if resp.status() != 200 {
            return Err(format!("Meraki answered {}", resp.status().as_u16()));
        }
        let list: Vec<serde_json::Value> = resp
            .json()
            .await
            .map_err(|_| "not a JSON list".to_string())?;
        Ok(list
            .iter()
            .filter_map(|o| o.get("id").and_then(|i| i.as_str()).map(str::to_owned))
            .collect())
    }

    /// The status page: integrations, grants, clients. No secrets; token fingerprints only.
    pub async fn status_page(&self) -> Response<Vec<u8>> {
        let snapshot = self.live.snapshot();
        let config = &snapshot.config;
        let (ready, _) = self.readiness().await;
        let now = now_unix();
        let mut b = String::new();
        let _ = write!(
            b,
            "<p>Version {}. Readiness: <span id=\"readiness\" class=\"{}\">{}</span>. Upstream: <code>{}</code>. Configuration: <span id=\"config-generation\">generation {}</span> (reload with SIGHUP or <code>POST /admin/reload</code>).</p>",
            env!("CARGO_PKG_VERSION"),
            if ready { "ok" } else { "bad" },
            if ready { "ready" } else { "not ready" },
            escape(config.upstream.api_base.as_str()),
            snapshot.generation,
        );
        b.push_str("<h2>Integrations</h2><table id=\"integrations\"><tr><th>Name</th><th>Client ID</th><th>Scopes</th><th></th></tr>");
        for it in &config.integrations {
            let _ = write!(
                b,
                "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                escape(&it.name),
                escape(&it.client_id),
                escape(&it.scopes.join(" ")),
                self.connect_button(it, "Connect")
            );
        }
        b.push_str("</table><h2>Grants</h2><table id=\"grants\"><tr><th>Grant</th><th>Integration</th><th>Organizations</th><th>Status</th><th>Access token</th><th>Expires</th><th>Last refresh</th><th>Last use</th></tr>");
        let grants = self.grants.all();
        if grants.is_empty() {
            b.push_str("<tr><td colspan=\"8\">No grants yet: use a Connect button, or <code>meraki-oauth-proxy grants import</code>.</td></tr>");
        }
        for g in &grants {
            let st = g.state();
            let status = match st.status {
                GrantStatus::Ok => "<span class=\"ok\">ok</span>".to_owned(),
                GrantStatus::NeedsReauth => format!(
                    "<span class=\"bad\">needs re-authorization</span> {}",
                    config
                        .integration(&g.integration().name)
                        .map(|it| self.connect_button(it, "Reconnect"))
                        .unwrap_or_default()
                ),
            };
            let expires = describe_expiry(st.expires_at, now);
            let _ = write!(
                b,
                "<tr data-grant=\"{id}\"><td>{id}</td><td>{}</td><td>{}</td><td class=\"status\">{status}</td><td><code>{}</code></td><td>{expires}</td><td>{}</td><td>{}</td></tr>",
                escape(&g.integration().name),
                escape(&g.organizations.join(", ")),
                st.fingerprint().map_or("-", |f| &**f),
                st.issued_at.map(rfc3339).unwrap_or_else(|| "-".into()),
                describe_past(g.last_used()),
                id = g.id,
            );
        }
        b.push_str("</table><h2>Clients</h2><table id=\"clients\"><tr><th>Name</th><th>Integration</th><th>Organizations</th><th>Methods</th></tr>");
        for c in &config.clients {
            let methods = c
                .methods
                .as_ref()
                .map(|m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "))
                .unwrap_or_else(|| "all".into());
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&c.name),
                escape(&c.integration),
                escape(&c.organizations.join(", ")),
                escape(&methods)
            );
        }
        b.push_str("</table>");
        if let Some(shaper) = &self.shaper {
            self.rate_section(&mut b, shaper);
        }
        b.push_str("<p class=\"note\">Tokens are shown as the first 8 hex characters of their SHA-256. <a href=\"/metrics\">Metrics</a> · <a href=\"/readyz\">Readiness</a></p>");
        page(200, "meraki-oauth-proxy", &b)
    }

    /// Per organization: the budget and how much of it is in use, the queue, each client's
    /// share; per client: its recent requests, denials and local 429s.
    fn rate_section(&self, b: &mut String, shaper: &Shaper) {
        let limits = shaper.limits();
        b.push_str("<h2>Rate limits</h2>");
        if !limits.enabled {
            b.push_str("<p id=\"rate-off\">Shaping is off (<code>[rate_limits] enabled = false</code>): requests go upstream as they come.</p>");
        } else {
            let _ = write!(
                b,
                "<p class=\"note\">Each organization: {} requests/s, burst {}; {} requests/s in all. Requests wait at most {} ms for their turn, shared among clients by weight.</p>",
                limits.organization_rps,
                limits.organization_burst,
                limits.source_rps,
                limits.max_wait.as_millis()
            );
        }
        b.push_str("<table id=\"rate-organizations\"><tr><th>Organization</th><th>Budget now</th><th>In use (last minute)</th><th>Bucket</th><th>Waiting</th><th>Shares (last 5 minutes)</th><th>429s: proxy / Meraki</th></tr>");
        let orgs = shaper.organizations();
        if orgs.is_empty() {
            b.push_str("<tr><td colspan=\"7\">No request yet.</td></tr>");
        }
        for o in &orgs {
            let used = o.sent_1m as f64 / 60.0;
            let budget = if o.rps < o.configured_rps {
                format!(
                    "<span class=\"bad\">{:.1}/s</span> (slowed from {:.1}/s by Meraki's 429s)",
                    o.rps, o.configured_rps
                )
            } else {
                format!("{:.1}/s", o.rps)
            };
            let shares = o
                .clients
                .iter()
                .filter(|c| c.sent_5m > 0 || c.queued > 0)
                .map(|c| {
                    format!(
                        "<span data-client=\"{n}\">{n}: {:.0}%{}</span>",
                        100.0 * c.sent_5m as f64 / o.sent_5m.max(1) as f64,
                        if c.queued > 0 {
                            format!(", {} waiting", c.queued)
                        } else {
                            String::new()
                        },
                        n = escape(&c.client)
                    )
                })
                .collect::<Vec<_>>()
                .join("<br>");
            let _ = write!(
                b,
                "<tr data-org=\"{org}\"><td>{org}</td><td>{budget}</td><td class=\"used\">{used:.1}/s ({:.0}%)</td><td>{:.1} of {:.0}</td><td class=\"queued\">{}</td><td class=\"shares\">{}</td><td>{} / {}</td></tr>",
                100.0 * used / o.rps.max(f64::MIN_POSITIVE),
                o.tokens,
                o.depth,
                o.queued,
                if shares.is_empty() { "-".into() } else { shares },
                o.throttled_total,
                o.upstream_429_total,
                org = escape(&o.org),
            );
        }
        b.push_str("</table><table id=\"rate-clients\"><tr><th>Client</th><th>Weight</th><th>Requests (last 5 minutes)</th><th>Denied</th><th>Local 429s</th></tr>");
        let activity = shaper.clients();
        for c in &self.live.config().clients {
            let a = activity.iter().find(|a| *a.client == *c.name);
            let (requests, denied, throttled) =
                a.map_or((0, 0, 0), |a| (a.requests_5m, a.denied_5m, a.throttled_5m));
            let _ = write!(
                b,
                "<tr data-client=\"{n}\"><td>{n}</td><td>{}</td><td class=\"requests\">{requests}</td><td class=\"denied\">{denied}</td><td class=\"throttled\">{throttled}</td></tr>",
                c.weight,
                n = escape(&c.name)
            );
        }
        b.push_str("</table>");
    }

    fn connect_button(&self, it: &Integration, label: &str) -> String {
        if self.live.config().upstream.authorize_url.is_none() || it.redirect_uri.is_none() {
            return "<span class=\"note\">set authorize_url and redirect_uri to connect</span>"
                .into();
        }
        format!(
            "<a class=\"button connect\" href=\"/oauth/connect?integration={}\">{}</a>",
            escape(&url::form_urlencoded::byte_serialize(it.name.as_bytes()).collect::<String>()),
            escape(label)
        )
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
            "/" => self.status_page().await,
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

#[cfg(test)]
mod tests {
    #[test]
    fn escape_covers_html_metacharacters() {
        assert_eq!(
            super::escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
