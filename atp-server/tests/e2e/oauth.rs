//! The OAuth flow against a small OAuth2 provider started by the test:
//! authorization URL with state and PKCE, the callback's code exchange,
//! tokens, injection into tool calls, refresh, and a restart.

use std::time::Duration;

use atp_registry::{
    llm::{LlmError, LlmProtocol},
    runtime::Transport,
};
use atp_server::{Config, DbLocation, OAuthPlatform};
use serde_json::json;

use crate::{
    common::*,
    oauth_provider::{self, Provider, location, query},
};

#[tokio::test]
async fn oauth_flow_against_a_local_provider() {
    bounded(Duration::from_secs(60), async {
        let provider = Provider::start(oauth_provider::Options {
            scopes: &["read", "write"],
            ..Default::default()
        })
        .await;
        let prov = &provider.base;

        let path =
            std::env::temp_dir().join(format!("atp-server-oauth-{}.sqlite3", std::process::id()));
        let platform = provider.platform();
        let config = |platforms: Vec<OAuthPlatform>| Config {
            db: DbLocation::File(path.clone()),
            oauth_platforms: platforms,
            ..keyed_config()
        };
        let server = TestServer::start(config(vec![platform])).await;
        let toolkit = demo_toolkit(TK_KEY, "crm", &server.base);
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        server.wait_served("crm").await;
        let llm = server.llm(LlmProtocol::Http);
        let whoami = json!({"type": "tool_use", "id": "t1", "name": "whoami", "input": {}});

        // Not connected yet: 404, and the tool call says how to connect.
        match llm.get_user_tokens("local-app", "ada@example.com").await {
            Err(LlmError::Server {
                status: Some(404), ..
            }) => {}
            other => panic!("{other:?}"),
        }
        let out = llm
            .call_tool_as(
                "crm",
                &whoami,
                "anthropic",
                "",
                Some("ada@example.com"),
                None,
            )
            .await
            .expect("call");
        assert!(
            outputs(&out)[0].starts_with(
                "This tool requires an auth token: user ada@example.com has not connected localprov"
            ),
            "{out:?}"
        );

        let started = llm
            .initiate_oauth_connection(
                "local-app",
                "ada@example.com",
                Some("http://127.0.0.1:9/done"),
            )
            .await
            .expect("initiate");
        let auth_url = started["authorization_url"]
            .as_str()
            .expect("authorization_url");
        assert!(
            auth_url.starts_with(&format!("{prov}/authorize?")),
            "{auth_url}"
        );
        assert!(auth_url.contains("code_challenge_method=S256") && auth_url.contains("state="));
        assert_eq!(started["provider_name"], "Local Provider");
        assert_eq!(started["scopes"], json!(["read", "write"]));

        // The user's browser: the provider redirects to the server's callback,
        // which exchanges the code and redirects to the developer's page.
        let (status, headers, _) = http("GET", auth_url, &[], None).await;
        assert_eq!(status, 302);
        let callback = location(&headers);
        assert!(
            callback.starts_with(&format!(
                "{}/api/v1/atp/llm-client/oauth/callback/?",
                server.base
            )),
            "{callback}"
        );
        let (status, headers, body) = http("GET", &callback, &[], None).await;
        assert_eq!(status, 303, "{body}");
        let done = location(&headers);
        assert!(
            done.starts_with("http://127.0.0.1:9/done?status=success&platform_id=local-app"),
            "{done}"
        );
        // A state is used once.
        let (status, _, body) = http("GET", &callback, &[], None).await;
        assert_eq!(status, 400);
        assert!(body.contains("invalid_state"));

        // The first token expired at once: reading it refreshes it.
        let tokens = llm
            .wait_for_connection(
                "local-app",
                "ada@example.com",
                WAIT,
                Duration::from_millis(50),
            )
            .await
            .expect("connected");
        assert_eq!(tokens["access_token"], "access-2", "{tokens}");
        assert_eq!(tokens["refresh_token"], "refresh-1");
        assert_eq!(tokens["scope"], "read write");
        assert!(tokens["integration_id"].is_string() && tokens["expires_at"].is_string());
        assert_eq!(provider.refreshes(), 1);

        // A task for that user gets the token injected, over both protocols.
        for protocol in [LlmProtocol::WebSocket, LlmProtocol::Http] {
            let out = server
                .llm(protocol)
                .call_tool_as(
                    "crm",
                    &whoami,
                    "anthropic",
                    "",
                    Some("ada@example.com"),
                    None,
                )
                .await
                .expect("call");
            assert_eq!(outputs(&out), [r#"{"token":"access-2"}"#]);
        }
        // An explicit token wins; another user has no connection.
        let out = llm
            .call_tool_as(
                "crm",
                &whoami,
                "anthropic",
                "",
                Some("ada@example.com"),
                Some(&"explicit".into()),
            )
            .await
            .expect("call");
        assert_eq!(outputs(&out), [r#"{"token":"explicit"}"#]);

        // A refused authorization comes back as an error.
        let started = llm
            .initiate_oauth_connection("local-app", "bob", None)
            .await
            .expect("initiate");
        let auth_url = started["authorization_url"].as_str().expect("url");
        let state = query(auth_url.split_once('?').expect("query").1)["state"].clone();
        let denied = format!(
            "{}/api/v1/atp/llm-client/oauth/callback?error=access_denied&state={state}",
            server.base
        );
        let (status, a) = http_json("GET", &denied, &[], None).await;
        assert_eq!((status, a["code"].as_str()), (400, Some("oauth_denied")));
        match llm.initiate_oauth_connection("nope", "bob", None).await {
            Err(LlmError::Server {
                status: Some(404),
                message,
            }) => assert_eq!(message, "OAuth platform not found"),
            other => panic!("{other:?}"),
        }

        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;

        // After a restart, without the platform in the config: the platform
        // and the connection are still there.
        let server = TestServer::start(config(Vec::new())).await;
        let tokens = server
            .llm(LlmProtocol::Http)
            .get_user_tokens("local-app", "ada@example.com")
            .await
            .expect("tokens survive a restart");
        assert_eq!(tokens["access_token"], "access-2");
        server.stop().await;
        drop(provider);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    })
    .await;
}
