//! API keys kept in the database: made, listed and revoked from the
//! command line (`atp-server keys create|list|revoke`), accepted by the
//! server beside the configuration's keys.
//!
//! The database keeps a key's hash ([`crate::keys::key_hash`]), never the
//! key; each key has a short public id (`kid_` and 12 hex digits) that
//! names it in `keys list`, `keys revoke` and the rate limits. The CLI
//! writes the database; every running server reads the keys again every
//! [`crate::Config::api_keys_refresh`] (1 s by default), so a revocation
//! reaches every server sharing the database within that bound, and
//! closes the WebSockets that authenticated with the key.

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
};

use atp_registry::{Secret, is_valid_toolkit_name};
use rusqlite::params;

use crate::{
    ServerError,
    config::DbLocation,
    keys::{Role, StoredKey, hex, key_hash, now_secs, random_bytes},
    secrets::Keyring,
    store::{Store, StoreError},
};

/// The longest developer name a key may carry, in characters.
const MAX_DEVELOPER_LEN: usize = 128;
/// The most toolkits a key's scope may list.
const MAX_SCOPE: usize = 256;

/// Which side an API key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A toolkit's key: it registers tools and serves their calls.
    Toolkit,
    /// An LLM client's key: it fetches schemas and calls tools.
    Llm,
}

impl std::str::FromStr for KeyKind {
    type Err = ServerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match Role::parse(s) {
            Some(Role::Toolkit) => Ok(KeyKind::Toolkit),
            Some(Role::Llm) => Ok(KeyKind::Llm),
            Some(Role::Admin) | None => Err(ServerError::Config(format!(
                "a key's kind is toolkit or llm, not {s:?}"
            ))),
        }
    }
}

impl KeyKind {
    fn role(self) -> Role {
        match self {
            KeyKind::Toolkit => Role::Toolkit,
            KeyKind::Llm => Role::Llm,
        }
    }
}

/// A key just made: the key itself (shown once, never stored) and its id.
#[derive(Debug)]
pub struct NewApiKey {
    /// The key's public id (`kid_…`).
    pub id: String,
    /// The key: give it to the toolkit or the LLM client. `Debug` hides it.
    pub key: Secret,
}

/// A key of the database as `atp-server keys list` shows it: never the
/// key, nor its hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApiKeyInfo {
    /// Its public id.
    pub id: String,
    /// `toolkit` or `llm`.
    pub kind: &'static str,
    /// Its developer; `None`: the implicit developer.
    pub developer: Option<String>,
    /// The toolkits it may call (an LLM key) or register (a toolkit key);
    /// empty: any.
    pub scope: Vec<String>,
    /// When it was made (Unix seconds).
    pub created_at: i64,
    /// When it was revoked (Unix seconds), if it was.
    pub revoked_at: Option<i64>,
}

/// A row of `api_keys`, with its hash.
pub(crate) struct Row {
    hash: String,
    info: ApiKeyInfo,
}

fn row(
    id: String,
    hash: String,
    kind: &str,
    developer: Option<String>,
    scope: &str,
    created_at: i64,
    revoked_at: Option<i64>,
) -> Option<Row> {
    let kind = Role::parse(kind)?.as_str();
    let scope = serde_json::from_str(scope).unwrap_or_default();
    Some(Row {
        hash,
        info: ApiKeyInfo {
            id,
            kind,
            developer,
            scope,
            created_at,
            revoked_at,
        },
    })
}

/// Every key, in the order they were made.
const SELECT_SQLITE: &str = "SELECT id, key_hash, kind, developer, scope, created_at, revoked_at FROM api_keys ORDER BY rowid";
/// Every key, in the order they were made.
const SELECT_PG: &str = "SELECT id, key_hash, kind, developer, scope, created_at, revoked_at FROM api_keys ORDER BY seq";

/// Every row of `api_keys` in a SQLite database.
pub(crate) fn load_sqlite(c: &mut rusqlite::Connection) -> Result<Vec<Row>, rusqlite::Error> {
    let mut q = c.prepare(SELECT_SQLITE)?;
    let rows = q.query_map([], |r| {
        Ok(row(
            r.get(0)?,
            r.get(1)?,
            &r.get::<_, String>(2)?,
            r.get(3)?,
            &r.get::<_, String>(4)?,
            r.get(5)?,
            r.get(6)?,
        ))
    })?;
    rows.filter_map(Result::transpose).collect()
}

