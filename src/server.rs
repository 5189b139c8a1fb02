//! The one place that turns a [`Config`] into a running Pingora server.
//!
//! [`run`] takes listeners that are already bound, so a test binds `127.0.0.1:0`, reads the
//! port and runs the real server in-process with no race for the port (mini-redis style); the
//! binary binds the configured addresses with [`Listeners::bind`] and runs the same function.
//!
//! Shutdown (SIGTERM or SIGINT, [`Signals`]): Pingora closes the listeners and idle
//! connections, [`Drain`] waits for in-flight requests (at most `shutdown_grace_secs`),
//! records the last use of grants, flushes the audit log and ends the process. SIGHUP reopens
//! the audit log and reloads the configuration ([`crate::reload`]).

use crate::admin::Admin;
use crate::admission::State;
use crate::audit::{Audit, ServerRecord};
use crate::clock::Clock;
use crate::config::Config;
use crate::lookup::ApiClient;
use crate::metrics::Metrics;
use crate::observe::Observer;
use crate::proxy::MerakiProxy;
use crate::reload::{Live, Loader};
use crate::route::Resolver;
use crate::shaping::Shaper;
use crate::token::{Grants, OAuthClient, PgStore, Settings, SqliteStore, Store};
use crate::upstream::Upstream;
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{
    ListenFds, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service as ListeningService;
use pingora::services::Service;
use std::net::TcpListener;
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

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
    #[error("outbound TLS")]
    Tls(#[source] crate::tls::TlsError),
    #[error("the upstream {upstream} is this proxy's own listener {listen}: requests would loop (in split-horizon DNS, the proxy host must resolve Meraki's names to Meraki: see [upstream] resolve or egress_proxy)")]
    Loop { upstream: String, listen: String },
    #[error("inbound TLS")]
    InboundTls(#[source] pingora::BError),
}

/// The shared state, built from the configuration (also used by the `grants` commands).
pub struct Parts {
    pub audit: Arc<Audit>,
    pub metrics: Arc<Metrics>,
    pub grants: Arc<Grants>,
    /// Token events and reloads → audit records and metrics.
    pub observer: Arc<Observer>,
    /// The outbound TLS policy every connection and HTTP client follows.
    pub outbound: Arc<crate::tls::Outbound>,
}

/// Opens the audit log, metrics, store and grants, and wires token events to the audit log
/// and the metrics.
pub async fn parts(config: &Config) -> Result<Parts, StartError> {
    let audit = Arc::new(Audit::open(config.audit_path.as_deref()).map_err(StartError::Audit)?);
    let metrics = Arc::new(Metrics::new()?);
    metrics.init_labels(config);
    let store: Arc<dyn Store> = match &config.store_url {
        Some(url) => Arc::new(
            PgStore::open(
                url,
                config.store_key.clone(),
                config.store_pool_size,
                // Three missed heartbeats, and never less than 15 s.
                (config.store_sync * 3).max(Duration::from_secs(15)),
            )
            .await?,
        ),
        None => Arc::new(SqliteStore::open(
            &config.store_path,
            config.store_key.clone(),
        )?),
    };
    let outbound =
        Arc::new(crate::tls::Outbound::from_config(&config.upstream).map_err(StartError::Tls)?);
    let oauth = OAuthClient::new(
        config.upstream.token_url.clone(),
        config.upstream.revoke_url.clone(),
        config.token_timeout,
        &outbound,
    )
    .map_err(StartError::OAuth)?;
    let observer = Arc::new(Observer {
        audit: audit.clone(),
        metrics: metrics.clone(),
    });
    let grants = Grants::load(
        Settings::from_config(config),
        store,
        Arc::new(oauth),
        observer.clone(),
        Clock::System,
    )
    .await?;
    Ok(Parts {
        audit,
        metrics,
        grants: Arc::new(grants),
        observer,
        outbound,
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

/// Everything [`run`] needs.
pub struct Launch {
    pub config: Config,
    /// Reads the configuration file again (SIGHUP, `POST /admin/reload`).
    pub loader: Loader,
    pub listeners: Listeners,
    pub shutdown: Box<dyn ShutdownSignalWatch + Send + Sync>,
    /// End the process as soon as in-flight requests are done after a shutdown signal
    /// (the binary), instead of waiting out `shutdown_grace_secs` (a server inside a test).
    pub exit_when_drained: bool,
}

/// Builds the server: proxy, admin, background tasks.
pub fn build(launch: Launch) -> Result<(Server, ShutdownBox), StartError> {
    let Launch {
        config,
        loader,
        listeners,
        shutdown,
        exit_when_drained,
    } = launch;
    let config = Arc::new(config);
    let Parts {
        audit,
        metrics,
        grants,
        observer,
        outbound,
    } = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?
        .block_on(parts(&config))?;
    metrics.started_with_config();
    let upstream = Arc::new(Upstream::new(
        &config.upstream.api_base,
        config.upstream_connect_timeout,
        config.upstream_timeout,
        outbound.clone(),
    )?);
    refuse_loop(&upstream, &listeners.proxy)?;
    let shaper = Shaper::new(config.rate_limits);
    metrics.watch_shaper(shaper.clone());
    let api = ApiClient::new(
        &config.upstream.api_base,
        grants.clone(),
        config.upstream_timeout,
        &outbound,
    )
    .map_err(StartError::Http)?
    .shaped(shaper.clone());
    let live = Arc::new(Live::new(
        config.clone(),
        loader,
        grants.clone(),
        Arc::new(ReloadHooks {
            observer,
            shaper: shaper.clone(),
        }),
    ));
    let state = Arc::new(State {
        live: live.clone(),
        resolver: Resolver::new(
            config.upstream.lookup_cache_capacity,
            config.upstream.lookup_cache_ttl,
        ),
        grants: grants.clone(),
        upstream: upstream.clone(),
        api,
    });

    let grace = config.shutdown_grace.as_secs();
    let conf = ServerConf {
        threads: config.threads,
        // Attempts, not retries: the first, one after a 401, the redirects, one after a
        // connection reset before the request was written, and two for Pingora's own retries
        // of stale reused connections.
        max_retries: 2 + crate::forward::MAX_REDIRECTS as usize + 3,
        // Pingora stops accepting, then waits this long before stopping the runtimes; the
        // drain task ends the process earlier once nothing is in flight.
        grace_period_seconds: Some(grace),
        graceful_shutdown_timeout_seconds: Some(1),
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
    match &config.tls {
        None => proxy.add_tcp(&listen),
        Some(_) => proxy.add_tls_with_settings(&listen, None, inbound_tls(&live, &audit)?),
    }
    server.add_service(Prebound::new(
        proxy,
        vec![(listen.clone(), listeners.proxy)],
    )?);

    if let Some(admin_listener) = listeners.admin {
        let addr = local_addr(&admin_listener)?;
        let mut admin = ListeningService::new(
            "admin".to_string(),
            Admin::new(live.clone(), grants.clone(), metrics.clone(), &outbound)
                .map_err(StartError::Http)?
                .with_shaper(shaper.clone()),
        );
        admin.add_tcp(&addr);
        server.add_service(Prebound::new(admin, vec![(addr, admin_listener)])?);
    }
    server.add_service(background_service(
        "upstream-dns",
        DnsRefresher { upstream },
    ));
    server.add_service(background_service(
        "sighup",
        Hangup {
            audit: audit.clone(),
            live,
        },
    ));
    server.add_service(background_service(
        "grant-keeper",
        GrantKeeper {
            grants: grants.clone(),
            idle: config.keepalive_idle,
            every: config.keepalive_check,
        },
    ));
    server.add_service(background_service(
        "store-sync",
        StoreSync {
            grants: grants.clone(),
            metrics: metrics.clone(),
            shaper: shaper.clone(),
            every: config.store_sync,
        },
    ));
    server.add_service(background_service(
        "drain",
        Drain {
            audit,
            metrics,
            grants,
            grace: config.shutdown_grace,
            exit_when_drained,
        },
    ));
    tracing::info!(listen = %listen, upstream = %config.upstream.api_base, "meraki-oauth-proxy starting");
    Ok((server, shutdown))
}

type ShutdownBox = Box<dyn ShutdownSignalWatch + Send + Sync>;

/// The proxy listener's TLS: the certificate and the client CA are read from the live
/// configuration at each handshake (a reload that re-read the files is in force for the next
/// connection); client certificates refused in the handshake are logged and audited; the
/// certificate a client presented is read once per connection for identification.
fn inbound_tls(
    live: &Arc<Live>,
    audit: &Arc<Audit>,
) -> Result<pingora::listeners::tls::TlsSettings, StartError> {
    use crate::tls::{CertResolver, ClientVerifier, HandshakeCallbacks};
    let mut settings =
        pingora::listeners::tls::TlsSettings::with_callbacks(Box::new(HandshakeCallbacks))
            .map_err(StartError::InboundTls)?;
    let certs = live.clone();
    settings.set_cert_resolver(Arc::new(CertResolver::new(move || {
        certs
            .config()
            .tls
            .as_ref()
            .map(|t| t.cert.certified.clone())
    })));
    let cas = live.clone();
    let audit = audit.clone();
    settings.set_client_cert_verifier(Arc::new(ClientVerifier::new(
        move || cas.config().tls.as_ref().and_then(|t| t.client_ca.clone()),
        move |refused| {
            tracing::warn!(
                cause = refused.cause.label(),
                subject = refused.subject.as_deref().unwrap_or("-"),
                fingerprint = %refused.fingerprint,
                detail = %refused.detail,
                "client certificate refused in the TLS handshake"
            );
            audit.tls_event(&crate::audit::TlsRecord::refused(refused));
        },
    )));
    Ok(settings)
}

/// Refuses to start when the upstream resolves to the proxy's own listener (split-horizon DNS
/// answering Meraki's names with the proxy's address on the proxy's host too).
fn refuse_loop(upstream: &Upstream, proxy: &TcpListener) -> Result<(), StartError> {
    let (Some(up), Ok(listen)) = (upstream.direct_address(), proxy.local_addr()) else {
        return Ok(());
    };
    let same_host =
        up.ip() == listen.ip() || (listen.ip().is_unspecified() && up.ip().is_loopback());
    if up.port() == listen.port() && same_host {
        return Err(StartError::Loop {
            upstream: up.to_string(),
            listen: listen.to_string(),
        });
    }
    Ok(())
}

/// Runs the server until its shutdown signal, then drains (see [`Drain`]).
pub fn run(launch: Launch) -> Result<(), StartError> {
    let (server, shutdown) = build(launch)?;
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

/// Keeps this instance in step with others sharing the store: re-reads the grants when the
/// store announces a change (PostgreSQL's LISTEN/NOTIFY) and every `every` (heartbeat, unstored
/// rotations, a full re-read: the safety net for missed notifications).
struct StoreSync {
    grants: Arc<Grants>,
    metrics: Arc<Metrics>,
    /// Takes one live instance's share of each organization's rate budget.
    shaper: Shaper,
    every: Duration,
}

#[async_trait]
impl BackgroundService for StoreSync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let changed = Arc::new(tokio::sync::Notify::new());
        let notify = changed.clone();
        let on_change = move || notify.notify_one();
        let store = self.grants.store().clone();
        let watch = store.watch(&on_change);
        tokio::pin!(watch);
        let mut watching = true;
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = &mut watch, if watching => watching = false,
                _ = changed.notified() => {
                    // Several notifications of one burst (a commit, a reassignment): one read.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if let Err(e) = self.grants.reload().await {
                        tracing::warn!(error = %crate::report::chain(&e), "re-reading grants after a change failed");
                    }
                }
                _ = tick.tick() => match self.grants.sync().await {
                    Ok(live) => {
                        self.metrics.instances(live);
                        // Meraki's budget is the organization's, whichever instance spends it.
                        self.shaper.set_share(1.0 / live.max(1) as f64);
                    }
                    Err(e) => tracing::warn!(error = %crate::report::chain(&e), "store sync failed; serving from memory"),
                },
            }
        }
    }
}

/// What a configuration reload changes besides the snapshot: the audit log and metrics hear
/// of it, and the rate limits follow it.
struct ReloadHooks {
    observer: Arc<Observer>,
    shaper: Shaper,
}

impl crate::reload::ReloadSink for ReloadHooks {
    fn reloaded(
        &self,
        trigger: &'static str,
        outcome: &Result<crate::reload::Reloaded, String>,
        config: &Config,
    ) {
        if outcome.is_ok() {
            self.shaper.set_limits(config.rate_limits);
        }
        self.observer.reloaded(trigger, outcome, config);
    }
}

/// SIGHUP: reopens the audit log (log rotation) and reloads the configuration.
struct Hangup {
    audit: Arc<Audit>,
    live: Arc<Live>,
}

#[async_trait]
impl BackgroundService for Hangup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reloads need POST /admin/reload");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reopening the audit log and reloading the configuration");
                    self.audit.reopen();
                    // The outcome is logged, audited and counted by the reload itself.
                    let _ = self.live.reload("sighup").await;
                }
            }
        }
    }
}

