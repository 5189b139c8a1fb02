//! Path normalization and organization routing: whatever the path, a route the proxy accepts
//! names the organization that the forwarded path names, for the proxy and for a plain URL
//! parser alike, and parsing the forwarded path again gives the same route.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meraki_oauth_proxy::route::{parse, Target};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for method in [http::Method::GET, http::Method::POST] {
        let Ok(route) = parse(path, &method) else {
            continue;
        };
        let again = parse(&format!("/api/v1{}", route.path), &method)
            .expect("the forwarded path parses");
        assert_eq!(again.target, route.target, "{path:?}");
        assert_eq!(again.path, route.path, "{path:?}");
        if let Target::Organization(org) | Target::Network(org) | Target::Device(org) =
            &route.target
        {
            // A URL parser (WHATWG, as many servers use) reads the same id from what is sent.
            let url = url::Url::parse(&format!("http://meraki.test/api/v1{}", route.path))
                .expect("the forwarded path is a valid URL path");
            let segs: Vec<String> = url
                .path_segments()
                .expect("a path")
                .map(|s| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8_lossy()
                        .into_owned()
                })
                .collect();
            assert_eq!(segs.get(3), Some(org), "{path:?} -> {}", route.path);
        }
    }
});
