//! `/mcp/{toolkit}`: every toolkit the server routes is an MCP server
//! (Streamable HTTP, sessionless). Raw JSON-RPC over HTTP against Rust
//! toolkits over the WebSocket and the inbox, the refusals (key, host,
//! method, media type, size), progress as server-sent events, the
//! official MCP conformance suite against a Rust toolkit connected over
//! WebSocket, and the official Python MCP client against a Python ATP
//! toolkit.

use std::{io::Write, process::Stdio, time::Duration};

use atp_registry::{Call, Tool, ToolError, runtime::Transport};
use atp_server::Config;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::{
    common::*,
    python::{python_sdk, python_toolkit, scratch, script, tail},
};

/// The inbox toolkit's key.
const INBOX_KEY: &str = "tk-inbox-key";

fn url(server: &TestServer, app: &str) -> String {
    format!("{}/mcp/{app}", server.base)
}

/// One JSON-RPC message POSTed with the LLM key as a bearer token: status
/// and JSON answer.
async fn rpc(server: &TestServer, app: &str, message: &Value) -> (u16, Value) {
    rpc_with(server, app, &[], message).await
}

async fn rpc_with(
    server: &TestServer,
    app: &str,
    extra: &[(&str, &str)],
    message: &Value,
) -> (u16, Value) {
    let auth = format!("Bearer {LLM_KEY}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("accept", "application/json, text/event-stream"),
    ];
    headers.extend_from_slice(extra);
    http_json("POST", &url(server, app), &headers, Some(message)).await
}

fn call(id: u64, tool: &str, arguments: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": tool, "arguments": arguments}})
}

fn text(result: &Value) -> &str {
    result["content"][0]["text"].as_str().unwrap_or_default()
}

