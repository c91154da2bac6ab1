//! Progress and streaming (docs/PROTOCOL.md §9): a tool's `tool_progress`
//! reaches an LLM WebSocket that asked for it (`"stream": true`) and an
//! SSE client of `POST process/` (`Accept: text/event-stream`), before the
//! answer; nobody else gets any.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    apps::{ScriptedToolkit, llm_ws, recv_json, register, register_params, send_json, toolkit_ws},
    common::*,
};

/// Registers the scripted toolkit's `work` tool (param `steps`).
async fn register_work(server: &TestServer, app: &str) {
    register_params(server, TK_KEY, app, "work", &["steps"]).await;
}

fn work(request_id: &str, steps: u64, stream: bool) -> Value {
    json!({"type": "task_request", "request_id": request_id, "toolkit_id": "kit", "stream": stream,
           "payload": {"function": "work", "parameters": {"steps": steps}}})
}

fn assert_progress(m: &Value, request_id: &str, step: u64, total: u64) {
    assert_eq!(m["type"], "task_progress", "{m}");
    assert_eq!(m["request_id"], request_id, "{m}");
    let p = &m["payload"];
    assert_eq!(p["progress"].as_f64(), Some(step as f64), "{m}");
    assert_eq!(p["total"].as_f64(), Some(total as f64), "{m}");
    assert_eq!(p["message"], format!("step {step}"), "{m}");
}

/// `POST process/` asking for server-sent events.
async fn sse(server: &TestServer, key: &str, body: &Value) -> (u16, hyper::HeaderMap, String) {
    let auth = format!("ApiKey {key}");
    http(
        "POST",
        &format!("{}/api/v1/atp/llm-client/process/", server.base),
        &[
            ("authorization", auth.as_str()),
            ("accept", "text/event-stream"),
        ],
        Some(&body.to_string()),
    )
    .await
}

