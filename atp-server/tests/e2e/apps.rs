//! Interactive app sessions (docs/PROTOCOL.md §9) over real sockets: a toolkit
//! that speaks the Python toolkit's frames exactly (hand-driven over
//! tokio-tungstenite, or over the HTTP inbox), driven from the LLM side
//! over its WebSocket and over `POST process/`.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use atp_server::Config;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};

use crate::common::*;

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub(crate) const OTHER_LLM_KEY: &str = "llm-other-key";

/// The next JSON text frame (within [`WAIT`]).
pub(crate) async fn recv_json(ws: &mut Ws) -> Value {
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

pub(crate) async fn send_json(ws: &mut Ws, v: &Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Registers tool (or app) `tool` of toolkit `app` under `key`, as the
/// Python toolkit does.
pub(crate) async fn register(server: &TestServer, key: &str, app: &str, tool: &str) {
    register_params(server, key, app, tool, &[]).await;
}

/// [`register`], with the tool's (optional) params.
pub(crate) async fn register_params(
    server: &TestServer,
    key: &str,
    app: &str,
    tool: &str,
    params: &[&str],
) {
    let body = json!({
        "function_id": tool, "api_key": key, "app_name": app, "code_hash": "h",
        "metadata": {"params": params, "required_params": [], "description": "A tool or an app."}
    });
    let (status, answer) = http_json(
        "POST",
        &format!("{}/api/v1/register_tool/", server.base),
        &[],
        Some(&body),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
}

/// A toolkit WebSocket, past the server's greeting.
pub(crate) async fn toolkit_ws(server: &TestServer, key: &str) -> Ws {
    let (mut ws, _) = connect_async(format!(
        "ws://{}/ws/v1/atp/toolkit-client/{key}/",
        server.addr
    ))
    .await
    .expect("connect");
    let hello = recv_json(&mut ws).await;
    assert_eq!(hello["message_type"], "atp_client_connected", "{hello}");
    ws
}

/// An authenticated LLM-client WebSocket.
pub(crate) async fn llm_ws(server: &TestServer, key: &str) -> Ws {
    let (mut ws, _) = connect_async(format!("ws://{}/ws/v1/atp/llm-client/{key}/", server.addr))
        .await
        .expect("connect");
    send_json(&mut ws, &json!({"type": "auth", "api_key": key})).await;
    assert_eq!(recv_json(&mut ws).await["success"], true);
    ws
}

/// `POST process/` as the Python client sends it.
pub(crate) async fn process(server: &TestServer, key: &str, body: &Value) -> (u16, Value) {
    let auth = format!("ApiKey {key}");
    http_json(
        "POST",
        &format!("{}/api/v1/atp/llm-client/process/", server.base),
        &[("authorization", auth.as_str())],
        Some(body),
    )
    .await
}

/// A config with a second LLM key.
pub(crate) fn two_llm_keys() -> Config {
    let mut config = keyed_config();
    config.llm_api_keys.push(OTHER_LLM_KEY.into());
    config
}

/// A toolkit on a WebSocket that behaves as the Python toolkit's
/// `on_message` does, with a `counter` app and a `work` tool; every
/// message it gets from the server is passed to `seen`.
///
/// The app: start `{"start": N}` → UI `{"count": N}`; actions `{"add": K}`
/// → `{"count"}`; `{"fail": true}` → `{"error": …}` (the session stays);
/// `{"hang": true}` → no answer; `{"stop": true}` → the UI with
/// `"terminated": true` (what a Rust toolkit adds); `start` with
/// `{"fail_start": true}` → `{"error": …}`. Unknown apps and sessions get
/// no answer at all, as in Python. The tool `work {"steps": N}` reports
/// progress N times, then answers.
pub(crate) struct ScriptedToolkit {
    pub seen: mpsc::UnboundedReceiver<Value>,
    kill: Option<oneshot::Sender<()>>,
    join: JoinHandle<()>,
}

impl ScriptedToolkit {
    pub async fn start(server: &TestServer, key: &str) -> Self {
        let mut ws = toolkit_ws(server, key).await;
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (kill, mut killed) = oneshot::channel::<()>();
        let join = tokio::spawn(async move {
            let mut sessions: HashMap<String, i64> = HashMap::new();
            loop {
                let frame = tokio::select! {
                    _ = &mut killed => return, // drops the socket, no close frame
                    f = ws.next() => f,
                };
                let Some(Ok(Message::Text(text))) = frame else {
                    if frame.is_none() || matches!(frame, Some(Err(_))) {
                        return;
                    }
                    continue;
                };
                let data: Value = serde_json::from_str(text.as_str()).expect("JSON");
                let _ = seen_tx.send(data.clone());
                for reply in python_on_message(&mut sessions, &data) {
                    if ws.send(Message::text(reply.to_string())).await.is_err() {
                        return;
                    }
                }
            }
        });
        Self {
            seen,
            kill: Some(kill),
            join,
        }
    }

    /// The next message the toolkit got with this `message_type`.
    pub async fn next_seen(&mut self, message_type: &str) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.seen.recv())
                .await
                .expect("the toolkit got a message in time")
                .expect("the toolkit runs");
            if m["message_type"] == message_type {
                return m;
            }
        }
    }

    /// Drops the socket at once (a killed process).
    pub async fn kill(mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        tokio::time::timeout(WAIT, self.join)
            .await
            .expect("the toolkit stops")
            .expect("no panic");
    }
}

