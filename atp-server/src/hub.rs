//! Routing tool requests to toolkits and their answers back: the live
//! toolkit WebSockets, the HTTP inboxes, and the requests in flight.
//!
//! Every request gets a fresh server-side id, so two LLM clients that use
//! the same `request_id` can never get each other's answers, and an answer
//! is only taken from the connection (or the API key's inbox) the request
//! was sent to.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use atp_registry::{
    Secret,
    wire::{self, RequestId, ServerToToolkit},
};
use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::keys::uuid4;

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
}

impl RouteError {
    pub fn code(&self) -> &str {
        match self {
            RouteError::Failed { code, .. } => code,
            RouteError::NotConnected(_) => "toolkit_not_connected",
            RouteError::Disconnected => "toolkit_disconnected",
            RouteError::Timeout(_) => "toolkit_timeout",
            RouteError::ShuttingDown => "server_shutting_down",
            RouteError::Endpoint(_) => "toolkit_endpoint_error",
        }
    }
}

/// A tool request on its way to a toolkit.
pub(crate) struct ToolRequest {
    pub tool_name: String,
    pub params: Map<String, Value>,
    pub auth_token: Option<Secret>,
}

impl ToolRequest {
    /// The request on the wire, with the hub's id.
    fn on_wire(&self, request_id: &str) -> wire::ToolRequest {
        wire::ToolRequest {
            request_id: RequestId::Str(request_id.to_owned()),
            tool_name: self.tool_name.clone(),
            params: self.params.clone(),
            auth_token: self.auth_token.clone(),
        }
    }
}

/// What a toolkit answered: the result, or its failure (code and message).
pub(crate) type Answer = Result<Value, (Option<String>, String)>;

struct Socket {
    id: u64,
    tx: mpsc::Sender<String>,
}

struct Inbox {
    queue: VecDeque<String>,
    waiting: usize,
    last_seen: Instant,
    notify: Arc<Notify>,
}

impl Inbox {
    fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            waiting: 0,
            last_seen: Instant::now(),
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
}

#[derive(Default)]
struct Inner {
    sockets: HashMap<String, Vec<Socket>>,
    inboxes: HashMap<String, Inbox>,
    pending: HashMap<String, Pending>,
    next_socket: u64,
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
}

impl Hub {
    pub fn new(shutdown: watch::Receiver<bool>, inbox_presence: Duration) -> Self {
        Self {
            inner: Mutex::default(),
            presence: watch::Sender::new(0),
            shutdown,
            inbox_presence,
        }
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

    /// Whether a toolkit with this key is reachable right now: a live
    /// WebSocket, or an inbox that is being polled or was polled lately.
    pub fn is_served(&self, key_hash: &str) -> bool {
        let inner = self.lock();
        inner.sockets.get(key_hash).is_some_and(|s| !s.is_empty())
            || inner
                .inboxes
                .get(key_hash)
                .is_some_and(|i| i.waiting > 0 || i.last_seen.elapsed() <= self.inbox_presence)
    }

    /// Whether a WebSocket or a waiting inbox poll serves this key now.
    pub fn is_live(&self, key_hash: &str) -> bool {
        let inner = self.lock();
        inner.sockets.get(key_hash).is_some_and(|s| !s.is_empty())
            || inner.inboxes.get(key_hash).is_some_and(|i| i.waiting > 0)
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
        } else if inner
            .inboxes
            .get(key_hash)
            .is_some_and(|i| i.waiting > 0 || i.last_seen.elapsed() <= self.inbox_presence)
        {
            Some(Route::Inbox)
        } else {
            None
        }
    }

