//! Criterion benchmarks of the core, without sockets: one `POST` through
//! the engine (parse, validate, call, serialize), toolkit lookup with 1,
//! 1,000 and 100,000 registered toolkits, provider schemas of a 100-tool
//! toolkit, and a call through a blocking handler.
//!
//! Run: `cargo bench -p atp-registry-benches` (see `docs/BENCHMARKS.md`).

use std::{hint::black_box, time::Duration};

use atp_registry::{
    Call, Engine, Provider, Registry, Tool, ToolKitClient,
    http::{RequestHead, Step},
};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

/// The benchmark body, as `atp-bench http` sends it.
const BODY: &[u8] = br#"{"name": "World"}"#;

fn hello_tool(name: &str) -> Tool {
    Tool::new(name)
        .description("Returns a greeting.")
        .params(["name"])
        .required_params(["name"])
}

/// The fixture's `hello_world` handler (`atp_conformance::fixture`).
async fn hello_world(call: Call) -> Result<Value, String> {
    let name = match call.param("name") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    Ok(json!({"message": format!("Hello, {name}!")}))
}

fn hello_blocking(call: Call) -> Result<Value, String> {
    let name = call.str("name").unwrap_or("World");
    Ok(json!({"message": format!("Hello, {name}!")}))
}

/// A toolkit with `hello_world` and `hello_blocking`.
fn toolkit(timeout: Option<Duration>) -> ToolKitClient {
    let client = ToolKitClient::new("key", "Conformance");
    let client = match timeout {
        Some(t) => client.with_timeout(t),
        None => client,
    };
    client
        .register_tool(hello_tool("hello_world"), hello_world)
        .expect("valid tool");
    client
        .register_blocking_tool(hello_tool("hello_blocking"), hello_blocking)
        .expect("valid tool");
    client
}

fn engine_with(name: &str, client: ToolKitClient) -> Engine {
    let registry = Registry::new();
    registry
        .register_client(name, client)
        .expect("valid toolkit");
    Engine::with_registry(registry)
}

fn post(path: &str) -> RequestHead<'_> {
    RequestHead {
        method: "POST",
        path,
        query: None,
        content_type: Some(b"application/json"),
        content_length: Some(BODY.len() as u64),
        ..RequestHead::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
}

/// What a bare handler does for the same request: parse `{"name": …}`,
/// build the answer, serialize it — the baseline the engine's overhead is
/// measured against.
fn bare_work(body: &[u8]) -> Vec<u8> {
    #[derive(serde::Deserialize)]
    struct Args {
        name: String,
    }
    let args: Args = serde_json::from_slice(body).expect("valid body");
    let message = format!("Hello, {}!", args.name);
    serde_json::to_vec(&json!({"result": {"message": message}})).expect("serializable")
}

fn engine_post(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("engine");
    g.bench_function("bare_work", |b| b.iter(|| bare_work(black_box(BODY))));
    g.bench_function("block_on_ready", |b| {
        b.iter(|| rt.block_on(async { black_box(1) }))
    });
    for (label, timeout) in [
        ("post_hello_world/no_timeout", None),
        ("post_hello_world/1s_timeout", Some(Duration::from_secs(1))),
    ] {
        let engine = engine_with("conformance", toolkit(timeout));
        let head = post("/atp/conformance/hello_world/");
        let check = rt.block_on(engine.handle(&head, BODY));
        assert_eq!(check.status(), 200, "{check:?}");
        g.bench_function(label, |b| {
            b.iter(|| rt.block_on(engine.handle(black_box(&head), black_box(BODY))))
        });
    }
    let engine = engine_with("conformance", toolkit(None));
    let head = post("/atp/conformance/hello_world/");
    g.bench_function("begin_only", |b| {
        b.iter(|| match engine.begin(black_box(&head)) {
            Step::ReadBody(p) => black_box(p.limit()),
            Step::Respond(r) => black_box(r.status() as usize),
        })
    });
    g.finish();
}

