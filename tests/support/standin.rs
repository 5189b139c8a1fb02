//! A local stand-in for Meraki's OAuth authorization server (`as.meraki.com`) and Dashboard API
//! (`api.meraki.com/api/v1`), faithful enough to test the proxy against.
//!
//! It runs two listeners that share one state: the *main* one, and a *shard* one that plays the
//! `nNNN.meraki.com` host Meraki sometimes redirects to. Both serve the same handlers.
//!
//! The servers run on a runtime of their own, in a thread of their own, so that they keep
//! answering whatever the test's runtime does (a `current_thread` test that blocks, a paused
//! clock, a proxy running on its own threads).
//!
//! HTTPS is opt-in ([`Standin::start_https`]): each listener then serves TLS with a certificate
//! of its own host name (which the caller makes and can replace while it runs), its URLs name
//! those hosts, and every accepted connection is recorded with its peer address.
//!
//! This file is compiled both as `tests/support/standin.rs` and, through `#[path]`, by
//! `examples/meraki_standin.rs`, so it refers to nothing outside itself.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::watch;

/// `expires_in` of access tokens until [`Standin::set_access_ttl`] says otherwise (Meraki: 60 min).
const DEFAULT_ACCESS_TTL_SECS: u64 = 3600;
/// Authorization codes are valid this long, and once.
const CODE_TTL: Duration = Duration::from_secs(600);
/// API request bodies are buffered to be recorded; beyond this the request is refused with 413.
const MAX_API_BODY: usize = 256 << 20;
/// Default and bounds of `perPage`, as Meraki documents for most list endpoints.
const DEFAULT_PER_PAGE: u64 = 1000;
const MIN_PER_PAGE: u64 = 3;
const MAX_PER_PAGE: u64 = 100_000;
/// `GET /organizations`: default and largest `perPage` (Meraki's documented 9,000).
const ORGANIZATIONS_PER_PAGE: u64 = 9000;
/// Cursors of the `first` and `last` links: like Meraki's, they sort before and after every id.
const FIRST_CURSOR: &str = "0000000000000000";
const LAST_CURSOR: &str = "zzzzzzzzzzzzzzzz";
/// Added to every pagination link when the request had no `t0`. It carries percent-encoded
/// characters, so a proxy that decodes or re-encodes link URLs shows up in the recorded requests.
const T0_PAIR: &str = "t0=2026-11-23T00%3A00%3A00Z";
/// Characters kept as they are when a cursor is put in a URL (RFC 3986 unreserved).
const CURSOR_SAFE: &[u8] = b"-._~";

/// One `/api/v1` request as the stand-in received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// `"main"` or `"shard"`.
    pub listener: &'static str,
    pub method: String,
    /// The request target exactly as received, e.g. `/api/v1/organizations?perPage=3`.
    pub path_and_query: String,
    /// Header names are lowercase; values that are not UTF-8 are converted lossily.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The status the stand-in answered with.
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
}

