//! Routing tool requests to toolkits and their answers back: the live
//! toolkit WebSockets, the HTTP inboxes, the requests in flight, and the
//! interactive app sessions (docs/PROTOCOL.md §9).
//!
//! Every request gets a fresh server-side id, so two LLM clients that use
//! the same `request_id` can never get each other's answers, and an answer
//! is only taken from the connection (or the API key's inbox) the request
//! was sent to.
//!
//! # App sessions
//!
//! A session lives on the connection its `atp_app_request` went to: one
//! toolkit WebSocket (the key's newest), or the key's inbox. Its id —
//! server-made from 24 random bytes, so unguessable — is the `request_id`
//! of every message of the session in both directions: the wire has no
//! per-action id. Hence the rules:
//!
//! - A session has at most one toolkit request outstanding. A second
//!   `app_action` while one waits is refused at once with `session_busy`
//!   (queueing it would tie up a caller for an answer that may never
//!   come, and the two answers could not be told apart anyway).
//! - A request the toolkit does not answer within the timeout ends the
//!   session (the toolkit is told with `atp_app_terminate`): its late
//!   answer would otherwise be read as the answer to the next action.
//! - A request whose caller went away (an HTTP client that hung up) stays
//!   outstanding, orphaned, until its answer comes (and is dropped) or
//!   its deadline passes (then the session ends as timed out); an
//!   orphaned inbox request that no poll took yet is withdrawn instead.
//! - A session ends when its WebSocket closes, when its inbox is no
//!   longer polled, when terminated, when the app says so
//!   (`"terminated": true`), or after an hour unused. Ended sessions are
//!   remembered (an hour, at most [`MAX_ENDED`]) so that later requests
//!   get `session_ended` with the reason rather than `session_not_found`.
//! - A session belongs to the LLM key that started it: for any other key
//!   it does not exist (`session_not_found`, ended or not).
//! - A terminate is not answered by the toolkit (the Python toolkit never
//!   does): it is sent, and the session is over at once.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use atp_registry::{
    LogLevel, Secret,
    trace::TraceContext,
    wire::{self, ProgressBody, RequestId, ServerToToolkit},
};
use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::{keys::uuid4, metrics::Transport};

/// How many progress reports of one request may wait for a slow reader;
/// more are dropped (progress never holds up the answer).
pub(crate) const PROGRESS_BUFFER: usize = 64;
/// The most live app sessions one LLM key may have.
pub(crate) const MAX_SESSIONS_PER_KEY: usize = 1000;
/// A session nobody used for this long ends.
const SESSION_IDLE: Duration = Duration::from_secs(3600);
/// How long an ended session is remembered.
const ENDED_MEMORY: Duration = Duration::from_secs(3600);
/// How many ended sessions are remembered at most (the oldest go first).
pub(crate) const MAX_ENDED: usize = 10_000;
/// The most `atp_app_terminate` notes one inbox holds for its toolkit.
const MAX_INBOX_NOTES: usize = 1024;

/// Why a routed request got no result from the toolkit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RouteError {
    #[error("Toolkit {0} is not connected")]
    NotConnected(String),
    #[error("The toolkit disconnected before answering")]
    Disconnected,
    #[error("The toolkit did not answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("The server is shutting down")]
    ShuttingDown,
    #[error("The toolkit's endpoint failed: {0}")]
    Endpoint(String),
    /// The toolkit answered with a failure (its code, or `tool_error`).
    #[error("{message}")]
    Failed { code: String, message: String },
    #[error("No app session with that id")]
    SessionNotFound,
    /// The session is over; the message says why.
    #[error("{0}")]
    SessionEnded(String),
    #[error(
        "The app session is still waiting for the toolkit's answer to a request: send one action at a time"
    )]
    SessionBusy,
    /// A rate limit refused the request (`rate_limited`, or
    /// `payload_too_large`), on the server that holds the session.
    #[error("{message}")]
    Limited {
        code: String,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("This API key has {0} app sessions open: terminate some first")]
    TooManySessions(usize),
    /// The other servers can not be reached (NATS is down, or a server
    /// did not accept the call in time).
    #[error("{0}")]
    Unavailable(String),
}

impl RouteError {
    pub fn code(&self) -> &str {
        match self {
            RouteError::Failed { code, .. } | RouteError::Limited { code, .. } => code,
            RouteError::NotConnected(_) => "toolkit_not_connected",
            RouteError::Disconnected => "toolkit_disconnected",
            RouteError::Timeout(_) => "toolkit_timeout",
            RouteError::ShuttingDown => "server_shutting_down",
            RouteError::Endpoint(_) => "toolkit_endpoint_error",
            RouteError::SessionNotFound => "session_not_found",
            RouteError::SessionEnded(_) => "session_ended",
            RouteError::SessionBusy => "session_busy",
            RouteError::TooManySessions(_) => "too_many_sessions",
            RouteError::Unavailable(_) => "bus_unavailable",
        }
    }
}

/// A tool request on its way to a toolkit.
pub(crate) struct ToolRequest {
    pub tool_name: String,
    pub params: Map<String, Value>,
    pub auth_token: Option<Secret>,
    /// Whether the caller reads the tool's log messages (an MCP client):
    /// a WebSocket toolkit is asked for `tool_log` frames.
    pub logs: bool,
    /// The trace context passed on to the toolkit (its parent is the
    /// server's `atp.server.call` span).
    pub trace: Option<TraceContext>,
}

/// What a running tool reports before its answer, on its way from the
/// toolkit to the caller.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Report {
    /// Progress (`tool_progress`).
    Progress(ProgressBody),
    /// A log message (`tool_log`, sent when the request asked for logs).
    Log {
        /// Its level.
        level: LogLevel,
        /// What it says.
        data: Value,
    },
}

impl ToolRequest {
    /// The request on the wire, with the hub's id.
    fn on_wire(&self, request_id: &str) -> wire::ToolRequest {
        let (traceparent, tracestate) = TraceContext::into_fields(self.trace.clone());
        wire::ToolRequest {
            request_id: RequestId::Str(request_id.to_owned()),
            tool_name: self.tool_name.clone(),
            params: self.params.clone(),
            auth_token: self.auth_token.clone(),
            logs: self.logs,
            traceparent,
            tracestate,
        }
    }
}

/// An inbox entry for an app message: the payload's fields beside a
/// `message_type` (tool-request entries have none, as they always had).
fn inbox_entry(message_type: &str, body: &impl serde::Serialize) -> String {
    let mut m = match serde_json::to_value(body) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    m.insert(
        "message_type".into(),
        Value::String(message_type.to_owned()),
    );
    Value::Object(m).to_string()
}

fn terminate_entry(session_id: &str) -> String {
    let mut m = Map::new();
    m.insert("message_type".into(), "atp_app_terminate".into());
    m.insert("request_id".into(), session_id.into());
    Value::Object(m).to_string()
}

/// What a toolkit answered: the result, or its failure (code and message).
pub(crate) type Answer = Result<Value, (Option<String>, String)>;

