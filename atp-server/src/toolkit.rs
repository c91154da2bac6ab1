//! The toolkit side (ATP-SPEC §4): `register_tool`, `verify_hash`,
//! `verify_tool_hash`, the toolkit WebSocket and the HTTP inbox.

use std::{
    sync::{Arc, PoisonError},
    time::{Duration, Instant},
};

use atp_registry::net::{WS_READ_BUFFER, send_queued};
use atp_registry::{Call, Secret, Tool, ToolError, ToolKitClient, is_valid_toolkit_name};
use axum::{
    body::Body,
    extract::{
        Path, RawQuery, State,
        rejection::PathRejection,
        ws::{
            CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
        },
    },
    http::StatusCode,
    response::{IntoResponse, Response},
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value, json};

use crate::{
    error::{ApiError, json_response},
    keys::{Role, key_hash, random_token},
    not_a_websocket, read_object,
    store::{self, ToolMeta, ToolRecord, ToolkitRecord},
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

fn string_list(v: Option<&Value>, name: &str) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_owned).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_tool",
                        format!("{name} must be a list of strings"),
                    )
                })
            })
            .collect(),
        Some(_) => Err(ApiError::bad_request(
            "invalid_tool",
            format!("{name} must be a list of strings"),
        )),
    }
}

fn opt_string(m: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad_request(
            "invalid_tool",
            format!("{name} must be a string or null"),
        )),
    }
}

/// Reads a tool's announced metadata, with every registration rule of
/// ATP-SPEC §2 (the core's own checks, run on a throwaway toolkit).
fn tool_meta(name: &str, meta: &Map<String, Value>) -> Result<ToolMeta, ApiError> {
    let params = string_list(meta.get("params"), "params")?;
    let required_params = string_list(meta.get("required_params"), "required_params")?;
    let description = opt_string(meta, "description")?.unwrap_or_default();
    let auth_provider = opt_string(meta, "auth_provider")?;
    let auth_type = opt_string(meta, "auth_type")?;
    let auth_with = opt_string(meta, "auth_with")?;
    let mut tool = Tool::new(name)
        .description(description.clone())
        .params(params.clone())
        .required_params(required_params.clone());
    if let Some(p) = &auth_provider {
        tool = tool.auth_provider(p.clone());
    }
    if let Some(t) = &auth_type {
        tool = tool.auth_type(t.clone());
    }
    let probe = ToolKitClient::new("", "probe");
    probe
        .register_tool(tool, |_call: Call| async {
            Ok::<_, ToolError>(Value::Null)
        })
        .map_err(|e| ApiError::bad_request("invalid_tool", e.to_string()))?;
    let input_schema = match meta.get("input_schema") {
        None | Some(Value::Null) => probe
            .tool(name)
            .map(|t| t.input_schema().clone())
            .ok_or_else(|| ApiError::internal("the tool could not be described"))?,
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("object") => {
            Value::Object(o.clone())
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_tool",
                "input_schema must be a JSON Schema of type object",
            ));
        }
    };
    Ok(ToolMeta {
        params,
        required_params,
        description,
        auth_provider,
        auth_type,
        auth_with,
        input_schema,
    })
}

/// `POST /api/v1/register_tool`: stores one tool of a toolkit.
pub(crate) async fn register_tool(State(s): AppState, body: Body) -> Response {
    reply(register(&s, body).await)
}

