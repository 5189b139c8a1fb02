//! The shared store: PostgreSQL, for several instances serving the same grants.
//!
//! - Tokens are sealed with the store key exactly as in the embedded store: the database (and
//!   its backups) hold no usable token.
//! - **Leases** are session-level advisory locks (`pg_try_advisory_lock`), one per grant, held
//!   on a pooled connection for as long as the refresh runs: they outlive any token call, only
//!   their session can release them, and PostgreSQL releases them when the holder dies (its
//!   connection closes). There is no expiry to race against (oauth2-proxy #3456) and no lock
//!   row to insert (Grafana #98195).
//! - **Changes** are announced by triggers (`NOTIFY meraki_proxy_grants`) on rotations, status
//!   changes, new, reassigned and deleted grants; every instance LISTENs and re-reads.
//! - **Liveness**: every session of an instance carries its name (`application_name`); an
//!   instance with no open session is dead, and a refresh intent it left explains an
//!   `invalid_grant` (the crash window). Heartbeats (`mop_instances`) count live instances.
//! - Schema changes are applied at start under an advisory lock, so instances starting
//!   together do not race.

use super::store::{
    verify_key_check, GrantStatus, Lease, RefreshIntent, Rotation, Store, StoreError, StoredGrant,
    KEY_CHECK,
};
use crate::clock::now_unix;
use crate::seal::StoreKey;
use crate::secret::Secret;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{AsyncMessage, NoTls, Row};

