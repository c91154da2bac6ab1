//! The audit log (docs/OPERATIONS.md, "Audit log"): one row per tool call
//! — run, or refused before it ran (unknown tool, a missing OAuth token,
//! a wrong LLM key, a rate limit) — and per admin action (an admin API
//! request that changes something, an `atp-server keys …` command).
//!
//! A row holds when, the key id (the first 12 hex digits of the key's
//! hash: [`keys::key_id`]), the key's developer, the toolkit, the tool,
//! how the request came in (`via`) and how it reached its toolkit
//! (`transport`), how long it took, its outcome and its error code. Never
//! a key or a token. A call's arguments and result are kept only for the
//! toolkits named in `audit_payloads`, and even then any `auth_token` in
//! them (and the call's token wherever it shows) is replaced by
//! `[redacted]`.
//!
//! Rows are written off the call's path: [`Audit::record`] puts the row
//! in a bounded queue ([`QUEUE`] rows) that a writer task empties in
//! batches of up to [`BATCH`], one transaction each; a batch that is not
//! full first waits [`LINGER`] (10 ms) for more rows (a flush does not). Should the queue be
//! full (the database far behind), the row is dropped, counted in
//! `atp_audit_rows_dropped_total{reason="queue_full"}` and logged at
//! WARN; a batch the database refuses three times is counted as
//! `write_failed` the same way. A call never waits for the audit log.
//!
//! Rows older than `audit_retention_days` are purged at start and then
//! every hour, in bounded chunks.
//!
//! Other code records with [`Audit::record`] and the builders of
//! [`Entry`]; an admin request with [`admin_action`]; a command run
//! outside the server with [`crate::audit_admin_action`]. A call refused
//! by a rate limit is an [`Entry::call`] with [`Outcome::RateLimited`] and
//! the error code `rate_limited`.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use atp_registry::Secret;
use axum::{
    extract::{RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use rusqlite::{Connection, params};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::{
    error::{ApiError, json_response},
    keys::{self, Role},
    metrics::{Metrics, Transport},
    store::{Store, StoreError},
};

/// How many rows wait for the writer at most.
pub(crate) const QUEUE: usize = 4096;
/// How many rows one transaction writes at most.
pub(crate) const BATCH: usize = 256;
/// How long the writer waits for more rows before it writes a batch that
/// is not full.
const LINGER: Duration = Duration::from_millis(10);
/// How often old rows are purged.
const PURGE_EVERY: Duration = Duration::from_secs(3600);
/// How many rows one purge statement deletes at most.
const PURGE_CHUNK: i64 = 5000;
/// How many purge statements one purge runs at most (then it waits for
/// the next one).
const PURGE_CHUNKS: usize = 200;
/// How many times a batch is tried before it is given up.
const WRITE_ATTEMPTS: u32 = 3;
/// The default page size of `GET /admin/audit`.
const DEFAULT_LIMIT: i64 = 100;
/// The largest page size of `GET /admin/audit` (a larger one is lowered).
pub(crate) const MAX_LIMIT: i64 = 500;
/// The longest name (toolkit, tool, action, target) a row keeps, in
/// characters: a refused request's names are whatever the caller sent.
const MAX_NAME_CHARS: usize = 256;
/// What replaces an `auth_token` in a kept payload.
const REDACTED: &str = "[redacted]";

/// What a row is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A tool call, run or refused.
    Call,
    /// An admin action.
    Admin,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Call => "call",
            Kind::Admin => "admin",
        }
    }
}

/// How a call or an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It was done.
    Ok,
    /// It reached its toolkit and failed (the error code says how).
    Error,
    /// It was refused before it reached a toolkit (unknown toolkit or
    /// tool, bad arguments, a missing OAuth token, too many requests).
    Refused,
    /// The caller's key was missing or wrong (or the socket had not
    /// authenticated).
    Unauthorized,
    /// A rate limit refused it (error code `rate_limited`).
    RateLimited,
}

impl Outcome {
    /// Every outcome, as the API names them.
    const ALL: [&'static str; 5] = ["ok", "error", "refused", "unauthorized", "rate_limited"];

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Refused => "refused",
            Outcome::Unauthorized => "unauthorized",
            Outcome::RateLimited => "rate_limited",
        }
    }

    /// The outcome of a call that failed with the ATP error `code`;
    /// `dispatched`: it had reached its toolkit.
    pub fn of_failure(code: &str, dispatched: bool) -> Self {
        match code {
            "rate_limited" => Outcome::RateLimited,
            "unauthorized" | "not_authenticated" => Outcome::Unauthorized,
            _ if dispatched => Outcome::Error,
            _ => Outcome::Refused,
        }
    }
}

