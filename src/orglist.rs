//! `GET /organizations`, answered by the proxy: the client's organizations only, from one
//! listing per grant rather than one call per organization.
//!
//! Meraki lists every organization a token can see in one paginated `GET /organizations`
//! (`perPage` up to 9,000). For each grant serving some of the client's organizations, the proxy
//! walks that listing with the grant's token ([`ApiClient::list_organizations`]: the 401 rule and
//! the rate budget like any call of its own), keeps it for [`CACHE_TTL`] (one walk at a time per
//! grant), and answers with the client's organizations from it, sorted by id and paginated the
//! way Meraki paginates (`perPage` 3–9,000, `startingAfter`, `endingBefore`, a `Link` header with
//! first, prev, next and last leading back through the proxy), so a script's page walk (the
//! official SDK's `total_pages="all"`) works unchanged.
//!
//! A grant's listing is dropped when its time is up, when a grants reload changes which grant
//! serves which organization ([`Grants::changes`]), when the grant's token changes (a 401 leads
//! to a refresh), on [`OrgList::forget`] (Meraki's 404 to `GET /organizations/{id}`), and when a
//! walk fails (a failure is not cached). A `forget` that arrives while a walk runs discards that
//! walk's result too.

use crate::config::Client;
use crate::lookup::{ApiClient, MAX_ORGANIZATIONS_PER_PAGE};
use crate::refusal::Refusal;
use crate::route::LookupError;
use crate::token::{Grant, Grants, TokenError};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

/// How long a grant's listing is used before it is walked again.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// Meraki's smallest `perPage`.
pub const MIN_PER_PAGE: usize = 3;
/// The largest (and default) `perPage` of the proxy's answer, as Meraki's.
pub const MAX_PER_PAGE: usize = MAX_ORGANIZATIONS_PER_PAGE;

/// A grant's organizations as Meraki listed them: id → the organization's JSON text.
type Listed = Arc<HashMap<String, Box<str>>>;

/// The organization listings of the grants, cached.
pub struct OrgList {
    ttl: Duration,
    slots: Mutex<HashMap<i64, Arc<Slot>>>,
}

/// One grant's cached listing.
#[derive(Default)]
struct Slot {
    /// Held while the grant's listing is walked: one walk at a time.
    cached: tokio::sync::Mutex<Option<Listing>>,
    /// Bumped by [`OrgList::forget`]; a listing made before is stale.
    epoch: AtomicU64,
}

struct Listing {
    at: Instant,
    /// The token generation it was walked with, the grant map's [`Grants::changes`] and the
    /// slot's epoch at the start of the walk.
    generation: i64,
    changes: u64,
    epoch: u64,
    orgs: Listed,
}

/// The paging parameters of a `GET /organizations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageQuery {
    pub per_page: usize,
    pub starting_after: Option<String>,
    pub ending_before: Option<String>,
}

/// An answer of the proxy's own: the JSON body and its `Link` header.
#[derive(Debug)]
pub struct Answer {
    pub body: Bytes,
    pub link: String,
    /// How many of the client's organizations the listing holds (every page).
    pub total: usize,
}

impl Default for OrgList {
    fn default() -> Self {
        OrgList::new(CACHE_TTL)
    }
}

