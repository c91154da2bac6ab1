//! The database (SQLite or PostgreSQL): toolkit registrations, OAuth
//! platforms, pending OAuth flows and users' connections (tokens).

use std::sync::{Arc, Mutex, PoisonError};

use atp_registry::{Secret, ToolSpec, wire::ToolMetadata};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{
    config::{DbLocation, OAuthPlatform},
    keys::now_secs,
};

/// A database failure. Its text never holds a connection string.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("database error: {0}")]
    Pg(#[from] tokio_postgres::Error),
    #[error("the database is unreachable: {0}")]
    Pool(String),
    #[error("a database task failed")]
    Task,
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        // deadpool's text holds the backend's error, never the URL.
        StoreError::Pool(e.to_string())
    }
}

/// SQLite's versioned migrations: (version, SQL), in order.
const SQLITE_MIGRATIONS: &[(i64, &str)] =
    &[(1, include_str!("../migrations/sqlite/0001_initial.sql"))];

/// Applies the SQLite migrations not applied yet, each in a transaction.
fn migrate_sqlite(c: &mut Connection) -> Result<(), rusqlite::Error> {
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )?;
    let done: i64 = c.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    for (version, sql) in SQLITE_MIGRATIONS {
        if *version <= done {
            continue;
        }
        let tx = c.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![version, now_secs()],
        )?;
        tx.commit()?;
        tracing::info!(version, "applied a SQLite migration");
    }
    Ok(())
}

/// The database: SQLite (one connection, used from the blocking pool) or
/// PostgreSQL (a pool). Every query is a method of `Store` that runs on
/// either: `impl Store` blocks sit beside the code that uses them.
#[derive(Clone)]
pub(crate) enum Store {
    Sqlite(Sqlite),
    Postgres(Pg),
}

/// A SQLite database.
#[derive(Clone)]
pub(crate) struct Sqlite {
    conn: Arc<Mutex<Connection>>,
}

/// A PostgreSQL database.
#[derive(Clone)]
pub(crate) struct Pg {
    pool: deadpool_postgres::Pool,
}

impl Pg {
    /// A connection from the pool.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }
}

impl Store {
    /// Opens a SQLite database (PostgreSQL needs [`Store::connect`]).
    pub fn open(location: &DbLocation) -> Result<Self, StoreError> {
        let conn = match location {
            DbLocation::Memory => Connection::open_in_memory()?,
            DbLocation::File(path) => {
                let c = Connection::open(path)?;
                c.pragma_update(None, "journal_mode", "WAL")?;
                c.pragma_update(None, "synchronous", "NORMAL")?;
                c
            }
            DbLocation::Postgres(_) => {
                return Err(StoreError::Pool(
                    "a PostgreSQL database is opened with AtpServer::connect".into(),
                ));
            }
        };
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut conn = conn;
        migrate_sqlite(&mut conn)?;
        Ok(Store::Sqlite(Sqlite {
            conn: Arc::new(Mutex::new(conn)),
        }))
    }

    /// Opens either database; PostgreSQL's migrations run here.
    pub async fn connect(location: &DbLocation) -> Result<Self, StoreError> {
        match location {
            DbLocation::Postgres(url) => Ok(Store::Postgres(Pg::connect(url).await?)),
            other => Self::open(other),
        }
    }

    /// Runs `f` on SQLite now (the unit tests of the SQLite functions).
    #[cfg(test)]
    pub fn call_now<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, rusqlite::Error> {
        match self {
            Store::Sqlite(s) => s.call_now(f),
            Store::Postgres(_) => Err(rusqlite::Error::InvalidQuery),
        }
    }