/// The demo toolkit as an MCP server: what every transport must answer.
async fn check_demo(server: &TestServer, app: &str) {
    let (status, init) = rpc(
        server,
        app,
        &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "e2e", "version": "0"}}}),
    )
    .await;
    assert_eq!(status, 200, "{init}");
    assert_eq!(init["id"], 1);
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18", "{init}");
    assert_eq!(init["result"]["serverInfo"]["name"], app, "{init}");
    assert!(
        init["result"]["capabilities"]["tools"].is_object(),
        "{init}"
    );

    // A notification: 202, no body.
    let auth = format!("Bearer {LLM_KEY}");
    let (status, _, body) = http(
        "POST",
        &url(server, app),
        &[("authorization", auth.as_str())],
        Some(r#"{"jsonrpc": "2.0", "method": "notifications/initialized"}"#),
    )
    .await;
    assert_eq!((status, body.as_str()), (202, ""));

    let (status, listed) = rpc(
        server,
        app,
        &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    let tools = listed["result"]["tools"].as_array().expect("tools");
    let names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, DEMO_TOOLS, "{listed}");
    assert_eq!(tools[0]["description"], "Returns a greeting.");
    assert_eq!(tools[0]["inputSchema"]["type"], "object", "{listed}");
    assert_eq!(tools[0]["inputSchema"]["required"], json!(["name"]));
    assert!(tools[0]["inputSchema"]["properties"]["name"].is_object());
    assert_eq!(
        tools[4]["inputSchema"]["properties"]["ms"]["type"],
        "integer"
    );

    // A call: the result as text and as structuredContent.
    let (status, out) = rpc(server, app, &call(3, "hello_world", json!({"name": "Ada"}))).await;
    assert_eq!(status, 200, "{out}");
    let result = &out["result"];
    assert_eq!(result["isError"], false, "{out}");
    assert_eq!(
        result["structuredContent"],
        json!({"message": "Hello, Ada!"})
    );
    assert_eq!(
        serde_json::from_str::<Value>(text(result)).expect("JSON text"),
        json!({"message": "Hello, Ada!"})
    );
    let (_, out) = rpc(server, app, &call(4, "echo", json!({"text": "hi"}))).await;
    assert_eq!(
        out["result"]["structuredContent"],
        json!({"echo": "hi", "app": app})
    );

    // A failing tool: isError with its message.
    let (status, out) = rpc(server, app, &call(5, "fails", json!({}))).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["result"]["isError"], true, "{out}");
    assert!(
        text(&out["result"]).contains("this tool always fails"),
        "{out}"
    );

    // Missing required params: the server's check, as an error result.
    let (_, out) = rpc(server, app, &call(6, "hello_world", json!({}))).await;
    assert_eq!(out["result"]["isError"], true, "{out}");

    // A tool that needs a token: without one, isError (auth_required)...
    let (_, out) = rpc(server, app, &call(7, "whoami", json!({}))).await;
    assert_eq!(out["result"]["isError"], true, "{out}");
    assert_eq!(
        out["result"]["_meta"]["io.atp/code"], "auth_required",
        "{out}"
    );
    assert!(text(&out["result"]).contains("auth token"), "{out}");
    // ... with the auth_token argument, the tool gets it ...
    let (_, out) = rpc(
        server,
        app,
        &call(8, "whoami", json!({"auth_token": "tok-123"})),
    )
    .await;
    assert_eq!(out["result"]["isError"], false, "{out}");
    assert_eq!(
        out["result"]["structuredContent"],
        json!({"token": "tok-123"})
    );
    // ... and for a user (X-ATP-User) who has not connected the provider,
    // the stored-token lookup says so.
    let (_, out) = rpc_with(
        server,
        app,
        &[("x-atp-user", "bob@example.com")],
        &call(9, "whoami", json!({})),
    )
    .await;
    assert_eq!(out["result"]["isError"], true, "{out}");
    assert!(
        text(&out["result"]).contains("user bob@example.com has not connected localprov"),
        "{out}"
    );
    // The bearer token (the LLM key) is never a tool's token.
    assert!(!out.to_string().contains(LLM_KEY), "{out}");

    // An unknown tool: a JSON-RPC error.
    let (status, out) = rpc(server, app, &call(10, "nope", json!({}))).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["error"]["code"], -32602, "{out}");
    assert_eq!(out["id"], 10);

    // An unknown method.
    let (_, out) = rpc(
        server,
        app,
        &json!({"jsonrpc": "2.0", "id": 11, "method": "resources/list"}),
    )
    .await;
    assert_eq!(out["error"]["code"], -32601, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_over_a_websocket_and_an_inbox_toolkit() {
    bounded(Duration::from_secs(90), async {
        // Two toolkit keys: the server routes by key, and one connection
        // of a key serves every toolkit of that key.
        let mut config = keyed_config();
        config.toolkit_api_keys.push(INBOX_KEY.into());
        let server = TestServer::start(config).await;
        let ws = demo_toolkit(TK_KEY, "mcpws", &server.base);
        let ws_runtime = serve_toolkit(&ws, Transport::WebSocket);
        let _ws_stop = StopOnDrop(ws.clone());
        let inbox = demo_toolkit(INBOX_KEY, "mcpinbox", &server.base);
        let inbox_runtime = serve_toolkit(
            &inbox,
            Transport::Inbox {
                poll_interval: Duration::from_millis(20),
            },
        );
        let _inbox_stop = StopOnDrop(inbox.clone());
        server.wait_served("mcpws").await;
        server.wait_served("mcpinbox").await;

        check_demo(&server, "mcpws").await;
        check_demo(&server, "mcpinbox").await;

        // The trailing slash works too; so does `Authorization: ApiKey`.
        let auth = format!("ApiKey {LLM_KEY}");
        let (status, out) = http_json(
            "POST",
            &format!("{}/mcp/mcpws/", server.base),
            &[("authorization", auth.as_str())],
            Some(&call(1, "hello_world", json!({"name": "Slash"}))),
        )
        .await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(
            out["result"]["structuredContent"],
            json!({"message": "Hello, Slash!"})
        );

        stop_toolkit(&ws, ws_runtime).await;
        stop_toolkit(&inbox, inbox_runtime).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn mcp_refusals() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(Config {
            max_message_size: 4096,
            public_url: Some("https://atp.example.com:8443/".into()),
            ..keyed_config()
        })
        .await;
        let toolkit = demo_toolkit(TK_KEY, "kit", &server.base);
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        let _stop = StopOnDrop(toolkit.clone());
        server.wait_served("kit").await;
        let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
        let u = url(&server, "kit");
        let bearer = format!("Bearer {LLM_KEY}");

        // The LLM key: missing, wrong, or a toolkit key.
        for headers in [
            vec![],
            vec![("authorization", "Bearer wrong-key")],
            vec![("authorization", "Bearer tk-secret-key")],
            vec![("authorization", LLM_KEY)],
            vec![("x-atp-key", LLM_KEY)],
        ] {
            let (status, out) = http_json("POST", &u, &headers, Some(&ping)).await;
            assert_eq!(status, 401, "{headers:?}: {out}");
            assert_eq!(out["jsonrpc"], "2.0");
            assert_eq!(out["error"]["data"]["code"], "unauthorized", "{out}");
        }
        let (status, out) = http_json(
            "POST",
            &u,
            &[("authorization", bearer.as_str())],
            Some(&ping),
        )
        .await;
        assert_eq!((status, &out["result"]), (200, &json!({})), "{out}");

        // DNS rebinding: another Host or Origin is refused; loopback and
        // the public URL's host are not.
        for headers in [
            vec![("host", "evil.example.com")],
            vec![("host", "localhost.evil.com:80")],
            vec![("origin", "http://evil.example.com")],
        ] {
            let mut h = headers.clone();
            h.push(("authorization", bearer.as_str()));
            let (status, out) = http_json("POST", &u, &h, Some(&ping)).await;
            assert_eq!(status, 403, "{headers:?}: {out}");
            assert_eq!(out["error"]["data"]["code"], "forbidden_host", "{out}");
        }
        for headers in [
            vec![("host", "atp.example.com")],
            vec![("host", "localhost:1234")],
            vec![("origin", "https://atp.example.com")],
            vec![("origin", "http://127.0.0.1:3000")],
        ] {
            let mut h = headers.clone();
            h.push(("authorization", bearer.as_str()));
            let (status, out) = http_json("POST", &u, &h, Some(&ping)).await;
            assert_eq!(status, 200, "{headers:?}: {out}");
        }

        // GET and DELETE: 405, Allow: POST.
        for method in ["GET", "DELETE"] {
            let (status, headers, body) =
                http(method, &u, &[("authorization", bearer.as_str())], None).await;
            assert_eq!(status, 405, "{method}: {body}");
            assert_eq!(headers["allow"], "POST");
            let out: Value = serde_json::from_str(&body).expect("JSON");
            assert_eq!(out["error"]["data"]["code"], "method_not_allowed", "{out}");
        }

        // Not JSON: 415; too large: 413; unknown toolkit: 404; bad JSON: 400.
        let (status, _, body) = http(
            "POST",
            &u,
            &[
                ("authorization", bearer.as_str()),
                ("content-type", "text/plain"),
            ],
            None,
        )
        .await;
        assert_eq!(status, 415, "{body}");
        let big = call(1, "echo", json!({"text": "x".repeat(8000)}));
        let (status, out) = http_json(
            "POST",
            &u,
            &[("authorization", bearer.as_str())],
            Some(&big),
        )
        .await;
        assert_eq!(status, 413, "{out}");
        assert_eq!(out["error"]["data"]["code"], "payload_too_large");
        let (status, out) = http_json(
            "POST",
            &url(&server, "nope"),
            &[("authorization", bearer.as_str())],
            Some(&ping),
        )
        .await;
        assert_eq!(status, 404, "{out}");
        assert_eq!(out["error"]["data"]["code"], "toolkit_not_found");
        let (status, _, body) = http(
            "POST",
            &u,
            &[("authorization", bearer.as_str())],
            Some("{not json"),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        let out: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(out["error"]["code"], -32700, "{out}");

        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;
    })
    .await;
}

/// In dev mode only loopback hosts are allowed, even with a public URL.
#[tokio::test]
async fn mcp_in_dev_mode_allows_loopback_only() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(Config {
            dev: true,
            public_url: Some("https://atp.example.com".into()),
            ..keyed_config()
        })
        .await;
        let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
        let bearer = format!("Bearer {LLM_KEY}");
        let (status, out) = http_json(
            "POST",
            &url(&server, "kit"),
            &[
                ("authorization", bearer.as_str()),
                ("host", "atp.example.com"),
            ],
            Some(&ping),
        )
        .await;
        assert_eq!(status, 403, "{out}");
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_progress_is_streamed_before_the_result() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        let toolkit = atp_registry::ToolKitClient::new(TK_KEY, "progkit").with_base_url(&server.base);
        toolkit
            .register_tool(
                Tool::new("work")
                    .description("Works in steps.")
                    .params(["steps"])
                    .param_schema("steps", json!({"type": "integer"})),
                |call: Call| async move {
                    let steps = call.param("steps").and_then(Value::as_u64).unwrap_or(1);
                    for step in 1..=steps {
                        call.progress(step as f64, Some(steps as f64), Some(&format!("step {step}")));
                        // Each report is its own frame, before the answer.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Ok::<_, ToolError>(json!({"done": steps}))
                },
            )
            .expect("valid");
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        let _stop = StopOnDrop(toolkit.clone());
        server.wait_served("progkit").await;

        let bearer = format!("Bearer {LLM_KEY}");
        let message = json!({"jsonrpc": "2.0", "id": "w1", "method": "tools/call",
            "params": {"name": "work", "arguments": {"steps": 3}, "_meta": {"progressToken": "pt-1"}}})
        .to_string();
        let (status, headers, body) = http(
            "POST",
            &url(&server, "progkit"),
            &[
                ("authorization", bearer.as_str()),
                ("accept", "application/json, text/event-stream"),
            ],
            Some(&message),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["content-type"], "text/event-stream", "{body}");
        let got = events(&body);
        assert_eq!(got.len(), 4, "{body}");
        for (i, n) in got[..3].iter().enumerate() {
            let step = i as f64 + 1.0;
            assert_eq!(n["method"], "notifications/progress", "{n}");
            assert_eq!(n["params"]["progressToken"], "pt-1", "{n}");
            assert_eq!(n["params"]["progress"].as_f64(), Some(step), "{n}");
            assert_eq!(n["params"]["total"].as_f64(), Some(3.0), "{n}");
            assert_eq!(n["params"]["message"], format!("step {}", i + 1), "{n}");
        }
        assert_eq!(got[3]["id"], "w1");
        assert_eq!(got[3]["result"]["structuredContent"], json!({"done": 3}));

        // Without a progress token: plain JSON, no notifications.
        let (status, out) = rpc(&server, "progkit", &call(2, "work", json!({"steps": 2}))).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["result"]["structuredContent"], json!({"done": 2}));

        // With a token but a JSON-only client: the result alone.
        let (status, headers, body) = http(
            "POST",
            &url(&server, "progkit"),
            &[
                ("authorization", bearer.as_str()),
                ("accept", "application/json"),
            ],
            Some(&message),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["content-type"], "application/json");
        let out: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(out["result"]["structuredContent"], json!({"done": 3}));

        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;
    })
    .await;
}