/// What a toolkit answered in an app session: the UI (or a failure), and
/// whether the app ended the session.
#[derive(Debug)]
pub(crate) struct AppAnswer {
    pub result: Answer,
    pub terminated: bool,
}

type AppWaiter = oneshot::Sender<Result<AppAnswer, RouteError>>;

struct Socket {
    id: u64,
    tx: mpsc::Sender<String>,
    /// When it connected, in milliseconds since the Unix epoch.
    since_ms: i64,
}

/// What waits in an inbox for a poll.
enum Entry {
    /// A tool request (its entry is in `pending`).
    Tool(String),
    /// An app request or action: given out only while it is still the
    /// session's outstanding request.
    App {
        session_id: String,
        seq: u64,
        body: String,
    },
    /// A message that needs no answer (`atp_app_terminate`).
    Note(String),
}

struct Inbox {
    queue: VecDeque<Entry>,
    waiting: usize,
    last_seen: Instant,
    notify: Arc<Notify>,
    /// When it was first polled (since it was last forgotten), in
    /// milliseconds since the Unix epoch.
    since_ms: i64,
}

impl Inbox {
    fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            waiting: 0,
            last_seen: Instant::now(),
            since_ms: crate::keys::now_millis(),
            notify: Arc::new(Notify::new()),
        }
    }
}

enum Via {
    Socket(u64),
    Inbox {
        /// The entry (its JSON text), until a poll takes it.
        body: Option<String>,
    },
}

struct Pending {
    key_hash: String,
    via: Via,
    tx: oneshot::Sender<Result<Answer, RouteError>>,
    /// Where the toolkit's reports go, if the caller wants them.
    progress: Option<mpsc::Sender<Report>>,
}

/// Where an app session lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionVia {
    Socket(u64),
    Inbox,
}

/// The one toolkit request of a session that waits for its answer.
struct Outstanding {
    seq: u64,
    /// The caller; `None` once it stopped waiting (orphaned).
    waiter: Option<AppWaiter>,
    /// Whether an inbox poll took it.
    delivered: bool,
    /// When an orphaned request counts as unanswered.
    deadline: Instant,
}

struct Session {
    llm_key_hash: String,
    key_hash: String,
    /// The toolkit and the app (the audit rows and rate limits of its
    /// actions).
    toolkit: String,
    app: String,
    via: SessionVia,
    last_used: Instant,
    outstanding: Option<Outstanding>,
}

struct EndedSession {
    llm_key_hash: String,
    reason: String,
    at: Instant,
}

#[derive(Default)]
struct Inner {
    sockets: HashMap<String, Vec<Socket>>,
    inboxes: HashMap<String, Inbox>,
    pending: HashMap<String, Pending>,
    next_socket: u64,
    sessions: HashMap<String, Session>,
    /// Live sessions per LLM key.
    per_llm: HashMap<String, usize>,
    ended: HashMap<String, EndedSession>,
    /// The ended sessions, oldest first.
    ended_order: VecDeque<String>,
    next_seq: u64,
}

impl Inner {
    fn inbox_present(&self, key_hash: &str, presence: Duration) -> bool {
        self.inboxes
            .get(key_hash)
            .is_some_and(|i| i.waiting > 0 || i.last_seen.elapsed() <= presence)
    }

    fn socket_tx(&self, key_hash: &str, id: u64) -> Option<mpsc::Sender<String>> {
        self.sockets
            .get(key_hash)?
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.tx.clone())
    }

    /// Ends a live session: its waiting caller (if any) gets `error`, the
    /// toolkit is sent `atp_app_terminate` when `tell`, and the end is
    /// remembered with its reason.
    fn end_session(&mut self, session_id: &str, reason: &str, error: RouteError, tell: bool) {
        let Some(session) = self.sessions.remove(session_id) else {
            return;
        };
        if let Some(n) = self.per_llm.get_mut(&session.llm_key_hash) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_llm.remove(&session.llm_key_hash);
            }
        }
        if let Some(Outstanding {
            waiter: Some(w), ..
        }) = session.outstanding
        {
            let _ = w.send(Err(error));
        }
        if tell {
            match session.via {
                SessionVia::Socket(id) => {
                    // Fire and forget: the toolkit does not answer it, and
                    // one whose outbox is full is not reading anyway.
                    if let Some(tx) = self.socket_tx(&session.key_hash, id) {
                        let frame = ServerToToolkit::AppTerminate {
                            request_id: RequestId::Str(session_id.to_owned()),
                        };
                        let _ = tx.try_send(frame.to_json());
                    }
                }
                SessionVia::Inbox => {
                    if let Some(inbox) = self.inboxes.get_mut(&session.key_hash) {
                        let notes = inbox
                            .queue
                            .iter()
                            .filter(|e| matches!(e, Entry::Note(_)))
                            .count();
                        if notes < MAX_INBOX_NOTES {
                            inbox
                                .queue
                                .push_back(Entry::Note(terminate_entry(session_id)));
                            inbox.notify.notify_one();
                        }
                    }
                }
            }
        }
        tracing::debug!(session = %session_id, reason, "app session ended");
        self.forget_ended();
        while self.ended_order.len() >= MAX_ENDED {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
            }
        }
        self.ended.insert(
            session_id.to_owned(),
            EndedSession {
                llm_key_hash: session.llm_key_hash,
                reason: reason.to_owned(),
                at: Instant::now(),
            },
        );
        self.ended_order.push_back(session_id.to_owned());
    }

    /// Forgets the ended sessions older than [`ENDED_MEMORY`].
    fn forget_ended(&mut self) {
        while let Some(front) = self.ended_order.front() {
            match self.ended.get(front) {
                Some(e) if e.at.elapsed() <= ENDED_MEMORY => break,
                _ => {
                    if let Some(old) = self.ended_order.pop_front() {
                        self.ended.remove(&old);
                    }
                }
            }
        }
    }

    /// Whether `session_id` is a live session of `llm_key_hash`, or why
    /// not (another key's session, live or ended, is not found).
    fn check_session(&self, llm_key_hash: &str, session_id: &str) -> Result<(), RouteError> {
        match self.sessions.get(session_id) {
            Some(s) if s.llm_key_hash == llm_key_hash => Ok(()),
            Some(_) => Err(RouteError::SessionNotFound),
            None => match self.ended.get(session_id) {
                Some(e) if e.llm_key_hash == llm_key_hash && e.at.elapsed() <= ENDED_MEMORY => Err(
                    RouteError::SessionEnded(format!("The app session has ended: {}", e.reason)),
                ),
                _ => Err(RouteError::SessionNotFound),
            },
        }
    }

    /// Ends the session if it is over without anyone having said so: an
    /// orphaned request past its deadline, an hour unused, or (with nothing
    /// outstanding) an inbox no longer polled.
    fn lapse(&mut self, session_id: &str, presence: Duration) {
        let Some(s) = self.sessions.get(session_id) else {
            return;
        };
        let now = Instant::now();
        let why = match &s.outstanding {
            Some(o) if o.waiter.is_none() && now >= o.deadline => {
                Some(("the toolkit did not answer in time", true))
            }
            Some(_) => None,
            None if now.duration_since(s.last_used) >= SESSION_IDLE => {
                Some(("it was not used for an hour", true))
            }
            None if s.via == SessionVia::Inbox && !self.inbox_present(&s.key_hash, presence) => {
                Some((
                    "the toolkit disconnected (it stopped polling its inbox)",
                    false,
                ))
            }
            None => None,
        };
        if let Some((reason, tell)) = why {
            self.end_session(session_id, reason, RouteError::Disconnected, tell);
        }
    }

    /// Hands a toolkit's answer to the session's outstanding request; ends
    /// the session when the app said so. Whether a caller took it.
    fn deliver_app(&mut self, session_id: &str, answer: AppAnswer) -> bool {
        let Some(session) = self.sessions.get_mut(session_id) else {
            return false;
        };
        let Some(outstanding) = session.outstanding.take() else {
            return false;
        };
        session.last_used = Instant::now();
        if answer.terminated {
            self.end_session(
                session_id,
                "the app ended it",
                RouteError::Disconnected,
                false,
            );
        }
        match outstanding.waiter {
            Some(w) => w.send(Ok(answer)).is_ok(),
            None => {
                tracing::debug!(session = %session_id, "dropping the answer to an abandoned app request");
                false
            }
        }
    }
}

