//! The audit log (`GET /admin/audit`): a row for each call — run (ok, a
//! tool error) or refused (an unknown tool, a missing OAuth token, a
//! wrong LLM key over HTTP, WebSocket and MCP) — with the caller's key id
//! and never a key; arguments and results only for the toolkits in
//! `audit_payloads`, and no `auth_token` even there; filters; keyset
//! pages with no duplicate and no gap while rows keep coming; admin
//! actions of commands run outside the server; the API behind the admin
//! key. On SQLite, and on PostgreSQL where it is installed.

use std::{collections::HashSet, time::Duration};

use atp_registry::{
    Secret,
    llm::{LlmClient, LlmProtocol},
    runtime::Transport,
};
use atp_server::{Config, DbLocation, Limit, RateLimits};
use serde_json::{Value, json};

use crate::{
    common::*,
    infra::{self, blocking},
};

const ADMIN_KEY: &str = "audit-admin-key-0123456789";
const TK_KEY2: &str = "tk-second-secret-key";
const WRONG_LLM_KEY: &str = "llm-wrong-secret-key";
const TOKEN: &str = "tok-never-stored-5150";
const METRICS_TOKEN: &str = "audit-metrics-token-0123";

/// What atp-server shows of a key: the first 12 hex digits of its hash.
fn key_id(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"atp-server/key/v1\0");
    h.update(key.as_bytes());
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    hex[..12].to_owned()
}

fn audited(config: Config) -> Config {
    Config {
        toolkit_api_keys: vec![TK_KEY.into(), TK_KEY2.into()],
        admin_api_keys: vec![ADMIN_KEY.into()],
        audit_payloads: vec!["kept".into()],
        ..config
    }
}

