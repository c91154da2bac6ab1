//! The logic of the three fuzz targets, as plain functions.
//!
//! The `cargo fuzz` crate in `fuzz/` calls them on libFuzzer's inputs; the
//! workspace test `tests/reliability/corpus.rs` replays the committed seed corpus
//! (`fuzz/corpus/<target>/`) through the same functions on every
//! `cargo test`; `fuzz-random` feeds them bounded random inputs. Each one
//! panics — which a fuzzer reports as a crash — when the code under test
//! breaks a rule of the protocol (docs/PROTOCOL.md), and returns quietly otherwise.
//!
//! | target | what it drives | what must hold |
//! |---|---|---|
//! | [`engine`] | [`Engine::handle`] and [`Engine::serve`] on any method, path, query, headers and body | a JSON answer with `Content-Type: application/json`; every error is `{"error", "code"}` with the status of its code; `Allow` exactly on 405; HEAD answers as GET; streaming and buffered bodies answer alike; a locked toolkit reveals nothing without its key; a panic's text is never sent |
//! | [`runtime_message`] | the toolkit runtime's own dispatch (`ToolKitClient::reply_to_frame`: the decision `start()` makes for each frame, the tool run inline) | every tool request with an id gets exactly one `tool_response` with that id; an app request it can't serve gets an `app_response` error; nothing else is answered; a token never shows in `Debug` |
//! | [`server_http`] | `atp-server`'s whole router (every endpoint: register, inbox, process, OAuth, WebSocket upgrades, the admin API and the console) on any method, path, headers and body | never a 5xx; every answer is JSON (but the console's own files, and the live calls' event stream); every error has a `code` |
//! | [`llm_calls`] | [`parse_tool_calls`] for each provider, [`result_messages`], [`task_outcome`] | one result per call, ids and order kept, outputs are strings, Anthropic results in one user message, an invented Mistral id is 9 characters of `[A-Za-z0-9]` |

use std::{
    cell::RefCell,
    sync::{Once, OnceLock},
    time::Duration,
};

use atp_registry::{
    Call, Engine, Provider, Registry, Tool, ToolKitClient,
    http::{ALLOW_READ, ALLOW_TOOL, BodySource, RequestHead, Response},
    llm::{CallFormat, CallOutcome, parse_tool_calls, result_messages, task_outcome},
    schemars,
    wire::{ServerToLlm, ServerToToolkit},
};
use serde_json::{Map, Value, json};

/// The names of the fuzz targets, as in `fuzz/fuzz_targets/` and
/// `fuzz/corpus/`.
pub const TARGETS: [&str; 4] = ["engine", "runtime_message", "llm_calls", "server_http"];

/// The open toolkit of the fuzz fixture.
pub const TOOLKIT: &str = "fz";
/// The locked toolkit of the fuzz fixture.
pub const LOCKED: &str = "locked";
/// The locked toolkit's app name: it must never appear in an answer to a
/// request without the key.
pub const LOCKED_APP: &str = "FuzzLockedApp";
/// The endpoint key of the locked toolkit.
pub const ENDPOINT_KEY: &str = "fuzz-endpoint-key";
/// What the `panic` tool panics with; never sent to a caller.
pub const PANIC_TEXT: &str = "fuzz-secret-panic-detail";
/// The body limit of the fuzz toolkits: small, so that inputs of a fuzzer's
/// usual sizes reach the 413 path.
pub const BODY_LIMIT: usize = 2048;
/// The tool timeout of the open toolkit.
pub const TIMEOUT: Duration = Duration::from_millis(5);

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct AddArgs {
    a: i64,
    b: i64,
}

/// The registry the targets run against: `fz` (body limit
/// [`BODY_LIMIT`], timeout [`TIMEOUT`]) with `echo(text*)`,
/// `optional(a*, b)`, a typed `add{a, b: i64}`, `fail`, `panic`,
/// `secure` (needs a token), `slow(ms)` and `blocking(ms)` (past the
/// timeout when `ms` > 0); and `locked`, which needs
/// `X-ATP-Key: fuzz-endpoint-key`, with `echo`. Every tool answers in a
/// few milliseconds at most.
pub fn fixture() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let registry = Registry::new();
        registry
            .register_client(TOOLKIT, open_toolkit())
            .expect("valid name");
        let locked = ToolKitClient::new("locked-key", LOCKED_APP)
            .with_endpoint_key(ENDPOINT_KEY)
            .with_body_limit(BODY_LIMIT);
        locked.register_tool(echo_tool(), echo).expect("valid tool");
        registry
            .register_client(LOCKED, locked)
            .expect("valid name");
        registry
    })
}