    /// Every toolkit with its tools, in registration order.
    pub async fn load_toolkits(&self) -> Result<Vec<ToolkitRecord>, StoreError> {
        match self {
            Store::Sqlite(s) => s.call(load_toolkits).await,
            Store::Postgres(p) => {
                let c = p.client().await?;
                let mut kits = Vec::new();
                for r in c
                    .query(
                        "SELECT app_name, key_hash, endpoint_url, endpoint_key, toolkit_hash, language FROM toolkits ORDER BY app_name",
                        &[],
                    )
                    .await?
                {
                    kits.push(ToolkitRecord {
                        app_name: r.try_get(0)?,
                        key_hash: r.try_get(1)?,
                        endpoint_url: r.try_get(2)?,
                        endpoint_key: r.try_get::<_, Option<String>>(3)?.map(Secret::new),
                        toolkit_hash: r.try_get(4)?,
                        language: r.try_get(5)?,
                        tools: Vec::new(),
                    });
                }
                let rows = c
                    .query(
                        "SELECT app_name, name, code_hash, metadata FROM tools ORDER BY app_name, position, name",
                        &[],
                    )
                    .await?;
                for r in rows {
                    let app: String = r.try_get(0)?;
                    if let Some(kit) = kits.iter_mut().find(|k| k.app_name == app) {
                        push_tool(
                            kit,
                            r.try_get(1)?,
                            r.try_get(2)?,
                            &r.try_get::<_, String>(3)?,
                        );
                    }
                }
                Ok(kits)
            }
        }
    }

    /// One toolkit with its tools (after another server changed it).
    pub async fn load_toolkit(&self, app_name: &str) -> Result<Option<ToolkitRecord>, StoreError> {
        // Few enough rows that loading all and picking one is fine.
        Ok(self
            .load_toolkits()
            .await?
            .into_iter()
            .find(|k| k.app_name == app_name))
    }

    /// Adds or updates an OAuth platform.
    pub async fn save_platform(&self, p: &OAuthPlatform) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => {
                let p = p.clone();
                s.call(move |c| save_platform(c, &p)).await
            }
            Store::Postgres(pg) => {
                let config = serde_json::to_string(p).unwrap_or_else(|_| "{}".into());
                pg.client()
                    .await?
                    .execute(
                        "INSERT INTO oauth_platforms (id, config) VALUES ($1, $2)
                         ON CONFLICT(id) DO UPDATE SET config = EXCLUDED.config",
                        &[&p.id, &config],
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// The OAuth platforms.
    pub async fn load_platforms(&self) -> Result<Vec<OAuthPlatform>, StoreError> {
        match self {
            Store::Sqlite(s) => s.call(load_platforms).await,
            Store::Postgres(pg) => {
                let rows = pg
                    .client()
                    .await?
                    .query("SELECT id, config FROM oauth_platforms ORDER BY id", &[])
                    .await?;
                let mut out = Vec::new();
                for r in rows {
                    if let Some(p) =
                        read_platform(&r.try_get::<_, String>(0)?, &r.try_get::<_, String>(1)?)
                    {
                        out.push(p);
                    }
                }
                Ok(out)
            }
        }
    }

    /// The SQLite database, for code that only runs on it.
    pub fn sqlite(&self) -> Option<&Sqlite> {
        match self {
            Store::Sqlite(s) => Some(s),
            Store::Postgres(_) => None,
        }
    }

    /// Whether the database answers now (`GET /ready`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.call(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await,
            Store::Postgres(p) => {
                p.client().await?.simple_query("SELECT 1").await?;
                Ok(())
            }
        }
    }
}

/// PostgreSQL's versioned migrations: (version, SQL), in order.
const PG_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/postgres/0001_initial.sql")),
    (
        2,
        include_str!("../migrations/postgres/0002_insert_order.sql"),
    ),
];

/// The most connections one server holds to PostgreSQL.
const PG_POOL_SIZE: usize = 16;
/// How long a query waits for a connection (or for making one).
const PG_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Pg {
    /// Connects a pool to `url` and applies the migrations (under an
    /// advisory lock: servers starting together apply each one once).
    async fn connect(url: &str) -> Result<Self, StoreError> {
        use std::str::FromStr;
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|_| StoreError::Pool("the PostgreSQL URL can not be read".into()))?;
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(PG_POOL_SIZE)
            .wait_timeout(Some(PG_WAIT))
            .create_timeout(Some(PG_WAIT))
            .recycle_timeout(Some(PG_WAIT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        let pg = Pg { pool };
        pg.migrate().await?;
        Ok(pg)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // One server at a time; the lock ends with the transaction.
        tx.batch_execute(
            "SELECT pg_advisory_xact_lock(7415606);
             CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await?;
        let done: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )
            .await?
            .get(0);
        for (version, sql) in PG_MIGRATIONS {
            if *version <= done {
                continue;
            }
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[version, &now_secs()],
            )
            .await?;
            tracing::info!(version, "applied a PostgreSQL migration");
        }
        tx.commit().await?;
        Ok(())
    }
}

