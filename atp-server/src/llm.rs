//! The LLM side: `get_toolkit_context`, `task_request` (with progress
//! when asked) and the app sessions (`app_request`, `app_action`,
//! `app_terminate`), over the LLM-client WebSocket and over
//! `POST …/llm-client/process/` (JSON, or server-sent events).

use std::{convert::Infallible, sync::Arc};

use atp_registry::{
    CallError, ErrorCode, Provider, Secret,
    net::{
        WS_READ_BUFFER,
        session::{self, Flow, Handler},
    },
    trace::{self, TraceContext},
    wire::{
        AppActionRequest, AppRequest, AppResponse, AppTerminateRequest, ContextPayload,
        ContextRequest, ContextResponse, ErrorFrame, LlmToServer, RequestId, ServerToLlm,
        SessionAction, TaskProgress, TaskRequest, TaskResponse, WireError,
    },
};
use axum::{
    body::Body,
    extract::{
        Path, State,
        rejection::PathRejection,
        ws::{WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::Method;
use serde_json::{Map, Value};
use tokio::{sync::mpsc, task::JoinSet};
use tracing::Instrument;

use crate::{
    REVOKED_CLOSE,
    audit::{Entry, Outcome, Via},
    error::{ApiError, json_text_response},
    events::CallEvent,
    hub::{PROGRESS_BUFFER, Report, Route, RouteError, ToolRequest},
    keys,
    keys::{Role, api_key_header, key_hash},
    metrics::Transport,
    not_a_websocket, oauth,
    rate_limit::{LimitKind, Permit, Refused},
    read_object,
    store::ToolkitRecord,
};

/// The most task and app requests one WebSocket may have in flight.
const MAX_IN_FLIGHT: usize = 1024;
/// How many events an SSE answer buffers for a slow reader (progress that
/// finds it full is dropped).
const SSE_BUFFER: usize = 64;

/// Why a task got no result: a stable code and a message for people.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub code: String,
    pub message: String,
    /// Set when a rate limit refused the call: how `process/` answers it.
    pub limited: Option<Limited>,
}

/// How an HTTP request refused by a rate limit is answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limited {
    /// 429, or 413 for arguments over the size limit.
    pub status: StatusCode,
    /// The `Retry-After`, when trying again can help.
    pub retry_after: Option<std::time::Duration>,
}

impl Failure {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            limited: None,
        }
    }

    /// A call a rate limit refused: `rate_limited`, or
    /// `payload_too_large` for arguments over the size limit.
    fn refused(r: Refused) -> Self {
        let code = if r.kind == LimitKind::RequestSize {
            ErrorCode::PayloadTooLarge
        } else {
            ErrorCode::RateLimited
        };
        Self::limited(code.as_str().to_owned(), r.message, r.retry_after)
    }

    /// A refusal by a rate limit (`code` `rate_limited` or
    /// `payload_too_large`), here or on the server that holds a session:
    /// answered 429, or 413 for a request too large.
    fn limited(code: String, message: String, retry_after: Option<std::time::Duration>) -> Self {
        let status = if code == ErrorCode::PayloadTooLarge.as_str() {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        Self {
            code,
            message,
            limited: Some(Limited {
                status,
                retry_after,
            }),
        }
    }
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Self {
        Self::new(e.code().as_str(), e.to_string())
    }
}

impl From<RouteError> for Failure {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::Failed { code, message } => Self {
                code,
                message,
                limited: None,
            },
            RouteError::Limited {
                code,
                message,
                retry_after,
            } => Self::limited(code, message, retry_after),
            other => Self::new(other.code(), other.to_string()),
        }
    }
}

/// A failure on its way to another server (over the bus).
impl From<Failure> for RouteError {
    fn from(f: Failure) -> Self {
        let Failure {
            code,
            message,
            limited,
        } = f;
        match limited {
            Some(l) => RouteError::Limited {
                code,
                message,
                retry_after: l.retry_after,
            },
            None => RouteError::Failed { code, message },
        }
    }
}

/// The answer to a `get_toolkit_context`, or why there is none.
pub(crate) fn context(
    s: &crate::State,
    llm_key_hash: &str,
    req: &ContextRequest,
) -> Result<ContextResponse, ApiError> {
    let provider_name = req.provider.as_deref().unwrap_or("openai");
    let provider: Provider =
        provider_name
            .parse()
            .map_err(|e: atp_registry::UnknownProvider| {
                ApiError::bad_request("unknown_provider", e.to_string())
            })?;
    let kit = s
        .visible_toolkit(llm_key_hash, &req.toolkit_id)
        .ok_or_else(|| ApiError::not_found("toolkit_not_found", "Toolkit not found"))?;
    let tools: Vec<Value> = kit
        .tools
        .iter()
        .map(|t| t.spec.provider_schema(provider, req.strict))
        .collect();
    Ok(ContextResponse::ok(
        req.request_id.clone(),
        ContextPayload {
            toolkit_id: kit.app_name.clone(),
            toolkit_name: kit.app_name.clone(),
            caption: format!("{} tool(s) of {}", tools.len(), kit.app_name),
            provider: provider_name.to_owned(),
            strict: req.strict,
            toolkit_connected: s.is_served(&kit.key_hash) || kit.endpoint_url.is_some(),
            tools,
            user_prompt: req.user_prompt.clone(),
            extra: Map::new(),
        },
    ))
}

fn context_error(request_id: Option<RequestId>, e: &ApiError) -> ContextResponse {
    ContextResponse::error(request_id, e.code, &e.message)
}

fn task_failed(request_id: Option<RequestId>, f: &Failure) -> TaskResponse {
    TaskResponse::failed(request_id, None, Value::Null, &f.code, &f.message)
}

/// Runs one `task_request` and builds its `task_response` (always exactly
/// one, whatever went wrong). The tool's progress reports go to
/// `progress` when given (see [`crate::hub::Hub::dispatch`]).
pub(crate) async fn task(
    s: &crate::State,
    llm_key_hash: &str,
    via: Via,
    req: TaskRequest,
    progress: Option<mpsc::Sender<Report>>,
) -> TaskResponse {
    task_or_limited(s, llm_key_hash, via, req, progress, None)
        .await
        .0
}

