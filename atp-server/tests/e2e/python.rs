//! Interop with the published Python SDK (`pip install AgentToolProtocol`):
//! its `ToolKitClient` serves tools through this server (WebSocket and
//! inbox), its `LLMClient` calls them (WebSocket and HTTP).
//!
//! Skipped, loudly, when `python3 -c 'import atp_sdk.clients'` fails —
//! unless `ATP_REQUIRE_PYTHON=1`, when that fails the tests instead: `.ci/run`
//! installs the package and sets it, so that CI cannot pass without them.

use std::{io::Write, path::PathBuf, process::Stdio, time::Duration};

use atp_registry::{llm::LlmProtocol, runtime::Transport};
use atp_server::Config;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::common::*;

const TOOLKIT_PY: &str = r#"
import sys
from atp_sdk.clients import ToolKitClient

base, key, app, protocol = sys.argv[1:5]
client = ToolKitClient(api_key=key, app_name=app, base_url=base, protocol=protocol, auto_restart=False)

@client.register_tool(function_name="hello_world", params=["name"], required_params=["name"],
                      description="Returns a greeting.", auth_provider=None, auth_type=None, auth_with=None)
def hello_world(**kwargs):
    return {"message": f"Hello, {kwargs.get('name', 'World')}!"}

@client.register_tool(function_name="fails", params=[], required_params=[],
                      description="Always fails.", auth_provider=None, auth_type=None, auth_with=None)
def fails(**kwargs):
    raise ValueError("this tool always fails")

@client.register_tool(function_name="whoami", params=[], required_params=[],
                      description="Shows the auth token it got.", auth_provider="localprov",
                      auth_type="OAuth2", auth_with="access_token")
def whoami(**kwargs):
    return {"token": kwargs.get("auth_token")}

client.start()
"#;

const LLM_PY: &str = r#"
import json, sys
from atp_sdk.clients import LLMClient

base, key, app, protocol = sys.argv[1:5]
llm = LLMClient(api_key=key, protocol=protocol, base_url=base)
out = {}
out["context"] = llm.get_toolkit_context(app, "Say hello", provider="openai")
out["anthropic_context"] = llm.get_toolkit_context(app, "Say hello", provider="anthropic")
out["openai"] = llm.call_tool(app, [{"type": "function_call", "call_id": "call_1", "name": "hello_world",
                                     "arguments": "{\"name\": \"Ada\"}"}], provider="openai", user_prompt="hi")
out["anthropic"] = llm.call_tool(app, [{"type": "tool_use", "id": "toolu_1", "name": "hello_world",
                                        "input": {"name": "Bob"}}], provider="anthropic")
out["mistral"] = llm.call_tool(app, [{"id": "abcDEF123", "type": "function",
                                      "function": {"name": "hello_world", "arguments": "{\"name\": \"Cy\"}"}}],
                               provider="mistralai")
out["fails"] = llm.call_tool(app, [{"type": "function_call", "call_id": "call_2", "name": "fails",
                                    "arguments": "{}"}], provider="openai")
out["whoami"] = llm.call_tool(app, [{"type": "function_call", "call_id": "call_3", "name": "whoami",
                                     "arguments": "{}"}], provider="openai", auth_token="py-token")
print(json.dumps(out), flush=True)
"#;

/// Set to `1`, a missing Python SDK fails the tests instead of skipping them.
const REQUIRE: &str = "ATP_REQUIRE_PYTHON";

