//! The toolkit runtime: [`ToolKitClient::start`] / [`ToolKitClient::stop`]
//! serve a toolkit to an ATP server over a WebSocket (or the server's HTTP
//! inbox), as the seed's `start()` does (ATP-SPEC §4).

mod announce;
mod protocol;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use hyper::Method;
use serde_json::{Value, json};
use tokio::{
    sync::{Semaphore, mpsc, watch},
    task::JoinSet,
};
use tokio_tungstenite::tungstenite::{self, Message, protocol::CloseFrame};

pub use crate::net::NetError;
pub use protocol::{Incoming, ToolRequest, parse_message, tool_response};

use crate::{client::ToolKitClient, net};

/// How the toolkit reaches its ATP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A WebSocket at `/ws/v1/atp/toolkit-client/{api_key}/` (the default).
    WebSocket,
    /// The HTTP inbox the Python client uses with `protocol="http"`: poll
    /// `GET /api/v1/toolkit/{api_key}/inbox`, answer with
    /// `POST …/inbox/respond`.
    Inbox {
        /// How long to wait between polls of an empty inbox.
        poll_interval: Duration,
    },
}

/// Settings of [`ToolKitClient::start`].
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    transport: Transport,
    max_concurrency: usize,
    ping_interval: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    grace_period: Duration,
    request_timeout: Duration,
    handle_ctrl_c: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            transport: Transport::WebSocket,
            max_concurrency: 64,
            ping_interval: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            grace_period: Duration::from_secs(10),
            request_timeout: Duration::from_secs(15),
            handle_ctrl_c: true,
        }
    }
}

impl RuntimeOptions {
    /// WebSocket (default) or the HTTP inbox.
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// How many tool requests run at once (64 by default); more wait.
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = n.max(1);
        self
    }

    /// How often to ping the server (30 s by default). A connection silent
    /// for two intervals is taken as dead and replaced.
    pub fn ping_interval(mut self, every: Duration) -> Self {
        self.ping_interval = every.max(Duration::from_millis(10));
        self
    }

    /// The first and the longest wait between reconnection attempts
    /// (500 ms and 30 s by default); each wait doubles, with jitter.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial.max(Duration::from_millis(1));
        self.backoff_max = max.max(self.backoff_initial);
        self
    }

    /// How long [`ToolKitClient::stop`] lets the calls in flight finish
    /// (10 s by default).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace_period = grace;
        self
    }

    /// The timeout of each HTTP call to the server (15 s by default).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Whether Ctrl-C stops the runtime as [`ToolKitClient::stop`] does
    /// (on by default).
    pub fn handle_ctrl_c(mut self, on: bool) -> Self {
        self.handle_ctrl_c = on;
        self
    }
}

/// Why [`ToolKitClient::start`] returned an error. Connection failures are
/// not errors: the runtime retries them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The base URL is not `http://…` or `https://…`.
    #[error("base_url must start with http:// or https://")]
    InvalidBaseUrl,
    /// `start` was called while the toolkit was already running.
    #[error("this toolkit is already running")]
    AlreadyRunning,
    /// The server refused the toolkit's API key.
    #[error("the ATP server refused the toolkit's API key (HTTP {0})")]
    Unauthorized(u16),
    /// A tokio runtime could not be built (by `start_blocking`).
    #[error("could not start a tokio runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// The start/stop state shared by the clones of a client.
#[derive(Debug)]
pub(crate) struct Control {
    stop: watch::Sender<bool>,
    running: AtomicBool,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            stop: watch::Sender::new(false),
            running: AtomicBool::new(false),
        }
    }
}

struct RunningGuard<'a>(&'a AtomicBool);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// How a connection ended.
enum Ended {
    Stopped,
    Lost(String),
    Unauthorized(u16),
}

/// Exponential backoff with jitter.
struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
    seed: u64,
    attempt: u32,
}

impl Backoff {
    fn new(opts: &RuntimeOptions) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15)
            | 1;
        Self {
            next: opts.backoff_initial,
            initial: opts.backoff_initial,
            max: opts.backoff_max,
            seed,
            attempt: 0,
        }
    }

    fn reset(&mut self) {
        self.next = self.initial;
        self.attempt = 0;
    }

    /// The next wait: between half and all of the current step.
    fn next_delay(&mut self) -> Duration {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        self.attempt += 1;
        let fraction = 0.5 + (self.seed % 1000) as f64 / 2000.0;
        step.mul_f64(fraction)
    }
}

