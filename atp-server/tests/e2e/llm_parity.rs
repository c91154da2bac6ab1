//! The Rust `LlmClient` against `atp-server`: every method of the Python
//! `LLMClient` (docs/PROTOCOL.md §6, §9) — streaming, app sessions, webhooks,
//! the store, `sequential` and an explicit `auth_token` — over the
//! WebSocket and over HTTP wherever the protocol has both.

use std::time::Duration;

use atp_registry::{
    Secret, ToolKitClient,
    llm::{AppUpdate, CallOptions, LlmClient, LlmError, LlmProtocol, StreamEvent},
    runtime::Transport,
    webhook,
    wire::WebhookEvent,
};
use atp_server::{Config, Developer};
use axum::{Router, body::Bytes, extract::State, http::HeaderMap, routing::post};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};

use crate::{
    apps::{OTHER_LLM_KEY, ScriptedToolkit, register, register_params, two_llm_keys},
    common::*,
};

const PROTOCOLS: [LlmProtocol; 2] = [LlmProtocol::WebSocket, LlmProtocol::Http];

/// The demo toolkit served over its WebSocket; stopped when dropped, so
/// that a failing test does not leave its runtime reconnecting forever.
struct Serving {
    toolkit: ToolKitClient,
    runtime: Option<JoinHandle<()>>,
}

impl Serving {
    fn demo(server: &TestServer) -> Self {
        let toolkit = demo_toolkit(TK_KEY, "Demo", &server.base);
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        Self {
            toolkit,
            runtime: Some(runtime),
        }
    }

