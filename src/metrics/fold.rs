//! Bounded label values: which clients and organizations keep their name in `/metrics`
//! (`[metrics] per_client`, `per_organization`), the rest counted as [`OTHER`].
//!
//! With [`Detail::Top`] the first names seen keep theirs until `top` are named; after that, at
//! each scrape ([`Chooser::rechoose`]), a name counted as `"other"` replaces the least busy named
//! one only when it is more than twice as busy (activity: requests per scrape, halved at each
//! scrape), so the choice is stable under steady traffic and follows a real change. The request
//! path bumps one atomic counter per name in a map of the configured names ([`Chooser::know`],
//! rebuilt at a reload, never on the request path) and reads the chosen set, both behind an
//! [`ArcSwap`]: no lock, no shared write but the name's own counter.

use crate::config::Detail;
use arc_swap::ArcSwap;
// The request path looks up two names per request here: [`crate::FastMap`] (the names are the
// configuration's, not the client's).
use crate::FastMap as HashMap;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// The label value of every client or organization without its own series.
pub const OTHER: &str = "other";

/// Chooses the names one label keeps.
pub struct Chooser {
    detail: AtomicU8,
    top: AtomicUsize,
    /// Requests counted since the last scrape, by configured name (Top only).
    counts: ArcSwap<HashMap<Arc<str>, AtomicU64>>,
    chosen: ArcSwap<HashSet<Arc<str>>>,
    /// Activity by name (decayed at each scrape), and the lock for changing `chosen`.
    scores: Mutex<HashMap<Arc<str>, f64>>,
}

fn code(d: Detail) -> u8 {
    match d {
        Detail::Top => 0,
        Detail::On => 1,
        Detail::Off => 2,
    }
}

fn detail_of(c: u8) -> Detail {
    match c {
        1 => Detail::On,
        2 => Detail::Off,
        _ => Detail::Top,
    }
}

impl Chooser {
    /// A chooser at these settings.
    pub fn new(detail: Detail, top: usize) -> Self {
        Chooser {
            detail: AtomicU8::new(code(detail)),
            top: AtomicUsize::new(top),
            counts: ArcSwap::from_pointee(HashMap::default()),
            chosen: ArcSwap::from_pointee(HashSet::default()),
            scores: Mutex::new(HashMap::default()),
        }
    }

    /// The settings in force.
    pub fn detail(&self) -> Detail {
        detail_of(self.detail.load(Ordering::Relaxed))
    }

    /// New settings (a reload). Names beyond a smaller `top` are let go at the next scrape.
    pub fn set(&self, detail: Detail, top: usize) {
        self.detail.store(code(detail), Ordering::Relaxed);
        self.top.store(top, Ordering::Relaxed);
    }

