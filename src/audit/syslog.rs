//! The syslog sink: every audit line, unchanged, as the MSG of one RFC 5424 message, with the
//! fields a SIEM filters on (seq, client, organization, decision, reason, event) as structured
//! data. Sent over UDP (one datagram per record, RFC 5426), TCP (octet-counted frames, RFC 6587
//! §3.4.1) or a local datagram socket (`/dev/log`).
//!
//! The writer thread drives it like the file: it reports how many whole lines it delivered, so
//! only the rest is held and sent again. A TCP frame is written whole or the connection is
//! dropped (the receiver sees an incomplete frame at the end of a closed connection) and the
//! frame sent again on the next one. Nothing here ever blocks a request thread.

use crate::config::{SyslogConfig, SyslogTarget};
use serde::Deserialize;
use std::borrow::Cow;
use std::io::{self, Write};
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The SD-ID of the proxy's structured data: a private name under 32473, the enterprise number
/// RFC 5612 reserves for documentation (RFC 5424 §6.3.2 names private SD-IDs `name@number`).
pub const SD_ID: &str = "meraki-proxy@32473";
/// Severity of every record: informational (6). The decision is in the structured data.
const SEVERITY: u8 = 6;
/// A message longer than this is not sent (counted lost; the file keeps the record): it would
/// not fit a UDP datagram, and receivers cut long messages (rsyslog's default is 8 KiB; raise its
/// `maxMessageSize` to 64k).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// How long one connect or send may take before the sink counts as failing.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// RFC 5424 §6.2.4: HOSTNAME is at most 255 characters.
const MAX_HOSTNAME: usize = 255;

/// The header fields that are the same for every message.
#[derive(Debug, Clone)]
pub struct Header {
    /// `<PRI>`: facility × 8 + severity.
    pub pri: u8,
    pub hostname: String,
    pub app_name: String,
    pub procid: String,
}

impl Header {
    /// This host's name, this process's id, the configured facility and APP-NAME.
    pub fn of(config: &SyslogConfig) -> Header {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Header {
            pri: config.facility * 8 + SEVERITY,
            hostname: header_field(host.trim(), MAX_HOSTNAME),
            app_name: header_field(&config.app_name, 48),
            procid: std::process::id().to_string(),
        }
    }
}

/// A header field as RFC 5424 allows it (printable US-ASCII, bounded), or the NILVALUE `-`.
fn header_field(value: &str, max: usize) -> String {
    if value.is_empty() || value.len() > max || !value.bytes().all(|b| (33..=126).contains(&b)) {
        "-".into()
    } else {
        value.to_owned()
    }
}

/// What the structured data and the header take from an audit line.
#[derive(Deserialize, Default)]
struct Fields<'a> {
    seq: Option<u64>,
    #[serde(borrow)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    client: Option<Cow<'a, str>>,
    #[serde(borrow)]
    organization: Option<Cow<'a, str>>,
    #[serde(borrow)]
    decision: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reason: Option<Cow<'a, str>>,
    #[serde(borrow)]
    event: Option<Cow<'a, str>>,
}

/// One RFC 5424 message, its fields already valid (header fields: printable ASCII or `-`).
pub struct Message<'a> {
    pub pri: u8,
    pub timestamp: &'a str,
    pub hostname: &'a str,
    pub app_name: &'a str,
    pub procid: &'a str,
    pub msgid: &'a str,
    /// SD-ELEMENTs: SD-ID and its parameters; none is the NILVALUE.
    pub sd: &'a [(&'a str, &'a [(&'a str, &'a str)])],
    pub msg: Option<&'a [u8]>,
    /// MSG is UTF-8 and starts with the BOM (RFC 5424 §6.4).
    pub bom: bool,
}

impl Message<'_> {
    /// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD [SP MSG]`, appended to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        let _ = write!(
            out,
            "<{}>1 {} {} {} {} {} ",
            self.pri, self.timestamp, self.hostname, self.app_name, self.procid, self.msgid
        );
        if self.sd.is_empty() {
            out.push(b'-');
        }
        for (id, params) in self.sd {
            out.push(b'[');
            out.extend_from_slice(id.as_bytes());
            for (name, value) in *params {
                let _ = write!(out, " {name}=\"");
                escape_param(value, out);
                out.push(b'"');
            }
            out.push(b']');
        }
        if let Some(msg) = self.msg {
            out.push(b' ');
            if self.bom {
                out.extend_from_slice(b"\xEF\xBB\xBF");
            }
            out.extend_from_slice(msg);
        }
    }
}

