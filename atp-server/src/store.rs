//! The SQLite database: toolkit registrations, OAuth platforms, pending
//! OAuth flows and users' connections (tokens).

use std::sync::{Arc, Mutex, PoisonError};

use atp_registry::{Secret, ToolSpec, wire::ToolMetadata};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{
    config::{DbLocation, OAuthPlatform},
    keys::now_secs,
};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS toolkits (
    app_name TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL,
    endpoint_url TEXT,
    endpoint_key TEXT,
    toolkit_hash TEXT,
    language TEXT NOT NULL DEFAULT '',
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tools (
    app_name TEXT NOT NULL REFERENCES toolkits(app_name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    position INTEGER NOT NULL,
    code_hash TEXT NOT NULL,
    metadata TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (app_name, name)
);
CREATE TABLE IF NOT EXISTS oauth_platforms (
    id TEXT PRIMARY KEY,
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS oauth_states (
    state TEXT PRIMARY KEY,
    platform_id TEXT NOT NULL,
    external_user_id TEXT NOT NULL,
    llm_key_hash TEXT NOT NULL,
    code_verifier TEXT NOT NULL,
    redirect_url TEXT,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS oauth_connections (
    llm_key_hash TEXT NOT NULL,
    platform_id TEXT NOT NULL,
    external_user_id TEXT NOT NULL,
    integration_id TEXT NOT NULL,
    access_token TEXT NOT NULL,
    refresh_token TEXT,
    token_type TEXT,
    scope TEXT,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (llm_key_hash, platform_id, external_user_id)
);
PRAGMA user_version = 1;
"#;

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("a database task failed")]
    Task,
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

/// The database handle (one connection, used from the blocking pool).
#[derive(Clone)]
pub(crate) struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    pub fn open(location: &DbLocation) -> Result<Self, rusqlite::Error> {
        let conn = match location {
            DbLocation::Memory => Connection::open_in_memory()?,
            DbLocation::File(path) => {
                let c = Connection::open(path)?;
                c.pragma_update(None, "journal_mode", "WAL")?;
                c.pragma_update(None, "synchronous", "NORMAL")?;
                c
            }
        };
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(crate::webhooks::SCHEMA)?;
        conn.execute_batch(crate::catalog::SCHEMA)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

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

    /// Runs `f` on the connection on this thread (startup only).
    pub fn call_now<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, rusqlite::Error> {
        let mut c = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut c)
    }
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
            let spec = serde_json::from_str::<ToolMetadata>(&metadata)
                .map_err(|e| e.to_string())
                .and_then(|meta| ToolSpec::from_metadata(&name, meta).map_err(|e| e.to_string()));
            match spec {
                Ok(spec) => kit.tools.push(ToolRecord { code_hash, spec }),
                Err(e) => {
                    tracing::warn!(app = %kit.app_name, tool = %name, "skipping a stored tool whose metadata can not be read: {e}")
                }
            }
        }
    }
    Ok(kits)
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
        match serde_json::from_str(&config) {
            Ok(p) => out.push(p),
            Err(e) => {
                tracing::warn!(platform = %id, "skipping a stored OAuth platform that can not be read: {e}")
            }
        }
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
}
