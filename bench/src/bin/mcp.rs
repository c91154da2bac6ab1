//! An MCP `tools/call` through atp-axum (`POST /mcp/{toolkit}`) against
//! rmcp's own Streamable HTTP server (`bench/rmcp-baseline`), in one run,
//! with the ATP `POST /atp/demo/hello_world/` through atp-axum as a
//! reference row. `cargo run --release -p atp-bench --bin atp-bench-mcp --
//! --rmcp-bin /tmp/rmcp-baseline-target/release/rmcp-baseline`.
//!
//! Both servers run as processes of their own, pinned to CPU 0 (atp-axum
//! is this binary started again with the hidden `--serve-atp`); the load
//! generator runs in this process, pinned to the last CPU. Each target is
//! driven over the same number of keep-alive HTTP/1.1 connections, in
//! turn (A B C, A B C, …); every answer is checked (status 200 and the
//! expected greeting), and the servers' CPU time is read from `/proc`.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Stdio},
    rc::Rc,
    time::{Duration, Instant},
};

use atp_registry::{Call, Engine, Registry, Tool, ToolKitClient};
use bytes::{Buf, BytesMut};
use clap::Parser;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[allow(dead_code)]
#[path = "../procfs.rs"]
mod procfs;

use procfs::Pinning;

/// Options.
#[derive(Parser)]
#[command(name = "atp-bench-mcp")]
struct Cli {
    /// The rmcp baseline server (`bench/rmcp-baseline`, built on its own).
    #[arg(
        long,
        default_value = "/tmp/rmcp-baseline-target/release/rmcp-baseline"
    )]
    rmcp_bin: PathBuf,
    /// Concurrent keep-alive connections per run.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds measured per run.
    #[arg(long, default_value_t = 4.0)]
    duration: f64,
    /// Seconds of warm-up per run (same load, not recorded).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Rounds (each target once per round).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Worker threads of each server (1: both are pinned to one CPU).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Do not pin the servers and the load generator to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Internal: serve atp-axum on this address and stop there.
    #[arg(long, hide = true)]
    serve_atp: Option<SocketAddr>,
}

/// The toolkit both atp-axum rows call.
const TOOLKIT: &str = "demo";

/// The atp-axum server: one toolkit, `demo`, with `hello_world(name)`.
fn serve_atp(addr: SocketAddr, workers: usize) -> std::io::Result<()> {
    let registry = Registry::new();
    let client = ToolKitClient::new("demo-api-key", "demo");
    client
        .register_tool(
            Tool::new("hello_world")
                .description("Returns a greeting.")
                .params(["name"])
                .required_params(["name"]),
            |call: Call| async move {
                let name = match call.param("name") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                Ok::<_, String>(json!({"message": format!("Hello, {name}!")}))
            },
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    registry
        .register_client(TOOLKIT, client)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let engine = Engine::with_registry(registry);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app: axum::Router = atp_axum::Atp::from(engine).into();
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("listening on http://{}", listener.local_addr()?);
        axum::serve(listener, app).await
    })
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `program args…` through `pinning` and waits for its
/// `listening on http://ADDR` line.
fn start(pinning: &Pinning, program: &str, args: &[String]) -> Result<Server, String> {
    let mut cmd = pinning.command(program);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().map_err(|e| format!("start {program}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("{program}: {e}"))?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .map(|a| a.trim_start_matches("http://"))
        .and_then(|a| a.parse().ok());
    match addr {
        Some(addr) => Ok(Server { child, addr }),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("{program} said {line:?}, not `listening on ADDR`"))
        }
    }
}

/// What is measured: one server, one request.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    pid: u32,
    request: Vec<u8>,
    check: fn(&[u8]) -> bool,
}

const MCP_BODY: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"hello_world","arguments":{"name":"World"}}}"#;
const ATP_BODY: &str = r#"{"name": "World"}"#;
const GREETING: &str = "Hello, World!";

