//! The toolkit runtime: [`ToolKitClient::start`] / [`ToolKitClient::stop`]
//! serve a toolkit to an ATP server over a WebSocket (or the server's HTTP
//! inbox), as the Python SDK's `start()` does (docs/PROTOCOL.md §5).

mod announce;
mod apps;
mod report;

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use hyper::Method;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
    task::JoinSet,
};
use tokio_tungstenite::tungstenite;
use tracing::Instrument;

pub use crate::net::NetError;

use crate::{
    client::ToolKitClient,
    net::{
        self,
        session::{self, Flow, Handler, SessionOptions, Tungstenite},
    },
    secret::Secret,
    tool::Progress,
    wire::{
        self, AppAction, InboxReply, RequestId, ServerToToolkit, ToolRequest, ToolResponse,
        ToolkitAppResponse, ToolkitToServer, WireError,
    },
};

use apps::{AppJob, Sessions};

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
    idle_timeout: Option<Duration>,
    report_executions: bool,
    max_app_sessions: usize,
    /// Set by [`ToolKitClient::with_base_urls`] (kept by
    /// [`ToolKitClient::with_runtime_options`]).
    base_urls: Option<BaseUrls>,
}

/// The servers [`ToolKitClient::with_base_urls`] was given.
#[derive(Debug, Clone)]
struct BaseUrls {
    /// In order of preference; may be empty (an error at `start`).
    urls: Vec<String>,
    /// What `with_base_urls` set the client's `base_url` to: once a later
    /// `with_base_url` has changed it, the list no longer applies.
    base_url: String,
}

impl RuntimeOptions {
    /// Forgets the list of [`ToolKitClient::with_base_urls`] (a later
    /// `with_base_url` replaces it).
    pub(crate) fn forget_base_urls(&mut self) {
        self.base_urls = None;
    }
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
            idle_timeout: None,
            report_executions: false,
            max_app_sessions: 1024,
            base_urls: None,
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

    /// Stops the runtime once it has been idle this long — no request
    /// (tool call or app message) has arrived and none is running — as
    /// the Python client's `idle_timeout` does: [`ToolKitClient::start`]
    /// then returns `Ok(())` as after [`ToolKitClient::stop`]. Off by
    /// default. The time counts from `start`, across reconnections; an
    /// open app session alone does not keep the runtime alive.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self
    }

    /// Reports each tool call's result to the server (off by default):
    /// `POST {base_url}/api/v1/execute_function` with
    /// `{"exchange_token", "result", "function_id"}`, the token being the
    /// one `register_tool` answered for the tool. Reports are sent in the
    /// background after the answer (at most 16 at once; more are dropped)
    /// and never delay it. A token the server refuses is forgotten until
    /// the tool is registered again. With reports on, the runtime
    /// registers every tool at each connection (skipping the
    /// `verify_hash` shortcut), since only a registration issues a token.
    pub fn report_executions(mut self, on: bool) -> Self {
        self.report_executions = on;
        self
    }

    /// How many app sessions a connection keeps at once (1024 by
    /// default); past it, the session used least recently is ended.
    pub fn max_app_sessions(mut self, n: usize) -> Self {
        self.max_app_sessions = n.max(1);
        self
    }
}

/// Why [`ToolKitClient::start`] returned an error. Connection failures are
/// not errors: the runtime retries them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The base URL (or one of [`with_base_urls`]'s) is not `http://…`
    /// or `https://…`.
    ///
    /// [`with_base_urls`]: ToolKitClient::with_base_urls
    #[error("base_url must start with http:// or https://")]
    InvalidBaseUrl,
    /// [`ToolKitClient::with_base_urls`] was given an empty list.
    #[error("with_base_urls was given no URL")]
    NoBaseUrl,
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
    /// Bumped by each tool registration: a running toolkit announces it.
    tools: watch::Sender<u64>,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            stop: watch::Sender::new(false),
            running: AtomicBool::new(false),
            tools: watch::Sender::new(0),
        }
    }
}

