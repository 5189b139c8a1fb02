//! Shaping: the proxy's upstream traffic kept within Meraki's rate limits, and the budget of a
//! contended organization shared fairly among the clients waiting on it.
//!
//! Meraki allows each organization about 10 requests/s (a token bucket about 10 deep) and each
//! source IP 100 requests/s, and answers 429 beyond. Behind the proxy every script shares one
//! source IP and each organization's budget; only the proxy sees them all, so it waits for the
//! budget on their behalf:
//!
//! - **Buckets.** One token bucket per organization and one for the source IP, modelled on
//!   Meraki's. A request goes upstream when both hold a token. The proxy keeps one token of an
//!   organization's burst in reserve ([`HEADROOM`]) so that requests bunched up on the way (one
//!   delayed, the next not) still find one at Meraki.
//! - **Fairness.** While an organization's bucket is empty its requests wait in one queue per
//!   client and are served in start-time fair queueing order: each organization has a virtual
//!   clock (the tag of the request served last), and a client's request is tagged with
//!   `max(virtual clock, the client's previous tag + 1/weight)`; the smallest tag goes next.
//!   Contended budget is thereby shared in proportion to the clients' weights, an idle client's
//!   share goes to the others, and a client coming back is served within one round, however
//!   many requests another client has queued.
//! - **Refusing honestly.** A request whose expected wait (its place among the tags, the
//!   bucket's rate, and the requests other clients are expected to send meanwhile) is over
//!   `max_wait`, or whose client already has `queue_per_client` requests waiting for that
//!   organization, is refused at once with [`Throttled`]: a 429 whose `Retry-After` is that
//!   expected wait. A queued request still waiting after twice `max_wait` (the budget shrank under
//!   it) is refused then.
//! - **Meraki's own 429s** (other applications spend the same budget) slow the organization's
//!   bucket: its rate ×0.7 (at most once a second, down to 5 % of the configured rate) and its
//!   tokens spent; each other answer adds 2 % of the configured rate back. That is the official
//!   SDK's smart flow (×0.7 per 429, +0.2 requests/s per success at 10 requests/s).
//!
//! Waiting holds no lock and is cancel-safe. A waiter owns the receiving end of a oneshot
//! channel; whoever can grant pops it under the lock and sends: the request that arrives, or a
//! dispatcher task that runs while anything is queued and sleeps until the next token. A waiter
//! dropped while queued (its client went away) leaves its queue; one dropped after being
//! granted gives its token back.
//!
//! **Several instances.** Meraki's budget is the organization's whichever instance spends it.
//! A shared bucket would cost a round trip to the store per request (SPEC.md rules it out), so
//! each instance has a *share* of every budget, per organization ([`Shaper::set_shares`]; 1.0
//! alone), set every 250 ms by the fleet's division by demand (`fleet`, driven by the
//! `fleet-shares` service in `crate::server`): the request path only counts, per client lane,
//! what was asked and sent in the current cycle ([`Shaper::demand`] reads and rolls them).
//!
//! Token-endpoint calls go to the authorization server (`as.meraki.com`), which is not under the
//! API's per-organization or per-IP budget; they are not shaped (they are single-flight per grant
//! anyway) and are counted by `meraki_proxy_token_calls_total`. The proxy's own API calls (the
//! network and device lookups, the organization list) wait like requests, in the lane of the
//! client they are made for; retries after a 401 and redirects followed are charged to the
//! organization without waiting.
//!
//! A file per part: `bucket` (the token bucket), `fair_queue` (per-client lanes, start-time fair
//! queueing, the expected wait and the dispatch of waiting requests), `fleet` (the fleet's
//! division of the budgets by demand: pure), `waiter` ([`Waiting`], a
//! queued request and its cancellation), `snapshots` (counting windows and what the status page
//! and the metrics read: [`OrgSnapshot`], [`ClientSnapshot`]). The [`Shaper`] itself, its
//! tickets and refusals, and the dispatcher task are here.

mod bucket;
mod fair_queue;
pub mod fleet;
mod snapshots;
mod waiter;

