//! API keys: wrong keys are refused everywhere, dev mode takes any key but
//! only on loopback, and no secret reaches a log line.

use std::time::Duration;

use atp_registry::{
    llm::{LlmClient, LlmError, LlmProtocol},
    runtime::{RuntimeError, RuntimeOptions, Transport},
};
use atp_server::{AtpServer, Config, DbLocation, ServerError};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::{connect_async, tungstenite};

use crate::common::*;

#[tokio::test]
async fn wrong_keys_are_refused() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(keyed_config()).await;
        let b = &server.base;
        let tk_auth = format!("ApiKey {TK_KEY}");
        let register = json!({"function_id": "echo", "api_key": "wrong", "app_name": "kit", "metadata": {}});
        for (method, url, headers, body) in [
            ("POST", format!("{b}/api/v1/register_tool"), vec![], Some(register.clone())),
            ("POST", format!("{b}/api/v1/register_tool"), vec![], Some(json!({"function_id": "echo", "api_key": LLM_KEY, "app_name": "kit"}))),
            ("POST", format!("{b}/api/v1/toolkit/verify_hash"), vec![], Some(json!({"api_key": "wrong", "app_name": "kit", "toolkit_hash": "x"}))),
            ("POST", format!("{b}/api/v1/toolkit/verify_tool_hash"), vec![], Some(json!({"tool_name": "x", "tool_hash": "x"}))),
            ("GET", format!("{b}/api/v1/toolkit/wrong/inbox"), vec![], None),
            ("GET", format!("{b}/api/v1/toolkit/{LLM_KEY}/inbox"), vec![], None),
            ("POST", format!("{b}/api/v1/toolkit/wrong/inbox/respond"), vec![], Some(json!({"request_id": "x"}))),
            ("POST", format!("{b}/api/v1/atp/llm-client/process/"), vec![("authorization", "ApiKey wrong")], Some(json!({"type": "get_toolkit_context", "toolkit_id": "kit"}))),
            ("POST", format!("{b}/api/v1/atp/llm-client/process/"), vec![("authorization", tk_auth.as_str())], Some(json!({"type": "get_toolkit_context", "toolkit_id": "kit"}))),
            ("POST", format!("{b}/api/v1/atp/llm-client/process/"), vec![], Some(json!({"type": "get_toolkit_context", "toolkit_id": "kit"}))),
            ("POST", format!("{b}/api/v1/atp/llm-client/process/"), vec![], Some(json!({"type": "get_toolkit_context", "toolkit_id": "kit", "api_key": "wrong"}))),
            ("GET", format!("{b}/api/v1/atp/llm-client/oauth/tokens/p/u/"), vec![("authorization", "ApiKey wrong")], None),
            ("POST", format!("{b}/api/v1/atp/llm-client/oauth/confirmation/p/"), vec![], Some(json!({"external_user_id": "u"}))),
            ("GET", format!("{b}/ws/v1/atp/toolkit-client/wrong/"), vec![], None),
            ("GET", format!("{b}/ws/v1/atp/llm-client/wrong/"), vec![], None),
        ] {
            let (status, answer) = http_json(method, &url, &headers, body.as_ref()).await;
            assert_eq!(
                (status, answer["code"].as_str()),
                (401, Some("unauthorized")),
                "{method} {url}: {answer}"
            );
        }
        // The right key in the body works when there is no header (the
        // Python client sends both).
        let (status, answer) = http_json(
            "POST",
            &format!("{b}/api/v1/atp/llm-client/process/"),
            &[],
            Some(&json!({"type": "get_toolkit_context", "toolkit_id": "kit", "api_key": LLM_KEY})),
        )
        .await;
        assert_eq!((status, answer["code"].as_str()), (404, Some("toolkit_not_found")));

        // WebSocket handshakes with a wrong key are refused with 401.
        for path in ["toolkit-client", "llm-client"] {
            match connect_async(format!("ws://{}/ws/v1/atp/{path}/wrong/", server.addr)).await {
                Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 401),
                other => panic!("{path}: {:?}", other.map(|_| ())),
            }
        }
        // An `auth` message with another key is refused and the socket closed with a reason.
        let (mut ws, _) = connect_async(format!("ws://{}/ws/v1/atp/llm-client/{LLM_KEY}/", server.addr))
            .await
            .expect("connect");
        ws.send(tungstenite::Message::text(json!({"type": "auth", "api_key": "wrong"}).to_string()))
            .await
            .expect("send");
        let mut refused = false;
        let mut closed_with_reason = false;
        while let Some(Ok(frame)) = tokio::time::timeout(WAIT, ws.next()).await.expect("in time") {
            match frame {
                tungstenite::Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("JSON");
                    refused |= v == json!({"type": "auth_response", "success": false, "error": "Invalid API key"});
                }
                tungstenite::Message::Close(Some(f)) => {
                    closed_with_reason = u16::from(f.code) == 1008 && f.reason == "invalid API key";
                }
                _ => {}
            }
        }
        assert!(refused && closed_with_reason);

        // The Rust peers report the refusal.
        for protocol in [LlmProtocol::WebSocket, LlmProtocol::Http] {
            let llm = LlmClient::new("wrong").with_base_url(&server.base).with_protocol(protocol);
            let e = llm.get_toolkit_context("kit", "openai", "").await;
            assert!(matches!(e, Err(LlmError::AuthRefused(_))), "{protocol:?}: {e:?}");
        }
        for transport in [Transport::WebSocket, Transport::Inbox { poll_interval: Duration::from_millis(10) }] {
            let toolkit = demo_toolkit("wrong", "kit", &server.base).with_runtime_options(
                RuntimeOptions::default().transport(transport).handle_ctrl_c(false),
            );
            let e = tokio::time::timeout(WAIT, toolkit.start()).await.expect("returns");
            assert!(matches!(e, Err(RuntimeError::Unauthorized(_))), "{e:?}");
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn dev_mode_takes_any_key_on_loopback_only() {
    bounded(Duration::from_secs(30), async {
        let server = AtpServer::open(Config::dev().with_db(DbLocation::Memory)).expect("open");
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.expect("bind");
        assert!(matches!(
            server.serve(listener).await,
            Err(ServerError::DevModeNotLoopback(_))
        ));
        let server = TestServer::start(Config::dev().with_db(DbLocation::Memory)).await;
        let toolkit = demo_toolkit("any-toolkit-key", "devkit", &server.base);
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        server.wait_served("devkit").await;
        let llm = LlmClient::new("any-llm-key").with_base_url(&server.base);
        let out = llm
            .call_tool("devkit", &json!({"type": "tool_use", "id": "t", "name": "hello_world", "input": {"name": "Dev"}}), "anthropic", "")
            .await
            .expect("call");
        assert_eq!(outputs(&out), [r#"{"message":"Hello, Dev!"}"#]);
        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;
    })
    .await;
}

/// The subscriber is the process-wide one ([`capture`]), so it sees every
/// log line from every thread — of this test and of the others running
/// beside it (their spans' fields included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let captured = &capture().logs;
    const TK: &str = "tk-SECRET-4f1d";
    const LLM: &str = "llm-SECRET-9a7c";
    const TOKEN: &str = "token-SECRET-31b5";
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(Config {
            toolkit_api_keys: vec![TK.into()],
            llm_api_keys: vec![LLM.into()],
            ..keyed_config()
        })
        .await;
        let toolkit = demo_toolkit(TK, "logged", &server.base);
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        server.wait_served("logged").await;
        for protocol in [LlmProtocol::WebSocket, LlmProtocol::Http] {
            let llm = LlmClient::new(LLM)
                .with_base_url(&server.base)
                .with_protocol(protocol);
            let out = llm
                .call_tool_as(
                    "logged",
                    &json!({"type": "tool_use", "id": "t", "name": "whoami", "input": {}}),
                    "anthropic",
                    "",
                    None,
                    Some(&TOKEN.into()),
                )
                .await
                .expect("call");
            assert_eq!(outputs(&out), [format!(r#"{{"token":"{TOKEN}"}}"#)]);
            let wrong = LlmClient::new(format!("{LLM}-wrong"))
                .with_base_url(&server.base)
                .with_protocol(protocol);
            assert!(
                wrong
                    .get_toolkit_context("logged", "openai", "")
                    .await
                    .is_err()
            );
        }
        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;
    })
    .await;
    let logs = captured.text();
    assert!(
        logs.contains("tool registered") && logs.contains("toolkit connected"),
        "{logs}"
    );
    for secret in [TK, LLM, TOKEN, TK_KEY, LLM_KEY, "csecret", "refresh-1"] {
        assert!(!logs.contains(secret), "{secret} is in the logs:\n{logs}");
    }
}
