//! Rate limits (docs/OPERATIONS.md, "Rate limits"): over a toolkit's
//! calls a second, `process/` answers 429 with `Retry-After` and works
//! again after it, a WebSocket `task_request` gets `rate_limited`, an MCP
//! `tools/call` an error; too many calls in flight get 429; arguments
//! over the size limit get 413; `atp_rate_limited_total` counts them.

use std::{process::Stdio, time::Duration};

use atp_registry::runtime::Transport;
use atp_server::{Config, DbLocation, KeyKind};
use serde_json::{Value, json};

use crate::{
    apps::{self, llm_ws, recv_json, send_json},
    cli::listening_addr,
    common::*,
    faults::{next_json, raw_toolkit, send},
    metrics::{METRICS_TOKEN, scrape, value},
};

/// A `task_request` of `app`'s `echo`.
fn task(id: &str, app: &str, text: &str) -> Value {
    json!({"type": "task_request", "request_id": id, "toolkit_id": app,
           "payload": {"function": "echo", "parameters": {"text": text}}})
}

/// `POST process/` with the LLM key: status, `Retry-After` and answer.
async fn call(server: &TestServer, body: &Value) -> (u16, Option<u64>, Value) {
    call_at(&server.base, LLM_KEY, body).await
}

/// `POST process/` to `base` with `key`: status, `Retry-After` and answer.
async fn call_at(base: &str, key: &str, body: &Value) -> (u16, Option<u64>, Value) {
    let auth = format!("ApiKey {key}");
    let (status, headers, text) = http(
        "POST",
        &format!("{base}/api/v1/atp/llm-client/process/"),
        &[("authorization", auth.as_str())],
        Some(&body.to_string()),
    )
    .await;
    let retry_after = headers
        .get("retry-after")
        .map(|v| v.to_str().expect("ASCII").parse().expect("whole seconds"));
    let answer = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, retry_after, answer)
}

