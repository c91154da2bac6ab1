//! The Rust toolkit runtime's parity with the Python `ToolKitClient`
//! (docs/PROTOCOL.md §9): interactive apps, progress, tools registered while
//! it runs, the idle timeout and execution reports.
//!
//! First against a fake ATP server that speaks the Python server's frames
//! by hand (a raw tokio-tungstenite socket and a hand-written HTTP/1.1
//! responder, so every byte the runtime sends is seen), then end to end
//! through `atp-server`, driven by raw LLM-side frames.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use atp_registry::{
    AppCall, AppReply, Call, Tool, ToolError, ToolKitClient,
    runtime::{RuntimeError, RuntimeOptions, Transport},
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Mutex, mpsc},
    task::JoinHandle,
};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};

use crate::common::*;

const KEY: &str = "fake-toolkit-key";

// ---------------------------------------------------------------------
// The toolkit under test.
// ---------------------------------------------------------------------

fn options() -> RuntimeOptions {
    RuntimeOptions::default()
        .handle_ctrl_c(false)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .grace_period(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(5))
}

/// A toolkit with the apps `counter` (untyped), `typed_counter`, `boom`
/// (panics at start) and `grumpy` (panics on an action), and the tools
/// `echo`, `work` (reports progress `steps` times) and `flood` (reports
/// 5000 times as fast as it can).
fn toolkit(key: &str, app: &str, base: &str) -> ToolKitClient {
    let client = ToolKitClient::new(key, app)
        .with_base_url(base)
        .with_runtime_options(options());
    client
        .register_app(
            Tool::new("counter")
                .description("A counter with buttons.")
                .params(["start"]),
            |call: AppCall| async move {
                let token = call.auth_token().map(|t| t.expose().to_owned());
                let (count, stop) = match call {
                    AppCall::Start { params, .. } => (
                        params.get("start").and_then(Value::as_i64).unwrap_or(0),
                        false,
                    ),
                    AppCall::Action {
                        action_data, state, ..
                    } => {
                        if action_data["fail"] == true {
                            return Err(ToolError::new("the app refused"));
                        }
                        let count = state["count"].as_i64().unwrap_or(0)
                            + action_data["add"].as_i64().unwrap_or(0);
                        (count, action_data["stop"] == true)
                    }
                };
                let reply = AppReply::new(json!({"count": count, "token": token}))
                    .state(json!({"count": count}));
                Ok(if stop { reply.terminate() } else { reply })
            },
        )
        .expect("valid");
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Tally {
        n: u32,
    }
    client
        .register_typed_app(
            Tool::new("typed_counter"),
            |call: AppCall<Tally>| async move {
                let n = match call {
                    AppCall::Start { .. } => 0,
                    AppCall::Action { state, .. } => state.n + 1,
                };
                Ok::<_, ToolError>(AppReply::new(json!({"n": n})).state(Tally { n }))
            },
        )
        .expect("valid");
    client
        .register_app(Tool::new("boom"), |_call: AppCall| async {
            if true {
                panic!("secret app panic");
            }
            Ok::<_, ToolError>(AppReply::new(Value::Null))
        })
        .expect("valid");
    client
        .register_app(Tool::new("grumpy"), |call: AppCall| async move {
            if !call.is_start() {
                panic!("secret action panic");
            }
            Ok::<_, ToolError>(AppReply::new(json!({"mood": "fine"})))
        })
        .expect("valid");
    client
        .register_tool(
            Tool::new("echo").params(["text"]).required_params(["text"]),
            |call: Call| async move { Ok::<_, ToolError>(json!({"echo": call.param("text")})) },
        )
        .expect("valid");
    #[derive(serde::Deserialize, atp_registry::schemars::JsonSchema)]
    #[schemars(crate = "atp_registry::schemars")]
    struct Work {
        steps: u32,
    }
    client
        .register_typed_tool_with_call(Tool::new("work"), |args: Work, call: Call| async move {
            for step in 1..=args.steps {
                call.progress(
                    step.into(),
                    Some(args.steps.into()),
                    Some(&format!("step {step}")),
                );
                tokio::task::yield_now().await;
            }
            Ok::<_, ToolError>(json!({"done": args.steps}))
        })
        .expect("valid");
    client
        .register_tool(Tool::new("flood"), |call: Call| async move {
            let sent = (0..5000)
                .filter(|&i| call.progress(f64::from(i), None, None))
                .count();
            Ok::<_, ToolError>(json!({"sent": sent}))
        })
        .expect("valid");
    client
}

