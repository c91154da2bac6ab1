//! Webhooks (docs/PROTOCOL.md §9): registered by LLM keys, signed
//! deliveries from a queue in the database, retried with backoff.
//!
//! An event ([`emit`]) becomes one row of `webhook_deliveries` per
//! subscribed webhook, its body serialized once, so that every retry sends
//! the same bytes with the same `delivery_id`. The delivery task
//! ([`deliver`]) takes due rows, a few at a time and at most one per
//! webhook, and POSTs them signed with the webhook's secret. Before an
//! attempt its row is leased (its next attempt pushed past the attempt's
//! timeout), so an attempt that was in flight when the server died is
//! made again after a restart: at least once.
//!
//! Servers sharing a PostgreSQL database share the queue: each runs a
//! delivery task, a due row is claimed (locked, then leased) by one of
//! them only, and a delivery queued by a server that died is made by
//! another once its lease runs out. At most one delivery per webhook is in
//! flight on each server.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use atp_registry::{
    Secret,
    wire::{Status, Webhook, WebhookDelivery, WebhookEvent, WebhookRegistration},
};
use axum::{
    body::Body,
    extract::{Path, State, rejection::PathRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use hyper::Method;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};
use serde_json::Value;
use tokio::{sync::Notify, task::JoinSet};

use crate::{
    error::{ApiError, json_response},
    keys::{api_key_header, now_secs, random_token, rfc3339, uuid4},
    read_object,
    secrets::Field,
    store::{Store, StoreError},
};

// The tables of webhooks and their deliveries: `webhooks` and
// `webhook_deliveries` (migrations/*/0001_initial.sql). Times are Unix
// seconds, but `next_attempt_ms` (milliseconds: retries may be closer than
// a second apart).

/// The most webhooks one LLM key may have.
const MAX_WEBHOOKS_PER_KEY: i64 = 100;
/// The most deliveries of one event waiting for one webhook; further
/// events of that kind for it are dropped (and logged) until its receiver
/// catches up. Counted per event, so that a flapping toolkit's presence
/// events can not crowd out a user's OAuth events.
const MAX_PENDING_PER_WEBHOOK: i64 = 1000;
/// The longest webhook URL.
const MAX_URL_LEN: usize = 2048;
/// How many deliveries are attempted at once (at most one per webhook).
const CONCURRENCY: usize = 8;
/// The longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// How often finished deliveries are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Finished (delivered or failed) deliveries are kept this long…
const KEEP_FINISHED_SECS: i64 = 7 * 86_400;
/// …and at most this many.
const KEEP_FINISHED_ROWS: i64 = 10_000;
/// The delivery task looks at the queue at least this often…
const IDLE_WAKE: Duration = Duration::from_secs(60);
/// …and this often on PostgreSQL, where other servers share the queue; it
/// then re-reads how many webhooks there are, too.
const SHARED_RECHECK: Duration = Duration::from_secs(10);
/// The longest error text recorded for an attempt.
const MAX_ERROR_LEN: usize = 300;

/// The webhooks' state: wakes the delivery task when there is work.
pub(crate) struct Webhooks {
    wake: Notify,
    /// Whether the delivery task runs (it starts with `serve`, or with the
    /// first event or webhook request when the router is served some other
    /// way).
    delivering: AtomicBool,
    /// How many webhooks there are (kept with the table; re-read when
    /// another server sharing the database changes it): with none, an
    /// event costs nothing — no database query, no blocking thread.
    count: AtomicUsize,
    /// Registrations under way here: their webhooks count before they are
    /// stored (so that no event is skipped for them), whatever a re-read
    /// of the count says meanwhile.
    registering: AtomicUsize,
}

impl Webhooks {
    /// The webhooks, `count` of them registered now.
    pub fn new(count: usize) -> Self {
        Self {
            wake: Notify::new(),
            delivering: AtomicBool::new(false),
            count: AtomicUsize::new(count),
            registering: AtomicUsize::new(0),
        }
    }

    /// Sets how many webhooks there are, as just read from the database
    /// (another server sharing it may have registered or deleted some).
    pub fn refresh_count(&self, n: usize) {
        self.count.store(n, Ordering::Release);
    }

    /// Whether there may be a webhook to deliver an event to.
    fn any(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0 || self.registering.load(Ordering::Acquire) > 0
    }

    /// One webhook fewer (never below none: the count may be stale).
    fn decrement(&self) {
        let _ = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            });
    }
}

/// A webhook as the console shows it (never its secret).
#[derive(Debug, Clone)]
pub(crate) struct AdminWebhook {
    pub id: String,
    pub llm_key_hash: String,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: i64,
}

/// A delivery as the console shows it (never its body).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct AdminDelivery {
    pub id: String,
    #[serde(skip)]
    pub webhook_id: String,
    pub event: String,
    pub status: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
}

/// How many deliveries of each webhook the console shows.
pub(crate) const RECENT_DELIVERIES: usize = 10;

/// Queues a delivery again (for the console's resend): due now, with a
/// full set of attempts; the delivery task is woken. Whether it exists.
pub(crate) async fn resend(s: &Arc<crate::State>, delivery_id: &str) -> Result<bool, StoreError> {
    let found = s.store.requeue_delivery(delivery_id).await?;
    if found {
        ensure_delivering(s);
        s.webhooks.wake.notify_one();
    }
    Ok(found)
}

/// Re-reads how many webhooks there are (another server sharing the
/// database registered or deleted some: a notice over NATS, or the
/// delivery task's periodic check on PostgreSQL).
pub(crate) async fn reload(s: &Arc<crate::State>) {
    match s.store.count_webhooks().await {
        Ok(n) => s.webhooks.refresh_count(n),
        Err(e) => tracing::warn!("could not re-read the webhooks: {e}"),
    }
}

/// How many webhooks there are (SQLite, at startup).
pub(crate) fn count_sqlite(c: &mut Connection) -> Result<usize, rusqlite::Error> {
    let count: i64 = c.query_row("SELECT COUNT(*) FROM webhooks", [], |r| r.get(0))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// Who an event is for.
pub(crate) enum Audience<'a> {
    /// The webhooks of one LLM key (an OAuth flow it started).
    LlmKey(&'a str),
    /// The webhooks of the LLM keys that may see a toolkit (its owner's, or
    /// every key's when it is public).
    Toolkit(&'a str),
}

/// Queues `event` for every webhook of `audience` that subscribed to it.
///
/// Returns at once: the rows are written by a task, which then wakes the
/// delivery task. `data` must never hold a token.
pub(crate) fn emit(
    s: &Arc<crate::State>,
    event: WebhookEvent,
    audience: Audience<'_>,
    data: Value,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::error!(%event, "webhook event dropped: no async runtime");
        return;
    };
    ensure_delivering(s);
    if !s.webhooks.any() {
        return;
    }
    // (LLM key, toolkit key hash and app name) of the audience.
    let audience = match audience {
        Audience::LlmKey(hash) => (Some(hash.to_owned()), None),
        Audience::Toolkit(app_name) => match s.toolkit(app_name) {
            Some(kit) => (None, Some((kit.key_hash.clone(), app_name.to_owned()))),
            None => return,
        },
    };
    let s = s.clone();
    runtime.spawn(async move {
        let (key, toolkit) = audience;
        let candidates = s.store.subscribed_webhooks(event, key).await;
        let targets: Vec<String> = match candidates {
            Ok(hooks) => hooks
                .into_iter()
                .filter(|(_, llm)| {
                    toolkit
                        .as_ref()
                        .is_none_or(|(tk, app)| s.catalog.can_see(llm, tk, app))
                })
                .map(|(id, _)| id)
                .collect(),
            Err(e) => {
                tracing::error!(%event, "webhook event dropped: could not read the webhooks: {e}");
                return;
            }
        };
        if targets.is_empty() {
            return;
        }
        match s.store.enqueue_deliveries(event, targets, data).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::debug!(%event, deliveries = n, "webhook event queued");
                s.webhooks.wake.notify_one();
            }
            Err(e) => {
                tracing::error!(%event, "webhook event dropped: could not queue it: {e}")
            }
        }
    });
}