impl Recorded {
    /// The first value of header `name` (case-insensitive), if the request carried it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A certificate chain and its private key, PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The stand-in's HTTPS: each listener's host name (in its URLs, `Link`s and redirects) and
/// certificate.
#[derive(Clone)]
pub struct Https {
    pub main_host: String,
    pub main: Identity,
    pub shard_host: String,
    pub shard: Identity,
}

/// A listener's current certificate, replaceable while it runs.
#[derive(Debug)]
struct Certs(Mutex<Arc<tokio_rustls::rustls::sign::CertifiedKey>>);

impl tokio_rustls::rustls::server::ResolvesServerCert for Certs {
    fn resolve(
        &self,
        _hello: tokio_rustls::rustls::server::ClientHello<'_>,
    ) -> Option<Arc<tokio_rustls::rustls::sign::CertifiedKey>> {
        Some(
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

fn certified_key(id: &Identity) -> io::Result<Arc<tokio_rustls::rustls::sign::CertifiedKey>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io::Error::other(format!("certificate PEM: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
        .map_err(|e| io::Error::other(format!("key PEM: {e}")))?;
    let provider = tokio_rustls::rustls::crypto::ring::default_provider();
    tokio_rustls::rustls::sign::CertifiedKey::from_der(certs, key, &provider)
        .map(Arc::new)
        .map_err(|e| io::Error::other(format!("certificate and key: {e}")))
}

fn tls_acceptor(certs: Arc<Certs>) -> io::Result<tokio_rustls::TlsAcceptor> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| io::Error::other(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The HTTPS side of a running stand-in.
struct TlsState {
    main: Arc<Certs>,
    shard: Arc<Certs>,
    main_host: String,
    shard_host: String,
}

/// A running stand-in. Dropping it stops its servers (without waiting); keep it alive for as long
/// as the test talks to it.
pub struct Standin {
    state: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    shard_addr: SocketAddr,
    tls: Option<TlsState>,
    /// Every connection accepted (HTTPS mode): the listener and the peer's address.
    connections: Arc<Mutex<Vec<(&'static str, SocketAddr)>>>,
    stop: watch::Sender<bool>,
    /// Disconnected once the server thread has closed its listeners and connections.
    stopped: Mutex<Option<mpsc::Receiver<()>>>,
}

impl Standin {
    /// Starts on 127.0.0.1 with an ephemeral port, plus a shard listener on another one.
    pub async fn start() -> Standin {
        Standin::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts on `addr` (the shard listener takes an ephemeral port on the same IP).
    /// Panics if it cannot bind; see [`Standin::try_start_on`].
    pub async fn start_on(addr: SocketAddr) -> Standin {
        match Standin::try_start_on(addr).await {
            Ok(standin) => standin,
            Err(e) => panic!("meraki stand-in: cannot listen on {addr}: {e}"),
        }
    }

    /// Like [`Standin::start_on`], but reports a failure to bind instead of panicking.
    pub async fn try_start_on(addr: SocketAddr) -> io::Result<Standin> {
        Standin::try_start_with(addr, None).await
    }

    /// Starts on 127.0.0.1 serving HTTPS: `https://MAIN_HOST:PORT` and
    /// `https://SHARD_HOST:SHARDPORT`, each with its certificate. The host names are the
    /// caller's to resolve to 127.0.0.1 for its clients.
    pub async fn start_https(https: Https) -> Standin {
        match Standin::try_start_with(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), Some(https)).await
        {
            Ok(standin) => standin,
            Err(e) => panic!("meraki stand-in: cannot start HTTPS: {e}"),
        }
    }

    async fn try_start_with(addr: SocketAddr, https: Option<Https>) -> io::Result<Standin> {
        // Bind here, before returning, so that the ports accept connections from the start.
        let main = std::net::TcpListener::bind(addr)?;
        let shard = std::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0))?;
        main.set_nonblocking(true)?;
        shard.set_nonblocking(true)?;
        let main_addr = main.local_addr()?;
        let shard_addr = shard.local_addr()?;

        let state = Arc::new(Mutex::new(Inner::new()));
        let tls = match &https {
            None => None,
            Some(h) => Some(TlsState {
                main: Arc::new(Certs(Mutex::new(certified_key(&h.main)?))),
                shard: Arc::new(Certs(Mutex::new(certified_key(&h.shard)?))),
                main_host: h.main_host.clone(),
                shard_host: h.shard_host.clone(),
            }),
        };
        let acceptors = match &tls {
            None => None,
            Some(t) => Some((
                tls_acceptor(t.main.clone())?,
                tls_acceptor(t.shard.clone())?,
            )),
        };
        let connections = Arc::new(Mutex::new(Vec::new()));
        let base = |addr: SocketAddr, which: fn(&TlsState) -> &str| match &tls {
            None => base_url_of(addr),
            Some(t) => format!("https://{}:{}", which(t), addr.port()),
        };
        let shard_base: Arc<str> = base(shard_addr, |t| &t.shard_host).into();
        let main_ctx = Ctx {
            state: state.clone(),
            listener: "main",
            base_url: base(main_addr, |t| &t.main_host).into(),
            shard_base: shard_base.clone(),
        };
        let shard_ctx = Ctx {
            listener: "shard",
            base_url: shard_base,
            ..main_ctx.clone()
        };

        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<io::Result<()>>();
        let (stopped_tx, stopped_rx) = mpsc::channel::<()>();
        let conns = connections.clone();
        std::thread::Builder::new()
            .name("meraki-standin".into())
            .spawn(move || {
                // Held until the runtime (and with it every connection task) is gone.
                let _stopped_tx = stopped_tx;
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("meraki-standin-worker")
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listeners = tokio::net::TcpListener::from_std(main)
                        .and_then(|m| Ok((m, tokio::net::TcpListener::from_std(shard)?)));
                    let (main, shard) = match listeners {
                        Ok(pair) => pair,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    match acceptors {
                        None => {
                            tokio::join!(
                                serve_until_stopped(main, router(main_ctx), stop_rx.clone()),
                                serve_until_stopped(shard, router(shard_ctx), stop_rx),
                            );
                        }
                        Some((main_tls, shard_tls)) => {
                            tokio::join!(
                                serve_tls_until_stopped(
                                    main,
                                    "main",
                                    router(main_ctx),
                                    main_tls,
                                    conns.clone(),
                                    stop_rx.clone()
                                ),
                                serve_tls_until_stopped(
                                    shard,
                                    "shard",
                                    router(shard_ctx),
                                    shard_tls,
                                    conns,
                                    stop_rx
                                ),
                            );
                        }
                    }
                });
                // Dropping the runtime cancels the connection tasks, so the stop is a hard one,
                // like a server going away.
                drop(runtime);
            })?;
        ready_rx
            .await
            .map_err(|_| io::Error::other("meraki stand-in thread ended before starting"))??;

        Ok(Standin {
            state,
            addr: main_addr,
            shard_addr,
            tls,
            connections,
            stop,
            stopped: Mutex::new(Some(stopped_rx)),
        })
    }

    /// Stops both listeners and drops every open connection; returns once they are closed
    /// (it blocks the calling thread for that short moment).
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
        let stopped = self
            .stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(stopped) = stopped {
            // Returns Disconnected when the thread is done; the timeout only guards a hang.
            let _ = stopped.recv_timeout(Duration::from_secs(5));
        }
    }

    /// The main listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (HTTPS mode: `https://MAIN_HOST:PORT`)
    pub fn base_url(&self) -> String {
        match &self.tls {
            None => base_url_of(self.addr),
            Some(t) => format!("https://{}:{}", t.main_host, self.addr.port()),
        }
    }

    /// The shard listener's address.
    pub fn shard_addr(&self) -> SocketAddr {
        self.shard_addr
    }

    /// HTTPS mode: replaces the certificate a listener (`"main"` or `"shard"`) presents from
    /// the next handshake on.
    pub fn set_certificate(&self, listener: &str, id: &Identity) {
        let t = self
            .tls
            .as_ref()
            .expect("set_certificate: the stand-in serves plain HTTP");
        let certs = if listener == "main" {
            &t.main
        } else {
            &t.shard
        };
        *certs.0.lock().unwrap_or_else(PoisonError::into_inner) =
            certified_key(id).expect("set_certificate: unusable certificate or key");
    }

    /// HTTPS mode: every connection accepted so far (listener, peer address), whether or not
    /// its handshake succeeded.
    pub fn connections(&self) -> Vec<(&'static str, SocketAddr)> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `http://127.0.0.1:PORT/api/v1`
    pub fn api_base(&self) -> String {
        format!("{}/api/v1", self.base_url())
    }

    /// `http://127.0.0.1:SHARDPORT/api/v1`: where [`Standin::redirect_next_to_shard`] points.
    pub fn shard_api_base(&self) -> String {
        match &self.tls {
            None => format!("{}/api/v1", base_url_of(self.shard_addr)),
            Some(t) => format!("https://{}:{}/api/v1", t.shard_host, self.shard_addr.port()),
        }
    }

    /// The token endpoint, `/oauth/token`.
    pub fn token_url(&self) -> String {
        format!("{}/oauth/token", self.base_url())
    }

    /// The (auto-approving) consent endpoint, `/oauth/authorize`.
    pub fn authorize_url(&self) -> String {
        format!("{}/oauth/authorize", self.base_url())
    }

    /// The RFC 7009 revocation endpoint, `/oauth/revoke`.
    pub fn revoke_url(&self) -> String {
        format!("{}/oauth/revoke", self.base_url())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.state)
    }

    // ---- seeding ----

    /// Registers an OAuth client (an "integration") with its secret.
    pub fn add_client(&self, client_id: &str, client_secret: &str) {
        self.lock()
            .clients
            .insert(client_id.to_owned(), client_secret.to_owned());
    }

    /// Adds (or renames) an organization.
    pub fn add_org(&self, org_id: &str, name: &str) {
        self.lock().orgs.insert(org_id.to_owned(), name.to_owned());
    }

    /// Removes an organization (as if deleted in the Dashboard): `GET /organizations/{id}`
    /// answers 404 and the list leaves it out.
    pub fn remove_org(&self, org_id: &str) {
        self.lock().orgs.remove(org_id);
    }

    /// Adds (or replaces) a network of `org_id`, with Meraki's default time zone and no tags.
    pub fn add_network(&self, org_id: &str, network_id: &str, name: &str) {
        self.lock().networks.insert(
            network_id.to_owned(),
            Network {
                org_id: org_id.to_owned(),
                name: name.to_owned(),
                time_zone: "America/Los_Angeles".to_owned(),
                tags: Vec::new(),
            },
        );
    }

    /// Adds (or replaces) an MR46 with serial `serial` in `network_id`.
    pub fn add_device(&self, network_id: &str, serial: &str, name: &str) {
        self.lock().devices.insert(
            serial.to_owned(),
            Device {
                network_id: network_id.to_owned(),
                name: name.to_owned(),
            },
        );
    }

    /// Creates a grant (what an org admin's consent produces) for `client_id` over `org_ids`,
    /// and returns its first refresh token. Panics if the client was not added.
    pub fn issue_grant(&self, client_id: &str, org_ids: &[&str], scopes: &[&str]) -> String {
        let mut s = self.lock();
        assert!(
            s.clients.contains_key(client_id),
            "issue_grant: unknown client {client_id:?}; call add_client first"
        );
        let grant_id = s.new_grant(
            client_id,
            org_ids.iter().map(|o| o.to_string()).collect(),
            scopes.iter().map(|o| o.to_string()).collect(),
        );
        s.rotate_refresh_token(grant_id)
    }

    // ---- knobs and fault injection ----

    /// `expires_in` of the access tokens issued from now on (default 3600).
    pub fn set_access_ttl(&self, secs: u64) {
        self.lock().access_ttl = secs;
    }

    /// The token endpoint waits this long before it does anything, to widen races. State
    /// changes (rotation) happen after the wait, when the answer is produced.
    pub fn set_token_delay(&self, d: Duration) {
        self.lock().token_delay = d;
    }

    /// Every API request waits this long before it is handled (a slow Meraki): requests are
    /// in flight long enough for a test to signal the proxy meanwhile.
    pub fn set_api_delay(&self, d: Duration) {
        self.lock().api_delay = d;
    }

    /// From now on every access token, however new, is refused with 401 at `path` (below
    /// `/api/v1`, exact), as at an operation the grant lacks the OAuth scope for.
    pub fn refuse_every_token_at(&self, path: &str) {
        self.lock().refused_paths.push(path.to_owned());
    }

    /// While `down`, the token endpoint answers every call (counted) with 503
    /// `temporarily_unavailable`, as an authorization server in an outage does.
    pub fn set_token_endpoint_down(&self, down: bool) {
        self.lock().token_down = down;
    }

    /// Every access token issued so far is expired from now on (the API answers 401).
    pub fn expire_all_access_tokens(&self) {
        let now = Instant::now();
        for token in self.lock().access_tokens.values_mut() {
            token.expires_at = token.expires_at.min(now);
        }
    }

    /// Removes the grant that holds `refresh_token` (current or past one), as an admin removing
    /// the integration in the Dashboard would: its next refresh gets `invalid_grant` and its
    /// access tokens get 401.
    pub fn revoke_grant_of(&self, refresh_token: &str) {
        let mut s = self.lock();
        if let Some(grant_id) = s.refresh_tokens.get(refresh_token).copied() {
            s.grants.remove(&grant_id);
        }
    }

    /// The next `n` API requests (either listener) answer `status` with `body`, after being
    /// recorded and before any credential check.
    pub fn fail_next_api(&self, n: usize, status: u16, body: &str) {
        let status = StatusCode::from_u16(status).expect("fail_next_api: invalid status code");
        let mut s = self.lock();
        s.faults.fail = n;
        s.faults.fail_status = status;
        s.faults.fail_body = body.to_owned();
    }

    /// The next `n` API requests answer 429 with `Retry-After: retry_after_secs` and Meraki's
    /// rate-limit error body.
    pub fn rate_limit_next(&self, n: usize, retry_after_secs: u64) {
        let mut s = self.lock();
        s.faults.rate_limit = n;
        s.faults.retry_after = retry_after_secs;
    }

    /// From now on, Meraki's per-organization rate limit is enforced: a token bucket per
    /// organization, `burst` deep (full at the organization's first request) and refilled at
    /// `rps`; a request finding it empty gets 429 with an integer `Retry-After` (the time to the
    /// next token, rounded up, at least 1) and Meraki's rate-limit body. Requests count against
    /// the organization they act on: `/organizations/{id}/...`, or the owner of
    /// `/networks/{id}` and `/devices/{serial}`. Each decision is logged ([`Standin::rate_log`]).
    pub fn enforce_rate_limit(&self, rps: f64, burst: f64) {
        self.lock().rate = Some(RateLimit {
            rps,
            burst,
            buckets: HashMap::new(),
            log: Vec::new(),
        });
    }

    /// Every decision of the enforced rate limit so far, in arrival order.
    pub fn rate_log(&self) -> Vec<RateDecision> {
        self.lock()
            .rate
            .as_ref()
            .map(|r| r.log.clone())
            .unwrap_or_default()
    }

    /// How many 429s the enforced rate limit has served.
    pub fn rate_limited(&self) -> usize {
        self.rate_log().iter().filter(|d| !d.allowed).count()
    }

    /// The next `n` API requests that arrive on the MAIN listener are redirected to the same
    /// path and query on the shard listener: 302 for GET and HEAD, 307 for other methods.
    pub fn redirect_next_to_shard(&self, n: usize) {
        self.lock().faults.to_shard = n;
    }

    /// The next `n` API requests (either listener) answer 302 with exactly this `Location`.
    pub fn set_redirect_location(&self, n: usize, location: &str) {
        let mut s = self.lock();
        s.faults.redirect = n;
        s.faults.location = location.to_owned();
    }

    // ---- observation ----

    /// POSTs to `/oauth/token` whose form carried `grant_type=refresh_token`, whatever the outcome.
    pub fn token_calls(&self) -> usize {
        self.lock().token_calls
    }

    /// Refresh calls answered `invalid_grant` (a rotated-out, revoked or unknown refresh token:
    /// a replay, when the proxy presents one it used before).
    pub fn refused_refreshes(&self) -> usize {
        self.lock().refused_refreshes
    }

    /// POSTs to `/oauth/token` whose form carried `grant_type=authorization_code`.
    pub fn code_exchanges(&self) -> usize {
        self.lock().code_exchanges
    }

    /// POSTs to `/oauth/revoke`, whatever the outcome.
    pub fn revocations(&self) -> usize {
        self.lock().revocations
    }

    /// How many `/api/v1` requests have been received on either listener.
    pub fn request_count(&self) -> usize {
        self.lock().requests.len()
    }

    /// Every `/api/v1` request received on either listener, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock()
            .requests
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// The current refresh token of the grant that `any_refresh_token_of_grant` belongs to (it
    /// may be a rotated-out one); `None` if there is no such grant any more.
    pub fn current_refresh_token(&self, any_refresh_token_of_grant: &str) -> Option<String> {
        let s = self.lock();
        let grant_id = s.refresh_tokens.get(any_refresh_token_of_grant)?;
        s.grants.get(grant_id).map(|g| g.refresh_token.clone())
    }

    /// The stored network, as `GET /networks/{id}` would return it.
    pub fn network(&self, network_id: &str) -> Option<Value> {
        let s = self.lock();
        s.networks.get(network_id).map(|n| n.to_json(network_id))
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

// ---------------------------------------------------------------------------------------------
// State

struct Grant {
    client_id: String,
    /// A set: an MSP's grant covers thousands, looked up on every request.
    org_ids: Arc<std::collections::HashSet<String>>,
    scopes: Vec<String>,
    /// The only refresh token of this grant that the token endpoint accepts.
    refresh_token: String,
}

struct AccessToken {
    grant_id: u64,
    expires_at: Instant,
}

struct AuthCode {
    client_id: String,
    redirect_uri: String,
    org_ids: Vec<String>,
    scopes: Vec<String>,
    issued_at: Instant,
}

struct Network {
    org_id: String,
    name: String,
    time_zone: String,
    tags: Vec<String>,
}

impl Network {
    fn to_json(&self, id: &str) -> Value {
        json!({
            "id": id,
            "organizationId": self.org_id,
            "name": self.name,
            "productTypes": ["appliance", "switch", "wireless"],
            "timeZone": self.time_zone,
            "tags": self.tags,
            // As Meraki lists them (typed clients such as meraki-client require `url`).
            "enrollmentString": null,
            "url": format!("https://n1.meraki.com/{}/n/{id}/manage/usage/list", self.name.replace(' ', "-")),
            "notes": "",
            "isBoundToConfigTemplate": false,
        })
    }
}

struct Device {
    network_id: String,
    name: String,
}

impl Device {
    /// Like Meraki's `GET /devices/{serial}`, there is no `organizationId`.
    fn to_json(&self, serial: &str) -> Value {
        json!({
            "serial": serial,
            "name": self.name,
            "model": "MR46",
            "networkId": self.network_id,
            "mac": mac_of(serial),
        })
    }
}

/// One request under the enforced rate limit.
#[derive(Clone, Debug)]
pub struct RateDecision {
    pub at: Instant,
    pub org: String,
    /// Served (true) or answered 429.
    pub allowed: bool,
}

struct RateLimit {
    rps: f64,
    burst: f64,
    /// Organization → (tokens, last refill).
    buckets: HashMap<String, (f64, Instant)>,
    log: Vec<RateDecision>,
}

impl RateLimit {
    /// Takes a token of `org`'s bucket, or says how many seconds until there is one.
    fn take(&mut self, org: &str) -> Result<(), u64> {
        let now = Instant::now();
        let (tokens, at) = self
            .buckets
            .entry(org.to_owned())
            .or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rps).min(self.burst);
        *at = now;
        let outcome = if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - *tokens) / self.rps).ceil() as u64).max(1))
        };
        self.log.push(RateDecision {
            at: now,
            org: org.to_owned(),
            allowed: outcome.is_ok(),
        });
        outcome
    }
}

