//! Per-client lanes of an organization, served in start-time fair queueing order; the expected
//! wait of a new request; the dispatch of waiting requests as tokens come.

use super::*;

pub(super) struct Waiter {
    pub(super) id: u64,
    pub(super) tag: f64,
    pub(super) tx: oneshot::Sender<()>,
}

/// One client's requests for one organization.
pub(super) struct Lane {
    pub(super) weight: f64,
    /// The tag after this lane's last request: where its next one starts at the earliest.
    pub(super) finish: f64,
    pub(super) queue: VecDeque<Waiter>,
    /// Decayed count of accepted arrivals (rate × [`RATE_TAU_SECS`]), and when it was updated.
    pub(super) recent: f64,
    pub(super) recent_at: Instant,
    pub(super) granted: Window,
    pub(super) throttled: Window,
    /// Demand for the fleet's division (`super::fleet`): this cycle's requests asked for and
    /// sent, the three cycles before, and whether one waited or was refused this cycle.
    pub(super) cycle: Cycle,
}

/// Requests asked for and sent in the current exchange cycle and the three before it.
#[derive(Debug, Clone, Default)]
pub(super) struct Cycle {
    pub(super) asked: u32,
    pub(super) got: u32,
    pub(super) past: [(u32, u32); 3],
    pub(super) hungry: bool,
}

impl Cycle {
    /// A request asked for. Saturating: without a fleet nobody rolls the cycle.
    pub(super) fn ask(&mut self) {
        self.asked = self.asked.saturating_add(1);
    }

    /// `n` requests sent.
    pub(super) fn sent(&mut self, n: usize) {
        self.got = self
            .got
            .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// The last four cycles' totals (asked, got) and hunger; starts a new cycle.
    pub(super) fn roll(&mut self) -> (u32, u32, bool) {
        let sum = |first: u32, f: fn(&(u32, u32)) -> u32| {
            self.past.iter().map(f).fold(first, u32::saturating_add)
        };
        let asked = sum(self.asked, |p| p.0);
        let got = sum(self.got, |p| p.1);
        let hungry = self.hungry;
        self.past = [(self.asked, self.got), self.past[0], self.past[1]];
        self.asked = 0;
        self.got = 0;
        self.hungry = false;
        (asked, got, hungry)
    }

    pub(super) fn idle(&self) -> bool {
        self.asked == 0 && self.got == 0 && !self.hungry && self.past.iter().all(|p| *p == (0, 0))
    }
}

impl Lane {
    pub(super) fn new(weight: f64, now: Instant) -> Lane {
        Lane {
            weight,
            finish: 0.0,
            queue: VecDeque::new(),
            recent: 0.0,
            recent_at: now,
            granted: Window::default(),
            throttled: Window::default(),
            cycle: Cycle::default(),
        }
    }

    pub(super) fn arrival_rate(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.recent_at).as_secs_f64();
        self.recent * (-dt / RATE_TAU_SECS).exp() / RATE_TAU_SECS
    }

    pub(super) fn arrived(&mut self, now: Instant) {
        self.recent = self.arrival_rate(now) * RATE_TAU_SECS + 1.0;
        self.recent_at = now;
    }
}

/// One organization's bucket and queues.
pub(super) struct Org {
    pub(super) bucket: Bucket,
    /// This instance's part of the organization's budget (1.0 alone; see `super::fleet`).
    pub(super) share: f64,
    /// AIMD's factor on the configured rate, in [`MIN_FACTOR`, 1].
    pub(super) factor: f64,
    pub(super) last_decrease: Option<Instant>,
    /// The tag of the request served last.
    pub(super) vtime: f64,
    pub(super) lanes: crate::FastMap<Arc<str>, Lane>,
    pub(super) queued: usize,
    pub(super) granted: Window,
    pub(super) granted_total: u64,
    pub(super) throttled_total: u64,
    pub(super) upstream_429_total: u64,
}