fn echo_tool() -> Tool {
    Tool::new("echo").params(["text"]).required_params(["text"])
}

async fn echo(call: Call) -> Result<Value, String> {
    Ok(json!({"echo": call.param("text")}))
}

async fn panics(_call: Call) -> Result<Value, String> {
    std::panic::panic_any(PANIC_TEXT)
}

fn sleep_of(call: &Call) -> Duration {
    // Either nothing or well past the timeout, so that the outcome does not
    // depend on the machine's speed.
    let ms = call.param("ms").and_then(Value::as_u64).unwrap_or(0);
    if ms == 0 { Duration::ZERO } else { TIMEOUT * 4 }
}

fn open_toolkit() -> ToolKitClient {
    let client = ToolKitClient::new("fuzz-api-key", "FuzzApp")
        .with_body_limit(BODY_LIMIT)
        .with_timeout(TIMEOUT);
    let outcomes = [
        client.register_tool(echo_tool(), echo),
        client.register_tool(
            Tool::new("optional")
                .params(["a", "b"])
                .required_params(["a"]),
            |call: Call| async move { Ok::<_, String>(Value::Object(call.params().clone())) },
        ),
        client.register_typed_tool(Tool::new("add"), |args: AddArgs, _token| async move {
            args.a
                .checked_add(args.b)
                .map(|sum| json!({"sum": sum}))
                .ok_or_else(|| "overflow".to_owned())
        }),
        client.register_tool(Tool::new("fail"), |_call: Call| async {
            Err::<Value, _>("boom")
        }),
        client.register_tool(Tool::new("panic"), panics),
        client.register_tool(
            Tool::new("secure")
                .auth_provider("demo")
                .auth_type("OAuth2")
                .auth_with("access_token"),
            |call: Call| async move {
                Ok::<_, String>(
                    json!({"length": call.auth_token().map_or(0, |t| t.expose().len())}),
                )
            },
        ),
        client.register_tool(Tool::new("slow").params(["ms"]), |call: Call| async move {
            tokio::time::sleep(sleep_of(&call)).await;
            Ok::<_, String>(json!({"slept": true}))
        }),
        client.register_blocking_tool(Tool::new("blocking").params(["ms"]), |call: Call| {
            std::thread::sleep(sleep_of(&call));
            Ok::<_, String>(json!({"slept": true}))
        }),
    ];
    for outcome in outcomes {
        outcome.expect("valid tool");
    }
    client
}

/// Makes the fixture's own `panic` tool quiet: the panic hook in place
/// (libFuzzer's aborts the process) still runs for every other panic.
pub fn quiet_fixture_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() == Some(&PANIC_TEXT) {
                return;
            }
            previous(info);
        }));
    });
}

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Runs a future to completion on this thread's runtime (one per thread,
/// built on first use).
pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a tokio runtime")
        });
        rt.block_on(fut)
    })
}

/// Every error code with its status (docs/PROTOCOL.md §3).
pub const CODES: [(&str, u16); 16] = [
    ("toolkit_not_found", 404),
    ("tool_not_found", 404),
    ("not_found", 404),
    ("method_not_allowed", 405),
    ("invalid_body", 400),
    ("unsupported_media_type", 415),
    ("payload_too_large", 413),
    ("missing_params", 400),
    ("unknown_params", 400),
    ("invalid_params", 400),
    ("unknown_provider", 400),
    ("auth_required", 401),
    ("unauthorized", 401),
    ("tool_error", 400),
    ("tool_panicked", 500),
    ("tool_timeout", 504),
];

/// A fuzz input for [`engine`], decoded: seven lines (method, path, query,
/// `Content-Type`, `Content-Length`, `Authorization`, `X-ATP-Key`; an
/// empty line is an absent query or header), then the body — every byte
/// after the seventh newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInput {
    /// The method.
    pub method: String,
    /// The raw path.
    pub path: String,
    /// The query, without `?`.
    pub query: Option<String>,
    /// The header values, in the order of [`atp_registry::http::HEADERS`].
    pub headers: [Option<Vec<u8>>; 4],
    /// The body.
    pub body: Vec<u8>,
}