fn spawn(client: &ToolKitClient) -> JoinHandle<Result<(), RuntimeError>> {
    let client = client.clone();
    tokio::spawn(async move { client.start().await })
}

async fn stopped(client: &ToolKitClient, runtime: JoinHandle<Result<(), RuntimeError>>) {
    client.stop();
    tokio::time::timeout(WAIT, runtime)
        .await
        .expect("start() returns in time")
        .expect("no panic")
        .expect("stopped cleanly");
}

// ---------------------------------------------------------------------
// A fake ATP server that speaks the Python server's frames.
// ---------------------------------------------------------------------

type ServerWs = WebSocketStream<TcpStream>;

/// What the runtime POSTed: the path and the JSON body.
#[derive(Debug)]
struct Post {
    path: String,
    body: Value,
}

#[derive(Default)]
struct FakeState {
    registrations: AtomicUsize,
    /// `execute_function` never answers (a hung server).
    hang_reports: AtomicBool,
    inbox: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
}

struct Fake {
    base: String,
    posts: mpsc::UnboundedReceiver<Post>,
    sockets: mpsc::UnboundedReceiver<ServerWs>,
    inbox: mpsc::UnboundedSender<String>,
    state: Arc<FakeState>,
    join: JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.join.abort();
    }
}

impl Fake {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let (post_tx, posts) = mpsc::unbounded_channel();
        let (socket_tx, sockets) = mpsc::unbounded_channel();
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        let state = Arc::new(FakeState {
            inbox: Mutex::new(Some(inbox_rx)),
            ..FakeState::default()
        });
        let st = state.clone();
        let join = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (post_tx, socket_tx, st) = (post_tx.clone(), socket_tx.clone(), st.clone());
                tokio::spawn(async move {
                    if is_websocket(&stream).await {
                        if let Ok(ws) = tokio_tungstenite::accept_async(stream).await {
                            let _ = socket_tx.send(ws);
                        }
                    } else {
                        serve_http(stream, &st, &post_tx).await;
                    }
                });
            }
        });
        Self {
            base: format!("http://{addr}"),
            posts,
            sockets,
            inbox,
            state,
            join,
        }
    }

    /// The next POST to a path ending with `suffix` (others are skipped).
    async fn post(&mut self, suffix: &str) -> Value {
        loop {
            let p = tokio::time::timeout(WAIT, self.posts.recv())
                .await
                .unwrap_or_else(|_| panic!("no POST …{suffix} in time"))
                .expect("the fake runs");
            if p.path.trim_end_matches('/').ends_with(suffix) {
                return p.body;
            }
        }
    }

    /// The runtime's next WebSocket, greeted as the Python server does.
    async fn socket(&mut self) -> ServerWs {
        let mut ws = tokio::time::timeout(WAIT, self.sockets.recv())
            .await
            .expect("the runtime connects in time")
            .expect("the fake runs");
        send(
            &mut ws,
            json!({"message_type": "atp_client_connected", "payload": {"message": "hi"}}),
        )
        .await;
        ws
    }
}