#[derive(Default)]
struct Faults {
    fail: usize,
    fail_status: StatusCode,
    fail_body: String,
    rate_limit: usize,
    retry_after: u64,
    to_shard: usize,
    redirect: usize,
    location: String,
}

struct Inner {
    clients: HashMap<String, String>,
    orgs: BTreeMap<String, String>,
    networks: BTreeMap<String, Network>,
    devices: BTreeMap<String, Device>,
    grants: HashMap<u64, Grant>,
    next_grant_id: u64,
    /// Every refresh token ever issued (current or rotated out), to its grant.
    refresh_tokens: HashMap<String, u64>,
    access_tokens: HashMap<String, AccessToken>,
    codes: HashMap<String, AuthCode>,
    access_ttl: u64,
    token_delay: Duration,
    api_delay: Duration,
    /// Paths (below `/api/v1`) where every access token is refused with 401, as Meraki does
    /// at an operation the grant lacks the OAuth scope for.
    refused_paths: Vec<String>,
    /// The token endpoint answers 503 to everything (an outage).
    token_down: bool,
    faults: Faults,
    /// Meraki's per-organization rate limit, when enforced.
    rate: Option<RateLimit>,
    token_calls: usize,
    refused_refreshes: usize,
    code_exchanges: usize,
    revocations: usize,
    /// Recorded requests with a sequence number, so a status can be filled in after the handler
    /// ran even if requests arrived in between or the list was cleared.
    requests: Vec<(u64, Recorded)>,
    next_seq: u64,
}

