//! Built for MSPs (issue 25): thousands of organizations and client keys, against the real binary
//! and the Meraki stand-in. `GET /organizations` is one upstream listing per grant, paginated
//! like Meraki's; a 401 on it refreshes once; the status page holds 5,000 clients in pages under
//! 200 KB (rendered in headless Chromium); `/metrics` keeps the busiest clients by name.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;
use support::browser::dump_dom;
use support::harness::*;

/// The upstream listings the stand-in saw (`GET /api/v1/organizations`, any query).
fn listings(s: &Scenario) -> usize {
    s.standin
        .requests()
        .iter()
        .filter(|r| {
            let path = r.path_and_query.split('?').next().unwrap_or("");
            path == "/api/v1/organizations"
        })
        .count()
}

/// The target of `rel` in a `Link` header value.
fn link(value: &str, rel: &str) -> Option<String> {
    value.split(", ").find_map(|l| {
        let (target, params) = l.split_once(">; ")?;
        (params == format!("rel={rel}")).then(|| target.trim_start_matches('<').to_owned())
    })
}

/// GET `path_and_query` (path-absolute, as the proxy's `Link` gives it) as `key`: the ids
/// listed and the `Link` header.
async fn page(s: &Scenario, path_and_query: &str, key: &str) -> (Vec<String>, String) {
    let r = http()
        .get(format!("http://127.0.0.1:{}{path_and_query}", s.port))
        .header("X-Cisco-Meraki-API-Key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path_and_query}");
    let link = r
        .headers()
        .get("link")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body: serde_json::Value = r.json().await.unwrap();
    let ids = body
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap().to_owned())
        .collect();
    (ids, link)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_of_a_thousand_organizations_is_listed_in_one_walk_and_paged_by_the_proxys_links() {
    let ids: Vec<String> = (100_000..101_001u64).map(|i| i.to_string()).collect();
    let orgs = ids
        .iter()
        .map(|o| format!("\"{o}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let msp_key = "msp-key-0001";
    let clients = format!(
        "[[clients]]\nname = \"msp\"\nkey_sha256 = \"{}\"\nintegration = \"netops\"\norganizations = [{orgs}]\n",
        digest_hex(msp_key)
    );
    let s = Scenario::new(Options {
        clients,
        ..Options::default()
    })
    .await;
    s.import().await;
    let imported = s.import_many(100_000, 1001).await;
    assert_eq!(imported, ids);
    let _p = s.start().await;
    s.standin.clear_requests();

    // One page of 100, then the proxy's own links to the end.
    let (first, link0) = page(&s, "/api/v1/organizations?perPage=100", msp_key).await;
    assert_eq!(first.len(), 100);
    assert_eq!(
        link(&link0, "first").as_deref(),
        Some("/api/v1/organizations?perPage=100")
    );
    assert!(link(&link0, "prev").is_none(), "{link0}");
    let mut all = first.clone();
    let mut next = link(&link0, "next");
    let mut pages = 1;
    let mut last_link = link0.clone();
    while let Some(target) = next {
        assert!(pages < 20, "the walk does not end");
        let (ids, l) = page(&s, &target, msp_key).await;
        all.extend(ids);
        pages += 1;
        next = link(&l, "next");
        last_link = l;
    }
    assert_eq!(pages, 11);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(all, sorted, "every organization once, in order");
    // The last page links back.
    let prev = link(&last_link, "prev").expect("prev on the last page");
    let (back, _) = page(&s, &prev, msp_key).await;
    assert_eq!(back, sorted[900..1000]);
    // Eleven pages (and the page back) cost one upstream listing of perPage=9000.
    assert_eq!(listings(&s), 1, "{:?}", s.standin.requests().first());
    let req = s.standin.requests();
    assert!(
        req[0]
            .path_and_query
            .ends_with("/organizations?perPage=9000"),
        "{}",
        req[0].path_and_query
    );
    assert_eq!(req.len(), 1, "no call per organization");

    // Another client of the same grant's organizations is answered from the same listing,
    // filtered to its own.
    let (alice, _) = page(&s, "/api/v1/organizations", ALICE_KEY).await;
    assert_eq!(alice, vec!["111".to_owned()]);
    let (all_at_once, l) = page(&s, "/api/v1/organizations", msp_key).await;
    assert_eq!(all_at_once.len(), 1001);
    assert!(link(&l, "next").is_none());
    // alice's grant (of org 111) is walked once; the MSP's grant is still cached.
    assert_eq!(listings(&s), 2);

    // Meraki-style refusal of a bad perPage, nothing sent upstream.
    let r = s
        .script(reqwest::Method::GET, "/organizations?perPage=2", msp_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["errors"][0].as_str().unwrap().contains("perPage"),
        "{body}"
    );
    assert_eq!(listings(&s), 2);
}

#[tokio::test]
async fn a_401_on_the_listing_refreshes_once_and_the_listing_is_answered() {
    let s = Scenario::new(Options::default()).await;
    s.import().await;
    let _p = s.start().await;
    let calls = s.standin.token_calls();
    s.standin.expire_all_access_tokens();
    s.standin.clear_requests();
    let (ids, _) = page(&s, "/api/v1/organizations", ALICE_KEY).await;
    assert_eq!(ids, vec!["111".to_owned()]);
    assert_eq!(s.standin.token_calls(), calls + 1, "one refresh");
    let statuses: Vec<u16> = s.standin.requests().iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        vec![401, 200],
        "the listing, refused then retried"
    );
    // The refreshed token's listing is cached: nothing more upstream.
    let (ids, _) = page(&s, "/api/v1/organizations", ALICE_KEY).await;
    assert_eq!(ids, vec!["111".to_owned()]);
    assert_eq!(s.standin.request_count(), 2);
}

#[tokio::test]
async fn a_listing_is_cached_until_meraki_answers_404_for_one_of_its_organizations() {
    let key = "msp-key-404";
    let s = Scenario::new(Options {
        clients: format!(
            "[[clients]]\nname = \"msp\"\nkey_sha256 = \"{}\"\nintegration = \"netops\"\norganizations = [\"400000\", \"400001\", \"400002\"]\n",
            digest_hex(key)
        ),
        ..Options::default()
    })
    .await;
    s.import().await;
    s.import_many(400_000, 3).await;
    let _p = s.start().await;
    s.standin.clear_requests();
    let all = ["400000", "400001", "400002"].map(String::from).to_vec();
    assert_eq!(page(&s, "/api/v1/organizations", key).await.0, all);
    // Deleted at Meraki: the cached listing still has it (no second walk within 30 s)...
    s.standin.remove_org("400001");
    assert_eq!(page(&s, "/api/v1/organizations", key).await.0, all);
    assert_eq!(listings(&s), 1);
    // ...until Meraki answers 404 for it: the next list walks again and leaves it out.
    assert_eq!(s.status("/organizations/400001", key).await, 404);
    let (ids, _) = page(&s, "/api/v1/organizations", key).await;
    assert_eq!(ids, ["400000", "400002"]);
    assert_eq!(listings(&s), 2);
}

/// The `data-client` values of the clients table in a DOM.
fn client_rows(dom: &str) -> Vec<String> {
    let start = dom.find("<table id=\"clients\"").expect("clients table");
    let end = start + dom[start..].find("</table>").unwrap();
    dom[start..end]
        .split("<tr data-client=\"")
        .skip(1)
        .map(|r| r.split('"').next().unwrap().to_owned())
        .collect()
}

/// The `href` of the clients pager's `rel` link, unescaped.
fn pager_link(dom: &str, rel: &str) -> Option<String> {
    let start = dom.find("id=\"clients-pager\"")?;
    let nav = &dom[start..start + dom[start..].find("</nav>")?];
    let at = nav.find(&format!("rel=\"{rel}\" href=\""))? + rel.len() + 13;
    Some(nav[at..].split('"').next()?.replace("&amp;", "&"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_clients_page_by_fifty_in_chromium_with_search_and_trouble_first() {
    let orgs: Vec<String> = (200_000..201_000u64).map(|i| i.to_string()).collect();
    let mut clients = many_clients("c", 5000, |i| vec![orgs[i % orgs.len()].clone()]);
    // One client with an organization no grant serves: it is listed first.
    clients.push_str(&format!(
        "[[clients]]\nname = \"zz-orphan\"\nkey_sha256 = \"{}\"\nintegration = \"netops\"\norganizations = [\"999999\"]\n",
        digest_hex("orphan-key")
    ));
    let s = Scenario::new(Options {
        clients,
        ..Options::default()
    })
    .await;
    s.import().await;
    s.import_many(200_000, 1000).await;
    let p = s.start().await;

    let url = |q: &str| format!("http://127.0.0.1:{}/{q}", s.admin_port);
    let raw = http()
        .get(url(""))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        raw.len() < 200_000,
        "the status page is {} bytes at 5,000 clients",
        raw.len()
    );
    let profile = s.dir.path().join("chromium-profile");
    let dom = dump_dom(url(""), profile.clone()).await;
    let rows = client_rows(&dom);
    assert_eq!(rows.len(), 50, "{}", &dom[..dom.len().min(3000)]);
    assert_eq!(rows[0], "zz-orphan", "trouble first");
    assert!(dom.contains("no grant"));
    assert!(dom.contains("Page <span class=\"page\">1</span> of <span class=\"pages\">101</span>"));
    assert!(pager_link(&dom, "prev").is_none());

    // The pager's next link, followed in the browser.
    let next = pager_link(&dom, "next").expect("a next page");
    let dom2 = dump_dom(url(next.trim_start_matches('/')), profile.clone()).await;
    let rows2 = client_rows(&dom2);
    assert_eq!(rows2.len(), 50);
    assert!(
        rows2.iter().all(|r| !rows.contains(r)),
        "page 2 is other clients"
    );
    assert!(pager_link(&dom2, "prev").is_some());

    // Search by name, then by organization.
    let dom3 = dump_dom(url("?q=c-04321"), profile.clone()).await;
    assert_eq!(client_rows(&dom3), vec!["c-04321".to_owned()]);
    let dom4 = dump_dom(url("?q=200007"), profile).await;
    let found = client_rows(&dom4);
    assert_eq!(found.len(), 5, "{found:?}");
    assert!(found.iter().all(|c| c.starts_with("c-")));
    let grants = &dom4[dom4.find("<table id=\"grants\"").unwrap()..];
    assert!(grants.contains("and 990 more"), "org lists are cut at ten");
    drop(p);
}

#[tokio::test]
async fn metrics_keep_the_busiest_clients_by_name_and_fold_the_rest() {
    let clients = many_clients("m", 15, |_| vec!["111".to_owned()]);
    let s = Scenario::new(Options {
        clients,
        ..Options::default()
    })
    .await;
    s.import().await;
    let p = s.start().await;
    // Refused locally (org 222 is not theirs): counted, nothing upstream, nothing shaped.
    let hit = |i: usize, n: usize| {
        let s = &s;
        async move {
            for _ in 0..n {
                let st = s.status("/organizations/222", &format!("m-key-{i}")).await;
                assert_eq!(st, 403);
            }
        }
    };
    for i in 0..15 {
        hit(i, 1).await;
    }
    let scrape = || async { p.admin("/metrics").await.1 };
    let named = |text: &str| -> BTreeSet<String> {
        text.lines()
            .filter(|l| l.starts_with("meraki_proxy_requests_total{"))
            .filter_map(|l| l.split("client=\"").nth(1))
            .map(|r| r.split('"').next().unwrap().to_owned())
            .filter(|c| c != "-")
            .collect()
    };
    // A request is counted in `logging`, just after its response went out: each scrape waits
    // until the requests just answered are counted (bounded; the assertions say what is wrong).
    let scrape_until = |done: fn(&BTreeSet<String>) -> bool| {
        let scrape = &scrape;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let text = scrape().await;
                let names = named(&text);
                if done(&names) || std::time::Instant::now() > deadline {
                    return (text, names);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let (_, first) = scrape_until(|n| n.contains("other") && n.contains("m-00007")).await;
    assert!(first.contains("other"), "{first:?}");
    // The first ten clients of the configuration are named from the start (alice, bob and
    // m-00000..07), the rest count as "other".
    assert_eq!(
        first.len(),
        9,
        "eight names with requests and other: {first:?}"
    );
    assert!(first.contains("m-00007") && !first.contains("m-00008"));
    // (That scrape gave the idle alice's and bob's places to two of the others.)
    // m-00010..14 get busy: at the next scrape they replace five quiet ones, whose series go;
    // theirs appear with their next request.
    for i in 10..15 {
        hit(i, 6).await;
    }
    let second = named(&scrape().await);
    // Five quiet ones are let go, their series with them.
    assert!(second.len() <= 6 && second.contains("other"), "{second:?}");
    assert!(!second.contains("m-00010"), "{second:?}");
    for i in 10..15 {
        hit(i, 1).await;
    }
    let (text, third) = scrape_until(|n| (10..15).all(|i| n.contains(&format!("m-{i:05}")))).await;
    assert!(third.len() <= 11, "at most ten names and other: {third:?}");
    for i in 10..15 {
        assert!(third.contains(&format!("m-{i:05}")), "{third:?}");
    }
    assert!(second.is_subset(&third));
    // And it stays put while traffic is steady.
    for i in 0..15 {
        hit(i, 1).await;
    }
    // (A name chosen earlier whose requests all came before shows up now; none is lost.)
    let fourth = named(&scrape().await);
    assert!(
        third.is_subset(&fourth) && fourth.len() <= 11,
        "{third:?} {fourth:?}"
    );
    let series = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    assert!(series < 1000, "{series} series");
}