/// [`task`], and whether a rate limit refused it (for `process/`'s
/// status and `Retry-After`).
async fn task_or_limited(
    s: &crate::State,
    llm_key_hash: &str,
    via: Via,
    req: TaskRequest,
    progress: Option<mpsc::Sender<Report>>,
    admitted: Option<Permit>,
) -> (TaskResponse, Option<Limited>) {
    match run_task(s, llm_key_hash, via, &req, progress, admitted).await {
        Ok(result) => {
            let TaskRequest {
                request_id,
                payload,
                ..
            } = req;
            let done = TaskResponse::ok(
                request_id,
                Some(payload.function),
                payload.tool_call_id,
                result,
            );
            (done, None)
        }
        Err(f) => {
            tracing::debug!(code = %f.code, "task failed: {}", f.message);
            let limited = f.limited;
            (failed_task(req, &f), limited)
        }
    }
}

/// The `task_response` of a request that failed.
fn failed_task(req: TaskRequest, f: &Failure) -> TaskResponse {
    let TaskRequest {
        request_id,
        payload,
        ..
    } = req;
    TaskResponse::failed(
        request_id,
        Some(payload.function),
        payload.tool_call_id,
        &f.code,
        &f.message,
    )
}

/// `process/`'s answer to a `task_request` or an app message: 200, or the
/// status and `Retry-After` of a rate limit's refusal.
fn limited_reply(sse: bool, done: &ServerToLlm, limited: Option<Limited>) -> Response {
    let status = limited.map_or(StatusCode::OK, |l| l.status);
    let mut response = reply(sse, status, done);
    if let Some(wait) = limited.and_then(|l| l.retry_after) {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(crate::rate_limit::retry_after_secs(wait)),
        );
    }
    response
}

async fn run_task(
    s: &crate::State,
    llm_key_hash: &str,
    via: Via,
    req: &TaskRequest,
    progress: Option<mpsc::Sender<Report>>,
    admitted: Option<Permit>,
) -> Result<Value, Failure> {
    let found = req
        .payload
        .arguments()
        .map_err(|why| Failure::from(CallError::InvalidParams(why)))
        .and_then(|params| {
            let kit = s
                .visible_toolkit(llm_key_hash, &req.toolkit_id)
                .ok_or_else(|| Failure::new("toolkit_not_found", "Toolkit not found"))?;
            Ok((params, kit))
        });
    let (params, kit) = match found {
        Ok(found) => found,
        Err(f) => {
            s.audit.record(
                Entry::ended(via, Some(&f.code), false)
                    .key(s, llm_key_hash)
                    .tool(Some(&req.toolkit_id), Some(&req.payload.function)),
            );
            return Err(f);
        }
    };
    let call = ToolCall {
        function: req.payload.function.as_str(),
        params,
        auth_token: req.auth_token().cloned(),
        user: req.external_user_id(),
        logs: false,
        admitted,
        trace: req.trace(),
        via,
    };
    call_tool(s, llm_key_hash, &kit, call, progress).await
}

/// Admits a `task_request` under the rate limits before it runs (for
/// `process/` as server-sent events, whose status goes out first): its
/// permit, to run it with; `Ok(None)` when the request is one
/// [`run_task`] refuses anyway (no such toolkit, bad arguments).
fn admit_task(
    s: &crate::State,
    llm_key_hash: &str,
    req: &TaskRequest,
) -> Result<Option<Permit>, Failure> {
    let (Ok(params), Some(kit)) = (
        req.payload.arguments(),
        s.visible_toolkit(llm_key_hash, &req.toolkit_id),
    ) else {
        return Ok(None);
    };
    admit(s, llm_key_hash, &kit.app_name, &params).map(Some)
}

/// Admits a call of `toolkit` with `params` by the key `llm_key_hash`
/// under the rate limits; a refusal is counted.
fn admit(
    s: &crate::State,
    llm_key_hash: &str,
    toolkit: &str,
    params: &impl serde::Serialize,
) -> Result<Permit, Failure> {
    let request_bytes = serde_json::to_string(params).map_or(0, |t| t.len());
    let key_id = crate::api_keys::key_id(s, llm_key_hash);
    s.limits
        .admit(llm_key_hash, key_id.as_deref(), toolkit, request_bytes)
        .map_err(|r| {
            s.metrics.rate_limited(r.kind, toolkit);
            Failure::refused(r)
        })
}

/// One call of a tool by an LLM client, its toolkit found (and visible to
/// the client).
pub(crate) struct ToolCall<'a> {
    /// The tool's name.
    pub function: &'a str,
    /// Its arguments.
    pub params: Map<String, Value>,
    /// The token the caller gave, if any.
    pub auth_token: Option<Secret>,
    /// The end user whose stored OAuth token a tool that needs one gets
    /// when no token is given (`external_user_id`).
    pub user: Option<&'a str>,
    /// Whether the caller reads the tool's log messages (MCP clients do;
    /// ATP has no log message for its callers).
    pub logs: bool,
    /// The call's place under the rate limits, when it was admitted
    /// already; `None`: `call_tool` admits it.
    pub admitted: Option<Permit>,
    /// The caller's trace context (`traceparent`), if it sent a valid one.
    pub trace: Option<TraceContext>,
    /// How the call came in (for the audit log).
    pub via: Via,
}