fn config() -> Config {
    let limits = Config::from_toml(
        r#"
        [rate_limits.per_key]
        max_request_bytes = 1024
        [rate_limits.toolkits.rated]
        calls_per_second = 0.5
        burst = 2
        [rate_limits.toolkits.busy]
        max_concurrent = 1
        "#,
    )
    .expect("valid limits")
    .rate_limits;
    Config {
        rate_limits: limits,
        metrics_token: Some(METRICS_TOKEN.into()),
        ..keyed_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_rate_limit_calls_get_429_then_work_again() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(config()).await;
        let toolkit = demo_toolkit(TK_KEY, "rated", &server.base);
        let _stop = StopOnDrop(toolkit.clone());
        let _runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        server.wait_served("rated").await;

        // HTTP: the burst passes, then 429 with Retry-After and a clear error.
        let mut refused = None;
        for i in 0..20 {
            let (status, retry_after, answer) =
                call(&server, &task(&format!("h{i}"), "rated", "hi")).await;
            if status == 429 {
                assert!(i >= 2, "the burst of 2 passes first");
                refused = Some((retry_after, answer));
                break;
            }
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["payload"]["result"]["echo"], "hi", "{answer}");
        }
        let (retry_after, answer) = refused.expect("a call over the limit is refused");
        assert_eq!(answer["type"], "task_response");
        assert_eq!(answer["code"], "rate_limited", "{answer}");
        assert!(
            answer.to_string().contains("0.5 call(s) a second"),
            "{answer}"
        );
        let retry_after = retry_after.expect("a Retry-After header");
        assert!((1..=2).contains(&retry_after), "{retry_after}");

        // The WebSocket: a task_response with the code rate_limited.
        let mut ws = llm_ws(&server, LLM_KEY).await;
        let mut limited = false;
        for i in 0..20 {
            send_json(&mut ws, &task(&format!("w{i}"), "rated", "hi")).await;
            let answer = recv_json(&mut ws).await;
            assert_eq!(answer["type"], "task_response", "{answer}");
            if answer["code"] == "rate_limited" {
                limited = true;
                break;
            }
        }
        assert!(limited, "a WebSocket call over the limit is refused");

        // MCP: tools/call gets an error result with the code.
        let mut mcp_limited = false;
        for i in 0..20 {
            let rpc = json!({"jsonrpc": "2.0", "id": i, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "hi"}}});
            let (status, answer) = http_json(
                "POST",
                &format!("{}/mcp/rated", server.base),
                &[
                    ("authorization", &format!("Bearer {LLM_KEY}")),
                    ("accept", "application/json, text/event-stream"),
                ],
                Some(&rpc),
            )
            .await;
            assert_eq!(status, 200, "{answer}");
            if answer["result"]["_meta"]["io.atp/code"] == "rate_limited" {
                assert_eq!(answer["result"]["isError"], true, "{answer}");
                mcp_limited = true;
                break;
            }
        }
        assert!(mcp_limited, "an MCP call over the limit is refused");

        // Server-sent events: the limits are checked before the stream
        // starts, so the refusal keeps its status and Retry-After.
        let mut sse_retry_after = None;
        for i in 0..20 {
            let (status, headers, body) = http(
                "POST",
                &format!("{}/api/v1/atp/llm-client/process/", server.base),
                &[
                    ("authorization", &format!("ApiKey {LLM_KEY}")),
                    ("accept", "text/event-stream"),
                ],
                Some(&task(&format!("s{i}"), "rated", "hi").to_string()),
            )
            .await;
            let last = events(&body).pop().expect("an event");
            assert_eq!(last["type"], "task_response", "{body}");
            if status == 429 {
                let retry_after = headers
                    .get("retry-after")
                    .unwrap_or_else(|| panic!("a Retry-After header: {headers:?}"));
                assert_eq!(last["code"], "rate_limited", "{body}");
                sse_retry_after = Some(
                    retry_after
                        .to_str()
                        .expect("ASCII")
                        .parse::<u64>()
                        .expect("whole seconds"),
                );
                break;
            }
            assert_eq!(status, 200, "{body}");
            assert_eq!(last["payload"]["result"]["echo"], "hi", "{body}");
        }
        let wait = sse_retry_after.expect("an event-stream call over the limit is refused");

        // After waiting the last refusal's Retry-After, calls pass again.
        tokio::time::sleep(Duration::from_secs(wait)).await;
        let (status, _, answer) = call(&server, &task("after", "rated", "back")).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["payload"]["result"]["echo"], "back");

        let metrics = scrape(&server).await;
        let counted = value(
            &metrics,
            "atp_rate_limited_total",
            &[("limit", "toolkit_rate"), ("toolkit", "rated")],
        );
        assert!(
            counted >= 4.0,
            "HTTP, the WebSocket, MCP, events: {counted}"
        );
        server.stop().await;
    })
    .await;
}

