//! Properties of isolation over generated input (proptest): for any path or action-batch
//! resource a client can send, what the proxy accepts acts only where the proxy checked, and a
//! URL parser (as the upstream may use) reads the same organization, network or device from the
//! bytes that are forwarded.

use meraki_oauth_proxy::route::{canonical_resource, parse, Target};
use proptest::prelude::*;

/// Segments an attacker would try, mixed with the ids of two tenants.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("organizations".to_string()),
        Just("Organizations".to_string()),
        Just("networks".to_string()),
        Just("devices".to_string()),
        Just("api".to_string()),
        Just("v1".to_string()),
        Just("111".to_string()),
        Just("222".to_string()),
        Just("L_111".to_string()),
        Just("L_222".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2e%2e".to_string()),
        Just("%2E".to_string()),
        Just("%252e%252e".to_string()),
        Just("%2F".to_string()),
        Just("%5C".to_string()),
        Just("..;".to_string()),
        Just(";x=1".to_string()),
        Just("%3F".to_string()),
        Just("%23".to_string()),
        Just("\u{ff0e}\u{ff0e}".to_string()),
        Just("%C0%AE".to_string()),
        Just("".to_string()),
        Just("L_111 ".to_string()),
        Just(" ".to_string()),
        Just("%20".to_string()),
        "[A-Za-z0-9_%:.-]{1,6}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("/api/v1/"), Just("/api/v1/api/v1/"), Just("//api/v1/")],
        prop::collection::vec(segment(), 1..7),
    )
        .prop_map(|(prefix, segs)| format!("{prefix}{}", segs.join("/")))
}

/// The id a URL parser reads after the collection in `path` (below `/api/v1`).
fn url_id(path: &str) -> Option<String> {
    let url = url::Url::parse(&format!("http://meraki.test/api/v1{path}")).ok()?;
    let seg = url.path_segments()?.nth(3)?;
    Some(
        percent_encoding::percent_decode_str(seg)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn an_accepted_path_names_the_same_object_for_the_proxy_and_upstream(p in path()) {
        if let Ok(route) = parse(&p, &http::Method::GET) {
            // What is forwarded parses to the same route: the checked bytes are the sent bytes.
            let again = parse(&format!("/api/v1{}", route.path), &http::Method::GET).unwrap();
            prop_assert_eq!(&again.target, &route.target);
            prop_assert_eq!(&again.path, &route.path);
            if let Target::Organization(id) | Target::Network(id) | Target::Device(id) = &route.target {
                let read = url_id(&route.path);
                prop_assert_eq!(read.as_ref(), Some(id), "{} -> {}", p, route.path);
                // No spelling survives that a second decoding or a dot-segment rule would move.
                prop_assert!(!route.path.contains("%25") && !route.path.contains("/../"));
            }
        }
    }

    #[test]
    fn a_canonical_batch_resource_is_read_alike_by_a_url_parser(
        segs in prop::collection::vec(segment(), 1..6),
        tail in prop_oneof![Just(String::new()), Just("?x=1".to_string()), Just("#f".to_string())],
    ) {
        let resource = format!("/{}{tail}", segs.join("/"));
        if canonical_resource(&resource).is_ok() {
            let route = parse(&format!("/api/v1{resource}"), &http::Method::GET).unwrap();
            if let Target::Organization(id) | Target::Network(id) | Target::Device(id) = &route.target {
                let read = url_id(&resource);
                prop_assert_eq!(read.as_ref(), Some(id), "{}", resource);
            }
            let url = url::Url::parse(&format!("http://meraki.test/api/v1{resource}")).unwrap();
            prop_assert!(url.query().is_none() && url.fragment().is_none());
        }
    }
}
