//! Time: the clock the token engine reads (expiry, refresh points and backoff come from here,
//! never from `SystemTime` directly, so tests drive them with tokio's paused time), and the one
//! set of formatters for times shown to people and written to the audit log.

use std::time::{SystemTime, UNIX_EPOCH};

/// Where "now" comes from.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system's wall clock (what tokens' `expires_at` in the store are measured against).
    System,
    /// Wall time at `base`, advanced by tokio's clock since: with `tokio::time::pause()`, a test
    /// moves it with `tokio::time::advance`.
    Tokio {
        base_unix_ms: i64,
        base: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that follows tokio's (possibly paused) time, starting at the current wall time.
    pub fn tokio() -> Clock {
        Clock::Tokio {
            base_unix_ms: system_unix_ms(),
            base: tokio::time::Instant::now(),
        }
    }

    /// Unix time in milliseconds.
    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::System => system_unix_ms(),
            Clock::Tokio { base_unix_ms, base } => base_unix_ms + base.elapsed().as_millis() as i64,
        }
    }

    /// Unix time in seconds.
    pub fn now(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }
}

fn system_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix time in seconds from the system clock, for code outside the token engine (status page,
/// CLI listings, the store's creation stamps).
pub fn now_unix() -> i64 {
    Clock::System.now()
}

/// A moment, RFC 3339, UTC.
pub fn system_rfc3339(at: SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Now, RFC 3339, UTC.
pub fn now_rfc3339() -> String {
    system_rfc3339(SystemTime::now())
}

/// Unix seconds as RFC 3339, UTC.
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A moment for people, relative to `now`: `2026-11-24T10:00:00Z (in 12 min)`, `... (expired)`
/// for an expiry in the past, `never` for 0. The one formatter of the CLI and the status page.
pub fn describe_expiry(unix: i64, now: i64) -> String {
    match unix {
        0 => "-".into(),
        t if t <= now => format!("{} (expired)", rfc3339(t)),
        t => format!("{} (in {} min)", rfc3339(t), (t - now) / 60),
    }
}

/// A past moment for people, `never` for 0 (a grant never used since it was stored).
pub fn describe_past(unix: i64) -> String {
    match unix {
        0 => "never".into(),
        t => rfc3339(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_follows_paused_time() {
        let c = Clock::tokio();
        let t0 = c.now_ms();
        tokio::time::advance(std::time::Duration::from_secs(90)).await;
        assert_eq!(c.now_ms() - t0, 90_000);
    }

    #[test]
    fn times_read_as_a_person_would() {
        assert_eq!(describe_past(0), "never");
        assert_eq!(describe_expiry(0, 5), "-");
        assert_eq!(
            describe_expiry(1_800_000_000, 1_800_000_000 - 600),
            "2027-01-15T08:00:00Z (in 10 min)"
        );
        assert_eq!(
            describe_expiry(1_800_000_000, 1_800_000_001),
            "2027-01-15T08:00:00Z (expired)"
        );
    }
}