impl Sqlite {
    /// Runs `f` on the connection, off the async executor.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut c)
        })
        .await
        .map_err(|_| StoreError::Task)?
        .map_err(StoreError::Db)
    }

    /// Runs `f` on the connection on this thread (startup and tests).
    pub fn call_now<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, rusqlite::Error> {
        let mut c = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut c)
    }
}

/// A registered tool: what its toolkit announced, checked by the core's
/// registration rules.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolRecord {
    pub code_hash: String,
    pub spec: ToolSpec,
}

/// A registered toolkit (keyed by its `app_name`).
#[derive(Debug, Clone)]
pub(crate) struct ToolkitRecord {
    pub app_name: String,
    pub key_hash: String,
    pub endpoint_url: Option<String>,
    pub endpoint_key: Option<Secret>,
    pub toolkit_hash: Option<String>,
    pub language: String,
    pub tools: Vec<ToolRecord>,
}

/// An OAuth flow that was started and not finished.
#[derive(Debug, Clone)]
pub(crate) struct PendingFlow {
    pub platform_id: String,
    pub external_user_id: String,
    pub llm_key_hash: String,
    pub code_verifier: Secret,
    pub redirect_url: Option<String>,
    pub created_at: i64,
}

/// A user's connection to an OAuth platform.
#[derive(Debug, Clone)]
pub(crate) struct OAuthConnection {
    pub llm_key_hash: String,
    pub platform_id: String,
    pub external_user_id: String,
    pub integration_id: String,
    pub access_token: Secret,
    pub refresh_token: Option<Secret>,
    pub token_type: Option<String>,
    pub scope: Option<String>,
    pub expires_at: Option<i64>,
}

