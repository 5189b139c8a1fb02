//! Validation: [`Validator`] turns the raw file into a [`Config`], one section per file. The
//! sections run in a fixed order (`validate`), which is the order their errors are reported in.

mod access;
mod audit;
mod clients;
pub(super) mod integrations;
mod metrics;
mod rate_limits;
mod server;
mod store;
mod tokens;
mod upstream;

pub use clients::valid_org_id;

use super::{file, Config, ConfigError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

pub(super) struct Validator<'a> {
    pub(super) file: String,
    pub(super) base_dir: &'a Path,
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
}

impl Validator<'_> {
    pub(super) fn invalid(
        &self,
        key: impl Into<String>,
        problem: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    pub(super) fn addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.invalid(
                key,
                format!(
                    "expected an IP address and port such as \"127.0.0.1:8080\", got {value:?}"
                ),
            )
        })
    }

    pub(super) fn url(&self, key: &str, value: &str) -> Result<Url, ConfigError> {
        let url = Url::parse(value).map_err(|e| {
            self.invalid(
                key,
                format!("expected an absolute http(s) URL, got {value:?} ({e})"),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(self.invalid(
                key,
                format!("expected an absolute http(s) URL with a host, got {value:?}"),
            ));
        }
        Ok(url)
    }

    pub(super) fn path(&self, value: &str) -> PathBuf {
        let p = PathBuf::from(value);
        if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        }
    }

    pub(super) fn validate(
        &self,
        mut raw: file::File,
        source: &Path,
    ) -> Result<Config, ConfigError> {
        let server = self.server(&raw.server)?;
        let upstream = self.upstream(&mut raw.upstream)?;
        let tls = self.inbound_tls(&raw.server)?;
        let public_origins = self.public_origins(raw.server.public_base_url.as_ref())?;
        let tokens = self.tokens(&raw.tokens)?;
        let admin = self.admin(&raw.server, server.admin_listen)?;
        let rate_limits = self.rate_limits(&raw.rate_limits)?;
        let metrics = self.metrics(&raw.metrics)?;
        let client_limits = self.client_limits(&raw.server)?;
        let (trusted_proxies, proxy_protocol) = self.access(&raw.server)?;
        let store = self.store(&raw.store)?;
        let integrations = self.integrations(raw.integrations)?;
        let clients = self.clients(raw.clients, &integrations)?;
        self.client_certs_need_mutual_tls(&clients, tls.as_ref())?;

        Ok(Config {
            source: source.to_path_buf(),
            listen: server.listen,
            admin_listen: server.admin_listen,
            threads: server.threads,
            upstream_timeout: server.upstream_timeout,
            upstream_connect_timeout: server.upstream_connect_timeout,
            shutdown_grace: server.shutdown_grace,
            upstream,
            store_path: store.path,
            store_url: store.url,
            store_pool_size: store.pool_size,
            store_sync: store.sync,
            store_key: store.key,
            audit_path: self.audit(&raw.audit),
            audit: crate::config::audit::validate(&raw.audit, self.env, |p| self.path(p))
                .map_err(|(key, problem)| self.invalid(key, problem))?,
            refresh_ahead: tokens.refresh_ahead,
            refused_operation_memory: tokens.refused_operation_memory,
            refresh_backoff_max: tokens.refresh_backoff_max,
            token_timeout: tokens.token_timeout,
            keepalive_idle: tokens.keepalive_idle,
            keepalive_check: tokens.keepalive_check,
            admin_token: admin.admin_token,
            reauth_fails_readiness: admin.reauth_fails_readiness,
            unknown_endpoints: admin.unknown_endpoints,
            tls,
            public_origins,
            rate_limits,
            client_limits,
            trusted_proxies,
            proxy_protocol,
            metrics,
            integrations,
            clients,
        })
    }
}

pub(super) fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub(super) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
