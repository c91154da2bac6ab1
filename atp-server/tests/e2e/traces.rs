//! Traces (docs/OPERATIONS.md, "Traces"): one tool call is one trace. The
//! W3C `traceparent` goes from `LlmClient` through the server to the toolkit
//! runtime and into the tool's own spans; each hop records the trace id as
//! its span's `trace_id`, and the spans are read back from the process's
//! tracing subscriber.

use std::time::Duration;

use atp_registry::{
    AppCall, AppReply, Call, Tool, ToolError, ToolKitClient,
    llm::{CallOptions, LlmProtocol},
    runtime::Transport,
    trace::TraceContext,
};
use serde_json::{Value, json};

use crate::common::*;

use atp_registry::{Engine, Registry};
use axum::Router;

const APP: &str = "traced";

/// A toolkit whose tools open a span of their own (`tool.work`), one async
/// and one blocking.
fn traced_toolkit(app: &str, base: &str) -> ToolKitClient {
    let client = ToolKitClient::new(TK_KEY, app).with_base_url(base);
    client
        .register_tool(Tool::new("work"), |_call: Call| async {
            tracing::info_span!("tool.work").in_scope(|| tracing::info!("working"));
            Ok::<_, ToolError>(json!("done"))
        })
        .expect("valid");
    client
        .register_blocking_tool(Tool::new("work_blocking"), |_call: Call| {
            tracing::info_span!("tool.work").in_scope(|| tracing::info!("working, blocking"));
            Ok::<_, ToolError>(json!("done"))
        })
        .expect("valid");
    client
}

fn call(tool: &str) -> Value {
    json!({"type": "tool_use", "id": "t1", "name": tool, "input": {}})
}

/// The spans of trace `trace_id`, by name: exactly one each of the LLM
/// client's, the server's and the toolkit's, and the tool's own span
/// inside the toolkit's.
fn assert_one_trace(spans: &SpanLog, app: &str, trace_id: &str, tool: &str) {
    let of_trace = assert_hops(
        spans,
        trace_id,
        ["atp.llm.call", "atp.server.call", "atp.tool"],
        "tool.work",
    );
    for r in &of_trace {
        assert_eq!(r.field("toolkit"), Some(app), "{r:?}");
        assert_eq!(r.field("tool"), Some(tool), "{r:?}");
    }
}

/// The spans of trace `trace_id`: exactly `hops` (by name, sorted), and
/// one span `inner` inside the last hop (the toolkit's). Returns the hops.
fn assert_hops(spans: &SpanLog, trace_id: &str, hops: [&str; 3], inner: &str) -> Vec<SpanRecord> {
    let of_trace = spans.find(|r| r.field("trace_id") == Some(trace_id));
    let mut names: Vec<&str> = of_trace.iter().map(|r| r.name).collect();
    names.sort_unstable();
    let mut sorted = hops;
    sorted.sort_unstable();
    assert_eq!(
        names, sorted,
        "the spans of trace {trace_id}: {of_trace:#?}"
    );
    let own = spans.find(|r| r.name == inner && r.parent_trace_id.as_deref() == Some(trace_id));
    assert_eq!(own.len(), 1, "{inner}, in trace {trace_id}");
    assert_eq!(own[0].parent, Some(hops[2]));
    of_trace
}