impl Store {
    /// Writes a toolkit's row and one tool (inserted or replaced), in one
    /// transaction.
    pub async fn save_tool(
        &self,
        kit: &ToolkitRecord,
        tool: &ToolRecord,
        position: usize,
    ) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => {
                let (kit, tool) = (kit.clone(), tool.clone());
                s.call(move |c| save_tool(c, &kit, &tool, position)).await
            }
            Store::Postgres(p) => {
                let now = now_secs();
                let metadata = atp_registry::wire::to_json(&tool.spec.metadata());
                let position = i64::try_from(position).unwrap_or(i64::MAX);
                let mut c = p.client().await?;
                let tx = c.transaction().await?;
                tx.execute(
                    "INSERT INTO toolkits (app_name, key_hash, endpoint_url, endpoint_key, toolkit_hash, language, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT(app_name) DO UPDATE SET key_hash = EXCLUDED.key_hash,
                         endpoint_url = EXCLUDED.endpoint_url, endpoint_key = EXCLUDED.endpoint_key,
                         toolkit_hash = EXCLUDED.toolkit_hash, language = EXCLUDED.language,
                         updated_at = EXCLUDED.updated_at",
                    &[
                        &kit.app_name,
                        &kit.key_hash,
                        &kit.endpoint_url,
                        &kit.endpoint_key.as_ref().map(Secret::expose),
                        &kit.toolkit_hash,
                        &kit.language,
                        &now,
                    ],
                )
                .await?;
                tx.execute(
                    "INSERT INTO tools (app_name, name, position, code_hash, metadata, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT(app_name, name) DO UPDATE SET code_hash = EXCLUDED.code_hash,
                         metadata = EXCLUDED.metadata, updated_at = EXCLUDED.updated_at",
                    &[
                        &kit.app_name,
                        &tool.spec.name,
                        &position,
                        &tool.code_hash,
                        &metadata,
                        &now,
                    ],
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// Stores a started OAuth flow under its `state` (and forgets flows
    /// abandoned for an hour).
    pub async fn insert_flow(&self, state: &str, flow: &PendingFlow) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => {
                let (state, flow) = (state.to_owned(), flow.clone());
                s.call(move |c| insert_flow(c, &state, &flow)).await
            }
            Store::Postgres(p) => {
                let c = p.client().await?;
                c.execute(
                    "DELETE FROM oauth_states WHERE created_at < $1",
                    &[&(now_secs() - 3600)],
                )
                .await?;
                c.execute(
                    "INSERT INTO oauth_states (state, platform_id, external_user_id, llm_key_hash, code_verifier, redirect_url, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        &state,
                        &flow.platform_id,
                        &flow.external_user_id,
                        &flow.llm_key_hash,
                        &flow.code_verifier.expose(),
                        &flow.redirect_url,
                        &flow.created_at,
                    ],
                )
                .await?;
                Ok(())
            }
        }
    }

    /// Removes and returns a pending flow: a state is used once, even when
    /// several servers share the database and two callbacks with the same
    /// state race (PostgreSQL: one `DELETE … RETURNING`; of two at once,
    /// one deletes the row and the other waits for it and finds nothing).
    pub async fn take_flow(&self, state: &str) -> Result<Option<PendingFlow>, StoreError> {
        match self {
            Store::Sqlite(s) => {
                let state = state.to_owned();
                s.call(move |c| take_flow(c, &state)).await
            }
            Store::Postgres(p) => {
                let row = p
                    .client()
                    .await?
                    .query_opt(
                        "DELETE FROM oauth_states WHERE state = $1
                         RETURNING platform_id, external_user_id, llm_key_hash, code_verifier, redirect_url, created_at",
                        &[&state],
                    )
                    .await?;
                let Some(r) = row else {
                    return Ok(None);
                };
                Ok(Some(PendingFlow {
                    platform_id: r.try_get(0)?,
                    external_user_id: r.try_get(1)?,
                    llm_key_hash: r.try_get(2)?,
                    code_verifier: Secret::new(r.try_get::<_, String>(3)?),
                    redirect_url: r.try_get(4)?,
                    created_at: r.try_get(5)?,
                }))
            }
        }
    }

    /// Adds or updates a user's connection (its `integration_id` and
    /// `created_at` stay those of the first save).
    pub async fn save_connection(&self, conn: &OAuthConnection) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => {
                let conn = conn.clone();
                s.call(move |c| save_connection(c, &conn)).await
            }
            Store::Postgres(p) => {
                p.client()
                    .await?
                    .execute(
                        "INSERT INTO oauth_connections (llm_key_hash, platform_id, external_user_id, integration_id,
                             access_token, refresh_token, token_type, scope, expires_at, created_at, updated_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)
                         ON CONFLICT(llm_key_hash, platform_id, external_user_id) DO UPDATE SET
                             access_token = EXCLUDED.access_token, refresh_token = EXCLUDED.refresh_token,
                             token_type = EXCLUDED.token_type, scope = EXCLUDED.scope,
                             expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at",
                        &[
                            &conn.llm_key_hash,
                            &conn.platform_id,
                            &conn.external_user_id,
                            &conn.integration_id,
                            &conn.access_token.expose(),
                            &conn.refresh_token.as_ref().map(Secret::expose),
                            &conn.token_type,
                            &conn.scope,
                            &conn.expires_at,
                            &now_secs(),
                        ],
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// A user's connection to a platform, if they made one.
    pub async fn get_connection(
        &self,
        llm_key_hash: &str,
        platform_id: &str,
        external_user_id: &str,
    ) -> Result<Option<OAuthConnection>, StoreError> {
        match self {
            Store::Sqlite(s) => {
                let (llm, pid, user) = (
                    llm_key_hash.to_owned(),
                    platform_id.to_owned(),
                    external_user_id.to_owned(),
                );
                s.call(move |c| get_connection(c, &llm, &pid, &user)).await
            }
            Store::Postgres(p) => {
                let row = p
                    .client()
                    .await?
                    .query_opt(
                        "SELECT integration_id, access_token, refresh_token, token_type, scope, expires_at
                         FROM oauth_connections WHERE llm_key_hash = $1 AND platform_id = $2 AND external_user_id = $3",
                        &[&llm_key_hash, &platform_id, &external_user_id],
                    )
                    .await?;
                let Some(r) = row else {
                    return Ok(None);
                };
                Ok(Some(OAuthConnection {
                    llm_key_hash: llm_key_hash.to_owned(),
                    platform_id: platform_id.to_owned(),
                    external_user_id: external_user_id.to_owned(),
                    integration_id: r.try_get(0)?,
                    access_token: Secret::new(r.try_get::<_, String>(1)?),
                    refresh_token: r.try_get::<_, Option<String>>(2)?.map(Secret::new),
                    token_type: r.try_get(3)?,
                    scope: r.try_get(4)?,
                    expires_at: r.try_get(5)?,
                }))
            }
        }
    }

    /// Takes the lock under which one server at a time refreshes the
    /// token of one user's connection (waiting at most `wait` for it); it
    /// is held until [`RefreshLock::release`] (or the guard is dropped).
    ///
    /// PostgreSQL: a transaction-scoped advisory lock keyed by the
    /// connection, on a pooled connection of its own; every server sharing
    /// the database respects it, and it ends with that connection if the
    /// server dies. SQLite: nothing (its database has one server, whose
    /// own lock serialises the refreshes).
    pub async fn lock_refresh(
        &self,
        llm_key_hash: &str,
        platform_id: &str,
        external_user_id: &str,
        wait: std::time::Duration,
    ) -> Result<RefreshLock, StoreError> {
        let Store::Postgres(p) = self else {
            return Ok(RefreshLock { held: None });
        };
        let key = refresh_lock_key(llm_key_hash, platform_id, external_user_id);
        let client = p.client().await?;
        // PostgreSQL gives up waiting at `lock_timeout`; the client-side
        // bound, a little later, covers a server that does not answer.
        // (0 would mean no bound at all.)
        let millis = wait.as_millis().max(1);
        let take = async {
            client
                .batch_execute(&format!("BEGIN; SET LOCAL lock_timeout = {millis}"))
                .await?;
            client
                .execute("SELECT pg_advisory_xact_lock($1)", &[&key])
                .await?;
            Ok::<_, StoreError>(())
        };
        let taken = tokio::time::timeout(wait + PG_WAIT, take).await;
        match taken {
            Ok(Ok(())) => Ok(RefreshLock { held: Some(client) }),
            Ok(Err(e)) => {
                discard(client);
                Err(e)
            }
            Err(_) => {
                discard(client);
                Err(StoreError::Pool(
                    "the lock on the OAuth connection was not granted in time".into(),
                ))
            }
        }
    }
}

