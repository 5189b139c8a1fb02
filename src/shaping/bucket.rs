//! A token bucket, as Meraki models its rate limits.

use super::*;

#[derive(Debug, Clone, Copy)]
pub(super) struct Bucket {
    pub(super) tokens: f64,
    pub(super) depth: f64,
    pub(super) rate: f64,
    pub(super) at: Instant,
}

impl Bucket {
    pub(super) fn full(depth: f64, rate: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: depth,
            depth,
            rate,
            at: now,
        }
    }

    pub(super) fn refill(&mut self, now: Instant) {
        if now > self.at {
            let dt = (now - self.at).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.depth);
            self.at = now;
        }
    }

    pub(super) fn has(&self, n: f64) -> bool {
        self.tokens >= n - EPS
    }

    /// Time until `n` tokens are there (after a refill at `at`).
    pub(super) fn until(&self, n: f64) -> Duration {
        if self.has(n) {
            Duration::ZERO
        } else {
            secs((n - self.tokens) / self.rate)
        }
    }

    pub(super) fn set(&mut self, depth: f64, rate: f64, now: Instant) {
        self.refill(now);
        self.depth = depth;
        self.rate = rate;
        self.tokens = self.tokens.min(depth);
    }
}

pub(super) fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 3600.0))
}
