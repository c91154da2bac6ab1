//! Parity with the published Python SDK beyond its README: its
//! `LLMClient`'s streaming, webhook and store methods against atp-server
//! with a Rust toolkit, a webhook delivery after an OAuth flow checked
//! with the secret Python got, and a Python toolkit's app function driven
//! through a whole session by the Rust `LlmClient` (with the execution it
//! reported in the server's log).
//!
//! Skipped, loudly, without the Python SDK — unless `ATP_REQUIRE_PYTHON=1`.

use std::{path::PathBuf, process::Stdio, time::Duration};

use atp_registry::{
    Call, Tool, ToolError, ToolKitClient,
    llm::{LlmError, LlmProtocol},
    runtime::Transport,
    webhook,
};
use atp_server::{Config, DbLocation, Developer};
use serde_json::{Value, json};
use tokio::{io::AsyncBufReadExt, process::Command};

use crate::{
    apps::register,
    common::*,
    hooks::{Hook, Receiver},
    python::{python_sdk, scratch, script},
    webhooks::{ACCESS_TOKEN, REFRESH_TOKEN, callback, platform, start_flow, start_provider},
};

const PARITY_LLM_PY: &str = r#"
import json, sys
from atp_sdk.clients import LLMClient

base, key, app, hook = sys.argv[1:5]
llm = LLMClient(api_key=key, protocol="http", base_url=base)
out = {}
out["stream"] = list(llm.call_tool_streaming(
    app, [{"type": "function_call", "call_id": "c1", "name": "count_to", "arguments": "{\"n\": 3}"}],
    provider="openai"))
out["context_stream"] = list(llm.get_toolkit_context_streaming(app, "hi", provider="anthropic"))
out["webhook"] = llm.register_webhook(hook, events=["connection_success"])
out["webhooks"] = llm.list_webhooks()
out["store"] = llm.list_store_toolkits()
out["mine"] = llm.list_my_toolkits()
out["details"] = llm.get_toolkit_details(app)
out["profile"] = llm.get_developer_profile("ada")
try:
    llm.get_toolkit_details("bobkit")
    out["bob_details"] = "visible"
except Exception as e:
    out["bob_details"] = str(e)
print(json.dumps(out), flush=True)
"#;

const DELETE_WEBHOOK_PY: &str = r#"
import json, sys
from atp_sdk.clients import LLMClient

base, key, webhook_id = sys.argv[1:4]
llm = LLMClient(api_key=key, protocol="http", base_url=base)
llm.delete_webhook(webhook_id)
print(json.dumps(llm.list_webhooks()), flush=True)
"#;

/// A Python inbox toolkit with an app, served by the SDK's own app
/// handlers (`_handle_app_*_http`): its WebSocket path cannot serve apps
/// (its `atp_app_request` branch reads an unbound `payload`), and its
/// inbox loop only runs tools, so this loop hands each inbox entry to the
/// handler its `message_type` names. It also reports an execution with the
/// exchange token its registration got.
const APP_TOOLKIT_PY: &str = r#"
import sys, time
from atp_sdk.clients import ToolKitClient

base, key, app = sys.argv[1:4]
client = ToolKitClient(api_key=key, app_name=app, base_url=base, protocol="http", auto_restart=False)

@client.register_tool(function_name="counter", params=["start"], required_params=[],
                      description="A counter app.", auth_provider=None, auth_type=None, auth_with=None)
def counter(action=None, action_data=None, current_state=None, auth_token=None, **params):
    if action == "start":
        n = int(params.get("start", 0))
        return {"ui_content": {"text": f"count={n}"}, "app_state": {"n": n}}
    n = current_state["n"] + int((action_data or {}).get("add", 1))
    return {"ui_content": {"text": f"count={n}"}, "app_state": {"n": n}, "terminate": n >= 10}

client._report_execution("counter", {"reported": True})
print("ready", flush=True)
deadline = time.time() + 120
while time.time() < deadline:
    req = client.poll_inbox_for_requests()
    if not req:
        continue
    kind = req.get("message_type")
    if kind == "atp_app_request":
        client._handle_app_request_http(req)
    elif kind == "atp_app_action":
        client._handle_app_action_http(req)
    elif kind == "atp_app_terminate":
        client._handle_app_terminate_http(req)
"#;

const BOB_TK: &str = "tk-bob-key";
const BOB_LLM: &str = "llm-bob-key";