/// Held while this server refreshes one connection's token: see
/// [`Store::lock_refresh`].
pub(crate) struct RefreshLock {
    /// PostgreSQL: the pooled connection whose open transaction holds the
    /// advisory lock.
    held: Option<deadpool_postgres::Object>,
}

impl RefreshLock {
    /// Ends the lock (commits its transaction; if that fails, closes the
    /// connection, which ends the lock just as well).
    pub async fn release(mut self) {
        if let Some(client) = self.held.take()
            && client.batch_execute("COMMIT").await.is_err()
        {
            discard(client);
        }
    }
}

impl Drop for RefreshLock {
    /// Not released (the task was cancelled): the connection, inside its
    /// transaction, must not go back to the pool; closing it ends the lock.
    fn drop(&mut self) {
        if let Some(client) = self.held.take() {
            discard(client);
        }
    }
}

/// Takes a pooled connection out of the pool and closes it (PostgreSQL
/// then ends its transaction and its locks).
fn discard(client: deadpool_postgres::Object) {
    drop(deadpool_postgres::Object::take(client));
}

/// The advisory lock key of one OAuth connection: 64 bits of a hash of
/// its key (a collision only makes two refreshes wait for each other).
fn refresh_lock_key(llm_key_hash: &str, platform_id: &str, external_user_id: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"atp-server/oauth-refresh/v1\0");
    for part in [llm_key_hash, platform_id, external_user_id] {
        h.update(part.as_bytes());
        h.update(b"\0");
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// Every toolkit with its tools, in registration order.
pub(crate) fn load_toolkits(c: &mut Connection) -> Result<Vec<ToolkitRecord>, rusqlite::Error> {
    let mut kits = Vec::new();
    {
        let mut stmt = c.prepare(
            "SELECT app_name, key_hash, endpoint_url, endpoint_key, toolkit_hash, language FROM toolkits ORDER BY app_name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ToolkitRecord {
                app_name: r.get(0)?,
                key_hash: r.get(1)?,
                endpoint_url: r.get(2)?,
                endpoint_key: r.get::<_, Option<String>>(3)?.map(Secret::new),
                toolkit_hash: r.get(4)?,
                language: r.get(5)?,
                tools: Vec::new(),
            })
        })?;
        for row in rows {
            kits.push(row?);
        }
    }
    let mut stmt = c.prepare(
        "SELECT name, code_hash, metadata FROM tools WHERE app_name = ?1 ORDER BY position, name",
    )?;
    for kit in &mut kits {
        let rows = stmt.query_map([&kit.app_name], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (name, code_hash, metadata) = row?;
            push_tool(kit, name, code_hash, &metadata);
        }
    }
    Ok(kits)
}

