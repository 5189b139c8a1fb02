//! `[metrics]`: per-client and per-organization detail of `/metrics`.

use super::Validator;
use crate::config::{file, ConfigError, Detail, MetricsConfig};

/// The most names a `top_*` setting keeps (each costs series).
pub const MAX_TOP: usize = 1000;

impl Validator<'_> {
    /// `[metrics]`.
    pub(super) fn metrics(&self, raw: &file::Metrics) -> Result<MetricsConfig, ConfigError> {
        let d = MetricsConfig::default();
        let detail = |key: &str, v: &Option<String>, default: Detail| match v.as_deref() {
            None => Ok(default),
            Some("top") => Ok(Detail::Top),
            Some("on") => Ok(Detail::On),
            Some("off") => Ok(Detail::Off),
            Some(other) => Err(self.invalid(
                format!("metrics.{key}"),
                format!("expected \"top\", \"on\" or \"off\", got {other:?}"),
            )),
        };
        let top = |key: &str, v: Option<usize>, default: usize| match v {
            None => Ok(default),
            Some(n) if (1..=MAX_TOP).contains(&n) => Ok(n),
            Some(n) => Err(self.invalid(
                format!("metrics.{key}"),
                format!("expected 1 to {MAX_TOP} names kept, got {n}"),
            )),
        };
        Ok(MetricsConfig {
            per_client: detail("per_client", &raw.per_client, d.per_client)?,
            per_organization: detail(
                "per_organization",
                &raw.per_organization,
                d.per_organization,
            )?,
            top_clients: top("top_clients", raw.top_clients, d.top_clients)?,
            top_organizations: top(
                "top_organizations",
                raw.top_organizations,
                d.top_organizations,
            )?,
        })
    }
}