/// How the request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Via {
    /// The LLM-client WebSocket.
    LlmWebsocket,
    /// `POST …/llm-client/process/`.
    LlmHttp,
    /// `POST /mcp/{toolkit}`.
    Mcp,
    /// The admin API.
    AdminApi,
    /// A command of `atp-server`.
    Cli,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::LlmWebsocket => "llm_websocket",
            Via::LlmHttp => "llm_http",
            Via::Mcp => "mcp",
            Via::AdminApi => "admin_api",
            Via::Cli => "cli",
        }
    }
}

/// A row to write. It holds no key and no token by construction: a key
/// comes in only as its hash, and payloads only through
/// [`Entry::payloads`], which redacts.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    at_ms: i64,
    kind: Kind,
    key_id: Option<String>,
    developer: Option<String>,
    toolkit: Option<String>,
    tool: Option<String>,
    action: Option<String>,
    target: Option<String>,
    via: Via,
    transport: Option<Transport>,
    duration_ms: f64,
    outcome: Outcome,
    error_code: Option<String>,
    arguments: Option<String>,
    result: Option<String>,
}

/// At most [`MAX_NAME_CHARS`] characters of `name`.
fn clip(name: &str) -> String {
    name.chars().take(MAX_NAME_CHARS).collect()
}

impl Entry {
    fn new(kind: Kind, via: Via, outcome: Outcome) -> Self {
        Self {
            at_ms: keys::now_millis(),
            kind,
            key_id: None,
            developer: None,
            toolkit: None,
            tool: None,
            action: None,
            target: None,
            via,
            transport: None,
            duration_ms: 0.0,
            outcome,
            error_code: None,
            arguments: None,
            result: None,
        }
    }

    /// A tool call that came in `via` and ended with `outcome` (and, when
    /// it is not `Ok`, the ATP error code `error_code`).
    pub fn call(via: Via, outcome: Outcome, error_code: Option<&str>) -> Self {
        let mut e = Self::new(Kind::Call, via, outcome);
        e.error_code = error_code.map(clip);
        e
    }

    /// A tool call that came in `via` and ended with the ATP error code
    /// `error_code` (`None`: it was done); `dispatched`: it had reached
    /// its toolkit.
    pub fn ended(via: Via, error_code: Option<&str>, dispatched: bool) -> Self {
        let outcome = error_code.map_or(Outcome::Ok, |c| Outcome::of_failure(c, dispatched));
        Self::call(via, outcome, error_code)
    }

    /// An admin action (`keys revoke`, …) on `target` (a key id, a
    /// toolkit; never a key), done (`error_code` `None`) or not.
    pub fn admin(via: Via, action: &str, target: Option<&str>, error_code: Option<&str>) -> Self {
        let outcome = match error_code {
            None => Outcome::Ok,
            Some(code) => Outcome::of_failure(code, true),
        };
        let mut e = Self::new(Kind::Admin, via, outcome);
        e.action = Some(clip(action));
        e.target = target.map(clip);
        e.error_code = error_code.map(clip);
        e
    }

    /// The caller's key, by its hash ([`keys::key_hash`]), and the
    /// developer who owns it. Its id: a database key's own (`kid_…`, as
    /// `atp-server keys list` shows it), else [`keys::key_id`].
    pub fn key(mut self, s: &crate::State, key_hash: &str) -> Self {
        self.key_id =
            Some(crate::api_keys::key_id(s, key_hash).unwrap_or_else(|| keys::key_id(key_hash)));
        self.developer = s.catalog.developer_of(key_hash).map(str::to_owned);
        self
    }

    /// The toolkit and the tool (either may be what a refused caller
    /// asked for).
    pub fn tool(mut self, toolkit: Option<&str>, tool: Option<&str>) -> Self {
        self.toolkit = toolkit.map(clip);
        self.tool = tool.map(clip);
        self
    }

    /// How the call reached its toolkit, and how long it took.
    pub fn ran(mut self, transport: Option<Transport>, took: Duration) -> Self {
        self.transport = transport;
        self.duration_ms = took.as_secs_f64() * 1000.0;
        self
    }

    /// The call's arguments and result, if its toolkit's payloads are
    /// kept (`keep`): every `auth_token` in them, and `token` wherever it
    /// shows, replaced by `[redacted]`; each at most
    /// [`crate::catalog::MAX_RESULT_BYTES`] of JSON (a larger one is kept
    /// as a truncation note, as the execution log does).
    pub fn payloads(
        mut self,
        keep: bool,
        arguments: Option<&Map<String, Value>>,
        result: Option<&Value>,
        token: Option<&Secret>,
    ) -> Self {
        if keep {
            self.arguments = arguments.map(|a| redacted(&Value::Object(a.clone()), token));
            self.result = result.map(|r| redacted(r, token));
        }
        self
    }
}