/// How a request will reach its toolkit.
pub(crate) enum Route {
    Socket,
    Endpoint,
    Inbox,
}

pub(crate) struct Hub {
    inner: Mutex<Inner>,
    presence: watch::Sender<u64>,
    shutdown: watch::Receiver<bool>,
    inbox_presence: Duration,
    /// The toolkit keys announced as served (for the webhooks); its lock
    /// orders the announcements of a key.
    online: Mutex<HashSet<String>>,
    sweeper: AtomicBool,
    /// `{server id}.` when servers share work over NATS: the start of
    /// every request and session id made here, so that any server can
    /// tell where one lives.
    id_prefix: String,
}

impl Hub {
    pub fn new(
        shutdown: watch::Receiver<bool>,
        inbox_presence: Duration,
        server_id: Option<&str>,
    ) -> Self {
        Self {
            inner: Mutex::default(),
            presence: watch::Sender::new(0),
            shutdown,
            inbox_presence,
            online: Mutex::default(),
            sweeper: AtomicBool::new(false),
            id_prefix: server_id.map(|id| format!("{id}.")).unwrap_or_default(),
        }
    }

    /// The toolkit keys served here: (live — a WebSocket or a waiting
    /// inbox poll —, served — live, or an inbox polled lately).
    pub fn served_keys(&self) -> (HashSet<String>, HashSet<String>) {
        let inner = self.lock();
        let mut live = HashSet::new();
        let mut served = HashSet::new();
        for (key, sockets) in &inner.sockets {
            if !sockets.is_empty() {
                live.insert(key.clone());
                served.insert(key.clone());
            }
        }
        for (key, inbox) in &inner.inboxes {
            if inbox.waiting > 0 {
                live.insert(key.clone());
            }
            if inner.inbox_present(key, self.inbox_presence) {
                served.insert(key.clone());
            }
        }
        (live, served)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.presence.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes the waiters of [`Hub::subscribe`] (a registration changed).
    pub fn touch(&self) {
        self.bump();
    }

    /// A receiver that changes whenever a toolkit connects, disconnects or
    /// polls.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.presence.subscribe()
    }

    /// The load on this server: (toolkit WebSockets open, inbox entries
    /// waiting to be taken).
    pub fn load(&self) -> (usize, usize) {
        let inner = self.lock();
        let sockets = inner.sockets.values().map(Vec::len).sum();
        let depth = inner.inboxes.values().map(|i| i.queue.len()).sum();
        (sockets, depth)
    }

    /// Whether a toolkit with this key is reachable right now: a live
    /// WebSocket, or an inbox that is being polled or was polled lately.
    pub fn is_served(&self, key_hash: &str) -> bool {
        let inner = self.lock();
        inner.sockets.get(key_hash).is_some_and(|s| !s.is_empty())
            || inner.inbox_present(key_hash, self.inbox_presence)
    }

    /// Whether a WebSocket or a waiting inbox poll serves this key now.
    pub fn is_live(&self, key_hash: &str) -> bool {
        let inner = self.lock();
        inner.sockets.get(key_hash).is_some_and(|s| !s.is_empty())
            || inner.inboxes.get(key_hash).is_some_and(|i| i.waiting > 0)
    }

    /// How a toolkit with this key is connected to this server now, and
    /// since when (milliseconds since the Unix epoch): its oldest open
    /// WebSocket, else its inbox if it is polled. For the console.
    pub fn presence(&self, key_hash: &str) -> Option<(Route, i64)> {
        let inner = self.lock();
        if let Some(since) = inner
            .sockets
            .get(key_hash)
            .and_then(|s| s.iter().map(|s| s.since_ms).min())
        {
            return Some((Route::Socket, since));
        }
        if inner.inbox_present(key_hash, self.inbox_presence) {
            return inner
                .inboxes
                .get(key_hash)
                .map(|i| (Route::Inbox, i.since_ms));
        }
        None
    }

    /// Compares whether `key_hash` is served now with what was last
    /// announced and, when it changed, runs `changed(served)` — under a
    /// lock, so that the announcements of a key come out in order.
    pub fn presence_changed(&self, key_hash: &str, changed: impl FnOnce(bool)) {
        let mut online = self.online.lock().unwrap_or_else(PoisonError::into_inner);
        let served = self.is_served(key_hash);
        if served == online.contains(key_hash) {
            return;
        }
        if served {
            online.insert(key_hash.to_owned());
        } else {
            online.remove(key_hash);
        }
        changed(served);
    }

