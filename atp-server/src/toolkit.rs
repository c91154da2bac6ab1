//! The toolkit side (docs/PROTOCOL.md §5): `register_tool`, `verify_hash`,
//! `verify_tool_hash`, the toolkit WebSocket and the HTTP inbox.

use std::{
    sync::{Arc, PoisonError},
    time::Duration,
};

use atp_registry::{
    Secret, ToolSpec, is_valid_toolkit_name,
    net::{
        WS_READ_BUFFER,
        session::{self, Flow, Handler},
    },
    wire::{
        InboxReply, ProgressBody, RegisterTool, Registered, ServerToToolkit, ToolResponse,
        ToolkitToServer, UpToDate, VerifyHash, VerifyToolHash, WebhookEvent, WireError,
    },
};
use axum::{
    body::Body,
    extract::{
        Path, RawQuery, State,
        rejection::PathRejection,
        ws::{WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection},
    },
    http::StatusCode,
    response::{IntoResponse, Response},
};
use futures_util::StreamExt;
use serde_json::{Map, Value, json};

use crate::{
    REVOKED_CLOSE,
    error::{ApiError, json_response},
    hub::{AppAnswer, Report},
    keys::{Role, key_hash},
    not_a_websocket, read_object,
    store::{ToolRecord, ToolkitRecord},
    str_field,
};

type AppState = State<Arc<crate::State>>;

fn reply(result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    }
}

/// The API key of a body, checked.
fn body_key(s: &crate::State, m: &Map<String, Value>) -> Result<String, ApiError> {
    match str_field(m, "api_key") {
        Some(k) if s.keys.check(Role::Toolkit, k) => Ok(key_hash(k)),
        _ => Err(ApiError::unauthorized()),
    }
}

/// The API key of a path, checked.
fn path_key(
    s: &crate::State,
    key: Result<Path<String>, PathRejection>,
) -> Result<String, ApiError> {
    match key {
        Ok(Path(k)) if s.keys.check(Role::Toolkit, &k) => Ok(key_hash(&k)),
        _ => Err(ApiError::unauthorized()),
    }
}

/// `POST /api/v1/register_tool`: stores one tool of a toolkit.
pub(crate) async fn register_tool(State(s): AppState, body: Body) -> Response {
    reply(register(&s, body).await)
}

async fn register(s: &crate::State, body: Body) -> Result<Value, ApiError> {
    let m = read_object(body, &s.config).await?;
    let key_hash = body_key(s, &m)?;
    let r: RegisterTool = serde_json::from_value(Value::Object(m))
        .map_err(|e| ApiError::bad_request("invalid_tool", e.to_string()))?;
    let app_name = match r.app_name {
        Some(a) if is_valid_toolkit_name(&a) => a,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_app_name",
                "app_name must be 1-128 characters from A-Z a-z 0-9 _ - .",
            ));
        }
    };
    let Some(name) = r.function_id else {
        return Err(ApiError::bad_request(
            "invalid_tool",
            "function_id (the tool's name) is missing",
        ));
    };
    let endpoint_url = match r.endpoint_url.or(r.metadata.endpoint_url.clone()) {
        None => None,
        Some(None) => Some(None),
        Some(Some(u)) if u.starts_with("http://") || u.starts_with("https://") => {
            Some(Some(u.trim_end_matches('/').to_owned()))
        }
        Some(Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_endpoint_url",
                "endpoint_url must be an http:// or https:// URL",
            ));
        }
    };
    let spec = ToolSpec::from_metadata(&name, r.metadata)
        .map_err(|e| ApiError::bad_request("invalid_tool", e.to_string()))?;
    let endpoint_key = r.endpoint_key;
    let tool = ToolRecord {
        code_hash: r.code_hash.unwrap_or_default(),
        spec,
    };

    if !crate::api_keys::in_scope(s, &key_hash, &app_name) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "out_of_scope",
            format!("This API key's scope does not include the toolkit {app_name}"),
        ));
    }
    let _one_at_a_time = s.register_lock.lock().await;
    let existing = s.toolkit(&app_name);
    let mut kit = match existing {
        Some(k) if k.key_hash != key_hash => {
            if !s.config.dev {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "app_name_taken",
                    format!("The toolkit {app_name} is registered with another API key"),
                ));
            }
            tracing::warn!(app = %app_name, "dev mode: another API key takes over the toolkit");
            ToolkitRecord {
                key_hash: key_hash.clone(),
                ..(*k).clone()
            }
        }
        Some(k) => (*k).clone(),
        None => ToolkitRecord {
            app_name: app_name.clone(),
            key_hash: key_hash.clone(),
            endpoint_url: None,
            endpoint_key: None,
            toolkit_hash: None,
            language: String::new(),
            tools: Vec::new(),
        },
    };
    if let Some(url) = endpoint_url {
        kit.endpoint_url = url;
        kit.endpoint_key = endpoint_key;
    }
    kit.toolkit_hash = r.toolkit_hash;
    if let Some(lang) = r.programming_language {
        kit.language = lang;
    }
    let position = match kit.tools.iter().position(|t| t.spec.name == name) {
        Some(i) => {
            kit.tools[i] = tool.clone();
            i
        }
        None => {
            kit.tools.push(tool.clone());
            kit.tools.len() - 1
        }
    };
    s.store
        .save_tool(&kit, &tool, position)
        .await
        .map_err(|e| {
            tracing::error!("could not store a registration: {e}");
            ApiError::internal("The registration could not be stored")
        })?;
    s.toolkits
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(app_name.clone(), Arc::new(kit));
    s.hub.touch();
    if let Some(bus) = &s.bus {
        bus.toolkit_changed(&app_name).await;
    }
    tracing::info!(app = %app_name, tool = %name, "tool registered");
    let exchange_token =
        crate::catalog::issue_exchange_token(s, &app_name, &name, &key_hash).await?;
    to_value(&Registered {
        status: "registered".into(),
        app_name,
        function_id: name,
        exchange_token: Secret::new(exchange_token),
    })
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|_| ApiError::internal("the answer could not be written"))
}