    /// Sends a request over the key's newest WebSocket, or queues it in its
    /// inbox, and waits for the answer (at most `timeout`, the wait for
    /// room in a slow toolkit's outbox included).
    pub async fn dispatch(
        &self,
        app: &str,
        key_hash: &str,
        request: &ToolRequest,
        timeout: Duration,
    ) -> Result<Value, RouteError> {
        let request_id = uuid4();
        let (tx, rx) = oneshot::channel();
        let socket_tx = {
            let mut inner = self.lock();
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
                    },
                );
                Some(socket_tx)
            } else {
                let inbox = match inner.inboxes.get_mut(key_hash) {
                    Some(i) if i.waiting > 0 || i.last_seen.elapsed() <= self.inbox_presence => i,
                    _ => return Err(RouteError::NotConnected(app.to_owned())),
                };
                inbox.queue.push_back(request_id.clone());
                inbox.notify.notify_one();
                let body = wire::to_json(&request.on_wire(&request_id));
                inner.pending.insert(
                    request_id.clone(),
                    Pending {
                        key_hash: key_hash.to_owned(),
                        via: Via::Inbox { body: Some(body) },
                        tx,
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
                .push(Socket { id, tx });
            id
        };
        self.bump();
        (id, socket_tx, rx)
    }

    /// Forgets a WebSocket; the requests waiting on it fail at once.
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

    /// An answer posted to the inbox of `key_hash`; ignored unless the
    /// request was delivered through that inbox.
    pub fn inbox_answer(&self, key_hash: &str, request_id: &str, result: Answer) -> bool {
        let pending = {
            let mut inner = self.lock();
            match inner.pending.get(request_id) {
                Some(p) if p.key_hash == key_hash && matches!(p.via, Via::Inbox { body: None }) => {
                    inner.pending.remove(request_id)
                }
                _ => None,
            }
        };
        pending.is_some_and(|p| p.tx.send(Ok(result)).is_ok())
    }

    /// Takes the next request from the key's inbox, waiting up to `wait`
    /// for one. `None` when there is none (or the server is stopping).
    pub async fn poll_inbox(&self, key_hash: &str, wait: Duration) -> Option<String> {
        let notify = {
            let mut inner = self.lock();
            // Forget the inboxes of keys that stopped polling long ago.
            let presence = self.inbox_presence;
            inner.inboxes.retain(|_, i| {
                i.waiting > 0 || !i.queue.is_empty() || i.last_seen.elapsed() <= presence * 2
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
        while let Some(request_id) = inbox.queue.pop_front() {
            if let Some(Pending {
                via: Via::Inbox { body },
                ..
            }) = inner.pending.get_mut(&request_id)
                && let Some(b) = body.take()
            {
                return Some(b);
            }
        }
        None
    }
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
            inbox.queue.retain(|id| id != self.request_id);
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
        }
    }

    #[tokio::test]
    async fn socket_round_trip_and_disconnect() {
        let (_tx, rx) = watch::channel(false);
        let hub = Arc::new(Hub::new(rx, Duration::from_secs(60)));
        assert_eq!(
            hub.dispatch("app", "k", &req(), Duration::from_secs(1))
                .await,
            Err(RouteError::NotConnected("app".into()))
        );
        let (id, _tx, mut out) = hub.add_socket("k");
        let h = hub.clone();
        let call =
            tokio::spawn(
                async move { h.dispatch("app", "k", &req(), Duration::from_secs(5)).await },
            );
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
        let call =
            tokio::spawn(
                async move { h.dispatch("app", "k", &req(), Duration::from_secs(5)).await },
            );
        out.recv().await.expect("sent");
        hub.remove_socket("k", id);
        assert_eq!(call.await.expect("join"), Err(RouteError::Disconnected));
        assert!(hub.lock().pending.is_empty());
    }

    #[tokio::test]
    async fn inbox_and_timeout() {
        let (_tx, rx) = watch::channel(false);
        let hub = Arc::new(Hub::new(rx, Duration::from_secs(60)));
        assert_eq!(hub.poll_inbox("k", Duration::from_millis(1)).await, None);
        let h = hub.clone();
        let call =
            tokio::spawn(
                async move { h.dispatch("app", "k", &req(), Duration::from_secs(5)).await },
            );
        let entry = hub
            .poll_inbox("k", Duration::from_secs(5))
            .await
            .expect("entry");
        let entry: Value = serde_json::from_str(&entry).expect("json");
        let rid = entry["request_id"].as_str().expect("id").to_owned();
        assert!(!hub.inbox_answer("other", &rid, Ok(json!(1))));
        assert!(hub.inbox_answer("k", &rid, Ok(json!(2))));
        assert_eq!(call.await.expect("join"), Ok(json!(2)));
        let t = hub
            .dispatch("app", "k", &req(), Duration::from_millis(20))
            .await;
        assert_eq!(t, Err(RouteError::Timeout(Duration::from_millis(20))));
        let inner = hub.lock();
        assert!(inner.pending.is_empty());
        assert!(inner.inboxes["k"].queue.is_empty());
    }
}
