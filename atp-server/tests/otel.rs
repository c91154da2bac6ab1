//! OpenTelemetry export (feature `otel`, `cargo test -p atp-server --features
//! otel --test otel`): a tool call made with a given `traceparent` reaches a
//! real OTLP/HTTP receiver on loopback as one trace — the LLM client's span
//! the child of the given parent, the server's the client's, the toolkit's
//! the server's, the tool's own span the toolkit's. The receiver decodes
//! the protobuf bodies itself (no OpenTelemetry crate on this side).

use std::time::Duration;

use atp_registry::{
    Call, Tool, ToolError, ToolKitClient,
    llm::{CallOptions, LlmClient, LlmProtocol},
    runtime::{RuntimeOptions, Transport},
    trace::TraceContext,
};
use atp_server::{AtpServer, Config, DbLocation, SecretsKey, otel::Otel};
use axum::{Router, body::Bytes, routing::post};
use serde_json::json;
use tokio::{net::TcpListener, sync::mpsc};
use tracing_subscriber::layer::SubscriberExt;

const WAIT: Duration = Duration::from_secs(20);

/// One span as the OTLP body has it (`opentelemetry.proto.trace.v1.Span`).
#[derive(Debug, Default, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
}

/// Reads a protobuf varint at `*at`.
fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The fields of a protobuf message: (number, bytes) for the
/// length-delimited ones; the others are skipped.
fn fields(b: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    let (mut at, mut out) = (0, Vec::new());
    while at < b.len() {
        let key = varint(b, &mut at)?;
        match key & 7 {
            0 => {
                varint(b, &mut at)?;
            }
            1 => at += 8,
            5 => at += 4,
            2 => {
                let len = usize::try_from(varint(b, &mut at)?).ok()?;
                out.push((key >> 3, b.get(at..at + len)?));
                at += len;
            }
            _ => return None,
        }
    }
    Some(out)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The spans of an `ExportTraceServiceRequest`: resource_spans (1) →
/// scope_spans (2) → spans (2) → trace_id (1), span_id (2),
/// parent_span_id (4), name (5).
fn spans_of(body: &[u8]) -> Vec<Span> {
    let mut out = Vec::new();
    for (_, resource) in fields(body)
        .expect("protobuf")
        .into_iter()
        .filter(|f| f.0 == 1)
    {
        for (_, scope) in fields(resource)
            .expect("protobuf")
            .into_iter()
            .filter(|f| f.0 == 2)
        {
            for (_, span) in fields(scope)
                .expect("protobuf")
                .into_iter()
                .filter(|f| f.0 == 2)
            {
                let mut s = Span::default();
                for (n, v) in fields(span).expect("protobuf") {
                    match n {
                        1 => s.trace_id = hex(v),
                        2 => s.span_id = hex(v),
                        4 => s.parent_span_id = hex(v),
                        5 => s.name = String::from_utf8_lossy(v).into_owned(),
                        _ => {}
                    }
                }
                out.push(s);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_is_one_exported_trace() {
    // The OTLP receiver.
    let (tx, mut bodies) = mpsc::unbounded_channel::<Bytes>();
    let receiver = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body);
                ""
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let collector = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    let otel = Otel::to_endpoint(&format!("http://{collector}/v1/traces")).expect("exporter");
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(otel.layer()))
        .expect("the only subscriber of this test binary");

    let key = SecretsKey::parse(&"5a".repeat(32)).expect("a key");
    let server = AtpServer::open(Config {
        db: DbLocation::Memory,
        toolkit_api_keys: vec!["tk-key".into()],
        llm_api_keys: vec!["llm-key".into()],
        secrets_keys: vec![key],
        ..Config::default()
    })
    .expect("open");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener).await });

    let toolkit = ToolKitClient::new("tk-key", "exported")
        .with_base_url(&base)
        .with_runtime_options(
            RuntimeOptions::default()
                .transport(Transport::WebSocket)
                .handle_ctrl_c(false)
                .backoff(Duration::from_millis(50), Duration::from_millis(500)),
        );
    toolkit
        .register_tool(Tool::new("work"), |_call: Call| async {
            tracing::info_span!("tool.work").in_scope(|| tracing::info!("working"));
            Ok::<_, ToolError>(json!("done"))
        })
        .expect("valid");
    let runtime = {
        let toolkit = toolkit.clone();
        tokio::task::spawn_blocking(move || toolkit.start_blocking())
    };
    struct Stop(ToolKitClient);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.stop();
        }
    }
    let stop = Stop(toolkit);
    assert!(server.wait_until_served("exported", WAIT).await);

    let parent = TraceContext::new_root();
    for protocol in [LlmProtocol::WebSocket, LlmProtocol::Http] {
        let call = json!({"type": "tool_use", "id": "t1", "name": "work", "input": {}});
        let out = LlmClient::new("llm-key")
            .with_base_url(&base)
            .with_protocol(protocol)
            .with_timeout(WAIT)
            .call_tool_with(
                "exported",
                &call,
                "anthropic",
                "",
                &CallOptions::new().trace(parent.clone()),
            )
            .await
            .expect("call");
        assert_eq!(out.len(), 1);
    }
    otel.flush().await;

    // Both calls' spans: 2 × (client, server, toolkit, tool).
    let mut spans = Vec::new();
    let names = ["atp.llm.call", "atp.server.call", "atp.tool", "tool.work"];
    let count = |spans: &[Span], name: &str| spans.iter().filter(|s| s.name == name).count();
    while !names.iter().all(|n| count(&spans, n) >= 2) {
        let body = tokio::time::timeout(WAIT, bodies.recv())
            .await
            .unwrap_or_else(|_| panic!("no more spans came; so far: {spans:#?}"))
            .expect("the receiver runs");
        spans.extend(spans_of(&body));
    }
    let by_id = |id: &str| spans.iter().find(|s| s.span_id == id);
    let clients: Vec<&Span> = spans.iter().filter(|s| s.name == "atp.llm.call").collect();
    assert_eq!(clients.len(), 2, "{spans:#?}");
    for client in clients {
        assert_eq!(client.trace_id, parent.trace_id(), "{client:?}");
        assert_eq!(client.parent_span_id, parent.span_id(), "{client:?}");
        let server = spans
            .iter()
            .find(|s| s.name == "atp.server.call" && s.parent_span_id == client.span_id)
            .unwrap_or_else(|| panic!("the server's span under {client:?}: {spans:#?}"));
        let tool = spans
            .iter()
            .find(|s| s.name == "atp.tool" && s.parent_span_id == server.span_id)
            .unwrap_or_else(|| panic!("the toolkit's span under {server:?}: {spans:#?}"));
        let work = spans
            .iter()
            .find(|s| s.name == "tool.work" && s.parent_span_id == tool.span_id)
            .unwrap_or_else(|| panic!("the tool's span under {tool:?}: {spans:#?}"));
        for s in [server, tool, work] {
            assert_eq!(s.trace_id, parent.trace_id(), "{s:?}");
            assert!(by_id(&s.parent_span_id).is_some(), "{s:?}");
        }
    }

    drop(stop);
    tokio::time::timeout(WAIT, runtime)
        .await
        .expect("the toolkit stops")
        .expect("no panic")
        .expect("ran");
    server.shutdown();
    otel.shutdown().await;
}