impl OrgList {
    /// An empty cache whose listings live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        OrgList {
            ttl,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Drops the listing of a grant (Meraki said 404 to one of its organizations).
    pub fn forget(&self, grant: i64) {
        if let Some(slot) = self.lock().get(&grant) {
            slot.epoch.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slot(&self, grant: i64) -> Arc<Slot> {
        self.lock().entry(grant).or_default().clone()
    }

    /// `GET /organizations` for `client`: one page of its organizations, from the listings of
    /// the grants serving them, with `Link` targets under `/api/v1` (after `origin`, the public
    /// origin the client used, when there is one).
    pub async fn answer(
        &self,
        api: &ApiClient,
        grants: &Grants,
        client: &Client,
        query: Option<&str>,
        origin: Option<&str>,
        user_agent: Option<&str>,
    ) -> Result<Answer, Refusal> {
        let page = parse_query(query).map_err(|m| Refusal::new(400, "bad_request", m))?;
        let groups = self.groups(grants, client).await;
        if groups.is_empty() {
            // No grant serves any of the client's organizations: say so for the first.
            let org = client.organizations.first().cloned().unwrap_or_default();
            return Err(Refusal::from(&TokenError::NoGrant {
                integration: client.integration.clone(),
                org,
            }));
        }
        let mut found: Vec<(&str, Box<str>)> = Vec::with_capacity(client.organizations.len());
        let mut failure = None;
        for (grant, orgs) in &groups {
            match self
                .listing(api, grants, client, grant, orgs[0], user_agent)
                .await
            {
                Ok(listed) => found.extend(
                    orgs.iter()
                        .filter_map(|o| listed.get(*o).map(|json| (*o, json.clone()))),
                ),
                Err(e) => {
                    tracing::warn!(client = %client.name, grant = grant.id, error = %e.message, "organizations of a grant not listed");
                    failure = Some(e);
                }
            }
        }
        if let (true, Some(e)) = (found.is_empty(), failure) {
            return Err(Refusal {
                status: e.status,
                reason: e.reason,
                message: e.message,
                upstream: None,
                retry_after: e.retry_after,
            });
        }
        found.sort_unstable_by(|a, b| a.0.cmp(b.0));
        found.dedup_by(|a, b| a.0 == b.0);
        let ids: Vec<&str> = found.iter().map(|(id, _)| *id).collect();
        let (start, end) = select(&ids, &page);
        let mut body = String::with_capacity(
            2 + found[start..end]
                .iter()
                .map(|(_, j)| j.len() + 1)
                .sum::<usize>(),
        );
        body.push('[');
        for (i, (_, json)) in found[start..end].iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(json);
        }
        body.push(']');
        let base = format!("{}/api/v1/organizations", origin.unwrap_or(""));
        Ok(Answer {
            body: Bytes::from(body),
            link: links(&base, &ids, page.per_page, start, end),
            total: ids.len(),
        })
    }

    /// The client's organizations by the grant serving them (first-seen order); organizations
    /// no grant serves are left out (one re-read of the store finds a grant added meanwhile).
    async fn groups<'c>(
        &self,
        grants: &Grants,
        client: &'c Client,
    ) -> Vec<(Arc<Grant>, Vec<&'c str>)> {
        let it = &client.integration;
        let mut by_grant: Vec<(Arc<Grant>, Vec<&str>)> = Vec::new();
        let mut index: HashMap<i64, usize> = HashMap::new();
        let mut reread = false;
        for org in &client.organizations {
            let grant = match grants.lookup(it, org) {
                Some(g) => Some(g),
                // `get` re-reads the store on a miss (at most every few seconds).
                None if !reread => {
                    reread = true;
                    grants.get(it, org).await
                }
                None => None,
            };
            let Some(grant) = grant else { continue };
            let i = *index.entry(grant.id).or_insert_with(|| {
                by_grant.push((grant.clone(), Vec::new()));
                by_grant.len() - 1
            });
            by_grant[i].1.push(org);
        }
        by_grant
    }

