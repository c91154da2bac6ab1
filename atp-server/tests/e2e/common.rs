//! Shared helpers: a server on a loopback port, a plain HTTP client, the
//! demo toolkit, and Rust peers (toolkit runtime, LLM client).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use atp_registry::{
    Call, Tool, ToolError, ToolKitClient,
    llm::{LlmClient, LlmProtocol},
    runtime::{RuntimeOptions, Transport},
};
use atp_server::{AtpServer, Config, DbLocation, SecretsKey};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, Response, body::Incoming};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};

pub const TK_KEY: &str = "tk-secret-key";
pub const LLM_KEY: &str = "llm-secret-key";
/// The bound of every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// A fixed secrets key of the tests (32 bytes of `byte`, in hex): what
/// seals the secrets a test server stores.
pub fn secrets_key(byte: u8) -> SecretsKey {
    SecretsKey::parse(&format!("{byte:02x}").repeat(32)).expect("a key")
}

/// The secrets key of [`keyed_config`], in hex (for `ATP_SECRETS_KEY`).
pub fn secrets_key_hex() -> String {
    "5a".repeat(32)
}

/// A config with one toolkit key and one LLM key, in memory, with a
/// secrets key (so that a database file or PostgreSQL may replace the
/// in-memory one).
pub fn keyed_config() -> Config {
    Config {
        db: DbLocation::Memory,
        toolkit_api_keys: vec![TK_KEY.into()],
        llm_api_keys: vec![LLM_KEY.into()],
        secrets_keys: vec![secrets_key(0x5a)],
        ..Config::default()
    }
}

/// A server serving on a loopback port until dropped or stopped.
pub struct TestServer {
    pub server: AtpServer,
    pub addr: SocketAddr,
    pub base: String,
    join: Option<JoinHandle<Result<(), atp_server::ServerError>>>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server = AtpServer::open(config).expect("open");
        Self::serve(server, listener)
    }

    /// Like [`start`](Self::start), through `AtpServer::connect` (which
    /// opens PostgreSQL and NATS too).
    pub async fn start_connected(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server = tokio::time::timeout(WAIT, AtpServer::connect(config))
            .await
            .expect("connected in time")
            .expect("connect");
        Self::serve(server, listener)
    }

    fn serve(server: AtpServer, listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("addr");
        let s = server.clone();
        let join = tokio::spawn(async move { s.serve(listener).await });
        Self {
            server,
            addr,
            base: format!("http://{addr}"),
            join: Some(join),
        }
    }

    /// Shuts the server down and waits until it has stopped.
    pub async fn stop(mut self) {
        self.server.shutdown();
        if let Some(join) = self.join.take() {
            tokio::time::timeout(WAIT, join)
                .await
                .expect("the server stops in time")
                .expect("no panic")
                .expect("served without error");
        }
    }

    pub async fn wait_served(&self, app: &str) {
        assert!(
            self.server.wait_until_served(app, WAIT).await,
            "toolkit {app} never connected"
        );
    }

    pub fn llm(&self, protocol: LlmProtocol) -> LlmClient {
        LlmClient::new(LLM_KEY)
            .with_base_url(&self.base)
            .with_protocol(protocol)
            .with_timeout(WAIT)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

/// Sends one HTTP/1.1 request (a JSON body when there is one) on a new
/// client; no bound.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("method"))
        .uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("request");
    client.request(req).await
}