fn encode(addr: SocketAddr, path: &str, mcp: bool, body: &str) -> Vec<u8> {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    if mcp {
        out.push_str("Accept: application/json, text/event-stream\r\n");
        out.push_str("MCP-Protocol-Version: 2025-11-25\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// An MCP answer: a JSON-RPC result for id 1, not an error, whose
/// `structuredContent` (or text content) is the greeting.
fn check_mcp(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let result = &v["result"];
    if v["id"] != json!(1) || result["isError"] == json!(true) {
        return false;
    }
    result["structuredContent"]["message"] == json!(GREETING)
        || result["content"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains(GREETING))
}

/// An ATP answer: `{"result": {"message": "Hello, World!"}}`.
fn check_atp(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| v["result"]["message"] == json!(GREETING))
}

/// A keep-alive connection that reads whole answers (`Content-Length` or
/// chunked) and hands back the status and body.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    body: Vec<u8>,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

impl Conn {
    async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            body: Vec::with_capacity(1024),
        })
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        match self.stream.read_buf(&mut self.buf).await? {
            0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => Ok(()),
        }
    }

    /// Sends `request`; the answer's status, body in `self.body`.
    async fn send(&mut self, request: &[u8]) -> std::io::Result<u16> {
        self.stream.write_all(request).await?;
        let end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..end]).map_err(|_| bad("head"))?;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("status line"))?;
        let mut length = None;
        let mut chunked = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.trim().parse::<usize>().map_err(|_| bad("length"))?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
        self.buf.advance(end + 4);
        self.body.clear();
        if chunked {
            loop {
                let eol = loop {
                    if let Some(eol) = find(&self.buf, b"\r\n") {
                        break eol;
                    }
                    self.fill().await?;
                };
                let size = std::str::from_utf8(&self.buf[..eol])
                    .ok()
                    .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
                    .ok_or_else(|| bad("chunk size"))?;
                self.buf.advance(eol + 2);
                while self.buf.len() < size + 2 {
                    self.fill().await?;
                }
                self.body.extend_from_slice(&self.buf[..size]);
                self.buf.advance(size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            let n = length.ok_or_else(|| bad("no content-length"))?;
            while self.buf.len() < n {
                self.fill().await?;
            }
            self.body.extend_from_slice(&self.buf[..n]);
            self.buf.advance(n);
        }
        Ok(status)
    }
}

/// One run's measurements.
#[derive(Default, Clone)]
struct RunResult {
    ok: u64,
    failed: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    server_cpu: Duration,
}

struct Shared {
    addr: SocketAddr,
    request: Vec<u8>,
    check: fn(&[u8]) -> bool,
    measure_start: Instant,
    end: Instant,
}

#[derive(Default)]
struct WorkerOut {
    ok: u64,
    failed: u64,
    last: Option<Instant>,
    latencies_us: Vec<u32>,
}

async fn worker(shared: Rc<Shared>) -> WorkerOut {
    let mut out = WorkerOut::default();
    let mut conn: Option<Conn> = None;
    while Instant::now() < shared.end {
        let c = match &mut conn {
            Some(c) => c,
            None => match Conn::connect(shared.addr).await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    if Instant::now() >= shared.measure_start {
                        out.failed += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            },
        };
        let t0 = Instant::now();
        let answer = c.send(&shared.request).await;
        let t1 = Instant::now();
        let good = match answer {
            Ok(status) => status == 200 && (shared.check)(&c.body),
            Err(_) => {
                conn = None;
                false
            }
        };
        if t0 >= shared.measure_start {
            out.last = Some(t1);
            if good {
                out.ok += 1;
                out.latencies_us
                    .push((t1 - t0).as_micros().min(u32::MAX as u128) as u32);
            } else {
                out.failed += 1;
            }
        }
    }
    out
}

fn run(target: &Target, cli: &Cli) -> std::io::Result<RunResult> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    Ok(local.block_on(&rt, async {
        let start = Instant::now();
        let measure_start = start + Duration::from_secs_f64(cli.warmup);
        let end = measure_start + Duration::from_secs_f64(cli.duration);
        let shared = Rc::new(Shared {
            addr: target.addr,
            request: target.request.clone(),
            check: target.check,
            measure_start,
            end,
        });
        let workers: Vec<_> = (0..cli.connections.max(1))
            .map(|_| tokio::task::spawn_local(worker(shared.clone())))
            .collect();
        tokio::time::sleep_until(measure_start.into()).await;
        let before = procfs::tree_cpu_times(target.pid);
        let mut outs = Vec::new();
        for w in workers {
            outs.push(w.await.unwrap_or_default());
        }
        let server_cpu = procfs::tree_cpu_times(target.pid).since(before).total();
        let mut r = RunResult {
            server_cpu,
            ..RunResult::default()
        };
        let mut last = measure_start;
        for o in outs {
            r.ok += o.ok;
            r.failed += o.failed;
            last = last.max(o.last.unwrap_or(measure_start));
            r.latencies_us.extend(o.latencies_us);
        }
        r.elapsed = last - measure_start;
        r
    }))
}

fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1]) / 1000.0
}