    /// A grant's listing: the cached one while it is fresh, else a new walk (one at a time
    /// per grant; callers that waited for a walk use its result).
    async fn listing(
        &self,
        api: &ApiClient,
        grants: &Grants,
        client: &Client,
        grant: &Arc<Grant>,
        org: &str,
        user_agent: Option<&str>,
    ) -> Result<Listed, LookupError> {
        let slot = self.slot(grant.id);
        let mut cached = slot.cached.lock().await;
        let fresh = |l: &Listing| {
            l.at.elapsed() < self.ttl
                && l.generation == grant.state().generation
                && l.changes == grants.changes()
                && l.epoch == slot.epoch.load(Ordering::Relaxed)
        };
        if let Some(l) = cached.as_ref().filter(|l| fresh(l)) {
            return Ok(l.orgs.clone());
        }
        *cached = None;
        let epoch = slot.epoch.load(Ordering::Relaxed);
        let changes = grants.changes();
        let items = api
            .list_organizations(client, grant, org, user_agent)
            .await?;
        let mut orgs = HashMap::with_capacity(items.len());
        for item in items {
            let id = match item.get("id") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                _ => continue,
            };
            orgs.insert(id, item.to_string().into_boxed_str());
        }
        let orgs: Listed = Arc::new(orgs);
        // The generation after the walk: a refresh the walk itself made (a 401) is its own.
        *cached = Some(Listing {
            at: Instant::now(),
            generation: grant.state().generation,
            changes,
            epoch,
            orgs: orgs.clone(),
        });
        Ok(orgs)
    }
}

/// Reads `perPage`, `startingAfter` and `endingBefore`; other parameters are ignored.
pub fn parse_query(query: Option<&str>) -> Result<PageQuery, String> {
    let mut q = PageQuery {
        per_page: MAX_PER_PAGE,
        starting_after: None,
        ending_before: None,
    };
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "perPage" => {
                q.per_page = v
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (MIN_PER_PAGE..=MAX_PER_PAGE).contains(n))
                    .ok_or_else(|| {
                        format!(
                        "'perPage' must be an integer between {MIN_PER_PAGE} and {MAX_PER_PAGE}"
                    )
                    })?
            }
            "startingAfter" if !v.is_empty() => q.starting_after = Some(v.into_owned()),
            "endingBefore" if !v.is_empty() => q.ending_before = Some(v.into_owned()),
            _ => {}
        }
    }
    Ok(q)
}

/// The page `q` asks for among `ids` (sorted): `[start, end)`. Cursors compare as text, so any
/// value works, an id or not: `startingAfter` keeps the ids after it, `endingBefore` those
/// before it; with `endingBefore` alone the page is the one just before the cursor.
pub fn select(ids: &[&str], q: &PageQuery) -> (usize, usize) {
    let low = q
        .starting_after
        .as_deref()
        .map_or(0, |c| ids.partition_point(|id| *id <= c));
    let high = q
        .ending_before
        .as_deref()
        .map_or(ids.len(), |c| ids.partition_point(|id| *id < c))
        .max(low);
    if q.ending_before.is_some() && q.starting_after.is_none() {
        (high.saturating_sub(q.per_page).max(low), high)
    } else {
        (low, low.saturating_add(q.per_page).min(high))
    }
}

