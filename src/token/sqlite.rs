//! The embedded store: SQLite, one file, no server to run. One instance per file (the `grants`
//! commands may run beside it): its leases are the process's own single flight.

use super::store::{
    verify_key_check, GrantStatus, Lease, RefreshIntent, Rotation, Store, StoreError, StoredGrant,
    KEY_CHECK,
};
use crate::seal::StoreKey;
use crate::secret::Secret;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The embedded SQLite store. Its inherent methods block; through [`Store`] each runs on
/// tokio's blocking pool. Cloning shares the connection.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    key: StoreKey,
    instance: Arc<str>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store file.
    pub fn open(path: &Path, key: StoreKey) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: path.display().to_string(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| open_err(format!("cannot create directory: {e}")))?;
        }
        let conn = Connection::open(path).map_err(|e| open_err(e.to_string()))?;
        let store = Self::init(conn, key).map_err(|e| open_err(e.to_string()))?;
        store.check_key()?;
        Ok(store)
    }

    /// An in-memory store, for tests.
    pub fn in_memory(key: StoreKey) -> Result<Self, StoreError> {
        let store = Self::init(Connection::open_in_memory()?, key)?;
        store.check_key()?;
        Ok(store)
    }

    /// Verifies the key against the sealed check value, writing it on first use.
    fn check_key(&self) -> Result<(), StoreError> {
        let conn = self.conn();
        let check: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE name = 'key_check'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match check {
            Some(sealed) => verify_key_check(&self.key, &sealed)?,
            None => {
                conn.execute(
                    "INSERT INTO meta (name, value) VALUES ('key_check', ?1)",
                    [self.key.seal(KEY_CHECK, "key_check")],
                )?;
            }
        }
        Ok(())
    }

    /// Re-seals every token and the key check under `new`, in one transaction.
    pub fn rekey(&self, new: &StoreKey) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let rows: Vec<(i64, String, Option<String>)> = {
            let mut stmt = tx.prepare("SELECT id, refresh_token, access_token FROM grants")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (id, refresh, access) in &rows {
            let refresh = self.key.open(refresh, "refresh_token")?;
            let access = access
                .as_deref()
                .map(|a| self.key.open(a, "access_token"))
                .transpose()?;
            tx.execute(
                "UPDATE grants SET refresh_token = ?1, access_token = ?2 WHERE id = ?3",
                params![
                    new.seal(refresh.expose(), "refresh_token"),
                    access.map(|a| new.seal(a.expose(), "access_token")),
                    id
                ],
            )?;
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE name = 'key_check'",
            [new.seal(KEY_CHECK, "key_check")],
        )?;
        tx.commit()?;
        Ok(rows.len())
    }

    fn init(conn: Connection, key: StoreKey) -> Result<Self, rusqlite::Error> {
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed rotation survives power loss, not only a process crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS grants (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                integration TEXT NOT NULL,
                refresh_token TEXT NOT NULL,
                access_token TEXT,
                access_expires_at INTEGER NOT NULL DEFAULT 0,
                generation INTEGER NOT NULL DEFAULT 0,
                status TEXT NOT NULL DEFAULT 'ok',
                scope TEXT NOT NULL DEFAULT '',
                created_at INTEGER NOT NULL,
                refreshed_at INTEGER,
                last_used_at INTEGER,
                -- 1 from insert_pending until assign: an import or onboarding in progress, whose
                -- (possibly already rotated) token must survive other grants' clean-up.
                pending INTEGER NOT NULL DEFAULT 0
            );
            CREATE TABLE IF NOT EXISTS meta (
                name TEXT PRIMARY KEY,
                value TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS grant_organizations (
                integration TEXT NOT NULL,
                organization TEXT NOT NULL,
                grant_id INTEGER NOT NULL REFERENCES grants(id) ON DELETE CASCADE,
                PRIMARY KEY (integration, organization)
            );",
        )?;
        // Added with refresh intents; stores made before get the columns.
        let has_intent: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('grants') WHERE name = 'refreshing_by'")?
            .exists([])?;
        if !has_intent {
            conn.execute_batch(
                "ALTER TABLE grants ADD COLUMN refreshing_by TEXT;
                 ALTER TABLE grants ADD COLUMN refreshing_from INTEGER;
                 ALTER TABLE grants ADD COLUMN refreshing_since INTEGER;",
            )?;
        }
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            key,
            instance: super::store::instance_name().into(),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back), so a poisoned lock is safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every grant.
    pub fn load_all(&self) -> Result<Vec<StoredGrant>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, integration, refresh_token, access_token, access_expires_at, generation, status, scope,
                    created_at, refreshed_at, last_used_at, refreshing_by, refreshing_from, refreshing_since
             FROM grants ORDER BY id",
        )?;
        let mut grants = stmt
            .query_map([], row_to_raw)?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .map(|raw| self.unseal(raw))
            .collect::<Result<Vec<_>, _>>()?;
        let mut orgs = conn.prepare("SELECT organization FROM grant_organizations WHERE grant_id = ?1 ORDER BY organization")?;
        for g in &mut grants {
            g.organizations = orgs
                .query_map([g.id], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
        }
        Ok(grants)
    }

    /// One grant.
    pub fn load(&self, id: i64) -> Result<Option<StoredGrant>, StoreError> {
        let conn = self.conn();
        let mut g = conn
            .query_row(
                "SELECT id, integration, refresh_token, access_token, access_expires_at, generation, status, scope,
                        created_at, refreshed_at, last_used_at, refreshing_by, refreshing_from,
                        refreshing_since FROM grants WHERE id = ?1",
                [id],
                row_to_raw,
            )
            .optional()?
            .map(|raw| self.unseal(raw))
            .transpose()?;
        if let Some(g) = g.as_mut() {
            let mut orgs = conn.prepare("SELECT organization FROM grant_organizations WHERE grant_id = ?1 ORDER BY organization")?;
            g.organizations = orgs
                .query_map([id], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
        }
        Ok(g)
    }

    /// Stores a refresh token as a new grant that serves no organization yet (generation 0), so
    /// that it is durable before the first refresh rotates it.
    pub fn insert_pending(
        &self,
        integration: &str,
        refresh_token: &Secret,
    ) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO grants (integration, refresh_token, generation, status, created_at, pending) VALUES (?1, ?2, 0, 'ok', ?3, 1)",
            params![integration, self.key.seal(refresh_token.expose(), "refresh_token"), crate::clock::now_unix()],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// Makes grant `id` the one serving these organizations. Grants left serving none are
    /// deleted, except pending ones (another import in progress).
    pub fn assign(
        &self,
        id: i64,
        integration: &str,
        organizations: &[String],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for org in organizations {
            tx.execute(
                "INSERT INTO grant_organizations (integration, organization, grant_id) VALUES (?1, ?2, ?3)
                 ON CONFLICT (integration, organization) DO UPDATE SET grant_id = excluded.grant_id",
                params![integration, org, id],
            )?;
        }
        tx.execute("UPDATE grants SET pending = 0 WHERE id = ?1", [id])?;
        // Grants replaced for every organization they served go; grants still being imported or
        // onboarded by another process (pending) stay, whatever their generation.
        tx.execute(
            "DELETE FROM grants WHERE pending = 0 AND id NOT IN (SELECT grant_id FROM grant_organizations)",
            [],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Commits a rotation if the stored generation is still `from_generation`. Returns false when
    /// another refresher got there first (the caller must then adopt the stored tokens).
    pub fn commit_rotation(
        &self,
        id: i64,
        from_generation: i64,
        tokens: &Rotation,
    ) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE grants SET refresh_token = ?1, access_token = ?2, access_expires_at = ?3, generation = generation + 1,
                    status = 'ok', scope = COALESCE(?4, scope), refreshed_at = ?5,
                    refreshing_by = NULL, refreshing_from = NULL, refreshing_since = NULL
             WHERE id = ?6 AND generation = ?7",
            params![
                self.key.seal(tokens.refresh_token.expose(), "refresh_token"),
                self.key.seal(tokens.access_token.expose(), "access_token"),
                tokens.access_expires_at,
                tokens.scope,
                tokens.refreshed_at,
                id,
                from_generation
            ],
        )?;
        Ok(n == 1)
    }

    /// Marks a grant's health.
    pub fn set_status(&self, id: i64, status: GrantStatus) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE grants SET status = ?1 WHERE id = ?2",
            params![status.as_str(), id],
        )?;
        Ok(())
    }

    /// Records when a grant was last used to serve a request.
    pub fn touch(&self, id: i64, at: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE grants SET last_used_at = MAX(COALESCE(last_used_at, 0), ?1) WHERE id = ?2",
            params![at, id],
        )?;
        Ok(())
    }

    /// Deletes a grant and its organization mappings.
    pub fn delete(&self, id: i64) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM grants WHERE id = ?1", [id])?
            == 1)
    }

    /// Records a refresh intent of `holder` (see [`Lease::intend`]).
    pub fn intend(&self, id: i64, generation: i64, holder: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE grants SET refreshing_by = ?1, refreshing_from = ?2, refreshing_since = ?3 WHERE id = ?4",
            params![holder, generation, crate::clock::now_unix(), id],
        )?;
        Ok(())
    }

    /// Whether the database answers.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.conn().query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }
}

