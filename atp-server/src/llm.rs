//! The LLM side (ATP-SPEC §6): `get_toolkit_context` and `task_request`,
//! over the LLM-client WebSocket and over `POST …/llm-client/process/`.

use std::{sync::Arc, time::Instant};

use atp_registry::net::{WS_READ_BUFFER, send_queued};
use atp_registry::{CallError, Provider, Secret};
use axum::{
    body::Body,
    extract::{
        Path, State,
        rejection::PathRejection,
        ws::{
            CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
        },
    },
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::Method;
use serde_json::{Map, Value, json};
use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    error::{ApiError, json_response},
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
        Self::new(e.code(), e.to_string())
    }
}

/// A `toolkit_context` answer, or the error of a `get_toolkit_context`.
pub(crate) fn context(s: &crate::State, m: &Map<String, Value>) -> Result<Value, ApiError> {
    let Some(toolkit_id) = str_field(m, "toolkit_id") else {
        return Err(ApiError::bad_request(
            "invalid_message",
            "toolkit_id is missing",
        ));
    };
    let provider_name = match m.get("provider") {
        None | Some(Value::Null) => "openai",
        Some(Value::String(p)) => p.as_str(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "unknown_provider",
                "provider must be a string",
            ));
        }
    };
    let provider: Provider =
        provider_name
            .parse()
            .map_err(|e: atp_registry::UnknownProvider| {
                ApiError::bad_request("unknown_provider", e.to_string())
            })?;
    let strict = matches!(m.get("strict"), Some(Value::Bool(true)))
        || m.get("strict").and_then(Value::as_str) == Some("true");
    let kit = s
        .toolkit(toolkit_id)
        .ok_or_else(|| ApiError::not_found("toolkit_not_found", "Toolkit not found"))?;
    let tools: Vec<Value> = kit
        .tools
        .iter()
        .map(|t| provider.tool_schema(&t.name, &t.meta.description, &t.meta.input_schema, strict))
        .collect();
    Ok(json!({
        "type": "toolkit_context",
        "request_id": m.get("request_id").cloned().unwrap_or(Value::Null),
        "status": "success",
        "payload": {
            "toolkit_id": kit.app_name,
            "toolkit_name": kit.app_name,
            "caption": format!("{} tool(s) of {}", tools.len(), kit.app_name),
            "provider": provider_name,
            "strict": strict,
            "toolkit_connected": s.hub.is_served(&kit.key_hash) || kit.endpoint_url.is_some(),
            "tools": tools,
            "user_prompt": m.get("user_prompt").cloned().unwrap_or(Value::Null),
        },
    }))
}

fn context_error(m: &Map<String, Value>, e: &ApiError) -> Value {
    json!({
        "type": "toolkit_context",
        "request_id": m.get("request_id").cloned().unwrap_or(Value::Null),
        "status": "error",
        "message": e.message,
        "error": e.message,
        "code": e.code,
    })
}

/// The `task_response` to a result or a failure: the result is at
/// `payload.result` (the seed's place) and at `result.tool.result` (where
/// the published Python `LLMClient` reads it); a failure's result is
/// `{"error": MESSAGE}` in both places, with `error` and `code` beside.
pub(crate) fn task_response(
    m: &Map<String, Value>,
    function: Option<&str>,
    outcome: Result<Value, Failure>,
) -> Value {
    let payload = m.get("payload").and_then(Value::as_object);
    let tool_call_id = payload
        .and_then(|p| p.get("tool_call_id"))
        .cloned()
        .unwrap_or(Value::Null);
    let (status, result, failure) = match outcome {
        Ok(v) => ("success", v, None),
        Err(f) => ("failed", json!({"error": f.message}), Some(f)),
    };
    let mut answer = json!({
        "type": "task_response",
        "request_id": m.get("request_id").cloned().unwrap_or(Value::Null),
        "status": status,
        "payload": {"result": result, "function": function, "tool_call_id": tool_call_id},
        "result": {"tool": {"name": function, "result": result}},
    });
    if let Some(f) = failure {
        answer["error"] = Value::String(f.message);
        answer["code"] = Value::String(f.code);
    }
    answer
}

