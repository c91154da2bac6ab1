//! Developers, the toolkit store and execution reports (docs/PROTOCOL.md
//! §9).
//!
//! - **Developers** own toolkit and LLM keys (configured; see
//!   [`Config::developers`] for the implicit `default` / `dev` developer).
//!   A toolkit belongs to the developer of the key it was registered with;
//!   it is private unless its `app_name` is in its owner's
//!   `public_toolkits`.
//! - **The store** lists public toolkits to every LLM key, and a
//!   developer's own toolkits (public and private) to that developer's
//!   keys. A toolkit the caller may not see is answered exactly as an
//!   unknown one.
//! - **Exchange tokens**: `register_tool` answers with a fresh random token
//!   (32 random bytes) bound to (toolkit, tool, toolkit key); only its
//!   SHA-256 is stored. A token authorises reports of that tool's
//!   executions for as long as it is among the newest [`TOKENS_PER_TOOL`]
//!   tokens issued for the tool and the toolkit is still registered with
//!   the same key: several processes of one toolkit may register and
//!   report side by side, a re-registration does not cut off the reports
//!   of a process that registered earlier, and the Rust runtime (which
//!   keeps its token) reports every call while the Python client (which
//!   drops its token after one report) reports once per registration.
//! - **The execution log** keeps each accepted report's toolkit, tool,
//!   result (its JSON, up to [`MAX_RESULT_BYTES`]) and time, the newest
//!   [`MAX_EXECUTIONS`] rows; `atp-server executions` prints it.

use std::{
    collections::{HashMap, HashSet},
    path::Path as FsPath,
    sync::{Arc, PoisonError, RwLock},
};