fn is_trace_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && id.bytes().any(|b| b != b'0')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_is_one_trace_from_the_llm_client_to_the_tool() {
    let spans = &capture().spans;
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        let toolkit = traced_toolkit(APP, &server.base);
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        // A failed assertion must not leave the runtime (and the test) running.
        let _stop = StopOnDrop(toolkit.clone());
        server.wait_served(APP).await;
        for protocol in [LlmProtocol::WebSocket, LlmProtocol::Http] {
            for tool in ["work", "work_blocking"] {
                // The agent's own trace, given: every hop joins it.
                let parent = TraceContext::new_root();
                let options = CallOptions::new().trace(parent.clone());
                let out = server
                    .llm(protocol)
                    .call_tool_with(APP, &call(tool), "anthropic", "", &options)
                    .await
                    .expect("call");
                assert_eq!(outputs(&out), [r#""done""#]);
                assert_one_trace(spans, APP, parent.trace_id(), tool);

                // None given: the client starts the trace.
                let before = spans.find(|r| r.name == "atp.llm.call").len();
                let out = server
                    .llm(protocol)
                    .call_tool(APP, &call(tool), "anthropic", "")
                    .await
                    .expect("call");
                assert_eq!(outputs(&out), [r#""done""#]);
                assert!(spans.find(|r| r.name == "atp.llm.call").len() > before);
                let trace_id = spans.newest_trace_id(|r| {
                    r.name == "atp.llm.call" && r.field("toolkit") == Some(APP)
                });
                assert!(is_trace_id(&trace_id), "{trace_id}");
                assert_one_trace(spans, APP, &trace_id, tool);
            }
        }

        // A malformed traceparent (in the body and the header) is ignored:
        // the call runs, in a trace of the server's making that the
        // toolkit joins.
        let body = json!({
            "type": "task_request", "toolkit_id": APP, "request_id": "bad-trace",
            "payload": {"function": "work", "parameters": {}},
            "traceparent": "00-not-a-trace-01", "tracestate": 42,
        });
        let (status, answer) = http_json(
            "POST",
            &format!("{}/api/v1/atp/llm-client/process/", server.base),
            &[
                ("authorization", &format!("ApiKey {LLM_KEY}")),
                (
                    "traceparent",
                    "ff-ffffffffffffffffffffffffffffffff-ffffffffffffffff-ff",
                ),
            ],
            Some(&body),
        )
        .await;
        assert_eq!(
            (status, &answer["status"]),
            (200, &json!("success")),
            "{answer}"
        );
        let known: Vec<String> = spans
            .find(|r| r.name == "atp.llm.call")
            .iter()
            .filter_map(|r| r.field("trace_id").map(str::to_owned))
            .collect();
        let fresh = spans.find(|r| {
            r.name == "atp.server.call"
                && r.field("toolkit") == Some(APP)
                && r.field("trace_id")
                    .is_some_and(|t| !known.iter().any(|k| k == t))
        });
        assert_eq!(fresh.len(), 1, "{fresh:#?}");
        let trace_id = fresh[0].field("trace_id").expect("a trace id");
        assert!(is_trace_id(trace_id), "{trace_id}");
        let tool = spans.find(|r| r.name == "atp.tool" && r.field("trace_id") == Some(trace_id));
        assert_eq!(tool.len(), 1, "the toolkit joins the server's trace");

        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;
    })
    .await;
}

/// A toolkit served at an endpoint URL (our axum adapter): the server
/// sends the `traceparent` header, and the adapter's engine runs the tool
/// in an `atp.tool` span of the same trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_url_toolkit_joins_the_trace() {
    const KIT: &str = "traced-endpoint";
    let spans = &capture().spans;
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        let registry = Registry::new();
        let kit = traced_toolkit(KIT, &server.base);
        registry
            .register_client(KIT, kit.clone())
            .expect("register");
        let app = Router::new().merge(atp_axum::Atp::from(Engine::with_registry(registry)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let adapter = tokio::spawn(async move { axum::serve(listener, app).await });
        for tool in kit.registered_tools() {
            let body = json!({
                "function_id": tool.name(), "api_key": TK_KEY, "app_name": KIT,
                "programming_language": "Rust", "code_hash": "h", "toolkit_hash": "th",
                "endpoint_url": endpoint,
                "metadata": {"params": tool.params(), "required_params": tool.required_params()},
            });
            let (status, answer) = http_json(
                "POST",
                &format!("{}/api/v1/register_tool", server.base),
                &[],
                Some(&body),
            )
            .await;
            assert_eq!(status, 200, "{answer}");
        }
        for tool in ["work", "work_blocking"] {
            let parent = TraceContext::new_root();
            let out = server
                .llm(LlmProtocol::Http)
                .call_tool_with(
                    KIT,
                    &call(tool),
                    "anthropic",
                    "",
                    &CallOptions::new().trace(parent.clone()),
                )
                .await
                .expect("call");
            assert_eq!(outputs(&out), [r#""done""#]);
            assert_one_trace(spans, KIT, parent.trace_id(), tool);
            let server_span = spans.find(|r| {
                r.name == "atp.server.call" && r.field("trace_id") == Some(parent.trace_id())
            });
            assert_eq!(server_span[0].field("transport"), Some("endpoint"));
        }
        adapter.abort();
        server.stop().await;
    })
    .await;
}

/// An app session over either protocol: its start and each of its actions
/// is one trace, from the LLM client's `atp.llm.app` span through the
/// server's `atp.server.app` to the toolkit's `atp.app`, and into the
/// app's own span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_of_an_app_session_is_one_trace() {
    const KIT: &str = "traced-apps";
    let spans = &capture().spans;
    bounded(Duration::from_secs(60), async {
        let server = TestServer::start(keyed_config()).await;
        let toolkit = ToolKitClient::new(TK_KEY, KIT).with_base_url(&server.base);
        toolkit
            .register_app(Tool::new("counter"), |_call: AppCall| async {
                tracing::info_span!("app.work").in_scope(|| tracing::info!("working"));
                Ok::<_, ToolError>(AppReply::new(json!({"ok": true})))
            })
            .expect("valid");
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        let _stop = StopOnDrop(toolkit.clone());
        server.wait_served(KIT).await;
        let mut seen = Vec::new();
        for protocol in [LlmProtocol::WebSocket, LlmProtocol::Http] {
            let llm = server.llm(protocol);
            let session = llm
                .start_app(KIT, "counter", &Value::Null, None)
                .await
                .expect("started");
            let trace_id = spans
                .newest_trace_id(|r| r.name == "atp.llm.app" && r.field("toolkit") == Some(KIT));
            assert_app_trace(spans, &trace_id);
            seen.push(trace_id);

            llm.app_action(&session.session_id, &json!({"add": 1}))
                .await
                .expect("acted");
            let trace_id = spans.newest_trace_id(|r| {
                r.name == "atp.llm.app" && r.field("session") == Some(session.session_id.as_str())
            });
            assert_app_trace(spans, &trace_id);
            seen.push(trace_id);
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 4, "a trace per request: {seen:?}");
        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;
    })
    .await;
}

/// The spans of the app request traced `trace_id`: one each of the
/// client's, the server's and the toolkit's, and the app's own span in
/// the toolkit's.
fn assert_app_trace(spans: &SpanLog, trace_id: &str) {
    assert!(is_trace_id(trace_id), "{trace_id}");
    assert_hops(
        spans,
        trace_id,
        ["atp.llm.app", "atp.server.app", "atp.app"],
        "app.work",
    );
}
