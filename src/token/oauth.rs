//! The client side of Meraki's authorization server: the token endpoint (refresh and code
//! exchange) and the revocation endpoint, with HTTP Basic client authentication and form bodies.

use crate::config::Integration;
use crate::secret::Secret;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// A failed call to the authorization server. Never carries a token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OAuthError {
    /// The grant is gone (revoked, idle too long, integration removed): re-authorization needed.
    #[error("invalid_grant: {0}")]
    InvalidGrant(String),
    /// The AS refused for another reason (`invalid_client`, `invalid_request`, 5xx…).
    #[error("authorization server answered {status}: {error}")]
    Refused { status: u16, error: String },
    /// No answer in time.
    #[error("authorization server timed out")]
    Timeout,
    /// Could not reach it (the cause, without URL, as the source).
    #[error("authorization server unreachable")]
    Transport(#[source] Arc<reqwest::Error>),
    /// Reached, but its TLS certificate was refused (or the handshake failed): the cause is
    /// named, the detail is the TLS library's.
    #[error("authorization server TLS: {failure}")]
    Tls {
        failure: crate::tls::TlsFailure,
        #[source]
        source: Arc<reqwest::Error>,
    },
    /// Not configured for this call.
    #[error("{0} is not configured")]
    NotConfigured(&'static str),
    /// An answer that is not a token response.
    #[error("authorization server sent an unusable answer: {0}")]
    BadResponse(String),
}

impl OAuthError {
    /// A fixed label for metrics (`result`).
    pub fn label(&self) -> &'static str {
        match self {
            OAuthError::InvalidGrant(_) => "invalid_grant",
            OAuthError::Refused { .. } | OAuthError::BadResponse(_) => "as_error",
            OAuthError::Timeout => "timeout",
            OAuthError::Transport(_) | OAuthError::NotConfigured(_) => "unreachable",
            OAuthError::Tls { .. } => "tls_error",
        }
    }
}

/// A successful token response.
#[derive(Debug)]
pub struct TokenResponse {
    pub access_token: Secret,
    /// Meraki always rotates; absent means the old refresh token stays valid.
    pub refresh_token: Option<Secret>,
    pub expires_in: u64,
    pub scope: Option<String>,
    /// The organization the grant was given for, when the AS says.
    pub organization_id: Option<String>,
}

#[derive(Deserialize)]
struct RawToken {
    access_token: String,
    refresh_token: Option<String>,
    expires_in: Option<u64>,
    scope: Option<String>,
    organization_id: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawError {
    error: Option<String>,
    error_description: Option<String>,
}

/// The authorization server as the token engine sees it: the seam tests replace with an
/// in-memory authorization server that rotates like Meraki's.
#[async_trait::async_trait]
pub trait TokenEndpoint: Send + Sync {
    /// `grant_type=refresh_token`.
    async fn refresh(
        &self,
        it: &Integration,
        refresh_token: &Secret,
    ) -> Result<TokenResponse, OAuthError>;
    /// `grant_type=authorization_code`.
    async fn exchange_code(
        &self,
        it: &Integration,
        code: &Secret,
        redirect_uri: &str,
    ) -> Result<TokenResponse, OAuthError>;
    /// RFC 7009 revocation of a refresh token.
    async fn revoke(&self, it: &Integration, refresh_token: &Secret) -> Result<(), OAuthError>;
}

/// Calls Meraki's authorization server over HTTP.
#[derive(Clone)]
pub struct OAuthClient {
    http: reqwest::Client,
    token_url: Url,
    revoke_url: Option<Url>,
}

impl OAuthClient {
    /// A client for these endpoints with this per-call timeout, under the outbound TLS policy.
    pub fn new(
        token_url: Url,
        revoke_url: Option<Url>,
        timeout: Duration,
        outbound: &crate::tls::Outbound,
    ) -> Result<Self, OAuthError> {
        let http = outbound.http_client(timeout).map_err(transport)?;
        Ok(OAuthClient {
            http,
            token_url,
            revoke_url,
        })
    }
}

#[async_trait::async_trait]
impl TokenEndpoint for OAuthClient {
    async fn refresh(
        &self,
        it: &Integration,
        refresh_token: &Secret,
    ) -> Result<TokenResponse, OAuthError> {
        self.token_call(
            it,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token.expose()),
            ],
        )
        .await
    }

    async fn exchange_code(
        &self,
        it: &Integration,
        code: &Secret,
        redirect_uri: &str,
    ) -> Result<TokenResponse, OAuthError> {
        self.token_call(
            it,
            &[
                ("grant_type", "authorization_code"),
                ("code", code.expose()),
                ("redirect_uri", redirect_uri),
            ],
        )
        .await
    }

    async fn revoke(&self, it: &Integration, refresh_token: &Secret) -> Result<(), OAuthError> {
        let url = self
            .revoke_url
            .clone()
            .ok_or(OAuthError::NotConfigured("upstream.revoke_url"))?;
        let resp = self
            .http
            .post(url)
            .basic_auth(&it.client_id, Some(it.client_secret.expose()))
            .form(&[
                ("token", refresh_token.expose()),
                ("token_type_hint", "refresh_token"),
            ])
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status().as_u16();
        if status == 200 {
            return Ok(());
        }
        let body = resp.bytes().await.unwrap_or_default();
        Err(as_error(status, &body))
    }
}

