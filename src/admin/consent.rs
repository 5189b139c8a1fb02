//! Grant onboarding through Meraki's consent page: `/oauth/connect` and `/oauth/callback`.

use super::*;
use crate::report::chain;
use crate::secret::Secret;
use http::Response;
use std::collections::HashMap;
use std::time::Instant;

impl Admin {
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
}