/// Which signal asked the server to stop, for the audit record.
static STOP_TRIGGER: OnceLock<&'static str> = OnceLock::new();

/// The binary's shutdown signals: SIGTERM and SIGINT both drain gracefully (Ctrl-C in a
/// terminal should not cut requests either); a second one during the drain ends the process
/// at once (see [`Drain`]).
pub struct Signals;

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot listen for SIGTERM/SIGINT; stopping");
            return ShutdownSignal::FastShutdown;
        };
        let which = tokio::select! {
            _ = term.recv() => "sigterm",
            _ = int.recv() => "sigint",
        };
        let _ = STOP_TRIGGER.set(which);
        ShutdownSignal::GracefulTerminate
    }
}

/// After the shutdown broadcast (listeners closed, idle keep-alive connections closed by
/// Pingora): waits until no request is in flight or the grace period is over, then records
/// the last use of grants, flushes the audit log and, in the binary, ends the process. Every
/// response a client received has its audit record by then: a request leaves the in-flight
/// count only after its record is queued.
struct Drain {
    audit: Arc<Audit>,
    metrics: Arc<Metrics>,
    grants: Arc<Grants>,
    grace: Duration,
    exit_when_drained: bool,
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.wait_for(|stop| *stop).await.is_err() {
            return;
        }
        let trigger = STOP_TRIGGER.get().copied().unwrap_or("shutdown");
        let started = tokio::time::Instant::now();
        let in_flight = || self.metrics.in_flight().get();
        tracing::info!(
            trigger,
            in_flight = in_flight(),
            grace_secs = self.grace.as_secs(),
            "shutting down: no new connections; draining in-flight requests"
        );
        self.audit.server_event(&ServerRecord {
            in_flight: Some(in_flight()),
            ..ServerRecord::new("shutdown_started", trigger)
        });
        // A second signal ends the drain.
        let again = async {
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut t), Ok(mut i)) => {
                    tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
                }
                _ => std::future::pending().await,
            }
        };
        tokio::pin!(again);
        let deadline = started + self.grace.saturating_sub(Duration::from_millis(500));
        let event = loop {
            if in_flight() <= 0 {
                break "shutdown_drained";
            }
            tokio::select! {
                _ = &mut again => break "shutdown_interrupted",
                _ = tokio::time::sleep_until(deadline) => break "shutdown_grace_expired",
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        };
        self.grants.flush_last_used().await;
        let left = in_flight();
        tracing::info!(
            event,
            in_flight = left,
            took_ms = started.elapsed().as_millis() as u64,
            "drain finished"
        );
        self.audit.server_event(&ServerRecord {
            in_flight: Some(left),
            ..ServerRecord::new(event, trigger)
        });
        let audit = self.audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit.flush()).await;
        if self.exit_when_drained {
            std::process::exit(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_that_is_the_proxy_itself_is_refused() {
        let outbound = Arc::new(
            crate::tls::Outbound::new(None, None, std::collections::BTreeMap::new()).unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = |base: String| {
            Upstream::new(
                &url::Url::parse(&base).unwrap(),
                Duration::from_secs(1),
                Duration::from_secs(1),
                outbound.clone(),
            )
            .unwrap()
        };
        let own = upstream(format!("http://127.0.0.1:{port}/api/v1"));
        let e = refuse_loop(&own, &listener).unwrap_err().to_string();
        assert!(e.contains("would loop"), "{e}");
        let other = upstream(format!(
            "http://127.0.0.1:{}/api/v1",
            port.wrapping_add(1).max(1)
        ));
        assert!(refuse_loop(&other, &listener).is_ok());
    }
}