/// One page of `GET /admin/audit?{query}` as the admin: the JSON and its
/// text (checked for keys by the caller).
async fn page(server: &TestServer, query: &str) -> (Value, String) {
    let auth = format!("Bearer {ADMIN_KEY}");
    let (status, _, body) = http(
        "GET",
        &format!("{}/admin/audit?{query}", server.base),
        &[("authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(status, 200, "{query}: {body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert!(v["rows"].is_array(), "{body}");
    (v, body)
}

/// The rows of one page.
async fn rows(server: &TestServer, query: &str) -> Vec<Value> {
    page(server, query).await.0["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Every row through the pages of `limit`, following `next_cursor`; and
/// every page's text. `between` runs after the first page.
async fn all_pages(
    server: &TestServer,
    filter: &str,
    limit: usize,
    between: impl AsyncFnOnce(),
) -> (Vec<Value>, String) {
    let (mut out, mut text) = (Vec::new(), String::new());
    let mut cursor: Option<String> = None;
    let mut between = Some(between);
    for _ in 0..1000 {
        let query = match &cursor {
            Some(c) => format!("{filter}&limit={limit}&cursor={c}"),
            None => format!("{filter}&limit={limit}"),
        };
        let (v, body) = page(server, &query).await;
        text.push_str(&body);
        let rows = v["rows"].as_array().cloned().unwrap_or_default();
        assert!(rows.len() <= limit, "{body}");
        out.extend(rows);
        if let Some(f) = between.take() {
            f().await;
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return (out, text),
        }
    }
    panic!("more than 1000 pages");
}

fn call(name: &str, input: Value) -> Value {
    json!([{"type": "tool_use", "id": "c", "name": name, "input": input}])
}

/// The one row of `rows` for `toolkit`/`tool` with `outcome`.
fn find<'a>(rows: &'a [Value], toolkit: &str, tool: &str, outcome: &str) -> &'a Value {
    let found: Vec<_> = rows
        .iter()
        .filter(|r| r["toolkit"] == toolkit && r["tool"] == tool && r["outcome"] == outcome)
        .collect();
    assert_eq!(found.len(), 1, "{toolkit}/{tool}/{outcome} in {rows:#?}");
    found[0]
}

/// The calls and refusals of the test, on `server`: returns how many rows
/// they leave.
async fn calls_and_refusals(server: &TestServer) -> usize {
    let http_llm = server.llm(LlmProtocol::Http);
    echo(server, LlmProtocol::Http, "plain", "hello").await;
    echo(server, LlmProtocol::WebSocket, "plain", "hello").await;
    // A tool error, an unknown tool, a tool that needs a token it lacks.
    for (name, input) in [
        ("fails", json!({})),
        ("nope", json!({})),
        ("whoami", json!({})),
    ] {
        http_llm
            .call_tool("plain", &call(name, input), "anthropic", "")
            .await
            .expect("an answer");
    }
    // The toolkit that keeps payloads: a call given a token, whose tool
    // answers with it.
    let token = Secret::new(TOKEN);
    for (name, input) in [
        ("echo", json!({"text": "payload-marker"})),
        ("whoami", json!({})),
    ] {
        http_llm
            .call_tool_as(
                "kept",
                &call(name, input),
                "anthropic",
                "",
                None,
                Some(&token),
            )
            .await
            .expect("an answer");
    }
    // A wrong LLM key, over HTTP, the WebSocket and MCP.
    for protocol in [LlmProtocol::Http, LlmProtocol::WebSocket] {
        let wrong = LlmClient::new(WRONG_LLM_KEY)
            .with_base_url(&server.base)
            .with_protocol(protocol)
            .with_timeout(WAIT);
        let refused = wrong
            .call_tool(
                "plain",
                &call("echo", json!({"text": "x"})),
                "anthropic",
                "",
            )
            .await;
        assert!(refused.is_err(), "{protocol:?}: {refused:?}");
    }
    let wrong = format!("Bearer {WRONG_LLM_KEY}");
    let (status, _, _) = http(
        "POST",
        &format!("{}/mcp/plain", server.base),
        &[
            ("authorization", wrong.as_str()),
            ("content-type", "application/json"),
        ],
        Some(r#"{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}"#),
    )
    .await;
    assert_eq!(status, 401);
    // An app the toolkit does not have.
    let (status, v) = http_json(
        "POST",
        &format!("{}/api/v1/atp/llm-client/process/", server.base),
        &[("authorization", &format!("ApiKey {LLM_KEY}"))],
        Some(
            &json!({"type": "app_request", "toolkit_id": "plain", "request_id": "a1",
                     "payload": {"app": "no_such_app", "parameters": {}}}),
        ),
    )
    .await;
    assert_eq!(v["payload"]["code"], "app_not_found", "{status}: {v}");
    11
}

/// Checks the rows [`calls_and_refusals`] left (newest first).
fn check_rows(rows: &[Value]) {
    let llm = key_id(LLM_KEY);
    let echoes: Vec<&Value> = rows
        .iter()
        .filter(|r| r["toolkit"] == "plain" && r["tool"] == "echo" && r["outcome"] == "ok")
        .collect();
    let vias: HashSet<&str> = echoes.iter().filter_map(|r| r["via"].as_str()).collect();
    assert_eq!(
        vias,
        HashSet::from(["llm_http", "llm_websocket"]),
        "{rows:#?}"
    );
    for ok in echoes {
        assert_eq!(ok["kind"], "call");
        assert_eq!(ok["key_id"], llm.as_str());
        assert_eq!(ok["developer"], "default");
        assert_eq!(ok["transport"], "websocket");
        assert_eq!(ok["error_code"], Value::Null);
        assert!(ok["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{ok}");
        assert!(ok["at"].as_str().is_some_and(|t| t.ends_with('Z')), "{ok}");
    }
    let error = find(rows, "plain", "fails", "error");
    assert_eq!(error["error_code"], "tool_error");
    assert_eq!(error["transport"], "websocket");
    let unknown = find(rows, "plain", "nope", "refused");
    assert_eq!(unknown["error_code"], "tool_not_found");
    assert_eq!(unknown["transport"], Value::Null);
    assert_eq!(unknown["key_id"], llm.as_str());
    let no_token = find(rows, "plain", "whoami", "refused");
    assert_eq!(no_token["error_code"], "auth_required");
    let no_app = find(rows, "plain", "no_such_app", "refused");
    assert_eq!(no_app["error_code"], "app_not_found");
    assert_eq!(no_app["via"], "llm_http");
    // Payloads: none for `plain`; for `kept`, arguments and result, with
    // the token redacted wherever it was.
    for r in rows.iter().filter(|r| r["toolkit"] == "plain") {
        assert_eq!(r["arguments"], Value::Null, "{r}");
        assert_eq!(r["result"], Value::Null, "{r}");
    }
    let kept = find(rows, "kept", "echo", "ok");
    assert_eq!(kept["arguments"], json!({"text": "payload-marker"}));
    assert_eq!(kept["result"]["echo"], "payload-marker");
    let whoami = find(rows, "kept", "whoami", "ok");
    assert_eq!(whoami["result"], json!({"token": "[redacted]"}));
    // A wrong key: over each way in, no key id.
    let refused: Vec<&Value> = rows
        .iter()
        .filter(|r| r["outcome"] == "unauthorized")
        .collect();
    let vias: HashSet<&str> = refused.iter().filter_map(|r| r["via"].as_str()).collect();
    assert_eq!(
        vias,
        HashSet::from(["llm_http", "llm_websocket", "mcp"]),
        "{refused:#?}"
    );
    for r in &refused {
        assert_eq!(r["key_id"], Value::Null, "{r}");
        assert_eq!(r["error_code"], "unauthorized", "{r}");
    }
}

/// No key, no token in `text`.
fn no_secret(text: &str) {
    for secret in [TK_KEY, TK_KEY2, LLM_KEY, WRONG_LLM_KEY, ADMIN_KEY, TOKEN] {
        assert!(!text.contains(secret), "{secret} in the audit log: {text}");
    }
}

async fn start_toolkits(server: &TestServer) -> Vec<(StopOnDrop, tokio::task::JoinHandle<()>)> {
    let mut out = Vec::new();
    for (key, app) in [(TK_KEY, "plain"), (TK_KEY2, "kept")] {
        let toolkit = demo_toolkit(key, app, &server.base);
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        out.push((StopOnDrop(toolkit), runtime));
        server.wait_served(app).await;
    }
    out
}

async fn stop_toolkits(toolkits: Vec<(StopOnDrop, tokio::task::JoinHandle<()>)>) {
    for (toolkit, runtime) in toolkits {
        stop_toolkit(&toolkit.0, runtime).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_and_refusal_leaves_a_row_without_any_key() {
    bounded(Duration::from_secs(90), async {
        // Off without admin keys (outside dev mode).
        let off = TestServer::start(keyed_config()).await;
        let auth = format!("Bearer {ADMIN_KEY}");
        let (status, _, _) = http(
            "GET",
            &format!("{}/admin/audit", off.base),
            &[("authorization", auth.as_str())],
            None,
        )
        .await;
        assert_eq!(status, 404);
        off.stop().await;

        let server = TestServer::start(Config {
            metrics_token: Some(METRICS_TOKEN.into()),
            ..audited(keyed_config())
        })
        .await;
        // The API is the admin's.
        let url = format!("{}/admin/audit", server.base);
        let llm_auth = format!("Bearer {LLM_KEY}");
        for auth in [
            None,
            Some("Bearer wrong-admin-key-0123"),
            Some(llm_auth.as_str()),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
            let (status, _, body) = http("GET", &url, &headers, None).await;
            assert_eq!(status, 401, "{auth:?}: {body}");
        }
        let toolkits = start_toolkits(&server).await;

        let made = calls_and_refusals(&server).await;
        let (all, text) = page(&server, "limit=500").await;
        let all = all["rows"].as_array().cloned().unwrap_or_default();
        assert_eq!(all.len(), made, "{all:#?}");
        check_rows(&all);
        no_secret(&text);

        // Filters.
        let kept = rows(&server, "toolkit=kept").await;
        assert_eq!(kept.len(), 2);
        assert!(kept.iter().all(|r| r["toolkit"] == "kept"));
        let errors = rows(&server, "outcome=error").await;
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0]["tool"], "fails");
        let echoes = rows(&server, "toolkit=plain&tool=echo&outcome=ok").await;
        assert_eq!(echoes.len(), 2);
        let vias: HashSet<&str> = echoes.iter().filter_map(|r| r["via"].as_str()).collect();
        assert_eq!(vias, HashSet::from(["llm_http", "llm_websocket"]));
        let mine = rows(&server, &format!("key_id={}", key_id(LLM_KEY))).await;
        assert_eq!(mine.len(), made - 3, "all but the wrong keys' rows");
        assert_eq!(rows(&server, "kind=admin").await.len(), 0);
        assert_eq!(rows(&server, "kind=call").await.len(), made);
        let newest = all[0]["at_ms"].as_i64().expect("at_ms");
        let oldest = all[made - 1]["at_ms"].as_i64().expect("at_ms");
        assert_eq!(
            rows(&server, &format!("since={}", newest + 1)).await.len(),
            0
        );
        assert_eq!(
            rows(&server, &format!("until={oldest}")).await.len(),
            0,
            "until is exclusive"
        );
        assert_eq!(
            rows(&server, "since=2000-01-01T00:00:00Z").await.len(),
            made
        );
        // Bad filters are refused, saying why.
        let auth = format!("Bearer {ADMIN_KEY}");
        for (query, code) in [
            ("outcome=fine", "invalid_outcome"),
            ("limit=0", "invalid_limit"),
            ("since=yesterday", "invalid_time"),
            ("cursor=abc", "invalid_cursor"),
            ("toolkits=plain", "unknown_parameter"),
        ] {
            let (status, v) = http_json(
                "GET",
                &format!("{url}?{query}"),
                &[("authorization", auth.as_str())],
                None,
            )
            .await;
            assert_eq!((status, v["code"].as_str()), (400, Some(code)), "{query}");
        }

        // Pages of 3, while more calls come in after the first page: no
        // duplicate, no gap, newest first, none of the new rows.
        for i in 0..7 {
            echo(&server, LlmProtocol::Http, "plain", &format!("more {i}")).await;
        }
        let before = rows(&server, "limit=500").await;
        assert_eq!(before.len(), made + 7);
        let (paged, text) = all_pages(&server, "kind=call", 3, async || {
            for i in 0..4 {
                echo(&server, LlmProtocol::Http, "plain", &format!("during {i}")).await;
            }
        })
        .await;
        no_secret(&text);
        let ids =
            |rows: &[Value]| -> Vec<i64> { rows.iter().filter_map(|r| r["id"].as_i64()).collect() };
        assert_eq!(
            ids(&paged),
            ids(&before),
            "the pages are the rows as they were"
        );
        assert!(ids(&paged).windows(2).all(|w| w[0] > w[1]), "newest first");
        assert_eq!(rows(&server, "limit=500").await.len(), made + 11);
        // The limit is capped.
        let (capped, _) = page(&server, "limit=100000").await;
        assert!(
            capped["rows"]
                .as_array()
                .is_some_and(|r| r.len() == made + 11)
        );
        // The metrics count the rows written, and none lost.
        let auth = format!("Bearer {METRICS_TOKEN}");
        let (status, _, metrics) = http(
            "GET",
            &format!("{}/metrics", server.base),
            &[("authorization", auth.as_str())],
            None,
        )
        .await;
        assert_eq!(status, 200);
        let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned())))
            .expect("the Prometheus text format");
        let written: Vec<f64> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "atp_audit_rows_written_total")
            .filter_map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => {
                    Some(v)
                }
                _ => None,
            })
            .collect();
        assert_eq!(written, [(made + 11) as f64], "{metrics}");
        assert!(
            !scrape
                .samples
                .iter()
                .any(|s| s.metric == "atp_audit_rows_dropped_total"),
            "{metrics}"
        );

        stop_toolkits(toolkits).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_run_outside_the_server_are_recorded() {
    bounded(Duration::from_secs(60), async {
        let dir = std::env::temp_dir().join(format!("atp-audit-cli-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let db = DbLocation::File(dir.join("atp.sqlite3"));
        let config = Config {
            db: db.clone(),
            ..audited(keyed_config())
        };
        // The database exists (and is sealed under the test key) first.
        TestServer::start(config.clone()).await.stop().await;
        atp_server::audit_admin_action(&db, "keys revoke", Some("0123456789ab"), None)
            .await
            .expect("recorded");
        atp_server::rotate_secrets(&db, vec![secrets_key(0x5a)], vec![secrets_key(0x6b)])
            .await
            .expect("rotated");
        assert!(
            atp_server::audit_admin_action(&DbLocation::Memory, "keys revoke", None, None)
                .await
                .is_err(),
            "an in-memory database has no log to write to"
        );
        let server = TestServer::start(Config {
            secrets_keys: vec![secrets_key(0x6b)],
            ..config
        })
        .await;
        let (v, text) = page(&server, "kind=admin").await;
        no_secret(&text);
        let rows = v["rows"].as_array().cloned().unwrap_or_default();
        let actions: Vec<&str> = rows.iter().filter_map(|r| r["action"].as_str()).collect();
        assert_eq!(actions, ["keys rotate-secrets", "keys revoke"], "{rows:#?}");
        assert!(
            rows.iter()
                .all(|r| r["via"] == "cli" && r["outcome"] == "ok")
        );
        assert_eq!(rows[1]["target"], "0123456789ab");
        server.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_log_on_postgres() {
    let Some(pg) = blocking(infra::Postgres::start) else {
        return;
    };
    bounded(Duration::from_secs(90), async {
        let db = DbLocation::Postgres(pg.url.clone());
        let server = TestServer::start_connected(audited(Config {
            db: db.clone(),
            ..keyed_config()
        }))
        .await;
        let toolkits = start_toolkits(&server).await;
        let made = calls_and_refusals(&server).await;
        let (all, text) = all_pages(&server, "kind=call", 4, async || {}).await;
        assert_eq!(all.len(), made, "{all:#?}");
        check_rows(&all);
        no_secret(&text);
        atp_server::audit_admin_action(&db, "keys revoke", Some("0123456789ab"), None)
            .await
            .expect("recorded");
        let admin = rows(&server, "kind=admin").await;
        assert_eq!(admin.len(), 1);
        assert_eq!(admin[0]["action"], "keys revoke");
        stop_toolkits(toolkits).await;
        server.stop().await;

        // Retention: a row past it (inserted by hand) is purged when a
        // server starts; the recent ones stay.
        let old_at = 1_000_000i64; // 1970
        let inserted = blocking(|| {
            pg.sql(
                "atp",
                &format!(
                    "INSERT INTO audit (at_ms, kind, via, duration_ms, outcome, action) VALUES ({old_at}, 'admin', 'cli', 0, 'ok', 'ancient')"
                ),
            )
        });
        assert!(inserted);
        let server = TestServer::start_connected(audited(Config {
            db: db.clone(),
            ..keyed_config()
        }))
        .await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let admin = rows(&server, "kind=admin").await;
            if admin.iter().all(|r| r["action"] != "ancient") {
                assert_eq!(admin.len(), 1, "{admin:#?}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the row past retention was not purged: {admin:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(rows(&server, "kind=call").await.len(), made);
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_a_rate_limit_refuses_leaves_a_rate_limited_row() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(audited(Config {
            rate_limits: RateLimits {
                per_key: Limit {
                    calls_per_second: Some(0.01),
                    burst: Some(1),
                    ..Limit::default()
                },
                ..RateLimits::default()
            },
            ..keyed_config()
        }))
        .await;
        let toolkits = start_toolkits(&server).await;
        let url = format!("{}/api/v1/atp/llm-client/process/", server.base);
        let auth = format!("ApiKey {LLM_KEY}");
        let task = json!({"type": "task_request", "toolkit_id": "plain", "request_id": "r1",
                          "payload": {"function": "echo", "parameters": {"text": "x"}}});
        // The burst of one, then refusals: as JSON, and as an event stream
        // (refused before the stream starts).
        let (status, _) = http_json(
            "POST",
            &url,
            &[("authorization", auth.as_str())],
            Some(&task),
        )
        .await;
        assert_eq!(status, 200);
        let (status, v) = http_json(
            "POST",
            &url,
            &[("authorization", auth.as_str())],
            Some(&task),
        )
        .await;
        assert_eq!(
            (status, v["code"].as_str()),
            (429, Some("rate_limited")),
            "{v}"
        );
        let body = task.to_string();
        let (status, _, text) = http(
            "POST",
            &url,
            &[
                ("authorization", auth.as_str()),
                ("accept", "text/event-stream"),
            ],
            Some(&body),
        )
        .await;
        assert_eq!(status, 429, "{text}");
        let limited = rows(&server, "outcome=rate_limited").await;
        assert_eq!(limited.len(), 2, "{limited:#?}");
        for r in &limited {
            assert_eq!(r["error_code"], "rate_limited", "{r}");
            assert_eq!(r["key_id"], key_id(LLM_KEY).as_str(), "{r}");
            assert_eq!(
                (r["toolkit"].as_str(), r["tool"].as_str()),
                (Some("plain"), Some("echo"))
            );
            assert_eq!(r["via"], "llm_http", "{r}");
            assert_eq!(r["transport"], Value::Null, "{r}");
        }
        assert_eq!(rows(&server, "outcome=ok").await.len(), 1);
        stop_toolkits(toolkits).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_commands_are_recorded_with_the_key_id() {
    bounded(Duration::from_secs(60), async {
        let dir = std::env::temp_dir().join(format!("atp-audit-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let db = DbLocation::File(dir.join("atp.sqlite3"));
        let made = atp_server::create_api_key(&db, atp_server::KeyKind::Llm, None, &[])
            .await
            .expect("made");
        atp_server::revoke_api_key(&db, &made.id)
            .await
            .expect("revoked");
        assert!(atp_server::revoke_api_key(&db, &made.id).await.is_err());
        let server = TestServer::start(Config {
            db: db.clone(),
            ..audited(keyed_config())
        })
        .await;
        let (v, text) = page(&server, "kind=admin").await;
        assert!(!text.contains(made.key.expose()), "{text}");
        let rows = v["rows"].as_array().cloned().unwrap_or_default();
        let seen: Vec<(&str, &str, &str)> = rows
            .iter()
            .filter_map(|r| {
                Some((
                    r["action"].as_str()?,
                    r["target"].as_str()?,
                    r["outcome"].as_str()?,
                ))
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("keys revoke", made.id.as_str(), "error"),
                ("keys revoke", made.id.as_str(), "ok"),
                ("keys create", made.id.as_str(), "ok"),
            ],
            "{rows:#?}"
        );
        assert_eq!(rows[0]["error_code"], "key_not_found");
        server.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

/// The admin API's changes (here: the console's revoke, resend and
/// connect, each refused as not found) leave admin rows with the admin
/// key's id, the action, its target and the error; never the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_changes_are_recorded_with_the_admin_key_id() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(audited(keyed_config())).await;
        let auth = format!("Bearer {ADMIN_KEY}");
        for (method, path) in [
            ("DELETE", "/admin/oauth/connections/no-such-connection"),
            ("POST", "/admin/webhooks/deliveries/no-such-delivery/resend"),
        ] {
            let (status, _, body) = http(
                method,
                &format!("{}{path}", server.base),
                &[("authorization", auth.as_str())],
                None,
            )
            .await;
            assert_eq!(status, 404, "{path}: {body}");
        }
        let admin = rows(&server, "kind=admin").await;
        let (_, text) = page(&server, "kind=admin").await;
        no_secret(&text);
        assert!(!text.contains(ADMIN_KEY), "{text}");
        for (action, target) in [
            ("oauth.revoke", "no-such-connection"),
            ("webhook.resend", "no-such-delivery"),
        ] {
            let row = admin
                .iter()
                .find(|r| r["action"] == action)
                .unwrap_or_else(|| panic!("no {action} row in {admin:#?}"));
            assert_eq!(row["target"], target, "{row}");
            assert_eq!(row["error_code"], "not_found", "{row}");
            assert_eq!(row["via"], "admin_api", "{row}");
            assert_eq!(row["key_id"], key_id(ADMIN_KEY), "{row}");
        }
        server.stop().await;
    })
    .await;
}
