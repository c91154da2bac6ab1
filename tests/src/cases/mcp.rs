//! The MCP face (docs/PROTOCOL.md §11): `POST /mcp/{toolkit}`, JSON-RPC
//! over sessionless Streamable HTTP, from the same registration.

use serde_json::{Value, json};

use super::{describe, ensure, send};
use crate::client::{Request, Response};

/// `/mcp/{toolkit}`.
fn mcp(toolkit: &str) -> String {
    format!("/mcp/{toolkit}")
}

/// A JSON-RPC request to `toolkit`'s MCP endpoint.
fn rpc(toolkit: &str, method: &str, params: Value) -> Request {
    Request::post_json(
        mcp(toolkit),
        &json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}),
    )
    .header("Accept", "application/json, text/event-stream")
}

/// Sends `request`, expects 200 `application/json` and a JSON-RPC
/// response to id 1; returns it.
async fn answer(base: &str, request: &Request) -> Result<Value, String> {
    let response = send(base, request).await?;
    ensure!(
        response.status == 200,
        "{request}: expected 200, got {}",
        describe(&response)
    );
    let ct = response.header("content-type").unwrap_or_default();
    ensure!(
        ct.starts_with("application/json"),
        "{request}: expected application/json, got {ct:?}"
    );
    let v = response.json()?;
    ensure!(
        v["jsonrpc"] == "2.0" && v["id"] == 1,
        "{request}: not a JSON-RPC response to id 1: {v}"
    );
    Ok(v)
}

/// The `result` of a successful answer.
async fn result(base: &str, request: &Request) -> Result<Value, String> {
    let v = answer(base, request).await?;
    ensure!(v.get("error").is_none(), "{request}: an error: {v}");
    Ok(v["result"].clone())
}

/// A `tools/call` of `tool` with `arguments`.
fn call(toolkit: &str, tool: &str, arguments: Value) -> Request {
    rpc(
        toolkit,
        "tools/call",
        json!({"name": tool, "arguments": arguments}),
    )
}

/// Checks an HTTP-level refusal: `status` with a JSON-RPC error whose
/// `data.code` is `code`.
fn check_refusal(request: &Request, r: &Response, status: u16, code: &str) -> Result<(), String> {
    ensure!(
        r.status == status,
        "{request}: expected {status}, got {}",
        describe(r)
    );
    let v = r.json()?;
    ensure!(
        v["error"]["data"]["code"] == code && v["error"]["code"].is_i64(),
        "{request}: expected a JSON-RPC error with data.code {code:?}, got {v}"
    );
    Ok(())
}