/// Appends the RFC 5424 message of one audit line (without its newline) to `out`: TIMESTAMP is
/// the record's `time`, MSGID its `kind`, the structured data [`SD_ID`] with its `seq`,
/// `client`, `organization`, `decision`, `reason`, `event`, and MSG the line itself, without a
/// BOM (RFC 5424's MSG-ANY): receivers keep a BOM in the message (rsyslog's `%msg%` does), where
/// it would break every JSON parser reading the record.
pub fn format(header: &Header, line: &[u8], out: &mut Vec<u8>) {
    let fields: Fields = serde_json::from_slice(line).unwrap_or_default();
    let nil_or = |v: Option<&str>| v.map_or_else(|| "-".to_owned(), |v| header_field(v, 32));
    let timestamp = fields
        .time
        .as_deref()
        .map_or_else(|| "-".to_owned(), timestamp);
    let msgid = nil_or(fields.kind.as_deref());
    let seq = fields.seq.map(|s| s.to_string());
    let all = [
        ("seq", seq.as_deref()),
        ("client", fields.client.as_deref()),
        ("organization", fields.organization.as_deref()),
        ("decision", fields.decision.as_deref()),
        ("reason", fields.reason.as_deref()),
        ("event", fields.event.as_deref()),
    ];
    let params: Vec<(&str, &str)> = all.iter().filter_map(|(n, v)| v.map(|v| (*n, v))).collect();
    let element = [(SD_ID, params.as_slice())];
    Message {
        pri: header.pri,
        timestamp: &timestamp,
        hostname: &header.hostname,
        app_name: &header.app_name,
        procid: &header.procid,
        msgid: &msgid,
        sd: if params.is_empty() { &[] } else { &element },
        msg: Some(line),
        bom: false,
    }
    .write(out);
}

/// A record's RFC 3339 `time` as RFC 5424's TIMESTAMP, whose fraction has at most 6 digits
/// (§6.2.3; rsyslog turns a 9-digit one into garbage): the digits beyond are cut, not rounded.
fn timestamp(time: &str) -> String {
    let valid = |t: &str| header_field(t, 32);
    let Some((whole, rest)) = time.split_once('.') else {
        return valid(time);
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return "-".into();
    }
    valid(&format!(
        "{whole}.{}{}",
        &rest[..digits.min(6)],
        &rest[digits..]
    ))
}

/// RFC 5424 §6.3.3: in a PARAM-VALUE, `"`, `\` and `]` are escaped with a backslash.
fn escape_param(value: &str, out: &mut Vec<u8>) {
    for b in value.bytes() {
        if matches!(b, b'"' | b'\\' | b']') {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// An open connection to the receiver.
enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Unix(UnixDatagram),
}

/// Sends audit lines to a syslog receiver, one message per line. Connects on first use (the
/// proxy starts while the receiver is down, and says the sink fails) and again after a failure.
pub struct SyslogSink {
    target: SyslogTarget,
    header: Header,
    conn: Option<Conn>,
    /// Lines too long to send, not yet counted lost by the writer.
    oversized: u64,
    message: Vec<u8>,
}

impl std::fmt::Debug for SyslogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SyslogSink({})", self.target)
    }
}

impl SyslogSink {
    /// A sink for `config`; nothing is connected yet.
    pub fn new(config: &SyslogConfig) -> SyslogSink {
        SyslogSink {
            target: config.target.clone(),
            header: Header::of(config),
            conn: None,
            oversized: 0,
            message: Vec::with_capacity(1024),
        }
    }

    /// How readiness and the logs name it.
    pub fn describe(&self) -> String {
        format!("syslog {}", self.target)
    }

    /// Lines skipped because they were longer than [`MAX_MESSAGE`], since the last call.
    pub fn take_oversized(&mut self) -> u64 {
        std::mem::take(&mut self.oversized)
    }