/// Reads a body of type `T` (a JSON object whose fields are checked).
fn typed<T: serde::de::DeserializeOwned>(m: Map<String, Value>) -> Result<T, ApiError> {
    serde_json::from_value(Value::Object(m))
        .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))
}

/// `POST /api/v1/toolkit/verify_hash`: whether the stored toolkit is the
/// one the client has.
pub(crate) async fn verify_hash(State(s): AppState, body: Body) -> Response {
    reply(
        async {
            let m = read_object(body, &s.config).await?;
            let key_hash = body_key(&s, &m)?;
            let v: VerifyHash = typed(m)?;
            let up_to_date = match (v.app_name, v.toolkit_hash) {
                (Some(app), Some(hash)) => s.toolkit(&app).is_some_and(|k| {
                    k.key_hash == key_hash && k.toolkit_hash.as_deref() == Some(hash.as_str())
                }),
                _ => false,
            };
            to_value(&UpToDate { up_to_date })
        }
        .await,
    )
}

/// `POST /api/v1/toolkit/verify_tool_hash`: whether one stored tool is
/// the one the client has.
pub(crate) async fn verify_tool_hash(State(s): AppState, body: Body) -> Response {
    reply(
        async {
            let m = read_object(body, &s.config).await?;
            let key_hash = body_key(&s, &m)?;
            let v: VerifyToolHash = typed(m)?;
            let (Some(name), Some(hash)) = (v.tool_name, v.tool_hash) else {
                return to_value(&UpToDate { up_to_date: false });
            };
            let app = v.app_name;
            let kits = s.toolkits.read().unwrap_or_else(PoisonError::into_inner);
            let up_to_date = kits.values().any(|k| {
                k.key_hash == key_hash
                    && app.as_ref().is_none_or(|a| *a == k.app_name)
                    && k.tools
                        .iter()
                        .any(|t| t.spec.name == name && t.code_hash == hash)
            });
            to_value(&UpToDate { up_to_date })
        }
        .await,
    )
}

/// `GET /api/v1/toolkit/{api_key}/inbox[?wait=SECONDS]`: the next tool
/// request for this key (`{"request_id", "tool_name", "params",
/// "auth_token"}`), or `{}` when none came within the wait.
///
/// App sessions' messages come the same way, with a `message_type`:
/// `{"message_type": "atp_app_request", "request_id", "tool_name",
/// "params", "auth_token"}`, `{"message_type": "atp_app_action",
/// "request_id", "action_data"}`, `{"message_type": "atp_app_terminate",
/// "request_id"}` (the `request_id` is the session id).
pub(crate) async fn inbox(
    State(s): AppState,
    key: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Response {
    let key_hash = match path_key(&s, key) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let mut wait = s.config.inbox_wait;
    if let Some(q) = query {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            if k == "wait"
                && let Ok(secs) = v.parse::<f64>()
                && let Ok(asked) = Duration::try_from_secs_f64(secs)
            {
                wait = wait.min(asked);
            }
        }
    }
    crate::hub::ensure_sweeper(&s);
    s.hub.touch_inbox(&key_hash);
    announce(&s, &key_hash, "inbox");
    let entry = s.hub.poll_inbox(&key_hash, wait).await;
    crate::error::json_text_response(StatusCode::OK, entry.unwrap_or_else(|| "{}".to_owned()))
}