use atp_registry::wire::{
    DeveloperProfile, ExecutionReport, Page, Status, StoreToolkit, StoreToolkitDetails,
};
use axum::{
    body::Body,
    extract::{Path, RawQuery, State, rejection::PathRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{
    config::{Config, DbLocation},
    error::{ApiError, ServerError, json_response},
    keys::{hex, key_hash, now_secs, random_token, rfc3339},
    read_object,
    store::{Store, StoreError, ToolkitRecord},
};

// The tables of exchange tokens and the execution log: `exchange_tokens`
// and `executions` (migrations/*/0001_initial.sql).

/// How many exchange tokens of one tool stay valid (the newest).
pub(crate) const TOKENS_PER_TOOL: i64 = 16;
/// How many execution reports the log keeps (the newest).
pub(crate) const MAX_EXECUTIONS: i64 = 10_000;
/// The largest result stored as it is; a larger one is stored as
/// `{"truncated": true, "bytes": N, "prefix": "…"}`.
pub(crate) const MAX_RESULT_BYTES: usize = 64 * 1024;
/// How much of a truncated result's JSON text is kept.
const TRUNCATED_PREFIX_BYTES: usize = 4 * 1024;

/// The default page size of the store's lists.
const DEFAULT_PAGE_SIZE: u64 = 10;
/// The largest page size (a larger one asked for is lowered to it).
const MAX_PAGE_SIZE: u64 = 100;
/// The longest description derived for a toolkit, in characters.
const MAX_DESCRIPTION_CHARS: usize = 300;
/// How many tool names a derived description lists.
const DESCRIBED_TOOLS: usize = 5;

/// A developer as the store shows them.
#[derive(Debug)]
struct Dev {
    display_name: String,
    name: String,
    bio: String,
    public: HashSet<String>,
}

/// Who owns which keys; which toolkits are public.
#[derive(Debug)]
pub(crate) struct Catalog {
    devs: Vec<Dev>,
    /// Key hash (toolkit or LLM key) → index in `devs`.
    by_key: HashMap<String, usize>,
    /// Dev mode: the owner of every other key.
    fallback: Option<usize>,
    /// The owners of the keys kept in the database (`atp-server keys
    /// create --developer`), refreshed while the server runs.
    stored: RwLock<StoredOwners>,
}

/// The owners of the database's keys: a developer of the configuration
/// keeps its index; any other name gets one after them.
#[derive(Debug, Default)]
struct StoredOwners {
    by_key: HashMap<String, usize>,
    /// Developers named only by stored keys (index `devs.len() + i`).
    extra: Vec<String>,
}

impl Catalog {
    pub fn new(config: &Config) -> Self {
        let mut devs: Vec<Dev> = config
            .developers
            .iter()
            .map(|d| Dev {
                display_name: d.display_name.clone(),
                name: d.name.clone(),
                bio: d.bio.clone(),
                public: d.public_toolkits.iter().cloned().collect(),
            })
            .collect();
        let mut by_key = HashMap::new();
        for (i, d) in config.developers.iter().enumerate() {
            for k in d.toolkit_api_keys.iter().chain(&d.llm_api_keys) {
                by_key.entry(key_hash(k.expose())).or_insert(i);
            }
        }
        let top_level: Vec<_> = config
            .toolkit_api_keys
            .iter()
            .chain(&config.llm_api_keys)
            .collect();
        let implicit = (config.dev || !top_level.is_empty()).then(|| {
            let name = config.implicit_developer();
            devs.iter()
                .position(|d| d.display_name == name)
                .unwrap_or_else(|| {
                    devs.push(Dev {
                        display_name: name.to_owned(),
                        name: String::new(),
                        bio: String::new(),
                        public: HashSet::new(),
                    });
                    devs.len() - 1
                })
        });
        if let Some(i) = implicit {
            for k in top_level {
                by_key.entry(key_hash(k.expose())).or_insert(i);
            }
        }
        Self {
            devs,
            by_key,
            fallback: if config.dev { implicit } else { None },
            stored: RwLock::default(),
        }
    }

    /// Sets the owners of the database's keys: (key hash, developer name).
    pub fn set_stored<'a>(&self, keys: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut stored = self.stored.write().unwrap_or_else(PoisonError::into_inner);
        let mut by_key = HashMap::new();
        for (hash, name) in keys {
            let i = match self.devs.iter().position(|d| d.display_name == name) {
                Some(i) => i,
                None => {
                    let j = match stored.extra.iter().position(|n| n == name) {
                        Some(j) => j,
                        None => {
                            stored.extra.push(name.to_owned());
                            stored.extra.len() - 1
                        }
                    };
                    self.devs.len() + j
                }
            };
            by_key.insert(hash.to_owned(), i);
        }
        stored.by_key = by_key;
    }

    /// The developer (index) who owns the key with this hash.
    fn owner(&self, key_hash: &str) -> Option<usize> {
        self.by_key
            .get(key_hash)
            .copied()
            .or_else(|| {
                self.stored
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .by_key
                    .get(key_hash)
                    .copied()
            })
            .or(self.fallback)
    }

    /// A developer's display name, by index.
    fn display_name(&self, i: usize) -> Option<String> {
        match self.devs.get(i) {
            Some(d) => Some(d.display_name.clone()),
            None => self
                .stored
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .extra
                .get(i - self.devs.len())
                .cloned(),
        }
    }

    /// The display name of the developer who owns the key with this hash
    /// (the console's owners, the audit log's `developer`).
    pub fn developer_of(&self, key_hash: &str) -> Option<&str> {
        self.owner(key_hash)
            .map(|o| self.devs[o].display_name.as_str())
    }

    /// Whether the toolkit `app_name`, registered with `toolkit_key_hash`,
    /// is public.
    pub fn is_public(&self, toolkit_key_hash: &str, app_name: &str) -> bool {
        self.owner(toolkit_key_hash)
            .and_then(|o| self.devs.get(o))
            .is_some_and(|d| d.public.contains(app_name))
    }

    /// Whether the LLM key `llm_key_hash` may see the toolkit `app_name`
    /// (registered with the toolkit key `toolkit_key_hash`): it is public,
    /// or both keys belong to the same developer.
    /// Whether the LLM key and the toolkit key belong to the same
    /// developer: only then does the server hand a user's stored OAuth
    /// token to that toolkit (a public toolkit of another developer gets
    /// none — the caller may pass a token explicitly).
    pub fn same_developer(&self, llm_key_hash: &str, toolkit_key_hash: &str) -> bool {
        self.owner(toolkit_key_hash)
            .is_some_and(|o| self.owner(llm_key_hash) == Some(o))
    }

    pub fn can_see(&self, llm_key_hash: &str, toolkit_key_hash: &str, app_name: &str) -> bool {
        match self.owner(toolkit_key_hash) {
            None => false,
            Some(o) => {
                self.devs
                    .get(o)
                    .is_some_and(|d| d.public.contains(app_name))
                    || self.owner(llm_key_hash) == Some(o)
            }
        }
    }
}

/// A domain-separated SHA-256 of an exchange token, in hex.
fn token_hash(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"atp-server/exchange-token/v1\0");
    h.update(token.as_bytes());
    hex(&h.finalize())
}

