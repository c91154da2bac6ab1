//! Toolkits served through the WebSocket, the inbox and an endpoint URL;
//! LLM requests over WebSocket and HTTP in every provider's format;
//! registrations that survive a restart.

use std::time::Duration;

use atp_registry::{Engine, Registry, llm::LlmProtocol, runtime::Transport};
use atp_server::{Config, DbLocation};
use axum::Router;
use serde_json::{Value, json};

use crate::common::*;

const PROVIDERS: [(&str, &str); 4] = [
    ("openai", "openai_responses_response.json"),
    ("openai_chat", "openai_chat_completion_response.json"),
    ("anthropic", "anthropic_message_response.json"),
    ("mistral", "mistral_chat_completion_response.json"),
];

/// Checks a provider's tool description (docs/PROTOCOL.md §4).
fn assert_provider_shape(provider: &str, tool: &Value) {
    match provider {
        "openai" => {
            assert_eq!(tool["type"], "function");
            assert!(
                tool["name"].is_string() && tool["strict"] == json!(false),
                "{tool}"
            );
            assert_eq!(tool["parameters"]["type"], "object");
        }
        "anthropic" => {
            assert!(tool["name"].is_string(), "{tool}");
            assert_eq!(tool["input_schema"]["type"], "object");
            assert!(tool.get("type").is_none());
        }
        _ => {
            assert_eq!(tool["type"], "function");
            assert_eq!(tool["function"]["parameters"]["type"], "object", "{tool}");
        }
    }
}

async fn llm_round_trips(server: &TestServer, app: &str) {
    for protocol in [LlmProtocol::WebSocket, LlmProtocol::Http] {
        let llm = server.llm(protocol);
        for (provider, file) in PROVIDERS {
            let context = llm
                .get_toolkit_context(app, provider, "Greet Ada, then the weather in Paris.")
                .await
                .unwrap_or_else(|e| panic!("{provider} {protocol:?}: {e}"));
            assert_eq!(context["toolkit_id"], app);
            assert_eq!(context["provider"], provider);
            let tools = context["tools"].as_array().expect("tools");
            assert_eq!(tools.len(), 6, "{context}");
            for t in tools {
                assert_provider_shape(provider, t);
            }
            let messages = llm
                .call_tool(
                    app,
                    &sample(file),
                    provider,
                    "Greet Ada, then the weather in Paris.",
                )
                .await
                .unwrap_or_else(|e| panic!("{provider} {protocol:?}: {e}"));
            let out = outputs(&messages);
            assert_eq!(out.len(), 2, "{provider} {protocol:?}: {messages:?}");
            assert_eq!(
                serde_json::from_str::<Value>(&out[0]).expect("JSON"),
                json!({"message": "Hello, Ada Lovelace!"}),
                "{provider} {protocol:?}"
            );
            assert_eq!(
                serde_json::from_str::<Value>(&out[1]).expect("JSON"),
                json!({"city": "Paris", "forecast": "sunny"}),
                "{provider} {protocol:?}"
            );
        }
    }
}