/// A plain HTTP/1.1 call: status, headers and body text.
pub async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, HeaderMap, String) {
    let resp = tokio::time::timeout(WAIT, send(method, url, headers, body.map(str::to_owned)))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// A JSON call: status and JSON body.
pub async fn http_json(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, Value) {
    let text = body.map(Value::to_string);
    let (status, _, body) = http(method, url, headers, text.as_deref()).await;
    let value =
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON (HTTP {status}): {body}"));
    (status, value)
}

/// The demo toolkit: `hello_world`, `get_weather`, `echo`, `whoami` (needs
/// an OAuth token from `localprov`), `slow`, `fails`.
pub fn demo_toolkit(key: &str, app: &str, base: &str) -> ToolKitClient {
    let client = ToolKitClient::new(key, app).with_base_url(base);
    client
        .register_tool(
            Tool::new("hello_world")
                .description("Returns a greeting.")
                .params(["name"])
                .required_params(["name"]),
            |call: Call| async move {
                let name = call.str("name").unwrap_or("World").to_owned();
                Ok::<_, ToolError>(json!({"message": format!("Hello, {name}!")}))
            },
        )
        .expect("valid");
    client
        .register_tool(
            Tool::new("get_weather")
                .description("The weather in a city.")
                .params(["city"])
                .required_params(["city"]),
            |call: Call| async move {
                Ok::<_, ToolError>(json!({"city": call.param("city"), "forecast": "sunny"}))
            },
        )
        .expect("valid");
    let app_name = app.to_owned();
    client
        .register_tool(
            Tool::new("echo")
                .description("Echoes the input text.")
                .params(["text"])
                .required_params(["text"]),
            move |call: Call| {
                let app = app_name.clone();
                async move { Ok::<_, ToolError>(json!({"echo": call.param("text"), "app": app})) }
            },
        )
        .expect("valid");
    client
        .register_tool(
            Tool::new("whoami")
                .description("Shows the auth token it got.")
                .auth_provider("localprov")
                .auth_type("OAuth2")
                .auth_with("access_token"),
            |call: Call| async move {
                Ok::<_, ToolError>(
                    json!({"token": call.auth_token().map(|t| t.expose().to_owned())}),
                )
            },
        )
        .expect("valid");
    client
        .register_tool(
            Tool::new("slow")
                .description("Sleeps for ms milliseconds.")
                .params(["ms"])
                .param_schema("ms", json!({"type": "integer"})),
            |call: Call| async move {
                let ms = call.param("ms").and_then(Value::as_u64).unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, ToolError>(json!({"slept": ms}))
            },
        )
        .expect("valid");
    client
        .register_tool(
            Tool::new("fails").description("Always fails."),
            |_call: Call| async move { Err::<Value, _>(ToolError::new("this tool always fails")) },
        )
        .expect("valid");
    client
}

/// The demo toolkit's tools, in the order it registers them.
pub const DEMO_TOOLS: [&str; 6] = [
    "hello_world",
    "get_weather",
    "echo",
    "whoami",
    "slow",
    "fails",
];

/// The context (HTTP, Anthropic's format) `server` gives of `app`, checked
/// to be the demo toolkit's: its tools in order, `slow`'s `ms` an integer.
pub async fn demo_context(server: &TestServer, app: &str) -> Value {
    let context = server
        .llm(LlmProtocol::Http)
        .get_toolkit_context(app, "anthropic", "")
        .await
        .expect("context");
    let names: Vec<&str> = context["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, DEMO_TOOLS);
    assert_eq!(
        context["tools"][4]["input_schema"]["properties"]["ms"]["type"],
        "integer"
    );
    context
}

/// Calls the demo toolkit `app`'s `echo` with `text` through `server`
/// (Anthropic's format): the JSON it answered.
pub async fn echo(server: &TestServer, protocol: LlmProtocol, app: &str, text: &str) -> Value {
    let call = json!({"type": "tool_use", "id": "t1", "name": "echo", "input": {"text": text}});
    let out = server
        .llm(protocol)
        .call_tool(app, &call, "anthropic", "")
        .await
        .expect("call");
    serde_json::from_str(&outputs(&out)[0]).expect("JSON")
}

/// Starts a toolkit's runtime (WebSocket or inbox) in the background.
///
/// `ToolKitClient::start`'s future is not `Send` (atp-registry's runtime
/// holds a `watch::Ref` across an await in a `select!`), so it runs on its
/// own runtime in a blocking-pool thread.
pub fn serve_toolkit(client: &ToolKitClient, transport: Transport) -> JoinHandle<()> {
    let client = client.clone().with_runtime_options(
        RuntimeOptions::default()
            .transport(transport)
            .handle_ctrl_c(false)
            .backoff(Duration::from_millis(50), Duration::from_millis(500))
            .grace_period(Duration::from_secs(1))
            .request_timeout(Duration::from_secs(10)),
    );
    tokio::task::spawn_blocking(move || {
        if let Err(e) = client.start_blocking() {
            eprintln!("toolkit runtime ended: {e}");
        }
    })
}

/// Stops a toolkit and waits until its runtime (from [`serve_toolkit`])
/// has ended.
pub async fn stop_toolkit(toolkit: &ToolKitClient, runtime: JoinHandle<()>) {
    toolkit.stop();
    tokio::time::timeout(WAIT, runtime)
        .await
        .expect("stops")
        .expect("no panic");
}

/// Reads a provider sample (a realistic API response with two tool calls).
pub fn sample(file: &str) -> Value {
    let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("JSON")
}

/// The text of a tool-result message in any provider's format.
pub fn outputs(messages: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for m in messages {
        if let Some(o) = m.get("output").and_then(Value::as_str) {
            out.push(o.to_owned());
        } else if let Some(blocks) = m.get("content").and_then(Value::as_array) {
            for b in blocks {
                out.push(b["content"].as_str().unwrap_or_default().to_owned());
            }
        } else if let Some(c) = m.get("content").and_then(Value::as_str) {
            out.push(c.to_owned());
        }
    }
    out
}

/// Runs a test body with a bound.
pub async fn bounded<F: std::future::Future<Output = ()>>(limit: Duration, f: F) {
    tokio::time::timeout(limit, f)
        .await
        .expect("the test finished in time");
}

/// Stops a toolkit when dropped: a test that fails half-way must not
/// leave its runtime reconnecting for ever (the test binary would wait
/// for it at exit).
pub struct StopOnDrop(pub ToolKitClient);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// The events of a whole `text/event-stream` body: the JSON of each
/// `data: ` line.
pub fn events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let data = e
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or_else(|| panic!("an event without data: {e:?}"));
            serde_json::from_str(data).expect("JSON data")
        })
        .collect()
}