impl EngineInput {
    /// Decodes a fuzz input.
    pub fn decode(data: &[u8]) -> Self {
        let mut parts = data.splitn(8, |&b| b == b'\n');
        let mut line = || parts.next().unwrap_or_default();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let opt = |b: &[u8]| (!b.is_empty()).then(|| b.to_vec());
        let method = text(line());
        let path = text(line());
        let query = opt(line()).map(|q| text(&q));
        let headers = [opt(line()), opt(line()), opt(line()), opt(line())];
        let body = line().to_vec();
        Self {
            method,
            path,
            query,
            headers,
            body,
        }
    }

    /// Encodes it back (`decode(encode(x)) == x` when no line but the body
    /// holds a newline).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(self.method.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(self.path.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(self.query.as_deref().unwrap_or_default().as_bytes());
        for h in &self.headers {
            out.push(b'\n');
            out.extend_from_slice(h.as_deref().unwrap_or_default());
        }
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out
    }

    fn head(&self) -> RequestHead<'_> {
        self.head_with_method(&self.method)
    }

    fn head_with_method<'a>(&'a self, method: &'a str) -> RequestHead<'a> {
        RequestHead::new(method, &self.path, self.query.as_deref(), |name| {
            // The input carries the first headers of the list (the ATP
            // endpoints'); the later ones (the MCP endpoints') are absent.
            let i = atp_registry::http::HEADERS
                .iter()
                .position(|h| *h == name)?;
            self.headers.get(i)?.as_deref()
        })
    }
}

/// A body given in chunks of a fixed size, never more than one byte past
/// what the engine allows (the [`BodySource`] rule).
struct Chunked<'a> {
    rest: &'a [u8],
    size: usize,
}

impl<'a> BodySource for Chunked<'a> {
    type Chunk = &'a [u8];

    async fn next_chunk(&mut self, allowed: usize) -> Option<Result<&'a [u8], ()>> {
        if self.rest.is_empty() {
            return None;
        }
        let n = self
            .size
            .min(allowed.saturating_add(1))
            .min(self.rest.len());
        let (chunk, rest) = self.rest.split_at(n.max(1));
        self.rest = rest;
        Some(Ok(chunk))
    }
}