impl Inner {
    fn new() -> Inner {
        Inner {
            clients: HashMap::new(),
            orgs: BTreeMap::new(),
            networks: BTreeMap::new(),
            devices: BTreeMap::new(),
            grants: HashMap::new(),
            next_grant_id: 1,
            refresh_tokens: HashMap::new(),
            access_tokens: HashMap::new(),
            codes: HashMap::new(),
            access_ttl: DEFAULT_ACCESS_TTL_SECS,
            token_delay: Duration::ZERO,
            api_delay: Duration::ZERO,
            refused_paths: Vec::new(),
            token_down: false,
            faults: Faults::default(),
            rate: None,
            token_calls: 0,
            refused_refreshes: 0,
            code_exchanges: 0,
            revocations: 0,
            requests: Vec::new(),
            next_seq: 0,
        }
    }

    fn new_grant(&mut self, client_id: &str, org_ids: Vec<String>, scopes: Vec<String>) -> u64 {
        let id = self.next_grant_id;
        self.next_grant_id += 1;
        self.grants.insert(
            id,
            Grant {
                client_id: client_id.to_owned(),
                org_ids: Arc::new(org_ids.into_iter().collect()),
                scopes,
                refresh_token: String::new(),
            },
        );
        id
    }

    /// Gives the grant a new refresh token; the previous one stops being accepted.
    fn rotate_refresh_token(&mut self, grant_id: u64) -> String {
        let token = random_token("rt-", 20);
        self.refresh_tokens.insert(token.clone(), grant_id);
        if let Some(grant) = self.grants.get_mut(&grant_id) {
            grant.refresh_token = token.clone();
        }
        token
    }

    /// A successful token response: a new access token and a rotated refresh token.
    fn token_response(&mut self, grant_id: u64) -> Response {
        let access_token = random_token("at-", 20);
        let ttl = self.access_ttl;
        self.access_tokens.insert(
            access_token.clone(),
            AccessToken {
                grant_id,
                expires_at: Instant::now() + Duration::from_secs(ttl),
            },
        );
        let refresh_token = self.rotate_refresh_token(grant_id);
        let scope = self
            .grants
            .get(&grant_id)
            .map(|g| g.scopes.join(" "))
            .unwrap_or_default();
        let mut response = json_response(
            StatusCode::OK,
            &json!({
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": ttl,
                "refresh_token": refresh_token,
                "scope": scope,
            }),
        );
        // RFC 6749 §5.1: token responses must not be cached.
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        response
    }

    /// The organizations an access token may see, or `None` if it is unknown, expired or its
    /// grant was revoked.
    fn orgs_of_access_token(&self, token: &str) -> Option<Arc<std::collections::HashSet<String>>> {
        let access = self.access_tokens.get(token)?;
        if Instant::now() >= access.expires_at {
            return None;
        }
        self.grants.get(&access.grant_id).map(|g| g.org_ids.clone())
    }