impl SqliteStore {
    /// Runs a blocking store call on tokio's blocking pool.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SqliteStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(StoreError::Task)?
    }

    fn unseal(&self, (mut g, refresh, access): RawRow) -> Result<StoredGrant, StoreError> {
        g.refresh_token = self.key.open(&refresh, "refresh_token")?;
        g.access_token = access
            .as_deref()
            .map(|a| self.key.open(a, "access_token"))
            .transpose()?;
        Ok(g)
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn load_all(&self) -> Result<Vec<StoredGrant>, StoreError> {
        self.blocking(SqliteStore::load_all).await
    }
    async fn load(&self, id: i64) -> Result<Option<StoredGrant>, StoreError> {
        self.blocking(move |s| s.load(id)).await
    }
    async fn insert_pending(&self, integration: &str, refresh: &Secret) -> Result<i64, StoreError> {
        let (integration, refresh) = (integration.to_owned(), refresh.clone());
        self.blocking(move |s| s.insert_pending(&integration, &refresh))
            .await
    }
    async fn assign(&self, id: i64, integration: &str, orgs: &[String]) -> Result<(), StoreError> {
        let (integration, orgs) = (integration.to_owned(), orgs.to_vec());
        self.blocking(move |s| s.assign(id, &integration, &orgs))
            .await
    }
    async fn commit_rotation(
        &self,
        id: i64,
        from_generation: i64,
        tokens: &Rotation,
    ) -> Result<bool, StoreError> {
        let tokens = tokens.clone();
        self.blocking(move |s| s.commit_rotation(id, from_generation, &tokens))
            .await
    }
    async fn set_status(&self, id: i64, status: GrantStatus) -> Result<(), StoreError> {
        self.blocking(move |s| s.set_status(id, status)).await
    }
    async fn touch(&self, id: i64, at: i64) -> Result<(), StoreError> {
        self.blocking(move |s| s.touch(id, at)).await
    }
    async fn delete(&self, id: i64) -> Result<bool, StoreError> {
        self.blocking(move |s| s.delete(id)).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.blocking(SqliteStore::ping).await
    }
    fn instance(&self) -> &str {
        &self.instance
    }
    async fn try_lease(&self, id: i64) -> Result<Option<Box<dyn Lease>>, StoreError> {
        Ok(Some(Box::new(SqliteLease {
            store: self.clone(),
            id,
        })))
    }
    async fn alive(&self, name: &str) -> Result<bool, StoreError> {
        // One instance per file: an intent of another name is an earlier run's.
        Ok(name == &*self.instance)
    }
    async fn heartbeat(&self) -> Result<usize, StoreError> {
        Ok(1)
    }
}