/// App sessions are calls of their toolkit: starts and actions are
/// refused over a limit like a `task_request`, over the WebSocket and
/// over `process/` (429 with `Retry-After`), and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_starts_and_actions_are_rate_limited() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(config()).await;
        apps::register(&server, TK_KEY, "rated", "counter").await;
        let _tk = apps::ScriptedToolkit::start(&server, TK_KEY).await;
        server.wait_served("rated").await;
        let mut ws = llm_ws(&server, LLM_KEY).await;

        let start = apps::app_request("r0", "rated", "counter", json!({"start": 1}));
        send_json(&mut ws, &start).await;
        let a = recv_json(&mut ws).await;
        let session = a["payload"]["session_id"]
            .as_str()
            .unwrap_or_else(|| panic!("a session: {a}"))
            .to_owned();

        // Actions over the WebSocket pass until the toolkit's rate is
        // spent (a burst of 2, the start included), then get rate_limited.
        let mut count = 1;
        let mut limited = false;
        for i in 0..20 {
            send_json(
                &mut ws,
                &apps::app_action(&format!("w{i}"), &session, json!({"add": 1})),
            )
            .await;
            let a = recv_json(&mut ws).await;
            assert_eq!(a["type"], "app_response", "{a}");
            if apps::code(&a) == "rate_limited" {
                assert_eq!(a["payload"]["session_id"], session, "{a}");
                limited = true;
                break;
            }
            count += 1;
            assert_eq!(a["payload"]["ui_content"], json!({ "count": count }), "{a}");
        }
        assert!(limited, "an action over the limit is refused");

        // process/: 429 with Retry-After and the app_response, for an
        // action and for a start. A token may have come back meanwhile (one
        // every 2 s): an action that passes counts, as over the WebSocket.
        let mut refused = None;
        for i in 0..20 {
            let (status, retry_after, a) = call(
                &server,
                &apps::app_action(&format!("h1-{i}"), &session, json!({"add": 1})),
            )
            .await;
            assert_eq!(a["type"], "app_response", "{a}");
            if status == 429 {
                assert_eq!(apps::code(&a), "rate_limited", "{a}");
                refused = Some(retry_after.expect("a Retry-After header"));
                break;
            }
            assert_eq!(status, 200, "{a}");
            count += 1;
            assert_eq!(a["payload"]["ui_content"], json!({ "count": count }), "{a}");
        }
        let wait = refused.expect("an action over the limit is refused");
        assert!((1..=2).contains(&wait), "{wait}");
        let mut refused = None;
        for i in 0..20 {
            let (status, retry_after, a) = call(
                &server,
                &apps::app_request(&format!("h2-{i}"), "rated", "counter", json!({})),
            )
            .await;
            if status == 429 {
                assert_eq!(apps::code(&a), "rate_limited", "{a}");
                refused = Some(retry_after.expect("a Retry-After header"));
                break;
            }
            assert_eq!(status, 200, "{a}");
        }
        let wait = refused.expect("a start over the limit is refused");

        // After Retry-After the session goes on where it was.
        tokio::time::sleep(Duration::from_secs(wait)).await;
        let (status, _, a) = call(
            &server,
            &apps::app_action("h3", &session, json!({"add": 1})),
        )
        .await;
        assert_eq!(status, 200, "{a}");
        assert_eq!(
            a["payload"]["ui_content"],
            json!({ "count": count + 1 }),
            "{a}"
        );

        let metrics = scrape(&server).await;
        let counted = value(
            &metrics,
            "atp_rate_limited_total",
            &[("limit", "toolkit_rate"), ("toolkit", "rated")],
        );
        assert!(counted >= 3.0, "{counted}");
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_and_request_size_are_limited() {
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(config()).await;
        let mut toolkit = raw_toolkit(&server, TK_KEY, "busy").await;

        // One call in flight: the toolkit has it and has not answered.
        let first = {
            let base = server.base.clone();
            let body = task("first", "busy", "one").to_string();
            tokio::spawn(async move {
                let auth = format!("ApiKey {LLM_KEY}");
                http(
                    "POST",
                    &format!("{base}/api/v1/atp/llm-client/process/"),
                    &[("authorization", auth.as_str())],
                    Some(&body),
                )
                .await
            })
        };
        let request = next_json(&mut toolkit).await;
        assert_eq!(request["payload"]["params"], json!({"text": "one"}));

        // A second one is refused while the first runs.
        let (status, retry_after, answer) = call(&server, &task("second", "busy", "two")).await;
        assert_eq!((status, retry_after), (429, Some(1)), "{answer}");
        assert_eq!(answer["code"], "rate_limited");
        assert!(answer.to_string().contains("in flight"), "{answer}");

        // Too large arguments are refused at once, with 413.
        let big = "x".repeat(2000);
        let (status, retry_after, answer) = call(&server, &task("big", "busy", &big)).await;
        assert_eq!((status, retry_after), (413, None), "{answer}");
        assert_eq!(answer["code"], "payload_too_large");

        // The first finishes; then there is room again.
        send(
            &mut toolkit,
            &json!({"type": "tool_response", "request_id": request["payload"]["request_id"],
                    "result": {"echo": "one"}}),
        )
        .await;
        let (status, _, text) = first.await.expect("no panic");
        assert_eq!(status, 200, "{text}");
        let again = {
            let base = server.base.clone();
            let body = task("third", "busy", "three").to_string();
            tokio::spawn(async move {
                let auth = format!("ApiKey {LLM_KEY}");
                http(
                    "POST",
                    &format!("{base}/api/v1/atp/llm-client/process/"),
                    &[("authorization", auth.as_str())],
                    Some(&body),
                )
                .await
            })
        };
        let request = next_json(&mut toolkit).await;
        assert_eq!(request["payload"]["params"], json!({"text": "three"}));
        send(
            &mut toolkit,
            &json!({"type": "tool_response", "request_id": request["payload"]["request_id"],
                    "result": {"echo": "three"}}),
        )
        .await;
        let (status, _, text) = again.await.expect("no panic");
        assert_eq!(status, 200, "{text}");

        let metrics = scrape(&server).await;
        for (limit, n) in [("toolkit_concurrency", 1.0), ("request_size", 1.0)] {
            let counted = value(
                &metrics,
                "atp_rate_limited_total",
                &[("limit", limit), ("toolkit", "busy")],
            );
            assert_eq!(counted, n, "{limit}");
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_has_its_own_limits_by_its_id() {
    bounded(Duration::from_secs(60), async {
        let dir = std::env::temp_dir().join(format!("atp-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let db = DbLocation::File(dir.join("atp.sqlite3"));
        let made = atp_server::create_api_key(&db, KeyKind::Llm, None, &[])
            .await
            .expect("a key");
        let limits = Config::from_toml(&format!(
            "[rate_limits.keys.{}]\ncalls_per_second = 0.01\nburst = 1",
            made.id
        ))
        .expect("valid limits")
        .rate_limits;
        let server = TestServer::start(Config {
            db,
            rate_limits: limits,
            ..keyed_config()
        })
        .await;
        let mut toolkit = raw_toolkit(&server, TK_KEY, "kit").await;
        let key = made.key.expose();

        // Its one call of the burst passes; the next is refused.
        let first = {
            let (base, key) = (server.base.clone(), key.to_owned());
            tokio::spawn(async move { call_at(&base, &key, &task("k1", "kit", "one")).await })
        };
        let request = next_json(&mut toolkit).await;
        send(
            &mut toolkit,
            &json!({"type": "tool_response", "request_id": request["payload"]["request_id"],
                    "result": {"echo": "one"}}),
        )
        .await;
        assert_eq!(first.await.expect("no panic").0, 200);
        let (status, retry_after, answer) =
            call_at(&server.base, key, &task("k2", "kit", "two")).await;
        assert_eq!(status, 429, "{answer}");
        assert!(retry_after.is_some_and(|s| s >= 90), "{retry_after:?}");
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("this API key")),
            "{answer}"
        );

        // Another key is not limited by it.
        let other = tokio::spawn({
            let base = server.base.clone();
            async move { call_at(&base, LLM_KEY, &task("o1", "kit", "three")).await }
        });
        let request = next_json(&mut toolkit).await;
        send(
            &mut toolkit,
            &json!({"type": "tool_response", "request_id": request["payload"]["request_id"],
                    "result": {"echo": "three"}}),
        )
        .await;
        assert_eq!(other.await.expect("no panic").0, 200);
        server.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test]
async fn the_binary_takes_the_per_key_limits_as_flags() {
    bounded(Duration::from_secs(60), async {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_atp-server"))
            .args([
                "--addr",
                "127.0.0.1:0",
                "--db",
                ":memory:",
                "--key-max-request-bytes",
                "100",
            ])
            .env("NO_COLOR", "1")
            .env("ATP_TOOLKIT_API_KEYS", TK_KEY)
            .env("ATP_LLM_API_KEYS", LLM_KEY)
            .env("ATP_SECRETS_KEY", secrets_key_hex())
            .env_remove("ATP_SECRETS_KEY_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starts");
        let addr = listening_addr(&mut child).await;
        let base = format!("http://{addr}");
        let register = json!({"function_id": "echo", "api_key": TK_KEY, "app_name": "kit",
            "metadata": {"params": ["text"], "required_params": [], "description": "Echo."}});
        let (status, _) = http_json(
            "POST",
            &format!("{base}/api/v1/register_tool/"),
            &[],
            Some(&register),
        )
        .await;
        assert_eq!(status, 200);
        let (status, retry_after, answer) =
            call_at(&base, LLM_KEY, &task("big", "kit", &"x".repeat(200))).await;
        assert_eq!((status, retry_after), (413, None), "{answer}");
        assert_eq!(answer["code"], "payload_too_large");
        // Under the limit the call goes on (no toolkit is connected).
        let (status, _, answer) = call_at(&base, LLM_KEY, &task("small", "kit", "x")).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (200, Some("toolkit_not_connected")),
            "{answer}"
        );
        let _ = child.kill().await;

        // A bad value is refused at start, clearly.
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_atp-server"))
            .args(["--db", ":memory:", "--dev", "--key-calls-per-second", "0"])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("runs");
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("calls_per_second must be above 0"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;
}