impl OAuthClient {
    async fn token_call(
        &self,
        it: &Integration,
        form: &[(&str, &str)],
    ) -> Result<TokenResponse, OAuthError> {
        let resp = self
            .http
            .post(self.token_url.clone())
            .basic_auth(&it.client_id, Some(it.client_secret.expose()))
            .header("accept", "application/json")
            .form(form)
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(transport)?;
        if status != 200 {
            return Err(as_error(status, &body));
        }
        let raw: RawToken = serde_json::from_slice(&body).map_err(|e| {
            OAuthError::BadResponse(format!("not a token response ({})", e.classify_name()))
        })?;
        if raw.access_token.is_empty() {
            return Err(OAuthError::BadResponse("empty access_token".into()));
        }
        Ok(TokenResponse {
            access_token: Secret::new(raw.access_token),
            refresh_token: raw.refresh_token.filter(|r| !r.is_empty()).map(Secret::new),
            expires_in: raw.expires_in.unwrap_or(3600),
            scope: raw.scope,
            organization_id: match raw.organization_id {
                Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                _ => None,
            },
        })
    }
}

trait Classify {
    fn classify_name(&self) -> &'static str;
}

impl Classify for serde_json::Error {
    // serde_json's message can quote the input, which may hold a token: report the class only.
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "missing or mistyped field",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

fn transport(e: reqwest::Error) -> OAuthError {
    if e.is_timeout() {
        OAuthError::Timeout
    } else if let Some(failure) = crate::tls::TlsFailure::of_chain(&e) {
        OAuthError::Tls {
            failure,
            source: Arc::new(e.without_url()),
        }
    } else {
        // Without the URL, and reqwest never includes the form body.
        OAuthError::Transport(Arc::new(e.without_url()))
    }
}

fn as_error(status: u16, body: &[u8]) -> OAuthError {
    let parsed: Option<RawError> = serde_json::from_slice(body).ok();
    let error = parsed
        .as_ref()
        .and_then(|e| e.error.clone())
        .unwrap_or_else(|| "unknown".into());
    let description = parsed.and_then(|e| e.error_description).unwrap_or_default();
    // Descriptions are short, AS-written text; cap them so a hostile body cannot flood logs.
    let description: String = description.chars().take(200).collect();
    if error == "invalid_grant" {
        OAuthError::InvalidGrant(description)
    } else {
        OAuthError::Refused {
            status,
            error: if description.is_empty() {
                error
            } else {
                format!("{error}: {description}")
            },
        }
    }
}
