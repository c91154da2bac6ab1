//! The OAuth flow against a small OAuth2 provider started by the test:
//! authorization URL with state and PKCE, the callback's code exchange,
//! tokens, injection into tool calls, refresh, and a restart; and what
//! goes wrong: a provider that refuses the code, a refresh token that
//! expired or was revoked, a state used twice, a callback too late.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use atp_registry::{
    llm::{LlmClient, LlmError, LlmProtocol},
    runtime::Transport,
};
use atp_server::{Config, DbLocation, OAuthPlatform};
use futures_util::FutureExt;
use serde_json::{Value, json};

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

/// Starts a flow for `user` of `local-app` and plays the user's browser at
/// the provider: the flow's answer, and the callback URL (with the code
/// and the state) the provider sends the browser to.
async fn authorize(llm: &LlmClient, user: &str, redirect: Option<&str>) -> (Value, String) {
    let started = llm
        .initiate_oauth_connection("local-app", user, redirect)
        .await
        .expect("initiate");
    let auth_url = started["authorization_url"]
        .as_str()
        .expect("authorization_url");
    let (status, headers, body) = http("GET", auth_url, &[], None).await;
    assert_eq!(status, 302, "{body}");
    let callback = location(&headers);
    (started, callback)
}

/// `GET …/oauth/tokens/local-app/{user}/` as the LLM key: status and body.
async fn tokens_of(server: &TestServer, user: &str) -> (u16, Value) {
    let url = format!(
        "{}/api/v1/atp/llm-client/oauth/tokens/local-app/{user}/",
        server.base
    );
    let auth = format!("ApiKey {LLM_KEY}");
    http_json("GET", &url, &[("Authorization", &auth)], None).await
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[tokio::test]
async fn oauth_provider_refuses_the_code() {
    bounded(Duration::from_secs(60), async {
        // A provider that answers with HTTP 400, and one that answers an
        // error with 200 (as GitHub does).
        for errors_with_200 in [false, true] {
            let provider = Provider::start(oauth_provider::Options {
                scopes: &["read"],
                code_error: Some("invalid_grant"),
                errors_with_200,
                ..Default::default()
            })
            .await;
            let server = TestServer::start(Config {
                oauth_platforms: vec![provider.platform()],
                ..keyed_config()
            })
            .await;
            let llm = server.llm(LlmProtocol::Http);

            // Without a developer page, the user sees a JSON error that
            // says what the provider said, and nothing secret.
            let (_, callback) = authorize(&llm, "ada", None).await;
            let code = query(callback.split_once('?').expect("query").1)["code"].clone();
            let (status, a) = http_json("GET", &callback, &[], None).await;
            assert_eq!(
                (status, a["code"].as_str()),
                (502, Some("oauth_exchange_failed")),
                "{a}"
            );
            let message = a["error"].as_str().expect("a message");
            assert!(
                message.contains("invalid_grant") && message.contains("the provider says no"),
                "{message}"
            );
            assert!(
                !message.contains(&code) && !message.contains("csecret"),
                "{message}"
            );
            // Nothing was stored.
            let (status, a) = tokens_of(&server, "ada").await;
            assert_eq!((status, a["code"].as_str()), (404, Some("not_connected")));

            // With a developer page, the browser is sent there with the
            // error.
            let (_, callback) = authorize(&llm, "bob", Some("http://127.0.0.1:9/done")).await;
            let (status, headers, body) = http("GET", &callback, &[], None).await;
            assert_eq!(status, 303, "{body}");
            let done = location(&headers);
            let q = query(done.split_once('?').expect("query").1);
            assert_eq!(q["status"], "error", "{done}");
            assert_eq!(q["error"], "oauth_exchange_failed", "{done}");
            assert!(q["error_description"].contains("invalid_grant"), "{done}");
            let (status, _) = tokens_of(&server, "bob").await;
            assert_eq!(status, 404);
            assert_eq!(provider.code_requests(), 2);
            server.stop().await;
        }
    })
    .await;
}

#[tokio::test]
async fn oauth_refresh_token_expired_or_revoked() {
    bounded(Duration::from_secs(60), async {
        let provider = Provider::start(oauth_provider::Options {
            scopes: &["read"],
            ..Default::default()
        })
        .await;
        let server = TestServer::start(Config {
            oauth_platforms: vec![provider.platform()],
            ..keyed_config()
        })
        .await;
        let toolkit = demo_toolkit(TK_KEY, "crm", &server.base);
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        server.wait_served("crm").await;
        let llm = server.llm(LlmProtocol::Http);

        // The toolkit runs on a blocking thread: stop it even when an
        // assertion fails, or the test would wait for it for ever.
        let checks = std::panic::AssertUnwindSafe(async {
            let (_, callback) = authorize(&llm, "ada", None).await;
            let (status, a) = http_json("GET", &callback, &[], None).await;
            assert_eq!(
                (status, a["status"].as_str()),
                (200, Some("connected")),
                "{a}"
            );
            // The access token expired at once, and the provider no longer
            // takes the refresh token.
            provider.revoke_refresh_tokens();

            // A clear error, once...
            let (status, a) = tokens_of(&server, "ada").await;
            assert_eq!(
                (status, a["code"].as_str()),
                (502, Some("oauth_refresh_failed")),
                "{a}"
            );
            let message = a["error"].as_str().expect("a message");
            assert!(
                message.contains("invalid_grant") && message.contains("connect again"),
                "{message}"
            );
            assert!(!message.contains("refresh-1"), "{message}");
            // ...then the connection needs a new authorization: not connected,
            // and a tool call says how to connect.
            let (status, a) = tokens_of(&server, "ada").await;
            assert_eq!(
                (status, a["code"].as_str()),
                (404, Some("not_connected")),
                "{a}"
            );
            let whoami = json!({"type": "tool_use", "id": "t1", "name": "whoami", "input": {}});
            let out = llm
                .call_tool_as("crm", &whoami, "anthropic", "", Some("ada"), None)
                .await
                .expect("call");
            assert!(
                outputs(&out)[0]
                    .starts_with("This tool requires an auth token: user ada has not connected"),
                "{out:?}"
            );
            assert_eq!(provider.refreshes(), 0);

            // Connecting again works, and its refresh token does.
            let (_, callback) = authorize(&llm, "ada", None).await;
            let (status, a) = http_json("GET", &callback, &[], None).await;
            assert_eq!(status, 200, "{a}");
            let (status, a) = tokens_of(&server, "ada").await;
            assert_eq!(
                (status, a["access_token"].as_str()),
                (200, Some("access-2")),
                "{a}"
            );
            assert_eq!(provider.refreshes(), 1);
        })
        .catch_unwind()
        .await;
        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;
        if let Err(panic) = checks {
            std::panic::resume_unwind(panic);
        }
    })
    .await;
}

#[tokio::test]
async fn oauth_refresh_failing_for_a_while_keeps_the_connection() {
    bounded(Duration::from_secs(60), async {
        let provider = Provider::start(oauth_provider::Options {
            scopes: &["read"],
            refresh_unavailable: true,
            ..Default::default()
        })
        .await;
        let server = TestServer::start(Config {
            oauth_platforms: vec![provider.platform()],
            ..keyed_config()
        })
        .await;
        let llm = server.llm(LlmProtocol::Http);
        let (_, callback) = authorize(&llm, "ada", None).await;
        let (status, a) = http_json("GET", &callback, &[], None).await;
        assert_eq!(status, 200, "{a}");
        // Not the grant's fault: an error each time, and the connection
        // stays for the next try.
        for _ in 0..2 {
            let (status, a) = tokens_of(&server, "ada").await;
            assert_eq!(
                (status, a["code"].as_str()),
                (502, Some("oauth_refresh_failed")),
                "{a}"
            );
            let message = a["error"].as_str().expect("a message");
            assert!(
                message.contains("HTTP 503") && message.contains("temporarily_unavailable"),
                "{message}"
            );
            assert!(!message.contains("connect again"), "{message}");
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn oauth_replayed_state_is_refused() {
    bounded(Duration::from_secs(60), async {
        let provider = Provider::start(oauth_provider::Options {
            scopes: &["read"],
            ..Default::default()
        })
        .await;
        let server = TestServer::start(Config {
            oauth_platforms: vec![provider.platform()],
            ..keyed_config()
        })
        .await;
        let llm = server.llm(LlmProtocol::Http);

        let (_, callback) = authorize(&llm, "ada", None).await;
        let (status, first) = http_json("GET", &callback, &[], None).await;
        assert_eq!(status, 200, "{first}");
        // The same callback again (a replay, or a reload): refused, and the
        // provider is not asked to exchange the code again.
        for _ in 0..2 {
            let (status, a) = http_json("GET", &callback, &[], None).await;
            assert_eq!(
                (status, a["code"].as_str()),
                (400, Some("invalid_state")),
                "{a}"
            );
        }
        assert_eq!(provider.code_requests(), 1);
        let (status, a) = tokens_of(&server, "ada").await;
        assert_eq!(status, 200, "{a}");
        assert_eq!(a["integration_id"], first["integration_id"]);

        // A state is spent by a failed callback too: after the user refused,
        // the same state with a code is refused.
        let (started, _) = authorize(&llm, "bob", None).await;
        let auth_url = started["authorization_url"].as_str().expect("url");
        let state = query(auth_url.split_once('?').expect("query").1)["state"].clone();
        let base = format!("{}/api/v1/atp/llm-client/oauth/callback/", server.base);
        let (status, a) = http_json(
            "GET",
            &format!("{base}?error=access_denied&state={state}"),
            &[],
            None,
        )
        .await;
        assert_eq!(
            (status, a["code"].as_str()),
            (400, Some("oauth_denied")),
            "{a}"
        );
        let (status, a) = http_json(
            "GET",
            &format!("{base}?code=code-2&state={state}"),
            &[],
            None,
        )
        .await;
        assert_eq!(
            (status, a["code"].as_str()),
            (400, Some("invalid_state")),
            "{a}"
        );
        assert_eq!(provider.code_requests(), 1);
        let (status, _) = tokens_of(&server, "bob").await;
        assert_eq!(status, 404);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn oauth_callback_after_the_flow_expired() {
    const LIFETIME: u64 = 2;
    bounded(Duration::from_secs(60), async {
        let provider = Provider::start(oauth_provider::Options {
            scopes: &["read"],
            ..Default::default()
        })
        .await;
        let server = TestServer::start(Config {
            oauth_platforms: vec![provider.platform()],
            oauth_flow_lifetime: Duration::from_secs(LIFETIME),
            ..keyed_config()
        })
        .await;
        let llm = server.llm(LlmProtocol::Http);

        // In time (within the lifetime, 2 s: room for a loaded machine):
        // connected.
        let (started, callback) = authorize(&llm, "ada", None).await;
        assert_eq!(started["expires_in"], LIFETIME);
        let (status, a) = http_json("GET", &callback, &[], None).await;
        assert_eq!(status, 200, "{a}");

        // Too late: the flow started more than its lifetime ago (the
        // server counts whole seconds, so wait until the lifetime and one
        // more second have begun since the flow started; bounded by the
        // test's limit).
        let (_, callback) = authorize(&llm, "bob", None).await;
        let started_by = now_secs();
        while now_secs() < started_by + LIFETIME + 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, a) = http_json("GET", &callback, &[], None).await;
        assert_eq!(
            (status, a["code"].as_str()),
            (400, Some("invalid_state")),
            "{a}"
        );
        assert!(
            a["error"].as_str().is_some_and(|m| m.contains("expired")),
            "{a}"
        );
        // The provider was not asked, and nothing was stored.
        assert_eq!(provider.code_requests(), 1);
        let (status, _) = tokens_of(&server, "bob").await;
        assert_eq!(status, 404);
        server.stop().await;
    })
    .await;
}