/// `value` as kept: `auth_token` fields redacted at any depth, then the
/// token's text wherever it still shows, then truncated.
fn redacted(value: &Value, token: Option<&Secret>) -> String {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(m) => {
                for (k, v) in m.iter_mut() {
                    if k.eq_ignore_ascii_case("auth_token") {
                        *v = Value::String(REDACTED.to_owned());
                    } else {
                        walk(v);
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut v = value.clone();
    walk(&mut v);
    if let Some(t) = token.map(Secret::expose).filter(|t| !t.is_empty()) {
        v = scrub(v, t);
    }
    crate::catalog::stored_result(&v)
}

/// `v` with every occurrence of `token` in its strings and keys replaced.
fn scrub(v: Value, token: &str) -> Value {
    match v {
        Value::String(s) if s.contains(token) => Value::String(s.replace(token, REDACTED)),
        Value::Array(a) => Value::Array(a.into_iter().map(|v| scrub(v, token)).collect()),
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (k.replace(token, REDACTED), scrub(v, token)))
                .collect(),
        ),
        other => other,
    }
}

/// What the writer is sent.
enum Msg {
    Row(Box<Entry>),
    /// Answered once every row sent before it is written (or given up).
    Flush(oneshot::Sender<()>),
}

/// The audit log's queue and its writer.
pub(crate) struct Audit {
    tx: mpsc::Sender<Msg>,
    /// The writer's end, until the writer starts.
    pending: Mutex<Option<(mpsc::Receiver<Msg>, Store)>>,
    payloads: HashSet<String>,
    retention_ms: i64,
    metrics: Arc<Metrics>,
    dropped: AtomicU64,
    /// Whether the writer runs (so that a row does not take the lock).
    started: AtomicBool,
}

impl Audit {
    /// The audit log of `store`, with `config`'s retention and payload
    /// settings; its writer starts with the first row or
    /// [`start`](Self::start).
    pub fn new(config: &crate::Config, store: Store, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            tx,
            pending: Mutex::new(Some((rx, store))),
            payloads: config.audit_payloads.iter().cloned().collect(),
            retention_ms: i64::from(config.audit_retention_days) * 86_400_000,
            metrics,
            dropped: AtomicU64::new(0),
            started: AtomicBool::new(false),
        }
    }

    /// Starts the writer and the purge, once, on the current runtime (no
    /// runtime: not yet).
    pub fn start(&self) {
        if self.started.load(Ordering::Acquire) || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let taken = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((rx, store)) = taken {
            let purge = tokio::spawn(purge_loop(store.clone(), self.retention_ms));
            tokio::spawn(write_loop(store, rx, self.metrics.clone(), purge));
        }
        self.started.store(true, Ordering::Release);
    }

    /// Whether the calls of `toolkit` keep their arguments and results.
    pub fn keeps_payloads(&self, toolkit: &str) -> bool {
        self.payloads.contains(toolkit)
    }

    /// Queues a row; never waits. A full queue drops it (counted, and
    /// logged at WARN).
    pub fn record(&self, entry: Entry) {
        self.start();
        if self.tx.try_send(Msg::Row(Box::new(entry))).is_err() {
            self.metrics.audit_dropped("queue_full", 1);
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // The first drop, then every 1000th: a flood does not flood
            // the log too.
            if n == 1 || n.is_multiple_of(1000) {
                tracing::warn!(
                    dropped = n,
                    "the audit log's queue is full: a row was dropped (see atp_audit_rows_dropped_total)"
                );
            }
        }
    }

    /// Waits until every row queued before now is written, `within` at
    /// most; whether it was.
    pub async fn flush(&self, within: Duration) -> bool {
        self.start();
        let (done, wait) = oneshot::channel();
        tokio::time::timeout(within, async {
            self.tx.send(Msg::Flush(done)).await.is_ok() && wait.await.is_ok()
        })
        .await
        .unwrap_or(false)
    }
}