    async fn stop(mut self) {
        self.toolkit.stop();
        if let Some(runtime) = self.runtime.take() {
            tokio::time::timeout(WAIT, runtime)
                .await
                .expect("the toolkit stops")
                .expect("no panic");
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.toolkit.stop();
    }
}

fn client(server: &TestServer, key: &str, protocol: LlmProtocol) -> LlmClient {
    LlmClient::new(key)
        .with_base_url(&server.base)
        .with_protocol(protocol)
        .with_timeout(WAIT)
}

/// Every item of a stream (each within [`WAIT`]); panics on an error.
async fn events(mut stream: atp_registry::llm::EventStream) -> Vec<StreamEvent> {
    let mut out = Vec::new();
    while let Some(event) = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("an event in time")
    {
        out.push(event.expect("no error"));
    }
    out
}

/// Two OpenAI Responses calls of the scripted toolkit's `work` tool.
fn two_work_calls() -> Value {
    json!([
        {"type": "function_call", "call_id": "call_a", "name": "work", "arguments": "{\"steps\": 2}"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "call_b", "name": "work", "arguments": "{\"steps\": 3}"}
    ])
}

/// The progress steps of call `i`, and whether its last event is its end.
fn progress_of(events: &[StreamEvent], i: usize) -> (Vec<(f64, Option<f64>, String)>, bool) {
    let mut steps = Vec::new();
    let mut last_is_end = false;
    for e in events {
        match e {
            StreamEvent::Progress(p) if p.call == i => {
                assert_eq!(p.tool, "work");
                steps.push((
                    p.progress.progress,
                    p.progress.total,
                    p.progress.message.clone().unwrap_or_default(),
                ));
                last_is_end = false;
            }
            StreamEvent::Finished(f) if f.call == i => last_is_end = true,
            _ => {}
        }
    }
    (steps, last_is_end)
}

fn expected_steps(n: u32) -> Vec<(f64, Option<f64>, String)> {
    (1..=n)
        .map(|i| (f64::from(i), Some(f64::from(n)), format!("step {i}")))
        .collect()
}

#[tokio::test]
async fn tool_calls_stream_their_progress_over_websocket_and_http() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        register_params(&server, TK_KEY, "kit", "work", &["steps"]).await;
        let _tk = ScriptedToolkit::start(&server, TK_KEY).await;
        server.wait_served("kit").await;
        let expected_messages = vec![
            json!({"type": "function_call_output", "call_id": "call_a", "output": "{\"done\":2}"}),
            json!({"type": "function_call_output", "call_id": "call_b", "output": "{\"done\":3}"}),
        ];
        for protocol in PROTOCOLS {
            let llm = client(&server, LLM_KEY, protocol);
            for sequential in [false, true] {
                let options = CallOptions::new().sequential(sequential);
                let got = events(llm.call_tool_streaming_with(
                    "kit",
                    &two_work_calls(),
                    "openai",
                    "Do the work.",
                    &options,
                ))
                .await;
                let what = format!("{protocol:?}, sequential {sequential}: {got:?}");
                assert_eq!(progress_of(&got, 0), (expected_steps(2), true), "{what}");
                assert_eq!(progress_of(&got, 1), (expected_steps(3), true), "{what}");
                assert_eq!(got.len(), 2 + 3 + 2 + 1, "{what}");
                assert_eq!(
                    got.last(),
                    Some(&StreamEvent::Messages(expected_messages.clone())),
                    "{what}"
                );
                if sequential {
                    // Call 0's events all come before call 1's.
                    let first_of_1 = got
                        .iter()
                        .position(|e| matches!(e, StreamEvent::Progress(p) if p.call == 1));
                    let end_of_0 = got
                        .iter()
                        .position(|e| matches!(e, StreamEvent::Finished(f) if f.call == 0));
                    assert!(end_of_0 < first_of_1, "{what}");
                }
            }
            // The same calls, not streamed, give the same messages.
            let messages = llm
                .call_tool("kit", &two_work_calls(), "openai", "")
                .await
                .expect("answers");
            assert_eq!(messages, expected_messages, "{protocol:?}");

            // A failure is an outcome, as in call_tool.
            let got =
                events(llm.call_tool_streaming("nope", &two_work_calls(), "openai", "")).await;
            match got.last() {
                Some(StreamEvent::Messages(m)) => {
                    assert_eq!(m.len(), 2);
                    assert!(
                        m[0]["output"]
                            .as_str()
                            .is_some_and(|o| o.to_lowercase().contains("not found")),
                        "{m:?}"
                    );
                }
                other => panic!("{protocol:?}: {other:?}"),
            }

            // The context, streamed.
            let got = events(llm.get_toolkit_context_streaming("kit", "anthropic", "hi")).await;
            match &got[..] {
                [StreamEvent::Context(c)] => {
                    assert_eq!(c["toolkit_id"], "kit", "{c}");
                    assert_eq!(c["tools"][0]["name"], "work", "{c}");
                    assert!(c["tools"][0]["input_schema"].is_object(), "{c}");
                }
                other => panic!("{protocol:?}: {other:?}"),
            }
        }
        // A wrong key is a typed error, streamed or not.
        for protocol in PROTOCOLS {
            let wrong = client(&server, "wrong-key", protocol);
            let mut stream = wrong.call_tool_streaming("kit", &two_work_calls(), "openai", "");
            let first = tokio::time::timeout(WAIT, stream.next())
                .await
                .expect("in time");
            assert!(
                matches!(first, Some(Err(LlmError::AuthRefused(_)))),
                "{protocol:?}: {first:?}"
            );
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn call_options_send_the_token_and_run_in_turn() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        let demo = Serving::demo(&server);
        server.wait_served("Demo").await;
        let whoami = json!([{"type": "tool_use", "id": "toolu_1", "name": "whoami", "input": {}}]);
        for protocol in PROTOCOLS {
            let llm = client(&server, LLM_KEY, protocol);
            let options = CallOptions::new().auth_token("explicit-token");
            let out = llm
                .call_tool_with("Demo", &whoami, "anthropic", "", &options)
                .await
                .expect("an answer");
            assert_eq!(
                outputs(&out),
                [r#"{"token":"explicit-token"}"#],
                "{protocol:?}"
            );
            // call_tool_as still works, and delegates.
            let out = llm
                .call_tool_as(
                    "Demo",
                    &whoami,
                    "anthropic",
                    "",
                    None,
                    Some(&Secret::from("as-token")),
                )
                .await
                .expect("an answer");
            assert_eq!(outputs(&out), [r#"{"token":"as-token"}"#], "{protocol:?}");
            // Sequential: two slow calls take the sum of their times; at
            // once, about the longer one.
            let slow = json!([
                {"type": "tool_use", "id": "t1", "name": "slow", "input": {"ms": 300}},
                {"type": "tool_use", "id": "t2", "name": "slow", "input": {"ms": 300}}
            ]);
            let started = tokio::time::Instant::now();
            let out = llm
                .call_tool_with(
                    "Demo",
                    &slow,
                    "anthropic",
                    "",
                    &CallOptions::new().sequential(true),
                )
                .await
                .expect("answers");
            assert!(
                started.elapsed() >= Duration::from_millis(600),
                "{protocol:?}"
            );
            assert_eq!(outputs(&out), [r#"{"slept":300}"#, r#"{"slept":300}"#]);
            // A timeout of its own.
            let quick = CallOptions::new().timeout(Duration::from_millis(100));
            let one =
                json!([{"type": "tool_use", "id": "t1", "name": "slow", "input": {"ms": 2000}}]);
            assert_eq!(
                llm.call_tool_with("Demo", &one, "anthropic", "", &quick)
                    .await,
                Err(LlmError::Timeout(Duration::from_millis(100))),
                "{protocol:?}"
            );
        }
        demo.stop().await;
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn app_sessions_over_websocket_and_http() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(two_llm_keys()).await;
        register(&server, TK_KEY, "kit", "counter").await;
        let mut tk = ScriptedToolkit::start(&server, TK_KEY).await;
        server.wait_served("kit").await;
        for protocol in PROTOCOLS {
            let llm = client(&server, LLM_KEY, protocol);
            let token = Secret::from("user-token");
            let session = llm
                .start_app("kit", "counter", &json!({"start": 5}), Some(&token))
                .await
                .expect("a session");
            assert_eq!(
                session.ui_content,
                json!({"count": 5, "token": "user-token"})
            );
            assert!(session.session_id.len() >= 32, "{session:?}");
            let got = tk.next_seen("atp_app_request").await;
            assert_eq!(got["payload"]["request_id"], session.session_id.as_str());
            let id = session.session_id.as_str();

            let update = llm
                .app_action(id, &json!({"add": 2}))
                .await
                .expect("an update");
            assert_eq!(
                update,
                AppUpdate {
                    session_id: id.to_owned(),
                    ui_content: json!({"count": 7}),
                    terminated: false
                }
            );
            // The app's error keeps its code; the session goes on.
            match llm.app_action(id, &json!({"fail": true})).await {
                Err(LlmError::App { code, message }) => {
                    assert_eq!(code, "app_error");
                    assert!(message.contains("boom"), "{message}");
                }
                other => panic!("{protocol:?}: {other:?}"),
            }
            // Another key cannot touch it.
            let other = client(&server, OTHER_LLM_KEY, protocol);
            assert!(matches!(
                other.app_action(id, &json!({"add": 1})).await,
                Err(LlmError::App { code, .. }) if code == "session_not_found"
            ));
            // The app ends it itself.
            let update = llm
                .app_action(id, &json!({"add": 1, "stop": true}))
                .await
                .expect("an update");
            assert!(update.terminated);
            assert_eq!(update.ui_content, json!({"count": 8}));
            assert!(matches!(
                llm.app_action(id, &json!({"add": 1})).await,
                Err(LlmError::App { code, .. }) if code == "session_ended"
            ));

            // Terminated by the client: the toolkit is told.
            let second = llm
                .start_app("kit", "counter", &Value::Null, None)
                .await
                .expect("a session");
            llm.terminate_app(&second.session_id).await.expect("ended");
            let got = tk.next_seen("atp_app_terminate").await;
            assert_eq!(got["payload"]["request_id"], second.session_id.as_str());
            assert!(matches!(
                llm.app_action(&second.session_id, &json!({})).await,
                Err(LlmError::App { code, .. }) if code == "session_ended"
            ));

            // Unknown toolkits, apps and sessions.
            for (result, expected) in [
                (
                    llm.start_app("nope", "counter", &json!({}), None)
                        .await
                        .map(|_| ()),
                    "toolkit_not_found",
                ),
                (
                    llm.start_app("kit", "nope", &json!({}), None)
                        .await
                        .map(|_| ()),
                    "app_not_found",
                ),
                (
                    llm.app_action("no-such-session", &json!({}))
                        .await
                        .map(|_| ()),
                    "session_not_found",
                ),
                (
                    llm.terminate_app("no-such-session").await,
                    "session_not_found",
                ),
            ] {
                assert!(
                    matches!(&result, Err(LlmError::App { code, .. }) if code == expected),
                    "{protocol:?}: {result:?}, not {expected}"
                );
            }
        }
        server.stop().await;
    })
    .await;
}

/// A webhook receiver as an app would write one: it checks the signature
/// with `atp_registry::webhook::verify_delivery` and passes on what it got.
#[derive(Clone)]
struct Receiver {
    secret: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    got: mpsc::UnboundedSender<Result<atp_registry::wire::WebhookDelivery, String>>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> &'static str {
    let secret = r.secret.lock().expect("lock").clone().unwrap_or_default();
    let header = headers
        .get(webhook::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok());
    let checked =
        webhook::verify_delivery(secret.as_bytes(), header, &body).map_err(|e| e.to_string());
    let _ = r.got.send(checked);
    "ok"
}

#[tokio::test]
async fn webhooks_are_registered_listed_deleted_and_delivered() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(two_llm_keys()).await;
        let (got_tx, mut got) = mpsc::unbounded_channel();
        let receiver = Receiver {
            secret: Default::default(),
            got: got_tx,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let hook_url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(receiver.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });

        // Webhooks are HTTP whatever the client's protocol.
        let llm = client(&server, LLM_KEY, LlmProtocol::WebSocket);
        let hook = llm
            .register_webhook(
                &hook_url,
                &[
                    WebhookEvent::ToolkitConnected,
                    WebhookEvent::ToolkitDisconnected,
                ],
            )
            .await
            .expect("registered");
        assert_eq!(hook.url, hook_url);
        assert_eq!(hook.events, ["toolkit_connected", "toolkit_disconnected"]);
        let secret = hook
            .secret
            .clone()
            .expect("the registration carries the secret");
        assert!(secret.expose().len() >= 32);
        *receiver.secret.lock().expect("lock") = Some(secret.expose().to_owned());
        // No events: the Python client's default.
        let default = llm
            .register_webhook("https://example.com/other", &[])
            .await
            .expect("registered");
        assert_eq!(default.events, ["connection_success"]);

        let list = llm.list_webhooks().await.expect("a list");
        let ids: Vec<&str> = list.iter().map(|w| w.webhook_id.as_str()).collect();
        assert_eq!(ids, [hook.webhook_id.as_str(), default.webhook_id.as_str()]);
        assert!(list.iter().all(|w| w.secret.is_none()));
        // Another key's list is its own.
        let other = client(&server, OTHER_LLM_KEY, LlmProtocol::Http);
        assert_eq!(other.list_webhooks().await, Ok(vec![]));
        assert!(matches!(
            other.delete_webhook(&hook.webhook_id).await,
            Err(LlmError::Server {
                status: Some(404),
                ..
            })
        ));
        llm.delete_webhook(&default.webhook_id)
            .await
            .expect("deleted");
        assert!(matches!(
            llm.delete_webhook(&default.webhook_id).await,
            Err(LlmError::Server {
                status: Some(404),
                ..
            })
        ));
        assert_eq!(llm.list_webhooks().await.expect("a list").len(), 1);
        // Refusals are typed.
        assert!(matches!(
            llm.register_webhook("ftp://example.com/", &[]).await,
            Err(LlmError::Server {
                status: Some(400),
                ..
            })
        ));
        assert!(matches!(
            client(&server, "wrong-key", LlmProtocol::Http)
                .list_webhooks()
                .await,
            Err(LlmError::AuthRefused(_))
        ));

        // A toolkit comes online: the receiver gets a signed delivery.
        let demo = Serving::demo(&server);
        server.wait_served("Demo").await;
        let delivery = tokio::time::timeout(WAIT, got.recv())
            .await
            .expect("a delivery in time")
            .expect("the receiver runs")
            .expect("a valid signature");
        assert_eq!(delivery.event, "toolkit_connected");
        assert_eq!(delivery.webhook_id, hook.webhook_id);
        assert!(
            delivery.data.to_string().contains("Demo"),
            "{:?}",
            delivery.data
        );
        demo.stop().await;
        server.stop().await;
    })
    .await;
}

/// A developer whose display name needs percent-encoding in a path.
fn developer(name: &str, keys: &str, public: &[&str]) -> Developer {
    Developer {
        display_name: name.into(),
        name: format!("{name} (full name)"),
        bio: format!("{name} writes toolkits"),
        toolkit_api_keys: vec![Secret::new(format!("{keys}-tk"))],
        llm_api_keys: vec![Secret::new(format!("{keys}-llm"))],
        public_toolkits: public.iter().map(|p| (*p).to_owned()).collect(),
    }
}

#[tokio::test]
async fn the_store_and_developer_profiles() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(Config {
            developers: vec![developer("ada lovelace", "ada", &["ada-public"])],
            ..keyed_config()
        })
        .await;
        register(&server, "ada-tk", "ada-public", "alpha").await;
        register(&server, "ada-tk", "ada-public", "beta").await;
        register(&server, "ada-tk", "ada-private", "secret").await;
        let ada = client(&server, "ada-llm", LlmProtocol::Http);
        let stranger = client(&server, LLM_KEY, LlmProtocol::WebSocket);

