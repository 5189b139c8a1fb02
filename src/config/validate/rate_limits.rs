//! `[rate_limits]`: the share of Meraki's rate limits requests wait for.

use super::Validator;
use crate::config::{file, ConfigError, RateLimits};
use std::time::Duration;

impl Validator<'_> {
    /// `[rate_limits]`.
    pub(super) fn rate_limits(&self, raw: &file::RateLimits) -> Result<RateLimits, ConfigError> {
        let d = RateLimits::default();
        let rate = |key: &str, v: Option<f64>, default: f64, max: f64| match v {
            None => Ok(default),
            Some(v) if v.is_finite() && v > 0.0 && v <= max => Ok(v),
            Some(v) => Err(self.invalid(
                format!("rate_limits.{key}"),
                format!("expected requests per second above 0 and at most {max}, got {v}"),
            )),
        };
        let organization_rps = rate(
            "organization_rps",
            raw.organization_rps,
            d.organization_rps,
            1e6,
        )?;
        let source_rps = rate("source_rps", raw.source_rps, d.source_rps, 1e7)?;
        let organization_burst = match raw.organization_burst {
            None => d.organization_burst,
            Some(v) if v.is_finite() && (1.0..=1e6).contains(&v) => v,
            Some(v) => {
                return Err(self.invalid(
                    "rate_limits.organization_burst",
                    format!("expected the requests an organization may send at once, 1 to 1000000 (Meraki: 10), got {v}"),
                ))
            }
        };
        let max_wait = match raw.max_wait_ms {
            None => d.max_wait,
            Some(ms) if (1..=60_000).contains(&ms) => Duration::from_millis(ms),
            Some(ms) => {
                return Err(self.invalid(
                    "rate_limits.max_wait_ms",
                    format!("expected 1 to 60000 milliseconds (scripts time out), got {ms}"),
                ))
            }
        };
        let queue_per_client = match raw.queue_per_client {
            None => d.queue_per_client,
            Some(n) if (1..=100_000).contains(&n) => n,
            Some(n) => {
                return Err(self.invalid(
                    "rate_limits.queue_per_client",
                    format!("expected 1 to 100000 waiting requests, got {n}"),
                ))
            }
        };
        Ok(RateLimits {
            enabled: raw.enabled.unwrap_or(d.enabled),
            organization_rps,
            organization_burst,
            source_rps,
            max_wait,
            queue_per_client,
            source_shared: raw.source_shared.unwrap_or(d.source_shared),
        })
    }
}