/// The Python toolkit's `on_message`, for the frames the tests use: what
/// it sends back.
fn python_on_message(sessions: &mut HashMap<String, i64>, data: &Value) -> Vec<Value> {
    let payload = &data["payload"];
    let request_id = payload["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let app_response =
        |result: Value| json!({"type": "app_response", "request_id": request_id, "result": result});
    match data["message_type"].as_str() {
        Some("atp_app_request") if payload["tool_name"] == "counter" => {
            let params = &payload["params"];
            if params["fail_start"] == true {
                return vec![app_response(
                    json!({"error": "App initialization failed: boom"}),
                )];
            }
            let count = params["start"].as_i64().unwrap_or(0);
            sessions.insert(request_id.clone(), count);
            vec![app_response(
                json!({"count": count, "token": payload["auth_token"]}),
            )]
        }
        Some("atp_app_action") => {
            let Some(count) = sessions.get_mut(&request_id) else {
                return vec![]; // "Received action for unknown session ID"
            };
            let action = &payload["action_data"];
            if action["hang"] == true {
                return vec![];
            }
            if action["fail"] == true {
                return vec![app_response(
                    json!({"error": "App action processing failed: boom"}),
                )];
            }
            *count += action["add"].as_i64().unwrap_or(0);
            let ui = json!({"count": *count});
            if action["stop"] == true {
                sessions.remove(&request_id);
                let mut r = app_response(ui);
                r["terminated"] = json!(true);
                return vec![r];
            }
            vec![app_response(ui)]
        }
        Some("atp_app_terminate") => {
            sessions.remove(&request_id);
            vec![]
        }
        Some("atp_tool_request") if payload["tool_name"] == "work" => {
            let steps = payload["params"]["steps"].as_u64().unwrap_or(0);
            let mut out: Vec<Value> = (1..=steps)
                .map(|i| {
                    json!({"type": "tool_progress", "request_id": request_id,
                           "progress": i, "total": steps, "message": format!("step {i}")})
                })
                .collect();
            out.push(json!({"type": "tool_response", "request_id": request_id,
                            "result": {"done": steps}}));
            out
        }
        _ => vec![],
    }
}

async fn next_seen(seen: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(WAIT, seen.recv())
        .await
        .expect("an entry in time")
        .expect("the poller runs")
}

pub(crate) fn app_request(request_id: &str, toolkit: &str, app: &str, parameters: Value) -> Value {
    json!({"type": "app_request", "toolkit_id": toolkit, "request_id": request_id,
           "payload": {"app": app, "parameters": parameters}})
}

pub(crate) fn app_action(request_id: &str, session_id: &str, action_data: Value) -> Value {
    json!({"type": "app_action", "request_id": request_id,
           "payload": {"session_id": session_id, "action_data": action_data}})
}

pub(crate) fn app_terminate(request_id: &str, session_id: &str) -> Value {
    json!({"type": "app_terminate", "request_id": request_id,
           "payload": {"session_id": session_id}})
}

/// The `app_response` to `message` on an LLM WebSocket (the next message
/// there).
async fn ws_call(ws: &mut Ws, message: &Value) -> Value {
    send_json(ws, message).await;
    let a = recv_json(ws).await;
    assert_eq!(a["type"], "app_response", "{a}");
    assert_eq!(a["request_id"], message["request_id"], "{a}");
    a
}

/// The `app_response` to `message` over `POST process/` (always 200).
async fn http_call(server: &TestServer, key: &str, message: &Value) -> Value {
    let (status, a) = process(server, key, message).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["type"], "app_response", "{a}");
    assert_eq!(a["request_id"], message["request_id"], "{a}");
    a
}

