//! Configuration parsing: any text gives a configuration or an error that names the file,
//! never a panic, and never an error that repeats a secret from the environment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

const SECRET: &str = "fuzz-client-secret-0123456789";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| match name {
        "KEY" => Some("11".repeat(32)),
        "SECRET" => Some(SECRET.to_owned()),
        _ => None,
    };
    match meraki_oauth_proxy::config::Config::parse(text, Path::new("/nonexistent/proxy.toml"), &env) {
        Ok(c) => assert!(!c.to_string().contains(SECRET)),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("proxy.toml"), "{msg}");
            assert!(!msg.contains(SECRET), "{msg}");
        }
    }
});