impl Control {
    /// A tool was registered.
    pub(crate) fn tool_added(&self) {
        self.tools.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// What one run of [`ToolKitClient::start`] shares between its
/// connections and tasks.
pub(crate) struct Shared {
    client: ToolKitClient,
    http: net::HttpClient,
    /// The servers to connect to, in order of preference (at least one).
    endpoints: Vec<Endpoint>,
    /// The index in `endpoints` of the server the runtime connects to now.
    current: AtomicUsize,
    opts: RuntimeOptions,
    activity: Activity,
    /// The exchange token of each tool, from its `register_tool` answer.
    tokens: Mutex<HashMap<String, Secret>>,
    /// Bounds the execution reports in flight.
    reports: Arc<Semaphore>,
}

/// One ATP server the runtime may connect to.
#[derive(Debug)]
struct Endpoint {
    /// The base URL, without a trailing `/`.
    base: String,
    /// The toolkit's WebSocket URL on this server.
    ws: String,
}

impl Endpoint {
    /// The endpoint of `base_url` for the toolkit with this API key; `None`
    /// if the URL is not `http://…` or `https://…`.
    fn new(base_url: &str, api_key: &str) -> Option<Self> {
        let base = base_url.trim_end_matches('/').to_owned();
        let ws_base = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            return None;
        };
        let ws = format!("{ws_base}/ws/v1/atp/toolkit-client/{api_key}/");
        Some(Self { base, ws })
    }
}

impl Shared {
    /// The server the runtime connects to now.
    fn endpoint(&self) -> &Endpoint {
        &self.endpoints[self.current.load(Ordering::Acquire) % self.endpoints.len()]
    }

    /// The base URL of the server the runtime connects to now, without a
    /// trailing `/`: where the HTTP calls (announcements, inbox, reports)
    /// go.
    fn base(&self) -> &str {
        &self.endpoint().base
    }
}

/// Which server the next connection goes to, and how long to wait before
/// it (see [`ToolKitClient::with_base_urls`]): round robin through the
/// servers, the backoff once a whole round of them has failed.
#[derive(Debug)]
struct Rotation {
    /// The index of the server tried now.
    current: usize,
    /// How many connections in a row have ended in this round. The loss
    /// of a connection that was up is the first of a new round.
    failures: usize,
    /// When each server was last tried, since the last backoff wait.
    tried: Vec<Option<Instant>>,
    /// The least time between two tries of the same server without a
    /// backoff wait between them (the first backoff step): servers that
    /// accept connections and drop them at once are not hammered.
    min_gap: Duration,
}

/// How long to wait before the next connection.
#[derive(Debug, PartialEq, Eq)]
enum Wait {
    /// A whole round of servers failed: the next backoff step.
    Backoff,
    /// This long (usually zero: the next server is tried at once).
    For(Duration),
}

impl Rotation {
    fn new(servers: usize, min_gap: Duration) -> Self {
        Self {
            current: 0,
            failures: 0,
            tried: vec![None; servers.max(1)],
            min_gap,
        }
    }

    /// The current server is being tried now.
    fn trying(&mut self, now: Instant) {
        self.tried[self.current] = Some(now);
    }

    /// The connection to the current server ended (`established`: after it
    /// was up): moves on to the next server and says how long to wait.
    fn ended(&mut self, established: bool, now: Instant) -> Wait {
        self.failures = if established { 1 } else { self.failures + 1 };
        self.current = (self.current + 1) % self.tried.len();
        if self.failures >= self.tried.len() {
            self.failures = 0;
            self.tried.fill(None);
            return Wait::Backoff;
        }
        let gap = self.tried[self.current].map_or(Duration::ZERO, |last| {
            (last + self.min_gap).saturating_duration_since(now)
        });
        Wait::For(gap)
    }
}

/// When the last request came, and how many are running: the idle
/// timeout's clock.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_ms.fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// How long the runtime has been idle (zero while a request runs).
    fn idle_for(&self) -> Duration {
        if self.busy.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        )
    }
}

/// A request running: the runtime is not idle.
struct Busy(Arc<Shared>);

