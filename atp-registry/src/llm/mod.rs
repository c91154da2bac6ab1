//! [`LlmClient`]: the agent side of ATP (docs/PROTOCOL.md §6, §9) — toolkit
//! contexts in each provider's format, the tool calls a model made run
//! through an ATP server (at once or in turn, streamed with their progress
//! or not), interactive app sessions, the OAuth flow of the tools that need
//! a user's token, webhooks, and the toolkit store: every method of the
//! Python SDK's `LLMClient`.
//!
//! | Python `LLMClient` | here |
//! |---|---|
//! | `get_toolkit_context` | [`LlmClient::get_toolkit_context`] |
//! | `get_toolkit_context_streaming` | [`LlmClient::get_toolkit_context_streaming`] |
//! | `call_tool(…, auth_token, timeout, sequential)` | [`LlmClient::call_tool`], [`LlmClient::call_tool_with`] + [`CallOptions`] |
//! | `call_tool_streaming` | [`LlmClient::call_tool_streaming`] (every call, not only the first) |
//! | `initiate_oauth_connection`, `wait_for_connection`, `get_user_tokens` | the same names |
//! | `register_webhook`, `list_webhooks`, `delete_webhook` | the same names |
//! | `list_store_toolkits`, `list_my_toolkits`, `get_toolkit_details`, `get_developer_profile` | the same names |
//! | (apps, new in this contract) | [`LlmClient::start_app`], [`LlmClient::app_action`], [`LlmClient::terminate_app`] |

mod account;
mod apps;
mod calls;
mod sse;
mod stream;

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, future::join_all};
use hyper::Method;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tracing::Instrument;

pub use apps::{AppSession, AppUpdate};
pub use calls::{
    CallFormat, CallOutcome, ToolCall, parse_tool_calls, result_messages, task_outcome,
};
pub use stream::{CallFinished, CallProgress, EventStream, StreamEvent};

use crate::{
    net::{
        self, HttpClient, NetError, StreamingResponse,
        session::{self, Flow, Handler, SessionOptions, Tungstenite},
    },
    schema::Provider,
    secret::Secret,
    trace::TraceContext,
    wire::{
        ContextRequest, ContextResponse, LlmToServer, OAuthConfirmation, RequestId, ServerToLlm,
        TaskOutcome, TaskPayload, TaskProgress, TaskRequest, WireError,
    },
};
use sse::SseParser;

/// How the client talks to the ATP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmProtocol {
    /// One WebSocket at `/ws/v1/atp/llm-client/{api_key}/`, shared by
    /// concurrent requests (the Python SDK's default).
    WebSocket,
    /// `POST /api/v1/atp/llm-client/process/` per request.
    Http,
}

/// Options of one [`LlmClient::call_tool_with`] (or
/// [`LlmClient::call_tool_streaming_with`]): the Python client's
/// `sequential`, `auth_token` and `timeout`, and the end user whose OAuth
/// token the server injects.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallOptions {
    sequential: bool,
    auth_token: Option<Secret>,
    external_user_id: Option<String>,
    timeout: Option<Duration>,
    trace: Option<TraceContext>,
}

impl CallOptions {
    /// The defaults: the calls run concurrently, no token, the client's
    /// timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs the calls one after the other, in call order, each sent once
    /// the one before it is answered (the default runs them at once).
    pub fn sequential(mut self, sequential: bool) -> Self {
        self.sequential = sequential;
        self
    }

    /// The auth token sent with every call (`payload.auth_token`): the
    /// user's token for tools that need one.
    pub fn auth_token(mut self, token: impl Into<Secret>) -> Self {
        self.auth_token = Some(token.into());
        self
    }

    /// The end user whose OAuth token (from
    /// [`LlmClient::initiate_oauth_connection`]) the server injects into
    /// the calls of tools that need it.
    pub fn external_user_id(mut self, user: impl Into<String>) -> Self {
        self.external_user_id = Some(user.into());
        self
    }

    /// How long to wait for each call's answer instead of the client's
    /// timeout (for a stream: the whole call, its progress included).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The trace the calls belong to (e.g. the agent's own trace context,
    /// read from an incoming `traceparent` with
    /// [`TraceContext::parse`]): each call's `atp.llm.call` span is its
    /// child, and the server, the toolkit and the tool join it. Without
    /// it, the current span's OpenTelemetry context is used (feature
    /// `otel`), else the calls of one `call_tool…` start one new trace.
    pub fn trace(mut self, parent: TraceContext) -> Self {
        self.trace = Some(parent);
        self
    }

    /// The parent trace of a batch of calls: the given one; else none when
    /// the current span has an OpenTelemetry context (the calls' spans are
    /// its children anyway); else a new trace.
    fn parent_trace(&self) -> Option<TraceContext> {
        match &self.trace {
            Some(t) => Some(t.clone()),
            None if crate::trace::current().is_some() => None,
            None => Some(TraceContext::new_root()),
        }
    }
}

