//! WebSocket frames that are binary, oversized, not JSON, not UTF-8 or
//! nested too deep — sent to `atp-server`'s toolkit and LLM sockets, and by
//! a hand-driven fake server to the toolkit runtime. Every tool request
//! with an id is answered exactly once, nothing crashes, and a valid call
//! goes through afterwards.

use std::collections::BTreeMap;

use crate::common::{LLM_KEY, SERVER_LIMIT, TK_KEY, TK_KEY_2, WAIT, server_addr};
use atp_registry::llm::{LlmClient, LlmProtocol};
use atp_reliability::{
    http::request,
    node::{test_runtime_options, test_toolkit},
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{
        Bytes, Message,
        protocol::frame::{
            Frame,
            coding::{Data, OpCode},
        },
    },
};

type ClientWs = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A text frame whose payload is not UTF-8 (which no well-behaved peer
/// sends).
fn invalid_utf8_text() -> Message {
    Message::Frame(Frame::message(
        Bytes::from_static(b"{\"type\": \"\xff\xfe\"}"),
        OpCode::Data(Data::Text),
        true,
    ))
}

fn deep(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// The next text frame as JSON; `None` when the socket closes (or sends a
/// close frame) first. Bounded by [`WAIT`].
async fn next_json<S>(ws: &mut WebSocketStream<S>) -> Option<Value>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame or a close in time");
        match frame {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
            Some(Ok(Message::Text(t))) => {
                return Some(serde_json::from_str(t.as_str()).expect("JSON text"));
            }
            Some(Ok(_)) => {}
        }
    }
}

async fn register(app: &str, tool: &str) {
    let body = json!({
        "function_id": tool, "api_key": TK_KEY, "app_name": app, "code_hash": "h",
        "metadata": {"params": ["text"], "required_params": ["text"], "description": "Echoes."}
    })
    .to_string();
    let r = atp_reliability::http::once(
        server_addr(),
        &request(
            "POST",
            "/api/v1/register_tool/",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        ),
        false,
        WAIT,
    )
    .await
    .expect("register");
    assert_eq!(r.status, 200, "{r:?}");
}

async fn toolkit_socket() -> ClientWs {
    let (mut ws, _) = connect_async(format!(
        "ws://{}/ws/v1/atp/toolkit-client/{TK_KEY}/",
        server_addr()
    ))
    .await
    .expect("connect");
    let hello = next_json(&mut ws).await.expect("a hello");
    assert_eq!(hello["message_type"], "atp_client_connected", "{hello}");
    ws
}

