//! The toolkit runtime with several servers (`ToolKitClient::with_base_urls`):
//! when the server it is connected to dies, it fails over to the next one
//! at once — no backoff wait — over the WebSocket and over the inbox; and a
//! first URL that is dead from the start costs one failed connection.
//!
//! The backoff is 30 s from its first step here, so a failover that waited
//! for it would miss the `PROMPT` bound.

use std::time::{Duration, Instant};

use atp_registry::{
    ToolKitClient,
    llm::LlmProtocol,
    runtime::{RuntimeError, RuntimeOptions, Transport},
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::common::*;

/// The bound of a failover: well under the backoff (30 s, at least 15 s
/// with the jitter).
const PROMPT: Duration = Duration::from_secs(5);

const INBOX: Transport = Transport::Inbox {
    poll_interval: Duration::from_millis(10),
};

fn toolkit(app: &str, urls: [&str; 2], transport: Transport) -> ToolKitClient {
    demo_toolkit(TK_KEY, app, urls[0])
        .with_base_urls(urls)
        .with_runtime_options(
            RuntimeOptions::default()
                .transport(transport)
                .handle_ctrl_c(false)
                .backoff(Duration::from_secs(30), Duration::from_secs(30))
                .grace_period(Duration::from_secs(1))
                .request_timeout(Duration::from_secs(5)),
        )
}

fn spawn(client: &ToolKitClient) -> JoinHandle<Result<(), RuntimeError>> {
    let client = client.clone();
    tokio::spawn(async move { client.start().await })
}

/// Calls the toolkit's `echo` through `server` and checks the answer.
async fn echo_through(server: &TestServer, app: &str, text: &str) {
    let call = json!({"type": "tool_use", "id": "t", "name": "echo", "input": {"text": text}});
    let messages = server
        .llm(LlmProtocol::Http)
        .call_tool(app, &call, "anthropic", "")
        .await
        .expect("the call is answered");
    let out = outputs(&messages);
    assert_eq!(out.len(), 1, "{messages:?}");
    let out: Value = serde_json::from_str(&out[0]).expect("JSON");
    assert_eq!(out, json!({"echo": text, "app": app}));
}

/// Waits (at most `PROMPT`) until `server` serves `app`.
async fn served_promptly(server: &TestServer, app: &str) {
    let started = Instant::now();
    assert!(
        server.server.wait_until_served(app, PROMPT).await,
        "the toolkit {app} did not reach the next server within {PROMPT:?}"
    );
    eprintln!(
        "{app}: served by the next server after {:?}",
        started.elapsed()
    );
}

async fn stop(tk: &ToolKitClient, runtime: JoinHandle<Result<(), RuntimeError>>) {
    tk.stop();
    tokio::time::timeout(WAIT, runtime)
        .await
        .expect("the runtime stops in time")
        .expect("no panic")
        .expect("a clean stop");
}

/// A and B serve; the toolkit, given `[A, B]`, connects to A. A dies: the
/// toolkit is served by B promptly and a call through B is answered.
async fn fails_over_when_its_server_dies(app: &str, transport: Transport) {
    bounded(Duration::from_secs(60), async {
        let a = TestServer::start(keyed_config()).await;
        let b = TestServer::start(keyed_config()).await;
        let tk = toolkit(app, [&a.base, &b.base], transport);
        let _guard = StopOnDrop(tk.clone());
        let runtime = spawn(&tk);

        a.wait_served(app).await;
        assert!(!b.server.is_registered(app), "the first URL is preferred");
        echo_through(&a, app, "through A").await;

        a.stop().await;
        served_promptly(&b, app).await;
        assert!(!runtime.is_finished(), "the runtime keeps serving");
        echo_through(&b, app, "through B").await;

        stop(&tk, runtime).await;
        b.stop().await;
    })
    .await;
}

/// The first URL is a port nothing listens on: the toolkit is served by
/// the second one promptly.
async fn skips_a_dead_first_url(app: &str, transport: Transport) {
    bounded(Duration::from_secs(60), async {
        let dead = {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            format!("http://{}", listener.local_addr().expect("addr"))
        };
        let b = TestServer::start(keyed_config()).await;
        let tk = toolkit(app, [&dead, &b.base], transport);
        let _guard = StopOnDrop(tk.clone());
        let runtime = spawn(&tk);

        served_promptly(&b, app).await;
        echo_through(&b, app, "through B").await;

        stop(&tk, runtime).await;
        b.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_fails_over_to_the_next_server_when_its_server_dies() {
    fails_over_when_its_server_dies("failover-ws", Transport::WebSocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_fails_over_to_the_next_server_when_its_server_dies() {
    fails_over_when_its_server_dies("failover-inbox", INBOX).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_skips_a_dead_first_url_at_once() {
    skips_a_dead_first_url("dead-first-ws", Transport::WebSocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_skips_a_dead_first_url_at_once() {
    skips_a_dead_first_url("dead-first-inbox", INBOX).await;
}
