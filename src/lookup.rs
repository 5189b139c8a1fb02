//! The proxy's own calls to the Meraki API (network and device lookups, the walk of
//! `GET /organizations` the organization list makes), made with a grant's token under the same 401
//! rule as forwarded requests ([`Grants::rejected`]).

use crate::config::Client;
use crate::route::{Lookup, LookupError};
use crate::shaping::Shaper;
use crate::token::{Grant, Grants, Probe, TokenError, TokenProbe, TokenState};
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// A JSON client for the API base.
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    grants: Arc<Grants>,
    /// Its calls count against Meraki's rate limits like forwarded requests.
    shaper: Option<Shaper>,
}

impl ApiClient {
    /// A client for `api_base` under the outbound TLS policy: no redirects, connect and total
    /// timeouts.
    pub fn new(
        api_base: &Url,
        grants: Arc<Grants>,
        timeout: Duration,
        outbound: &crate::tls::Outbound,
    ) -> reqwest::Result<Self> {
        Ok(ApiClient {
            http: outbound.http_client(timeout)?,
            base: api_base.as_str().trim_end_matches('/').to_owned(),
            grants,
            shaper: None,
        })
    }

    /// The same client, its calls waiting their turn in `shaper` (in the lane of the client
    /// they are made for).
    pub fn shaped(mut self, shaper: Shaper) -> Self {
        self.shaper = Some(shaper);
        self
    }

    /// `GET base + path` with the grant serving `org` for `client`'s integration: `Ok(None)` on
    /// 404. `user_agent` is the calling script's, so Meraki's request log names it (with the
    /// proxy's token appended, as on forwarded requests).
    pub async fn get_json(
        &self,
        client: &Client,
        org: &str,
        path: &str,
        user_agent: Option<&str>,
    ) -> Result<Option<serde_json::Value>, LookupError> {
        let grant = self
            .grants
            .require(&client.integration, org)
            .await
            .map_err(token_failure)?;
        Ok(self
            .get_page(client, &grant, org, path, user_agent)
            .await?
            .map(|p| p.body))
    }

    /// Every organization `grant`'s token can see: Meraki's `GET /organizations` walked page by
    /// page (`perPage=9000`, its largest, then each `Link rel=next`), each page like any other
    /// call of the proxy's own (the 401 rule, the rate budget of `org` in `client`'s lane). At
    /// most [`MAX_LISTING_PAGES`] pages.
    pub async fn list_organizations(
        &self,
        client: &Client,
        grant: &Grant,
        org: &str,
        user_agent: Option<&str>,
    ) -> Result<Vec<serde_json::Value>, LookupError> {
        let mut out = Vec::new();
        let mut path = format!("/organizations?perPage={MAX_ORGANIZATIONS_PER_PAGE}");
        for _ in 0..MAX_LISTING_PAGES {
            let Some(page) = self.get_page(client, grant, org, &path, user_agent).await? else {
                return Err(LookupError::upstream(
                    502,
                    "Meraki answered 404 to GET /organizations",
                ));
            };
            match page.body {
                serde_json::Value::Array(items) => out.extend(items),
                _ => {
                    return Err(LookupError::upstream(
                        502,
                        "Meraki's organization list is not a JSON array",
                    ))
                }
            }
            let Some(next) = page.next else {
                return Ok(out);
            };
            path = match self.below_base(&next) {
                Some(p) => p,
                None => {
                    return Err(LookupError::upstream(
                        502,
                        "Meraki's next page of organizations is not under the API base",
                    ))
                }
            };
        }
        Err(LookupError::upstream(
            502,
            &format!("Meraki's organization list ran over {MAX_LISTING_PAGES} pages"),
        ))
    }

    /// The part of a `Link` target below the API base path (`/organizations?...`), whatever
    /// host it names: the next page is asked of the configured upstream, so the grant's token
    /// never goes to a host the configuration did not name.
    fn below_base(&self, target: &str) -> Option<String> {
        let url = Url::parse(target)
            .or_else(|_| Url::parse(&self.base).and_then(|b| b.join(target)))
            .ok()?;
        let base_path = Url::parse(&self.base)
            .ok()?
            .path()
            .trim_end_matches('/')
            .to_owned();
        let below = url.path().strip_prefix(base_path.as_str())?;
        if !below.starts_with('/') {
            return None;
        }
        Some(match url.query() {
            Some(q) => format!("{below}?{q}"),
            None => below.to_owned(),
        })
    }

