//! The fleet's division of Meraki's budget by demand: pure arithmetic, no I/O.
//!
//! Meraki counts one budget per organization (and one per source address) whichever instance
//! sends. Every instance publishes what its clients asked for in the last second ([`Demand`]);
//! every instance reads all publications and computes, with [`allocate`], the same division the
//! fleet would make if it were one proxy, then keeps its own part ([`Shares`]). Nothing of this
//! runs on the request path: the exchange runs every [`CYCLE`] (`crate::server::fleet`).
//!
//! The division of one organization's rate R among the live instances:
//!
//! - An instance with no request for the organization keeps a **floor** ([`FLOOR`] of R, at most
//!   [`IDLE_FLOORS`] of R for all idle instances together), so its first request goes at once.
//! - The rest is divided by **weighted max-min fairness over clients**, as if the fleet were one
//!   proxy. A client served by several instances counts once (its name is the same everywhere).
//!   A *satisfied* client (it neither waited nor was refused in the last cycle) is given what it
//!   sends plus a margin ([`MARGIN`] and [`MARGIN_RPS`]); a *hungry* one asks for the larger of
//!   what it asked for (refused requests included) and twice what it got, so its part doubles
//!   every cycle until it stops waiting. Water-filling: every unsatisfied client gets budget in
//!   proportion to its weight until it is satisfied or the budget is gone.
//! - Budget nobody asks for is divided evenly among the live instances.
//! - A client's part is split among the instances serving it in proportion to what it asked of
//!   each.
//!
//! The parts add up to R exactly, so instances that read the same publications never ask Meraki
//! for more than its budget. The source budget is divided the same way when the instances share
//! one egress address (`[rate_limits] source_shared`), the instances being its clients.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// How often instances publish their demand and recompute their shares.
pub const CYCLE: Duration = Duration::from_millis(250);
/// An idle instance's floor, as a fraction of the budget.
pub const FLOOR: f64 = 0.02;
/// All idle instances' floors together, at most.
pub const IDLE_FLOORS: f64 = 0.10;
/// A satisfied client's margin beyond what it sends: this fraction…
pub const MARGIN: f64 = 0.05;
/// …plus this many requests/s.
pub const MARGIN_RPS: f64 = 0.05;

/// What one instance publishes: its clients' recent demand per organization, and its own
/// demand on the source budget. The JSON form is the exchange's document; an instance that cannot
/// read another's document counts that instance as asking nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Demand {
    /// Requests/s this instance sent in the last second, all organizations.
    #[serde(default)]
    pub source_rps: f64,
    /// Requests/s it was asked for, refused and waiting ones included.
    #[serde(default)]
    pub source_asked: f64,
    /// Whether requests waited for (or were refused for want of) the source budget.
    #[serde(default)]
    pub source_hungry: bool,
    /// Per organization, per client.
    #[serde(default)]
    pub orgs: BTreeMap<String, Vec<ClientDemand>>,
}

/// One client's demand on one organization at one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientDemand {
    pub client: String,
    /// Requests/s sent upstream in the last second.
    pub rps: f64,
    /// Requests/s asked for (refused ones included).
    pub asked: f64,
    pub weight: f64,
    /// It waited for its turn or was refused in the last cycle.
    pub hungry: bool,
}

/// This instance's part of each budget, as fractions of the configured rates.
#[derive(Debug, Clone, PartialEq)]
pub struct Shares {
    /// Organizations not listed here (nobody in the fleet asks for them).
    pub default: f64,
    pub orgs: HashMap<String, f64>,
    pub source: f64,
    /// Per organization, requests/s asked here and by the whole fleet (for the status page and
    /// the metrics).
    pub demand: HashMap<String, (f64, f64)>,
    /// Live instances, this one included.
    pub instances: usize,
}

impl Shares {
    /// The even split of a fleet of `n`: what an instance takes when it cannot exchange.
    pub fn even(n: usize) -> Shares {
        let s = 1.0 / n.max(1) as f64;
        Shares {
            default: s,
            orgs: HashMap::new(),
            source: s,
            demand: HashMap::new(),
            instances: n.max(1),
        }
    }
}

/// One claimant of a budget: what it wants and its weight.
#[derive(Debug, Clone, Copy)]
struct Claim {
    want: f64,
    weight: f64,
}