    fn record(&mut self, recorded: Recorded) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.requests.push((seq, recorded));
        seq
    }

    fn set_recorded_status(&mut self, seq: u64, status: StatusCode) {
        // The request is almost always the last one or close to it.
        if let Some((_, r)) = self.requests.iter_mut().rev().find(|(s, _)| *s == seq) {
            r.status = status.as_u16();
        }
    }

    /// The injected fault that applies to this request, if any, counting it down. When several
    /// are armed, they apply in the order: failure, rate limit, shard redirect, fixed redirect.
    fn take_fault(&mut self, ctx: &Ctx, method: &Method, path_and_query: &str) -> Option<Response> {
        let f = &mut self.faults;
        if f.fail > 0 {
            f.fail -= 1;
            return Some(
                (
                    f.fail_status,
                    [(header::CONTENT_TYPE, "application/json")],
                    f.fail_body.clone(),
                )
                    .into_response(),
            );
        }
        if f.rate_limit > 0 {
            f.rate_limit -= 1;
            let mut response = api_error(
                StatusCode::TOO_MANY_REQUESTS,
                "API rate limit exceeded for organization",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(f.retry_after));
            return Some(response);
        }
        if ctx.listener == "main" && f.to_shard > 0 {
            f.to_shard -= 1;
            // Like Meraki: GETs get a 302; other methods a 307 so the method and body are kept.
            let status = if method == Method::GET || method == Method::HEAD {
                StatusCode::FOUND
            } else {
                StatusCode::TEMPORARY_REDIRECT
            };
            return Some(redirect(
                status,
                &format!("{}{path_and_query}", ctx.shard_base),
            ));
        }
        if f.redirect > 0 {
            f.redirect -= 1;
            return Some(redirect(StatusCode::FOUND, &f.location));
        }
        None
    }

    /// Whether `org_id` exists and the token's grant covers it.
    fn org_visible(&self, orgs: &std::collections::HashSet<String>, org_id: &str) -> bool {
        self.orgs.contains_key(org_id) && orgs.contains(org_id)
    }

    /// The organization an API path acts on, for the rate limit.
    fn org_of_path(&self, path: &str) -> Option<String> {
        let rest = path.strip_prefix("/api/v1/")?;
        let mut segments = rest.split('/');
        let (kind, id) = (segments.next()?, segments.next()?);
        match kind {
            "organizations" => Some(id.to_owned()),
            "networks" => self.networks.get(id).map(|n| n.org_id.clone()),
            "devices" => self
                .devices
                .get(id)
                .and_then(|d| self.networks.get(&d.network_id))
                .map(|n| n.org_id.clone()),
            _ => None,
        }
    }

    /// A 429 when the enforced rate limit says so.
    fn rate_limit(&mut self, path: &str) -> Option<Response> {
        let org = self.org_of_path(path)?;
        let after = self.rate.as_mut()?.take(&org).err()?;
        let mut response = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "API rate limit exceeded for organization",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(after));
        Some(response)
    }

    fn org_json(&self, org_id: &str) -> Value {
        json!({
            "id": org_id,
            "name": self.orgs.get(org_id).cloned().unwrap_or_default(),
            "url": format!("https://n1.meraki.com/o/{org_id}/manage/organization/overview"),
            "api": {"enabled": true},
        })
    }
}

fn lock(state: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panicking test thread must not make every later request fail too.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Servers

/// What a handler needs to know: the shared state and which listener it is serving.
#[derive(Clone)]
struct Ctx {
    state: Arc<Mutex<Inner>>,
    listener: &'static str,
    /// `http://IP:PORT` of this listener, for absolute `Link` URLs.
    base_url: Arc<str>,
    /// `http://IP:PORT` of the shard listener, for redirects.
    shard_base: Arc<str>,
}

impl Ctx {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.state)
    }
}

fn router(ctx: Ctx) -> Router {
    Router::new()
        .route("/oauth/token", post(token_endpoint))
        .route("/oauth/authorize", get(authorize_endpoint))
        .route("/oauth/revoke", post(revoke_endpoint))
        // The API is dispatched by hand, so that every path under /api/v1 (doubled slashes,
        // `%2F`, `..`, odd case) is recorded and answered the way Meraki would.
        .fallback(fallback)
        .with_state(ctx)
}

async fn serve_until_stopped(
    listener: tokio::net::TcpListener,
    app: Router,
    mut stop: watch::Receiver<bool>,
) {
    let server = std::future::IntoFuture::into_future(axum::serve(listener, app));
    tokio::select! {
        _ = server => {}
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
}

/// Serves `app` over TLS on `listener` until `stop`; records each accepted connection.
async fn serve_tls_until_stopped(
    listener: tokio::net::TcpListener,
    name: &'static str,
    app: Router,
    acceptor: tokio_rustls::TlsAcceptor,
    connections: Arc<Mutex<Vec<(&'static str, SocketAddr)>>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            accepted = listener.accept() => {
                let Ok((tcp, peer)) = accepted else { continue };
                connections
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((name, peer));
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    // A client that refuses the certificate ends here.
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        }
    }
}

/// `http://IP:PORT`, with a loopback address in place of an unspecified one.
fn base_url_of(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

async fn fallback(State(ctx): State<Ctx>, request: Request) -> Response {
    let path = request.uri().path();
    if path == "/api/v1" || path.starts_with("/api/v1/") {
        api(ctx, request).await
    } else {
        with_api_headers(api_error(StatusCode::NOT_FOUND, "Not found"))
    }
}

// ---------------------------------------------------------------------------------------------
// Authorization server

async fn token_endpoint(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> Response {
    let form = parse_form(&body);
    let grant_type = first_param(&form, "grant_type");
    let delay = {
        let mut s = ctx.lock();
        match grant_type {
            Some("refresh_token") => s.token_calls += 1,
            Some("authorization_code") => s.code_exchanges += 1,
            _ => {}
        }
        s.token_delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let mut s = ctx.lock();
    if s.token_down {
        return oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "The authorization server is unavailable",
        );
    }
    let Some(client_id) = authenticate_client(&s, &headers) else {
        return invalid_client();
    };
    if !is_form(&headers) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request body must be application/x-www-form-urlencoded",
        );
    }
    if has_repeated_params(&form) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "A parameter was given more than once",
        );
    }
    match grant_type {
        Some("refresh_token") => refresh_grant(&mut s, &client_id, &form),
        Some("authorization_code") => code_grant(&mut s, &client_id, &form),
        Some(_) => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "The grant type is not supported",
        ),
        None => oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Missing grant_type",
        ),
    }
}

fn refresh_grant(s: &mut Inner, client_id: &str, form: &[(String, String)]) -> Response {
    let Some(refresh_token) = first_param(form, "refresh_token") else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Missing refresh_token",
        );
    };
    // Only the grant's current refresh token is accepted: each refresh revokes the previous one.
    let grant_id = s.refresh_tokens.get(refresh_token).copied().filter(|id| {
        s.grants
            .get(id)
            .is_some_and(|g| g.client_id == client_id && g.refresh_token == refresh_token)
    });
    match grant_id {
        Some(id) => s.token_response(id),
        None => {
            s.refused_refreshes += 1;
            invalid_grant("The refresh token is invalid, expired, or revoked")
        }
    }
}