    /// One `GET base + path` with `grant`'s token, for a call about `org` made for `client`:
    /// its JSON body and its `Link rel=next`; `Ok(None)` on 404. A 401 refreshes once and
    /// retries.
    async fn get_page(
        &self,
        client: &Client,
        grant: &Grant,
        org: &str,
        path: &str,
        user_agent: Option<&str>,
    ) -> Result<Option<Page>, LookupError> {
        let ua = crate::forward::user_agent(user_agent);
        let mut token = self.grants.token(grant, org).await.map_err(token_failure)?;
        let mut retried = false;
        loop {
            let Some(bearer) = token.bearer().cloned() else {
                return Err(LookupError::upstream(502, "no usable access token"));
            };
            if let Some(s) = &self.shaper {
                s.acquire(org, &client.name, client.weight)
                    .await
                    .map_err(|e| refused(&e))?;
            }
            let resp = self
                .http
                .get(format!("{}{}", self.base, path))
                .header(http::header::AUTHORIZATION, bearer)
                .header(http::header::USER_AGENT, ua.as_str())
                .send()
                .await
                .map_err(|e| {
                    let status = if e.is_timeout() { 504 } else { 502 };
                    let tls = crate::tls::TlsFailure::of_chain(&e);
                    tracing::warn!(error = %crate::report::chain(&e.without_url()), tls = tls.map(|t| t.label()), "lookup request failed");
                    match tls {
                        Some(t) => LookupError::upstream(
                            502,
                            &format!("could not connect to the Meraki API: TLS {}", t.describe()),
                        ),
                        None => LookupError::upstream(status, "Meraki did not answer"),
                    }
                })?;
            if let Some(s) = &self.shaper {
                s.upstream_answered(org, resp.status().as_u16());
            }
            let status = resp.status().as_u16();
            if (200..300).contains(&status) {
                self.grants.succeeded(grant, &token, || {
                    crate::endpoints::operation_key(&http::Method::GET, path).into_owned()
                });
            }
            match status {
                200 => {
                    let next = resp
                        .headers()
                        .get(http::header::LINK)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| link_target(v, "next"))
                        .map(str::to_owned);
                    let body = resp.json().await.map_err(|_| {
                        LookupError::upstream(502, "Meraki sent a body that is not JSON")
                    })?;
                    return Ok(Some(Page { body, next }));
                }
                404 => return Ok(None),
                401 if !retried => {
                    retried = true;
                    let operation = crate::endpoints::operation_key(&http::Method::GET, path);
                    token = self
                        .grants
                        .rejected(grant, org, &token, &operation)
                        .await
                        .map_err(token_failure)?;
                }
                429 => {
                    let after = resp
                        .headers()
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(1);
                    return Err(LookupError {
                        retry_after: Some(after.max(1)),
                        ..LookupError::upstream(429, "Meraki answered 429 (rate limit)")
                    });
                }
                401 => {
                    let operation = crate::endpoints::operation_key(&http::Method::GET, path);
                    self.grants.refused_again(grant, org, &token, &operation);
                    return Err(LookupError::upstream(
                        502,
                        "Meraki refused the refreshed token",
                    ));
                }
                status => {
                    return Err(LookupError::upstream(
                        502,
                        &format!("Meraki answered {status}"),
                    ))
                }
            }
        }
    }
}

/// Meraki's largest `perPage` for `GET /organizations`.
pub const MAX_ORGANIZATIONS_PER_PAGE: usize = 9000;
/// A walk of `GET /organizations` stops with an error after this many pages (900,000
/// organizations at Meraki's page size): a `Link` loop must not run forever.
pub const MAX_LISTING_PAGES: usize = 100;

/// One page of a listing: its body and where the next one is.
struct Page {
    body: serde_json::Value,
    next: Option<String>,
}

