//! Configuration in, a Pingora server out: the one place that wires the proxy.

use super::drain::Drain;
use super::prebound::Prebound;
use super::tasks::{DnsRefresher, GrantKeeper, Hangup, ReloadHooks, StoreSync};
use super::StartError;
use crate::admin::Admin;
use crate::admission::State;
use crate::audit::Audit;
use crate::clock::Clock;
use crate::config::Config;
use crate::lookup::ApiClient;
use crate::metrics::Metrics;
use crate::observe::Observer;
use crate::proxy::{Gate, MerakiProxy};
use crate::reload::{Live, Loader};
use crate::route::Resolver;
use crate::shaping::Shaper;
use crate::token::{Grants, OAuthClient, PgStore, Settings, SqliteStore, Store};
use crate::upstream::Upstream;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignalWatch};
use pingora::services::background::background_service;
use pingora::services::listening::Service as ListeningService;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

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
    let audit = Arc::new(
        Audit::start(config.audit_path.as_deref(), config.audit.clone())
            .map_err(StartError::Audit)?,
    );
    let metrics = Arc::new(Metrics::new()?);
    metrics.register(audit.collectors())?;
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
    /// Takes the sockets a supervisor passed (systemd socket activation: `LISTEN_FDS`, named
    /// `proxy` and `admin` by `LISTEN_FDNAMES`, else in that order), or binds the configured
    /// addresses.
    pub fn bind(config: &Config) -> Result<Listeners, StartError> {
        let bind = |addr: std::net::SocketAddr| {
            TcpListener::bind(addr).map_err(|source| StartError::Listen {
                addr: addr.to_string(),
                source,
            })
        };
        if let Some(passed) = Self::passed()? {
            let admin = match (passed.admin, config.admin_listen) {
                (Some(l), _) => Some(l),
                (None, Some(addr)) => Some(bind(addr)?),
                (None, None) => None,
            };
            for (name, l) in [("proxy", Some(&passed.proxy)), ("admin", admin.as_ref())] {
                if let Some(l) = l {
                    tracing::info!(listener = name, addr = %local_addr(l)?, "serving a socket passed by the supervisor (LISTEN_FDS)");
                }
            }
            return Ok(Listeners {
                proxy: passed.proxy,
                admin,
            });
        }
        Ok(Listeners {
            proxy: bind(config.listen)?,
            admin: config.admin_listen.map(bind).transpose()?,
        })
    }

    /// The listening sockets passed in `LISTEN_FDS` (read once: the variables are removed).
    fn passed() -> Result<Option<Listeners>, StartError> {
        let names = std::env::var("LISTEN_FDNAMES").ok();
        std::env::remove_var("LISTEN_FDNAMES");
        let mut fds = listenfd::ListenFd::from_env();
        if fds.len() == 0 {
            return Ok(None);
        }
        let index = |name: &str, default: usize| match &names {
            Some(n) => n.split(':').position(|x| x == name),
            None => Some(default),
        };
        let passed = |what: &str, source| StartError::Listen {
            addr: format!("the socket named {what} in LISTEN_FDS"),
            source,
        };
        let mut take = |name: &str, default: usize| match index(name, default) {
            Some(i) if i < fds.len() => fds.take_tcp_listener(i).map_err(|e| passed(name, e)),
            _ => Ok(None),
        };
        let proxy = take("proxy", 0)?.ok_or_else(|| {
            passed(
                "proxy",
                std::io::Error::other("LISTEN_FDS is set but names no proxy socket"),
            )
        })?;
        let admin = take("admin", 1)?;
        Ok(Some(Listeners { proxy, admin }))
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
    // The refresh engine asks Meraki whether a token works before it passes a remembered
    // operation's 401 through without refreshing.
    grants.set_probe(Arc::new(api.prober()));
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
        orgs: Default::default(),
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
    // The proxy behind the connection limits (`[server] max_connections*`, read per
    // connection from the live configuration).
    let limits = live.clone();
    let mut proxy = ListeningService::new(
        "meraki-oauth-proxy".to_string(),
        Gate::new(
            pingora::proxy::http_proxy(
                &server.configuration,
                MerakiProxy {
                    state,
                    audit: audit.clone(),
                    metrics: metrics.clone(),
                    shaper: shaper.clone(),
                },
            ),
            move || limits.config().client_limits,
            metrics.clone(),
        )
        .with_proxy_protocol({
            // `[server] proxy_protocol` on the plain listener, read per connection.
            let live = live.clone();
            let tls = config.tls.is_some();
            move || {
                let c = live.config();
                (c.proxy_protocol && !tls).then(|| c.trusted_proxies.clone())
            }
        }),
    );
    match &config.tls {
        None => proxy.add_tcp(&listen),
        Some(_) => {
            // On the TLS listener the PROXY header comes before the handshake.
            let pp = live.clone();
            proxy
                .endpoints()
                .set_pre_tls_callback(Arc::new(crate::proxy::PreTls {
                    expect: Box::new(move || {
                        let c = pp.config();
                        c.proxy_protocol
                            .then(|| (c.trusted_proxies.clone(), c.client_limits.header_timeout))
                    }),
                    metrics: metrics.clone(),
                }));
            proxy.add_tls_with_settings(&listen, None, inbound_tls(&live, &audit)?)
        }
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
                .with_shaper(shaper.clone())
                .with_audit(audit.clone()),
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
            every: config.store_sync,
        },
    ));
    server.add_service(background_service(
        "fleet-shares",
        super::fleet::FleetShares {
            store: grants.store().clone(),
            shaper: shaper.clone(),
            metrics: metrics.clone(),
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
