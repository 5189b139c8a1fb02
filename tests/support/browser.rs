//! Headless Chromium, Debian's package (`.ci/run` installs it), for tests of web pages: started
//! with the flags this machine's closed network needs and an empty profile of the test's own.

use std::process::Command;

pub fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

/// Loads `url` in headless Chromium and returns the DOM after load (redirects followed).
pub async fn dump_dom(url: String, profile: std::path::PathBuf) -> String {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--virtual-time-budget=5000", "--dump-dom"])
            .arg(url)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}): install Debian's chromium (.ci/run does)",
                    chromium()
                )
            });
        String::from_utf8_lossy(&out.stdout).to_string()
    })
    .await
    .unwrap()
}