/// Whether `path` is one of the MCP endpoints' (`/mcp` or under it).
fn is_mcp_path(path: &str) -> bool {
    path.strip_prefix(atp_registry::http::DEFAULT_MCP_PATH)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// An MCP endpoint's answer: JSON-RPC (or its events, or a bare 202),
/// never an ATP error body; 405 says `Allow: POST`.
fn check_mcp_response(r: &Response) {
    let status = r.status();
    let headers: Vec<(&str, &str)> = r.headers().collect();
    let content_type = headers
        .iter()
        .find(|(k, _)| *k == "content-type")
        .map(|(_, v)| *v);
    let allow = headers.iter().find(|(k, _)| *k == "allow").map(|(_, v)| *v);
    assert!(
        [200, 202, 400, 401, 403, 404, 405, 413, 415].contains(&status),
        "{r:?}"
    );
    assert_eq!(status == 405, allow == Some("POST"), "{r:?}");
    match content_type {
        None => assert!(status == 202 && r.body().is_empty(), "{r:?}"),
        Some("text/event-stream") => assert_eq!(status, 200, "{r:?}"),
        Some("application/json") => {
            let body: Value = serde_json::from_slice(r.body())
                .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {r:?}"));
            assert_eq!(body["jsonrpc"], "2.0", "{r:?}");
            if status != 200 {
                assert!(body["error"]["code"].is_i64(), "{r:?}");
                assert!(body["error"]["message"].is_string(), "{r:?}");
            }
        }
        Some(other) => panic!("content type {other}: {r:?}"),
    }
}

fn check_response(input: &EngineInput, raw: &[u8], r: &Response) {
    if is_mcp_path(&input.path) {
        check_mcp_response(r);
        return check_secrets(input, raw, r);
    }
    let status = r.status();
    let headers: Vec<(&str, &str)> = r.headers().collect();
    assert_eq!(
        headers.first(),
        Some(&("content-type", "application/json")),
        "{r:?}"
    );
    let allow = headers.iter().find(|(k, _)| *k == "allow").map(|(_, v)| *v);
    let body: Value = serde_json::from_slice(r.body())
        .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {r:?}"));
    let Value::Object(body) = body else {
        panic!("the body is not an object: {r:?}")
    };
    if status == 200 {
        assert!(allow.is_none(), "{r:?}");
    } else {
        assert_eq!(body.len(), 2, "an error is exactly {{error, code}}: {r:?}");
        assert!(body.get("error").is_some_and(Value::is_string), "{r:?}");
        let code = body.get("code").and_then(Value::as_str).unwrap_or_default();
        let expected = CODES
            .iter()
            .find(|(c, _)| *c == code)
            .unwrap_or_else(|| panic!("unknown code {code:?}: {r:?}"));
        assert_eq!(expected.1, status, "{r:?}");
        assert_eq!(status == 405, allow.is_some(), "{r:?}");
        if let Some(a) = allow {
            assert!(a == ALLOW_TOOL || a == ALLOW_READ, "{r:?}");
        }
    }
    check_secrets(input, raw, r);
}

/// No panic's text and nothing of the locked toolkit without its key.
fn check_secrets(input: &EngineInput, raw: &[u8], r: &Response) {
    let text = String::from_utf8_lossy(r.body());
    let sent = String::from_utf8_lossy(raw);
    assert!(
        !text.contains(PANIC_TEXT) || sent.contains(PANIC_TEXT),
        "a panic's text was sent: {r:?}"
    );
    let key_given = input.headers[3].as_deref() == Some(ENDPOINT_KEY.as_bytes());
    assert!(
        !text.contains(LOCKED_APP) || key_given || sent.contains(LOCKED_APP),
        "the locked toolkit answered without its key: {r:?}"
    );
}

/// Fuzz target `engine`: one request, decoded by [`EngineInput::decode`],
/// through [`Engine::handle`] and, in chunks, [`Engine::serve`]; see the
/// module's table for what must hold.
pub fn engine(data: &[u8]) {
    quiet_fixture_panics();
    let input = EngineInput::decode(data);
    let engine = Engine::with_registry(fixture().clone());
    let head = input.head();
    let whole = block_on(engine.handle(&head, &input.body));
    check_response(&input, data, &whole);
    let size = 1 + data.iter().fold(0usize, |a, &b| a.wrapping_add(b as usize)) % 97;
    let streamed = block_on(engine.serve(
        &head,
        Chunked {
            rest: &input.body,
            size,
        },
    ));
    // A tool timeout (5 ms) depends on the machine's load — a blocking
    // tool's thread may start late — so a 504 on one side only is not a
    // disagreement of the two paths.
    if whole.status() != 504 && streamed.status() != 504 {
        assert_eq!(whole, streamed, "buffered and streamed bodies disagree");
    }
    if input.method == "HEAD" {
        let get = block_on(engine.handle(&input.head_with_method("GET"), &input.body));
        assert_eq!(
            (whole.status(), whole.headers().collect::<Vec<_>>()),
            (get.status(), get.headers().collect::<Vec<_>>()),
            "HEAD and GET disagree"
        );
    }
}

/// The request id a well-formed-enough tool request carries, judged
/// independently of the runtime's parser: a JSON object whose
/// `message_type` (or `type`) is `atp_tool_request`, with a string or
/// number `payload.request_id` — or an inbox entry (no type, a
/// `tool_name`) with one at the top.
fn oracle_request_id(text: &str) -> Option<Value> {
    let Ok(Value::Object(msg)) = serde_json::from_str::<Value>(text) else {
        return None;
    };
    let kind = msg
        .get("message_type")
        .or_else(|| msg.get("type"))
        .and_then(Value::as_str);
    let holder = match kind {
        Some("atp_tool_request") => msg.get("payload")?.as_object()?,
        None if msg.contains_key("tool_name") => &msg,
        _ => return None,
    };
    match holder.get("request_id") {
        Some(id @ (Value::String(_) | Value::Number(_))) => Some(id.clone()),
        _ => None,
    }
}

/// The answer the toolkit runtime sends to one text frame, if any: the
/// runtime's own dispatch (`ToolKitClient::reply_to_frame`, the decision
/// `start()` makes for every frame, with the request run inline).
pub async fn runtime_reply(client: &ToolKitClient, text: &str) -> Option<Value> {
    let reply = client.reply_to_frame(text).await?;
    Some(serde_json::from_str(&reply.to_json()).expect("an answer is JSON"))
}

/// Fuzz target `runtime_message`: one WebSocket text frame (the input as
/// UTF-8, invalid bytes replaced) through the runtime's handling; see the
/// module's table for what must hold.
pub fn runtime_message(data: &[u8]) {
    quiet_fixture_panics();
    let text = String::from_utf8_lossy(data);
    let client = fixture().get_client(TOOLKIT).expect("the fixture toolkit");
    let parsed = ServerToToolkit::parse(&text);
    if let Ok(ServerToToolkit::ToolRequest(req)) = &parsed
        && let Some(token) = &req.auth_token
        && token.expose().len() >= 4
        && text.matches(token.expose()).count() == 1
    {
        let debug = format!("{parsed:?}");
        assert!(
            !debug.contains(token.expose()),
            "Debug shows the token: {debug}"
        );
    }
    let oracle = oracle_request_id(&text);
    let reply = block_on(runtime_reply(&client, &text));
    match (&oracle, &reply) {
        (Some(id), Some(reply)) => {
            assert_eq!(reply["type"], "tool_response", "{reply}");
            assert_eq!(&reply["request_id"], id, "the reply's id: {reply}");
            assert!(reply.get("result").is_some(), "{reply}");
            let text = reply.to_string();
            assert!(
                serde_json::from_str::<Value>(&text).is_ok(),
                "the reply is not JSON"
            );
        }
        (Some(id), None) => panic!("the tool request {id} got no answer"),
        (None, Some(reply)) if reply["type"] == "app_response" => {
            // An app session this toolkit can't serve is refused, to the
            // session's id.
            let msg: Value = serde_json::from_str(&text).expect("an app request is JSON");
            assert_eq!(msg["message_type"], "atp_app_request", "{reply}");
            assert_eq!(reply["request_id"], msg["payload"]["request_id"], "{reply}");
            assert_eq!(reply["is_error"], true, "{reply}");
        }
        (None, Some(reply)) => {
            // A tool request without a usable id is answered with a null id
            // (so the server can log it); nothing else is answered.
            assert_eq!(reply["request_id"], Value::Null, "{reply}");
            assert_eq!(reply["type"], "tool_response", "{reply}");
        }
        (None, None) => {}
    }
}

/// Builds a JSON value from arbitrary bytes when they are not JSON: a
/// small deterministic decoder, so that every input reaches the parsers.
pub fn json_from_bytes(data: &[u8]) -> Value {
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        return v;
    }
    let mut bytes = data.iter().copied();
    build_value(&mut bytes, 0)
}