/// The log lines and spans of the whole test process: the global tracing
/// subscriber, set once by the first test that asks for it (a process has
/// one; tests that read logs or spans share it, and see every test's).
#[derive(Clone, Default)]
pub struct Capture {
    /// Every log line, formatted (with its spans' fields).
    pub logs: LogBuffer,
    /// Every span, once it closed.
    pub spans: SpanLog,
}

/// Installs the process's [`Capture`] (on first use) and returns it.
pub fn capture() -> &'static Capture {
    use tracing_subscriber::layer::SubscriberExt;
    static CAPTURE: std::sync::OnceLock<Capture> = std::sync::OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let writer = capture.logs.clone();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || writer.clone()),
            )
            .with(capture.spans.clone());
        tracing::subscriber::set_global_default(subscriber)
            .expect("only common::capture sets the global subscriber");
        capture
    })
}

/// Formatted log lines, in memory.
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A closed span as [`SpanLog`] saw it.
#[derive(Clone, Debug, Default)]
pub struct SpanRecord {
    /// Its name (`atp.llm.call`, `atp.server.call`, `atp.tool`, …).
    pub name: &'static str,
    /// Its fields, as last recorded (strings without quotes, the rest as
    /// `Debug` prints them).
    pub fields: BTreeMap<String, String>,
    /// Its parent span's name, if it had one.
    pub parent: Option<&'static str>,
    /// The `trace_id` field of its parent span when it began.
    pub parent_trace_id: Option<String>,
}

impl SpanRecord {
    /// A field's value.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// A tracing layer that keeps every span's fields, for tests to read.
#[derive(Clone, Default)]
pub struct SpanLog(Arc<Mutex<Vec<SpanRecord>>>);

impl SpanLog {
    /// The closed spans that `keep` picks.
    pub fn find(&self, keep: impl Fn(&SpanRecord) -> bool) -> Vec<SpanRecord> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|r| keep(r))
            .cloned()
            .collect()
    }

    /// The `trace_id` of the newest closed span that `keep` picks.
    pub fn newest_trace_id(&self, keep: impl Fn(&SpanRecord) -> bool) -> String {
        self.find(keep)
            .last()
            .and_then(|r| r.field("trace_id"))
            .expect("a span with a trace id")
            .to_owned()
    }
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S> tracing_subscriber::Layer<S> for SpanLog
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let mut record = SpanRecord {
            name: attrs.metadata().name(),
            ..SpanRecord::default()
        };
        attrs.record(&mut Fields(&mut record.fields));
        if let Some(parent) = span.parent() {
            record.parent = Some(parent.name());
            record.parent_trace_id = parent
                .extensions()
                .get::<SpanRecord>()
                .and_then(|r| r.fields.get("trace_id").cloned());
        }
        span.extensions_mut().insert(record);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id)
            && let Some(record) = span.extensions_mut().get_mut::<SpanRecord>()
        {
            values.record(&mut Fields(&mut record.fields));
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if let Some(span) = ctx.span(&id)
            && let Some(record) = span.extensions_mut().remove::<SpanRecord>()
        {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(record);
        }
    }
}