async fn register(s: &crate::State, body: Body) -> Result<Value, ApiError> {
    let m = read_object(body, s.config.max_message_size).await?;
    let key_hash = body_key(s, &m)?;
    let app_name = match str_field(&m, "app_name") {
        Some(a) if is_valid_toolkit_name(a) => a.to_owned(),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_app_name",
                "app_name must be 1-128 characters from A-Z a-z 0-9 _ - .",
            ));
        }
    };
    let Some(name) = str_field(&m, "function_id").map(str::to_owned) else {
        return Err(ApiError::bad_request(
            "invalid_tool",
            "function_id (the tool's name) is missing",
        ));
    };
    let meta = match m.get("metadata") {
        Some(Value::Object(meta)) => meta,
        None | Some(Value::Null) => &Map::new(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_tool",
                "metadata must be a JSON object",
            ));
        }
    };
    let meta_tool = tool_meta(&name, meta)?;
    let endpoint_url = match m.get("endpoint_url").or_else(|| meta.get("endpoint_url")) {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(u)) if u.starts_with("http://") || u.starts_with("https://") => {
            Some(Some(u.trim_end_matches('/').to_owned()))
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_endpoint_url",
                "endpoint_url must be an http:// or https:// URL",
            ));
        }
    };
    let endpoint_key = opt_string(&m, "endpoint_key")?.map(Secret::new);
    let tool = ToolRecord {
        name: name.clone(),
        code_hash: str_field(&m, "code_hash").unwrap_or_default().to_owned(),
        meta: meta_tool,
    };

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
    kit.toolkit_hash = str_field(&m, "toolkit_hash").map(str::to_owned);
    if let Some(lang) = str_field(&m, "programming_language") {
        kit.language = lang.to_owned();
    }
    let position = match kit.tools.iter().position(|t| t.name == name) {
        Some(i) => {
            kit.tools[i] = tool.clone();
            i
        }
        None => {
            kit.tools.push(tool.clone());
            kit.tools.len() - 1
        }
    };
    let (kit_row, tool_row) = (kit.clone(), tool);
    s.store
        .call(move |c| store::save_tool(c, &kit_row, &tool_row, position))
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
    tracing::info!(app = %app_name, tool = %name, "tool registered");
    let exchange_token =
        random_token(24).map_err(|_| ApiError::internal("no randomness available"))?;
    Ok(json!({
        "status": "registered",
        "app_name": app_name,
        "function_id": name,
        "exchange_token": exchange_token,
    }))
}

/// `POST /api/v1/toolkit/verify_hash`: whether the stored toolkit is the
/// one the client has.
pub(crate) async fn verify_hash(State(s): AppState, body: Body) -> Response {
    reply(
        async {
            let m = read_object(body, s.config.max_message_size).await?;
            let key_hash = body_key(&s, &m)?;
            let up_to_date = match (str_field(&m, "app_name"), str_field(&m, "toolkit_hash")) {
                (Some(app), Some(hash)) => s.toolkit(app).is_some_and(|k| {
                    k.key_hash == key_hash && k.toolkit_hash.as_deref() == Some(hash)
                }),
                _ => false,
            };
            Ok(json!({"up_to_date": up_to_date}))
        }
        .await,
    )
}

/// `POST /api/v1/toolkit/verify_tool_hash`: whether one stored tool is
/// the one the client has.
pub(crate) async fn verify_tool_hash(State(s): AppState, body: Body) -> Response {
    reply(
        async {
            let m = read_object(body, s.config.max_message_size).await?;
            let key_hash = body_key(&s, &m)?;
            let (Some(name), Some(hash)) = (str_field(&m, "tool_name"), str_field(&m, "tool_hash"))
            else {
                return Ok(json!({"up_to_date": false}));
            };
            let app = str_field(&m, "app_name");
            let kits = s.toolkits.read().unwrap_or_else(PoisonError::into_inner);
            let up_to_date = kits.values().any(|k| {
                k.key_hash == key_hash
                    && app.is_none_or(|a| a == k.app_name)
                    && k.tools
                        .iter()
                        .any(|t| t.name == name && t.code_hash == hash)
            });
            Ok(json!({"up_to_date": up_to_date}))
        }
        .await,
    )
}

/// `GET /api/v1/toolkit/{api_key}/inbox[?wait=SECONDS]`: the next tool
/// request for this key (`{"request_id", "tool_name", "params",
/// "auth_token"}`), or `{}` when none came within the wait.
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
    let entry = s.hub.poll_inbox(&key_hash, wait).await;
    json_response(StatusCode::OK, &entry.unwrap_or_else(|| json!({})))
}

