//! Three servers, one platform: they share a PostgreSQL database and route
//! calls over NATS (docs/DEPLOY.md). A toolkit connected to one is called
//! through the others, over HTTP and WebSocket, as tools and as apps.

use std::time::Duration;

use atp_registry::{
    AppCall, AppReply, Tool, ToolError,
    llm::{LlmError, LlmProtocol},
    runtime::Transport,
};
use atp_server::{Config, DbLocation, NatsUrl};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    common::*,
    infra::{Nats, Postgres},
};

/// PostgreSQL, NATS and `n` servers sharing them (`None`: not installed,
/// and the harness said so).
pub(crate) async fn cluster(n: usize) -> Option<(Postgres, Nats, Vec<TestServer>)> {
    let pg = Postgres::start()?;
    let nats = Nats::start()?;
    let mut servers = Vec::new();
    for _ in 0..n {
        servers.push(TestServer::start_connected(cluster_config(&pg, &nats)).await);
    }
    Some((pg, nats, servers))
}

/// The admin key of the cluster's servers.
const CLUSTER_ADMIN_KEY: &str = "cluster-admin-key-0123456789";

/// The keyed test config, on the shared database and bus.
pub(crate) fn cluster_config(pg: &Postgres, nats: &Nats) -> Config {
    Config {
        db: DbLocation::Postgres(pg.url.clone()),
        nats_url: Some(NatsUrl(nats.url.clone())),
        admin_api_keys: vec![CLUSTER_ADMIN_KEY.into()],
        ..keyed_config()
    }
}

