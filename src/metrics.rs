//! Prometheus metrics, prefixed `meraki_proxy_`. Label values come only from the configuration
//! (integration, client, organization) and small fixed sets (method, status class, result,
//! reason), so cardinality stays bounded whatever clients send; and per `[metrics]` only the
//! busiest clients and organizations keep their name, the rest counted as `"other"` ([`fold`]),
//! so it stays bounded whatever the configuration holds (docs/metrics.md gives the series count).
//!
//! A grant's own series (token expiry, re-authorization, token calls) are by grant: unless
//! `per_organization = "on"`, a grant serving one organization is labelled with it and one
//! serving several with `organization="grant-<id>"`.

pub mod fold;

pub use fold::{Chooser, OTHER};

use crate::config::{Detail, MetricsConfig};
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::OnceLock;
use std::time::Duration;

/// Label value for what is not known (an unidentified client, an undetermined organization).
pub const NONE: &str = "-";

/// Every metric of the proxy, in one registry.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_duration: HistogramVec,
    refreshes: IntCounterVec,
    token_calls: IntCounterVec,
    token_call_duration: HistogramVec,
    token_expiry: IntGaugeVec,
    grant_needs_reauth: IntGaugeVec,
    refused_operations: IntGaugeVec,
    token_probes: IntCounterVec,
    retries: IntCounterVec,
    denials: IntCounterVec,
    expiring_keys: IntCounterVec,
    upstream_429: IntCounterVec,
    redirects: IntCounterVec,
    in_flight: IntGauge,
    store_duration: HistogramVec,
    store_errors: IntCounterVec,
    config_reloads: IntCounterVec,
    config_generation: IntGauge,
    instances: IntGauge,
    queue_wait: HistogramVec,
    rate_limited: IntCounterVec,
    bucket_tokens: GaugeVec,
    bucket_rps: GaugeVec,
    queued: IntGaugeVec,
    rate_share: GaugeVec,
    rate_demand: GaugeVec,
    source_share: prometheus::Gauge,
    fleet_exchanges: IntCounterVec,
    connections_open: IntGauge,
    connections_refused: IntCounterVec,
    malformed: IntCounterVec,
    client_timeouts: IntCounterVec,
    /// Read at each scrape for the bucket gauges.
    shaper: OnceLock<crate::shaping::Shaper>,
    /// Which clients and organizations keep their name.
    clients: Chooser,
    orgs: Chooser,
}

/// The limits a connection can be refused by (`[server] max_connections`, `max_connections_per_peer`).
pub const CONNECTION_LIMITS: &[&str] = &["listener", "peer", "proxy_protocol"];
/// The phases a client can time out in (`[server] *_timeout_secs`).
pub const TIMEOUT_PHASES: &[&str] = &["header", "body", "request"];

/// Results of a token endpoint call (see `OAuthError::label`).
pub const REFRESH_RESULTS: &[&str] = &[
    "ok",
    "invalid_grant",
    "as_error",
    "timeout",
    "unreachable",
    "tls_error",
];
/// Outcomes of a retry after an upstream 401.
pub const RETRY_OUTCOMES: &[&str] = &[
    "succeeded",
    "rejected_again",
    "refresh_failed",
    "refused_at_operation",
    "body_not_replayable",
];
/// Token store operations that are measured.
pub const STORE_OPS: &[&str] = &["commit_rotation", "set_status", "touch", "reload", "lease"];

