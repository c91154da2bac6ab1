//! The soak driver: a long, mixed stream of valid and invalid requests over
//! kept-alive connections, every answer checked against what the contract
//! predicts, and the server's RSS sampled as it goes.
//!
//! Each request is built from its number `i` by the probe `i % mix.len()`,
//! so a run is reproducible, and answers that echo carry `i` (a crossed
//! answer can not pass). A request is *lost* when no answer comes (within
//! [`REQUEST_TIMEOUT`]) even on a fresh connection; an answer is
//! *unexpected* when its status, `code` or content is not the predicted
//! one.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use atp_registry::wire::{
    self, ContextRequest, LlmToServer, RegisterTool, RequestId, TaskPayload, TaskRequest,
    ToolMetadata,
};
use serde_json::{Value, json};

use crate::http::{Conn, RawResponse, request};

/// The longest wait for one answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One request and what must come back.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The bytes to send.
    pub bytes: Vec<u8>,
    /// A `HEAD` request (no body in the answer).
    pub head: bool,
    /// The status that must come back.
    pub status: u16,
    /// The `code` of the JSON body, when one must be there.
    pub code: Option<&'static str>,
    /// Text the body must contain.
    pub contains: Option<String>,
    /// Close the connection after the answer (the body was not all sent).
    pub close_after: bool,
}

impl Probe {
    fn new(bytes: Vec<u8>, status: u16, code: Option<&'static str>) -> Self {
        Self {
            bytes,
            head: false,
            status,
            code,
            contains: None,
            close_after: false,
        }
    }

    fn containing(mut self, text: impl Into<String>) -> Self {
        self.contains = Some(text.into());
        self
    }

    /// Why `r` is not the answer this probe predicts, if it is not.
    pub fn check(&self, r: &RawResponse) -> Result<(), String> {
        let body = String::from_utf8_lossy(&r.body);
        if r.status != self.status {
            return Err(format!(
                "status {} instead of {}: {body}",
                r.status, self.status
            ));
        }
        if !self.head && r.json().is_none() {
            return Err(format!("a body that is not JSON: {body}"));
        }
        if let Some(code) = self.code
            && r.code().as_deref() != Some(code)
        {
            return Err(format!("code {:?} instead of {code}: {body}", r.code()));
        }
        if let Some(text) = &self.contains
            && !body.contains(text.as_str())
        {
            return Err(format!("{text:?} is not in the body: {body}"));
        }
        Ok(())
    }
}

/// A probe builder: request number → probe.
pub type ProbeFn = fn(u64) -> Probe;

fn p(name: &'static str, build: ProbeFn) -> (&'static str, ProbeFn) {
    (name, build)
}