/// Issues the exchange token `register_tool` answers with, for reports of
/// this tool's executions.
pub(crate) async fn issue_exchange_token(
    s: &crate::State,
    app_name: &str,
    function_id: &str,
    key_hash: &str,
) -> Result<String, ApiError> {
    let token = random_token(32).map_err(|_| ApiError::internal("no randomness available"))?;
    let hash = token_hash(&token);
    let (app, function, key) = (
        app_name.to_owned(),
        function_id.to_owned(),
        key_hash.to_owned(),
    );
    s.store
        .save_exchange_token(hash, app, function, key)
        .await
        .map_err(|e| {
            tracing::error!("could not store an exchange token: {e}");
            ApiError::internal("The exchange token could not be stored")
        })?;
    Ok(token)
}

/// Stores a token's hash; forgets the tool's tokens beyond the newest
/// [`TOKENS_PER_TOOL`].
fn save_token(
    c: &mut Connection,
    hash: &str,
    app_name: &str,
    function_id: &str,
    key_hash: &str,
) -> Result<(), rusqlite::Error> {
    let tx = c.transaction()?;
    tx.execute(
        "INSERT INTO exchange_tokens (token_hash, app_name, function_id, key_hash, issued_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![hash, app_name, function_id, key_hash, now_secs()],
    )?;
    tx.execute(
        "DELETE FROM exchange_tokens WHERE app_name = ?1 AND function_id = ?2 AND rowid NOT IN (
             SELECT rowid FROM exchange_tokens WHERE app_name = ?1 AND function_id = ?2
             ORDER BY rowid DESC LIMIT ?3)",
        params![app_name, function_id, TOKENS_PER_TOOL],
    )?;
    tx.commit()
}