/// The webhooks (id, LLM key hash) subscribed to `event`: of one key, or
/// of all keys.
fn subscribed(
    c: &mut Connection,
    event: WebhookEvent,
    key: Option<&str>,
) -> Result<Vec<(String, String)>, rusqlite::Error> {
    let mut stmt = c.prepare(
        "SELECT webhook_id, llm_key_hash, events FROM webhooks
         WHERE ?1 IS NULL OR llm_key_hash = ?1 ORDER BY created_at, rowid",
    )?;
    let rows = stmt.query_map([key], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, llm, events) = row?;
        if subscribes(&events, event) {
            out.push((id, llm));
        }
    }
    Ok(out)
}

fn parse_events(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// Whether a webhook's stored events (a JSON list) hold `event`.
fn subscribes(events: &str, event: WebhookEvent) -> bool {
    parse_events(events).iter().any(|e| e == event.as_str())
}

/// A new delivery of `event` to a webhook: its id and its body (serialized
/// once: every retry sends the same bytes).
fn new_delivery(
    event: WebhookEvent,
    webhook_id: &str,
    created_at: &str,
    data: &Value,
) -> (String, String) {
    let delivery_id = uuid4();
    let body = atp_registry::wire::to_json(&WebhookDelivery {
        event: event.as_str().to_owned(),
        webhook_id: webhook_id.to_owned(),
        delivery_id: delivery_id.clone(),
        created_at: created_at.to_owned(),
        data: data.clone(),
    });
    (delivery_id, body)
}

fn too_many_pending(webhook_id: &str, event: WebhookEvent) {
    tracing::warn!(
        webhook_id = %webhook_id,
        %event,
        "webhook delivery dropped: {MAX_PENDING_PER_WEBHOOK} of this event are already waiting for it"
    );
}

/// Writes one delivery of `event` for each webhook; returns how many.
fn enqueue(
    c: &mut Connection,
    event: WebhookEvent,
    webhook_ids: &[String],
    data: &Value,
) -> Result<usize, rusqlite::Error> {
    let now = now_secs();
    let created_at = rfc3339(now);
    let tx = c.transaction()?;
    let mut queued = 0;
    for webhook_id in webhook_ids {
        let pending: i64 = tx.query_row(
            "SELECT COUNT(*) FROM webhook_deliveries
             WHERE webhook_id = ?1 AND status = 'pending' AND event = ?2",
            params![webhook_id, event.as_str()],
            |r| r.get(0),
        )?;
        if pending >= MAX_PENDING_PER_WEBHOOK {
            too_many_pending(webhook_id, event);
            continue;
        }
        let (delivery_id, body) = new_delivery(event, webhook_id, &created_at, data);
        tx.execute(
            "INSERT INTO webhook_deliveries (delivery_id, webhook_id, event, body, status, attempts,
                 next_attempt_ms, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5, ?6, ?6)",
            params![delivery_id, webhook_id, event.as_str(), body, now_ms(), now],
        )?;
        queued += 1;
    }
    tx.commit()?;
    Ok(queued)
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The wait after the `attempts`-th failed attempt (from 1): the base,
/// doubled on each failure, at most [`MAX_BACKOFF`].
fn backoff(base: Duration, attempts: u32) -> Duration {
    let base = base.max(Duration::from_millis(1));
    let doublings = attempts.saturating_sub(1).min(30);
    base.saturating_mul(1 << doublings).min(MAX_BACKOFF)
}

/// `d` with "equal jitter": a random wait between half of it and all of
/// it, so that receivers that fail together are not retried together.
fn jitter(d: Duration) -> Duration {
    let r = crate::keys::random_bytes(4)
        .ok()
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(u32::MAX);
    let half = d / 2;
    half + half.mul_f64(f64::from(r) / f64::from(u32::MAX))
}

/// A delivery being attempted.
struct Job {
    delivery_id: String,
    webhook_id: String,
    event: String,
    url: String,
    /// The webhook's signing secret as stored (sealed): opened when the
    /// attempt is made.
    sealed_secret: String,
    body: String,
    /// This attempt's number (from 1).
    attempt: u32,
}

/// Leases up to `free` due deliveries (at most one per webhook, none of
/// the `busy` webhooks), and says when the next one of the others is due.
fn claim(
    c: &mut Connection,
    free: usize,
    busy: &[String],
    lease: Duration,
    retry_base: Duration,
) -> Result<(Vec<Job>, Option<i64>), rusqlite::Error> {
    let now = now_ms();
    let tx = c.transaction()?;
    let mut jobs = Vec::new();
    let mut excluded: Vec<String> = busy.to_vec();
    if free > 0 {
        let not_busy = placeholders(busy.len(), 3);
        let sql = format!(
            "SELECT d.delivery_id, MIN(d.next_attempt_ms) AS due FROM webhook_deliveries d
             WHERE d.status = 'pending' AND d.next_attempt_ms <= ?1 AND d.webhook_id NOT IN ({not_busy})
             GROUP BY d.webhook_id ORDER BY due LIMIT ?2"
        );
        let ids: Vec<String> = {
            let mut stmt = tx.prepare(&sql)?;
            let limit = i64::try_from(free).unwrap_or(i64::MAX);
            let args: Vec<rusqlite::types::Value> = [now.into(), limit.into()]
                .into_iter()
                .chain(busy.iter().map(|b| b.clone().into()))
                .collect();
            stmt.query_map(params_from_iter(args), |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        for id in ids {
            let job = tx
                .query_row(
                    "SELECT d.delivery_id, d.webhook_id, d.event, w.url, w.secret, d.body, d.attempts
                     FROM webhook_deliveries d JOIN webhooks w ON w.webhook_id = d.webhook_id
                     WHERE d.delivery_id = ?1",
                    [&id],
                    |r| {
                        Ok(Job {
                            delivery_id: r.get(0)?,
                            webhook_id: r.get(1)?,
                            event: r.get(2)?,
                            url: r.get(3)?,
                            sealed_secret: r.get(4)?,
                            body: r.get(5)?,
                            attempt: r.get::<_, u32>(6)?.saturating_add(1),
                        })
                    },
                )
                .optional()?;
            let Some(job) = job else { continue };
            // The lease: should the server die during this attempt, the
            // delivery is retried once it runs out.
            let until = lease_until(now, lease, retry_base, job.attempt);
            tx.execute(
                "UPDATE webhook_deliveries SET attempts = ?2, next_attempt_ms = ?3, updated_at = ?4
                 WHERE delivery_id = ?1",
                params![job.delivery_id, job.attempt, until, now_secs()],
            )?;
            excluded.push(job.webhook_id.clone());
            jobs.push(job);
        }
    }
    let sql = format!(
        "SELECT MIN(next_attempt_ms) FROM webhook_deliveries
         WHERE status = 'pending' AND webhook_id NOT IN ({})",
        placeholders(excluded.len(), 1)
    );
    let next: Option<i64> = tx.query_row(&sql, params_from_iter(&excluded), |r| r.get(0))?;
    tx.commit()?;
    Ok((jobs, next))
}

/// Until when an attempt (number `attempt`, from 1) claimed at `now` (ms)
/// holds its delivery: the attempt's timeout, and the wait before a retry.
fn lease_until(now: i64, lease: Duration, retry_base: Duration, attempt: u32) -> i64 {
    now.saturating_add(millis(lease))
        .saturating_add(millis(backoff(retry_base, attempt)))
}

/// A delivery's state after its `attempt`-th attempt failed, and when it
/// is next due (ms).
fn after_failure(attempt: u32, max_attempts: u32, retry_in: Duration) -> (&'static str, i64) {
    if attempt >= max_attempts {
        ("failed", now_ms())
    } else {
        ("pending", now_ms().saturating_add(millis(retry_in)))
    }
}

/// `?from, ?from+1, …` for `n` values (`NULL` for none: `x NOT IN (NULL)`
/// would be NULL, so an empty list is written as a value no id has).
fn placeholders(n: usize, from: usize) -> String {
    if n == 0 {
        return "''".into();
    }
    (from..from + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How an attempt ended.
#[derive(Clone)]
enum Outcome {
    Delivered(u16),
    Failed(Option<u16>, String),
}

/// Records an attempt: delivered, failed for good, or to retry later.
fn record(
    c: &mut Connection,
    job_id: &str,
    attempt: u32,
    max_attempts: u32,
    retry_in: Duration,
    outcome: &Outcome,
) -> Result<&'static str, rusqlite::Error> {
    let now = now_secs();
    match outcome {
        Outcome::Delivered(status) => {
            c.execute(
                "UPDATE webhook_deliveries SET status = 'delivered', last_status = ?2, last_error = NULL,
                     delivered_at = ?3, updated_at = ?3
                 WHERE delivery_id = ?1",
                params![job_id, status, now],
            )?;
            Ok("delivered")
        }
        Outcome::Failed(status, error) => {
            let (state, next) = after_failure(attempt, max_attempts, retry_in);
            c.execute(
                "UPDATE webhook_deliveries SET status = ?2, last_status = ?3, last_error = ?4,
                     next_attempt_ms = ?5, updated_at = ?6
                 WHERE delivery_id = ?1",
                params![job_id, state, status, error, next, now],
            )?;
            Ok(state)
        }
    }
}

/// Drops finished deliveries older than [`KEEP_FINISHED_SECS`] and beyond
/// the newest [`KEEP_FINISHED_ROWS`].
fn prune(c: &mut Connection) -> Result<usize, rusqlite::Error> {
    let old = c.execute(
        "DELETE FROM webhook_deliveries WHERE status != 'pending' AND updated_at < ?1",
        [now_secs() - KEEP_FINISHED_SECS],
    )?;
    let excess = c.execute(
        "DELETE FROM webhook_deliveries WHERE status != 'pending' AND delivery_id NOT IN (
             SELECT delivery_id FROM webhook_deliveries WHERE status != 'pending'
             ORDER BY updated_at DESC LIMIT ?1)",
        [KEEP_FINISHED_ROWS],
    )?;
    Ok(old + excess)
}

/// A webhook to store.
struct NewWebhook {
    webhook_id: String,
    llm_key_hash: String,
    url: String,
    /// The events, as a JSON list.
    events: String,
    secret: Secret,
    created_at: i64,
}

/// Stores a webhook (its secret sealed: `secret`), unless its key has
/// [`MAX_WEBHOOKS_PER_KEY`] already (then `false`).
fn insert_webhook(
    c: &mut Connection,
    w: &NewWebhook,
    secret: &str,
) -> Result<bool, rusqlite::Error> {
    let tx = c.transaction()?;
    let count: i64 = tx.query_row(
        "SELECT COUNT(*) FROM webhooks WHERE llm_key_hash = ?1",
        [&w.llm_key_hash],
        |r| r.get(0),
    )?;
    if count >= MAX_WEBHOOKS_PER_KEY {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO webhooks (webhook_id, llm_key_hash, url, events, secret, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            w.webhook_id,
            w.llm_key_hash,
            w.url,
            w.events,
            secret,
            w.created_at
        ],
    )?;
    tx.commit()?;
    Ok(true)
}

/// An LLM key's webhooks (without their secrets), oldest first.
fn list_webhooks(c: &mut Connection, key: &str) -> Result<Vec<Webhook>, rusqlite::Error> {
    let mut stmt = c.prepare(
        "SELECT webhook_id, url, events, created_at FROM webhooks
         WHERE llm_key_hash = ?1 ORDER BY created_at, rowid",
    )?;
    let rows = stmt.query_map([key], |r| {
        Ok(Webhook {
            webhook_id: r.get(0)?,
            url: r.get(1)?,
            events: parse_events(&r.get::<_, String>(2)?),
            created_at: Some(rfc3339(r.get(3)?)),
            secret: None,
        })
    })?;
    rows.collect()
}

/// Deletes an LLM key's webhook (and, by `ON DELETE CASCADE`, its
/// deliveries); returns whether there was one.
fn delete_webhook(
    c: &mut Connection,
    webhook_id: &str,
    key: &str,
) -> Result<bool, rusqlite::Error> {
    let n = c.execute(
        "DELETE FROM webhooks WHERE webhook_id = ?1 AND llm_key_hash = ?2",
        params![webhook_id, key],
    )?;
    Ok(n > 0)
}

// ---------------------------------------------------------------------
// The queries on either database. SQLite runs the functions above;
// PostgreSQL the same SQL, with these differences:
//
// - Several servers may share the database, so a claim locks the rows it
//   takes (`FOR UPDATE SKIP LOCKED`): a due delivery is claimed by one
//   server only, the others skip it. Its lease (the pushed
//   `next_attempt_ms`) is committed with the claim, as on SQLite.
// - PostgreSQL has no `rowid`: its `seq` column (migration 2) keeps the
//   insertion order.
// - A registration takes an advisory lock on its key, so that servers
//   registering at once can not pass [`MAX_WEBHOOKS_PER_KEY`] together.

/// The first key of the advisory locks taken here (the second: a hash of
/// the LLM key).
const PG_LOCK_WEBHOOKS: i32 = 7_415_607;

/// A PostgreSQL integer column as a `u32` (negative: 0).
fn pg_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

impl Store {
    /// Every webhook, oldest first, and the newest deliveries of each (at
    /// most [`RECENT_DELIVERIES`]), newest first: for the console.
    pub async fn admin_webhooks(
        &self,
    ) -> Result<(Vec<AdminWebhook>, Vec<AdminDelivery>), StoreError> {
        const HOOKS: &str = "SELECT webhook_id, llm_key_hash, url, events, created_at FROM webhooks ORDER BY created_at, webhook_id";
        const DELIVERIES: &str = "SELECT delivery_id, webhook_id, event, status, attempts, last_status, last_error, created_at, delivered_at
             FROM (SELECT d.*, ROW_NUMBER() OVER (PARTITION BY webhook_id ORDER BY created_at DESC, delivery_id) AS n
                   FROM webhook_deliveries d) r
             WHERE n <= 10 ORDER BY created_at DESC, delivery_id"; // 10: RECENT_DELIVERIES
        match self {
            Store::Sqlite(s) => {
                s.call(|c| {
                    let hooks = c
                        .prepare(HOOKS)?
                        .query_map([], |r| {
                            Ok(AdminWebhook {
                                id: r.get(0)?,
                                llm_key_hash: r.get(1)?,
                                url: r.get(2)?,
                                events: parse_events(&r.get::<_, String>(3)?),
                                created_at: r.get(4)?,
                            })
                        })?
                        .collect::<Result<Vec<_>, _>>()?;
                    let deliveries = c
                        .prepare(DELIVERIES)?
                        .query_map([], |r| {
                            Ok(AdminDelivery {
                                id: r.get(0)?,
                                webhook_id: r.get(1)?,
                                event: r.get(2)?,
                                status: r.get(3)?,
                                attempts: r.get(4)?,
                                last_status: r.get(5)?,
                                last_error: r.get(6)?,
                                created_at: r.get(7)?,
                                delivered_at: r.get(8)?,
                            })
                        })?
                        .collect::<Result<Vec<_>, rusqlite::Error>>()?;
                    Ok::<_, rusqlite::Error>((hooks, deliveries))
                })
                .await
            }
            Store::Postgres(p) => {
                let client = p.client().await?;
                let mut hooks = Vec::new();
                for r in client.query(HOOKS, &[]).await? {
                    hooks.push(AdminWebhook {
                        id: r.try_get(0)?,
                        llm_key_hash: r.try_get(1)?,
                        url: r.try_get(2)?,
                        events: parse_events(&r.try_get::<_, String>(3)?),
                        created_at: r.try_get(4)?,
                    });
                }
                let mut deliveries = Vec::new();
                for r in client.query(DELIVERIES, &[]).await? {
                    deliveries.push(AdminDelivery {
                        id: r.try_get(0)?,
                        webhook_id: r.try_get(1)?,
                        event: r.try_get(2)?,
                        status: r.try_get(3)?,
                        attempts: r.try_get(4)?,
                        last_status: r.try_get(5)?,
                        last_error: r.try_get(6)?,
                        created_at: r.try_get(7)?,
                        delivered_at: r.try_get(8)?,
                    });
                }
                Ok((hooks, deliveries))
            }
        }
    }

    /// Makes a delivery due now again, with a full set of attempts.
    /// Whether it exists.
    async fn requeue_delivery(&self, delivery_id: &str) -> Result<bool, StoreError> {
        let (now, now_ms) = (now_secs(), now_ms());
        match self {
            Store::Sqlite(s) => {
                let id = delivery_id.to_owned();
                s.call(move |c| {
                    c.execute(
                        "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_ms = ?2,
                             updated_at = ?3 WHERE delivery_id = ?1",
                        params![id, now_ms, now],
                    )
                    .map(|n| n > 0)
                })
                .await
            }
            Store::Postgres(p) => Ok(p
                .client()
                .await?
                .execute(
                    "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_ms = $2,
                         updated_at = $3 WHERE delivery_id = $1",
                    &[&delivery_id, &now_ms, &now],
                )
                .await?
                > 0),
        }
    }

    /// How many webhooks there are.
    pub async fn count_webhooks(&self) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(s) => s.call(count_sqlite).await,
            Store::Postgres(p) => {
                let n: i64 = p
                    .client()
                    .await?
                    .query_one("SELECT COUNT(*) FROM webhooks", &[])
                    .await?
                    .try_get(0)?;
                Ok(usize::try_from(n).unwrap_or(0))
            }
        }
    }

    /// The webhooks (id, LLM key hash) subscribed to `event`: of one key,
    /// or of all keys; oldest first.
    async fn subscribed_webhooks(
        &self,
        event: WebhookEvent,
        key: Option<String>,
    ) -> Result<Vec<(String, String)>, StoreError> {
        match self {
            Store::Sqlite(s) => s.call(move |c| subscribed(c, event, key.as_deref())).await,
            Store::Postgres(p) => {
                let rows = p
                    .client()
                    .await?
                    .query(
                        "SELECT webhook_id, llm_key_hash, events FROM webhooks
                         WHERE $1::TEXT IS NULL OR llm_key_hash = $1::TEXT
                         ORDER BY created_at, seq",
                        &[&key],
                    )
                    .await?;
                let mut out = Vec::new();
                for r in rows {
                    if subscribes(&r.try_get::<_, String>(2)?, event) {
                        out.push((r.try_get(0)?, r.try_get(1)?));
                    }
                }
                Ok(out)
            }
        }
    }

    /// Writes one delivery of `event` for each webhook (one that is gone
    /// meanwhile is skipped); returns how many.
    async fn enqueue_deliveries(
        &self,
        event: WebhookEvent,
        webhook_ids: Vec<String>,
        data: Value,
    ) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(s) => {
                s.call(move |c| enqueue(c, event, &webhook_ids, &data))
                    .await
            }
            Store::Postgres(p) => {
                let now = now_secs();
                let created_at = rfc3339(now);
                let mut c = p.client().await?;
                let tx = c.transaction().await?;
                let mut queued = 0;
                for webhook_id in &webhook_ids {
                    let pending: i64 = tx
                        .query_one(
                            "SELECT COUNT(*) FROM webhook_deliveries
                             WHERE webhook_id = $1 AND status = 'pending' AND event = $2",
                            &[webhook_id, &event.as_str()],
                        )
                        .await?
                        .try_get(0)?;
                    if pending >= MAX_PENDING_PER_WEBHOOK {
                        too_many_pending(webhook_id, event);
                        continue;
                    }
                    let (delivery_id, body) = new_delivery(event, webhook_id, &created_at, &data);
                    let n = tx
                        .execute(
                            "INSERT INTO webhook_deliveries (delivery_id, webhook_id, event, body, status,
                                 attempts, next_attempt_ms, created_at, updated_at)
                             SELECT $1::TEXT, $2::TEXT, $3::TEXT, $4::TEXT, 'pending', 0, $5::BIGINT,
                                 $6::BIGINT, $6::BIGINT
                             WHERE EXISTS (SELECT 1 FROM webhooks WHERE webhook_id = $2::TEXT)",
                            &[
                                &delivery_id,
                                webhook_id,
                                &event.as_str(),
                                &body,
                                &now_ms(),
                                &now,
                            ],
                        )
                        .await?;
                    queued += usize::try_from(n).unwrap_or(0);
                }
                tx.commit().await?;
                Ok(queued)
            }
        }
    }

    /// Leases up to `free` due deliveries (at most one per webhook, none of
    /// the `busy` webhooks, none another server is claiming), and says when
    /// the next one of the others is due.
    async fn claim_deliveries(
        &self,
        free: usize,
        busy: Vec<String>,
        lease: Duration,
        retry_base: Duration,
    ) -> Result<(Vec<Job>, Option<i64>), StoreError> {
        let p = match self {
            Store::Sqlite(s) => {
                return s
                    .call(move |c| claim(c, free, &busy, lease, retry_base))
                    .await;
            }
            Store::Postgres(p) => p,
        };
        let now = now_ms();
        let mut c = p.client().await?;
        let tx = c.transaction().await?;
        let mut jobs = Vec::new();
        let mut excluded = busy;
        if free > 0 {
            let limit = i64::try_from(free).unwrap_or(i64::MAX);
            // Each webhook's first due delivery; of those, the rows no other
            // server holds now. A row another server claimed (and committed)
            // since this statement began is checked again once locked: the
            // outer conditions then see its lease and drop it.
            let rows = tx
                .query(
                    "SELECT d.delivery_id, d.webhook_id, d.event, w.url, w.secret, d.body, d.attempts
                     FROM webhook_deliveries d JOIN webhooks w ON w.webhook_id = d.webhook_id
                     WHERE d.status = 'pending' AND d.next_attempt_ms <= $1
                       AND d.delivery_id IN (
                           SELECT DISTINCT ON (webhook_id) delivery_id FROM webhook_deliveries
                           WHERE status = 'pending' AND next_attempt_ms <= $1
                             AND webhook_id <> ALL($2)
                           ORDER BY webhook_id, next_attempt_ms, delivery_id)
                     ORDER BY d.next_attempt_ms
                     LIMIT $3
                     FOR UPDATE OF d SKIP LOCKED",
                    &[&now, &excluded, &limit],
                )
                .await?;
            for r in rows {
                let job = Job {
                    delivery_id: r.try_get(0)?,
                    webhook_id: r.try_get(1)?,
                    event: r.try_get(2)?,
                    url: r.try_get(3)?,
                    sealed_secret: r.try_get(4)?,
                    body: r.try_get(5)?,
                    attempt: pg_u32(r.try_get(6)?).saturating_add(1),
                };
                // The lease: should the server die during this attempt, the
                // delivery is retried (by any server) once it runs out.
                let until = lease_until(now, lease, retry_base, job.attempt);
                tx.execute(
                    "UPDATE webhook_deliveries SET attempts = $2, next_attempt_ms = $3, updated_at = $4
                     WHERE delivery_id = $1",
                    &[
                        &job.delivery_id,
                        &i64::from(job.attempt),
                        &until,
                        &now_secs(),
                    ],
                )
                .await?;
                excluded.push(job.webhook_id.clone());
                jobs.push(job);
            }
        }
        let next: Option<i64> = tx
            .query_one(
                "SELECT MIN(next_attempt_ms) FROM webhook_deliveries
                 WHERE status = 'pending' AND webhook_id <> ALL($1)",
                &[&excluded],
            )
            .await?
            .try_get(0)?;
        tx.commit().await?;
        Ok((jobs, next))
    }

    /// Records an attempt: delivered, failed for good, or to retry later.
    async fn record_attempt(
        &self,
        delivery_id: String,
        attempt: u32,
        max_attempts: u32,
        retry_in: Duration,
        outcome: Outcome,
    ) -> Result<&'static str, StoreError> {
        let p = match self {
            Store::Sqlite(s) => {
                return s
                    .call(move |c| {
                        record(c, &delivery_id, attempt, max_attempts, retry_in, &outcome)
                    })
                    .await;
            }
            Store::Postgres(p) => p,
        };
        let now = now_secs();
        let c = p.client().await?;
        match outcome {
            Outcome::Delivered(status) => {
                c.execute(
                    "UPDATE webhook_deliveries SET status = 'delivered', last_status = $2,
                         last_error = NULL, delivered_at = $3, updated_at = $3
                     WHERE delivery_id = $1",
                    &[&delivery_id, &i64::from(status), &now],
                )
                .await?;
                Ok("delivered")
            }
            Outcome::Failed(status, error) => {
                let (state, next) = after_failure(attempt, max_attempts, retry_in);
                c.execute(
                    "UPDATE webhook_deliveries SET status = $2, last_status = $3, last_error = $4,
                         next_attempt_ms = $5, updated_at = $6
                     WHERE delivery_id = $1",
                    &[
                        &delivery_id,
                        &state,
                        &status.map(i64::from),
                        &error,
                        &next,
                        &now,
                    ],
                )
                .await?;
                Ok(state)
            }
        }
    }

    /// Drops old finished deliveries; returns how many.
    async fn prune_deliveries(&self) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(s) => s.call(prune).await,
            Store::Postgres(p) => {
                let c = p.client().await?;
                let old = c
                    .execute(
                        "DELETE FROM webhook_deliveries WHERE status <> 'pending' AND updated_at < $1",
                        &[&(now_secs() - KEEP_FINISHED_SECS)],
                    )
                    .await?;
                let excess = c
                    .execute(
                        "DELETE FROM webhook_deliveries WHERE status <> 'pending' AND delivery_id NOT IN (
                             SELECT delivery_id FROM webhook_deliveries WHERE status <> 'pending'
                             ORDER BY updated_at DESC LIMIT $1)",
                        &[&KEEP_FINISHED_ROWS],
                    )
                    .await?;
                Ok(usize::try_from(old + excess).unwrap_or(usize::MAX))
            }
        }
    }

    /// Stores a webhook, unless its key has [`MAX_WEBHOOKS_PER_KEY`]
    /// already (then `false`).
    async fn insert_webhook(&self, w: NewWebhook) -> Result<bool, StoreError> {
        let secret =
            self.keyring()
                .seal(Field::WebhookSecret, &[&w.webhook_id], w.secret.expose())?;
        let p = match self {
            Store::Sqlite(s) => return s.call(move |c| insert_webhook(c, &w, &secret)).await,
            Store::Postgres(p) => p,
        };
        let mut c = p.client().await?;
        let tx = c.transaction().await?;
        // One registration of a key at a time, across servers.
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&PG_LOCK_WEBHOOKS, &w.llm_key_hash],
        )
        .await?;
        let count: i64 = tx
            .query_one(
                "SELECT COUNT(*) FROM webhooks WHERE llm_key_hash = $1",
                &[&w.llm_key_hash],
            )
            .await?
            .try_get(0)?;
        if count >= MAX_WEBHOOKS_PER_KEY {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO webhooks (webhook_id, llm_key_hash, url, events, secret, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &w.webhook_id,
                &w.llm_key_hash,
                &w.url,
                &w.events,
                &secret,
                &w.created_at,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// An LLM key's webhooks (without their secrets), oldest first.
    async fn list_webhooks(&self, key: String) -> Result<Vec<Webhook>, StoreError> {
        match self {
            Store::Sqlite(s) => s.call(move |c| list_webhooks(c, &key)).await,
            Store::Postgres(p) => {
                let rows = p
                    .client()
                    .await?
                    .query(
                        "SELECT webhook_id, url, events, created_at FROM webhooks
                         WHERE llm_key_hash = $1 ORDER BY created_at, seq",
                        &[&key],
                    )
                    .await?;
                let mut out = Vec::new();
                for r in rows {
                    out.push(Webhook {
                        webhook_id: r.try_get(0)?,
                        url: r.try_get(1)?,
                        events: parse_events(&r.try_get::<_, String>(2)?),
                        created_at: Some(rfc3339(r.try_get(3)?)),
                        secret: None,
                    });
                }
                Ok(out)
            }
        }
    }

    /// Deletes an LLM key's webhook and its deliveries; returns whether
    /// there was one.
    async fn delete_webhook(&self, webhook_id: String, key: String) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(s) => s.call(move |c| delete_webhook(c, &webhook_id, &key)).await,
            Store::Postgres(p) => {
                // Its deliveries go with it (ON DELETE CASCADE).
                let n = p
                    .client()
                    .await?
                    .execute(
                        "DELETE FROM webhooks WHERE webhook_id = $1 AND llm_key_hash = $2",
                        &[&webhook_id, &key],
                    )
                    .await?;
                Ok(n > 0)
            }
        }
    }
}

