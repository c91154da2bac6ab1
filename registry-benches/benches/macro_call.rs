//! Criterion benchmarks of a call to a tool registered with `#[tool]`
//! against the same tool registered with the builder, in one run: the
//! untyped builder (`register_tool`, the handler reads `call.str`), the
//! typed builder (`register_typed_tool`, a `Deserialize` struct) and the
//! macro (`#[tool] async fn hello_world(name: String)`), each called
//! directly (`call_tool_by_name`) and through the engine
//! (`POST /atp/bench/hello_world/`); the same for a two-integer `add`
//! and for a blocking handler.
//!
//! Run: `cargo bench -p atp-registry-benches --bench macro_call` (see
//! `docs/BENCHMARKS.md`, "Macro and builder").
//!
//! Instructions per call, which the load of a shared machine does not
//! change: `ATP_MACRO_CALLS=FORM/TOOL/N` makes the binary send N `POST`s
//! of TOOL to toolkit FORM through the engine and exit, in `calls`, for
//! callgrind to count:
//!
//! ```sh
//! ATP_MACRO_CALLS=macro/hello_world/20000 valgrind --tool=callgrind \
//!   --toggle-collect='*macro_call::calls*' target/release/deps/macro_call-HASH
//! ```

use std::{hint::black_box, time::Duration};

use atp_registry::{
    Call, Engine, Registry, Tool, ToolError, ToolKitClient, http::RequestHead, schemars, tool,
};
use criterion::{BenchmarkId, Criterion, criterion_group};
use serde_json::{Value, json};

const HELLO: &[u8] = br#"{"name": "World"}"#;
const ADD: &[u8] = br#"{"a": 2, "b": 3}"#;

/// Returns a greeting.
#[tool]
async fn hello_world(name: String) -> Value {
    json!({"message": format!("Hello, {name}!")})
}

/// Adds two integers.
#[tool]
async fn add(a: i64, b: i64) -> Result<Value, ToolError> {
    a.checked_add(b)
        .map(|sum| json!({"sum": sum}))
        .ok_or_else(|| ToolError::new("the sum overflows"))
}