fn code_grant(s: &mut Inner, client_id: &str, form: &[(String, String)]) -> Response {
    let Some(code) = first_param(form, "code") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "Missing code");
    };
    let issued_to_client = matches!(s.codes.get(code), Some(c) if c.client_id == client_id);
    if !issued_to_client {
        return invalid_grant("The authorization code is invalid");
    }
    // Single use: whatever happens next, the code is gone.
    let Some(issued) = s.codes.remove(code) else {
        return invalid_grant("The authorization code is invalid");
    };
    if issued.issued_at.elapsed() > CODE_TTL {
        return invalid_grant("The authorization code has expired");
    }
    if first_param(form, "redirect_uri") != Some(issued.redirect_uri.as_str()) {
        return invalid_grant("The redirect_uri does not match the authorization request");
    }
    let grant_id = s.new_grant(client_id, issued.org_ids, issued.scopes);
    s.token_response(grant_id)
}

/// Auto-approves, as if an org admin had clicked through Meraki's consent page.
async fn authorize_endpoint(State(ctx): State<Ctx>, RawQuery(query): RawQuery) -> Response {
    let params = parse_form(query.unwrap_or_default().as_bytes());
    let param = |name| first_param(&params, name);
    let mut s = ctx.lock();

    if !param("client_id").is_some_and(|id| s.clients.contains_key(id)) {
        return html_page(StatusCode::BAD_REQUEST, "Unknown or missing client_id.");
    }
    let client_id = param("client_id").unwrap_or_default();
    // Errors can only be sent back to a redirect_uri that is a valid absolute URL.
    let Some(redirect_uri) = param("redirect_uri") else {
        return html_page(StatusCode::BAD_REQUEST, "Missing redirect_uri.");
    };
    let Ok(mut target) = url::Url::parse(redirect_uri) else {
        return html_page(StatusCode::BAD_REQUEST, "Invalid redirect_uri.");
    };

    let scope = param("scope").unwrap_or_default();
    let error = if param("response_type") != Some("code") {
        Some("unsupported_response_type")
    } else if scope.contains("invalid") {
        Some("invalid_scope")
    } else {
        None
    };
    {
        let mut pairs = target.query_pairs_mut();
        match error {
            Some(error) => pairs.append_pair("error", error),
            None => {
                let code = random_token("code-", 16);
                // The grant covers the orgs named in `org_ids` (a stand-in extension standing
                // for the admin's choice on the consent page), else every org seeded.
                let org_ids = match param("org_ids") {
                    Some(list) => list
                        .split(',')
                        .filter(|o| !o.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    None => s.orgs.keys().cloned().collect(),
                };
                s.codes.insert(
                    code.clone(),
                    AuthCode {
                        client_id: client_id.to_owned(),
                        redirect_uri: redirect_uri.to_owned(),
                        org_ids,
                        scopes: scope.split_whitespace().map(str::to_owned).collect(),
                        issued_at: Instant::now(),
                    },
                );
                pairs.append_pair("code", &code)
            }
        };
        if let Some(state) = param("state") {
            pairs.append_pair("state", state);
        }
    }
    redirect(StatusCode::FOUND, target.as_str())
}

/// RFC 7009 token revocation.
async fn revoke_endpoint(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> Response {
    let mut s = ctx.lock();
    s.revocations += 1;
    let Some(client_id) = authenticate_client(&s, &headers) else {
        return invalid_client();
    };
    let form = parse_form(&body);
    if !is_form(&headers) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request body must be application/x-www-form-urlencoded",
        );
    }
    let Some(token) = first_param(&form, "token") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "Missing token");
    };

    // A current refresh token takes its grant with it; an access token only itself. Unknown,
    // rotated-out or other clients' tokens change nothing, and the answer is 200 all the same.
    let grant_of_client =
        |grant_id: u64| s.grants.get(&grant_id).filter(|g| g.client_id == client_id);
    if let Some(grant_id) = s.refresh_tokens.get(token).copied() {
        if grant_of_client(grant_id).is_some_and(|g| g.refresh_token == token) {
            s.grants.remove(&grant_id);
        }
    } else if let Some(grant_id) = s.access_tokens.get(token).map(|a| a.grant_id) {
        if grant_of_client(grant_id).is_some() {
            s.access_tokens.remove(token);
        }
    }
    StatusCode::OK.into_response()
}

/// The client authenticated by HTTP Basic (`client_id:client_secret`), if any.
fn authenticate_client(s: &Inner, headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    (s.clients.get(id)? == secret).then(|| id.to_owned())
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

fn first_param<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// RFC 6749 §3.2: request parameters must not be included more than once.
fn has_repeated_params(form: &[(String, String)]) -> bool {
    form.iter()
        .enumerate()
        .any(|(i, (k, _))| form[..i].iter().any(|(other, _)| other == k))
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

fn invalid_grant(description: &str) -> Response {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

fn invalid_client() -> Response {
    let mut response = json_response(
        StatusCode::UNAUTHORIZED,
        &json!({"error": "invalid_client"}),
    );
    // RFC 6749 §5.2: a 401 for a client that tried HTTP Basic carries the challenge.
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"meraki\""),
    );
    response
}

fn html_page(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        format!(
            "<!DOCTYPE html><html><body><h1>Authorization error</h1><p>{message}</p></body></html>"
        ),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Dashboard API

async fn api(ctx: Ctx, request: Request) -> Response {
    let delay = ctx.lock().api_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_API_BODY).await;
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| parts.uri.path().to_owned());
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_owned(), value)
        })
        .collect();

    let mut s = ctx.lock();
    let seq = s.record(Recorded {
        listener: ctx.listener,
        method: parts.method.to_string(),
        path_and_query: path_and_query.clone(),
        headers,
        body: body.as_ref().map(|b| b.to_vec()).unwrap_or_default(),
        status: 0,
        at: Instant::now(),
    });
    let response = match body {
        // Too large to record, or the client went away while sending it.
        Err(_) => api_error(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large"),
        Ok(body) => match s
            .rate_limit(parts.uri.path())
            .or_else(|| s.take_fault(&ctx, &parts.method, &path_and_query))
        {
            Some(fault) => fault,
            None => handle_api(
                &mut s,
                &ctx,
                &parts.method,
                &parts.uri,
                &parts.headers,
                &body,
            ),
        },
    };
    s.set_recorded_status(seq, response.status());
    drop(s);
    with_api_headers(response)
}