impl ToolKitClient {
    /// Sets the runtime's options (transport, concurrency, pings,
    /// backoff, grace period).
    pub fn with_runtime_options(mut self, options: RuntimeOptions) -> Self {
        std::sync::Arc::make_mut(&mut self.config).runtime = options;
        self
    }

    /// Serves the toolkit to its ATP server until [`stop`](Self::stop)
    /// (or Ctrl-C): announces the tools (`verify_hash`, then
    /// `register_tool` for each), connects to
    /// `{base_url}/ws/v1/atp/toolkit-client/{api_key}/`, answers every
    /// `atp_tool_request` with exactly one `tool_response` (requests run
    /// concurrently), pings every 30 s, and reconnects by itself with
    /// exponential backoff and jitter when the connection is lost.
    ///
    /// Returns `Ok(())` after `stop`, once the calls in flight have finished
    /// (within the grace period) and the socket is closed.
    pub async fn start(&self) -> Result<(), RuntimeError> {
        let base = self.base_url().trim_end_matches('/').to_owned();
        let ws_base = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            return Err(RuntimeError::InvalidBaseUrl);
        };
        if self.control.running.swap(true, Ordering::SeqCst) {
            return Err(RuntimeError::AlreadyRunning);
        }
        let _running = RunningGuard(&self.control.running);
        self.control.stop.send_replace(false);
        let mut stop = self.control.stop.subscribe();
        let opts = self.config.runtime.clone();
        if opts.handle_ctrl_c {
            let control = self.control.clone();
            let mut stop_rx = self.control.stop.subscribe();
            tokio::spawn(async move {
                tokio::select! {
                    r = tokio::signal::ctrl_c() => {
                        if r.is_ok() {
                            tracing::info!("Ctrl-C: stopping the toolkit");
                            control.stop.send_replace(true);
                        }
                    }
                    _ = stopped(&mut stop_rx) => {}
                }
            });
        }
        let http = net::HttpClient::new();
        let mut backoff = Backoff::new(&opts);
        let ws_url = format!(
            "{ws_base}/ws/v1/atp/toolkit-client/{}/",
            self.api_key().expose()
        );
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let ended = self
                .connect_once(&http, &base, &ws_url, &opts, &mut stop, &mut backoff)
                .await;
            match ended {
                Ended::Stopped => {
                    tracing::info!(app = self.app_name(), "toolkit stopped");
                    return Ok(());
                }
                Ended::Unauthorized(status) => return Err(RuntimeError::Unauthorized(status)),
                Ended::Lost(why) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        app = self.app_name(),
                        attempt = backoff.attempt,
                        ?delay,
                        "connection to the ATP server lost ({why}); reconnecting"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stopped(&mut stop) => return Ok(()),
                    }
                }
            }
        }
    }

    /// [`start`](Self::start) for a plain `fn main`: builds a tokio runtime
    /// and blocks until the toolkit stops, as the seed's `start()` keeps
    /// the main thread alive.
    pub fn start_blocking(&self) -> Result<(), RuntimeError> {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(self.start())
    }

    /// Stops [`start`](Self::start): no new requests are taken, the ones in
    /// flight finish (bounded by the grace period), the socket closes with
    /// a close frame, and `start` returns. Callable from any thread.
    pub fn stop(&self) {
        self.control.stop.send_replace(true);
    }

    /// Whether [`start`](Self::start) is running.
    pub fn is_running(&self) -> bool {
        self.control.running.load(Ordering::SeqCst)
    }

    async fn connect_once(
        &self,
        http: &net::HttpClient,
        base: &str,
        ws_url: &str,
        opts: &RuntimeOptions,
        stop: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Ended {
        let announced = tokio::select! {
            r = announce::announce(self, http, base, opts.request_timeout) => r,
            _ = stopped(stop) => return Ended::Stopped,
        };
        match announced {
            Ok(()) => {}
            Err(announce::AnnounceError::Unauthorized(status)) => {
                return Ended::Unauthorized(status);
            }
            Err(e) => return Ended::Lost(e.to_string()),
        }
        match opts.transport {
            Transport::WebSocket => {
                tracing::info!(url = %net::redact_url(ws_url), "connecting to the ATP server");
                let connected = tokio::select! {
                    r = tokio::time::timeout(opts.request_timeout, net::ws_connect(ws_url)) => r,
                    _ = stopped(stop) => return Ended::Stopped,
                };
                let Ok(connected) = connected else {
                    return Ended::Lost("the WebSocket handshake timed out".into());
                };
                match connected {
                    Ok(ws) => {
                        backoff.reset();
                        self.serve_socket(ws, opts, stop).await
                    }
                    Err(tungstenite::Error::Http(resp))
                        if matches!(resp.status().as_u16(), 401 | 403) =>
                    {
                        Ended::Unauthorized(resp.status().as_u16())
                    }
                    Err(e) => Ended::Lost(e.to_string()),
                }
            }
            Transport::Inbox { poll_interval } => {
                self.serve_inbox(http, base, poll_interval, opts, stop, backoff)
                    .await
            }
        }
    }

    async fn serve_socket<S>(
        &self,
        ws: tokio_tungstenite::WebSocketStream<S>,
        opts: &RuntimeOptions,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let permits = Arc::new(Semaphore::new(opts.max_concurrency));
        let mut tasks = JoinSet::new();
        let mut permit = None;
        let mut ping = tokio::time::interval(opts.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut last_seen = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = stopped(stop) => break,
                Some(out) = rx.recv() => {
                    if let Err(e) = net::send_queued(&mut sink, out, &mut rx, Message::text).await {
                        return Ended::Lost(e.to_string());
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                p = permits.clone().acquire_owned(), if permit.is_none() => permit = p.ok(),
                frame = stream.next(), if permit.is_some() => {
                    last_seen = Instant::now();
                    match frame {
                        None => return Ended::Lost("the server closed the connection".into()),
                        Some(Err(e)) => return Ended::Lost(e.to_string()),
                        Some(Ok(Message::Text(text))) => {
                            if let Some(reply) = self.dispatch(text.as_str(), &mut permit, &mut tasks, &tx) {
                                let _ = tx.send(reply);
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let why = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                            return Ended::Lost(format!("the server closed the connection ({why})"));
                        }
                        Some(Ok(Message::Binary(_))) => tracing::warn!("ignoring a binary frame from the ATP server"),
                        Some(Ok(_)) => {}
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() >= opts.ping_interval * 2 {
                        return Ended::Lost("no answer to pings".into());
                    }
                    if let Err(e) = sink.send(Message::Ping(Default::default())).await {
                        return Ended::Lost(e.to_string());
                    }
                }
            }
        }
        // Stopping: take no new request, let the ones in flight finish.
        let deadline = tokio::time::sleep(opts.grace_period);
        tokio::pin!(deadline);
        while !tasks.is_empty() {
            tokio::select! {
                Some(_) = tasks.join_next() => {}
                Some(out) = rx.recv() => { let _ = sink.send(Message::text(out)).await; }
                _ = &mut deadline => {
                    tracing::warn!(left = tasks.len(), "grace period over: abandoning tool calls in flight");
                    break;
                }
            }
        }
        while let Ok(out) = rx.try_recv() {
            let _ = sink.send(Message::text(out)).await;
        }
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: tungstenite::protocol::frame::coding::CloseCode::Normal,
                reason: "toolkit stopping".into(),
            })))
            .await;
        let _ = sink.close().await;
        Ended::Stopped
    }

    /// Handles one text message: a tool request is spawned (consuming the
    /// permit) and answered through `tx`; a malformed one is answered at
    /// once (the returned reply); anything else is logged.
    fn dispatch(
        &self,
        text: &str,
        permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
        tasks: &mut JoinSet<()>,
        tx: &mpsc::UnboundedSender<String>,
    ) -> Option<String> {
        match parse_message(text) {
            Incoming::Connected(message) => {
                tracing::info!(
                    app = self.app_name(),
                    "connected to the ATP server: {message}"
                );
                None
            }
            Incoming::ToolRequest(req) => {
                let held = permit.take();
                let client = self.clone();
                let tx = tx.clone();
                tasks.spawn(async move {
                    let reply = client.answer(req).await;
                    drop(held);
                    let _ = tx.send(reply);
                });
                None
            }
            Incoming::Malformed { request_id, reason } => {
                tracing::warn!("malformed message from the ATP server: {reason}");
                request_id.map(|id| {
                    tool_response(&id, Err(format!("Malformed tool request: {reason}"))).to_string()
                })
            }
            Incoming::Other(kind) => {
                tracing::debug!(kind, "ignoring a message");
                None
            }
        }
    }

    /// Runs one request and builds its `tool_response`.
    pub(crate) async fn answer(&self, req: ToolRequest) -> String {
        let outcome = self
            .call_tool_by_name(&req.tool_name, req.params, req.auth_token)
            .await
            .map_err(|e| e.to_string());
        tool_response(&req.request_id, outcome).to_string()
    }

    async fn serve_inbox(
        &self,
        http: &net::HttpClient,
        base: &str,
        poll_interval: Duration,
        opts: &RuntimeOptions,
        stop: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Ended {
        let inbox = format!("{base}/api/v1/toolkit/{}/inbox", self.api_key().expose());
        let respond = format!("{inbox}/respond");
        let permits = Arc::new(Semaphore::new(opts.max_concurrency));
        let mut tasks = JoinSet::new();
        tracing::info!(url = %net::redact_url(&inbox), "polling the ATP server's inbox");
        let ended = loop {
            if *stop.borrow() {
                break Ended::Stopped;
            }
            while tasks.try_join_next().is_some() {}
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break Ended::Stopped;
            };
            let polled = tokio::select! {
                r = http.json(Method::GET, &inbox, &[], None, opts.request_timeout) => r,
                _ = stopped(stop) => break Ended::Stopped,
            };
            let wait = match polled {
                Ok((401 | 403, _)) => return Ended::Unauthorized(401),
                Ok((200, Value::Object(m))) if !m.is_empty() => {
                    backoff.reset();
                    let msg = Value::Object(m).to_string();
                    match parse_message(&msg) {
                        Incoming::ToolRequest(req) => {
                            let client = self.clone();
                            let http = http.clone();
                            let respond = respond.clone();
                            let timeout = opts.request_timeout;
                            tasks.spawn(async move {
                                let reply = client.answer(req).await;
                                drop(permit);
                                post_inbox_reply(&http, &respond, &reply, timeout).await;
                            });
                        }
                        Incoming::Malformed {
                            request_id: Some(id),
                            reason,
                        } => {
                            let reply = tool_response(
                                &id,
                                Err(format!("Malformed tool request: {reason}")),
                            )
                            .to_string();
                            post_inbox_reply(http, &respond, &reply, opts.request_timeout).await;
                        }
                        _ => {}
                    }
                    Duration::ZERO
                }
                Ok((200, _)) => poll_interval,
                Ok((status, _)) => {
                    tracing::warn!(status, "inbox poll refused");
                    backoff.next_delay()
                }
                Err(e) => return Ended::Lost(e.to_string()),
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stopped(stop) => break Ended::Stopped,
                }
            }
        };
        let deadline = tokio::time::sleep(opts.grace_period);
        tokio::pin!(deadline);
        while !tasks.is_empty() {
            tokio::select! {
                Some(_) = tasks.join_next() => {}
                _ = &mut deadline => break,
            }
        }
        ended
    }
}