/// A frame from the server without its trace context, which it must
/// have: the server traces each app start and action (docs/OPERATIONS.md,
/// "Traces").
fn traced(frame: &Value) -> Value {
    let mut frame = frame.clone();
    let fields = frame.as_object_mut().expect("an object");
    let parent = fields.remove("traceparent");
    let parent = parent.as_ref().and_then(Value::as_str).unwrap_or_default();
    assert!(
        parent.len() == 55 && parent.starts_with("00-"),
        "a W3C traceparent: {parent:?}"
    );
    fields.remove("tracestate");
    frame
}

pub(crate) fn code(a: &Value) -> &str {
    a["payload"]["code"].as_str().unwrap_or("(none)")
}

#[tokio::test]
async fn a_python_style_toolkit_runs_a_whole_session_over_websocket_and_http() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(Config {
            admin_api_keys: vec![ADMIN_KEY.into()],
            audit_payloads: vec!["kit".into()],
            ..keyed_config()
        })
        .await;
        register(&server, TK_KEY, "kit", "counter").await;
        let mut tk = ScriptedToolkit::start(&server, TK_KEY).await;
        server.wait_served("kit").await;
        let mut llm = llm_ws(&server, LLM_KEY).await;

        // Start over the WebSocket, with an auth token.
        let mut start = app_request("r1", "kit", "counter", json!({"start": 5}));
        start["payload"]["auth_token"] = json!("user-token");
        let a = ws_call(&mut llm, &start).await;
        let session = a["payload"]["session_id"]
            .as_str()
            .expect("a session id")
            .to_owned();
        assert_eq!(
            a["payload"]["ui_content"],
            json!({"count": 5, "token": "user-token"})
        );
        assert!(a["payload"].get("error").is_none(), "{a}");
        // The toolkit got exactly the Python toolkit's frame, with the
        // session id (not the LLM's request id) as its request_id.
        let got = tk.next_seen("atp_app_request").await;
        assert_eq!(
            traced(&got["payload"]),
            json!({"request_id": session, "tool_name": "counter",
                   "params": {"start": 5}, "auth_token": "user-token"})
        );
        assert!(session.len() >= 32, "an unguessable id: {session}");

        // Actions over the WebSocket and over HTTP (same key, same session).
        let a = ws_call(&mut llm, &app_action("r2", &session, json!({"add": 2}))).await;
        assert_eq!(
            a["payload"],
            json!({"session_id": session, "ui_content": {"count": 7}, "terminated": false})
        );
        let got = tk.next_seen("atp_app_action").await;
        assert_eq!(
            traced(&got["payload"]),
            json!({"request_id": session, "action_data": {"add": 2}})
        );
        let a = http_call(
            &server,
            LLM_KEY,
            &app_action("r3", &session, json!({"add": 3})),
        )
        .await;
        assert_eq!(a["payload"]["ui_content"], json!({"count": 10}));
        assert_eq!(a["payload"]["terminated"], false);

        // The app's error is an app_error, and the session goes on.
        let a = ws_call(&mut llm, &app_action("r4", &session, json!({"fail": true}))).await;
        assert_eq!(code(&a), "app_error", "{a}");
        assert!(
            a["payload"]["error"]
                .as_str()
                .expect("message")
                .contains("boom")
        );
        let a = ws_call(&mut llm, &app_action("r5", &session, json!({"add": 1}))).await;
        assert_eq!(a["payload"]["ui_content"], json!({"count": 11}));

        // Terminate over HTTP: answered at once (the Python toolkit never
        // answers a terminate), and the toolkit is told.
        let a = http_call(&server, LLM_KEY, &app_terminate("r6", &session)).await;
        assert_eq!(
            a["payload"],
            json!({"session_id": session, "terminated": true})
        );
        let got = tk.next_seen("atp_app_terminate").await;
        assert_eq!(got["payload"], json!({"request_id": session}));
        for a in [
            ws_call(&mut llm, &app_action("r7", &session, json!({"add": 1}))).await,
            http_call(
                &server,
                LLM_KEY,
                &app_action("r8", &session, json!({"add": 1})),
            )
            .await,
            ws_call(&mut llm, &app_terminate("r9", &session)).await,
        ] {
            assert_eq!(code(&a), "session_ended", "{a}");
            assert!(
                a["payload"]["error"]
                    .as_str()
                    .expect("message")
                    .contains("terminated")
            );
        }

        // A session started over HTTP, that the app ends itself.
        let a = http_call(
            &server,
            LLM_KEY,
            &app_request("r10", "kit", "counter", json!({})),
        )
        .await;
        let second = a["payload"]["session_id"]
            .as_str()
            .expect("a session id")
            .to_owned();
        assert_ne!(second, session);
        let a = ws_call(
            &mut llm,
            &app_action("r11", &second, json!({"add": 4, "stop": true})),
        )
        .await;
        assert_eq!(
            a["payload"],
            json!({"session_id": second, "ui_content": {"count": 4}, "terminated": true})
        );
        let a = ws_call(&mut llm, &app_action("r12", &second, json!({"add": 1}))).await;
        assert_eq!(code(&a), "session_ended", "{a}");
        assert!(
            a["payload"]["error"]
                .as_str()
                .expect("message")
                .contains("app ended it")
        );

        // A start the app fails leaves no session.
        let a = ws_call(
            &mut llm,
            &app_request("r13", "kit", "counter", json!({"fail_start": true})),
        )
        .await;
        assert_eq!(code(&a), "app_error", "{a}");
        assert!(a["payload"].get("session_id").is_none(), "{a}");

        // Each start left an audit row, its parameters kept (the toolkit
        // is in audit_payloads), its token not.
        let auth = format!("Bearer {ADMIN_KEY}");
        let (status, _, text) = http(
            "GET",
            &format!("{}/admin/audit?toolkit=kit&tool=counter", server.base),
            &[("authorization", auth.as_str())],
            None,
        )
        .await;
        assert_eq!(status, 200, "{text}");
        assert!(!text.contains("user-token"), "{text}");
        let rows: Value = serde_json::from_str(&text).expect("JSON");
        let rows = rows["rows"].as_array().cloned().unwrap_or_default();
        assert!(
            rows.iter().any(|r| r["outcome"] == "ok"
                && r["via"] == "llm_websocket"
                && r["transport"] == "websocket"
                && r["arguments"] == json!({"start": 5})),
            "{rows:#?}"
        );
        assert!(
            rows.iter()
                .any(|r| r["outcome"] == "error" && r["error_code"] == "app_error"),
            "{rows:#?}"
        );
        // So did each action, over either transport, its action data kept.
        let action = |via: &str, data: Value, outcome: &str| {
            rows.iter().any(|r| {
                r["via"] == via
                    && r["transport"] == "websocket"
                    && r["outcome"] == outcome
                    && r["arguments"] == json!({ "action_data": data })
            })
        };
        assert!(
            action("llm_websocket", json!({"add": 2}), "ok"),
            "{rows:#?}"
        );
        assert!(action("llm_http", json!({"add": 3}), "ok"), "{rows:#?}");
        assert!(
            action("llm_websocket", json!({"fail": true}), "error"),
            "{rows:#?}"
        );
        // An action on a session that is over is refused, and recorded.
        let (status, _, text) = http(
            "GET",
            &format!("{}/admin/audit?outcome=refused", server.base),
            &[("authorization", auth.as_str())],
            None,
        )
        .await;
        assert_eq!(status, 200, "{text}");
        let refused: Value = serde_json::from_str(&text).expect("JSON");
        let ended = refused["rows"].as_array().map_or(0, |r| {
            r.iter()
                .filter(|r| r["error_code"] == "session_ended")
                .count()
        });
        assert_eq!(ended, 3, "r7, r8 and r12: {refused:#}");
        server.stop().await;
    })
    .await;
}