/// Adds a stored tool to its toolkit; one whose metadata can not be read
/// is skipped (and logged).
fn push_tool(kit: &mut ToolkitRecord, name: String, code_hash: String, metadata: &str) {
    let spec = serde_json::from_str::<ToolMetadata>(metadata)
        .map_err(|e| e.to_string())
        .and_then(|meta| ToolSpec::from_metadata(&name, meta).map_err(|e| e.to_string()));
    match spec {
        Ok(spec) => kit.tools.push(ToolRecord { code_hash, spec }),
        Err(e) => {
            tracing::warn!(app = %kit.app_name, tool = %name, "skipping a stored tool whose metadata can not be read: {e}")
        }
    }
}

/// A stored OAuth platform; one that can not be read is skipped (and
/// logged).
fn read_platform(id: &str, config: &str) -> Option<OAuthPlatform> {
    match serde_json::from_str(config) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(platform = %id, "skipping a stored OAuth platform that can not be read: {e}");
            None
        }
    }
}

/// Writes a toolkit's row and one tool (inserted or replaced).
pub(crate) fn save_tool(
    c: &mut Connection,
    kit: &ToolkitRecord,
    tool: &ToolRecord,
    position: usize,
) -> Result<(), rusqlite::Error> {
    let now = now_secs();
    let metadata = atp_registry::wire::to_json(&tool.spec.metadata());
    let tx = c.transaction()?;
    tx.execute(
        "INSERT INTO toolkits (app_name, key_hash, endpoint_url, endpoint_key, toolkit_hash, language, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(app_name) DO UPDATE SET key_hash = ?2, endpoint_url = ?3, endpoint_key = ?4,
             toolkit_hash = ?5, language = ?6, updated_at = ?7",
        params![
            kit.app_name,
            kit.key_hash,
            kit.endpoint_url,
            kit.endpoint_key.as_ref().map(Secret::expose),
            kit.toolkit_hash,
            kit.language,
            now
        ],
    )?;
    tx.execute(
        "INSERT INTO tools (app_name, name, position, code_hash, metadata, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(app_name, name) DO UPDATE SET code_hash = ?4, metadata = ?5, updated_at = ?6",
        params![
            kit.app_name,
            tool.spec.name,
            position as i64,
            tool.code_hash,
            metadata,
            now
        ],
    )?;
    tx.commit()
}

pub(crate) fn save_platform(c: &mut Connection, p: &OAuthPlatform) -> Result<(), rusqlite::Error> {
    let config = serde_json::to_string(p).unwrap_or_else(|_| "{}".into());
    c.execute(
        "INSERT INTO oauth_platforms (id, config) VALUES (?1, ?2)
         ON CONFLICT(id) DO UPDATE SET config = ?2",
        params![p.id, config],
    )?;
    Ok(())
}

pub(crate) fn load_platforms(c: &mut Connection) -> Result<Vec<OAuthPlatform>, rusqlite::Error> {
    let mut stmt = c.prepare("SELECT id, config FROM oauth_platforms ORDER BY id")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (id, config) = row?;
        out.extend(read_platform(&id, &config));
    }
    Ok(out)
}

pub(crate) fn insert_flow(
    c: &mut Connection,
    state: &str,
    flow: &PendingFlow,
) -> Result<(), rusqlite::Error> {
    // Flows older than an hour are abandoned.
    c.execute(
        "DELETE FROM oauth_states WHERE created_at < ?1",
        [now_secs() - 3600],
    )?;
    c.execute(
        "INSERT INTO oauth_states (state, platform_id, external_user_id, llm_key_hash, code_verifier, redirect_url, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            state,
            flow.platform_id,
            flow.external_user_id,
            flow.llm_key_hash,
            flow.code_verifier.expose(),
            flow.redirect_url,
            flow.created_at
        ],
    )?;
    Ok(())
}

