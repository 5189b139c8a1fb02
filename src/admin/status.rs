//! The status page (`/`): integrations, grants, clients and rate budgets, as HTML.

use super::*;
use crate::clock::{describe_expiry, describe_past, now_unix, rfc3339};
use crate::config::Integration;
use crate::shaping::Shaper;
use crate::token::GrantStatus;
use http::Response;
use std::fmt::Write as _;

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

pub(super) fn page(status: u16, title: &str, body: &str) -> Response<Vec<u8>> {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t} · meraki-oauth-proxy</title>\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><style>{STYLE}</style></head>\
         <body><h1>{t}</h1>{body}</body></html>",
        t = escape(title)
    );
    respond(status, "text/html; charset=utf-8", html)
}

pub(super) fn error_page(status: u16, title: &str, detail: &str) -> Response<Vec<u8>> {
    page(
        status,
        title,
        &format!("<p id=\"error\">{}</p><p><a href=\"/\">Back to the status page</a></p><p class=\"note\">Nothing was stored.</p>", escape(detail)),
    )
}

impl Admin {
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
        let banners = self.audit.as_deref().map(crate::audit::banners);
        for banner in banners.unwrap_or_default() {
            let _ = write!(
                b,
                "<p id=\"audit-banner\" class=\"bad\">{}</p>",
                escape(&banner)
            );
        }
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
        b.push_str("</table>");
        scopes_section(&mut b, &grants);
        self.refused_section(&mut b, &grants);
        b.push_str("<h2>Clients</h2><table id=\"clients\"><tr><th>Name</th><th>Integration</th><th>Organizations</th><th>Methods</th></tr>");
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

    /// The operations at which Meraki refuses a grant's tokens, however fresh (their 401s pass
    /// through without a refresh while the token works elsewhere).
    fn refused_section(&self, b: &mut String, grants: &[Arc<crate::token::Grant>]) {
        let now_ms = self.grants.clock().now_ms();
        let rows: Vec<_> = grants
            .iter()
            .flat_map(|g| {
                g.refused_operations(now_ms)
                    .into_iter()
                    .map(move |r| (g, r))
            })
            .collect();
        if rows.is_empty() {
            return;
        }
        b.push_str("<h2>Operations Meraki refuses</h2><p class=\"note\">A token obtained because of a 401 at these operations was refused there again (the grant may lack the OAuth scope they need): their 401s pass through, marked <code>X-Proxy-Upstream: rejected-401</code>, without rotating the grant, while its token works elsewhere. Forgotten on a 2xx there, a reload, or when the time is up.</p><table id=\"refused-operations\"><tr><th>Grant</th><th>Integration</th><th>Operation</th><th>Since</th><th>Until</th></tr>");
        for (g, r) in rows {
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                g.id,
                escape(&g.integration().name),
                escape(&r.operation),
                rfc3339(r.since_ms.div_euclid(1000)),
                rfc3339(r.until_ms.div_euclid(1000)),
            );
        }
        b.push_str("</table>");
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
            // In a fleet: this instance's part, by the fleet's division by demand.
            let budget = if o.instances > 1 {
                format!(
                    "{budget}<br><span class=\"fleet-share\">{:.0}% of the organization's budget, by demand: {:.1}/s asked here, {:.1}/s by the fleet of {}</span>",
                    100.0 * o.share,
                    o.asked_here,
                    o.asked_fleet,
                    o.instances
                )
            } else {
                budget
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

/// Each grant's OAuth scopes and where they come from: what the proxy checks every operation's
/// required scope against (403 `missing_scope` when the grant lacks it).
fn scopes_section(b: &mut String, grants: &[Arc<crate::token::Grant>]) {
    if grants.is_empty() {
        return;
    }
    b.push_str("<h2>Grant scopes</h2><p class=\"note\">An operation whose OAuth scope (Meraki's API index) the grant lacks is refused by the proxy with 403 <code>missing_scope</code>, without a refresh or an upstream call.</p><table id=\"grant-scopes\"><tr><th>Grant</th><th>Integration</th><th>Scopes</th><th>From</th></tr>");
    for g in grants {
        let (scopes, from) = match g.scopes() {
            None => (
                "-".to_owned(),
                "unknown: no scope is checked (Meraki named none, the integration lists none)",
            ),
            Some(s) if g.scopes_from_meraki() => (s.to_string(), "Meraki's token response"),
            Some(s) => (s.to_string(), "the integration's configured scopes"),
        };
        let _ = write!(
            b,
            "<tr data-grant-scopes=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            g.id,
            g.id,
            escape(&g.integration().name),
            escape(&scopes),
            from
        );
    }
    b.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escape_covers_html_metacharacters() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