/// `POST /api/v1/toolkit/{api_key}/inbox/respond`: the answer to a request
/// taken from the inbox (`{"request_id", "response"}`); for an app
/// session's request, `"terminated": true` beside them says the app ended
/// the session.
pub(crate) async fn inbox_respond(
    State(s): AppState,
    key: Result<Path<String>, PathRejection>,
    body: Body,
) -> Response {
    reply(
        async {
            let key_hash = path_key(&s, key)?;
            let m = read_object(body, &s.config).await?;
            let terminated = m.get("terminated").and_then(Value::as_bool) == Some(true);
            let reply: InboxReply = typed(m)?;
            let request_id = reply.request_id.to_string();
            let outcome = reply.outcome();
            let here = s
                .hub
                .inbox_answer(&key_hash, &request_id, outcome.clone(), terminated);
            // The request may wait on another server (its id says which).
            let there = match (&s.bus, here) {
                (Some(bus), false) => match bus.holder_of(&request_id) {
                    Some(holder) => {
                        bus.inbox_answer(holder, &key_hash, &request_id, outcome, terminated)
                            .await
                    }
                    None => false,
                },
                _ => false,
            };
            if here || there {
                to_value(&atp_registry::wire::Status::ok())
            } else {
                Err(ApiError::not_found(
                    "request_not_found",
                    "No request with that id is waiting for this toolkit",
                ))
            }
        }
        .await,
    )
}

/// `GET /ws/v1/atp/toolkit-client/{api_key}/`: a toolkit's WebSocket.
pub(crate) async fn socket(
    State(s): AppState,
    key: Result<Path<String>, PathRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let key_hash = match path_key(&s, key) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let Ok(ws) = ws else {
        return not_a_websocket();
    };
    ws.max_message_size(s.config.max_message_size)
        .read_buffer_size(WS_READ_BUFFER)
        .on_upgrade(move |socket| serve_socket(s, key_hash, socket))
}

fn error_frame(message: &str) -> String {
    ServerToToolkit::Error {
        message: message.to_owned(),
    }
    .to_json()
}

/// Tells the webhooks when a toolkit key starts or stops being served
/// (`transport`: how it is served, or how it stopped being served): one
/// `toolkit_connected` / `toolkit_disconnected` per toolkit registered
/// with the key. The data names the toolkit and the transport, never a key.
/// A toolkit that connects before registering anything is not announced.
pub(crate) fn announce(s: &Arc<crate::State>, key_hash: &str, transport: &'static str) {
    s.hub.presence_changed(key_hash, |online| {
        let apps = s.apps_of(key_hash);
        let event = if online {
            WebhookEvent::ToolkitConnected
        } else {
            WebhookEvent::ToolkitDisconnected
        };
        tracing::debug!(?apps, transport, event = event.as_str(), "toolkit presence");
        for app in &apps {
            crate::webhooks::emit(
                s,
                event,
                crate::webhooks::Audience::Toolkit(app),
                json!({"toolkit_id": app, "transport": transport}),
            );
        }
    });
}