    /// The keys last announced as served.
    pub fn online_keys(&self) -> Vec<String> {
        self.online
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// How a request for a toolkit with this key and (maybe) an endpoint
    /// URL will travel: its WebSocket first, then its endpoint, then its
    /// inbox.
    pub fn route(&self, key_hash: &str, has_endpoint: bool) -> Option<Route> {
        let inner = self.lock();
        if inner.sockets.get(key_hash).is_some_and(|s| !s.is_empty()) {
            Some(Route::Socket)
        } else if has_endpoint {
            Some(Route::Endpoint)
        } else if inner.inbox_present(key_hash, self.inbox_presence) {
            Some(Route::Inbox)
        } else {
            None
        }
    }

    /// Sends a request over the key's newest WebSocket, or queues it in its
    /// inbox, and waits for the answer (at most `timeout`, the wait for
    /// room in a slow toolkit's outbox included). The toolkit's progress
    /// reports (WebSocket only) go to `progress`, when given, without ever
    /// waiting: a report that finds it full is dropped.
    pub async fn dispatch(
        &self,
        app: &str,
        key_hash: &str,
        request: &ToolRequest,
        timeout: Duration,
        progress: Option<mpsc::Sender<Report>>,
    ) -> Result<Value, RouteError> {
        let request_id = format!("{}{}", self.id_prefix, uuid4());
        let (tx, rx) = oneshot::channel();
        let socket_tx = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let socket = inner
                .sockets
                .get(key_hash)
                .and_then(|s| s.last())
                .map(|s| (s.id, s.tx.clone()));
            if let Some((id, socket_tx)) = socket {
                inner.pending.insert(
                    request_id.clone(),
                    Pending {
                        key_hash: key_hash.to_owned(),
                        via: Via::Socket(id),
                        tx,
                        progress,
                    },
                );
                Some(socket_tx)
            } else {
                let inbox = match inner.inboxes.get_mut(key_hash) {
                    Some(i) if i.waiting > 0 || i.last_seen.elapsed() <= self.inbox_presence => i,
                    _ => return Err(RouteError::NotConnected(app.to_owned())),
                };
                inbox.queue.push_back(Entry::Tool(request_id.clone()));
                inbox.notify.notify_one();
                let body = wire::to_json(&request.on_wire(&request_id));
                inner.pending.insert(
                    request_id.clone(),
                    Pending {
                        key_hash: key_hash.to_owned(),
                        via: Via::Inbox { body: Some(body) },
                        tx,
                        progress: None,
                    },
                );
                None
            }
        };
        let _guard = PendingGuard {
            hub: self,
            request_id: &request_id,
        };
        tracing::debug!(app, tool = %request.tool_name, %request_id, "tool request sent");
        let mut shutdown = self.shutdown.clone();
        let answer = async {
            if let Some(socket_tx) = socket_tx {
                let frame = ServerToToolkit::ToolRequest(request.on_wire(&request_id)).to_json();
                // A toolkit that reads too slowly fills its outbox: the
                // request waits for room, within the same timeout.
                if socket_tx.send(frame).await.is_err() {
                    return Err(RouteError::Disconnected);
                }
            }
            match rx.await {
                Ok(Ok(Ok(value))) => Ok(value),
                Ok(Ok(Err((code, message)))) => Err(RouteError::Failed {
                    code: code.unwrap_or_else(|| "tool_error".into()),
                    message,
                }),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(RouteError::Disconnected),
            }
        };
        tokio::select! {
            answer = answer => answer,
            _ = tokio::time::sleep(timeout) => {
                tracing::warn!(app, tool = %request.tool_name, %request_id, "the toolkit did not answer in time");
                Err(RouteError::Timeout(timeout))
            }
            _ = crate::stopped(&mut shutdown) => Err(RouteError::ShuttingDown),
        }
    }

    /// A report (progress, a log message) that came over WebSocket `id`:
    /// passed on to the request's caller if the request was sent there and
    /// the caller asked for reports (and has room for it). Whether it was.
    pub fn socket_report(&self, id: u64, request_id: &str, report: Report) -> bool {
        let inner = self.lock();
        match inner.pending.get(request_id) {
            Some(p) if matches!(p.via, Via::Socket(s) if s == id) => p
                .progress
                .as_ref()
                .is_some_and(|tx| tx.try_send(report).is_ok()),
            _ => false,
        }
    }

