//! The MCP face (docs/PROTOCOL.md §11): a toolkit served as a Model
//! Context Protocol server over Streamable HTTP, from the same
//! registration as its ATP endpoints.
//!
//! The core decides everything here — JSON-RPC, protocol versions, the
//! tools' descriptions, results as MCP content, progress and log
//! notifications, the DNS-rebinding check — and a [`McpBackend`] only
//! lists and runs tools: the [`Engine`](crate::Engine) for the tools
//! registered in this process, atp-server for the toolkits it routes. The
//! protocol's types are `rmcp`'s, the official Rust SDK's.
//!
//! Sessionless: every POST stands alone. `initialize` is answered (with
//! 2025-11-25 or the older version the client asked for, without an
//! `Mcp-Session-Id`), so are `ping`, `logging/setLevel`, `tools/list`,
//! `tools/call` and, for 2026-07-28 clients, `server/discover`. A GET (no
//! stream to listen to) and a DELETE (no session to end) are 405.
//!
//! The same core serves a toolkit over stdio, for desktop agents:
//! [`ToolKitClient::serve_stdio`](crate::ToolKitClient::serve_stdio) and
//! [`serve_lines`] on top of [`handle_message`].

use std::{borrow::Cow, future::Future, sync::Arc};

use bytes::Bytes;
use rmcp::model::{
    self as m, CallToolResult, ContentBlock, ErrorCode as RpcCode, ErrorData, Implementation,
    ProtocolVersion, ServerCapabilities,
};
use serde_json::{Map, Value, json};

use crate::{AuthToken, LogLevel, ToolEvent, ToolSpec, tool::Progress};

mod stdio;
pub use stdio::{AUTH_TOKEN_ENV, serve_lines};

/// The protocol versions answered, newest first (2026-07-28 has no
/// `initialize`: its clients call `server/discover`, or nothing).
pub const PROTOCOL_VERSIONS: [&str; 5] = [
    "2026-07-28",
    "2025-11-25",
    "2025-06-18",
    "2025-03-26",
    "2024-11-05",
];

/// The version answered to an `initialize` that asks for one not known.
const INITIALIZE_DEFAULT: &str = "2025-11-25";

/// How many progress and log reports of one call are kept for the answer;
/// more are dropped (they never hold a tool up).
const EVENT_BUFFER: usize = 1024;

/// Why a tool call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum McpCallError {
    /// No tool of that name: a JSON-RPC error (`-32602`), as MCP says.
    UnknownTool,
    /// The tool (or the way to it) failed: an `isError: true` result with
    /// this message; `code` is the ATP error code, kept in `_meta`.
    Failed {
        /// The ATP error code (`tool_error`, `auth_required`, …).
        code: String,
        /// What the caller sees.
        message: String,
    },
}

/// What an MCP endpoint serves: one toolkit's tools, and a way to run
/// them.
pub trait McpBackend: Send + Sync {
    /// The server's name in `initialize` (the toolkit's name).
    fn name(&self) -> &str;

    /// The tools, in their registration order (apps are left out: MCP
    /// has no sessions of an app).
    fn tools(&self) -> Vec<ToolSpec>;

    /// The JSON Schema of tool `name`'s result, if it has one (an object
    /// schema, [`Tool::output_schema`](crate::Tool::output_schema)): it
    /// is advertised as the tool's `outputSchema`, and the tool's results
    /// are answered as `structuredContent`. None by default.
    fn output_schema(&self, name: &str) -> Option<Value> {
        let _ = name;
        None
    }

    /// Runs tool `name` with `params` and `auth_token`, sending its
    /// progress and logs to `events`.
    fn call(
        &self,
        name: &str,
        params: Map<String, Value>,
        auth_token: Option<AuthToken>,
        events: Progress,
    ) -> impl Future<Output = Result<Value, McpCallError>> + Send;
}

/// What the MCP endpoint reads of a request beside its body.
#[derive(Debug, Clone, Copy, Default)]
pub struct McpHead<'a> {
    /// The `Accept` header.
    pub accept: Option<&'a [u8]>,
    /// The `MCP-Protocol-Version` header.
    pub protocol_version: Option<&'a [u8]>,
    /// The token of `Authorization: Bearer TOKEN`, for tools that need
    /// one.
    pub bearer: Option<&'a AuthToken>,
}

