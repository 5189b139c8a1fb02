//! The live configuration and its reload (SIGHUP, `POST /admin/reload`).
//!
//! The validated configuration and what is derived from it (the key index) are one
//! [`Snapshot`] behind an `ArcSwap`: a request takes the snapshot once, at admission, and
//! finishes on it however many reloads happen meanwhile. A reload reads and validates the whole
//! file first; an invalid file changes nothing. What a running server cannot change (listeners,
//! threads, upstream, store, audit path, token policy) is carried over from the running
//! configuration and reported as needing a restart, so the snapshot always describes what runs.
//! `[server]`'s client timeouts and connection limits are read per connection and per request,
//! so they are reloadable.

use crate::config::{Config, ConfigError};
use crate::identity::Identities;
use crate::report::chain;
use crate::token::Grants;
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::Instant;

/// Reads and validates the configuration file again.
pub type Loader = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// One configuration, and the key index built from it.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub identities: Identities,
    /// 1 for the configuration the server started with, then one more per applied reload.
    pub generation: u64,
}

impl Snapshot {
    /// The snapshot of `config`.
    pub fn new(config: Arc<Config>, generation: u64) -> Self {
        Snapshot {
            identities: Identities::new(&config.clients),
            config,
            generation,
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reloaded {
    pub generation: u64,
    pub clients: usize,
    pub integrations: usize,
    /// Settings that changed in the file but need a restart (their old values stay in force).
    pub restart_required: Vec<&'static str>,
    /// Whether re-reading the grants from the store failed (the new settings apply anyway;
    /// grants are read again on the next miss or keeper run).
    pub store_warning: Option<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Who learns about reloads (the audit log and the metrics, wired in `server.rs`).
pub trait ReloadSink: Send + Sync {
    fn reloaded(&self, trigger: &'static str, outcome: &Result<Reloaded, String>, config: &Config);
}

/// The live configuration.
pub struct Live {
    current: ArcSwap<Snapshot>,
    loader: Loader,
    grants: Arc<Grants>,
    sink: Arc<dyn ReloadSink>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl Live {
    /// The live configuration, starting at `config`.
    pub fn new(
        config: Arc<Config>,
        loader: Loader,
        grants: Arc<Grants>,
        sink: Arc<dyn ReloadSink>,
    ) -> Self {
        Live {
            current: ArcSwap::from_pointee(Snapshot::new(config, 1)),
            loader,
            grants,
            sink,
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// The current snapshot; hold it for the whole request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The current configuration.
    pub fn config(&self) -> Arc<Config> {
        self.current.load().config.clone()
    }

    /// Reads the file again and, when it is valid, swaps the new configuration in. `trigger`
    /// names what asked (`sighup`, `admin`) for the audit record.
    pub async fn reload(&self, trigger: &'static str) -> Result<Reloaded, ReloadError> {
        let _one = self.reloading.lock().await;
        let started = Instant::now();
        let old = self.snapshot();
        let loader = self.loader.clone();
        // Reading files (secrets, keys) is blocking I/O: off the async workers.
        let loaded = tokio::task::spawn_blocking(move || loader())
            .await
            .unwrap_or_else(|e| {
                Err(ConfigError::Read {
                    file: old.config.source.display().to_string(),
                    source: std::io::Error::other(e.to_string()),
                })
            });
        let mut new = match loaded {
            Ok(c) => c,
            Err(e) => {
                let why = chain(&e);
                tracing::error!(trigger, error = %why, "configuration reload refused; the running configuration stays");
                self.sink.reloaded(trigger, &Err(why), &old.config);
                return Err(e.into());
            }
        };
        let restart_required = carry_over(&mut new, &old.config);
        let new = Arc::new(new);
        let store_warning = match self.grants.set_integrations(&new.integrations).await {
            Ok(()) => None,
            Err(e) => Some(chain(&e)),
        };
        let generation = old.generation + 1;
        self.current
            .store(Arc::new(Snapshot::new(new.clone(), generation)));
        let outcome = Reloaded {
            generation,
            clients: new.clients.len(),
            integrations: new.integrations.len(),
            restart_required,
            store_warning,
        };
        tracing::info!(
            trigger,
            generation,
            clients = outcome.clients,
            integrations = outcome.integrations,
            restart_required = ?outcome.restart_required,
            took_ms = started.elapsed().as_millis() as u64,
            "configuration reloaded"
        );
        if !outcome.restart_required.is_empty() {
            tracing::warn!(settings = ?outcome.restart_required, "these settings changed but take effect only after a restart");
        }
        self.sink.reloaded(trigger, &Ok(outcome.clone()), &new);
        Ok(outcome)
    }
}

/// Keeps the settings a running server cannot change at their running values in `new`, and
/// names those that differed.
pub fn carry_over(new: &mut Config, running: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($($field:ident => $key:literal),* $(,)?) => {$(
            if new.$field != running.$field {
                changed.push($key);
                new.$field = running.$field.clone();
            }
        )*};
    }
    keep! {
        listen => "server.listen",
        admin_listen => "server.admin_listen",
        threads => "server.threads",
        upstream_timeout => "server.upstream_timeout_secs",
        upstream_connect_timeout => "server.upstream_connect_timeout_secs",
        shutdown_grace => "server.shutdown_grace_secs",
        store_path => "store.path",
        audit_path => "audit.path",
        audit => "audit",
        refresh_ahead => "tokens.refresh_ahead_secs",
        refused_operation_memory => "tokens.refused_operation_memory_secs",
        refresh_backoff_max => "tokens.refresh_backoff_max_secs",
        token_timeout => "tokens.token_timeout_secs",
        keepalive_idle => "tokens.keepalive_idle_secs",
        keepalive_check => "tokens.keepalive_check_secs",
    }
    if new.store_url != running.store_url
        || new.store_pool_size != running.store_pool_size
        || new.store_sync != running.store_sync
    {
        changed.push("store");
        new.store_url = running.store_url.clone();
        new.store_pool_size = running.store_pool_size;
        new.store_sync = running.store_sync;
    }
    if new.store_key != running.store_key {
        changed.push("store.key");
        new.store_key = running.store_key.clone();
    }
    let (n, r) = (&new.upstream, &running.upstream);
    if n.api_base != r.api_base
        || n.token_url != r.token_url
        || n.authorize_url != r.authorize_url
        || n.revoke_url != r.revoke_url
        || n.redirect_hosts != r.redirect_hosts
        || n.lookup_cache_ttl != r.lookup_cache_ttl
        || n.lookup_cache_capacity != r.lookup_cache_capacity
        || n.ca != r.ca
        || n.egress != r.egress
        || n.resolve != r.resolve
    {
        changed.push("upstream");
        new.upstream = running.upstream.clone();
    }
    // The certificate, key and client CA are re-read on every reload; whether the listener
    // speaks TLS at all is fixed when it starts.
    if new.tls.is_some() != running.tls.is_some() {
        changed.push("server.tls_cert_file");
        new.tls = running.tls.clone();
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(server: &str, key: &str, clients: &str) -> Config {
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:8080"
{server}
[upstream]
api_base = "https://api.meraki.com/api/v1"
token_url = "https://as.meraki.com/oauth/token"
[store]
key_env = "KEY"
[[integrations]]
name = "netops"
client_id = "id"
client_secret_env = "SECRET"
{clients}
"#
        );
        Config::parse(&text, Path::new("/etc/proxy.toml"), &|v| match v {
            "KEY" => Some(key.repeat(32)),
            "SECRET" => Some("s".into()),
            _ => None,
        })
        .unwrap()
    }

    const ALICE: &str = "[[clients]]\nname = \"alice\"\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\nintegration = \"netops\"\norganizations = [\"1\"]\n";

    #[test]
    fn reloadable_settings_change_and_the_others_are_kept_and_named() {
        let running = config("threads = 2", "11", "");
        let mut new = config("threads = 4\nshutdown_grace_secs = 5", "22", ALICE);
        let changed = carry_over(&mut new, &running);
        assert_eq!(
            changed,
            ["server.threads", "server.shutdown_grace_secs", "store.key"]
        );
        assert_eq!(new.threads, 2);
        assert_eq!(new.shutdown_grace, running.shutdown_grace);
        assert!(new.store_key == running.store_key);
        assert_eq!(new.clients.len(), 1, "clients are reloadable");

        let mut same = config("threads = 2", "11", ALICE);
        assert!(carry_over(&mut same, &running).is_empty());
    }

    #[test]
    fn client_timeouts_and_connection_limits_are_reloadable() {
        let running = config("threads = 2", "11", "");
        let mut new = config(
            "threads = 2\nheader_timeout_secs = 5\nmax_connections_per_peer = 8",
            "11",
            "",
        );
        assert!(carry_over(&mut new, &running).is_empty());
        assert_eq!(new.client_limits.header_timeout.as_secs(), 5);
        assert_eq!(new.client_limits.max_connections_per_peer, 8);
    }
}