/// Starts the delivery task once (within a tokio runtime); it runs until
/// the server shuts down.
pub(crate) fn ensure_delivering(s: &Arc<crate::State>) {
    if tokio::runtime::Handle::try_current().is_err()
        || s.webhooks.delivering.swap(true, Ordering::AcqRel)
    {
        return;
    }
    tokio::spawn(deliver(s.clone()));
}

/// Delivers queued events until the server stops.
///
/// On PostgreSQL other servers share the queue: it also looks at it every
/// [`SHARED_RECHECK`] (for deliveries another server queued and could not
/// make, say because it died), and then re-reads how many webhooks there
/// are (should a notice from another server have been missed).
async fn deliver(s: Arc<crate::State>) {
    let mut shutdown = s.shutdown.subscribe();
    let mut running: JoinSet<()> = JoinSet::new();
    // The webhook each running attempt is for.
    let mut busy: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut last_prune: Option<Instant> = None;
    let shared = matches!(s.store, Store::Postgres(_));
    let idle = if shared { SHARED_RECHECK } else { IDLE_WAKE };
    let mut last_recount = Instant::now();
    loop {
        if *shutdown.borrow() {
            break;
        }
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(Instant::now());
            match s.store.prune_deliveries().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(pruned = n, "old webhook deliveries removed"),
                Err(e) => tracing::warn!("could not prune webhook deliveries: {e}"),
            }
        }
        if shared && last_recount.elapsed() >= SHARED_RECHECK {
            last_recount = Instant::now();
            reload(&s).await;
        }
        let free = CONCURRENCY.saturating_sub(running.len());
        let mut wait = idle;
        if free > 0 {
            let busy_ids: Vec<String> = busy.values().cloned().collect();
            let (lease, base) = (s.config.webhook_timeout, s.config.webhook_retry_base);
            match s.store.claim_deliveries(free, busy_ids, lease, base).await {
                Ok((jobs, next)) => {
                    for job in jobs {
                        let webhook_id = job.webhook_id.clone();
                        let task = running.spawn(attempt(s.clone(), job));
                        busy.insert(task.id(), webhook_id);
                    }
                    if let Some(next) = next {
                        let ms = u64::try_from(next.saturating_sub(now_ms())).unwrap_or(0);
                        wait = wait.min(Duration::from_millis(ms));
                    }
                }
                Err(e) => {
                    tracing::error!("could not read the webhook queue: {e}");
                    wait = Duration::from_secs(1);
                }
            }
            if running.len() >= CONCURRENCY {
                // Full: wait for an attempt to end rather than for a due row.
                wait = idle;
            }
        }
        if shared {
            wait = wait.min(SHARED_RECHECK.saturating_sub(last_recount.elapsed()));
        }
        tokio::select! {
            _ = s.webhooks.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => {
                        tracing::error!("a webhook delivery task failed: {e}");
                        e.id()
                    }
                };
                busy.remove(&id);
            }
            _ = crate::stopped(&mut shutdown) => break,
        }
    }
    // Attempts cut short here are retried after a restart (their leases).
    running.abort_all();
}