/// Records an execution report made with the token whose hash is `hash`,
/// if that token was issued for `function` and `current(app, key,
/// function)` says its toolkit is still registered with the key it was
/// issued to (else the token is void: it is deleted). Returns the
/// toolkit's name if the report was recorded.
fn record_execution(
    c: &mut Connection,
    hash: &str,
    function: &str,
    result: &str,
    current: impl FnOnce(&str, &str, &str) -> bool,
) -> Result<Option<String>, rusqlite::Error> {
    let tx = c.transaction()?;
    let row: Option<(String, String)> = tx
        .query_row(
            "SELECT app_name, key_hash FROM exchange_tokens
             WHERE token_hash = ?1 AND function_id = ?2",
            params![hash, function],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((app_name, key)) = row else {
        return Ok(None);
    };
    if !current(&app_name, &key, function) {
        tx.execute("DELETE FROM exchange_tokens WHERE token_hash = ?1", [hash])?;
        tx.commit()?;
        return Ok(None);
    }
    tx.execute(
        "INSERT INTO executions (app_name, function_id, result, reported_at)
         VALUES (?1, ?2, ?3, ?4)",
        params![app_name, function, result, now_secs()],
    )?;
    tx.execute(
        "DELETE FROM executions WHERE id <= (SELECT MAX(id) FROM executions) - ?1",
        [MAX_EXECUTIONS],
    )?;
    tx.commit()?;
    Ok(Some(app_name))
}

/// The first key of the advisory locks taken here (the second: a hash of
/// the tool).
const PG_LOCK_TOKENS: i32 = 7_415_608;

// The queries on either database: SQLite runs the functions above,
// PostgreSQL the same SQL, with a `seq` column for SQLite's `rowid`
// (migration 2); servers issuing tokens of one tool at once take turns (an
// advisory lock), so that the tool keeps exactly its newest
// [`TOKENS_PER_TOOL`].
impl Store {
    /// Stores an exchange token's hash; forgets the tool's tokens beyond
    /// the newest [`TOKENS_PER_TOOL`].
    async fn save_exchange_token(
        &self,
        hash: String,
        app_name: String,
        function_id: String,
        key_hash: String,
    ) -> Result<(), StoreError> {
        let p = match self {
            Store::Sqlite(s) => {
                return s
                    .call(move |c| save_token(c, &hash, &app_name, &function_id, &key_hash))
                    .await;
            }
            Store::Postgres(p) => p,
        };
        let mut c = p.client().await?;
        let tx = c.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2::TEXT || '/' || $3::TEXT))",
            &[&PG_LOCK_TOKENS, &app_name, &function_id],
        )
        .await?;
        tx.execute(
            "INSERT INTO exchange_tokens (token_hash, app_name, function_id, key_hash, issued_at)
             VALUES ($1, $2, $3, $4, $5)",
            &[&hash, &app_name, &function_id, &key_hash, &now_secs()],
        )
        .await?;
        tx.execute(
            "DELETE FROM exchange_tokens WHERE app_name = $1 AND function_id = $2 AND token_hash NOT IN (
                 SELECT token_hash FROM exchange_tokens WHERE app_name = $1 AND function_id = $2
                 ORDER BY seq DESC LIMIT $3)",
            &[&app_name, &function_id, &TOKENS_PER_TOOL],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records an execution report (see [`record_execution`]).
    async fn record_execution(
        &self,
        hash: String,
        function: String,
        result: String,
        current: impl FnOnce(&str, &str, &str) -> bool + Send + 'static,
    ) -> Result<Option<String>, StoreError> {
        let p = match self {
            Store::Sqlite(s) => {
                return s
                    .call(move |c| record_execution(c, &hash, &function, &result, current))
                    .await;
            }
            Store::Postgres(p) => p,
        };
        let mut c = p.client().await?;
        let tx = c.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT app_name, key_hash FROM exchange_tokens
                 WHERE token_hash = $1 AND function_id = $2",
                &[&hash, &function],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (app_name, key): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        if !current(&app_name, &key, &function) {
            tx.execute(
                "DELETE FROM exchange_tokens WHERE token_hash = $1",
                &[&hash],
            )
            .await?;
            tx.commit().await?;
            return Ok(None);
        }
        tx.execute(
            "INSERT INTO executions (app_name, function_id, result, reported_at)
             VALUES ($1, $2, $3, $4)",
            &[&app_name, &function, &result, &now_secs()],
        )
        .await?;
        tx.execute(
            "DELETE FROM executions WHERE id <= (SELECT MAX(id) FROM executions) - $1",
            &[&MAX_EXECUTIONS],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(app_name))
    }
}

/// A result as the log stores it: its JSON, or a truncation note with the
/// start of it.
pub(crate) fn stored_result(result: &Value) -> String {
    let text = serde_json::to_string(result).unwrap_or_else(|_| "null".to_owned());
    if text.len() <= MAX_RESULT_BYTES {
        return text;
    }
    let mut end = TRUNCATED_PREFIX_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    json!({"truncated": true, "bytes": text.len(), "prefix": &text[..end]}).to_string()
}

/// `POST /api/v1/execute_function`: `{"exchange_token", "result",
/// "function_id"}`, accepted (and recorded) only with a token
/// `register_tool` issued for that tool, still among its newest
/// [`TOKENS_PER_TOOL`], of a toolkit still registered with the same key.
pub(crate) async fn execute_function(State(s): State<Arc<crate::State>>, body: Body) -> Response {
    reply(execute(&s, body).await.map(|()| Status::ok()))
}