/// An answer of the MCP endpoint: a status, a content type and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpAnswer {
    /// The HTTP status.
    pub status: u16,
    /// `application/json`, `text/event-stream`, or `None` (202, no body).
    pub content_type: Option<&'static str>,
    /// The body.
    pub body: Bytes,
}

impl McpAnswer {
    fn json(status: u16, v: &Value) -> Self {
        Self {
            status,
            content_type: Some("application/json"),
            body: Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
        }
    }

    fn accepted() -> Self {
        Self {
            status: 202,
            content_type: None,
            body: Bytes::new(),
        }
    }

    /// A JSON-RPC error answer with no request id (the request could not
    /// be read, or was refused before it was: HTTP errors).
    pub fn http_error(status: u16, code: i32, message: &str, atp_code: &str) -> Self {
        Self::json(
            status,
            &json!({"jsonrpc": "2.0", "id": null,
                "error": {"code": code, "message": message, "data": {"code": atp_code}}}),
        )
    }
}

/// Whether a `Host` (or an `Origin`'s host) is allowed: `allowed` lists
/// host names (no port; `*` allows all). The DNS-rebinding check: a page
/// on another site can not get its browser to talk to a local server.
pub fn host_allowed(value: &[u8], allowed: &[Arc<str>]) -> bool {
    if allowed.iter().any(|a| &**a == "*") {
        return true;
    }
    let Ok(v) = std::str::from_utf8(value) else {
        return false;
    };
    // An Origin is scheme://host[:port]; a Host is host[:port].
    let v = v.split_once("://").map_or(v, |(_, rest)| rest);
    let host = if let Some(rest) = v.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        v.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(v, |(h, _)| h)
    };
    allowed.iter().any(|a| a.eq_ignore_ascii_case(host))
}

/// A tool's report as an MCP notification: progress only when the request
/// gave a progress token; a log message always.
fn notification(event: ToolEvent, progress_token: Option<&Value>, tool: &str) -> Option<Value> {
    match event {
        ToolEvent::Progress {
            progress,
            total,
            message,
        } => {
            let token = progress_token?;
            let mut p = json!({"progressToken": token, "progress": progress});
            if let Some(o) = p.as_object_mut() {
                if let Some(t) = total {
                    o.insert("total".into(), t.into());
                }
                if let Some(m) = message {
                    o.insert("message".into(), m.into());
                }
            }
            Some(json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": p}))
        }
        ToolEvent::Log { level, data } => Some(json!({
            "jsonrpc": "2.0",
            "method": "notifications/message",
            "params": {"level": level.as_str(), "logger": tool, "data": data},
        })),
    }
}

/// The hosts allowed by default: loopback only.
pub fn loopback_hosts() -> Vec<Arc<str>> {
    ["localhost", "127.0.0.1", "::1"]
        .into_iter()
        .map(Arc::from)
        .collect()
}

impl McpHead<'_> {
    /// Whether the client reads an event stream (its `Accept` has
    /// `text/event-stream`): only then does a call's answer carry its
    /// notifications (progress, logs).
    pub fn accepts_event_stream(&self) -> bool {
        self.accept
            .and_then(|a| std::str::from_utf8(a).ok())
            .is_some_and(|a| a.to_ascii_lowercase().contains("text/event-stream"))
    }
}

/// The answer to one JSON-RPC message, whatever carries it: the
/// notifications of a `tools/call` (its progress and logs, in order), then
/// the response.
#[derive(Debug, Clone, PartialEq)]
pub struct McpReply {
    /// Notifications to send before the response (`notifications/progress`
    /// when the call has a `progressToken`, `notifications/message`).
    pub notifications: Vec<Value>,
    /// The JSON-RPC response (a `result` or an `error`).
    pub response: Value,
    /// Whether the message could not be read as a request (a parse error,
    /// not an object, no method, a bad id): Streamable HTTP answers 400.
    pub malformed: bool,
}