/// Queue waits: up to `max_wait_ms` (2 s by default) and twice that.
const WAIT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0,
];

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> prometheus::Result<Metrics> {
        let r = Registry::new();
        let in_flight = IntGauge::new(
            "meraki_proxy_in_flight_requests",
            "Requests being served now.",
        )?;
        r.register(Box::new(in_flight.clone()))?;
        let config_generation = IntGauge::new(
            "meraki_proxy_config_generation",
            "The configuration in force: 1 at start, one more per applied reload.",
        )?;
        r.register(Box::new(config_generation.clone()))?;
        let instances = IntGauge::new(
            "meraki_proxy_store_instances",
            "Instances of the proxy alive on the shared store (heartbeats), this one included.",
        )?;
        r.register(Box::new(instances.clone()))?;
        let connections_open = IntGauge::new(
            "meraki_proxy_connections_open",
            "Client connections open on the proxy listener now.",
        )?;
        r.register(Box::new(connections_open.clone()))?;
        let connections_refused = counter(
            &r,
            "meraki_proxy_connections_refused_total",
            "Connections refused for a limit: listener (server.max_connections, 503 and closed) or peer (server.max_connections_per_peer, its requests answered 429).",
            &["limit"],
        )?;
        let malformed = counter(
            &r,
            "meraki_proxy_malformed_requests_total",
            "Requests the HTTP parser refused, by what was wrong (answered 400, 405 for CONNECT).",
            &["kind"],
        )?;
        let client_timeouts = counter(
            &r,
            "meraki_proxy_client_timeouts_total",
            "Requests ended because the client was too slow, by phase: header, body (no progress), request (the whole request).",
            &["phase"],
        )?;
        for l in CONNECTION_LIMITS {
            connections_refused.with_label_values(&[l]);
        }
        for p in TIMEOUT_PHASES {
            client_timeouts.with_label_values(&[p]);
        }
        Ok(Metrics {
            connections_open,
            connections_refused,
            malformed,
            client_timeouts,
            requests: counter(
                &r,
                "meraki_proxy_requests_total",
                "Requests answered, by integration, client, organization, method and status class.",
                &[
                    "integration",
                    "client",
                    "organization",
                    "method",
                    "status_class",
                ],
            )?,
            request_duration: histogram(
                &r,
                "meraki_proxy_request_duration_seconds",
                "Time from request to the end of the response, by integration.",
                &["integration"],
            )?,
            upstream_duration: histogram(
                &r,
                "meraki_proxy_upstream_duration_seconds",
                "Time from sending upstream to the upstream response header, by integration.",
                &["integration"],
            )?,
            refreshes: counter(
                &r,
                "meraki_proxy_token_refreshes_total",
                "Calls to the token endpoint, by integration, organization and result.",
                &["integration", "organization", "result"],
            )?,
            expiring_keys: counter(
                &r,
                "meraki_proxy_expiring_key_requests_total",
                "Requests made with a client key that has an expiry (being rotated out), by client.",
                &["client"],
            )?,
            token_calls: counter(
                &r,
                "meraki_proxy_token_calls_total",
                "Token endpoint calls by integration, grant, cause and outcome: alert on a storm.",
                &["integration", "grant", "cause", "outcome"],
            )?,
            token_call_duration: histogram(
                &r,
                "meraki_proxy_token_call_duration_seconds",
                "Duration of token endpoint calls, by integration.",
                &["integration"],
            )?,
            token_expiry: gauge(
                &r,
                "meraki_proxy_access_token_expiry_timestamp_seconds",
                "When the current access token of each grant expires (Unix time).",
                &["integration", "organization"],
            )?,
            grant_needs_reauth: gauge(
                &r,
                "meraki_proxy_grant_needs_reauthorization",
                "1 while a grant needs re-authorization by an org admin, else 0.",
                &["integration", "organization"],
            )?,
            refused_operations: gauge(
                &r,
                "meraki_proxy_refused_operations",
                "Operations at which Meraki refuses a grant's tokens even freshly minted (their 401s pass through without a refresh), by integration and grant.",
                &["integration", "grant"],
            )?,
            token_probes: counter(
                &r,
                "meraki_proxy_token_probes_total",
                "Probes of a grant's token (GET /organizations) before passing a remembered operation's 401 through, by integration and verdict (works, refused, unknown).",
                &["integration", "verdict"],
            )?,
            retries: counter(
                &r,
                "meraki_proxy_upstream_401_retries_total",
                "Requests retried after an upstream 401 and a refresh, by integration and outcome.",
                &["integration", "outcome"],
            )?,
            denials: counter(
                &r,
                "meraki_proxy_denials_total",
                "Requests refused by the proxy, by client and reason.",
                &["client", "reason"],
            )?,
            upstream_429: counter(
                &r,
                "meraki_proxy_upstream_429_total",
                "429 answers from Meraki, by organization.",
                &["organization"],
            )?,
            redirects: counter(
                &r,
                "meraki_proxy_upstream_redirects_total",
                "Upstream redirects followed, by integration.",
                &["integration"],
            )?,
            in_flight,
            store_duration: histogram(
                &r,
                "meraki_proxy_store_operation_duration_seconds",
                "Token store operation latency, by operation.",
                &["op"],
            )?,
            store_errors: counter(
                &r,
                "meraki_proxy_store_errors_total",
                "Token store operation errors, by operation.",
                &["op"],
            )?,
            config_reloads: counter(
                &r,
                "meraki_proxy_config_reloads_total",
                "Configuration reloads (SIGHUP, POST /admin/reload), by result: applied or refused.",
                &["result"],
            )?,
            config_generation,
            instances,
            queue_wait: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "meraki_proxy_rate_queue_wait_seconds",
                        "Time requests waited for their turn in their organization's rate budget, by organization.",
                    )
                    .buckets(WAIT_BUCKETS.to_vec()),
                    &["organization"],
                )?;
                r.register(Box::new(h.clone()))?;
                h
            },
            rate_limited: counter(
                &r,
                "meraki_proxy_rate_limited_total",
                "Requests answered 429 by the proxy itself (not sent: the organization's rate budget was taken), by client and organization.",
                &["client", "organization"],
            )?,
            bucket_tokens: {
                let g = GaugeVec::new(
                    Opts::new(
                        "meraki_proxy_rate_bucket_tokens",
                        "Requests the organization's rate bucket holds now (below 0: charged beyond it), by organization.",
                    ),
                    &["organization"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            bucket_rps: {
                let g = GaugeVec::new(
                    Opts::new(
                        "meraki_proxy_rate_organization_rps",
                        "The rate the proxy sends an organization's requests at now (lower than configured after Meraki's 429s), by organization.",
                    ),
                    &["organization"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            queued: gauge(
                &r,
                "meraki_proxy_rate_queued_requests",
                "Requests waiting for their turn now, by organization.",
                &["organization"],
            )?,
            rate_share: {
                let g = GaugeVec::new(
                    Opts::new(
                        "meraki_proxy_rate_share",
                        "This instance's part of the organization's rate budget (1 alone; in a fleet, divided by demand every 250 ms), by organization.",
                    ),
                    &["organization"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            rate_demand: {
                let g = GaugeVec::new(
                    Opts::new(
                        "meraki_proxy_rate_demand_rps",
                        "Requests/s the organization was asked for in the last second, at this instance (of=\"instance\") and in the whole fleet (of=\"fleet\"), at the last exchange.",
                    ),
                    &["organization", "of"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            source_share: {
                let g = prometheus::Gauge::new(
                    "meraki_proxy_rate_source_share",
                    "This instance's part of the source address's rate budget (1 alone, or when [rate_limits] source_shared = false).",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            fleet_exchanges: counter(
                &r,
                "meraki_proxy_fleet_exchanges_total",
                "Demand exchanges with the fleet through the store, by outcome (ok; failed or slow: the instance took the even split of the fleet it last saw).",
                &["outcome"],
            )?,
            shaper: OnceLock::new(),
            clients: Chooser::new(Detail::Top, MetricsConfig::default().top_clients),
            orgs: Chooser::new(Detail::Top, MetricsConfig::default().top_organizations),
            registry: r,
        })
    }

    /// Adds collectors kept elsewhere (the audit sink's health) to the registry.
    pub fn register(
        &self,
        collectors: Vec<Box<dyn prometheus::core::Collector>>,
    ) -> prometheus::Result<()> {
        for c in collectors {
            self.registry.register(c)?;
        }
        Ok(())
    }

    /// Reads the shaper's buckets and queues at each scrape.
    pub fn watch_shaper(&self, shaper: crate::shaping::Shaper) {
        let _ = self.shaper.set(shaper);
    }

    /// A request's wait for its turn.
    pub fn queue_wait(&self, org: &str, waited: Duration) {
        self.queue_wait
            .with_label_values(&[self.orgs.label(org)])
            .observe(waited.as_secs_f64());
    }

    /// A local 429.
    pub fn rate_limited(&self, client: &str, org: &str) {
        self.rate_limited
            .with_label_values(&[self.clients.label(client), self.orgs.label(org)])
            .inc();
    }

    /// Creates, at zero, the series whose label values the configuration already names, so
    /// dashboards and `increase()` alerts see them before the first event; takes `[metrics]`.
    pub fn init_labels(&self, config: &crate::config::Config) {
        let m = &config.metrics;
        self.clients.set(m.per_client, m.top_clients);
        self.orgs.set(m.per_organization, m.top_organizations);
        for result in ["applied", "refused"] {
            self.config_reloads.with_label_values(&[result]);
        }
        for it in &config.integrations {
            let name = it.name.as_str();
            for outcome in RETRY_OUTCOMES {
                self.retries.with_label_values(&[name, outcome]);
            }
            self.redirects.with_label_values(&[name]);
        }
        for op in STORE_OPS {
            self.store_errors.with_label_values(&[op]);
            self.store_duration.with_label_values(&[op]);
        }
        // The first clients and organizations of the configuration take the free places, so
        // a proxy with no more of them than places names them all from the start; the named
        // ones' series start at zero, and "other"'s.
        self.clients
            .know(config.clients.iter().map(|c| c.name.as_str()));
        self.orgs.know(
            config
                .clients
                .iter()
                .flat_map(|c| c.organizations.iter().map(String::as_str)),
        );
        self.clients
            .seed(config.clients.iter().map(|c| c.name.as_str()));
        self.orgs.seed(
            config
                .clients
                .iter()
                .flat_map(|c| c.organizations.iter().map(String::as_str)),
        );
        if m.per_organization != Detail::On {
            self.upstream_429.with_label_values(&[OTHER]);
            self.queue_wait.with_label_values(&[OTHER]);
        }
        if m.per_organization != Detail::On || m.per_client != Detail::On {
            self.rate_limited.with_label_values(&[OTHER, OTHER]);
        }
        for c in &config.clients {
            let client_named = self.clients.named(&c.name);
            for org in &c.organizations {
                if !self.orgs.named(org) {
                    continue;
                }
                self.upstream_429.with_label_values(&[org]);
                self.queue_wait.with_label_values(&[org]);
                if client_named {
                    self.rate_limited.with_label_values(&[&c.name, org]);
                }
            }
        }
    }

    /// The Prometheus text exposition. Each scrape first re-chooses the clients and
    /// organizations that keep their name ([`Chooser::rechoose`]) and drops the series of
    /// those that lost it.
    pub fn render(&self) -> String {
        for gone in self.clients.rechoose() {
            self.drop_client(&gone);
        }
        for gone in self.orgs.rechoose() {
            self.drop_org(&gone);
        }
        if let Some(shaper) = self.shaper.get() {
            let mut other_queued = 0i64;
            let mut others = false;
            for o in shaper.organizations() {
                if self.orgs.named(&o.org) {
                    let org = [&*o.org];
                    self.bucket_tokens.with_label_values(&org).set(o.tokens);
                    self.bucket_rps.with_label_values(&org).set(o.rps);
                    self.queued.with_label_values(&org).set(o.queued as i64);
                    self.rate_share.with_label_values(&org).set(o.share);
                    if o.instances > 1 {
                        self.rate_demand
                            .with_label_values(&[&*o.org, "instance"])
                            .set(o.asked_here);
                        self.rate_demand
                            .with_label_values(&[&*o.org, "fleet"])
                            .set(o.asked_fleet);
                    }
                } else {
                    others = true;
                    other_queued += o.queued as i64;
                }
            }
            if others {
                self.queued.with_label_values(&[OTHER]).set(other_queued);
            }
            self.source_share.set(shaper.source_share());
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "could not encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Drops the series of a client that lost its name.
    fn drop_client(&self, name: &str) {
        drop_series(&self.requests, "client", name);
        drop_series(&self.denials, "client", name);
        drop_series(&self.expiring_keys, "client", name);
        drop_series(&self.rate_limited, "client", name);
    }

    /// Drops the series of an organization that lost its name.
    fn drop_org(&self, org: &str) {
        drop_series(&self.requests, "organization", org);
        drop_series(&self.rate_limited, "organization", org);
        drop_series(&self.upstream_429, "organization", org);
        drop_series(&self.queue_wait, "organization", org);
        drop_series(&self.bucket_tokens, "organization", org);
        drop_series(&self.bucket_rps, "organization", org);
        drop_series(&self.queued, "organization", org);
        drop_series(&self.rate_share, "organization", org);
        drop_series(&self.rate_demand, "organization", org);
    }

    /// The `organization` label of a grant's own series: each organization with
    /// `per_organization = "on"`, else its only one or `grant-<id>`.
    fn grant_labels(&self, grant: i64, orgs: &[String]) -> Vec<String> {
        match (self.orgs.detail(), orgs) {
            (Detail::On, _) => orgs.to_vec(),
            (_, [one]) => vec![one.clone()],
            _ => vec![format!("grant-{grant}")],
        }
    }

    /// One answered request.
    pub fn request(
        &self,
        integration: &str,
        client: &str,
        org: &str,
        method: &http::Method,
        status: u16,
        elapsed: Duration,
    ) {
        self.requests
            .with_label_values(&[
                integration,
                self.clients.seen(client),
                self.orgs.seen(org),
                method_label(method),
                status_class(status),
            ])
            .inc();
        self.request_duration
            .with_label_values(&[integration])
            .observe(elapsed.as_secs_f64());
    }

    /// Time to the upstream response header.
    pub fn upstream(&self, integration: &str, elapsed: Duration) {
        self.upstream_duration
            .with_label_values(&[integration])
            .observe(elapsed.as_secs_f64());
    }

    /// A token endpoint call's result, for a grant (its organizations) made for `org`.
    pub fn refresh(&self, integration: &str, grant: i64, orgs: &[String], org: &str, result: &str) {
        let label = match self.orgs.detail() {
            Detail::On => org.to_owned(),
            _ => self.grant_labels(grant, orgs).swap_remove(0),
        };
        self.refreshes
            .with_label_values(&[integration, &label, result])
            .inc();
    }

    /// A token endpoint call's duration.
    pub fn token_call_duration(&self, integration: &str, elapsed: Duration) {
        self.token_call_duration
            .with_label_values(&[integration])
            .observe(elapsed.as_secs_f64());
    }

    /// Creates a grant's series at zero.
    pub fn init_grant(&self, integration: &str, grant: i64, orgs: &[String], causes: &[&str]) {
        for org in &self.grant_labels(grant, orgs) {
            for result in REFRESH_RESULTS {
                self.refreshes
                    .with_label_values(&[integration, org, result]);
            }
        }
        // Successful calls per cause at zero (failures appear when they happen): four series
        // a grant, not twenty, for proxies with thousands of grants.
        let id = grant.to_string();
        for cause in causes {
            self.token_calls
                .with_label_values(&[integration, &id, cause, "ok"]);
        }
        self.token_call_duration.with_label_values(&[integration]);
        self.refused_operations
            .with_label_values(&[integration, &id]);
    }

    /// One token endpoint call of a grant.
    pub fn token_call(&self, integration: &str, grant: i64, cause: &str, outcome: &str) {
        self.token_calls
            .with_label_values(&[integration, &grant.to_string(), cause, outcome])
            .inc();
    }

    /// The expiry and health of a grant (see [`Metrics::grant_labels`]).
    pub fn grant_state(
        &self,
        integration: &str,
        grant: i64,
        orgs: &[String],
        expires_at: i64,
        needs_reauth: bool,
    ) {
        for org in &self.grant_labels(grant, orgs) {
            let labels = [integration, org.as_str()];
            self.token_expiry.with_label_values(&labels).set(expires_at);
            self.grant_needs_reauth
                .with_label_values(&labels)
                .set(i64::from(needs_reauth));
        }
    }

    /// How many operations a grant remembers as refused.
    pub fn refused_operations(&self, integration: &str, grant: i64, n: usize) {
        self.refused_operations
            .with_label_values(&[integration, &grant.to_string()])
            .set(n as i64);
    }

    /// A probe of a grant's token.
    pub fn token_probe(&self, integration: &str, verdict: &str) {
        self.token_probes
            .with_label_values(&[integration, verdict])
            .inc();
    }

    /// A retry after an upstream 401 (`outcome`: one of [`RETRY_OUTCOMES`]).
    pub fn retry(&self, integration: &str, outcome: &str) {
        self.retries
            .with_label_values(&[integration, outcome])
            .inc();
    }

    /// A request made with a client key that has an expiry.
    pub fn expiring_key_use(&self, client: &str) {
        self.expiring_keys
            .with_label_values(&[self.clients.label(client)])
            .inc();
    }

    /// A refused request.
    pub fn denial(&self, client: &str, reason: &str) {
        self.denials
            .with_label_values(&[self.clients.label(client), reason])
            .inc();
    }

    /// An upstream 429.
    pub fn upstream_429(&self, org: &str) {
        self.upstream_429
            .with_label_values(&[self.orgs.label(org)])
            .inc();
    }

    /// An upstream redirect followed.
    pub fn redirect(&self, integration: &str) {
        self.redirects.with_label_values(&[integration]).inc();
    }

    /// A configuration reload: applied (now at `generation`) or refused.
    pub fn reload(&self, applied: bool, generation: u64) {
        self.config_reloads
            .with_label_values(&[if applied { "applied" } else { "refused" }])
            .inc();
        self.config_generation.set(generation as i64);
    }

    /// Instances alive on the shared store.
    /// One demand exchange with the fleet: `ok`, `failed` or `slow`.
    pub fn fleet_exchange(&self, outcome: &str) {
        self.fleet_exchanges.with_label_values(&[outcome]).inc();
    }

    pub fn instances(&self, n: usize) {
        self.instances.set(n as i64);
    }

    /// The configuration in force at start.
    pub fn started_with_config(&self) {
        self.config_generation.set(1);
    }

    /// The configuration generation in force.
    pub fn config_generation(&self) -> u64 {
        self.config_generation.get() as u64
    }

    /// The open-connections gauge of the proxy listener.
    pub fn connections_open(&self) -> &IntGauge {
        &self.connections_open
    }

    /// A connection refused for a limit ([`CONNECTION_LIMITS`]).
    pub fn connection_refused(&self, limit: &str) {
        self.connections_refused.with_label_values(&[limit]).inc();
    }

    /// A request the HTTP parser refused, by a kind from a fixed set.
    pub fn malformed(&self, kind: &str) {
        self.malformed.with_label_values(&[kind]).inc();
    }

    /// A client timed out in a phase ([`TIMEOUT_PHASES`]).
    pub fn client_timeout(&self, phase: &str) {
        self.client_timeouts.with_label_values(&[phase]).inc();
    }

    /// The in-flight gauge.
    pub fn in_flight(&self) -> &IntGauge {
        &self.in_flight
    }

    /// A token store operation.
    pub fn store_op(&self, op: &str, elapsed: Duration, ok: bool) {
        self.store_duration
            .with_label_values(&[op])
            .observe(elapsed.as_secs_f64());
        if !ok {
            self.store_errors.with_label_values(&[op]).inc();
        }
    }
}

/// Removes every series of `vec` whose `label` is `value`.
fn drop_series<T: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<T>,
    label: &str,
    value: &str,
) {
    use prometheus::core::Collector;
    for family in vec.collect() {
        for m in family.get_metric() {
            let pairs = m.get_label();
            if !pairs
                .iter()
                .any(|p| p.name() == label && p.value() == value)
            {
                continue;
            }
            let labels: std::collections::HashMap<&str, &str> =
                pairs.iter().map(|p| (p.name(), p.value())).collect();
            let _ = vec.remove(&labels);
        }
    }
}

/// A fixed label for a method.
pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// `2xx`, `4xx`…
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}