/// Whether the published SDK can run here; says so loudly when not, and
/// panics instead when [`REQUIRE`] is `1`.
pub(crate) fn python_sdk() -> bool {
    let required = match std::env::var(REQUIRE) {
        Ok(v) if v == "1" => true,
        Ok(v) if !v.is_empty() && v != "0" => {
            panic!("{REQUIRE}={v:?}: set it to 1 to require the Python SDK, or unset it")
        }
        _ => false,
    };
    let why = match std::process::Command::new("python3")
        .args(["-c", "import atp_sdk.clients"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => return true,
        Ok(out) => format!("{}: {}", out.status, tail(&out.stderr)),
        Err(e) => format!("python3 did not start: {e}"),
    };
    let what = format!(
        "Python interop test: `python3 -c 'import atp_sdk.clients'` failed ({why}); \
         install the published SDK with `python3 -m pip install AgentToolProtocol`"
    );
    if required {
        panic!("{REQUIRE}=1, so not skipped: {what}");
    }
    // Written to the real stderr, past the test harness's capture, in one
    // write so that the line stays whole beside the harness's output.
    let line = format!("SKIPPED: {what} (with {REQUIRE}=1 this fails instead)\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    false
}

/// The last line of `stderr` (Python's exception), trimmed.
pub(crate) fn tail(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// The scratch directory of one test (removed when it passes).
pub(crate) fn scratch(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!("atp-server-py-{}-{test}", std::process::id()))
}

pub(crate) fn script(test: &str, name: &str, text: &str) -> PathBuf {
    let dir = scratch(test);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write script");
    path
}

/// Starts the Python toolkit; its log goes to a file named in failures.
pub(crate) fn python_toolkit(
    test: &str,
    base: &str,
    app: &str,
    protocol: &str,
) -> (Child, PathBuf) {
    let path = script(test, "toolkit.py", TOOLKIT_PY);
    let log = path.with_file_name(format!("toolkit-{app}.log"));
    let child = Command::new("python3")
        .arg(&path)
        .args([base, TK_KEY, app, protocol])
        .current_dir(path.parent().expect("dir"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("python3 starts");
    (child, log)
}

/// Runs the Python LLM client against `app`; returns what it printed.
pub(crate) async fn python_llm(test: &str, base: &str, app: &str, protocol: &str) -> Value {
    let path = script(test, "llm.py", LLM_PY);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("python3")
            .arg(&path)
            .args([base, LLM_KEY, app, protocol])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python LLM client finishes")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python LLM client failed on {app} over {protocol}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("JSON from the Python client")
}

pub(crate) fn check_python_llm_output(out: &Value, app: &str) {
    let context = &out["context"];
    assert_eq!(context["toolkit_id"], app);
    let hello = context["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .find(|t| t["name"] == "hello_world")
        .expect("hello_world");
    assert_eq!(hello["type"], "function");
    assert_eq!(hello["parameters"]["required"], json!(["name"]));
    assert!(out["anthropic_context"]["tools"][0]["input_schema"].is_object());
    // json.dumps output of result.tool.result, in the Python client's shapes.
    assert_eq!(
        out["openai"],
        json!([{"type": "function_call_output", "call_id": "call_1", "output": "{\"message\": \"Hello, Ada!\"}"}])
    );
    assert_eq!(
        out["anthropic"],
        json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "{\"message\": \"Hello, Bob!\"}"}]}])
    );
    assert_eq!(
        out["mistral"],
        json!([{"role": "tool", "name": "hello_world", "content": "{\"message\": \"Hello, Cy!\"}", "tool_call_id": "abcDEF123"}])
    );
    assert_eq!(
        out["fails"][0]["output"],
        "{\"error\": \"this tool always fails\"}"
    );
    assert_eq!(out["whoami"][0]["output"], "{\"token\": \"py-token\"}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_toolkit_and_llm_client_interoperate() {
    if !python_sdk() {
        return;
    }
    bounded(Duration::from_secs(240), async {
        let server = TestServer::start(keyed_config()).await;
        let (mut py_toolkit, log) = python_toolkit("interop", &server.base, "pyapp", "ws");
        assert!(
            server.server.wait_until_served("pyapp", Duration::from_secs(30)).await,
            "the Python toolkit never connected; its log: {}",
            log.display()
        );
        // The Rust LLM client runs the Python toolkit's tools.
        for protocol in [LlmProtocol::WebSocket, LlmProtocol::Http] {
            let llm = server.llm(protocol);
            let calls = json!([
                {"type": "function_call", "call_id": "c1", "name": "hello_world", "arguments": "{\"name\": \"Ada\"}"},
                {"type": "function_call", "call_id": "c2", "name": "fails", "arguments": "{}"},
                {"type": "function_call", "call_id": "c3", "name": "whoami", "arguments": "{}"},
                {"type": "function_call", "call_id": "c4", "name": "nope", "arguments": "{}"}
            ]);
            let out = llm
                .call_tool_as("pyapp", &calls, "openai", "", None, Some(&"rust-token".into()))
                .await
                .expect("call");
            assert_eq!(
                outputs(&out),
                [
                    r#"{"message":"Hello, Ada!"}"#,
                    "this tool always fails",
                    r#"{"token":"rust-token"}"#,
                    "Tool not found"
                ],
                "{protocol:?}; toolkit log: {}",
                log.display()
            );
        }
        // A Rust toolkit beside it, for the Python LLM client too.
        let rust_toolkit = demo_toolkit(TK_KEY, "rustapp", &server.base);
        let runtime = serve_toolkit(&rust_toolkit, Transport::WebSocket);
        server.wait_served("rustapp").await;
        for app in ["pyapp", "rustapp"] {
            for protocol in ["ws", "http"] {
                let out = python_llm("interop", &server.base, app, protocol).await;
                check_python_llm_output(&out, app);
            }
        }
        stop_toolkit(&rust_toolkit, runtime).await;
        let _ = py_toolkit.kill().await;
        server.stop().await;
    })
    .await;
    let _ = std::fs::remove_dir_all(scratch("interop"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_toolkit_over_the_inbox() {
    if !python_sdk() {
        return;
    }
    bounded(Duration::from_secs(120), async {
        // The Python client polls with a 30 s timeout: hold polls for 25 s.
        let server = TestServer::start(Config {
            inbox_wait: Duration::from_secs(25),
            ..keyed_config()
        })
        .await;
        let (mut py_toolkit, log) = python_toolkit("inbox", &server.base, "pyinbox", "http");
        assert!(
            server.server.wait_until_served("pyinbox", Duration::from_secs(30)).await,
            "the Python inbox toolkit never polled; its log: {}",
            log.display()
        );
        let out = server
            .llm(LlmProtocol::Http)
            .call_tool(
                "pyinbox",
                &json!({"type": "tool_use", "id": "t1", "name": "hello_world", "input": {"name": "Inbox"}}),
                "anthropic",
                "",
            )
            .await
            .expect("call");
        assert_eq!(
            outputs(&out),
            [r#"{"message":"Hello, Inbox!"}"#],
            "toolkit log: {}",
            log.display()
        );
        let _ = py_toolkit.kill().await;
        server.stop().await;
    })
    .await;
    let _ = std::fs::remove_dir_all(scratch("inbox"));
}
