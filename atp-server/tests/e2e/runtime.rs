//! The toolkit runtime (`ToolKitClient::start` / `stop`, docs/PROTOCOL.md §5)
//! against the server: concurrency, every error answered, reconnecting by
//! itself after the server restarts, and a graceful stop with calls in
//! flight.

use std::{sync::Arc, time::Duration};

use atp_registry::{
    Call, Tool, ToolError, ToolKitClient,
    llm::LlmProtocol,
    runtime::{RuntimeError, RuntimeOptions},
};
use atp_server::{Config, DbLocation};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};

use crate::common::*;

fn options() -> RuntimeOptions {
    RuntimeOptions::default()
        .handle_ctrl_c(false)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .grace_period(Duration::from_secs(5))
        .request_timeout(Duration::from_secs(5))
}

/// A toolkit for these tests; `started` is notified when `gate` begins.
fn toolkit(app: &str, base: &str, started: Arc<Notify>) -> ToolKitClient {
    let client = ToolKitClient::new(TK_KEY, app)
        .with_base_url(base)
        .with_timeout(Duration::from_millis(300))
        .with_runtime_options(options());
    client
        .register_tool(
            Tool::new("echo").params(["text"]).required_params(["text"]),
            |call: Call| async move { Ok::<_, ToolError>(json!({"echo": call.param("text")})) },
        )
        .expect("valid");
    client
        .register_tool(
            Tool::new("jitter").params(["i"]).required_params(["i"]),
            |call: Call| async move {
                let i = call.param("i").and_then(Value::as_u64).unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(i % 7 * 5)).await;
                Ok::<_, ToolError>(json!({"i": i}))
            },
        )
        .expect("valid");
    client
        .register_tool(Tool::new("gate"), move |_call: Call| {
            let started = started.clone();
            async move {
                started.notify_one();
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok::<_, ToolError>(json!("finished"))
            }
        })
        .expect("valid");
    client
        .register_tool(Tool::new("boom"), |_call: Call| async {
            if true {
                panic!("secret panic detail");
            }
            Ok::<_, ToolError>(Value::Null)
        })
        .expect("valid");
    client
        .register_tool(Tool::new("forever"), |_call: Call| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, ToolError>(Value::Null)
        })
        .expect("valid");
    client
        .register_tool(
            Tool::new("secure").auth_type("OAuth2"),
            |_call: Call| async { Ok::<_, ToolError>(1) },
        )
        .expect("valid");
    client
}

fn spawn(client: &ToolKitClient) -> JoinHandle<Result<(), RuntimeError>> {
    let client = client.clone();
    tokio::spawn(async move { client.start().await })
}

