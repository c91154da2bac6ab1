//! The database (SQLite or PostgreSQL): toolkit registrations, OAuth
//! platforms, pending OAuth flows and users' connections (tokens).
//!
//! Every secret is sealed here before it is written and opened here when
//! it is read ([`crate::secrets`]): the rest of the server only sees
//! plain values, the database only sealed ones.

use std::sync::{Arc, Mutex, PoisonError};

use atp_registry::{Secret, ToolSpec, wire::ToolMetadata};
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};

use crate::{
    config::{DbLocation, OAuthPlatform},
    keys::now_secs,
    secrets::{Field, Keyring, Pass, PassReport, SecretsError},
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
    /// A secret could not be sealed, or a stored one opened.
    #[error(transparent)]
    Sealed(#[from] SecretsError),
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        // deadpool's text holds the backend's error, never the URL.
        StoreError::Pool(e.to_string())
    }
}

/// SQLite's versioned migrations: (version, SQL), in order.
const SQLITE_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_initial.sql")),
    (2, include_str!("../migrations/sqlite/0002_api_keys.sql")),
    (3, include_str!("../migrations/sqlite/0003_audit.sql")),
];

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
    /// Seals and opens the secrets stored.
    pub keyring: Arc<Keyring>,
}

/// A PostgreSQL database.
#[derive(Clone)]
pub(crate) struct Pg {
    pool: deadpool_postgres::Pool,
    /// Seals and opens the secrets stored.
    pub keyring: Arc<Keyring>,
}

impl Pg {
    /// A connection from the pool.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }
}