    /// Sends whole lines (each ending in `\n`), one message each. Returns the bytes of `lines`
    /// delivered (always whole lines) and the error that stopped the rest, if any.
    pub fn write(&mut self, lines: &[u8]) -> (usize, io::Result<()>) {
        if let Err(e) = self.check_connection() {
            return (0, Err(e));
        }
        let mut sent = 0;
        for line in lines.split_inclusive(|b| *b == b'\n') {
            let body = line.strip_suffix(b"\n").unwrap_or(line);
            let mut message = std::mem::take(&mut self.message);
            message.clear();
            format(&self.header, body, &mut message);
            let result = if message.len() > MAX_MESSAGE {
                self.oversized += 1;
                Ok(())
            } else {
                self.send(&message)
            };
            self.message = message;
            if let Err(e) = result {
                // Whatever state the connection is in (a frame cut half-way), it is not reused.
                self.conn = None;
                return (sent, Err(e));
            }
            sent += line.len();
        }
        (sent, Ok(()))
    }

    /// Whether the receiver is there, for a writer with nothing to send: `Some` only where that
    /// can be told without sending (TCP: the connection is open or can be made again).
    pub fn probe(&mut self) -> Option<io::Result<()>> {
        match self.target {
            SyslogTarget::Tcp { .. } => Some(self.check_connection()),
            _ => None,
        }
    }

    /// A TCP connection the receiver closed (it stopped or restarted) is replaced before
    /// anything is written to it: a write would succeed into the kernel's buffer and be lost.
    fn check_connection(&mut self) -> io::Result<()> {
        if let Some(Conn::Tcp(s)) = &self.conn {
            if !tcp_open(s) {
                self.conn = None;
            }
        }
        if self.conn.is_none() && matches!(self.target, SyslogTarget::Tcp { .. }) {
            self.conn = Some(self.connect()?);
        }
        Ok(())
    }

    fn send(&mut self, message: &[u8]) -> io::Result<()> {
        if self.conn.is_none() {
            self.conn = Some(self.connect()?);
        }
        let Some(conn) = &mut self.conn else {
            return Err(io::Error::other("not connected"));
        };
        match conn {
            Conn::Udp(s) => {
                // An ICMP "port unreachable" for an earlier datagram: the receiver is gone.
                if let Some(e) = s.take_error()? {
                    return Err(e);
                }
                whole_datagram(s.send(message)?, message)
            }
            Conn::Unix(s) => whole_datagram(s.send(message)?, message),
            Conn::Tcp(s) => {
                let mut frame = Vec::with_capacity(message.len() + 8);
                let _ = write!(frame, "{} ", message.len());
                frame.extend_from_slice(message);
                s.write_all(&frame)
            }
        }
    }

    fn connect(&self) -> io::Result<Conn> {
        match &self.target {
            SyslogTarget::Udp { host, port } => {
                let addr = resolve(host, *port)?;
                let local: std::net::SocketAddr = if addr.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    ([0u16; 8], 0).into()
                };
                let s = UdpSocket::bind(local)?;
                s.connect(addr)?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(Conn::Udp(s))
            }
            SyslogTarget::Tcp { host, port } => {
                let s = TcpStream::connect_timeout(&resolve(host, *port)?, IO_TIMEOUT)?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                s.set_nodelay(true)?;
                Ok(Conn::Tcp(s))
            }
            SyslogTarget::Unix(path) => {
                let s = UnixDatagram::unbound()?;
                s.connect(path)?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(Conn::Unix(s))
            }
        }
    }
}

/// The first address `host` resolves to (on the writer thread: a slow resolver delays only it).
fn resolve(host: &str, port: u16) -> io::Result<std::net::SocketAddr> {
    (host, port).to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        )
    })
}

fn whole_datagram(sent: usize, message: &[u8]) -> io::Result<()> {
    if sent == message.len() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "datagram cut: {sent} of {} bytes sent",
            message.len()
        )))
    }
}