async fn execute(s: &Arc<crate::State>, body: Body) -> Result<(), ApiError> {
    let m = read_object(body, &s.config).await?;
    let report: ExecutionReport = serde_json::from_value(Value::Object(m))
        .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
    let (Some(token), Some(function_id)) = (report.exchange_token, report.function_id) else {
        return Err(ApiError::bad_request(
            "invalid_body",
            "exchange_token and function_id are required",
        ));
    };
    let hash = token_hash(token.expose());
    let result = stored_result(&report.result);
    let state = s.clone();
    // The toolkit may since have been taken over by another key (dev
    // mode): the old key's tokens are void.
    let current = move |app_name: &str, key: &str, function: &str| {
        state
            .toolkit(app_name)
            .is_some_and(|k| k.key_hash == key && k.tools.iter().any(|t| t.spec.name == function))
    };
    let accepted = s
        .store
        .record_execution(hash, function_id.clone(), result, current)
        .await
        .map_err(|e| {
            tracing::error!("could not record an execution report: {e}");
            ApiError::internal("The execution report could not be recorded")
        })?;
    match accepted {
        Some(app) => {
            tracing::info!(%app, tool = %function_id, "execution reported");
            Ok(())
        }
        None => {
            tracing::debug!(tool = %function_id, "execution report refused: not a valid exchange token for this tool");
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "invalid_exchange_token",
                "The exchange token is not valid for this tool (unknown, superseded by newer registrations, or issued for another tool)",
            ))
        }
    }
}

/// One recorded execution report (a line of `atp-server executions`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Execution {
    /// Its place in the log (increasing).
    pub id: i64,
    /// The toolkit.
    pub app_name: String,
    /// The tool.
    pub function_id: String,
    /// What the tool returned, as reported (or `{"truncated": true,
    /// "bytes", "prefix"}` when it was larger than 64 KiB).
    pub result: Value,
    /// When it was reported (RFC 3339, UTC).
    pub reported_at: String,
}

/// The newest `limit` execution reports in the SQLite database `db` (of
/// one toolkit, if `app_name` is given), oldest first. The file is opened
/// read-only: a running server may be using it.
pub fn read_executions(
    db: &FsPath,
    app_name: Option<&str>,
    limit: u64,
) -> Result<Vec<Execution>, ServerError> {
    let c = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let has_log: bool = c.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'executions')",
        [],
        |r| r.get(0),
    )?;
    if !has_log {
        return Err(ServerError::Config(format!(
            "{} holds no execution log: is it an atp-server database?",
            db.display()
        )));
    }
    let mut stmt = c.prepare(
        "SELECT id, app_name, function_id, result, reported_at FROM executions
         WHERE ?1 IS NULL OR app_name = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![app_name, limit], |r| {
        let text: String = r.get(3)?;
        Ok(Execution {
            id: r.get(0)?,
            app_name: r.get(1)?,
            function_id: r.get(2)?,
            result: serde_json::from_str(&text).unwrap_or(Value::String(text)),
            reported_at: rfc3339(r.get(4)?),
        })
    })?;
    let mut out = rows.collect::<Result<Vec<_>, _>>()?;
    out.reverse();
    Ok(out)
}

impl Execution {
    /// The newest `limit` execution reports in the database `db` (of one
    /// toolkit, if `app_name` is given), oldest first: a SQLite file (see
    /// [`read_executions`]) or a PostgreSQL database, which is only read
    /// (not migrated). An in-memory database keeps no log to read.
    pub async fn read_log(
        db: &DbLocation,
        app_name: Option<&str>,
        limit: u64,
    ) -> Result<Vec<Execution>, ServerError> {
        match db {
            DbLocation::File(path) => read_executions(path, app_name, limit),
            DbLocation::Memory => Err(ServerError::Config(
                "an in-memory database keeps no execution log to read: give --db FILE or a PostgreSQL URL".into(),
            )),
            DbLocation::Postgres(url) => read_executions_pg(url, app_name, limit)
                .await?
                .ok_or_else(|| {
                    ServerError::Config(
                        "the PostgreSQL database holds no execution log: is it an atp-server database?"
                            .into(),
                    )
                }),
        }
    }
}

