//! `soak`: a long mixed run against one adapter or `atp-server`, each in a
//! child process of its own whose RSS is sampled; prints a Markdown report
//! and exits non-zero when any answer was unexpected or lost.
//!
//! ```sh
//! cargo run --release -p atp-reliability --bin soak -- --target axum --requests 1000000
//! cargo run --release -p atp-reliability --bin soak -- --target server --requests 300000 --ws-clients 4
//! ```

use std::{
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use atp_registry::llm::{LlmClient, LlmProtocol};
use atp_reliability::{
    node::{self, Node},
    soak::{self, SoakOptions},
};
use clap::Parser;
use serde_json::json;

/// A long mixed run of valid and invalid requests against one ATP server.
#[derive(Debug, Parser)]
#[command(name = "soak")]
struct Cli {
    /// axum, actix, rocket or server.
    #[arg(long)]
    target: String,
    /// How many requests in all.
    #[arg(long, default_value_t = 1_000_000)]
    requests: u64,
    /// How many kept-alive connections send at once.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Stop early after this many seconds.
    #[arg(long, default_value_t = 3600)]
    max_seconds: u64,
    /// Sample the server's RSS every this many seconds.
    #[arg(long, default_value_t = 5)]
    sample_seconds: u64,
    /// With `--target server`: also this many LlmClient WebSocket callers,
    /// calling in a loop while the HTTP requests run.
    #[arg(long, default_value_t = 0)]
    ws_clients: usize,
}

fn main() -> ExitCode {
    // `soak node …` is a node process (the server under test), started by
    // the soak itself so that one `cargo run` builds everything it needs.
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("node") {
        return atp_reliability::node_cli::main(args.skip(1));
    }
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(soak_main()),
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `current_exe node ARGS…`: this binary as a node process.
fn node_args(args: Vec<String>) -> Vec<String> {
    std::iter::once("node".to_owned()).chain(args).collect()
}

async fn soak_main() -> ExitCode {
    let cli = Cli::parse();
    let opts = SoakOptions {
        requests: cli.requests,
        connections: cli.connections,
        max_time: Duration::from_secs(cli.max_seconds),
        sample_every: Duration::from_secs(cli.sample_seconds.max(1)),
    };
    let binary = match std::env::current_exe() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match cli.target.as_str() {
        "axum" | "actix" | "rocket" => adapter(&binary, &cli.target, opts).await,
        "server" => server(&binary, opts, cli.ws_clients).await,
        other => Err(format!(
            "unknown target {other:?}: use axum, actix, rocket or server"
        )),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn adapter(
    binary: &std::path::Path,
    framework: &str,
    opts: SoakOptions,
) -> Result<bool, String> {
    let child = Node::start(binary, &node_args(node::adapter_args(framework)))
        .await
        .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    let report = soak::run(child.addr(), soak::adapter_mix(), opts, child.pid()).await;
    println!(
        "{}",
        report.to_markdown(&format!("{framework}: the conformance fixture"))
    );
    Ok(report.clean())
}

async fn server(
    binary: &std::path::Path,
    opts: SoakOptions,
    ws_clients: usize,
) -> Result<bool, String> {
    let dir = std::env::temp_dir().join(format!("atp-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let db = dir.join("soak.sqlite3");
    let child = Node::start(
        binary,
        &node_args(node::server_args(
            "127.0.0.1:0",
            &db,
            soak::SERVER_TOOLKIT_KEY,
            soak::SERVER_LLM_KEY,
            10_000,
        )),
    )
    .await
    .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    let toolkit = node::test_toolkit(soak::SERVER_TOOLKIT_KEY, soak::SERVER_APP, &child.url())
        .with_runtime_options(node::test_runtime_options());
    let runtime = {
        let toolkit = toolkit.clone();
        std::thread::spawn(move || toolkit.start_blocking())
    };
    let http = LlmClient::new(soak::SERVER_LLM_KEY)
        .with_base_url(child.url())
        .with_protocol(LlmProtocol::Http)
        .with_timeout(Duration::from_secs(10));
    let call = json!({"type": "tool_use", "id": "t0", "name": "echo", "input": {"text": "up"}});
    let mut up = false;
    for _ in 0..300 {
        if let Ok(out) = http
            .call_tool(soak::SERVER_APP, &call, "anthropic", "")
            .await
            && serde_json::Value::Array(out).to_string().contains("echo")
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !up {
        return Err("the toolkit never got served".into());
    }
    let done = Arc::new(AtomicBool::new(false));
    let ws_ok = Arc::new(AtomicU64::new(0));
    let ws_bad = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for n in 0..ws_clients {
        let llm = LlmClient::new(soak::SERVER_LLM_KEY)
            .with_base_url(child.url())
            .with_protocol(LlmProtocol::WebSocket)
            .with_timeout(Duration::from_secs(10));
        let (done, ok, bad) = (done.clone(), ws_ok.clone(), ws_bad.clone());
        callers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !done.load(Ordering::SeqCst) {
                i += 1;
                let text = format!("w{n}-{i}");
                let call = json!([
                    {"type": "tool_use", "id": format!("a{i}"), "name": "echo", "input": {"text": text}},
                    {"type": "tool_use", "id": format!("b{i}"), "name": "fails", "input": {}}
                ]);
                let good = match llm.call_tool(soak::SERVER_APP, &call, "anthropic", "").await {
                    Ok(out) => {
                        let blocks = &out[0]["content"];
                        blocks[0]["content"] == json!(format!(r#"{{"echo":"{text}"}}"#))
                            && blocks[1]["is_error"] == json!(true)
                            && blocks[1]["content"] == json!("it failed")
                    }
                    Err(_) => false,
                };
                if good { &ok } else { &bad }.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let report = soak::run(child.addr(), soak::server_mix(), opts, child.pid()).await;
    done.store(true, Ordering::SeqCst);
    for c in callers {
        let _ = c.await;
    }
    toolkit.stop();
    let _ = tokio::task::spawn_blocking(move || runtime.join()).await;
    println!(
        "{}",
        report.to_markdown("atp-server: calls through a WebSocket toolkit")
    );
    let (ok, bad) = (ws_ok.load(Ordering::SeqCst), ws_bad.load(Ordering::SeqCst));
    if ws_clients > 0 {
        println!(
            "- LlmClient WebSocket callers: {ws_clients}, {ok} two-call turns right, {bad} wrong or failed"
        );
    }
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report.clean() && bad == 0)
}
