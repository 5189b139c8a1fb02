//! `[audit]` beyond its path: what the proxy does while the audit log cannot be written, how
//! often it reaches the disk, the key that signs its checkpoints, and the syslog sink (see
//! [`crate::audit`]).

use super::file;
use crate::secret::Secret;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// While the audit log cannot be written: refuse new requests, or serve them anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// New requests get 503 until the log writes again: nothing is forwarded without its record.
    Refuse,
    /// Requests are served; their records are held in memory (bounded) and the rest counted lost.
    Serve,
}

/// When written records are forced to the disk (`fdatasync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// At most this long after a record is written.
    Interval(Duration),
    /// After every batch the writer thread writes (every 20 ms under load).
    Always,
}

/// The validated `[audit]` settings (the path is [`super::Config::audit_path`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    pub on_failure: OnFailure,
    pub fsync: Fsync,
    /// A checkpoint record (signed with the HMAC key) after this many records.
    pub checkpoint_every: u64,
    /// Records held in memory while the log cannot be written; beyond, they are counted lost.
    pub buffer_records: usize,
    /// The checkpoints' HMAC-SHA256 key; `None`: checkpoints are unsigned.
    pub hmac_key: Option<Secret>,
    /// A second sink the records are also sent to, with its own health.
    pub syslog: Option<SyslogConfig>,
}

/// Where and how the records are sent to syslog (RFC 5424).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogConfig {
    pub target: SyslogTarget,
    /// The facility's code (RFC 5424 §6.2.1): `auth` is 4.
    pub facility: u8,
    /// APP-NAME: 1 to 48 printable US-ASCII characters.
    pub app_name: String,
}

/// A syslog receiver. Host names are resolved when the sink connects, not at validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogTarget {
    /// One datagram per record (RFC 5426): no acknowledgement, see docs/audit.md.
    Udp { host: String, port: u16 },
    /// Octet-counted frames over one connection (RFC 6587 §3.4.1).
    Tcp { host: String, port: u16 },
    /// One datagram per record on a local socket (`/dev/log`).
    Unix(PathBuf),
}

impl fmt::Display for SyslogTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyslogTarget::Udp { host, port } => write!(f, "udp://{}:{port}", bracket(host)),
            SyslogTarget::Tcp { host, port } => write!(f, "tcp://{}:{port}", bracket(host)),
            SyslogTarget::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The facilities by their usual names (RFC 5424 §6.2.1, as rsyslog and syslog(3) spell them).
pub const FACILITIES: &[(&str, u8)] = &[
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("ntp", 12),
    ("security", 13),
    ("console", 14),
    ("solaris-cron", 15),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

/// The default APP-NAME.
pub const DEFAULT_APP_NAME: &str = "meraki-oauth-proxy";
/// The default facility: `auth`, where security tools look for authorization records.
const DEFAULT_FACILITY: u8 = 4;
/// RFC 5424 §6.2.5: APP-NAME is at most 48 characters.
const MAX_APP_NAME: usize = 48;
/// Where a syslog URL gives no port: the registered syslog port (UDP) and rsyslog's usual TCP one.
const DEFAULT_SYSLOG_PORT: u16 = 514;

/// Parses `udp://host:port`, `tcp://host:port`, `unix:/path` (or `unix:///path`).
pub fn parse_syslog_target(text: &str) -> Result<SyslogTarget, String> {
    let expected = "expected \"udp://host:port\", \"tcp://host:port\" or \"unix:/path\"";
    if let Some(path) = text.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if !path.starts_with('/') {
            return Err(format!(
                "{expected}; a unix socket's path must be absolute, got {text:?}"
            ));
        }
        return Ok(SyslogTarget::Unix(PathBuf::from(path)));
    }
    let (tcp, rest) = match (text.strip_prefix("udp://"), text.strip_prefix("tcp://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => return Err(format!("{expected}, got {text:?}")),
    };
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{expected}; unclosed [ in {text:?}"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| format!("{expected}, got {text:?}"))?,
                    ),
                ),
            }
        }
        None => match rest.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => {
                return Err(format!(
                    "{expected}; put an IPv6 address in [ ], got {text:?}"
                ))
            }
            None => (rest, None),
        },
    };
    if host.is_empty() || host.contains(['/', ' ', '@', '?', '#']) {
        return Err(format!("{expected}; no valid host in {text:?}"));
    }
    let port = match port {
        None => DEFAULT_SYSLOG_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("{expected}; bad port {p:?} in {text:?}")),
        },
    };
    let host = host.to_owned();
    Ok(if tcp {
        SyslogTarget::Tcp { host, port }
    } else {
        SyslogTarget::Udp { host, port }
    })
}

