//! Many servers, one platform: servers that share a PostgreSQL database
//! route work to each other over NATS (docs/DEPLOY.md).
//!
//! # Subjects
//!
//! - `atp.live.{key_hash}` and `atp.kit.{key_hash}` (queue group
//!   `atp-holders`): tool calls and app starts for a toolkit key. A server
//!   subscribes to `live` while a WebSocket of the key, or a waiting inbox
//!   poll, is connected to it, and to `kit` while the key counts as
//!   connected there at all (an inbox polled lately). A caller asks `live`
//!   first, then `kit`; the queue group hands each call to one server
//!   only, so a toolkit connected to two servers runs each call once.
//! - `atp.i.{server}.{…}`: one server's own subjects: `r.{rid}` carries
//!   progress and the answer of a call back to the server whose caller
//!   waits; `app` takes the actions and terminates of the app sessions
//!   the server holds (a session id begins with its server's id); `inbox`
//!   takes an inbox answer posted to another server.
//! - `atp.hb`: every server's heartbeat, each second, with the toolkit
//!   keys connected to it.
//! - `atp.changed`: a registration or the webhooks changed (re-read them
//!   from the database).
//!
//! # A call across servers
//!
//! The caller's server sends the call as a NATS request; the holding
//! server answers it at once (“accepted”, with its id), runs the call on
//! its toolkit connection, and publishes the toolkit's progress and its
//! answer to the caller's `r.{rid}`. While it waits, the caller's server
//! watches the holder's heartbeat: a holder silent for
//! [`PEER_SILENCE`] (killed, cut off) gets its callers answered
//! `toolkit_disconnected` then, not at the task timeout.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    time::{Duration, Instant},
};

use async_nats::{Client, Message, RequestErrorKind, Subscriber};
use atp_registry::{
    LogLevel, Secret,
    trace::TraceContext,
    wire::{ProgressBody, SessionAction},
};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    State,
    audit::Via,
    config::{Config, NatsUrl},
    error::ServerError,
    hub::{Answer, Report, RouteError, ToolRequest},
};

/// How often a server says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A server not heard from for this long is taken for dead.
pub(crate) const PEER_SILENCE: Duration = Duration::from_secs(3);
/// How long a holding server has to accept a call.
const ACCEPT_WITHIN: Duration = Duration::from_secs(3);
/// How often everything is re-read from the database (a missed
/// `atp.changed` heals within this).
const RESYNC: Duration = Duration::from_secs(30);
/// Messages waiting for one caller (progress beyond it is dropped).
const REPLY_BUFFER: usize = 64;
/// The queue group of the servers holding a toolkit.
const HOLDERS: &str = "atp-holders";

/// What a server sends another.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Work {
    /// A tool call; its progress (if `progress`) and answer go to `reply`.
    Call {
        reply: String,
        app: String,
        key_hash: String,
        tool_name: String,
        params: Map<String, Value>,
        auth_token: Option<Secret>,
        timeout_ms: u64,
        progress: bool,
        /// Whether the caller reads log messages (older servers send
        /// none: absent is `false`).
        #[serde(default)]
        logs: bool,
        /// The trace context for the toolkit (older servers send none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
        /// Its `tracestate`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tracestate: Option<String>,
    },
    /// An app session's start; the answer goes to `reply`.
    AppStart {
        reply: String,
        llm_key_hash: String,
        app: String,
        key_hash: String,
        tool_name: String,
        params: Map<String, Value>,
        auth_token: Option<Secret>,
        timeout_ms: u64,
        /// The trace context for the toolkit (older servers send none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
        /// Its `tracestate`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tracestate: Option<String>,
    },
    /// An action in a session; the answer goes to `reply`.
    AppAction {
        reply: String,
        llm_key_hash: String,
        session_id: String,
        action_data: Value,
        timeout_ms: u64,
        /// How the action came in, for the holder's audit row.
        #[serde(default)]
        via: Option<Via>,
        /// The caller's trace context (older servers send none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
        /// Its `tracestate`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tracestate: Option<String>,
    },
    /// A session's end (answered at once).
    AppTerminate {
        llm_key_hash: String,
        session_id: String,
    },
    /// An answer a toolkit posted to another server's inbox endpoint
    /// (answered at once: whether a request took it).
    InboxAnswer {
        key_hash: String,
        request_id: String,
        result: Result<Value, (Option<String>, String)>,
        terminated: bool,
    },
}