/// `POST /api/v1/toolkit/{api_key}/inbox/respond`: the answer to a request
/// taken from the inbox (`{"request_id", "response"}`).
pub(crate) async fn inbox_respond(
    State(s): AppState,
    key: Result<Path<String>, PathRejection>,
    body: Body,
) -> Response {
    reply(
        async {
            let key_hash = path_key(&s, key)?;
            let m = read_object(body, s.config.max_message_size).await?;
            let request_id = match m.get("request_id") {
                Some(Value::String(id)) => id.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_body",
                        "request_id is missing",
                    ));
                }
            };
            let result = m
                .get("response")
                .or_else(|| m.get("result"))
                .cloned()
                .unwrap_or(Value::Null);
            if s.hub.inbox_answer(&key_hash, &request_id, result) {
                Ok(json!({"status": "ok"}))
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

fn error_message(message: &str) -> String {
    json!({"message_type": "error", "payload": {"message": message}}).to_string()
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

async fn serve_socket(s: Arc<crate::State>, key_hash: String, socket: WebSocket) {
    let (id, mut out) = s.hub.add_socket(&key_hash);
    let apps: Vec<String> = s
        .toolkits
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .filter(|k| k.key_hash == key_hash)
        .map(|k| k.app_name.clone())
        .collect();
    tracing::info!(socket = id, apps = ?apps, "toolkit connected");
    let (mut sink, mut stream) = socket.split();
    let hello = json!({
        "message_type": "atp_client_connected",
        "payload": {"message": format!("Connected to atp-server; serving toolkits: {}", if apps.is_empty() { "(none registered yet)".to_owned() } else { apps.join(", ") })},
    });
    let interval = s.config.ping_interval;
    let mut ping = tokio::time::interval(interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut last_seen = Instant::now();
    let mut shutdown = s.shutdown.subscribe();
    if sink
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_ok()
    {
        loop {
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => {
                    let _ = sink.send(close(1001, "server shutting down")).await;
                    break;
                }
                Some(text) = out.recv() => {
                    if send_queued(&mut sink, text, &mut out, |t| Message::Text(t.into())).await.is_err() {
                        break;
                    }
                }
                frame = stream.next() => {
                    last_seen = Instant::now();
                    match frame {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                        Some(Ok(Message::Text(text))) => {
                            if let Some(answer) = toolkit_message(&s, id, text.as_str())
                                && sink.send(Message::Text(answer.into())).await.is_err()
                            {
                                break;
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            let _ = sink.send(Message::Text(error_message("binary frames are not supported; send JSON text").into())).await;
                        }
                        Some(Ok(_)) => {}
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() >= interval * 2 {
                        tracing::warn!(socket = id, "toolkit did not answer pings; closing");
                        let _ = sink.send(close(1011, "no answer to pings")).await;
                        break;
                    }
                    if sink.send(Message::Ping(Default::default())).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    s.hub.remove_socket(&key_hash, id);
    tracing::info!(socket = id, "toolkit disconnected");
}

/// Handles one text frame from a toolkit; returns a frame to send back.
fn toolkit_message(s: &crate::State, socket: u64, text: &str) -> Option<String> {
    let Ok(Value::Object(m)) = serde_json::from_str::<Value>(text) else {
        return Some(error_message("messages must be JSON objects"));
    };
    let kind = m
        .get("type")
        .or_else(|| m.get("message_type"))
        .and_then(Value::as_str);
    match kind {
        Some("tool_response") => {
            let request_id = match m.get("request_id") {
                Some(Value::String(id)) => id.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => return Some(error_message("tool_response without a request_id")),
            };
            let result = m.get("result").cloned().unwrap_or(Value::Null);
            if !s.hub.socket_answer(socket, &request_id, result) {
                tracing::debug!(socket, %request_id, "answer to a request that is not waiting (expired or unknown)");
            }
            None
        }
        Some("ping") => Some(json!({"message_type": "pong"}).to_string()),
        Some(other) => {
            tracing::debug!(socket, kind = other, "ignoring a toolkit message");
            None
        }
        None => Some(error_message("a message needs a \"type\"")),
    }
}
