//! The status page (`/`): integrations, grants, clients and rate budgets, as HTML.
//!
//! Built for thousands of clients: a search (`?q=`: a client's or integration's name, an
//! organization id, a grant id) and pages of [`PAGE_SIZE`] (`?page=` for clients,
//! `?grants_page=` for grants), trouble first (grants needing re-authorization, clients without
//! a grant or refused recently), organization lists cut at [`ORGS_SHOWN`], and the
//! [`BUSIEST_ORGS`] busiest organizations in the rate table.

use super::*;
use crate::clock::{describe_expiry, describe_past, now_unix, rfc3339};
use crate::config::Integration;
use crate::shaping::Shaper;
use crate::token::GrantStatus;
use http::Response;
use std::collections::HashMap;
use std::fmt::Write as _;

/// Grants and clients per page.
pub const PAGE_SIZE: usize = 50;
/// Organizations listed in a cell before "and N more".
pub const ORGS_SHOWN: usize = 10;
/// Organizations in the rate table (the busiest in the last five minutes).
pub const BUSIEST_ORGS: usize = 50;

/// The first [`ORGS_SHOWN`] organizations, then "and N more".
pub fn org_cell(orgs: &[String]) -> String {
    let shown = orgs.len().min(ORGS_SHOWN);
    let mut out = escape(&orgs[..shown].join(", "));
    if orgs.len() > shown {
        let _ = write!(
            out,
            " <span class=\"more\">and {} more</span>",
            orgs.len() - shown
        );
    }
    out
}

/// The page `page` (from 1) of `n` rows: its range and the number of pages.
pub fn page_range(n: usize, page: usize) -> (std::ops::Range<usize>, usize, usize) {
    let pages = n.div_ceil(PAGE_SIZE).max(1);
    let page = page.clamp(1, pages);
    let start = (page - 1) * PAGE_SIZE;
    (start..(start + PAGE_SIZE).min(n), page, pages)
}

/// A query string for the status page with one parameter changed.
fn href(query: &HashMap<String, String>, key: &str, value: usize) -> String {
    let mut pairs: Vec<(&str, String)> = query
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "q" | "page" | "grants_page") && k.as_str() != key)
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    pairs.push((key, value.to_string()));
    pairs.sort();
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        ser.append_pair(k, &v);
    }
    format!("/?{}", ser.finish())
}