/// One probe request, printed: the answer each target gives.
fn probe(target: &Target) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut conn = loop {
            match Conn::connect(target.addr).await {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => return Err(e.to_string()),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let status = conn
            .send(&target.request)
            .await
            .map_err(|e| e.to_string())?;
        let body = String::from_utf8_lossy(&conn.body).into_owned();
        eprintln!("{}: {status} {body}", target.name);
        if status == 200 && (target.check)(&conn.body) {
            Ok(())
        } else {
            Err(format!(
                "{}: unexpected answer {status} {body}",
                target.name
            ))
        }
    })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(addr) = cli.serve_atp {
        return match serve_atp(addr, cli.workers) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("serve: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    match bench(&cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atp-bench-mcp: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn bench(cli: &Cli) -> Result<(), String> {
    let pinning = Pinning::setup(!cli.no_pin);
    eprintln!("{}", pinning.describe());
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let workers = cli.workers.to_string();
    let atp = start(
        &pinning,
        &exe.to_string_lossy(),
        &[
            "--serve-atp".into(),
            "127.0.0.1:0".into(),
            "--workers".into(),
            workers.clone(),
        ],
    )?;
    let rmcp = start(
        &pinning,
        &cli.rmcp_bin.to_string_lossy(),
        &[
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--threads".into(),
            workers,
        ],
    )?;
    let targets = [
        Target {
            name: "atp-axum MCP `POST /mcp/demo`",
            addr: atp.addr,
            pid: atp.child.id(),
            request: encode(atp.addr, &format!("/mcp/{TOOLKIT}"), true, MCP_BODY),
            check: check_mcp,
        },
        Target {
            name: "rmcp `StreamableHttpService` (stateless, JSON)",
            addr: rmcp.addr,
            pid: rmcp.child.id(),
            request: encode(rmcp.addr, "/mcp", true, MCP_BODY),
            check: check_mcp,
        },
        Target {
            name: "atp-axum ATP `POST /atp/demo/hello_world/` (reference)",
            addr: atp.addr,
            pid: atp.child.id(),
            request: encode(
                atp.addr,
                &format!("/atp/{TOOLKIT}/hello_world/"),
                false,
                ATP_BODY,
            ),
            check: check_atp,
        },
    ];
    for t in &targets {
        probe(t)?;
    }
    let load_before = load_average();
    let mut results: Vec<Vec<RunResult>> = vec![Vec::new(); targets.len()];
    for round in 0..cli.repeats.max(1) {
        for (i, t) in targets.iter().enumerate() {
            let r = run(t, cli).map_err(|e| e.to_string())?;
            eprintln!(
                "round {}: {}: {} ok, {} failed, {:.0} req/s, {:.1} µs CPU/call",
                round + 1,
                t.name,
                r.ok,
                r.failed,
                r.ok as f64 / r.elapsed.as_secs_f64().max(1e-9),
                r.server_cpu.as_secs_f64() * 1e6 / (r.ok.max(1) as f64),
            );
            results[i].push(r);
        }
    }
    let load_after = load_average();

    // Pooled over the rounds: calls and time and CPU summed, latencies merged.
    let pooled: Vec<RunResult> = results
        .iter()
        .map(|runs| {
            let mut p = RunResult::default();
            for r in runs {
                p.ok += r.ok;
                p.failed += r.failed;
                p.elapsed += r.elapsed;
                p.server_cpu += r.server_cpu;
                p.latencies_us.extend_from_slice(&r.latencies_us);
            }
            p.latencies_us.sort_unstable();
            p
        })
        .collect();
    let per_cpu_s = |r: &RunResult| r.ok as f64 / r.server_cpu.as_secs_f64().max(1e-9);
    let rps = |r: &RunResult| r.ok as f64 / r.elapsed.as_secs_f64().max(1e-9);
    let cpu_us = |r: &RunResult| r.server_cpu.as_secs_f64() * 1e6 / (r.ok.max(1) as f64);
    let baseline = &pooled[1];

    println!(
        "- {} connections, {} s measured (+{} s warm-up) per run, {} rounds A B C; \
         {} server worker thread(s); {}",
        cli.connections,
        cli.duration,
        cli.warmup,
        cli.repeats.max(1),
        cli.workers,
        pinning.describe()
    );
    println!("- load average (1, 5, 15 min): {load_before} before, {load_after} after");
    println!();
    println!(
        "| server | req/s | p50 ms | p99 ms | server CPU µs/call | calls per CPU-second | \
         ÷ rmcp (calls/CPU-s) | failed |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (t, r) in targets.iter().zip(&pooled) {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.0} | {:.2}× | {} |",
            t.name,
            rps(r),
            percentile_ms(&r.latencies_us, 50.0),
            percentile_ms(&r.latencies_us, 99.0),
            cpu_us(r),
            per_cpu_s(r),
            per_cpu_s(r) / per_cpu_s(baseline),
            r.failed,
        );
    }
    println!();
    println!("Per round (req/s; server CPU µs/call):");
    println!();
    for (t, runs) in targets.iter().zip(&results) {
        let cells: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.0}; {:.1}", rps(r), cpu_us(r)))
            .collect();
        println!("- {}: {}", t.name, cells.join(" | "));
    }
    Ok(())
}