/// The channel the triggers notify.
pub const CHANNEL: &str = "meraki_proxy_grants";
/// Advisory lock held while the schema is created or migrated.
const MIGRATION_LOCK: i64 = 0x4d4f_5000_0000_0000;
/// Advisory lock keys of grant leases: this namespace plus the grant id.
const LEASE_NAMESPACE: i64 = 0x4d4f_5001 << 24;
/// The schema version this build writes.
const SCHEMA_VERSION: i32 = 1;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS mop_schema (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS mop_meta (name text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS mop_grants (
    id bigserial PRIMARY KEY,
    integration text NOT NULL,
    refresh_token text NOT NULL,
    access_token text,
    access_expires_at bigint NOT NULL DEFAULT 0,
    generation bigint NOT NULL DEFAULT 0,
    status text NOT NULL DEFAULT 'ok',
    scope text NOT NULL DEFAULT '',
    created_at bigint NOT NULL,
    refreshed_at bigint,
    last_used_at bigint,
    pending boolean NOT NULL DEFAULT false,
    refreshing_by text,
    refreshing_from bigint,
    refreshing_since bigint
);
CREATE TABLE IF NOT EXISTS mop_grant_organizations (
    integration text NOT NULL,
    organization text NOT NULL,
    grant_id bigint NOT NULL REFERENCES mop_grants(id) ON DELETE CASCADE,
    PRIMARY KEY (integration, organization)
);
CREATE TABLE IF NOT EXISTS mop_instances (
    name text PRIMARY KEY,
    started_at bigint NOT NULL,
    last_seen bigint NOT NULL
);
CREATE UNLOGGED TABLE IF NOT EXISTS mop_demand (
    name text PRIMARY KEY,
    at timestamptz NOT NULL,
    doc text NOT NULL
);
CREATE OR REPLACE FUNCTION mop_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('meraki_proxy_grants', '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS mop_grants_changed ON mop_grants;
CREATE TRIGGER mop_grants_changed
    AFTER INSERT OR DELETE OR UPDATE OF generation, status, pending ON mop_grants
    FOR EACH STATEMENT EXECUTE FUNCTION mop_notify();
DROP TRIGGER IF EXISTS mop_grant_organizations_changed ON mop_grant_organizations;
CREATE TRIGGER mop_grant_organizations_changed
    AFTER INSERT OR DELETE OR UPDATE ON mop_grant_organizations
    FOR EACH STATEMENT EXECUTE FUNCTION mop_notify();
"#;

const SELECT_GRANTS: &str =
    "SELECT g.id, g.integration, g.refresh_token, g.access_token, g.access_expires_at,
        g.generation, g.status, g.scope, g.created_at, g.refreshed_at, g.last_used_at,
        g.refreshing_by, g.refreshing_from, g.refreshing_since,
        COALESCE(array_agg(o.organization ORDER BY o.organization)
                 FILTER (WHERE o.organization IS NOT NULL), '{}') AS organizations
     FROM mop_grants g LEFT JOIN mop_grant_organizations o ON o.grant_id = g.id";

/// The PostgreSQL store. Cloning shares the pool.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    config: tokio_postgres::Config,
    key: StoreKey,
    instance: Arc<str>,
    /// An instance not seen for this long is taken for dead.
    liveness: Duration,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The configuration holds the password: never printed.
        f.debug_struct("PgStore")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects (a pool of at most `pool_size` connections), applies the schema under a lock,
    /// and checks the store key. `liveness`: how long an instance stays alive without a
    /// heartbeat.
    pub async fn open(
        url: &Secret,
        key: StoreKey,
        pool_size: usize,
        liveness: Duration,
    ) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url
            .expose()
            .parse()
            .map_err(|_| StoreError::Pool("store.url is not a valid postgres:// URL".into()))?;
        config.connect_timeout(Duration::from_secs(5));
        // A wedged statement must not hold a refresh (or a pooled connection) forever.
        config.options("-c statement_timeout=10000");
        let instance: Arc<str> = super::store::instance_name().into();
        // Every session of this instance carries its name: while one is open, it is alive.
        config.application_name(session_name(&instance));
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(2))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        let store = PgStore {
            pool,
            config,
            key,
            instance,
            liveness,
        };
        store.migrate().await?;
        store.check_key().await?;
        Ok(store)
    }

    /// Connects once, changing nothing: what `check` says about the store (reachable, schema
    /// version, whether the store key opens it).
    pub async fn probe(url: &Secret, key: &StoreKey) -> Result<String, StoreError> {
        let mut config: tokio_postgres::Config = url
            .expose()
            .parse()
            .map_err(|_| StoreError::Pool("store.url is not a valid postgres:// URL".into()))?;
        config.connect_timeout(Duration::from_secs(5));
        config.application_name("meraki-oauth-proxy check");
        let (client, connection) = config.connect(NoTls).await?;
        let driver = tokio::spawn(connection);
        let said = async {
            let exists: bool = client
                .query_one("SELECT to_regclass('mop_schema') IS NOT NULL", &[])
                .await?
                .get(0);
            if !exists {
                return Ok::<_, StoreError>(
                    "PostgreSQL store: reachable; empty (the schema is created at the first start)"
                        .to_owned(),
                );
            }
            let version: Option<i32> = client
                .query_one("SELECT max(version) FROM mop_schema", &[])
                .await?
                .get(0);
            let check: Option<String> = client
                .query_opt("SELECT value FROM mop_meta WHERE name = 'key_check'", &[])
                .await?
                .map(|r| r.get(0));
            let key_state = match check {
                None => "no key recorded yet".to_owned(),
                Some(sealed) => {
                    verify_key_check(key, &sealed)?;
                    "the store key opens it".to_owned()
                }
            };
            let grants: i64 = client
                .query_one("SELECT count(*) FROM mop_grants", &[])
                .await?
                .get(0);
            Ok(format!(
                "PostgreSQL store: reachable; schema version {}; {grants} grant(s); {key_state}",
                version.unwrap_or(0)
            ))
        }
        .await;
        drop(client);
        let _ = driver.await;
        said
    }

    async fn conn(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::Pg(e),
            other => StoreError::Pool(other.to_string()),
        })
    }

    /// Creates or upgrades the schema; instances starting together wait for each other.
    async fn migrate(&self) -> Result<(), StoreError> {
        let c = self.conn().await?;
        c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        let result = async {
            c.batch_execute(SCHEMA).await?;
            let version: Option<i32> = c
                .query_opt("SELECT max(version) FROM mop_schema", &[])
                .await?
                .and_then(|r| r.get(0));
            match version {
                None => {
                    c.execute("INSERT INTO mop_schema (version) VALUES ($1)", &[&SCHEMA_VERSION])
                        .await?;
                }
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::Pool(format!(
                        "the database holds schema version {v}, newer than this build's {SCHEMA_VERSION}: upgrade meraki-oauth-proxy"
                    )))
                }
                Some(_) => {}
            }
            Ok(())
        }
        .await;
        let _ = c
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        result
    }

    async fn check_key(&self) -> Result<(), StoreError> {
        let c = self.conn().await?;
        let check: Option<String> = c
            .query_opt("SELECT value FROM mop_meta WHERE name = 'key_check'", &[])
            .await?
            .map(|r| r.get(0));
        match check {
            Some(sealed) => verify_key_check(&self.key, &sealed)?,
            None => {
                c.execute(
                    "INSERT INTO mop_meta (name, value) VALUES ('key_check', $1) ON CONFLICT (name) DO NOTHING",
                    &[&self.key.seal(KEY_CHECK, "key_check")],
                )
                .await?;
                // Another instance may have won the insert with another key.
                let sealed: String = c
                    .query_one("SELECT value FROM mop_meta WHERE name = 'key_check'", &[])
                    .await?
                    .get(0);
                verify_key_check(&self.key, &sealed)?;
            }
        }
        Ok(())
    }

    /// Re-seals every token and the key check under `new`, in one transaction.
    pub async fn rekey(&self, new: &StoreKey) -> Result<usize, StoreError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        let rows = tx
            .query(
                "SELECT id, refresh_token, access_token FROM mop_grants FOR UPDATE",
                &[],
            )
            .await?;
        for r in &rows {
            let id: i64 = r.get(0);
            let refresh = self.key.open(r.get(1), "refresh_token")?;
            let access = r
                .get::<_, Option<String>>(2)
                .map(|a| self.key.open(&a, "access_token"))
                .transpose()?;
            tx.execute(
                "UPDATE mop_grants SET refresh_token = $1, access_token = $2 WHERE id = $3",
                &[
                    &new.seal(refresh.expose(), "refresh_token"),
                    &access.map(|a| new.seal(a.expose(), "access_token")),
                    &id,
                ],
            )
            .await?;
        }
        tx.execute(
            "UPDATE mop_meta SET value = $1 WHERE name = 'key_check'",
            &[&new.seal(KEY_CHECK, "key_check")],
        )
        .await?;
        tx.commit().await?;
        Ok(rows.len())
    }

    fn grant(&self, r: &Row) -> Result<StoredGrant, StoreError> {
        let refresh: String = r.get(2);
        let access: Option<String> = r.get(3);
        Ok(StoredGrant {
            id: r.get(0),
            integration: r.get(1),
            refresh_token: self.key.open(&refresh, "refresh_token")?,
            access_token: access
                .as_deref()
                .map(|a| self.key.open(a, "access_token"))
                .transpose()?,
            access_expires_at: r.get(4),
            generation: r.get(5),
            status: GrantStatus::parse(r.get(6)),
            scope: r.get(7),
            created_at: r.get(8),
            refreshed_at: r.get(9),
            last_used_at: r.get(10),
            refreshing: match (
                r.get::<_, Option<String>>(11),
                r.get::<_, Option<i64>>(12),
                r.get::<_, Option<i64>>(13),
            ) {
                (Some(holder), Some(from_generation), Some(since)) => Some(RefreshIntent {
                    holder,
                    from_generation,
                    since,
                }),
                _ => None,
            },
            organizations: r.get(14),
        })
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn load_all(&self) -> Result<Vec<StoredGrant>, StoreError> {
        let c = self.conn().await?;
        let rows = c
            .query(&format!("{SELECT_GRANTS} GROUP BY g.id ORDER BY g.id"), &[])
            .await?;
        rows.iter().map(|r| self.grant(r)).collect()
    }

    async fn load(&self, id: i64) -> Result<Option<StoredGrant>, StoreError> {
        let c = self.conn().await?;
        let row = c
            .query_opt(
                &format!("{SELECT_GRANTS} WHERE g.id = $1 GROUP BY g.id"),
                &[&id],
            )
            .await?;
        row.as_ref().map(|r| self.grant(r)).transpose()
    }

    async fn insert_pending(&self, integration: &str, refresh: &Secret) -> Result<i64, StoreError> {
        let c = self.conn().await?;
        let row = c
            .query_one(
                "INSERT INTO mop_grants (integration, refresh_token, generation, status, created_at, pending)
                 VALUES ($1, $2, 0, 'ok', $3, true) RETURNING id",
                &[
                    &integration,
                    &self.key.seal(refresh.expose(), "refresh_token"),
                    &now_unix(),
                ],
            )
            .await?;
        Ok(row.get(0))
    }

    async fn assign(&self, id: i64, integration: &str, orgs: &[String]) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        for org in orgs {
            tx.execute(
                "INSERT INTO mop_grant_organizations (integration, organization, grant_id) VALUES ($1, $2, $3)
                 ON CONFLICT (integration, organization) DO UPDATE SET grant_id = excluded.grant_id",
                &[&integration, org, &id],
            )
            .await?;
        }
        tx.execute(
            "UPDATE mop_grants SET pending = false WHERE id = $1",
            &[&id],
        )
        .await?;
        tx.execute(
            "DELETE FROM mop_grants WHERE NOT pending AND id NOT IN (SELECT grant_id FROM mop_grant_organizations)",
            &[],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn commit_rotation(
        &self,
        id: i64,
        from_generation: i64,
        t: &Rotation,
    ) -> Result<bool, StoreError> {
        let c = self.conn().await?;
        let n = c
            .execute(
                "UPDATE mop_grants SET refresh_token = $1, access_token = $2, access_expires_at = $3,
                        generation = generation + 1, status = 'ok', scope = COALESCE($4, scope),
                        refreshed_at = $5, refreshing_by = NULL, refreshing_from = NULL,
                        refreshing_since = NULL
                 WHERE id = $6 AND generation = $7",
                &[
                    &self.key.seal(t.refresh_token.expose(), "refresh_token"),
                    &self.key.seal(t.access_token.expose(), "access_token"),
                    &t.access_expires_at,
                    &t.scope,
                    &t.refreshed_at,
                    &id,
                    &from_generation,
                ],
            )
            .await?;
        Ok(n == 1)
    }

    async fn set_status(&self, id: i64, status: GrantStatus) -> Result<(), StoreError> {
        let c = self.conn().await?;
        c.execute(
            "UPDATE mop_grants SET status = $1 WHERE id = $2",
            &[&status.as_str(), &id],
        )
        .await?;
        Ok(())
    }

    async fn touch(&self, id: i64, at: i64) -> Result<(), StoreError> {
        let c = self.conn().await?;
        c.execute(
            "UPDATE mop_grants SET last_used_at = GREATEST(COALESCE(last_used_at, 0), $1) WHERE id = $2",
            &[&at, &id],
        )
        .await?;
        Ok(())
    }

    async fn delete(&self, id: i64) -> Result<bool, StoreError> {
        let c = self.conn().await?;
        Ok(c.execute("DELETE FROM mop_grants WHERE id = $1", &[&id])
            .await?
            == 1)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let c = self.conn().await?;
        c.query_one("SELECT 1", &[]).await?;
        Ok(())
    }

    fn instance(&self) -> &str {
        &self.instance
    }

    async fn try_lease(&self, id: i64) -> Result<Option<Box<dyn Lease>>, StoreError> {
        let c = self.conn().await?;
        let key = LEASE_NAMESPACE + id;
        let held: bool = c
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await?
            .get(0);
        if !held {
            return Ok(None);
        }
        Ok(Some(Box::new(PgLease {
            conn: Some(c),
            key,
            id,
            instance: self.instance.clone(),
        })))
    }

    async fn alive(&self, name: &str) -> Result<bool, StoreError> {
        if name == &*self.instance {
            return Ok(true);
        }
        // A process that died closed its sessions (the kernel closes its sockets): the database
        // knows at once, sooner than a missed heartbeat would tell.
        let c = self.conn().await?;
        let open: bool = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = $1)",
                &[&session_name(name)],
            )
            .await?
            .get(0);
        Ok(open)
    }

    async fn heartbeat(&self) -> Result<usize, StoreError> {
        let c = self.conn().await?;
        let now = now_unix();
        c.execute(
            "INSERT INTO mop_instances (name, started_at, last_seen) VALUES ($1, $2, $2)
             ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen",
            &[&&*self.instance, &now],
        )
        .await?;
        c.execute(
            "DELETE FROM mop_instances WHERE last_seen < $1",
            &[&(now - 86_400)],
        )
        .await?;
        let live: i64 = c
            .query_one(
                "SELECT count(*) FROM mop_instances WHERE last_seen >= $1",
                &[&(now - self.liveness.as_secs() as i64)],
            )
            .await?
            .get(0);
        Ok(live.max(1) as usize)
    }

    async fn exchange_demand(
        &self,
        document: &str,
    ) -> Result<Option<Vec<(String, String)>>, StoreError> {
        // One statement: publish, drop day-old rows, read the others' fresh rows. The clock is
        // the database's, so instances' clocks need not agree; an instance whose sessions are
        // all closed (it died) is left out at once, a hung one once its row is a second old.
        // The CTE's reads see the table as it was before this statement: this row is not read.
        let c = self.conn().await?;
        let rows = c
            .query(
                "WITH up AS (
                     INSERT INTO mop_demand (name, at, doc) VALUES ($1, clock_timestamp(), $2)
                     ON CONFLICT (name) DO UPDATE SET at = excluded.at, doc = excluded.doc
                 ), old AS (
                     DELETE FROM mop_demand WHERE at < clock_timestamp() - interval '1 day'
                 )
                 SELECT d.name, d.doc FROM mop_demand d
                 WHERE d.name <> $1
                   AND d.at > clock_timestamp() - interval '1 second'
                   AND EXISTS (SELECT 1 FROM pg_stat_activity a
                               WHERE a.application_name = left('mop:' || d.name, 63))",
                &[&&*self.instance, &document],
            )
            .await?;
        Ok(Some(
            rows.iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect(),
        ))
    }

    async fn watch(&self, changed: &(dyn Fn() + Send + Sync)) {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.config.connect(NoTls).await {
                Ok((client, mut connection)) => {
                    backoff = Duration::from_millis(500);
                    let sql = format!("LISTEN {CHANNEL}");
                    let listen = client.batch_execute(&sql);
                    tokio::pin!(listen);
                    let mut listening = false;
                    loop {
                        tokio::select! {
                            r = &mut listen, if !listening => {
                                if let Err(e) = r {
                                    tracing::warn!(error = %crate::report::chain(&e), "LISTEN failed");
                                    break;
                                }
                                listening = true;
                                // Whatever changed while not listening.
                                changed();
                            }
                            m = std::future::poll_fn(|cx| connection.poll_message(cx)) => match m {
                                Some(Ok(AsyncMessage::Notification(_))) => changed(),
                                Some(Ok(_)) => {}
                                Some(Err(e)) => {
                                    tracing::warn!(error = %crate::report::chain(&e), "the store's change feed broke; reconnecting");
                                    break;
                                }
                                None => break,
                            },
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %crate::report::chain(&e), retry_in_ms = backoff.as_millis() as u64, "cannot listen for store changes");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// The `application_name` of an instance's sessions (at most 63 bytes, as PostgreSQL keeps).
fn session_name(instance: &str) -> String {
    let mut name = format!("mop:{instance}");
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// A grant's lease: an advisory lock held by the session of `conn`.
struct PgLease {
    conn: Option<Object>,
    key: i64,
    id: i64,
    instance: Arc<str>,
}

#[async_trait::async_trait]
impl Lease for PgLease {
    async fn intend(&self, generation: i64) -> Result<(), StoreError> {
        let Some(c) = self.conn.as_ref() else {
            return Ok(());
        };
        c.execute(
            "UPDATE mop_grants SET refreshing_by = $1, refreshing_from = $2, refreshing_since = $3 WHERE id = $4",
            &[&&*self.instance, &generation, &now_unix(), &self.id],
        )
        .await?;
        Ok(())
    }

    async fn release(mut self: Box<Self>) {
        if let Some(c) = self.conn.take() {
            match c
                .query_one("SELECT pg_advisory_unlock($1)", &[&self.key])
                .await
            {
                // Back to the pool, lock-free.
                Ok(_) => drop(c),
                // Unknown state: the session goes, and the lock with it.
                Err(_) => drop(Object::take(c)),
            }
        }
    }
}

impl Drop for PgLease {
    fn drop(&mut self) {
        // Not released (a cancelled refresh): close the session rather than return a
        // connection that still holds the lock to the pool.
        if let Some(c) = self.conn.take() {
            drop(Object::take(c));
        }
    }
}