/// Writes what comes in, in batches, until every sender is gone (the
/// server dropped); then stops the purge.
async fn write_loop(
    store: Store,
    mut rx: mpsc::Receiver<Msg>,
    metrics: Arc<Metrics>,
    purge: tokio::task::JoinHandle<()>,
) {
    let mut msgs = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut msgs, BATCH).await > 0 {
        // A batch that is not full waits LINGER once for more rows (not a
        // synchronisation: at one call at a time, a transaction for each
        // row cost more of the server's CPU than the call itself). A flush
        // does not wait.
        if msgs.len() < BATCH && !msgs.iter().any(|m| matches!(m, Msg::Flush(_))) {
            tokio::time::sleep(LINGER).await;
            while msgs.len() < BATCH {
                match rx.try_recv() {
                    Ok(m) => msgs.push(m),
                    Err(_) => break,
                }
            }
        }
        let mut rows = Vec::with_capacity(msgs.len());
        let mut acks = Vec::new();
        for m in msgs.drain(..) {
            match m {
                Msg::Row(e) => rows.push(*e),
                Msg::Flush(ack) => acks.push(ack),
            }
        }
        if !rows.is_empty() {
            write_batch(&store, rows, &metrics).await;
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
    purge.abort();
}

/// Writes one batch, trying [`WRITE_ATTEMPTS`] times.
async fn write_batch(store: &Store, rows: Vec<Entry>, metrics: &Metrics) {
    let n = rows.len() as u64;
    let rows = Arc::new(rows);
    let mut last = None;
    for attempt in 0..WRITE_ATTEMPTS {
        if attempt > 0 {
            // A pause before trying again, not a synchronisation.
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        match store.insert_audit(rows.clone()).await {
            Ok(()) => {
                metrics.audit_written(n);
                return;
            }
            Err(e) => last = Some(e),
        }
    }
    metrics.audit_dropped("write_failed", n);
    if let Some(e) = last {
        tracing::warn!(rows = n, "audit rows could not be written: {e}");
    }
}

/// Purges rows older than the retention at start and every
/// [`PURGE_EVERY`].
async fn purge_loop(store: Store, retention_ms: i64) {
    let mut every = tokio::time::interval(PURGE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let before = keys::now_millis().saturating_sub(retention_ms);
        match store.purge_audit(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "purged audit rows past their retention"),
            Err(e) => tracing::warn!("could not purge old audit rows: {e}"),
        }
    }
}

/// The columns written, in order.
const COLUMNS: &str = "at_ms, kind, key_id, developer, toolkit, tool, action, target, via, transport, duration_ms, outcome, error_code, arguments, result";

fn transport_str(t: Option<Transport>) -> Option<&'static str> {
    t.map(|t| match t {
        Transport::websocket => "websocket",
        Transport::inbox => "inbox",
        Transport::endpoint => "endpoint",
        Transport::remote => "remote",
    })
}

fn insert_sqlite(c: &mut Connection, rows: &[Entry]) -> Result<(), rusqlite::Error> {
    let tx = c.transaction()?;
    {
        let mut stmt = tx.prepare(&format!(
            "INSERT INTO audit ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
        ))?;
        for e in rows {
            stmt.execute(params![
                e.at_ms,
                e.kind.as_str(),
                e.key_id,
                e.developer,
                e.toolkit,
                e.tool,
                e.action,
                e.target,
                e.via.as_str(),
                transport_str(e.transport),
                e.duration_ms,
                e.outcome.as_str(),
                e.error_code,
                e.arguments,
                e.result,
            ])?;
        }
    }
    tx.commit()
}

/// Deletes up to [`PURGE_CHUNK`] rows older than `before_ms`; how many.
fn purge_chunk_sqlite(c: &mut Connection, before_ms: i64) -> Result<usize, rusqlite::Error> {
    c.execute(
        "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE at_ms < ?1 ORDER BY id LIMIT ?2)",
        params![before_ms, PURGE_CHUNK],
    )
}

/// A query of `GET /admin/audit`.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Filter {
    toolkit: Option<String>,
    tool: Option<String>,
    outcome: Option<String>,
    key_id: Option<String>,
    kind: Option<String>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    /// Only rows older than this one (the cursor).
    before_id: Option<i64>,
    limit: i64,
}

/// A row as the API answers it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Row {
    id: i64,
    /// When, as RFC 3339 (UTC, to the second).
    at: String,
    /// When, in milliseconds since the Unix epoch.
    at_ms: i64,
    kind: String,
    key_id: Option<String>,
    developer: Option<String>,
    toolkit: Option<String>,
    tool: Option<String>,
    action: Option<String>,
    target: Option<String>,
    via: String,
    transport: Option<String>,
    duration_ms: f64,
    outcome: String,
    error_code: Option<String>,
    arguments: Option<Value>,
    result: Option<Value>,
}

