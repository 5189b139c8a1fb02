//! The durable token store, behind the async [`Store`] trait: embedded
//! ([`super::sqlite::SqliteStore`]: one file, WAL, `synchronous=FULL`) by default, or PostgreSQL
//! ([`super::postgres::PgStore`]) for a fleet of instances sharing grants.
//!
//! Durability rule: a rotated refresh token is committed here before the access token that came
//! with it is used, so a crash at any instant after the token endpoint answered loses no grant.
//! Updates are conditional on the generation the refresher started from, so two processes
//! sharing the store never overwrite a newer token with an older one.

use crate::seal::SealError;
use crate::secret::Secret;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded database said no.
    #[error("token store: {0}")]
    Db(#[from] rusqlite::Error),
    /// PostgreSQL said no, or cannot be reached.
    #[error("token store (PostgreSQL): {0}")]
    Pg(#[from] tokio_postgres::Error),
    /// No PostgreSQL connection could be had from the pool.
    #[error("token store (PostgreSQL): {0}")]
    Pool(String),
    /// The store file could not be opened.
    #[error("token store {path}: {reason}")]
    Open { path: String, reason: String },
    /// The key does not open the store (or a value in it).
    #[error("token store: {0}; refusing to continue (set the key the store was sealed with, or rotate it with `meraki-oauth-proxy store rotate-key`)")]
    Key(#[from] SealError),
    /// The blocking task running a store call did not finish (panicked or was cancelled).
    #[error("token store: the store call did not complete")]
    Task(#[source] tokio::task::JoinError),
}

/// The durable token store, as the rest of the program uses it: every call is async, so no
/// store I/O ever runs on a request worker thread. Implemented by [`SqliteStore`] (the embedded
/// default); a shared backend for several instances implements the same calls.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// Every grant.
    async fn load_all(&self) -> Result<Vec<StoredGrant>, StoreError>;
    /// One grant.
    async fn load(&self, id: i64) -> Result<Option<StoredGrant>, StoreError>;
    /// Stores a refresh token as a new grant serving no organization yet (generation 0).
    async fn insert_pending(&self, integration: &str, refresh: &Secret) -> Result<i64, StoreError>;
    /// Makes grant `id` the one serving these organizations.
    async fn assign(&self, id: i64, integration: &str, orgs: &[String]) -> Result<(), StoreError>;
    /// Commits a rotation if the stored generation is still `from_generation`.
    async fn commit_rotation(
        &self,
        id: i64,
        from_generation: i64,
        tokens: &Rotation,
    ) -> Result<bool, StoreError>;
    /// Marks a grant's health.
    async fn set_status(&self, id: i64, status: GrantStatus) -> Result<(), StoreError>;
    /// Records when a grant was last used.
    async fn touch(&self, id: i64, at: i64) -> Result<(), StoreError>;
    /// Deletes a grant.
    async fn delete(&self, id: i64) -> Result<bool, StoreError>;
    /// Whether the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    // ---- coordination between instances sharing the store ----

    /// This process's name in the store (host, process id, a random part): who holds leases and
    /// records refresh intents.
    fn instance(&self) -> &str;
    /// Takes the refresh lease of grant `id` unless another instance holds it (`None`). While
    /// held, no other instance refreshes the grant; it is released by its holder only, or by the
    /// store when the holder dies. The embedded store serves one instance: always granted.
    async fn try_lease(&self, id: i64) -> Result<Option<Box<dyn Lease>>, StoreError>;
    /// Whether instance `name` was seen lately (its heartbeat).
    async fn alive(&self, name: &str) -> Result<bool, StoreError>;
    /// Records that this instance is alive; how many instances are, itself included.
    async fn heartbeat(&self) -> Result<usize, StoreError>;
    /// Publishes this instance's demand document (`crate::shaping::Demand`, as JSON) and returns
    /// the fresh documents (under a second old) of the other live instances, by name: the fleet's
    /// division of Meraki's budget (`crate::server::fleet`). `None`: the store serves one instance
    /// (the embedded store), which has nobody to share with.
    async fn exchange_demand(
        &self,
        document: &str,
    ) -> Result<Option<Vec<(String, String)>>, StoreError> {
        let _ = document;
        Ok(None)
    }
    /// Calls `changed` whenever another instance changes a grant (PostgreSQL's LISTEN/NOTIFY),
    /// for as long as the future is polled. Returns at once when the store cannot tell (the
    /// embedded store): the caller polls.
    async fn watch(&self, changed: &(dyn Fn() + Send + Sync)) {
        let _ = changed;
    }
}

/// A held refresh lease ([`Store::try_lease`]). Dropped without [`Lease::release`] (a cancelled
/// task), it is still released: the PostgreSQL backend closes its session.
#[async_trait::async_trait]
pub trait Lease: Send + Sync {
    /// Records, just before the token call, that this instance is about to rotate the grant
    /// from `generation`: if it dies before committing, the next refresh knows why the refresh
    /// token no longer works.
    async fn intend(&self, generation: i64) -> Result<(), StoreError>;
    /// Releases the lease.
    async fn release(self: Box<Self>);
}

/// A refresh another instance (or an earlier run of this one) recorded before its token call
/// and never committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshIntent {
    pub holder: String,
    pub from_generation: i64,
    /// Unix seconds.
    pub since: i64,
}

/// A name for this process in a shared store.
pub fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!(
        "{host}:{}:{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// What the key check value decrypts to.
pub(super) const KEY_CHECK: &str = "meraki-oauth-proxy token store key check";

/// Whether `sealed`, the stored key check value, opens to [`KEY_CHECK`] under `key`: the store
/// was sealed with this key.
pub(super) fn verify_key_check(
    key: &crate::seal::StoreKey,
    sealed: &str,
) -> Result<(), StoreError> {
    if key.open(sealed, "key_check")?.expose() != KEY_CHECK {
        return Err(SealError::Open.into());
    }
    Ok(())
}

/// Health of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantStatus {
    /// Refreshes work.
    Ok,
    /// The AS answered `invalid_grant`: an org admin must connect the integration again.
    NeedsReauth,
}

impl GrantStatus {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantStatus::Ok => "ok",
            GrantStatus::NeedsReauth => "needs_reauthorization",
        }
    }

    pub(super) fn parse(s: &str) -> GrantStatus {
        if s == "ok" {
            GrantStatus::Ok
        } else {
            GrantStatus::NeedsReauth
        }
    }
}

/// One grant as stored.
#[derive(Debug, Clone)]
pub struct StoredGrant {
    pub id: i64,
    pub integration: String,
    pub organizations: Vec<String>,
    pub refresh_token: Secret,
    pub access_token: Option<Secret>,
    /// Unix seconds.
    pub access_expires_at: i64,
    pub generation: i64,
    pub status: GrantStatus,
    pub scope: String,
    pub created_at: i64,
    pub refreshed_at: Option<i64>,
    pub last_used_at: Option<i64>,
    /// A refresh recorded and not committed (cleared by every commit).
    pub refreshing: Option<RefreshIntent>,
}

/// The tokens a refresh produced.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub refresh_token: Secret,
    pub access_token: Secret,
    pub access_expires_at: i64,
    pub scope: Option<String>,
    pub refreshed_at: i64,
}