impl Busy {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.activity.busy.fetch_add(1, Ordering::AcqRel);
        shared.activity.touch();
        Self(shared.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.activity.touch();
        self.0.activity.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Resolves once the runtime has been idle for `limit`.
async fn idle(shared: &Shared, limit: Duration) {
    loop {
        let idle = shared.activity.idle_for();
        if idle >= limit {
            return;
        }
        tokio::time::sleep(limit - idle).await;
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

#[cfg_attr(docsrs, doc(cfg(feature = "runtime")))]
impl ToolKitClient {
    /// Sets the runtime's options (transport, concurrency, pings,
    /// backoff, grace period, idle timeout, execution reports).
    pub fn with_runtime_options(mut self, mut options: RuntimeOptions) -> Self {
        let config = std::sync::Arc::make_mut(&mut self.config);
        options.base_urls = config.runtime.base_urls.take();
        config.runtime = options;
        self
    }

    /// Sets several ATP servers to serve the toolkit through — instances
    /// of one atp-server listed one by one rather than behind a load
    /// balancer, say — in order of preference: the runtime
    /// ([`start`](Self::start)) fails over from one to the next. [`with_base_url`](Self::with_base_url) is the case
    /// of one server; the last call of either wins, and
    /// [`base_url`](Self::base_url) is the list's first URL.
    ///
    /// - `start` connects to the first URL.
    /// - When a connection fails (the server is unreachable, refuses the
    ///   WebSocket, or an announcement — `verify_hash`, `register_tool` —
    ///   can not reach it) or drops (the server went away, stopped
    ///   answering pings, or an inbox poll could not reach it), the next
    ///   attempt goes to the next URL, round robin, at once: a dead
    ///   server costs one failed connection, not a backoff wait. The
    ///   [backoff](RuntimeOptions::backoff) applies only once a whole
    ///   round of URLs has failed in a row (it starts again from its first
    ///   step once a connection is up). A server is not tried twice within
    ///   the first backoff step without a backoff wait between, so
    ///   servers that accept connections and drop them at once are not
    ///   hammered.
    /// - Every HTTP call the runtime makes — announcing the tools, the
    ///   [inbox](Transport::Inbox) polls and answers, execution reports —
    ///   goes to the server it connects to now, and moves on with it.
    /// - The runtime stays with a server while its connection lasts: it
    ///   does not move back to an earlier URL by itself.
    ///
    /// An empty list ([`RuntimeError::NoBaseUrl`]) or a URL that is not
    /// `http://…` or `https://…` ([`RuntimeError::InvalidBaseUrl`]) makes
    /// `start` fail at once, as a bad [`with_base_url`](Self::with_base_url)
    /// does. A server that refuses the API key ends `start` with
    /// [`RuntimeError::Unauthorized`], whichever it is.
    ///
    /// ```
    /// use atp_registry::ToolKitClient;
    ///
    /// let client = ToolKitClient::new("key", "my_app")
    ///     .with_base_urls(["http://10.0.0.1:8080", "http://10.0.0.2:8080"]);
    /// assert_eq!(client.base_url(), "http://10.0.0.1:8080");
    /// // client.start().await? — served by 10.0.0.1, or 10.0.0.2 while it is down.
    /// ```
    pub fn with_base_urls(self, urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let urls: Vec<String> = urls.into_iter().map(Into::into).collect();
        let base_url = urls.first().cloned().unwrap_or_default();
        let mut client = self.with_base_url(base_url.clone());
        std::sync::Arc::make_mut(&mut client.config)
            .runtime
            .base_urls = Some(BaseUrls { urls, base_url });
        client
    }

    /// The servers `start` connects to, in order of preference: the list
    /// of [`with_base_urls`](Self::with_base_urls), unless a later
    /// [`with_base_url`](Self::with_base_url) replaced it.
    fn endpoints(&self) -> Result<Vec<Endpoint>, RuntimeError> {
        let key = self.api_key().expose();
        let base_url = self.base_url();
        let list = self.config.runtime.base_urls.as_ref();
        let Some(list) = list.filter(|l| l.base_url == base_url) else {
            let endpoint = Endpoint::new(base_url, key).ok_or(RuntimeError::InvalidBaseUrl)?;
            return Ok(vec![endpoint]);
        };
        if list.urls.is_empty() {
            return Err(RuntimeError::NoBaseUrl);
        }
        list.urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                Endpoint::new(url, key).ok_or_else(|| {
                    tracing::error!(
                        position = i,
                        url = %net::redact_url(url),
                        "with_base_urls: not an http:// or https:// URL"
                    );
                    RuntimeError::InvalidBaseUrl
                })
            })
            .collect()
    }

    /// Serves the toolkit to its ATP server until [`stop`](Self::stop)
    /// (or Ctrl-C, or the [idle timeout](RuntimeOptions::idle_timeout)):
    /// announces the tools (`verify_hash`, then `register_tool` for each),
    /// connects to `{base_url}/ws/v1/atp/toolkit-client/{api_key}/`,
    /// answers every `atp_tool_request` with exactly one `tool_response`
    /// (requests run concurrently), serves the sessions of the toolkit's
    /// [apps](Self::register_app), pings every 30 s, and reconnects by
    /// itself with exponential backoff and jitter when the connection is
    /// lost — moving on to the next server first, at once, when it was
    /// given [several](Self::with_base_urls). A tool registered while it
    /// runs is announced at once and served.
    ///
    /// Returns `Ok(())` after `stop`, once the calls in flight have finished
    /// (within the grace period) and the socket is closed.
    pub async fn start(&self) -> Result<(), RuntimeError> {
        let endpoints = self.endpoints()?;
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
        let shared = Arc::new(Shared {
            client: self.clone(),
            http: net::HttpClient::new(),
            endpoints,
            current: AtomicUsize::new(0),
            opts: opts.clone(),
            activity: Activity::new(),
            tokens: Mutex::default(),
            reports: Arc::new(Semaphore::new(report::MAX_IN_FLIGHT)),
        });
        if let Some(limit) = opts.idle_timeout {
            let (shared, control) = (shared.clone(), self.control.clone());
            let mut stop_rx = self.control.stop.subscribe();
            tokio::spawn(async move {
                tokio::select! {
                    _ = idle(&shared, limit) => {
                        tracing::info!(app = shared.client.app_name(), ?limit, "idle timeout: stopping the toolkit");
                        control.stop.send_replace(true);
                    }
                    _ = stopped(&mut stop_rx) => {}
                }
            });
        }
        let mut backoff = Backoff::new(&opts);
        let mut rotation = Rotation::new(shared.endpoints.len(), opts.backoff_initial);
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            rotation.trying(Instant::now());
            let mut established = false;
            let ended = connect_once(&shared, &mut stop, &mut backoff, &mut established).await;
            match ended {
                Ended::Stopped => {
                    tracing::info!(app = self.app_name(), "toolkit stopped");
                    return Ok(());
                }
                Ended::Unauthorized(status) => return Err(RuntimeError::Unauthorized(status)),
                Ended::Lost(why) => {
                    let lost = net::redact_url(shared.base());
                    let wait = rotation.ended(established, Instant::now());
                    shared.current.store(rotation.current, Ordering::Release);
                    let next = net::redact_url(shared.base());
                    let delay = match wait {
                        Wait::Backoff => {
                            let delay = backoff.next_delay();
                            tracing::warn!(
                                app = self.app_name(),
                                attempt = backoff.attempt,
                                ?delay,
                                "connection to the ATP server {lost} lost ({why}); reconnecting to {next}"
                            );
                            delay
                        }
                        Wait::For(delay) => {
                            tracing::warn!(
                                app = self.app_name(),
                                ?delay,
                                "connection to the ATP server {lost} lost ({why}); trying {next}"
                            );
                            delay
                        }
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stopped(&mut stop) => return Ok(()),
                    }
                }
            }
        }
    }

    /// [`start`](Self::start) for a plain `fn main`: builds a tokio runtime
    /// and blocks until the toolkit stops, as the Python SDK's `start()` keeps
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

    /// What a frame from the server asks of the runtime: the one decision
    /// both transports (and the fuzz target) share.
    fn classify(&self, text: &str) -> Dispatch {
        match ServerToToolkit::parse(text) {
            Ok(ServerToToolkit::ToolRequest(req)) => Dispatch::Run(req),
            Ok(ServerToToolkit::AppRequest(req)) => Dispatch::Start(req),
            Ok(ServerToToolkit::AppAction(action)) => Dispatch::Action(action),
            Ok(ServerToToolkit::AppTerminate { request_id }) => Dispatch::Terminate(request_id),
            Ok(ServerToToolkit::Connected { message }) => {
                tracing::info!(
                    app = self.app_name(),
                    "connected to the ATP server: {message}"
                );
                Dispatch::Nothing
            }
            Ok(ServerToToolkit::Error { message }) => {
                tracing::warn!(
                    app = self.app_name(),
                    "the ATP server reports an error: {message}"
                );
                Dispatch::Nothing
            }
            Ok(other) => {
                tracing::debug!(?other, "ignoring a message");
                Dispatch::Nothing
            }
            Err(
                e @ WireError::Invalid {
                    kind: "atp_tool_request",
                    ..
                },
            ) => {
                tracing::warn!("malformed message from the ATP server: {e}");
                Dispatch::Reply(ToolkitToServer::ToolResponse(ToolResponse::error(
                    e.request_id().cloned(),
                    "invalid_message",
                    format!("Malformed tool request: {e}"),
                )))
            }
            Err(
                ref e @ WireError::Invalid {
                    kind: "atp_app_request",
                    request_id: Some(ref id),
                    ..
                },
            ) => {
                tracing::warn!("malformed message from the ATP server: {e}");
                Dispatch::Reply(ToolkitToServer::AppResponse(ToolkitAppResponse {
                    request_id: id.clone(),
                    result: wire::error_result(format!("Malformed app request: {e}")),
                    is_error: Some(true),
                    terminated: Some(true),
                }))
            }
            Err(e) => {
                tracing::debug!("ignoring a message: {e}");
                Dispatch::Nothing
            }
        }
    }

    /// Runs one request: its `tool_response`, with the error flag and the
    /// error's code on a failure. Reports of progress go to `progress`.
    ///
    /// The tool runs in an `atp.tool` span (fields `toolkit`, `tool`,
    /// `request_id`, `trace_id`) that joins the request's trace
    /// (`traceparent`), see [`crate::trace`].
    pub(crate) async fn answer(&self, req: ToolRequest, progress: Progress) -> ToolResponse {
        let span = tracing::info_span!(
            "atp.tool",
            toolkit = self.app_name(),
            tool = %req.tool_name,
            request_id = %req.request_id,
            trace_id = tracing::field::Empty,
        );
        crate::trace::link(&span, req.trace().as_ref());
        let id = Some(req.request_id);
        let outcome = match self.tool(&req.tool_name) {
            None => Err(crate::CallError::ToolNotFound),
            Some(tool) => {
                tool.call(self, req.params, req.auth_token, progress)
                    .instrument(span)
                    .await
            }
        };
        match outcome {
            Ok(result) => ToolResponse::ok(id, result),
            Err(e) => ToolResponse::error(id, e.code().as_str(), e.to_string()),
        }
    }

    /// The answer the runtime sends to one text frame from the server, if
    /// any — what [`start`](Self::start) does with it, run inline. For
    /// tests and fuzzing. It keeps no app sessions: an `atp_app_request`
    /// is answered (the session is then forgotten), an `atp_app_action` or
    /// `atp_app_terminate` is not.
    #[doc(hidden)]
    pub async fn reply_to_frame(&self, text: &str) -> Option<ToolkitToServer> {
        match self.classify(text) {
            Dispatch::Run(req) => Some(ToolkitToServer::ToolResponse(
                self.answer(req, Progress::default()).await,
            )),
            Dispatch::Start(req) => {
                let sessions = Sessions::new(1);
                let job = sessions.start(self, req);
                Some(ToolkitToServer::AppResponse(job.run(&sessions, self).await))
            }
            Dispatch::Action(_) | Dispatch::Terminate(_) | Dispatch::Nothing => None,
            Dispatch::Reply(r) => Some(r),
        }
    }
}

/// One connection: announce the tools, connect, serve until the
/// connection ends — while announcing the tools registered meanwhile.
///
/// `established` is set once the connection is up (the WebSocket open, or
/// an inbox poll answered).
async fn connect_once(
    shared: &Arc<Shared>,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
    established: &mut bool,
) -> Ended {
    let ws_url = shared.endpoint().ws.as_str();
    let client = &shared.client;
    let opts = &shared.opts;
    // Subscribed before the snapshot: a tool registered after it is seen.
    let mut changes = client.control.tools.subscribe();
    changes.borrow_and_update();
    let tools = client.registered_tools();
    let announced = tokio::select! {
        r = announce::announce(shared, &tools, None) => r,
        _ = stopped(stop) => return Ended::Stopped,
    };
    match announced {
        Ok(()) => {}
        Err(announce::AnnounceError::Unauthorized(status)) => {
            return Ended::Unauthorized(status);
        }
        Err(e) => return Ended::Lost(e.to_string()),
    }
    let known = tools.iter().map(|t| t.name().to_owned()).collect();
    let serve = async {
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
                        *established = true;
                        backoff.reset();
                        // A connection counts as activity, as the Python
                        // client's greeting does.
                        shared.activity.touch();
                        serve_socket(shared, ws, stop).await
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
                serve_inbox(shared, poll_interval, stop, backoff, established).await
            }
        }
    };
    tokio::select! {
        ended = serve => ended,
        never = announce::announce_live(shared, changes, known) => match never {},
    }
}