    /// Starts an app session of `llm_key_hash` on the toolkit key's newest
    /// WebSocket, else its inbox, and waits for the app's first UI (at
    /// most `timeout`). Returns the session id, the UI and whether the app
    /// ended the session at once. A failed start leaves no session.
    pub async fn start_app(
        &self,
        llm_key_hash: &str,
        app: &str,
        key_hash: &str,
        request: &ToolRequest,
        timeout: Duration,
    ) -> Result<(String, Value, bool), RouteError> {
        let token = crate::keys::random_token(24).map_err(|_| RouteError::Failed {
            code: "internal".into(),
            message: "No randomness for a session id".into(),
        })?;
        let session_id = format!("{}{token}", self.id_prefix);
        let (tx, rx) = oneshot::channel();
        let (seq, socket_tx) = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let open = |inner: &Inner| inner.per_llm.get(llm_key_hash).copied().unwrap_or(0);
            if open(inner) >= MAX_SESSIONS_PER_KEY {
                let mine: Vec<String> = inner
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.llm_key_hash == llm_key_hash)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in mine {
                    inner.lapse(&id, self.inbox_presence);
                }
                if open(inner) >= MAX_SESSIONS_PER_KEY {
                    return Err(RouteError::TooManySessions(MAX_SESSIONS_PER_KEY));
                }
            }
            inner.next_seq += 1;
            let seq = inner.next_seq;
            let socket = inner
                .sockets
                .get(key_hash)
                .and_then(|s| s.last())
                .map(|s| (s.id, s.tx.clone()));
            let (via, socket_tx) = match socket {
                Some((id, tx)) => (SessionVia::Socket(id), Some(tx)),
                None if inner.inbox_present(key_hash, self.inbox_presence) => {
                    if let Some(inbox) = inner.inboxes.get_mut(key_hash) {
                        inbox.queue.push_back(Entry::App {
                            session_id: session_id.clone(),
                            seq,
                            body: inbox_entry("atp_app_request", &request.on_wire(&session_id)),
                        });
                        inbox.notify.notify_one();
                    }
                    (SessionVia::Inbox, None)
                }
                None => return Err(RouteError::NotConnected(app.to_owned())),
            };
            let now = Instant::now();
            inner.sessions.insert(
                session_id.clone(),
                Session {
                    llm_key_hash: llm_key_hash.to_owned(),
                    key_hash: key_hash.to_owned(),
                    toolkit: app.to_owned(),
                    app: request.tool_name.clone(),
                    via,
                    last_used: now,
                    outstanding: Some(Outstanding {
                        seq,
                        waiter: Some(tx),
                        delivered: false,
                        deadline: now + timeout,
                    }),
                },
            );
            *inner.per_llm.entry(llm_key_hash.to_owned()).or_default() += 1;
            (seq, socket_tx)
        };
        tracing::debug!(app, tool = %request.tool_name, session = %session_id, "app session starting");
        let frame = socket_tx.map(|tx| {
            (
                tx,
                ServerToToolkit::AppRequest(request.on_wire(&session_id)).to_json(),
            )
        });
        let answer = self
            .await_app(&session_id, seq, true, frame, rx, timeout)
            .await?;
        match answer.result {
            Ok(ui) => Ok((session_id, ui, answer.terminated)),
            Err((code, message)) => {
                self.lock().end_session(
                    &session_id,
                    "the app failed to start",
                    RouteError::Disconnected,
                    false,
                );
                Err(RouteError::Failed {
                    code: code.unwrap_or_else(|| "app_error".into()),
                    message,
                })
            }
        }
    }

    /// The toolkit and the app of an open session of `llm_key_hash` here,
    /// and how the toolkit is reached; `None` for a session that is not
    /// open here or not the caller's.
    pub fn session_app(
        &self,
        llm_key_hash: &str,
        session_id: &str,
    ) -> Option<(String, String, Transport)> {
        let inner = self.lock();
        let session = inner.sessions.get(session_id)?;
        (session.llm_key_hash == llm_key_hash).then(|| {
            let transport = match session.via {
                SessionVia::Socket(_) => Transport::websocket,
                SessionVia::Inbox => Transport::inbox,
            };
            (session.toolkit.clone(), session.app.clone(), transport)
        })
    }

    /// Sends a user's action to the session's app and waits for its new UI
    /// (at most `timeout`). Returns the UI and whether the app ended the
    /// session.
    pub async fn app_action(
        &self,
        llm_key_hash: &str,
        session_id: &str,
        action_data: Value,
        trace: Option<TraceContext>,
        timeout: Duration,
    ) -> Result<(Value, bool), RouteError> {
        let (tx, rx) = oneshot::channel();
        let (seq, frame) = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            inner.lapse(session_id, self.inbox_presence);
            inner.check_session(llm_key_hash, session_id)?;
            inner.next_seq += 1;
            let seq = inner.next_seq;
            let Some(session) = inner.sessions.get_mut(session_id) else {
                return Err(RouteError::SessionNotFound);
            };
            if session.outstanding.is_some() {
                return Err(RouteError::SessionBusy);
            }
            let now = Instant::now();
            session.last_used = now;
            session.outstanding = Some(Outstanding {
                seq,
                waiter: Some(tx),
                delivered: false,
                deadline: now + timeout,
            });
            let (via, key_hash) = (session.via, session.key_hash.clone());
            let (traceparent, tracestate) = TraceContext::into_fields(trace);
            let action = wire::AppAction {
                request_id: RequestId::Str(session_id.to_owned()),
                action_data,
                traceparent,
                tracestate,
            };
            match via {
                SessionVia::Socket(id) => match inner.socket_tx(&key_hash, id) {
                    Some(tx) => (
                        seq,
                        Some((tx, ServerToToolkit::AppAction(action).to_json())),
                    ),
                    None => {
                        // Closed a moment ago; `remove_socket` is on its way.
                        let reason = "the toolkit disconnected";
                        inner.end_session(session_id, reason, RouteError::Disconnected, false);
                        return Err(RouteError::SessionEnded(format!(
                            "The app session has ended: {reason}"
                        )));
                    }
                },
                SessionVia::Inbox => {
                    if let Some(inbox) = inner.inboxes.get_mut(&key_hash) {
                        inbox.queue.push_back(Entry::App {
                            session_id: session_id.to_owned(),
                            seq,
                            body: inbox_entry("atp_app_action", &action),
                        });
                        inbox.notify.notify_one();
                    }
                    (seq, None)
                }
            }
        };
        let answer = self
            .await_app(session_id, seq, false, frame, rx, timeout)
            .await?;
        match answer.result {
            Ok(ui) => Ok((ui, answer.terminated)),
            Err((code, message)) => Err(RouteError::Failed {
                code: code.unwrap_or_else(|| "app_error".into()),
                message,
            }),
        }
    }

    /// Ends a session of `llm_key_hash` and tells its toolkit; no answer
    /// is awaited.
    pub fn app_terminate(&self, llm_key_hash: &str, session_id: &str) -> Result<(), RouteError> {
        let mut inner = self.lock();
        inner.lapse(session_id, self.inbox_presence);
        inner.check_session(llm_key_hash, session_id)?;
        inner.end_session(
            session_id,
            "it was terminated",
            RouteError::SessionEnded("The app session was terminated".into()),
            true,
        );
        Ok(())
    }

    /// Sends a session's request (over its WebSocket, when `frame` is
    /// given; its inbox entry is queued already) and waits for the answer,
    /// the timeout or the shutdown.
    async fn await_app(
        &self,
        session_id: &str,
        seq: u64,
        start: bool,
        frame: Option<(mpsc::Sender<String>, String)>,
        mut rx: oneshot::Receiver<Result<AppAnswer, RouteError>>,
        timeout: Duration,
    ) -> Result<AppAnswer, RouteError> {
        let _guard = AppGuard {
            hub: self,
            session_id,
            seq,
            start,
        };
        let mut shutdown = self.shutdown.clone();
        let answer = async {
            if let Some((tx, frame)) = frame
                && tx.send(frame).await.is_err()
            {
                return Err(RouteError::Disconnected);
            }
            match (&mut rx).await {
                Ok(answer) => answer,
                Err(_) => Err(RouteError::Disconnected),
            }
        };
        tokio::select! {
            answer = answer => answer,
            _ = tokio::time::sleep(timeout) => {
                let ended = self.end_if_outstanding(session_id, seq, "the toolkit did not answer in time");
                match rx.try_recv() {
                    // The answer came as the time ran out.
                    Ok(answer) if !ended => answer,
                    _ => {
                        tracing::warn!(session = %session_id, "the toolkit did not answer an app request in time");
                        Err(RouteError::Timeout(timeout))
                    }
                }
            }
            _ = crate::stopped(&mut shutdown) => Err(RouteError::ShuttingDown),
        }
    }

    /// Ends the session (telling the toolkit) if request `seq` is still its
    /// outstanding one. Whether it did.
    fn end_if_outstanding(&self, session_id: &str, seq: u64, reason: &str) -> bool {
        let mut inner = self.lock();
        let current = inner
            .sessions
            .get(session_id)
            .and_then(|s| s.outstanding.as_ref())
            .is_some_and(|o| o.seq == seq);
        if current {
            inner.end_session(session_id, reason, RouteError::Disconnected, true);
        }
        current
    }

    /// An app's answer that came over WebSocket `id`; ignored unless the
    /// session lives there and has a request outstanding.
    pub fn socket_app_answer(&self, id: u64, session_id: &str, answer: AppAnswer) -> bool {
        let mut inner = self.lock();
        match inner.sessions.get(session_id) {
            Some(s) if s.via == SessionVia::Socket(id) && s.outstanding.is_some() => {
                inner.deliver_app(session_id, answer)
            }
            _ => false,
        }
    }

    /// Ends lapsed sessions (idle, orphaned past their deadline, on an
    /// inbox no longer polled) and forgets old ended ones.
    pub fn sweep(&self) {
        let mut inner = self.lock();
        let ids: Vec<String> = inner.sessions.keys().cloned().collect();
        for id in ids {
            inner.lapse(&id, self.inbox_presence);
        }
        inner.forget_ended();
    }

    /// Registers a toolkit WebSocket; tool requests for the key go to the
    /// newest one. Messages to send come out of the receiver.
    pub fn add_socket(
        &self,
        key_hash: &str,
    ) -> (u64, mpsc::Sender<String>, mpsc::Receiver<String>) {
        let (tx, rx) = atp_registry::net::session::outbox();
        let socket_tx = tx.clone();
        let id = {
            let mut inner = self.lock();
            inner.next_socket += 1;
            let id = inner.next_socket;
            inner
                .sockets
                .entry(key_hash.to_owned())
                .or_default()
                .push(Socket {
                    id,
                    tx,
                    since_ms: crate::keys::now_millis(),
                });
            id
        };
        self.bump();
        (id, socket_tx, rx)
    }

    /// Forgets a WebSocket; the requests waiting on it fail at once, and
    /// the app sessions on it end.
    pub fn remove_socket(&self, key_hash: &str, id: u64) {
        let orphans: Vec<Pending> = {
            let mut inner = self.lock();
            if let Some(list) = inner.sockets.get_mut(key_hash) {
                list.retain(|s| s.id != id);
                if list.is_empty() {
                    inner.sockets.remove(key_hash);
                }
            }
            let ids: Vec<String> = inner
                .pending
                .iter()
                .filter(|(_, p)| matches!(p.via, Via::Socket(s) if s == id))
                .map(|(k, _)| k.clone())
                .collect();
            let sessions: Vec<String> = inner
                .sessions
                .iter()
                .filter(|(_, s)| s.via == SessionVia::Socket(id))
                .map(|(k, _)| k.clone())
                .collect();
            for session in sessions {
                inner.end_session(
                    &session,
                    "the toolkit disconnected",
                    RouteError::Disconnected,
                    false,
                );
            }
            ids.iter().filter_map(|k| inner.pending.remove(k)).collect()
        };
        for p in orphans {
            let _ = p.tx.send(Err(RouteError::Disconnected));
        }
        self.bump();
    }

    /// An answer that came over WebSocket `id`; ignored unless the request
    /// was sent there.
    pub fn socket_answer(&self, id: u64, request_id: &str, result: Answer) -> bool {
        let pending = {
            let mut inner = self.lock();
            match inner.pending.get(request_id) {
                Some(p) if matches!(p.via, Via::Socket(s) if s == id) => {
                    inner.pending.remove(request_id)
                }
                _ => None,
            }
        };
        pending.is_some_and(|p| p.tx.send(Ok(result)).is_ok())
    }

    /// An answer posted to the inbox of `key_hash`: to a tool request, or
    /// to an app session's request (`terminated`: the app ended the
    /// session); ignored unless the request was delivered through that
    /// inbox.
    pub fn inbox_answer(
        &self,
        key_hash: &str,
        request_id: &str,
        result: Answer,
        terminated: bool,
    ) -> bool {
        let pending = {
            let mut inner = self.lock();
            match inner.pending.get(request_id) {
                Some(p) if p.key_hash == key_hash && matches!(p.via, Via::Inbox { body: None }) => {
                    inner.pending.remove(request_id)
                }
                Some(_) => None,
                None => {
                    let delivered = inner.sessions.get(request_id).is_some_and(|s| {
                        s.via == SessionVia::Inbox
                            && s.key_hash == key_hash
                            && s.outstanding.as_ref().is_some_and(|o| o.delivered)
                    });
                    if !delivered {
                        return false;
                    }
                    let answer = AppAnswer { result, terminated };
                    inner.deliver_app(request_id, answer);
                    return true;
                }
            }
        };
        pending.is_some_and(|p| p.tx.send(Ok(result)).is_ok())
    }

    /// Marks the key's inbox as polled now (creating it), before a poll.
    pub fn touch_inbox(&self, key_hash: &str) {
        self.lock()
            .inboxes
            .entry(key_hash.to_owned())
            .or_insert_with(Inbox::new)
            .last_seen = Instant::now();
    }

    /// Takes the next request from the key's inbox, waiting up to `wait`
    /// for one. `None` when there is none (or the server is stopping).
    pub async fn poll_inbox(&self, key_hash: &str, wait: Duration) -> Option<String> {
        let notify = {
            let mut inner = self.lock();
            // Forget the inboxes of keys that stopped polling long ago
            // (with the notes no one will read).
            let presence = self.inbox_presence;
            inner.inboxes.retain(|_, i| {
                let recent = i.waiting > 0 || i.last_seen.elapsed() <= presence * 2;
                if !recent {
                    i.queue.retain(|e| !matches!(e, Entry::Note(_)));
                }
                recent || !i.queue.is_empty()
            });
            let inbox = inner
                .inboxes
                .entry(key_hash.to_owned())
                .or_insert_with(Inbox::new);
            inbox.waiting += 1;
            inbox.last_seen = Instant::now();
            inbox.notify.clone()
        };
        self.bump();
        let _guard = PollGuard {
            hub: self,
            key_hash,
        };
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        let mut shutdown = self.shutdown.clone();
        loop {
            if let Some(body) = self.take_inbox_entry(key_hash) {
                return Some(body);
            }
            if *shutdown.borrow() {
                return None;
            }
            tokio::select! {
                _ = notify.notified() => {}
                _ = &mut deadline => return None,
                _ = shutdown.changed() => {}
            }
        }
    }

    fn take_inbox_entry(&self, key_hash: &str) -> Option<String> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let inbox = inner.inboxes.get_mut(key_hash)?;
        while let Some(entry) = inbox.queue.pop_front() {
            match entry {
                Entry::Tool(request_id) => {
                    if let Some(Pending {
                        via: Via::Inbox { body },
                        ..
                    }) = inner.pending.get_mut(&request_id)
                        && let Some(b) = body.take()
                    {
                        return Some(b);
                    }
                }
                Entry::App {
                    session_id,
                    seq,
                    body,
                } => {
                    let Some(session) = inner.sessions.get_mut(&session_id) else {
                        continue;
                    };
                    match &mut session.outstanding {
                        Some(o) if o.seq == seq && !o.delivered => {
                            if o.waiter.is_none() {
                                // Its caller went away before any poll
                                // took it: withdrawn.
                                session.outstanding = None;
                                continue;
                            }
                            o.delivered = true;
                            return Some(body);
                        }
                        _ => continue,
                    }
                }
                Entry::Note(body) => return Some(body),
            }
        }
        None
    }
}

