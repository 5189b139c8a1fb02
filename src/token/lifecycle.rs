//! A grant's life: added from a consent (code exchange), imported from an existing refresh
//! token, kept alive while idle, revoked.

use super::events::{EventKind, RefreshCause, StoreOp};
use super::grant::Grant;
use super::oauth::{OAuthError, TokenResponse};
use super::state::TokenState;
use super::store::{GrantStatus, Rotation, StoreError};
use super::{Grants, TokenError};
use crate::secret::Secret;
use std::sync::Arc;
use std::time::Duration;

/// Why a revocation failed.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("the authorization server did not revoke the token; the grant is kept")]
    AuthServer(#[source] OAuthError),
    #[error("revoked at the authorization server, but the store could not delete the grant")]
    Store(#[source] StoreError),
}

/// Why adding or importing a grant failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("no integration named {0:?} in the configuration")]
    UnknownIntegration(String),
    #[error("the authorization server's answer has no refresh_token")]
    NoRefreshToken,
    #[error("the imported refresh token could not be used")]
    Refresh(#[source] TokenError),
    #[error("token store")]
    Store(#[source] StoreError),
    #[error("the new grant is not in the store after it was written")]
    Vanished,
}

impl Grants {
    /// Stores a grant fresh from a code exchange (`how`: "connect") for these organizations.
    pub async fn add(
        &self,
        integration: &str,
        organizations: &[String],
        tokens: TokenResponse,
        how: &'static str,
    ) -> Result<Arc<Grant>, ImportError> {
        let refresh = tokens.refresh_token.ok_or(ImportError::NoRefreshToken)?;
        let now = self.clock.now();
        let rotation = Rotation {
            refresh_token: refresh.clone(),
            access_token: tokens.access_token,
            access_expires_at: now + tokens.expires_in as i64,
            scope: tokens.scope,
            refreshed_at: now,
        };
        let store = self.store();
        let id = store
            .insert_pending(integration, &refresh)
            .await
            .map_err(ImportError::Store)?;
        store
            .commit_rotation(id, 0, &rotation)
            .await
            .map_err(ImportError::Store)?;
        self.assign(id, integration, organizations, how).await
    }

    /// Makes a stored grant serve its organizations, loads it and announces it.
    async fn assign(
        &self,
        id: i64,
        integration: &str,
        organizations: &[String],
        how: &'static str,
    ) -> Result<Arc<Grant>, ImportError> {
        self.store()
            .assign(id, integration, organizations)
            .await
            .map_err(ImportError::Store)?;
        self.reload().await.map_err(ImportError::Store)?;
        let grant = self
            .all()
            .into_iter()
            .find(|g| g.id == id)
            .ok_or(ImportError::Vanished)?;
        self.events.token(grant.event(EventKind::Added { how }));
        Ok(grant)
    }

    /// Seeds a grant from an existing refresh token: refreshes it at once (which rotates it) and
    /// stores the result for `organizations`. The imported token is durable before the call.
    pub async fn import(
        &self,
        integration: &str,
        organizations: &[String],
        refresh_token: Secret,
    ) -> Result<Arc<Grant>, ImportError> {
        let it = self
            .integration(integration)
            .ok_or_else(|| ImportError::UnknownIntegration(integration.to_owned()))?;
        let store = self.store().clone();
        let id = store
            .insert_pending(integration, &refresh_token)
            .await
            .map_err(ImportError::Store)?;
        let grant = Grant::new(
            id,
            it,
            organizations.to_vec(),
            self.clock.now(),
            TokenState::unused(refresh_token),
            0,
        );
        match self.refresher.rotate(&grant, 0, RefreshCause::Import).await {
            Ok(_) => {
                store
                    .assign(id, integration, organizations)
                    .await
                    .map_err(ImportError::Store)?;
                self.reload().await.map_err(ImportError::Store)?;
                let stored = self
                    .all()
                    .into_iter()
                    .find(|g| g.id == id)
                    .ok_or(ImportError::Vanished)?;
                self.events
                    .token(stored.event(EventKind::Added { how: "import" }));
                Ok(stored)
            }
            Err(e) => {
                // A token the authorization server refused is of no use; one whose rotation is
                // only in memory (store failure) must stay where it is.
                if matches!(
                    e,
                    TokenError::NeedsReauth { .. }
                        | TokenError::AuthServer { .. }
                        | TokenError::BackingOff { .. }
                ) {
                    let _ = store.delete(id).await;
                }
                Err(ImportError::Refresh(e))
            }
        }
    }

    /// Revokes a grant at the authorization server (RFC 7009), then deletes it. An
    /// authorization server failure keeps the grant.
    pub async fn revoke(&self, grant: &Arc<Grant>) -> Result<(), RevokeError> {
        let st = grant.state();
        self.endpoint()
            .revoke(&grant.integration(), st.refresh_token())
            .await
            .map_err(RevokeError::AuthServer)?;
        self.store()
            .delete(grant.id)
            .await
            .map_err(RevokeError::Store)?;
        self.events.token(grant.event(EventKind::Revoked));
        self.reload().await.map_err(RevokeError::Store)?;
        Ok(())
    }

    /// Refreshes every healthy grant idle for `idle` or longer (plus up to 10% jitter each, so
    /// grants imported together do not refresh together). Returns how many were refreshed.
    pub async fn keep_alive(&self, idle: Duration) -> usize {
        let now = self.clock.now();
        let mut refreshed = 0;
        for grant in self.all() {
            let st = grant.state();
            if st.status != GrantStatus::Ok {
                continue;
            }
            let active = grant
                .last_used()
                .max(st.issued_at.unwrap_or(0))
                .max(grant.created_at);
            let jitter = rand::random::<u64>() % (idle.as_secs() / 10 + 1);
            if now - active < (idle.as_secs() + jitter) as i64 {
                continue;
            }
            if self
                .refresher
                .rotate(&grant, st.generation, RefreshCause::KeepAlive)
                .await
                .is_ok()
            {
                refreshed += 1;
            }
        }
        refreshed
    }

    /// Writes last-use times to the store, so idleness survives restarts.
    pub async fn flush_last_used(&self) {
        let started = tokio::time::Instant::now();
        let mut ok = true;
        for g in self.all() {
            let t = g.last_used();
            if t > 0 && self.store().touch(g.id, t).await.is_err() {
                ok = false;
            }
        }
        self.events.store(StoreOp {
            op: "touch",
            elapsed: started.elapsed(),
            ok,
        });
    }

    /// Keeping in step with other instances sharing the store: records this instance's
    /// heartbeat (how many instances are alive), stores rotations the store did not take when
    /// they were made, and re-reads the grants.
    pub async fn sync(&self) -> Result<usize, StoreError> {
        let live = self.store().heartbeat().await;
        for g in self.all() {
            self.refresher.commit_pending(&g).await;
        }
        self.reload().await?;
        live
    }
}
