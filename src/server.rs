//! The one place that turns a [`Config`] into a running Pingora server.
//!
//! [`run`] takes listeners that are already bound, so a test binds `127.0.0.1:0`, reads the
//! port and runs the real server in-process with no race for the port (mini-redis style); the
//! binary binds the configured addresses with [`Listeners::bind`] and runs the same function.

use crate::admin::Admin;
use crate::admission::State;
use crate::audit::Audit;
use crate::clock::Clock;
use crate::config::Config;
use crate::identity::Identities;
use crate::lookup::ApiClient;
use crate::metrics::Metrics;
use crate::observe::Observer;
use crate::proxy::MerakiProxy;
use crate::route::Resolver;
use crate::shaping::Shaper;
use crate::token::{Grants, OAuthClient, Settings, SqliteStore};
use crate::upstream::Upstream;
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{ListenFds, RunArgs, Server, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service as ListeningService;
use pingora::services::Service;
use std::net::TcpListener;
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("audit log")]
    Audit(#[source] std::io::Error),
    #[error("metrics")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Store(#[from] crate::token::StoreError),
    #[error("upstream")]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("authorization server client")]
    OAuth(#[source] crate::token::OAuthError),
    #[error("API client")]
    Http(#[source] reqwest::Error),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("start-up runtime")]
    Runtime(#[source] std::io::Error),
}

/// The shared state, built from the configuration (also used by the `grants` commands).
pub struct Parts {
    pub audit: Arc<Audit>,
    pub metrics: Arc<Metrics>,
    pub grants: Arc<Grants>,
}

/// Opens the audit log, metrics, store and grants, and wires token events to the audit log
/// and the metrics.
pub async fn parts(config: &Config) -> Result<Parts, StartError> {
    let audit = Arc::new(Audit::open(config.audit_path.as_deref()).map_err(StartError::Audit)?);
    let metrics = Arc::new(Metrics::new()?);
    metrics.init_labels(config);
    let store = SqliteStore::open(&config.store_path, config.store_key.clone())?;
    let oauth = OAuthClient::new(
        config.upstream.token_url.clone(),
        config.upstream.revoke_url.clone(),
        config.token_timeout,
    )
    .map_err(StartError::OAuth)?;
    let observer = Arc::new(Observer {
        audit: audit.clone(),
        metrics: metrics.clone(),
    });
    let grants = Grants::load(
        Settings::from_config(config),
        Arc::new(store),
        Arc::new(oauth),
        observer,
        Clock::System,
    )
    .await?;
    Ok(Parts {
        audit,
        metrics,
        grants: Arc::new(grants),
    })
}

/// The bound sockets the server serves.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses.
    pub fn bind(config: &Config) -> Result<Listeners, StartError> {
        let bind = |addr: std::net::SocketAddr| {
            TcpListener::bind(addr).map_err(|source| StartError::Listen {
                addr: addr.to_string(),
                source,
            })
        };
        Ok(Listeners {
            proxy: bind(config.listen)?,
            admin: config.admin_listen.map(bind).transpose()?,
        })
    }
}

/// Builds the server on these listeners: proxy, admin, background tasks.
pub fn build(config: Config, listeners: Listeners) -> Result<Server, StartError> {
    let config = Arc::new(config);
    let Parts {
        audit,
        metrics,
        grants,
    } = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?
        .block_on(parts(&config))?;
    let upstream = Arc::new(Upstream::new(
        &config.upstream.api_base,
        config.upstream_timeout,
    )?);
    let shaper = Shaper::new(config.rate_limits);
    metrics.watch_shaper(shaper.clone());
    let api = ApiClient::new(
        &config.upstream.api_base,
        grants.clone(),
        config.upstream_timeout,
    )
    .map_err(StartError::Http)?
    .shaped(shaper.clone());
    let state = Arc::new(State {
        identities: Identities::new(&config.clients),
        resolver: Resolver::new(
            config.upstream.lookup_cache_capacity,
            config.upstream.lookup_cache_ttl,
        ),
        grants: grants.clone(),
        upstream: upstream.clone(),
        api,
        config: config.clone(),
    });

    let conf = ServerConf {
        threads: config.threads,
        // Attempts, not retries: the first, one after a 401, the redirects, and two for
        // Pingora's own retries of stale reused connections.
        max_retries: 2 + crate::forward::MAX_REDIRECTS as usize + 2,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let listen = local_addr(&listeners.proxy)?;
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        MerakiProxy {
            state,
            audit: audit.clone(),
            metrics: metrics.clone(),
            shaper: shaper.clone(),
        },
        "meraki-oauth-proxy",
    );
    proxy.add_tcp(&listen);
    server.add_service(Prebound::new(
        proxy,
        vec![(listen.clone(), listeners.proxy)],
    )?);

    if let Some(admin_listener) = listeners.admin {
        let addr = local_addr(&admin_listener)?;
        let mut admin = ListeningService::new(
            "admin".to_string(),
            Admin::new(config.clone(), grants.clone(), metrics.clone())
                .map_err(StartError::Http)?
                .with_shaper(shaper),
        );
        admin.add_tcp(&addr);
        server.add_service(Prebound::new(admin, vec![(addr, admin_listener)])?);
    }
    server.add_service(background_service(
        "upstream-dns",
        DnsRefresher { upstream },
    ));
    server.add_service(background_service("audit-reopen", AuditReopen { audit }));
    server.add_service(background_service(
        "grant-keeper",
        GrantKeeper {
            grants,
            idle: config.keepalive_idle,
            every: config.keepalive_check,
        },
    ));
    tracing::info!(listen = %listen, upstream = %config.upstream.api_base, "meraki-oauth-proxy starting");
    Ok(server)
}

/// Runs the server on these listeners until `shutdown` says so.
pub fn run(
    config: Config,
    listeners: Listeners,
    shutdown: Box<dyn ShutdownSignalWatch + Send + Sync>,
) -> Result<(), StartError> {
    let server = build(config, listeners)?;
    server.run(RunArgs {
        shutdown_signal: shutdown,
    });
    Ok(())
}

fn local_addr(l: &TcpListener) -> Result<String, StartError> {
    l.local_addr()
        .map(|a| a.to_string())
        .map_err(|source| StartError::Listen {
            addr: "a bound listener".into(),
            source,
        })
}

/// A listening service whose sockets were bound before the server started: their descriptors
/// go into Pingora's listener table under the service's addresses, where Pingora takes them
/// over (the mechanism of its zero-downtime upgrades) instead of binding again.
struct Prebound<S> {
    inner: S,
    fds: Vec<(String, RawFd)>,
}

impl<S> Prebound<S> {
    fn new(inner: S, listeners: Vec<(String, TcpListener)>) -> Result<Self, StartError> {
        let mut fds = Vec::with_capacity(listeners.len());
        for (addr, l) in listeners {
            // Pingora's accept loop runs on tokio, which needs non-blocking sockets.
            l.set_nonblocking(true)
                .map_err(|source| StartError::Listen {
                    addr: addr.clone(),
                    source,
                })?;
            fds.push((addr, l.into_raw_fd()));
        }
        Ok(Prebound { inner, fds })
    }
}

#[async_trait]
impl<S: Service> Service for Prebound<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        match &fds {
            Some(table) => {
                let mut table = table.lock();
                for (addr, fd) in self.fds.drain(..) {
                    table.add(addr, fd);
                }
            }
            None => tracing::error!("no listener table: the service binds its addresses again"),
        }
        self.inner
            .start_service(fds, shutdown, listeners_per_fd)
            .await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
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
                        Ok(Err(e)) => tracing::warn!(error = %crate::report::chain(&e), "upstream DNS refresh failed; keeping the last address"),
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
    grants: Arc<Grants>,
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
                    if let Err(e) = self.grants.reload().await {
                        tracing::warn!(error = %crate::report::chain(&e), "re-reading grants from the store failed");
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