#[tokio::test]
async fn websocket_toolkit_serves_every_provider_over_ws_and_http() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        let toolkit = demo_toolkit(TK_KEY, "demo", &server.base);
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        server.wait_served("demo").await;
        llm_round_trips(&server, "demo").await;

        // Errors are results, with the message kept.
        let llm = server.llm(LlmProtocol::WebSocket);
        let calls = json!([
            {"type": "function_call", "call_id": "c1", "name": "fails", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "hello_world", "arguments": "{}"},
            {"type": "function_call", "call_id": "c3", "name": "nope", "arguments": "{}"},
            {"type": "function_call", "call_id": "c4", "name": "echo", "arguments": "{\"text\": \"x\", \"extra\": 1}"},
            {"type": "function_call", "call_id": "c5", "name": "whoami", "arguments": "{}"}
        ]);
        let out = outputs(&llm.call_tool("demo", &calls, "openai", "").await.expect("call"));
        assert_eq!(out[0], "this tool always fails");
        assert_eq!(out[1], "Missing required parameters: name");
        assert_eq!(out[2], "Tool not found");
        assert_eq!(out[3], "Unknown parameters: extra");
        assert_eq!(out[4], "This tool requires an auth token");
        let context = llm.get_toolkit_context("nope", "openai", "").await;
        assert!(matches!(context, Err(e) if e.to_string().contains("Toolkit not found")));

        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn inbox_toolkit_is_served() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(Config {
            inbox_wait: Duration::from_secs(2),
            ..keyed_config()
        })
        .await;
        let toolkit = demo_toolkit(TK_KEY, "inboxed", &server.base);
        let runtime = serve_toolkit(
            &toolkit,
            Transport::Inbox {
                poll_interval: Duration::from_millis(20),
            },
        );
        server.wait_served("inboxed").await;
        let llm = server.llm(LlmProtocol::Http);
        let messages = llm
            .call_tool(
                "inboxed",
                &sample("anthropic_message_response.json"),
                "anthropic",
                "",
            )
            .await
            .expect("call");
        assert_eq!(messages.len(), 1, "one user message: {messages:?}");
        let out = outputs(&messages);
        assert_eq!(out[0], r#"{"message":"Hello, Ada Lovelace!"}"#);
        assert_eq!(out[1], r#"{"city":"Paris","forecast":"sunny"}"#);

        // The inbox answers only its own key, and only delivered requests.
        let inbox = format!("{}/api/v1/toolkit/wrong/inbox", server.base);
        assert_eq!(http_json("GET", &inbox, &[], None).await.0, 401);
        let respond = format!("{}/api/v1/toolkit/{TK_KEY}/inbox/respond", server.base);
        let (status, body) = http_json(
            "POST",
            &respond,
            &[],
            Some(&json!({"request_id": "made-up", "response": 1})),
        )
        .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (404, Some("request_not_found"))
        );
        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn endpoint_url_toolkit_is_called_over_http() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        // The toolkit is served by our axum adapter.
        let registry = Registry::new();
        let kit = demo_toolkit("unused", "endpoint-kit", &server.base)
            .with_endpoint_key("endpoint-secret");
        registry
            .register_client("endpoint-kit", kit.clone())
            .expect("register");
        let app = Router::new().merge(atp_axum::Atp::from(Engine::with_registry(registry)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let adapter = tokio::spawn(async move { axum::serve(listener, app).await });

        for tool in kit.registered_tools() {
            let body = json!({
                "function_id": tool.name(),
                "api_key": TK_KEY,
                "app_name": "endpoint-kit",
                "programming_language": "Rust",
                "code_hash": "h",
                "toolkit_hash": "th",
                "endpoint_url": endpoint,
                "endpoint_key": "endpoint-secret",
                "metadata": {
                    "params": tool.params(),
                    "required_params": tool.required_params(),
                    "description": tool.description(),
                    "auth_provider": tool.auth_provider(),
                    "auth_type": tool.auth_type(),
                    "auth_with": tool.auth_with(),
                    "input_schema": tool.input_schema(),
                },
            });
            let (status, answer) = http_json(
                "POST",
                &format!("{}/api/v1/register_tool", server.base),
                &[],
                Some(&body),
            )
            .await;
            assert_eq!(status, 200, "{answer}");
            assert!(answer["exchange_token"].is_string());
        }
        llm_round_trips(&server, "endpoint-kit").await;

        // The call's auth token reaches the tool as a Bearer token.
        let llm = server.llm(LlmProtocol::Http);
        let out = llm
            .call_tool_as(
                "endpoint-kit",
                &json!({"type": "tool_use", "id": "t1", "name": "whoami", "input": {}}),
                "anthropic",
                "",
                None,
                Some(&"user-token".into()),
            )
            .await
            .expect("call");
        assert_eq!(outputs(&out), [r#"{"token":"user-token"}"#]);
        let out = llm
            .call_tool(
                "endpoint-kit",
                &json!({"type": "tool_use", "id": "t2", "name": "fails", "input": {}}),
                "anthropic",
                "",
            )
            .await
            .expect("call");
        assert_eq!(out[0]["content"][0]["is_error"], true);
        assert_eq!(outputs(&out), ["this tool always fails"]);
        adapter.abort();
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_restart_keeps_the_registrations() {
    bounded(Duration::from_secs(60), async {
        let path = std::env::temp_dir().join(format!(
            "atp-server-restart-{}-{}.sqlite3",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let config = || Config {
            db: DbLocation::File(path.clone()),
            ..keyed_config()
        };
        let server = TestServer::start(config()).await;
        let toolkit = demo_toolkit(TK_KEY, "durable", &server.base);
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        server.wait_served("durable").await;
        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;

        let server = TestServer::start(config()).await;
        assert!(server.server.is_registered("durable"));
        let context = demo_context(&server, "durable").await;
        assert_eq!(context["toolkit_connected"], false);
        // Not connected after the restart: an error result, at once.
        let out = server
            .llm(LlmProtocol::WebSocket)
            .call_tool(
                "durable",
                &json!({"type": "tool_use", "id": "t1", "name": "echo", "input": {"text": "x"}}),
                "anthropic",
                "",
            )
            .await
            .expect("call");
        assert_eq!(outputs(&out), ["Toolkit durable is not connected"]);
        // The toolkit is served again after reconnecting, and its announcement is up to date.
        let toolkit = demo_toolkit(TK_KEY, "durable", &server.base);
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        server.wait_served("durable").await;
        assert_eq!(
            echo(&server, LlmProtocol::WebSocket, "durable", "x").await,
            json!({"app": "durable", "echo": "x"})
        );
        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    })
    .await;
}

#[tokio::test]
async fn verify_hash_answers() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(Config {
            toolkit_api_keys: vec![TK_KEY.into(), "tk-other".into()],
            ..keyed_config()
        })
        .await;
        let url = |p: &str| format!("{}/api/v1/{p}", server.base);
        let tool = json!({
            "function_id": "hello_world", "api_key": TK_KEY, "app_name": "py-app",
            "programming_language": "Python", "code_hash": "c1", "toolkit_hash": "t1",
            "metadata": {"params": ["name"], "required_params": ["name"], "description": "Hi.",
                         "auth_provider": null, "auth_type": null, "auth_with": null,
                         "sample_response": "", "source_code": "def hello_world(**kw): ..."}
        });
        let (status, _) = http_json("POST", &url("register_tool"), &[], Some(&tool)).await;
        assert_eq!(status, 200);
        let verify = |hash: &str| json!({"api_key": TK_KEY, "app_name": "py-app", "toolkit_hash": hash});
        let (_, a) = http_json("POST", &url("toolkit/verify_hash"), &[], Some(&verify("t1"))).await;
        assert_eq!(a, json!({"up_to_date": true}));
        let (_, a) = http_json("POST", &url("toolkit/verify_hash/"), &[], Some(&verify("t2"))).await;
        assert_eq!(a, json!({"up_to_date": false}));
        let tool_hash = json!({"api_key": TK_KEY, "tool_name": "hello_world", "tool_hash": "c1"});
        let (_, a) = http_json("POST", &url("toolkit/verify_tool_hash"), &[], Some(&tool_hash)).await;
        assert_eq!(a, json!({"up_to_date": true}));
        // Python metadata has no input_schema: params are strings.
        let context = server
            .llm(LlmProtocol::Http)
            .get_toolkit_context("py-app", "openai", "")
            .await
            .expect("context");
        assert_eq!(
            context["tools"][0]["parameters"],
            json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]})
        );
        // Bad registrations are refused with a clear error.
        for (patch, code) in [
            (json!({"function_id": "bad name"}), "invalid_tool"),
            (json!({"app_name": "bad/app"}), "invalid_app_name"),
            (json!({"metadata": {"params": ["auth_token"]}}), "invalid_tool"),
            (json!({"metadata": {"params": ["a"], "required_params": ["b"]}}), "invalid_tool"),
            (json!({"metadata": {"params": "a"}}), "invalid_tool"),
            (json!({"endpoint_url": "ftp://x"}), "invalid_endpoint_url"),
        ] {
            let mut body = tool.clone();
            for (k, v) in patch.as_object().expect("object") {
                body[k] = v.clone();
            }
            let (status, answer) = http_json("POST", &url("register_tool"), &[], Some(&body)).await;
            assert_eq!((status, answer["code"].as_str()), (400, Some(code)), "{patch}: {answer}");
        }
        // Another key may not take the toolkit over.
        let mut other = tool.clone();
        other["api_key"] = json!("another-key");
        let (status, _) = http_json("POST", &url("register_tool"), &[], Some(&other)).await;
        assert_eq!(status, 401);
        other["api_key"] = json!("tk-other");
        let (status, answer) = http_json("POST", &url("register_tool"), &[], Some(&other)).await;
        assert_eq!((status, answer["code"].as_str()), (409, Some("app_name_taken")));
        // Strict schemas on request.
        let (_, answer) = http_json(
            "POST",
            &format!("{}/api/v1/atp/llm-client/process", server.base),
            &[("authorization", &format!("ApiKey {LLM_KEY}"))],
            Some(&json!({"type": "get_toolkit_context", "toolkit_id": "py-app", "provider": "openai", "strict": true})),
        )
        .await;
        let t = &answer["payload"]["tools"][0];
        assert_eq!((t["strict"].as_bool(), t["parameters"]["additionalProperties"].as_bool()), (Some(true), Some(false)));
        server.stop().await;
    })
    .await;
}