/// Weighted max-min fair division of `budget` among `claims`: returns each claim's part (never
/// above its want), and what is left.
fn water_fill(budget: f64, claims: &[Claim]) -> (Vec<f64>, f64) {
    let mut got = vec![0.0; claims.len()];
    let mut open: Vec<usize> = (0..claims.len())
        .filter(|&i| claims[i].want > 0.0)
        .collect();
    let mut left = budget.max(0.0);
    while !open.is_empty() && left > 1e-12 {
        let weights: f64 = open.iter().map(|&i| claims[i].weight.max(1e-9)).sum();
        // The smallest level at which some open claim is satisfied.
        let level = open
            .iter()
            .map(|&i| (claims[i].want - got[i]) / claims[i].weight.max(1e-9))
            .fold(f64::INFINITY, f64::min);
        let step = level.min(left / weights);
        for &i in &open {
            let add = step * claims[i].weight.max(1e-9);
            got[i] += add;
            left -= add;
        }
        open.retain(|&i| claims[i].want - got[i] > 1e-9);
    }
    (got, left.max(0.0))
}

/// What a client wants of a budget, from what it got and asked in the last second.
fn want(rps: f64, asked: f64, hungry: bool) -> f64 {
    if hungry {
        asked.max(2.0 * rps).max(MARGIN_RPS)
    } else {
        rps * (1.0 + MARGIN) + MARGIN_RPS
    }
}

/// One client's claim at one instance: (client, want as a fraction of the budget, weight,
/// requests/s asked there).
type InstanceClaim = (String, f64, f64, f64);

/// Divides the budget (1.0) among `n` instances: `active[i]` holds instance i's claims; returns
/// each instance's part.
fn divide(n: usize, active: &[Vec<InstanceClaim>]) -> Vec<f64> {
    let idle = active.iter().filter(|c| c.is_empty()).count();
    let floor = if idle == 0 {
        0.0
    } else {
        FLOOR.min(IDLE_FLOORS / idle as f64)
    };
    let mut parts: Vec<f64> = active
        .iter()
        .map(|c| if c.is_empty() { floor } else { 0.0 })
        .collect();
    let rest = 1.0 - floor * idle as f64;
    // One claim per client across the fleet; where it asked, per instance.
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut claims: Vec<Claim> = Vec::new();
    let mut asked_at: Vec<Vec<(usize, f64)>> = Vec::new();
    for (i, cs) in active.iter().enumerate() {
        for (client, w, weight, asked) in cs {
            let k = *index.entry(client.as_str()).or_insert_with(|| {
                claims.push(Claim {
                    want: 0.0,
                    weight: 0.0,
                });
                asked_at.push(Vec::new());
                claims.len() - 1
            });
            claims[k].want += w;
            claims[k].weight = claims[k].weight.max(*weight);
            asked_at[k].push((i, *asked));
        }
    }
    let (got, left) = water_fill(rest, &claims);
    for (k, g) in got.iter().enumerate() {
        let total: f64 = asked_at[k].iter().map(|(_, a)| a).sum();
        let m = asked_at[k].len() as f64;
        for &(i, a) in &asked_at[k] {
            parts[i] += if total > 0.0 { g * a / total } else { g / m };
        }
    }
    for p in parts.iter_mut() {
        *p += left / n as f64;
    }
    parts
}