/// Validates the `syslog*` keys; an error is `(key, problem)`.
fn validate_syslog(raw: &file::Audit) -> Result<Option<SyslogConfig>, (String, String)> {
    let bad = |key: &str, problem: String| Err((format!("audit.{key}"), problem));
    let Some(url) = &raw.syslog else {
        for (key, set) in [
            ("syslog_facility", raw.syslog_facility.is_some()),
            ("syslog_app_name", raw.syslog_app_name.is_some()),
        ] {
            if set {
                return bad(
                    key,
                    "applies only with audit.syslog set; set it or remove this".into(),
                );
            }
        }
        return Ok(None);
    };
    let target = match parse_syslog_target(url) {
        Ok(t) => t,
        Err(e) => return bad("syslog", e),
    };
    let facility = match raw.syslog_facility.as_deref() {
        None => DEFAULT_FACILITY,
        Some(name) => match FACILITIES.iter().find(|(n, _)| *n == name) {
            Some((_, code)) => *code,
            None => {
                let names: Vec<&str> = FACILITIES.iter().map(|(n, _)| *n).collect();
                return bad(
                    "syslog_facility",
                    format!("expected one of {}, got {name:?}", names.join(", ")),
                );
            }
        },
    };
    let app_name = raw.syslog_app_name.as_deref().unwrap_or(DEFAULT_APP_NAME);
    if app_name.is_empty()
        || app_name.len() > MAX_APP_NAME
        || !app_name.bytes().all(|b| (33..=126).contains(&b))
    {
        return bad(
            "syslog_app_name",
            format!("expected 1 to {MAX_APP_NAME} printable ASCII characters without spaces (RFC 5424 APP-NAME), got {app_name:?}"),
        );
    }
    Ok(Some(SyslogConfig {
        target,
        facility,
        app_name: app_name.to_owned(),
    }))
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            on_failure: OnFailure::Refuse,
            fsync: Fsync::Interval(Duration::from_millis(DEFAULT_FSYNC_INTERVAL_MS)),
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            buffer_records: DEFAULT_BUFFER_RECORDS,
            hmac_key: None,
            syslog: None,
        }
    }
}

const DEFAULT_FSYNC_INTERVAL_MS: u64 = 1000;
const DEFAULT_CHECKPOINT_EVERY: u64 = 1000;
const DEFAULT_BUFFER_RECORDS: usize = 10_000;
/// A key shorter than this is refused: HMAC-SHA256 is only as strong as its key.
const MIN_KEY_BYTES: usize = 16;