/// Meraki's `Link` header for the page `[start, end)` of `ids`: first, prev (when there are
/// ids before), next (when there are ids after) and last, each a URL under `base`.
pub fn links(base: &str, ids: &[&str], per_page: usize, start: usize, end: usize) -> String {
    let cursor = |c: &str| {
        percent_encoding::utf8_percent_encode(c, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let url = |param: Option<(&str, &str)>| match param {
        None => format!("{base}?perPage={per_page}"),
        Some((k, v)) => format!("{base}?perPage={per_page}&{k}={}", cursor(v)),
    };
    let mut out = format!("<{}>; rel=first", url(None));
    if start > 0 {
        out.push_str(&format!(
            ", <{}>; rel=prev",
            url(Some(("endingBefore", ids[start])))
        ));
    }
    if end < ids.len() {
        out.push_str(&format!(
            ", <{}>; rel=next",
            url(Some(("startingAfter", ids[end - 1])))
        ));
    }
    let last_start = ids.len().saturating_sub(per_page);
    let last = if last_start == 0 {
        url(None)
    } else {
        url(Some(("startingAfter", ids[last_start - 1])))
    };
    out.push_str(&format!(", <{last}>; rel=last"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(per_page: usize, after: Option<&str>, before: Option<&str>) -> PageQuery {
        PageQuery {
            per_page,
            starting_after: after.map(str::to_owned),
            ending_before: before.map(str::to_owned),
        }
    }

    #[test]
    fn the_query_is_read_like_merakis() {
        assert_eq!(parse_query(None).unwrap(), q(9000, None, None));
        assert_eq!(
            parse_query(Some("perPage=50&startingAfter=123&t0=x")).unwrap(),
            q(50, Some("123"), None)
        );
        assert_eq!(
            parse_query(Some("endingBefore=9%39&perPage=3")).unwrap(),
            q(3, None, Some("99"))
        );
        for bad in ["perPage=2", "perPage=9001", "perPage=x", "perPage="] {
            let e = parse_query(Some(bad)).unwrap_err();
            assert!(e.contains("between 3 and 9000"), "{bad}: {e}");
        }
    }

    #[test]
    fn pages_follow_the_cursors() {
        let ids = ["1", "2", "3", "4", "5", "6", "7"];
        assert_eq!(select(&ids, &q(3, None, None)), (0, 3));
        assert_eq!(select(&ids, &q(3, Some("3"), None)), (3, 6));
        assert_eq!(select(&ids, &q(3, Some("6"), None)), (6, 7));
        assert_eq!(select(&ids, &q(3, Some("7"), None)), (7, 7));
        // A cursor that is no id still orders.
        assert_eq!(select(&ids, &q(3, Some("35"), None)), (3, 6));
        assert_eq!(select(&ids, &q(3, None, Some("4"))), (0, 3));
        assert_eq!(select(&ids, &q(3, None, Some("7"))), (3, 6));
        assert_eq!(select(&ids, &q(3, None, Some("zzzz"))), (4, 7));
        assert_eq!(select(&ids, &q(3, Some("2"), Some("5"))), (2, 4));
        assert_eq!(select(&[], &q(3, None, None)), (0, 0));
    }

    #[test]
    fn links_lead_through_every_page_and_back() {
        let ids = ["1", "2", "3", "4", "5", "6", "7"];
        let base = "/api/v1/organizations";
        assert_eq!(
            links(base, &ids, 3, 0, 3),
            "</api/v1/organizations?perPage=3>; rel=first, \
             </api/v1/organizations?perPage=3&startingAfter=3>; rel=next, \
             </api/v1/organizations?perPage=3&startingAfter=4>; rel=last"
        );
        assert_eq!(
            links(base, &ids, 3, 3, 6),
            "</api/v1/organizations?perPage=3>; rel=first, \
             </api/v1/organizations?perPage=3&endingBefore=4>; rel=prev, \
             </api/v1/organizations?perPage=3&startingAfter=6>; rel=next, \
             </api/v1/organizations?perPage=3&startingAfter=4>; rel=last"
        );
        assert_eq!(
            links(
                "https://api.meraki.com/api/v1/organizations",
                &ids[..2],
                9000,
                0,
                2
            ),
            "<https://api.meraki.com/api/v1/organizations?perPage=9000>; rel=first, \
             <https://api.meraki.com/api/v1/organizations?perPage=9000>; rel=last"
        );
        // Walking `next` from the first page visits every id once, in order.
        let mut seen = Vec::new();
        let mut page = q(3, None, None);
        for _ in 0..10 {
            let (s, e) = select(&ids, &page);
            seen.extend_from_slice(&ids[s..e]);
            let l = links(base, &ids, 3, s, e);
            let Some(next) = crate::lookup::link_target(&l, "next") else {
                break;
            };
            page = parse_query(next.split_once('?').map(|x| x.1)).unwrap();
        }
        assert_eq!(seen, ids);
        // And `prev` from the last page walks back.
        let (s, e) = select(&ids, &q(3, Some("4"), None));
        assert_eq!((s, e), (4, 7));
        let l = links(base, &ids, 3, s, e);
        let prev = crate::lookup::link_target(&l, "prev").unwrap();
        let back = parse_query(prev.split_once('?').map(|x| x.1)).unwrap();
        assert_eq!(select(&ids, &back), (1, 4));
    }
}
