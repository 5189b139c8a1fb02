//! The server's background services, and what a reload reports.

use crate::audit::Audit;
use crate::config::Config;
use crate::observe::Observer;
use crate::reload::Live;
use crate::shaping::Shaper;
use crate::token::Grants;
use crate::upstream::Upstream;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

pub(super) struct DnsRefresher {
    pub(super) upstream: Arc<Upstream>,
}

#[async_trait]
impl BackgroundService for DnsRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    let up = self.upstream.clone();
                    match tokio::task::spawn_blocking(move || up.refresh_address()).await {
                        Ok(Err(e)) => tracing::warn!(error = %crate::report::chain(&e), "upstream DNS refresh failed; keeping the last address"),
                        Err(e) => tracing::warn!(error = %e, "upstream DNS refresh task failed"),
                        Ok(Ok(())) => {}
                    }
                }
            }
        }
    }
}

/// Every `every`: re-reads the store (grants imported, connected or revoked by another process),
/// records last use, and refreshes grants idle for `idle` so Meraki never revokes them.
pub(super) struct GrantKeeper {
    pub(super) grants: Arc<Grants>,
    pub(super) idle: Duration,
    pub(super) every: Duration,
}

#[async_trait]
impl BackgroundService for GrantKeeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    self.grants.flush_last_used().await;
                    return;
                }
                _ = tick.tick() => {
                    if let Err(e) = self.grants.reload().await {
                        tracing::warn!(error = %crate::report::chain(&e), "re-reading grants from the store failed");
                    }
                    self.grants.flush_last_used().await;
                    let n = self.grants.keep_alive(self.idle).await;
                    if n > 0 {
                        tracing::info!(refreshed = n, "kept idle grants alive");
                    }
                }
            }
        }
    }
}

/// Keeps this instance in step with others sharing the store: re-reads the grants when the
/// store announces a change (PostgreSQL's LISTEN/NOTIFY) and every `every` (heartbeat, unstored
/// rotations, a full re-read: the safety net for missed notifications).
/// (The fleet's division of Meraki's budget is `super::fleet`'s, every 250 ms.)
pub(super) struct StoreSync {
    pub(super) grants: Arc<Grants>,
    pub(super) every: Duration,
}

#[async_trait]
impl BackgroundService for StoreSync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let changed = Arc::new(tokio::sync::Notify::new());
        let notify = changed.clone();
        let on_change = move || notify.notify_one();
        let store = self.grants.store().clone();
        let watch = store.watch(&on_change);
        tokio::pin!(watch);
        let mut watching = true;
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = &mut watch, if watching => watching = false,
                _ = changed.notified() => {
                    // Several notifications of one burst (a commit, a reassignment): one read.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if let Err(e) = self.grants.reload().await {
                        tracing::warn!(error = %crate::report::chain(&e), "re-reading grants after a change failed");
                    }
                }
                _ = tick.tick() => match self.grants.sync().await {
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %crate::report::chain(&e), "store sync failed; serving from memory"),
                },
            }
        }
    }
}

/// What a configuration reload changes besides the snapshot: the audit log and metrics hear
/// of it, and the rate limits follow it.
pub(super) struct ReloadHooks {
    pub(super) observer: Arc<Observer>,
    pub(super) shaper: Shaper,
}

impl crate::reload::ReloadSink for ReloadHooks {
    fn reloaded(
        &self,
        trigger: &'static str,
        outcome: &Result<crate::reload::Reloaded, String>,
        config: &Config,
    ) {
        if outcome.is_ok() {
            self.shaper.set_limits(config.rate_limits);
        }
        self.observer.reloaded(trigger, outcome, config);
    }
}

/// SIGHUP: reopens the audit log (log rotation) and reloads the configuration.
pub(super) struct Hangup {
    pub(super) audit: Arc<Audit>,
    pub(super) live: Arc<Live>,
}

#[async_trait]
impl BackgroundService for Hangup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reloads need POST /admin/reload");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reopening the audit log and reloading the configuration");
                    self.audit.reopen();
                    // The outcome is logged, audited and counted by the reload itself.
                    let _ = self.live.reload("sighup").await;
                }
            }
        }
    }
}