pub use fleet::{Demand, Shares};
pub use snapshots::{ClientSnapshot, LaneSnapshot, OrgSnapshot};
pub use waiter::Waiting;

use bucket::{secs, Bucket};
use fair_queue::{dispatch, expected_wait, Inner, Lane, Org, Waiter};
use snapshots::{Activity, Window};

use crate::config::RateLimits;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

/// Tokens of an organization's burst the proxy leaves unspent, for jitter on the way to Meraki.
pub const HEADROOM: f64 = 1.0;
/// Multiplicative decrease on an upstream 429 (the official SDK's).
const DECREASE: f64 = 0.7;
/// Additive increase per other upstream answer, as a fraction of the configured rate.
const INCREASE: f64 = 0.02;
/// The slowest an organization's bucket gets, as a fraction of the configured rate.
const MIN_FACTOR: f64 = 0.05;
/// At most one decrease per this long: a burst of 429s for requests already in flight is one
/// signal, not many.
const DECREASE_EVERY: Duration = Duration::from_secs(1);
/// The source bucket holds this many seconds of its rate.
const SOURCE_DEPTH_SECS: f64 = 0.1;
/// Time constant of a client's arrival rate estimate.
const RATE_TAU_SECS: f64 = 2.0;
/// Floating-point slack when comparing token counts.
const EPS: f64 = 1e-9;
/// Statistics windows: slots of this many seconds…
const SLOT_SECS: u64 = 10;
/// …this many of them (five minutes).
const SLOTS: usize = 30;

/// Shapes upstream requests to Meraki's rate limits; cheap to clone (one shared state).
#[derive(Clone)]
pub struct Shaper {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the dispatcher early (limits changed, a token given back).
    kick: Notify,
    /// Organizations slowed by upstream 429s: while none is, successes need no lock.
    slowed: AtomicUsize,
    activity: Mutex<crate::FastMap<Arc<str>, Activity>>,
    epoch: Instant,
}

/// A request's turn: it may go upstream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// How long it waited for its turn.
    pub waited: Duration,
}

/// Why a request was refused rather than queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Its expected wait was over `max_wait`.
    WaitTooLong,
    /// Its client already had `queue_per_client` requests waiting for the organization.
    QueueFull,
    /// It waited twice `max_wait` without its turn coming (the budget shrank meanwhile).
    TimedOut,
}

/// A request refused for want of rate budget: answered 429 with `Retry-After`, never sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct Throttled {
    pub org: Arc<str>,
    pub cause: Cause,
    /// The wait the request was expected to have.
    pub expected_wait: Duration,
    /// `max_wait` or `queue_per_client`, for the message.
    pub limit: u64,
}

impl Throttled {
    fn describe(&self) -> String {
        let why = match self.cause {
            Cause::WaitTooLong => format!(
                "its expected wait, {:.1} s, is over this proxy's limit of {} ms",
                self.expected_wait.as_secs_f64(),
                self.limit
            ),
            Cause::QueueFull => format!(
                "this client already has {} requests waiting for it",
                self.limit
            ),
            Cause::TimedOut => format!("it waited {} ms without its turn coming", self.limit * 2),
        };
        format!(
            "API rate limit exceeded for organization {} at the proxy, which shares Meraki's rate limit among its clients: {why}; retry after the time in Retry-After",
            self.org
        )
    }

    /// Whole seconds to wait before retrying: the expected wait rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.expected_wait.as_millis().div_ceil(1000).max(1) as u64
    }
}

/// What [`Shaper::request`] decided.
pub enum Ticket {
    /// Go now.
    Go(Turn),
    /// Wait for the turn: [`Waiting::wait`].
    Wait(Waiting),
    /// Refused.
    Refused(Throttled),
}

/// What a finished request was, for the status page's per-client activity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded or answered.
    Served,
    /// Refused for another reason than rate (403, 404, …).
    Denied,
    /// Refused by the shaper (a local 429).
    Throttled,
}

