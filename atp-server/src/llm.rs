//! The LLM side: `get_toolkit_context` and `task_request`, over the
//! LLM-client WebSocket and over `POST …/llm-client/process/`.

use std::sync::Arc;

use atp_registry::{
    CallError, Provider, Secret,
    net::{
        WS_READ_BUFFER,
        session::{self, Flow, Handler},
    },
    wire::{
        ContextPayload, ContextRequest, ContextResponse, ErrorFrame, LlmToServer, RequestId,
        ServerToLlm, TaskRequest, TaskResponse, WireError,
    },
};
use axum::{
    body::Body,
    extract::{
        Path, State,
        rejection::PathRejection,
        ws::{WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection},
    },
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::Method;
use serde_json::{Map, Value};
use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    error::{ApiError, json_text_response},
    hub::{Route, RouteError, ToolRequest},
    keys::{Role, api_key_header, key_hash},
    not_a_websocket, oauth, read_object,
    store::ToolkitRecord,
    str_field,
};

/// The most task requests one WebSocket may have in flight.
const MAX_IN_FLIGHT: usize = 1024;

/// Why a task got no result: a stable code and a message for people.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub code: String,
    pub message: String,
}

impl Failure {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
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
            RouteError::Failed { code, message } => Self { code, message },
            other => Self::new(other.code(), other.to_string()),
        }
    }
}

