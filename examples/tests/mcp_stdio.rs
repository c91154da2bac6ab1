//! `cargo run --example mcp_stdio`, driven over pipes as a desktop agent
//! drives it: the example's program as a child process, JSON-RPC lines on
//! its stdin and stdout. Then, when the official Python SDK is installed
//! (`pip install mcp`), its stdio client against the same binary.

#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// Set in the environment of the child process: the test binary then runs
/// the example's `main` instead of the tests.
const CHILD: &str = "ATP_MCP_STDIO_EXAMPLE_CHILD";

/// The example itself, compiled into this test binary (a harness-less
/// test: `main` below decides). Running this binary with [`CHILD`] set is
/// running `cargo run --example mcp_stdio`, without a nested `cargo build`
/// (which, with other features than the workspace's, rebuilt half the
/// dependency tree).
#[path = "../mcp_stdio.rs"]
mod example;

fn main() {
    if std::env::var_os(CHILD).is_some() {
        if let Err(e) = example::main() {
            eprintln!("mcp_stdio: {e}");
            std::process::exit(1);
        }
        return;
    }
    // The tests, one after the other (each bounds its own waits).
    let tests: [(&str, fn()); 2] = [
        ("stdio_protocol", stdio_protocol),
        ("official_python_client", official_python_client),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut failed = 0;
    println!("\nrunning {} tests", tests.len());
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let outcome = std::panic::catch_unwind(test);
        println!(
            "test {name} ... {}",
            if outcome.is_ok() { "ok" } else { "FAILED" }
        );
        failed += usize::from(outcome.is_err());
    }
    if failed > 0 {
        println!("\ntest result: FAILED. {failed} failed");
        std::process::exit(101);
    }
    println!("\ntest result: ok.");
}

/// The program the agent starts: this test binary, as the example.
fn example_binary() -> PathBuf {
    std::env::current_exe().unwrap()
}

struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Each line on stdout with when it arrived (stamped by the reader
    /// thread, not when the test gets to it).
    lines: mpsc::Receiver<(Instant, String)>,
}