/// Runs a tool of `kit` for the LLM key `llm_key_hash`, wherever its
/// toolkit is served (a WebSocket or inbox here, an endpoint URL, another
/// server over NATS), within the task timeout: the tool is looked up, the
/// auth token resolved (the given one, else the user's stored one), the
/// call checked, then routed. Progress reports go to `progress` when
/// given. What `task_request` and `/mcp/{toolkit}` share.
///
/// The call runs in an `atp.server.call` span (fields `toolkit`, `tool`,
/// `transport`, `trace_id`) that joins the caller's trace; the toolkit
/// gets the trace context with this span as its parent.
///
/// Every call leaves one audit row, run or refused (with its arguments
/// and result if its toolkit keeps them, redacted).
pub(crate) async fn call_tool(
    s: &crate::State,
    llm_key_hash: &str,
    kit: &ToolkitRecord,
    call: ToolCall<'_>,
    progress: Option<mpsc::Sender<Report>>,
) -> Result<Value, Failure> {
    let span = tracing::info_span!(
        "atp.server.call",
        toolkit = %kit.app_name,
        tool = call.function,
        transport = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let onward = trace::link(&span, call.trace.as_ref());
    audited_call(s, llm_key_hash, kit, call, progress, onward)
        .instrument(span)
        .await
}

/// [`call_tool`] in its span: runs the call and records its audit row.
async fn audited_call(
    s: &crate::State,
    llm_key_hash: &str,
    kit: &ToolkitRecord,
    call: ToolCall<'_>,
    progress: Option<mpsc::Sender<Report>>,
    onward: TraceContext,
) -> Result<Value, Failure> {
    let keep = s.audit.keeps_payloads(&kit.app_name);
    let (via, function) = (call.via, call.function);
    let arguments = keep.then(|| call.params.clone());
    let given = call.auth_token.clone();
    let started = std::time::Instant::now();
    let (result, ran) = run_tool(s, llm_key_hash, kit, call, progress, onward).await;
    let code = result.as_ref().err().map(|f| f.code.as_str());
    let (transport, took, token) = match ran {
        Some((transport, took, sent)) => (Some(transport), took, sent),
        None => (None, started.elapsed(), given),
    };
    s.audit.record(
        Entry::ended(via, code, transport.is_some())
            .key(s, llm_key_hash)
            .tool(Some(&kit.app_name), Some(function))
            .ran(transport, took)
            .payloads(
                keep,
                arguments.as_ref(),
                result.as_ref().ok(),
                token.as_ref(),
            ),
    );
    result
}

/// What a dispatched call did: its transport, how long it took, and the
/// token it was given (the caller's, or a user's stored one).
type Ran = (Transport, std::time::Duration, Option<Secret>);

/// [`call_tool`] but for its audit row: the result, and, if the call was
/// dispatched (not refused before), what [`Ran`].
async fn run_tool(
    s: &crate::State,
    llm_key_hash: &str,
    kit: &ToolkitRecord,
    call: ToolCall<'_>,
    progress: Option<mpsc::Sender<Report>>,
    onward: TraceContext,
) -> (Result<Value, Failure>, Option<Ran>) {
    let ToolCall {
        function,
        params,
        auth_token,
        user,
        logs,
        admitted,
        trace: _,
        via: _,
    } = call;
    let refused = |f: Failure| (Err(f), None);
    // The permit lives as long as the call.
    let _permit = match admitted {
        Some(p) => p,
        None => match admit(s, llm_key_hash, &kit.app_name, &params) {
            Ok(p) => p,
            Err(f) => return refused(f),
        },
    };
    let Some(tool) = kit.tools.iter().find(|t| t.spec.name == function) else {
        return refused(CallError::ToolNotFound.into());
    };

    let mut not_connected = None;
    let mut other_developer = false;
    let auth_token = match (auth_token, user, tool.spec.auth_provider.as_deref()) {
        (Some(t), _, _) => Some(t),
        // A user's stored token goes only to a toolkit of the caller's own
        // developer, never to another developer's public toolkit.
        (None, Some(_), Some(_)) if !s.catalog.same_developer(llm_key_hash, &kit.key_hash) => {
            other_developer = true;
            None
        }
        (None, Some(user), Some(provider)) => {
            let token = match oauth::token_for(s, llm_key_hash, provider, user).await {
                Ok(token) => token,
                Err(e) => return refused(e),
            };
            if token.is_none() {
                not_connected = Some((user, provider));
            }
            token
        }
        _ => None,
    };
    match tool.spec.check(&params, auth_token.as_ref()) {
        Err(CallError::AuthRequired) => {
            let mut message = CallError::AuthRequired.to_string();
            if other_developer {
                message.push_str(
                    ": this toolkit belongs to another developer, so the server does not give it your users' stored tokens (pass auth_token to send one)",
                );
            }
            if let Some((user, provider)) = not_connected {
                message.push_str(&format!(
                    ": user {user} has not connected {provider} (start the OAuth flow with initiate_oauth_connection)"
                ));
            }
            return refused(Failure::new(
                CallError::AuthRequired.code().as_str(),
                message,
            ));
        }
        Err(other) => return refused(other.into()),
        Ok(()) => {}
    }

    let request = ToolRequest {
        tool_name: tool.spec.name.clone(),
        params,
        auth_token,
        logs,
        trace: Some(onward),
    };
    let route = s.hub.route(&kit.key_hash, kit.endpoint_url.is_some());
    let transport = match route {
        None => Transport::remote,
        Some(Route::Endpoint) => Transport::endpoint,
        Some(Route::Socket) => Transport::websocket,
        Some(Route::Inbox) => Transport::inbox,
    };
    tracing::Span::current().record("transport", tracing::field::debug(transport));
    let started = std::time::Instant::now();
    let result: Result<Value, Failure> = async {
        Ok(match route {
            // Not here: maybe on another server.
            None => match &s.bus {
                Some(bus) => {
                    bus.call(
                        s,
                        &kit.app_name,
                        &kit.key_hash,
                        &request,
                        s.config.task_timeout,
                        progress,
                    )
                    .await?
                }
                None => return Err(RouteError::NotConnected(kit.app_name.clone()).into()),
            },
            Some(Route::Endpoint) => call_endpoint(s, kit, &request).await?,
            Some(Route::Socket | Route::Inbox) => {
                s.hub
                    .dispatch(
                        &kit.app_name,
                        &kit.key_hash,
                        &request,
                        s.config.task_timeout,
                        progress,
                    )
                    .await?
            }
        })
    }
    .await;
    let took = started.elapsed();
    let outcome = result.as_ref().map(|_| ()).map_err(|f| f.code.as_str());
    s.metrics
        .call(&kit.app_name, &tool.spec.name, transport, outcome, took);
    s.calls.send(CallEvent {
        at_ms: keys::now_millis(),
        toolkit: kit.app_name.clone(),
        tool: tool.spec.name.clone(),
        transport,
        outcome: outcome.err().unwrap_or("ok").to_owned(),
        duration_ms: took.as_secs_f64() * 1000.0,
    });
    (result, Some((transport, took, request.auth_token)))
}

/// Runs a `task_request` with progress: each progress report of the tool
/// becomes a `task_progress` handed to `emit` (which must not wait: a
/// report for a slow reader is dropped, never the answer), all of them
/// before the `task_response` this returns.
async fn task_with_progress(
    s: &crate::State,
    llm_key_hash: &str,
    via: Via,
    req: TaskRequest,
    admitted: Option<Permit>,
    emit: impl Fn(ServerToLlm),
) -> TaskResponse {
    let request_id = req.request_id.clone();
    let (tx, mut rx) = mpsc::channel(PROGRESS_BUFFER);
    let forward = |report: Report| {
        // ATP callers get progress; a log message reaches MCP clients only.
        if let Report::Progress(payload) = report {
            emit(ServerToLlm::TaskProgress(TaskProgress {
                request_id: request_id.clone(),
                payload,
            }));
        }
    };
    let work = async {
        task_or_limited(s, llm_key_hash, via, req, Some(tx), admitted)
            .await
            .0
    };
    tokio::pin!(work);
    let answer = loop {
        tokio::select! {
            biased;
            Some(p) = rx.recv() => forward(p),
            answer = &mut work => break answer,
        }
    };
    // The reports that came before the answer, before the answer.
    while let Ok(p) = rx.try_recv() {
        forward(p);
    }
    answer
}

/// Runs one `app_request`, `app_action` or `app_terminate` and builds its
/// `app_response` (always exactly one), with how `process/` answers a
/// refusal by a rate limit; `None` for other messages.
pub(crate) async fn app(
    s: &Arc<crate::State>,
    llm_key_hash: &str,
    via: Via,
    message: LlmToServer,
) -> Option<(AppResponse, Option<Limited>)> {
    Some(match message {
        LlmToServer::AppRequest(req) => app_start(s, llm_key_hash, via, req).await,
        LlmToServer::AppAction(req) => app_action(s, llm_key_hash, via, req).await,
        LlmToServer::AppTerminate(req) => (app_terminate(s, llm_key_hash, req).await, None),
        _ => return None,
    })
}

fn app_failed(
    request_id: Option<RequestId>,
    session_id: Option<String>,
    f: &Failure,
) -> AppResponse {
    tracing::debug!(code = %f.code, "app request failed: {}", f.message);
    AppResponse::error(request_id, session_id, &f.code, &f.message)
}

/// Starts an app session (`app_request`).
async fn app_start(
    s: &Arc<crate::State>,
    llm_key_hash: &str,
    via: Via,
    req: AppRequest,
) -> (AppResponse, Option<Limited>) {
    let trace = req.trace();
    let AppRequest {
        toolkit_id,
        request_id,
        payload,
        ..
    } = req;
    let kit = s.visible_toolkit(llm_key_hash, &toolkit_id);
    let done = start_audited(
        s,
        llm_key_hash,
        via,
        &toolkit_id,
        kit.as_deref(),
        payload,
        trace,
    )
    .await;
    let limited = done.as_ref().err().and_then(|f| f.limited);
    (app_started(request_id, done), limited)
}

/// The `app_response` to a session's start: its first UI, or the error.
pub(crate) fn app_started(
    request_id: Option<RequestId>,
    done: Result<(String, Value, bool), Failure>,
) -> AppResponse {
    match done {
        Ok((session_id, ui, terminated)) => {
            AppResponse::ok(request_id, session_id, Some(ui), terminated.then_some(true))
        }
        Err(f) => app_failed(request_id, None, &f),
    }
}

/// Starts a session of an app of the toolkit `toolkit_id` (`kit`, when
/// it is found and visible to the caller) and leaves the start's audit
/// row, like a tool call's (the app is a tool of its toolkit): the
/// session, its first UI and whether it already ended.
///
/// The start runs in an `atp.server.app` span (fields `toolkit`, `app`,
/// `trace_id`) that joins the caller's `trace`; the toolkit gets the
/// trace context with this span as its parent.
pub(crate) async fn start_audited(
    s: &Arc<crate::State>,
    llm_key_hash: &str,
    via: Via,
    toolkit_id: &str,
    kit: Option<&ToolkitRecord>,
    payload: atp_registry::wire::AppStart,
    trace: Option<TraceContext>,
) -> Result<(String, Value, bool), Failure> {
    let span = tracing::info_span!(
        "atp.server.app",
        toolkit = toolkit_id,
        app = %payload.app,
        trace_id = tracing::field::Empty,
    );
    let onward = trace::link(&span, trace.as_ref());
    let keep = s.audit.keeps_payloads(toolkit_id);
    let arguments = keep.then(|| payload.parameters.clone());
    let token = payload.auth_token.clone();
    let app_name = payload.app.clone();
    let began = std::time::Instant::now();
    let (done, transport) = match kit {
        Some(kit) => {
            start_app_of(s, llm_key_hash, kit, payload, onward)
                .instrument(span)
                .await
        }
        None => (
            Err(Failure::new("toolkit_not_found", "Toolkit not found")),
            None,
        ),
    };
    let code = done.as_ref().err().map(|f| f.code.as_str());
    s.audit.record(
        Entry::ended(via, code, transport.is_some())
            .key(s, llm_key_hash)
            .tool(Some(toolkit_id), Some(&app_name))
            .ran(transport, began.elapsed())
            .payloads(keep, arguments.as_ref(), None, token.as_ref()),
    );
    done
}

/// Starts a session of an app of `kit` (found, and visible to the
/// caller) for the LLM key `llm_key_hash`, here or on the server that
/// serves the toolkit, under the rate limits of the key and the toolkit:
/// the session, its first UI and whether it already ended; and the
/// transport, once the app was routed to its toolkit.
async fn start_app_of(
    s: &Arc<crate::State>,
    llm_key_hash: &str,
    kit: &ToolkitRecord,
    payload: atp_registry::wire::AppStart,
    trace: TraceContext,
) -> (Result<(String, Value, bool), Failure>, Option<Transport>) {
    // The Python toolkit ignores an app it does not have (no answer at
    // all): only the registered tools are apps.
    if !kit.tools.iter().any(|t| t.spec.name == payload.app) {
        let f = Failure::new(
            "app_not_found",
            format!(
                "Toolkit {} has no app named {:?}",
                kit.app_name, payload.app
            ),
        );
        return (Err(f), None);
    }
    let _admitted = match admit(s, llm_key_hash, &kit.app_name, &payload.parameters) {
        Ok(permit) => permit,
        Err(f) => return (Err(f), None),
    };
    crate::hub::ensure_sweeper(s);
    let request = ToolRequest {
        tool_name: payload.app,
        params: payload.parameters,
        auth_token: payload.auth_token,
        logs: false,
        trace: Some(trace),
    };
    let route = s.hub.route(&kit.key_hash, false);
    let started = match &s.bus {
        // Not here: maybe on another server.
        Some(bus) if route.is_none() => {
            bus.start_app(
                s,
                llm_key_hash,
                &kit.app_name,
                &kit.key_hash,
                &request,
                s.config.task_timeout,
            )
            .await
        }
        _ => {
            s.hub
                .start_app(
                    llm_key_hash,
                    &kit.app_name,
                    &kit.key_hash,
                    &request,
                    s.config.task_timeout,
                )
                .await
        }
    };
    let transport = match route {
        Some(Route::Inbox) => Transport::inbox,
        Some(Route::Endpoint | Route::Socket) => Transport::websocket,
        None if s.bus.is_some() => Transport::remote,
        // Not connected anywhere: refused by the hub, never routed.
        None => return (started.map_err(Failure::from), None),
    };
    (started.map_err(Failure::from), Some(transport))
}

/// Runs an `app_action` here, or on the server that holds its session.
pub(crate) async fn app_action(
    s: &Arc<crate::State>,
    llm_key_hash: &str,
    via: Via,
    req: AppActionRequest,
) -> (AppResponse, Option<Limited>) {
    let trace = req.trace();
    let AppActionRequest {
        request_id,
        payload,
        ..
    } = req;
    let session_id = payload.session_id.clone();
    let timeout = s.config.task_timeout;
    let done = match s
        .bus
        .as_ref()
        .and_then(|b| Some((b, b.holder_of(&session_id)?)))
    {
        Some((bus, holder)) => bus
            .app_action(s, holder, llm_key_hash, via, payload, trace)
            .await
            .map_err(Failure::from),
        None => act(s, llm_key_hash, via, payload, trace, timeout).await,
    };
    match done {
        Ok((ui, terminated)) => (
            AppResponse::ok(request_id, session_id, Some(ui), Some(terminated)),
            None,
        ),
        Err(f) => (app_failed(request_id, Some(session_id), &f), f.limited),
    }
}

/// Runs an action in a session held here, under the rate limits of the
/// key and the session's toolkit, and leaves its audit row (the app is a
/// tool of its toolkit, as for the session's start): the new UI and
/// whether the app ended the session.
///
/// The action runs in an `atp.server.app` span (fields `toolkit`, `app`,
/// `session`, `trace_id`) that joins the caller's `trace`; the toolkit
/// gets the trace context with this span as its parent.
pub(crate) async fn act(
    s: &crate::State,
    llm_key_hash: &str,
    via: Via,
    action: SessionAction,
    trace: Option<TraceContext>,
    timeout: std::time::Duration,
) -> Result<(Value, bool), Failure> {
    let began = std::time::Instant::now();
    let SessionAction {
        session_id,
        action_data,
    } = action;
    let session_id = session_id.as_str();
    // `None`: not open here (over, unknown, or another key's); the hub
    // says which, and nothing runs.
    let found = s.hub.session_app(llm_key_hash, session_id);
    let keep = found
        .as_ref()
        .is_some_and(|(toolkit, ..)| s.audit.keeps_payloads(toolkit));
    let arguments = keep.then(|| Map::from_iter([("action_data".to_owned(), action_data.clone())]));
    let (done, ran) = match &found {
        None => (
            s.hub
                .app_action(llm_key_hash, session_id, action_data, None, timeout)
                .await
                .map_err(Failure::from),
            None,
        ),
        Some((toolkit, app, transport)) => match admit(s, llm_key_hash, toolkit, &action_data) {
            Err(f) => (Err(f), None),
            Ok(_admitted) => {
                let span = tracing::info_span!(
                    "atp.server.app",
                    toolkit = %toolkit,
                    app = %app,
                    session = session_id,
                    trace_id = tracing::field::Empty,
                );
                let onward = trace::link(&span, trace.as_ref());
                let done = s
                    .hub
                    .app_action(llm_key_hash, session_id, action_data, Some(onward), timeout)
                    .instrument(span)
                    .await
                    .map_err(Failure::from);
                (done, Some(*transport))
            }
        },
    };
    let code = done.as_ref().err().map(|f| f.code.as_str());
    let mut entry = Entry::ended(via, code, ran.is_some()).key(s, llm_key_hash);
    if let Some((toolkit, app, _)) = &found {
        entry = entry
            .tool(Some(toolkit), Some(app))
            .ran(ran, began.elapsed())
            .payloads(keep, arguments.as_ref(), None, None);
    }
    s.audit.record(entry);
    done
}

pub(crate) async fn app_terminate(
    s: &crate::State,
    llm_key_hash: &str,
    req: AppTerminateRequest,
) -> AppResponse {
    let AppTerminateRequest {
        request_id,
        payload,
    } = req;
    let session_id = payload.session_id;
    let done = match s
        .bus
        .as_ref()
        .and_then(|b| Some((b, b.holder_of(&session_id)?)))
    {
        Some((bus, holder)) => bus.app_terminate(holder, llm_key_hash, &session_id).await,
        None => s.hub.app_terminate(llm_key_hash, &session_id),
    };
    match done {
        Ok(()) => AppResponse::ok(request_id, session_id, None, Some(true)),
        Err(e) => app_failed(request_id, Some(session_id), &Failure::from(e)),
    }
}

/// Runs a tool at the toolkit's `endpoint_url` (an ATP HTTP adapter):
/// `POST {endpoint_url}/atp/{toolkit}/{tool}/`.
async fn call_endpoint(
    s: &crate::State,
    kit: &ToolkitRecord,
    request: &ToolRequest,
) -> Result<Value, Failure> {
    let Some(base) = &kit.endpoint_url else {
        return Err(RouteError::NotConnected(kit.app_name.clone()).into());
    };
    let url = format!("{base}/atp/{}/{}/", kit.app_name, request.tool_name);
    let bearer = request
        .auth_token
        .as_ref()
        .map(|t| format!("Bearer {}", t.expose()));
    let mut headers = vec![("accept", "application/json")];
    if let Some(b) = &bearer {
        headers.push(("authorization", b.as_str()));
    }
    if let Some(k) = &kit.endpoint_key {
        headers.push(("x-atp-key", k.expose()));
    }
    if let Some(t) = &request.trace {
        headers.push((trace::TRACEPARENT, t.traceparent()));
        if let Some(state) = t.tracestate() {
            headers.push((trace::TRACESTATE, state));
        }
    }
    let body = Bytes::from(Value::Object(request.params.clone()).to_string());
    let mut shutdown = s.shutdown.subscribe();
    let answer = tokio::select! {
        a = s.outbound.send(Method::POST, &url, &headers, Some(("application/json", body)), s.config.task_timeout) => a,
        _ = crate::stopped(&mut shutdown) => return Err(RouteError::ShuttingDown.into()),
    };
    let (status, body) = answer.map_err(|e| Failure::from(RouteError::Endpoint(e.to_string())))?;
    let value: Value = serde_json::from_slice(&body).map_err(|_| {
        Failure::from(RouteError::Endpoint(format!(
            "HTTP {status} with a body that is not JSON"
        )))
    })?;
    match (status, value) {
        (200, Value::Object(mut o)) if o.contains_key("result") => {
            Ok(o.remove("result").unwrap_or(Value::Null))
        }
        (status, v) => {
            let message = v
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("HTTP {status}"));
            let code = v
                .get("code")
                .and_then(Value::as_str)
                .unwrap_or("toolkit_endpoint_error");
            Err(Failure::new(code, message))
        }
    }
}