/// Why an [`LlmClient`] call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LlmError {
    /// The server could not be reached.
    #[error("could not reach the ATP server: {0}")]
    Connect(String),
    /// The server refused the API key.
    #[error("the ATP server refused the API key: {0}")]
    AuthRefused(String),
    /// No answer in time.
    #[error("no answer from the ATP server within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The connection was lost before the answer came.
    #[error("the connection to the ATP server was lost before it answered")]
    ConnectionLost,
    /// The server answered with an error.
    #[error("the ATP server answered {}: {message}", status.map(|s| format!("HTTP {s}")).unwrap_or_else(|| "an error".into()))]
    Server {
        /// The HTTP status, when the answer came over HTTP.
        status: Option<u16>,
        /// The server's message.
        message: String,
    },
    /// The answer was not what the protocol says.
    #[error("the ATP server's answer is malformed: {0}")]
    InvalidResponse(String),
    /// A provider name that is not known.
    #[error("unknown provider {0:?}: use openai, openai_chat, anthropic, mistral or mistralai")]
    UnknownProvider(String),
    /// The base URL is not `http://…` or `https://…`.
    #[error("base_url must start with http:// or https://")]
    InvalidBaseUrl,
    /// An app request failed (docs/PROTOCOL.md §9): the server's stable
    /// code (`app_not_found`, `session_not_found`, `session_ended`,
    /// `toolkit_disconnected`, `toolkit_timeout`, …) and its message.
    #[error("the app request failed ({code}): {message}")]
    App {
        /// The `code` of the `app_response`.
        code: String,
        /// The `error` of the `app_response`.
        message: String,
    },
    /// An argument this client cannot send (e.g. app parameters that are
    /// not a JSON object).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl From<NetError> for LlmError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Timeout(d) => LlmError::Timeout(d),
            NetError::Lost(_) => LlmError::ConnectionLost,
            NetError::NotJson { status } => {
                LlmError::InvalidResponse(format!("HTTP {status}, not JSON"))
            }
            other => LlmError::Connect(other.to_string()),
        }
    }
}

/// How often [`LlmClient`] pings its WebSocket by default.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);

/// The ATP server the Python SDK's client talks to by default.
pub const DEFAULT_LLM_BASE_URL: &str = "https://api.chat-atp.com";

/// The agent side of ATP: the Python SDK's `LLMClient`.
///
/// ```no_run
/// # async fn demo() -> Result<(), atp_registry::llm::LlmError> {
/// use atp_registry::llm::{LlmClient, LlmProtocol};
///
/// let atp = LlmClient::new("YOUR_ATP_LLM_CLIENT_API_KEY")
///     .with_base_url("http://127.0.0.1:8080")
///     .with_protocol(LlmProtocol::WebSocket);
/// let context = atp.get_toolkit_context("Demo", "anthropic", "Say hello to Ada.").await?;
/// // … give context["tools"] to the model, then pass what it returned:
/// let model_output = serde_json::json!([{"type": "tool_use", "id": "toolu_1", "name": "hello_world", "input": {"name": "Ada"}}]);
/// let messages = atp.call_tool("Demo", &model_output, "anthropic", "Say hello to Ada.").await?;
/// // … append `messages` to the conversation.
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LlmClient {
    inner: Arc<Inner>,
}

struct Inner {
    api_key: Secret,
    base_url: String,
    protocol: LlmProtocol,
    timeout: Duration,
    connect_timeout: Duration,
    ping_interval: Duration,
    http: HttpClient,
    ws: tokio::sync::Mutex<Option<Connection>>,
    next_id: AtomicU64,
}

impl fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmClient")
            .field("api_key", &self.inner.api_key)
            .field("base_url", &self.inner.base_url)
            .field("protocol", &self.inner.protocol)
            .field("timeout", &self.inner.timeout)
            .finish()
    }
}

/// The requests waiting on a WebSocket, by request id.
type Pending = Arc<Mutex<HashMap<String, Waiter>>>;

/// A request waiting on the WebSocket: its answer goes to `answer`; the
/// `task_progress` before it to `progress`, when it streams.
struct Waiter {
    progress: Option<mpsc::Sender<TaskProgress>>,
    answer: oneshot::Sender<ServerToLlm>,
}

/// How many `task_progress` messages wait for a slow reader of a stream;
/// more are dropped (progress is a hint; the answer is never dropped).
const PROGRESS_BUFFER: usize = 64;

/// A live, authenticated WebSocket: requests go out through `tx`, answers
/// come back to `pending` by request id.
struct Connection {
    tx: mpsc::Sender<String>,
    pending: Pending,
    alive: Arc<std::sync::atomic::AtomicBool>,
}

impl LlmClient {
    /// A client with the Python SDK's defaults: WebSocket, base URL
    /// [`DEFAULT_LLM_BASE_URL`], 120 s to wait for a tool call.
    pub fn new(api_key: impl Into<Secret>) -> Self {
        Self::build(
            api_key.into(),
            DEFAULT_LLM_BASE_URL.into(),
            LlmProtocol::WebSocket,
            Duration::from_secs(120),
        )
    }