/// Makes one attempt of a delivery and records it.
async fn attempt(s: Arc<crate::State>, job: Job) {
    let opened =
        s.store
            .keyring()
            .open(Field::WebhookSecret, &[&job.webhook_id], &job.sealed_secret);
    let outcome = match opened {
        Ok(secret) => send(&s, &job, &secret).await,
        Err(e) => {
            tracing::error!(
                webhook_id = %job.webhook_id, delivery_id = %job.delivery_id,
                "webhook delivery not sent: {e}"
            );
            Outcome::Failed(
                None,
                "the webhook's signing secret could not be opened (see the server log)".into(),
            )
        }
    };
    let max_attempts = s.config.webhook_max_attempts.max(1);
    let retry_in = jitter(backoff(s.config.webhook_retry_base, job.attempt));
    let (id, n) = (job.delivery_id.clone(), job.attempt);
    let recorded = s
        .store
        .record_attempt(id, n, max_attempts, retry_in, outcome.clone())
        .await;
    let (webhook_id, delivery_id) = (&job.webhook_id, &job.delivery_id);
    s.metrics.delivery(match (&recorded, &outcome) {
        (_, Outcome::Delivered(_)) => "delivered",
        (Ok("failed"), _) => "failed",
        _ => "retry",
    });
    match (recorded, &outcome) {
        (Ok(_), Outcome::Delivered(status)) => {
            tracing::debug!(%webhook_id, %delivery_id, attempt = n, status, "webhook delivered")
        }
        (Ok("failed"), Outcome::Failed(_, why)) => tracing::warn!(
            %webhook_id, %delivery_id, attempts = n,
            "webhook delivery given up: {why}"
        ),
        (Ok(_), Outcome::Failed(_, why)) => tracing::info!(
            %webhook_id, %delivery_id, attempt = n,
            retry_in_ms = millis(retry_in),
            "webhook delivery failed, will retry: {why}"
        ),
        (Err(e), _) => tracing::error!(
            %webhook_id, %delivery_id,
            "could not record a webhook delivery attempt: {e}"
        ),
    }
}