fn blocking_call(c: &mut Criterion) {
    let mut g = c.benchmark_group("call");
    let engine = engine_with("conformance", toolkit(None));
    let rt = runtime();
    for tool in ["hello_world", "hello_blocking"] {
        let path = format!("/atp/conformance/{tool}/");
        let head = post(&path);
        let check = rt.block_on(engine.handle(&head, BODY));
        assert_eq!(check.status(), 200, "{check:?}");
        g.bench_function(BenchmarkId::new("current_thread", tool), |b| {
            b.iter(|| rt.block_on(engine.handle(black_box(&head), black_box(BODY))))
        });
    }
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .expect("a runtime");
    let head = post("/atp/conformance/hello_blocking/");
    g.bench_function(BenchmarkId::new("multi_thread", "hello_blocking"), |b| {
        b.iter(|| mt.block_on(engine.handle(black_box(&head), black_box(BODY))))
    });
    g.finish();
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    for n in [1usize, 1_000, 100_000] {
        let registry = Registry::new();
        for i in 0..n {
            let client = ToolKitClient::new("key", "app");
            client
                .register_tool(hello_tool("hello_world"), hello_world)
                .expect("valid tool");
            registry
                .register_client(format!("kit_{i:06}"), client)
                .expect("valid toolkit");
        }
        // The same toolkit every time, as a server answering one client.
        let name = format!("kit_{:06}", n / 2);
        g.bench_with_input(BenchmarkId::new("get_client", n), &name, |b, name| {
            b.iter(|| registry.get_client(black_box(name)))
        });
        // A different toolkit each time, over up to 4,096 of them.
        let names: Vec<String> = (0..n.min(4096))
            .map(|i| format!("kit_{:06}", i * (n / n.min(4096))))
            .collect();
        g.bench_with_input(
            BenchmarkId::new("get_client_rotating", n),
            &names,
            |b, names| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % names.len();
                    registry.get_client(black_box(&names[i]))
                })
            },
        );
        // The engine's whole head check: path, toolkit, tool, media.
        let engine = Engine::with_registry(registry.clone());
        let path = format!("/atp/{name}/hello_world/");
        let head = post(&path);
        g.bench_with_input(BenchmarkId::new("engine_begin", n), &head, |b, head| {
            b.iter(|| match engine.begin(black_box(head)) {
                Step::ReadBody(p) => black_box(p.limit()),
                Step::Respond(r) => black_box(r.status() as usize),
            })
        });
    }
    g.finish();
}

fn schemas(c: &mut Criterion) {
    let mut g = c.benchmark_group("schema_100_tools");
    let client = ToolKitClient::new("key", "Big");
    for i in 0..100 {
        client
            .register_tool(
                Tool::new(format!("tool_{i}"))
                    .description("Does one thing with three inputs.")
                    .params(["name", "count", "flag"])
                    .required_params(["name"])
                    .param_schema("count", json!({"type": "integer", "minimum": 0}))
                    .param_schema("flag", json!({"type": "boolean"})),
                hello_world,
            )
            .expect("valid tool");
    }
    for (label, provider, strict) in [
        ("openai", Provider::OpenAi, false),
        ("openai_strict", Provider::OpenAi, true),
        ("openai_chat", Provider::OpenAiChat, false),
        ("anthropic", Provider::Anthropic, false),
        ("mistral", Provider::Mistral, false),
    ] {
        g.bench_function(label, |b| {
            b.iter(|| client.tool_schemas(black_box(provider), black_box(strict)))
        });
    }
    // The whole `GET /atp/big/?provider=openai`, serialized.
    let engine = engine_with("big", client);
    let rt = runtime();
    let head = RequestHead {
        method: "GET",
        path: "/atp/big/",
        query: Some("provider=openai"),
        content_type: None,
        content_length: None,
        ..RequestHead::default()
    };
    g.bench_function("http_get_provider_openai", |b| {
        b.iter(|| rt.block_on(engine.handle(black_box(&head), b"")))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = engine_post, blocking_call, lookup, schemas
}
criterion_main!(benches);