/// Returns a greeting, from the blocking pool.
#[tool(name = "hello_blocking")]
fn hello_blocking_fn(name: String) -> Value {
    json!({"message": format!("Hello, {name}!")})
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct HelloArgs {
    name: String,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct AddArgs {
    a: i64,
    b: i64,
}

fn hello_tool(name: &str) -> Tool {
    Tool::new(name)
        .description("Returns a greeting.")
        .params(["name"])
        .required_params(["name"])
}

/// The three forms of each tool, as three toolkits.
fn toolkits() -> [(&'static str, ToolKitClient); 3] {
    let builder = ToolKitClient::new("key", "bench");
    builder
        .register_tool(hello_tool("hello_world"), |call: Call| async move {
            let name = call.str("name").unwrap_or_default();
            Ok::<_, ToolError>(json!({"message": format!("Hello, {name}!")}))
        })
        .expect("valid");
    builder
        .register_tool(
            Tool::new("add")
                .params(["a", "b"])
                .required_params(["a", "b"]),
            |call: Call| async move {
                let int = |p| call.param(p).and_then(Value::as_i64).unwrap_or_default();
                int("a")
                    .checked_add(int("b"))
                    .map(|sum| json!({"sum": sum}))
                    .ok_or_else(|| ToolError::new("the sum overflows"))
            },
        )
        .expect("valid");
    builder
        .register_blocking_tool(hello_tool("hello_blocking"), |call: Call| {
            let name = call.str("name").unwrap_or_default();
            Ok::<_, ToolError>(json!({"message": format!("Hello, {name}!")}))
        })
        .expect("valid");

    let typed = ToolKitClient::new("key", "bench");
    typed
        .register_typed_tool(
            Tool::new("hello_world"),
            |args: HelloArgs, _token| async move {
                Ok::<_, ToolError>(json!({"message": format!("Hello, {}!", args.name)}))
            },
        )
        .expect("valid");
    typed
        .register_typed_tool(Tool::new("add"), |args: AddArgs, _token| async move {
            args.a
                .checked_add(args.b)
                .map(|sum| json!({"sum": sum}))
                .ok_or_else(|| ToolError::new("the sum overflows"))
        })
        .expect("valid");

    let by_macro = ToolKitClient::new("key", "bench");
    by_macro
        .register_all([hello_world::tool(), add::tool(), hello_blocking_fn::tool()])
        .expect("valid");
    [
        ("builder", builder),
        ("builder_typed", typed),
        ("macro", by_macro),
    ]
}

fn post<'a>(path: &'a str, body: &[u8]) -> RequestHead<'a> {
    RequestHead {
        method: "POST",
        path,
        query: None,
        content_type: Some(b"application/json"),
        content_length: Some(body.len() as u64),
        ..RequestHead::default()
    }
}

fn macro_vs_builder(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let mut g = c.benchmark_group("macro");
    let forms: Vec<(&str, ToolKitClient, Engine)> = toolkits()
        .into_iter()
        .map(|(form, client)| {
            let registry = Registry::new();
            registry
                .register_client("bench", client.clone())
                .expect("valid toolkit");
            (form, client, Engine::with_registry(registry))
        })
        .collect();
    // Tool by tool, the forms one after the other: what disturbs the
    // machine disturbs the three alike.
    for (tool, body, expected) in [
        ("hello_world", HELLO, json!({"message": "Hello, World!"})),
        ("add", ADD, json!({"sum": 5})),
        ("hello_blocking", HELLO, json!({"message": "Hello, World!"})),
    ] {
        let params: Value = serde_json::from_slice(body).expect("JSON");
        let path = format!("/atp/bench/{tool}/");
        let head = post(&path, body);
        for (form, client, engine) in &forms {
            if client.tool(tool).is_none() {
                continue;
            }
            let out = rt.block_on(client.call_tool_by_name(tool, params.clone(), None));
            assert_eq!(out, Ok(expected.clone()), "{form} {tool}");
            assert_eq!(rt.block_on(engine.handle(&head, body)).status(), 200);
            if tool != "hello_blocking" {
                g.bench_function(BenchmarkId::new(format!("call/{tool}"), form), |b| {
                    b.iter(|| {
                        rt.block_on(client.call_tool_by_name(
                            black_box(tool),
                            black_box(params.clone()),
                            None,
                        ))
                    })
                });
            }
            g.bench_function(BenchmarkId::new(format!("post/{tool}"), form), |b| {
                b.iter(|| rt.block_on(engine.handle(black_box(&head), black_box(body))))
            });
        }
    }
    g.finish();
}

/// `n` `POST`s of `body` to `head` through `engine`: what callgrind
/// counts (`--toggle-collect='*macro_call::calls*'`).
#[inline(never)]
fn calls(
    rt: &tokio::runtime::Runtime,
    engine: &Engine,
    head: &RequestHead<'_>,
    body: &[u8],
    n: u64,
) {
    for _ in 0..n {
        black_box(rt.block_on(engine.handle(black_box(head), black_box(body))));
    }
}

/// `ATP_MACRO_CALLS=FORM/TOOL/N`: see the crate doc.
fn count_calls(spec: &str) -> Result<(), String> {
    let usage = || format!("ATP_MACRO_CALLS={spec:?}: expected FORM/TOOL/N");
    let mut parts = spec.split('/');
    let (Some(form), Some(tool), Some(n), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(usage());
    };
    let n: u64 = n.parse().map_err(|_| usage())?;
    let client = toolkits()
        .into_iter()
        .find(|(f, _)| *f == form)
        .map(|(_, client)| client)
        .ok_or_else(|| format!("no form {form:?}: builder, builder_typed or macro"))?;
    let registry = Registry::new();
    registry
        .register_client("bench", client)
        .map_err(|e| e.to_string())?;
    let engine = Engine::with_registry(registry);
    let body = if tool == "add" { ADD } else { HELLO };
    let path = format!("/atp/bench/{tool}/");
    let head = post(&path, body);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| e.to_string())?;
    // Once outside the count: first-call allocations, lazy statics.
    let status = rt.block_on(engine.handle(&head, body)).status();
    if status != 200 {
        return Err(format!("{form} {tool}: status {status}"));
    }
    calls(&rt, &engine, &head, body, n);
    Ok(())
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = macro_vs_builder
}

fn main() {
    if let Ok(spec) = std::env::var("ATP_MACRO_CALLS") {
        if let Err(e) = count_calls(&spec) {
            eprintln!("{e}");
            std::process::exit(2);
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