/// Sends one delivery, signed with `secret`.
async fn send(s: &crate::State, job: &Job, secret: &Secret) -> Outcome {
    let signature = atp_registry::webhook::sign(secret.expose().as_bytes(), job.body.as_bytes());
    let headers = [
        ("x-atp-signature", signature.as_str()),
        ("x-atp-event", job.event.as_str()),
        ("x-atp-delivery", job.delivery_id.as_str()),
        (
            "user-agent",
            concat!("atp-server/", env!("CARGO_PKG_VERSION")),
        ),
    ];
    let sent = s
        .outbound
        .send(
            Method::POST,
            &job.url,
            &headers,
            Some(("application/json", Bytes::from(job.body.clone()))),
            s.config.webhook_timeout,
        )
        .await;
    match sent {
        Ok((status, _)) if (200..300).contains(&status) => Outcome::Delivered(status),
        Ok((status, _)) => Outcome::Failed(Some(status), format!("HTTP {status}")),
        Err(e) => {
            let mut text = e.to_string();
            if text.len() > MAX_ERROR_LEN {
                let mut end = MAX_ERROR_LEN;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
            }
            Outcome::Failed(None, text)
        }
    }
}

/// The caller's LLM key for an endpoint whose body only matters for its `api_key`
/// (a GET sends none).
async fn llm_key_of(s: &crate::State, headers: &HeaderMap, body: Body) -> Result<String, ApiError> {
    if api_key_header(headers).is_some() {
        return s.llm_caller(headers, None);
    }
    let body = read_object(body, &s.config).await.ok();
    s.llm_caller(headers, body.as_ref())
}