async fn serve_socket<S>(
    shared: &Arc<Shared>,
    ws: tokio_tungstenite::WebSocketStream<S>,
    stop: &mut watch::Receiver<bool>,
) -> Ended
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let opts = &shared.opts;
    let (sink, stream) = ws.split();
    let (tx, rx) = session::outbox();
    let mut handler = SocketHandler {
        shared: shared.clone(),
        sessions: Arc::new(Sessions::new(opts.max_app_sessions)),
        permits: Arc::new(Semaphore::new(opts.max_concurrency)),
        permit: None,
        tasks: JoinSet::new(),
        tx,
    };
    let session_opts = SessionOptions {
        ping_interval: opts.ping_interval,
        grace_period: opts.grace_period,
        stop_close: (1000, "toolkit stopping"),
    };
    let ended = session::run::<Tungstenite, _, _, _, _>(
        sink,
        stream,
        rx,
        &mut handler,
        &session_opts,
        None,
        stopped(stop),
    )
    .await;
    match ended {
        session::Ended::Stopped => Ended::Stopped,
        session::Ended::Closed(why) => {
            Ended::Lost(format!("the server closed the connection ({why})"))
        }
        session::Ended::Dead => Ended::Lost("no answer to pings".into()),
        session::Ended::Failed(e) => Ended::Lost(e),
        session::Ended::Refused | session::Ended::OutboxClosed => {
            Ended::Lost("the connection was closed".into())
        }
    }
}