fn build_value(bytes: &mut impl Iterator<Item = u8>, depth: u8) -> Value {
    const KEYS: [&str; 16] = [
        "type",
        "id",
        "call_id",
        "name",
        "arguments",
        "input",
        "function",
        "tool_calls",
        "choices",
        "message",
        "content",
        "output",
        "result",
        "payload",
        "status",
        "error",
    ];
    const STRS: [&str; 10] = [
        "function_call",
        "tool_use",
        "function",
        "text",
        "echo",
        "error",
        "{\"a\":1}",
        "",
        "not json",
        "[1]",
    ];
    let Some(b) = bytes.next() else {
        return Value::Null;
    };
    match (b % 8, depth < 6) {
        (0, _) => Value::Null,
        (1, _) => Value::Bool(b & 8 != 0),
        (2, _) => json!(b as i64 - 128),
        (3, _) | (4, false) | (5, false) => {
            Value::String(STRS[bytes.next().unwrap_or(0) as usize % STRS.len()].to_owned())
        }
        (4, true) => {
            let n = bytes.next().unwrap_or(0) % 4;
            Value::Array((0..n).map(|_| build_value(bytes, depth + 1)).collect())
        }
        (5, true) => {
            let n = bytes.next().unwrap_or(0) % 5;
            let mut m = Map::new();
            for _ in 0..n {
                let k = KEYS[bytes.next().unwrap_or(0) as usize % KEYS.len()];
                m.insert(k.to_owned(), build_value(bytes, depth + 1));
            }
            Value::Object(m)
        }
        _ => Value::String(format!("s{b}")),
    }
}