/// A webhook URL: absolute `http://` or `https://` with a host.
fn valid_url(url: &str) -> bool {
    if url.len() > MAX_URL_LEN || !(url.starts_with("http://") || url.starts_with("https://")) {
        return false;
    }
    url.parse::<hyper::Uri>()
        .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()))
}

/// Tells the other servers sharing the database (if any) that the
/// webhooks changed: they re-read how many there are.
async fn changed(s: &crate::State) {
    if let Some(bus) = &s.bus {
        bus.webhooks_changed().await;
    }
}

fn db_error(what: &'static str) -> impl FnOnce(crate::store::StoreError) -> ApiError {
    move |e| {
        tracing::error!("could not {what}: {e}");
        ApiError::internal(format!("Could not {what}"))
    }
}

/// `POST …/llm-client/webhooks/register/` `{"url", "events"?}`: 201 with
/// the webhook and its signing secret (shown this once). No events (or an
/// empty list) means `["connection_success"]`, the Python client's default.
pub(crate) async fn register(
    State(s): State<Arc<crate::State>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    ensure_delivering(&s);
    let result = async {
        if api_key_header(&headers).is_some() {
            s.llm_caller(&headers, None)?;
        }
        let m = read_object(body, &s.config).await?;
        let llm_key_hash = s.llm_caller(&headers, Some(&m))?;
        let reg: WebhookRegistration = serde_json::from_value(Value::Object(m)).map_err(|_| {
            ApiError::bad_request(
                "invalid_body",
                "Expected {\"url\": STRING, \"events\": [STRING, ...]}",
            )
        })?;
        if !valid_url(&reg.url) {
            return Err(ApiError::bad_request(
                "invalid_url",
                format!("url must be an http:// or https:// URL of at most {MAX_URL_LEN} bytes"),
            ));
        }
        let mut events: Vec<String> = Vec::new();
        for name in &reg.events {
            let event: WebhookEvent = name
                .parse()
                .map_err(|e: atp_registry::wire::UnknownEvent| {
                    ApiError::bad_request("unknown_event", e.to_string())
                })?;
            if !events.iter().any(|e| e == event.as_str()) {
                events.push(event.as_str().to_owned());
            }
        }
        if events.is_empty() {
            // As with no events at all (and as the Rust client does).
            events.push(WebhookEvent::ConnectionSuccess.as_str().to_owned());
        }
        let secret = random_token(32)
            .map(|t| Secret::new(format!("whsec_{t}")))
            .map_err(|_| ApiError::internal("no randomness available"))?;
        let webhook_id = uuid4();
        let created_at = now_secs();
        let row = NewWebhook {
            webhook_id: webhook_id.clone(),
            llm_key_hash,
            url: reg.url.clone(),
            events: serde_json::to_string(&events).unwrap_or_else(|_| "[]".into()),
            secret: secret.clone(),
            created_at,
        };
        // Counted before it is stored, so that no event is skipped for it.
        s.webhooks.registering.fetch_add(1, Ordering::AcqRel);
        let stored = s.store.insert_webhook(row).await;
        if matches!(stored, Ok(true)) {
            s.webhooks.count.fetch_add(1, Ordering::AcqRel);
        }
        s.webhooks.registering.fetch_sub(1, Ordering::AcqRel);
        let stored = stored.map_err(db_error("store the webhook"))?;
        if !stored {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "too_many_webhooks",
                format!("An API key may register at most {MAX_WEBHOOKS_PER_KEY} webhooks; delete one first"),
            ));
        }
        tracing::info!(%webhook_id, events = ?events, "webhook registered");
        changed(&s).await;
        Ok(Webhook {
            webhook_id,
            url: reg.url,
            events,
            created_at: Some(rfc3339(created_at)),
            secret: Some(secret),
        })
    }
    .await;
    match result {
        Ok(w) => json_response(StatusCode::CREATED, &w),
        Err(e) => e.into_response(),
    }
}