/// The immediate answer to a [`Work`] request.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Ack {
    /// The call runs on server `holder`; its answer comes on the reply
    /// subject.
    Accepted { holder: String },
    /// Done at once (terminate, inbox answer).
    Done { ok: bool, error: Option<WireError> },
}

/// What comes back on a caller's reply subject.
#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Back {
    Progress { progress: ProgressBody },
    Log { level: LogLevel, data: Value },
    Answer { outcome: Result<Done, WireError> },
}

impl From<Report> for Back {
    fn from(report: Report) -> Self {
        match report {
            Report::Progress(progress) => Back::Progress { progress },
            Report::Log { level, data } => Back::Log { level, data },
        }
    }
}

/// A successful answer.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Done {
    App {
        session_id: String,
        ui: Value,
        terminated: bool,
    },
    Ui {
        ui: Value,
        terminated: bool,
    },
    Value {
        value: Value,
    },
}

/// A [`RouteError`] on the bus.
#[derive(Debug, Serialize, Deserialize)]
struct WireError {
    code: String,
    message: String,
    /// A rate limit's `Retry-After`, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

impl From<&RouteError> for WireError {
    fn from(e: &RouteError) -> Self {
        let retry_after_ms = match e {
            RouteError::Limited { retry_after, .. } => retry_after.map(millis),
            _ => None,
        };
        Self {
            code: e.code().to_owned(),
            message: e.to_string(),
            retry_after_ms,
        }
    }
}

impl WireError {
    /// The error again, as the caller's server reports it. The holder
    /// shutting down is, for this caller, its toolkit going away.
    fn into_route(self, app: &str) -> RouteError {
        match self.code.as_str() {
            "toolkit_not_connected" => RouteError::NotConnected(app.to_owned()),
            "toolkit_disconnected" | "server_shutting_down" => RouteError::Disconnected,
            "session_not_found" => RouteError::SessionNotFound,
            "session_ended" => RouteError::SessionEnded(self.message),
            "session_busy" => RouteError::SessionBusy,
            "rate_limited" | "payload_too_large" => RouteError::Limited {
                code: self.code,
                message: self.message,
                retry_after: self.retry_after_ms.map(Duration::from_millis),
            },
            _ => RouteError::Failed {
                code: self.code,
                message: self.message,
            },
        }
    }
}

/// A heartbeat: who is alive and which toolkit keys it serves.
#[derive(Serialize, Deserialize)]
struct Heartbeat {
    id: String,
    served: Vec<String>,
}

/// A change to re-read from the database.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Changed {
    Toolkit { from: String, app_name: String },
    Webhooks { from: String },
}

struct Peer {
    seen: Instant,
    served: HashSet<String>,
}

/// The subscriptions of the toolkit keys this server serves.
#[derive(Default)]
struct Holding {
    live: HashMap<String, JoinHandle<()>>,
    kit: HashMap<String, JoinHandle<()>>,
}

