//! Action-batch checking: a resource the proxy accepts as canonical is read the same way by a
//! URL parser, so what is checked is what Meraki acts on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meraki_oauth_proxy::route::{batch_resources, canonical_resource, parse, Target};

fuzz_target!(|data: &[u8]| {
    let _ = batch_resources(data);
    let Ok(resource) = std::str::from_utf8(data) else {
        return;
    };
    if canonical_resource(resource).is_err() {
        return;
    }
    let route = parse(&format!("/api/v1{resource}"), &http::Method::GET)
        .expect("a canonical resource parses");
    let url = url::Url::parse(&format!("http://meraki.test/api/v1{resource}"))
        .expect("a canonical resource is a URL path");
    assert!(url.query().is_none() && url.fragment().is_none(), "{resource:?}");
    let segs: Vec<String> = url
        .path_segments()
        .expect("a path")
        .skip(2)
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    if let Target::Organization(id) | Target::Network(id) | Target::Device(id) = &route.target {
        assert_eq!(segs.get(1), Some(id), "{resource:?}");
        assert!(segs[0].eq_ignore_ascii_case(match route.target {
            Target::Organization(_) => "organizations",
            Target::Network(_) => "networks",
            _ => "devices",
        }));
    }
});
