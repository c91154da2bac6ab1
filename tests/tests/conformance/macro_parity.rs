//! A tool registered with `#[tool]` and the same tool registered with the
//! builder are one tool: the same bytes in their descriptions (tool
//! context, announcement, every provider's schema), the same answers over
//! HTTP in all three adapters (ATP and MCP), and over the WebSocket
//! runtime through `atp-server`. The toolkits are `atp_conformance::seed`'s.

use std::{net::SocketAddr, time::Duration};

use atp_conformance::{
    client::{Request, Response, preview, send},
    seed::{self, APP_NAME, TOOLS},
    server::{self, Framework},
};
use atp_registry::{
    Engine, Provider, Registry, ToolKitClient,
    llm::{CallOptions, LlmClient},
    runtime::RuntimeOptions,
};
use serde_json::{Value, json};

/// The toolkit's name in URLs.
const TOOLKIT: &str = "seed";

fn text(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("serializable")
}

#[test]
fn descriptions_are_byte_identical() {
    let (by_macro, by_builder) = (seed::macro_toolkit(), seed::builder_toolkit());
    assert_eq!(by_macro.tool_names(), TOOLS);
    assert_eq!(by_builder.tool_names(), TOOLS);
    for name in TOOLS {
        let (m, b) = (
            by_macro.tool(name).expect("registered"),
            by_builder.tool(name).expect("registered"),
        );
        assert_eq!(text(&m.context()), text(&b.context()), "context of {name}");
        assert_eq!(
            text(&m.spec().metadata()),
            text(&b.spec().metadata()),
            "announcement of {name}"
        );
        assert_eq!(m.spec(), b.spec(), "spec of {name}");
        assert_eq!(
            m.output_schema(),
            b.output_schema(),
            "output schema of {name}"
        );
    }
    for provider in [
        Provider::OpenAi,
        Provider::OpenAiChat,
        Provider::Anthropic,
        Provider::Mistral,
    ] {
        for strict in [false, true] {
            assert_eq!(
                text(&by_macro.tool_schemas(provider, strict)),
                text(&by_builder.tool_schemas(provider, strict)),
                "{provider} (strict: {strict})"
            );
        }
    }
    // What the descriptions say, not only that they agree.
    let hello = by_macro.tool("hello_world").expect("registered");
    assert_eq!(
        text(hello.input_schema()),
        r#"{"type":"object","properties":{"name":{"type":"string"}},"required":["name"]}"#
    );
    let company = by_macro.tool("create_company").expect("registered");
    assert_eq!(company.required_params(), ["name", "domain", "industry"]);
    assert_eq!(company.auth_type(), Some("OAuth2"));
    assert_eq!(
        by_macro
            .tool("get_contacts")
            .expect("registered")
            .auth_with(),
        Some("api_key")
    );
    assert!(
        by_macro
            .tool("greet")
            .expect("registered")
            .output_schema()
            .is_some()
    );
}