/// Two developers: ada owns the test keys and a public `rustkit`; bob owns
/// his own keys and a private `bobkit`.
fn developers() -> Vec<Developer> {
    vec![
        Developer {
            display_name: "ada".into(),
            name: "Ada Lovelace".into(),
            bio: "Engines.".into(),
            toolkit_api_keys: vec![TK_KEY.into()],
            llm_api_keys: vec![LLM_KEY.into()],
            public_toolkits: vec!["rustkit".into()],
        },
        Developer {
            display_name: "bob".into(),
            name: "Bob".into(),
            bio: String::new(),
            toolkit_api_keys: vec![BOB_TK.into()],
            llm_api_keys: vec![BOB_LLM.into()],
            public_toolkits: Vec::new(),
        },
    ]
}

/// A Rust toolkit whose `count_to` reports its progress.
fn counting_toolkit(base: &str) -> ToolKitClient {
    let client = ToolKitClient::new(TK_KEY, "rustkit").with_base_url(base);
    client
        .register_tool(
            Tool::new("count_to")
                .description("Counts to n, reporting each step.")
                .params(["n"])
                .required_params(["n"]),
            |call: Call| async move {
                let n = call.param("n").and_then(Value::as_u64).unwrap_or(3);
                for i in 1..=n {
                    call.progress(i as f64, Some(n as f64), Some(&format!("step {i}")));
                }
                Ok::<_, ToolError>(json!({"counted": n}))
            },
        )
        .expect("register count_to");
    client
}