impl Store {
    /// Opens a SQLite database (PostgreSQL needs [`Store::connect`]),
    /// sealing and opening secrets with `keyring`.
    pub fn open(location: &DbLocation, keyring: Arc<Keyring>) -> Result<Self, StoreError> {
        let conn = match location {
            DbLocation::Memory => Connection::open_in_memory()?,
            DbLocation::File(path) => {
                let c = Connection::open(path)?;
                c.pragma_update(None, "journal_mode", "WAL")?;
                c.pragma_update(None, "synchronous", "NORMAL")?;
                // What a row held before it was updated or deleted is
                // zeroed, not left in the file's free space: a token
                // sealed at start (or re-sealed by a rotation) leaves no
                // plain (or old-key) copy behind.
                c.pragma_update(None, "secure_delete", "ON")?;
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
            keyring,
        }))
    }

    /// Opens either database; PostgreSQL's migrations run here.
    pub async fn connect(location: &DbLocation, keyring: Arc<Keyring>) -> Result<Self, StoreError> {
        match location {
            DbLocation::Postgres(url) => Ok(Store::Postgres(Pg::connect(url, keyring).await?)),
            other => Self::open(other, keyring),
        }
    }

    /// An in-memory SQLite database with a key of this process (tests).
    #[cfg(test)]
    pub fn memory() -> Self {
        let keyring = Keyring::ephemeral().expect("a key");
        Self::open(&DbLocation::Memory, Arc::new(keyring)).expect("open")
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

    /// The keys that seal and open the secrets stored.
    pub fn keyring(&self) -> &Keyring {
        match self {
            Store::Sqlite(s) => &s.keyring,
            Store::Postgres(p) => &p.keyring,
        }
    }

    /// Seals an OAuth platform's client secret into its stored JSON.
    pub fn platform_json(&self, p: &OAuthPlatform) -> Result<String, StoreError> {
        platform_json(self.keyring(), p)
    }

    /// Every toolkit with its tools, in registration order.
    pub async fn load_toolkits(&self) -> Result<Vec<ToolkitRecord>, StoreError> {
        match self {
            Store::Sqlite(s) => {
                let keyring = s.keyring.clone();
                s.call(move |c| load_toolkits(c, &keyring)).await
            }
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
                    let app_name: String = r.try_get(0)?;
                    let stored: Option<String> = r.try_get(3)?;
                    let Ok(endpoint_key) = open_endpoint_key(&p.keyring, &app_name, stored) else {
                        continue;
                    };
                    kits.push(ToolkitRecord {
                        app_name,
                        key_hash: r.try_get(1)?,
                        endpoint_url: r.try_get(2)?,
                        endpoint_key,
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
        let config = self.platform_json(p)?;
        match self {
            Store::Sqlite(s) => {
                let id = p.id.clone();
                s.call(move |c| save_platform(c, &id, &config)).await
            }
            Store::Postgres(pg) => {
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
            Store::Sqlite(s) => {
                let keyring = s.keyring.clone();
                s.call(move |c| load_platforms(c, &keyring)).await
            }
            Store::Postgres(pg) => {
                let rows = pg
                    .client()
                    .await?
                    .query("SELECT id, config FROM oauth_platforms ORDER BY id", &[])
                    .await?;
                let mut out = Vec::new();
                for r in rows {
                    if let Some(p) = read_platform(
                        &pg.keyring,
                        &r.try_get::<_, String>(0)?,
                        &r.try_get::<_, String>(1)?,
                    ) {
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
    (3, include_str!("../migrations/postgres/0003_api_keys.sql")),
    (4, include_str!("../migrations/postgres/0004_audit.sql")),
];

/// The most connections one server holds to PostgreSQL.
const PG_POOL_SIZE: usize = 16;
/// How long a query waits for a connection (or for making one).
const PG_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Pg {
    /// Connects a pool to `url` and applies the migrations (under an
    /// advisory lock: servers starting together apply each one once).
    async fn connect(url: &str, keyring: Arc<Keyring>) -> Result<Self, StoreError> {
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
        let pg = Pg { pool, keyring };
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
    pub async fn call<T, E, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        E: Into<StoreError> + Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut c)
        })
        .await
        .map_err(|_| StoreError::Task)?
        .map_err(Into::into)
    }

    /// Runs `f` on the connection on this thread (startup and tests).
    pub fn call_now<T, E>(&self, f: impl FnOnce(&mut Connection) -> Result<T, E>) -> Result<T, E> {
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

/// A user's connection to an OAuth platform, without its tokens.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionSummary {
    pub llm_key_hash: String,
    pub platform_id: String,
    pub external_user_id: String,
    pub integration_id: String,
    pub expires_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
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
        let endpoint_key = self.keyring().seal_opt(
            Field::EndpointKey,
            &[&kit.app_name],
            kit.endpoint_key.as_ref(),
        )?;
        match self {
            Store::Sqlite(s) => {
                let (kit, tool) = (kit.clone(), tool.clone());
                s.call(move |c| save_tool(c, &kit, endpoint_key.as_deref(), &tool, position))
                    .await
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
                        &endpoint_key,
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
    /// started more than `lifetime` seconds ago: abandoned).
    pub async fn insert_flow(
        &self,
        state: &str,
        flow: &PendingFlow,
        lifetime: i64,
    ) -> Result<(), StoreError> {
        let verifier =
            self.keyring()
                .seal(Field::CodeVerifier, &[state], flow.code_verifier.expose())?;
        match self {
            Store::Sqlite(s) => {
                let (state, flow) = (state.to_owned(), flow.clone());
                s.call(move |c| insert_flow(c, &state, &flow, &verifier, lifetime))
                    .await
            }
            Store::Postgres(p) => {
                let c = p.client().await?;
                c.execute(
                    "DELETE FROM oauth_states WHERE created_at < $1",
                    &[&now_secs().saturating_sub(lifetime)],
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
                        &verifier,
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
                let (state, keyring) = (state.to_owned(), s.keyring.clone());
                s.call(move |c| take_flow(c, &keyring, &state)).await
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
                let verifier: String = r.try_get(3)?;
                Ok(Some(PendingFlow {
                    platform_id: r.try_get(0)?,
                    external_user_id: r.try_get(1)?,
                    llm_key_hash: r.try_get(2)?,
                    code_verifier: p.keyring.open(Field::CodeVerifier, &[state], &verifier)?,
                    redirect_url: r.try_get(4)?,
                    created_at: r.try_get(5)?,
                }))
            }
        }
    }

    /// Adds or updates a user's connection (its `integration_id` and
    /// `created_at` stay those of the first save).
    pub async fn save_connection(&self, conn: &OAuthConnection) -> Result<(), StoreError> {
        let (access, refresh) = seal_tokens(self.keyring(), conn)?;
        match self {
            Store::Sqlite(s) => {
                let conn = conn.clone();
                s.call(move |c| save_connection(c, &conn, &access, refresh.as_deref()))
                    .await
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
                            &access,
                            &refresh,
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

    /// Removes a user's connection if its refresh token is still
    /// `refresh_token` (one the provider refused), and says whether it
    /// did: a connection made again meanwhile, with new tokens, stays.
    pub async fn forget_connection(
        &self,
        llm_key_hash: &str,
        platform_id: &str,
        external_user_id: &str,
        refresh_token: &Secret,
    ) -> Result<bool, StoreError> {
        let row = [llm_key_hash, platform_id, external_user_id];
        match self {
            Store::Sqlite(s) => {
                let (llm, pid, user) = (
                    llm_key_hash.to_owned(),
                    platform_id.to_owned(),
                    external_user_id.to_owned(),
                );
                let (keyring, refresh_token) = (s.keyring.clone(), refresh_token.clone());
                s.call(move |c| forget_connection(c, &keyring, [&llm, &pid, &user], &refresh_token))
                    .await
            }
            Store::Postgres(p) => {
                let mut c = p.client().await?;
                let tx = c.transaction().await?;
                let found = tx
                    .query_opt(
                        "SELECT refresh_token FROM oauth_connections
                         WHERE llm_key_hash = $1 AND platform_id = $2 AND external_user_id = $3
                         FOR UPDATE",
                        &[&llm_key_hash, &platform_id, &external_user_id],
                    )
                    .await?;
                let sealed: Option<String> = match found {
                    Some(r) => r.try_get(0)?,
                    None => return Ok(false),
                };
                let stored = p
                    .keyring
                    .open_opt(Field::RefreshToken, &row, sealed.as_deref())?;
                if stored.as_ref() != Some(refresh_token) {
                    return Ok(false);
                }
                tx.execute(
                    "DELETE FROM oauth_connections
                     WHERE llm_key_hash = $1 AND platform_id = $2 AND external_user_id = $3",
                    &[&llm_key_hash, &platform_id, &external_user_id],
                )
                .await?;
                tx.commit().await?;
                Ok(true)
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
                let keyring = s.keyring.clone();
                s.call(move |c| get_connection(c, &keyring, &llm, &pid, &user))
                    .await
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
                let row = [llm_key_hash, platform_id, external_user_id];
                let keyring = &p.keyring;
                Ok(Some(OAuthConnection {
                    llm_key_hash: llm_key_hash.to_owned(),
                    platform_id: platform_id.to_owned(),
                    external_user_id: external_user_id.to_owned(),
                    integration_id: r.try_get(0)?,
                    access_token: keyring.open(
                        Field::AccessToken,
                        &row,
                        &r.try_get::<_, String>(1)?,
                    )?,
                    refresh_token: keyring.open_opt(
                        Field::RefreshToken,
                        &row,
                        r.try_get::<_, Option<String>>(2)?.as_deref(),
                    )?,
                    token_type: r.try_get(3)?,
                    scope: r.try_get(4)?,
                    expires_at: r.try_get(5)?,
                }))
            }
        }
    }

    /// Every user's connection, without its tokens (for the console),
    /// the newest first.
    pub async fn list_connections(&self) -> Result<Vec<ConnectionSummary>, StoreError> {
        const SQL: &str = "SELECT llm_key_hash, platform_id, external_user_id, integration_id, expires_at, created_at, updated_at
             FROM oauth_connections ORDER BY updated_at DESC, external_user_id LIMIT 1000";
        match self {
            Store::Sqlite(s) => {
                s.call(|c| {
                    let mut stmt = c.prepare(SQL)?;
                    let rows = stmt.query_map([], |r| {
                        Ok(ConnectionSummary {
                            llm_key_hash: r.get(0)?,
                            platform_id: r.get(1)?,
                            external_user_id: r.get(2)?,
                            integration_id: r.get(3)?,
                            expires_at: r.get(4)?,
                            created_at: r.get(5)?,
                            updated_at: r.get(6)?,
                        })
                    })?;
                    rows.collect::<Result<Vec<_>, rusqlite::Error>>()
                })
                .await
            }
            Store::Postgres(p) => {
                let rows = p.client().await?.query(SQL, &[]).await?;
                rows.iter()
                    .map(|r| {
                        Ok(ConnectionSummary {
                            llm_key_hash: r.try_get(0)?,
                            platform_id: r.try_get(1)?,
                            external_user_id: r.try_get(2)?,
                            integration_id: r.try_get(3)?,
                            expires_at: r.try_get(4)?,
                            created_at: r.try_get(5)?,
                            updated_at: r.try_get(6)?,
                        })
                    })
                    .collect()
            }
        }
    }

    /// Deletes the connection with this `integration_id`; whether there
    /// was one.
    pub async fn delete_connection(&self, integration_id: &str) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(s) => {
                let id = integration_id.to_owned();
                s.call(move |c| {
                    c.execute(
                        "DELETE FROM oauth_connections WHERE integration_id = ?1",
                        params![id],
                    )
                    .map(|n| n > 0)
                })
                .await
            }
            Store::Postgres(p) => Ok(p
                .client()
                .await?
                .execute(
                    "DELETE FROM oauth_connections WHERE integration_id = $1",
                    &[&integration_id],
                )
                .await?
                > 0),
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

/// A stored toolkit's endpoint key, opened; `Err(())` (logged) when it
/// does not open: the toolkit is then skipped until it registers again.
fn open_endpoint_key(
    keyring: &Keyring,
    app_name: &str,
    stored: Option<String>,
) -> Result<Option<Secret>, ()> {
    keyring
        .open_opt(Field::EndpointKey, &[app_name], stored.as_deref())
        .map_err(|e| {
            tracing::error!(app = %app_name, "skipping a stored toolkit until it registers again: {e}");
        })
}

impl Store {
    /// Runs a pass over every stored secret ([`Pass`]: seal the plain
    /// ones, or rotate) in one transaction; on PostgreSQL under an
    /// advisory lock, so servers starting together make it once.
    pub async fn reseal(&self, pass: Pass) -> Result<PassReport, StoreError> {
        match self {
            Store::Sqlite(s) => {
                let keyring = s.keyring.clone();
                s.call(move |c| reseal_sqlite(c, &keyring, pass)).await
            }
            Store::Postgres(p) => p.reseal(pass).await,
        }
    }
}

/// The rows of a sealed column that `pass` may change: the row key's
/// values, then the stored value.
fn pass_select(field: Field, pass: Pass, keyring: &Keyring, pg: bool) -> String {
    let (table, column) = (field.table(), field.column());
    let keys = field.row_key().join(", ");
    let which = match pass {
        Pass::SealPlaintext => format!("{column} NOT LIKE 'sealed:%'"),
        Pass::Rotate => format!("{column} NOT LIKE 'sealed:v1:{}:%'", keyring.sealing_id()),
    };
    let lock = if pg { " FOR UPDATE" } else { "" };
    format!("SELECT {keys}, {column} FROM {table} WHERE {column} IS NOT NULL AND {which}{lock}")
}

/// Writes one value of a sealed column: the value is parameter 1, the
/// row key's values follow.
fn pass_update(field: Field, pg: bool) -> String {
    let p = |i: usize| if pg { format!("${i}") } else { format!("?{i}") };
    let row = field
        .row_key()
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{k} = {}", p(i + 2)))
        .collect::<Vec<_>>()
        .join(" AND ");
    format!(
        "UPDATE {} SET {} = {} WHERE {row}",
        field.table(),
        field.column(),
        p(1)
    )
}

/// How many values of a sealed column each key sealed.
fn key_counts_select(field: Field) -> String {
    let (table, column) = (field.table(), field.column());
    format!(
        "SELECT substr({column}, 11, 8), COUNT(*) FROM {table} WHERE {column} LIKE 'sealed:v1:%' GROUP BY 1"
    )
}

/// What `pass` makes of a stored platform's JSON: its new text, or
/// `None` when it stays (or can not be read: loading it logs that).
fn reseal_platform(
    keyring: &Keyring,
    pass: Pass,
    report: &mut PassReport,
    id: &str,
    config: &str,
) -> Result<Option<String>, SecretsError> {
    let Ok(mut value) = serde_json::from_str::<serde_json::Value>(config) else {
        return Ok(None);
    };
    let Some(stored) = value
        .get("client_secret")
        .and_then(serde_json::Value::as_str)
    else {
        return Ok(None);
    };
    if pass == Pass::SealPlaintext
        && let Some(key_id) = crate::secrets::key_id_of(stored)
    {
        report.sealed_under(keyring, key_id, 1);
    }
    let Some(new) = keyring.reseal(pass, Field::ClientSecret, &[id], stored)? else {
        return Ok(None);
    };
    value["client_secret"] = new.into();
    report.wrote(Field::ClientSecret);
    Ok(Some(value.to_string()))
}

/// [`Store::reseal`] on SQLite.
pub(crate) fn reseal_sqlite(
    c: &mut Connection,
    keyring: &Keyring,
    pass: Pass,
) -> Result<PassReport, StoreError> {
    let tx = c.transaction()?;
    let mut report = PassReport::default();
    for field in Field::COLUMNS {
        let width = field.row_key().len() + 1;
        let rows: Vec<Vec<String>> = {
            let mut stmt = tx.prepare(&pass_select(field, pass, keyring, false))?;
            stmt.query_map([], |r| {
                (0..width)
                    .map(|i| r.get::<_, String>(i))
                    .collect::<Result<Vec<_>, _>>()
            })?
            .collect::<Result<_, _>>()?
        };
        let update = pass_update(field, false);
        for row in &rows {
            let Some((stored, key)) = row.split_last() else {
                continue;
            };
            let key: Vec<&str> = key.iter().map(String::as_str).collect();
            if let Some(new) = keyring.reseal(pass, field, &key, stored)? {
                tx.execute(
                    &update,
                    params_from_iter(std::iter::once(new.as_str()).chain(key.iter().copied())),
                )?;
                report.wrote(field);
            }
        }
        if pass == Pass::SealPlaintext {
            let mut stmt = tx.prepare(&key_counts_select(field))?;
            let counts =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for count in counts {
                let (key_id, n) = count?;
                report.sealed_under(keyring, &key_id, usize::try_from(n).unwrap_or(0));
            }
        }
    }
    let platforms: Vec<(String, String)> = {
        let mut stmt = tx.prepare("SELECT id, config FROM oauth_platforms")?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    for (id, config) in platforms {
        if let Some(new) = reseal_platform(keyring, pass, &mut report, &id, &config)? {
            tx.execute(
                "UPDATE oauth_platforms SET config = ?1 WHERE id = ?2",
                params![new, id],
            )?;
        }
    }
    tx.commit()?;
    if report.total() > 0 {
        // The old values are in the WAL until a checkpoint: write the
        // pages back now and empty the WAL (best effort: a reader may
        // hold it; the next checkpoint does it then).
        let _ = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }
    Ok(report)
}

impl Pg {
    /// [`Store::reseal`] on PostgreSQL.
    async fn reseal(&self, pass: Pass) -> Result<PassReport, StoreError> {
        use tokio_postgres::types::ToSql;
        let keyring = &self.keyring;
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PG_LOCK_SECRETS])
            .await?;
        let mut report = PassReport::default();
        for field in Field::COLUMNS {
            let width = field.row_key().len() + 1;
            let rows = tx
                .query(&pass_select(field, pass, keyring, true), &[])
                .await?;
            let update = pass_update(field, true);
            for r in rows {
                let row = (0..width)
                    .map(|i| r.try_get::<_, String>(i))
                    .collect::<Result<Vec<_>, _>>()?;
                let Some((stored, key)) = row.split_last() else {
                    continue;
                };
                let key: Vec<&str> = key.iter().map(String::as_str).collect();
                if let Some(new) = keyring.reseal(pass, field, &key, stored)? {
                    let mut args: Vec<&(dyn ToSql + Sync)> = vec![&new];
                    args.extend(key.iter().map(|k| k as &(dyn ToSql + Sync)));
                    tx.execute(&update, &args).await?;
                    report.wrote(field);
                }
            }
            if pass == Pass::SealPlaintext {
                for r in tx.query(&key_counts_select(field), &[]).await? {
                    let (key_id, n): (String, i64) = (r.try_get(0)?, r.try_get(1)?);
                    report.sealed_under(keyring, &key_id, usize::try_from(n).unwrap_or(0));
                }
            }
        }
        for r in tx
            .query("SELECT id, config FROM oauth_platforms FOR UPDATE", &[])
            .await?
        {
            let (id, config): (String, String) = (r.try_get(0)?, r.try_get(1)?);
            if let Some(new) = reseal_platform(keyring, pass, &mut report, &id, &config)? {
                tx.execute(
                    "UPDATE oauth_platforms SET config = $1 WHERE id = $2",
                    &[&new, &id],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(report)
    }
}

/// The advisory lock of the passes over the stored secrets.
const PG_LOCK_SECRETS: i64 = 7_415_609;

/// Every toolkit with its tools, in registration order (a toolkit whose
/// endpoint key does not open is skipped, and logged).
pub(crate) fn load_toolkits(
    c: &mut Connection,
    keyring: &Keyring,
) -> Result<Vec<ToolkitRecord>, rusqlite::Error> {
    let mut kits = Vec::new();
    {
        let mut stmt = c.prepare(
            "SELECT app_name, key_hash, endpoint_url, endpoint_key, toolkit_hash, language FROM toolkits ORDER BY app_name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                ToolkitRecord {
                    app_name: r.get(0)?,
                    key_hash: r.get(1)?,
                    endpoint_url: r.get(2)?,
                    endpoint_key: None,
                    toolkit_hash: r.get(4)?,
                    language: r.get(5)?,
                    tools: Vec::new(),
                },
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        for row in rows {
            let (mut kit, stored) = row?;
            if let Ok(key) = open_endpoint_key(keyring, &kit.app_name, stored) {
                kit.endpoint_key = key;
                kits.push(kit);
            }
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

/// An OAuth platform as stored: its JSON, with the client secret sealed.
fn platform_json(keyring: &Keyring, p: &OAuthPlatform) -> Result<String, StoreError> {
    let mut value = serde_json::to_value(p).unwrap_or_default();
    let sealed = keyring.seal(Field::ClientSecret, &[&p.id], p.client_secret.expose())?;
    if let Some(m) = value.as_object_mut() {
        m.insert("client_secret".into(), sealed.into());
    }
    Ok(value.to_string())
}

/// A stored OAuth platform, its client secret opened; one that can not
/// be read is skipped (and logged).
fn read_platform(keyring: &Keyring, id: &str, config: &str) -> Option<OAuthPlatform> {
    let opened = serde_json::from_str::<serde_json::Value>(config)
        .map_err(|e| e.to_string())
        .and_then(|mut value| {
            let stored = value
                .get("client_secret")
                .and_then(serde_json::Value::as_str)
                .ok_or("it has no client_secret")?;
            let secret = keyring
                .open(Field::ClientSecret, &[id], stored)
                .map_err(|e| e.to_string())?;
            value["client_secret"] = secret.expose().into();
            serde_json::from_value::<OAuthPlatform>(value).map_err(|e| e.to_string())
        });
    match opened {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::error!(platform = %id, "skipping a stored OAuth platform that can not be read: {e}");
            None
        }
    }
}

/// Seals a connection's tokens.
fn seal_tokens(
    keyring: &Keyring,
    conn: &OAuthConnection,
) -> Result<(String, Option<String>), SecretsError> {
    let row = [
        conn.llm_key_hash.as_str(),
        &conn.platform_id,
        &conn.external_user_id,
    ];
    Ok((
        keyring.seal(Field::AccessToken, &row, conn.access_token.expose())?,
        keyring.seal_opt(Field::RefreshToken, &row, conn.refresh_token.as_ref())?,
    ))
}

/// Writes a toolkit's row (with its sealed `endpoint_key`) and one tool
/// (inserted or replaced).
pub(crate) fn save_tool(
    c: &mut Connection,
    kit: &ToolkitRecord,
    endpoint_key: Option<&str>,
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
            endpoint_key,
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

/// Writes a platform's stored JSON ([`Store::platform_json`]).
pub(crate) fn save_platform(
    c: &mut Connection,
    id: &str,
    config: &str,
) -> Result<(), rusqlite::Error> {
    c.execute(
        "INSERT INTO oauth_platforms (id, config) VALUES (?1, ?2)
         ON CONFLICT(id) DO UPDATE SET config = ?2",
        params![id, config],
    )?;
    Ok(())
}

pub(crate) fn load_platforms(
    c: &mut Connection,
    keyring: &Keyring,
) -> Result<Vec<OAuthPlatform>, rusqlite::Error> {
    let mut stmt = c.prepare("SELECT id, config FROM oauth_platforms ORDER BY id")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (id, config) = row?;
        out.extend(read_platform(keyring, &id, &config));
    }
    Ok(out)
}

/// Stores a started flow (its verifier sealed: `verifier`).
pub(crate) fn insert_flow(
    c: &mut Connection,
    state: &str,
    flow: &PendingFlow,
    verifier: &str,
    lifetime: i64,
) -> Result<(), rusqlite::Error> {
    // Flows older than their lifetime are abandoned.
    c.execute(
        "DELETE FROM oauth_states WHERE created_at < ?1",
        [now_secs().saturating_sub(lifetime)],
    )?;
    c.execute(
        "INSERT INTO oauth_states (state, platform_id, external_user_id, llm_key_hash, code_verifier, redirect_url, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            state,
            flow.platform_id,
            flow.external_user_id,
            flow.llm_key_hash,
            verifier,
            flow.redirect_url,
            flow.created_at
        ],
    )?;
    Ok(())
}

/// Removes and returns a pending flow (a state is used once).
pub(crate) fn take_flow(
    c: &mut Connection,
    keyring: &Keyring,
    state: &str,
) -> Result<Option<PendingFlow>, StoreError> {
    let tx = c.transaction()?;
    let flow = tx
        .query_row(
            "SELECT platform_id, external_user_id, llm_key_hash, code_verifier, redirect_url, created_at
             FROM oauth_states WHERE state = ?1",
            [state],
            |r| {
                Ok((
                    PendingFlow {
                        platform_id: r.get(0)?,
                        external_user_id: r.get(1)?,
                        llm_key_hash: r.get(2)?,
                        code_verifier: Secret::default(),
                        redirect_url: r.get(4)?,
                        created_at: r.get(5)?,
                    },
                    r.get::<_, String>(3)?,
                ))
            },
        )
        .optional()?;
    tx.execute("DELETE FROM oauth_states WHERE state = ?1", [state])?;
    tx.commit()?;
    let Some((mut flow, verifier)) = flow else {
        return Ok(None);
    };
    flow.code_verifier = keyring.open(Field::CodeVerifier, &[state], &verifier)?;
    Ok(Some(flow))
}

/// Writes a connection (its tokens sealed: `access`, `refresh`).
pub(crate) fn save_connection(
    c: &mut Connection,
    conn: &OAuthConnection,
    access: &str,
    refresh: Option<&str>,
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
            access,
            refresh,
            conn.token_type,
            conn.scope,
            conn.expires_at,
            now
        ],
    )?;
    Ok(())
}

/// Removes a connection whose refresh token is `refresh_token` (see
/// [`Store::forget_connection`]).
pub(crate) fn forget_connection(
    c: &mut Connection,
    keyring: &Keyring,
    row: [&str; 3],
    refresh_token: &Secret,
) -> Result<bool, StoreError> {
    let tx = c.transaction()?;
    let found = tx
        .query_row(
            "SELECT refresh_token FROM oauth_connections
             WHERE llm_key_hash = ?1 AND platform_id = ?2 AND external_user_id = ?3",
            row,
            |r| r.get::<_, Option<String>>(0),
        )
        .optional()?;
    let Some(sealed) = found else {
        return Ok(false);
    };
    let stored = keyring.open_opt(Field::RefreshToken, &row, sealed.as_deref())?;
    if stored.as_ref() != Some(refresh_token) {
        return Ok(false);
    }
    tx.execute(
        "DELETE FROM oauth_connections
         WHERE llm_key_hash = ?1 AND platform_id = ?2 AND external_user_id = ?3",
        row,
    )?;
    tx.commit()?;
    Ok(true)
}

/// A user's connection, its tokens opened.
pub(crate) fn get_connection(
    c: &mut Connection,
    keyring: &Keyring,
    llm_key_hash: &str,
    platform_id: &str,
    external_user_id: &str,
) -> Result<Option<OAuthConnection>, StoreError> {
    let found = c
        .query_row(
            "SELECT integration_id, access_token, refresh_token, token_type, scope, expires_at
             FROM oauth_connections WHERE llm_key_hash = ?1 AND platform_id = ?2 AND external_user_id = ?3",
            params![llm_key_hash, platform_id, external_user_id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                ))
            },
        )
        .optional()?;
    let Some((integration_id, access, refresh, token_type, scope, expires_at)) = found else {
        return Ok(None);
    };
    let row = [llm_key_hash, platform_id, external_user_id];
    Ok(Some(OAuthConnection {
        llm_key_hash: llm_key_hash.to_owned(),
        platform_id: platform_id.to_owned(),
        external_user_id: external_user_id.to_owned(),
        integration_id,
        access_token: keyring.open(Field::AccessToken, &row, &access)?,
        refresh_token: keyring.open_opt(Field::RefreshToken, &row, refresh.as_deref())?,
        token_type,
        scope,
        expires_at,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips() {
        let store = Store::memory();
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
        let keyring = store.keyring();
        let sealed = keyring
            .seal(Field::EndpointKey, &["crm"], "ek")
            .expect("seal");
        store
            .call_now(|c| save_tool(c, &kit, Some(&sealed), &tool, 0))
            .expect("save");
        let kits = store.call_now(|c| load_toolkits(c, keyring)).expect("load");
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
        let verifier = keyring
            .seal(Field::CodeVerifier, &["s1"], "v")
            .expect("seal");
        store
            .call_now(|c| insert_flow(c, "s1", &flow, &verifier, 3600))
            .expect("insert");
        let sqlite = store.sqlite().expect("SQLite");
        let taken = sqlite
            .call_now(|c| take_flow(c, keyring, "s1"))
            .expect("take")
            .expect("a flow");
        assert_eq!(taken.code_verifier.expose(), "v");
        assert!(
            sqlite
                .call_now(|c| take_flow(c, keyring, "s1"))
                .expect("take")
                .is_none()
        );
    }

    /// The `Store` methods (their SQLite forms; the PostgreSQL forms run
    /// in tests/e2e/postgres.rs).
    #[tokio::test]
    async fn store_methods_on_sqlite() {
        let store = Store::memory();
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
        store.insert_flow("s1", &flow, 3600).await.expect("insert");
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

    fn connection(user: &str, access: &str, refresh: &str) -> OAuthConnection {
        OAuthConnection {
            llm_key_hash: "l".into(),
            platform_id: "p".into(),
            external_user_id: user.into(),
            integration_id: format!("i-{user}"),
            access_token: Secret::new(access),
            refresh_token: Some(Secret::new(refresh)),
            token_type: None,
            scope: None,
            expires_at: None,
        }
    }

    fn platform(id: &str, secret: &str) -> OAuthPlatform {
        OAuthPlatform {
            id: id.into(),
            provider: None,
            name: None,
            authorize_url: "https://example.com/a".into(),
            token_url: "https://example.com/t".into(),
            client_id: "cid".into(),
            client_secret: Secret::new(secret),
            scopes: Vec::new(),
            extra_authorize_params: Vec::new(),
        }
    }

    fn kit(app: &str, endpoint_key: &str) -> ToolkitRecord {
        ToolkitRecord {
            app_name: app.into(),
            key_hash: "h".into(),
            endpoint_url: Some("http://127.0.0.1:9".into()),
            endpoint_key: Some(Secret::new(endpoint_key)),
            toolkit_hash: None,
            language: "Rust".into(),
            tools: Vec::new(),
        }
    }

    fn tool() -> ToolRecord {
        ToolRecord {
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
        }
    }

    /// Every value of a column, as stored.
    fn raw(store: &Store, sql: &str) -> Vec<String> {
        store
            .call_now(|c| {
                c.prepare(sql)?
                    .query_map([], |r| r.get::<_, String>(0))?
                    .collect()
            })
            .expect("raw")
    }

    #[tokio::test]
    async fn secrets_reach_the_database_sealed_and_come_back_open() {
        let store = Store::memory();
        store
            .save_connection(&connection("ada", "acc-SECRET-1", "ref-SECRET-1"))
            .await
            .expect("save");
        store
            .save_platform(&platform("hub", "cs-SECRET-1"))
            .await
            .expect("save");
        store
            .save_tool(&kit("crm", "ek-SECRET-1"), &tool(), 0)
            .await
            .expect("save");
        let flow = PendingFlow {
            platform_id: "hub".into(),
            external_user_id: "ada".into(),
            llm_key_hash: "l".into(),
            code_verifier: Secret::new("cv-SECRET-1"),
            redirect_url: None,
            created_at: now_secs(),
        };
        store.insert_flow("st", &flow, 3600).await.expect("insert");
        let stored = [
            raw(&store, "SELECT access_token FROM oauth_connections"),
            raw(&store, "SELECT refresh_token FROM oauth_connections"),
            raw(&store, "SELECT config FROM oauth_platforms"),
            raw(&store, "SELECT endpoint_key FROM toolkits"),
            raw(&store, "SELECT code_verifier FROM oauth_states"),
        ]
        .concat();
        assert_eq!(stored.len(), 5);
        for value in &stored {
            assert!(value.contains("sealed:v1:"), "{value}");
            assert!(!value.contains("SECRET"), "{value}");
        }
        // The platform's JSON is readable but for its secret.
        assert!(stored[2].contains("\"client_id\":\"cid\""), "{}", stored[2]);
        let got = store
            .get_connection("l", "p", "ada")
            .await
            .expect("get")
            .expect("found");
        assert_eq!(got.access_token.expose(), "acc-SECRET-1");
        assert_eq!(
            got.refresh_token.as_ref().map(Secret::expose),
            Some("ref-SECRET-1")
        );
        let platforms = store.load_platforms().await.expect("load");
        assert_eq!(platforms[0].client_secret.expose(), "cs-SECRET-1");
        let kits = store.load_toolkits().await.expect("load");
        assert_eq!(
            kits[0].endpoint_key.as_ref().map(Secret::expose),
            Some("ek-SECRET-1")
        );
        let taken = store.take_flow("st").await.expect("take").expect("flow");
        assert_eq!(taken.code_verifier.expose(), "cv-SECRET-1");
    }

    #[tokio::test]
    async fn a_sealed_value_moved_to_another_row_does_not_open() {
        let store = Store::memory();
        for (user, access) in [("ada", "acc-ada"), ("bob", "acc-bob")] {
            store
                .save_connection(&connection(user, access, "ref"))
                .await
                .expect("save");
        }
        for (id, secret) in [("a", "cs-a"), ("b", "cs-b")] {
            store
                .save_platform(&platform(id, secret))
                .await
                .expect("save");
        }
        for (app, key) in [("one", "ek-one"), ("two", "ek-two")] {
            store
                .save_tool(&kit(app, key), &tool(), 0)
                .await
                .expect("save");
        }
        // Someone with write access to the database copies Ada's token
        // into Bob's row, platform a's secret into b's, toolkit one's key
        // into two's.
        store
            .call_now(|c| {
                c.execute_batch(
                    "UPDATE oauth_connections SET access_token =
                         (SELECT access_token FROM oauth_connections WHERE external_user_id = 'ada')
                     WHERE external_user_id = 'bob';
                     UPDATE oauth_platforms SET config = (SELECT config FROM oauth_platforms WHERE id = 'a')
                     WHERE id = 'b';
                     UPDATE toolkits SET endpoint_key = (SELECT endpoint_key FROM toolkits WHERE app_name = 'one')
                     WHERE app_name = 'two';",
                )
            })
            .expect("tamper");
        let e = store
            .get_connection("l", "p", "bob")
            .await
            .expect_err("Ada's token does not open in Bob's row");
        assert!(
            matches!(&e, StoreError::Sealed(SecretsError::Unopenable { what, .. }) if *what == "oauth_connections.access_token"),
            "{e}"
        );
        assert!(!e.to_string().contains("acc-ada"), "{e}");
        let ada = store.get_connection("l", "p", "ada").await.expect("get");
        assert_eq!(
            ada.map(|c| c.access_token.expose().to_owned()).as_deref(),
            Some("acc-ada")
        );
        // The platform and the toolkit are skipped (and logged), the
        // others load.
        let platforms = store.load_platforms().await.expect("load");
        assert_eq!(
            platforms.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        let kits = store.load_toolkits().await.expect("load");
        assert_eq!(
            kits.iter().map(|k| k.app_name.as_str()).collect::<Vec<_>>(),
            ["one"]
        );
    }

    #[tokio::test]
    async fn plain_values_from_before_are_sealed_once() {
        let store = Store::memory();
        // A database written by a server that did not seal.
        let old_platform = serde_json::to_string(&json!({
            "id": "hub", "authorize_url": "https://example.com/a", "token_url": "https://example.com/t",
            "client_id": "cid", "client_secret": "cs-plain"
        }))
        .expect("json");
        store
            .call_now(|c| {
                c.execute_batch(
                    "INSERT INTO oauth_connections (llm_key_hash, platform_id, external_user_id, integration_id,
                         access_token, refresh_token, created_at, updated_at)
                     VALUES ('l', 'p', 'ada', 'i', 'acc-plain', 'ref-plain', 0, 0),
                            ('l', 'p', 'bob', 'i', 'acc-bob', NULL, 0, 0);
                     INSERT INTO webhooks (webhook_id, llm_key_hash, url, events, secret, created_at)
                     VALUES ('w1', 'l', 'http://127.0.0.1:9/', '[]', 'wh-plain', 0);
                     INSERT INTO toolkits (app_name, key_hash, endpoint_key, updated_at)
                     VALUES ('crm', 'h', 'ek-plain', 0), ('open', 'h', NULL, 0);",
                )?;
                c.execute(
                    "INSERT INTO oauth_platforms (id, config) VALUES ('hub', ?1)",
                    [&old_platform],
                )?;
                Ok(())
            })
            .expect("old rows");
        // Plain values are refused on read until the pass has run.
        assert!(matches!(
            store.get_connection("l", "p", "ada").await,
            Err(StoreError::Sealed(SecretsError::NotSealed { .. }))
        ));
        let report = store.reseal(Pass::SealPlaintext).await.expect("pass");
        assert_eq!(report.total(), 6, "{report:?}");
        assert_eq!(report.resealed.get(&Field::AccessToken), Some(&2));
        assert_eq!(report.resealed.get(&Field::RefreshToken), Some(&1));
        assert!(report.unknown_keys.is_empty());
        let again = store.reseal(Pass::SealPlaintext).await.expect("pass");
        assert_eq!(again.total(), 0, "idempotent: {again:?}");
        for sql in [
            "SELECT access_token FROM oauth_connections",
            "SELECT secret FROM webhooks",
            "SELECT endpoint_key FROM toolkits WHERE endpoint_key IS NOT NULL",
            "SELECT config FROM oauth_platforms",
        ] {
            for value in raw(&store, sql) {
                assert!(
                    value.contains("sealed:v1:") && !value.contains("plain"),
                    "{sql}: {value}"
                );
            }
        }
        let ada = store
            .get_connection("l", "p", "ada")
            .await
            .expect("get")
            .expect("found");
        assert_eq!(ada.access_token.expose(), "acc-plain");
        assert_eq!(
            store.load_platforms().await.expect("load")[0]
                .client_secret
                .expose(),
            "cs-plain"
        );
        // Values under a key this server lacks are counted, by key id.
        let other = Keyring::ephemeral().expect("a key");
        let foreign = other
            .seal(Field::WebhookSecret, &["w2"], "wh-2")
            .expect("seal");
        store
            .call_now(|c| {
                c.execute(
                    "INSERT INTO webhooks (webhook_id, llm_key_hash, url, events, secret, created_at)
                     VALUES ('w2', 'l', 'http://127.0.0.1:9/', '[]', ?1, 0)",
                    [&foreign],
                )
            })
            .expect("insert");
        let report = store.reseal(Pass::SealPlaintext).await.expect("pass");
        assert_eq!(report.total(), 0);
        assert_eq!(
            report.unknown_keys.get(other.sealing_id()),
            Some(&1),
            "{report:?}"
        );
    }

    #[tokio::test]
    async fn rotation_reseals_every_value_under_the_new_key() {
        let dir = std::env::temp_dir().join(format!("atp-rotate-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let db = DbLocation::File(dir.join("atp.sqlite3"));
        let (a, b) = (
            crate::SecretsKey::generate().expect("a"),
            crate::SecretsKey::generate().expect("b"),
        );
        let with = |keys: &[&crate::SecretsKey]| {
            let keys = keys.iter().map(|k| (*k).clone()).collect();
            Store::open(&db, Arc::new(Keyring::new(keys).expect("keys"))).expect("open")
        };
        {
            let store = with(&[&a]);
            store
                .save_connection(&connection("ada", "acc-1", "ref-1"))
                .await
                .expect("save");
            store
                .save_platform(&platform("hub", "cs-1"))
                .await
                .expect("save");
        }
        let report = crate::rotate_secrets(&db, vec![a.clone()], vec![b.clone()])
            .await
            .expect("rotate");
        assert_eq!(report.key_id, b.id());
        assert_eq!(report.total(), 3, "{report:?}");
        let only_b = with(&[&b]);
        let got = only_b
            .get_connection("l", "p", "ada")
            .await
            .expect("B opens")
            .expect("found");
        assert_eq!(got.access_token.expose(), "acc-1");
        assert_eq!(
            only_b.load_platforms().await.expect("load")[0]
                .client_secret
                .expose(),
            "cs-1"
        );
        drop(only_b);
        let only_a = with(&[&a]);
        let e = only_a
            .get_connection("l", "p", "ada")
            .await
            .expect_err("A no longer opens");
        assert!(
            matches!(&e, StoreError::Sealed(SecretsError::UnknownKey { key_id, .. }) if key_id == b.id()),
            "{e}"
        );
        drop(only_a);
        // Again: nothing left to do. Without the key a value needs: refused,
        // nothing changed.
        let again = crate::rotate_secrets(&db, vec![a.clone()], vec![b.clone()])
            .await
            .expect("rotate");
        assert_eq!(again.total(), 0);
        let c = crate::SecretsKey::generate().expect("c");
        let refused = crate::rotate_secrets(&db, vec![a.clone()], vec![c])
            .await
            .expect_err("B is needed to open");
        assert!(refused.to_string().contains(b.id()), "{refused}");
        assert!(
            with(&[&b])
                .get_connection("l", "p", "ada")
                .await
                .expect("still under B")
                .is_some()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