impl Server {
    fn start(env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(example_binary());
        cmd.env(CHILD, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env_remove("ATP_MCP_AUTH_TOKEN")
            .env("RUST_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    fn send_raw(&mut self, line: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(line).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    fn send(&mut self, message: Value) {
        self.send_raw(serde_json::to_string(&message).unwrap().as_bytes());
    }

    /// Sends messages as lines in one write (the server gets them
    /// together).
    fn send_together(&mut self, messages: &[Value]) {
        let mut bytes = Vec::new();
        for m in messages {
            bytes.extend_from_slice(serde_json::to_string(m).unwrap().as_bytes());
            bytes.push(b'\n');
        }
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(&bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// The next line on stdout: always one JSON-RPC message.
    fn next(&self) -> Value {
        self.next_stamped().1
    }

    /// The next line on stdout, and when it arrived.
    fn next_stamped(&self) -> (Instant, Value) {
        let (at, line) = self
            .lines
            .recv_timeout(WAIT)
            .expect("no message from the server");
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("stdout has a line that is not JSON ({e}): {line}"));
        assert_eq!(v["jsonrpc"], "2.0", "{v}");
        (at, v)
    }

    /// Sends a request and returns its response (no other message is
    /// expected meanwhile).
    fn request(&mut self, id: i64, method: &str, params: Value) -> Value {
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        let v = self.next();
        assert_eq!(v["id"], id, "{v}");
        v
    }

    fn call(&mut self, id: i64, name: &str, arguments: Value) -> Value {
        self.request(
            id,
            "tools/call",
            json!({"name": name, "arguments": arguments}),
        )
    }

    /// Closes stdin; the server exits 0 within the bound.
    fn finish(mut self) {
        drop(self.stdin.take());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "the server exited with {status}");
                break;
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = self.child.kill();
                panic!("the server did not exit at the end of its input");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Nothing after the last answer.
        assert!(self.lines.recv_timeout(Duration::from_secs(2)).is_err());
    }
}

fn stdio_protocol() {
    let mut s = Server::start(&[("ATP_MCP_AUTH_TOKEN", "env-token-12")]);

    let init = s.request(
        1,
        "initialize",
        json!({"protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"}}),
    );
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18", "{init}");
    assert_eq!(init["result"]["serverInfo"]["name"], "Demo", "{init}");
    assert!(
        init["result"]["capabilities"]["tools"].is_object(),
        "{init}"
    );
    // A notification: no answer (the next line answers the next request).
    s.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));

    let list = s.request(2, "tools/list", json!({}));
    let names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for name in [
        "hello_world",
        "echo",
        "add",
        "get_weather",
        "get_contacts",
        "download",
    ] {
        assert!(names.contains(&name), "{name} not in {names:?}");
    }
    let add = &list["result"]["tools"][names.iter().position(|n| *n == "add").unwrap()];
    assert_eq!(add["inputSchema"]["type"], "object", "{add}");

    let hello = s.call(3, "hello_world", json!({"name": "Ada"}));
    assert_eq!(hello["result"]["isError"], false, "{hello}");
    assert_eq!(
        hello["result"]["structuredContent"],
        json!({"message": "Hello, Ada!"})
    );
    assert_eq!(
        hello["result"]["content"][0]["text"],
        "{\"message\":\"Hello, Ada!\"}"
    );

    // A failing tool: an isError result, not a JSON-RPC error.
    let overflow = s.call(4, "add", json!({"a": i64::MAX, "b": 1}));
    assert_eq!(overflow["result"]["isError"], true, "{overflow}");
    assert!(
        overflow["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("overflows"),
        "{overflow}"
    );
    let bad = s.call(5, "add", json!({"a": "two"}));
    assert_eq!(bad["result"]["isError"], true, "{bad}");

    // The token: the environment's, unless the call gives one.
    let contacts = s.call(6, "get_contacts", json!({}));
    assert_eq!(
        contacts["result"]["structuredContent"]["token_length"], 12,
        "{contacts}"
    );
    let contacts = s.call(7, "get_contacts", json!({"auth_token": "abc"}));
    assert_eq!(
        contacts["result"]["structuredContent"]["token_length"], 3,
        "{contacts}"
    );

    // An unknown tool: a JSON-RPC error.
    let unknown = s.call(8, "no_such_tool", json!({}));
    assert_eq!(unknown["error"]["code"], -32602, "{unknown}");

    // Progress and logs of a slow call, in order before its response; a
    // ping sent with it (in the same write) is answered first, long before
    // the first file is done (calls run concurrently).
    s.send_together(&[
        json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
        "name": "download", "arguments": {"files": 3, "delay_ms": 400},
        "_meta": {"progressToken": "dl"}}}),
        json!({"jsonrpc": "2.0", "id": "ping-1", "method": "ping"}),
    ]);
    let pong = s.next();
    assert_eq!(
        pong,
        json!({"jsonrpc": "2.0", "id": "ping-1", "result": {}})
    );
    let mut progress = Vec::new();
    let mut logs = Vec::new();
    let mut first_report = None;
    let (done_at, done) = loop {
        let (at, m) = s.next_stamped();
        if m["method"].is_string() {
            first_report.get_or_insert(at);
        }
        match m["method"].as_str() {
            Some("notifications/progress") => {
                assert_eq!(m["params"]["progressToken"], "dl", "{m}");
                assert_eq!(m["params"]["total"], 3.0, "{m}");
                progress.push(m["params"]["progress"].as_f64().unwrap());
            }
            Some("notifications/message") => {
                assert_eq!(m["params"]["level"], "info", "{m}");
                assert_eq!(m["params"]["logger"], "download", "{m}");
                logs.push(m["params"]["data"].as_str().unwrap().to_owned());
            }
            _ => break (at, m),
        }
    };
    assert_eq!(done["id"], 9, "{done}");
    // Live: the first file's reports come as it is done, two files (800 ms)
    // before the answer, not with it (by when they arrived).
    let ahead = first_report
        .map(|t| done_at.saturating_duration_since(t))
        .unwrap_or_default();
    assert!(
        ahead >= Duration::from_millis(400),
        "the first report came only {ahead:?} before the answer"
    );
    assert_eq!(
        done["result"]["structuredContent"],
        json!({"downloaded": 3})
    );
    assert_eq!(progress, [1.0, 2.0, 3.0]);
    assert_eq!(
        logs,
        [
            "downloaded file 1",
            "downloaded file 2",
            "downloaded file 3"
        ]
    );

    // Garbage: a parse error with id null, and the server goes on.
    s.send_raw(b"{this is not json");
    let parse = s.next();
    assert_eq!(parse["id"], Value::Null, "{parse}");
    assert_eq!(parse["error"]["code"], -32700, "{parse}");
    s.send_raw(b"[1, 2]");
    let batch = s.next();
    assert_eq!(batch["error"]["code"], -32600, "{batch}");
    let unknown_method = s.request(10, "resources/list", json!({}));
    assert_eq!(unknown_method["error"]["code"], -32601, "{unknown_method}");

    // A line over the body limit (1 MiB): an error, skipped, then the
    // next line is read.
    let mut long = br#"{"jsonrpc":"2.0","id":11,"method":"ping","params":{"pad":""#.to_vec();
    long.resize(long.len() + 1_100_000, b'x');
    long.extend_from_slice(br#""}}"#);
    s.send_raw(&long);
    let too_long = s.next();
    assert_eq!(too_long["id"], Value::Null, "{too_long}");
    assert_eq!(too_long["error"]["data"]["code"], "payload_too_large");
    let ping = s.request(12, "ping", json!({}));
    assert_eq!(ping["result"], json!({}));

    // A call in flight at the end of the input is still answered.
    s.send(
        json!({"jsonrpc": "2.0", "id": 13, "method": "tools/call", "params": {
        "name": "download", "arguments": {"files": 2, "delay_ms": 200}}}),
    );
    drop(s.stdin.take());
    // Its logs (no progress: no progressToken), then its response.
    let mut last = s.next();
    while last["method"] == "notifications/message" {
        last = s.next();
    }
    assert_eq!(last["id"], 13, "{last}");
    assert_eq!(
        last["result"]["structuredContent"],
        json!({"downloaded": 2})
    );
    s.finish();
}