/// Whether the peer has not closed the connection (nothing to read yet, or data).
fn tcp_open(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    let open = match s.peek(&mut [0u8; 1]) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    };
    open && s.set_nonblocking(false).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn header() -> Header {
        Header {
            pri: 4 * 8 + SEVERITY,
            hostname: "proxy1.example.com".into(),
            app_name: "meraki-oauth-proxy".into(),
            procid: "4242".into(),
        }
    }

    fn text(header: &Header, line: &str) -> String {
        let mut out = Vec::new();
        format(header, line.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    }

    /// The four examples of RFC 5424 §6.5, byte for byte (BOM written as the RFC does).
    #[test]
    fn the_rfcs_examples() {
        let m = |pri, timestamp, hostname, app_name, procid, msgid, sd, msg: Option<&str>, bom| {
            let mut out = Vec::new();
            Message {
                pri,
                timestamp,
                hostname,
                app_name,
                procid,
                msgid,
                sd,
                msg: msg.map(str::as_bytes),
                bom,
            }
            .write(&mut out);
            String::from_utf8(out).unwrap().replace('\u{feff}', "BOM")
        };
        assert_eq!(
            m(34, "2003-10-11T22:14:15.003Z", "mymachine.example.com", "su", "-", "ID47", &[],
              Some("'su root' failed for lonvick on /dev/pts/8"), true),
            "<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - BOM'su root' failed for lonvick on /dev/pts/8"
        );
        assert_eq!(
            m(165, "2003-08-24T05:14:15.000003-07:00", "192.0.2.1", "myproc", "8710", "-", &[],
              Some("%% It's time to make the do-nuts."), false),
            "<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - %% It's time to make the do-nuts."
        );
        let ex3: &[(&str, &[(&str, &str)])] = &[(
            "exampleSDID@32473",
            &[
                ("iut", "3"),
                ("eventSource", "Application"),
                ("eventID", "1011"),
            ],
        )];
        assert_eq!(
            m(165, "2003-10-11T22:14:15.003Z", "mymachine.example.com", "evntslog", "-", "ID47", ex3,
              Some("An application event log entry..."), true),
            "<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\" eventSource=\"Application\" eventID=\"1011\"] BOMAn application event log entry..."
        );
        let ex4: &[(&str, &[(&str, &str)])] =
            &[ex3[0], ("examplePriority@32473", &[("class", "high")])];
        assert_eq!(
            m(165, "2003-10-11T22:14:15.003Z", "mymachine.example.com", "evntslog", "-", "ID47", ex4, None, false),
            "<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\" eventSource=\"Application\" eventID=\"1011\"][examplePriority@32473 class=\"high\"]"
        );
        // §6.3.3: '"', '\' and ']' are escaped in a PARAM-VALUE (the §6.3.5 example's value).
        let mut sd = Vec::new();
        escape_param(r#"Some "quoted" \ text]"#, &mut sd);
        assert_eq!(
            String::from_utf8(sd).unwrap(),
            r#"Some \"quoted\" \\ text\]"#
        );
    }

    #[test]
    fn an_audit_line_as_a_message() {
        let line = r#"{"seq":7,"time":"2003-10-11T22:14:15.003Z","kind":"request","client":"al\"i]ce","organization":"111","decision":"denied","reason":"unknown_key"}"#;
        assert_eq!(
            text(&header(), line),
            format!(
                "<38>1 2003-10-11T22:14:15.003Z proxy1.example.com meraki-oauth-proxy 4242 request [meraki-proxy@32473 seq=\"7\" client=\"al\\\"i\\]ce\" organization=\"111\" decision=\"denied\" reason=\"unknown_key\"] {line}"
            )
        );
    }

    #[test]
    fn absent_fields_and_non_ascii_lines() {
        // No SD field at all: the NILVALUE; a line that is not JSON keeps a nil header too.
        assert_eq!(
            text(&header(), "not json"),
            "<38>1 - proxy1.example.com meraki-oauth-proxy 4242 - - not json"
        );
        let line = r#"{"seq":0,"time":"2026-01-02T03:04:05Z","kind":"audit","event":"checkpoint","client":null}"#;
        assert!(text(&header(), line)
            .contains(" audit [meraki-proxy@32473 seq=\"0\" event=\"checkpoint\"] {"));
        // UTF-8 beyond ASCII: MSG is the line as it is, without a BOM (a JSON parser's input).
        let mut out = Vec::new();
        format(&header(), "{\"client\":\"zoë\"}".as_bytes(), &mut out);
        let expected = "<38>1 - proxy1.example.com meraki-oauth-proxy 4242 - [meraki-proxy@32473 client=\"zoë\"] {\"client\":\"zoë\"}";
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        // A time that is no valid header field is the NILVALUE.
        assert!(text(&header(), r#"{"time":"a b"}"#).starts_with("<38>1 - "));
        // At most 6 fractional digits (RFC 5424 §6.2.3).
        for (time, stamp) in [
            (
                "2026-12-05T23:22:09.123456789Z",
                "2026-12-05T23:22:09.123456Z",
            ),
            ("2026-12-05T23:22:09.063Z", "2026-12-05T23:22:09.063Z"),
            ("2026-12-05T23:22:09Z", "2026-12-05T23:22:09Z"),
            (
                "2026-12-05T23:22:09.1234567+01:00",
                "2026-12-05T23:22:09.123456+01:00",
            ),
            ("2026-12-05T23:22:09.Z", "-"),
        ] {
            assert_eq!(timestamp(time), stamp);
        }
    }

    #[test]
    fn tcp_frames_are_octet_counted_and_a_closed_receiver_is_noticed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = SyslogConfig {
            target: SyslogTarget::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            facility: 10,
            app_name: "t".into(),
        };
        let mut sink = SyslogSink::new(&config);
        let lines = b"{\"seq\":0,\"kind\":\"audit\"}\n{\"seq\":1,\"kind\":\"request\"}\n";
        let (sent, r) = sink.write(lines);
        r.unwrap();
        assert_eq!(sent, lines.len());
        let (mut peer, _) = listener.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.iter().filter(|b| **b == b'{').count() < 2 {
            let n = peer.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        // Each frame: decimal length, a space, that many octets.
        let mut rest = &got[..];
        let mut messages = Vec::new();
        while !rest.is_empty() {
            let sp = rest.iter().position(|b| *b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&rest[..sp]).unwrap().parse().unwrap();
            messages.push(String::from_utf8(rest[sp + 1..sp + 1 + len].to_vec()).unwrap());
            rest = &rest[sp + 1 + len..];
        }
        assert_eq!(messages.len(), 2);
        assert!(messages[0].starts_with("<86>1 - "), "{}", messages[0]);
        assert!(messages[1].ends_with("{\"seq\":1,\"kind\":\"request\"}"));
        // The receiver goes away: noticed without sending, and nothing is counted delivered.
        drop(peer);
        drop(listener);
        let mut failed = false;
        for _ in 0..100 {
            if matches!(sink.probe(), Some(Err(_))) {
                failed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(failed, "a closed receiver was not noticed");
        let (sent, r) = sink.write(lines);
        assert!(r.is_err());
        assert_eq!(sent, 0);
    }

    #[test]
    fn oversized_lines_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let mut sink = SyslogSink::new(&SyslogConfig {
            target: SyslogTarget::Unix(path),
            facility: 4,
            app_name: "t".into(),
        });
        let big = format!("{{\"seq\":1,\"path\":\"{}\"}}\n", "x".repeat(MAX_MESSAGE));
        let lines = format!("{{\"seq\":0}}\n{big}{{\"seq\":2}}\n");
        let (sent, r) = sink.write(lines.as_bytes());
        r.unwrap();
        assert_eq!(sent, lines.len());
        assert_eq!(sink.take_oversized(), 1);
        let mut buf = vec![0u8; 2 * MAX_MESSAGE];
        for seq in [0, 2] {
            let n = receiver.recv(&mut buf).unwrap();
            let m = String::from_utf8(buf[..n].to_vec()).unwrap();
            assert!(m.ends_with(&format!("{{\"seq\":{seq}}}")), "{m}");
        }
        // The receiver is gone: the send fails, nothing counted delivered.
        drop(receiver);
        let (sent, r) = sink.write(b"{\"seq\":3}\n");
        assert!(r.is_err());
        assert_eq!(sent, 0);
    }
}