/// Removes and returns a pending flow (a state is used once).
pub(crate) fn take_flow(
    c: &mut Connection,
    state: &str,
) -> Result<Option<PendingFlow>, rusqlite::Error> {
    let tx = c.transaction()?;
    let flow = tx
        .query_row(
            "SELECT platform_id, external_user_id, llm_key_hash, code_verifier, redirect_url, created_at
             FROM oauth_states WHERE state = ?1",
            [state],
            |r| {
                Ok(PendingFlow {
                    platform_id: r.get(0)?,
                    external_user_id: r.get(1)?,
                    llm_key_hash: r.get(2)?,
                    code_verifier: Secret::new(r.get::<_, String>(3)?),
                    redirect_url: r.get(4)?,
                    created_at: r.get(5)?,
                })
            },
        )
        .optional()?;
    tx.execute("DELETE FROM oauth_states WHERE state = ?1", [state])?;
    tx.commit()?;
    Ok(flow)
}

pub(crate) fn save_connection(
    c: &mut Connection,
    conn: &OAuthConnection,
) -> Result<(), rusqlite::Error> {
    let now = now_secs();
    c.execute(
        "INSERT INTO oauth_connections (llm_key_hash, platform_id, external_user_id, integration_id, access_token,
             refresh_token, token_type, scope, expires_at, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)
         ON CONFLICT(llm_key_hash, platform_id, external_user_id) DO UPDATE SET
             access_token = ?5, refresh_token = ?6, token_type = ?7, scope = ?8, expires_at = ?9, updated_at = ?10",
        params![
            conn.llm_key_hash,
            conn.platform_id,
            conn.external_user_id,
            conn.integration_id,
            conn.access_token.expose(),
            conn.refresh_token.as_ref().map(Secret::expose),
            conn.token_type,
            conn.scope,
            conn.expires_at,
            now
        ],
    )?;
    Ok(())
}