async fn run_python(test: &str, name: &str, text: &str, args: &[&str]) -> Value {
    let path = script(test, name, text);
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        Command::new("python3")
            .arg(&path)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python client finishes")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("JSON from the Python client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_llm_client_streams_lists_the_store_and_gets_signed_webhooks() {
    if !python_sdk() {
        return;
    }
    bounded(Duration::from_secs(240), async {
        let (provider, provider_task) = start_provider().await;
        let hook = Hook::new();
        let receiver = Receiver::start(&hook, "127.0.0.1:0".parse().expect("addr")).await;
        let mut config = keyed_config();
        config.toolkit_api_keys.clear();
        config.llm_api_keys.clear();
        config.developers = developers();
        config.oauth_platforms = vec![platform(&provider)];
        config.webhook_retry_base = Duration::from_millis(50);
        let server = TestServer::start(config).await;
        let toolkit = counting_toolkit(&server.base);
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        let _stop = StopOnDrop(toolkit.clone());
        server.wait_served("rustkit").await;
        register(&server, BOB_TK, "bobkit", "secret_tool").await;

        let out = run_python(
            "parity",
            "llm.py",
            PARITY_LLM_PY,
            &[&server.base, LLM_KEY, "rustkit", &receiver.url()],
        )
        .await;

        // call_tool_streaming: progress from the Rust tool, then the answer.
        let events = out["stream"].as_array().expect("events");
        let progress: Vec<&Value> = events
            .iter()
            .filter(|e| e["type"] == "task_progress")
            .collect();
        assert!(!progress.is_empty(), "no task_progress in {events:?}");
        assert_eq!(progress.last().expect("one")["payload"]["total"], 3.0);
        let last = events.last().expect("an answer");
        assert_eq!(last["type"], "task_response", "{events:?}");
        assert_eq!(
            last["result"]["tool"]["result"],
            json!({"counted": 3}),
            "{last}"
        );
        // get_toolkit_context_streaming: one toolkit_context event.
        let context = &out["context_stream"];
        assert_eq!(context[0]["type"], "toolkit_context", "{context}");
        assert_eq!(context[0]["payload"]["tools"][0]["name"], "count_to");
        assert!(context[0]["payload"]["tools"][0]["input_schema"].is_object());

        // The store: public toolkits only; mine; details; a profile; and
        // bob's private toolkit is not found for ada's key.
        let names = |v: &Value| -> Vec<String> {
            v["results"]
                .as_array()
                .expect("results")
                .iter()
                .map(|t| t["toolkit_id"].as_str().unwrap_or_default().to_owned())
                .collect()
        };
        assert_eq!(names(&out["store"]), ["rustkit"], "{}", out["store"]);
        assert_eq!(out["store"]["page"], 1);
        assert_eq!(names(&out["mine"]), ["rustkit"], "{}", out["mine"]);
        assert_eq!(out["details"]["tools"][0]["function"], "count_to");
        assert_eq!(out["profile"]["display_name"], "ada");
        assert_eq!(out["profile"]["toolkits"][0]["toolkit_id"], "rustkit");
        assert!(
            out["bob_details"]
                .as_str()
                .is_some_and(|e| e.contains("404")),
            "{}",
            out["bob_details"]
        );

        // register_webhook: its secret signs the delivery of an OAuth flow
        // the same key finishes.
        let secret = out["webhook"]["secret"]
            .as_str()
            .expect("a secret")
            .to_owned();
        let webhook_id = out["webhook"]["webhook_id"]
            .as_str()
            .expect("an id")
            .to_owned();
        assert_eq!(out["webhooks"].as_array().map(Vec::len), Some(1));
        assert!(
            out["webhooks"][0].get("secret").is_none(),
            "{}",
            out["webhooks"]
        );
        let state = start_flow(&server.base, LLM_KEY, "user-7").await;
        assert!(matches!(
            callback(&server.base, &state, "code=good-code").await,
            200 | 302 | 303
        ));
        hook.wait_until("the connection_success delivery", |i| {
            !i.accepted().is_empty()
        })
        .await;
        hook.with(|i| {
            let got = i.accepted()[0];
            let body = got.json();
            assert_eq!(body["event"], "connection_success");
            assert_eq!(body["webhook_id"], webhook_id.as_str());
            assert_eq!(body["data"]["external_user_id"], "user-7");
            let raw = String::from_utf8_lossy(&got.body).into_owned();
            assert!(
                !raw.contains(ACCESS_TOKEN) && !raw.contains(REFRESH_TOKEN),
                "{raw}"
            );
        });
        hook.with(|i| {
            let got = i.accepted()[0];
            let sig = got.header(webhook::SIGNATURE_HEADER).expect("signed");
            assert!(webhook::verify(secret.as_bytes(), Some(sig), &got.body).is_ok());
            assert!(webhook::verify(b"another secret", Some(sig), &got.body).is_err());
        });

        // delete_webhook (the Python client sends it as a GET).
        let left = run_python(
            "parity",
            "delete.py",
            DELETE_WEBHOOK_PY,
            &[&server.base, LLM_KEY, &webhook_id],
        )
        .await;
        assert_eq!(left, json!([]));

        stop_toolkit(&toolkit, runtime).await;
        receiver.stop().await;
        provider_task.abort();
        server.stop().await;
    })
    .await;
    let _ = std::fs::remove_dir_all(scratch("parity"));
}

struct TempDb(PathBuf);

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_toolkits_app_runs_a_whole_session() {
    if !python_sdk() {
        return;
    }
    bounded(Duration::from_secs(240), async {
        let db = TempDb(
            std::env::temp_dir().join(format!("atp-server-py-app-{}.sqlite3", std::process::id())),
        );
        // The Python client polls with a 30 s timeout: hold polls for 20 s.
        let server = TestServer::start(Config {
            inbox_wait: Duration::from_secs(20),
            db: DbLocation::File(db.0.clone()),
            ..keyed_config()
        })
        .await;
        let path = script("pyapp", "app.py", APP_TOOLKIT_PY);
        let log = path.with_file_name("app.log");
        let mut child = Command::new("python3")
            .arg(&path)
            .args([&server.base, TK_KEY, "pycounter"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("python3 starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
        assert!(
            matches!(ready, Ok(Ok(Some(ref l))) if l == "ready"),
            "the Python toolkit did not start: {ready:?}; log {}",
            log.display()
        );
        assert!(
            server
                .server
                .wait_until_served("pycounter", Duration::from_secs(30))
                .await,
            "the Python toolkit never polled; log {}",
            log.display()
        );

        for protocol in [LlmProtocol::Http, LlmProtocol::WebSocket] {
            let llm = server.llm(protocol);
            let session = llm
                .start_app("pycounter", "counter", &json!({"start": 3}), None)
                .await
                .unwrap_or_else(|e| panic!("start over {protocol:?}: {e}; log {}", log.display()));
            assert_eq!(session.ui_content, json!({"text": "count=3"}));
            let update = llm
                .app_action(&session.session_id, &json!({"add": 4}))
                .await
                .expect("an action");
            assert_eq!(update.ui_content, json!({"text": "count=7"}));
            assert!(!update.terminated);
            let update = llm
                .app_action(&session.session_id, &json!({"add": 2}))
                .await
                .expect("another action");
            assert_eq!(
                update.ui_content,
                json!({"text": "count=9"}),
                "the state was kept"
            );
            llm.terminate_app(&session.session_id)
                .await
                .expect("terminate");
            match llm
                .app_action(&session.session_id, &json!({"add": 1}))
                .await
            {
                Err(LlmError::App { code, .. }) => assert_eq!(code, "session_ended"),
                other => panic!("an action after terminate: {other:?}"),
            }
        }

        // The execution the Python toolkit reported with its exchange token.
        let log_rows = atp_server::read_executions(&db.0, Some("pycounter"), 10).expect("the log");
        assert_eq!(log_rows.len(), 1, "{log_rows:?}");
        assert_eq!(log_rows[0].function_id, "counter");
        assert_eq!(log_rows[0].result, json!({"reported": true}));

        let _ = child.kill().await;
        server.stop().await;
    })
    .await;
    let _ = std::fs::remove_dir_all(scratch("pyapp"));
}
