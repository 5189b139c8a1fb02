//! Bar (c) of SPEC.md: a minimal Pingora pass-through (`upstream_peer` only, default
//! `ServerConf` but for `threads`), the baseline the proxy's throughput is measured against.
//!
//! ```text
//! passthrough [LISTEN [UPSTREAM [THREADS]]]   (or PASSTHROUGH_LISTEN, _UPSTREAM, _THREADS)
//! ```

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

fn main() {
    let listen = arg(1, "LISTEN", "127.0.0.1:8081");
    let upstream = arg(2, "UPSTREAM", "127.0.0.1:9400")
        .parse()
        .expect("UPSTREAM: IP:PORT");
    let threads = arg(3, "THREADS", "1").parse().expect("THREADS: a number");
    let mut server = Server::new_with_opt_and_conf(
        None,
        ServerConf {
            threads,
            ..Default::default()
        },
    );
    server.bootstrap();
    let mut service = http_proxy_service(&server.configuration, Pass(upstream));
    service.add_tcp(&listen);
    server.add_service(service);
    server.run_forever();
}