const MCP_CLIENT_PY: &str = r#"
import json, sys
import anyio
from mcp import ClientSession

try:
    from mcp.client.streamable_http import streamablehttp_client as legacy
except ImportError:  # mcp >= 2
    legacy = None

url, key = sys.argv[1:3]
headers = {"Authorization": f"Bearer {key}"}

def field(o, *names):
    for n in names:
        v = getattr(o, n, None)
        if v is not None:
            return v
    return None

def texts(result):
    return [c.text for c in result.content if getattr(c, "type", None) == "text"]

async def run(session):
    out = {}
    await session.initialize()
    listed = await session.list_tools()
    out["tools"] = [t.name for t in listed.tools]
    hello = next(t for t in listed.tools if t.name == "hello_world")
    out["hello_schema"] = field(hello, "input_schema", "inputSchema")
    r = await session.call_tool("hello_world", {"name": "Py"})
    out["hello"] = {"is_error": field(r, "is_error", "isError"),
                    "structured": field(r, "structured_content", "structuredContent"),
                    "texts": texts(r)}
    r = await session.call_tool("fails", {})
    out["fails"] = {"is_error": field(r, "is_error", "isError"), "texts": texts(r)}
    r = await session.call_tool("whoami", {})
    out["whoami_none"] = {"is_error": field(r, "is_error", "isError"), "texts": texts(r)}
    r = await session.call_tool("whoami", {"auth_token": "py-mcp-token"})
    out["whoami"] = {"is_error": field(r, "is_error", "isError"),
                     "structured": field(r, "structured_content", "structuredContent")}
    print(json.dumps(out), flush=True)