/// An inbox entry for an app carries its fields at the top
/// (`{"message_type": "atp_app_request", "request_id", …}`): it is read
/// as the WebSocket frame `{"message_type", "payload": {…}}`.
fn inbox_frame(text: &str) -> Cow<'_, str> {
    if !text.contains("message_type") {
        return Cow::Borrowed(text);
    }
    let Ok(serde_json::Value::Object(mut m)) = serde_json::from_str::<serde_json::Value>(text)
    else {
        return Cow::Borrowed(text);
    };
    if m.contains_key("payload") {
        return Cow::Borrowed(text);
    }
    let Some(kind) = m.remove("message_type") else {
        return Cow::Borrowed(text);
    };
    let mut frame = serde_json::Map::with_capacity(2);
    frame.insert("message_type".into(), kind);
    frame.insert("payload".into(), serde_json::Value::Object(m));
    Cow::Owned(serde_json::Value::Object(frame).to_string())
}

async fn serve_inbox(
    shared: &Arc<Shared>,
    poll_interval: Duration,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
    established: &mut bool,
) -> Ended {
    let (client, http, opts) = (&shared.client, &shared.http, &shared.opts);
    let inbox = format!(
        "{}/api/v1/toolkit/{}/inbox",
        shared.base(),
        client.api_key().expose()
    );
    let respond: Arc<str> = format!("{inbox}/respond").into();
    let permits = Arc::new(Semaphore::new(opts.max_concurrency));
    let sessions = Arc::new(Sessions::new(opts.max_app_sessions));
    let mut tasks = JoinSet::new();
    shared.activity.touch();
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
            r = http.send(Method::GET, &inbox, &[], None, opts.request_timeout) => r,
            _ = stopped(stop) => break Ended::Stopped,
        };
        let wait = match polled {
            Ok((status @ (401 | 403), _)) => break Ended::Unauthorized(status),
            Ok((200, body)) => {
                if !*established {
                    // The server answers: the connection is up.
                    *established = true;
                    backoff.reset();
                }
                let entry = std::str::from_utf8(&body)
                    .ok()
                    .filter(|t| !t.trim().is_empty());
                let dispatch = match entry {
                    Some(text) => client.classify(&inbox_frame(text)),
                    None => Dispatch::Nothing,
                };
                let timeout = opts.request_timeout;
                match dispatch {
                    Dispatch::Nothing => poll_interval,
                    Dispatch::Run(req) => {
                        backoff.reset();
                        let busy = Busy::new(shared);
                        let (shared, respond) = (shared.clone(), respond.clone());
                        tasks.spawn(async move {
                            let reply = shared.answer(req, Progress::default()).await;
                            drop((permit, busy));
                            post_inbox(&shared.http, &respond, &InboxReply::from(reply), timeout)
                                .await;
                        });
                        Duration::ZERO
                    }
                    Dispatch::Start(req) => {
                        backoff.reset();
                        let job = sessions.start(client, req);
                        spawn_inbox_app(&mut tasks, shared, &sessions, &respond, job, permit);
                        Duration::ZERO
                    }
                    Dispatch::Action(action) => {
                        backoff.reset();
                        let job = sessions.action(client, action);
                        spawn_inbox_app(&mut tasks, shared, &sessions, &respond, job, permit);
                        Duration::ZERO
                    }
                    Dispatch::Terminate(id) => {
                        shared.activity.touch();
                        sessions.terminate(&id);
                        Duration::ZERO
                    }
                    Dispatch::Reply(ToolkitToServer::ToolResponse(reply)) => {
                        post_inbox(http, &respond, &InboxReply::from(reply), timeout).await;
                        Duration::ZERO
                    }
                    Dispatch::Reply(ToolkitToServer::AppResponse(reply)) => {
                        post_inbox(http, &respond, &InboxAppReply::from(reply), timeout).await;
                        Duration::ZERO
                    }
                    Dispatch::Reply(_) => Duration::ZERO,
                }
            }
            Ok((status, _)) => {
                tracing::warn!(status, "inbox poll refused");
                backoff.next_delay()
            }
            Err(e) => break Ended::Lost(e.to_string()),
        };
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopped(stop) => break Ended::Stopped,
            }
        }
    };
    // However the loop ended, the calls in flight finish (bounded) and
    // their answers are posted.
    let deadline = tokio::time::sleep(opts.grace_period);
    tokio::pin!(deadline);
    while !tasks.is_empty() {
        tokio::select! {
            Some(_) = tasks.join_next() => {}
            _ = &mut deadline => {
                tracing::warn!(left = tasks.len(), "grace period over: abandoning tool calls in flight");
                break;
            }
        }
    }
    ended
}