#[tokio::test]
async fn progress_reaches_a_websocket_client_that_asked_for_it_and_no_other() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        register_work(&server, "kit").await;
        let _tk = ScriptedToolkit::start(&server, TK_KEY).await;
        server.wait_served("kit").await;
        let mut llm = llm_ws(&server, LLM_KEY).await;

        send_json(&mut llm, &work("s1", 3, true)).await;
        for step in 1..=3 {
            assert_progress(&recv_json(&mut llm).await, "s1", step, 3);
        }
        let a = recv_json(&mut llm).await;
        assert_eq!(
            (a["type"].as_str(), a["request_id"].as_str()),
            (Some("task_response"), Some("s1")),
            "{a}"
        );
        assert_eq!(a["payload"]["result"], json!({"done": 3}));

        // Without "stream", the toolkit's progress goes nowhere: the answer
        // comes next, and nothing after it (the pong follows at once).
        send_json(&mut llm, &work("s2", 3, false)).await;
        let a = recv_json(&mut llm).await;
        assert_eq!(
            (a["type"].as_str(), a["request_id"].as_str()),
            (Some("task_response"), Some("s2")),
            "{a}"
        );
        assert_eq!(a["payload"]["result"], json!({"done": 3}));
        send_json(&mut llm, &json!({"type": "ping", "request_id": "p"})).await;
        assert_eq!(recv_json(&mut llm).await["type"], "pong");

        // Nor does a plain HTTP caller see any.
        let auth = format!("ApiKey {LLM_KEY}");
        let (status, headers, body) = http(
            "POST",
            &format!("{}/api/v1/atp/llm-client/process/", server.base),
            &[("authorization", auth.as_str())],
            Some(&work("s3", 2, true).to_string()),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["content-type"], "application/json");
        let a: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(
            (a["type"].as_str(), &a["payload"]["result"]),
            (Some("task_response"), &json!({"done": 2}))
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_sse_client_gets_progress_then_the_answer_then_the_end() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        register_work(&server, "kit").await;
        register(&server, TK_KEY, "kit", "counter").await;
        let _tk = ScriptedToolkit::start(&server, TK_KEY).await;
        server.wait_served("kit").await;

        // The Python client's call_tool_streaming sends no "stream": the
        // Accept header decides.
        let (status, headers, body) = sse(&server, LLM_KEY, &work("s1", 4, false)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["content-type"], "text/event-stream");
        assert_eq!(headers["cache-control"], "no-cache");
        let got = events(&body);
        assert_eq!(got.len(), 5, "{body}");
        for step in 1..=4 {
            assert_progress(&got[step as usize - 1], "s1", step, 4);
        }
        assert_eq!(got[4]["type"], "task_response");
        assert_eq!(got[4]["request_id"], "s1");
        assert_eq!(got[4]["payload"]["result"], json!({"done": 4}));

        // A failure is an event too.
        let (status, _, body) = sse(
            &server,
            LLM_KEY,
            &json!({"type": "task_request", "request_id": "s2", "toolkit_id": "nope",
                    "payload": {"function": "work"}}),
        )
        .await;
        assert_eq!(status, 200);
        let got = events(&body);
        assert_eq!(got.len(), 1, "{body}");
        assert_eq!(
            (got[0]["type"].as_str(), got[0]["code"].as_str()),
            (Some("task_response"), Some("toolkit_not_found"))
        );

        // get_toolkit_context: one toolkit_context event.
        let (status, headers, body) = sse(
            &server,
            LLM_KEY,
            &json!({"type": "get_toolkit_context", "toolkit_id": "kit", "request_id": "c1"}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["content-type"], "text/event-stream");
        let got = events(&body);
        assert_eq!(got.len(), 1, "{body}");
        assert_eq!(got[0]["type"], "toolkit_context");
        assert_eq!(got[0]["payload"]["toolkit_id"], "kit");

        // An app request: one app_response event.
        let (status, _, body) = sse(
            &server,
            LLM_KEY,
            &json!({"type": "app_request", "toolkit_id": "kit", "request_id": "a1",
                    "payload": {"app": "counter", "parameters": {"start": 2}}}),
        )
        .await;
        assert_eq!(status, 200);
        let got = events(&body);
        assert_eq!(got.len(), 1, "{body}");
        assert_eq!(got[0]["type"], "app_response");
        assert_eq!(
            got[0]["payload"]["ui_content"],
            json!({"count": 2, "token": null})
        );

        // A wrong key and an unreadable body keep their JSON answers.
        let (status, headers, body) = sse(&server, "wrong-key", &work("s3", 1, false)).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(headers["content-type"], "application/json");
        let auth = format!("ApiKey {LLM_KEY}");
        let (status, headers, body) = http(
            "POST",
            &format!("{}/api/v1/atp/llm-client/process/", server.base),
            &[
                ("authorization", auth.as_str()),
                ("accept", "text/event-stream"),
            ],
            Some("{not json"),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(headers["content-type"], "application/json");
        server.stop().await;
    })
    .await;
}

/// An SSE client that hangs up while its app start waits: the server stops
/// waiting (the abandoned session ends and its toolkit is told) rather than
/// keep anything pending until the timeout.
#[tokio::test]
async fn an_sse_client_that_goes_away_leaves_nothing_waiting() {
    bounded(Duration::from_secs(60), async {
        let mut config = keyed_config();
        config.task_timeout = Duration::from_secs(60);
        let server = TestServer::start(config).await;
        register(&server, TK_KEY, "kit", "counter").await;
        let mut toolkit = toolkit_ws(&server, TK_KEY).await;
        server.wait_served("kit").await;

        let body = json!({"type": "app_request", "toolkit_id": "kit", "request_id": "a1",
                          "payload": {"app": "counter", "parameters": {}}})
        .to_string();
        let mut client = TcpStream::connect(server.addr).await.expect("connect");
        let request = format!(
            "POST /api/v1/atp/llm-client/process/ HTTP/1.1\r\nhost: {}\r\nauthorization: ApiKey {LLM_KEY}\r\naccept: text/event-stream\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            server.addr,
            body.len()
        );
        client.write_all(request.as_bytes()).await.expect("write");
        // The event stream's head comes at once, before any event.
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(WAIT, client.read(&mut buf))
                .await
                .expect("the head in time")
                .expect("read");
            assert!(n > 0, "closed early");
            head.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("content-type: text/event-stream"), "{head}");

        let got = recv_json(&mut toolkit).await;
        assert_eq!(got["message_type"], "atp_app_request");
        let session = got["payload"]["request_id"].as_str().expect("id").to_owned();
        drop(client);
        let got = recv_json(&mut toolkit).await;
        assert_eq!(
            got,
            json!({"message_type": "atp_app_terminate", "payload": {"request_id": session}})
        );
        server.stop().await;
    })
    .await;
}
