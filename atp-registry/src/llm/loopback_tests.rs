//! The client against hand-written servers on loopback: event streams cut
//! in awkward places, progress routed on a shared WebSocket, apps, the
//! account endpoints.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};

use super::*;
use crate::wire::WebhookEvent;

/// The bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .expect("the test finished in time")
}

// ---------------------------------------------------------------- HTTP --

/// A request as a raw server read it.
#[derive(Debug)]
struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn read_request(s: &mut TcpStream) -> Option<Req> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Some(Req {
        method,
        path,
        headers,
        body: buf[head_end..head_end + len].to_vec(),
    })
}

type Handler =
    Arc<dyn Fn(Req, TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A raw HTTP/1.1 server on a loopback port: each request (one per
/// connection) goes to `handler` with the connection to answer on.
async fn http_server(handler: Handler) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                if let Some(req) = read_request(&mut s).await {
                    handler(req, s).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

async fn respond(s: &mut TcpStream, status: u16, content_type: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body.as_bytes()).await.expect("write");
    s.flush().await.expect("flush");
}

async fn sse_head(s: &mut TcpStream) {
    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
}

/// One HTTP chunk, flushed on its own.
async fn chunk(s: &mut TcpStream, bytes: &[u8]) {
    let mut out = format!("{:x}\r\n", bytes.len()).into_bytes();
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
    s.write_all(&out).await.expect("write");
    s.flush().await.expect("flush");
}

async fn end_chunks(s: &mut TcpStream) {
    s.write_all(b"0\r\n\r\n").await.expect("write");
    s.flush().await.expect("flush");
}

fn http_client(base: &str) -> LlmClient {
    LlmClient::new("k")
        .with_base_url(base)
        .with_protocol(LlmProtocol::Http)
        .with_timeout(WAIT)
}

fn calls(names: &[(&str, &str)]) -> Value {
    Value::Array(
        names
            .iter()
            .map(
                |(id, name)| json!({"type": "tool_use", "id": id, "name": name, "input": {"x": 1}}),
            )
            .collect(),
    )
}

async fn collect(mut events: EventStream) -> Vec<Result<StreamEvent, LlmError>> {
    let mut out = Vec::new();
    while let Some(e) = bounded(events.next()).await {
        out.push(e);
    }
    out
}

#[tokio::test]
async fn an_event_stream_cut_anywhere_is_read_as_it_arrives() {
    let (gate_tx, gate_rx) = oneshot::channel::<()>();
    let gate = Arc::new(std::sync::Mutex::new(Some(gate_rx)));
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Req>();
    let base = http_server(Arc::new(move |req: Req, mut s: TcpStream| {
        let gate = gate.lock().expect("lock").take();
        let seen = seen_tx.clone();
        Box::pin(async move {
            let rid = req.json()["request_id"].clone();
            seen.send(req).expect("the test listens");
            sse_head(&mut s).await;
            let progress = json!({"type": "task_progress", "request_id": rid,
                                  "payload": {"progress": 1, "total": 3, "message": "étape"}})
            .to_string();
            // The first event, cut inside "data:", inside the JSON, inside
            // the "é", and between its \r and \n.
            chunk(&mut s, b": hello\r\nda").await;
            let text = format!("ta: {progress}\r\n\r");
            let at = text.find('é').expect("é") + 1;
            chunk(&mut s, &text.as_bytes()[..at]).await;
            chunk(&mut s, &text.as_bytes()[at..]).await;
            chunk(&mut s, b"\n").await;
            // The rest waits until the client has read the first event:
            // it must come before the body ends.
            if let Some(gate) = gate {
                gate.await.expect("the test opens the gate");
            }
            let second = json!({"type": "task_progress", "request_id": rid,
                                "payload": {"progress": 2, "total": 3}});
            let answer = json!({"type": "task_response", "request_id": rid, "status": "success",
                                "payload": {"result": {"ok": true}, "function": "work"}});
            // Multi-line data, an unknown event type, CR-only endings.
            let answer = answer.to_string();
            let (head, tail) = answer.split_at(answer.find(',').expect("a comma") + 1);
            let rest = format!(
                "event: progress\ndata: {second}\n\ndata: {{\"type\": \"telemetry\"}}\n\ndata: {head}\r\ndata: {tail}\r\r"
            );
            chunk(&mut s, rest.as_bytes()).await;
            end_chunks(&mut s).await;
        })
    }))
    .await;
    let llm = http_client(&base);
    let options = CallOptions::new()
        .auth_token("user-token")
        .external_user_id("u1");
    bounded(async {
        let mut events = llm.call_tool_streaming_with(
            "kit",
            &calls(&[("toolu_1", "work")]),
            "anthropic",
            "go",
            &options,
        );
        let first = events.next().await.expect("an event").expect("progress");
        let StreamEvent::Progress(p) = first else {
            panic!("{first:?}")
        };
        assert_eq!(
            (p.call, p.tool.as_str(), p.tool_call_id.as_str()),
            (0, "work", "toolu_1")
        );
        assert_eq!(p.progress.progress, 1.0);
        assert_eq!(p.progress.total, Some(3.0));
        assert_eq!(p.progress.message.as_deref(), Some("étape"));
        gate_tx.send(()).expect("the server waits");
        let rest = collect(events).await;
        let rest: Vec<StreamEvent> = rest.into_iter().map(|e| e.expect("no error")).collect();
        assert_eq!(rest.len(), 3, "{rest:?}");
        assert!(matches!(&rest[0], StreamEvent::Progress(p) if p.progress.progress == 2.0));
        assert_eq!(
            rest[1],
            StreamEvent::Finished(CallFinished {
                call: 0,
                tool_call_id: "toolu_1".into(),
                tool: "work".into(),
                outcome: CallOutcome::ok(&json!({"ok": true})),
            })
        );
        assert_eq!(
            rest[2],
            StreamEvent::Messages(vec![json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "{\"ok\":true}"}
            ]})])
        );
        let req = seen_rx.recv().await.expect("a request");
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("POST", "/api/v1/atp/llm-client/process/")
        );
        assert_eq!(req.header("accept"), Some("text/event-stream"));
        assert_eq!(req.header("authorization"), Some("ApiKey k"));
        let body = req.json();
        assert_eq!(body["type"], "task_request");
        assert_eq!(body["toolkit_id"], "kit");
        assert_eq!(body["payload"]["function"], "work");
        assert_eq!(body["payload"]["auth_token"], "user-token");
        assert_eq!(body["payload"]["tool_call_id"], "toolu_1");
        assert_eq!(body["external_user_id"], "u1");
    })
    .await;
}