/// Every API answer carries a request id and a JSON content type, as Meraki's do.
fn with_api_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let request_id = random_hex(8);
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert(HeaderName::from_static("x-request-id"), value);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The bearer token of `Authorization: Bearer T`. `X-Cisco-Meraki-API-Key` is deliberately not
/// looked at: the proxy must never rely on it reaching Meraki.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn handle_api(
    s: &mut Inner,
    ctx: &Ctx,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let Some(orgs) = bearer(headers).and_then(|t| s.orgs_of_access_token(t)) else {
        return api_error(StatusCode::UNAUTHORIZED, "Invalid API key");
    };
    let not_found = || api_error(StatusCode::NOT_FOUND, "Not found");

    let path = uri.path();
    let rest = path.strip_prefix("/api/v1").unwrap_or_default();
    if s.refused_paths.iter().any(|p| p == rest) {
        return api_error(StatusCode::UNAUTHORIZED, "Invalid API key");
    }
    // "" → [], "/organizations/1" → ["organizations", "1"]; empty segments are kept, so
    // `//` or a trailing `/` do not match a route.
    let segments: Vec<&str> = rest.split('/').skip(1).collect();
    let read = *method == Method::GET || *method == Method::HEAD;
    let query = uri.query();
    let self_url = format!("{}{}", ctx.base_url, path);

    match (segments.as_slice(), read) {
        (["organizations"], true) => {
            // Paginated like Meraki's: perPage 3 to 9,000, 9,000 by default.
            let items = s
                .orgs
                .keys()
                .filter(|id| orgs.contains(*id))
                .map(|id| (id.clone(), s.org_json(id)))
                .collect();
            paginated_with(
                items,
                query,
                &self_url,
                ORGANIZATIONS_PER_PAGE,
                ORGANIZATIONS_PER_PAGE,
            )
        }
        (["organizations", org_id], true) if s.org_visible(&orgs, org_id) => {
            json_response(StatusCode::OK, &s.org_json(org_id))
        }
        (["organizations", org_id, "networks"], true) if s.org_visible(&orgs, org_id) => {
            let items = s
                .networks
                .iter()
                .filter(|(_, n)| n.org_id == *org_id)
                .map(|(id, n)| (id.clone(), n.to_json(id)))
                .collect();
            paginated(items, query, &self_url)
        }
        (["organizations", org_id, "devices"], true) if s.org_visible(&orgs, org_id) => {
            let items = s
                .devices
                .iter()
                .filter(|(_, d)| {
                    s.networks
                        .get(&d.network_id)
                        .is_some_and(|n| n.org_id == *org_id)
                })
                .map(|(serial, d)| (serial.clone(), d.to_json(serial)))
                .collect();
            paginated(items, query, &self_url)
        }
        (["organizations", org_id, "big"], true) if s.org_visible(&orgs, org_id) => {
            big_response(query)
        }
        (["organizations", org_id, "actionBatches"], false)
            if *method == Method::POST && s.org_visible(&orgs, org_id) =>
        {
            action_batch(s, org_id, body)
        }
        (["networks", network_id], _) => {
            let visible = s
                .networks
                .get(*network_id)
                .is_some_and(|n| s.org_visible(&orgs, &n.org_id));
            if !visible {
                not_found()
            } else if read {
                network_response(s, network_id)
            } else if *method == Method::PUT {
                update_network(s, network_id, body)
            } else {
                not_found()
            }
        }
        (["devices", serial], true) => {
            let device = s.devices.get(*serial).filter(|d| {
                s.networks
                    .get(&d.network_id)
                    .is_some_and(|n| s.org_visible(&orgs, &n.org_id))
            });
            match device {
                Some(d) => json_response(StatusCode::OK, &d.to_json(serial)),
                None => not_found(),
            }
        }
        _ => not_found(),
    }
}

fn network_response(s: &Inner, network_id: &str) -> Response {
    match s.networks.get(network_id) {
        Some(n) => json_response(StatusCode::OK, &n.to_json(network_id)),
        None => api_error(StatusCode::NOT_FOUND, "Not found"),
    }
}

/// `PUT /networks/{id}`: merges `name`, `timeZone` and `tags`; other keys are ignored.
fn update_network(s: &mut Inner, network_id: &str, body: &[u8]) -> Response {
    let update = match parse_update(body) {
        Ok(update) => update,
        Err(message) => return api_error(StatusCode::BAD_REQUEST, &message),
    };
    if let Some(network) = s.networks.get_mut(network_id) {
        update.apply(network);
    }
    network_response(s, network_id)
}

/// The fields of a network update, checked before anything is changed.
#[derive(Default)]
struct NetworkUpdate {
    name: Option<String>,
    time_zone: Option<String>,
    tags: Option<Vec<String>>,
}

impl NetworkUpdate {
    fn apply(self, network: &mut Network) {
        if let Some(name) = self.name {
            network.name = name;
        }
        if let Some(time_zone) = self.time_zone {
            network.time_zone = time_zone;
        }
        if let Some(tags) = self.tags {
            network.tags = tags;
        }
    }
}

fn parse_update(body: &[u8]) -> Result<NetworkUpdate, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => update_from_json(&value),
        Err(_) => Err("The request body must be a JSON object".to_owned()),
    }
}

fn update_from_json(value: &Value) -> Result<NetworkUpdate, String> {
    let Some(object) = value.as_object() else {
        return Err("The request body must be a JSON object".to_owned());
    };
    let string = |key: &str| match object.get(key) {
        None => Ok(None),
        Some(Value::String(v)) => Ok(Some(v.clone())),
        Some(_) => Err(format!("'{key}' must be a string")),
    };
    let tags = match object.get("tags") {
        None => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|t| t.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or("'tags' must be an array of strings")?,
        ),
        Some(_) => return Err("'tags' must be an array of strings".to_owned()),
    };
    Ok(NetworkUpdate {
        name: string("name")?,
        time_zone: string("timeZone")?,
        tags,
    })
}

/// `POST /organizations/{orgId}/actionBatches`. A confirmed batch applies its `update`s of
/// `/networks/{id}` resources (which must belong to this organization); other actions are
/// accepted and ignored.
fn action_batch(s: &mut Inner, org_id: &str, body: &[u8]) -> Response {
    let bad_request = |message: &str| api_error(StatusCode::BAD_REQUEST, message);
    let Ok(Value::Object(batch)) = serde_json::from_slice::<Value>(body) else {
        return bad_request("The request body must be a JSON object");
    };
    let Some(actions) = batch.get("actions").and_then(Value::as_array) else {
        return bad_request("'actions' must be an array");
    };
    let confirmed = batch
        .get("confirmed")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let synchronous = batch
        .get("synchronous")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    // Check every action before applying any, so a bad batch changes nothing.
    let mut updates = Vec::new();
    for action in actions {
        let resource = action.get("resource").and_then(Value::as_str);
        let operation = action.get("operation").and_then(Value::as_str);
        let (Some(resource), Some(operation)) = (resource, operation) else {
            return bad_request("Each action needs a 'resource' and an 'operation'");
        };
        let Some(network_id) = resource.strip_prefix("/networks/") else {
            continue;
        };
        if network_id.contains('/') || operation != "update" {
            continue;
        }
        let in_org = matches!(s.networks.get(network_id), Some(n) if n.org_id == org_id);
        if !in_org {
            return bad_request(&format!("Network not found for resource {resource}"));
        }
        match update_from_json(action.get("body").unwrap_or(&Value::Null)) {
            Ok(update) => updates.push((network_id.to_owned(), update)),
            Err(message) => return bad_request(&message),
        }
    }
    if confirmed {
        for (network_id, update) in updates {
            if let Some(network) = s.networks.get_mut(&network_id) {
                update.apply(network);
            }
        }
    }

    let id = (rand::random::<u64>() % 900_000_000_000 + 100_000_000_000).to_string();
    json_response(
        StatusCode::CREATED,
        &json!({
            "id": id,
            "organizationId": org_id,
            "confirmed": confirmed,
            "synchronous": synchronous,
            "status": {
                "completed": confirmed,
                "failed": false,
                "errors": [],
                "createdResources": [],
            },
            "actions": actions,
        }),
    )
}