/// Runs an app message taken from the inbox and posts its answer.
fn spawn_inbox_app(
    tasks: &mut JoinSet<()>,
    shared: &Arc<Shared>,
    sessions: &Arc<Sessions>,
    respond: &Arc<str>,
    job: AppJob,
    permit: OwnedSemaphorePermit,
) {
    let busy = Busy::new(shared);
    let (shared, respond, sessions) = (shared.clone(), respond.clone(), sessions.clone());
    tasks.spawn(async move {
        let reply = job.run(&sessions, &shared.client).await;
        drop((permit, busy));
        let timeout = shared.opts.request_timeout;
        post_inbox(&shared.http, &respond, &InboxAppReply::from(reply), timeout).await;
    });
}

impl Shared {
    /// Runs a tool request and, when asked to, reports its execution.
    async fn answer(self: &Arc<Self>, req: ToolRequest, progress: Progress) -> ToolResponse {
        let name = self.opts.report_executions.then(|| req.tool_name.clone());
        let reply = self.client.answer(req, progress.clone()).await;
        progress.finish();
        if let Some(name) = name {
            report::report(self, &name, &reply.result);
        }
        reply
    }
}

/// What to do with a frame from the server.
enum Dispatch {
    /// Run this tool request and answer it.
    Run(ToolRequest),
    /// Start an app session.
    Start(ToolRequest),
    /// A user's action in an app session.
    Action(AppAction),
    /// End an app session (nothing to answer).
    Terminate(RequestId),
    /// Answer at once.
    Reply(ToolkitToServer),
    /// Nothing to answer.
    Nothing,
}