/// Every string in a JSON value (keys and values).
fn strings_in(v: &Value) -> std::collections::HashSet<&str> {
    let mut out = std::collections::HashSet::new();
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) => {
                out.insert(s.as_str());
            }
            Value::Array(items) => stack.extend(items),
            Value::Object(m) => {
                for (k, v) in m {
                    out.insert(k.as_str());
                    stack.push(v);
                }
            }
            _ => {}
        }
    }
    out
}

fn ids_of(messages: &[Value]) -> Vec<String> {
    let mut ids = Vec::new();
    for m in messages {
        if let Some(blocks) = m.get("content").and_then(Value::as_array) {
            for b in blocks {
                ids.push(b["tool_use_id"].as_str().expect("a tool_use_id").to_owned());
            }
        } else {
            let id = m.get("call_id").or_else(|| m.get("tool_call_id"));
            ids.push(id.and_then(Value::as_str).expect("an id").to_owned());
        }
    }
    ids
}

/// Fuzz target `llm_calls`: a provider's output (the input as JSON, or a
/// value built from its bytes) through the tool-call parser of each
/// provider, the result messages and `task_outcome`; see the module's table
/// for what must hold.
pub fn llm_calls(data: &[u8]) {
    let value = json_from_bytes(data);
    for provider in [
        Provider::OpenAi,
        Provider::OpenAiChat,
        Provider::Anthropic,
        Provider::Mistral,
    ] {
        let calls = parse_tool_calls(provider, &value);
        let outcomes: Vec<CallOutcome> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| match (&c.arguments, i % 2) {
                (Err(e), _) => CallOutcome::error(e.clone()),
                (Ok(args), 0) => CallOutcome::ok(&Value::Object(args.clone())),
                (Ok(_), _) => CallOutcome::error(format!("error {i}")),
            })
            .collect();
        let messages = result_messages(&calls, &outcomes);
        let anthropic: Vec<_> = calls
            .iter()
            .filter(|c| c.format == CallFormat::Anthropic)
            .collect();
        let expected_len = calls.len() - anthropic.len() + usize::from(!anthropic.is_empty());
        assert_eq!(messages.len(), expected_len, "{messages:?}");
        // Ids kept, in call order (Anthropic's gathered where the first was).
        let mut expected_ids: Vec<String> = Vec::new();
        let mut anthropic_done = false;
        for c in &calls {
            if c.format == CallFormat::Anthropic {
                if !anthropic_done {
                    expected_ids.extend(anthropic.iter().map(|a| a.id.clone()));
                    anthropic_done = true;
                }
            } else {
                expected_ids.push(c.id.clone());
            }
        }
        assert_eq!(ids_of(&messages), expected_ids);
        for m in &messages {
            let outputs: Vec<&Value> = match m.get("content") {
                Some(Value::Array(blocks)) => blocks.iter().map(|b| &b["content"]).collect(),
                Some(c) => vec![c],
                None => vec![&m["output"]],
            };
            assert!(outputs.iter().all(|o| o.is_string()), "{m}");
        }
        for c in &calls {
            if c.format == CallFormat::Mistral && !strings_in(&value).contains(c.id.as_str()) {
                // An id this client invented follows Mistral's rule.
                assert!(
                    c.id.len() == 9 && c.id.bytes().all(|b| b.is_ascii_alphanumeric()),
                    "invented Mistral id {:?}",
                    c.id
                );
            }
        }
    }
    if let Value::Object(m) = value
        && let Ok(answer) = ServerToLlm::from_object(m)
    {
        let outcome = task_outcome(&answer);
        if !outcome.is_error {
            assert!(serde_json::from_str::<Value>(&outcome.content).is_ok());
        }
    }
}

/// The toolkit key of the [`server_http`] target's server.
pub const SERVER_TOOLKIT_KEY: &str = "fz-toolkit-key";
/// The LLM key of the [`server_http`] target's server.
pub const SERVER_LLM_KEY: &str = "fz-llm-key";
/// The admin key of the [`server_http`] target's server (the admin API
/// and the console).
pub const SERVER_ADMIN_KEY: &str = "fz-admin-key-0123456789";

/// The console's static files, with their content types.
const CONSOLE_FILES: [(&str, &str); 4] = [
    ("/console", "text/html; charset=utf-8"),
    ("/console/", "text/html; charset=utf-8"),
    ("/console/console.js", "text/javascript; charset=utf-8"),
    ("/console/console.css", "text/css; charset=utf-8"),
];
/// The admin API's endless stream of calls.
const LIVE_CALLS: &str = "/admin/calls/live";