    fn build(api_key: Secret, base_url: String, protocol: LlmProtocol, timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                api_key,
                base_url,
                protocol,
                timeout,
                connect_timeout: Duration::from_secs(10),
                ping_interval: DEFAULT_PING_INTERVAL,
                http: HttpClient::new(),
                ws: tokio::sync::Mutex::new(None),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    fn rebuild(self, f: impl FnOnce(&mut String, &mut LlmProtocol, &mut Duration)) -> Self {
        let mut base = self.inner.base_url.clone();
        let mut protocol = self.inner.protocol;
        let mut timeout = self.inner.timeout;
        f(&mut base, &mut protocol, &mut timeout);
        let mut rebuilt = Self::build(self.inner.api_key.clone(), base, protocol, timeout);
        if let Some(inner) = Arc::get_mut(&mut rebuilt.inner) {
            inner.ping_interval = self.inner.ping_interval;
        }
        rebuilt
    }

    /// How often the WebSocket is pinged (30 s by default). A connection
    /// on which nothing has come for two intervals — no answer, no ping, no
    /// pong — is taken as dead: the requests waiting on it fail with
    /// [`LlmError::ConnectionLost`] and the next call connects anew.
    pub fn with_ping_interval(self, every: Duration) -> Self {
        let mut rebuilt = self.rebuild(|_, _, _| {});
        if let Some(inner) = Arc::get_mut(&mut rebuilt.inner) {
            inner.ping_interval = every.max(Duration::from_millis(10));
        }
        rebuilt
    }

    /// Sets the ATP server (e.g. `http://127.0.0.1:8080` for a local
    /// `atp-server`). A URL that ends in the Python SDK's
    /// `/ws/v1/atp/llm-client/` is accepted too.
    pub fn with_base_url(self, base_url: impl Into<String>) -> Self {
        let mut url = base_url.into().trim_end_matches('/').to_owned();
        if let Some(stripped) = url.strip_suffix("/ws/v1/atp/llm-client") {
            url = stripped.to_owned();
        }
        self.rebuild(|b, _, _| *b = url)
    }

    /// WebSocket (default) or HTTP.
    pub fn with_protocol(self, protocol: LlmProtocol) -> Self {
        self.rebuild(|_, p, _| *p = protocol)
    }

    /// How long to wait for any answer (120 s by default).
    pub fn with_timeout(self, timeout: Duration) -> Self {
        self.rebuild(|_, _, t| *t = timeout)
    }

    fn http_base(&self) -> Result<&str, LlmError> {
        let base = self.inner.base_url.as_str();
        if base.starts_with("http://") || base.starts_with("https://") {
            Ok(base)
        } else {
            Err(LlmError::InvalidBaseUrl)
        }
    }

    fn request_id(&self, kind: &str) -> RequestId {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        RequestId::Str(format!("{kind}_{nanos:x}_{n}"))
    }

    /// Fetches a toolkit's context: its `payload`, with `tools` in
    /// `provider`'s format (docs/PROTOCOL.md §4). `toolkit_id` is the toolkit's
    /// `app_name`.
    pub async fn get_toolkit_context(
        &self,
        toolkit_id: &str,
        provider: &str,
        user_prompt: &str,
    ) -> Result<Value, LlmError> {
        let (request_id, message) = self.context_request(toolkit_id, provider, user_prompt)?;
        context_of(
            self.exchange(&request_id, &message, self.inner.timeout)
                .await?,
        )
    }

    fn context_request(
        &self,
        toolkit_id: &str,
        provider: &str,
        user_prompt: &str,
    ) -> Result<(RequestId, LlmToServer), LlmError> {
        provider
            .parse::<Provider>()
            .map_err(|_| LlmError::UnknownProvider(provider.to_owned()))?;
        let request_id = self.request_id("context");
        let message = LlmToServer::GetToolkitContext(ContextRequest {
            toolkit_id: toolkit_id.to_owned(),
            request_id: Some(request_id.clone()),
            provider: Some(provider.to_owned()),
            user_prompt: Value::String(user_prompt.to_owned()),
            strict: false,
        });
        Ok((request_id, message))
    }

    /// Runs the tool calls a model made — passed exactly as the provider's
    /// API returned them (a whole response, a message, a list of calls or
    /// content blocks, or one call) — concurrently, and returns the result
    /// messages in the provider's own format, in call order, ready to
    /// append to the conversation (see [`result_messages`]).
    ///
    /// A call whose arguments are not valid JSON, or that the toolkit
    /// failed, gets an error result; the method itself fails only for
    /// errors of the client or the connection.
    pub async fn call_tool(
        &self,
        toolkit_id: &str,
        tool_calls: &Value,
        provider: &str,
        user_prompt: &str,
    ) -> Result<Vec<Value>, LlmError> {
        self.call_tool_as(toolkit_id, tool_calls, provider, user_prompt, None, None)
            .await
    }

    /// [`call_tool`](Self::call_tool) for a given user: the server injects
    /// the token of `external_user_id` (from the OAuth flow) into the calls
    /// of tools that need it, or uses `auth_token` when given. The same as
    /// [`call_tool_with`](Self::call_tool_with) with those
    /// [`CallOptions`].
    pub async fn call_tool_as(
        &self,
        toolkit_id: &str,
        tool_calls: &Value,
        provider: &str,
        user_prompt: &str,
        external_user_id: Option<&str>,
        auth_token: Option<&Secret>,
    ) -> Result<Vec<Value>, LlmError> {
        let options = CallOptions {
            external_user_id: external_user_id.map(str::to_owned),
            auth_token: auth_token.cloned(),
            ..CallOptions::default()
        };
        self.call_tool_with(toolkit_id, tool_calls, provider, user_prompt, &options)
            .await
    }

    /// [`call_tool`](Self::call_tool) with options: one call after the
    /// other (`sequential`, the Python client's `sequential=True`), an
    /// explicit `auth_token` (its `auth_token=`), an end user whose OAuth
    /// token the server injects, and a bound of its own on each wait.
    ///
    /// ```no_run
    /// # async fn demo(atp: atp_registry::llm::LlmClient, calls: serde_json::Value) -> Result<(), atp_registry::llm::LlmError> {
    /// use std::time::Duration;
    /// use atp_registry::llm::CallOptions;
    ///
    /// let options = CallOptions::new()
    ///     .sequential(true)
    ///     .auth_token("user-access-token")
    ///     .timeout(Duration::from_secs(30));
    /// let messages = atp.call_tool_with("Demo", &calls, "openai", "", &options).await?;
    /// # Ok(()) }
    /// ```
    pub async fn call_tool_with(
        &self,
        toolkit_id: &str,
        tool_calls: &Value,
        provider: &str,
        user_prompt: &str,
        options: &CallOptions,
    ) -> Result<Vec<Value>, LlmError> {
        let parsed = provider
            .parse::<Provider>()
            .map_err(|_| LlmError::UnknownProvider(provider.to_owned()))?;
        let calls = parse_tool_calls(parsed, tool_calls);
        let limit = options.timeout.unwrap_or(self.inner.timeout);
        let parent = options.parent_trace();
        let run = |call: &ToolCall| {
            let (task, span) = self.task_request(
                toolkit_id,
                call,
                provider,
                user_prompt,
                options,
                parent.as_ref(),
                false,
            );
            async move {
                let (request_id, message) = match task {
                    Ok(task) => task,
                    Err(why) => return Ok(CallOutcome::error(why)),
                };
                let answer = self.exchange(&request_id, &message, limit).await?;
                Ok::<_, LlmError>(task_outcome(&answer))
            }
            .instrument(span)
        };
        let outcomes = if options.sequential {
            let mut outcomes = Vec::with_capacity(calls.len());
            for call in &calls {
                outcomes.push(run(call).await?);
            }
            outcomes
        } else {
            join_all(calls.iter().map(run))
                .await
                .into_iter()
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(result_messages(&calls, &outcomes))
    }

    /// The `task_request` of one call, or why it cannot be sent (its
    /// arguments are not a JSON object: it gets an error result); and the
    /// call's span (`atp.llm.call`), a child of `parent` (see
    /// [`crate::trace::link`]), whose context the request carries.
    #[allow(clippy::too_many_arguments)]
    fn task_request(
        &self,
        toolkit_id: &str,
        call: &ToolCall,
        provider: &str,
        user_prompt: &str,
        options: &CallOptions,
        parent: Option<&TraceContext>,
        stream: bool,
    ) -> (Result<(RequestId, LlmToServer), String>, tracing::Span) {
        let span = tracing::info_span!(
            "atp.llm.call",
            toolkit = toolkit_id,
            tool = %call.name,
            request_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        let trace = crate::trace::link(&span, parent);
        let arguments = match call.arguments.clone() {
            Ok(arguments) => arguments,
            Err(why) => return (Err(why), span),
        };
        let request_id = self.request_id("task");
        span.record("request_id", tracing::field::display(&request_id));
        let (traceparent, tracestate) = TraceContext::into_fields(Some(trace));
        let message = LlmToServer::TaskRequest(TaskRequest {
            toolkit_id: toolkit_id.to_owned(),
            request_id: Some(request_id.clone()),
            payload: TaskPayload {
                function: call.name.clone(),
                parameters: Value::Object(arguments),
                auth_token: options.auth_token.clone(),
                tool_call_id: Value::String(call.id.clone()),
                external_user_id: None,
            },
            provider: Some(provider.to_owned()),
            user_prompt: Value::String(user_prompt.to_owned()),
            external_user_id: options.external_user_id.clone(),
            auth_token: None,
            stream,
            traceparent,
            tracestate,
        });
        (Ok((request_id, message)), span)
    }

    /// Starts an OAuth connection for a user of a platform: the answer
    /// holds the `authorization_url` to send the user to.
    pub async fn initiate_oauth_connection(
        &self,
        platform_id: &str,
        external_user_id: &str,
        developer_redirect_url: Option<&str>,
    ) -> Result<Value, LlmError> {
        let url = format!(
            "{}/api/v1/atp/llm-client/oauth/confirmation/{}/",
            self.http_base()?,
            segment(platform_id)
        );
        let body = serde_json::to_value(OAuthConfirmation {
            external_user_id: external_user_id.to_owned(),
            developer_redirect_url: developer_redirect_url.map(str::to_owned),
        })
        .unwrap_or(Value::Null);
        match self.http_json(Method::POST, &url, Some(&body)).await? {
            (200..=299, answer) => Ok(answer),
            (status, answer) => Err(http_error(status, &answer)),
        }
    }

    /// Polls for a user's OAuth connection every `poll_interval` until it
    /// is made (the tokens answer) or `timeout` passes.
    pub async fn wait_for_connection(
        &self,
        platform_id: &str,
        external_user_id: &str,
        timeout: Duration,
        poll_interval: Duration,
    ) -> Result<Value, LlmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(tokens) = self.tokens(platform_id, external_user_id).await? {
                return Ok(tokens);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(LlmError::Timeout(timeout));
            }
            tokio::time::sleep(poll_interval.min(deadline - now)).await;
        }
    }

    /// A connected user's tokens (`access_token`, `refresh_token`,
    /// `expires_at`, `scope`, `integration_id`); an error when the user has
    /// not connected.
    pub async fn get_user_tokens(
        &self,
        platform_id: &str,
        external_user_id: &str,
    ) -> Result<Value, LlmError> {
        self.tokens(platform_id, external_user_id)
            .await?
            .ok_or_else(|| LlmError::Server {
                status: Some(404),
                message: "the user has not connected this platform".into(),
            })
    }

    async fn tokens(
        &self,
        platform_id: &str,
        external_user_id: &str,
    ) -> Result<Option<Value>, LlmError> {
        let url = format!(
            "{}/api/v1/atp/llm-client/oauth/tokens/{}/{}/",
            self.http_base()?,
            segment(platform_id),
            segment(external_user_id)
        );
        match self.http_json(Method::GET, &url, None).await? {
            (200, tokens) => Ok(Some(tokens)),
            (404, _) => Ok(None),
            (status, answer) => Err(http_error(status, &answer)),
        }
    }

    async fn http_json(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), LlmError> {
        let auth = format!("ApiKey {}", self.inner.api_key.expose());
        Ok(self
            .inner
            .http
            .json(
                method,
                url,
                &[("authorization", auth.as_str())],
                body,
                self.inner.timeout,
            )
            .await?)
    }

    /// Sends one request and waits for its answer (skipping progress),
    /// over the protocol chosen, within `limit`.
    async fn exchange(
        &self,
        request_id: &RequestId,
        message: &LlmToServer,
        limit: Duration,
    ) -> Result<ServerToLlm, LlmError> {
        tokio::time::timeout(limit, async {
            let mut answers = self.open(request_id, message, false, limit).await?;
            loop {
                match answers.next(limit).await {
                    Some(Ok(ServerToLlm::TaskProgress(_))) => {}
                    Some(answer) => return answer,
                    None => return Err(LlmError::ConnectionLost),
                }
            }
        })
        .await
        .unwrap_or(Err(LlmError::Timeout(limit)))
    }

    /// Sends one request: what the server answers can then be read with
    /// [`Answers::next`]. With `stream`, over HTTP, it asks for an event
    /// stream (`Accept: text/event-stream`); over the WebSocket, the
    /// `task_progress` messages of the request are kept for the caller.
    /// Sending is bounded by `limit`.
    async fn open(
        &self,
        request_id: &RequestId,
        message: &LlmToServer,
        stream: bool,
        limit: Duration,
    ) -> Result<Answers, LlmError> {
        match self.inner.protocol {
            LlmProtocol::Http => {
                let url = format!("{}/api/v1/atp/llm-client/process/", self.http_base()?);
                let auth = format!("ApiKey {}", self.inner.api_key.expose());
                let accept = if stream {
                    "text/event-stream"
                } else {
                    "application/json"
                };
                let mut headers = vec![("authorization", auth.as_str()), ("accept", accept)];
                // The trace context goes in the headers too, for HTTP
                // middleware (proxies, the server's own tracing layer).
                if let Some((parent, state)) = message.trace_fields() {
                    let fields = [
                        (crate::trace::TRACEPARENT, parent),
                        (crate::trace::TRACESTATE, state),
                    ];
                    headers.extend(fields.into_iter().filter_map(|(h, v)| Some((h, v?))));
                }
                let body = Some(("application/json", Bytes::from(message.to_json())));
                let http = &self.inner.http;
                if !stream {
                    let (status, bytes) =
                        http.send(Method::POST, &url, &headers, body, limit).await?;
                    return Ok(Answers::Whole(Some(http_answer(status, &bytes)?)));
                }
                let response = http
                    .send_streaming(Method::POST, &url, &headers, body, limit)
                    .await?;
                if response.is_event_stream() && (200..=299).contains(&response.status) {
                    return Ok(Answers::Events {
                        response,
                        parser: SseParser::default(),
                        eof: false,
                        done: false,
                    });
                }
                // A server that does not stream answers as usual.
                let status = response.status;
                let bytes = response.read_all(limit).await?;
                Ok(Answers::Whole(Some(http_answer(status, &bytes)?)))
            }
            LlmProtocol::WebSocket => {
                let (tx, pending, alive) = self.connection().await?;
                let key = request_id.to_string();
                let (answer_tx, answer_rx) = oneshot::channel();
                let (progress_tx, progress_rx) = if stream {
                    let (tx, rx) = mpsc::channel(PROGRESS_BUFFER);
                    (Some(tx), Some(rx))
                } else {
                    (None, None)
                };
                pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(
                        key.clone(),
                        Waiter {
                            progress: progress_tx,
                            answer: answer_tx,
                        },
                    );
                // From here on, however this ends, the waiter goes.
                let forget = Forget { pending, key };
                let sent = tokio::time::timeout(limit, async {
                    alive.load(Ordering::SeqCst) && tx.send(message.to_json()).await.is_ok()
                })
                .await
                .map_err(|_| LlmError::Timeout(limit))?;
                if !sent {
                    return Err(LlmError::ConnectionLost);
                }
                Ok(Answers::Socket {
                    progress: progress_rx,
                    answer: answer_rx,
                    held: None,
                    done: false,
                    _forget: forget,
                })
            }
        }
    }

    /// The live connection, (re)connecting and authenticating when needed.
    async fn connection(
        &self,
    ) -> Result<
        (
            mpsc::Sender<String>,
            Pending,
            Arc<std::sync::atomic::AtomicBool>,
        ),
        LlmError,
    > {
        let mut slot = self.inner.ws.lock().await;
        if let Some(c) = slot.as_ref()
            && c.alive.load(Ordering::SeqCst)
        {
            return Ok((c.tx.clone(), c.pending.clone(), c.alive.clone()));
        }
        let c = self.connect().await?;
        let out = (c.tx.clone(), c.pending.clone(), c.alive.clone());
        *slot = Some(c);
        Ok(out)
    }

    async fn connect(&self) -> Result<Connection, LlmError> {
        let base = self.http_base()?;
        let ws_base = base.replacen("http", "ws", 1);
        let url = format!(
            "{ws_base}/ws/v1/atp/llm-client/{}/",
            self.inner.api_key.expose()
        );
        tracing::debug!(url = %net::redact_url(&url), "connecting to the ATP server");
        let limit = self.inner.connect_timeout;
        let mut ws = match tokio::time::timeout(limit, net::ws_connect(&url)).await {
            Err(_) => return Err(LlmError::Timeout(limit)),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp)))
                if matches!(resp.status().as_u16(), 401 | 403) =>
            {
                return Err(LlmError::AuthRefused(format!(
                    "HTTP {}",
                    resp.status().as_u16()
                )));
            }
            Ok(Err(e)) => return Err(LlmError::Connect(e.to_string())),
            Ok(Ok(ws)) => ws,
        };
        let auth = LlmToServer::Auth {
            api_key: Some(self.inner.api_key.clone()),
        };
        ws.send(Message::text(auth.to_json()))
            .await
            .map_err(|e| LlmError::Connect(e.to_string()))?;
        let authenticated = tokio::time::timeout(limit, async {
            while let Some(frame) = ws.next().await {
                match frame {
                    Ok(Message::Text(t)) => {
                        if let Ok(ServerToLlm::AuthResponse { success, error }) =
                            ServerToLlm::parse(t.as_str())
                        {
                            return if success {
                                Ok(())
                            } else {
                                Err(LlmError::AuthRefused(
                                    error.unwrap_or_else(|| "Invalid API key".into()),
                                ))
                            };
                        }
                    }
                    Ok(Message::Close(frame)) => {
                        let why = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                        return Err(LlmError::AuthRefused(why));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(LlmError::Connect(e.to_string())),
                }
            }
            Err(LlmError::ConnectionLost)
        })
        .await
        .map_err(|_| LlmError::Timeout(limit))?;
        authenticated?;
        let (tx, rx) = session::outbox();
        let pending: Pending = Arc::default();
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (task_pending, task_alive) = (pending.clone(), alive.clone());
        let opts = SessionOptions {
            ping_interval: self.inner.ping_interval,
            grace_period: Duration::ZERO,
            stop_close: (1000, "client closing"),
        };
        tokio::spawn(async move {
            let (sink, stream) = ws.split();
            let mut router = Router {
                pending: task_pending.clone(),
            };
            // The session ends when the peer goes silent (the server
            // answers pings and pings too), fails, closes, or when the
            // client is dropped (its outbox closes).
            let ended = session::run::<Tungstenite, _, _, _, _>(
                sink,
                stream,
                rx,
                &mut router,
                &opts,
                None,
                std::future::pending::<()>(),
            )
            .await;
            if ended == session::Ended::Dead {
                tracing::warn!(
                    "no answer to pings from the ATP server: the connection is taken as dead"
                );
            }
            task_alive.store(false, Ordering::SeqCst);
            // Dropping the senders fails every waiting request at once.
            task_pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        });
        Ok(Connection { tx, pending, alive })
    }
}