/// This server's connection to the others.
pub(crate) struct Bus {
    client: Client,
    id: String,
    peers: Mutex<HashMap<String, Peer>>,
    waiters: Mutex<HashMap<String, mpsc::Sender<Back>>>,
    holding: Mutex<Holding>,
    max_payload: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn json<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Bus {
    /// Connects to NATS. Later outages are ridden out: the client
    /// reconnects (within a second of NATS being back) and subscribes
    /// again; meanwhile calls across servers fail with `bus_unavailable`.
    pub async fn connect(url: &NatsUrl, config: &Config) -> Result<Self, ServerError> {
        let id = data_encoding::HEXLOWER.encode(
            &crate::keys::random_bytes(8)
                .map_err(|_| ServerError::Bus("no randomness for a server id".into()))?,
        );
        let client = async_nats::ConnectOptions::new()
            .name(format!("atp-server {id}"))
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(ACCEPT_WITHIN))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64).saturating_mul(100).min(1000))
            })
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS disconnected: reconnecting")
                    }
                    other => tracing::warn!("NATS: {other}"),
                }
            })
            .connect(url.0.as_str())
            .await
            .map_err(|e| ServerError::Bus(format!("can not connect to NATS: {e}")))?;
        let max_payload = client.server_info().max_payload;
        if max_payload < config.max_message_size {
            tracing::warn!(
                max_payload,
                max_message_size = config.max_message_size,
                "NATS max_payload is below max_message_size: larger results can not cross between servers (raise max_payload, see docs/DEPLOY.md)"
            );
        }
        tracing::info!(server = %id, "joined the other servers over NATS");
        Ok(Self {
            client,
            id,
            peers: Mutex::default(),
            waiters: Mutex::default(),
            holding: Mutex::default(),
            max_payload,
        })
    }

    /// This server's id (the prefix of its request and session ids).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Starts the heartbeat, the listeners and the subscription keeper.
    pub fn start(&self, s: &Arc<State>) {
        let weak = Arc::downgrade(s);
        tokio::spawn(own_subjects(
            weak.clone(),
            self.client.clone(),
            self.id.clone(),
        ));
        tokio::spawn(heartbeats(weak.clone(), self.client.clone()));
        tokio::spawn(changes(weak.clone(), self.client.clone()));
        tokio::spawn(keeper(weak, s.hub.subscribe(), s.shutdown.subscribe()));
    }

    /// Whether NATS answers now (`GET /ready`).
    pub async fn ready(&self, bound: Duration) -> Result<(), String> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err("NATS is not connected".into());
        }
        match tokio::time::timeout(bound, self.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("NATS: {e}")),
            Err(_) => Err(format!("NATS did not answer within {} s", bound.as_secs())),
        }
    }

    /// Whether another live server serves this toolkit key.
    pub fn served_elsewhere(&self, key_hash: &str) -> bool {
        lock(&self.peers)
            .values()
            .any(|p| p.seen.elapsed() < PEER_SILENCE && p.served.contains(key_hash))
    }

    /// The id of another live server that serves this toolkit key, if
    /// one does (for the console).
    pub fn serving_peer(&self, key_hash: &str) -> Option<String> {
        lock(&self.peers)
            .iter()
            .find(|(_, p)| p.seen.elapsed() < PEER_SILENCE && p.served.contains(key_hash))
            .map(|(id, _)| id.clone())
    }

    fn alive(&self, server: &str) -> bool {
        lock(&self.peers)
            .get(server)
            .is_some_and(|p| p.seen.elapsed() < PEER_SILENCE)
    }

    fn saw(&self, server: &str) {
        let mut peers = lock(&self.peers);
        let p = peers.entry(server.to_owned()).or_insert_with(|| Peer {
            seen: Instant::now(),
            served: HashSet::new(),
        });
        p.seen = Instant::now();
    }

    /// The server an id (request or session) was made on, if another.
    pub fn holder_of<'a>(&self, id: &'a str) -> Option<&'a str> {
        let (server, _) = id.split_once('.')?;
        (server != self.id).then_some(server)
    }

    /// Tells the other servers to re-read a toolkit's registration.
    pub async fn toolkit_changed(&self, app_name: &str) {
        self.announce(&Changed::Toolkit {
            from: self.id.clone(),
            app_name: app_name.to_owned(),
        })
        .await;
    }

    /// Tells the other servers to re-read the webhooks.
    pub async fn webhooks_changed(&self) {
        self.announce(&Changed::Webhooks {
            from: self.id.clone(),
        })
        .await;
    }

    async fn announce(&self, c: &Changed) {
        let sent = tokio::time::timeout(ACCEPT_WITHIN, self.client.publish("atp.changed", json(c)));
        if !matches!(sent.await, Ok(Ok(()))) {
            tracing::warn!(
                "could not tell the other servers of a change (they re-read everything every {} s)",
                RESYNC.as_secs()
            );
        }
    }

    /// Sends `work` to the servers holding `key_hash` (live ones first);
    /// returns the reply channel and the holder.
    async fn send_to_holder(
        &self,
        app: &str,
        key_hash: &str,
        rid: &str,
        work: Work,
    ) -> Result<(mpsc::Receiver<Back>, String), RouteError> {
        let rx = self.expect(rid);
        let body = json(&work);
        for subject in [
            format!("atp.live.{key_hash}"),
            format!("atp.kit.{key_hash}"),
        ] {
            match self.ask(&subject, body.clone()).await {
                Ok(Ack::Accepted { holder }) => {
                    self.saw(&holder);
                    return Ok((rx, holder));
                }
                Ok(Ack::Done { .. }) => break,
                Err(Asked::NoOne) => continue,
                Err(Asked::Failed(e)) => {
                    self.forget(rid);
                    return Err(e);
                }
            }
        }
        self.forget(rid);
        Err(RouteError::NotConnected(app.to_owned()))
    }

    /// A NATS request, its ack read.
    async fn ask(&self, subject: &str, body: Bytes) -> Result<Ack, Asked> {
        if body.len() > self.max_payload {
            return Err(Asked::Failed(too_large(body.len(), self.max_payload)));
        }
        match self.client.request(subject.to_owned(), body).await {
            Ok(m) => serde_json::from_slice(&m.payload).map_err(|_| {
                Asked::Failed(RouteError::Unavailable(
                    "a server sent an unreadable answer".into(),
                ))
            }),
            Err(e) if e.kind() == RequestErrorKind::NoResponders => Err(Asked::NoOne),
            Err(e) if e.kind() == RequestErrorKind::TimedOut => {
                Err(Asked::Failed(RouteError::Unavailable(
                    "the server holding the toolkit did not accept the call in time".into(),
                )))
            }
            Err(e) => Err(Asked::Failed(RouteError::Unavailable(format!("NATS: {e}")))),
        }
    }

    fn expect(&self, rid: &str) -> mpsc::Receiver<Back> {
        let (tx, rx) = mpsc::channel(REPLY_BUFFER);
        lock(&self.waiters).insert(rid.to_owned(), tx);
        rx
    }

    fn forget(&self, rid: &str) {
        lock(&self.waiters).remove(rid);
    }

    fn reply_subject(&self, rid: &str) -> String {
        format!("atp.i.{}.r.{rid}", self.id)
    }

    /// Waits for the answer from `holder`: at most `timeout` (plus a
    /// margin for the hop), and only while `holder` is alive.
    async fn wait(
        &self,
        rid: &str,
        mut rx: mpsc::Receiver<Back>,
        holder: &str,
        timeout: Duration,
        progress: Option<&mpsc::Sender<Report>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Done, RouteError> {
        struct Forget<'a>(&'a Bus, &'a str);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.forget(self.1);
            }
        }
        let _forget = Forget(self, rid);
        let deadline = tokio::time::Instant::now() + timeout + ACCEPT_WITHIN;
        let mut check = tokio::time::interval(HEARTBEAT / 2);
        loop {
            tokio::select! {
                back = rx.recv() => match back {
                    Some(Back::Progress { progress: p }) => {
                        if let Some(tx) = progress {
                            let _ = tx.try_send(Report::Progress(p));
                        }
                    }
                    Some(Back::Log { level, data }) => {
                        if let Some(tx) = progress {
                            let _ = tx.try_send(Report::Log { level, data });
                        }
                    }
                    Some(Back::Answer { outcome }) => return outcome.map_err(|e| e.into_route(holder)),
                    None => return Err(RouteError::Disconnected),
                },
                _ = check.tick() => {
                    if !self.alive(holder) {
                        tracing::warn!(server = %holder, "the server holding the toolkit went silent: answering toolkit_disconnected");
                        return Err(RouteError::Disconnected);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Err(RouteError::Timeout(timeout)),
                _ = crate::stopped(shutdown) => return Err(RouteError::ShuttingDown),
            }
        }
    }

    /// Runs a tool call on the server holding its toolkit.
    pub async fn call(
        &self,
        s: &State,
        app: &str,
        key_hash: &str,
        request: &ToolRequest,
        timeout: Duration,
        progress: Option<mpsc::Sender<Report>>,
    ) -> Result<Value, RouteError> {
        let rid = crate::keys::uuid4();
        let (traceparent, tracestate) = TraceContext::into_fields(request.trace.clone());
        let work = Work::Call {
            reply: self.reply_subject(&rid),
            app: app.to_owned(),
            key_hash: key_hash.to_owned(),
            tool_name: request.tool_name.clone(),
            params: request.params.clone(),
            auth_token: request.auth_token.clone(),
            timeout_ms: millis(timeout),
            progress: progress.is_some(),
            logs: request.logs,
            traceparent,
            tracestate,
        };
        let (rx, holder) = self.send_to_holder(app, key_hash, &rid, work).await?;
        let mut shutdown = s.shutdown.subscribe();
        match self
            .wait(&rid, rx, &holder, timeout, progress.as_ref(), &mut shutdown)
            .await?
        {
            Done::Value { value } => Ok(value),
            _ => Err(RouteError::Unavailable(
                "a server sent an unexpected answer".into(),
            )),
        }
    }

    /// Starts an app session on the server holding its toolkit.
    pub async fn start_app(
        &self,
        s: &State,
        llm_key_hash: &str,
        app: &str,
        key_hash: &str,
        request: &ToolRequest,
        timeout: Duration,
    ) -> Result<(String, Value, bool), RouteError> {
        let rid = crate::keys::uuid4();
        let (traceparent, tracestate) = TraceContext::into_fields(request.trace.clone());
        let work = Work::AppStart {
            reply: self.reply_subject(&rid),
            llm_key_hash: llm_key_hash.to_owned(),
            app: app.to_owned(),
            key_hash: key_hash.to_owned(),
            tool_name: request.tool_name.clone(),
            params: request.params.clone(),
            auth_token: request.auth_token.clone(),
            timeout_ms: millis(timeout),
            traceparent,
            tracestate,
        };
        let (rx, holder) = self.send_to_holder(app, key_hash, &rid, work).await?;
        let mut shutdown = s.shutdown.subscribe();
        match self
            .wait(&rid, rx, &holder, timeout, None, &mut shutdown)
            .await?
        {
            Done::App {
                session_id,
                ui,
                terminated,
            } => Ok((session_id, ui, terminated)),
            _ => Err(RouteError::Unavailable(
                "a server sent an unexpected answer".into(),
            )),
        }
    }

    /// Sends an action to the session's server (answered within the
    /// task timeout).
    pub async fn app_action(
        &self,
        s: &State,
        holder: &str,
        llm_key_hash: &str,
        via: Via,
        action: SessionAction,
        trace: Option<TraceContext>,
    ) -> Result<(Value, bool), RouteError> {
        let timeout = s.config.task_timeout;
        let rid = crate::keys::uuid4();
        let rx = self.expect(&rid);
        let (traceparent, tracestate) = TraceContext::into_fields(trace);
        let work = Work::AppAction {
            reply: self.reply_subject(&rid),
            llm_key_hash: llm_key_hash.to_owned(),
            session_id: action.session_id,
            action_data: action.action_data,
            timeout_ms: millis(timeout),
            via: Some(via),
            traceparent,
            tracestate,
        };
        let holder = match self.ask(&format!("atp.i.{holder}.app"), json(&work)).await {
            Ok(Ack::Accepted { holder }) => holder,
            Ok(Ack::Done { error, .. }) => {
                self.forget(&rid);
                return Err(error.map_or(RouteError::SessionNotFound, |e| e.into_route("")));
            }
            Err(e) => {
                self.forget(&rid);
                return Err(e.for_session());
            }
        };
        self.saw(&holder);
        let mut shutdown = s.shutdown.subscribe();
        match self
            .wait(&rid, rx, &holder, timeout, None, &mut shutdown)
            .await?
        {
            Done::Ui { ui, terminated } => Ok((ui, terminated)),
            _ => Err(RouteError::Unavailable(
                "a server sent an unexpected answer".into(),
            )),
        }
    }

    /// Ends a session on its server.
    pub async fn app_terminate(
        &self,
        holder: &str,
        llm_key_hash: &str,
        session_id: &str,
    ) -> Result<(), RouteError> {
        let work = Work::AppTerminate {
            llm_key_hash: llm_key_hash.to_owned(),
            session_id: session_id.to_owned(),
        };
        match self.ask(&format!("atp.i.{holder}.app"), json(&work)).await {
            Ok(Ack::Done { ok: true, .. }) => Ok(()),
            Ok(Ack::Done { error: Some(e), .. }) => Err(e.into_route("")),
            Ok(_) => Err(RouteError::SessionNotFound),
            Err(e) => Err(e.for_session()),
        }
    }

    /// Hands an inbox answer to the server whose request it answers.
    /// Whether a request there took it.
    pub async fn inbox_answer(
        &self,
        holder: &str,
        key_hash: &str,
        request_id: &str,
        result: Answer,
        terminated: bool,
    ) -> bool {
        let work = Work::InboxAnswer {
            key_hash: key_hash.to_owned(),
            request_id: request_id.to_owned(),
            result,
            terminated,
        };
        matches!(
            self.ask(&format!("atp.i.{holder}.inbox"), json(&work))
                .await,
            Ok(Ack::Done { ok: true, .. })
        )
    }

    /// Makes the toolkit-key subscriptions match what this server serves.
    /// A new subscription is queued on the connection before this
    /// returns, so NATS knows it before the heartbeat that announces the
    /// key (both travel on the one connection, in order).
    async fn keep(&self, s: &Arc<State>) {
        let (live, served) = s.hub.served_keys();
        let mut wanted = Vec::new();
        let mut dropped = false;
        {
            let mut guard = lock(&self.holding);
            let Holding {
                live: live_subs,
                kit: kit_subs,
            } = &mut *guard;
            for (kind, want, have) in [("live", &live, live_subs), ("kit", &served, kit_subs)] {
                have.retain(|key, task| {
                    let keep = want.contains(key) && !task.is_finished();
                    if !keep {
                        task.abort();
                        dropped = true;
                    }
                    keep
                });
                wanted.extend(
                    want.iter()
                        .filter(|key| !have.contains_key(*key))
                        .map(|key| (kind, key.clone())),
                );
            }
        }
        let changed = dropped || !wanted.is_empty();
        for (kind, key) in wanted {
            let subject = format!("atp.{kind}.{key}");
            let sub = match self
                .client
                .queue_subscribe(subject.clone(), HOLDERS.into())
                .await
            {
                Ok(sub) => sub,
                Err(e) => {
                    tracing::warn!(%subject, "could not subscribe: {e}");
                    continue;
                }
            };
            let task = tokio::spawn(serve(Arc::downgrade(s), self.client.clone(), sub));
            let mut guard = lock(&self.holding);
            let have = if kind == "live" {
                &mut guard.live
            } else {
                &mut guard.kit
            };
            if let Some(old) = have.insert(key, task) {
                old.abort();
            }
        }
        // The others learn of a change at once, not at the next beat.
        if changed {
            let body = self.heartbeat(s);
            let _ = tokio::time::timeout(HEARTBEAT, self.client.publish("atp.hb", body)).await;
        }
    }

    /// This server's heartbeat.
    fn heartbeat(&self, s: &State) -> Bytes {
        let (_, served) = s.hub.served_keys();
        json(&Heartbeat {
            id: self.id.clone(),
            served: served.into_iter().collect(),
        })
    }
}