/// The target of the first link with relation `rel` in a `Link` header value (RFC 8288:
/// `<target>; rel=next, <target>; rel="prev"`).
pub fn link_target<'a>(value: &'a str, rel: &str) -> Option<&'a str> {
    let mut rest = value;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let close = after.find('>')?;
        let target = &after[..close];
        let tail = &after[close + 1..];
        let end = tail.find('<').unwrap_or(tail.len());
        let params = &tail[..end];
        let matches = params.split(';').any(|p| {
            let Some((k, v)) = p.split_once('=') else {
                return false;
            };
            k.trim().eq_ignore_ascii_case("rel")
                && v.trim()
                    .trim_end_matches(',')
                    .trim()
                    .trim_matches('"')
                    .split_ascii_whitespace()
                    .any(|r| r.eq_ignore_ascii_case(rel))
        });
        if matches {
            return Some(target);
        }
        rest = tail;
    }
    None
}

impl ApiClient {
    /// A probe of access tokens over this client's connection settings (not shaped: the
    /// engine probes a grant at most once per [`crate::token::refresh::EVIDENCE`]).
    pub fn prober(&self) -> Prober {
        Prober {
            http: self.http.clone(),
            url: format!("{}/organizations?perPage=3", self.base),
        }
    }
}

/// Asks Meraki whether an access token works: `GET /organizations?perPage=3`, which needs no
/// OAuth scope and lists at most three organizations.
pub struct Prober {
    http: reqwest::Client,
    url: String,
}

/// A probe waits at most this long for Meraki (the grant's refresh lock is held meanwhile).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[async_trait::async_trait]
impl TokenProbe for Prober {
    async fn probe(&self, token: &TokenState) -> Probe {
        let Some(bearer) = token.bearer() else {
            return Probe::Refused;
        };
        let answer = self
            .http
            .get(&self.url)
            .header(http::header::AUTHORIZATION, bearer.clone())
            .header(
                http::header::USER_AGENT,
                crate::forward::user_agent(None).as_str(),
            )
            .timeout(PROBE_TIMEOUT)
            .send()
            .await;
        match answer.map(|r| r.status().as_u16()) {
            Ok(200..=299) => Probe::Works,
            Ok(401) => Probe::Refused,
            Ok(_) | Err(_) => Probe::Unknown,
        }
    }
}

fn token_failure(e: TokenError) -> LookupError {
    refused(&e)
}

/// A refusal (no token, no rate budget) as the lookup's error.
fn refused(e: &impl crate::refusal::Refuse) -> LookupError {
    let r = crate::refusal::Refusal::from(e);
    LookupError {
        status: r.status,
        reason: r.reason,
        message: r.message,
        retry_after: r.retry_after,
    }
}

/// [`ApiClient`] as a [`Lookup`] for one client (its integration's grants, its rate lane).
pub struct LookupWith<'a> {
    pub api: &'a ApiClient,
    pub client: &'a Client,
    pub user_agent: Option<&'a str>,
}

#[async_trait::async_trait]
impl Lookup for LookupWith<'_> {
    async fn get_json(
        &self,
        org: &str,
        path: &str,
    ) -> Result<Option<serde_json::Value>, LookupError> {
        self.api
            .get_json(self.client, org, path, self.user_agent)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::link_target;

    #[test]
    fn the_next_link_is_found_whatever_its_place_and_spelling() {
        let v = "<https://api.meraki.com/api/v1/organizations?perPage=3&startingAfter=000>; rel=first, \
                 <https://api.meraki.com/api/v1/organizations?perPage=3&startingAfter=12>; rel=next, \
                 <https://api.meraki.com/api/v1/organizations?perPage=3&endingBefore=zzz>; rel=last";
        assert_eq!(
            link_target(v, "next"),
            Some("https://api.meraki.com/api/v1/organizations?perPage=3&startingAfter=12")
        );
        assert_eq!(link_target("</a>; rel=\"prev next\"", "next"), Some("/a"));
        assert_eq!(link_target("</a>; rel=\"NEXT\"", "next"), Some("/a"));
        assert_eq!(link_target("</a>; rel=first, </b>; rel=last", "next"), None);
        assert_eq!(link_target("", "next"), None);
        assert_eq!(link_target("<unterminated; rel=next", "next"), None);
    }
}