/// The runtime's side of its WebSocket session.
struct SocketHandler {
    shared: Arc<Shared>,
    sessions: Arc<Sessions>,
    permits: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
    tasks: JoinSet<()>,
    tx: mpsc::Sender<String>,
}

impl SocketHandler {
    fn run_app(&mut self, job: AppJob) -> Flow {
        if let AppJob::Answer(reply) = job {
            return Flow::Reply(ToolkitToServer::AppResponse(reply).to_json());
        }
        let busy = Busy::new(&self.shared);
        let held = self.permit.take();
        let (shared, sessions, tx) = (self.shared.clone(), self.sessions.clone(), self.tx.clone());
        self.tasks.spawn(async move {
            let reply = job.run(&sessions, &shared.client).await;
            drop((held, busy));
            let _ = tx.send(ToolkitToServer::AppResponse(reply).to_json()).await;
        });
        Flow::Continue
    }
}

impl Handler for SocketHandler {
    async fn ready(&mut self) {
        if self.permit.is_none() {
            self.permit = self.permits.clone().acquire_owned().await.ok();
        }
    }

    fn on_text(&mut self, text: &str) -> Flow {
        while self.tasks.try_join_next().is_some() {}
        match self.shared.client.classify(text) {
            Dispatch::Run(req) => {
                let busy = Busy::new(&self.shared);
                let held = self.permit.take();
                let progress = Progress::channel(req.request_id.clone(), self.tx.clone(), req.logs);
                let (shared, tx) = (self.shared.clone(), self.tx.clone());
                self.tasks.spawn(async move {
                    let reply = shared.answer(req, progress).await;
                    drop((held, busy));
                    let _ = tx.send(reply.to_json()).await;
                });
                Flow::Continue
            }
            Dispatch::Start(req) => {
                let job = self.sessions.start(&self.shared.client, req);
                self.run_app(job)
            }
            Dispatch::Action(action) => {
                let job = self.sessions.action(&self.shared.client, action);
                self.run_app(job)
            }
            Dispatch::Terminate(id) => {
                self.shared.activity.touch();
                self.sessions.terminate(&id);
                Flow::Continue
            }
            Dispatch::Reply(reply) => Flow::Reply(reply.to_json()),
            Dispatch::Nothing => Flow::Continue,
        }
    }

    fn on_binary(&mut self) -> Flow {
        tracing::warn!("ignoring a binary frame from the ATP server");
        Flow::Continue
    }

