//! Bar (c) of SPEC.md: a minimal Pingora pass-through (`upstream_peer` only, default
//! `ServerConf` but for `threads`), the baseline the proxy's throughput is measured against.
//!
//! ```text
//! passthrough [LISTEN [UPSTREAM [THREADS]]]   (or PASSTHROUGH_LISTEN, _UPSTREAM, _THREADS)
//! ```
//!
//! Pingora's knobs, for `bash benches/load.sh knobs` (defaults: Pingora's):
//! `PASSTHROUGH_WORK_STEALING` (`true`), `PASSTHROUGH_POOL` (upstream keep-alive pool size, 128),
//! `PASSTHROUGH_LISTENER_TASKS` (accept tasks per listening socket, 1). The allocator is the
//! system's; `passthrough_jemalloc` is the same program on jemalloc, as the proxy ships.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;

struct Pass(SocketAddr);

#[async_trait]
impl ProxyHttp for Pass {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.0, false, String::new())))
    }
}

fn arg(i: usize, env: &str, default: &str) -> String {
    let env = std::env::var(format!("PASSTHROUGH_{env}")).unwrap_or_else(|_| default.into());
    std::env::args().nth(i).unwrap_or(env)
}

fn knob<T: std::str::FromStr>(env: &str, default: T) -> T {
    match std::env::var(format!("PASSTHROUGH_{env}")) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("PASSTHROUGH_{env}: not a valid value: {v}")),
        Err(_) => default,
    }
}

pub fn main() {
    let listen = arg(1, "LISTEN", "127.0.0.1:8081");
    let upstream = arg(2, "UPSTREAM", "127.0.0.1:9400")
        .parse()
        .expect("UPSTREAM: IP:PORT");
    let threads = arg(3, "THREADS", "1").parse().expect("THREADS: a number");
    let defaults = ServerConf::default();
    let mut server = Server::new_with_opt_and_conf(
        None,
        ServerConf {
            threads,
            work_stealing: knob("WORK_STEALING", defaults.work_stealing),
            upstream_keepalive_pool_size: knob("POOL", defaults.upstream_keepalive_pool_size),
            listener_tasks_per_fd: knob("LISTENER_TASKS", defaults.listener_tasks_per_fd),
            ..defaults
        },
    );
    server.bootstrap();
    let mut service = http_proxy_service(&server.configuration, Pass(upstream));
    service.add_tcp(&listen);
    server.add_service(service);
    server.run_forever();
}
