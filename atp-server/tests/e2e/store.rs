//! Developers, the toolkit store and execution reports (docs/PROTOCOL.md
//! §9): two developers, each with a public and a private toolkit; what
//! each key sees; exchange tokens and the execution log (read back with
//! `atp-server executions`).

use std::{path::PathBuf, process::Stdio, time::Duration};

use atp_registry::Secret;
use atp_server::{Config, DbLocation, Developer};
use serde_json::{Value, json};

use crate::common::*;

const LLM: &str = "/api/v1/atp/llm-client";

fn developer(name: &str, public: &[&str]) -> Developer {
    Developer {
        display_name: name.into(),
        name: format!("{name} (full name)"),
        bio: format!("{name} writes toolkits"),
        toolkit_api_keys: vec![Secret::new(format!("{name}-tk"))],
        llm_api_keys: vec![Secret::new(format!("{name}-llm"))],
        public_toolkits: public.iter().map(|p| (*p).to_owned()).collect(),
    }
}

/// Ada and Bob, each with one public toolkit (`{name}-public`) and one
/// private one (`{name}-private`); plus the top-level keys of
/// `keyed_config` (the implicit developer `default`).
pub(crate) fn two_developers(db: DbLocation) -> Config {
    Config {
        db,
        developers: vec![
            developer("ada", &["ada-public"]),
            developer("bob", &["bob-public"]),
        ],
        ..keyed_config()
    }
}

