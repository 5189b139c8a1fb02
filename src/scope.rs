//! Meraki's OAuth scopes (SPEC.md): `dashboard:{general,iam,licensing}:{config,telemetry}:{read,write}`
//! and `{sdwan,switch,wireless,camera,sensor,sm}:{config,telemetry}:{read,write}`, 36 in all.
//!
//! A scope is a bit; a set of scopes (what a grant was given) is a `u64`, so the per-request
//! check of an operation's scope (`admission::check_scope`) is one bit test.

use std::fmt;

/// The areas a scope names, in bit order: three dashboard areas, then six products.
const AREAS: [&str; 9] = [
    "dashboard:general",
    "dashboard:iam",
    "dashboard:licensing",
    "sdwan",
    "switch",
    "wireless",
    "camera",
    "sensor",
    "sm",
];

/// The kinds and accesses of each area, in bit order.
const KINDS: [&str; 4] = [
    "config:read",
    "config:write",
    "telemetry:read",
    "telemetry:write",
];

/// The number of scopes Meraki defines.
pub const COUNT: usize = AREAS.len() * KINDS.len();

/// One of Meraki's OAuth scopes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(u8);

impl Scope {
    /// The scope named `name` (e.g. `dashboard:general:config:write`), if Meraki defines it.
    pub fn parse(name: &str) -> Option<Scope> {
        // Every scope ends in `kind:access`, two colon-separated words.
        let cut = name.rmatch_indices(':').nth(1)?.0;
        let (area, kind) = (&name[..cut], &name[cut + 1..]);
        let a = AREAS.iter().position(|x| *x == area)?;
        let k = KINDS.iter().position(|x| *x == kind)?;
        Some(Scope((a * KINDS.len() + k) as u8))
    }

    /// The scope's name, as Meraki spells it.
    pub fn name(self) -> String {
        let (a, k) = (self.0 as usize / KINDS.len(), self.0 as usize % KINDS.len());
        format!("{}:{}", AREAS[a], KINDS[k])
    }

    /// Every scope, in bit order.
    pub fn all() -> impl Iterator<Item = Scope> {
        (0..COUNT as u8).map(Scope)
    }

    fn bit(self) -> u64 {
        1 << self.0
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope({})", self.name())
    }
}

/// A set of scopes.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ScopeSet(u64);

impl ScopeSet {
    /// No scope.
    pub const EMPTY: ScopeSet = ScopeSet(0);

    /// Whether the set holds `scope`.
    #[inline]
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// The set with `scope` added.
    pub fn with(self, scope: Scope) -> ScopeSet {
        ScopeSet(self.0 | scope.bit())
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The set as bits (for an atomic); [`ScopeSet::from_bits`] reads it back.
    pub fn bits(self) -> u64 {
        self.0
    }

    /// The set of these bits (unknown bits dropped).
    pub fn from_bits(bits: u64) -> ScopeSet {
        ScopeSet(bits & ((1u64 << COUNT) - 1))
    }

    /// The scopes of a space-separated list (RFC 6749's `scope`), and the words that name no
    /// scope of Meraki's.
    pub fn parse_list(list: &str) -> (ScopeSet, Vec<&str>) {
        let mut set = ScopeSet::EMPTY;
        let mut unknown = Vec::new();
        for word in list.split_whitespace() {
            match Scope::parse(word) {
                Some(s) => set = set.with(s),
                None => unknown.push(word),
            }
        }
        (set, unknown)
    }

    /// The scopes in the set, in bit order.
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::all().filter(move |s| self.contains(*s))
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        iter.into_iter().fold(ScopeSet::EMPTY, ScopeSet::with)
    }
}

impl fmt::Display for ScopeSet {
    /// Space-separated, as in a token response.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(&s.name())?;
        }
        Ok(())
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScopeSet[{self}]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scope_of_merakis_parses_and_prints_back() {
        let mut names = Vec::new();
        for area in ["general", "iam", "licensing"] {
            for k in KINDS {
                names.push(format!("dashboard:{area}:{k}"));
            }
        }
        for p in ["sdwan", "switch", "wireless", "camera", "sensor", "sm"] {
            for k in KINDS {
                names.push(format!("{p}:{k}"));
            }
        }
        assert_eq!(names.len(), COUNT);
        assert_eq!(COUNT, 36);
        let mut seen = ScopeSet::EMPTY;
        for n in &names {
            let s = Scope::parse(n).unwrap_or_else(|| panic!("{n}"));
            assert_eq!(s.name(), *n);
            assert!(!seen.contains(s), "{n} shares a bit");
            seen = seen.with(s);
        }
        assert_eq!(Scope::all().count(), COUNT);
    }

    #[test]
    fn other_words_are_no_scope() {
        for bad in [
            "",
            "dashboard",
            "dashboard:wireless:config:read",
            "switch:config:admin",
            "switch:config",
            "wireless:config:read:extra",
            "Dashboard:general:config:read",
            ":config:read",
            "dashboard:general:config:read ",
        ] {
            assert_eq!(Scope::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_list_is_a_set_and_unknown_words_are_reported() {
        let (set, unknown) =
            ScopeSet::parse_list("sm:config:read  dashboard:iam:config:write bogus sm:config:read");
        assert_eq!(unknown, vec!["bogus"]);
        assert_eq!(set.iter().count(), 2);
        assert!(set.contains(Scope::parse("sm:config:read").unwrap()));
        assert!(!set.contains(Scope::parse("sm:config:write").unwrap()));
        assert_eq!(set.to_string(), "dashboard:iam:config:write sm:config:read");
        assert_eq!(ScopeSet::from_bits(set.bits() | (1 << 63)), set);
        assert!(ScopeSet::parse_list("").0.is_empty());
    }
}