pub(super) struct Inner {
    pub(super) limits: RateLimits,
    /// The share of organizations the fleet's division does not name, and of new ones.
    pub(super) share: f64,
    /// The fleet's division per organization (empty alone).
    pub(super) shares: crate::FastMap<Arc<str>, f64>,
    pub(super) source_share: f64,
    /// Demand on the source budget, per exchange cycle.
    pub(super) source_cycle: Cycle,
    /// When the last four cycles began (oldest first): the demand's time window.
    pub(super) rolled: VecDeque<Instant>,
    /// The fleet's last division as the status page shows it: per organization, requests/s
    /// asked here and by the fleet, and the fleet's size.
    pub(super) fleet_demand: HashMap<String, (f64, f64)>,
    pub(super) instances: usize,
    pub(super) source: Bucket,
    pub(super) orgs: crate::FastMap<Arc<str>, Org>,
    pub(super) queued: usize,
    pub(super) next_id: u64,
    /// The running dispatcher's id, if one runs.
    pub(super) dispatcher: Option<u64>,
    /// The organization that got the source budget's last token: the next round starts after
    /// it, so the source budget goes round robin over waiting organizations.
    pub(super) last_served: Option<Arc<str>>,
    /// Some organization with a token of its own waits for the source budget: arrivals then
    /// queue and the round robin serves them, instead of taking the source's next token.
    pub(super) source_blocked: bool,
}

impl Inner {
    pub(super) fn org_depth(&self, share: f64) -> f64 {
        (self.limits.organization_burst * share - HEADROOM).max(1.0)
    }

    pub(super) fn org_rate(&self, share: f64, factor: f64) -> f64 {
        self.limits.organization_rps * share * factor
    }

    /// The share of `org` by the fleet's division.
    pub(super) fn share_of(&self, org: &str) -> f64 {
        self.shares.get(org).copied().unwrap_or(self.share)
    }

    pub(super) fn source_params(&self) -> (f64, f64) {
        let rate = self.limits.source_rps * self.source_share;
        ((rate * SOURCE_DEPTH_SECS).max(1.0), rate)
    }

    pub(super) fn org_mut(&mut self, org: &str, now: Instant) -> &mut Org {
        if !self.orgs.contains_key(org) {
            let share = self.share_of(org);
            let bucket = Bucket::full(self.org_depth(share), self.org_rate(share, 1.0), now);
            self.orgs.insert(
                Arc::from(org),
                Org {
                    bucket,
                    share,
                    factor: 1.0,
                    last_decrease: None,
                    vtime: 0.0,
                    lanes: crate::FastMap::default(),
                    queued: 0,
                    granted: Window::default(),
                    granted_total: 0,
                    throttled_total: 0,
                    upstream_429_total: 0,
                },
            );
        }
        self.orgs.get_mut(org).expect("inserted above")
    }

    /// Grants what the buckets allow, one request per organization per round, round robin
    /// from the organization after the one served last, so none is favoured for the source
    /// budget.
    pub(super) fn dispatch_all(&mut self, now: Instant, slot: u64) {
        self.source_blocked = false;
        if self.queued == 0 {
            return;
        }
        let mut backlogged: Vec<Arc<str>> = self
            .orgs
            .iter()
            .filter(|(_, o)| o.queued > 0)
            .map(|(k, _)| k.clone())
            .collect();
        backlogged.sort_unstable();
        if let Some(last) = &self.last_served {
            let start = backlogged.partition_point(|k| k <= last) % backlogged.len().max(1);
            backlogged.rotate_left(start);
        }
        self.source.refill(now);
        loop {
            let mut progress = false;
            for key in &backlogged {
                if let Some(org) = self.orgs.get_mut(key) {
                    let n = dispatch(org, &mut self.source, now, slot, 1);
                    self.queued -= n;
                    self.source_cycle.sent(n);
                    if n > 0 {
                        progress = true;
                        self.last_served = Some(key.clone());
                    }
                }
            }
            if !progress {
                break;
            }
        }
        self.source_blocked = !self.source.has(1.0)
            && backlogged
                .iter()
                .filter_map(|k| self.orgs.get(k))
                .any(|o| o.queued > 0 && o.bucket.has(1.0));
    }