/// `GET …/llm-client/webhooks/`: the caller's webhooks (without their
/// secrets), oldest first.
pub(crate) async fn list(
    State(s): State<Arc<crate::State>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let key = llm_key_of(&s, &headers, body).await?;
        s.store
            .list_webhooks(key)
            .await
            .map_err(db_error("read the webhooks"))
    }
    .await;
    match result {
        Ok(list) => json_response(StatusCode::OK, &list),
        Err(e) => e.into_response(),
    }
}

/// `DELETE …/llm-client/webhooks/{webhook_id}/delete/` (or GET or POST, as
/// the Python client sends): the caller's webhook and its waiting
/// deliveries are removed. 404 for another key's.
pub(crate) async fn delete(
    State(s): State<Arc<crate::State>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> Response {
    let result = async {
        let key = llm_key_of(&s, &headers, body).await?;
        let not_found = || ApiError::not_found("webhook_not_found", "Webhook not found");
        let Ok(Path(id)) = id else {
            return Err(not_found());
        };
        let deleted = s
            .store
            .delete_webhook(id.clone(), key)
            .await
            .map_err(db_error("delete the webhook"))?;
        if !deleted {
            return Err(not_found());
        }
        s.webhooks.decrement();
        tracing::info!(webhook_id = %id, "webhook deleted");
        changed(&s).await;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => json_response(StatusCode::OK, &Status::ok()),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        let base = Duration::from_millis(100);
        assert_eq!(backoff(base, 1), base);
        assert_eq!(backoff(base, 2), base * 2);
        assert_eq!(backoff(base, 4), base * 8);
        assert_eq!(backoff(base, 60), MAX_BACKOFF);
        assert_eq!(backoff(Duration::ZERO, 1), Duration::from_millis(1));
        for _ in 0..50 {
            let j = jitter(Duration::from_secs(8));
            assert!(
                j >= Duration::from_secs(4) && j <= Duration::from_secs(8),
                "{j:?}"
            );
        }
    }

    #[test]
    fn the_count_is_refreshed_and_never_wraps() {
        let w = Webhooks::new(0);
        assert!(!w.any(), "no webhooks: an event is free");
        w.refresh_count(2);
        assert!(w.any());
        w.decrement();
        w.decrement();
        assert!(!w.any());
        // Deleting a webhook another server registered (not counted here
        // yet) leaves the count at none, not at usize::MAX.
        w.decrement();
        assert_eq!(w.count.load(Ordering::Acquire), 0);
        // A registration under way counts whatever a re-read said.
        w.registering.fetch_add(1, Ordering::AcqRel);
        w.refresh_count(0);
        assert!(w.any());
    }

    #[tokio::test]
    async fn the_store_methods_run_on_sqlite() {
        let store = Store::memory();
        let hook = |id: &str, key: &str| NewWebhook {
            webhook_id: id.into(),
            llm_key_hash: key.into(),
            url: "http://127.0.0.1:9/".into(),
            events: r#"["toolkit_connected"]"#.into(),
            secret: Secret::new("s"),
            created_at: 5,
        };
        for (id, key) in [("w2", "k"), ("w1", "k"), ("w3", "other")] {
            assert!(store.insert_webhook(hook(id, key)).await.expect("insert"));
        }
        assert_eq!(store.count_webhooks().await.expect("count"), 3);
        let ids = |list: Vec<Webhook>| list.into_iter().map(|w| w.webhook_id).collect::<Vec<_>>();
        // Oldest first: in the order of registration within a second.
        assert_eq!(
            ids(store.list_webhooks("k".into()).await.expect("list")),
            ["w2", "w1"]
        );
        let all = store
            .subscribed_webhooks(WebhookEvent::ToolkitConnected, None)
            .await
            .expect("subscribed");
        assert_eq!(all.len(), 3);
        let targets = all.into_iter().map(|(id, _)| id).collect();
        let n = store
            .enqueue_deliveries(WebhookEvent::ToolkitConnected, targets, Value::Null)
            .await
            .expect("enqueue");
        assert_eq!(n, 3);
        let (lease, base) = (Duration::from_secs(60), Duration::from_secs(1));
        let (jobs, _) = store
            .claim_deliveries(8, vec!["w3".into()], lease, base)
            .await
            .expect("claim");
        assert_eq!(jobs.len(), 2, "w3 is busy");
        // The secret is sealed in the database, bound to its webhook.
        for job in &jobs {
            assert!(job.sealed_secret.starts_with("sealed:v1:"));
            let secret = store
                .keyring()
                .open(Field::WebhookSecret, &[&job.webhook_id], &job.sealed_secret)
                .expect("opens for its own webhook");
            assert_eq!(secret.expose(), "s");
        }
        let other = if jobs[0].webhook_id == "w1" {
            "w2"
        } else {
            "w1"
        };
        assert!(matches!(
            store
                .keyring()
                .open(Field::WebhookSecret, &[other], &jobs[0].sealed_secret),
            Err(crate::secrets::SecretsError::Unopenable { .. })
        ));
        let state = store
            .record_attempt(
                jobs[0].delivery_id.clone(),
                1,
                5,
                base,
                Outcome::Delivered(200),
            )
            .await
            .expect("record");
        assert_eq!(state, "delivered");
        assert!(
            store
                .delete_webhook("w1".into(), "k".into())
                .await
                .expect("delete")
        );
        assert!(
            !store
                .delete_webhook("w3".into(), "k".into())
                .await
                .expect("another key's")
        );
        assert_eq!(store.count_webhooks().await.expect("count"), 2);
        assert_eq!(store.prune_deliveries().await.expect("prune"), 0);
    }

    #[test]
    fn urls() {
        assert!(valid_url("https://example.com/hook?x=1"));
        assert!(valid_url("http://127.0.0.1:8080/"));
        assert!(!valid_url("ftp://example.com/"));
        assert!(!valid_url("http://"));
        assert!(!valid_url("https://exa mple.com/"));
        assert!(!valid_url(&format!(
            "https://e.com/{}",
            "a".repeat(MAX_URL_LEN)
        )));
    }

    #[test]
    fn presence_events_can_not_crowd_out_oauth_events() {
        let store = Store::memory();
        let ids = vec!["w1".to_owned()];
        let data = serde_json::json!({"toolkit_id": "t"});
        let (flood, oauth) = store
            .call_now(|c| {
                c.execute(
                    "INSERT INTO webhooks (webhook_id, llm_key_hash, url, events, secret, created_at)
                     VALUES ('w1', 'k', 'http://127.0.0.1:9/', '[]', 's', 0)",
                    [],
                )?;
                let mut flood = 0;
                for _ in 0..MAX_PENDING_PER_WEBHOOK + 5 {
                    flood += enqueue(c, WebhookEvent::ToolkitConnected, &ids, &data)?;
                }
                let oauth = enqueue(c, WebhookEvent::ConnectionSuccess, &ids, &data)?;
                Ok((flood, oauth))
            })
            .expect("enqueue");
        assert_eq!(
            flood,
            usize::try_from(MAX_PENDING_PER_WEBHOOK).expect("small")
        );
        assert_eq!(oauth, 1, "the OAuth event still gets in");
    }

    #[test]
    fn queue_claims_one_per_webhook_and_leases() {
        let store = Store::memory();
        store
            .call_now(|c| {
                for id in ["w1", "w2"] {
                    c.execute(
                        "INSERT INTO webhooks (webhook_id, llm_key_hash, url, events, secret, created_at)
                         VALUES (?1, 'k', 'http://127.0.0.1:9/', '[\"connection_success\"]', 's', 0)",
                        [id],
                    )?;
                }
                Ok(())
            })
            .expect("webhooks");
        let hooks = store
            .call_now(|c| subscribed(c, WebhookEvent::ConnectionSuccess, Some("k")))
            .expect("subscribed");
        assert_eq!(hooks.len(), 2);
        assert!(
            store
                .call_now(|c| subscribed(c, WebhookEvent::ConnectionFailed, None))
                .expect("subscribed")
                .is_empty()
        );
        let ids = vec!["w1".to_owned(), "w1".to_owned(), "w2".to_owned()];
        let data = serde_json::json!({"platform_id": "p"});
        let n = store
            .call_now(|c| enqueue(c, WebhookEvent::ConnectionSuccess, &ids, &data))
            .expect("enqueue");
        assert_eq!(n, 3);
        let lease = Duration::from_secs(60);
        let (jobs, next) = store
            .call_now(|c| claim(c, 8, &[], lease, Duration::from_secs(1)))
            .expect("claim");
        // One per webhook; the other delivery of w1 waits for w1's to end.
        assert_eq!(jobs.len(), 2);
        assert!(jobs.iter().all(|j| j.attempt == 1));
        assert!(next.is_none(), "w1's second waits for w1: {next:?}");
        let body: WebhookDelivery = serde_json::from_str(&jobs[0].body).expect("body");
        assert_eq!(body.delivery_id, jobs[0].delivery_id);
        assert_eq!(body.data["platform_id"], "p");
        // Leased: claimed again only once the lease runs out.
        let (again, next) = store
            .call_now(|c| claim(c, 8, &[], lease, Duration::from_secs(1)))
            .expect("claim");
        assert_eq!(again.len(), 1, "only w1's second delivery is free");
        assert!(next.is_some_and(|t| t > now_ms() + 50_000));
        let failed = Outcome::Failed(Some(500), "HTTP 500".into());
        let state = store
            .call_now(|c| record(c, &jobs[0].delivery_id, 1, 1, Duration::ZERO, &failed))
            .expect("record");
        assert_eq!(state, "failed");
        let delivered = Outcome::Delivered(200);
        let state = store
            .call_now(|c| record(c, &jobs[1].delivery_id, 1, 5, Duration::ZERO, &delivered))
            .expect("record");
        assert_eq!(state, "delivered");
        assert_eq!(store.call_now(prune).expect("prune"), 0);
    }
}