fn json_post(target: &str, body: &str) -> Vec<u8> {
    request(
        "POST",
        target,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

fn deep_json() -> String {
    format!(r#"{{"text": {}{}}}"#, "[".repeat(300), "]".repeat(300))
}

/// The mix sent to an adapter serving the conformance fixture: 28 probes,
/// 12 of them valid calls.
pub fn adapter_mix() -> Vec<(&'static str, ProbeFn)> {
    const ECHO: &str = "/atp/conformance/echo/";
    vec![
        p("list", |_| {
            Probe::new(request("GET", "/atp/", &[], b""), 200, None).containing("\"conformance\"")
        }),
        p("toolkit", |_| {
            Probe::new(request("GET", "/atp/conformance/", &[], b""), 200, None)
        }),
        p("provider", |_| {
            Probe::new(
                request("GET", "/atp/conformance/?provider=anthropic", &[], b""),
                200,
                None,
            )
            .containing("input_schema")
        }),
        p("head", |_| Probe {
            head: true,
            ..Probe::new(request("HEAD", ECHO, &[], b""), 200, None)
        }),
        p("echo", |i| {
            Probe::new(
                json_post(ECHO, &format!(r#"{{"text": "r{i}"}}"#)),
                200,
                None,
            )
            .containing(format!(r#"{{"result":{{"echo":"r{i}"}}}}"#))
        }),
        p("echo_form", |i| {
            Probe::new(
                request(
                    "POST",
                    ECHO,
                    &[("Content-Type", "application/x-www-form-urlencoded")],
                    format!("text=f{i}").as_bytes(),
                ),
                200,
                None,
            )
            .containing(format!(r#""echo":"f{i}""#))
        }),
        p("add", |i| {
            Probe::new(
                json_post("/atp/conformance/add/", &format!(r#"{{"a": {i}, "b": 1}}"#)),
                200,
                None,
            )
            .containing(format!(r#"{{"sum":{}}}"#, i + 1))
        }),
        p("missing", |_| {
            Probe::new(json_post(ECHO, "{}"), 400, Some("missing_params"))
        }),
        p("unknown", |_| {
            Probe::new(
                json_post(ECHO, r#"{"text": "x", "zzz": 1}"#),
                400,
                Some("unknown_params"),
            )
        }),
        p("invalid_params", |_| {
            Probe::new(
                json_post("/atp/conformance/add/", r#"{"a": "x", "b": 1}"#),
                400,
                Some("invalid_params"),
            )
        }),
        p("bad_json", |_| {
            Probe::new(json_post(ECHO, r#"{"text": "#), 400, Some("invalid_body"))
        }),
        p("media", |_| {
            Probe::new(
                request("POST", ECHO, &[("Content-Type", "text/plain")], b"hi"),
                415,
                Some("unsupported_media_type"),
            )
        }),
        p("too_large", |_| {
            let mut bytes = format!(
                "POST {ECHO} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                2 * 1024 * 1024
            )
            .into_bytes();
            bytes.extend_from_slice(&[b' '; 64]);
            Probe {
                close_after: true,
                ..Probe::new(bytes, 413, Some("payload_too_large"))
            }
        }),
        p("no_toolkit", |_| {
            Probe::new(
                request("GET", "/atp/nope/", &[], b""),
                404,
                Some("toolkit_not_found"),
            )
        }),
        p("no_tool", |_| {
            Probe::new(
                request("GET", "/atp/conformance/nope/", &[], b""),
                404,
                Some("tool_not_found"),
            )
        }),
        p("not_found", |_| {
            Probe::new(
                request("GET", "/atp/a/b/c/", &[], b""),
                404,
                Some("not_found"),
            )
        }),
        p("method", |_| {
            Probe::new(
                request("DELETE", ECHO, &[], b""),
                405,
                Some("method_not_allowed"),
            )
        }),
        p("locked", |_| {
            Probe::new(
                request("GET", "/atp/locked/", &[], b""),
                401,
                Some("unauthorized"),
            )
        }),
        p("locked_key", |_| {
            Probe::new(
                request(
                    "GET",
                    "/atp/locked/",
                    &[("X-ATP-Key", "conformance-key")],
                    b"",
                ),
                200,
                None,
            )
            .containing("\"Locked\"")
        }),
        p("fail", |_| {
            Probe::new(
                json_post("/atp/conformance/fail/", "{}"),
                400,
                Some("tool_error"),
            )
        }),
        p("panic", |_| {
            Probe::new(
                json_post("/atp/conformance/panic/", "{}"),
                500,
                Some("tool_panicked"),
            )
        }),
        p("auth_required", |_| {
            Probe::new(
                json_post("/atp/conformance/secure/", "{}"),
                401,
                Some("auth_required"),
            )
        }),
        p("bearer", |i| {
            let token = format!("tok{i}");
            Probe::new(
                request(
                    "POST",
                    "/atp/conformance/secure/",
                    &[("Authorization", &format!("Bearer {token}"))],
                    b"",
                ),
                200,
                None,
            )
            .containing(format!(r#"{{"token_length":{}}}"#, token.len()))
        }),
        p("deep_json", |_| {
            Probe::new(json_post(ECHO, &deep_json()), 400, Some("invalid_body"))
        }),
        p("bad_form", |_| {
            Probe::new(
                request(
                    "POST",
                    ECHO,
                    &[("Content-Type", "application/x-www-form-urlencoded")],
                    b"text=%FF",
                ),
                400,
                Some("invalid_body"),
            )
        }),
        p("bad_provider", |_| {
            Probe::new(
                request("GET", "/atp/conformance/?provider=bogus", &[], b""),
                400,
                Some("unknown_provider"),
            )
        }),
        p("bad_utf8", |_| {
            Probe::new(
                request(
                    "POST",
                    ECHO,
                    &[("Content-Type", "application/json")],
                    b"{\"text\": \"\xff\xfe\"}",
                ),
                400,
                Some("invalid_body"),
            )
        }),
        p("slow", |_| {
            Probe::new(
                json_post("/atp/conformance/slow/", r#"{"ms": 0}"#),
                200,
                None,
            )
            .containing(r#"{"slept":0}"#)
        }),
    ]
}

/// The toolkit key the server soak uses.
pub const SERVER_TOOLKIT_KEY: &str = "soak-toolkit-key";
/// The LLM key the server soak uses.
pub const SERVER_LLM_KEY: &str = "soak-llm-key";
/// The app the server soak's toolkit serves.
pub const SERVER_APP: &str = "soakkit";

const PROCESS: &str = "/api/v1/atp/llm-client/process/";

fn process(message: &LlmToServer) -> Vec<u8> {
    request(
        "POST",
        PROCESS,
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &format!("ApiKey {SERVER_LLM_KEY}")),
        ],
        message.to_json().as_bytes(),
    )
}

fn task(i: u64, toolkit: &str, function: &str, parameters: Value) -> Vec<u8> {
    process(&LlmToServer::TaskRequest(TaskRequest {
        toolkit_id: toolkit.into(),
        request_id: Some(RequestId::Str(format!("q{i}"))),
        payload: TaskPayload {
            function: function.into(),
            parameters,
            auth_token: None,
            tool_call_id: Value::String(format!("c{i}")),
            external_user_id: None,
        },
        provider: Some("anthropic".into()),
        user_prompt: Value::String(String::new()),
        external_user_id: None,
        auth_token: None,
        stream: false,
        traceparent: None,
        tracestate: None,
    }))
}

fn context(toolkit: &str, request_id: Option<String>) -> Vec<u8> {
    process(&LlmToServer::GetToolkitContext(ContextRequest {
        toolkit_id: toolkit.into(),
        request_id: request_id.map(RequestId::Str),
        provider: Some("openai".into()),
        user_prompt: Value::String(String::new()),
        strict: false,
    }))
}

/// The mix sent to `atp-server`, with [`SERVER_APP`] served by a
/// connected toolkit (`echo`, `slow`, `fails`): tool calls that succeed
/// and fail through the toolkit, contexts, and requests the server itself
/// refuses.
pub fn server_mix() -> Vec<(&'static str, ProbeFn)> {
    vec![
        p("task_echo", |i| {
            Probe::new(
                task(i, SERVER_APP, "echo", json!({"text": format!("r{i}")})),
                200,
                None,
            )
            .containing(format!(r#""result":{{"echo":"r{i}"}}"#))
        }),
        p("task_slow", |i| {
            Probe::new(task(i, SERVER_APP, "slow", json!({"ms": 1})), 200, None)
                .containing(format!(r#""request_id":"q{i}""#))
        }),
        p("task_missing", |i| {
            Probe::new(task(i, SERVER_APP, "echo", json!({})), 200, None)
                .containing(r#""status":"failed""#)
        }),
        p("task_fails", |i| {
            Probe::new(task(i, SERVER_APP, "fails", json!({})), 200, None).containing("it failed")
        }),
        p("task_no_tool", |i| {
            Probe::new(task(i, SERVER_APP, "nope", json!({})), 200, None)
                .containing(r#""status":"failed""#)
        }),
        p("task_no_toolkit", |i| {
            Probe::new(
                task(i, "no_such_kit", "echo", json!({"text": "x"})),
                200,
                None,
            )
            .containing(r#""status":"failed""#)
        }),
        p("context", |i| {
            Probe::new(context(SERVER_APP, Some(format!("g{i}"))), 200, None)
                .containing(format!(r#""request_id":"g{i}""#))
        }),
        p("context_unknown", |_| {
            Probe::new(context("no_such_kit", None), 404, Some("toolkit_not_found"))
        }),
        p("wrong_key", |_| {
            Probe::new(
                request("POST", PROCESS, &[("Authorization", "ApiKey wrong")], b"{}"),
                401,
                Some("unauthorized"),
            )
        }),
        p("bad_json", |_| {
            Probe::new(
                request(
                    "POST",
                    PROCESS,
                    &[("Authorization", &format!("ApiKey {SERVER_LLM_KEY}"))],
                    b"{\"type\": ",
                ),
                400,
                Some("invalid_body"),
            )
        }),
        p("not_found", |_| {
            Probe::new(request("GET", "/nope", &[], b""), 404, Some("not_found"))
        }),
        p("method", |_| {
            Probe::new(
                request("DELETE", PROCESS, &[], b""),
                405,
                Some("method_not_allowed"),
            )
        }),
        p("health", |_| {
            Probe::new(request("GET", "/health", &[], b""), 200, None)
        }),
        p("register", |_| {
            Probe::new(
                json_post(
                    "/api/v1/register_tool/",
                    &wire::to_json(&RegisterTool {
                        function_id: Some("echo".into()),
                        api_key: Some(SERVER_TOOLKIT_KEY.into()),
                        app_name: Some(SERVER_APP.into()),
                        programming_language: None,
                        code_hash: Some("soak".into()),
                        toolkit_hash: None,
                        metadata: ToolMetadata {
                            params: vec!["text".into()],
                            required_params: vec!["text".into()],
                            description: Some("Echoes.".into()),
                            ..Default::default()
                        },
                        endpoint_url: None,
                        endpoint_key: None,
                    }),
                ),
                200,
                None,
            )
        }),
    ]
}

/// How to run a soak.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// How many requests in all.
    pub requests: u64,
    /// How many connections send at once.
    pub connections: usize,
    /// Stop early after this long.
    pub max_time: Duration,
    /// How often to sample the server's RSS.
    pub sample_every: Duration,
}

impl Default for SoakOptions {
    fn default() -> Self {
        Self {
            requests: 1_000_000,
            connections: 16,
            max_time: Duration::from_secs(3600),
            sample_every: Duration::from_secs(5),
        }
    }
}

/// One RSS sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssSample {
    /// Milliseconds since the start.
    pub at_ms: u64,
    /// Requests answered by then.
    pub done: u64,
    /// The server's RSS in KiB.
    pub rss_kib: u64,
}

/// What a soak saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Requests sent.
    pub sent: u64,
    /// Answers that came back.
    pub answered: u64,
    /// Answers by status.
    pub by_status: BTreeMap<u16, u64>,
    /// Answers by probe name.
    pub by_probe: BTreeMap<&'static str, u64>,
    /// Answers that were not the predicted ones.
    pub unexpected: u64,
    /// Requests that got no answer, even on a fresh connection.
    pub lost: u64,
    /// Requests re-sent once because a kept-alive connection was found
    /// closed before any answer byte.
    pub retried: u64,
    /// Connections opened.
    pub connections_opened: u64,
    /// The first few problems.
    pub examples: Vec<String>,
    /// The RSS curve.
    pub rss: Vec<RssSample>,
    /// How long it took.
    pub elapsed: Duration,
}

impl Report {
    /// Whether every request got its predicted answer.
    pub fn clean(&self) -> bool {
        self.unexpected == 0 && self.lost == 0 && self.answered == self.sent
    }

    /// A Markdown summary.
    pub fn to_markdown(&self, title: &str) -> String {
        let mut s = String::new();
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let _ = writeln!(s, "### {title}\n");
        let _ = writeln!(
            s,
            "- requests: {} sent, {} answered, {} unexpected, {} lost, {} re-sent on a stale kept-alive connection; {} connections; {:.1} s ({:.0} req/s)",
            self.sent,
            self.answered,
            self.unexpected,
            self.lost,
            self.retried,
            self.connections_opened,
            secs,
            self.answered as f64 / secs
        );
        let statuses: Vec<String> = self
            .by_status
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(s, "- statuses: {}", statuses.join(", "));
        for e in &self.examples {
            let _ = writeln!(s, "- problem: {e}");
        }
        if !self.rss.is_empty() {
            let _ = writeln!(
                s,
                "\n| t (s) | requests done | server RSS (MiB) |\n|---:|---:|---:|"
            );
            for r in &self.rss {
                let _ = writeln!(
                    s,
                    "| {:.0} | {} | {:.1} |",
                    r.at_ms as f64 / 1000.0,
                    r.done,
                    r.rss_kib as f64 / 1024.0
                );
            }
        }
        s
    }
}

#[derive(Default)]
struct Shared {
    next: AtomicU64,
    answered: AtomicU64,
    report: Mutex<Report>,
}

impl Shared {
    fn record(&self, f: impl FnOnce(&mut Report)) {
        f(&mut self.report.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn problem(&self, what: String) {
        self.record(|r| {
            if r.examples.len() < 10 {
                r.examples.push(what);
            }
        });
    }
}

async fn exchange(conn: &mut Conn, probe: &Probe) -> io::Result<RawResponse> {
    tokio::time::timeout(REQUEST_TIMEOUT, conn.exchange(&probe.bytes, probe.head))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))?
}

async fn worker(
    addr: SocketAddr,
    mix: Arc<Vec<(&'static str, ProbeFn)>>,
    opts: SoakOptions,
    shared: Arc<Shared>,
    started: Instant,
) {
    let mut conn: Option<Conn> = None;
    loop {
        let i = shared.next.fetch_add(1, Ordering::SeqCst);
        if i >= opts.requests || started.elapsed() > opts.max_time {
            return;
        }
        let (name, build) = mix[(i % mix.len() as u64) as usize];
        let probe = build(i);
        shared.record(|r| r.sent += 1);
        let mut answer = None;
        for attempt in 0..2 {
            let reused = conn.is_some();
            if conn.is_none() {
                match Conn::connect(addr).await {
                    Ok(c) => {
                        shared.record(|r| r.connections_opened += 1);
                        conn = Some(c);
                    }
                    Err(e) => {
                        shared.problem(format!("request {i} ({name}): connect: {e}"));
                        break;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { break };
            match exchange(c, &probe).await {
                Ok(r) => {
                    answer = Some(r);
                    break;
                }
                Err(e) => {
                    conn = None;
                    let stale = reused
                        && attempt == 0
                        && matches!(
                            e.kind(),
                            io::ErrorKind::UnexpectedEof
                                | io::ErrorKind::ConnectionReset
                                | io::ErrorKind::BrokenPipe
                        );
                    if stale {
                        shared.record(|r| r.retried += 1);
                        continue;
                    }
                    shared.problem(format!("request {i} ({name}): {e}"));
                    break;
                }
            }
        }
        let Some(r) = answer else {
            shared.record(|rep| rep.lost += 1);
            continue;
        };
        shared.answered.fetch_add(1, Ordering::SeqCst);
        let verdict = probe.check(&r);
        shared.record(|rep| {
            rep.answered += 1;
            *rep.by_status.entry(r.status).or_default() += 1;
            *rep.by_probe.entry(name).or_default() += 1;
            if verdict.is_err() {
                rep.unexpected += 1;
            }
        });
        if let Err(why) = verdict {
            shared.problem(format!("request {i} ({name}): {why}"));
        }
        if r.close || probe.close_after {
            conn = None;
        }
    }
}

/// Sends `opts.requests` requests from `mix` to `addr`, sampling the RSS
/// of process `pid` (the server) every `opts.sample_every`.
pub async fn run(
    addr: SocketAddr,
    mix: Vec<(&'static str, ProbeFn)>,
    opts: SoakOptions,
    pid: Option<u32>,
) -> Report {
    let shared = Arc::new(Shared::default());
    let mix = Arc::new(mix);
    let started = Instant::now();
    let sample = |shared: &Shared| {
        if let Some(rss) = pid.and_then(crate::rss_kib) {
            let at_ms = started.elapsed().as_millis() as u64;
            let done = shared.answered.load(Ordering::SeqCst);
            shared.record(|r| {
                r.rss.push(RssSample {
                    at_ms,
                    done,
                    rss_kib: rss,
                })
            });
        }
    };
    sample(&shared);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.connections.max(1) {
        workers.spawn(worker(
            addr,
            mix.clone(),
            opts.clone(),
            shared.clone(),
            started,
        ));
    }
    let mut ticker = tokio::time::interval(opts.sample_every);
    ticker.tick().await;
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                None => break,
                Some(Err(e)) => shared.problem(format!("a worker failed: {e}")),
                Some(Ok(())) => {}
            },
            _ = ticker.tick() => sample(&shared),
        }
    }
    sample(&shared);
    let mut report =
        std::mem::take(&mut *shared.report.lock().unwrap_or_else(PoisonError::into_inner));
    report.elapsed = started.elapsed();
    report
}