fn answer(status: StatusCode, message: &ServerToLlm) -> Response {
    json_text_response(status, message.to_json())
}

/// The trace context of an HTTP request's `traceparent` and `tracestate`
/// headers, if valid.
pub(crate) fn trace_of(headers: &HeaderMap) -> Option<TraceContext> {
    let value = |name| headers.get(name).and_then(|v| v.to_str().ok());
    TraceContext::from_fields(value(trace::TRACEPARENT), value(trace::TRACESTATE))
}

/// Whether the client asked for server-sent events (`Accept:
/// text/event-stream`).
fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/event-stream"))
}

/// One server-sent event carrying a message.
fn event(message: &ServerToLlm) -> Bytes {
    Bytes::from(format!("data: {}\n\n", message.to_json()))
}

pub(crate) fn sse_response(status: StatusCode, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The answer to `process/`: one message, as JSON or as a single event.
fn reply(sse: bool, status: StatusCode, message: &ServerToLlm) -> Response {
    if sse {
        sse_response(status, Body::from(event(message)))
    } else {
        answer(status, message)
    }
}

/// A 200 event stream whose events `produce` writes; the stream ends when
/// it is done. Should the client go away first, the work is dropped (a
/// tool request stops waiting; an app request is abandoned).
fn sse_stream<Fut>(produce: impl FnOnce(mpsc::Sender<Bytes>) -> Fut) -> Response
where
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Bytes>(SSE_BUFFER);
    let watch = tx.clone();
    let work = produce(tx);
    tokio::spawn(async move {
        tokio::select! {
            () = work => {}
            () = watch.closed() => tracing::debug!("the event-stream client went away"),
        }
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    sse_response(StatusCode::OK, Body::from_stream(events))
}

/// `POST /api/v1/atp/llm-client/process/`.
///
/// With `Accept: text/event-stream` the answer is a stream of server-sent
/// events, `data: JSON` each: the `toolkit_context`; zero or more
/// `task_progress` and then the `task_response`; or the `app_response`;
/// then the stream ends. Its status is the one the JSON answer would have
/// (200, but for the `get_toolkit_context` errors and unreadable
/// messages). A failed authentication or an unreadable body keeps its JSON
/// error answer.
pub(crate) async fn process(
    State(s): State<Arc<crate::State>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let unauthorized = |asked: Option<&Map<String, Value>>| {
        let (toolkit, tool) = asked.map_or((None, None), asked_for);
        s.audit.record(
            Entry::call(Via::LlmHttp, Outcome::Unauthorized, Some("unauthorized"))
                .tool(toolkit, tool),
        );
        ApiError::unauthorized().into_response()
    };
    if api_key_header(&headers).is_some() && s.llm_caller(&headers, None).is_err() {
        return unauthorized(None);
    }
    let m = match read_object(body, &s.config).await {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let Ok(llm_key_hash) = s.llm_caller(&headers, Some(&m)) else {
        return unauthorized(Some(&m));
    };
    let sse = wants_sse(&headers);
    let message = LlmToServer::from_object(m).map(|mut m| {
        // The body's trace context wins; else the `traceparent` header's.
        let given = m.trace().is_some();
        if let Some((parent, state)) = m.trace_fields_mut()
            && !given
        {
            (*parent, *state) = TraceContext::into_fields(trace_of(&headers));
        }
        m
    });
    match message {
        Ok(LlmToServer::GetToolkitContext(req)) => match context(&s, &llm_key_hash, &req) {
            Ok(c) => reply(sse, StatusCode::OK, &ServerToLlm::ToolkitContext(c)),
            Err(e) => reply(
                sse,
                e.status,
                &ServerToLlm::ToolkitContext(context_error(req.request_id, &e)),
            ),
        },
        Ok(LlmToServer::TaskRequest(req)) if sse => {
            // The stream's status goes out first: the limits are checked
            // before it starts.
            let admitted = match admit_task(&s, &llm_key_hash, &req) {
                Ok(permit) => permit,
                Err(f) => {
                    s.audit.record(
                        Entry::ended(Via::LlmHttp, Some(&f.code), false)
                            .key(&s, &llm_key_hash)
                            .tool(Some(&req.toolkit_id), Some(&req.payload.function)),
                    );
                    let limited = f.limited;
                    let done = failed_task(req, &f);
                    return limited_reply(true, &ServerToLlm::TaskResponse(done), limited);
                }
            };
            sse_stream(move |tx| async move {
                let progress = tx.clone();
                let emit = move |m: ServerToLlm| {
                    let _ = progress.try_send(event(&m));
                };
                let done =
                    task_with_progress(&s, &llm_key_hash, Via::LlmHttp, req, admitted, emit).await;
                let last = event(&ServerToLlm::TaskResponse(done));
                let _ = tokio::time::timeout(s.config.task_timeout, tx.send(last)).await;
            })
        }
        Ok(LlmToServer::TaskRequest(req)) => {
            let (done, limited) =
                task_or_limited(&s, &llm_key_hash, Via::LlmHttp, req, None, None).await;
            limited_reply(false, &ServerToLlm::TaskResponse(done), limited)
        }
        // As events, the head goes out at once (a client that goes away
        // abandons the app's start); a rate limit's refusal is then the
        // event's code only.
        Ok(
            m @ (LlmToServer::AppRequest(_)
            | LlmToServer::AppAction(_)
            | LlmToServer::AppTerminate(_)),
        ) if sse => sse_stream(move |tx| async move {
            if let Some((done, _)) = app(&s, &llm_key_hash, Via::LlmHttp, m).await {
                let last = event(&ServerToLlm::AppResponse(done));
                let _ = tokio::time::timeout(s.config.task_timeout, tx.send(last)).await;
            }
        }),
        Ok(
            m @ (LlmToServer::AppRequest(_)
            | LlmToServer::AppAction(_)
            | LlmToServer::AppTerminate(_)),
        ) => match app(&s, &llm_key_hash, Via::LlmHttp, m).await {
            Some((done, limited)) => limited_reply(false, &ServerToLlm::AppResponse(done), limited),
            None => ApiError::internal("unexpected message").into_response(),
        },
        Ok(other) => {
            let (status, refusal) = refusal(WireError::UnknownType {
                kind: other.kind().into(),
                request_id: other.request_id().cloned(),
            });
            reply(sse, status, &refusal)
        }
        Err(e) => {
            let (status, refusal) = refusal(e);
            reply(sse, status, &refusal)
        }
    }
}

/// The toolkit and the tool a message asks for (`toolkit_id`,
/// `payload.function`), as far as it says: for the audit row of a refused
/// request.
fn asked_for(m: &Map<String, Value>) -> (Option<&str>, Option<&str>) {
    let tool = m
        .get("payload")
        .and_then(|p| p.get("function"))
        .and_then(Value::as_str);
    (crate::str_field(m, "toolkit_id"), tool)
}

/// `GET /ws/v1/atp/llm-client/{api_key}/`: an LLM client's WebSocket.
pub(crate) async fn socket(
    State(s): State<Arc<crate::State>>,
    key: Result<Path<String>, PathRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let key = match key {
        Ok(Path(k)) if s.keys.check(Role::Llm, &k) => Secret::new(k),
        _ => {
            s.audit.record(Entry::call(
                Via::LlmWebsocket,
                Outcome::Unauthorized,
                Some("unauthorized"),
            ));
            return ApiError::unauthorized().into_response();
        }
    };
    let Ok(ws) = ws else {
        return not_a_websocket();
    };
    ws.max_message_size(s.config.max_message_size)
        .read_buffer_size(WS_READ_BUFFER)
        .on_upgrade(move |socket| serve_socket(s, key, socket))
}

fn error_frame(request_id: Option<RequestId>, code: &str, message: &str) -> String {
    ServerToLlm::Error(ErrorFrame::new(request_id, code, message)).to_json()
}

async fn serve_socket(s: Arc<crate::State>, key: Secret, socket: WebSocket) {
    let _counted = s.metrics.llm_socket();
    let (sink, stream) = socket.split();
    let (tx, rx) = session::outbox();
    let mut shutdown = s.shutdown.subscribe();
    let opts = crate::session_options(&s.config);
    tracing::debug!("LLM client connected");
    let llm_key_hash = key_hash(key.expose());
    let revoked = {
        let (s, llm_key_hash, tx) = (s.clone(), llm_key_hash.clone(), tx.clone());
        async move {
            s.keys.revoked(&llm_key_hash).await;
            tracing::info!("an LLM client's API key was revoked: closing its WebSocket");
            let _ = tx.try_send(error_frame(None, "key_revoked", "API key revoked"));
        }
    };
    let mut conn = LlmSocket {
        llm_key_hash,
        s: s.clone(),
        key,
        tx,
        tasks: JoinSet::new(),
        authenticated: false,
    };
    session::run::<crate::AxumFrames, _, _, _, _>(
        sink,
        stream,
        rx,
        &mut conn,
        &opts,
        None,
        async move {
            tokio::select! {
                () = crate::stopped(&mut shutdown) => None,
                () = revoked => Some(REVOKED_CLOSE),
            }
        },
    )
    .await;
    // Dropping the handler aborts its tasks in flight.
    drop(conn);
    tracing::debug!("LLM client disconnected");
}

/// One LLM socket, as its messages see it.
struct LlmSocket {
    s: Arc<crate::State>,
    key: Secret,
    llm_key_hash: String,
    tx: mpsc::Sender<String>,
    tasks: JoinSet<()>,
    authenticated: bool,
}

impl Handler for LlmSocket {
    fn on_text(&mut self, text: &str) -> Flow {
        while self.tasks.try_join_next().is_some() {}
        let message = match LlmToServer::parse(text) {
            Ok(m) => m,
            Err(e) => return Flow::Reply(refusal(e).1.to_json()),
        };
        if let LlmToServer::Auth { api_key } = &message {
            let ok = api_key.as_ref().is_some_and(|k| {
                self.key.matches(k.expose().as_bytes()) && self.s.keys.check(Role::Llm, k.expose())
            });
            if !ok {
                self.s.audit.record(Entry::call(
                    Via::LlmWebsocket,
                    Outcome::Unauthorized,
                    Some("unauthorized"),
                ));
                let refusal = ServerToLlm::AuthResponse {
                    success: false,
                    error: Some("Invalid API key".into()),
                };
                return Flow::Close(Some(refusal.to_json()), 1008, "invalid API key");
            }
            self.authenticated = true;
            return Flow::Reply(
                ServerToLlm::AuthResponse {
                    success: true,
                    error: None,
                }
                .to_json(),
            );
        }
        if !self.authenticated {
            let message_text = "Authenticate first: send {\"type\": \"auth\", \"api_key\": KEY}";
            return Flow::Reply(match message {
                LlmToServer::TaskRequest(req) => {
                    self.s.audit.record(
                        Entry::call(
                            Via::LlmWebsocket,
                            Outcome::Unauthorized,
                            Some("not_authenticated"),
                        )
                        .key(&self.s, &self.llm_key_hash)
                        .tool(Some(&req.toolkit_id), Some(&req.payload.function)),
                    );
                    ServerToLlm::TaskResponse(task_failed(
                        req.request_id,
                        &Failure::new("not_authenticated", message_text),
                    ))
                    .to_json()
                }
                LlmToServer::GetToolkitContext(req) => ServerToLlm::ToolkitContext(context_error(
                    req.request_id,
                    &ApiError::unauthorized_with("not_authenticated", message_text),
                ))
                .to_json(),
                m @ (LlmToServer::AppRequest(_)
                | LlmToServer::AppAction(_)
                | LlmToServer::AppTerminate(_)) => ServerToLlm::AppResponse(AppResponse::error(
                    m.request_id().cloned(),
                    None,
                    "not_authenticated",
                    message_text,
                ))
                .to_json(),
                other => error_frame(
                    other.request_id().cloned(),
                    "not_authenticated",
                    message_text,
                ),
            });
        }
        match message {
            LlmToServer::GetToolkitContext(req) => Flow::Reply(
                ServerToLlm::ToolkitContext(match context(&self.s, &self.llm_key_hash, &req) {
                    Ok(c) => c,
                    Err(e) => context_error(req.request_id, &e),
                })
                .to_json(),
            ),
            LlmToServer::TaskRequest(req) if self.tasks.len() >= MAX_IN_FLIGHT => {
                self.s.audit.record(
                    Entry::call(
                        Via::LlmWebsocket,
                        Outcome::Refused,
                        Some("too_many_requests"),
                    )
                    .key(&self.s, &self.llm_key_hash)
                    .tool(Some(&req.toolkit_id), Some(&req.payload.function)),
                );
                let f = Failure::new(
                    "too_many_requests",
                    format!("More than {MAX_IN_FLIGHT} requests are in flight on this connection"),
                );
                Flow::Reply(ServerToLlm::TaskResponse(task_failed(req.request_id, &f)).to_json())
            }
            LlmToServer::TaskRequest(req) => {
                let (s, tx, llm_key_hash) =
                    (self.s.clone(), self.tx.clone(), self.llm_key_hash.clone());
                self.tasks.spawn(async move {
                    let done = if req.stream {
                        // Progress goes into the outbox only if there is
                        // room: it never holds up the answer.
                        let progress = tx.clone();
                        let emit = move |m: ServerToLlm| {
                            let _ = progress.try_send(m.to_json());
                        };
                        task_with_progress(&s, &llm_key_hash, Via::LlmWebsocket, req, None, emit)
                            .await
                    } else {
                        task(&s, &llm_key_hash, Via::LlmWebsocket, req, None).await
                    };
                    let _ = tx.send(ServerToLlm::TaskResponse(done).to_json()).await;
                });
                Flow::Continue
            }
            m @ (LlmToServer::AppRequest(_)
            | LlmToServer::AppAction(_)
            | LlmToServer::AppTerminate(_)) => {
                if self.tasks.len() >= MAX_IN_FLIGHT {
                    let refused = AppResponse::error(
                        m.request_id().cloned(),
                        None,
                        "too_many_requests",
                        &format!(
                            "More than {MAX_IN_FLIGHT} requests are in flight on this connection"
                        ),
                    );
                    return Flow::Reply(ServerToLlm::AppResponse(refused).to_json());
                }
                let (s, tx, llm_key_hash) =
                    (self.s.clone(), self.tx.clone(), self.llm_key_hash.clone());
                self.tasks.spawn(async move {
                    if let Some((done, _)) = app(&s, &llm_key_hash, Via::LlmWebsocket, m).await {
                        let _ = tx.send(ServerToLlm::AppResponse(done).to_json()).await;
                    }
                });
                Flow::Continue
            }
            LlmToServer::Ping { request_id } => {
                Flow::Reply(ServerToLlm::Pong { request_id }.to_json())
            }
            other => Flow::Reply(
                refusal(WireError::UnknownType {
                    kind: other.kind().into(),
                    request_id: other.request_id().cloned(),
                })
                .1
                .to_json(),
            ),
        }
    }

    fn on_binary(&mut self) -> Flow {
        Flow::Reply(error_frame(
            None,
            "invalid_message",
            "binary frames are not supported; send JSON text",
        ))
    }
}

/// The answer (and its HTTP status, for `process/`) to a message that
/// could not be read, or that this server does not take: a request that
/// has its own answer type gets it, with the error; anything else an
/// `error` frame.
fn refusal(e: WireError) -> (StatusCode, ServerToLlm) {
    let bad = StatusCode::BAD_REQUEST;
    match e {
        WireError::Invalid {
            kind: "task_request",
            request_id,
            reason,
        } => (
            StatusCode::OK,
            ServerToLlm::TaskResponse(task_failed(
                request_id,
                &Failure::new("invalid_message", reason),
            )),
        ),
        WireError::Invalid {
            kind: "get_toolkit_context",
            request_id,
            reason,
        } => (
            bad,
            ServerToLlm::ToolkitContext(context_error(
                request_id,
                &ApiError::bad_request("invalid_message", reason),
            )),
        ),
        WireError::Invalid {
            kind: kind @ ("app_request" | "app_action" | "app_terminate"),
            request_id,
            reason,
        } => (
            bad,
            ServerToLlm::AppResponse(AppResponse::error(
                request_id,
                None,
                "invalid_message",
                &format!("{kind}: {reason}"),
            )),
        ),
        WireError::UnknownType { kind, request_id } => (
            bad,
            ServerToLlm::Error(ErrorFrame::new(
                request_id,
                "unknown_message_type",
                &format!(
                    "Unknown message type {kind:?}: use auth, get_toolkit_context, task_request, app_request, app_action, app_terminate or ping"
                ),
            )),
        ),
        WireError::NoType => (
            bad,
            ServerToLlm::Error(ErrorFrame::new(
                None,
                "invalid_message",
                "The message has no \"type\"",
            )),
        ),
        e => (
            bad,
            ServerToLlm::Error(ErrorFrame::new(
                e.request_id().cloned(),
                "invalid_message",
                &e.to_string(),
            )),
        ),
    }
}