/// Whether a new connection is a WebSocket handshake (`GET /ws/…`).
async fn is_websocket(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 8];
    for _ in 0..2000 {
        match stream.peek(&mut probe).await {
            Ok(n) if n >= probe.len() => return &probe == b"GET /ws/",
            Ok(0) | Err(_) => return false,
            // Part of the request line: the rest is on its way.
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    false
}

/// One HTTP/1.1 request, answered as the Python server would, and closed.
async fn serve_http(mut stream: TcpStream, state: &FakeState, posts: &mpsc::UnboundedSender<Post>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match tokio::time::timeout(WAIT, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut words = head.split_whitespace();
    let (method, path) = (
        words.next().unwrap_or_default().to_owned(),
        words.next().unwrap_or_default().to_owned(),
    );
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())
                .flatten()
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match tokio::time::timeout(WAIT, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
    let body: Value =
        serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(Value::Null);
    let route = path.trim_end_matches('/').to_owned();
    let answer: Option<Value> = if method == "GET" && route.ends_with("/inbox") {
        let mut inbox = state.inbox.lock().await;
        let entry = match inbox.as_mut() {
            Some(rx) => tokio::time::timeout(Duration::from_millis(200), rx.recv())
                .await
                .ok()
                .flatten(),
            None => None,
        };
        drop(inbox);
        let text = entry.unwrap_or_default();
        respond(&mut stream, 200, &text).await;
        return;
    } else if route.ends_with("/verify_hash") || route.ends_with("/verify_tool_hash") {
        Some(json!({"up_to_date": false}))
    } else if route.ends_with("/register_tool") {
        let n = state.registrations.fetch_add(1, Ordering::SeqCst) + 1;
        let function = body["function_id"].as_str().unwrap_or_default();
        Some(
            json!({"status": "registered", "app_name": body["app_name"], "function_id": function,
                    "exchange_token": format!("xt-{function}-{n}")}),
        )
    } else if route.ends_with("/execute_function") {
        if state.hang_reports.load(Ordering::SeqCst) {
            let _ = posts.send(Post { path, body });
            // Never answer; the runtime's own bound ends the call.
            let _ = tokio::time::timeout(WAIT * 3, std::future::pending::<()>()).await;
            return;
        }
        Some(json!({"status": "ok"}))
    } else if route.ends_with("/inbox/respond") {
        Some(json!({"status": "ok"}))
    } else {
        None
    };
    let _ = posts.send(Post { path, body });
    match answer {
        Some(a) => respond(&mut stream, 200, &a.to_string()).await,
        None => respond(&mut stream, 404, r#"{"error":"not found"}"#).await,
    }
}

async fn respond(stream: &mut TcpStream, status: u16, body: &str) {
    let text = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(text.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn send(ws: &mut ServerWs, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// The next JSON text frame from the runtime.
async fn recv(ws: &mut ServerWs) -> Value {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("the socket is open")
            .expect("a frame");
        if let Message::Text(t) = frame {
            return serde_json::from_str(t.as_str()).expect("JSON");
        }
    }
}

fn app_request(id: &str, app: &str, params: Value, token: Option<&str>) -> Value {
    json!({"message_type": "atp_app_request",
           "payload": {"request_id": id, "tool_name": app, "params": params, "auth_token": token}})
}

fn app_action(id: &str, data: Value) -> Value {
    json!({"message_type": "atp_app_action", "payload": {"request_id": id, "action_data": data}})
}

fn app_terminate(id: &str) -> Value {
    json!({"message_type": "atp_app_terminate", "payload": {"request_id": id}})
}

fn tool_request(id: &str, tool: &str, params: Value) -> Value {
    json!({"message_type": "atp_tool_request",
           "payload": {"request_id": id, "tool_name": tool, "params": params}})
}

fn ui(id: &str, result: Value, terminated: bool) -> Value {
    json!({"type": "app_response", "request_id": id, "result": result, "is_error": false,
           "terminated": terminated})
}

/// Asserts an `app_response` error for `id`.
fn assert_app_error(frame: &Value, id: &str, terminated: bool) {
    assert_eq!(frame["type"], "app_response", "{frame}");
    assert_eq!(frame["request_id"], id, "{frame}");
    assert_eq!(frame["is_error"], true, "{frame}");
    assert_eq!(frame["terminated"], terminated, "{frame}");
    assert!(
        frame["result"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{frame}"
    );
    assert!(
        !frame.to_string().contains("secret"),
        "a panic's text leaked: {frame}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_sessions_over_a_websocket_speak_the_python_frames() {
    bounded(Duration::from_secs(60), async {
        let mut fake = Fake::start().await;
        let tk = toolkit(KEY, "parity", &fake.base);
        let runtime = spawn(&tk);
        let mut ws = fake.socket().await;

        // A session: its start params, its state and its token carry over.
        send(&mut ws, app_request("s1", "counter", json!({"start": 2}), Some("tok"))).await;
        assert_eq!(recv(&mut ws).await, ui("s1", json!({"count": 2, "token": "tok"}), false));
        send(&mut ws, app_action("s1", json!({"add": 3}))).await;
        assert_eq!(recv(&mut ws).await, ui("s1", json!({"count": 5, "token": "tok"}), false));
        // An error keeps the session and its state.
        send(&mut ws, app_action("s1", json!({"fail": true}))).await;
        let frame = recv(&mut ws).await;
        assert_app_error(&frame, "s1", false);
        assert_eq!(frame["result"]["error"], "the app refused");
        send(&mut ws, app_action("s1", json!({"add": 1}))).await;
        assert_eq!(recv(&mut ws).await, ui("s1", json!({"count": 6, "token": "tok"}), false));

        // Unknown apps, tools that are not apps, bad start params, unknown
        // sessions: each answered with an error, to its id.
        send(&mut ws, app_request("x1", "nope", json!({}), None)).await;
        assert_app_error(&recv(&mut ws).await, "x1", true);
        send(&mut ws, app_request("x2", "echo", json!({"text": "t"}), None)).await;
        assert_app_error(&recv(&mut ws).await, "x2", true);
        send(&mut ws, app_request("x3", "counter", json!({"nope": 1}), None)).await;
        assert_app_error(&recv(&mut ws).await, "x3", true);
        send(&mut ws, app_action("x4", json!({"add": 1}))).await;
        assert_app_error(&recv(&mut ws).await, "x4", true);
        // A malformed start with an id is answered too.
        send(&mut ws, json!({"message_type": "atp_app_request", "payload": {"request_id": "x5", "params": 7}})).await;
        assert_app_error(&recv(&mut ws).await, "x5", true);

        // A panicking app: an error answer, and the runtime goes on.
        send(&mut ws, app_request("b1", "boom", json!({}), None)).await;
        assert_app_error(&recv(&mut ws).await, "b1", true);
        send(&mut ws, app_request("g1", "grumpy", json!({}), None)).await;
        assert_eq!(recv(&mut ws).await, ui("g1", json!({"mood": "fine"}), false));
        send(&mut ws, app_action("g1", json!({}))).await;
        assert_app_error(&recv(&mut ws).await, "g1", false);
        send(&mut ws, tool_request("t1", "echo", json!({"text": "still here"}))).await;
        let frame = recv(&mut ws).await;
        assert_eq!(
            (frame["type"].as_str(), &frame["result"]),
            (Some("tool_response"), &json!({"echo": "still here"})),
            "{frame}"
        );

        // The typed app's state round-trips through JSON.
        send(&mut ws, app_request("y1", "typed_counter", json!({}), None)).await;
        assert_eq!(recv(&mut ws).await, ui("y1", json!({"n": 0}), false));
        send(&mut ws, app_action("y1", json!({}))).await;
        assert_eq!(recv(&mut ws).await, ui("y1", json!({"n": 1}), false));

        // The app ends its session: later actions find none.
        send(&mut ws, app_action("s1", json!({"add": 1, "stop": true}))).await;
        assert_eq!(recv(&mut ws).await, ui("s1", json!({"count": 7, "token": "tok"}), true));
        send(&mut ws, app_action("s1", json!({"add": 1}))).await;
        assert_app_error(&recv(&mut ws).await, "s1", true);

        // The server ends a session: no answer, and it is gone.
        send(&mut ws, app_request("s2", "counter", json!({}), None)).await;
        assert_eq!(recv(&mut ws).await["terminated"], false);
        send(&mut ws, app_terminate("s2")).await;
        send(&mut ws, app_action("s2", json!({"add": 1}))).await;
        assert_app_error(&recv(&mut ws).await, "s2", true);

        // The connection drops: its sessions end with it.
        send(&mut ws, app_request("s3", "counter", json!({}), None)).await;
        assert_eq!(recv(&mut ws).await["terminated"], false);
        drop(ws);
        let mut ws = fake.socket().await;
        send(&mut ws, app_action("s3", json!({"add": 1}))).await;
        assert_app_error(&recv(&mut ws).await, "s3", true);

        stopped(&tk, runtime).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_reports_progress_before_its_answer_without_waiting() {
    bounded(Duration::from_secs(60), async {
        let mut fake = Fake::start().await;
        let tk = toolkit(KEY, "parity", &fake.base);
        let runtime = spawn(&tk);
        let mut ws = fake.socket().await;

        send(&mut ws, tool_request("w1", "work", json!({"steps": 3}))).await;
        for step in 1..=3 {
            assert_eq!(
                recv(&mut ws).await,
                json!({"type": "tool_progress", "request_id": "w1", "progress": f64::from(step),
                       "total": 3.0, "message": format!("step {step}")})
            );
        }
        let frame = recv(&mut ws).await;
        assert_eq!(
            (
                frame["type"].as_str(),
                frame["request_id"].as_str(),
                &frame["result"]
            ),
            (Some("tool_response"), Some("w1"), &json!({"done": 3})),
            "{frame}"
        );

        // 5000 reports as fast as the tool can make them: the ones that
        // do not fit in the outbox are dropped, the tool never waits, and
        // its answer comes after every report it sent.
        send(&mut ws, tool_request("f1", "flood", json!({}))).await;
        let mut seen = 0;
        let answer = loop {
            let frame = recv(&mut ws).await;
            if frame["type"] == "tool_progress" {
                assert_eq!(frame["request_id"], "f1");
                seen += 1;
            } else {
                break frame;
            }
        };
        assert_eq!(answer["type"], "tool_response", "{answer}");
        assert_eq!(answer["result"]["sent"], seen, "{answer}");
        assert!(seen > 0 && seen <= 5000, "{seen}");

        stopped(&tk, runtime).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_and_tools_over_the_inbox() {
    bounded(Duration::from_secs(60), async {
        let mut fake = Fake::start().await;
        let tk = toolkit(KEY, "parity", &fake.base).with_runtime_options(
            options().transport(Transport::Inbox {
                poll_interval: Duration::from_millis(10),
            }),
        );
        let runtime = spawn(&tk);
        let inbox = fake.inbox.clone();
        let entry = move |v: Value| inbox.send(v.to_string()).expect("queued");
        // The inbox entries of the Python server: fields at the top.
        entry(json!({"message_type": "atp_app_request", "request_id": "s1", "tool_name": "counter",
                     "params": {"start": 1}, "auth_token": "tok"}));
        let r = fake.post("/inbox/respond").await;
        assert_eq!(
            r,
            json!({"request_id": "s1", "response": {"count": 1, "token": "tok"}, "is_error": false, "terminated": false})
        );
        entry(json!({"message_type": "atp_app_action", "request_id": "s1", "action_data": {"add": 2}}));
        let r = fake.post("/inbox/respond").await;
        assert_eq!(r["response"], json!({"count": 3, "token": "tok"}), "{r}");
        entry(json!({"message_type": "atp_app_terminate", "request_id": "s1"}));
        entry(json!({"message_type": "atp_app_action", "request_id": "s1", "action_data": {"add": 2}}));
        let r = fake.post("/inbox/respond").await;
        assert_eq!((&r["request_id"], &r["is_error"], &r["terminated"]), (&json!("s1"), &json!(true), &json!(true)), "{r}");
        assert!(r["response"]["error"].is_string(), "{r}");
        entry(json!({"message_type": "atp_app_request", "request_id": "b1", "tool_name": "boom", "params": {}}));
        let r = fake.post("/inbox/respond").await;
        assert_eq!((&r["request_id"], &r["is_error"]), (&json!("b1"), &json!(true)), "{r}");
        // A tool that reports progress works over the inbox (the reports go
        // nowhere); a bare tool request as before.
        entry(json!({"request_id": "w1", "tool_name": "work", "params": {"steps": 2}}));
        let r = fake.post("/inbox/respond").await;
        assert_eq!((&r["request_id"], &r["response"]), (&json!("w1"), &json!({"done": 2})), "{r}");

        stopped(&tk, runtime).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_registered_while_running_is_announced_and_served() {
    bounded(Duration::from_secs(60), async {
        let mut fake = Fake::start().await;
        let tk = toolkit(KEY, "parity", &fake.base);
        let runtime = spawn(&tk);
        let mut ws = fake.socket().await;
        // What the first announcement said the whole toolkit's hash was.
        let first = fake.post("/register_tool").await;
        let first_hash = first["toolkit_hash"].clone();

        tk.register_tool(Tool::new("late").params(["x"]), |call: Call| async move {
            Ok::<_, ToolError>(json!({"late": call.param("x")}))
        })
        .expect("valid");
        let late = loop {
            let r = fake.post("/register_tool").await;
            if r["function_id"] == "late" {
                break r;
            }
        };
        assert_eq!(late["metadata"]["params"], json!(["x"]), "{late}");
        assert_eq!(late["programming_language"], "Rust");
        assert_ne!(
            late["toolkit_hash"], first_hash,
            "the toolkit hash is updated"
        );

        send(&mut ws, tool_request("l1", "late", json!({"x": 1}))).await;
        let frame = recv(&mut ws).await;
        assert_eq!(
            (frame["request_id"].as_str(), &frame["result"]),
            (Some("l1"), &json!({"late": 1}))
        );

        stopped(&tk, runtime).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_are_reported_with_the_exchange_token_without_delaying_answers() {
    bounded(Duration::from_secs(60), async {
        let mut fake = Fake::start().await;
        let tk = toolkit(KEY, "parity", &fake.base)
            .with_runtime_options(options().report_executions(true));
        let runtime = spawn(&tk);
        let mut ws = fake.socket().await;
        // Every tool is registered, without the up-to-date shortcuts (only
        // a registration issues a token).
        let mut registered = Vec::new();
        while registered.len() < 7 {
            let p = tokio::time::timeout(WAIT, fake.posts.recv())
                .await
                .expect("the announcement in time")
                .expect("the fake runs");
            assert!(!p.path.contains("verify_"), "{p:?}");
            assert!(p.path.ends_with("/register_tool"), "{p:?}");
            registered.push(
                p.body["function_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        assert!(registered.iter().any(|f| f == "echo"), "{registered:?}");
        send(&mut ws, tool_request("e1", "echo", json!({"text": "hi"}))).await;
        assert_eq!(recv(&mut ws).await["result"], json!({"echo": "hi"}));
        let report = fake.post("/execute_function").await;
        assert_eq!(report["function_id"], "echo", "{report}");
        assert_eq!(report["result"], json!({"echo": "hi"}), "{report}");
        assert!(
            report["exchange_token"]
                .as_str()
                .is_some_and(|t| t.starts_with("xt-echo-")),
            "{report}"
        );

        // A server that never answers reports: the answers still come.
        fake.state.hang_reports.store(true, Ordering::SeqCst);
        for i in 0..20 {
            let id = format!("h{i}");
            send(&mut ws, tool_request(&id, "echo", json!({"text": i}))).await;
            let frame = recv(&mut ws).await;
            assert_eq!(
                (frame["request_id"].as_str(), &frame["result"]),
                (Some(id.as_str()), &json!({"echo": i}))
            );
        }

        stopped(&tk, runtime).await;
    })
    .await;
}

// ---------------------------------------------------------------------
// End to end through atp-server, driven by raw LLM-side frames.
// ---------------------------------------------------------------------

type LlmWs = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn llm_socket(server: &TestServer) -> LlmWs {
    let (mut ws, _) = connect_async(format!(
        "ws://{}/ws/v1/atp/llm-client/{LLM_KEY}/",
        server.addr
    ))
    .await
    .expect("connect");
    llm_send(&mut ws, json!({"type": "auth", "api_key": LLM_KEY})).await;
    let ok = llm_recv(&mut ws).await;
    assert_eq!(ok["success"], true, "{ok}");
    ws
}

async fn llm_send(ws: &mut LlmWs, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

async fn llm_recv(ws: &mut LlmWs) -> Value {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("the socket is open")
            .expect("a frame");
        if let Message::Text(t) = frame {
            return serde_json::from_str(t.as_str()).expect("JSON");
        }
    }
}

/// Runs an app session through the server from the LLM WebSocket.
async fn session_through_the_server(server: &TestServer, app: &str) {
    let mut llm = llm_socket(server).await;
    llm_send(&mut llm, json!({"type": "app_request", "toolkit_id": app, "request_id": "r1",
                              "payload": {"app": "counter", "parameters": {"start": 2}, "auth_token": "tok"}})).await;
    let started = llm_recv(&mut llm).await;
    assert_eq!(
        (started["type"].as_str(), started["request_id"].as_str()),
        (Some("app_response"), Some("r1")),
        "{started}"
    );
    assert_eq!(
        started["payload"]["ui_content"],
        json!({"count": 2, "token": "tok"}),
        "{started}"
    );
    let session = started["payload"]["session_id"]
        .as_str()
        .expect("a session id")
        .to_owned();

    llm_send(
        &mut llm,
        json!({"type": "app_action", "request_id": "r2",
                              "payload": {"session_id": session, "action_data": {"add": 5}}}),
    )
    .await;
    let acted = llm_recv(&mut llm).await;
    assert_eq!(acted["request_id"], "r2", "{acted}");
    assert_eq!(
        acted["payload"]["ui_content"],
        json!({"count": 7, "token": "tok"}),
        "{acted}"
    );
    assert_eq!(acted["payload"]["terminated"], false, "{acted}");

    // The app's error keeps the session.
    llm_send(
        &mut llm,
        json!({"type": "app_action", "request_id": "r3",
                              "payload": {"session_id": session, "action_data": {"fail": true}}}),
    )
    .await;
    let failed = llm_recv(&mut llm).await;
    assert_eq!(failed["request_id"], "r3", "{failed}");
    assert!(
        failed["payload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("the app refused")),
        "{failed}"
    );

    // The app ends it.
    llm_send(&mut llm, json!({"type": "app_action", "request_id": "r4",
                              "payload": {"session_id": session, "action_data": {"add": 1, "stop": true}}})).await;
    let ended = llm_recv(&mut llm).await;
    assert_eq!(
        ended["payload"]["ui_content"],
        json!({"count": 8, "token": "tok"}),
        "{ended}"
    );
    assert_eq!(ended["payload"]["terminated"], true, "{ended}");
    llm_send(
        &mut llm,
        json!({"type": "app_action", "request_id": "r5",
                              "payload": {"session_id": session, "action_data": {"add": 1}}}),
    )
    .await;
    let gone = llm_recv(&mut llm).await;
    assert!(gone["payload"]["error"].is_string(), "{gone}");

    // The caller ends one.
    llm_send(
        &mut llm,
        json!({"type": "app_request", "toolkit_id": app, "request_id": "r6",
                              "payload": {"app": "counter", "parameters": {}}}),
    )
    .await;
    let other = llm_recv(&mut llm).await;
    let other = other["payload"]["session_id"]
        .as_str()
        .expect("a session id")
        .to_owned();
    llm_send(
        &mut llm,
        json!({"type": "app_terminate", "request_id": "r7", "payload": {"session_id": other}}),
    )
    .await;
    let terminated = llm_recv(&mut llm).await;
    assert_eq!(terminated["payload"]["terminated"], true, "{terminated}");

    // A panicking app is an error answer; the toolkit keeps serving.
    llm_send(
        &mut llm,
        json!({"type": "app_request", "toolkit_id": app, "request_id": "r8",
                              "payload": {"app": "boom", "parameters": {}}}),
    )
    .await;
    let boom = llm_recv(&mut llm).await;
    assert_eq!(boom["request_id"], "r8", "{boom}");
    assert!(boom["payload"]["error"].is_string(), "{boom}");
    assert!(!boom.to_string().contains("secret"), "{boom}");
    llm_send(
        &mut llm,
        json!({"type": "task_request", "request_id": "r9", "toolkit_id": app,
                              "payload": {"function": "echo", "parameters": {"text": "alive"}}}),
    )
    .await;
    let alive = llm_recv(&mut llm).await;
    assert_eq!(
        alive["payload"]["result"],
        json!({"echo": "alive"}),
        "{alive}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_sessions_through_the_server_over_a_websocket_toolkit() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        let tk = toolkit(TK_KEY, "apps_ws", &server.base);
        let runtime = spawn(&tk);
        server.wait_served("apps_ws").await;
        session_through_the_server(&server, "apps_ws").await;
        stopped(&tk, runtime).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_sessions_through_the_server_over_an_inbox_toolkit() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        let tk = toolkit(TK_KEY, "apps_inbox", &server.base).with_runtime_options(
            options().transport(Transport::Inbox {
                poll_interval: Duration::from_millis(20),
            }),
        );
        let runtime = spawn(&tk);
        server.wait_served("apps_inbox").await;
        session_through_the_server(&server, "apps_inbox").await;
        stopped(&tk, runtime).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_streams_to_an_llm_websocket_that_asks() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        let tk = toolkit(TK_KEY, "progress", &server.base);
        let runtime = spawn(&tk);
        server.wait_served("progress").await;
        let mut llm = llm_socket(&server).await;
        llm_send(&mut llm, json!({"type": "task_request", "request_id": "p1", "toolkit_id": "progress",
                                  "stream": true, "payload": {"function": "work", "parameters": {"steps": 3}}})).await;
        for step in 1..=3u32 {
            let m = llm_recv(&mut llm).await;
            assert_eq!((m["type"].as_str(), m["request_id"].as_str()), (Some("task_progress"), Some("p1")), "{m}");
            assert_eq!(m["payload"], json!({"progress": f64::from(step), "total": 3.0, "message": format!("step {step}")}), "{m}");
        }
        let m = llm_recv(&mut llm).await;
        assert_eq!((m["type"].as_str(), &m["payload"]["result"]), (Some("task_response"), &json!({"done": 3})), "{m}");
        // Without "stream": the answer only.
        llm_send(&mut llm, json!({"type": "task_request", "request_id": "p2", "toolkit_id": "progress",
                                  "payload": {"function": "work", "parameters": {"steps": 3}}})).await;
        let m = llm_recv(&mut llm).await;
        assert_eq!((m["type"].as_str(), m["request_id"].as_str()), (Some("task_response"), Some("p2")), "{m}");
        stopped(&tk, runtime).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_registered_after_start_is_callable_through_the_server() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        let tk = toolkit(TK_KEY, "growing", &server.base);
        let runtime = spawn(&tk);
        server.wait_served("growing").await;
        tk.register_tool(
            Tool::new("late").params(["x"]).required_params(["x"]),
            |call: Call| async move { Ok::<_, ToolError>(json!({"late": call.param("x")})) },
        )
        .expect("valid");
        let mut llm = llm_socket(&server).await;
        // The announcement is on its way: ask until the server knows the
        // tool (each ask is a round trip; bounded by WAIT).
        let deadline = tokio::time::Instant::now() + WAIT;
        let answer = loop {
            llm_send(
                &mut llm,
                json!({"type": "task_request", "request_id": "l1", "toolkit_id": "growing",
                                      "payload": {"function": "late", "parameters": {"x": 4}}}),
            )
            .await;
            let m = llm_recv(&mut llm).await;
            if m["payload"]["result"] == json!({"late": 4}) {
                break m;
            }
            assert!(tokio::time::Instant::now() < deadline, "never served: {m}");
        };
        assert_eq!(answer["request_id"], "l1");
        stopped(&tk, runtime).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_ends_start_but_not_while_a_call_runs() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        let tk = toolkit(TK_KEY, "idle", &server.base).with_runtime_options(
            // The idle clock starts with start(): the setup up to the first
            // call must fit in it, even on a loaded machine.
            options().idle_timeout(Duration::from_secs(3)),
        );
        tk.register_tool(Tool::new("slow"), |_call: Call| async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            Ok::<_, ToolError>(json!("slept"))
        })
        .expect("valid");
        let runtime = spawn(&tk);
        server.wait_served("idle").await;
        // A call longer than the idle timeout is answered.
        let mut llm = llm_socket(&server).await;
        llm_send(&mut llm, json!({"type": "task_request", "request_id": "s1", "toolkit_id": "idle",
                                  "payload": {"function": "slow", "parameters": {}}})).await;
        let m = llm_recv(&mut llm).await;
        assert_eq!(m["payload"]["result"], "slept", "{m}");
        // ...and the runtime still serves after it: the call kept it busy.
        llm_send(&mut llm, json!({"type": "task_request", "request_id": "s2", "toolkit_id": "idle",
                                  "payload": {"function": "echo", "parameters": {"text": "after"}}})).await;
        let m = llm_recv(&mut llm).await;
        assert_eq!(m["payload"]["result"], json!({"echo": "after"}), "{m}");
        // Then, idle, start() returns Ok by itself.
        tokio::time::timeout(WAIT, runtime)
            .await
            .expect("start() returned after the idle timeout")
            .expect("no panic")
            .expect("a clean stop");
        assert!(!tk.is_running());
        server.stop().await;
    })
    .await;
}
