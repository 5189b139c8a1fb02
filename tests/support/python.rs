//! Running the Python drivers (the official SDK, `meraki-client`) from the tests: off the async
//! runtime, with output to files, proxy variables removed (loopback is reached directly),
//! killed when they run too long.

use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a driver run left: its status, stdout, stderr and wall time.
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `cmd` (its stdout and stderr go to `stdout` and `stderr`), killing it after `timeout`;
/// `what` names it in a panic.
pub async fn run_bounded(
    mut cmd: Command,
    what: &str,
    stdout: PathBuf,
    stderr: PathBuf,
    timeout: Duration,
) -> Ran {
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap());
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    let what = what.to_owned();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut child = cmd.spawn().expect("cannot start the Python script");
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{what}: the script ran longer than {timeout:?}; stderr:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ran {
            status,
            elapsed: started.elapsed(),
            stdout: std::fs::read_to_string(&stdout).unwrap(),
            stderr: std::fs::read_to_string(&stderr).unwrap(),
        }
    })
    .await
    .unwrap()
}