/// [`read_executions`] on PostgreSQL (`None`: the database has no log).
async fn read_executions_pg(
    url: &str,
    app_name: Option<&str>,
    limit: u64,
) -> Result<Option<Vec<Execution>>, StoreError> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    let read = async {
        client
            .batch_execute("SET default_transaction_read_only = on")
            .await?;
        let has_log: bool = client
            .query_one("SELECT to_regclass('executions') IS NOT NULL", &[])
            .await?
            .try_get(0)?;
        if !has_log {
            return Ok(None);
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT id, app_name, function_id, result, reported_at FROM executions
                 WHERE $1::TEXT IS NULL OR app_name = $1::TEXT ORDER BY id DESC LIMIT $2",
                &[&app_name, &limit],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows.iter().rev() {
            let text: String = r.try_get(3)?;
            out.push(Execution {
                id: r.try_get(0)?,
                app_name: r.try_get(1)?,
                function_id: r.try_get(2)?,
                result: serde_json::from_str(&text).unwrap_or(Value::String(text)),
                reported_at: rfc3339(r.try_get(4)?),
            });
        }
        Ok(Some(out))
    }
    .await;
    drop(client);
    let _ = connection.await;
    read
}

fn reply<T: serde::Serialize>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    }
}

/// `?page=&page_size=`: page from 1, page size 1-100 (10 by default; a
/// larger one is lowered to 100). An empty value is the default.
fn paging(query: Option<&str>) -> Result<(u64, u64), ApiError> {
    let (mut page, mut size) = (1, DEFAULT_PAGE_SIZE);
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        let n = v.parse::<u64>().ok().filter(|n| *n >= 1);
        match &*k {
            "page" => {
                page = n.ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_page",
                        format!("page must be a whole number from 1, not {v:?}"),
                    )
                })?;
            }
            "page_size" => {
                size = n.map(|n| n.min(MAX_PAGE_SIZE)).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_page_size",
                        format!(
                            "page_size must be a whole number from 1 to {MAX_PAGE_SIZE}, not {v:?}"
                        ),
                    )
                })?;
            }
            _ => {}
        }
    }
    Ok((page, size))
}

fn page_of<T>(rows: Vec<T>, (page, page_size): (u64, u64)) -> Page<T> {
    let count = rows.len() as u64;
    let skip = usize::try_from((page - 1).saturating_mul(page_size)).unwrap_or(usize::MAX);
    let take = usize::try_from(page_size).unwrap_or(usize::MAX);
    Page {
        count,
        page,
        page_size,
        results: rows.into_iter().skip(skip).take(take).collect(),
    }
}

/// Every registered toolkit, by name.
fn all_kits(s: &crate::State) -> Vec<Arc<ToolkitRecord>> {
    let mut kits: Vec<_> = s
        .toolkits
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .cloned()
        .collect();
    kits.sort_by(|a, b| a.app_name.cmp(&b.app_name));
    kits
}

/// What a toolkit does, from its tools: the one tool's description, or
/// how many tools and the first names.
fn describe(kit: &ToolkitRecord) -> String {
    let text = match kit.tools.as_slice() {
        [] => String::new(),
        [one] if !one.spec.description.trim().is_empty() => {
            format!("{}: {}", one.spec.name, one.spec.description.trim())
        }
        tools => {
            let names: Vec<&str> = tools
                .iter()
                .take(DESCRIBED_TOOLS)
                .map(|t| t.spec.name.as_str())
                .collect();
            let more = tools.len().saturating_sub(DESCRIBED_TOOLS);
            let tail = if more > 0 {
                format!(", and {more} more")
            } else {
                String::new()
            };
            let noun = if tools.len() == 1 { "tool" } else { "tools" };
            format!("{} {noun}: {}{tail}", tools.len(), names.join(", "))
        }
    };
    if text.chars().count() <= MAX_DESCRIPTION_CHARS {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_DESCRIPTION_CHARS - 1).collect();
    cut.push('…');
    cut
}