/// Routes the answers of one WebSocket to the requests waiting for them.
struct Router {
    pending: Pending,
}

impl Handler for Router {
    fn on_text(&mut self, text: &str) -> Flow {
        route(&self.pending, text);
        Flow::Continue
    }
}

/// Hands an answer to the request waiting for it, and a `task_progress`
/// to the stream of a request that streams (without waiting: a full
/// buffer drops it).
fn route(pending: &Pending, text: &str) {
    let answer = match ServerToLlm::parse(text) {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!("ignoring a message from the ATP server: {e}");
            return;
        }
    };
    let Some(id) = answer.request_id().map(RequestId::to_string) else {
        tracing::debug!("ignoring a message without a request_id");
        return;
    };
    let mut pending = pending.lock().unwrap_or_else(PoisonError::into_inner);
    if let ServerToLlm::TaskProgress(progress) = answer {
        if let Some(Waiter {
            progress: Some(tx), ..
        }) = pending.get(&id)
            && let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(progress)
        {
            tracing::debug!("a stream's reader is behind: dropping a task_progress");
        }
        return;
    }
    if let Some(waiter) = pending.remove(&id) {
        let _ = waiter.answer.send(answer);
    }
}

/// Removes a request's waiter when the request is over, answered or not.
struct Forget {
    pending: Pending,
    key: String,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// What the server answers one request: zero or more `task_progress`,
/// then one other message (the answer), then nothing.
enum Answers {
    /// A whole answer (HTTP without an event stream).
    Whole(Option<ServerToLlm>),
    /// An HTTP event stream.
    Events {
        response: StreamingResponse,
        parser: SseParser,
        eof: bool,
        done: bool,
    },
    /// The request's share of the WebSocket.
    Socket {
        progress: Option<mpsc::Receiver<TaskProgress>>,
        answer: oneshot::Receiver<ServerToLlm>,
        /// The answer, kept while progress sent before it is read.
        held: Option<ServerToLlm>,
        done: bool,
        _forget: Forget,
    },
}

impl Answers {
    /// The next message, within `limit`; `None` after the answer. An
    /// error ends it.
    async fn next(&mut self, limit: Duration) -> Option<Result<ServerToLlm, LlmError>> {
        let deadline = tokio::time::Instant::now() + limit;
        match self {
            Answers::Whole(answer) => answer.take().map(Ok),
            Answers::Events {
                response,
                parser,
                eof,
                done,
            } => loop {
                if *done {
                    return None;
                }
                if let Some(data) = parser.next_event() {
                    match ServerToLlm::parse(&data) {
                        Ok(message) => {
                            *done = !matches!(message, ServerToLlm::TaskProgress(_));
                            return Some(Ok(message));
                        }
                        Err(WireError::UnknownType { kind, .. }) => {
                            tracing::debug!("ignoring an event of type {kind:?}");
                            continue;
                        }
                        Err(e) => {
                            *done = true;
                            return Some(Err(LlmError::InvalidResponse(format!(
                                "an event of the stream: {e}"
                            ))));
                        }
                    }
                }
                if *eof {
                    *done = true;
                    return Some(Err(LlmError::ConnectionLost));
                }
                let chunk = match tokio::time::timeout_at(deadline, response.chunk()).await {
                    Err(_) => Err(LlmError::Timeout(limit)),
                    Ok(None) => {
                        *eof = true;
                        parser.finish().map_err(|_| too_large())
                    }
                    Ok(Some(Ok(bytes))) => parser.push(&bytes).map_err(|_| too_large()),
                    Ok(Some(Err(e))) => Err(e.into()),
                };
                if let Err(e) = chunk {
                    *done = true;
                    return Some(Err(e));
                }
            },
            Answers::Socket {
                progress,
                answer,
                held,
                done,
                ..
            } => {
                if *done {
                    return None;
                }
                let early = |progress: &mut Option<mpsc::Receiver<TaskProgress>>| {
                    progress.as_mut().and_then(|rx| rx.try_recv().ok())
                };
                if let Some(last) = held.take() {
                    if let Some(p) = early(progress) {
                        *held = Some(last);
                        return Some(Ok(ServerToLlm::TaskProgress(p)));
                    }
                    *done = true;
                    return Some(Ok(last));
                }
                let waited = tokio::time::timeout_at(deadline, async {
                    match progress.as_mut() {
                        Some(rx) => tokio::select! {
                            biased;
                            Some(p) = rx.recv() => Ok(ServerToLlm::TaskProgress(p)),
                            last = &mut *answer => last,
                        },
                        None => (&mut *answer).await,
                    }
                })
                .await;
                match waited {
                    Err(_) => {
                        *done = true;
                        Some(Err(LlmError::Timeout(limit)))
                    }
                    Ok(Err(_)) => {
                        *done = true;
                        Some(Err(LlmError::ConnectionLost))
                    }
                    Ok(Ok(p @ ServerToLlm::TaskProgress(_))) => Some(Ok(p)),
                    Ok(Ok(last)) => {
                        // Progress routed before the answer is read first.
                        if let Some(p) = early(progress) {
                            *held = Some(last);
                            return Some(Ok(ServerToLlm::TaskProgress(p)));
                        }
                        *done = true;
                        Some(Ok(last))
                    }
                }
            }
        }
    }
}

fn too_large() -> LlmError {
    LlmError::InvalidResponse("an event of the stream is larger than 16 MiB".into())
}

/// Reads a `toolkit_context` answer: its payload as JSON.
fn context_of(answer: ServerToLlm) -> Result<Value, LlmError> {
    match answer {
        ServerToLlm::ToolkitContext(ContextResponse {
            payload: Some(payload),
            status,
            ..
        }) if status.as_deref() != Some("error") => {
            serde_json::to_value(payload).map_err(|e| LlmError::InvalidResponse(e.to_string()))
        }
        ServerToLlm::ToolkitContext(c) => Err(LlmError::Server {
            status: None,
            message: c
                .error
                .or(c.message)
                .unwrap_or_else(|| "toolkit_context without a payload".into()),
        }),
        ServerToLlm::Error(e) => Err(LlmError::Server {
            status: None,
            message: e.text().to_owned(),
        }),
        other => Err(LlmError::InvalidResponse(format!(
            "a {} answer to get_toolkit_context",
            other.kind()
        ))),
    }
}

/// Reads the answer to a `POST process/`: a 2xx is the answer; 401 and
/// 403 a refused key; an `app_response` with an error is passed on
/// whatever its status (its `code` says more); anything else an error
/// with the status.
fn http_answer(status: u16, bytes: &[u8]) -> Result<ServerToLlm, LlmError> {
    let answer = std::str::from_utf8(bytes)
        .map_err(|_| LlmError::InvalidResponse(format!("HTTP {status}, not UTF-8")))
        .and_then(|text| {
            ServerToLlm::parse(text)
                .map_err(|e| LlmError::InvalidResponse(format!("HTTP {status}: {e}")))
        });
    match (status, answer) {
        (200..=299, answer) => answer,
        (401 | 403, answer) => Err(LlmError::AuthRefused(match answer {
            Ok(a) => error_of(&a),
            Err(_) => Some(body_message(bytes))
                .filter(|m| !m.is_empty() && m != "null")
                .unwrap_or_else(|| format!("HTTP {status}")),
        })),
        (_, Ok(ServerToLlm::AppResponse(a)))
            if a.payload.error.is_some() || a.payload.code.is_some() =>
        {
            Ok(ServerToLlm::AppResponse(a))
        }
        (status, answer) => Err(LlmError::Server {
            status: Some(status),
            message: match answer {
                Ok(a) => error_of(&a),
                Err(_) => body_message(bytes),
            },
        }),
    }
}

/// The error message of an answer's body: its `error` (or `message`,
/// `detail`, `reason`) when it is JSON, else its text (cut short).
fn body_message(bytes: &[u8]) -> String {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => error_text(&v),
        Err(_) => {
            let text = String::from_utf8_lossy(bytes);
            let text = text.trim();
            match text.char_indices().nth(200) {
                Some((at, _)) => format!("{}…", &text[..at]),
                None => text.to_owned(),
            }
        }
    }
}

