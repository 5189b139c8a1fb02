//! A queued request: waits for its turn, and gives its place (or its token) back when dropped.

use super::*;

/// A request waiting for its turn; see [`Waiting::wait`]. Dropping it gives its place up.
pub struct Waiting {
    pub(super) shared: Arc<Shared>,
    pub(super) org: Arc<str>,
    pub(super) client: Arc<str>,
    pub(super) id: u64,
    pub(super) rx: oneshot::Receiver<()>,
    pub(super) since: Instant,
    pub(super) deadline: Instant,
    pub(super) done: bool,
}

impl Waiting {
    /// Waits for the turn (at most twice `max_wait`).
    pub async fn wait(mut self) -> Result<Turn, Throttled> {
        let outcome = tokio::time::timeout_at(self.deadline, &mut self.rx).await;
        let turn = Turn {
            waited: self.since.elapsed(),
        };
        match outcome {
            // Granted; or the shaper was dropped or turned off, which lets everything go.
            Ok(_) => {
                self.done = true;
                Ok(turn)
            }
            Err(_) => {
                let mut g = self.shared.lock();
                let now = Instant::now();
                let slot = self.shared.slot(now);
                let limit = g.limits.max_wait.as_millis() as u64;
                let inner = &mut *g;
                let others = inner.others(&self.org);
                if let Some(org) = inner.orgs.get_mut(&self.org) {
                    if remove(org, &self.client, self.id) {
                        inner.queued -= 1;
                        self.done = true;
                        org.throttled_total += 1;
                        let lane = org.lanes.get_mut(&self.client);
                        let start = lane.as_ref().map_or(org.vtime, |l| l.finish);
                        if let Some(lane) = lane {
                            lane.throttled.add(slot);
                        }
                        let expected =
                            expected_wait(org, &inner.source, &others, &self.client, start, now);
                        return Err(Throttled {
                            org: self.org.clone(),
                            cause: Cause::TimedOut,
                            expected_wait: expected,
                            limit,
                        });
                    }
                }
                // Granted between the timeout and the lock.
                self.done = true;
                Ok(turn)
            }
        }
    }
}

/// Removes waiter `id` from `client`'s lane; whether it was there.
pub(super) fn remove(org: &mut Org, client: &str, id: u64) -> bool {
    let Some(lane) = org.lanes.get_mut(client) else {
        return false;
    };
    let Some(i) = lane.queue.iter().position(|w| w.id == id) else {
        return false;
    };
    lane.queue.remove(i);
    org.queued -= 1;
    true
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut g = self.shared.lock();
        let inner = &mut *g;
        let Some(org) = inner.orgs.get_mut(&self.org) else {
            return;
        };
        if remove(org, &self.client, self.id) {
            inner.queued -= 1;
        } else if self.rx.try_recv().is_ok() {
            // Granted, then abandoned: the token was not used upstream.
            org.bucket.tokens = (org.bucket.tokens + 1.0).min(org.bucket.depth);
            inner.source.tokens = (inner.source.tokens + 1.0).min(inner.source.depth);
            drop(g);
            self.shared.kick.notify_one();
        }
    }
}