/// `initialize` is answered with 2025-11-25 (what the client asked for),
/// the tools and logging capabilities and the toolkit's name, and no
/// session.
pub async fn mcp_initialize(base: &str) -> Result<(), String> {
    let request = rpc(
        "conformance",
        "initialize",
        json!({"protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "atp-conformance", "version": "1"}}),
    );
    let response = send(base, &request).await?;
    ensure!(
        response.header("mcp-session-id").is_none(),
        "{request}: sessionless, yet a session id was issued"
    );
    let r = result(base, &request).await?;
    ensure!(
        r["protocolVersion"] == "2025-11-25"
            && r["capabilities"]["tools"].is_object()
            && r["serverInfo"]["name"] == "Conformance",
        "{request}: {r}"
    );
    // An unknown version gets the newest with an initialize.
    let old = rpc(
        "conformance",
        "initialize",
        json!({"protocolVersion": "1999-01-01", "capabilities": {},
            "clientInfo": {"name": "x", "version": "1"}}),
    );
    let r = result(base, &old).await?;
    ensure!(r["protocolVersion"] == "2025-11-25", "{old}: {r}");
    Ok(())
}

/// `tools/list` gives every tool in registration order, each with a
/// description and an object `inputSchema`.
pub async fn mcp_tools_list(base: &str) -> Result<(), String> {
    let request = rpc("conformance", "tools/list", json!({}));
    let r = result(base, &request).await?;
    let tools = r["tools"].as_array().ok_or(format!("{request}: {r}"))?;
    let names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    let expected: Vec<&str> = super::expected::TOOLS.iter().map(|t| t.name).collect();
    ensure!(
        names == expected,
        "{request}: tools {names:?}, expected {expected:?}"
    );
    for t in tools {
        ensure!(
            t["inputSchema"]["type"] == "object"
                && t["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{request}: {t}"
        );
    }
    let echo = &tools[0];
    ensure!(
        echo["inputSchema"]["required"] == json!(["text"]),
        "{request}: echo's schema {echo}"
    );
    Ok(())
}

/// A tool's result is a text block with its JSON, and its
/// `structuredContent`.
pub async fn mcp_tools_call(base: &str) -> Result<(), String> {
    let request = call("conformance", "echo", json!({"text": "hi"}));
    let r = result(base, &request).await?;
    ensure!(
        r["content"] == json!([{"type": "text", "text": "{\"echo\":\"hi\"}"}])
            && r["structuredContent"] == json!({"echo": "hi"})
            && r["isError"] != true,
        "{request}: {r}"
    );
    Ok(())
}

/// A tool's failure, and a call that fails ATP's checks, are results with
/// `isError: true` and the message.
pub async fn mcp_tool_error_is_a_result(base: &str) -> Result<(), String> {
    for (request, message) in [
        (call("conformance", "fail", json!({})), "boom"),
        (
            call("conformance", "echo", json!({})),
            "Missing required parameters: text",
        ),
        (
            call("conformance", "secure", json!({})),
            "This tool requires an auth token",
        ),
    ] {
        let r = result(base, &request).await?;
        ensure!(
            r["isError"] == true && r["content"][0]["text"] == message,
            "{request}: expected isError with {message:?}, got {r}"
        );
    }
    Ok(())
}

/// `Authorization: Bearer` is the auth token of a tool that needs one;
/// the `auth_token` argument wins over it.
pub async fn mcp_bearer_token(base: &str) -> Result<(), String> {
    let request = call("conformance", "secure", json!({})).header("Authorization", "Bearer abcd");
    let r = result(base, &request).await?;
    ensure!(
        r["structuredContent"] == json!({"token_length": 4}),
        "{request}: {r}"
    );
    let request = call("conformance", "secure", json!({"auth_token": "abcdefgh"}))
        .header("Authorization", "Bearer abcd");
    let r = result(base, &request).await?;
    ensure!(
        r["structuredContent"] == json!({"token_length": 8}),
        "{request}: {r}"
    );
    Ok(())
}

/// An unknown tool is a JSON-RPC error (`-32602`); an unknown method
/// `-32601`; a body that is not JSON is 400 with `-32700`.
pub async fn mcp_protocol_errors(base: &str) -> Result<(), String> {
    let request = call("conformance", "nope", json!({}));
    let v = answer(base, &request).await?;
    ensure!(v["error"]["code"] == -32602, "{request}: {v}");
    let request = rpc("conformance", "resources/list", json!({}));
    let v = answer(base, &request).await?;
    ensure!(v["error"]["code"] == -32601, "{request}: {v}");
    let request = Request::post(mcp("conformance"))
        .header("Content-Type", "application/json")
        .body("{");
    let r = send(base, &request).await?;
    let v = r.json()?;
    ensure!(
        r.status == 400 && v["error"]["code"] == -32700,
        "{request}: {}",
        describe(&r)
    );
    Ok(())
}

/// A notification (no id) is answered 202 with no body.
pub async fn mcp_notification_accepted(base: &str) -> Result<(), String> {
    let request = Request::post_json(
        mcp("conformance"),
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    );
    let r = send(base, &request).await?;
    ensure!(
        r.status == 202 && r.body.is_empty(),
        "{request}: expected 202 with no body, got {}",
        describe(&r)
    );
    Ok(())
}

/// Sessionless: GET and DELETE are 405 with `Allow: POST`.
pub async fn mcp_get_and_delete_not_allowed(base: &str) -> Result<(), String> {
    for method in ["GET", "DELETE"] {
        let request = Request::new(method, mcp("conformance"));
        let r = send(base, &request).await?;
        check_refusal(&request, &r, 405, "method_not_allowed")?;
        ensure!(
            r.header("allow") == Some("POST"),
            "{request}: Allow {:?}",
            r.header("allow")
        );
    }
    Ok(())
}

/// A foreign `Origin` is refused (DNS rebinding): 403.
pub async fn mcp_foreign_origin_refused(base: &str) -> Result<(), String> {
    let request =
        rpc("conformance", "tools/list", json!({})).header("Origin", "http://evil.example.com");
    let r = send(base, &request).await?;
    check_refusal(&request, &r, 403, "forbidden_host")?;
    let request =
        rpc("conformance", "tools/list", json!({})).header("Origin", "http://localhost:3000");
    result(base, &request).await.map(drop)
}

/// The toolkit's rules hold: unknown toolkit 404, endpoint key 401, body
/// limit 413, JSON only 415.
pub async fn mcp_toolkit_rules(base: &str) -> Result<(), String> {
    let request = rpc("nope", "tools/list", json!({}));
    check_refusal(
        &request,
        &send(base, &request).await?,
        404,
        "toolkit_not_found",
    )?;
    let request = rpc("locked", "tools/list", json!({}));
    check_refusal(&request, &send(base, &request).await?, 401, "unauthorized")?;
    let request =
        rpc("locked", "tools/list", json!({})).header("X-ATP-Key", crate::fixture::ENDPOINT_KEY);
    result(base, &request).await?;
    let request = Request::post(mcp("conformance"))
        .header("Content-Type", "application/json")
        .body(vec![b' '; crate::fixture::BODY_LIMIT + 1]);
    check_refusal(
        &request,
        &send(base, &request).await?,
        413,
        "payload_too_large",
    )?;
    let request = Request::post(mcp("conformance"))
        .header("Content-Type", "text/plain")
        .body("{}");
    check_refusal(
        &request,
        &send(base, &request).await?,
        415,
        "unsupported_media_type",
    )
}

/// A tool's progress comes as `notifications/progress` events before the
/// response, when the request has a `progressToken` and accepts SSE.
pub async fn mcp_progress_as_events(base: &str) -> Result<(), String> {
    let request = rpc(
        crate::fixture::MCP_TOOLKIT,
        "tools/call",
        json!({"name": "test_tool_with_progress", "arguments": {}, "_meta": {"progressToken": "p-1"}}),
    );
    let r = send(base, &request).await?;
    ensure!(
        r.status == 200
            && r.header("content-type")
                .is_some_and(|c| c.starts_with("text/event-stream")),
        "{request}: expected 200 text/event-stream, got {} {:?}",
        describe(&r),
        r.header("content-type")
    );
    let events: Vec<Value> = r
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).map_err(|e| format!("{request}: {e}: {d}")))
        .collect::<Result<_, _>>()?;
    let progress: Vec<f64> = events
        .iter()
        .filter(|e| e["method"] == "notifications/progress")
        .map(|e| {
            ensure!(e["params"]["progressToken"] == "p-1", "{request}: {e}");
            e["params"]["progress"]
                .as_f64()
                .ok_or(format!("{request}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    ensure!(
        progress == [0.0, 50.0, 100.0],
        "{request}: progress {progress:?}"
    );
    let last = events.last().ok_or(format!("{request}: no events"))?;
    ensure!(
        last["id"] == 1 && last["result"]["content"][0]["type"] == "text",
        "{request}: the last event is not the response: {last}"
    );
    Ok(())
}