/// Registers one tool of `app` under the toolkit key `key`, as the Python
/// client does; the answer.
pub(crate) async fn register(base: &str, key: &str, app: &str, tool: &str) -> Value {
    let body = json!({
        "function_id": tool,
        "api_key": key,
        "app_name": app,
        "programming_language": "Python",
        "code_hash": "h",
        "toolkit_hash": "th",
        "metadata": {
            "params": ["text"],
            "required_params": ["text"],
            "description": format!("{tool} does things."),
            "auth_provider": null,
            "auth_type": null,
            "auth_with": null,
            "sample_response": "",
            "source_code": "def f(text): ...",
        },
    });
    let (status, answer) = http_json(
        "POST",
        &format!("{base}/api/v1/register_tool"),
        &[],
        Some(&body),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// `GET` of an LLM-client path as `key`.
pub(crate) async fn get(base: &str, path: &str, key: &str) -> (u16, Value) {
    let auth = format!("ApiKey {key}");
    http_json(
        "GET",
        &format!("{base}{LLM}/{path}"),
        &[("authorization", &auth)],
        None,
    )
    .await
}

/// The toolkit ids of a page of toolkits.
pub(crate) fn ids(page: &Value) -> Vec<&str> {
    page["results"]
        .as_array()
        .or_else(|| page["toolkits"].as_array())
        .expect("a list")
        .iter()
        .map(|t| t["toolkit_id"].as_str().expect("toolkit_id"))
        .collect()
}

async fn register_all(base: &str) {
    for dev in ["ada", "bob"] {
        let key = format!("{dev}-tk");
        register(base, &key, &format!("{dev}-public"), "alpha").await;
        register(base, &key, &format!("{dev}-public"), "beta").await;
        register(base, &key, &format!("{dev}-private"), "secret").await;
    }
    register(base, TK_KEY, "single-tenant", "gamma").await;
}

#[tokio::test]
async fn the_store_lists_public_toolkits_with_pages() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(two_developers(DbLocation::Memory)).await;
        let b = &server.base;
        register_all(b).await;

        // Any key sees the public toolkits, by name; the Python client
        // sends no page params (defaults 1 and 10).
        for key in ["ada-llm", "bob-llm", LLM_KEY] {
            let (status, page) = get(b, "store/toolkits/list/", key).await;
            assert_eq!(status, 200, "{page}");
            assert_eq!(
                (
                    page["count"].clone(),
                    page["page"].clone(),
                    page["page_size"].clone()
                ),
                (json!(2), json!(1), json!(10))
            );
            assert_eq!(ids(&page), ["ada-public", "bob-public"], "{key}");
        }
        let (_, page) = get(b, "store/toolkits/list/", "bob-llm").await;
        let ada = &page["results"][0];
        assert_eq!(ada["developer"], "ada");
        assert_eq!(ada["public"], true);
        assert_eq!(ada["tools_count"], 2);
        assert_eq!(ada["connected"], false);
        assert_eq!(ada["programming_language"], "Python");
        assert_eq!(ada["description"], "2 tools: alpha, beta");

        // Pages of one, without the trailing slash too.
        let (status, page) = get(b, "store/toolkits/list?page=2&page_size=1", "ada-llm").await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(
            (
                page["count"].clone(),
                page["page"].clone(),
                page["page_size"].clone()
            ),
            (json!(2), json!(2), json!(1))
        );
        assert_eq!(ids(&page), ["bob-public"]);
        // Past the end: empty, not an error.
        let (status, page) = get(b, "store/toolkits/list/?page=3&page_size=1", "ada-llm").await;
        assert_eq!(
            (status, ids(&page).len(), page["count"].clone()),
            (200, 0, json!(2))
        );
        // Too large a page size is lowered to 100.
        let (_, page) = get(b, "store/toolkits/list/?page_size=5000", "ada-llm").await;
        assert_eq!(page["page_size"], 100);
        // Bad numbers: 400 with a clear message.
        for q in [
            "page=0",
            "page=-1",
            "page=two",
            "page_size=0",
            "page_size=1.5",
        ] {
            let (status, answer) = get(b, &format!("store/toolkits/list/?{q}"), "ada-llm").await;
            assert_eq!(status, 400, "{q}: {answer}");
            assert!(
                answer["error"]
                    .as_str()
                    .expect("message")
                    .contains("whole number"),
                "{answer}"
            );
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn private_toolkits_are_seen_by_their_developer_only() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(two_developers(DbLocation::Memory)).await;
        let b = &server.base;
        register_all(b).await;

        // Details: a private toolkit to its owner's LLM key...
        let (status, kit) = get(b, "store/toolkits/ada-private/", "ada-llm").await;
        assert_eq!(status, 200, "{kit}");
        assert_eq!(
            (kit["toolkit_id"].as_str(), kit["public"].as_bool()),
            (Some("ada-private"), Some(false))
        );
        assert_eq!(kit["description"], "secret: secret does things.");
        assert_eq!(kit["tools"][0]["function"], "secret");
        assert_eq!(kit["tools"][0]["required_params"], json!(["text"]));
        assert_eq!(kit["tools"][0]["input_schema"]["type"], "object");
        // ...and to nobody else: the same 404 as an unknown toolkit.
        let (status, hidden) = get(b, "store/toolkits/ada-private/", "bob-llm").await;
        let (_, unknown) = get(b, "store/toolkits/no-such-kit/", "bob-llm").await;
        assert_eq!(
            (status, hidden["code"].as_str()),
            (404, Some("toolkit_not_found"))
        );
        assert_eq!(hidden, unknown);
        let (status, _) = get(b, "store/toolkits/ada-private/", LLM_KEY).await;
        assert_eq!(status, 404);
        // A public one to anyone, with its tools.
        let (status, kit) = get(b, "store/toolkits/ada-public", "bob-llm").await;
        assert_eq!(status, 200, "{kit}");
        let tools: Vec<&str> = kit["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .map(|t| t["function"].as_str().expect("name"))
            .collect();
        assert_eq!(tools, ["alpha", "beta"]);

        // My toolkits: both of mine, none of theirs.
        let (status, mine) = get(b, "developers/toolkits/", "ada-llm").await;
        assert_eq!(status, 200, "{mine}");
        assert_eq!(ids(&mine), ["ada-private", "ada-public"]);
        assert_eq!(mine["count"], 2);
        let (_, mine) = get(b, "developers/toolkits?page=2&page_size=1", "bob-llm").await;
        assert_eq!(
            (ids(&mine), mine["count"].clone()),
            (vec!["bob-public"], json!(2))
        );
        // The top-level keys belong to the implicit developer `default`.
        let (_, mine) = get(b, "developers/toolkits/", LLM_KEY).await;
        assert_eq!(ids(&mine), ["single-tenant"]);
        assert_eq!(mine["results"][0]["developer"], "default");
        let (status, _) = get(b, "store/toolkits/single-tenant/", LLM_KEY).await;
        assert_eq!(status, 200);
        let (status, _) = get(b, "store/toolkits/single-tenant/", "ada-llm").await;
        assert_eq!(status, 404);

        // A developer's profile: only their public toolkits.
        let (status, profile) = get(b, "store/developers/ada/", "bob-llm").await;
        assert_eq!(status, 200, "{profile}");
        assert_eq!(profile["display_name"], "ada");
        assert_eq!(profile["name"], "ada (full name)");
        assert_eq!(profile["bio"], "ada writes toolkits");
        assert_eq!(ids(&profile), ["ada-public"]);
        let (_, profile) = get(b, "store/developers/ada", "ada-llm").await;
        assert_eq!(ids(&profile), ["ada-public"]);
        let (status, answer) = get(b, "store/developers/nobody/", "ada-llm").await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (404, Some("developer_not_found"))
        );

        // Wrong, missing or toolkit keys: 401.
        for path in [
            "store/toolkits/list/",
            "store/toolkits/ada-public/",
            "developers/toolkits/",
            "store/developers/ada/",
        ] {
            for key in ["wrong", "ada-tk"] {
                let (status, answer) = get(b, path, key).await;
                assert_eq!(
                    (status, answer["code"].as_str()),
                    (401, Some("unauthorized")),
                    "{path} {key}"
                );
            }
            let (status, _) = http_json("GET", &format!("{b}{LLM}/{path}"), &[], None).await;
            assert_eq!(status, 401, "{path}");
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn dev_mode_is_one_developer() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(Config::dev().with_db(DbLocation::Memory)).await;
        let b = &server.base;
        register(b, "key-1", "kit-one", "alpha").await;
        register(b, "key-2", "kit-two", "alpha").await;
        let (status, mine) = get(b, "developers/toolkits/", "any-key").await;
        assert_eq!(status, 200, "{mine}");
        assert_eq!(ids(&mine), ["kit-one", "kit-two"]);
        assert_eq!(mine["results"][0]["developer"], "dev");
        let (status, _) = get(b, "store/toolkits/kit-two/", "other-key").await;
        assert_eq!(status, 200);
        // Nothing is public unless configured.
        let (_, page) = get(b, "store/toolkits/list/", "any-key").await;
        assert_eq!(page["count"], 0);
        server.stop().await;
    })
    .await;
}

/// A fresh directory for a database file.
fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("atp-store-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `atp-server executions ARGS…`: its JSON lines.
pub(crate) async fn executions(args: &[&str]) -> Vec<Value> {
    let out = run_executions(args).await;
    assert!(
        out.status.success(),
        "atp-server executions failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// `atp-server executions ARGS…` (whatever its outcome).
pub(crate) async fn run_executions(args: &[&str]) -> std::process::Output {
    tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_atp-server"))
            .arg("executions")
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("ATP_DB_URL")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("in time")
    .expect("runs")
}

/// `POST /api/v1/execute_function` (an execution report).
pub(crate) async fn report(base: &str, body: &Value) -> (u16, Value) {
    http_json(
        "POST",
        &format!("{base}/api/v1/execute_function"),
        &[],
        Some(body),
    )
    .await
}

#[tokio::test]
async fn execution_reports_need_a_token_of_that_tool() {
    bounded(Duration::from_secs(60), async {
        let dir = temp_dir("exec");
        let db = dir.join("atp.sqlite3");
        let db_arg = db.to_str().expect("UTF-8 path").to_owned();
        let server = TestServer::start(two_developers(DbLocation::File(db.clone()))).await;
        let b = &server.base;
        let alpha = register(b, "ada-tk", "ada-public", "alpha").await;
        let beta = register(b, "ada-tk", "ada-public", "beta").await;
        let token = |answer: &Value| answer["exchange_token"].as_str().expect("a token").to_owned();
        let (alpha_token, beta_token) = (token(&alpha), token(&beta));
        assert!(alpha_token.len() >= 32);

        // The Python client's report, with the token register_tool gave.
        let ok = json!({"exchange_token": alpha_token, "result": {"message": "Hello, Ada!"}, "function_id": "alpha"});
        assert_eq!(report(b, &ok).await, (200, json!({"status": "ok"})));
        // A token serves every report of its tool (the Rust runtime keeps
        // it)...
        assert_eq!(report(b, &ok).await.0, 200);
        // ...not another tool's; a forged token serves none.
        for body in [
            json!({"exchange_token": "forged-token", "result": 1, "function_id": "alpha"}),
            json!({"exchange_token": beta_token, "result": 2, "function_id": "alpha"}),
        ] {
            let (status, answer) = report(b, &body).await;
            assert_eq!((status, answer["code"].as_str()), (403, Some("invalid_exchange_token")), "{body}");
        }
        let beta_ok = json!({"exchange_token": beta_token, "result": [1, 2], "function_id": "beta"});
        assert_eq!(report(b, &beta_ok).await.0, 200);
        // A re-registration issues a new token; the older ones stay valid
        // while among the newest 16 of the tool.
        let first = token(&register(b, "ada-tk", "ada-public", "alpha").await);
        let second = token(&register(b, "ada-tk", "ada-public", "alpha").await);
        assert_ne!(first, second);
        for (t, n) in [(&alpha_token, 1), (&first, 2), (&second, 3)] {
            let body = json!({"exchange_token": t, "result": {"n": n}, "function_id": "alpha"});
            assert_eq!(report(b, &body).await.0, 200);
        }
        for _ in 0..14 {
            register(b, "ada-tk", "ada-public", "alpha").await;
        }
        // Now the first token is the 17th newest: void.
        let (status, answer) = report(b, &ok).await;
        assert_eq!((status, answer["code"].as_str()), (403, Some("invalid_exchange_token")));
        let body = json!({"exchange_token": first, "result": {"n": 4}, "function_id": "alpha"});
        assert_eq!(report(b, &body).await.0, 200);
        // Malformed: 400.
        for body in [
            r#"{"exchange_token": 5, "function_id": "alpha"}"#,
            r#"{"result": 1, "function_id": "alpha"}"#,
            r#"[1]"#,
            "not json",
        ] {
            let (status, _, answer) = http("POST", &format!("{b}/api/v1/execute_function"), &[], Some(body)).await;
            assert_eq!(status, 400, "{body}: {answer}");
        }

        // The log, read by the operator's CLI while the server runs.
        let log = executions(&["--db", &db_arg]).await;
        let rows: Vec<(&str, &str, &Value)> = log
            .iter()
            .map(|r| (r["app_name"].as_str().expect("app"), r["function_id"].as_str().expect("tool"), &r["result"]))
            .collect();
        assert_eq!(
            rows,
            [
                ("ada-public", "alpha", &json!({"message": "Hello, Ada!"})),
                ("ada-public", "alpha", &json!({"message": "Hello, Ada!"})),
                ("ada-public", "beta", &json!([1, 2])),
                ("ada-public", "alpha", &json!({"n": 1})),
                ("ada-public", "alpha", &json!({"n": 2})),
                ("ada-public", "alpha", &json!({"n": 3})),
                ("ada-public", "alpha", &json!({"n": 4})),
            ]
        );
        assert!(log[0]["reported_at"].as_str().expect("time").ends_with('Z'));
        let newest = executions(&["--db", &db_arg, "--limit", "1"]).await;
        assert_eq!(newest[0]["result"], json!({"n": 4}));
        assert!(executions(&["--db", &db_arg, "--app", "bob-public"]).await.is_empty());

        // No token or key is stored in clear.
        let mut stored = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("dir") {
            stored.extend(std::fs::read(entry.expect("entry").path()).expect("read"));
        }
        let stored = String::from_utf8_lossy(&stored);
        let secrets: [&str; 6] = [&alpha_token, &beta_token, &first, &second, "ada-tk", "ada-llm"];
        for secret in secrets {
            assert!(!stored.contains(secret), "a secret is stored in clear");
        }
        server.stop().await;

        // And after the server stopped, from the file alone.
        assert_eq!(executions(&["--db", &db_arg]).await.len(), 7);
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

/// `get_toolkit_context`, `task_request` and `app_request` see what the
/// store shows: another developer's private toolkit is "not found", a
/// public one and one's own work.
#[tokio::test]
async fn private_toolkits_cannot_be_described_or_called_by_others() {
    bounded(Duration::from_secs(30), async {
        let server = TestServer::start(two_developers(DbLocation::Memory)).await;
        let b = &server.base;
        register_all(b).await;
        let process = |key: &'static str, body: Value| async move {
            let auth = format!("ApiKey {key}");
            http_json(
                "POST",
                &format!("{b}{LLM}/process/"),
                &[("authorization", &auth)],
                Some(&body),
            )
            .await
        };
        let context = |kit: &str| json!({"type": "get_toolkit_context", "toolkit_id": kit, "request_id": "c1", "provider": "openai"});
        let task = |kit: &str| json!({"type": "task_request", "toolkit_id": kit, "request_id": "t1",
                                      "payload": {"function": "secret", "parameters": {"text": "x"}}});
        let app = |kit: &str| json!({"type": "app_request", "toolkit_id": kit, "request_id": "a1",
                                     "payload": {"app": "secret", "parameters": {}}});

        let (status, v) = process("bob-llm", context("ada-private")).await;
        assert_eq!((status, v["code"].as_str()), (404, Some("toolkit_not_found")), "{v}");
        let (_, v) = process("bob-llm", task("ada-private")).await;
        assert_eq!(v["code"], "toolkit_not_found", "{v}");
        let (_, v) = process("bob-llm", app("ada-private")).await;
        assert_eq!(v["payload"]["code"], "toolkit_not_found", "{v}");
        // The owner and a public toolkit: found (not connected: no toolkit
        // serves them, which is a different answer).
        let (status, v) = process("ada-llm", context("ada-private")).await;
        assert_eq!(status, 200, "{v}");
        let (status, v) = process("bob-llm", context("ada-public")).await;
        assert_eq!(status, 200, "{v}");
        let (_, v) = process("ada-llm", task("ada-private")).await;
        assert_eq!(v["code"], "toolkit_not_connected", "{v}");
        server.stop().await;
    })
    .await;
}

/// A user's stored OAuth token goes only to toolkits of the caller's own
/// developer: another developer's public toolkit asks for an explicit one.
#[tokio::test]
async fn stored_tokens_do_not_go_to_another_developers_toolkit() {
    use crate::webhooks::{callback, platform, start_flow, start_provider};
    bounded(Duration::from_secs(30), async {
        let (provider, provider_task) = start_provider().await;
        let mut config = two_developers(DbLocation::Memory);
        config.oauth_platforms = vec![platform(&provider)];
        let server = TestServer::start(config).await;
        let b = &server.base;
        for (key, app) in [("bob-tk", "bob-public"), ("ada-tk", "ada-private")] {
            let body = json!({
                "function_id": "whoami", "api_key": key, "app_name": app,
                "metadata": {"params": [], "required_params": [], "description": "Who am I.",
                             "auth_provider": "localprov", "auth_type": "OAuth2", "auth_with": "access_token"},
            });
            let (status, answer) =
                http_json("POST", &format!("{b}/api/v1/register_tool"), &[], Some(&body)).await;
            assert_eq!(status, 200, "{answer}");
        }
        // Ada's user u1 connects the platform.
        let state = start_flow(b, "ada-llm", "u1").await;
        assert!(matches!(callback(b, &state, "code=good-code").await, 200 | 302 | 303));
        let task = |kit: &str| json!({"type": "task_request", "toolkit_id": kit, "request_id": "t1",
                                      "external_user_id": "u1",
                                      "payload": {"function": "whoami", "parameters": {}}});
        let process = |body: Value| async move {
            http_json(
                "POST",
                &format!("{b}{LLM}/process/"),
                &[("authorization", "ApiKey ada-llm")],
                Some(&body),
            )
            .await
            .1
        };
        // Bob's public toolkit: no stored token for it.
        let v = process(task("bob-public")).await;
        assert_eq!(v["code"], "auth_required", "{v}");
        assert!(v["error"].as_str().is_some_and(|m| m.contains("another developer")), "{v}");
        // Ada's own toolkit: the token is found (and the call then needs a
        // connected toolkit, which is a different answer).
        let v = process(task("ada-private")).await;
        assert_eq!(v["code"], "toolkit_not_connected", "{v}");
        provider_task.abort();
        server.stop().await;
    })
    .await;
}