/// The pager of a table: "Page X of Y", previous and next.
fn pager(
    b: &mut String,
    id: &str,
    query: &HashMap<String, String>,
    key: &str,
    page: usize,
    pages: usize,
    rows: usize,
) {
    let _ = write!(b, "<nav class=\"pager\" id=\"{id}\">Page <span class=\"page\">{page}</span> of <span class=\"pages\">{pages}</span> ({rows} in all)");
    if page > 1 {
        let _ = write!(
            b,
            " · <a rel=\"prev\" href=\"{}\">Previous</a>",
            escape(&href(query, key, page - 1))
        );
    }
    if page < pages {
        let _ = write!(
            b,
            " · <a rel=\"next\" href=\"{}\">Next</a>",
            escape(&href(query, key, page + 1))
        );
    }
    b.push_str("</nav>");
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
    pub async fn status_page(&self, query: &HashMap<String, String>) -> Response<Vec<u8>> {
        let q = query
            .get("q")
            .map(|q| q.trim().to_lowercase())
            .unwrap_or_default();
        let number = |k: &str| {
            query
                .get(k)
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(1)
        };
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
        b.push_str("</table>");
        let _ = write!(
            b,
            "<form id=\"search\" method=\"get\" action=\"/\"><input type=\"search\" name=\"q\" value=\"{}\" placeholder=\"client, integration, organization or grant\"> <button type=\"submit\">Search</button>{}</form>",
            escape(&q),
            if q.is_empty() { "" } else { " <a href=\"/\">Clear</a>" }
        );
        let mut grants = self.grants.all();
        grants.retain(|g| {
            q.is_empty()
                || g.id.to_string() == q
                || g.integration().name.to_lowercase().contains(&q)
                || g.organizations.iter().any(|o| o.contains(&q))
        });
        // Trouble first: grants that need re-authorization, then by id.
        grants.sort_by_key(|g| (g.state().status != GrantStatus::NeedsReauth, g.id));
        let (range, at, pages) = page_range(grants.len(), number("grants_page"));
        b.push_str("<h2>Grants</h2>");
        pager(
            &mut b,
            "grants-pager",
            query,
            "grants_page",
            at,
            pages,
            grants.len(),
        );
        b.push_str("<table id=\"grants\"><tr><th>Grant</th><th>Integration</th><th>Organizations</th><th>Status</th><th>Access token</th><th>Expires</th><th>Last refresh</th><th>Last use</th></tr>");
        if grants.is_empty() {
            if q.is_empty() {
                b.push_str("<tr><td colspan=\"8\">No grants yet: use a Connect button, or <code>meraki-oauth-proxy grants import</code>.</td></tr>");
            } else {
                b.push_str("<tr><td colspan=\"8\">No grant matches the search.</td></tr>");
            }
        }
        for g in &grants[range] {
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
                org_cell(&g.organizations),
                st.fingerprint().map_or("-", |f| &**f),
                st.issued_at.map(rfc3339).unwrap_or_else(|| "-".into()),
                describe_past(g.last_used()),
                id = g.id,
            );
        }
        b.push_str("</table>");
        scopes_section(&mut b, &grants);
        self.refused_section(&mut b, &grants);
        let activity: HashMap<Arc<str>, crate::shaping::ClientSnapshot> = self
            .shaper
            .as_ref()
            .map(|s| {
                s.clients()
                    .into_iter()
                    .map(|a| (a.client.clone(), a))
                    .collect()
            })
            .unwrap_or_default();
        // Each client's health: 0 a grant needs re-authorization, 1 an organization has no
        // grant, 2 refused in the last five minutes, 3 ok.
        let health = |c: &crate::config::Client| -> u8 {
            let mut worst = 3;
            for org in &c.organizations {
                match self.grants.lookup(&c.integration, org) {
                    Some(g) if g.state().status == GrantStatus::NeedsReauth => return 0,
                    Some(_) => {}
                    None => worst = 1,
                }
            }
            let refused = activity
                .get(c.name.as_str())
                .is_some_and(|a| a.denied_5m + a.throttled_5m > 0);
            if worst == 3 && refused {
                2
            } else {
                worst
            }
        };
        let mut clients: Vec<(u8, &Arc<crate::config::Client>)> = config
            .clients
            .iter()
            .filter(|c| {
                q.is_empty()
                    || c.name.to_lowercase().contains(&q)
                    || c.integration.to_lowercase().contains(&q)
                    || c.organizations.iter().any(|o| o.contains(&q))
            })
            .map(|c| (health(c), c))
            .collect();
        clients.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
        let (range, at, pages) = page_range(clients.len(), number("page"));
        let shown = &clients[range];
        b.push_str("<h2>Clients</h2>");
        pager(
            &mut b,
            "clients-pager",
            query,
            "page",
            at,
            pages,
            clients.len(),
        );
        b.push_str("<table id=\"clients\"><tr><th>Name</th><th>Health</th><th>Integration</th><th>Organizations</th><th>Methods</th></tr>");
        if shown.is_empty() {
            b.push_str("<tr><td colspan=\"5\">No client matches.</td></tr>");
        }
        for (h, c) in shown {
            let methods = c
                .methods
                .as_ref()
                .map(|m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "))
                .unwrap_or_else(|| "all".into());
            let health = match h {
                0 => "<span class=\"bad\">grant needs re-authorization</span>",
                1 => "<span class=\"bad\">no grant</span>",
                2 => "<span class=\"bad\">refused recently</span>",
                _ => "<span class=\"ok\">ok</span>",
            };
            let _ = write!(
                b,
                "<tr data-client=\"{n}\"><td>{n}</td><td class=\"health\">{health}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&c.integration),
                org_cell(&c.organizations),
                escape(&methods),
                n = escape(&c.name),
            );
        }
        b.push_str("</table>");
        let page_clients: Vec<&crate::config::Client> = shown.iter().map(|(_, c)| &***c).collect();
        if let Some(shaper) = &self.shaper {
            self.rate_section(&mut b, shaper, &page_clients, &activity);
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
    fn rate_section(
        &self,
        b: &mut String,
        shaper: &Shaper,
        clients: &[&crate::config::Client],
        activity: &HashMap<Arc<str>, crate::shaping::ClientSnapshot>,
    ) {
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
        let mut orgs = shaper.organizations();
        // The busiest first (sent, then waiting); at most BUSIEST_ORGS of them.
        orgs.sort_by(|a, b| {
            (b.sent_5m, b.queued)
                .cmp(&(a.sent_5m, a.queued))
                .then_with(|| a.org.cmp(&b.org))
        });
        let more = orgs.len().saturating_sub(BUSIEST_ORGS);
        orgs.truncate(BUSIEST_ORGS);
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
        b.push_str("</table>");
        if more > 0 {
            let _ = write!(b, "<p class=\"note\" id=\"rate-more\">The {BUSIEST_ORGS} busiest organizations of the last five minutes; {more} more not shown.</p>");
        }
        b.push_str("<table id=\"rate-clients\"><tr><th>Client</th><th>Weight</th><th>Requests (last 5 minutes)</th><th>Denied</th><th>Local 429s</th></tr>");
        for c in clients {
            let a = activity.get(c.name.as_str());
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