    /// The names whose requests are counted (the configuration's clients or organizations);
    /// counts of names kept carry over. Others still get a free place, but are not counted.
    pub fn know<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let old = self.counts.load();
        let mut map = HashMap::default();
        for name in names {
            if !map.contains_key(name) {
                let n = old.get(name).map_or(0, |c| c.load(Ordering::Relaxed));
                map.insert(Arc::from(name), AtomicU64::new(n));
            }
        }
        self.counts.store(Arc::new(map));
    }

    /// One request of `name`: counted, and its label value.
    pub fn seen<'a>(&self, name: &'a str) -> &'a str {
        if self.detail() == Detail::Top {
            if let Some(c) = self.counts.load().get(name) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.label(name)
    }

    /// The label value of `name`: itself, or [`OTHER`]. With Top, a name seen while fewer
    /// than `top` are named takes a place.
    pub fn label<'a>(&self, name: &'a str) -> &'a str {
        match self.detail() {
            Detail::On => name,
            Detail::Off if name == super::NONE => name,
            Detail::Off => OTHER,
            Detail::Top => {
                if name == super::NONE {
                    return name;
                }
                let chosen = self.chosen.load();
                if chosen.contains(name) {
                    return name;
                }
                if chosen.len() >= self.top.load(Ordering::Relaxed) {
                    return OTHER;
                }
                drop(chosen);
                let _scores = self.scores.lock().unwrap_or_else(PoisonError::into_inner);
                let chosen = self.chosen.load();
                if chosen.contains(name) {
                    return name;
                }
                if chosen.len() >= self.top.load(Ordering::Relaxed) {
                    return OTHER;
                }
                let mut more = HashSet::clone(&chosen);
                more.insert(Arc::from(name));
                self.chosen.store(Arc::new(more));
                name
            }
        }
    }

    /// Gives the first of `names` the places still free (Top): with no more names than places,
    /// every one is named from the start, as with [`Detail::On`].
    pub fn seed<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        if self.detail() != Detail::Top {
            return;
        }
        let top = self.top.load(Ordering::Relaxed);
        let _scores = self.scores.lock().unwrap_or_else(PoisonError::into_inner);
        let mut chosen = HashSet::clone(&self.chosen.load());
        for name in names {
            if chosen.len() >= top {
                break;
            }
            if !chosen.contains(name) {
                chosen.insert(Arc::from(name));
            }
        }
        self.chosen.store(Arc::new(chosen));
    }

    /// Whether `name` has series of its own now (without taking a place).
    pub fn named(&self, name: &str) -> bool {
        match self.detail() {
            Detail::On => true,
            Detail::Off => false,
            Detail::Top => self.chosen.load().contains(name),
        }
    }

    /// At a scrape: activities updated, and a named one replaced by a busier newcomer (more
    /// than twice as busy) or let go beyond `top`. Returns the names that lost their series.
    pub fn rechoose(&self) -> Vec<Arc<str>> {
        if self.detail() != Detail::Top {
            return Vec::new();
        }
        let top = self.top.load(Ordering::Relaxed);
        let mut scores = self.scores.lock().unwrap_or_else(PoisonError::into_inner);
        for s in scores.values_mut() {
            *s /= 2.0;
        }
        for (name, count) in self.counts.load().iter() {
            let n = count.swap(0, Ordering::Relaxed);
            if n > 0 {
                *scores.entry(name.clone()).or_default() += n as f64;
            }
        }
        let mut chosen = HashSet::clone(&self.chosen.load());
        // Names no longer active and not named are forgotten (clients removed by a reload).
        scores.retain(|name, s| *s >= 0.01 || chosen.contains(name));
        let score = |n: &Arc<str>| scores.get(n).copied().unwrap_or(0.0);
        let mut dropped = Vec::new();
        // Beyond a smaller `top`: the least busy go.
        while chosen.len() > top {
            let Some(least) = chosen
                .iter()
                .min_by(|a, b| score(a).total_cmp(&score(b)))
                .cloned()
            else {
                break;
            };
            chosen.remove(&least);
            dropped.push(least);
        }
        let mut outside: Vec<(Arc<str>, f64)> = scores
            .iter()
            .filter(|(n, s)| !chosen.contains(*n) && **s > 0.0)
            .map(|(n, s)| (n.clone(), *s))
            .collect();
        outside.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        for (name, s) in outside {
            if chosen.len() < top {
                chosen.insert(name);
                continue;
            }
            let Some(least) = chosen
                .iter()
                .min_by(|a, b| score(a).total_cmp(&score(b)))
                .cloned()
            else {
                break;
            };
            if s <= 2.0 * score(&least) {
                break;
            }
            chosen.remove(&least);
            chosen.insert(name);
            dropped.push(least);
        }
        dropped.retain(|d| !chosen.contains(d));
        self.chosen.store(Arc::new(chosen));
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_names_take_the_free_places_first() {
        let c = Chooser::new(Detail::Top, 2);
        c.seed(["x", "y", "z"]);
        assert!(c.named("x") && c.named("y") && !c.named("z"));
        assert_eq!(c.seen("a"), "other");
    }

    #[test]
    fn on_names_all_and_off_names_none() {
        let c = Chooser::new(Detail::On, 2);
        c.know(["a", "b"]);
        assert_eq!(["a", "b", "c"].map(|n| c.seen(n)), ["a", "b", "c"]);
        let c = Chooser::new(Detail::Off, 2);
        assert_eq!(["a", "b", "-"].map(|n| c.seen(n)), ["other", "other", "-"]);
    }

    #[test]
    fn the_first_names_keep_theirs_then_only_a_much_busier_one_replaces_the_least_busy() {
        let c = Chooser::new(Detail::Top, 2);
        c.know(["a", "b", "c"]);
        assert_eq!(
            ["a", "b", "c", "-"].map(|n| c.seen(n)),
            ["a", "b", "other", "-"]
        );
        // a: 10, b: 4, c: 6 requests: c is busier than b but not twice as busy.
        for _ in 0..9 {
            c.seen("a");
        }
        for _ in 0..3 {
            c.seen("b");
        }
        for _ in 0..5 {
            c.seen("c");
        }
        assert!(c.rechoose().is_empty());
        assert_eq!(c.label("c"), "other");
        // Next period c is far busier than b: it takes b's place.
        for _ in 0..30 {
            c.seen("c");
        }
        for _ in 0..10 {
            c.seen("a");
        }
        assert_eq!(c.rechoose(), vec![Arc::<str>::from("b")]);
        assert_eq!(
            [c.label("a"), c.label("b"), c.label("c")],
            ["a", "other", "c"]
        );
        // A smaller top lets the least busy go.
        c.set(Detail::Top, 1);
        assert_eq!(c.rechoose(), vec![Arc::<str>::from("a")]);
        assert!(c.named("c") && !c.named("a"));
    }
}