/// Validates `[audit]`; an error is `(key, problem)`.
pub(super) fn validate(
    raw: &file::Audit,
    env: &dyn Fn(&str) -> Option<String>,
    path: impl Fn(&str) -> PathBuf,
) -> Result<AuditConfig, (String, String)> {
    let bad = |key: &str, problem: String| Err((format!("audit.{key}"), problem));
    let on_failure = match raw.on_failure.as_deref() {
        None | Some("refuse") => OnFailure::Refuse,
        Some("serve") => OnFailure::Serve,
        Some(other) => {
            return bad(
                "on_failure",
                format!("expected \"refuse\" or \"serve\", got {other:?}"),
            )
        }
    };
    let interval_ms = raw.fsync_interval_ms.unwrap_or(DEFAULT_FSYNC_INTERVAL_MS);
    if !(1..=60_000).contains(&interval_ms) {
        return bad(
            "fsync_interval_ms",
            format!("expected 1 to 60000 (milliseconds), got {interval_ms}"),
        );
    }
    let fsync = match raw.fsync.as_deref() {
        None | Some("interval") => Fsync::Interval(Duration::from_millis(interval_ms)),
        Some("always") if raw.fsync_interval_ms.is_none() => Fsync::Always,
        Some("always") => {
            return bad(
                "fsync_interval_ms",
                "applies only to fsync = \"interval\"; remove it or the fsync = \"always\"".into(),
            )
        }
        Some(other) => {
            return bad(
                "fsync",
                format!("expected \"interval\" or \"always\", got {other:?}"),
            )
        }
    };
    let checkpoint_every = raw.checkpoint_every.unwrap_or(DEFAULT_CHECKPOINT_EVERY);
    if !(1..=1_000_000).contains(&checkpoint_every) {
        return bad(
            "checkpoint_every",
            format!("expected 1 to 1000000 (records), got {checkpoint_every}"),
        );
    }
    let buffer_records = raw.buffer_records.unwrap_or(DEFAULT_BUFFER_RECORDS);
    if !(100..=1_000_000).contains(&buffer_records) {
        return bad(
            "buffer_records",
            format!("expected 100 to 1000000 (records), got {buffer_records}"),
        );
    }
    let hmac_key = match (&raw.hmac_key_env, &raw.hmac_key_file) {
        (Some(_), Some(_)) => {
            return bad(
                "hmac_key_env",
                "set hmac_key_env or hmac_key_file, not both".into(),
            )
        }
        (None, None) => None,
        (Some(var), None) => match env(var) {
            Some(v) if !v.trim().is_empty() => Some(key("hmac_key_env", v)?),
            _ => {
                return bad(
                    "hmac_key_env",
                    format!("environment variable {var} is not set or empty"),
                )
            }
        },
        (None, Some(f)) => {
            let p = path(f);
            match std::fs::read_to_string(&p) {
                Ok(v) => Some(key("hmac_key_file", v)?),
                Err(e) => return bad("hmac_key_file", format!("cannot read {}: {e}", p.display())),
            }
        }
    };
    let syslog = validate_syslog(raw)?;
    Ok(AuditConfig {
        on_failure,
        fsync,
        checkpoint_every,
        buffer_records,
        hmac_key,
        syslog,
    })
}

/// The key as given, without surrounding whitespace; never quoted in an error.
fn key(name: &str, text: String) -> Result<Secret, (String, String)> {
    let trimmed = text.trim();
    if trimmed.len() < MIN_KEY_BYTES {
        return Err((
            format!("audit.{name}"),
            format!(
                "the key is {} bytes; expected at least {MIN_KEY_BYTES} (e.g. `openssl rand -hex 32`)",
                trimmed.len()
            ),
        ));
    }
    Ok(Secret::new(trimmed))
}