enum Asked {
    /// No server listens there.
    NoOne,
    Failed(RouteError),
}

impl Asked {
    /// For a session: its server gone means the session is gone.
    fn for_session(self) -> RouteError {
        match self {
            Asked::NoOne => RouteError::SessionEnded(
                "The app session has ended: the server holding it is gone".into(),
            ),
            Asked::Failed(e) => e,
        }
    }
}

fn too_large(n: usize, max: usize) -> RouteError {
    RouteError::Failed {
        code: "payload_too_large".into(),
        message: format!(
            "{n} bytes can not cross between servers: NATS max_payload is {max} (see docs/DEPLOY.md)"
        ),
    }
}

/// This server's own subjects.
async fn own_subjects(s: Weak<State>, client: Client, id: String) {
    let sub = match client.subscribe(format!("atp.i.{id}.>")).await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!("could not subscribe to this server's subjects: {e}");
            return;
        }
    };
    serve(s, client, sub).await;
}

/// Handles the messages of a subscription.
async fn serve(s: Weak<State>, client: Client, mut sub: Subscriber) {
    while let Some(msg) = sub.next().await {
        let Some(state) = s.upgrade() else {
            return;
        };
        handle(&state, &client, msg).await;
    }
}

async fn handle(s: &Arc<State>, client: &Client, msg: Message) {
    let Some(bus) = &s.bus else {
        return;
    };
    let subject = msg.subject.as_str();
    // A reply for one of this server's callers.
    if let Some(rid) = subject
        .strip_prefix("atp.i.")
        .and_then(|r| r.split_once(".r."))
        .map(|(_, rid)| rid)
    {
        let Ok(back) = serde_json::from_slice::<Back>(&msg.payload) else {
            return;
        };
        let tx = lock(&bus.waiters).get(rid).cloned();
        if let Some(tx) = tx {
            match back {
                // Progress and logs never hold anything up.
                Back::Progress { .. } | Back::Log { .. } => {
                    let _ = tx.try_send(back);
                }
                // The answer always gets through (the caller reads on).
                Back::Answer { .. } => {
                    let _ = tokio::time::timeout(ACCEPT_WITHIN, tx.send(back)).await;
                }
            }
        }
        return;
    }
    let Some(reply) = msg.reply.clone() else {
        return;
    };
    let work = match serde_json::from_slice::<Work>(&msg.payload) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("an unreadable message from another server: {e}");
            return;
        }
    };
    let ack = |a: Ack| {
        let client = client.clone();
        let reply = reply.clone();
        async move {
            let _ = client.publish(reply, json(&a)).await;
        }
    };
    match work {
        Work::AppTerminate {
            llm_key_hash,
            session_id,
        } => {
            let done = s.hub.app_terminate(&llm_key_hash, &session_id);
            ack(Ack::Done {
                ok: done.is_ok(),
                error: done.err().as_ref().map(WireError::from),
            })
            .await;
        }
        Work::InboxAnswer {
            key_hash,
            request_id,
            result,
            terminated,
        } => {
            let ok = s
                .hub
                .inbox_answer(&key_hash, &request_id, result, terminated);
            ack(Ack::Done { ok, error: None }).await;
        }
        work => {
            ack(Ack::Accepted {
                holder: bus.id.clone(),
            })
            .await;
            tokio::spawn(run(s.clone(), client.clone(), work));
        }
    }
}