const ADMIN_KEY: &str = "apps-admin-key-0123456789";

#[tokio::test]
async fn an_inbox_toolkit_runs_a_session() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        register(&server, TK_KEY, "inboxkit", "counter").await;
        register_params(&server, TK_KEY, "inboxkit", "echo", &["text"]).await;
        let inbox = format!("{}/api/v1/toolkit/{TK_KEY}/inbox?wait=10", server.base);
        let respond = format!("{}/api/v1/toolkit/{TK_KEY}/inbox/respond/", server.base);
        // The Python toolkit's HTTP side: `_handle_app_request_http`,
        // `_handle_app_action_http`, `_handle_app_terminate_http`, answering
        // through `_send_tool_result_inbox`.
        let (seen_tx, mut seen) = mpsc::unbounded_channel::<Value>();
        let poller = tokio::spawn(async move {
            let mut sessions: HashMap<String, i64> = HashMap::new();
            loop {
                let (status, req) = http_json("GET", &inbox, &[], None).await;
                assert_eq!(status, 200, "{req}");
                if req == json!({}) {
                    continue;
                }
                let _ = seen_tx.send(req.clone());
                let request_id = req["request_id"].as_str().expect("request_id").to_owned();
                let response = match req.get("message_type").and_then(Value::as_str) {
                    Some("atp_app_request") => {
                        let count = req["params"]["start"].as_i64().unwrap_or(0);
                        sessions.insert(request_id.clone(), count);
                        Some(json!({"count": count}))
                    }
                    Some("atp_app_action") => sessions.get_mut(&request_id).map(|count| {
                        *count += req["action_data"]["add"].as_i64().unwrap_or(0);
                        json!({"count": *count})
                    }),
                    Some("atp_app_terminate") => {
                        sessions.remove(&request_id);
                        None
                    }
                    // A tool request: no message_type, as always.
                    None => Some(json!({"echo": req["params"]["text"]})),
                    Some(other) => panic!("unexpected entry {other}"),
                };
                if let Some(response) = response {
                    let body = json!({"request_id": request_id, "response": response});
                    let (status, a) = http_json("POST", &respond, &[], Some(&body)).await;
                    assert_eq!(status, 200, "{a}");
                }
            }
        });
        server.wait_served("inboxkit").await;

        let a = http_call(
            &server,
            LLM_KEY,
            &app_request("r1", "inboxkit", "counter", json!({"start": 1})),
        )
        .await;
        let session = a["payload"]["session_id"]
            .as_str()
            .expect("a session id")
            .to_owned();
        assert_eq!(a["payload"]["ui_content"], json!({"count": 1}));
        let entry = next_seen(&mut seen).await;
        assert_eq!(
            traced(&entry),
            json!({"message_type": "atp_app_request", "request_id": session,
                   "tool_name": "counter", "params": {"start": 1}, "auth_token": null})
        );
        let mut llm = llm_ws(&server, LLM_KEY).await;
        for (i, expected) in [3, 6, 10].into_iter().enumerate() {
            let rid = format!("a{i}");
            let a = ws_call(&mut llm, &app_action(&rid, &session, json!({"add": i + 2}))).await;
            assert_eq!(
                a["payload"]["ui_content"],
                json!({"count": expected}),
                "{a}"
            );
            let entry = next_seen(&mut seen).await;
            assert_eq!(
                traced(&entry),
                json!({"message_type": "atp_app_action", "request_id": session,
                       "action_data": {"add": i + 2}})
            );
        }
        // Tool requests keep their old entries.
        let (status, a) = process(
            &server,
            LLM_KEY,
            &json!({"type": "task_request", "request_id": "t1", "toolkit_id": "inboxkit",
                    "payload": {"function": "echo", "parameters": {"text": "hi"}}}),
        )
        .await;
        assert_eq!(
            (status, &a["payload"]["result"]),
            (200, &json!({"echo": "hi"})),
            "{a}"
        );
        let entry = next_seen(&mut seen).await;
        assert!(entry.get("message_type").is_none(), "{entry}");
        assert_eq!(entry["tool_name"], "echo");

        let a = ws_call(&mut llm, &app_terminate("r9", &session)).await;
        assert_eq!(a["payload"]["terminated"], true);
        let entry = next_seen(&mut seen).await;
        assert_eq!(
            entry,
            json!({"message_type": "atp_app_terminate", "request_id": session})
        );
        let a = http_call(
            &server,
            LLM_KEY,
            &app_action("r10", &session, json!({"add": 1})),
        )
        .await;
        assert_eq!(code(&a), "session_ended", "{a}");
        poller.abort();
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_toolkit_killed_mid_session_fails_the_pending_action_at_once_and_ends_the_session() {
    bounded(Duration::from_secs(60), async {
        // The task timeout is long: the pending action must not wait for it.
        let mut config = keyed_config();
        config.task_timeout = Duration::from_secs(60);
        let server = TestServer::start(config).await;
        register(&server, TK_KEY, "kit", "counter").await;
        let mut tk = ScriptedToolkit::start(&server, TK_KEY).await;
        server.wait_served("kit").await;
        for over_http in [false, true] {
            let mut llm = llm_ws(&server, LLM_KEY).await;
            let a = ws_call(&mut llm, &app_request("r1", "kit", "counter", json!({}))).await;
            let session = a["payload"]["session_id"]
                .as_str()
                .expect("session")
                .to_owned();
            let hang = app_action("r2", &session, json!({"hang": true}));
            let pending = if over_http {
                let s = (server.base.clone(), hang.clone());
                tokio::spawn(async move {
                    let auth = format!("ApiKey {LLM_KEY}");
                    let (status, a) = http_json(
                        "POST",
                        &format!("{}/api/v1/atp/llm-client/process/", s.0),
                        &[("authorization", auth.as_str())],
                        Some(&s.1),
                    )
                    .await;
                    assert_eq!(status, 200);
                    a
                })
            } else {
                send_json(&mut llm, &hang).await;
                tokio::spawn(async move { recv_json(&mut llm).await })
            };
            tk.next_seen("atp_app_action").await;
            let killed = Instant::now();
            tk.kill().await;
            let a = pending.await.expect("join");
            assert!(
                killed.elapsed() < Duration::from_secs(10),
                "answered when the toolkit went, not at the timeout"
            );
            assert_eq!(
                (a["type"].as_str(), code(&a)),
                (Some("app_response"), "toolkit_disconnected"),
                "{a}"
            );
            assert_eq!(a["request_id"], "r2");
            let a = http_call(
                &server,
                LLM_KEY,
                &app_action("r3", &session, json!({"add": 1})),
            )
            .await;
            assert_eq!(code(&a), "session_ended", "{a}");
            assert!(
                a["payload"]["error"]
                    .as_str()
                    .expect("message")
                    .contains("disconnected"),
                "{a}"
            );
            // A new toolkit does not bring the session back.
            tk = ScriptedToolkit::start(&server, TK_KEY).await;
            server.wait_served("kit").await;
            let a = http_call(
                &server,
                LLM_KEY,
                &app_action("r4", &session, json!({"add": 1})),
            )
            .await;
            assert_eq!(code(&a), "session_ended", "{a}");
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_session_belongs_to_the_llm_key_that_started_it() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(two_llm_keys()).await;
        register(&server, TK_KEY, "kit", "counter").await;
        let _tk = ScriptedToolkit::start(&server, TK_KEY).await;
        server.wait_served("kit").await;
        let a = http_call(
            &server,
            LLM_KEY,
            &app_request("r1", "kit", "counter", json!({})),
        )
        .await;
        let session = a["payload"]["session_id"]
            .as_str()
            .expect("session")
            .to_owned();
        let mut other = llm_ws(&server, OTHER_LLM_KEY).await;
        let a = ws_call(&mut other, &app_action("x1", &session, json!({"add": 1}))).await;
        assert_eq!(code(&a), "session_not_found", "{a}");
        assert!(a["payload"].get("ui_content").is_none());
        let a = http_call(&server, OTHER_LLM_KEY, &app_terminate("x2", &session)).await;
        assert_eq!(code(&a), "session_not_found", "{a}");
        // The owner's session is untouched.
        let a = http_call(
            &server,
            LLM_KEY,
            &app_action("r2", &session, json!({"add": 1})),
        )
        .await;
        assert_eq!(a["payload"]["ui_content"], json!({"count": 1}), "{a}");
        // Ended, it is still not the other key's business.
        http_call(&server, LLM_KEY, &app_terminate("r3", &session)).await;
        let a = ws_call(&mut other, &app_action("x3", &session, json!({}))).await;
        assert_eq!(code(&a), "session_not_found", "{a}");
        let a = http_call(&server, LLM_KEY, &app_action("r4", &session, json!({}))).await;
        assert_eq!(code(&a), "session_ended", "{a}");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unknown_toolkits_apps_and_sessions_and_bad_messages_get_clear_codes() {
    bounded(Duration::from_secs(60), async {
        let mut config = keyed_config();
        config.toolkit_api_keys.push("tk-idle-key".into());
        let server = TestServer::start(config).await;
        register(&server, TK_KEY, "kit", "counter").await;
        register(&server, "tk-idle-key", "idle", "counter").await;
        let _tk = ScriptedToolkit::start(&server, TK_KEY).await;
        server.wait_served("kit").await;
        let mut llm = llm_ws(&server, LLM_KEY).await;
        let cases = [
            (
                app_request("c1", "nope", "counter", json!({})),
                "toolkit_not_found",
            ),
            (app_request("c2", "kit", "nope", json!({})), "app_not_found"),
            (
                app_request("c3", "idle", "counter", json!({})),
                "toolkit_not_connected",
            ),
            (
                app_action("c4", "no-such-session", json!({})),
                "session_not_found",
            ),
            (app_terminate("c5", "no-such-session"), "session_not_found"),
        ];
        for (message, expected) in &cases {
            let a = ws_call(&mut llm, message).await;
            assert_eq!(code(&a), *expected, "{a}");
            assert!(a["payload"]["error"].is_string(), "{a}");
            let a = http_call(&server, LLM_KEY, message).await;
            assert_eq!(code(&a), *expected, "{a}");
        }
        // Malformed app messages: an app_response with invalid_message
        // (HTTP 400, as for other unreadable messages).
        for message in [
            json!({"type": "app_action", "request_id": "b1", "payload": {}}),
            json!({"type": "app_request", "request_id": "b2", "toolkit_id": "kit"}),
            json!({"type": "app_terminate", "request_id": "b3"}),
        ] {
            let a = ws_call(&mut llm, &message).await;
            assert_eq!(code(&a), "invalid_message", "{a}");
            let (status, a) = process(&server, LLM_KEY, &message).await;
            assert_eq!(
                (status, a["type"].as_str(), code(&a)),
                (400, Some("app_response"), "invalid_message"),
                "{a}"
            );
            assert_eq!(a["request_id"], message["request_id"]);
        }
        // Before authenticating, an app request is refused as such.
        let (mut fresh, _) = connect_async(format!(
            "ws://{}/ws/v1/atp/llm-client/{LLM_KEY}/",
            server.addr
        ))
        .await
        .expect("connect");
        let a = ws_call(&mut fresh, &app_request("n1", "kit", "counter", json!({}))).await;
        assert_eq!(code(&a), "not_authenticated", "{a}");
        server.stop().await;
    })
    .await;
}

/// A second action while one waits is refused (`session_busy`); an action
/// the toolkit does not answer in time ends the session (the toolkit is
/// told), so its late answer can never pass for a later action's.
#[tokio::test]
async fn a_busy_session_refuses_a_second_action_and_an_unanswered_one_ends_it() {
    bounded(Duration::from_secs(60), async {
        let mut config = keyed_config();
        // Long enough that the second action surely meets the session
        // while the first (unanswered) is still waiting.
        config.task_timeout = Duration::from_secs(3);
        let server = TestServer::start(config).await;
        register(&server, TK_KEY, "kit", "counter").await;
        let mut tk = ScriptedToolkit::start(&server, TK_KEY).await;
        server.wait_served("kit").await;
        let mut llm = llm_ws(&server, LLM_KEY).await;
        let a = ws_call(&mut llm, &app_request("r1", "kit", "counter", json!({}))).await;
        let session = a["payload"]["session_id"]
            .as_str()
            .expect("session")
            .to_owned();
        send_json(
            &mut llm,
            &app_action("slow", &session, json!({"hang": true})),
        )
        .await;
        tk.next_seen("atp_app_action").await;
        let a = http_call(
            &server,
            LLM_KEY,
            &app_action("second", &session, json!({"add": 1})),
        )
        .await;
        assert_eq!(code(&a), "session_busy", "{a}");
        let a = recv_json(&mut llm).await;
        assert_eq!(
            (a["request_id"].as_str(), code(&a)),
            (Some("slow"), "toolkit_timeout"),
            "{a}"
        );
        let got = tk.next_seen("atp_app_terminate").await;
        assert_eq!(got["payload"]["request_id"], session.as_str());
        let a = ws_call(&mut llm, &app_action("later", &session, json!({"add": 1}))).await;
        assert_eq!(code(&a), "session_ended", "{a}");
        assert!(
            a["payload"]["error"]
                .as_str()
                .expect("message")
                .contains("in time"),
            "{a}"
        );
        server.stop().await;
    })
    .await;
}

/// An `app_response` for a session from a socket other than the one the
/// session lives on is ignored.
#[tokio::test]
async fn an_answer_from_another_socket_is_ignored() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        register(&server, TK_KEY, "kit", "counter").await;
        let mut older = toolkit_ws(&server, TK_KEY).await;
        let mut newer = toolkit_ws(&server, TK_KEY).await;
        let start = app_request("r1", "kit", "counter", json!({}));
        let base = server.base.clone();
        let call = tokio::spawn(async move {
            let auth = format!("ApiKey {LLM_KEY}");
            http_json(
                "POST",
                &format!("{base}/api/v1/atp/llm-client/process/"),
                &[("authorization", auth.as_str())],
                Some(&start),
            )
            .await
        });
        // The session goes to the newest socket.
        let got = recv_json(&mut newer).await;
        assert_eq!(got["message_type"], "atp_app_request");
        let session = got["payload"]["request_id"]
            .as_str()
            .expect("id")
            .to_owned();
        send_json(
            &mut older,
            &json!({"type": "app_response", "request_id": session, "result": {"forged": true}}),
        )
        .await;
        // Once the older socket's pong is back, its forged answer has been
        // read (one socket's frames are handled in order).
        send_json(&mut older, &json!({"type": "ping"})).await;
        assert_eq!(recv_json(&mut older).await["message_type"], "pong");
        send_json(
            &mut newer,
            &json!({"type": "app_response", "request_id": session, "result": {"real": true}}),
        )
        .await;
        let (status, a) = tokio::time::timeout(WAIT, call)
            .await
            .expect("in time")
            .expect("join");
        assert_eq!(status, 200);
        assert_eq!(a["payload"]["ui_content"], json!({"real": true}), "{a}");
        assert_eq!(a["payload"]["session_id"], session.as_str());
        server.stop().await;
    })
    .await;
}
