//! Counting windows, and the state the status page and the metrics read.

use super::*;

/// Counts per time slot over the last [`SLOTS`] slots.
#[derive(Debug, Clone, Default)]
pub(super) struct Window {
    pub(super) slots: [u32; SLOTS],
    pub(super) head: u64,
}

impl Window {
    pub(super) fn add(&mut self, slot: u64) {
        if slot > self.head {
            if slot - self.head >= SLOTS as u64 {
                self.slots = [0; SLOTS];
            } else {
                for s in self.head + 1..=slot {
                    self.slots[(s % SLOTS as u64) as usize] = 0;
                }
            }
            self.head = slot;
        }
        let i = (slot % SLOTS as u64) as usize;
        self.slots[i] = self.slots[i].saturating_add(1);
    }

    /// The count over the last `n` slots up to `slot`.
    pub(super) fn sum(&self, slot: u64, n: usize) -> u64 {
        let from = slot.saturating_sub(n as u64 - 1);
        (from..=slot)
            .filter(|s| *s <= self.head && self.head - s < SLOTS as u64)
            .map(|s| u64::from(self.slots[(s % SLOTS as u64) as usize]))
            .sum()
    }
}

/// One organization's state, for the status page and metrics.
#[derive(Debug, Clone)]
pub struct OrgSnapshot {
    pub org: Arc<str>,
    /// The configured rate (× share), requests/s.
    pub configured_rps: f64,
    /// This instance's part of the organization's budget (1.0 alone).
    pub share: f64,
    /// Requests/s asked for here and by the whole fleet, at the last exchange (0 alone).
    pub asked_here: f64,
    pub asked_fleet: f64,
    /// Live instances at the last exchange.
    pub instances: usize,
    /// The rate now, after slowing for upstream 429s.
    pub rps: f64,
    pub depth: f64,
    /// The bucket's level (negative: charged beyond it).
    pub tokens: f64,
    pub queued: usize,
    /// Requests sent in the last minute and the last five.
    pub sent_1m: u64,
    pub sent_5m: u64,
    pub sent_total: u64,
    pub throttled_total: u64,
    pub upstream_429_total: u64,
    pub clients: Vec<LaneSnapshot>,
}

/// One client's lane in an organization.
#[derive(Debug, Clone)]
pub struct LaneSnapshot {
    pub client: Arc<str>,
    pub weight: f64,
    pub queued: usize,
    pub sent_1m: u64,
    pub sent_5m: u64,
    pub throttled_5m: u64,
}

/// A client's recent requests, for the status page.
#[derive(Debug, Clone)]
pub struct ClientSnapshot {
    pub client: Arc<str>,
    pub requests_5m: u64,
    pub denied_5m: u64,
    pub throttled_5m: u64,
}

#[derive(Default)]
pub(super) struct Activity {
    pub(super) requests: Window,
    pub(super) denied: Window,
    pub(super) throttled: Window,
}

impl Shaper {
    /// Records how a client's request ended `at`, for the status page.
    pub fn record(&self, client: &str, outcome: Outcome, at: Instant) {
        let slot = self.shared.slot(at);
        let mut a = self
            .shared
            .activity
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = match a.get_mut(client) {
            Some(e) => e,
            None => a.entry(Arc::from(client)).or_default(),
        };
        entry.requests.add(slot);
        match outcome {
            Outcome::Served => {}
            Outcome::Denied => entry.denied.add(slot),
            Outcome::Throttled => entry.throttled.add(slot),
        }
    }

    /// Every organization's bucket, queue and lanes, sorted.
    pub fn organizations(&self) -> Vec<OrgSnapshot> {
        let mut g = self.shared.lock();
        let now = Instant::now();
        let slot = self.shared.slot(now);
        let per_min = (60 / SLOT_SECS) as usize;
        let g = &mut *g;
        let (limits, instances, fleet_demand) = (g.limits, g.instances, &g.fleet_demand);
        let mut out: Vec<OrgSnapshot> = g
            .orgs
            .iter_mut()
            .map(|(k, o)| {
                o.bucket.refill(now);
                let mut clients: Vec<LaneSnapshot> = o
                    .lanes
                    .iter()
                    .map(|(c, l)| LaneSnapshot {
                        client: c.clone(),
                        weight: l.weight,
                        queued: l.queue.len(),
                        sent_1m: l.granted.sum(slot, per_min),
                        sent_5m: l.granted.sum(slot, SLOTS),
                        throttled_5m: l.throttled.sum(slot, SLOTS),
                    })
                    .collect();
                clients.sort_by(|a, b| a.client.cmp(&b.client));
                let (asked_here, asked_fleet) = fleet_demand.get(&**k).copied().unwrap_or_default();
                OrgSnapshot {
                    org: k.clone(),
                    configured_rps: limits.organization_rps * o.share,
                    share: o.share,
                    asked_here,
                    asked_fleet,
                    instances,
                    rps: o.bucket.rate,
                    depth: o.bucket.depth,
                    tokens: o.bucket.tokens,
                    queued: o.queued,
                    sent_1m: o.granted.sum(slot, per_min),
                    sent_5m: o.granted.sum(slot, SLOTS),
                    sent_total: o.granted_total,
                    throttled_total: o.throttled_total,
                    upstream_429_total: o.upstream_429_total,
                    clients,
                }
            })
            .collect();
        out.sort_by(|a, b| a.org.cmp(&b.org));
        out
    }

    /// Every client's recent activity, sorted.
    pub fn clients(&self) -> Vec<ClientSnapshot> {
        let slot = self.shared.slot(Instant::now());
        let a = self
            .shared
            .activity
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<ClientSnapshot> = a
            .iter()
            .map(|(c, e)| ClientSnapshot {
                client: c.clone(),
                requests_5m: e.requests.sum(slot, SLOTS),
                denied_5m: e.denied.sum(slot, SLOTS),
                throttled_5m: e.throttled.sum(slot, SLOTS),
            })
            .collect();
        out.sort_by(|a, b| a.client.cmp(&b.client));
        out
    }
}