/// The error message of an answer.
fn error_of(answer: &ServerToLlm) -> String {
    match answer {
        ServerToLlm::Error(e) => e.text().to_owned(),
        ServerToLlm::AuthResponse { error, .. } => {
            error.clone().unwrap_or_else(|| "Invalid API key".into())
        }
        ServerToLlm::ToolkitContext(c) => c
            .error
            .clone()
            .or_else(|| c.message.clone())
            .unwrap_or_else(|| "Unknown error".into()),
        ServerToLlm::TaskResponse(t) => match t.outcome() {
            TaskOutcome::Failed { message, .. } => message,
            TaskOutcome::Ok(_) => "Unknown error".into(),
        },
        _ => "Unknown error".into(),
    }
}

fn segment(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

fn error_text(answer: &Value) -> String {
    ["error", "message", "detail", "reason"]
        .iter()
        .find_map(|k| answer.get(*k).and_then(Value::as_str))
        .map(str::to_owned)
        .unwrap_or_else(|| answer.to_string())
}

fn http_error(status: u16, answer: &Value) -> LlmError {
    LlmError::Server {
        status: Some(status),
        message: error_text(answer),
    }
}

#[cfg(test)]
mod loopback_tests;

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn futures_can_be_spawned() {
        let llm = LlmClient::new("k");
        let calls = json!([]);
        assert_send(&llm.get_toolkit_context("t", "openai", ""));
        assert_send(&llm.call_tool("t", &calls, "openai", ""));
        assert_send(&llm.wait_for_connection("p", "u", Duration::ZERO, Duration::ZERO));
        assert_send(&llm.call_tool_with("t", &calls, "openai", "", &CallOptions::new()));
        assert_send(&llm.call_tool_streaming("t", &calls, "openai", ""));
        assert_send(&llm.start_app("t", "a", &calls, None));
        assert_send(&llm.app_action("s", &calls));
        assert_send(&llm.terminate_app("s"));
        assert_send(&llm.register_webhook("u", &[]));
        assert_send(&llm.list_webhooks());
        assert_send(&llm.list_store_toolkits(1, 10));
    }

    #[test]
    fn debug_hides_the_key_and_base_urls_are_normalised() {
        let llm = LlmClient::new("llm-secret")
            .with_base_url("https://api.chat-atp.com/ws/v1/atp/llm-client/");
        let dbg = format!("{llm:?}");
        assert!(!dbg.contains("llm-secret"), "{dbg}");
        assert_eq!(llm.inner.base_url, "https://api.chat-atp.com");
    }

    #[tokio::test]
    async fn bad_input_is_a_typed_error() {
        let llm = LlmClient::new("k").with_base_url("ftp://nowhere");
        assert_eq!(
            llm.get_toolkit_context("t", "cohere", "").await,
            Err(LlmError::UnknownProvider("cohere".into()))
        );
        assert_eq!(
            llm.get_user_tokens("p", "u").await,
            Err(LlmError::InvalidBaseUrl)
        );
        // Nothing listens on port 9 of loopback: a clear connect error.
        let llm = LlmClient::new("k")
            .with_base_url("http://127.0.0.1:9")
            .with_protocol(LlmProtocol::Http);
        assert!(matches!(
            llm.get_toolkit_context("t", "openai", "").await,
            Err(LlmError::Connect(_))
        ));
        let llm = LlmClient::new("k").with_base_url("http://127.0.0.1:9");
        assert!(matches!(
            llm.get_toolkit_context("t", "openai", "").await,
            Err(LlmError::Connect(_))
        ));
    }
}