/// The answer to a `get_toolkit_context`, or why there is none.
pub(crate) fn context(s: &crate::State, req: &ContextRequest) -> Result<ContextResponse, ApiError> {
    let provider_name = req.provider.as_deref().unwrap_or("openai");
    let provider: Provider =
        provider_name
            .parse()
            .map_err(|e: atp_registry::UnknownProvider| {
                ApiError::bad_request("unknown_provider", e.to_string())
            })?;
    let kit = s
        .toolkit(&req.toolkit_id)
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
            toolkit_connected: s.hub.is_served(&kit.key_hash) || kit.endpoint_url.is_some(),
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
/// one, whatever went wrong).
pub(crate) async fn task(s: &crate::State, llm_key_hash: &str, req: TaskRequest) -> TaskResponse {
    let outcome = run_task(s, llm_key_hash, &req).await;
    let TaskRequest {
        request_id,
        payload,
        ..
    } = req;
    match outcome {
        Ok(result) => TaskResponse::ok(
            request_id,
            Some(payload.function),
            payload.tool_call_id,
            result,
        ),
        Err(f) => {
            tracing::debug!(code = %f.code, "task failed: {}", f.message);
            TaskResponse::failed(
                request_id,
                Some(payload.function),
                payload.tool_call_id,
                &f.code,
                &f.message,
            )
        }
    }
}

async fn run_task(
    s: &crate::State,
    llm_key_hash: &str,
    req: &TaskRequest,
) -> Result<Value, Failure> {
    let params = req
        .payload
        .arguments()
        .map_err(|why| Failure::from(CallError::InvalidParams(why)))?;
    let kit = s
        .toolkit(&req.toolkit_id)
        .ok_or_else(|| Failure::new("toolkit_not_found", "Toolkit not found"))?;
    let function = req.payload.function.as_str();
    let tool = kit
        .tools
        .iter()
        .find(|t| t.spec.name == function)
        .ok_or(CallError::ToolNotFound)?;

    let mut not_connected = None;
    let auth_token = match (
        req.auth_token(),
        req.external_user_id(),
        tool.spec.auth_provider.as_deref(),
    ) {
        (Some(t), _, _) => Some(t.clone()),
        (None, Some(user), Some(provider)) => {
            let token = oauth::token_for(s, llm_key_hash, provider, user).await?;
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
            if let Some((user, provider)) = not_connected {
                message.push_str(&format!(
                    ": user {user} has not connected {provider} (start the OAuth flow with initiate_oauth_connection)"
                ));
            }
            return Err(Failure::new(
                CallError::AuthRequired.code().as_str(),
                message,
            ));
        }
        other => other?,
    }

    let request = ToolRequest {
        tool_name: tool.spec.name.clone(),
        params,
        auth_token,
    };
    let result = match s.hub.route(&kit.key_hash, kit.endpoint_url.is_some()) {
        None => return Err(RouteError::NotConnected(kit.app_name.clone()).into()),
        Some(Route::Endpoint) => call_endpoint(s, &kit, &request).await?,
        Some(Route::Socket | Route::Inbox) => {
            s.hub
                .dispatch(
                    &kit.app_name,
                    &kit.key_hash,
                    &request,
                    s.config.task_timeout,
                )
                .await?
        }
    };
    Ok(result)
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

/// The LLM client's key: `Authorization: ApiKey KEY`, else the body's
/// `api_key`.
fn llm_key(
    s: &crate::State,
    headers: &HeaderMap,
    m: Option<&Map<String, Value>>,
) -> Option<String> {
    let key = api_key_header(headers).or_else(|| m.and_then(|m| str_field(m, "api_key")))?;
    s.keys.check(Role::Llm, key).then(|| key_hash(key))
}

fn answer(status: StatusCode, message: &ServerToLlm) -> Response {
    json_text_response(status, message.to_json())
}

/// `POST /api/v1/atp/llm-client/process/`.
pub(crate) async fn process(
    State(s): State<Arc<crate::State>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if api_key_header(&headers).is_some() && llm_key(&s, &headers, None).is_none() {
        return ApiError::unauthorized().into_response();
    }
    let m = match read_object(body, &s.config).await {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let Some(llm_key_hash) = llm_key(&s, &headers, Some(&m)) else {
        return ApiError::unauthorized().into_response();
    };
    match LlmToServer::from_object(m) {
        Ok(LlmToServer::GetToolkitContext(req)) => match context(&s, &req) {
            Ok(c) => answer(StatusCode::OK, &ServerToLlm::ToolkitContext(c)),
            Err(e) => answer(
                e.status,
                &ServerToLlm::ToolkitContext(context_error(req.request_id, &e)),
            ),
        },
        Ok(LlmToServer::TaskRequest(req)) => answer(
            StatusCode::OK,
            &ServerToLlm::TaskResponse(task(&s, &llm_key_hash, req).await),
        ),
        Ok(other) => {
            let (status, refusal) = refusal(WireError::UnknownType {
                kind: other.kind().into(),
                request_id: other.request_id().cloned(),
            });
            answer(status, &refusal)
        }
        Err(e) => {
            let (status, refusal) = refusal(e);
            answer(status, &refusal)
        }
    }
}

/// `GET /ws/v1/atp/llm-client/{api_key}/`: an LLM client's WebSocket.
pub(crate) async fn socket(
    State(s): State<Arc<crate::State>>,
    key: Result<Path<String>, PathRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let key = match key {
        Ok(Path(k)) if s.keys.check(Role::Llm, &k) => Secret::new(k),
        _ => return ApiError::unauthorized().into_response(),
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
    let (sink, stream) = socket.split();
    let (tx, rx) = session::outbox();
    let mut shutdown = s.shutdown.subscribe();
    let opts = crate::session_options(&s.config);
    tracing::debug!("LLM client connected");
    let mut conn = LlmSocket {
        llm_key_hash: key_hash(key.expose()),
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
        async move { crate::stopped(&mut shutdown).await },
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
                LlmToServer::TaskRequest(req) => ServerToLlm::TaskResponse(task_failed(
                    req.request_id,
                    &Failure::new("not_authenticated", message_text),
                ))
                .to_json(),
                LlmToServer::GetToolkitContext(req) => ServerToLlm::ToolkitContext(context_error(
                    req.request_id,
                    &ApiError::unauthorized_with("not_authenticated", message_text),
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
                ServerToLlm::ToolkitContext(match context(&self.s, &req) {
                    Ok(c) => c,
                    Err(e) => context_error(req.request_id, &e),
                })
                .to_json(),
            ),
            LlmToServer::TaskRequest(req) if self.tasks.len() >= MAX_IN_FLIGHT => {
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
                    let answer = ServerToLlm::TaskResponse(task(&s, &llm_key_hash, req).await);
                    let _ = tx.send(answer.to_json()).await;
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
        WireError::UnknownType { kind, request_id } => (
            bad,
            ServerToLlm::Error(ErrorFrame::new(
                request_id,
                "unknown_message_type",
                &format!(
                    "Unknown message type {kind:?}: use auth, get_toolkit_context or task_request"
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
