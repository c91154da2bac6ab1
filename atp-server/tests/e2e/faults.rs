//! Routing under load and faults: many toolkits and clients at once, a
//! toolkit that disconnects mid-call or never answers, bad messages.

use std::time::{Duration, Instant};

use atp_registry::{llm::LlmProtocol, runtime::Transport};
use atp_server::Config;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{net::TcpStream, task::JoinSet};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};

use crate::common::*;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub(crate) async fn next_json(ws: &mut Ws) -> Value {
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

pub(crate) async fn send(ws: &mut Ws, v: &Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Registers `echo` for `app` under `key` and connects a hand-driven
/// toolkit WebSocket.
pub(crate) async fn raw_toolkit(server: &TestServer, key: &str, app: &str) -> Ws {
    let body = json!({
        "function_id": "echo", "api_key": key, "app_name": app, "code_hash": "h",
        "metadata": {"params": ["text"], "required_params": ["text"], "description": "Echoes."}
    });
    let (status, answer) = http_json(
        "POST",
        &format!("{}/api/v1/register_tool/", server.base),
        &[],
        Some(&body),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (mut ws, _) = connect_async(format!(
        "ws://{}/ws/v1/atp/toolkit-client/{key}/",
        server.addr
    ))
    .await
    .expect("connect");
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["message_type"], "atp_client_connected", "{hello}");
    assert!(
        hello["payload"]["message"]
            .as_str()
            .expect("message")
            .contains(app)
    );
    ws
}

fn echo_call(id: &str, text: &str) -> Value {
    json!({"type": "tool_use", "id": id, "name": "echo", "input": {"text": text}})
}

#[tokio::test]
async fn a_toolkit_that_disconnects_mid_call_gets_its_caller_an_error() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(keyed_config()).await;
        let mut ws = raw_toolkit(&server, TK_KEY, "flaky").await;
        for protocol in [LlmProtocol::WebSocket, LlmProtocol::Http] {
            let llm = server.llm(protocol);
            let call = tokio::spawn(async move {
                llm.call_tool("flaky", &echo_call("t1", "hi"), "anthropic", "")
                    .await
            });
            let request = next_json(&mut ws).await;
            assert_eq!(request["message_type"], "atp_tool_request");
            assert_eq!(request["payload"]["tool_name"], "echo");
            assert_eq!(request["payload"]["params"], json!({"text": "hi"}));
            // Dropped without a close frame, as a crashed process would.
            drop(ws);
            let started = Instant::now();
            let out = call.await.expect("no panic").expect("a result");
            assert_eq!(outputs(&out), ["The toolkit disconnected before answering"]);
            assert!(started.elapsed() < Duration::from_secs(5));
            ws = raw_toolkit(&server, TK_KEY, "flaky").await;
        }
        drop(ws);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_toolkit_that_never_answers_times_out_and_late_answers_are_ignored() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(Config {
            // Also the bound of the second call, which the test answers.
            task_timeout: Duration::from_secs(1),
            ..keyed_config()
        })
        .await;
        let mut ws = raw_toolkit(&server, TK_KEY, "mute").await;
        let llm = server.llm(LlmProtocol::WebSocket);
        let call = {
            let llm = llm.clone();
            tokio::spawn(async move { llm.call_tool("mute", &echo_call("t1", "hi"), "anthropic", "").await })
        };
        let request = next_json(&mut ws).await;
        let out = call.await.expect("no panic").expect("a result");
        assert_eq!(outputs(&out), ["The toolkit did not answer within 1000 ms"]);
        assert_eq!(out[0]["content"][0]["is_error"], true);
        // A late answer is ignored; the next request is answered normally.
        let late = json!({"type": "tool_response", "request_id": request["payload"]["request_id"], "result": "late"});
        send(&mut ws, &late).await;
        let call = tokio::spawn(async move {
            llm.call_tool("mute", &echo_call("t2", "again"), "anthropic", "").await
        });
        let request = next_json(&mut ws).await;
        let answer = json!({"type": "tool_response", "request_id": request["payload"]["request_id"], "result": {"echo": "again"}});
        send(&mut ws, &answer).await;
        let out = call.await.expect("no panic").expect("a result");
        assert_eq!(outputs(&out), [r#"{"echo":"again"}"#]);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_registered_toolkit_that_is_not_connected_fails_at_once() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(keyed_config()).await;
        let body = json!({
            "function_id": "echo", "api_key": TK_KEY, "app_name": "gone",
            "metadata": {"params": ["text"], "required_params": ["text"]}
        });
        let register = format!("{}/api/v1/register_tool", server.base);
        assert_eq!(http_json("POST", &register, &[], Some(&body)).await.0, 200);
        let started = Instant::now();
        let (status, v) = http_json(
            "POST",
            &format!("{}/api/v1/atp/llm-client/process/", server.base),
            &[("authorization", &format!("ApiKey {LLM_KEY}"))],
            Some(
                &json!({"type": "task_request", "toolkit_id": "gone", "request_id": "r1",
                         "payload": {"function": "echo", "parameters": {"text": "x"}}}),
            ),
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(status, 200);
        assert_eq!(v["type"], "task_response");
        assert_eq!(v["request_id"], "r1");
        assert_eq!(v["code"], "toolkit_not_connected");
        assert_eq!(
            v["payload"]["result"],
            json!({"error": "Toolkit gone is not connected"})
        );
        assert_eq!(v["result"]["tool"]["result"], v["payload"]["result"]);
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_toolkits_and_clients_at_once_get_their_own_answers() {
    bounded(Duration::from_secs(90), async {
        const KITS: usize = 5;
        const CLIENTS: usize = 6;
        const CALLS: usize = 12;
        let server = TestServer::start(Config {
            toolkit_api_keys: (0..KITS).map(|i| format!("tk-{i}").into()).collect(),
            ..keyed_config()
        })
        .await;
        let mut toolkits = Vec::new();
        for i in 0..KITS {
            let kit = demo_toolkit(&format!("tk-{i}"), &format!("kit-{i}"), &server.base);
            let transport = if i % 2 == 0 {
                Transport::WebSocket
            } else {
                Transport::Inbox {
                    poll_interval: Duration::from_millis(10),
                }
            };
            toolkits.push((kit.clone(), serve_toolkit(&kit, transport)));
        }
        for i in 0..KITS {
            server.wait_served(&format!("kit-{i}")).await;
        }
        let mut calls = JoinSet::new();
        for c in 0..CLIENTS {
            let protocol = if c % 2 == 0 {
                LlmProtocol::WebSocket
            } else {
                LlmProtocol::Http
            };
            let llm = server.llm(protocol);
            for n in 0..CALLS {
                let llm = llm.clone();
                calls.spawn(async move {
                    let kit = format!("kit-{}", (c + n) % KITS);
                    let text = format!("client{c}-call{n}");
                    // Two calls in one batch, in order.
                    let batch = json!([
                        echo_call("a", &text),
                        echo_call("b", &format!("{text}-bis"))
                    ]);
                    let out = llm
                        .call_tool(&kit, &batch, "anthropic", "")
                        .await
                        .expect("call");
                    let out = outputs(&out);
                    assert_eq!(
                        serde_json::from_str::<Value>(&out[0]).expect("JSON"),
                        json!({"echo": text, "app": kit})
                    );
                    assert_eq!(
                        serde_json::from_str::<Value>(&out[1]).expect("JSON"),
                        json!({"echo": format!("{text}-bis"), "app": kit})
                    );
                });
            }
        }
        while let Some(r) = calls.join_next().await {
            r.expect("every call got its own answer");
        }
        // A slow tool does not hold up other calls to the same toolkit.
        let llm = server.llm(LlmProtocol::WebSocket);
        let slow = {
            let llm = llm.clone();
            tokio::spawn(async move {
                llm.call_tool(
                    "kit-0",
                    &json!({"type": "tool_use", "id": "s", "name": "slow", "input": {"ms": 10000}}),
                    "anthropic",
                    "",
                )
                .await
            })
        };
        let started = Instant::now();
        llm.call_tool("kit-0", &echo_call("e", "quick"), "anthropic", "")
            .await
            .expect("call");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!slow.is_finished());
        slow.abort();
        for (kit, runtime) in toolkits {
            stop_toolkit(&kit, runtime).await;
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn same_request_ids_from_two_clients_never_cross() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(keyed_config()).await;
        let mut toolkit = raw_toolkit(&server, TK_KEY, "shared").await;
        let mut clients = Vec::new();
        for _ in 0..2 {
            let (mut ws, _) = connect_async(format!("ws://{}/ws/v1/atp/llm-client/{LLM_KEY}/", server.addr))
                .await
                .expect("connect");
            send(&mut ws, &json!({"type": "auth", "api_key": LLM_KEY})).await;
            assert_eq!(next_json(&mut ws).await, json!({"type": "auth_response", "success": true}));
            clients.push(ws);
        }
        for (i, ws) in clients.iter_mut().enumerate() {
            let task = json!({"type": "task_request", "toolkit_id": "shared", "request_id": "same-id",
                              "payload": {"function": "echo", "parameters": {"text": format!("client {i}")}, "tool_call_id": format!("call-{i}")}});
            send(ws, &task).await;
        }
        // The toolkit answers in reverse order.
        let first = next_json(&mut toolkit).await;
        let second = next_json(&mut toolkit).await;
        assert_ne!(first["payload"]["request_id"], second["payload"]["request_id"]);
        for request in [second, first] {
            let text = request["payload"]["params"]["text"].clone();
            send(&mut toolkit, &json!({"type": "tool_response", "request_id": request["payload"]["request_id"], "result": {"echo": text}})).await;
        }
        for (i, ws) in clients.iter_mut().enumerate() {
            let answer = next_json(ws).await;
            assert_eq!(answer["type"], "task_response");
            assert_eq!(answer["request_id"], "same-id");
            assert_eq!(answer["payload"]["result"], json!({"echo": format!("client {i}")}));
            assert_eq!(answer["payload"]["tool_call_id"], format!("call-{i}"));
            assert_eq!(answer["result"]["tool"], json!({"name": "echo", "result": {"echo": format!("client {i}")}}));
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn bad_messages_get_clear_answers() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(keyed_config()).await;
        let mut ws_toolkit = raw_toolkit(&server, TK_KEY, "kit").await;
        let (mut ws, _) = connect_async(format!("ws://{}/ws/v1/atp/llm-client/{LLM_KEY}/", server.addr))
            .await
            .expect("connect");
        send(&mut ws, &json!({"type": "get_toolkit_context", "toolkit_id": "kit", "request_id": "r0"})).await;
        let a = next_json(&mut ws).await;
        assert_eq!((a["type"].as_str(), a["code"].as_str(), a["request_id"].as_str()), (Some("toolkit_context"), Some("not_authenticated"), Some("r0")));
        send(&mut ws, &json!({"type": "auth", "api_key": LLM_KEY})).await;
        assert_eq!(next_json(&mut ws).await["success"], true);
        ws.send(Message::text("not json")).await.expect("send");
        let a = next_json(&mut ws).await;
        assert_eq!((a["type"].as_str(), a["code"].as_str()), (Some("error"), Some("invalid_message")));
        send(&mut ws, &json!({"type": "weird", "request_id": "r1"})).await;
        let a = next_json(&mut ws).await;
        assert_eq!((a["code"].as_str(), a["request_id"].as_str()), (Some("unknown_message_type"), Some("r1")));
        for (task, code) in [
            (json!({"type": "task_request", "request_id": "r2", "toolkit_id": "kit"}), "invalid_message"),
            (json!({"type": "task_request", "request_id": "r3", "toolkit_id": "nope", "payload": {"function": "echo"}}), "toolkit_not_found"),
            (json!({"type": "task_request", "request_id": "r4", "toolkit_id": "kit", "payload": {"function": "echo", "parameters": [1]}}), "invalid_params"),
            (json!({"type": "task_request", "request_id": "r5", "toolkit_id": "kit", "payload": {"function": "echo", "parameters": "{not json"}}), "invalid_params"),
            (json!({"type": "task_request", "request_id": "r6", "payload": {"function": "echo"}}), "invalid_message"),
        ] {
            send(&mut ws, &task).await;
            let a = next_json(&mut ws).await;
            assert_eq!(a["type"], "task_response", "{a}");
            assert_eq!(a["request_id"], task["request_id"]);
            assert_eq!(a["code"], code, "{a}");
            assert!(a["payload"]["result"]["error"].is_string());
        }
        send(&mut ws, &json!({"type": "get_toolkit_context", "request_id": "r7", "toolkit_id": "kit", "provider": "gemini"})).await;
        let a = next_json(&mut ws).await;
        assert_eq!((a["status"].as_str(), a["code"].as_str()), (Some("error"), Some("unknown_provider")));
        // The toolkit side answers nonsense with an error message, and keeps going.
        ws_toolkit.send(Message::text("{]")).await.expect("send");
        assert_eq!(next_json(&mut ws_toolkit).await["message_type"], "error");

        let process = format!("{}/api/v1/atp/llm-client/process/", server.base);
        let auth = format!("ApiKey {LLM_KEY}");
        let headers = [("authorization", auth.as_str())];
        let (status, _, body) = http("POST", &process, &headers, Some("[1]")).await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("invalid_body"));
        let (status, a) = http_json("POST", &process, &headers, Some(&json!({"toolkit_id": "kit"}))).await;
        assert_eq!((status, a["code"].as_str()), (400, Some("invalid_message")));
        let (status, a) = http_json("POST", &process, &headers, Some(&json!({"type": "get_toolkit_context", "toolkit_id": "nope"}))).await;
        assert_eq!((status, a["code"].as_str(), a["type"].as_str()), (404, Some("toolkit_not_found"), Some("toolkit_context")));
        let (status, a) = http_json("GET", &format!("{}/nowhere", server.base), &[], None).await;
        assert_eq!((status, a["code"].as_str()), (404, Some("not_found")));
        let (status, a) = http_json("GET", &process, &headers, None).await;
        assert_eq!((status, a["code"].as_str()), (405, Some("method_not_allowed")));
        let (status, a) = http_json("GET", &format!("{}/ws/v1/atp/llm-client/{LLM_KEY}/", server.base), &[], None).await;
        assert_eq!((status, a["code"].as_str()), (400, Some("websocket_required")));
        let (status, a) = http_json("GET", &format!("{}/health", server.base), &[], None).await;
        assert_eq!((status, a), (200, json!({"status": "ok"})));
        server.stop().await;
    })
    .await;
}

/// A toolkit's `tool_response` says whether it failed with `is_error`
/// (what a Rust toolkit sends): the server trusts it, so `{"error": …}`
/// can be data, and passes on the failure's code. Without the flag (the
/// Python toolkit), a result of exactly `{"error": MESSAGE}` is a failure.
#[tokio::test]
async fn the_error_flag_decides_and_the_legacy_rule_stays() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(keyed_config()).await;
        let mut toolkit = raw_toolkit(&server, TK_KEY, "flagged").await;
        for (answer, status, code, result) in [
            // Python toolkit: no flag, the legacy rule.
            (json!({"result": {"error": "boom"}}), "failed", Some("tool_error"), json!({"error": "boom"})),
            (json!({"result": {"error": "boom", "detail": 1}}), "success", None, json!({"error": "boom", "detail": 1})),
            // Rust toolkit: the flag decides.
            (json!({"result": {"error": "data"}, "is_error": false}), "success", None, json!({"error": "data"})),
            (
                json!({"result": {"error": "Missing required parameters: text"}, "is_error": true, "code": "missing_params"}),
                "failed",
                Some("missing_params"),
                json!({"error": "Missing required parameters: text"}),
            ),
        ] {
            let base = server.base.clone();
            let caller = tokio::spawn(async move {
                let task = json!({"type": "task_request", "toolkit_id": "flagged", "request_id": "f1",
                                  "payload": {"function": "echo", "parameters": {"text": "x"}}});
                http_json(
                    "POST",
                    &format!("{base}/api/v1/atp/llm-client/process/"),
                    &[("Authorization", &format!("ApiKey {LLM_KEY}"))],
                    Some(&task),
                )
                .await
            });
            let request = next_json(&mut toolkit).await;
            let mut reply = answer.clone();
            reply["type"] = json!("tool_response");
            reply["request_id"] = request["payload"]["request_id"].clone();
            send(&mut toolkit, &reply).await;
            let (http_status, a) = caller.await.expect("join");
            assert_eq!(http_status, 200, "{a}");
            assert_eq!(a["status"], status, "{answer} -> {a}");
            assert_eq!(a["code"].as_str(), code, "{answer} -> {a}");
            assert_eq!(a["payload"]["result"], result, "{answer} -> {a}");
        }
        server.stop().await;
    })
    .await;
}

/// A client that sends a whole head and then stalls its body is answered
/// 408 `request_timeout` once the header read timeout has passed, instead
/// of holding the connection (and its task) for ever.
#[tokio::test]
async fn a_stalled_body_is_answered_408_in_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(Config {
            header_read_timeout: Duration::from_millis(500),
            ..keyed_config()
        })
        .await;
        let mut conn = TcpStream::connect(server.addr).await.expect("connect");
        let head = format!(
            "POST /api/v1/atp/llm-client/process/ HTTP/1.1\r\nHost: x\r\nAuthorization: ApiKey {LLM_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"type\": "
        );
        conn.write_all(head.as_bytes()).await.expect("write");
        let started = Instant::now();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(WAIT, conn.read_to_end(&mut answer)).await;
        let waited = started.elapsed();
        assert!(read.is_ok(), "the connection was held past {WAIT:?}");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("request_timeout"), "{text}");
        assert!(
            waited >= Duration::from_millis(400) && waited < Duration::from_secs(5),
            "answered after {waited:?}"
        );
        server.stop().await;
    })
    .await;
}
