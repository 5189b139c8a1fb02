//! The `fleet-shares` background service: every [`CYCLE`], this instance publishes what its
//! clients asked of Meraki in the last second, reads every other live instance's publication
//! from the store, and takes its part of each budget by the fleet's division by demand
//! (`crate::shaping::fleet`). Nothing here is on the request path.
//!
//! When an exchange fails or takes longer than [`SLOW`], the instance takes the even split of
//! the fleet it last saw (1/N of every budget: never more than its part of Meraki's limit,
//! whatever the others do) until the store answers again. The embedded store serves one
//! instance: the service ends at its first exchange, and the shaper keeps the whole budget.

use crate::metrics::Metrics;
use crate::shaping::fleet::{allocate, Demand, Shares, CYCLE};
use crate::shaping::Shaper;
use crate::token::Store;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

/// An exchange slower than this counts as failed: the publications it would read are stale.
pub const SLOW: Duration = Duration::from_secs(1);

pub(super) struct FleetShares {
    pub(super) store: Arc<dyn Store>,
    pub(super) shaper: Shaper,
    pub(super) metrics: Arc<Metrics>,
}

#[async_trait]
impl BackgroundService for FleetShares {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let me = self.store.instance().to_owned();
        self.metrics.instances(1);
        let mut tick = tokio::time::interval(CYCLE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The fleet last seen, for the even split when the store does not answer.
        let mut last_seen = 1usize;
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            let demand = self.shaper.demand();
            let document = match serde_json::to_string(&demand) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode this instance's demand");
                    continue;
                }
            };
            let answer = tokio::time::timeout(SLOW, self.store.exchange_demand(&document)).await;
            let others = match answer {
                Ok(Ok(None)) => return,
                Ok(Ok(Some(others))) => others,
                Ok(Err(e)) => {
                    self.metrics.fleet_exchange("failed");
                    if !failing {
                        tracing::warn!(error = %crate::report::chain(&e), instances = last_seen, "the fleet's demand exchange failed; taking an even split of the fleet last seen until the store answers");
                    }
                    failing = true;
                    self.shaper.set_shares(&Shares::even(last_seen));
                    continue;
                }
                Err(_) => {
                    self.metrics.fleet_exchange("slow");
                    if !failing {
                        tracing::warn!(instances = last_seen, "the fleet's demand exchange took over {} ms; taking an even split of the fleet last seen until the store answers", SLOW.as_millis());
                    }
                    failing = true;
                    self.shaper.set_shares(&Shares::even(last_seen));
                    continue;
                }
            };
            if failing {
                tracing::info!("the fleet's demand exchange works again; shares follow demand");
                failing = false;
            }
            self.metrics.fleet_exchange("ok");
            let mut fleet: Vec<(String, Demand)> = Vec::with_capacity(others.len() + 1);
            fleet.push((me.clone(), demand));
            for (name, doc) in others {
                // A document this build cannot read (another version's format) counts as asking
                // nothing: that instance keeps its floor.
                let d = serde_json::from_str::<Demand>(&doc).unwrap_or_default();
                fleet.push((name, d));
            }
            last_seen = fleet.len();
            self.metrics.instances(last_seen);
            let limits = self.shaper.limits();
            let shares = allocate(
                &me,
                &fleet,
                limits.organization_rps,
                limits.source_rps,
                limits.source_shared,
            );
            self.shaper.set_shares(&shares);
        }
    }
}