/// The embedded store's lease: the process's own single flight already excludes other
/// refreshes, so it only records intents.
struct SqliteLease {
    store: SqliteStore,
    id: i64,
}

#[async_trait::async_trait]
impl Lease for SqliteLease {
    async fn intend(&self, generation: i64) -> Result<(), StoreError> {
        let id = self.id;
        self.store
            .blocking(move |s| s.intend(id, generation, &s.instance))
            .await
    }
    async fn release(self: Box<Self>) {}
}

/// A row with its tokens still sealed.
type RawRow = (StoredGrant, String, Option<String>);

fn row_to_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    let g = StoredGrant {
        id: r.get(0)?,
        integration: r.get(1)?,
        organizations: Vec::new(),
        refresh_token: Secret::new(""),
        access_token: None,
        access_expires_at: r.get(4)?,
        generation: r.get(5)?,
        status: GrantStatus::parse(&r.get::<_, String>(6)?),
        scope: r.get(7)?,
        created_at: r.get(8)?,
        refreshed_at: r.get(9)?,
        last_used_at: r.get(10)?,
        refreshing: match (
            r.get::<_, Option<String>>(11)?,
            r.get::<_, Option<i64>>(12)?,
            r.get::<_, Option<i64>>(13)?,
        ) {
            (Some(holder), Some(from_generation), Some(since)) => Some(RefreshIntent {
                holder,
                from_generation,
                since,
            }),
            _ => None,
        },
    };
    Ok((g, r.get(2)?, r.get(3)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotation(n: u32) -> Rotation {
        Rotation {
            refresh_token: Secret::new(format!("refresh-token-plaintext-{n}")),
            access_token: Secret::new(format!("access-token-plaintext-{n}")),
            access_expires_at: 1000 + n as i64,
            scope: Some("dashboard:general:config:read".into()),
            refreshed_at: 10,
        }
    }

    fn key() -> StoreKey {
        StoreKey::parse(&"11".repeat(32)).unwrap()
    }

    #[test]
    fn tokens_are_sealed_and_a_wrong_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let s = SqliteStore::open(&path, key()).unwrap();
        insert(&s, &["1"], 7);
        drop(s);
        let bytes = std::fs::read(&path).unwrap();
        let wal = std::fs::read(dir.path().join("t.db-wal")).unwrap_or_default();
        for needle in [
            b"refresh-token-plaintext".as_slice(),
            b"access-token-plaintext",
            b"imported-token-plaintext",
        ] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "token in clear in the store"
            );
            assert!(
                !wal.windows(needle.len()).any(|w| w == needle),
                "token in clear in the WAL"
            );
        }
        let wrong = StoreKey::parse(&"22".repeat(32)).unwrap();
        let err = SqliteStore::open(&path, wrong.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("sealed with another key"), "{err}");
        // Rotation: re-seal under the new key, then only the new key opens it.
        let s = SqliteStore::open(&path, key()).unwrap();
        assert_eq!(s.rekey(&wrong).unwrap(), 1);
        drop(s);
        assert!(SqliteStore::open(&path, key()).is_err());
        let s = SqliteStore::open(&path, wrong).unwrap();
        assert_eq!(
            s.load_all().unwrap()[0].refresh_token.expose(),
            "refresh-token-plaintext-7"
        );
    }

    fn insert(s: &SqliteStore, orgs: &[&str], n: u32) -> i64 {
        let id = s
            .insert_pending("netops", &Secret::new("imported-token-plaintext"))
            .unwrap();
        assert!(s.commit_rotation(id, 0, &rotation(n)).unwrap());
        let orgs: Vec<String> = orgs.iter().map(|o| o.to_string()).collect();
        s.assign(id, "netops", &orgs).unwrap();
        id
    }

    #[test]
    fn an_import_in_progress_survives_another_import_finishing() {
        let s = SqliteStore::in_memory(key()).unwrap();
        // Import A has stored and refreshed its token (generation 1) but not assigned it yet.
        let a = s
            .insert_pending("netops", &Secret::new("imported-token-plaintext-a"))
            .unwrap();
        assert!(s.commit_rotation(a, 0, &rotation(1)).unwrap());
        // Import B finishes meanwhile.
        insert(&s, &["2"], 2);
        let kept = s
            .load(a)
            .unwrap()
            .expect("import A's rotated token must survive");
        assert_eq!(kept.refresh_token.expose(), "refresh-token-plaintext-1");
        s.assign(a, "netops", &["1".into()]).unwrap();
        assert_eq!(s.load_all().unwrap().len(), 2);
    }

    #[test]
    fn rotation_is_conditional_on_generation() {
        let s = SqliteStore::in_memory(key()).unwrap();
        let id = insert(&s, &["1", "2"], 1);
        let g = s.load(id).unwrap().unwrap();
        assert_eq!(g.generation, 1);
        assert_eq!(g.organizations, vec!["1", "2"]);
        assert!(s.commit_rotation(id, 1, &rotation(2)).unwrap());
        assert!(
            !s.commit_rotation(id, 1, &rotation(3)).unwrap(),
            "stale generation must not win"
        );
        let g = s.load(id).unwrap().unwrap();
        assert_eq!(g.refresh_token.expose(), "refresh-token-plaintext-2");
        assert_eq!(g.generation, 2);
    }

    #[test]
    fn insert_replaces_grants_for_the_same_organizations() {
        let s = SqliteStore::in_memory(key()).unwrap();
        let a = insert(&s, &["1"], 1);
        let b = insert(&s, &["1"], 2);
        assert!(s.load(a).unwrap().is_none(), "orphaned grant removed");
        assert_eq!(s.load_all().unwrap().len(), 1);
        s.set_status(b, GrantStatus::NeedsReauth).unwrap();
        assert_eq!(s.load(b).unwrap().unwrap().status, GrantStatus::NeedsReauth);
        assert!(s.delete(b).unwrap());
        assert!(s.load_all().unwrap().is_empty());
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let id = insert(&SqliteStore::open(&path, key()).unwrap(), &["1"], 1);
        let s = SqliteStore::open(&path, key()).unwrap();
        assert_eq!(
            s.load(id).unwrap().unwrap().refresh_token.expose(),
            "refresh-token-plaintext-1"
        );
    }
}