impl Store {
    /// Every row of `api_keys`.
    pub(crate) async fn api_keys(&self) -> Result<Vec<Row>, StoreError> {
        match self {
            Store::Sqlite(s) => s.call(load_sqlite).await,
            Store::Postgres(p) => Ok(p
                .client()
                .await?
                .query(SELECT_PG, &[])
                .await?
                .iter()
                .filter_map(|r| {
                    row(
                        r.get(0),
                        r.get(1),
                        r.get(2),
                        r.get(3),
                        r.get(4),
                        r.get(5),
                        r.get(6),
                    )
                })
                .collect()),
        }
    }

    async fn insert_api_key(&self, hash: String, info: ApiKeyInfo) -> Result<(), StoreError> {
        let scope = serde_json::to_string(&info.scope).unwrap_or_else(|_| "[]".into());
        match self {
            Store::Sqlite(s) => {
                s.call(move |c| {
                    c.execute(
                        "INSERT INTO api_keys (id, key_hash, kind, developer, scope, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![info.id, hash, info.kind, info.developer, scope, info.created_at],
                    )
                })
                .await?;
            }
            Store::Postgres(p) => {
                p.client()
                    .await?
                    .execute(
                        "INSERT INTO api_keys (id, key_hash, kind, developer, scope, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                        &[&info.id, &hash, &info.kind, &info.developer, &scope, &info.created_at],
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Revokes the key `id`; whether it was in force.
    async fn revoke_api_key(&self, id: String) -> Result<bool, StoreError> {
        let now = now_secs();
        let n = match self {
            Store::Sqlite(s) => {
                s.call(move |c| {
                    c.execute(
                        "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                        params![id, now],
                    )
                })
                .await? as u64
            }
            Store::Postgres(p) => {
                p.client()
                    .await?
                    .execute(
                        "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                        &[&id, &now],
                    )
                    .await?
            }
        };
        Ok(n > 0)
    }
}

/// Opens the database of a key command: an existing SQLite file, or
/// PostgreSQL (`create` may make the SQLite file).
async fn open(db: &DbLocation, create: bool) -> Result<Store, ServerError> {
    match db {
        DbLocation::Memory => {
            return Err(ServerError::Config(
                "an in-memory database keeps no keys: give --db FILE or a PostgreSQL URL".into(),
            ));
        }
        DbLocation::File(path) if !create && !path.exists() => {
            return Err(ServerError::Config(format!(
                "no database at {}",
                path.display()
            )));
        }
        _ => {}
    }
    // The keys table holds nothing sealed: a key of this process will do.
    let keyring = Arc::new(Keyring::ephemeral()?);
    Ok(Store::connect(db, keyring).await?)
}

/// Checks a developer name given to `keys create`.
fn check_developer(name: &str) -> Result<(), ServerError> {
    let valid = (1..=MAX_DEVELOPER_LEN).contains(&name.chars().count())
        && name.trim() == name
        && !name.chars().any(|c| c == '/' || c.is_control());
    if valid {
        Ok(())
    } else {
        Err(ServerError::Config(format!(
            "a developer name is 1-{MAX_DEVELOPER_LEN} characters without '/', control characters or surrounding spaces"
        )))
    }
}

/// Makes a key of `kind` in the database (`atp-server keys create`): a
/// random key (`atpk_` and 43 characters), stored as its hash, with a
/// public id. `developer` owns it (the implicit developer when `None`);
/// `scope` lists the toolkits it may call (an LLM key) or register (a
/// toolkit key), any when empty. Running servers accept it within
/// [`crate::Config::api_keys_refresh`].
pub async fn create_api_key(
    db: &DbLocation,
    kind: KeyKind,
    developer: Option<&str>,
    scope: &[String],
) -> Result<NewApiKey, ServerError> {
    if let Some(d) = developer {
        check_developer(d)?;
    }
    if scope.len() > MAX_SCOPE {
        return Err(ServerError::Config(format!(
            "a scope lists at most {MAX_SCOPE} toolkits"
        )));
    }
    if let Some(bad) = scope.iter().find(|t| !is_valid_toolkit_name(t)) {
        return Err(ServerError::Config(format!(
            "scope entry {bad:?} is not a toolkit name (1-128 characters from A-Z a-z 0-9 _ - .)"
        )));
    }
    let mut scope = scope.to_vec();
    scope.sort();
    scope.dedup();
    let store = open(db, true).await?;
    let rng = |n| random_bytes(n).map_err(|e| ServerError::Config(format!("no randomness: {e}")));
    let key = format!("atpk_{}", data_encoding::BASE64URL_NOPAD.encode(&rng(32)?));
    let id = format!("kid_{}", hex(&rng(6)?));
    let info = ApiKeyInfo {
        id: id.clone(),
        kind: kind.role().as_str(),
        developer: developer.map(str::to_owned),
        scope,
        created_at: now_secs(),
        revoked_at: None,
    };
    store.insert_api_key(key_hash(&key), info).await?;
    tracing::info!(key_id = %id, kind = kind.role().as_str(), "API key created");
    record(&store, "keys create", &id, None).await;
    Ok(NewApiKey {
        id,
        key: Secret::new(key),
    })
}

/// The database's keys, oldest first, revoked ones included (`atp-server
/// keys list`): never a key.
pub async fn list_api_keys(db: &DbLocation) -> Result<Vec<ApiKeyInfo>, ServerError> {
    let store = open(db, false).await?;
    Ok(store
        .api_keys()
        .await?
        .into_iter()
        .map(|r| r.info)
        .collect())
}

/// Revokes the key `id` (`atp-server keys revoke`). Every server sharing
/// the database refuses it within [`crate::Config::api_keys_refresh`] and
/// closes the WebSockets that use it. An unknown id, or one revoked
/// already, is an error.
pub async fn revoke_api_key(db: &DbLocation, id: &str) -> Result<(), ServerError> {
    let store = open(db, false).await?;
    if store.revoke_api_key(id.to_owned()).await? {
        tracing::info!(key_id = %id, "API key revoked");
        record(&store, "keys revoke", id, None).await;
        Ok(())
    } else {
        record(&store, "keys revoke", id, Some("key_not_found")).await;
        Err(ServerError::Config(format!(
            "no key in force has the id {id:?} (see `atp-server keys list`)"
        )))
    }
}

/// Records a key command in the audit log (a failure to is logged, and
/// does not undo the command).
async fn record(store: &Store, action: &str, key_id: &str, error_code: Option<&str>) {
    let entry =
        crate::audit::Entry::admin(crate::audit::Via::Cli, action, Some(key_id), error_code);
    if let Err(e) = crate::audit::record_now(store, entry).await {
        tracing::warn!("the key command could not be recorded in the audit log: {e}");
    }
}

/// Reads the database's keys into the server: who may connect, with what
/// scope, and who owns each key. Returns whether anything changed.
pub(crate) async fn refresh(s: &crate::State) -> Result<bool, StoreError> {
    Ok(apply(s, s.store.api_keys().await?))
}

/// Whether any of these rows is a key in force.
pub(crate) fn any_in_force(rows: &[Row]) -> bool {
    rows.iter().any(|r| r.info.revoked_at.is_none())
}

/// Puts the database's keys into the server; whether anything changed.
pub(crate) fn apply(s: &crate::State, rows: Vec<Row>) -> bool {
    let implicit = s.config.implicit_developer();
    s.catalog.set_stored(rows.iter().map(|r| {
        (
            r.hash.as_str(),
            r.info.developer.as_deref().unwrap_or(implicit),
        )
    }));
    let keys: HashMap<String, StoredKey> = rows
        .into_iter()
        .filter_map(|r| {
            let role = Role::parse(r.info.kind)?;
            Some((
                r.hash,
                StoredKey {
                    id: r.info.id,
                    role,
                    developer: r.info.developer,
                    scope: r.info.scope,
                    revoked: r.info.revoked_at.is_some(),
                },
            ))
        })
        .collect();
    s.keys.set_stored(keys)
}

/// Starts reading the database's keys again every
/// `config.api_keys_refresh`, until the server stops (once per server).
pub(crate) fn ensure_refreshing(s: &Arc<crate::State>) {
    if tokio::runtime::Handle::try_current().is_err()
        || s.keys_refreshing
            .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return;
    }
    let weak = Arc::downgrade(s);
    let mut shutdown = s.shutdown.subscribe();
    let every = s.config.api_keys_refresh;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = crate::stopped(&mut shutdown) => return,
            }
            let Some(s) = Weak::upgrade(&weak) else {
                return;
            };
            match refresh(&s).await {
                Ok(true) => tracing::debug!("API keys re-read: changed"),
                Ok(false) => {}
                Err(e) => tracing::warn!("could not re-read the API keys: {e}"),
            }
        }
    });
}

/// Whether the key with this hash may reach the toolkit `app_name`: an
/// LLM key call it, a toolkit key register it. A database key's scope
/// decides; a key of the configuration has no scope.
pub(crate) fn in_scope(s: &crate::State, key_hash: &str, app_name: &str) -> bool {
    s.keys.stored(key_hash).is_none_or(|k| k.allows(app_name))
}

/// The public id of the key with this hash, if it is a database key.
pub(crate) fn key_id(s: &crate::State, key_hash: &str) -> Option<String> {
    s.keys.stored(key_hash).map(|k| k.id.clone())
}