impl fmt::Display for AuditConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fsync = match self.fsync {
            Fsync::Interval(d) => format!("fdatasync every {} ms", d.as_millis()),
            Fsync::Always => "fdatasync after every write".to_owned(),
        };
        let on_failure = match self.on_failure {
            OnFailure::Refuse => "refuse requests",
            OnFailure::Serve => "serve requests",
        };
        write!(
            f,
            "audit integrity: {fsync}; checkpoint every {} records, ",
            self.checkpoint_every
        )?;
        match &self.hmac_key {
            Some(k) => write!(f, "signed with key {k:?}")?,
            None => write!(f, "unsigned (no hmac_key_env/hmac_key_file)")?,
        }
        writeln!(
            f,
            "; when the log cannot be written: {on_failure}, holding up to {} records",
            self.buffer_records
        )?;
        if let Some(s) = &self.syslog {
            let facility = FACILITIES
                .iter()
                .find(|(_, c)| *c == s.facility)
                .map_or("?", |(n, _)| *n);
            writeln!(
                f,
                "audit syslog: {} (RFC 5424, facility {facility}, app-name {}), held and refused on failure like the log",
                s.target, s.app_name
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml_text: &str, env: &[(&str, &str)]) -> Result<AuditConfig, (String, String)> {
        let raw: file::Audit = toml::from_str(toml_text).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        validate(&raw, &lookup, |p: &str| PathBuf::from(p))
    }

    #[test]
    fn defaults_refuse_and_sync_within_a_second() {
        let c = check("", &[]).unwrap();
        assert_eq!(c, AuditConfig::default());
        assert_eq!(c.on_failure, OnFailure::Refuse);
        assert_eq!(c.fsync, Fsync::Interval(Duration::from_secs(1)));
    }

    #[test]
    fn malformed_values_name_their_key() {
        for (text, key) in [
            ("on_failure = \"drop\"", "audit.on_failure"),
            ("fsync = \"never\"", "audit.fsync"),
            ("fsync_interval_ms = 0", "audit.fsync_interval_ms"),
            ("fsync_interval_ms = 600000", "audit.fsync_interval_ms"),
            (
                "fsync = \"always\"\nfsync_interval_ms = 5",
                "audit.fsync_interval_ms",
            ),
            ("checkpoint_every = 0", "audit.checkpoint_every"),
            ("buffer_records = 1", "audit.buffer_records"),
            ("hmac_key_env = \"UNSET_AUDIT_KEY\"", "audit.hmac_key_env"),
            ("hmac_key_env = \"SHORT\"", "audit.hmac_key_env"),
            (
                "hmac_key_file = \"/nonexistent/audit.key\"",
                "audit.hmac_key_file",
            ),
            (
                "hmac_key_env = \"K\"\nhmac_key_file = \"k\"",
                "audit.hmac_key_env",
            ),
            ("syslog = \"http://x:514\"", "audit.syslog"),
            ("syslog = \"udp://:514\"", "audit.syslog"),
            ("syslog = \"tcp://h:0\"", "audit.syslog"),
            ("syslog = \"tcp://h:x\"", "audit.syslog"),
            ("syslog = \"tcp://::1:514\"", "audit.syslog"),
            ("syslog = \"unix:dev/log\"", "audit.syslog"),
            (
                "syslog = \"unix:/dev/log\"\nsyslog_facility = \"audit\"",
                "audit.syslog_facility",
            ),
            (
                "syslog = \"unix:/dev/log\"\nsyslog_app_name = \"two words\"",
                "audit.syslog_app_name",
            ),
            ("syslog_facility = \"auth\"", "audit.syslog_facility"),
            ("syslog_app_name = \"x\"", "audit.syslog_app_name"),
        ] {
            let err = check(text, &[("SHORT", "abc"), ("K", "0123456789abcdef0")]).unwrap_err();
            assert_eq!(err.0, key, "{text}: {err:?}");
        }
    }

    #[test]
    fn the_key_is_never_shown() {
        let secret = "audit-hmac-key-5ecret-0123456789";
        let c = check(
            "hmac_key_env = \"AUDIT_KEY\"\nfsync = \"always\"\non_failure = \"serve\"",
            &[("AUDIT_KEY", secret)],
        )
        .unwrap();
        assert_eq!(c.fsync, Fsync::Always);
        assert_eq!(c.on_failure, OnFailure::Serve);
        assert_eq!(c.hmac_key.as_ref().map(Secret::expose), Some(secret));
        let shown = format!("{c} {c:?}");
        assert!(!shown.contains("5ecret"), "{shown}");
        // A short key's error says its length, not the key.
        let err = check("hmac_key_env = \"K\"", &[("K", "5ecret")]).unwrap_err();
        assert!(!err.1.contains("5ecret"), "{err:?}");
    }

    #[test]
    fn syslog_targets_and_defaults() {
        let c = check("syslog = \"udp://127.0.0.1:5514\"", &[]).unwrap();
        let s = c.syslog.unwrap();
        assert_eq!(
            s.target,
            SyslogTarget::Udp {
                host: "127.0.0.1".into(),
                port: 5514
            }
        );
        assert_eq!((s.facility, s.app_name.as_str()), (4, DEFAULT_APP_NAME));
        for (text, target) in [
            (
                "tcp://logs.example.com:6514",
                SyslogTarget::Tcp {
                    host: "logs.example.com".into(),
                    port: 6514,
                },
            ),
            (
                "tcp://[::1]:601",
                SyslogTarget::Tcp {
                    host: "::1".into(),
                    port: 601,
                },
            ),
            (
                "udp://loghost",
                SyslogTarget::Udp {
                    host: "loghost".into(),
                    port: 514,
                },
            ),
            ("unix:/dev/log", SyslogTarget::Unix("/dev/log".into())),
            (
                "unix:///run/log.sock",
                SyslogTarget::Unix("/run/log.sock".into()),
            ),
        ] {
            assert_eq!(parse_syslog_target(text), Ok(target.clone()), "{text}");
            // Display gives back a spelling that parses to the same target.
            assert_eq!(parse_syslog_target(&target.to_string()), Ok(target));
        }
        let c = check(
            "syslog = \"unix:/dev/log\"\nsyslog_facility = \"local3\"\nsyslog_app_name = \"meraki-audit\"",
            &[],
        )
        .unwrap();
        let s = c.syslog.as_ref().unwrap();
        assert_eq!((s.facility, s.app_name.as_str()), (19, "meraki-audit"));
        assert!(c.to_string().contains("audit syslog: unix:/dev/log"), "{c}");
    }
}