/// The SELECT of a page: the filters are `?1`…`?8` (`$1::TEXT`… on
/// PostgreSQL), the limit the ninth.
fn select_sql(pg: bool) -> String {
    let p = |i: usize, ty: &str| {
        if pg {
            format!("${i}::{ty}")
        } else {
            format!("?{i}")
        }
    };
    format!(
        "SELECT id, {COLUMNS} FROM audit
         WHERE ({t} IS NULL OR toolkit = {t}) AND ({tool} IS NULL OR tool = {tool})
           AND ({o} IS NULL OR outcome = {o}) AND ({k} IS NULL OR key_id = {k})
           AND ({kind} IS NULL OR kind = {kind}) AND ({since} IS NULL OR at_ms >= {since})
           AND ({until} IS NULL OR at_ms < {until}) AND ({before} IS NULL OR id < {before})
         ORDER BY id DESC LIMIT {limit}",
        t = p(1, "TEXT"),
        tool = p(2, "TEXT"),
        o = p(3, "TEXT"),
        k = p(4, "TEXT"),
        kind = p(5, "TEXT"),
        since = p(6, "BIGINT"),
        until = p(7, "BIGINT"),
        before = p(8, "BIGINT"),
        limit = p(9, "BIGINT"),
    )
}

/// A stored payload as JSON (the text itself, should it not parse).
fn payload(text: Option<String>) -> Option<Value> {
    text.map(|t| serde_json::from_str(&t).unwrap_or(Value::String(t)))
}

#[allow(clippy::too_many_arguments)]
fn row_of(
    id: i64,
    at_ms: i64,
    strings: [Option<String>; 10],
    via: String,
    duration_ms: f64,
    kind: String,
    outcome: String,
) -> Row {
    let [
        key_id,
        developer,
        toolkit,
        tool,
        action,
        target,
        transport,
        error_code,
        arguments,
        result,
    ] = strings;
    Row {
        id,
        at: keys::rfc3339(at_ms.div_euclid(1000)),
        at_ms,
        kind,
        key_id,
        developer,
        toolkit,
        tool,
        action,
        target,
        via,
        transport,
        duration_ms,
        outcome,
        error_code,
        arguments: payload(arguments),
        result: payload(result),
    }
}

fn query_sqlite(c: &mut Connection, f: &Filter) -> Result<Vec<Row>, rusqlite::Error> {
    let mut stmt = c.prepare(&select_sql(false))?;
    let rows = stmt.query_map(
        params![
            f.toolkit,
            f.tool,
            f.outcome,
            f.key_id,
            f.kind,
            f.since_ms,
            f.until_ms,
            f.before_id,
            f.limit + 1
        ],
        |r| {
            Ok(row_of(
                r.get(0)?,
                r.get(1)?,
                [
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(10)?,
                    r.get(13)?,
                    r.get(14)?,
                    r.get(15)?,
                ],
                r.get(9)?,
                r.get(11)?,
                r.get(2)?,
                r.get(12)?,
            ))
        },
    )?;
    rows.collect()
}

