//! Through `atp-server`: LLM-side client → server → WebSocket toolkit →
//! back, at several concurrencies; and the memory a connected toolkit
//! costs. `cargo run --release -p atp-bench --bin atp-bench-server`.
//!
//! Everything runs in this one process (the server, the toolkit runtime and
//! the LLM client share the machine's two cores), so the calls/s are those
//! of the whole loop, and the memory per toolkit counts both ends of its
//! WebSocket.

use std::time::{Duration, Instant};

use atp_registry::{
    Call, Tool, ToolError, ToolKitClient,
    llm::{LlmClient, LlmProtocol},
    runtime::RuntimeOptions,
};
use atp_server::{AtpServer, Config, DbLocation};
use clap::Parser;
use serde_json::json;

/// Options.
#[derive(Parser, Debug)]
struct Args {
    /// Concurrent calls, comma-separated.
    #[arg(long, default_value = "1,64,512", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Seconds measured per concurrency.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of warm-up per concurrency.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// How many toolkits to connect for the memory figure.
    #[arg(long, default_value_t = 200)]
    toolkits: usize,
    /// Protocol of the LLM client: ws or http.
    #[arg(long, default_value = "ws")]
    protocol: String,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some(after) = stat.rsplit_once(") ").map(|(_, a)| a) else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line (11 and 12 here).
    (ticks(11) + ticks(12)) / 100.0
}

fn toolkit(app: &str, base: &str) -> Result<ToolKitClient, Box<dyn std::error::Error>> {
    // A toolkit API key belongs to one toolkit on the server.
    let client = ToolKitClient::new(format!("key-{app}"), app)
        .with_base_url(base)
        .with_runtime_options(
            RuntimeOptions::default()
                .handle_ctrl_c(false)
                .max_concurrency(1024),
        );
    client.register_tool(
        Tool::new("hello_world")
            .params(["name"])
            .required_params(["name"]),
        |call: Call| async move {
            let name = call.str("name").unwrap_or("World").to_owned();
            Ok::<_, ToolError>(json!({"message": format!("Hello, {name}!")}))
        },
    )?;
    Ok(client)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

async fn run(llm: &LlmClient, concurrency: usize, seconds: f64) -> (usize, Vec<Duration>, usize) {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let call =
        json!({"type": "tool_use", "id": "t", "name": "hello_world", "input": {"name": "Ada"}});
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (llm, call) = (llm.clone(), call.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut failed = 0usize;
            // Bounded in time and in count.
            while Instant::now() < deadline && lat.len() < 5_000_000 {
                let t0 = Instant::now();
                match llm.call_tool("Bench", &call, "anthropic", "").await {
                    Ok(m) if m[0]["content"][0]["content"] == "{\"message\":\"Hello, Ada!\"}" => {
                        lat.push(t0.elapsed())
                    }
                    _ => failed += 1,
                }
            }
            (lat, failed)
        }));
    }
    let mut all = Vec::new();
    let mut failed = 0;
    for t in tasks {
        if let Ok((lat, f)) = t.await {
            all.extend(lat);
            failed += f;
        }
    }
    all.sort();
    (all.len(), all, failed)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let protocol = match args.protocol.as_str() {
        "http" => LlmProtocol::Http,
        _ => LlmProtocol::WebSocket,
    };
    let server = AtpServer::open(Config::dev().with_db(DbLocation::Memory))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener).await });

    let tk = toolkit("Bench", &base)?;
    let runtime = {
        let tk = tk.clone();
        tokio::spawn(async move { tk.start().await })
    };
    if !server
        .wait_until_served("Bench", Duration::from_secs(10))
        .await
    {
        return Err("the toolkit did not connect".into());
    }
    let llm = LlmClient::new("bench-key")
        .with_base_url(&base)
        .with_protocol(protocol)
        .with_timeout(Duration::from_secs(30));

    println!(
        "## Through atp-server ({} LLM client, one process, 2 worker threads)\n",
        args.protocol
    );
    println!("| concurrent calls | calls/s | p50 ms | p99 ms | CPU µs/call | failed |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &c in &args.concurrency {
        run(&llm, c, args.warmup).await;
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        let (n, lat, failed) = run(&llm, c, args.duration).await;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        println!(
            "| {c} | {:.0} | {:.3} | {:.3} | {:.1} | {failed} |",
            n as f64 / wall,
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            cpu / n.max(1) as f64 * 1e6,
        );
    }

    // Memory per connected toolkit (both ends of its WebSocket).
    let before = rss_kib();
    let mut kits = Vec::new();
    for i in 0..args.toolkits {
        let app = format!("mem{i}");
        let tk = toolkit(&app, &base)?;
        let handle = {
            let tk = tk.clone();
            tokio::spawn(async move { tk.start().await })
        };
        kits.push((app, tk, handle));
    }
    for (app, _, _) in &kits {
        if !server.wait_until_served(app, Duration::from_secs(30)).await {
            return Err(format!("toolkit {app} did not connect").into());
        }
    }
    let after = rss_kib();
    println!(
        "\nMemory: {} toolkits connected, RSS {} → {} KiB: {:.1} KiB per connected toolkit (server and runtime ends together)",
        args.toolkits,
        before,
        after,
        (after.saturating_sub(before)) as f64 / args.toolkits.max(1) as f64
    );
    for (_, tk, _) in &kits {
        tk.stop();
    }
    for (_, _, h) in kits {
        let _ = h.await;
    }
    tk.stop();
    let _ = runtime.await;
    server.shutdown();
    Ok(())
}