/// Runs a call, start or action for another server and sends it the
/// progress and the answer.
async fn run(s: Arc<State>, client: Client, work: Work) {
    let max_payload = s.bus.as_ref().map_or(usize::MAX, |b| b.max_payload);
    let send = |reply: String, back: Back| {
        let client = client.clone();
        async move {
            let mut body = json(&back);
            if body.len() > max_payload && matches!(back, Back::Answer { .. }) {
                let e = too_large(body.len(), max_payload);
                body = json(&Back::Answer {
                    outcome: Err(WireError::from(&e)),
                });
            }
            if let Err(e) = client.publish(reply, body).await {
                tracing::warn!("could not send an answer to another server: {e}");
            }
        }
    };
    match work {
        Work::Call {
            reply,
            app,
            key_hash,
            tool_name,
            params,
            auth_token,
            timeout_ms,
            progress,
            logs,
            traceparent,
            tracestate,
        } => {
            let request = ToolRequest {
                tool_name,
                params,
                auth_token,
                logs,
                trace: TraceContext::from_fields(traceparent.as_deref(), tracestate.as_deref()),
            };
            let (tx, mut rx) = mpsc::channel(crate::hub::PROGRESS_BUFFER);
            let work = s.hub.dispatch(
                &app,
                &key_hash,
                &request,
                Duration::from_millis(timeout_ms),
                progress.then_some(tx),
            );
            tokio::pin!(work);
            let outcome = loop {
                tokio::select! {
                    biased;
                    Some(r) = rx.recv() => send(reply.clone(), Back::from(r)).await,
                    answer = &mut work => break answer,
                }
            };
            while let Ok(r) = rx.try_recv() {
                send(reply.clone(), Back::from(r)).await;
            }
            let outcome = outcome
                .map(|value| Done::Value { value })
                .map_err(|e| WireError::from(&e));
            send(reply, Back::Answer { outcome }).await;
        }
        Work::AppStart {
            reply,
            llm_key_hash,
            app,
            key_hash,
            tool_name,
            params,
            auth_token,
            timeout_ms,
            traceparent,
            tracestate,
        } => {
            let request = ToolRequest {
                tool_name,
                params,
                auth_token,
                logs: false,
                trace: TraceContext::from_fields(traceparent.as_deref(), tracestate.as_deref()),
            };
            crate::hub::ensure_sweeper(&s);
            let outcome = s
                .hub
                .start_app(
                    &llm_key_hash,
                    &app,
                    &key_hash,
                    &request,
                    Duration::from_millis(timeout_ms),
                )
                .await
                .map(|(session_id, ui, terminated)| Done::App {
                    session_id,
                    ui,
                    terminated,
                })
                .map_err(|e| WireError::from(&e));
            send(reply, Back::Answer { outcome }).await;
        }
        Work::AppAction {
            reply,
            llm_key_hash,
            session_id,
            action_data,
            timeout_ms,
            via,
            traceparent,
            tracestate,
        } => {
            let outcome = crate::llm::act(
                &s,
                &llm_key_hash,
                via.unwrap_or(Via::LlmWebsocket),
                SessionAction {
                    session_id,
                    action_data,
                },
                TraceContext::from_fields(traceparent.as_deref(), tracestate.as_deref()),
                Duration::from_millis(timeout_ms),
            )
            .await
            .map(|(ui, terminated)| Done::Ui { ui, terminated })
            .map_err(|f| WireError::from(&RouteError::from(f)));
            send(reply, Back::Answer { outcome }).await;
        }
        Work::AppTerminate { .. } | Work::InboxAnswer { .. } => {}
    }
}

