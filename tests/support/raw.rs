//! HTTP/1 on a raw socket, for requests no client library would send: write the bytes, read what
//! the server answers, and pick the answer apart.

use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `raw` on a new connection to the proxy's `port` and returns what comes back until the
/// server closes, nothing arrives for `quiet`, or `max` passes. A write the server cut short (it
/// may answer and close before reading everything) is not an error.
pub async fn exchange(port: u16, raw: &[u8], quiet: Duration, max: Duration) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = c.write_all(raw).await;
    read_until(&mut c, quiet, max).await
}

/// What the server sends until it closes the connection, nothing arrives for `quiet`, or `max`
/// passes.
pub async fn read_until(c: &mut TcpStream, quiet: Duration, max: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    let end = Instant::now() + max;
    loop {
        let wait = quiet.min(end.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, c.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response in `response`.
pub fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The JSON body of the first response (`Null` if it is not JSON).
pub fn errors_body(response: &str) -> Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(Value::Null)
}

/// A header of the first response.
pub fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}
