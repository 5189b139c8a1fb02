//! `[tokens]`: when tokens are refreshed, how long a refused operation is remembered, the
//! backoff, the token call's timeout and the keep-alive of idle grants.

use super::{secs, Validator};
use crate::config::{file, ConfigError};
use std::time::Duration;

/// The validated `[tokens]` section.
pub(super) struct Tokens {
    pub(super) refresh_ahead: Duration,
    pub(super) refused_operation_memory: Duration,
    pub(super) refresh_backoff_max: Duration,
    pub(super) token_timeout: Duration,
    pub(super) keepalive_idle: Duration,
    pub(super) keepalive_check: Duration,
}

impl Validator<'_> {
    /// The `[tokens]` section.
    pub(super) fn tokens(&self, tokens: &file::Tokens) -> Result<Tokens, ConfigError> {
        let refresh_ahead = secs(tokens.refresh_ahead_secs.unwrap_or(300));
        if refresh_ahead >= Duration::from_secs(3000) {
            return Err(self.invalid(
                "tokens.refresh_ahead_secs",
                "expected well under Meraki's 3600-second access token lifetime (at most 2999)",
            ));
        }
        let token_timeout = secs(tokens.token_timeout_secs.unwrap_or(15));
        if token_timeout.is_zero() {
            return Err(self.invalid("tokens.token_timeout_secs", "expected at least 1"));
        }

        if tokens.rejected_grace_secs.is_some() {
            return Err(self.invalid(
                "tokens.rejected_grace_secs",
                "this setting was removed: a 401 is now always refreshed once per token generation, whatever the token's age; an operation Meraki keeps refusing is recognized by evidence and remembered for tokens.refused_operation_memory_secs (default 600) instead. Delete the line",
            ));
        }
        let refused_operation_memory = secs(tokens.refused_operation_memory_secs.unwrap_or(600));
        if refused_operation_memory > Duration::from_secs(86_400) {
            return Err(self.invalid(
                "tokens.refused_operation_memory_secs",
                "expected 0 to 86400: how long an operation where Meraki refused a freshly minted token is remembered (0: never remembered, every 401 refreshes)",
            ));
        }
        let refresh_backoff_max = secs(tokens.refresh_backoff_max_secs.unwrap_or(60));
        if refresh_backoff_max.is_zero() || refresh_backoff_max > Duration::from_secs(3600) {
            return Err(self.invalid("tokens.refresh_backoff_max_secs", "expected 1 to 3600"));
        }

        let keepalive_idle = secs(tokens.keepalive_idle_secs.unwrap_or(7 * 86_400));
        if keepalive_idle.is_zero() || keepalive_idle > Duration::from_secs(60 * 86_400) {
            return Err(self.invalid(
                "tokens.keepalive_idle_secs",
                "expected 1 to 5184000 (60 days): well under Meraki's 90-day idle revocation",
            ));
        }
        let keepalive_check = secs(tokens.keepalive_check_secs.unwrap_or(3600));
        if keepalive_check.is_zero()
            || keepalive_check > keepalive_idle.max(Duration::from_secs(3600))
        {
            return Err(self.invalid(
                "tokens.keepalive_check_secs",
                "expected at least 1 and at most keepalive_idle_secs",
            ));
        }
        Ok(Tokens {
            refresh_ahead,
            refused_operation_memory,
            refresh_backoff_max,
            token_timeout,
            keepalive_idle,
            keepalive_check,
        })
    }
}
