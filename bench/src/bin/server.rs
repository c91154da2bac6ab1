//! Through `atp-server`: LLM-side client → server → WebSocket toolkit →
//! back, at several concurrencies; and the memory a connected toolkit
//! costs the server. `cargo run --release -p atp-bench --bin atp-bench-server`.
//!
//! The server runs in a process of its own, pinned to CPU 0 (this binary,
//! started again with the hidden `--serve`); the toolkit runtime
//! (`ToolKitClient::start`) and the `LlmClient` run in this process, pinned
//! to the last CPU. CPU time is read per process from `/proc`, so the
//! server's cost per call is reported apart from the two clients'.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Stdio},
    time::{Duration, Instant},
};

use atp_registry::{
    Call, Tool, ToolError, ToolKitClient,
    llm::{LlmClient, LlmProtocol},
    runtime::RuntimeOptions,
};
use atp_server::{AtpServer, Config, DbLocation};
use clap::Parser;
use serde_json::json;

#[allow(dead_code)]
#[path = "../procfs.rs"]
mod procfs;

use procfs::{CpuTimes, Pinning};

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
    /// Runs per concurrency; the table shows the run with the median calls/s.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// How many toolkits to connect for the memory figure.
    #[arg(long, default_value_t = 200)]
    toolkits: usize,
    /// Protocol of the LLM client: ws or http.
    #[arg(long, default_value = "ws")]
    protocol: String,
    /// Worker threads of the server (default: 1 when pinned, else 2).
    #[arg(long)]
    server_threads: Option<usize>,
    /// Worker threads of the client process (default: 1 when pinned, else 2).
    #[arg(long)]
    client_threads: Option<usize>,
    /// Do not pin the server and the clients to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Internal: be the server process (prints its address, serves until
    /// standard input closes, answers `wait APP` lines).
    #[arg(long, hide = true)]
    serve: bool,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.serve {
        return serve(args.server_threads.unwrap_or(1));
    }
    // Pin before any thread starts, so that every later thread inherits it.
    let pinning = Pinning::setup(!args.no_pin);
    let threads = |n: Option<usize>| n.unwrap_or(if pinning.server_cpu.is_some() { 1 } else { 2 });
    let server_threads = threads(args.server_threads);
    let client_threads = threads(args.client_threads);
    let exe = std::env::current_exe()?;
    let mut cmd = pinning.command(&exe.to_string_lossy());
    cmd.args(["--serve", "--server-threads", &server_threads.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let server = ServerProcess::spawn(cmd)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads)
        .enable_all()
        .build()?
        .block_on(drive(
            args,
            server,
            &pinning,
            server_threads,
            client_threads,
        ))
}

/// The server process: `AtpServer` in dev mode, in memory.
fn serve(threads: usize) -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async {
        let server = AtpServer::open(Config::dev().with_db(DbLocation::Memory))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening on http://{}", listener.local_addr()?);
        std::io::stdout().flush()?;
        let serving = server.clone();
        tokio::spawn(async move { serving.serve(listener).await });
        // Commands on standard input; its end is the end of the server.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        while let Some(line) = rx.recv().await {
            if let Some(app) = line.strip_prefix("wait ") {
                let ok = server.wait_until_served(app, Duration::from_secs(60)).await;
                println!("{} {app}", if ok { "served" } else { "missing" });
                std::io::stdout().flush()?;
            }
        }
        server.shutdown();
        Ok(())
    })
}

/// The server child, killed when dropped.
struct ServerProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    base: String,
}

