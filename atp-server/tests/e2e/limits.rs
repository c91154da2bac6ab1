//! Rate limits (docs/OPERATIONS.md, "Rate limits"): over a toolkit's
//! calls a second, `process/` answers 429 with `Retry-After` and works
//! again after it, a WebSocket `task_request` gets `rate_limited`, an MCP
//! `tools/call` an error; too many calls in flight get 429; arguments
//! over the size limit get 413; `atp_rate_limited_total` counts them.

use std::time::Duration;

use atp_registry::runtime::Transport;
use atp_server::Config;
use serde_json::{Value, json};

use crate::{
    apps::{llm_ws, recv_json, send_json},
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
    let auth = format!("ApiKey {LLM_KEY}");
    let (status, headers, text) = http(
        "POST",
        &format!("{}/api/v1/atp/llm-client/process/", server.base),
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

        // After waiting Retry-After, calls pass again.
        let (_, retry_after, _) = call(&server, &task("again", "rated", "hi")).await;
        let wait = retry_after.expect("still limited right after");
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
        assert!(counted >= 4.0, "HTTP twice, the WebSocket, MCP: {counted}");
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
