//! A small HTTP `CONNECT` proxy on loopback, standing for a corporate egress proxy: it opens
//! tunnels to the host names it knows (each to 127.0.0.1 on the requested port) and records
//! every tunnel: its target, whether it carried credentials, and the local address of its
//! outgoing connection (which the stand-in then sees as the peer).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One tunnel the proxy opened.
#[derive(Debug, Clone)]
pub struct Tunnel {
    /// `host:port` of the CONNECT request.
    pub target: String,
    /// The `Proxy-Authorization` header, if the client sent one.
    pub auth: Option<String>,
    /// The local address of the proxy's connection to the target.
    pub outgoing: SocketAddr,
}

/// A running CONNECT proxy; stops when dropped.
pub struct ConnectProxy {
    pub addr: SocketAddr,
    tunnels: Arc<Mutex<Vec<Tunnel>>>,
    refused: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectProxy {
    /// Starts on 127.0.0.1; tunnels only to `hosts` (any other target: 403).
    pub async fn start(hosts: &[&str]) -> ConnectProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hosts: Arc<HashSet<String>> = Arc::new(hosts.iter().map(|h| h.to_string()).collect());
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let (t, r) = (tunnels.clone(), refused.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (hosts, t, r) = (hosts.clone(), t.clone(), r.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, &hosts, &t, &r).await;
                });
            }
        });
        ConnectProxy {
            addr,
            tunnels,
            refused,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The tunnels opened so far.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels.lock().unwrap().clone()
    }

    /// The targets refused so far.
    pub fn refused(&self) -> Vec<String> {
        self.refused.lock().unwrap().clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut conn: tokio::net::TcpStream,
    hosts: &HashSet<String>,
    tunnels: &Mutex<Vec<Tunnel>>,
    refused: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).await? == 0 || head.len() > 8192 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let mut lines = text.split("\r\n");
    let request = lines.next().unwrap_or_default().to_owned();
    let auth = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("proxy-authorization"))
        .map(|(_, v)| v.trim().to_owned());
    let mut parts = request.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        conn.write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let target = target.to_owned();
    let Some((host, port)) = target.rsplit_once(':') else {
        conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let port: u16 = port.parse().unwrap_or(0);
    if !hosts.contains(host) {
        refused.lock().unwrap().push(target);
        conn.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    }
    let mut upstream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tunnels.lock().unwrap().push(Tunnel {
        target,
        auth,
        outgoing: upstream.local_addr()?,
    });
    conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
    Ok(())
}
