//! Configuration: `proxy.toml` parsed ([`file`]) and validated into [`Config`], which is what the
//! rest of the program reads. Every error names the file, the key and what was expected.
//!
//! - [`file`]: the raw TOML, as serde reads it; nothing else reads it.
//! - `types`: the validated [`Config`] and its parts (upstream, listener TLS, integrations,
//!   clients, rate limits), re-exported here.
//! - `validate`: one validator per section (`server`, `upstream`, `tokens`, `store`, `audit`,
//!   `rate_limits`, `metrics`, `integrations`, `clients`), run in a fixed order by `validate/mod.rs`.
//! - `summary`: the summary `check` prints (the `Display` of [`Config`]), without secrets.
//!
//! Certificate and key files are read by [`crate::tls`] (`CaBundle::load`, `ServerCert::load`,
//! `ClientCa::load`) when a section names them; the configuration keeps what they return, so
//! a reload re-reads them. The dependency goes one way: TLS never reads the configuration.

mod audit;
pub mod file;
mod summary;
mod types;
mod validate;

#[cfg(test)]
mod tests;

pub use types::{
    CertBinding, Client, ClientKey, ClientLimits, Config, Detail, InboundTls, Integration,
    MetricsConfig, OperationRule, Operations, PublicOrigin, RateLimits, UnknownEndpoints,
    UpstreamConfig, MERAKI_API_DOMAINS,
};
pub use validate::valid_org_id;

pub use audit::{AuditConfig, Fsync, OnFailure, SyslogConfig, SyslogTarget};

use crate::secret::Secret;
use std::path::Path;
use validate::Validator;

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, a missing key or a wrong type.
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    /// A value that parsed but makes no sense.
    #[error("{file}: {key}: {problem}")]
    Invalid {
        file: String,
        key: String,
        problem: String,
    },
}

impl Config {
    /// Reads, parses and validates a configuration file. Environment variables and files named
    /// by `client_secret_env`/`client_secret_file` are read here.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// Parses and validates configuration text; `env` looks up environment variables.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let raw: file::File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.clone(),
            message: parse_message(text, &e),
        })?;
        let base_dir = path.parent().unwrap_or_else(|| Path::new("."));
        Validator {
            file,
            base_dir,
            env,
        }
        .validate(raw, path)
    }
}

/// `host:port/database as user`, from a PostgreSQL URL: never the password.
pub fn describe_pg_url(url: &Secret) -> String {
    match url.expose().parse::<tokio_postgres::Config>() {
        Ok(c) => {
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_default();
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!(
                "{host}:{port}/{} as {}",
                c.get_dbname().unwrap_or("-"),
                c.get_user().unwrap_or("-")
            )
        }
        Err(_) => "(unparseable URL)".into(),
    }
}

/// A TOML error as `line L, column C: message`, without quoting the file: the offending line
/// may hold a secret pasted where it does not belong (`client_secret = "..."`), and the message
/// reaches logs, the audit log and the admin API.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim_end();
    let Some(span) = e.span() else {
        return msg.to_owned();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.len() - line_start + 1;
    // The key (left of `=`, never the value) and the table it is in name the setting.
    let line_text = text[line_start..].lines().next().unwrap_or("");
    let key = line_text
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))
        .filter(|k| !k.is_empty() && k.len() <= 100);
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match (table, key) {
        (Some(t), Some(k)) => format!("line {line}, column {column}: {t}.{k}: {msg}"),
        (None, Some(k)) => format!("line {line}, column {column}: {k}: {msg}"),
        _ => format!("line {line}, column {column}: {msg}"),
    }
}
