//! `GET /metrics`: off by default, behind its bearer token when set, and
//! its text — read by a Prometheus text-format parser — counts exactly
//! the calls made, with no key or token anywhere in it.

use std::time::Duration;

use atp_registry::{llm::LlmProtocol, runtime::Transport};
use atp_server::Config;
use serde_json::json;

use crate::common::*;

pub(crate) const METRICS_TOKEN: &str = "metrics-token-0123456789";

/// The samples of a scrape, parsed.
pub(crate) async fn scrape(server: &TestServer) -> prometheus_parse::Scrape {
    let auth = format!("Bearer {METRICS_TOKEN}");
    let (status, headers, body) = http(
        "GET",
        &format!("{}/metrics", server.base),
        &[("authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        headers["content-type"]
            .to_str()
            .is_ok_and(|t| t.starts_with("application/openmetrics-text")),
        "{headers:?}"
    );
    for secret in [TK_KEY, LLM_KEY, METRICS_TOKEN] {
        assert!(!body.contains(secret), "{secret} in the metrics:\n{body}");
    }
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("not the Prometheus text format ({e}):\n{body}"))
}

/// The value of the sample `name` whose labels include `labels`.
pub(crate) fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    match found[0].value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_calls_made_and_are_guarded() {
    bounded(Duration::from_secs(60), async {
        // Off without a token (outside dev mode).
        let off = TestServer::start(keyed_config()).await;
        let (status, _, _) = http("GET", &format!("{}/metrics", off.base), &[], None).await;
        assert_eq!(status, 404);
        off.stop().await;

        let server = TestServer::start(Config {
            metrics_token: Some(METRICS_TOKEN.into()),
            ..keyed_config()
        })
        .await;
        for auth in [None, Some("Bearer wrong-token-0123456789"), Some(LLM_KEY)] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
            let (status, _, body) =
                http("GET", &format!("{}/metrics", server.base), &headers, None).await;
            assert_eq!(status, 401, "{auth:?}: {body}");
        }

        let toolkit = demo_toolkit(TK_KEY, "metered", &server.base);
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        let _stop = StopOnDrop(toolkit.clone());
        server.wait_served("metered").await;
        let before = scrape(&server).await;
        assert_eq!(value(&before, "atp_toolkit_websockets", &[]), 1.0);

        for i in 0..3 {
            echo(&server, LlmProtocol::Http, "metered", &format!("hi {i}")).await;
        }
        let llm = server.llm(LlmProtocol::Http);
        let fails = json!({"type": "tool_use", "id": "f1", "name": "fails", "input": {}});
        llm.call_tool("metered", &fails, "anthropic", "")
            .await
            .expect("an answer");
        let after = scrape(&server).await;
        let calls = |tool: &str, outcome: &str| {
            value(
                &after,
                "atp_tool_calls_total",
                &[
                    ("toolkit", "metered"),
                    ("tool", tool),
                    ("transport", "websocket"),
                    ("outcome", outcome),
                ],
            )
        };
        assert_eq!(calls("echo", "ok"), 3.0);
        assert_eq!(calls("fails", "tool_error"), 1.0);
        let observed = value(
            &after,
            "atp_tool_call_duration_seconds_count",
            &[("toolkit", "metered"), ("tool", "echo")],
        );
        assert_eq!(observed, 3.0);
        assert_eq!(value(&after, "atp_inbox_depth", &[]), 0.0);

        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;
    })
    .await;
}
