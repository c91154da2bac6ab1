//! The OAuth flow against a small OAuth2 provider started by the test:
//! authorization URL with state and PKCE, the callback's code exchange,
//! tokens, injection into tool calls, refresh, and a restart.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use atp_registry::{
    llm::{LlmError, LlmProtocol},
    runtime::Transport,
};
use atp_server::{Config, DbLocation, OAuthPlatform};
use axum::{
    Router,
    extract::{RawQuery, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::*;

#[derive(Default)]
struct Provider {
    /// code → (PKCE challenge, redirect_uri)
    codes: HashMap<String, (String, String)>,
    issued: usize,
    refreshes: usize,
}

type Shared = Arc<Mutex<Provider>>;

fn query(q: &str) -> HashMap<String, String> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

fn json_answer(status: StatusCode, v: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

async fn authorize(State(p): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let q = query(&q.unwrap_or_default());
    let ok = q.get("client_id").map(String::as_str) == Some("cid")
        && q.get("response_type").map(String::as_str) == Some("code")
        && q.get("code_challenge_method").map(String::as_str) == Some("S256")
        && q.get("scope").map(String::as_str) == Some("read write")
        && q.get("state").is_some_and(|s| s.len() >= 32);
    let (Some(redirect), Some(challenge), Some(state), true) = (
        q.get("redirect_uri"),
        q.get("code_challenge"),
        q.get("state"),
        ok,
    ) else {
        return json_answer(StatusCode::BAD_REQUEST, json!({"error": "invalid_request"}));
    };
    let code = {
        let mut p = p.lock().expect("lock");
        p.issued += 1;
        let code = format!("code-{}", p.issued);
        p.codes
            .insert(code.clone(), (challenge.clone(), redirect.clone()));
        code
    };
    let location = format!(
        "{redirect}?{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("code", &code)
            .append_pair("state", state)
            .finish()
    );
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}

async fn token(State(p): State<Shared>, body: String) -> Response {
    let f = query(&body);
    if f.get("client_id").map(String::as_str) != Some("cid")
        || f.get("client_secret").map(String::as_str) != Some("csecret")
    {
        return json_answer(StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}));
    }
    let mut p = p.lock().expect("lock");
    match f.get("grant_type").map(String::as_str) {
        Some("authorization_code") => {
            let Some((challenge, redirect)) = f.get("code").and_then(|c| p.codes.remove(c)) else {
                return json_answer(StatusCode::BAD_REQUEST, json!({"error": "invalid_grant"}));
            };
            let verifier = f.get("code_verifier").cloned().unwrap_or_default();
            let computed =
                data_encoding::BASE64URL_NOPAD.encode(&Sha256::digest(verifier.as_bytes()));
            if computed != challenge || f.get("redirect_uri") != Some(&redirect) {
                return json_answer(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "invalid_grant", "error_description": "PKCE or redirect_uri mismatch"}),
                );
            }
            // Expired at once, so that the first use refreshes it.
            json_answer(
                StatusCode::OK,
                json!({"access_token": "access-1", "refresh_token": "refresh-1", "expires_in": 0,
                       "token_type": "Bearer", "scope": "read write"}),
            )
        }
        Some("refresh_token")
            if f.get("refresh_token").map(String::as_str) == Some("refresh-1") =>
        {
            p.refreshes += 1;
            json_answer(
                StatusCode::OK,
                json!({"access_token": format!("access-{}", p.refreshes + 1), "expires_in": 3600, "token_type": "Bearer"}),
            )
        }
        _ => json_answer(
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_grant_type"}),
        ),
    }
}

fn location(headers: &hyper::HeaderMap) -> String {
    headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("a Location header")
        .to_owned()
}

#[tokio::test]
async fn oauth_flow_against_a_local_provider() {
    bounded(Duration::from_secs(60), async {
        let provider: Shared = Arc::default();
        let app = Router::new()
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .with_state(provider.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let prov = format!("http://{}", listener.local_addr().expect("addr"));
        let provider_task = tokio::spawn(async move { axum::serve(listener, app).await });

        let path =
            std::env::temp_dir().join(format!("atp-server-oauth-{}.sqlite3", std::process::id()));
        let platform = OAuthPlatform {
            id: "local-app".into(),
            provider: Some("localprov".into()),
            name: Some("Local Provider".into()),
            authorize_url: format!("{prov}/authorize"),
            token_url: format!("{prov}/token"),
            client_id: "cid".into(),
            client_secret: "csecret".into(),
            scopes: vec!["read".into(), "write".into()],
            extra_authorize_params: Vec::new(),
        };
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
        assert_eq!(provider.lock().expect("lock").refreshes, 1);

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

        toolkit.stop();
        tokio::time::timeout(WAIT, runtime)
            .await
            .expect("stops")
            .expect("no panic");
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
        provider_task.abort();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    })
    .await;
}
