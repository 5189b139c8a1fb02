//! `Link` rewriting: never panics, and every target it leaves leads back through the proxy
//! (a path-absolute `/api/v1` reference), never elsewhere.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let Some(out) = meraki_oauth_proxy::forward::rewrite_link(value, "/api/v1") else {
        return;
    };
    let mut rest = out.as_str();
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let close = after.find('>').expect("every target is closed");
        let target = &after[..close];
        assert!(
            target == "/api/v1" || target.starts_with("/api/v1/") || target.starts_with("/api/v1?"),
            "{value:?} -> {out:?}"
        );
        rest = &after[close + 1..];
    }
});