impl Shaper {
    /// A shaper with these limits and the whole budget (one instance).
    pub fn new(limits: RateLimits) -> Shaper {
        let now = Instant::now();
        let mut inner = Inner {
            limits,
            share: 1.0,
            shares: crate::FastMap::default(),
            source_share: 1.0,
            source_cycle: fair_queue::Cycle::default(),
            rolled: VecDeque::from([now; 4]),
            fleet_demand: HashMap::new(),
            instances: 1,
            source: Bucket::full(1.0, 1.0, now),
            orgs: crate::FastMap::default(),
            queued: 0,
            next_id: 0,
            dispatcher: None,
            last_served: None,
            source_blocked: false,
        };
        let (depth, rate) = inner.source_params();
        inner.source = Bucket::full(depth, rate, now);
        Shaper {
            shared: Arc::new(Shared {
                inner: Mutex::new(inner),
                kick: Notify::new(),
                slowed: AtomicUsize::new(0),
                activity: Mutex::new(crate::FastMap::default()),
                epoch: now,
            }),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> RateLimits {
        self.shared.lock().limits
    }

    /// Applies new limits (a configuration reload): buckets keep their level, bounded by their
    /// new depth. Turning shaping off lets every waiting request go.
    pub fn set_limits(&self, limits: RateLimits) {
        let mut g = self.shared.lock();
        g.limits = limits;
        self.rescale(&mut g);
    }

    /// The parts of every budget this instance may use, by the fleet's division
    /// ([`fleet::allocate`]); alone, 1.0 of each (the default).
    pub fn set_shares(&self, shares: &Shares) {
        let clamp = |s: f64| {
            if s.is_finite() {
                s.clamp(0.001, 1.0)
            } else {
                1.0
            }
        };
        let mut g = self.shared.lock();
        g.share = clamp(shares.default);
        g.source_share = clamp(shares.source);
        g.shares = shares
            .orgs
            .iter()
            .map(|(k, v)| (Arc::from(k.as_str()), clamp(*v)))
            .collect();
        g.fleet_demand.clone_from(&shares.demand);
        g.instances = shares.instances;
        self.rescale(&mut g);
    }

    /// This instance's part of the source budget.
    pub fn source_share(&self) -> f64 {
        self.shared.lock().source_share
    }

    /// What this instance's clients asked for in the last second, for the fleet's division;
    /// starts a new exchange cycle. Called every [`fleet::CYCLE`] by the fleet service only.
    pub fn demand(&self) -> Demand {
        let mut g = self.shared.lock();
        let now = Instant::now();
        let secs = now
            .saturating_duration_since(g.rolled[0])
            .as_secs_f64()
            .clamp(fleet::CYCLE.as_secs_f64(), 4.0 * fleet::CYCLE.as_secs_f64());
        g.rolled.pop_front();
        g.rolled.push_back(now);
        let mut out = Demand::default();
        let (asked, got, hungry) = g.source_cycle.roll();
        out.source_asked = f64::from(asked) / secs;
        out.source_rps = f64::from(got) / secs;
        out.source_hungry = hungry;
        for (org, o) in g.orgs.iter_mut() {
            let mut clients = Vec::new();
            for (client, lane) in o.lanes.iter_mut() {
                if lane.cycle.idle() {
                    continue;
                }
                let (asked, got, hungry) = lane.cycle.roll();
                clients.push(fleet::ClientDemand {
                    client: client.to_string(),
                    rps: f64::from(got) / secs,
                    asked: f64::from(asked) / secs,
                    weight: lane.weight,
                    hungry,
                });
            }
            if !clients.is_empty() {
                out.orgs.insert(org.to_string(), clients);
            }
        }
        out
    }

    fn rescale(&self, g: &mut Inner) {
        let now = Instant::now();
        let (depth, rate) = g.source_params();
        g.source.set(depth, rate, now);
        let params: Vec<(Arc<str>, f64, f64, f64)> = g
            .orgs
            .iter()
            .map(|(k, o)| {
                let share = g.share_of(k);
                (
                    k.clone(),
                    share,
                    g.org_depth(share),
                    g.org_rate(share, o.factor),
                )
            })
            .collect();
        for (k, share, depth, rate) in params {
            if let Some(o) = g.orgs.get_mut(&k) {
                o.share = share;
                o.bucket.set(depth, rate, now);
            }
        }
        if !g.limits.enabled {
            for o in g.orgs.values_mut() {
                for lane in o.lanes.values_mut() {
                    for w in lane.queue.drain(..) {
                        let _ = w.tx.send(());
                    }
                }
                o.queued = 0;
            }
            g.queued = 0;
        }
        self.shared.kick.notify_one();
    }

    /// Asks for `client`'s turn to send a request to `org`: go now, wait, or refused.
    pub fn request(&self, org: &str, client: &str, weight: u32) -> Ticket {
        let mut g = self.shared.lock();
        if !g.limits.enabled {
            return Ticket::Go(Turn {
                waited: Duration::ZERO,
            });
        }
        let now = Instant::now();
        let slot = self.shared.slot(now);
        let limits = g.limits;
        let weight = f64::from(weight.max(1));
        let inner = &mut *g;
        inner.source.refill(now);
        inner.source_cycle.ask();
        let source_free = inner.source.has(1.0) && !inner.source_blocked;
        // The common case: nobody waits for this organization and its bucket has a token.
        let start = {
            let o = inner.org_mut(org, now);
            o.bucket.refill(now);
            let vtime = o.vtime;
            let go = o.queued == 0 && o.bucket.has(1.0) && source_free;
            if !o.lanes.contains_key(client) {
                o.lanes.insert(Arc::from(client), Lane::new(weight, now));
            }
            let lane = o.lanes.get_mut(client).expect("inserted above");
            lane.weight = weight;
            lane.cycle.ask();
            let start = lane.finish.max(vtime);
            if go {
                lane.finish = start + 1.0 / weight;
                lane.arrived(now);
                lane.cycle.sent(1);
                lane.granted.add(slot);
                o.bucket.tokens -= 1.0;
                o.vtime = start;
                o.granted.add(slot);
                o.granted_total += 1;
                inner.source.tokens -= 1.0;
                inner.source_cycle.sent(1);
                return Ticket::Go(Turn {
                    waited: Duration::ZERO,
                });
            }
            start
        };
        if !source_free {
            inner.source_cycle.hungry = true;
        }
        let others = inner.others(org);
        let source_blocked = inner.source_blocked;
        let Inner {
            orgs,
            source,
            queued,
            next_id,
            source_cycle,
            ..
        } = inner;
        let org_key = orgs.get_key_value(org).map(|(k, _)| k.clone());
        let (Some(org_key), Some(o)) = (org_key, orgs.get_mut(org)) else {
            return Ticket::Go(Turn {
                waited: Duration::ZERO,
            });
        };
        let lane_len = o.lanes.get(client).map_or(0, |l| l.queue.len());
        let expected = expected_wait(o, source, &others, client, start, now);
        let refused = if lane_len >= limits.queue_per_client {
            Some((Cause::QueueFull, limits.queue_per_client as u64))
        } else if expected > limits.max_wait {
            Some((Cause::WaitTooLong, limits.max_wait.as_millis() as u64))
        } else {
            None
        };
        if let Some((cause, limit)) = refused {
            o.throttled_total += 1;
            if let Some(lane) = o.lanes.get_mut(client) {
                lane.throttled.add(slot);
                lane.cycle.hungry = true;
            }
            return Ticket::Refused(Throttled {
                org: org_key,
                cause,
                expected_wait: expected,
                limit,
            });
        }
        let (tx, rx) = oneshot::channel();
        let id = *next_id;
        *next_id += 1;
        let client_key = o.lanes.get_key_value(client).map(|(k, _)| k.clone());
        let (Some(client_key), Some(lane)) = (client_key, o.lanes.get_mut(client)) else {
            return Ticket::Go(Turn {
                waited: Duration::ZERO,
            });
        };
        lane.queue.push_back(Waiter { id, tag: start, tx });
        lane.cycle.hungry = true;
        lane.finish = start + 1.0 / weight;
        lane.arrived(now);
        o.queued += 1;
        *queued += 1;
        if source_blocked {
            // Organizations wait for the source budget: the round robin decides.
            g.dispatch_all(now, slot);
        } else {
            // Tokens may have come while nobody looked: serve what can go (perhaps this one).
            let n = dispatch(o, source, now, slot, usize::MAX);
            *queued -= n;
            source_cycle.sent(n);
        }
        self.ensure_dispatcher(&mut g);
        drop(g);
        Ticket::Wait(Waiting {
            shared: self.shared.clone(),
            org: org_key,
            client: client_key,
            id,
            rx,
            since: now,
            deadline: now + limits.max_wait * 2,
            done: false,
        })
    }

    /// Waits for `client`'s turn to send a request to `org` (the proxy's own lookups).
    pub async fn acquire(&self, org: &str, client: &str, weight: u32) -> Result<Turn, Throttled> {
        match self.request(org, client, weight) {
            Ticket::Go(t) => Ok(t),
            Ticket::Wait(w) => w.wait().await,
            Ticket::Refused(t) => Err(t),
        }
    }

    /// Counts a request sent without waiting (a retry after a 401, a redirect followed): the
    /// bucket may go below zero, which later requests wait out.
    pub fn charge(&self, org: &str) {
        let mut g = self.shared.lock();
        if !g.limits.enabled {
            return;
        }
        let now = Instant::now();
        let slot = self.shared.slot(now);
        g.source.refill(now);
        g.source.tokens -= 1.0;
        let o = g.org_mut(org, now);
        o.bucket.refill(now);
        o.bucket.tokens -= 1.0;
        o.granted.add(slot);
        o.granted_total += 1;
    }

    /// What Meraki answered a request for `org`: a 429 slows the organization's bucket, other
    /// answers speed a slowed one back up.
    pub fn upstream_answered(&self, org: &str, status: u16) {
        if status != 429 && self.shared.slowed.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut g = self.shared.lock();
        let now = Instant::now();
        let configured = g.org_rate(g.share_of(org), 1.0);
        let o = g.org_mut(org, now);
        let was_slowed = o.factor < 1.0;
        if status == 429 {
            o.upstream_429_total += 1;
            o.bucket.refill(now);
            o.bucket.tokens = o.bucket.tokens.min(0.0);
            if o.last_decrease.is_none_or(|t| now - t >= DECREASE_EVERY) {
                o.factor = (o.factor * DECREASE).max(MIN_FACTOR);
                o.last_decrease = Some(now);
                tracing::info!(organization = %org, rps = configured * o.factor, "Meraki answered 429: slowing the organization's requests");
            }
        } else if was_slowed {
            o.factor = (o.factor + INCREASE).min(1.0);
        } else {
            return;
        }
        let rate = configured * o.factor;
        let depth = o.bucket.depth;
        o.bucket.set(depth, rate, now);
        let slowed_now = o.factor < 1.0;
        if slowed_now != was_slowed {
            if slowed_now {
                self.shared.slowed.fetch_add(1, Ordering::Relaxed);
            } else {
                self.shared.slowed.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Starts the dispatcher if none runs and something waits.
    fn ensure_dispatcher(&self, g: &mut Inner) {
        if g.dispatcher.is_some() || g.queued == 0 {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            // No runtime: arrivals still dispatch, and waits end at their deadline.
            return;
        };
        let id = g.next_id;
        g.next_id += 1;
        g.dispatcher = Some(id);
        handle.spawn(dispatcher(self.shared.clone(), id));
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding it, and the state stays consistent if something did.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slot(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs() / SLOT_SECS
    }
}

/// Runs while anything is queued: grants what the buckets allow, then sleeps until the next
/// token (or a kick).
async fn dispatcher(shared: Arc<Shared>, id: u64) {
    /// Clears the running mark however the task ends (a runtime shutting down drops it).
    struct Running(Arc<Shared>, u64);
    impl Drop for Running {
        fn drop(&mut self) {
            let mut g = self.0.lock();
            if g.dispatcher == Some(self.1) {
                g.dispatcher = None;
            }
        }
    }
    let _running = Running(shared.clone(), id);
    loop {
        let next = {
            let mut g = shared.lock();
            let now = Instant::now();
            g.dispatch_all(now, shared.slot(now));
            match g.next_wake(now) {
                Some(t) => t,
                None => {
                    g.dispatcher = None;
                    return;
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shared.kick.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests;