impl McpReply {
    fn ok(response: Value) -> Self {
        Self {
            notifications: Vec::new(),
            response,
            malformed: false,
        }
    }

    fn malformed(response: Value) -> Self {
        Self {
            notifications: Vec::new(),
            response,
            malformed: true,
        }
    }
}

/// Handles one POST to an MCP endpoint (its body read).
pub async fn handle(backend: &impl McpBackend, head: &McpHead<'_>, body: &[u8]) -> McpAnswer {
    let Some(reply) = handle_message(backend, head, body).await else {
        return McpAnswer::accepted();
    };
    if reply.malformed {
        return McpAnswer::json(400, &reply.response);
    }
    if reply.notifications.is_empty() || !head.accepts_event_stream() {
        return McpAnswer::json(200, &reply.response);
    }
    // The notifications, then the answer, as server-sent events.
    let mut body = Vec::new();
    for n in reply
        .notifications
        .iter()
        .chain(std::iter::once(&reply.response))
    {
        body.extend_from_slice(b"event: message\ndata: ");
        body.extend_from_slice(&serde_json::to_vec(n).unwrap_or_default());
        body.extend_from_slice(b"\n\n");
    }
    McpAnswer {
        status: 200,
        content_type: Some("text/event-stream"),
        body: Bytes::from(body),
    }
}

/// Handles one JSON-RPC message, for any transport (Streamable HTTP,
/// stdio): `None` for a message that gets no answer (a notification, a
/// response to the server), else the call's notifications and the
/// response. `head.accept` is not read.
pub async fn handle_message(
    backend: &impl McpBackend,
    head: &McpHead<'_>,
    body: &[u8],
) -> Option<McpReply> {
    handle_message_with(backend, head, body, None).await
}

/// [`handle_message`], with a `tools/call`'s notifications (progress,
/// logs) sent to `live` as the tool makes them, rather than gathered in
/// the reply (whose `notifications` are then empty): what a transport
/// that can write them at once, such as stdio, uses. A notification that
/// finds `live` full is dropped (a report never holds up a tool). Every
/// notification is sent before this returns, so the response comes after
/// them.
pub async fn handle_message_live(
    backend: &impl McpBackend,
    head: &McpHead<'_>,
    body: &[u8],
    live: &tokio::sync::mpsc::Sender<Value>,
) -> Option<McpReply> {
    handle_message_with(backend, head, body, Some(live)).await
}

async fn handle_message_with(
    backend: &impl McpBackend,
    head: &McpHead<'_>,
    body: &[u8],
    live: Option<&tokio::sync::mpsc::Sender<Value>>,
) -> Option<McpReply> {
    let message: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return Some(McpReply::malformed(rpc_error(
                None,
                RpcCode::PARSE_ERROR,
                &format!("Parse error: {e}"),
            )));
        }
    };
    let Value::Object(message) = message else {
        return Some(McpReply::malformed(rpc_error(
            None,
            RpcCode::INVALID_REQUEST,
            "Invalid request: send one JSON-RPC message (an object); batches are not supported",
        )));
    };
    let id = message.get("id").cloned().filter(|id| !id.is_null());
    let Some(method) = message.get("method").and_then(Value::as_str) else {
        // A response to us (we send no requests) or garbage.
        if id.is_some() && (message.contains_key("result") || message.contains_key("error")) {
            return None;
        }
        return Some(McpReply::malformed(rpc_error(
            id,
            RpcCode::INVALID_REQUEST,
            "Invalid request: no method",
        )));
    };
    // A notification: nothing to answer.
    let id = id?;
    if !(id.is_string() || id.is_i64() || id.is_u64()) {
        return Some(McpReply::malformed(rpc_error(
            None,
            RpcCode::INVALID_REQUEST,
            "Invalid request: the id must be a string or an integer",
        )));
    }
    let params = match message.get("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p.clone(),
        Some(_) => {
            return Some(McpReply::ok(rpc_error(
                Some(id),
                RpcCode::INVALID_PARAMS,
                "params must be an object",
            )));
        }
    };
    let version = request_version(head, &params);
    let modern = version.as_deref() == Some(PROTOCOL_VERSIONS[0]);
    let result = match method {
        "initialize" => Ok(initialize(backend, &params)),
        "ping" if !modern => Ok(json!({})),
        "logging/setLevel" => match params
            .get("level")
            .and_then(Value::as_str)
            .and_then(LogLevel::parse)
        {
            // Sessionless: there is nothing to keep the level in; every
            // log of a call goes with its answer.
            Some(_) => Ok(json!({})),
            None => Err(ErrorData::invalid_params(
                "level must be a log level (debug, info, …)",
                None,
            )),
        },
        "server/discover" => Ok(discover(backend, modern)),
        "tools/list" => Ok(tools_list(backend, modern)),
        "tools/call" => {
            return Some(call(backend, head, id, &params, modern, live).await);
        }
        _ => Err(ErrorData::new(
            RpcCode::METHOD_NOT_FOUND,
            format!("Method not found: {method}"),
            None,
        )),
    };
    Some(McpReply::ok(respond(id, result)))
}