fn server_router() -> axum::Router {
    static ROUTER: OnceLock<axum::Router> = OnceLock::new();
    ROUTER
        .get_or_init(|| {
            let server = atp_server::AtpServer::open(atp_server::Config {
                db: atp_server::DbLocation::Memory,
                toolkit_api_keys: vec![SERVER_TOOLKIT_KEY.into()],
                llm_api_keys: vec![SERVER_LLM_KEY.into()],
                admin_api_keys: vec![SERVER_ADMIN_KEY.into()],
                // No long polls and no long waits in a fuzz loop.
                inbox_wait: Duration::ZERO,
                task_timeout: Duration::from_millis(10),
                max_message_size: 4096,
                ..atp_server::Config::default()
            })
            .expect("an in-memory server opens");
            server.router()
        })
        .clone()
}

/// Fuzz target `server_http`: one request, decoded as for [`engine`]
/// (`Authorization` and `Content-Type` sent; the body's real length as
/// `Content-Length`), through `atp-server`'s router. A request the HTTP
/// layer could not carry (a method or target that is not valid) is skipped.
pub fn server_http(data: &[u8]) {
    server_http_sent(data);
}

/// [`server_http`], telling whether the request was sent (not skipped).
pub fn server_http_sent(data: &[u8]) -> bool {
    use tower::ServiceExt;
    let input = EngineInput::decode(data);
    let Ok(method) = axum::http::Method::from_bytes(input.method.as_bytes()) else {
        return false;
    };
    let target = match &input.query {
        Some(q) => format!("{}?{q}", input.path),
        None => input.path.clone(),
    };
    let Ok(uri) = target.parse::<axum::http::Uri>() else {
        return false;
    };
    if uri.path_and_query().is_none() || !target.starts_with('/') {
        return false;
    }
    let is_head = method == axum::http::Method::HEAD;
    // The path the router sees (no fragment).
    let path = uri.path().to_owned();
    let mut request = axum::http::Request::builder().method(method).uri(uri);
    for (name, value) in [
        ("content-type", &input.headers[0]),
        ("authorization", &input.headers[2]),
    ] {
        if let Some(v) = value
            && let Ok(v) = axum::http::HeaderValue::from_bytes(v)
        {
            request = request.header(name, v);
        }
    }
    let Ok(request) = request.body(axum::body::Body::from(input.body.clone())) else {
        return false;
    };
    let router = server_router();
    let live = path == LIVE_CALLS;
    let (status, content_type, body) = block_on(async move {
        let response = router
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // The live calls never end: only their head is read.
        if live && status == 200 {
            return (status, content_type, axum::body::Bytes::new());
        }
        let body = axum::body::to_bytes(response.into_body(), 1 << 24)
            .await
            .expect("a body");
        (status, content_type, body)
    });
    let text = String::from_utf8_lossy(&body);
    assert!(status < 500, "HTTP {status}: {text}");
    // The admin key opens the live calls: a stream of events.
    if live && status == 200 {
        assert_eq!(content_type.as_deref(), Some("text/event-stream"));
        return true;
    }
    // The console's page and files, served to anyone (the admin API is
    // on), with their own types; never a key in them.
    if let Some((_, want)) = CONSOLE_FILES.iter().find(|(p, _)| *p == path)
        && status == 200
    {
        assert_eq!(content_type.as_deref(), Some(*want), "{path}");
        for key in [SERVER_ADMIN_KEY, SERVER_LLM_KEY, SERVER_TOOLKIT_KEY] {
            assert!(!text.contains(key), "{key} in {path}");
        }
        return true;
    }
    // The MCP endpoints answer JSON-RPC: an error's ATP code is its
    // `error.data.code`; a notification gets a bare 202; a call with
    // notifications may be server-sent events.
    if is_mcp_path(&input.path) {
        match content_type.as_deref() {
            None => assert!(status == 202 && body.is_empty(), "HTTP {status}: {text}"),
            Some("text/event-stream") => assert_eq!(status, 200, "{text}"),
            _ if is_head => {}
            Some("application/json") => {
                let value: Value = serde_json::from_slice(&body)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): HTTP {status}: {text}"));
                // The router's own answers (a method it has no route for)
                // are ATP errors; the endpoint's are JSON-RPC.
                if value.get("jsonrpc").is_some() {
                    assert_eq!(value["jsonrpc"], "2.0", "HTTP {status}: {text}");
                    if status >= 400 {
                        assert!(value["error"]["code"].is_i64(), "HTTP {status}: {text}");
                    }
                } else {
                    assert!(
                        status >= 400 && value.get("code").is_some_and(Value::is_string),
                        "HTTP {status}: {text}"
                    );
                }
            }
            Some(other) => panic!("content type {other}: HTTP {status}: {text}"),
        }
        return true;
    }
    assert_eq!(
        content_type.as_deref(),
        Some("application/json"),
        "HTTP {status}: {text}"
    );
    // A HEAD answer has the head of the GET (or 405) answer and no body
    // (axum strips it, as HTTP requires).
    if is_head {
        assert!(body.is_empty(), "a body on HEAD: HTTP {status}: {text}");
        return true;
    }
    let value: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): HTTP {status}: {text}"));
    if status >= 400 {
        assert!(
            value.get("code").is_some_and(Value::is_string),
            "HTTP {status}: {text}"
        );
    }
    true
}