/// Sends this server's heartbeat each second; reads the others'.
async fn heartbeats(s: Weak<State>, client: Client) {
    let mut sub = match client.subscribe("atp.hb").await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!("could not subscribe to heartbeats: {e}");
            return;
        }
    };
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(state) = s.upgrade() else { return };
                let Some(bus) = &state.bus else { return };
                if *state.shutdown.borrow() {
                    return;
                }
                let body = bus.heartbeat(&state);
                let _ = tokio::time::timeout(HEARTBEAT, client.publish("atp.hb", body)).await;
                // Forget the servers silent for long.
                lock(&bus.peers).retain(|_, p| p.seen.elapsed() < PEER_SILENCE * 10);
            }
            msg = sub.next() => {
                let Some(msg) = msg else { return };
                let Some(state) = s.upgrade() else { return };
                let Some(bus) = &state.bus else { return };
                let Ok(hb) = serde_json::from_slice::<Heartbeat>(&msg.payload) else { continue };
                if hb.id == bus.id {
                    continue;
                }
                let changed = {
                    let mut peers = lock(&bus.peers);
                    let served: HashSet<String> = hb.served.into_iter().collect();
                    let p = peers.entry(hb.id).or_insert_with(|| Peer { seen: Instant::now(), served: HashSet::new() });
                    p.seen = Instant::now();
                    let changed = p.served != served;
                    p.served = served;
                    changed
                };
                if changed {
                    state.hub.touch();
                }
            }
        }
    }
}

