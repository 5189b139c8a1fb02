//! The steps `request_filter` takes after admission: refuse (recorded and written), answer
//! `GET /organizations`, check an action batch's body, wait the request's turn in its
//! organization's rate budget.

use super::ctx::{Ctx, Outcome};
use super::respond::{read_body, write_json, write_refusal};
use super::MerakiProxy;
use crate::admission::{self, Forward};
use crate::refusal::{self, Decision, Refusal};
use crate::route;
use crate::shaping::{Throttled, Ticket, Turn, Waiting};
use pingora::prelude::*;
use pingora::ErrorType;

impl MerakiProxy {
    /// Writes a refusal and records it.
    pub(super) async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        r: Refusal,
    ) -> Result<bool> {
        ctx.outcome.decision = r.decision();
        if r.reason == refusal::TIMED_OUT {
            // Only a body read times out this early (an action batch read whole).
            ctx.outcome.detail.get_or_insert("body");
        }
        if ctx.outcome.decision == Decision::Denied {
            self.metrics.denial(ctx.client_name(), r.reason);
            if r.reason == refusal::RATE_LIMITED {
                self.metrics.rate_limited(ctx.client_name(), ctx.org());
            }
        }
        write_refusal(session, ctx.request_id, &r).await?;
        ctx.outcome.refusal = Some(r);
        Ok(true)
    }

    /// Answers `GET /organizations` itself ([`crate::orglist`]).
    pub(super) async fn list_organizations(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> Result<bool> {
        let Some(client) = ctx.seen.client.clone() else {
            return Ok(false);
        };
        let req = session.req_header();
        let ua = admission::user_agent(req).map(str::to_owned);
        let query = req.uri.query().map(str::to_owned);
        let origin = {
            let config = self.state.live.config();
            let host = req
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok());
            crate::forward::public_origin(&config.public_origins, host).map(str::to_owned)
        };
        let answer = self
            .state
            .orgs
            .answer(
                &self.state.api,
                &self.state.grants,
                &client,
                query.as_deref(),
                origin.as_deref(),
                ua.as_deref(),
            )
            .await;
        match answer {
            Ok(a) => {
                ctx.outcome.decision = Decision::Answered;
                write_json(session, ctx.request_id, 200, a.body, Some(&a.link)).await?;
                Ok(true)
            }
            Err(r) => self.refuse(session, ctx, r).await,
        }
    }

    /// Before a request goes upstream: an action batch's resources checked, then its turn in
    /// the organization's rate budget. `Ok(true)`: answered (refused) here.
    pub(super) async fn prepare_forward(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        f: Forward,
    ) -> Result<bool> {
        let batch = f.action_batch;
        ctx.forward = Some(f);
        // The rare paths are boxed (see `request_filter`): an action batch's check, a refusal.
        if batch {
            if let Err(r) = Box::pin(self.check_batch(session, ctx)).await {
                return Box::pin(self.refuse(session, ctx, r)).await;
            }
        }
        if let Some(r) = self.wait_turn(session, ctx).await? {
            return Box::pin(self.refuse(session, ctx, r)).await;
        }
        Ok(false)
    }

    /// Reads an action batch body whole (into Pingora's retry buffer, which then sends it
    /// upstream) and checks its resources before anything goes upstream.
    async fn check_batch(&self, session: &mut Session, ctx: &Ctx) -> Result<(), Refusal> {
        let body = read_body(session, route::MAX_BATCH_BODY).await?;
        let (Some(client), Some(f)) = (ctx.seen.client.as_deref(), ctx.forward.as_ref()) else {
            return Ok(());
        };
        let ua = admission::user_agent(session.req_header()).map(str::to_owned);
        admission::check_batch(&self.state, client, &f.org, &body, ua.as_deref()).await
    }

    /// Waits for the request's turn in its organization's rate budget ([`crate::shaping`]), or
    /// answers why not. A client that goes away while its request waits gives its place up.
    async fn wait_turn(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Option<Refusal>> {
        let (Some(client), Some(org)) = (ctx.seen.client.as_deref(), ctx.seen.org.as_deref())
        else {
            return Ok(None);
        };
        let turn = match self.shaper.request(org, &client.name, client.weight) {
            Ticket::Go(turn) => Ok(turn),
            Ticket::Refused(e) => Err(e),
            // Only a request whose body is read (or empty) can watch its connection: reading
            // more would consume the body.
            // Boxed (see `request_filter`): at the default budgets a request rarely waits.
            Ticket::Wait(w) if session.as_mut().is_body_done() => {
                Box::pin(wait_watching(session, &mut ctx.outcome, w)).await?
            }
            Ticket::Wait(w) => Box::pin(w.wait()).await,
        };
        match turn {
            Ok(turn) => {
                ctx.queue_wait = Some(turn.waited);
                self.metrics.queue_wait(org, turn.waited);
                Ok(None)
            }
            Err(e) => Ok(Some(Refusal::from(&e))),
        }
    }
}

/// Waits for a turn while watching the connection: a client that goes away while its request
/// waits gives its place up (recorded as such; nothing is written to a closed connection).
async fn wait_watching(
    session: &mut Session,
    outcome: &mut Outcome,
    w: Waiting,
) -> Result<Result<Turn, Throttled>> {
    tokio::select! {
        biased;
        turn = w.wait() => Ok(turn),
        gone = session.as_mut().read_body_or_idle(true) => {
            outcome.decision = Decision::Failed;
            outcome.refusal = Some(Refusal::new(
                499,
                "client_closed",
                "the client closed the connection while its request waited for its turn",
            ));
            Err(gone.err().unwrap_or_else(|| {
                Error::explain(ErrorType::ConnectionClosed, "client left while its request waited")
            }).into_down())
        }
    }
}