/// Runs [`Hub::sweep`] and the inbox presence checks (for the webhooks'
/// `toolkit_disconnected`) every few seconds until the server stops; the
/// first call starts it, later ones do nothing. It holds the state weakly:
/// a server that is dropped without a shutdown ends it too.
pub(crate) fn ensure_sweeper(s: &Arc<crate::State>) {
    if s.hub.sweeper.swap(true, Ordering::AcqRel) {
        return;
    }
    let every =
        (s.hub.inbox_presence / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
    let weak = Arc::downgrade(s);
    let mut shutdown = s.hub.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = crate::stopped(&mut shutdown) => return,
            }
            let Some(s) = weak.upgrade() else {
                return;
            };
            s.hub.sweep();
            for key in s.hub.online_keys() {
                crate::toolkit::announce(&s, &key, "inbox");
            }
        }
    });
}

/// Forgets a request when its caller stops waiting (answer, timeout, or
/// the caller went away).
struct PendingGuard<'a> {
    hub: &'a Hub,
    request_id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut inner = self.hub.lock();
        if let Some(p) = inner.pending.remove(self.request_id)
            && let Via::Inbox { body: Some(_) } = p.via
            && let Some(inbox) = inner.inboxes.get_mut(&p.key_hash)
        {
            inbox
                .queue
                .retain(|e| !matches!(e, Entry::Tool(id) if id == self.request_id));
        }
    }
}