/// Re-reads what other servers changed; everything every [`RESYNC`].
async fn changes(s: Weak<State>, client: Client) {
    let mut sub = match client.subscribe("atp.changed").await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!("could not subscribe to changes: {e}");
            return;
        }
    };
    let mut tick = tokio::time::interval(RESYNC);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(state) = s.upgrade() else { return };
                crate::reload_toolkits(&state).await;
                crate::webhooks::reload(&state).await;
            }
            msg = sub.next() => {
                let Some(msg) = msg else { return };
                let Some(state) = s.upgrade() else { return };
                let Some(bus) = &state.bus else { return };
                match serde_json::from_slice::<Changed>(&msg.payload) {
                    Ok(Changed::Toolkit { from, app_name }) if from != bus.id => {
                        crate::reload_toolkit(&state, &app_name).await;
                    }
                    Ok(Changed::Webhooks { from }) if from != bus.id => {
                        crate::webhooks::reload(&state).await;
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Keeps the toolkit-key subscriptions in step with the hub (on every
/// change, and each heartbeat for inboxes that lapse by time).
async fn keeper(
    s: Weak<State>,
    mut changes: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = changes.changed() => if r.is_err() { return },
            _ = crate::stopped(&mut shutdown) => {
                // Stop taking calls at once: the toolkits are going.
                if let Some(state) = s.upgrade()
                    && let Some(bus) = &state.bus
                {
                    let mut guard = lock(&bus.holding);
                    let Holding { live, kit } = &mut *guard;
                    for (_, t) in live.drain().chain(kit.drain()) {
                        t.abort();
                    }
                }
                return;
            }
        }
        let Some(state) = s.upgrade() else { return };
        if let Some(bus) = &state.bus {
            bus.keep(&state).await;
        }
    }
}