impl ServerProcess {
    fn spawn(mut cmd: std::process::Command) -> Result<Self, Box<dyn std::error::Error>> {
        let mut child = cmd.spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("the server's pipes are missing".into());
        };
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let Some(base) = line.trim().strip_prefix("listening on ") else {
            return Err(format!("the server did not start: {line:?}").into());
        };
        let base = base.to_owned();
        Ok(Self {
            child,
            stdin,
            stdout,
            base,
        })
    }

    /// The pid of the process doing the work (`taskset` execs into it).
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the server has a live connection serving `app`.
    fn wait_served(&mut self, app: &str) -> Result<(), Box<dyn std::error::Error>> {
        writeln!(self.stdin, "wait {app}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.trim() == format!("served {app}") {
            Ok(())
        } else {
            Err(format!("toolkit {app} did not connect: {line:?}").into())
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// One measured run.
struct Run {
    calls: usize,
    wall: f64,
    latencies: Vec<Duration>,
    failed: usize,
    server: CpuTimes,
    clients: Duration,
}

impl Run {
    fn per_second(&self) -> f64 {
        self.calls as f64 / self.wall
    }
    fn per_call_us(&self, d: Duration) -> f64 {
        d.as_secs_f64() / self.calls.max(1) as f64 * 1e6
    }
}

async fn calls(llm: &LlmClient, concurrency: usize, seconds: f64) -> (Vec<Duration>, usize) {
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
        match t.await {
            Ok((lat, f)) => {
                all.extend(lat);
                failed += f;
            }
            Err(_) => failed += 1,
        }
    }
    all.sort();
    (all, failed)
}

async fn measure(llm: &LlmClient, server_pid: u32, concurrency: usize, seconds: f64) -> Run {
    let server0 = procfs::tree_cpu_times(server_pid);
    let clients0 = procfs::self_cpu_time();
    let t0 = Instant::now();
    let (latencies, failed) = calls(llm, concurrency, seconds).await;
    let wall = t0.elapsed().as_secs_f64();
    Run {
        calls: latencies.len(),
        wall,
        latencies,
        failed,
        server: procfs::tree_cpu_times(server_pid).since(server0),
        clients: procfs::self_cpu_time().saturating_sub(clients0),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

async fn drive(
    args: Args,
    mut server: ServerProcess,
    pinning: &Pinning,
    server_threads: usize,
    client_threads: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let protocol = match args.protocol.as_str() {
        "http" => LlmProtocol::Http,
        "ws" => LlmProtocol::WebSocket,
        other => return Err(format!("--protocol is ws or http, not {other:?}").into()),
    };
    let base = server.base.clone();
    let pid = server.pid();

    let tk = toolkit("Bench", &base)?;
    let runtime = {
        let tk = tk.clone();
        tokio::spawn(async move { tk.start().await })
    };
    server.wait_served("Bench")?;
    let llm = LlmClient::new("bench-key")
        .with_base_url(&base)
        .with_protocol(protocol)
        .with_timeout(Duration::from_secs(30));

    println!(
        "## Through atp-server ({} LLM client)\n\n\
         Server: its own process, {server_threads} worker thread(s). Toolkit runtime and \
         LLM client: one process, {client_threads} worker thread(s). {}. \
         Load average before: {}. {} s measured per run after {} s of warm-up; \
         the run with the median calls/s of {} is shown.\n",
        args.protocol,
        pinning.describe(),
        load_average(),
        args.duration,
        args.warmup,
        args.repeat.max(1),
    );
    println!(
        "| concurrent calls | calls/s | p50 ms | p99 ms | server CPU µs/call | user | kernel | toolkit + LLM client CPU µs/call | failed |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &c in &args.concurrency {
        calls(&llm, c, args.warmup).await;
        let mut runs = Vec::new();
        for _ in 0..args.repeat.max(1) {
            runs.push(measure(&llm, pid, c, args.duration).await);
        }
        runs.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
        let failed: usize = runs.iter().map(|r| r.failed).sum();
        let r = &runs[runs.len() / 2];
        println!(
            "| {c} | {:.0} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} | {:.1} | {failed} |",
            r.per_second(),
            percentile(&r.latencies, 0.50),
            percentile(&r.latencies, 0.99),
            r.per_call_us(r.server.total()),
            r.per_call_us(r.server.user),
            r.per_call_us(r.server.system),
            r.per_call_us(r.clients),
        );
    }

    // Memory per connected toolkit, in the server process alone.
    let server_before = procfs::tree_rss(pid);
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
        server.wait_served(app)?;
    }
    let server_after = procfs::tree_rss(pid);
    println!(
        "\nMemory: {} more toolkits connected. Server RSS {:.1} → {:.1} MiB: {:.1} KiB per \
         connected toolkit.",
        args.toolkits,
        server_before as f64 / 1048576.0,
        server_after as f64 / 1048576.0,
        server_after.saturating_sub(server_before) as f64 / 1024.0 / args.toolkits.max(1) as f64,
    );
    for (_, tk, _) in &kits {
        tk.stop();
    }
    for (_, _, h) in kits {
        let _ = h.await;
    }
    tk.stop();
    let _ = runtime.await;
    drop(server);
    Ok(())
}