/// When the caller of an app request stops waiting with the request still
/// outstanding (it went away): a start ends the session (no one knows its
/// id), an action is orphaned (see the module docs).
struct AppGuard<'a> {
    hub: &'a Hub,
    session_id: &'a str,
    seq: u64,
    start: bool,
}

impl Drop for AppGuard<'_> {
    fn drop(&mut self) {
        let mut inner = self.hub.lock();
        let Some(session) = inner.sessions.get_mut(self.session_id) else {
            return;
        };
        let via = session.via;
        let Some(o) = session.outstanding.as_mut().filter(|o| o.seq == self.seq) else {
            return;
        };
        if self.start {
            inner.end_session(
                self.session_id,
                "its start was abandoned",
                RouteError::Disconnected,
                true,
            );
        } else if via == SessionVia::Inbox && !o.delivered {
            // No poll took it yet: withdrawn, and its entry (which may
            // hold a large `action_data`) leaves the queue at once.
            session.outstanding = None;
            let key_hash = session.key_hash.clone();
            if let Some(inbox) = inner.inboxes.get_mut(&key_hash) {
                inbox.queue.retain(|e| {
                    !matches!(e, Entry::App { session_id, seq, .. }
                        if session_id == self.session_id && *seq == self.seq)
                });
            }
        } else {
            o.waiter = None;
        }
    }
}