fn call(name: &str, id: &str, args: Value) -> Value {
    json!({"type": "function_call", "call_id": id, "name": name, "arguments": args.to_string()})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_calls_and_every_error_are_answered() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        let tk = toolkit("busy", &server.base, Arc::default());
        let runtime = spawn(&tk);
        server.wait_served("busy").await;

        let calls: Vec<Value> = (0..200)
            .map(|i| call("jitter", &format!("c{i}"), json!({"i": i})))
            .collect();
        for protocol in [LlmProtocol::WebSocket, LlmProtocol::Http] {
            let messages = server
                .llm(protocol)
                .call_tool("busy", &Value::Array(calls.clone()), "openai", "")
                .await
                .expect("answered");
            assert_eq!(messages.len(), 200);
            for (i, m) in messages.iter().enumerate() {
                assert_eq!(m["call_id"], format!("c{i}"), "{protocol:?}");
                let out: Value =
                    serde_json::from_str(m["output"].as_str().expect("text")).expect("JSON");
                assert_eq!(out, json!({"i": i}), "{protocol:?}");
            }
        }

        let errors = json!([
            call("nope", "e1", json!({})),
            call("echo", "e2", json!({})),
            call("echo", "e3", json!({"text": "x", "extra": 1})),
            call("secure", "e4", json!({})),
            call("boom", "e5", json!({})),
            call("forever", "e6", json!({})),
            {"type": "function_call", "call_id": "e7", "name": "echo", "arguments": "{not json"},
        ]);
        let out = outputs(
            &server
                .llm(LlmProtocol::WebSocket)
                .call_tool("busy", &errors, "openai", "")
                .await
                .expect("answered"),
        );
        assert_eq!(out[0], "Tool not found");
        assert_eq!(out[1], "Missing required parameters: text");
        assert_eq!(out[2], "Unknown parameters: extra");
        assert_eq!(out[3], "This tool requires an auth token");
        assert_eq!(out[4], "The tool panicked");
        assert!(!out[4].contains("secret"));
        assert_eq!(out[5], "The tool timed out after 300 ms");
        assert!(out[6].contains("not valid JSON"), "{}", out[6]);

        tk.stop();
        tokio::time::timeout(WAIT, runtime)
            .await
            .expect("stops")
            .expect("no panic")
            .expect("clean stop");
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_reconnects_by_itself_after_the_server_restarts() {
    bounded(Duration::from_secs(60), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let start_on = |addr| async move {
            let listener = TcpListener::bind(addr)
                .await
                .expect("the port is free again");
            let server = atp_server::AtpServer::open(Config {
                db: DbLocation::Memory,
                ..keyed_config()
            })
            .expect("open");
            let s = server.clone();
            let join = tokio::spawn(async move { s.serve(listener).await });
            (server, join)
        };
        let base = format!("http://{addr}");
        let (server, join) = start_on(addr).await;
        let tk = toolkit("phoenix", &base, Arc::default());
        let runtime = spawn(&tk);
        assert!(server.wait_until_served("phoenix", WAIT).await);
        let llm = || {
            atp_registry::llm::LlmClient::new(LLM_KEY)
                .with_base_url(&base)
                .with_protocol(LlmProtocol::Http)
                .with_timeout(WAIT)
        };
        let echo =
            json!({"type": "tool_use", "id": "t", "name": "echo", "input": {"text": "before"}});
        assert_eq!(
            outputs(
                &llm()
                    .call_tool("phoenix", &echo, "anthropic", "")
                    .await
                    .expect("call")
            ),
            ["{\"echo\":\"before\"}"]
        );

        // The server goes away (its state is in memory: lost) …
        server.shutdown();
        tokio::time::timeout(WAIT, join)
            .await
            .expect("stops")
            .expect("no panic")
            .expect("served");
        assert!(!runtime.is_finished(), "the runtime keeps trying");

        // … and comes back on the same port: the runtime announces its
        // tools again and serves, with nobody's help.
        let (server, join) = start_on(addr).await;
        assert!(
            server.wait_until_served("phoenix", WAIT).await,
            "the toolkit reconnected"
        );
        let echo =
            json!({"type": "tool_use", "id": "t", "name": "echo", "input": {"text": "after"}});
        assert_eq!(
            outputs(
                &llm()
                    .call_tool("phoenix", &echo, "anthropic", "")
                    .await
                    .expect("call")
            ),
            ["{\"echo\":\"after\"}"]
        );

        tk.stop();
        tokio::time::timeout(WAIT, runtime)
            .await
            .expect("stops")
            .expect("no panic")
            .expect("clean stop");
        server.shutdown();
        let _ = tokio::time::timeout(WAIT, join).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_lets_the_calls_in_flight_finish() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        let started = Arc::new(Notify::new());
        let tk = toolkit("graceful", &server.base, started.clone());
        let runtime = spawn(&tk);
        server.wait_served("graceful").await;

        let llm = server.llm(LlmProtocol::WebSocket);
        let in_flight = tokio::spawn(async move {
            let gate = json!({"type": "tool_use", "id": "g", "name": "gate", "input": {}});
            llm.call_tool("graceful", &gate, "anthropic", "").await
        });
        started.notified().await;
        tk.stop();

        // The call that was running is answered with its result …
        let out = tokio::time::timeout(WAIT, in_flight)
            .await
            .expect("answered")
            .expect("no panic")
            .expect("call");
        assert_eq!(outputs(&out), ["\"finished\""]);
        // … and start() returns once it is done and the socket is closed.
        tokio::time::timeout(WAIT, runtime)
            .await
            .expect("stops")
            .expect("no panic")
            .expect("clean stop");
        assert!(!tk.is_running());
        let after = json!({"type": "tool_use", "id": "a", "name": "echo", "input": {"text": "x"}});
        let out = outputs(
            &server
                .llm(LlmProtocol::Http)
                .call_tool("graceful", &after, "anthropic", "")
                .await
                .expect("call"),
        );
        assert_eq!(out, ["Toolkit graceful is not connected"]);
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_start_is_refused_and_a_wrong_key_ends_start() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(keyed_config()).await;
        let tk = toolkit("twice", &server.base, Arc::default());
        let runtime = spawn(&tk);
        server.wait_served("twice").await;
        assert!(matches!(
            tk.start().await,
            Err(RuntimeError::AlreadyRunning)
        ));
        tk.stop();
        tokio::time::timeout(WAIT, runtime)
            .await
            .expect("stops")
            .expect("no panic")
            .expect("clean stop");

        let wrong = ToolKitClient::new("not-a-key", "intruder")
            .with_base_url(&server.base)
            .with_runtime_options(options());
        wrong
            .register_tool(Tool::new("t"), |_call: Call| async {
                Ok::<_, ToolError>(1)
            })
            .expect("valid");
        let ended = tokio::time::timeout(WAIT, wrong.start())
            .await
            .expect("start returns");
        assert!(
            matches!(ended, Err(RuntimeError::Unauthorized(_))),
            "{ended:?}"
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_noticed_and_replaced() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::{Router, extract::ws::WebSocketUpgrade, routing::any, routing::post};

    bounded(Duration::from_secs(30), async {
        // A server that takes the WebSocket and then never says a word:
        // no pongs, no close — the connection is dead but not closed.
        let connections = Arc::new(AtomicUsize::new(0));
        let second = Arc::new(Notify::new());
        let (count, notify) = (connections.clone(), second.clone());
        let app = Router::new()
            .route(
                "/api/v1/toolkit/verify_hash",
                post(|| async {
                    (
                        [("content-type", "application/json")],
                        r#"{"up_to_date": true}"#,
                    )
                }),
            )
            .route(
                "/ws/v1/atp/toolkit-client/{key}/",
                any(move |ws: WebSocketUpgrade| {
                    let (count, notify) = (count.clone(), notify.clone());
                    async move {
                        ws.on_upgrade(move |socket| async move {
                            if count.fetch_add(1, Ordering::SeqCst) >= 1 {
                                notify.notify_one();
                            }
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            drop(socket);
                        })
                    }
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });

        let tk = toolkit("silent", &base, Arc::default()).with_runtime_options(
            options()
                .ping_interval(Duration::from_millis(100))
                .grace_period(Duration::ZERO),
        );
        let runtime = spawn(&tk);
        // Two silent ping intervals later the runtime gives the connection
        // up and opens a new one.
        tokio::time::timeout(WAIT, second.notified())
            .await
            .expect("a second connection");
        assert!(connections.load(Ordering::SeqCst) >= 2);
        tk.stop();
        tokio::time::timeout(WAIT, runtime)
            .await
            .expect("stops")
            .expect("no panic")
            .expect("clean stop");
    })
    .await;
}

/// A Rust tool may return `{"error": …}` as data: the runtime flags its
/// answer, and the caller gets a result, not an error; a real failure is
/// still one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_tool_can_return_an_error_object_as_data() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(keyed_config()).await;
        let client = ToolKitClient::new(TK_KEY, "dataish")
            .with_base_url(&server.base)
            .with_runtime_options(options());
        client
            .register_tool(Tool::new("lookup"), |_call: Call| async {
                Ok::<_, ToolError>(json!({"error": "not found, as data"}))
            })
            .expect("valid");
        client
            .register_tool(Tool::new("fails"), |_call: Call| async {
                Err::<Value, _>(ToolError::new("a real failure"))
            })
            .expect("valid");
        let runtime = spawn(&client);
        server.wait_served("dataish").await;
        let blocks = json!([
            {"type": "tool_use", "id": "t1", "name": "lookup", "input": {}},
            {"type": "tool_use", "id": "t2", "name": "fails", "input": {}},
        ]);
        for protocol in [LlmProtocol::WebSocket, LlmProtocol::Http] {
            let messages = server
                .llm(protocol)
                .call_tool("dataish", &blocks, "anthropic", "")
                .await
                .expect("answered");
            let content = &messages[0]["content"];
            assert_eq!(content[0]["content"], r#"{"error":"not found, as data"}"#);
            assert_eq!(content[0].get("is_error"), None, "{protocol:?}: {content}");
            assert_eq!(content[1]["content"], "a real failure");
            assert_eq!(content[1]["is_error"], true, "{protocol:?}: {content}");
        }
        client.stop();
        tokio::time::timeout(WAIT, runtime)
            .await
            .expect("stops")
            .expect("no panic")
            .expect("clean stop");
        server.stop().await;
    })
    .await;
}

/// The inbox transport: a refused key ends `start()` with the status the
/// server gave (403 stays 403), and only after the call in flight has
/// finished and its answer has been posted (the grace period).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_inbox_poll_keeps_its_status_and_the_grace_period() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use atp_registry::runtime::Transport;
    use axum::{Router, http::StatusCode, routing::get, routing::post};

    fn json_answer(status: StatusCode, v: Value) -> impl axum::response::IntoResponse {
        (
            status,
            [("content-type", "application/json")],
            v.to_string(),
        )
    }
    use tokio::sync::Mutex;

    bounded(Duration::from_secs(30), async {
        // One request, then 403 to every poll; the answers are recorded.
        let polls = Arc::new(AtomicUsize::new(0));
        let answers: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (p, a) = (polls.clone(), answers.clone());
        let app = Router::new()
            .route(
                "/api/v1/toolkit/verify_hash",
                post(|| async { json_answer(StatusCode::OK, json!({"up_to_date": true})) }),
            )
            .route(
                "/api/v1/toolkit/{key}/inbox",
                get(move || {
                    let p = p.clone();
                    async move {
                        if p.fetch_add(1, Ordering::SeqCst) == 0 {
                            json_answer(
                                StatusCode::OK,
                                json!({"request_id": "r1", "tool_name": "slow", "params": {}}),
                            )
                        } else {
                            json_answer(StatusCode::FORBIDDEN, json!({"error": "revoked"}))
                        }
                    }
                }),
            )
            .route(
                "/api/v1/toolkit/{key}/inbox/respond",
                post(move |body: String| {
                    let a = a.clone();
                    async move {
                        a.lock()
                            .await
                            .push(serde_json::from_str(&body).unwrap_or(Value::Null));
                        json_answer(StatusCode::OK, json!({"status": "ok"}))
                    }
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });

        let tk = ToolKitClient::new(TK_KEY, "polled")
            .with_base_url(&base)
            .with_runtime_options(options().transport(Transport::Inbox {
                poll_interval: Duration::from_millis(10),
            }));
        tk.register_tool(Tool::new("slow"), |_call: Call| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, ToolError>(json!("done"))
        })
        .expect("valid");
        let ended = tokio::time::timeout(WAIT, tk.start())
            .await
            .expect("start returns");
        assert!(
            matches!(ended, Err(RuntimeError::Unauthorized(403))),
            "{ended:?}"
        );
        let answers = answers.lock().await;
        assert_eq!(answers.len(), 1, "the call in flight was answered");
        assert_eq!(answers[0]["request_id"], "r1");
        assert_eq!(answers[0]["response"], "done");
        assert_eq!(answers[0]["is_error"], false);
    })
    .await;
}