/// The protocol version of a request: the header, else `_meta`'s.
fn request_version(head: &McpHead<'_>, params: &Map<String, Value>) -> Option<String> {
    head.protocol_version
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(|v| v.trim().to_owned())
        .or_else(|| {
            params
                .get("_meta")
                .and_then(|m| m.get("io.modelcontextprotocol/protocolVersion"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
}

fn respond(id: Value, result: Result<Value, ErrorData>) -> Value {
    match result {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": e}),
    }
}

fn rpc_error(id: Option<Value>, code: RpcCode, message: &str) -> Value {
    let e = ErrorData::new(code, message.to_owned(), None);
    json!({"jsonrpc": "2.0", "id": id, "error": e})
}

fn server_info(backend: &impl McpBackend) -> Implementation {
    Implementation::new(backend.name(), env!("CARGO_PKG_VERSION"))
}

fn capabilities() -> ServerCapabilities {
    serde_json::from_value(json!({"tools": {"listChanged": false}, "logging": {}}))
        .unwrap_or_default()
}

fn initialize(backend: &impl McpBackend, params: &Map<String, Value>) -> Value {
    let asked = params.get("protocolVersion").and_then(Value::as_str);
    // 2026-07-28 has no initialize: a client asking for it gets the
    // newest version that has one.
    let version = match asked {
        Some(v) if PROTOCOL_VERSIONS[1..].contains(&v) => v.to_owned(),
        _ => INITIALIZE_DEFAULT.to_owned(),
    };
    let result = m::InitializeResult::new(capabilities())
        .with_protocol_version(
            serde_json::from_value::<ProtocolVersion>(Value::String(version))
                .unwrap_or(ProtocolVersion::V_2025_11_25),
        )
        .with_server_info(server_info(backend));
    serde_json::to_value(result).unwrap_or_else(|_| json!({}))
}

fn discover(backend: &impl McpBackend, modern: bool) -> Value {
    let mut v = json!({
        "supportedVersions": PROTOCOL_VERSIONS,
        "capabilities": serde_json::to_value(capabilities()).unwrap_or_else(|_| json!({})),
        "_meta": {"io.modelcontextprotocol/serverInfo": serde_json::to_value(server_info(backend)).unwrap_or_default()},
    });
    if modern {
        complete(&mut v);
    }
    v
}

/// Marks a 2026-07-28 result complete, with its cache hints: not to be
/// kept (`ttlMs` 0; tools come and go with their toolkits) and, as the
/// tools a caller sees may depend on its key, private.
fn complete(v: &mut Value) {
    if let Some(o) = v.as_object_mut() {
        o.insert("resultType".into(), "complete".into());
        o.insert("ttlMs".into(), 0.into());
        o.insert("cacheScope".into(), "private".into());
    }
}

/// A tool as MCP describes it.
pub fn tool_description(spec: &ToolSpec) -> m::Tool {
    let mut schema = match &spec.input_schema {
        Value::Object(o) => o.clone(),
        _ => Map::new(),
    };
    // MCP wants an object schema.
    schema.entry("type").or_insert_with(|| "object".into());
    let description = if spec.description.is_empty() {
        spec.name.clone()
    } else {
        spec.description.clone()
    };
    m::Tool::new(Cow::Owned(spec.name.clone()), description, Arc::new(schema))
}

fn tools_list(backend: &impl McpBackend, modern: bool) -> Value {
    let tools: Vec<m::Tool> = backend
        .tools()
        .iter()
        .map(|spec| {
            let tool = tool_description(spec);
            match backend.output_schema(&spec.name) {
                Some(Value::Object(schema)) if crate::tool::is_object_schema_map(&schema) => {
                    tool.with_raw_output_schema(Arc::new(schema))
                }
                _ => tool,
            }
        })
        .collect();
    let mut v = json!({"tools": tools});
    if modern {
        complete(&mut v);
    }
    v
}

async fn call(
    backend: &impl McpBackend,
    head: &McpHead<'_>,
    id: Value,
    params: &Map<String, Value>,
    modern: bool,
    live: Option<&tokio::sync::mpsc::Sender<Value>>,
) -> McpReply {
    let Some(name) = params.get("name").and_then(Value::as_str) else {
        let e = ErrorData::invalid_params("tools/call needs the tool's name", None);
        return McpReply::ok(respond(id, Err(e)));
    };
    let mut arguments = match params.get("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(a)) => a.clone(),
        Some(_) => {
            let e = ErrorData::invalid_params("arguments must be an object", None);
            return McpReply::ok(respond(id, Err(e)));
        }
    };
    // The token: `Authorization: Bearer`, or the call's `auth_token`
    // argument, as in the ATP endpoints (the argument wins).
    let token = match arguments.shift_remove(crate::AUTH_TOKEN_PARAM) {
        Some(Value::String(s)) if !s.is_empty() => Some(crate::Secret::new(s)),
        _ => head.bearer.cloned(),
    };
    let progress_token = params
        .get("_meta")
        .and_then(|m| m.get("progressToken"))
        .filter(|t| t.is_string() || t.is_i64() || t.is_u64())
        .cloned();
    let (tx, mut rx) = tokio::sync::mpsc::channel(EVENT_BUFFER);
    let events = Progress::events(tx);
    let structured = backend.output_schema(name).is_some();
    let work = backend.call(name, arguments, token, events.clone());
    let mut work = std::pin::pin!(work);
    let mut notifications = Vec::new();
    let mut emit = |event: ToolEvent| {
        let Some(n) = notification(event, progress_token.as_ref(), name) else {
            return;
        };
        match live {
            Some(tx) => {
                let _ = tx.try_send(n);
            }
            None => notifications.push(n),
        }
    };
    // The tool runs; its reports are taken as they come (so that a long
    // call's reports neither wait for its end nor overflow the buffer).
    let outcome = std::future::poll_fn(|cx| {
        while let std::task::Poll::Ready(Some(event)) = rx.poll_recv(cx) {
            emit(event);
        }
        work.as_mut().poll(cx)
    })
    .await;
    events.finish();
    drop(events);
    while let Ok(event) = rx.try_recv() {
        emit(event);
    }
    let result = match outcome {
        Ok(value) => Ok(call_result(value, modern, structured)),
        Err(McpCallError::UnknownTool) => Err(ErrorData::invalid_params(
            format!("Unknown tool: {name}"),
            None,
        )),
        Err(McpCallError::Failed { code, message }) => Ok(error_result(&code, &message, modern)),
    };
    McpReply {
        notifications,
        response: respond(id, result),
        malformed: false,
    }
}

/// A tool's result as an MCP result: content it gave as MCP content
/// (`{"content": [blocks]}`, see [`Content`]), else its JSON as text and
/// as `structuredContent` when it is an object. The result of a tool
/// with an output schema (`structured`) is always its JSON, as text and
/// as `structuredContent`, even when it looks like MCP content.
fn call_result(value: Value, modern: bool, structured: bool) -> Value {
    let content = if structured && value.is_object() {
        None
    } else {
        as_content(&value)
    };
    let mut result = match content {
        Some(content) => {
            let mut r = CallToolResult::success(content);
            if let Some(s) = value.get("structuredContent") {
                r.structured_content = Some(s.clone());
            }
            if value.get("isError") == Some(&Value::Bool(true)) {
                r.is_error = Some(true);
            }
            r
        }
        None => {
            let text = serde_json::to_string(&value).unwrap_or_default();
            let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
            if value.is_object() {
                r.structured_content = Some(value);
            }
            r
        }
    };
    if !modern {
        result.result_type = None;
    }
    serde_json::to_value(result).unwrap_or_else(|_| json!({}))
}

fn error_result(code: &str, message: &str, modern: bool) -> Value {
    let mut r = CallToolResult::error(vec![ContentBlock::text(message.to_owned())]);
    r.meta = serde_json::from_value(json!({"io.atp/code": code})).ok();
    if !modern {
        r.result_type = None;
    }
    serde_json::to_value(r).unwrap_or_else(|_| json!({}))
}

/// The content blocks of a result shaped as MCP content: an object whose
/// `content` is a list of typed blocks, with at most `structuredContent`
/// and `isError` beside it.
fn as_content(value: &Value) -> Option<Vec<ContentBlock>> {
    let o = value.as_object()?;
    if !o
        .keys()
        .all(|k| matches!(k.as_str(), "content" | "structuredContent" | "isError"))
    {
        return None;
    }
    let blocks = o.get("content")?.as_array()?;
    blocks
        .iter()
        .map(|b| serde_json::from_value::<ContentBlock>(b.clone()).ok())
        .collect()
}

/// MCP content a tool can return: text, an image, audio, an embedded
/// resource. An ATP caller sees it as JSON —
/// `{"content": [{"type": "image", "data": "…", "mimeType": "image/png"}]}`
/// — and an MCP caller as the content blocks themselves.
///
/// ```
/// use atp_registry::mcp::Content;
///
/// let out = Content::new()
///     .text("Here is the chart:")
///     .image("iVBORw0KGgo…", "image/png");
/// let json = serde_json::to_value(&out).unwrap();
/// assert_eq!(json["content"][1]["type"], "image");
/// ```
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Content {
    content: Vec<Value>,
    #[serde(rename = "isError", skip_serializing_if = "std::ops::Not::not")]
    is_error: bool,
}

impl Content {
    /// No blocks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a text block.
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.content
            .push(json!({"type": "text", "text": text.into()}));
        self
    }

    /// Adds an image: base64 `data` of type `mime_type`.
    pub fn image(mut self, data: impl Into<String>, mime_type: impl Into<String>) -> Self {
        self.content
            .push(json!({"type": "image", "data": data.into(), "mimeType": mime_type.into()}));
        self
    }

    /// Adds audio: base64 `data` of type `mime_type`.
    pub fn audio(mut self, data: impl Into<String>, mime_type: impl Into<String>) -> Self {
        self.content
            .push(json!({"type": "audio", "data": data.into(), "mimeType": mime_type.into()}));
        self
    }

    /// Adds an embedded text resource.
    pub fn resource(
        mut self,
        uri: impl Into<String>,
        mime_type: impl Into<String>,
        text: impl Into<String>,
    ) -> Self {
        self.content.push(json!({"type": "resource", "resource":
            {"uri": uri.into(), "mimeType": mime_type.into(), "text": text.into()}}));
        self
    }

    /// Marks the content as an error result (`isError: true`), for a tool
    /// that fails with content rather than a message.
    pub fn error(mut self) -> Self {
        self.is_error = true;
        self
    }
}

/// A toolkit of this process as an MCP server: what the
/// [`Engine`](crate::Engine)'s `/mcp/{toolkit}` endpoints and
/// [`ToolKitClient::serve_stdio`](crate::ToolKitClient::serve_stdio) serve.
#[derive(Debug, Clone, Copy)]
pub struct ToolkitMcp<'a>(pub &'a crate::ToolKitClient);

impl McpBackend for ToolkitMcp<'_> {
    fn name(&self) -> &str {
        self.0.app_name()
    }

    fn tools(&self) -> Vec<ToolSpec> {
        self.0
            .registered_tools()
            .iter()
            .filter(|t| !t.is_app())
            .map(|t| t.spec().clone())
            .collect()
    }

    fn output_schema(&self, name: &str) -> Option<Value> {
        self.0
            .tool(name)
            .filter(|t| !t.is_app())
            .and_then(|t| t.output_schema().cloned())
    }

    async fn call(
        &self,
        name: &str,
        params: Map<String, Value>,
        auth_token: Option<AuthToken>,
        events: Progress,
    ) -> Result<Value, McpCallError> {
        let Some(tool) = self.0.tool(name).filter(|t| !t.is_app()) else {
            return Err(McpCallError::UnknownTool);
        };
        tool.call(self.0, params, auth_token, events)
            .await
            .map_err(|e| McpCallError::Failed {
                code: e.code().as_str().to_owned(),
                message: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let allowed = loopback_hosts();
        assert!(host_allowed(b"localhost:8080", &allowed));
        assert!(host_allowed(b"127.0.0.1", &allowed));
        assert!(host_allowed(b"[::1]:80", &allowed));
        assert!(host_allowed(b"http://localhost:3000", &allowed));
        assert!(!host_allowed(b"evil.example.com", &allowed));
        assert!(!host_allowed(b"http://evil.example.com", &allowed));
        assert!(!host_allowed(b"localhost.evil.com:80", &allowed));
        assert!(host_allowed(b"anything", &[Arc::from("*")]));
    }

    #[derive(serde::Serialize, schemars::JsonSchema)]
    struct Blocks {
        content: Vec<Text>,
    }

    #[derive(serde::Serialize, schemars::JsonSchema)]
    struct Text {
        r#type: String,
        text: String,
    }

    /// Looks like MCP content, but has an output schema.
    #[crate::tool]
    async fn blocks() -> Blocks {
        Blocks {
            content: vec![Text {
                r#type: "text".into(),
                text: "a".into(),
            }],
        }
    }

    /// Looks like MCP content, without an output schema.
    #[crate::tool]
    async fn raw() -> Value {
        json!({"content": [{"type": "text", "text": "a"}]})
    }

    async fn rpc(client: &crate::ToolKitClient, request: Value) -> Value {
        let body = serde_json::to_vec(&request).unwrap();
        handle_message(&ToolkitMcp(client), &McpHead::default(), &body)
            .await
            .unwrap()
            .response
    }

    #[tokio::test]
    async fn output_schemas_are_advertised_and_answered_as_structured_content() {
        let client = crate::ToolKitClient::new("k", "a");
        client.register_all([blocks::tool(), raw::tool()]).unwrap();
        let list = rpc(
            &client,
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        )
        .await;
        let tools = &list["result"]["tools"];
        assert_eq!(tools[0]["outputSchema"]["type"], "object");
        assert_eq!(tools[0]["outputSchema"]["required"], json!(["content"]));
        assert!(tools[1].get("outputSchema").is_none(), "{list}");
        let call = |name: &str| json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": name}});
        let structured = rpc(&client, call("blocks")).await;
        let value = json!({"content": [{"type": "text", "text": "a"}]});
        assert_eq!(structured["result"]["structuredContent"], value);
        assert_eq!(
            structured["result"]["content"][0]["text"],
            value.to_string()
        );
        // Without an output schema, content is content.
        let content = rpc(&client, call("raw")).await;
        assert_eq!(content["result"]["content"][0]["text"], "a");
        assert!(
            content["result"].get("structuredContent").is_none(),
            "{content}"
        );
    }

    #[test]
    fn content_is_recognised() {
        let v = serde_json::to_value(Content::new().text("a").image("AA==", "image/png")).unwrap();
        assert_eq!(as_content(&v).map(|c| c.len()), Some(2));
        assert!(as_content(&json!({"content": [{"type": "nope"}]})).is_none());
        assert!(as_content(&json!({"content": [], "other": 1})).is_none());
        let plain = call_result(json!({"a": 1}), false, false);
        assert_eq!(plain["structuredContent"], json!({"a": 1}));
        assert_eq!(plain["content"][0]["text"], "{\"a\":1}");
        assert!(plain.get("resultType").is_none());
    }
}