    async fn drained(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Resolves once the stop flag is set. (Awaiting `wait_for` inside a
/// `select!` directly would hold its non-`Send` guard in the select's
/// output and make `start()` a non-`Send` future.)
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// An app's answer through the inbox: `{"request_id", "response",
/// "is_error", "terminated"}`.
#[derive(serde::Serialize)]
struct InboxAppReply {
    request_id: RequestId,
    response: serde_json::Value,
    is_error: bool,
    terminated: bool,
}

impl From<ToolkitAppResponse> for InboxAppReply {
    fn from(r: ToolkitAppResponse) -> Self {
        Self {
            request_id: r.request_id,
            response: r.result,
            is_error: r.is_error.unwrap_or(false),
            terminated: r.terminated.unwrap_or(false),
        }
    }
}

async fn post_inbox(
    http: &net::HttpClient,
    url: &str,
    reply: &impl serde::Serialize,
    timeout: Duration,
) {
    match http.post_json(url, reply, timeout).await {
        Ok((200..=299, _)) => {}
        Ok((status, _)) => tracing::warn!(status, "the inbox refused an answer"),
        Err(e) => tracing::warn!("could not post an answer to the inbox: {e}"),
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

    fn bases(client: &ToolKitClient) -> Result<Vec<String>, RuntimeError> {
        Ok(client.endpoints()?.into_iter().map(|e| e.base).collect())
    }

    #[test]
    fn the_last_of_with_base_url_and_with_base_urls_wins() {
        let one = ToolKitClient::new("k", "a").with_base_url("http://one/");
        assert_eq!(bases(&one).unwrap(), ["http://one"]);
        let list = one.with_base_urls(["http://a", "https://b/"]);
        assert_eq!(list.base_url(), "http://a");
        assert_eq!(bases(&list).unwrap(), ["http://a", "https://b"]);
        let ws: Vec<String> = list
            .endpoints()
            .unwrap()
            .into_iter()
            .map(|e| e.ws)
            .collect();
        assert_eq!(
            ws,
            [
                "ws://a/ws/v1/atp/toolkit-client/k/",
                "wss://b/ws/v1/atp/toolkit-client/k/"
            ]
        );
        // A later single URL replaces the list, even its own first URL.
        let back = list.clone().with_base_url("http://a");
        assert_eq!(bases(&back).unwrap(), ["http://a"]);
        // Runtime options set afterwards keep the list.
        let list = list.with_runtime_options(RuntimeOptions::default());
        assert_eq!(bases(&list).unwrap(), ["http://a", "https://b"]);
        let one = list.clone().with_base_url("http://c");
        assert_eq!(bases(&one).unwrap(), ["http://c"]);
        let again = one.with_base_urls(vec![String::from("http://d")]);
        assert_eq!(bases(&again).unwrap(), ["http://d"]);
    }

    #[tokio::test]
    async fn start_refuses_an_empty_list_or_a_bad_url_in_it() {
        let empty = ToolKitClient::new("k", "a").with_base_urls(Vec::<String>::new());
        assert!(matches!(empty.start().await, Err(RuntimeError::NoBaseUrl)));
        let bad = ToolKitClient::new("k", "a").with_base_urls(["http://a", "ftp://b"]);
        assert!(matches!(
            bad.start().await,
            Err(RuntimeError::InvalidBaseUrl)
        ));
        assert!(!bad.is_running());
        // A URL set afterwards replaces the empty list.
        let fixed = empty.with_base_url("ftp://x");
        assert!(matches!(
            fixed.start().await,
            Err(RuntimeError::InvalidBaseUrl)
        ));
    }

    #[test]
    fn rotation_is_round_robin_with_the_backoff_after_a_whole_round() {
        let gap = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut r = Rotation::new(3, gap);
        // Failed connections: the next server at once, the backoff after
        // the third.
        r.trying(t0);
        assert_eq!(r.ended(false, t0), Wait::For(Duration::ZERO));
        assert_eq!(r.current, 1);
        r.trying(t0);
        assert_eq!(r.ended(false, t0), Wait::For(Duration::ZERO));
        assert_eq!(r.current, 2);
        r.trying(t0);
        assert_eq!(r.ended(false, t0), Wait::Backoff);
        assert_eq!(r.current, 0);
        // After the backoff, a new round: 0 is up, then lost; 1 and 2 are
        // tried at once, then the backoff.
        let t1 = t0 + Duration::from_secs(10);
        r.trying(t1);
        assert_eq!(r.ended(true, t1), Wait::For(Duration::ZERO));
        assert_eq!(r.current, 1);
        r.trying(t1);
        assert_eq!(r.ended(false, t1), Wait::For(Duration::ZERO));
        r.trying(t1);
        assert_eq!(r.ended(false, t1), Wait::Backoff);
        assert_eq!(r.current, 0);
    }

    #[test]
    fn servers_that_drop_connections_at_once_are_not_hammered() {
        let gap = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut r = Rotation::new(2, gap);
        r.trying(t0);
        // Up, then lost at once: the other server at once …
        assert_eq!(r.ended(true, t0), Wait::For(Duration::ZERO));
        let t1 = t0 + Duration::from_millis(100);
        r.trying(t1);
        // … and the first again only a gap after it was tried.
        let t2 = t0 + Duration::from_millis(200);
        assert_eq!(r.ended(true, t2), Wait::For(Duration::from_millis(800)));
        assert_eq!(r.current, 0);
        // A connection that lasted longer than the gap: no wait.
        let t3 = t0 + Duration::from_secs(5);
        r.trying(t3);
        assert_eq!(r.ended(true, t3 + gap), Wait::For(Duration::ZERO));
        // One server: every loss waits for the backoff, as before.
        let mut one = Rotation::new(1, gap);
        one.trying(t0);
        assert_eq!(one.ended(true, t0), Wait::Backoff);
        one.trying(t0);
        assert_eq!(one.ended(false, t0), Wait::Backoff);
        assert_eq!(one.current, 0);
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
