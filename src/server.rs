//! The one place that turns a [`Config`] into a running Pingora server.

use crate::admin::Admin;
use crate::audit::Audit;
use crate::config::Config;
use crate::identity::Identities;
use crate::metrics::Metrics;
use crate::proxy::{AppState, MerakiProxy};
use crate::route::Resolver;
use crate::token::oauth::OAuthClient;
use crate::token::{Grants, SqliteStore};
use crate::upstream::{ApiClient, Upstream};
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use std::sync::Arc;
use std::time::Duration;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("audit log: {0}")]
    Audit(std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Store(#[from] crate::token::StoreError),
    #[error("upstream: {0}")]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("HTTP client: {0}")]
    Http(String),
}

/// The shared state, built from the configuration (also used by the `grants` commands).
pub struct Parts {
    pub audit: Arc<Audit>,
    pub metrics: Arc<Metrics>,
    pub grants: Arc<Grants>,
}

/// Opens the audit log, metrics, store and grants.
pub fn parts(config: &Config) -> Result<Parts, StartError> {
    let audit = Arc::new(Audit::open(config.audit_path.as_deref()).map_err(StartError::Audit)?);
    let metrics = Arc::new(Metrics::new()?);
    metrics.init_labels(config);
    let store = Arc::new(SqliteStore::open(
        &config.store_path,
        config.store_key.clone(),
    )?);
    let oauth = OAuthClient::new(
        config.upstream.token_url.clone(),
        config.upstream.revoke_url.clone(),
        config.token_timeout,
    )
    .map_err(|e| StartError::Http(e.to_string()))?;
    let grants = Arc::new(Grants::new(
        config,
        store,
        oauth,
        audit.clone(),
        metrics.clone(),
    )?);
    Ok(Parts {
        audit,
        metrics,
        grants,
    })
}

/// Builds the server: proxy listener, admin listener, background tasks.
pub fn build(config: Config) -> Result<Server, StartError> {
    let config = Arc::new(config);
    let Parts {
        audit,
        metrics,
        grants,
    } = parts(&config)?;
    let upstream = Arc::new(Upstream::new(
        &config.upstream.api_base,
        config.upstream_timeout,
    )?);
    let api = ApiClient::new(
        &config.upstream.api_base,
        grants.clone(),
        config.upstream_timeout,
    )
    .map_err(|e| StartError::Http(e.to_string()))?;
    let state = Arc::new(AppState {
        identities: Identities::new(&config.clients),
        resolver: Resolver::new(
            config.upstream.lookup_cache_capacity,
            config.upstream.lookup_cache_ttl,
        ),
        grants: grants.clone(),
        upstream: upstream.clone(),
        api,
        audit: audit.clone(),
        metrics: metrics.clone(),
        config: config.clone(),
    });

    let conf = ServerConf {
        threads: config.threads,
        // Attempts, not retries: the first, one after a 401, the redirects, and two for
        // Pingora's own retries of stale reused connections.
        max_retries: 2 + crate::proxy::MAX_REDIRECTS as usize + 2,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        MerakiProxy { state },
        "meraki-oauth-proxy",
    );
    proxy.add_tcp(&config.listen.to_string());
    server.add_service(proxy);

    if let Some(admin_addr) = config.admin_listen {
        let mut admin = Service::new(
            "admin".to_string(),
            Admin::new(config.clone(), grants.clone(), metrics.clone()),
        );
        admin.add_tcp(&admin_addr.to_string());
        server.add_service(admin);
    }
    server.add_service(background_service(
        "upstream-dns",
        DnsRefresher { upstream },
    ));
    server.add_service(background_service("audit-reopen", AuditReopen { audit }));
    server.add_service(background_service(
        "grant-keeper",
        GrantKeeper {
            grants: grants.clone(),
            idle: config.keepalive_idle,
            every: config.keepalive_check,
        },
    ));
    tracing::info!(listen = %config.listen, upstream = %config.upstream.api_base, "meraki-oauth-proxy starting");
    Ok(server)
}

struct DnsRefresher {
    upstream: Arc<Upstream>,
}

#[async_trait]
impl BackgroundService for DnsRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    let up = self.upstream.clone();
                    match tokio::task::spawn_blocking(move || up.refresh_address()).await {
                        Ok(Err(e)) => tracing::warn!(error = %e, "upstream DNS refresh failed; keeping the last address"),
                        Err(e) => tracing::warn!(error = %e, "upstream DNS refresh task failed"),
                        Ok(Ok(())) => {}
                    }
                }
            }
        }
    }
}

/// Every `every`: re-reads the store (grants imported, connected or revoked by another process),
/// records last use, and refreshes grants idle for `idle` so Meraki never revokes them.
struct GrantKeeper {
    grants: Arc<crate::token::Grants>,
    idle: Duration,
    every: Duration,
}

#[async_trait]
impl BackgroundService for GrantKeeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    self.grants.flush_last_used().await;
                    return;
                }
                _ = tick.tick() => {
                    if let Err(e) = self.grants.reload() {
                        tracing::warn!(error = %e, "re-reading grants from the store failed");
                    }
                    self.grants.flush_last_used().await;
                    let n = self.grants.keep_alive(self.idle).await;
                    if n > 0 {
                        tracing::info!(refreshed = n, "kept idle grants alive");
                    }
                }
            }
        }
    }
}

/// Reopens the audit log on SIGHUP (log rotation).
struct AuditReopen {
    audit: Arc<Audit>,
}

#[async_trait]
impl BackgroundService for AuditReopen {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; audit log rotation needs a restart");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reopening the audit log");
                    self.audit.reopen();
                }
            }
        }
    }
}