/// Ends an inbox poll: the key was seen now, and a queued entry that a
/// cancelled poll was woken for wakes another poll.
struct PollGuard<'a> {
    hub: &'a Hub,
    key_hash: &'a str,
}

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        {
            let mut inner = self.hub.lock();
            if let Some(inbox) = inner.inboxes.get_mut(self.key_hash) {
                inbox.waiting = inbox.waiting.saturating_sub(1);
                inbox.last_seen = Instant::now();
                if !inbox.queue.is_empty() {
                    inbox.notify.notify_one();
                }
            }
        }
        self.hub.bump();
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn req() -> ToolRequest {
        ToolRequest {
            tool_name: "echo".into(),
            params: Map::new(),
            auth_token: None,
            logs: false,
            trace: None,
        }
    }

    #[tokio::test]
    async fn socket_round_trip_and_disconnect() {
        let (_tx, rx) = watch::channel(false);
        let hub = Arc::new(Hub::new(rx, Duration::from_secs(60), None));
        assert_eq!(
            hub.dispatch("app", "k", &req(), Duration::from_secs(1), None)
                .await,
            Err(RouteError::NotConnected("app".into()))
        );
        let (id, _tx, mut out) = hub.add_socket("k");
        let h = hub.clone();
        let call = tokio::spawn(async move {
            h.dispatch("app", "k", &req(), Duration::from_secs(5), None)
                .await
        });
        let msg: Value = serde_json::from_str(&out.recv().await.expect("sent")).expect("json");
        let rid = msg["payload"]["request_id"]
            .as_str()
            .expect("id")
            .to_owned();
        assert!(
            !hub.socket_answer(id + 1, &rid, Ok(json!(1))),
            "another socket"
        );
        assert!(hub.socket_answer(id, &rid, Ok(json!({"ok": true}))));
        assert_eq!(call.await.expect("join"), Ok(json!({"ok": true})));
        let h = hub.clone();
        let call = tokio::spawn(async move {
            h.dispatch("app", "k", &req(), Duration::from_secs(5), None)
                .await
        });
        out.recv().await.expect("sent");
        hub.remove_socket("k", id);
        assert_eq!(call.await.expect("join"), Err(RouteError::Disconnected));
        assert!(hub.lock().pending.is_empty());
    }

    #[tokio::test]
    async fn inbox_and_timeout() {
        let (_tx, rx) = watch::channel(false);
        let hub = Arc::new(Hub::new(rx, Duration::from_secs(60), None));
        assert_eq!(hub.poll_inbox("k", Duration::from_millis(1)).await, None);
        let h = hub.clone();
        let call = tokio::spawn(async move {
            h.dispatch("app", "k", &req(), Duration::from_secs(5), None)
                .await
        });
        let entry = hub
            .poll_inbox("k", Duration::from_secs(5))
            .await
            .expect("entry");
        let entry: Value = serde_json::from_str(&entry).expect("json");
        let rid = entry["request_id"].as_str().expect("id").to_owned();
        assert!(!hub.inbox_answer("other", &rid, Ok(json!(1)), false));
        assert!(hub.inbox_answer("k", &rid, Ok(json!(2)), false));
        assert_eq!(call.await.expect("join"), Ok(json!(2)));
        let t = hub
            .dispatch("app", "k", &req(), Duration::from_millis(20), None)
            .await;
        assert_eq!(t, Err(RouteError::Timeout(Duration::from_millis(20))));
        let inner = hub.lock();
        assert!(inner.pending.is_empty());
        assert!(inner.inboxes["k"].queue.is_empty());
    }

    fn hub() -> Arc<Hub> {
        let (tx, rx) = watch::channel(false);
        // The sender lives as long as the test: the hub is not stopping.
        std::mem::forget(tx);
        Arc::new(Hub::new(rx, Duration::from_secs(60), None))
    }

    fn progress(n: f64) -> Report {
        Report::Progress(ProgressBody {
            progress: n,
            total: None,
            message: None,
        })
    }

    #[tokio::test]
    async fn progress_goes_only_to_a_caller_that_asked_from_the_right_socket() {
        let hub = hub();
        let (id, _tx, mut out) = hub.add_socket("k");
        let (ptx, mut prx) = mpsc::channel(1);
        let h = hub.clone();
        let call = tokio::spawn(async move {
            h.dispatch("app", "k", &req(), Duration::from_secs(5), Some(ptx))
                .await
        });
        let msg: Value = serde_json::from_str(&out.recv().await.expect("sent")).expect("json");
        let rid = msg["payload"]["request_id"]
            .as_str()
            .expect("id")
            .to_owned();
        assert!(
            !hub.socket_report(id + 1, &rid, progress(1.0)),
            "another socket"
        );
        assert!(hub.socket_report(id, &rid, progress(2.0)));
        // A full channel drops the report rather than wait.
        assert!(!hub.socket_report(id, &rid, progress(3.0)));
        assert!(hub.socket_answer(id, &rid, Ok(json!(1))));
        assert_eq!(call.await.expect("join"), Ok(json!(1)));
        assert_eq!(prx.recv().await, Some(progress(2.0)));
        assert!(
            prx.recv().await.is_none(),
            "nothing more, and the sender is gone"
        );

        // A caller that did not ask gets none.
        let h = hub.clone();
        let call = tokio::spawn(async move {
            h.dispatch("app", "k", &req(), Duration::from_secs(5), None)
                .await
        });
        let msg: Value = serde_json::from_str(&out.recv().await.expect("sent")).expect("json");
        let rid = msg["payload"]["request_id"]
            .as_str()
            .expect("id")
            .to_owned();
        assert!(!hub.socket_report(id, &rid, progress(1.0)));
        assert!(hub.socket_answer(id, &rid, Ok(json!(2))));
        assert_eq!(call.await.expect("join"), Ok(json!(2)));
    }

    fn ui(v: Value) -> AppAnswer {
        AppAnswer {
            result: Ok(v),
            terminated: false,
        }
    }

    #[tokio::test]
    async fn a_session_keeps_one_request_outstanding_and_its_socket() {
        let hub = hub();
        let (id, _tx, mut out) = hub.add_socket("k");
        let h = hub.clone();
        let start = tokio::spawn(async move {
            h.start_app("llm", "app", "k", &req(), Duration::from_secs(5))
                .await
        });
        let msg: Value = serde_json::from_str(&out.recv().await.expect("sent")).expect("json");
        assert_eq!(msg["message_type"], "atp_app_request");
        let sid = msg["payload"]["request_id"]
            .as_str()
            .expect("id")
            .to_owned();
        assert!(!hub.socket_app_answer(id + 1, &sid, ui(json!("forged"))));
        assert!(hub.socket_app_answer(id, &sid, ui(json!("ui"))));
        let (got, ui0, terminated) = start.await.expect("join").expect("started");
        assert_eq!(
            (got.as_str(), ui0, terminated),
            (sid.as_str(), json!("ui"), false)
        );
        // An answer nobody asked for is ignored.
        assert!(!hub.socket_app_answer(id, &sid, ui(json!("unasked"))));

        let h = hub.clone();
        let s2 = sid.clone();
        let first = tokio::spawn(async move {
            h.app_action("llm", &s2, json!(1), None, Duration::from_secs(5))
                .await
        });
        out.recv().await.expect("sent");
        assert_eq!(
            hub.app_action("llm", &sid, json!(2), None, Duration::from_secs(5))
                .await,
            Err(RouteError::SessionBusy)
        );
        assert_eq!(
            hub.app_action("other", &sid, json!(2), None, Duration::from_secs(5))
                .await,
            Err(RouteError::SessionNotFound)
        );
        assert!(hub.socket_app_answer(
            id,
            &sid,
            AppAnswer {
                result: Ok(json!("bye")),
                terminated: true
            }
        ));
        assert_eq!(first.await.expect("join"), Ok((json!("bye"), true)));
        let ended = hub
            .app_action("llm", &sid, json!(3), None, Duration::from_secs(5))
            .await;
        assert!(matches!(ended, Err(RouteError::SessionEnded(m)) if m.contains("app ended it")));
        assert_eq!(
            hub.app_terminate("other", &sid),
            Err(RouteError::SessionNotFound)
        );
        let inner = hub.lock();
        assert!(inner.sessions.is_empty() && inner.per_llm.is_empty());
    }

    #[tokio::test]
    async fn an_abandoned_inbox_action_is_withdrawn() {
        let hub = hub();
        hub.touch_inbox("k");
        let h = hub.clone();
        let start = tokio::spawn(async move {
            h.start_app("llm", "app", "k", &req(), Duration::from_secs(5))
                .await
        });
        let entry = hub
            .poll_inbox("k", Duration::from_secs(5))
            .await
            .expect("entry");
        let entry: Value = serde_json::from_str(&entry).expect("json");
        assert_eq!(entry["message_type"], "atp_app_request");
        let sid = entry["request_id"].as_str().expect("id").to_owned();
        assert!(hub.inbox_answer("k", &sid, Ok(json!("ui")), false));
        start.await.expect("join").expect("started");
        // An action whose caller goes before any poll took it.
        let abandoned = tokio::time::timeout(
            Duration::from_millis(20),
            hub.app_action("llm", &sid, json!(1), None, Duration::from_secs(5)),
        )
        .await;
        assert!(abandoned.is_err(), "still waiting when dropped");
        assert!(
            hub.lock().inboxes["k"].queue.is_empty(),
            "its entry left the queue with it"
        );
        assert_eq!(hub.poll_inbox("k", Duration::from_millis(20)).await, None);
        assert!(!hub.inbox_answer("k", &sid, Ok(json!("late")), false));
        // The session is free again.
        let h = hub.clone();
        let s2 = sid.clone();
        let next = tokio::spawn(async move {
            h.app_action("llm", &s2, json!(2), None, Duration::from_secs(5))
                .await
        });
        let entry = hub
            .poll_inbox("k", Duration::from_secs(5))
            .await
            .expect("entry");
        let entry: Value = serde_json::from_str(&entry).expect("json");
        assert_eq!(entry["action_data"], 2);
        assert!(hub.inbox_answer("k", &sid, Ok(json!("two")), false));
        assert_eq!(next.await.expect("join"), Ok((json!("two"), false)));
    }

    #[test]
    fn sessions_and_ended_sessions_are_bounded() {
        let hub = hub();
        {
            let mut inner = hub.lock();
            for i in 0..MAX_SESSIONS_PER_KEY {
                inner.sessions.insert(
                    format!("s{i}"),
                    Session {
                        llm_key_hash: "llm".into(),
                        key_hash: "k".into(),
                        toolkit: "kit".into(),
                        app: "app".into(),
                        via: SessionVia::Socket(1),
                        last_used: Instant::now(),
                        outstanding: None,
                    },
                );
            }
            inner.per_llm.insert("llm".into(), MAX_SESSIONS_PER_KEY);
        }
        hub.add_socket("k");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let refused = rt.block_on(hub.start_app("llm", "app", "k", &req(), Duration::from_secs(1)));
        assert_eq!(
            refused,
            Err(RouteError::TooManySessions(MAX_SESSIONS_PER_KEY))
        );
        let mut inner = hub.lock();
        for i in 0..MAX_SESSIONS_PER_KEY {
            inner.end_session(&format!("s{i}"), "test", RouteError::Disconnected, false);
        }
        for i in 0..MAX_ENDED + 10 {
            inner.sessions.insert(
                format!("e{i}"),
                Session {
                    llm_key_hash: "llm".into(),
                    key_hash: "k".into(),
                    toolkit: "kit".into(),
                    app: "app".into(),
                    via: SessionVia::Inbox,
                    last_used: Instant::now(),
                    outstanding: None,
                },
            );
            inner.end_session(&format!("e{i}"), "test", RouteError::Disconnected, false);
        }
        assert_eq!(inner.ended.len(), MAX_ENDED);
        assert_eq!(inner.ended_order.len(), MAX_ENDED);
        assert!(
            !inner.ended.contains_key("s0"),
            "the oldest are forgotten first"
        );
        assert!(inner.ended.contains_key(&format!("e{}", MAX_ENDED + 9)));
    }
}