        let page = stranger.list_store_toolkits(1, 10).await.expect("a page");
        assert_eq!((page.count, page.page, page.page_size), (1, 1, 10));
        let kit = &page.results[0];
        assert_eq!(kit.toolkit_id, "ada-public");
        assert_eq!(kit.developer.as_deref(), Some("ada lovelace"));
        assert!(kit.public);
        assert_eq!(kit.tools_count, 2);
        let past = stranger.list_store_toolkits(2, 1).await.expect("a page");
        assert_eq!(
            (past.count, past.page, past.page_size, past.results.len()),
            (1, 2, 1, 0)
        );

        let mine = ada.list_my_toolkits(1, 10).await.expect("a page");
        let ids: Vec<&str> = mine.results.iter().map(|t| t.toolkit_id.as_str()).collect();
        assert_eq!(ids, ["ada-private", "ada-public"]);
        let one = ada.list_my_toolkits(2, 1).await.expect("a page");
        assert_eq!((one.count, one.results.len()), (2, 1));

        let details = ada
            .get_toolkit_details("ada-private")
            .await
            .expect("details");
        assert!(!details.toolkit.public);
        assert_eq!(details.tools[0].function, "secret");
        assert!(matches!(
            stranger.get_toolkit_details("ada-private").await,
            Err(LlmError::Server {
                status: Some(404),
                ..
            })
        ));
        // A name that needs percent-encoding in a path.
        assert!(matches!(
            stranger.get_toolkit_details("a/b c").await,
            Err(LlmError::Server {
                status: Some(404),
                ..
            })
        ));

        let profile = stranger
            .get_developer_profile("ada lovelace")
            .await
            .expect("a profile");
        assert_eq!(profile.display_name, "ada lovelace");
        assert_eq!(profile.name, "ada lovelace (full name)");
        let public: Vec<&str> = profile
            .toolkits
            .iter()
            .map(|t| t.toolkit_id.as_str())
            .collect();
        assert_eq!(public, ["ada-public"]);
        assert!(matches!(
            stranger.get_developer_profile("nobody").await,
            Err(LlmError::Server {
                status: Some(404),
                ..
            })
        ));
        assert!(matches!(
            client(&server, "wrong-key", LlmProtocol::Http)
                .list_store_toolkits(1, 10)
                .await,
            Err(LlmError::AuthRefused(_))
        ));
        server.stop().await;
    })
    .await;
}