fn entry(s: &crate::State, kit: &ToolkitRecord) -> StoreToolkit {
    let cat = &s.catalog;
    StoreToolkit {
        toolkit_id: kit.app_name.clone(),
        name: kit.app_name.clone(),
        description: describe(kit),
        developer: cat.owner(&kit.key_hash).and_then(|o| cat.display_name(o)),
        public: cat.is_public(&kit.key_hash, &kit.app_name),
        tools_count: kit.tools.len(),
        connected: s.is_served(&kit.key_hash) || kit.endpoint_url.is_some(),
        programming_language: kit.language.clone(),
    }
}

/// `GET …/llm-client/store/toolkits/list/?page=&page_size=`: the public
/// toolkits, by name.
pub(crate) async fn store_toolkits(
    State(s): State<Arc<crate::State>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    reply((|| {
        s.llm_caller(&headers, None)?;
        let paging = paging(query.as_deref())?;
        let rows = all_kits(&s)
            .iter()
            .filter(|k| s.catalog.is_public(&k.key_hash, &k.app_name))
            .map(|k| entry(&s, k))
            .collect();
        Ok(page_of(rows, paging))
    })())
}

/// `GET …/llm-client/store/toolkits/{toolkit_id}/`: a toolkit the caller
/// may see (public, or its developer's), with its tools; any other is
/// `404 toolkit_not_found`, as an unknown one.
pub(crate) async fn toolkit_details(
    State(s): State<Arc<crate::State>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    reply((|| {
        let me = s.llm_caller(&headers, None)?;
        let not_found = || ApiError::not_found("toolkit_not_found", "Toolkit not found");
        let Ok(Path(id)) = id else {
            return Err(not_found());
        };
        let kit = s
            .toolkit(&id)
            .filter(|k| {
                s.catalog.can_see(&me, &k.key_hash, &k.app_name)
                    && crate::api_keys::in_scope(&s, &me, &k.app_name)
            })
            .ok_or_else(not_found)?;
        Ok(StoreToolkitDetails {
            toolkit: entry(&s, &kit),
            tools: kit.tools.iter().map(|t| t.spec.context()).collect(),
        })
    })())
}

/// `GET …/llm-client/developers/toolkits/?page=&page_size=`: the caller's
/// developer's toolkits, public and private, by name.
pub(crate) async fn my_toolkits(
    State(s): State<Arc<crate::State>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    reply((|| {
        let me = s.llm_caller(&headers, None)?;
        let paging = paging(query.as_deref())?;
        let rows = match s.catalog.owner(&me) {
            None => Vec::new(),
            Some(dev) => all_kits(&s)
                .iter()
                .filter(|k| s.catalog.owner(&k.key_hash) == Some(dev))
                .map(|k| entry(&s, k))
                .collect(),
        };
        Ok(page_of(rows, paging))
    })())
}