/// Resolves once the stop flag is set. (Awaiting `wait_for` inside a
/// `select!` directly would hold its non-`Send` guard in the select's
/// output and make `start()` a non-`Send` future.)
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn post_inbox_reply(http: &net::HttpClient, url: &str, reply: &str, timeout: Duration) {
    // The inbox takes `{"request_id", "response"}`.
    let parsed: Value = serde_json::from_str(reply).unwrap_or(Value::Null);
    let body = json!({"request_id": parsed["request_id"], "response": parsed["result"]});
    match http
        .json(Method::POST, url, &[], Some(&body), timeout)
        .await
    {
        Ok((200..=299, _)) => {}
        Ok((status, _)) => tracing::warn!(status, "the inbox refused a tool response"),
        Err(e) => tracing::warn!("could not post a tool response to the inbox: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn start_can_be_spawned() {
        let client = ToolKitClient::new("k", "a");
        let fut = client.start();
        assert_send(&fut);
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let opts = RuntimeOptions::default()
            .backoff(Duration::from_millis(100), Duration::from_millis(800));
        let mut b = Backoff::new(&opts);
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, step) in delays.iter().zip([100, 200, 400, 800, 800, 800]) {
            let step = Duration::from_millis(step);
            assert!(*d >= step / 2 && *d <= step, "{d:?} for a step of {step:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn start_refuses_a_bad_base_url() {
        let client = ToolKitClient::new("k", "a").with_base_url("ftp://x");
        assert!(matches!(
            client.start().await,
            Err(RuntimeError::InvalidBaseUrl)
        ));
        assert!(!client.is_running());
    }
}