/// This instance's shares, from every live instance's publication (`fleet`: name and document,
/// this instance's own included). `org_rps` and `source_rps`: the configured budgets, to turn
/// requests/s into fractions. `source_shared`: whether the instances share the source budget.
pub fn allocate(
    me: &str,
    fleet: &[(String, Demand)],
    org_rps: f64,
    source_rps: f64,
    source_shared: bool,
) -> Shares {
    let n = fleet.len().max(1);
    let Some(mine) = fleet.iter().position(|(name, _)| name == me) else {
        return Shares::even(n + 1);
    };
    let org_rps = org_rps.max(1e-9);
    let mut orgs: BTreeMap<&str, Vec<Vec<InstanceClaim>>> = BTreeMap::new();
    let mut demand: HashMap<String, (f64, f64)> = HashMap::new();
    for (i, (_, d)) in fleet.iter().enumerate() {
        for (org, clients) in &d.orgs {
            let per = orgs
                .entry(org.as_str())
                .or_insert_with(|| vec![Vec::new(); n]);
            for c in clients {
                if !(c.rps.is_finite() && c.asked.is_finite() && c.weight.is_finite()) {
                    continue;
                }
                let w = want(c.rps.max(0.0), c.asked.max(0.0), c.hungry) / org_rps;
                per[i].push((
                    c.client.clone(),
                    w,
                    c.weight.max(1e-3),
                    c.asked.max(c.rps).max(0.0),
                ));
                let e = demand.entry(org.clone()).or_default();
                if i == mine {
                    e.0 += c.asked.max(c.rps).max(0.0);
                }
                e.1 += c.asked.max(c.rps).max(0.0);
            }
        }
    }
    let mut shares = HashMap::with_capacity(orgs.len());
    for (org, active) in &orgs {
        shares.insert((*org).to_owned(), divide(n, active)[mine]);
    }
    let source = if source_shared {
        let source_rps = source_rps.max(1e-9);
        let active: Vec<Vec<InstanceClaim>> = fleet
            .iter()
            .map(|(name, d)| {
                if d.source_rps <= 0.0 && d.source_asked <= 0.0 {
                    Vec::new()
                } else {
                    vec![(
                        name.clone(),
                        want(d.source_rps, d.source_asked, d.source_hungry) / source_rps,
                        1.0,
                        d.source_asked.max(d.source_rps),
                    )]
                }
            })
            .collect();
        divide(n, &active)[mine]
    } else {
        1.0
    };
    Shares {
        default: 1.0 / n as f64,
        orgs: shares,
        source,
        demand,
        instances: n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, rps: f64, asked: f64, weight: f64, hungry: bool) -> ClientDemand {
        ClientDemand {
            client: name.into(),
            rps,
            asked,
            weight,
            hungry,
        }
    }

    fn one_org(org: &str, clients: Vec<ClientDemand>) -> Demand {
        Demand {
            orgs: [(org.to_owned(), clients)].into_iter().collect(),
            ..Demand::default()
        }
    }

    fn fleet(docs: Vec<Demand>) -> Vec<(String, Demand)> {
        docs.into_iter()
            .enumerate()
            .map(|(i, d)| (format!("i{i}"), d))
            .collect()
    }

    fn shares_of(f: &[(String, Demand)], org: &str) -> Vec<f64> {
        f.iter()
            .map(|(me, _)| {
                let s = allocate(me, f, 10.0, 100.0, true);
                *s.orgs.get(org).unwrap_or(&s.default)
            })
            .collect()
    }

    #[test]
    fn the_pinned_case_gives_the_noisy_instance_what_the_light_ones_leave() {
        // A noisy script at instance 0 (hungry: it got 3.3/s and asked for 30), scripts at 2/s
        // on instances 1 and 2.
        let f = fleet(vec![
            one_org("o", vec![client("noisy", 3.3, 30.0, 1.0, true)]),
            one_org("o", vec![client("light1", 2.0, 2.0, 1.0, false)]),
            one_org("o", vec![client("light2", 2.0, 2.0, 1.0, false)]),
        ]);
        let s = shares_of(&f, "o");
        let sum: f64 = s.iter().sum();
        assert!((sum - 1.0).abs() < 1e-9, "{s:?}");
        // The light ones get what they send plus the margin: 2 × 1.05 + 0.05 = 2.15/s.
        assert!((s[1] - 0.215).abs() < 1e-9, "{s:?}");
        assert!((s[2] - 0.215).abs() < 1e-9, "{s:?}");
        assert!((s[0] - 0.57).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn the_parts_add_up_to_the_budget_for_any_demand() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 10_000) as f64 / 1000.0
        };
        for round in 0..300 {
            let n = 1 + round % 5;
            let docs: Vec<Demand> = (0..n)
                .map(|i| {
                    let mut d = Demand::default();
                    for o in 0..3 {
                        if (round + i + o) % 3 == 0 {
                            continue;
                        }
                        let cs = (0..1 + (round + o) % 3)
                            .map(|c| {
                                client(
                                    &format!("c{c}"),
                                    next(),
                                    next() * 3.0,
                                    1.0 + (c % 3) as f64,
                                    next() > 5.0,
                                )
                            })
                            .collect();
                        d.orgs.insert(format!("o{o}"), cs);
                    }
                    d.source_rps = next() * 10.0;
                    d.source_asked = next() * 20.0;
                    d.source_hungry = next() > 5.0;
                    d
                })
                .collect();
            let f = fleet(docs);
            for org in ["o0", "o1", "o2"] {
                let s = shares_of(&f, org);
                let sum: f64 = s.iter().sum();
                assert!(sum <= 1.0 + 1e-9, "round {round} {org}: {s:?}");
                assert!(s.iter().all(|x| *x >= 0.0));
                if f.iter().any(|(_, d)| d.orgs.contains_key(org)) {
                    assert!((sum - 1.0).abs() < 1e-9, "round {round} {org}: {s:?}");
                }
            }
            let src: f64 = f
                .iter()
                .map(|(me, _)| allocate(me, &f, 10.0, 100.0, true).source)
                .sum();
            assert!((src - 1.0).abs() < 1e-9, "round {round}: source {src}");
        }
    }

    #[test]
    fn weights_hold_across_instances() {
        // Two hungry clients, weights 1 and 3, each on its own instance; a third idle instance.
        let f = fleet(vec![
            one_org("o", vec![client("a", 2.0, 20.0, 1.0, true)]),
            one_org("o", vec![client("b", 6.0, 20.0, 3.0, true)]),
            Demand::default(),
        ]);
        let s = shares_of(&f, "o");
        assert!((s[2] - FLOOR).abs() < 1e-9, "{s:?}");
        assert!((s[1] / s[0] - 3.0).abs() < 1e-9, "{s:?}");
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_client_on_two_instances_counts_once() {
        // Client a (hungry) is spread over instances 0 and 1; client b (hungry) is on 2. As one
        // proxy: half each. a's half is split by where it asked (1:3).
        let f = fleet(vec![
            one_org("o", vec![client("a", 1.0, 5.0, 1.0, true)]),
            one_org("o", vec![client("a", 3.0, 15.0, 1.0, true)]),
            one_org("o", vec![client("b", 5.0, 20.0, 1.0, true)]),
        ]);
        let s = shares_of(&f, "o");
        assert!((s[2] - 0.5).abs() < 1e-9, "{s:?}");
        assert!((s[0] - 0.125).abs() < 1e-9, "{s:?}");
        assert!((s[1] - 0.375).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn budget_nobody_asks_for_is_divided_evenly() {
        let f = fleet(vec![
            one_org("o", vec![client("a", 1.0, 1.0, 1.0, false)]),
            Demand::default(),
        ]);
        let s = shares_of(&f, "o");
        // a wants 1.1/s of 10: 0.11; the idle instance's floor 0.02; 0.87 left, half each.
        assert!((s[0] - (0.11 + 0.435)).abs() < 1e-9, "{s:?}");
        assert!((s[1] - (0.02 + 0.435)).abs() < 1e-9, "{s:?}");
        // An organization nobody asks for: the default, an even split.
        let me = allocate("i1", &f, 10.0, 100.0, true);
        assert_eq!(me.default, 0.5);
        assert!(!me.orgs.contains_key("other"));
    }

    #[test]
    fn source_shared_false_gives_each_instance_its_own_source_budget() {
        let f = fleet(vec![
            Demand {
                source_rps: 50.0,
                source_asked: 90.0,
                source_hungry: true,
                ..Demand::default()
            },
            Demand::default(),
        ]);
        assert_eq!(allocate("i1", &f, 10.0, 100.0, false).source, 1.0);
        let shared = allocate("i0", &f, 100.0, 100.0, true).source;
        assert!((shared - 0.98).abs() < 1e-9, "{shared}");
    }

    #[test]
    fn an_instance_missing_from_the_snapshot_takes_the_even_split() {
        let f = fleet(vec![Demand::default(), Demand::default()]);
        let s = allocate("gone", &f, 10.0, 100.0, true);
        assert_eq!(s, Shares::even(3));
    }

    #[test]
    fn water_filling_is_max_min_fair() {
        let claims = [
            Claim {
                want: 0.1,
                weight: 1.0,
            },
            Claim {
                want: 0.5,
                weight: 1.0,
            },
            Claim {
                want: 0.9,
                weight: 1.0,
            },
        ];
        let (got, left) = water_fill(1.0, &claims);
        assert!((got[0] - 0.1).abs() < 1e-9);
        assert!((got[1] - 0.45).abs() < 1e-9, "{got:?}");
        assert!((got[2] - 0.45).abs() < 1e-9, "{got:?}");
        assert!(left < 1e-9);
        let (got, left) = water_fill(1.0, &claims[..1]);
        assert!((got[0] - 0.1).abs() < 1e-9 && (left - 0.9).abs() < 1e-9);
    }

    #[test]
    fn the_publication_is_plain_json_and_tolerates_unknown_fields() {
        let d = one_org("123", vec![client("ops", 1.5, 2.0, 2.0, true)]);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(
            json,
            r#"{"source_rps":0.0,"source_asked":0.0,"source_hungry":false,"orgs":{"123":[{"client":"ops","rps":1.5,"asked":2.0,"weight":2.0,"hungry":true}]}}"#
        );
        let back: Demand =
            serde_json::from_str(&json.replace("{\"source_rps\"", "{\"future\":1,\"source_rps\""))
                .unwrap();
        assert_eq!(back, d);
        let empty: Demand = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, Demand::default());
    }
}