/// Runs one `task_request` and builds its `task_response` (always exactly
/// one, whatever went wrong).
pub(crate) async fn task(s: &crate::State, llm_key_hash: &str, m: &Map<String, Value>) -> Value {
    let function = m
        .get("payload")
        .and_then(|p| p.get("function"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let outcome = run_task(s, llm_key_hash, m).await;
    if let Err(f) = &outcome {
        tracing::debug!(code = %f.code, "task failed: {}", f.message);
    }
    task_response(m, function.as_deref(), outcome)
}

async fn run_task(
    s: &crate::State,
    llm_key_hash: &str,
    m: &Map<String, Value>,
) -> Result<Value, Failure> {
    let Some(toolkit_id) = str_field(m, "toolkit_id") else {
        return Err(Failure::new("invalid_message", "toolkit_id is missing"));
    };
    let Some(payload) = m.get("payload").and_then(Value::as_object) else {
        return Err(Failure::new(
            "invalid_message",
            "payload must be an object with function and parameters",
        ));
    };
    let Some(function) = str_field(payload, "function") else {
        return Err(Failure::new(
            "invalid_message",
            "payload.function is missing",
        ));
    };
    let params = match payload.get("parameters").or_else(|| payload.get("params")) {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p.clone(),
        Some(Value::String(text)) if text.trim().is_empty() => Map::new(),
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(p)) => p,
            _ => {
                return Err(
                    CallError::InvalidParams("parameters must be a JSON object".into()).into(),
                );
            }
        },
        Some(_) => {
            return Err(CallError::InvalidParams("parameters must be a JSON object".into()).into());
        }
    };
    let kit = s
        .toolkit(toolkit_id)
        .ok_or_else(|| Failure::new("toolkit_not_found", "Toolkit not found"))?;
    let tool = kit
        .tools
        .iter()
        .find(|t| t.name == function)
        .ok_or(CallError::ToolNotFound)?;

    let explicit = str_field(payload, "auth_token")
        .or_else(|| str_field(m, "auth_token"))
        .map(Secret::new);
    let user = str_field(m, "external_user_id").or_else(|| str_field(payload, "external_user_id"));
    let mut not_connected = None;
    let auth_token = match (explicit, user, tool.meta.auth_provider.as_deref()) {
        (Some(t), _, _) => Some(t),
        (None, Some(user), Some(provider)) => {
            let token = oauth::token_for(s, llm_key_hash, provider, user).await?;
            if token.is_none() {
                not_connected = Some((user, provider));
            }
            token
        }
        _ => None,
    };

    if tool.meta.requires_auth() && auth_token.is_none() {
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
    atp_registry::check_params(&tool.meta.params, &tool.meta.required_params, &params)?;

    let request = ToolRequest {
        tool_name: tool.name.clone(),
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
    // A toolkit reports a failure as `{"error": MESSAGE}`.
    if let Some(Value::String(message)) = result
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.get("error"))
    {
        return Err(Failure::new("tool_error", message.clone()));
    }
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

/// `POST /api/v1/atp/llm-client/process/`.
pub(crate) async fn process(
    State(s): State<Arc<crate::State>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if api_key_header(&headers).is_some() && llm_key(&s, &headers, None).is_none() {
        return ApiError::unauthorized().into_response();
    }
    let m = match read_object(body, s.config.max_message_size).await {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let Some(llm_key_hash) = llm_key(&s, &headers, Some(&m)) else {
        return ApiError::unauthorized().into_response();
    };
    match m.get("type").and_then(Value::as_str) {
        Some("get_toolkit_context") => match context(&s, &m) {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(e) => json_response(e.status, &context_error(&m, &e)),
        },
        Some("task_request") => json_response(StatusCode::OK, &task(&s, &llm_key_hash, &m).await),
        Some(other) => ApiError::bad_request(
            "unknown_message_type",
            format!("Unknown message type {other:?}: use get_toolkit_context or task_request"),
        )
        .into_response(),
        None => {
            ApiError::bad_request("invalid_message", "The message has no \"type\"").into_response()
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

fn error_frame(m: Option<&Map<String, Value>>, code: &str, message: &str) -> String {
    json!({
        "type": "error",
        "request_id": m.and_then(|m| m.get("request_id")).cloned().unwrap_or(Value::Null),
        "status": "error",
        "error": message,
        "message": message,
        "code": code,
    })
    .to_string()
}

/// What the LLM socket loop does after a frame.
enum Next {
    Continue,
    /// Send this frame, then close with this code and reason.
    Refuse(String, u16, &'static str),
}

async fn serve_socket(s: Arc<crate::State>, key: Secret, socket: WebSocket) {
    let llm_key_hash = key_hash(key.expose());
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let mut tasks = JoinSet::new();
    let mut authenticated = false;
    let mut shutdown = s.shutdown.subscribe();
    let interval = s.config.ping_interval;
    let mut ping = tokio::time::interval(interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut last_seen = Instant::now();
    tracing::debug!("LLM client connected");
    loop {
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => {
                let _ = sink.send(close(1001, "server shutting down")).await;
                break;
            }
            Some(out) = rx.recv() => {
                if send_queued(&mut sink, out, &mut rx, |t| Message::Text(t.into())).await.is_err() {
                    break;
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            frame = stream.next() => {
                last_seen = Instant::now();
                let text = match frame {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        let _ = tx.send(error_frame(None, "invalid_message", "binary frames are not supported; send JSON text"));
                        continue;
                    }
                    Some(Ok(_)) => continue,
                };
                let ctx = Conn { s: &s, key: &key, llm_key_hash: &llm_key_hash, tx: &tx };
                if let Next::Refuse(frame, code, reason) =
                    ctx.message(text.as_str(), &mut authenticated, &mut tasks)
                {
                    let _ = sink.send(Message::Text(frame.into())).await;
                    let _ = sink.send(close(code, reason)).await;
                    break;
                }
            }
            _ = ping.tick() => {
                if last_seen.elapsed() >= interval * 2 {
                    let _ = sink.send(close(1011, "no answer to pings")).await;
                    break;
                }
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
            }
        }
    }
    tasks.abort_all();
    tracing::debug!("LLM client disconnected");
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// One LLM socket, as its messages see it.
struct Conn<'a> {
    s: &'a Arc<crate::State>,
    key: &'a Secret,
    llm_key_hash: &'a str,
    tx: &'a mpsc::UnboundedSender<String>,
}

impl Conn<'_> {
    /// Handles one text frame: answers go out through `tx` (task requests
    /// run concurrently in `tasks`).
    fn message(&self, text: &str, authenticated: &mut bool, tasks: &mut JoinSet<()>) -> Next {
        let send = |frame: String| {
            let _ = self.tx.send(frame);
        };
        let Ok(Value::Object(m)) = serde_json::from_str::<Value>(text) else {
            send(error_frame(
                None,
                "invalid_message",
                "messages must be JSON objects",
            ));
            return Next::Continue;
        };
        let kind = m.get("type").and_then(Value::as_str).unwrap_or_default();
        if kind == "auth" {
            let ok = str_field(&m, "api_key")
                .is_some_and(|k| self.key.matches(k.as_bytes()) && self.s.keys.check(Role::Llm, k));
            if !ok {
                let refusal =
                    json!({"type": "auth_response", "success": false, "error": "Invalid API key"});
                return Next::Refuse(refusal.to_string(), 1008, "invalid API key");
            }
            *authenticated = true;
            send(json!({"type": "auth_response", "success": true}).to_string());
            return Next::Continue;
        }
        if !*authenticated {
            let message = "Authenticate first: send {\"type\": \"auth\", \"api_key\": KEY}";
            send(match kind {
                "task_request" => {
                    task_response(&m, None, Err(Failure::new("not_authenticated", message)))
                        .to_string()
                }
                "get_toolkit_context" => context_error(
                    &m,
                    &ApiError::unauthorized_with("not_authenticated", message),
                )
                .to_string(),
                _ => error_frame(Some(&m), "not_authenticated", message),
            });
            return Next::Continue;
        }
        match kind {
            "get_toolkit_context" => send(match context(self.s, &m) {
                Ok(v) => v.to_string(),
                Err(e) => context_error(&m, &e).to_string(),
            }),
            "task_request" if tasks.len() >= MAX_IN_FLIGHT => {
                let f = Failure::new(
                    "too_many_requests",
                    format!("More than {MAX_IN_FLIGHT} requests are in flight on this connection"),
                );
                send(task_response(&m, None, Err(f)).to_string());
            }
            "task_request" => {
                let (s, tx, llm_key_hash) = (
                    self.s.clone(),
                    self.tx.clone(),
                    self.llm_key_hash.to_owned(),
                );
                tasks.spawn(async move {
                    let answer = task(&s, &llm_key_hash, &m).await;
                    let _ = tx.send(answer.to_string());
                });
            }
            "ping" => send(json!({"type": "pong", "request_id": m.get("request_id")}).to_string()),
            "" => send(error_frame(
                Some(&m),
                "invalid_message",
                "The message has no \"type\"",
            )),
            other => send(error_frame(
                Some(&m),
                "unknown_message_type",
                &format!(
                    "Unknown message type {other:?}: use auth, get_toolkit_context or task_request"
                ),
            )),
        }
        Next::Continue
    }
}