    /// The queue lengths of the organizations other than `org` that have requests waiting.
    pub(super) fn others(&self, org: &str) -> Vec<usize> {
        if self.queued == 0 {
            return Vec::new();
        }
        self.orgs
            .iter()
            .filter(|(k, o)| o.queued > 0 && &***k != org)
            .map(|(_, o)| o.queued)
            .collect()
    }

    /// When the dispatcher should look again: the earliest time a backlogged organization can
    /// send.
    pub(super) fn next_wake(&self, now: Instant) -> Option<Instant> {
        self.orgs
            .values()
            .filter(|o| o.queued > 0)
            .map(|o| now + o.bucket.until(1.0).max(self.source.until(1.0)))
            .min()
    }
}

/// Grants up to `max` of `org`'s queued requests, smallest tag first, while both buckets hold a
/// token. Returns how many left the queue.
pub(super) fn dispatch(
    org: &mut Org,
    source: &mut Bucket,
    now: Instant,
    slot: u64,
    max: usize,
) -> usize {
    org.bucket.refill(now);
    source.refill(now);
    let mut n = 0;
    while n < max && org.queued > 0 && org.bucket.has(1.0) && source.has(1.0) {
        let Some((_, lane)) = org
            .lanes
            .iter_mut()
            .filter(|(_, l)| !l.queue.is_empty())
            .min_by(|(_, a), (_, b)| {
                a.queue[0]
                    .tag
                    .total_cmp(&b.queue[0].tag)
                    .then(a.queue[0].id.cmp(&b.queue[0].id))
            })
        else {
            break;
        };
        let Some(w) = lane.queue.pop_front() else {
            break;
        };
        org.queued -= 1;
        n += 1;
        // A waiter whose receiver is gone left its queue in its own Drop, under this lock, so
        // a failed send is only a formality.
        if w.tx.send(()).is_ok() {
            org.bucket.tokens -= 1.0;
            source.tokens -= 1.0;
            org.vtime = org.vtime.max(w.tag);
            lane.cycle.sent(1);
            lane.granted.add(slot);
            org.granted.add(slot);
            org.granted_total += 1;
        }
    }
    n
}

/// How long a request of `me` tagged `start` is expected to wait: its own lane's queue and the
/// other lanes' queued requests with smaller tags go first, and so do the requests other
/// clients are expected to send meanwhile (at their recent rate, up to what their weight lets
/// them put before `start`). `others`: the queue lengths of the other organizations, which
/// share the source budget.
pub(super) fn expected_wait(
    org: &Org,
    source: &Bucket,
    others: &[usize],
    me: &str,
    start: f64,
    now: Instant,
) -> Duration {
    let mut ahead = 0.0;
    let mut open: Vec<(f64, f64)> = Vec::new();
    for (name, lane) in &org.lanes {
        if &**name == me {
            ahead += lane.queue.len() as f64;
            continue;
        }
        ahead += lane.queue.iter().take_while(|w| w.tag < start).count() as f64;
        let cap = (start - lane.finish.max(org.vtime)) * lane.weight;
        let rate = lane.arrival_rate(now);
        if cap > 0.0 && rate > 0.0 {
            open.push((rate, cap));
        }
    }
    let rate = org.bucket.rate;
    // Solve wait × rate = need + Σ min(cap, lane rate × wait): piecewise linear, so move the
    // lanes whose cap binds to the constant side until none does.
    let mut fixed = (ahead + 1.0 - org.bucket.tokens).max(0.0);
    let mut wait;
    loop {
        let free: f64 = open.iter().map(|(r, _)| r).sum();
        wait = if rate > free {
            fixed / (rate - free)
        } else {
            f64::INFINITY
        };
        let before = open.len();
        open.retain(|(r, cap)| {
            if r * wait > *cap {
                fixed += cap;
                false
            } else {
                true
            }
        });
        if open.len() == before {
            break;
        }
    }
    // The source budget goes round robin: before this request's turn, each other waiting
    // organization sends as many as are ahead of it here, or all it has queued.
    let mine = ahead + 1.0;
    let source_need = mine + others.iter().map(|&q| (q as f64).min(mine)).sum::<f64>();
    secs(wait.max((source_need - source.tokens).max(0.0) / source.rate))
}