/// The audit rows of `query`, read through `server`.
async fn audit_rows(server: &TestServer, query: &str) -> Vec<Value> {
    let (status, answer) = http_json(
        "GET",
        &format!("{}/admin/audit?{query}", server.base),
        &[("authorization", &format!("Bearer {CLUSTER_ADMIN_KEY}"))],
        None,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    answer["rows"].as_array().cloned().unwrap_or_default()
}

/// Calls `hello_world` through `server` over `protocol`.
async fn hello(server: &TestServer, protocol: LlmProtocol, app: &str, name: &str) -> Value {
    let calls = json!([{"type": "function_call", "call_id": "c1", "name": "hello_world",
        "arguments": json!({"name": name}).to_string()}]);
    let messages = server
        .llm(protocol)
        .call_tool(app, &calls, "openai", "")
        .await
        .unwrap_or_else(|e| panic!("{protocol:?} through {}: {e}", server.base));
    serde_json::from_str(&outputs(&messages)[0]).expect("JSON")
}

#[tokio::test]
async fn a_toolkit_on_one_server_is_called_through_the_others() {
    bounded(Duration::from_secs(90), async {
        let Some((_pg, _nats, servers)) = cluster(3).await else {
            return;
        };
        let (a, b, c) = (&servers[0], &servers[1], &servers[2]);
        let toolkit = demo_toolkit(TK_KEY, "demo", &a.base);
        let _stop = StopOnDrop(toolkit.clone());
        let _runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        for s in [a, b, c] {
            s.wait_served("demo").await;
        }
        for s in [b, c, a] {
            for protocol in [LlmProtocol::Http, LlmProtocol::WebSocket] {
                assert_eq!(
                    hello(s, protocol, "demo", "Ada").await,
                    json!({"message": "Hello, Ada!"})
                );
            }
            // Every instance comes to know all six tools (each announced
            // tool is a change the others re-read: eventually, within the
            // bound).
            let all_six = async {
                loop {
                    let context = s
                        .llm(LlmProtocol::Http)
                        .get_toolkit_context("demo", "openai", "")
                        .await
                        .expect("context");
                    if context["tools"].as_array().map(Vec::len) == Some(6) {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(WAIT, all_six)
                .await
                .expect("every instance knows the six tools");
        }
        // A failing tool's error crosses too, as the tool's error.
        let calls =
            json!([{"type": "function_call", "call_id": "c1", "name": "fails", "arguments": "{}"}]);
        let out = outputs(
            &b.llm(LlmProtocol::Http)
                .call_tool("demo", &calls, "openai", "")
                .await
                .expect("call"),
        );
        assert_eq!(out, ["this tool always fails"]);
        // Many at once, from both other servers.
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..40 {
            let base = if i % 2 == 0 {
                b.base.clone()
            } else {
                c.base.clone()
            };
            calls.spawn(async move {
                let llm = atp_registry::llm::LlmClient::new(LLM_KEY)
                    .with_base_url(&base)
                    .with_timeout(WAIT);
                let calls = json!([{"type": "function_call", "call_id": "c", "name": "echo",
                    "arguments": json!({"text": format!("n{i}")}).to_string()}]);
                let out = outputs(
                    &llm.call_tool("demo", &calls, "openai", "")
                        .await
                        .expect("call"),
                );
                let v: Value = serde_json::from_str(&out[0]).expect("JSON");
                assert_eq!(v["echo"], format!("n{i}"));
            });
        }
        while let Some(r) = calls.join_next().await {
            r.expect("no panic");
        }
    })
    .await;
}

#[tokio::test]
async fn an_inbox_toolkit_polling_one_server_is_called_through_another() {
    bounded(Duration::from_secs(90), async {
        let Some((_pg, _nats, servers)) = cluster(2).await else {
            return;
        };
        let (a, b) = (&servers[0], &servers[1]);
        let toolkit = demo_toolkit(TK_KEY, "inboxed", &a.base);
        let _stop = StopOnDrop(toolkit.clone());
        let _runtime = serve_toolkit(
            &toolkit,
            Transport::Inbox {
                poll_interval: Duration::from_millis(10),
            },
        );
        b.wait_served("inboxed").await;
        for protocol in [LlmProtocol::Http, LlmProtocol::WebSocket] {
            assert_eq!(
                hello(b, protocol, "inboxed", "Grace").await,
                json!({"message": "Hello, Grace!"})
            );
        }
    })
    .await;
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Counter {
    count: i64,
}

async fn counter(call: AppCall<Counter>) -> Result<AppReply<Counter>, ToolError> {
    match call {
        AppCall::Start { .. } => Ok(AppReply::new(json!({"count": 0})).state(Counter::default())),
        AppCall::Action {
            action_data, state, ..
        } => {
            let mut c = state;
            c.count += action_data["add"].as_i64().unwrap_or(1);
            Ok(AppReply::new(json!({"count": c.count})).state(c))
        }
    }
}

#[tokio::test]
async fn an_app_session_started_on_one_server_goes_on_through_the_others() {
    let spans = &capture().spans;
    bounded(Duration::from_secs(90), async {
        let Some((_pg, _nats, servers)) = cluster(3).await else {
            return;
        };
        let (a, b, c) = (&servers[0], &servers[1], &servers[2]);
        let toolkit = atp_registry::ToolKitClient::new(TK_KEY, "games").with_base_url(&a.base);
        toolkit
            .register_typed_app(Tool::new("counter").description("Counts."), counter)
            .expect("valid");
        let _stop = StopOnDrop(toolkit.clone());
        let _runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        b.wait_served("games").await;
        c.wait_served("games").await;
        let session = b
            .llm(LlmProtocol::Http)
            .start_app("games", "counter", &Value::Null, None)
            .await
            .expect("started through B");
        assert_eq!(session.ui_content, json!({"count": 0}));
        let update = c
            .llm(LlmProtocol::WebSocket)
            .app_action(&session.session_id, &json!({"add": 2}))
            .await
            .expect("action through C");
        assert_eq!(update.ui_content, json!({"count": 2}));
        // One trace from the client through A (over NATS) to the app.
        let trace_id = spans.newest_trace_id(|r| {
            r.name == "atp.llm.app" && r.field("session") == Some(session.session_id.as_str())
        });
        let mut names: Vec<&str> = spans
            .find(|r| r.field("trace_id") == Some(trace_id.as_str()))
            .iter()
            .map(|r| r.name)
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["atp.app", "atp.llm.app", "atp.server.app"]);
        let update = a
            .llm(LlmProtocol::Http)
            .app_action(&session.session_id, &json!({"add": 3}))
            .await
            .expect("action through A");
        assert_eq!(update.ui_content, json!({"count": 5}));
        // Another key's client can not touch it, through any server.
        b.llm(LlmProtocol::Http)
            .terminate_app(&session.session_id)
            .await
            .expect("terminated through B");
        let after = c
            .llm(LlmProtocol::Http)
            .app_action(&session.session_id, &json!({"add": 1}))
            .await;
        assert!(
            matches!(&after, Err(LlmError::App { code, .. }) if code == "session_ended"),
            "{after:?}"
        );

        // The start left its row where it came in (B); each action its
        // row on A, which holds the session, with the way it came in.
        // (Reading through a server writes its queued rows first: B's,
        // then A's.)
        audit_rows(b, "toolkit=games").await;
        let rows = audit_rows(a, "toolkit=games&tool=counter&outcome=ok").await;
        let seen: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| {
                (
                    r["via"].as_str().unwrap_or_default(),
                    r["transport"].as_str().unwrap_or_default(),
                )
            })
            .collect();
        for row in [
            ("llm_http", "remote"),
            ("llm_websocket", "websocket"),
            ("llm_http", "websocket"),
        ] {
            assert!(seen.contains(&row), "{row:?} in {rows:#?}");
        }
        assert_eq!(rows.len(), 3, "{rows:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_toolkits_and_clients_across_servers() {
    use crate::python::{check_python_llm_output, python_llm, python_sdk, python_toolkit, scratch};
    if !python_sdk() {
        return;
    }
    bounded(Duration::from_secs(240), async {
        let Some((_pg, _nats, servers)) = cluster(3).await else {
            return;
        };
        let (a, b, c) = (&servers[0], &servers[1], &servers[2]);
        // The published SDK's toolkit on A, over WebSocket and over its
        // HTTP inbox; a Rust toolkit on A too.
        let (mut ws_kit, ws_log) = python_toolkit("cluster", &a.base, "pyws", "ws");
        let (mut inbox_kit, inbox_log) = python_toolkit("cluster", &a.base, "pyinbox", "http");
        let rust_kit = demo_toolkit(TK_KEY, "rustapp", &a.base);
        let _stop = StopOnDrop(rust_kit.clone());
        let _runtime = serve_toolkit(&rust_kit, Transport::WebSocket);
        for (app, log) in [("pyws", &ws_log), ("pyinbox", &inbox_log)] {
            for s in [b, c] {
                assert!(
                    s.server
                        .wait_until_served(app, Duration::from_secs(30))
                        .await,
                    "{app} never seen from {}; its log: {}",
                    s.base,
                    log.display()
                );
            }
        }
        c.wait_served("rustapp").await;
        // The published SDK's LLM client, through B and C, both protocols.
        for (app, s) in [("pyws", b), ("pyinbox", c), ("rustapp", b)] {
            for protocol in ["ws", "http"] {
                let out = python_llm("cluster", &s.base, app, protocol).await;
                check_python_llm_output(&out, app);
            }
        }
        let _ = ws_kit.kill().await;
        let _ = inbox_kit.kill().await;
    })
    .await;
    let _ = std::fs::remove_dir_all(scratch("cluster"));
}
