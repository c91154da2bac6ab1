//! Secrets: a run with endpoint keys, bearer and body tokens, API keys
//! (right and wrong), a user's OAuth tokens and an OAuth client secret,
//! through the three adapters, `atp-server`, the toolkit runtime and the
//! LLM client — with every `tracing` line of the process captured at TRACE
//! (a process-wide subscriber: it sees every thread) — and none of the
//! secrets may appear in a log line, an answer (status line, headers,
//! body), an error's text or a `Debug` output.
//!
//! The server's secrets at rest (docs/OPERATIONS.md) are on the same
//! paths: its database file starts with a user's tokens in plain text (as
//! an earlier version wrote them), sealed at start and read back for a
//! tool call; a webhook's secret is sealed; the secrets key itself, and
//! the errors about keys and sealed values, never show either. Afterwards
//! the database's files hold none of the secrets.
//!
//! The audit log keeps the arguments and results of the toolkit these
//! calls use (`audit_payloads`): its rows, read over the admin API and
//! straight from the database, hold none of the secrets either.

use std::{
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use atp_conformance::server::{Framework, spawn};
use atp_registry::{
    Call, Engine, Registry, Secret, Tool, ToolKitClient,
    http::RequestHead,
    llm::{LlmClient, LlmProtocol},
};
use atp_reliability::{
    http::{self, RawResponse, request},
    node::test_runtime_options,
};
use atp_server::{AtpServer, Config, DbLocation, OAuthPlatform, SecretsKey};
use serde_json::{Value, json};

const ENDPOINT_KEY: &str = "ek-SECRET-7f3a";
const WRONG_ENDPOINT_KEY: &str = "wrongek-SECRET-0b1d";
const BEARER: &str = "bearer-SECRET-c91e";
const BODY_TOKEN: &str = "btok-SECRET-55d2";
const TK_KEY: &str = "tk-SECRET-a8c4";
const WRONG_TK_KEY: &str = "tkwrong-SECRET-41f0";
const LLM_KEY: &str = "llm-SECRET-e2f0";
const WRONG_LLM_KEY: &str = "llmwrong-SECRET-77aa";
const USER_TOKEN: &str = "user-SECRET-3c3c";
const CLIENT_SECRET: &str = "csecret-SECRET-9d9d";
const REFRESH_TOKEN: &str = "refresh-SECRET-4e4e";
const ADMIN_KEY: &str = "admin-SECRET-6b6b6b6b";
const WRONG_ADMIN_KEY: &str = "adminwrong-SECRET-1a1a";
/// The server's secrets key, in hex (its base64 form is checked too).
const SECRETS_KEY: &str = "5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2";

const SECRETS: [&str; 14] = [
    ENDPOINT_KEY,
    WRONG_ENDPOINT_KEY,
    BEARER,
    BODY_TOKEN,
    TK_KEY,
    WRONG_TK_KEY,
    LLM_KEY,
    WRONG_LLM_KEY,
    USER_TOKEN,
    CLIENT_SECRET,
    REFRESH_TOKEN,
    ADMIN_KEY,
    WRONG_ADMIN_KEY,
    SECRETS_KEY,
];

/// Every secret: [`SECRETS`], and the secrets key in base64.
fn all_secrets() -> Vec<String> {
    let key = SecretsKey::parse(SECRETS_KEY).expect("a key");
    SECRETS
        .iter()
        .map(|s| (*s).to_owned())
        .chain([key.expose().to_owned()])
        .collect()
}

const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every text this run showed anyone: answers, errors, `Debug` outputs.
#[derive(Default)]
struct Seen(Vec<(String, String)>);

impl Seen {
    fn add(&mut self, what: impl Into<String>, text: impl Into<String>) {
        self.0.push((what.into(), text.into()));
    }

    fn answer(&mut self, what: &str, r: &RawResponse) {
        let mut text = format!("HTTP {}\n", r.status);
        for (k, v) in &r.headers {
            text.push_str(&format!("{k}: {v}\n"));
        }
        text.push_str(&String::from_utf8_lossy(&r.body));
        self.add(what, text);
    }
}

/// A secret in any form a `Debug` of bytes could show it.
fn forms(secret: &str) -> [String; 2] {
    [
        secret.to_owned(),
        format!("{:?}", secret.as_bytes())
            .trim_matches(['[', ']'])
            .to_owned(),
    ]
}

fn check(label: &str, text: &str) {
    for secret in all_secrets() {
        for form in forms(&secret) {
            assert!(!text.contains(&form), "{secret} shows in {label}:\n{text}");
        }
    }
}

fn vault_registry() -> Registry {
    let registry = Registry::new();
    let tool = || {
        Tool::new("secure")
            .params(["x"])
            .auth_provider("demo")
            .auth_type("OAuth2")
            .auth_with("access_token")
    };
    let handler = |call: Call| async move {
        Ok::<_, String>(json!({"token_length": call.auth_token().map_or(0, |t| t.expose().len())}))
    };
    let vault = ToolKitClient::new("vault-api-key", "VaultApp").with_endpoint_key(ENDPOINT_KEY);
    vault.register_tool(tool(), handler).expect("valid");
    let open = ToolKitClient::new("open-api-key", "OpenApp");
    open.register_tool(tool(), handler).expect("valid");
    registry.register_client("vault", vault).expect("valid");
    registry.register_client("open", open).expect("valid");
    registry
}

async fn adapters(seen: &mut Seen) {
    let json_ct = ("Content-Type", "application/json");
    let form_ct = ("Content-Type", "application/x-www-form-urlencoded");
    let ek = ("X-ATP-Key", ENDPOINT_KEY);
    let wrong_ek = ("X-ATP-Key", WRONG_ENDPOINT_KEY);
    let bearer = format!("Bearer {BEARER}");
    let basic = format!("Basic {BEARER}");
    let probes: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "wrong endpoint key",
            request("GET", "/atp/vault/", &[wrong_ek], b""),
            401,
        ),
        (
            "wrong endpoint key on a tool",
            request(
                "POST",
                "/atp/vault/secure/",
                &[wrong_ek, ("Authorization", &bearer)],
                b"",
            ),
            401,
        ),
        (
            "endpoint key",
            request("GET", "/atp/vault/secure/", &[ek], b""),
            200,
        ),
        (
            "bearer",
            request(
                "POST",
                "/atp/vault/secure/",
                &[ek, ("Authorization", &bearer)],
                b"",
            ),
            200,
        ),
        (
            "basic",
            request(
                "POST",
                "/atp/open/secure/",
                &[("Authorization", &basic)],
                b"",
            ),
            401,
        ),
        (
            "body token",
            request(
                "POST",
                "/atp/open/secure/",
                &[json_ct],
                format!(r#"{{"auth_token": "{BODY_TOKEN}"}}"#).as_bytes(),
            ),
            200,
        ),
        (
            "body token, unknown param",
            request(
                "POST",
                "/atp/open/secure/",
                &[json_ct],
                format!(r#"{{"auth_token": "{BODY_TOKEN}", "zz": 1}}"#).as_bytes(),
            ),
            400,
        ),
        (
            "body token, bad JSON",
            request(
                "POST",
                "/atp/open/secure/",
                &[json_ct],
                format!(r#"{{"auth_token": "{BODY_TOKEN}", "#).as_bytes(),
            ),
            400,
        ),
        (
            "body token, repeated",
            request(
                "POST",
                "/atp/open/secure/",
                &[json_ct],
                format!(r#"{{"auth_token": "{BODY_TOKEN}", "auth_token": "{BODY_TOKEN}"}}"#)
                    .as_bytes(),
            ),
            400,
        ),
        (
            "form token, unknown param",
            request(
                "POST",
                "/atp/open/secure/",
                &[form_ct],
                format!("auth_token={BODY_TOKEN}&zz=1").as_bytes(),
            ),
            400,
        ),
        (
            "token as a toolkit name",
            request("GET", &format!("/atp/{BEARER}/"), &[], b""),
            404,
        ),
        (
            "token over the limit",
            request(
                "POST",
                "/atp/open/secure/",
                &[json_ct],
                format!(r#"{{"auth_token": "{}"}}"#, BODY_TOKEN.repeat(70_000)).as_bytes(),
            ),
            413,
        ),
    ];
    for framework in Framework::ALL {
        let addr = spawn(
            framework,
            Engine::with_registry(vault_registry()),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )
        .expect("the adapter starts");
        for (what, bytes, status) in &probes {
            let r = http::once(addr, bytes, false, WAIT)
                .await
                .expect("an answer");
            assert_eq!(r.status, *status, "{framework}: {what}: {r:?}");
            seen.answer(&format!("{framework}: {what}"), &r);
        }
    }
    // Debug outputs of everything that holds a key or a token.
    let registry = vault_registry();
    seen.add("Debug of a Registry", format!("{registry:?}"));
    seen.add(
        "Debug of an Engine",
        format!("{:?}", Engine::with_registry(registry.clone())),
    );
    seen.add(
        "Debug of a ToolKitClient",
        format!("{:?}", registry.get_client("vault")),
    );
    let head = RequestHead::new("POST", "/atp/vault/secure/", None, |name| match name {
        "authorization" => Some(bearer.as_bytes()),
        "x-atp-key" => Some(ENDPOINT_KEY.as_bytes()),
        _ => None,
    });
    seen.add("Debug of a RequestHead", format!("{head:?}"));
    let engine = Engine::with_registry(registry);
    if let atp_registry::http::Step::ReadBody(pending) = engine.begin(&head) {
        seen.add("Debug of a PendingCall", format!("{pending:?}"));
    } else {
        panic!("a POST to a tool with its key wants a body");
    }
    seen.add(
        "Debug of a Call",
        format!(
            "{:?}",
            Call::new(serde_json::Map::new(), Some(Secret::new(BEARER)))
        ),
    );
}

fn toolkit(base: &str) -> ToolKitClient {
    let client = ToolKitClient::new(TK_KEY, "secretkit")
        .with_base_url(base)
        .with_runtime_options(test_runtime_options());
    client
        .register_tool(
            Tool::new("whoami")
                .auth_provider("localprov")
                .auth_type("OAuth2")
                .auth_with("access_token"),
            |call: Call| async move {
                Ok::<_, String>(
                    json!({"token_length": call.auth_token().map_or(0, |t| t.expose().len())}),
                )
            },
        )
        .expect("valid");
    client
        .register_tool(Tool::new("fails"), |_call: Call| async {
            Err::<Value, _>("it failed")
        })
        .expect("valid");
    client
}

/// What `atp-server` stores instead of an API key (its `keys::key_hash`).
fn key_hash(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"atp-server/key/v1\0");
    h.update(key.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A database as an earlier atp-server left it: user-1's tokens (for the
/// LLM key, platform `localprov`) in plain text.
fn old_database(db: &std::path::Path) {
    let c = rusqlite::Connection::open(db).expect("open");
    c.execute_batch(
        "CREATE TABLE oauth_connections (
             llm_key_hash TEXT NOT NULL, platform_id TEXT NOT NULL, external_user_id TEXT NOT NULL,
             integration_id TEXT NOT NULL, access_token TEXT NOT NULL, refresh_token TEXT,
             token_type TEXT, scope TEXT, expires_at INTEGER, created_at INTEGER NOT NULL,
             updated_at INTEGER NOT NULL,
             PRIMARY KEY (llm_key_hash, platform_id, external_user_id))",
    )
    .expect("schema");
    c.execute(
        "INSERT INTO oauth_connections VALUES (?1, 'localprov', 'user-1', 'i-1', ?2, ?3, 'Bearer', 'read', NULL, 0, 0)",
        [key_hash(LLM_KEY).as_str(), USER_TOKEN, REFRESH_TOKEN],
    )
    .expect("a connection");
}

/// The files of a SQLite database, as they are now.
fn database_files(db: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| {
            let path = format!("{}{suffix}", db.display());
            std::fs::read(&path).ok().map(|bytes| (path, bytes))
        })
        .collect()
}

/// Runs the server and its clients; returns the secret of the webhook it
/// registered (shown once, in the registration's answer, and never
/// anywhere else).
async fn server_and_clients(seen: &mut Seen) -> String {
    let dir = std::env::temp_dir().join(format!("atp-reliability-secrets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let db = dir.join("atp.sqlite3");
    old_database(&db);
    let secrets_key = SecretsKey::parse(SECRETS_KEY).expect("a key");
    seen.add("Debug of a SecretsKey", format!("{secrets_key:?}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let base = format!("http://{addr}");
    let config = Config {
        db: DbLocation::File(db.clone()),
        secrets_keys: vec![secrets_key.clone()],
        toolkit_api_keys: vec![TK_KEY.into()],
        llm_api_keys: vec![LLM_KEY.into()],
        admin_api_keys: vec![ADMIN_KEY.into()],
        audit_payloads: vec!["secretkit".into()],
        oauth_platforms: vec![OAuthPlatform {
            id: "localprov".into(),
            provider: None,
            name: None,
            authorize_url: "http://127.0.0.1:9/authorize".into(),
            token_url: "http://127.0.0.1:9/token".into(),
            client_id: "cid".into(),
            client_secret: CLIENT_SECRET.into(),
            scopes: vec!["read".into()],
            extra_authorize_params: vec![],
        }],
        ..Config::default()
    };
    seen.add("Debug of a server Config", format!("{config:?}"));
    let server = AtpServer::open(config).expect("open");
    seen.add("Debug of an AtpServer", format!("{server:?}"));
    let s = server.clone();
    let serving = tokio::spawn(async move { s.serve(listener).await });
    let kit = toolkit(&base);
    seen.add("Debug of a started ToolKitClient", format!("{kit:?}"));
    let runtime = tokio::spawn({
        let kit = kit.clone();
        async move { kit.start().await }
    });
    assert!(server.wait_until_served("secretkit", WAIT).await);
    // The user's stored token (plain in the old database, sealed at
    // start) reaches the tool.
    let llm = LlmClient::new(LLM_KEY)
        .with_base_url(&base)
        .with_protocol(LlmProtocol::Http)
        .with_timeout(WAIT);
    let whoami = json!({"type": "tool_use", "id": "a", "name": "whoami", "input": {}});
    let out = llm
        .call_tool_as("secretkit", &whoami, "anthropic", "", Some("user-1"), None)
        .await
        .expect("answers");
    assert_eq!(
        out[0]["content"][0]["content"],
        format!(r#"{{"token_length":{}}}"#, USER_TOKEN.len()),
        "{out:?}"
    );
    seen.add("a call with a stored token", Value::Array(out).to_string());
    let tokens = llm
        .get_user_tokens("localprov", "user-1")
        .await
        .expect("tokens");
    // The tokens endpoint is the one answer that must hold them.
    assert_eq!(tokens["access_token"], USER_TOKEN, "{tokens}");
    // A webhook: its secret is answered once, and sealed.
    let hook = request(
        "POST",
        "/api/v1/atp/llm-client/webhooks/register/",
        &[
            ("Authorization", &format!("ApiKey {LLM_KEY}")),
            ("Content-Type", "application/json"),
        ],
        br#"{"url": "http://127.0.0.1:9/hook", "events": ["connection_success"]}"#,
    );
    let r = http::once(addr, &hook, false, WAIT)
        .await
        .expect("an answer");
    assert_eq!(r.status, 201, "{r:?}");
    let webhook_secret = serde_json::from_slice::<Value>(&r.body).expect("JSON")["secret"]
        .as_str()
        .expect("a secret")
        .to_owned();
    let user_token = Secret::new(USER_TOKEN);
    for protocol in [LlmProtocol::WebSocket, LlmProtocol::Http] {
        let llm = LlmClient::new(LLM_KEY)
            .with_base_url(&base)
            .with_protocol(protocol)
            .with_timeout(WAIT);
        seen.add("Debug of an LlmClient", format!("{llm:?}"));
        let calls = json!([
            {"type": "tool_use", "id": "a", "name": "whoami", "input": {}},
            {"type": "tool_use", "id": "b", "name": "fails", "input": {}},
            {"type": "tool_use", "id": "c", "name": "nope", "input": {"auth_token": USER_TOKEN}}
        ]);
        let out = llm
            .call_tool_as(
                "secretkit",
                &calls,
                "anthropic",
                "",
                None,
                Some(&user_token),
            )
            .await
            .expect("answers");
        assert_eq!(
            out[0]["content"][0]["content"],
            format!(r#"{{"token_length":{}}}"#, USER_TOKEN.len())
        );
        seen.add(
            format!("{protocol:?}: call results"),
            Value::Array(out).to_string(),
        );
        let ctx = llm
            .get_toolkit_context("secretkit", "openai", "")
            .await
            .expect("a context");
        seen.add(format!("{protocol:?}: a context"), ctx.to_string());
        let started = llm
            .initiate_oauth_connection("localprov", "user-1", None)
            .await
            .expect("a flow");
        assert!(started.to_string().contains("code_challenge"), "{started}");
        seen.add(format!("{protocol:?}: an OAuth start"), started.to_string());
        let wrong = LlmClient::new(WRONG_LLM_KEY)
            .with_base_url(&base)
            .with_protocol(protocol)
            .with_timeout(WAIT);
        let e = wrong
            .get_toolkit_context("secretkit", "openai", "")
            .await
            .expect_err("refused");
        seen.add(
            format!("{protocol:?}: a refusal"),
            format!("{e} / {e:?} / {wrong:?}"),
        );
    }
    let raw: Vec<(&str, Vec<u8>)> = vec![
        ("process with a wrong key", request("POST", "/api/v1/atp/llm-client/process/", &[("Authorization", &format!("ApiKey {WRONG_LLM_KEY}"))], b"{}")),
        ("process with a wrong body key", request("POST", "/api/v1/atp/llm-client/process/", &[("Content-Type", "application/json")], json!({"type": "get_toolkit_context", "toolkit_id": "secretkit", "api_key": WRONG_LLM_KEY}).to_string().as_bytes())),
        ("register with a wrong key", request("POST", "/api/v1/register_tool/", &[("Content-Type", "application/json")], json!({"function_id": "x", "api_key": WRONG_TK_KEY, "app_name": "x"}).to_string().as_bytes())),
        ("inbox with a wrong key", request("GET", &format!("/api/v1/toolkit/{WRONG_TK_KEY}/inbox"), &[], b"")),
        ("toolkit socket with a wrong key", request("GET", &format!("/ws/v1/atp/toolkit-client/{WRONG_TK_KEY}/"), &[], b"")),
        ("tokens with a wrong key", request("GET", "/api/v1/atp/llm-client/oauth/tokens/localprov/user-1/", &[("Authorization", &format!("ApiKey {WRONG_LLM_KEY}"))], b"")),
        ("a forged OAuth state", request("GET", &format!("/api/v1/atp/llm-client/oauth/callback?code=c&state={BEARER}"), &[], b"")),
        ("an OAuth callback without a state", request("GET", "/api/v1/atp/llm-client/oauth/callback?code=c", &[], b"")),
    ];
    for (what, bytes) in &raw {
        let r = http::once(addr, bytes, false, WAIT)
            .await
            .expect("an answer");
        assert!((400..500).contains(&r.status), "{what}: {r:?}");
        seen.answer(what, &r);
    }
    console(addr, seen, &webhook_secret).await;
    // The audit log, over the admin API: a row for every call (run,
    // refused, or with a wrong key), the payloads kept, no secret.
    let audit = request(
        "GET",
        "/admin/audit?limit=500",
        &[("Authorization", &format!("Bearer {ADMIN_KEY}"))],
        b"",
    );
    let r = http::once(addr, &audit, false, WAIT)
        .await
        .expect("an answer");
    assert_eq!(r.status, 200, "{r:?}");
    let rows = serde_json::from_slice::<Value>(&r.body).expect("JSON")["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (tool, outcome) in [("whoami", "ok"), ("fails", "error"), ("nope", "refused")] {
        assert!(
            rows.iter()
                .any(|row| row["tool"] == tool && row["outcome"] == outcome),
            "no {tool} {outcome} row in {rows:#?}"
        );
    }
    assert!(
        rows.iter().any(|row| row["outcome"] == "unauthorized"),
        "no row for a wrong key in {rows:#?}"
    );
    assert!(
        rows.iter()
            .any(|row| row["tool"] == "nope" && row["arguments"]["auth_token"] == "[redacted]"),
        "the payloads are kept, redacted: {rows:#?}"
    );
    seen.answer("the audit log", &r);
    // Forged or missing OAuth states are refused as such.
    for (what, _) in &raw[6..] {
        let (_, text) = seen.0.iter().find(|(w, _)| w == what).expect("seen");
        assert!(text.contains("invalid_state"), "{what}: {text}");
    }
    kit.stop();
    let stopped = tokio::time::timeout(WAIT, runtime)
        .await
        .expect("stops")
        .expect("no panic");
    seen.add("the runtime's end", format!("{stopped:?}"));
    let wrong_kit = ToolKitClient::new(WRONG_TK_KEY, "wrongkit")
        .with_base_url(&base)
        .with_runtime_options(test_runtime_options());
    wrong_kit
        .register_tool(Tool::new("echo"), |_call: Call| async {
            Ok::<_, String>(json!(1))
        })
        .expect("valid");
    let e = tokio::time::timeout(WAIT, wrong_kit.start())
        .await
        .expect("ends")
        .expect_err("refused");
    seen.add("a refused toolkit", format!("{e} / {e:?}"));
    server.shutdown();
    let _ = tokio::time::timeout(WAIT, serving).await;
    drop(server);

    // Errors about keys and sealed values.
    let e = SecretsKey::parse(&format!("{USER_TOKEN}{USER_TOKEN}")).expect_err("not a key");
    seen.add("a refused secrets key", format!("{e} / {e:?}"));
    let e = AtpServer::open(Config {
        db: DbLocation::File(dir.join("other.sqlite3")),
        toolkit_api_keys: vec![TK_KEY.into()],
        ..Config::default()
    })
    .expect_err("no secrets key");
    seen.add("a server without a secrets key", format!("{e} / {e:?}"));
    let other = SecretsKey::generate().expect("a key");
    let e = atp_server::rotate_secrets(
        &DbLocation::File(db.clone()),
        vec![other.clone()],
        vec![other],
    )
    .await
    .expect_err("the current key is missing");
    seen.add("a refused rotation", format!("{e} / {e:?}"));
    let rotated = atp_server::rotate_secrets(
        &DbLocation::File(db.clone()),
        vec![secrets_key],
        vec![SecretsKey::generate().expect("a key")],
    )
    .await
    .expect("rotates");
    seen.add("a rotation", format!("{rotated:?}"));

    // The audit rows as stored.
    let c = rusqlite::Connection::open(&db).expect("open");
    let mut stmt = c.prepare("SELECT * FROM audit").expect("an audit table");
    let columns = stmt.column_count();
    let stored: Vec<String> = stmt
        .query_map([], |row| {
            let mut text = String::new();
            for i in 0..columns {
                let v: rusqlite::types::Value = row.get(i)?;
                text.push_str(&format!("{v:?} | "));
            }
            Ok(text)
        })
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("readable rows");
    assert!(stored.len() >= rows.len(), "{stored:#?}");
    assert!(
        stored.iter().any(|r| r.contains("keys rotate-secrets")),
        "the rotations are recorded: {stored:#?}"
    );
    seen.add("the audit rows in the database", stored.join("\n"));
    drop(stmt);
    drop(c);

    // The database's files: sealed values, no secret.
    let files = database_files(&db);
    assert!(
        files
            .iter()
            .any(|(_, b)| String::from_utf8_lossy(b).contains("sealed:v1:")),
        "the database holds sealed values"
    );
    for (path, bytes) in &files {
        let text = String::from_utf8_lossy(bytes);
        for secret in all_secrets().iter().chain([&webhook_secret]) {
            assert!(!text.contains(secret.as_str()), "{secret} is in {path}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    webhook_secret
}

/// The console and its admin endpoints: the page, the toolkits, a tool's
/// formats, calls with a token and with a user's stored connection, the
/// OAuth platforms and connections, a flow started, refusals.
async fn console(addr: SocketAddr, seen: &mut Seen, webhook_secret: &str) {
    let admin = format!("Bearer {ADMIN_KEY}");
    let get = |path: &str, auth: &str| request("GET", path, &[("Authorization", auth)], b"");
    let post = |path: &str, body: Value| {
        request(
            "POST",
            path,
            &[
                ("Authorization", &admin),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    };
    let send = async |what: &str, bytes: Vec<u8>, seen: &mut Seen| {
        let r = http::once(addr, &bytes, false, WAIT)
            .await
            .expect("an answer");
        seen.answer(what, &r);
        r
    };
    for path in ["/console", "/console/console.js", "/console/console.css"] {
        let r = send(path, get(path, &admin), seen).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }
    let r = send(
        "the console's toolkits",
        get("/admin/toolkits", &admin),
        seen,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(String::from_utf8_lossy(&r.body).contains("whoami"));
    let r = send(
        "a tool's formats",
        get("/admin/toolkits/secretkit/tools/whoami/formats", &admin),
        seen,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(
        "the console's webhooks",
        get("/admin/webhooks", &admin),
        seen,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let text = String::from_utf8_lossy(&r.body);
    assert!(text.contains("/hook"), "{text}");
    assert!(!text.contains(webhook_secret), "the webhook secret: {text}");
    let r = send("the console's OAuth", get("/admin/oauth", &admin), seen).await;
    assert_eq!(r.status, 200, "{r:?}");
    let oauth: Value = serde_json::from_slice(&r.body).expect("JSON");
    let connection = oauth["connections"][0]["id"]
        .as_str()
        .expect("user-1's connection")
        .to_owned();
    let call = "/admin/toolkits/secretkit/tools/whoami/call";
    let want = format!(r#"{{"token_length":{}}}"#, USER_TOKEN.len());
    for (what, body) in [
        (
            "a console call with a token",
            json!({"arguments": {}, "auth_token": USER_TOKEN}),
        ),
        (
            "a console call with a connection",
            json!({"arguments": {}, "connection": connection}),
        ),
    ] {
        let r = send(what, post(call, body), seen).await;
        assert_eq!(r.status, 200, "{what}: {r:?}");
        let answer: Value = serde_json::from_slice(&r.body).expect("JSON");
        assert_eq!(answer["result"].to_string(), want, "{what}: {answer}");
    }
    let r = send(
        "a console call of a failing tool",
        post(
            "/admin/toolkits/secretkit/tools/fails/call",
            // Its token, not an argument: this toolkit's arguments are
            // kept in the audit log (`audit_payloads`), its tokens never.
            json!({"arguments": {}, "auth_token": BODY_TOKEN}),
        ),
        seen,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(
        "a console OAuth start",
        post(
            "/admin/oauth/platforms/localprov/connect",
            json!({"external_user_id": "user-2"}),
        ),
        seen,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let wrong = format!("Bearer {WRONG_ADMIN_KEY}");
    for (what, path) in [
        ("the console's toolkits, a wrong key", "/admin/toolkits"),
        ("the console's OAuth, a wrong key", "/admin/oauth"),
    ] {
        let r = send(what, get(path, &wrong), seen).await;
        assert_eq!(r.status, 401, "{what}: {r:?}");
    }
    let r = send(
        "a console call with a wrong key",
        request(
            "POST",
            call,
            &[
                ("Authorization", &wrong),
                ("Content-Type", "application/json"),
            ],
            json!({"auth_token": USER_TOKEN}).to_string().as_bytes(),
        ),
        seen,
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_line_an_answer_an_error_or_a_debug_output() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber)
        .expect("the only subscriber of this process");
    let mut seen = Seen::default();
    adapters(&mut seen).await;
    let webhook_secret = server_and_clients(&mut seen).await;
    for (what, text) in &seen.0 {
        check(what, text);
    }
    let logs =
        String::from_utf8_lossy(&captured.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    // The capture works: the lines these runs must log are there.
    for line in [
        "tool registered",
        "toolkit connected",
        "connecting to the ATP server",
        "secrets at rest are sealed",
        "sealed the secrets an earlier version stored in plain text",
        "stored secrets sealed under the new key",
    ] {
        assert!(logs.contains(line), "{line:?} is not in the logs:\n{logs}");
    }
    check("the logs", &logs);
    assert!(
        !logs.contains(&webhook_secret),
        "the webhook secret is in the logs"
    );
    eprintln!(
        "{} answers and outputs and {} log lines checked for {} secrets",
        seen.0.len(),
        logs.lines().count(),
        all_secrets().len() + 1
    );
}

/// Dev mode takes any API key, so it must never listen beyond loopback:
/// `serve` and `run` refuse every unspecified or non-loopback address (an
/// IPv4-mapped loopback included), and serve on loopback ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_refuses_every_non_loopback_bind() {
    let dev = || AtpServer::open(Config::dev().with_db(DbLocation::Memory)).expect("open");
    for addr in ["0.0.0.0:0", "[::]:0", "[::ffff:127.0.0.1]:0"] {
        let addr: SocketAddr = addr.parse().expect("an address");
        let refused = tokio::time::timeout(WAIT, dev().run(addr))
            .await
            .expect("returns at once");
        assert!(
            matches!(refused, Err(atp_server::ServerError::DevModeNotLoopback(_))),
            "run on {addr}: {refused:?}"
        );
        // Bound by hand (where this machine can), then given to `serve`.
        if let Ok(listener) = tokio::net::TcpListener::bind(addr).await {
            let refused = tokio::time::timeout(WAIT, dev().serve(listener))
                .await
                .expect("returns at once");
            assert!(
                matches!(refused, Err(atp_server::ServerError::DevModeNotLoopback(_))),
                "serve on {addr}: {refused:?}"
            );
        }
    }
    for addr in ["127.0.0.1:0", "127.0.0.2:0", "[::1]:0"] {
        let Ok(listener) = tokio::net::TcpListener::bind(addr).await else {
            continue;
        };
        let local = listener.local_addr().expect("addr");
        let server = dev();
        let s = server.clone();
        let serving = tokio::spawn(async move { s.serve(listener).await });
        let r = http::once(local, &request("GET", "/health", &[], b""), false, WAIT)
            .await
            .expect("dev mode serves on loopback");
        assert_eq!(r.status, 200, "{addr}: {r:?}");
        server.shutdown();
        tokio::time::timeout(WAIT, serving)
            .await
            .expect("stops")
            .expect("no panic")
            .expect("served without error");
    }
}
