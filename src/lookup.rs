//! The proxy's own calls to the Meraki API (network and device lookups, the organization list),
//! made with a grant's token under the same 401 rule as forwarded requests
//! ([`Grants::rejected`]).

use crate::config::Client;
use crate::route::{Lookup, LookupError};
use crate::shaping::Shaper;
use crate::token::{Grants, Probe, TokenError, TokenProbe, TokenState};
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
        let integration = client.integration.as_str();
        let ua = crate::forward::user_agent(user_agent);
        let grant = self
            .grants
            .require(integration, org)
            .await
            .map_err(token_failure)?;
        let mut token = self
            .grants
            .token(&grant, org)
            .await
            .map_err(token_failure)?;
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
                self.grants.succeeded(&grant, &token, || {
                    crate::endpoints::operation_key(&http::Method::GET, path).into_owned()
                });
            }
            match status {
                200 => {
                    return resp.json().await.map(Some).map_err(|_| {
                        LookupError::upstream(502, "Meraki sent a body that is not JSON")
                    })
                }
                404 => return Ok(None),
                401 if !retried => {
                    retried = true;
                    let operation = crate::endpoints::operation_key(&http::Method::GET, path);
                    token = self
                        .grants
                        .rejected(&grant, org, &token, &operation)
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
                    self.grants.refused_again(&grant, org, &token, &operation);
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