/// `GET …/llm-client/store/developers/{display_name}/`: a developer and
/// their public toolkits.
pub(crate) async fn developer_profile(
    State(s): State<Arc<crate::State>>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    reply((|| {
        s.llm_caller(&headers, None)?;
        let not_found = || ApiError::not_found("developer_not_found", "Developer not found");
        let Ok(Path(name)) = name else {
            return Err(not_found());
        };
        let cat = &s.catalog;
        let i = cat
            .devs
            .iter()
            .position(|d| d.display_name == name)
            .ok_or_else(not_found)?;
        let dev = &cat.devs[i];
        let toolkits = all_kits(&s)
            .iter()
            .filter(|k| cat.owner(&k.key_hash) == Some(i) && dev.public.contains(&k.app_name))
            .map(|k| entry(&s, k))
            .collect();
        Ok(DeveloperProfile {
            display_name: dev.display_name.clone(),
            name: dev.name.clone(),
            bio: dev.bio.clone(),
            toolkits,
        })
    })())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Developer;
    use atp_registry::Secret;

    fn dev(name: &str, tk: &str, llm: &str, public: &[&str]) -> Developer {
        Developer {
            display_name: name.into(),
            name: String::new(),
            bio: String::new(),
            toolkit_api_keys: vec![Secret::new(tk)],
            llm_api_keys: vec![Secret::new(llm)],
            public_toolkits: public.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    #[test]
    fn ownership_and_visibility() {
        let config = Config {
            toolkit_api_keys: vec![Secret::new("top-tk")],
            llm_api_keys: vec![Secret::new("top-llm")],
            developers: vec![
                dev("ada", "ada-tk", "ada-llm", &["pub"]),
                dev("bob", "bob-tk", "bob-llm", &[]),
            ],
            ..Config::default()
        };
        let c = Catalog::new(&config);
        let h = key_hash;
        assert!(c.can_see(&h("bob-llm"), &h("ada-tk"), "pub"));
        assert!(!c.can_see(&h("bob-llm"), &h("ada-tk"), "private"));
        assert!(c.can_see(&h("ada-llm"), &h("ada-tk"), "private"));
        // Public only in its owner's list.
        assert!(!c.can_see(&h("ada-llm"), &h("bob-tk"), "pub"));
        // The top-level keys: the implicit developer `default`.
        assert!(c.can_see(&h("top-llm"), &h("top-tk"), "x"));
        assert!(!c.can_see(&h("ada-llm"), &h("top-tk"), "x"));
        assert_eq!(
            c.devs[c.owner(&h("top-tk")).expect("owned")].display_name,
            "default"
        );
        // Unknown keys own nothing and see only public toolkits.
        assert!(!c.can_see(&h("stranger"), &h("bob-tk"), "x"));
        assert!(!c.can_see(&h("bob-llm"), &h("stranger"), "pub"));

        let dev_mode = Catalog::new(&Config::dev());
        assert!(dev_mode.can_see(&h("a"), &h("b"), "x"));
        assert_eq!(
            dev_mode.devs[dev_mode.owner(&h("a")).expect("dev")].display_name,
            "dev"
        );
    }

    #[test]
    fn pages_and_descriptions() {
        assert_eq!(paging(None).expect("ok"), (1, 10));
        assert_eq!(paging(Some("page=2&page_size=1")).expect("ok"), (2, 1));
        assert_eq!(paging(Some("page=&page_size=1000")).expect("ok"), (1, 100));
        for bad in [
            "page=0",
            "page=-1",
            "page=x",
            "page_size=0",
            "page_size=1.5",
        ] {
            assert_eq!(
                paging(Some(bad)).expect_err(bad).status,
                StatusCode::BAD_REQUEST
            );
        }
        let p = page_of(vec![1, 2, 3], (2, 2));
        assert_eq!((p.count, p.results), (3, vec![3]));
        assert!(page_of(vec![1, 2, 3], (u64::MAX, 100)).results.is_empty());

        let big = json!({"data": "x".repeat(MAX_RESULT_BYTES)});
        let stored: Value = serde_json::from_str(&stored_result(&big)).expect("JSON");
        assert_eq!(stored["truncated"], true);
        assert_eq!(stored_result(&json!({"a": 1})), r#"{"a":1}"#);
    }

    #[test]
    fn tokens_are_bounded_per_tool() {
        let store = Store::memory();
        let (n, oldest) = store
            .call_now(|c| {
                for i in 0..(TOKENS_PER_TOOL + 5) {
                    save_token(c, &format!("t{i}"), "app", "f", "k")?;
                }
                save_token(c, "other", "app", "g", "k")?;
                let n: i64 = c.query_row(
                    "SELECT COUNT(*) FROM exchange_tokens WHERE function_id = 'f'",
                    [],
                    |r| r.get(0),
                )?;
                let oldest: Option<String> = c
                    .query_row(
                        "SELECT token_hash FROM exchange_tokens WHERE token_hash = 't0'",
                        [],
                        |r| r.get(0),
                    )
                    .optional()?;
                Ok((n, oldest))
            })
            .expect("save and count");
        assert_eq!(n, TOKENS_PER_TOOL);
        assert_eq!(oldest, None);
    }
}