#[tokio::test]
async fn streams_end_with_a_typed_error_and_a_plain_answer_is_taken() {
    let base = http_server(Arc::new(|req: Req, mut s: TcpStream| {
        Box::pin(async move {
            let body = req.json();
            let rid = body["request_id"].clone();
            match body["payload"]["function"].as_str().unwrap_or_default() {
                // Not streamed: a plain JSON answer.
                "plain" => {
                    let answer = json!({"type": "task_response", "request_id": rid,
                                        "status": "success", "payload": {"result": 7}});
                    respond(&mut s, 200, "application/json", &answer.to_string()).await;
                }
                // The stream ends before the answer.
                "cut" => {
                    sse_head(&mut s).await;
                    let p = json!({"type": "task_progress", "request_id": rid, "payload": {"progress": 1}});
                    chunk(&mut s, format!("data: {p}\n\n").as_bytes()).await;
                    end_chunks(&mut s).await;
                }
                // Comments only, forever (well, 5 s): each event is
                // waited for at most the timeout, comments or not.
                "mute" => {
                    sse_head(&mut s).await;
                    for _ in 0..100 {
                        chunk(&mut s, b": keep-alive\n\n").await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                "garbage" => {
                    sse_head(&mut s).await;
                    chunk(&mut s, b"data: {not json\n\n").await;
                    end_chunks(&mut s).await;
                }
                _ => respond(&mut s, 401, "application/json", r#"{"error": "Invalid API key"}"#).await,
            }
        })
    }))
    .await;
    bounded(async {
        let llm = http_client(&base);
        let out = collect(llm.call_tool_streaming("kit", &calls(&[("t1", "plain")]), "anthropic", "")).await;
        assert!(matches!(&out[0], Ok(StreamEvent::Finished(f)) if f.outcome == CallOutcome::ok(&json!(7))), "{out:?}");
        assert!(matches!(&out[1], Ok(StreamEvent::Messages(m)) if m.len() == 1), "{out:?}");
        assert_eq!(out.len(), 2);

        let out = collect(llm.call_tool_streaming("kit", &calls(&[("t1", "cut")]), "anthropic", "")).await;
        assert!(matches!(&out[0], Ok(StreamEvent::Progress(_))), "{out:?}");
        assert_eq!(out[1], Err(LlmError::ConnectionLost));
        assert_eq!(out.len(), 2);

        let quick = llm.clone().with_timeout(Duration::from_millis(300));
        let started = tokio::time::Instant::now();
        let out = collect(quick.call_tool_streaming("kit", &calls(&[("t1", "mute")]), "anthropic", "")).await;
        assert_eq!(out, [Err(LlmError::Timeout(Duration::from_millis(300)))]);
        assert!(started.elapsed() < Duration::from_secs(3));

        let out = collect(llm.call_tool_streaming("kit", &calls(&[("t1", "garbage")]), "anthropic", "")).await;
        assert!(matches!(&out[..], [Err(LlmError::InvalidResponse(_))]), "{out:?}");

        let out = collect(llm.call_tool_streaming("kit", &calls(&[("t1", "refused")]), "anthropic", "")).await;
        assert_eq!(out, [Err(LlmError::AuthRefused("Invalid API key".into()))]);

        let out = collect(llm.call_tool_streaming("kit", &calls(&[]), "cohere", "")).await;
        assert_eq!(out, [Err(LlmError::UnknownProvider("cohere".into()))]);

        // No calls: the (empty) messages at once, without a request.
        let out = collect(llm.call_tool_streaming("kit", &json!([]), "openai", "")).await;
        assert_eq!(out, [Ok(StreamEvent::Messages(vec![]))]);

        // A call whose arguments are not JSON is an error outcome, not sent.
        let bad = json!([{"type": "function_call", "call_id": "c1", "name": "plain", "arguments": "{nope"}]);
        let out = collect(llm.call_tool_streaming("kit", &bad, "openai", "")).await;
        assert!(matches!(&out[0], Ok(StreamEvent::Finished(f)) if f.outcome.is_error), "{out:?}");
    })
    .await;
}

#[tokio::test]
async fn the_context_streams_over_http() {
    let base = http_server(Arc::new(|req: Req, mut s: TcpStream| {
        Box::pin(async move {
            let body = req.json();
            assert_eq!(body["type"], "get_toolkit_context");
            assert_eq!(req.header("accept"), Some("text/event-stream"));
            let context = json!({"type": "toolkit_context", "request_id": body["request_id"],
                "status": "success", "payload": {"toolkit_id": "kit", "provider": "openai", "tools": [{"name": "x"}]}});
            sse_head(&mut s).await;
            chunk(&mut s, format!("data: {context}\n\n").as_bytes()).await;
            end_chunks(&mut s).await;
        })
    }))
    .await;
    let out =
        collect(http_client(&base).get_toolkit_context_streaming("kit", "openai", "hi")).await;
    assert!(
        matches!(&out[..], [Ok(StreamEvent::Context(c))] if c["tools"][0]["name"] == "x" && c["toolkit_id"] == "kit"),
        "{out:?}"
    );
}

// ----------------------------------------------------------- WebSocket --

type Ws = WebSocketStream<TcpStream>;

/// A raw LLM-side WebSocket server on a loopback port: it takes one
/// connection, accepts its `auth`, and hands it to `f`.
async fn ws_server<F, Fut>(f: F) -> String
where
    F: FnOnce(Ws) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.expect("accept");
        let mut ws = tokio_tungstenite::accept_async(s).await.expect("handshake");
        let auth = next_json(&mut ws).await.expect("auth");
        assert_eq!(auth, json!({"type": "auth", "api_key": "k"}));
        send(&mut ws, json!({"type": "auth_response", "success": true})).await;
        f(ws).await;
    });
    format!("http://{addr}")
}

