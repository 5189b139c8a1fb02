//! Shutdown: which signals stop the server, and the drain of in-flight requests.

use crate::audit::{Audit, ServerRecord};
use crate::metrics::Metrics;
use crate::token::Grants;
use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// Which signal asked the server to stop, for the audit record.
static STOP_TRIGGER: OnceLock<&'static str> = OnceLock::new();

/// The binary's shutdown signals: SIGTERM and SIGINT both drain gracefully (Ctrl-C in a
/// terminal should not cut requests either); a second one during the drain ends the process
/// at once (see [`Drain`]).
pub struct Signals;

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot listen for SIGTERM/SIGINT; stopping");
            return ShutdownSignal::FastShutdown;
        };
        let which = tokio::select! {
            _ = term.recv() => "sigterm",
            _ = int.recv() => "sigint",
        };
        let _ = STOP_TRIGGER.set(which);
        ShutdownSignal::GracefulTerminate
    }
}

/// After the shutdown broadcast (listeners closed, idle keep-alive connections closed by
/// Pingora): waits until no request is in flight or the grace period is over, then records
/// the last use of grants, flushes the audit log and, in the binary, ends the process. Every
/// response a client received has its audit record by then: a request leaves the in-flight
/// count only after its record is queued.
pub(super) struct Drain {
    pub(super) audit: Arc<Audit>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) grants: Arc<Grants>,
    pub(super) grace: Duration,
    pub(super) exit_when_drained: bool,
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.wait_for(|stop| *stop).await.is_err() {
            return;
        }
        let trigger = STOP_TRIGGER.get().copied().unwrap_or("shutdown");
        let started = tokio::time::Instant::now();
        let in_flight = || self.metrics.in_flight().get();
        tracing::info!(
            trigger,
            in_flight = in_flight(),
            grace_secs = self.grace.as_secs(),
            "shutting down: no new connections; draining in-flight requests"
        );
        self.audit.server_event(&ServerRecord {
            in_flight: Some(in_flight()),
            ..ServerRecord::new("shutdown_started", trigger)
        });
        // A second signal ends the drain.
        let again = async {
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut t), Ok(mut i)) => {
                    tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
                }
                _ => std::future::pending().await,
            }
        };
        tokio::pin!(again);
        let deadline = started + self.grace.saturating_sub(Duration::from_millis(500));
        let event = loop {
            if in_flight() <= 0 {
                break "shutdown_drained";
            }
            tokio::select! {
                _ = &mut again => break "shutdown_interrupted",
                _ = tokio::time::sleep_until(deadline) => break "shutdown_grace_expired",
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        };
        self.grants.flush_last_used().await;
        let left = in_flight();
        tracing::info!(
            event,
            in_flight = left,
            took_ms = started.elapsed().as_millis() as u64,
            "drain finished"
        );
        self.audit.server_event(&ServerRecord {
            in_flight: Some(left),
            ..ServerRecord::new(event, trigger)
        });
        let audit = self.audit.clone();
        // The shutdown checkpoint seals the chain: `audit verify` sees the log ends here.
        let _ = tokio::task::spawn_blocking(move || audit.close()).await;
        if self.exit_when_drained {
            std::process::exit(0);
        }
    }
}