async fn serve_socket(s: Arc<crate::State>, key_hash: String, socket: WebSocket) {
    crate::hub::ensure_sweeper(&s);
    let (id, tx, out) = s.hub.add_socket(&key_hash);
    announce(&s, &key_hash, "websocket");
    let apps = s.apps_of(&key_hash);
    tracing::info!(socket = id, apps = ?apps, "toolkit connected");
    let (sink, stream) = socket.split();
    let hello = ServerToToolkit::Connected {
        message: format!(
            "Connected to atp-server; serving toolkits: {}",
            if apps.is_empty() {
                "(none registered yet)".to_owned()
            } else {
                apps.join(", ")
            }
        ),
    };
    let mut shutdown = s.shutdown.subscribe();
    let opts = crate::session_options(&s.config);
    let mut handler = ToolkitSocket { s: &s, socket: id };
    let revoked = {
        let (s, key_hash, tx) = (s.clone(), key_hash.clone(), tx.clone());
        async move {
            s.keys.revoked(&key_hash).await;
            tracing::info!(
                socket = id,
                "the toolkit's API key was revoked: closing its WebSocket"
            );
            let _ = tx.try_send(error_frame("API key revoked"));
        }
    };
    let ended = session::run::<crate::AxumFrames, _, _, _, _>(
        sink,
        stream,
        out,
        &mut handler,
        &opts,
        Some(hello.to_json()),
        async move {
            tokio::select! {
                () = crate::stopped(&mut shutdown) => None,
                () = revoked => Some(REVOKED_CLOSE),
            }
        },
    )
    .await;
    drop(tx);
    if ended == session::Ended::Dead {
        tracing::warn!(
            socket = id,
            "toolkit did not answer pings (or did not read); closed"
        );
    }
    s.hub.remove_socket(&key_hash, id);
    announce(&s, &key_hash, "websocket");
    tracing::info!(socket = id, "toolkit disconnected");
}

/// A toolkit's WebSocket, as its frames see it.
struct ToolkitSocket<'a> {
    s: &'a crate::State,
    socket: u64,
}

impl Handler for ToolkitSocket<'_> {
    fn on_text(&mut self, text: &str) -> Flow {
        let socket = self.socket;
        match ToolkitToServer::parse(text) {
            Ok(ToolkitToServer::ToolResponse(r)) => {
                let Some(request_id) = r.request_id.as_ref().map(ToString::to_string) else {
                    return Flow::Reply(error_frame("tool_response without a request_id"));
                };
                if !self.s.hub.socket_answer(socket, &request_id, r.outcome()) {
                    tracing::debug!(socket, %request_id, "answer to a request that is not waiting (expired or unknown)");
                }
                Flow::Continue
            }
            Ok(ToolkitToServer::ToolProgress(p)) => {
                let request_id = p.request_id.to_string();
                let progress = ProgressBody {
                    progress: p.progress,
                    total: p.total,
                    message: p.message,
                };
                if !self
                    .s
                    .hub
                    .socket_report(socket, &request_id, Report::Progress(progress))
                {
                    tracing::trace!(socket, %request_id, "progress nobody takes (not asked for, unknown, or a slow reader)");
                }
                Flow::Continue
            }
            Ok(ToolkitToServer::ToolLog(l)) => {
                let request_id = l.request_id.to_string();
                let report = Report::Log {
                    level: l.level,
                    data: l.data,
                };
                if !self.s.hub.socket_report(socket, &request_id, report) {
                    tracing::trace!(socket, %request_id, "a log message nobody takes (not asked for, unknown, or a slow reader)");
                }
                Flow::Continue
            }
            Ok(ToolkitToServer::AppResponse(r)) => {
                let session_id = r.request_id.to_string();
                let terminated = r.terminated == Some(true);
                // The same reading as a tool's answer: the flag when the
                // toolkit sends it, else the legacy `{"error": MESSAGE}`.
                let result = ToolResponse {
                    request_id: Some(r.request_id),
                    result: r.result,
                    is_error: r.is_error,
                    code: None,
                }
                .outcome();
                let answer = AppAnswer { result, terminated };
                if !self.s.hub.socket_app_answer(socket, &session_id, answer) {
                    tracing::debug!(socket, session = %session_id, "app answer nobody waits for (unknown session, another socket's, or abandoned)");
                }
                Flow::Continue
            }
            Ok(ToolkitToServer::Ping) => Flow::Reply(ServerToToolkit::Pong.to_json()),
            Ok(other) => {
                tracing::debug!(socket, ?other, "ignoring a toolkit message");
                Flow::Continue
            }
            Err(WireError::UnknownType { kind, .. }) => {
                tracing::debug!(socket, kind, "ignoring a toolkit message");
                Flow::Continue
            }
            Err(e @ WireError::Invalid { .. }) => Flow::Reply(error_frame(&e.to_string())),
            Err(WireError::NoType) => Flow::Reply(error_frame("a message needs a \"type\"")),
            Err(e) => Flow::Reply(error_frame(&e.to_string())),
        }
    }

    fn on_binary(&mut self) -> Flow {
        Flow::Reply(error_frame(
            "binary frames are not supported; send JSON text",
        ))
    }
}
