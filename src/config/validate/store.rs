//! `[store]`: the embedded store's file or PostgreSQL, the pool, the sync period and the key
//! that seals tokens at rest.

use super::{secs, Validator};
use crate::config::{file, ConfigError};
use crate::secret::Secret;
use std::path::PathBuf;
use std::time::Duration;

/// The validated `[store]` section.
pub(super) struct Store {
    pub(super) path: PathBuf,
    pub(super) url: Option<Secret>,
    pub(super) pool_size: usize,
    pub(super) sync: Duration,
    pub(super) key: crate::seal::StoreKey,
}

impl Validator<'_> {
    /// The `[store]` section.
    pub(super) fn store(&self, store: &file::Store) -> Result<Store, ConfigError> {
        let store_key = self.store_key(store)?;
        let store_url = self.store_url(store)?;
        let store_pool_size = store.pool_size.unwrap_or(8);
        if !(2..=100).contains(&store_pool_size) {
            return Err(self.invalid("store.pool_size", "expected 2 to 100"));
        }
        let store_sync = secs(store.sync_secs.unwrap_or(5));
        if store_sync.is_zero() || store_sync > Duration::from_secs(300) {
            return Err(self.invalid("store.sync_secs", "expected 1 to 300"));
        }
        Ok(Store {
            path: self.path(store.path.as_deref().unwrap_or("tokens.db")),
            url: store_url,
            pool_size: store_pool_size,
            sync: store_sync,
            key: store_key,
        })
    }

    fn store_key(&self, store: &file::Store) -> Result<crate::seal::StoreKey, ConfigError> {
        let (key, text) = match (&store.key_env, &store.key_file) {
            (Some(_), Some(_)) => return Err(self.invalid("store.key_env", "set key_env or key_file, not both")),
            (None, None) => {
                return Err(self.invalid(
                    "store.key_env",
                    "expected the name of an environment variable (or store.key_file) holding the key that encrypts tokens at rest; generate one with `meraki-oauth-proxy store gen-key`",
                ))
            }
            (Some(var), None) => match (self.env)(var) {
                Some(v) if !v.trim().is_empty() => ("store.key_env", v),
                _ => return Err(self.invalid("store.key_env", format!("environment variable {var} is not set or empty"))),
            },
            (None, Some(f)) => {
                let p = self.path(f);
                match std::fs::read_to_string(&p) {
                    Ok(v) => ("store.key_file", v),
                    Err(e) => return Err(self.invalid("store.key_file", format!("cannot read {}: {e}", p.display()))),
                }
            }
        };
        crate::seal::StoreKey::parse(&text).map_err(|e| self.invalid(key, e.to_string()))
    }

    /// `[store] url`, `url_env` or `url_file`: PostgreSQL. The URL is checked without ever
    /// being quoted (it holds a password).
    fn store_url(&self, store: &file::Store) -> Result<Option<Secret>, ConfigError> {
        let given = [
            store.url.as_ref().map(|_| "store.url"),
            store.url_env.as_ref().map(|_| "store.url_env"),
            store.url_file.as_ref().map(|_| "store.url_file"),
        ];
        let given: Vec<&str> = given.into_iter().flatten().collect();
        let key = match given.as_slice() {
            [] => return Ok(None),
            [one] => *one,
            [first, ..] => {
                return Err(self.invalid(*first, "set one of store.url, url_env and url_file"))
            }
        };
        if store.path.is_some() {
            return Err(self.invalid(
                "store.path",
                "store.path is the embedded store's file; with a PostgreSQL store.url leave it out",
            ));
        }
        let text = match (&store.url, &store.url_env, &store.url_file) {
            (Some(u), _, _) => u.clone(),
            (_, Some(var), _) => match (self.env)(var) {
                Some(v) if !v.trim().is_empty() => v,
                _ => {
                    return Err(self.invalid(
                        key,
                        format!("environment variable {var} is not set or empty"),
                    ))
                }
            },
            (_, _, Some(f)) => {
                let p = self.path(f);
                std::fs::read_to_string(&p)
                    .map_err(|e| self.invalid(key, format!("cannot read {}: {e}", p.display())))?
            }
            _ => return Ok(None),
        };
        let text = text.trim().to_owned();
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://"))
            || text.parse::<tokio_postgres::Config>().is_err()
        {
            return Err(self.invalid(
                key,
                "expected a URL such as postgres://user:password@host:5432/database (not shown here: it may hold a password)",
            ));
        }
        Ok(Some(Secret::new(text)))
    }
}