impl Store {
    /// Writes a batch of audit rows in one transaction.
    pub(crate) async fn insert_audit(&self, rows: Arc<Vec<Entry>>) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.call(move |c| insert_sqlite(c, &rows)).await,
            Store::Postgres(p) => {
                let mut c = p.client().await?;
                let tx = c.transaction().await?;
                let stmt = tx
                    .prepare(&format!(
                        "INSERT INTO audit ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
                    ))
                    .await?;
                for e in rows.iter() {
                    tx.execute(
                        &stmt,
                        &[
                            &e.at_ms,
                            &e.kind.as_str(),
                            &e.key_id,
                            &e.developer,
                            &e.toolkit,
                            &e.tool,
                            &e.action,
                            &e.target,
                            &e.via.as_str(),
                            &transport_str(e.transport),
                            &e.duration_ms,
                            &e.outcome.as_str(),
                            &e.error_code,
                            &e.arguments,
                            &e.result,
                        ],
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// Deletes the audit rows older than `before_ms`, in chunks (at most
    /// [`PURGE_CHUNKS`] of [`PURGE_CHUNK`] rows); how many.
    pub(crate) async fn purge_audit(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut total = 0u64;
        for _ in 0..PURGE_CHUNKS {
            let n = match self {
                Store::Sqlite(s) => {
                    s.call(move |c| purge_chunk_sqlite(c, before_ms)).await? as u64
                }
                Store::Postgres(p) => {
                    p.client()
                        .await?
                        .execute(
                            "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE at_ms < $1 ORDER BY id LIMIT $2)",
                            &[&before_ms, &PURGE_CHUNK],
                        )
                        .await?
                }
            };
            total += n;
            if n < PURGE_CHUNK as u64 {
                break;
            }
        }
        Ok(total)
    }

    /// One page of rows, newest first: up to `f.limit + 1` (the one more
    /// says there is a next page).
    pub(crate) async fn query_audit(&self, f: Filter) -> Result<Vec<Row>, StoreError> {
        match self {
            Store::Sqlite(s) => s.call(move |c| query_sqlite(c, &f)).await,
            Store::Postgres(p) => {
                let c = p.client().await?;
                let rows = c
                    .query(
                        &select_sql(true),
                        &[
                            &f.toolkit,
                            &f.tool,
                            &f.outcome,
                            &f.key_id,
                            &f.kind,
                            &f.since_ms,
                            &f.until_ms,
                            &f.before_id,
                            &(f.limit + 1),
                        ],
                    )
                    .await?;
                let mut out = Vec::with_capacity(rows.len());
                for r in rows {
                    out.push(row_of(
                        r.try_get(0)?,
                        r.try_get(1)?,
                        [
                            r.try_get(3)?,
                            r.try_get(4)?,
                            r.try_get(5)?,
                            r.try_get(6)?,
                            r.try_get(7)?,
                            r.try_get(8)?,
                            r.try_get(10)?,
                            r.try_get(13)?,
                            r.try_get(14)?,
                            r.try_get(15)?,
                        ],
                        r.try_get(9)?,
                        r.try_get(11)?,
                        r.try_get(2)?,
                        r.try_get(12)?,
                    ));
                }
                Ok(out)
            }
        }
    }
}

/// Reads `GET /admin/audit`'s query: every parameter optional, an unknown
/// one refused (a misspelt filter must not widen the answer).
fn parse_filter(query: Option<&str>) -> Result<Filter, ApiError> {
    let bad = |code: &'static str, message: String| ApiError::bad_request(code, message);
    let mut f = Filter {
        limit: DEFAULT_LIMIT,
        ..Filter::default()
    };
    let time = |name: &str, v: &str| -> Result<i64, ApiError> {
        v.parse::<i64>()
            .ok()
            .or_else(|| keys::parse_rfc3339_ms(v))
            .ok_or_else(|| {
                bad(
                    "invalid_time",
                    format!(
                        "{name} must be milliseconds since the Unix epoch or an RFC 3339 time in UTC (2025-01-31T12:00:00Z), not {v:?}"
                    ),
                )
            })
    };
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        let text = Some(v.to_owned());
        match &*k {
            "toolkit" => f.toolkit = text,
            "tool" => f.tool = text,
            "key_id" => f.key_id = text,
            "outcome" if Outcome::ALL.contains(&v) => f.outcome = text,
            "outcome" => {
                return Err(bad(
                    "invalid_outcome",
                    format!(
                        "outcome must be one of {}, not {v:?}",
                        Outcome::ALL.join(", ")
                    ),
                ));
            }
            "kind" if v == "call" || v == "admin" => f.kind = text,
            "kind" => {
                return Err(bad(
                    "invalid_kind",
                    format!("kind must be call or admin, not {v:?}"),
                ));
            }
            "since" => f.since_ms = Some(time("since", v)?),
            "until" => f.until_ms = Some(time("until", v)?),
            "limit" => {
                f.limit = v
                    .parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .map(|n| n.min(MAX_LIMIT))
                    .ok_or_else(|| {
                        bad(
                            "invalid_limit",
                            format!(
                                "limit must be a whole number from 1 to {MAX_LIMIT}, not {v:?}"
                            ),
                        )
                    })?;
            }
            "cursor" => {
                f.before_id = Some(v.parse::<i64>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    bad(
                        "invalid_cursor",
                        "cursor must be a next_cursor this API answered".to_owned(),
                    )
                })?);
            }
            other => {
                return Err(bad(
                    "unknown_parameter",
                    format!(
                        "unknown parameter {other:?}: use toolkit, tool, outcome, key_id, kind, since, until, limit or cursor"
                    ),
                ));
            }
        }
    }
    Ok(f)
}

/// The answer of `GET /admin/audit`.
#[derive(Debug, Serialize)]
struct Page {
    rows: Vec<Row>,
    /// The `cursor` of the next (older) page; `null` on the last one.
    next_cursor: Option<String>,
}

/// How long `GET /admin/audit` waits for the rows queued before it.
const READ_FLUSH: Duration = Duration::from_secs(2);

/// `GET /admin/audit?toolkit=&tool=&outcome=&key_id=&kind=&since=&until=&limit=&cursor=`:
/// the audit log, newest first, one page (`limit`, 100 by default, at
/// most 500) at a time: `{"rows": […], "next_cursor": "…" | null}`. The
/// rows queued before the request are written first (2 s at most), so a
/// call that was answered shows.
pub(crate) async fn get(
    State(s): State<Arc<crate::State>>,
    _admin: crate::admin::Admin,
    RawQuery(query): RawQuery,
) -> Response {
    let filter = match parse_filter(query.as_deref()) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let limit = usize::try_from(filter.limit).unwrap_or(usize::MAX);
    s.audit.flush(READ_FLUSH).await;
    match s.store.query_audit(filter).await {
        Ok(mut rows) => {
            let next_cursor = if rows.len() > limit {
                rows.truncate(limit);
                rows.last().map(|r| r.id.to_string())
            } else {
                None
            };
            json_response(StatusCode::OK, &Page { rows, next_cursor })
        }
        Err(e) => {
            tracing::error!("could not read the audit log: {e}");
            ApiError::internal("The audit log could not be read").into_response()
        }
    }
}