pub(crate) fn get_connection(
    c: &mut Connection,
    llm_key_hash: &str,
    platform_id: &str,
    external_user_id: &str,
) -> Result<Option<OAuthConnection>, rusqlite::Error> {
    c.query_row(
        "SELECT integration_id, access_token, refresh_token, token_type, scope, expires_at
         FROM oauth_connections WHERE llm_key_hash = ?1 AND platform_id = ?2 AND external_user_id = ?3",
        params![llm_key_hash, platform_id, external_user_id],
        |r| {
            Ok(OAuthConnection {
                llm_key_hash: llm_key_hash.to_owned(),
                platform_id: platform_id.to_owned(),
                external_user_id: external_user_id.to_owned(),
                integration_id: r.get(0)?,
                access_token: Secret::new(r.get::<_, String>(1)?),
                refresh_token: r.get::<_, Option<String>>(2)?.map(Secret::new),
                token_type: r.get(3)?,
                scope: r.get(4)?,
                expires_at: r.get(5)?,
            })
        },
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips() {
        let store = Store::open(&DbLocation::Memory).expect("open");
        let kit = ToolkitRecord {
            app_name: "crm".into(),
            key_hash: "h".into(),
            endpoint_url: None,
            endpoint_key: Some(Secret::new("ek")),
            toolkit_hash: Some("th".into()),
            language: "Rust".into(),
            tools: Vec::new(),
        };
        let tool = ToolRecord {
            code_hash: "c".into(),
            spec: ToolSpec {
                name: "echo".into(),
                params: vec!["text".into()],
                required_params: vec!["text".into()],
                description: "Echoes.".into(),
                auth_provider: None,
                auth_type: None,
                auth_with: None,
                input_schema: json!({"type": "object", "properties": {}, "required": []}),
            },
        };
        store
            .call_now(|c| save_tool(c, &kit, &tool, 0))
            .expect("save");
        let kits = store.call_now(load_toolkits).expect("load");
        assert_eq!(kits.len(), 1);
        assert_eq!(kits[0].tools, [tool]);
        assert_eq!(
            kits[0].endpoint_key.as_ref().map(Secret::expose),
            Some("ek")
        );
        let flow = PendingFlow {
            platform_id: "p".into(),
            external_user_id: "u".into(),
            llm_key_hash: "l".into(),
            code_verifier: Secret::new("v"),
            redirect_url: None,
            created_at: now_secs(),
        };
        store
            .call_now(|c| insert_flow(c, "s1", &flow))
            .expect("insert");
        assert!(
            store
                .call_now(|c| take_flow(c, "s1"))
                .expect("take")
                .is_some()
        );
        assert!(
            store
                .call_now(|c| take_flow(c, "s1"))
                .expect("take")
                .is_none()
        );
    }

    /// The `Store` methods (their SQLite forms; the PostgreSQL forms run
    /// in tests/e2e/postgres.rs).
    #[tokio::test]
    async fn store_methods_on_sqlite() {
        let store = Store::open(&DbLocation::Memory).expect("open");
        let kit = ToolkitRecord {
            app_name: "crm".into(),
            key_hash: "h".into(),
            endpoint_url: Some("http://127.0.0.1:9".into()),
            endpoint_key: None,
            toolkit_hash: None,
            language: "Rust".into(),
            tools: Vec::new(),
        };
        let tool = ToolRecord {
            code_hash: "c".into(),
            spec: ToolSpec {
                name: "echo".into(),
                params: Vec::new(),
                required_params: Vec::new(),
                description: "Echoes.".into(),
                auth_provider: None,
                auth_type: None,
                auth_with: None,
                input_schema: json!({"type": "object", "properties": {}, "required": []}),
            },
        };
        store.save_tool(&kit, &tool, 0).await.expect("save");
        let found = store.load_toolkit("crm").await.expect("load").expect("kit");
        assert_eq!(found.tools, [tool]);
        assert_eq!(found.endpoint_url.as_deref(), Some("http://127.0.0.1:9"));

        let flow = PendingFlow {
            platform_id: "p".into(),
            external_user_id: "u".into(),
            llm_key_hash: "l".into(),
            code_verifier: Secret::new("v"),
            redirect_url: Some("http://127.0.0.1:9/done".into()),
            created_at: now_secs(),
        };
        store.insert_flow("s1", &flow).await.expect("insert");
        let taken = store.take_flow("s1").await.expect("take").expect("flow");
        assert_eq!(taken.code_verifier.expose(), "v");
        assert_eq!(taken.redirect_url, flow.redirect_url);
        assert!(store.take_flow("s1").await.expect("take").is_none());

        assert!(
            store
                .get_connection("l", "p", "u")
                .await
                .expect("get")
                .is_none()
        );
        let conn = OAuthConnection {
            llm_key_hash: "l".into(),
            platform_id: "p".into(),
            external_user_id: "u".into(),
            integration_id: "i1".into(),
            access_token: Secret::new("a1"),
            refresh_token: Some(Secret::new("r1")),
            token_type: Some("Bearer".into()),
            scope: None,
            expires_at: Some(42),
        };
        store.save_connection(&conn).await.expect("save");
        // A later save updates the tokens and keeps the integration id.
        let again = OAuthConnection {
            integration_id: "i2".into(),
            access_token: Secret::new("a2"),
            refresh_token: None,
            expires_at: None,
            ..conn
        };
        store.save_connection(&again).await.expect("save");
        let got = store
            .get_connection("l", "p", "u")
            .await
            .expect("get")
            .expect("connection");
        assert_eq!(got.integration_id, "i1");
        assert_eq!(got.access_token.expose(), "a2");
        assert!(got.refresh_token.is_none() && got.expires_at.is_none());

        // SQLite has no lock to take (one server per database).
        let lock = store
            .lock_refresh("l", "p", "u", std::time::Duration::from_secs(1))
            .await
            .expect("lock");
        lock.release().await;
    }

    #[test]
    fn refresh_lock_keys_name_one_connection() {
        let k = refresh_lock_key("l", "p", "u");
        assert_eq!(k, refresh_lock_key("l", "p", "u"));
        // The parts are separated: moving a byte across them is another key.
        assert_ne!(k, refresh_lock_key("l", "pu", ""));
        assert_ne!(k, refresh_lock_key("l", "p", "v"));
    }
}