async def main():
    if legacy is not None:
        async with legacy(url, headers=headers) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                await run(session)
    else:
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client
        async with create_mcp_http_client(headers=headers) as http:
            async with streamable_http_client(url, http_client=http) as streams:
                async with ClientSession(streams[0], streams[1]) as session:
                    await run(session)

anyio.run(main)
"#;

/// Whether PyPI `mcp` is installed; says so loudly when not.
fn python_mcp() -> bool {
    let why = match std::process::Command::new("python3")
        .args(["-c", "import mcp"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => return true,
        Ok(out) => format!("{}: {}", out.status, tail(&out.stderr)),
        Err(e) => format!("python3 did not start: {e}"),
    };
    let line = format!(
        "SKIPPED: MCP Python client test: `python3 -c 'import mcp'` failed ({why}); \
         install it with `python3 -m pip install mcp`\n"
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_mcp_client_calls_a_python_toolkit() {
    if !python_sdk() || !python_mcp() {
        return;
    }
    bounded(Duration::from_secs(180), async {
        let server = TestServer::start(keyed_config()).await;
        let (mut py_toolkit, log) = python_toolkit("mcp", &server.base, "pymcp", "ws");
        assert!(
            server
                .server
                .wait_until_served("pymcp", Duration::from_secs(30))
                .await,
            "the Python toolkit never connected; its log: {}",
            log.display()
        );
        let path = script("mcp", "mcp_client.py", MCP_CLIENT_PY);
        let out = tokio::time::timeout(
            Duration::from_secs(90),
            Command::new("python3")
                .arg(&path)
                .args([url(&server, "pymcp"), LLM_KEY.to_owned()])
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the MCP client finishes")
        .expect("python3 runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the MCP client failed:\n{stdout}\n{}\ntoolkit log: {}",
            String::from_utf8_lossy(&out.stderr),
            log.display()
        );
        let got: Value = serde_json::from_str(stdout.trim()).expect("JSON from the MCP client");
        assert_eq!(
            got["tools"],
            json!(["hello_world", "fails", "whoami"]),
            "{got}"
        );
        assert_eq!(got["hello_schema"]["type"], "object", "{got}");
        assert_eq!(got["hello_schema"]["required"], json!(["name"]), "{got}");
        assert_eq!(got["hello"]["is_error"], false, "{got}");
        assert_eq!(got["hello"]["structured"], json!({"message": "Hello, Py!"}));
        assert_eq!(got["fails"]["is_error"], true, "{got}");
        assert!(
            got["fails"]["texts"][0]
                .as_str()
                .is_some_and(|t| t.contains("this tool always fails")),
            "{got}"
        );
        assert_eq!(got["whoami_none"]["is_error"], true, "{got}");
        assert_eq!(got["whoami"]["is_error"], false, "{got}");
        assert_eq!(
            got["whoami"]["structured"],
            json!({"token": "py-mcp-token"})
        );
        let _ = py_toolkit.kill().await;
        server.stop().await;
    })
    .await;
    let _ = std::fs::remove_dir_all(scratch("mcp"));
}

/// Across instances: a toolkit connected to one server is an MCP server on
/// another (PostgreSQL + NATS), progress included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_across_instances() {
    bounded(Duration::from_secs(90), async {
        let Some((_pg, _nats, servers)) = crate::cluster::cluster(2).await else {
            return;
        };
        let (a, b) = (&servers[0], &servers[1]);
        let toolkit = demo_toolkit(TK_KEY, "farkit", &a.base);
        toolkit
            .register_tool(
                Tool::new("chatty").description("Logs, reports, answers."),
                |call: Call| async move {
                    call.log(atp_registry::LogLevel::Warning, json!({"step": 1}));
                    call.progress(1.0, Some(2.0), None);
                    call.log(atp_registry::LogLevel::Info, "done");
                    Ok::<_, ToolError>(json!({"ok": true}))
                },
            )
            .expect("valid");
        let _stop = StopOnDrop(toolkit.clone());
        let _runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        a.wait_served("farkit").await;
        b.wait_served("farkit").await;
        // Every tool registration reaches the other instance eventually.
        let listed = async {
            loop {
                let (_, out) = rpc(
                    b,
                    "farkit",
                    &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
                )
                .await;
                if out["result"]["tools"].as_array().map(Vec::len) == Some(DEMO_TOOLS.len() + 1) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(WAIT, listed)
            .await
            .expect("all tools on the other instance");
        let (status, out) = rpc(b, "farkit", &call(2, "hello_world", json!({"name": "Far"}))).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(
            out["result"]["structuredContent"],
            json!({"message": "Hello, Far!"}),
            "{out}"
        );
        let (_, out) = rpc(b, "farkit", &call(3, "fails", json!({}))).await;
        assert_eq!(out["result"]["isError"], true, "{out}");
        let (_, out) = rpc(
            b,
            "farkit",
            &call(4, "whoami", json!({"auth_token": "far-token"})),
        )
        .await;
        assert_eq!(
            out["result"]["structuredContent"],
            json!({"token": "far-token"})
        );

        // The toolkit's logs and progress cross over too, in order, before
        // the answer (`tool_log` asked for: the client reads events).
        let bearer = format!("Bearer {LLM_KEY}");
        let message = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
            "params": {"name": "chatty", "arguments": {}, "_meta": {"progressToken": 7}}})
        .to_string();
        let (status, _, body) = http(
            "POST",
            &url(b, "farkit"),
            &[
                ("authorization", bearer.as_str()),
                ("accept", "application/json, text/event-stream"),
            ],
            Some(&message),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let got = events(&body);
        let methods: Vec<&str> = got
            .iter()
            .map(|e| e["method"].as_str().unwrap_or("response"))
            .collect();
        assert_eq!(
            methods,
            [
                "notifications/message",
                "notifications/progress",
                "notifications/message",
                "response"
            ],
            "{body}"
        );
        assert_eq!(got[0]["params"]["level"], "warning", "{body}");
        assert_eq!(got[0]["params"]["data"], json!({"step": 1}), "{body}");
        assert_eq!(got[2]["params"]["data"], "done", "{body}");
        assert_eq!(got[3]["result"]["structuredContent"], json!({"ok": true}));

        // A client that reads no events gets the answer alone.
        let (status, out) = http_json(
            "POST",
            &url(b, "farkit"),
            &[
                ("authorization", bearer.as_str()),
                ("accept", "application/json"),
            ],
            Some(&call(6, "chatty", json!({}))),
        )
        .await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["result"]["structuredContent"], json!({"ok": true}));
    })
    .await;
}

/// The official MCP conformance suite, through the server: the fixture's
/// `mcp_conformance` toolkit (content of every kind, logs, progress,
/// errors) connected over WebSocket, the server in dev mode (a keyless MCP
/// client on loopback is the developer's, as a desktop agent's would be).
/// Skipped, loudly, when the suite is not installed (see
/// `atp_conformance::mcp_official`); `ATP_REQUIRE_MCP=1` fails instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_mcp_suite_passes_through_the_server() {
    bounded(Duration::from_secs(300), async {
        let server = TestServer::start(Config {
            dev: true,
            ..keyed_config()
        })
        .await;
        let kit = atp_conformance::mcp_fixture::mcp_toolkit_named(TK_KEY, "mcp_conformance")
            .with_base_url(&server.base);
        let runtime = serve_toolkit(&kit, Transport::WebSocket);
        let _stop = StopOnDrop(kit.clone());
        server.wait_served("mcp_conformance").await;

        // A keyless request is refused outside dev mode (the other tests'
        // servers), and let in here.
        let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
        let (status, out) =
            http_json("POST", &url(&server, "mcp_conformance"), &[], Some(&ping)).await;
        assert_eq!(status, 200, "{out}");

        let port = server.base.rsplit(':').next().expect("a port").to_owned();
        let url = format!("http://localhost:{port}/mcp/mcp_conformance");
        let ran = tokio::task::spawn_blocking(move || {
            atp_conformance::mcp_official::run("atp-server", &url)
        })
        .await
        .expect("the suite's runner did not panic");
        if ran {
            println!("the official MCP suite passed through atp-server");
        }
        stop_toolkit(&kit, runtime).await;
        server.stop().await;
    })
    .await;
}