/// Records an admin API request that changed something (or tried to):
/// the admin key's id (none in dev mode without one), `action`, `target`
/// (never a key) and, when it failed, its error code.
pub(crate) fn admin_action(
    s: &crate::State,
    headers: &HeaderMap,
    action: &str,
    target: Option<&str>,
    error_code: Option<&str>,
) {
    let mut entry = Entry::admin(Via::AdminApi, action, target, error_code);
    if let Some(k) = keys::bearer_header(headers).filter(|k| s.keys.check(Role::Admin, k)) {
        entry.key_id = Some(keys::key_id(&keys::key_hash(k)));
    }
    s.audit.record(entry);
}

/// Writes one row now, waiting for the database (a command run outside
/// the server).
pub(crate) async fn record_now(store: &Store, entry: Entry) -> Result<(), StoreError> {
    store.insert_audit(Arc::new(vec![entry])).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at_ms: i64, toolkit: &str) -> Entry {
        let mut e = Entry::call(Via::LlmHttp, Outcome::Ok, None).tool(Some(toolkit), Some("t"));
        e.at_ms = at_ms;
        e
    }

    #[tokio::test]
    async fn purge_deletes_only_rows_past_retention() {
        let store = Store::memory();
        let now = keys::now_millis();
        let day = 86_400_000;
        let rows: Vec<Entry> = [40, 31, 29, 1, 0]
            .iter()
            .map(|d| entry(now - d * day, &format!("d{d}")))
            .collect();
        store.insert_audit(Arc::new(rows)).await.expect("written");
        let purged = store.purge_audit(now - 30 * day).await.expect("purged");
        assert_eq!(purged, 2);
        let left = store
            .query_audit(Filter {
                limit: 10,
                ..Filter::default()
            })
            .await
            .expect("read");
        let kits: Vec<_> = left.iter().filter_map(|r| r.toolkit.as_deref()).collect();
        assert_eq!(kits, ["d0", "d1", "d29"]);
        assert_eq!(store.purge_audit(now - 30 * day).await.expect("again"), 0);
    }

    #[tokio::test]
    async fn purge_runs_in_chunks() {
        let store = Store::memory();
        let n = PURGE_CHUNK as usize * 2 + 7;
        let rows: Vec<Entry> = (0..n).map(|i| entry(i as i64, "old")).collect();
        store.insert_audit(Arc::new(rows)).await.expect("written");
        assert_eq!(store.purge_audit(i64::MAX).await.expect("purged"), n as u64);
    }

    #[tokio::test]
    async fn the_writer_writes_what_is_recorded_and_a_flush_waits_for_it() {
        let store = Store::memory();
        let config = crate::Config {
            audit_payloads: vec!["kept".into()],
            ..crate::Config::default()
        };
        let metrics = Arc::new(Metrics::default());
        let audit = Audit::new(&config, store.clone(), metrics);
        // Recent rows: the purge, which starts with the writer, keeps them.
        let now = keys::now_millis();
        for i in 0..(BATCH + 3) {
            audit.record(entry(now + i as i64, "kit"));
        }
        assert!(audit.flush(Duration::from_secs(10)).await);
        let rows = store
            .query_audit(Filter {
                limit: MAX_LIMIT,
                ..Filter::default()
            })
            .await
            .expect("read");
        assert_eq!(rows.len(), BATCH + 3);
        assert!(audit.keeps_payloads("kept") && !audit.keeps_payloads("kit"));
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_never_waits() {
        let store = Store::memory();
        let audit = Audit::new(
            &crate::Config::default(),
            store.clone(),
            Arc::new(Metrics::default()),
        );
        let now = keys::now_millis();
        // No runtime here, so no writer yet: the queue fills up.
        for _ in 0..(QUEUE + 5) {
            audit.record(entry(now, "kit"));
        }
        assert_eq!(audit.dropped.load(Ordering::Relaxed), 5);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            assert!(audit.flush(Duration::from_secs(20)).await);
        });
        let n: i64 = store
            .call_now(|c| c.query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0)))
            .expect("count");
        assert_eq!(n, QUEUE as i64, "every queued row is written");
    }

    #[test]
    fn payloads_are_redacted_and_only_kept_when_asked() {
        let token = Secret::new("tok-123456");
        let args = serde_json::json!({
            "q": "find tok-123456 please",
            "auth_token": "anything",
            "nested": [{"Auth_Token": "x"}],
        });
        let args = args.as_object().expect("object");
        let result = serde_json::json!({"echo": "tok-123456"});
        let e = Entry::call(Via::Mcp, Outcome::Ok, None).payloads(
            true,
            Some(args),
            Some(&result),
            Some(&token),
        );
        let (a, r) = (e.arguments.expect("kept"), e.result.expect("kept"));
        for text in [&a, &r] {
            assert!(!text.contains("tok-123456"), "{text}");
            assert!(
                !text.contains("anything") && !text.contains("\"x\""),
                "{text}"
            );
        }
        assert!(a.contains("find [redacted] please"), "{a}");
        let e = Entry::call(Via::Mcp, Outcome::Ok, None).payloads(
            false,
            Some(args),
            Some(&result),
            None,
        );
        assert!(e.arguments.is_none() && e.result.is_none());
    }

    #[test]
    fn filters_are_read_strictly() {
        let f = parse_filter(Some(
            "toolkit=a&tool=b&outcome=rate_limited&key_id=abc&kind=call&since=1000&until=2025-01-01T00:00:00Z&limit=9999&cursor=42",
        ))
        .expect("valid");
        assert_eq!(f.toolkit.as_deref(), Some("a"));
        assert_eq!(f.outcome.as_deref(), Some("rate_limited"));
        assert_eq!(f.since_ms, Some(1000));
        assert_eq!(f.until_ms, Some(1_735_689_600_000));
        assert_eq!((f.limit, f.before_id), (MAX_LIMIT, Some(42)));
        assert_eq!(parse_filter(None).expect("empty").limit, DEFAULT_LIMIT);
        for (bad, code) in [
            ("outcome=fine", "invalid_outcome"),
            ("kind=x", "invalid_kind"),
            ("since=yesterday", "invalid_time"),
            ("limit=0", "invalid_limit"),
            ("cursor=-1", "invalid_cursor"),
            ("toolkits=a", "unknown_parameter"),
        ] {
            let e = parse_filter(Some(bad)).expect_err(bad);
            assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, code), "{bad}");
        }
    }

    #[tokio::test]
    async fn an_admin_request_is_recorded_with_its_key_id_only() {
        let admin_key = "admin-key-for-the-audit-0123";
        let server = crate::AtpServer::open(crate::Config {
            db: crate::DbLocation::Memory,
            toolkit_api_keys: vec!["tk".into()],
            admin_api_keys: vec![admin_key.into()],
            ..crate::Config::default()
        })
        .expect("open");
        let s = &server.state;
        let mut headers = HeaderMap::new();
        let bearer = format!("Bearer {admin_key}");
        headers.insert("authorization", bearer.parse().expect("a header"));
        admin_action(s, &headers, "keys revoke", Some("0123456789ab"), None);
        admin_action(
            s,
            &HeaderMap::new(),
            "keys revoke",
            None,
            Some("rate_limited"),
        );
        assert!(s.audit.flush(Duration::from_secs(10)).await);
        let rows = s
            .store
            .query_audit(Filter {
                kind: Some("admin".into()),
                limit: 10,
                ..Filter::default()
            })
            .await
            .expect("read");
        assert_eq!(rows.len(), 2);
        let text = serde_json::to_string(&rows).expect("JSON");
        assert!(!text.contains(admin_key), "{text}");
        let (refused, done) = (&rows[0], &rows[1]);
        assert_eq!(
            done.key_id.as_deref(),
            Some(&keys::key_hash(admin_key)[..12])
        );
        assert_eq!(
            (done.outcome.as_str(), done.via.as_str()),
            ("ok", "admin_api")
        );
        assert_eq!(done.target.as_deref(), Some("0123456789ab"));
        assert_eq!(refused.key_id, None);
        assert_eq!(refused.outcome, "rate_limited");
        assert_eq!(refused.error_code.as_deref(), Some("rate_limited"));
    }

    #[test]
    fn outcomes_of_failures() {
        assert_eq!(Outcome::of_failure("tool_error", true), Outcome::Error);
        assert_eq!(
            Outcome::of_failure("tool_not_found", false),
            Outcome::Refused
        );
        assert_eq!(
            Outcome::of_failure("rate_limited", false),
            Outcome::RateLimited
        );
        assert_eq!(
            Outcome::of_failure("unauthorized", false),
            Outcome::Unauthorized
        );
    }
}