async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => return serde_json::from_str(t.as_str()).ok(),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

fn ws_client(base: &str) -> LlmClient {
    LlmClient::new("k").with_base_url(base).with_timeout(WAIT)
}

fn progress(rid: &Value, n: u32) -> Value {
    json!({"type": "task_progress", "request_id": rid, "payload": {"progress": n}})
}

fn answer(rid: &Value, result: Value) -> Value {
    json!({"type": "task_response", "request_id": rid, "status": "success", "payload": {"result": result}})
}

#[tokio::test]
async fn progress_is_routed_to_the_stream_of_its_request() {
    let base = ws_server(|mut ws| async move {
        // Both calls are sent at once (the stream runs them concurrently).
        let mut by_name = std::collections::HashMap::new();
        for _ in 0..2 {
            let r = next_json(&mut ws).await.expect("a task_request");
            assert_eq!(r["type"], "task_request");
            assert_eq!(r["stream"], true);
            by_name.insert(
                r["payload"]["function"].as_str().expect("name").to_owned(),
                r["request_id"].clone(),
            );
        }
        let (a, b) = (&by_name["a"], &by_name["b"]);
        send(&mut ws, progress(b, 1)).await;
        send(&mut ws, progress(&json!("someone-else"), 1)).await;
        send(&mut ws, progress(a, 1)).await;
        send(&mut ws, answer(a, json!("A"))).await;
        send(&mut ws, progress(b, 2)).await;
        send(&mut ws, answer(b, json!("B"))).await;
        // Late progress for a finished request goes nowhere.
        send(&mut ws, progress(b, 3)).await;
        // Keep the socket open for the client's next calls.
        while let Some(r) = next_json(&mut ws).await {
            let rid = r["request_id"].clone();
            send(&mut ws, progress(&rid, 1)).await;
            send(&mut ws, answer(&rid, json!("plain"))).await;
        }
    })
    .await;
    let llm = ws_client(&base);
    bounded(async {
        let out = collect(llm.call_tool_streaming(
            "kit",
            &calls(&[("t_a", "a"), ("t_b", "b")]),
            "anthropic",
            "",
        ))
        .await;
        let out: Vec<StreamEvent> = out.into_iter().map(|e| e.expect("no error")).collect();
        // Per call: its progress in order, then its end.
        for (call, expected) in [(0, vec![1.0]), (1, vec![1.0, 2.0])] {
            let mine: Vec<&StreamEvent> = out
                .iter()
                .filter(|e| match e {
                    StreamEvent::Progress(p) => p.call == call,
                    StreamEvent::Finished(f) => f.call == call,
                    _ => false,
                })
                .collect();
            let steps: Vec<f64> = mine
                .iter()
                .filter_map(|e| match e {
                    StreamEvent::Progress(p) => Some(p.progress.progress),
                    _ => None,
                })
                .collect();
            assert_eq!(steps, expected, "call {call}: {out:?}");
            assert!(
                matches!(mine.last(), Some(StreamEvent::Finished(_))),
                "{out:?}"
            );
        }
        // The messages last, in call order, in one Anthropic user message.
        assert_eq!(
            out.last(),
            Some(&StreamEvent::Messages(vec![
                json!({"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t_a", "content": "\"A\""},
                    {"type": "tool_result", "tool_use_id": "t_b", "content": "\"B\""},
                ]})
            ]))
        );
        assert_eq!(out.len(), 6, "{out:?}");
        // A call that does not stream skips the progress on the same socket.
        let messages = llm
            .call_tool("kit", &calls(&[("t_c", "c")]), "anthropic", "")
            .await
            .expect("an answer");
        assert_eq!(messages[0]["content"][0]["content"], "\"plain\"");
        // No waiter is left behind.
        let slot = llm.inner.ws.lock().await;
        let pending = slot.as_ref().expect("connected").pending.clone();
        drop(slot);
        assert!(pending.lock().expect("lock").is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_dropped_stream_forgets_its_request_and_sequential_calls_wait_their_turn() {
    let (dropped_tx, dropped_rx) = oneshot::channel::<()>();
    let base = ws_server(|mut ws| async move {
        // A stream dropped mid-way.
        let r = next_json(&mut ws).await.expect("a task_request");
        send(&mut ws, progress(&r["request_id"], 1)).await;
        dropped_rx.await.expect("the test drops its stream");
        send(&mut ws, answer(&r["request_id"], json!("late"))).await;
        // Sequential: the second call comes only once the first is answered.
        let first = next_json(&mut ws).await.expect("the first call");
        assert_eq!(first["payload"]["function"], "one");
        let early = tokio::time::timeout(Duration::from_millis(300), next_json(&mut ws)).await;
        assert!(
            early.is_err(),
            "the second call came before the first was answered: {early:?}"
        );
        send(&mut ws, progress(&first["request_id"], 1)).await;
        send(&mut ws, answer(&first["request_id"], json!(1))).await;
        let second = next_json(&mut ws).await.expect("the second call");
        assert_eq!(second["payload"]["function"], "two");
        send(&mut ws, answer(&second["request_id"], json!(2))).await;
        while next_json(&mut ws).await.is_some() {}
    })
    .await;
    let llm = ws_client(&base);
    bounded(async {
        let mut events = llm.call_tool_streaming("kit", &calls(&[("t1", "x")]), "anthropic", "");
        assert!(matches!(
            events.next().await,
            Some(Ok(StreamEvent::Progress(_)))
        ));
        let pending = llm
            .inner
            .ws
            .lock()
            .await
            .as_ref()
            .expect("connected")
            .pending
            .clone();
        assert_eq!(pending.lock().expect("lock").len(), 1);
        drop(events);
        assert!(pending.lock().expect("lock").is_empty());
        dropped_tx.send(()).expect("the server waits");

        let options = CallOptions::new().sequential(true);
        let out = collect(llm.call_tool_streaming_with(
            "kit",
            &calls(&[("t1", "one"), ("t2", "two")]),
            "anthropic",
            "",
            &options,
        ))
        .await;
        let kinds: Vec<String> = out
            .iter()
            .map(|e| match e {
                Ok(StreamEvent::Progress(p)) => format!("progress {}", p.call),
                Ok(StreamEvent::Finished(f)) => format!("finished {}", f.call),
                Ok(StreamEvent::Messages(m)) => format!("messages {}", m.len()),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            ["progress 0", "finished 0", "finished 1", "messages 1"]
        );
    })
    .await;
}

#[tokio::test]
async fn call_tool_with_runs_sequentially_over_the_socket() {
    let base = ws_server(|mut ws| async move {
        let first = next_json(&mut ws).await.expect("the first call");
        assert_eq!(first["payload"]["auth_token"], "tok");
        assert_eq!(first["stream"], Value::Null);
        let early = tokio::time::timeout(Duration::from_millis(300), next_json(&mut ws)).await;
        assert!(
            early.is_err(),
            "the second call came before the first was answered"
        );
        send(&mut ws, answer(&first["request_id"], json!(1))).await;
        let second = next_json(&mut ws).await.expect("the second call");
        send(&mut ws, answer(&second["request_id"], json!(2))).await;
        while next_json(&mut ws).await.is_some() {}
    })
    .await;
    let llm = ws_client(&base);
    let options = CallOptions::new().sequential(true).auth_token("tok");
    let out = bounded(llm.call_tool_with(
        "kit",
        &calls(&[("t1", "one"), ("t2", "two")]),
        "anthropic",
        "",
        &options,
    ))
    .await
    .expect("answers");
    assert_eq!(out[0]["content"][1]["content"], "2");
}

#[tokio::test]
async fn apps_over_the_socket() {
    let base = ws_server(|mut ws| async move {
        let start = next_json(&mut ws).await.expect("app_request");
        assert_eq!(start["type"], "app_request");
        assert_eq!(start["toolkit_id"], "kit");
        assert_eq!(start["payload"]["app"], "counter");
        assert_eq!(start["payload"]["parameters"], json!({"start": 1}));
        assert_eq!(start["payload"]["auth_token"], "tok");
        send(
            &mut ws,
            json!({"type": "app_response", "request_id": start["request_id"],
            "payload": {"session_id": "s1", "ui_content": {"count": 1}}}),
        )
        .await;
        let action = next_json(&mut ws).await.expect("app_action");
        assert_eq!(action["type"], "app_action");
        assert_eq!(
            action["payload"],
            json!({"session_id": "s1", "action_data": {"button": "done"}})
        );
        send(
            &mut ws,
            json!({"type": "app_response", "request_id": action["request_id"],
            "payload": {"session_id": "s1", "ui_content": {"count": 2}, "terminated": true}}),
        )
        .await;
        let again = next_json(&mut ws).await.expect("app_action");
        send(
            &mut ws,
            json!({"type": "app_response", "request_id": again["request_id"],
            "payload": {"error": "The session has ended", "code": "session_ended"}}),
        )
        .await;
        let end = next_json(&mut ws).await.expect("app_terminate");
        assert_eq!(end["type"], "app_terminate");
        assert_eq!(end["payload"], json!({"session_id": "s2"}));
        send(
            &mut ws,
            json!({"type": "app_response", "request_id": end["request_id"],
            "payload": {"session_id": "s2", "terminated": true}}),
        )
        .await;
        while next_json(&mut ws).await.is_some() {}
    })
    .await;
    let llm = ws_client(&base);
    bounded(async {
        let session = llm
            .start_app(
                "kit",
                "counter",
                &json!({"start": 1}),
                Some(&Secret::from("tok")),
            )
            .await
            .expect("started");
        assert_eq!(
            session,
            AppSession {
                session_id: "s1".into(),
                ui_content: json!({"count": 1})
            }
        );
        let update = llm
            .app_action("s1", &json!({"button": "done"}))
            .await
            .expect("an update");
        assert_eq!(
            update,
            AppUpdate {
                session_id: "s1".into(),
                ui_content: json!({"count": 2}),
                terminated: true
            }
        );
        assert_eq!(
            llm.app_action("s1", &json!({})).await,
            Err(LlmError::App {
                code: "session_ended".into(),
                message: "The session has ended".into()
            })
        );
        llm.terminate_app("s2").await.expect("terminated");
        assert!(matches!(
            llm.start_app("kit", "counter", &json!([1]), None).await,
            Err(LlmError::InvalidArgument(_))
        ));
    })
    .await;
}

#[tokio::test]
async fn app_errors_over_http_keep_their_code_whatever_the_status() {
    let base = http_server(Arc::new(|req: Req, mut s: TcpStream| {
        Box::pin(async move {
            let body = req.json();
            let rid = body["request_id"].clone();
            let (status, answer) = match body["payload"]["app"].as_str() {
                Some("counter") => (
                    200,
                    json!({"type": "app_response", "request_id": rid,
                    "payload": {"session_id": "s9", "ui_content": "<ui/>"}}),
                ),
                _ => (
                    404,
                    json!({"type": "app_response", "request_id": rid,
                    "payload": {"error": "No app nope in kit", "code": "app_not_found"}}),
                ),
            };
            respond(&mut s, status, "application/json", &answer.to_string()).await;
        })
    }))
    .await;
    let llm = http_client(&base);
    bounded(async {
        let session = llm
            .start_app("kit", "counter", &Value::Null, None)
            .await
            .expect("started");
        assert_eq!(session.session_id, "s9");
        assert_eq!(session.ui_content, json!("<ui/>"));
        assert_eq!(
            llm.start_app("kit", "nope", &json!({}), None).await,
            Err(LlmError::App {
                code: "app_not_found".into(),
                message: "No app nope in kit".into()
            })
        );
    })
    .await;
}

// ------------------------------------------------------------- account --

#[tokio::test]
async fn account_endpoints_send_what_the_python_client_sends() {
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(String, String)>();
    let base = http_server(Arc::new(move |req: Req, mut s: TcpStream| {
        let seen = seen_tx.clone();
        Box::pin(async move {
            seen.send((req.method.clone(), req.path.clone()))
                .expect("the test listens");
            if req.header("authorization") != Some("ApiKey k") {
                respond(&mut s, 401, "application/json", r#"{"error": "Invalid API key"}"#).await;
                return;
            }
            let toolkit = json!({"toolkit_id": "a/b", "name": "a/b", "description": "d",
                "developer": "ada l", "public": true, "tools_count": 1, "connected": false,
                "programming_language": "Rust"});
            let page = json!({"count": 1, "page": 2, "page_size": 5, "results": [toolkit]});
            let hook = json!({"webhook_id": "w 1", "url": "https://h/x", "events": ["connection_success"]});
            let (status, body) = match (req.method.as_str(), req.path.as_str()) {
                ("POST", "/api/v1/atp/llm-client/webhooks/register/") => {
                    let mut answer = req.json();
                    answer["webhook_id"] = json!("w 1");
                    answer["secret"] = json!("whsec_1");
                    (201, answer.to_string())
                }
                ("GET", "/api/v1/atp/llm-client/webhooks/") => (200, json!([hook]).to_string()),
                ("DELETE", "/api/v1/atp/llm-client/webhooks/w%201/delete/") => (204, String::new()),
                ("GET", "/api/v1/atp/llm-client/store/toolkits/list/?page=2&page_size=5")
                | ("GET", "/api/v1/atp/llm-client/developers/toolkits/?page=2&page_size=5") => {
                    (200, page.to_string())
                }
                ("GET", "/api/v1/atp/llm-client/store/toolkits/a%2Fb/") => {
                    let mut details = toolkit.clone();
                    details["tools"] = json!([{"function": "x", "description": "", "params": [], "required_params": [], "input_schema": {"type": "object"}}]);
                    (200, details.to_string())
                }
                ("GET", "/api/v1/atp/llm-client/store/developers/ada%20l/") => (
                    200,
                    json!({"display_name": "ada l", "name": "Ada", "bio": "", "toolkits": [toolkit]}).to_string(),
                ),
                _ => (404, r#"{"error": "Not found", "code": "not_found"}"#.to_owned()),
            };
            respond(&mut s, status, "application/json", &body).await;
        })
    }))
    .await;
    let llm = http_client(&base);
    bounded(async {
        let hook = llm
            .register_webhook(
                "https://h/x",
                &[
                    WebhookEvent::ConnectionSuccess,
                    WebhookEvent::ToolkitConnected,
                ],
            )
            .await
            .expect("registered");
        assert_eq!(hook.webhook_id, "w 1");
        assert_eq!(hook.events, ["connection_success", "toolkit_connected"]);
        assert_eq!(hook.secret.as_ref().map(Secret::expose), Some("whsec_1"));
        let hook = llm
            .register_webhook("https://h/x", &[])
            .await
            .expect("registered");
        assert_eq!(hook.events, ["connection_success"]);
        let hooks = llm.list_webhooks().await.expect("a list");
        assert_eq!(hooks.len(), 1);
        assert_eq!(hooks[0].secret, None);
        llm.delete_webhook("w 1").await.expect("deleted");
        assert!(matches!(
            llm.delete_webhook("w2").await,
            Err(LlmError::Server { status: Some(404), message }) if message == "Not found"
        ));
        let page = llm.list_store_toolkits(2, 5).await.expect("a page");
        assert_eq!((page.count, page.page, page.page_size), (1, 2, 5));
        assert_eq!(page.results[0].toolkit_id, "a/b");
        let mine = llm.list_my_toolkits(2, 5).await.expect("a page");
        assert_eq!(mine, page);
        let details = llm.get_toolkit_details("a/b").await.expect("details");
        assert_eq!(details.toolkit.name, "a/b");
        assert_eq!(details.tools.len(), 1);
        let profile = llm.get_developer_profile("ada l").await.expect("a profile");
        assert_eq!((profile.name.as_str(), profile.toolkits.len()), ("Ada", 1));
        let wrong = LlmClient::new("wrong")
            .with_base_url(&base)
            .with_protocol(LlmProtocol::Http);
        assert_eq!(
            wrong.list_webhooks().await,
            Err(LlmError::AuthRefused("Invalid API key".into()))
        );
    })
    .await;
    let mut paths = Vec::new();
    while let Ok((method, path)) = seen_rx.try_recv() {
        paths.push(format!("{method} {path}"));
    }
    assert!(
        paths.contains(&"DELETE /api/v1/atp/llm-client/webhooks/w%201/delete/".to_owned()),
        "{paths:?}"
    );
}

/// A server that sends progress for ever, faster than the timeout, can not
/// keep a stream open: the timeout bounds the whole call.
#[tokio::test]
async fn endless_progress_does_not_keep_a_stream_open() {
    let base = ws_server(|mut ws| async move {
        let Some(r) = next_json(&mut ws).await else {
            return;
        };
        let rid = r["request_id"].clone();
        let mut n = 0;
        loop {
            n += 1;
            send(&mut ws, progress(&rid, n)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            if n > 5_000 {
                return;
            }
        }
    })
    .await;
    let llm = ws_client(&base);
    bounded(async {
        let options = CallOptions::new().timeout(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let out = collect(llm.call_tool_streaming_with(
            "kit",
            &calls(&[("t_a", "a")]),
            "anthropic",
            "",
            &options,
        ))
        .await;
        assert!(
            matches!(out.last(), Some(Err(LlmError::Timeout(d))) if *d == Duration::from_millis(300)),
            "{:?}",
            out.last()
        );
        assert!(out.iter().any(|e| matches!(e, Ok(StreamEvent::Progress(_)))));
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    })
    .await;
}
