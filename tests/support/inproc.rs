//! The real server, in this process: `server::run` on listeners the test bound to port 0, so
//! no port is raced for; stopped (and waited for) when dropped.

use super::harness::{CLIENT_SECRET, STORE_KEY};
use meraki_oauth_proxy::config::{Config, ConfigError};
use meraki_oauth_proxy::server::{self, Listeners};
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use std::net::TcpListener;
use std::path::Path;
use std::thread::JoinHandle;
use tokio::sync::watch;

/// Two loopback listeners on ports the kernel chose: (proxy, admin).
pub fn bind() -> (TcpListener, TcpListener) {
    (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
}

/// A running in-process server.
pub struct InProcess {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

struct Stop(watch::Receiver<bool>);

#[async_trait::async_trait]
impl ShutdownSignalWatch for Stop {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stop| *stop).await;
        ShutdownSignal::GracefulTerminate
    }
}

impl InProcess {
    /// Loads `config` (secrets as the harness gives them to the binary) and runs the server on
    /// these listeners in a thread of its own.
    pub fn start(config: &Path, proxy: TcpListener, admin: TcpListener) -> InProcess {
        let env = |name: &str| match name {
            "MERAKI_PROXY_STORE_KEY" => Some(STORE_KEY.to_string()),
            "NETOPS_CLIENT_SECRET" => Some(CLIENT_SECRET.to_string()),
            _ => None,
        };
        let path = config.to_path_buf();
        let load = move || -> Result<Config, ConfigError> {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                file: path.display().to_string(),
                source,
            })?;
            Config::parse(&text, &path, &env)
        };
        let config = load().unwrap();
        let (tx, rx) = watch::channel(false);
        let thread = std::thread::spawn(move || {
            let listeners = Listeners {
                proxy,
                admin: Some(admin),
            };
            server::run(server::Launch {
                config,
                loader: std::sync::Arc::new(load),
                listeners,
                shutdown: Box::new(Stop(rx)),
                exit_when_drained: false,
            })
            .unwrap();
        });
        InProcess {
            stop: tx,
            thread: Some(thread),
        }
    }

    /// Stops the server and waits until it has.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            t.join().expect("the server thread panicked");
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown();
    }
}