const PYTHON_CLIENT: &str = r#"
import asyncio, sys
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

async def main(binary):
    params = StdioServerParameters(command=binary, args=[], env={"RUST_LOG": "warn", "ATP_MCP_AUTH_TOKEN": "py-token", "ATP_MCP_STDIO_EXAMPLE_CHILD": "1"})
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            if hasattr(session, "initialize"):
                await session.initialize()
            tools = await session.list_tools()
            names = {t.name for t in tools.tools}
            assert {"hello_world", "echo", "add", "download"} <= names, names
            def is_error(r):
                return getattr(r, "is_error", None) or getattr(r, "isError", None)
            def structured(r):
                v = getattr(r, "structured_content", None)
                return v if v is not None else getattr(r, "structuredContent", None)
            res = await session.call_tool("hello_world", {"name": "Ada"})
            assert not is_error(res), res
            assert "Hello, Ada!" in res.content[0].text, res
            seen = []
            async def on_progress(progress, total, message):
                seen.append((progress, total, message))
            res = await session.call_tool("download", {"files": 2, "delay_ms": 10}, progress_callback=on_progress)
            assert not is_error(res), res
            assert structured(res) == {"downloaded": 2}, res
            assert [p for p, _, _ in seen] == [1, 2], seen
            res = await session.call_tool("add", {"a": 9223372036854775807, "b": 1})
            assert is_error(res), res
            res = await session.call_tool("get_contacts", {})
            assert structured(res)["token_length"] == len("py-token"), res
            try:
                res = await session.call_tool("no_such_tool", {})
            except Exception as e:
                print("unknown tool:", type(e).__name__, e)
            else:
                raise AssertionError(f"an unknown tool answered {res}")
    print("python mcp client: ok")

asyncio.run(asyncio.wait_for(main(sys.argv[1]), 60))
"#;

fn official_python_client() {
    let importable = Command::new("python3")
        .args(["-c", "import mcp.client.stdio"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !importable {
        eprintln!(
            "SKIPPED official_python_client: the Python `mcp` package is not importable (pip install mcp)"
        );
        return;
    }
    let binary = example_binary();
    let out = Command::new("python3")
        .args(["-c", PYTHON_CLIENT])
        .arg(&binary)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("python mcp client: ok"),
        "the Python MCP client failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!("{stdout}");
}