/// One page of `items` (sorted by id) with Meraki's `Link` header.
///
/// Cursors: `startingAfter` is the last id of the previous page and `endingBefore` the first id
/// of the next one, compared byte for byte with the percent-encoded id (so a cursor that was
/// decoded or re-encoded on the way is refused); `first` and `last` use sentinel values. Query
/// parameters other than the paging ones are echoed in the links exactly as received.
fn paginated(items: Vec<(String, Value)>, query: Option<&str>, self_url: &str) -> Response {
    paginated_with(items, query, self_url, DEFAULT_PER_PAGE, MAX_PER_PAGE)
}

/// [`paginated`] with an endpoint's own default and largest `perPage`.
fn paginated_with(
    items: Vec<(String, Value)>,
    query: Option<&str>,
    self_url: &str,
    default_per_page: u64,
    max_per_page: u64,
) -> Response {
    let bad_request = |message: &str| api_error(StatusCode::BAD_REQUEST, message);
    let mut per_page = default_per_page;
    let mut starting_after = None;
    let mut ending_before = None;
    let mut echoed: Vec<&str> = Vec::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "perPage" => match raw_value.parse::<u64>() {
                Ok(n) if (MIN_PER_PAGE..=max_per_page).contains(&n) => per_page = n,
                _ => {
                    return bad_request(&format!(
                        "'perPage' must be an integer between {MIN_PER_PAGE} and {max_per_page}"
                    ))
                }
            },
            "startingAfter" => starting_after = Some(raw_value),
            "endingBefore" => ending_before = Some(raw_value),
            _ => echoed.push(pair),
        }
    }
    if !echoed.iter().any(|p| p.split('=').next() == Some("t0")) {
        echoed.push(T0_PAIR);
    }

    let cursors: Vec<String> = items.iter().map(|(id, _)| encode_cursor(id)).collect();
    let position = |cursor: &str| cursors.iter().position(|c| c == cursor);
    let low = match starting_after {
        None => 0,
        Some(FIRST_CURSOR) => 0,
        Some(c) => match position(c) {
            Some(i) => i + 1,
            None => return bad_request("Invalid startingAfter"),
        },
    };
    let high = match ending_before {
        None => items.len(),
        Some(LAST_CURSOR) => items.len(),
        Some(c) => match position(c) {
            Some(i) => i,
            None => return bad_request("Invalid endingBefore"),
        },
    }
    .max(low);
    let per_page_usize = usize::try_from(per_page).unwrap_or(usize::MAX);
    // Paging backwards (only endingBefore) takes the page just before the cursor.
    let (start, end) = if ending_before.is_some() && starting_after.is_none() {
        (high.saturating_sub(per_page_usize).max(low), high)
    } else {
        (low, low.saturating_add(per_page_usize).min(high))
    };

    let extra: String = echoed.iter().map(|p| format!("&{p}")).collect();
    let link = |param: &str, cursor: &str, rel: &str| {
        format!("<{self_url}?perPage={per_page}&{param}={cursor}{extra}>; rel={rel}")
    };
    let mut links = vec![link("startingAfter", FIRST_CURSOR, "first")];
    if start > 0 {
        links.push(link("endingBefore", &cursors[start], "prev"));
    }
    if end < items.len() && end > 0 {
        links.push(link("startingAfter", &cursors[end - 1], "next"));
    }
    links.push(link("endingBefore", LAST_CURSOR, "last"));

    let page: Vec<Value> = items
        .into_iter()
        .skip(start)
        .take(end - start)
        .map(|(_, v)| v)
        .collect();
    let mut response = json_response(StatusCode::OK, &Value::Array(page));
    if let Ok(value) = HeaderValue::from_str(&links.join(", ")) {
        response.headers_mut().insert(header::LINK, value);
    }
    response
}

fn encode_cursor(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for &b in id.as_bytes() {
        if b.is_ascii_alphanumeric() || CURSOR_SAFE.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `GET /organizations/{orgId}/big?bytes=N`: a JSON array of exactly N bytes, generated chunk by
/// chunk so that hundreds of megabytes cost no memory: `[` + `"xxxxxxxx",`… + `"x…"]`.
fn big_response(query: Option<&str>) -> Response {
    let total = parse_form(query.unwrap_or_default().as_bytes())
        .into_iter()
        .find(|(k, _)| k == "bytes")
        .and_then(|(_, v)| v.parse::<u64>().ok());
    let Some(total) = total.filter(|n| *n >= 4) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "'bytes' must be an integer of at least 4",
        );
    };

    const ELEMENT: &[u8] = b"\"xxxxxxxx\",";
    const ELEMENTS_PER_CHUNK: u64 = 5958; // about 64 KiB
    let element_len = ELEMENT.len() as u64;
    let chunk = Bytes::from(ELEMENT.repeat(ELEMENTS_PER_CHUNK as usize));
    let elements = (total - 4) / element_len;
    let tail_filler = ((total - 4) % element_len) as usize;

    enum Stage {
        Open,
        Elements(u64),
        Done,
    }
    let stream = futures_util::stream::unfold(Stage::Open, move |stage| {
        let chunk = chunk.clone();
        async move {
            let (bytes, next) = match stage {
                Stage::Open => (Bytes::from_static(b"["), Stage::Elements(elements)),
                Stage::Elements(0) => {
                    let tail = format!("\"{}\"]", "x".repeat(tail_filler));
                    (Bytes::from(tail), Stage::Done)
                }
                Stage::Elements(left) => {
                    let n = left.min(ELEMENTS_PER_CHUNK);
                    let len = (n * element_len) as usize;
                    (chunk.slice(..len), Stage::Elements(left - n))
                }
                Stage::Done => return None,
            };
            Some((Ok::<_, Infallible>(bytes), next))
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    response
}

// ---------------------------------------------------------------------------------------------
// Small helpers

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Meraki's error shape: `{"errors": ["..."]}`.
fn api_error(status: StatusCode, message: &str) -> Response {
    json_response(status, &json!({ "errors": [message] }))
}

fn redirect(status: StatusCode, location: &str) -> Response {
    let mut response = status.into_response();
    match HeaderValue::from_str(location) {
        Ok(value) => {
            response.headers_mut().insert(header::LOCATION, value);
            response
        }
        Err(_) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Invalid redirect location",
        ),
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::Rng::fill(&mut rand::thread_rng(), buf.as_mut_slice());
    hex::encode(buf)
}

/// `prefix` + 2×`bytes` hex digits; the prefix tells access and refresh tokens apart.
fn random_token(prefix: &str, bytes: usize) -> String {
    format!("{prefix}{}", random_hex(bytes))
}

/// A stable MAC for a serial, under Meraki's OUI.
fn mac_of(serial: &str) -> String {
    // FNV-1a: stable across runs and platforms, unlike std's hasher.
    let hash = serial.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let [a, b, c, ..] = hash.to_be_bytes();
    format!("00:18:0a:{a:02x}:{b:02x}:{c:02x}")
}