/// The requests both toolkits must answer alike: every kind of answer of
/// every tool, ATP and MCP.
fn requests() -> Vec<Request> {
    let base = format!("/atp/{TOOLKIT}");
    let call = |tool: &str, params: Value| Request::post_json(format!("{base}/{tool}/"), &params);
    let mcp = |id: u64, method: &str, params: Value| {
        Request::post_json(
            format!("/mcp/{TOOLKIT}"),
            &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
        )
        .header("Accept", "application/json, text/event-stream")
    };
    let mut requests = vec![
        Request::get("/atp/"),
        Request::get(format!("{base}/")),
        Request::get(format!("{base}/?provider=openai")),
        Request::get(format!("{base}/?provider=openai&strict=true")),
        Request::get(format!("{base}/?provider=openai_chat")),
        Request::get(format!("{base}/?provider=anthropic")),
        Request::get(format!("{base}/?provider=mistral")),
    ];
    requests.extend(TOOLS.iter().map(|t| Request::get(format!("{base}/{t}/"))));
    requests.extend([
        call("hello_world", json!({"name": "Ada"})),
        call("hello_world", json!({})),
        call("hello_world", json!({"name": "Ada", "age": 36})),
        call("echo", json!({"text": "hi"})),
        call("create_company", json!({"name": "Acme", "domain": "acme.com", "industry": "Tech"})),
        call("create_company", json!({"name": "Acme", "domain": "acme.com", "industry": "Tech", "auth_token": "tok"})),
        call("create_company", json!({"name": "Acme", "auth_token": "tok"})),
        call("get_contacts", json!({})),
        call("get_contacts", json!({})).header("Authorization", "Bearer api-key-1"),
        call("add", json!({"a": 2, "b": 3})),
        call("add", json!({"a": "two", "b": 3})),
        call("add", json!({"a": i64::MAX, "b": 1})),
        Request::post(format!("{base}/add/"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("a=1&b=2"),
        call("greet", json!({"name": "Ada"})),
        call("greet", json!({"name": "Ada", "greeting": "Hi"})),
        call("greet", json!({"name": "Ada", "greeting": null})),
        call("sum", json!({"values": [1, 2, 3]})),
        call("sum", json!({"values": [i64::MAX, 1]})),
        call("fail", json!({})),
        mcp(1, "tools/list", json!({})),
        mcp(2, "tools/call", json!({"name": "hello_world", "arguments": {"name": "Ada"}})),
        mcp(3, "tools/call", json!({"name": "greet", "arguments": {"name": "Ada"}, "_meta": {"progressToken": 7}})),
        mcp(4, "tools/call", json!({"name": "create_company", "arguments": {"name": "A", "domain": "a.b", "industry": "c"}})),
        mcp(5, "tools/call", json!({"name": "get_contacts", "arguments": {"auth_token": "k"}})),
        mcp(6, "tools/call", json!({"name": "add", "arguments": {"a": 1}})),
        mcp(7, "tools/call", json!({"name": "sum", "arguments": {"values": [4, 5]}})),
        mcp(8, "tools/call", json!({"name": "fail"})),
    ]);
    requests
}

/// What is compared of an answer: everything but the headers a server
/// adds of its own (`Date`, `Server`, …).
fn seen(r: &Response) -> (u16, Option<&str>, Option<&str>, &[u8]) {
    (
        r.status,
        r.header("content-type"),
        r.header("allow"),
        &r.body,
    )
}

fn serve(framework: Framework, client: ToolKitClient) -> String {
    let registry = Registry::new();
    registry
        .register_client(TOOLKIT, client)
        .expect("a valid toolkit name");
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let bound =
        server::spawn(framework, Engine::with_registry(registry), addr).expect("the server starts");
    format!("http://{bound}")
}

#[test]
fn http_answers_are_byte_identical_in_every_adapter() {
    let servers: Vec<(Framework, String, String)> = Framework::ALL
        .iter()
        .map(|&f| {
            (
                f,
                serve(f, seed::macro_toolkit()),
                serve(f, seed::builder_toolkit()),
            )
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let mut differences = Vec::new();
        for request in requests() {
            for (framework, by_macro, by_builder) in &servers {
                let m = send(by_macro, &request).await.expect("an answer");
                let b = send(by_builder, &request).await.expect("an answer");
                if seen(&m) != seen(&b) {
                    differences.push(format!(
                        "{framework} {request}:\n  macro:   {} {}\n  builder: {} {}",
                        m.status,
                        preview(&m.text()),
                        b.status,
                        preview(&b.text())
                    ));
                }
            }
        }
        assert!(
            differences.is_empty(),
            "{} answers differ:\n{}",
            differences.len(),
            differences.join("\n")
        );

        // And the answers are the right ones.
        let (_, base, _) = &servers[0];
        let answer = |tool: &'static str, params: Value| {
            let base = base.clone();
            async move {
                let r = send(
                    &base,
                    &Request::post_json(format!("/atp/{TOOLKIT}/{tool}/"), &params),
                )
                .await
                .expect("an answer");
                (r.status, r.json().expect("JSON"))
            }
        };
        assert_eq!(
            answer("hello_world", json!({"name": "Ada"})).await,
            (200, json!({"result": {"message": "Hello, Ada!"}}))
        );
        assert_eq!(
            answer("sum", json!({"values": [1, 2, 3]})).await,
            (200, json!({"result": 6}))
        );
        assert_eq!(answer("create_company", json!({})).await.0, 401);
        assert_eq!(
            answer("add", json!({"a": "two", "b": 3})).await.1["code"],
            "invalid_params"
        );
        assert_eq!(
            answer("fail", json!({})).await.1,
            json!({"error": "boom", "code": "tool_error"})
        );
        let list = send(base, &requests()[requests().len() - 8])
            .await
            .expect("an answer");
        let tools = list.json().expect("JSON");
        assert_eq!(tools["result"]["tools"][5]["name"], "greet");
        assert_eq!(
            tools["result"]["tools"][5]["outputSchema"]["required"],
            json!(["message"])
        );
    });
}

/// An in-process atp-server (dev mode, in memory) with `toolkit`
/// connected to it over the WebSocket runtime: its base URL.
async fn served_over_websocket(
    toolkit: ToolKitClient,
) -> (String, atp_server::AtpServer, ToolKitClient) {
    let server = atp_server::AtpServer::open(
        atp_server::Config::dev().with_db(atp_server::DbLocation::Memory),
    )
    .expect("the server opens");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let base = format!("http://{}", listener.local_addr().expect("bound"));
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    let toolkit = toolkit
        .with_base_url(&base)
        .with_runtime_options(RuntimeOptions::default().handle_ctrl_c(false));
    let running = toolkit.clone();
    tokio::spawn(async move { running.start().await });
    assert!(
        server
            .wait_until_served(APP_NAME, Duration::from_secs(10))
            .await,
        "the toolkit connects"
    );
    (base, server, toolkit)
}

/// What the LLM side gets from one toolkit: the context in every
/// provider's format, and the result messages of the calls.
async fn llm_view(base: &str) -> Vec<Value> {
    let atp = LlmClient::new("seed-llm-key").with_base_url(base);
    let mut seen = Vec::new();
    for provider in ["openai", "openai_chat", "anthropic", "mistral"] {
        seen.push(
            atp.get_toolkit_context(APP_NAME, provider, "Seed")
                .await
                .expect("a context"),
        );
    }
    let use_tool = |id: &str, name: &str, input: Value| json!({"type": "tool_use", "id": id, "name": name, "input": input});
    let calls = json!([
        use_tool("t1", "hello_world", json!({"name": "Ada"})),
        use_tool("t2", "hello_world", json!({})),
        use_tool("t3", "echo", json!({"text": "hi"})),
        use_tool(
            "t4",
            "create_company",
            json!({"name": "Acme", "domain": "acme.com", "industry": "Tech"})
        ),
        use_tool("t5", "get_contacts", json!({})),
        use_tool("t6", "add", json!({"a": 2, "b": 3})),
        use_tool("t7", "add", json!({"a": "two", "b": 3})),
        use_tool("t8", "greet", json!({"name": "Ada", "greeting": "Hi"})),
        use_tool("t9", "sum", json!({"values": [1, 2]})),
        use_tool("t10", "fail", json!({})),
        use_tool("t11", "echo", json!({"text": "hi", "extra": 1})),
    ]);
    seen.push(Value::Array(
        atp.call_tool(APP_NAME, &calls, "anthropic", "Seed")
            .await
            .expect("answers"),
    ));
    let with_token = CallOptions::new().auth_token("user-token");
    seen.push(Value::Array(
        atp.call_tool_with(APP_NAME, &calls, "anthropic", "Seed", &with_token)
            .await
            .expect("answers"),
    ));
    let openai = json!([{"type": "function_call", "call_id": "c1", "name": "greet", "arguments": "{\"name\": \"Bo\"}"}]);
    seen.push(Value::Array(
        atp.call_tool(APP_NAME, &openai, "openai", "Seed")
            .await
            .expect("answers"),
    ));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_runtime_answers_are_identical() {
    let (macro_base, _macro_server, by_macro) = served_over_websocket(seed::macro_toolkit()).await;
    let (builder_base, _builder_server, by_builder) =
        served_over_websocket(seed::builder_toolkit()).await;
    let (m, b) = tokio::join!(llm_view(&macro_base), llm_view(&builder_base));
    for (i, (m, b)) in m.iter().zip(&b).enumerate() {
        assert_eq!(text(m), text(b), "answer {i} differs");
    }
    // And they are the right answers.
    assert_eq!(m[2]["tools"][0]["name"], "hello_world");
    let result = |i: usize, call: usize| m[i][0]["content"][call].clone();
    assert_eq!(
        result(4, 0),
        json!({"type": "tool_result", "tool_use_id": "t1", "content": "{\"message\":\"Hello, Ada!\"}"})
    );
    assert_eq!(result(4, 1)["content"], "Missing required parameters: name");
    assert_eq!(result(4, 3)["content"], "This tool requires an auth token");
    assert_eq!(
        result(4, 6)["content"],
        "Invalid parameters: invalid type: string \"two\", expected i64"
    );
    assert_eq!(result(4, 8)["content"], "3");
    assert_eq!(result(4, 10)["content"], "Unknown parameters: extra");
    assert_eq!(
        result(5, 4)["content"],
        "{\"results\":[],\"token_length\":10}"
    );
    assert_eq!(m[6][0]["output"], "{\"message\":\"Hello, Bo!\"}");
    by_macro.stop();
    by_builder.stop();
}