/// A real toolkit and a real LLM client still work through the server.
async fn server_still_routes(key: &str, app: &str) {
    let toolkit = test_toolkit(key, app, &format!("http://{}", server_addr()))
        .with_runtime_options(test_runtime_options());
    let runtime = tokio::spawn({
        let toolkit = toolkit.clone();
        async move { toolkit.start().await }
    });
    let llm = LlmClient::new(LLM_KEY)
        .with_base_url(format!("http://{}", server_addr()))
        .with_protocol(LlmProtocol::WebSocket)
        .with_timeout(WAIT);
    assert!(
        crate::common::server().0.wait_until_served(app, WAIT).await,
        "{app} got connected"
    );
    let call =
        json!({"type": "tool_use", "id": "t1", "name": "echo", "input": {"text": "still here"}});
    let out = llm
        .call_tool(app, &call, "anthropic", "")
        .await
        .expect("an answer");
    assert_eq!(out[0]["content"][0]["content"], r#"{"echo":"still here"}"#);
    toolkit.stop();
    tokio::time::timeout(WAIT, runtime)
        .await
        .expect("stops")
        .expect("no panic")
        .expect("a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_toolkit_socket_answers_bad_frames_and_survives() {
    register("wsabuse", "echo").await;
    let mut ws = toolkit_socket().await;
    for (frame, error) in [
        (
            Message::binary(vec![1u8, 2, 3]),
            "binary frames are not supported",
        ),
        (Message::text("not json"), "messages must be JSON objects"),
        (Message::text("[1, 2]"), "messages must be JSON objects"),
        (Message::text(deep(20_000)), "messages must be JSON objects"),
        (Message::text("{}"), "a message needs a \"type\""),
        (
            Message::text(r#"{"type": "tool_response"}"#),
            "tool_response without a request_id",
        ),
    ] {
        ws.send(frame).await.expect("send");
        let answer = next_json(&mut ws).await.expect("an answer");
        assert_eq!(answer["message_type"], "error", "{answer}");
        assert!(
            answer["payload"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(error),
            "{answer}"
        );
    }
    // An answer to a request nobody made is dropped; the socket lives on.
    ws.send(Message::text(
        r#"{"type": "tool_response", "request_id": "nobody-asked", "result": 1}"#,
    ))
    .await
    .expect("send");
    ws.send(Message::text(r#"{"type": "ping"}"#))
        .await
        .expect("send");
    assert_eq!(
        next_json(&mut ws).await.expect("a pong")["message_type"],
        "pong"
    );
    // Over the message limit: the server closes this socket.
    ws.send(Message::text("x".repeat(SERVER_LIMIT + 1)))
        .await
        .expect("send");
    assert_eq!(
        next_json(&mut ws).await,
        None,
        "an oversized frame closes the socket"
    );
    // A text frame that is not UTF-8: a protocol error, the socket closes.
    let mut ws = toolkit_socket().await;
    let _ = ws.send(invalid_utf8_text()).await;
    assert_eq!(
        next_json(&mut ws).await,
        None,
        "invalid UTF-8 closes the socket"
    );
    server_still_routes(TK_KEY, "wsabuse_after").await;
}

async fn llm_socket() -> ClientWs {
    let (ws, _) = connect_async(format!(
        "ws://{}/ws/v1/atp/llm-client/{LLM_KEY}/",
        server_addr()
    ))
    .await
    .expect("connect");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_llm_socket_answers_bad_frames_and_survives() {
    let mut ws = llm_socket().await;
    // Before authenticating: every message is answered, none is run.
    ws.send(Message::text(
        json!({"type": "task_request", "request_id": "early", "toolkit_id": "x", "payload": {"function": "echo"}})
            .to_string(),
    ))
    .await
    .expect("send");
    let early = next_json(&mut ws).await.expect("an answer");
    assert_eq!(
        (&early["request_id"], &early["code"]),
        (&json!("early"), &json!("not_authenticated")),
        "{early}"
    );
    ws.send(Message::text(
        json!({"type": "auth", "api_key": LLM_KEY}).to_string(),
    ))
    .await
    .expect("send");
    assert_eq!(next_json(&mut ws).await.expect("auth")["success"], true);
    for (frame, code) in [
        (Message::binary(vec![0u8; 10]), "invalid_message"),
        (Message::text("not json"), "invalid_message"),
        (Message::text(deep(20_000)), "invalid_message"),
        (Message::text("{}"), "invalid_message"),
        (
            Message::text(r#"{"type": "bogus"}"#),
            "unknown_message_type",
        ),
    ] {
        ws.send(frame).await.expect("send");
        let answer = next_json(&mut ws).await.expect("an answer");
        assert_eq!(answer["code"], code, "{answer}");
    }
    // A task for a toolkit that does not exist: answered, with its id.
    ws.send(Message::text(
        json!({"type": "task_request", "request_id": "r1", "toolkit_id": "no_such_kit",
               "payload": {"function": "echo", "parameters": {"text": "x"}}})
        .to_string(),
    ))
    .await
    .expect("send");
    let answer = next_json(&mut ws).await.expect("an answer");
    assert_eq!(
        (&answer["request_id"], &answer["status"]),
        (&json!("r1"), &json!("failed")),
        "{answer}"
    );
    ws.send(Message::text("y".repeat(SERVER_LIMIT + 1)))
        .await
        .expect("send");
    assert_eq!(
        next_json(&mut ws).await,
        None,
        "an oversized frame closes the socket"
    );
    let mut ws = llm_socket().await;
    let _ = ws.send(invalid_utf8_text()).await;
    assert_eq!(
        next_json(&mut ws).await,
        None,
        "invalid UTF-8 closes the socket"
    );
    // A wrong key in the auth message: refused and closed.
    let mut ws = llm_socket().await;
    ws.send(Message::text(
        json!({"type": "auth", "api_key": "wrong"}).to_string(),
    ))
    .await
    .expect("send");
    assert_eq!(
        next_json(&mut ws).await.expect("a refusal")["success"],
        false
    );
    assert_eq!(next_json(&mut ws).await, None);
    server_still_routes(TK_KEY_2, "llmabuse_after").await;
}

/// A fake ATP server for the runtime: answers every HTTP request with
/// `{"up_to_date": true}` (so the tools need no announcing) and hands each
/// accepted WebSocket to the test.
async fn fake_server() -> (String, mpsc::UnboundedReceiver<WebSocketStream<TcpStream>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut peek = [0u8; 512];
                let n = stream.peek(&mut peek).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&peek[..n]).to_ascii_lowercase();
                if head.starts_with("get") && head.contains("upgrade") {
                    if let Ok(ws) = tokio_tungstenite::accept_async(stream).await {
                        let _ = tx.send(ws);
                    }
                    return;
                }
                // Read the head and the body, then answer and close.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let body = r#"{"up_to_date": true}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    (base, rx)
}

fn tool_request(id: Value, tool: &str, params: Value) -> Message {
    Message::text(
        json!({"message_type": "atp_tool_request",
               "payload": {"request_id": id, "tool_name": tool, "params": params}})
        .to_string(),
    )
}

/// Reads `tool_response`s until every id in `want` has come as many times
/// as it says; returns the results of each id.
async fn collect(
    ws: &mut WebSocketStream<TcpStream>,
    want: &[(Value, usize)],
) -> BTreeMap<String, Vec<Value>> {
    let mut seen: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    while !want
        .iter()
        .all(|(id, n)| seen.get(&id.to_string()).is_some_and(|v| v.len() >= *n))
    {
        let reply = next_json(ws).await.expect("the runtime answers");
        assert_eq!(reply["type"], "tool_response", "{reply}");
        seen.entry(reply["request_id"].to_string())
            .or_default()
            .push(reply["result"].clone());
    }
    seen
}

async fn next_socket(
    rx: &mut mpsc::UnboundedReceiver<WebSocketStream<TcpStream>>,
) -> WebSocketStream<TcpStream> {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the runtime connects in time")
        .expect("the fake server runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_answers_every_request_once_whatever_else_comes() {
    let (base, mut sockets) = fake_server().await;
    let toolkit =
        test_toolkit("rt-key", "rtkit", &base).with_runtime_options(test_runtime_options());
    let runtime = tokio::spawn({
        let toolkit = toolkit.clone();
        async move { toolkit.start().await }
    });
    let mut ws = next_socket(&mut sockets).await;
    ws.send(Message::text(
        r#"{"message_type": "atp_client_connected", "payload": {"message": "hi"}}"#,
    ))
    .await
    .expect("send");
    let big = "b".repeat(1024 * 1024);
    for frame in [
        Message::binary(vec![9u8; 1000]),
        Message::text("not json"),
        Message::text("[1]"),
        Message::text(deep(50_000)),
        Message::text(r#"{"message_type": "atp_app_request", "payload": {}}"#),
        Message::text(r#"{"message_type": "atp_tool_request", "payload": {"tool_name": "echo"}}"#),
        Message::text(r#"{"message_type": "atp_tool_request", "payload": 7}"#),
        tool_request(json!("m1"), "echo", json!([1])),
        tool_request(json!("u1"), "nope", json!({})),
        tool_request(json!("e1"), "echo", json!({})),
        tool_request(json!(42), "echo", json!({"text": "number id"})),
        tool_request(json!("v1"), "echo", json!({"text": "ok"})),
        tool_request(json!("big"), "echo", json!({"text": big})),
    ] {
        ws.send(frame).await.expect("send");
    }
    // Two malformed requests have no id: both are answered with a null one.
    let want = [
        (json!(null), 2),
        (json!("m1"), 1),
        (json!("u1"), 1),
        (json!("e1"), 1),
        (json!(42), 1),
        (json!("v1"), 1),
        (json!("big"), 1),
    ];
    let seen = collect(&mut ws, &want).await;
    // A last request, answered after everything before it: nothing else
    // (no second answer to anything) may come in between.
    ws.send(tool_request(json!("last"), "echo", json!({"text": "end"})))
        .await
        .expect("send");
    let tail = collect(&mut ws, &[(json!("last"), 1)]).await;
    assert_eq!(tail.len(), 1, "an extra answer: {tail:?}");
    for (id, n) in &want {
        assert_eq!(
            seen[&id.to_string()].len(),
            *n,
            "{id} answered {:?}",
            seen[&id.to_string()]
        );
    }
    assert_eq!(seen.len(), want.len(), "{seen:?}");
    for id in ["null", "\"m1\"", "\"u1\"", "\"e1\""] {
        assert!(seen[id][0]["error"].is_string(), "{id}: {:?}", seen[id]);
    }
    assert_eq!(seen["42"][0], json!({"echo": "number id"}));
    assert_eq!(seen["\"v1\""][0], json!({"echo": "ok"}));
    assert_eq!(
        seen["\"big\""][0]["echo"].as_str().map(str::len),
        Some(big.len())
    );

    // A frame over the runtime's limit: the runtime drops the connection and
    // comes back by itself.
    let _ = ws.send(Message::text("o".repeat(17 * 1024 * 1024))).await;
    let mut ws = next_socket(&mut sockets).await;
    ws.send(tool_request(
        json!("after-oversized"),
        "echo",
        json!({"text": "1"}),
    ))
    .await
    .expect("send");
    assert_eq!(
        collect(&mut ws, &[(json!("after-oversized"), 1)])
            .await
            .len(),
        1
    );
    // A text frame that is not UTF-8: the same.
    let _ = ws.send(invalid_utf8_text()).await;
    let mut ws = next_socket(&mut sockets).await;
    ws.send(tool_request(
        json!("after-utf8"),
        "echo",
        json!({"text": "2"}),
    ))
    .await
    .expect("send");
    assert_eq!(collect(&mut ws, &[(json!("after-utf8"), 1)]).await.len(), 1);
    // A connection dropped without a close frame: the same.
    drop(ws);
    let mut ws = next_socket(&mut sockets).await;
    ws.send(tool_request(
        json!("after-drop"),
        "echo",
        json!({"text": "3"}),
    ))
    .await
    .expect("send");
    assert_eq!(collect(&mut ws, &[(json!("after-drop"), 1)]).await.len(), 1);
    toolkit.stop();
    tokio::time::timeout(WAIT, runtime)
        .await
        .expect("start returns after stop")
        .expect("no panic")
        .expect("a clean stop");
}