/// Runs `target` on one input.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "engine" => engine(data),
        "server_http" => server_http(data),
        "runtime_message" => runtime_message(data),
        "llm_calls" => llm_calls(data),
        other => panic!("unknown fuzz target {other:?}"),
    }
}

/// The seed corpus of `target`: `fuzz/corpus/<target>/` in this
/// workspace.
pub fn corpus_dir(target: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Tokens the mutator inserts: JSON, HTTP and ATP words.
pub const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"1e999",
    b"-0",
    b"\\u0000",
    b"\\ud800",
    b"%",
    b"%FF",
    b"%2F",
    b"/",
    b"?",
    b"&",
    b"=",
    b"+",
    b"\n",
    b"\r\n",
    b"\xff",
    b"\xc3",
    b"GET",
    b"HEAD",
    b"POST",
    b"OPTIONS",
    b"/atp/",
    b"/atp/fz/",
    b"/atp/fz/echo/",
    b"/atp/locked/echo/",
    b"provider=",
    b"strict=true",
    b"application/json",
    b"application/x-www-form-urlencoded",
    b"; charset=latin1",
    b"Bearer ",
    b"fuzz-endpoint-key",
    b"auth_token",
    b"text",
    b"ms",
    b"request_id",
    b"tool_name",
    b"params",
    b"payload",
    b"message_type",
    b"atp_tool_request",
    b"type",
    b"tool_use",
    b"function_call",
    b"function",
    b"tool_calls",
    b"choices",
    b"arguments",
    b"input",
    b"call_id",
    b"id",
    b"name",
    b"content",
    b"output",
    b"result",
    b"status",
    b"error",
];

/// A small xorshift generator (deterministic for a seed).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Mutates `input` in place: bit flips, byte and token insertions,
/// deletions, splices from `corpus`, repeated slices; at most `max_len`
/// bytes.
pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>], max_len: usize) {
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.next_u64() as u8;
            }
            2 => {
                let i = rng.below(input.len() + 1);
                let t = TOKENS[rng.below(TOKENS.len())];
                input.splice(i..i, t.iter().copied());
            }
            3 if !input.is_empty() => {
                let i = rng.below(input.len());
                let n = 1 + rng.below((input.len() - i).min(16));
                input.drain(i..i + n);
            }
            4 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let a = rng.below(other.len());
                    let b = a + rng.below(other.len() - a + 1);
                    let i = rng.below(input.len() + 1);
                    input.splice(i..i, other[a..b].iter().copied());
                }
            }
            5 if !input.is_empty() => {
                // Repeat a slice (deep nesting, long names).
                let i = rng.below(input.len());
                let n = 1 + rng.below((input.len() - i).min(4));
                let piece = input[i..i + n].to_vec();
                for _ in 0..rng.below(200) {
                    input.splice(i..i, piece.iter().copied());
                }
            }
            _ => {
                let i = rng.below(input.len() + 1);
                input.insert(i, rng.next_u64() as u8);
            }
        }
    }
    input.truncate(max_len);
}

/// The committed seed corpus of `target` (the `seed-*` files; what a
/// fuzzer adds beside them is not in git), file by file, sorted by name.
pub fn load_corpus(target: &str) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir(target))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("seed-"))
                })
                .filter_map(|p| std::fs::read(&p).ok().map(|d| (p, d)))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}
