//! Through `atp-server`: LLM-side client → server → WebSocket toolkit →
//! back, at several concurrencies; and the memory a connected toolkit
//! costs the server. `cargo run --release -p atp-bench --bin atp-bench-server`.
//!
//! The server runs in a process of its own, pinned to CPU 0 (this binary,
//! started again with the hidden `--serve`); the toolkit runtime
//! (`ToolKitClient::start`) and the `LlmClient` run in this process, pinned
//! to the last CPU. CPU time is read per process from `/proc`, so the
//! server's cost per call is reported apart from the two clients'.
//!
//! With `--instances N`: a throwaway PostgreSQL and NATS, then N server
//! processes sharing them (`AtpServer::connect`), all pinned with the
//! servers. The toolkit connects to instance 0; the LLM client's calls go
//! through instances 1..N-1 round robin (instance 0 when N = 1), so each
//! crosses NATS from the instance it enters to the one holding the
//! toolkit. NATS's and PostgreSQL's CPU time are reported apart.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Stdio},
    time::{Duration, Instant},
};

use atp_conformance::infra::{Nats, Postgres};
use atp_registry::{
    Call, Tool, ToolError, ToolKitClient,
    llm::{LlmClient, LlmProtocol},
    runtime::RuntimeOptions,
};
use atp_server::{AtpServer, Config, DbLocation, NatsUrl};
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
    /// Run N server processes sharing a throwaway PostgreSQL and NATS
    /// (the toolkit on instance 0, the calls through instances 1..N-1
    /// round robin; instance 0 when N = 1). Absent: one server, SQLite in
    /// memory, no NATS.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    instances: Option<u32>,
    /// Internal: be the server process (prints its address, serves until
    /// standard input closes, answers `wait APP` lines).
    #[arg(long, hide = true)]
    serve: bool,
    /// Internal, with `--serve`: the PostgreSQL database to connect to.
    #[arg(long, hide = true, requires = "nats_url")]
    db_url: Option<String>,
    /// Internal, with `--serve`: the NATS server to connect to.
    #[arg(long, hide = true, requires = "db_url")]
    nats_url: Option<String>,
}

/// The throwaway PostgreSQL and NATS of `--instances`, stopped when
/// dropped (after the servers: see `drive`).
struct Infra {
    pg: Postgres,
    nats: Nats,
    pg_pid: u32,
    nats_pid: u32,
}

impl Infra {
    /// Starts both and pins them (every process and thread) to the server
    /// CPU, if there is one.
    fn start(pinning: &Pinning) -> Result<Self, Box<dyn std::error::Error>> {
        let Some(pg) = Postgres::start() else {
            return Err(
                "--instances needs PostgreSQL (initdb and postgres on PATH or in \
                        /usr/lib/postgresql/*/bin): install the Debian package postgresql"
                    .into(),
            );
        };
        let Some(nats) = Nats::start() else {
            return Err(
                "--instances needs nats-server: install the Debian package nats-server".into(),
            );
        };
        let pg_pid = pg
            .pid()
            .ok_or("PostgreSQL's postmaster.pid is unreadable")?;
        let nats_pid = nats.pid().ok_or("nats-server is not running")?;
        if let Some(cpu) = pinning.server_cpu {
            // The postmaster and the children it has now; backends forked
            // later (the servers' connections) inherit its affinity.
            pin_tree(cpu, pg_pid)?;
            pin_tree(cpu, nats_pid)?;
        }
        Ok(Self {
            pg,
            nats,
            pg_pid,
            nats_pid,
        })
    }
}

/// `taskset -a -p -c CPU` on `pid` and each of its descendants.
fn pin_tree(cpu: usize, pid: u32) -> Result<(), Box<dyn std::error::Error>> {
    for p in procfs::process_tree(pid) {
        let status = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", &cpu.to_string(), &p.to_string()])
            .stdout(Stdio::null())
            .status()?;
        // A process may exit between the listing and the call.
        if !status.success() && std::path::Path::new(&format!("/proc/{p}")).exists() {
            return Err(format!("taskset -a -p -c {cpu} {p} failed: {status}").into());
        }
    }
    Ok(())
}

/// How the bench hands its server processes their shared secrets key.
const SECRETS_KEY_ENV: &str = "ATP_SECRETS_KEY";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.serve {
        let shared = args.db_url.clone().zip(args.nats_url.clone());
        return serve(args.server_threads.unwrap_or(1), shared);
    }
    // Pin before any thread starts, so that every later thread inherits it.
    let pinning = Pinning::setup(!args.no_pin);
    let threads = |n: Option<usize>| n.unwrap_or(if pinning.server_cpu.is_some() { 1 } else { 2 });
    let server_threads = threads(args.server_threads);
    let client_threads = threads(args.client_threads);
    let infra = match args.instances {
        Some(_) => Some(Infra::start(&pinning)?),
        None => None,
    };
    let exe = std::env::current_exe()?;
    // The instances share one secrets key (PostgreSQL needs one).
    let secrets_key = atp_server::SecretsKey::generate()?;
    let mut servers = Vec::new();
    // One after the other: each runs the migrations check before it listens.
    for _ in 0..args.instances.unwrap_or(1) {
        let mut cmd = pinning.command(&exe.to_string_lossy());
        cmd.args(["--serve", "--server-threads", &server_threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(infra) = &infra {
            cmd.args(["--db-url", &infra.pg.url, "--nats-url", &infra.nats.url])
                .env(SECRETS_KEY_ENV, secrets_key.expose());
        }
        servers.push(ServerProcess::spawn(cmd)?);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads)
        .enable_all()
        .build()?
        .block_on(drive(
            args,
            servers,
            infra,
            &pinning,
            server_threads,
            client_threads,
        ))
}

/// The server process: `AtpServer` in dev mode, in memory; or, given a
/// PostgreSQL and a NATS URL, in dev mode on those.
fn serve(
    threads: usize,
    shared: Option<(String, String)>,
) -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async {
        let server = match shared {
            None => AtpServer::open(Config::dev().with_db(DbLocation::Memory))?,
            Some((db, nats)) => {
                let mut config = Config::dev().with_db(DbLocation::Postgres(db));
                config.nats_url = Some(NatsUrl(nats));
                let key = std::env::var(SECRETS_KEY_ENV)
                    .map_err(|_| format!("{SECRETS_KEY_ENV} is not set"))?;
                config.secrets_keys = vec![atp_server::SecretsKey::parse(&key)?];
                AtpServer::connect(config).await?
            }
        };
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
    /// Each server process's CPU time (user + system), by instance.
    per_server: Vec<Duration>,
    nats: Duration,
    pg: Duration,
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

/// `concurrency` callers for `seconds`; caller `i` goes through
/// `llms[i % llms.len()]` (round robin over the instances).
async fn calls(llms: &[LlmClient], concurrency: usize, seconds: f64) -> (Vec<Duration>, usize) {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let call =
        json!({"type": "tool_use", "id": "t", "name": "hello_world", "input": {"name": "Ada"}});
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let (llm, call) = (llms[i % llms.len()].clone(), call.clone());
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

/// The processes whose CPU time is read around each run.
struct Pids {
    servers: Vec<u32>,
    nats: Option<u32>,
    pg: Option<u32>,
}

impl Pids {
    fn servers_cpu(&self) -> Vec<CpuTimes> {
        self.servers
            .iter()
            .map(|&p| procfs::tree_cpu_times(p))
            .collect()
    }
}

fn tree_cpu(pid: Option<u32>) -> Duration {
    pid.map_or(Duration::ZERO, |p| procfs::tree_cpu_times(p).total())
}

async fn measure(llms: &[LlmClient], pids: &Pids, concurrency: usize, seconds: f64) -> Run {
    let server0 = pids.servers_cpu();
    let nats0 = tree_cpu(pids.nats);
    let pg0 = tree_cpu(pids.pg);
    let clients0 = procfs::self_cpu_time();
    let t0 = Instant::now();
    let (latencies, failed) = calls(llms, concurrency, seconds).await;
    let wall = t0.elapsed().as_secs_f64();
    let per_server: Vec<CpuTimes> = pids
        .servers_cpu()
        .into_iter()
        .zip(server0)
        .map(|(now, before)| now.since(before))
        .collect();
    Run {
        calls: latencies.len(),
        wall,
        latencies,
        failed,
        server: per_server
            .iter()
            .fold(CpuTimes::default(), |a, b| CpuTimes {
                user: a.user + b.user,
                system: a.system + b.system,
            }),
        per_server: per_server.iter().map(|t| t.total()).collect(),
        nats: tree_cpu(pids.nats).saturating_sub(nats0),
        pg: tree_cpu(pids.pg).saturating_sub(pg0),
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
    mut servers: Vec<ServerProcess>,
    infra: Option<Infra>,
    pinning: &Pinning,
    server_threads: usize,
    client_threads: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let protocol = match args.protocol.as_str() {
        "http" => LlmProtocol::Http,
        "ws" => LlmProtocol::WebSocket,
        other => return Err(format!("--protocol is ws or http, not {other:?}").into()),
    };
    let base = servers[0].base.clone();
    let pid = servers[0].pid();
    let pids = Pids {
        servers: servers.iter().map(ServerProcess::pid).collect(),
        nats: infra.as_ref().map(|i| i.nats_pid),
        pg: infra.as_ref().map(|i| i.pg_pid),
    };

    let tk = toolkit("Bench", &base)?;
    let runtime = {
        let tk = tk.clone();
        tokio::spawn(async move { tk.start().await })
    };
    // Every instance sees it (the others through NATS's heartbeats).
    for server in &mut servers {
        server.wait_served("Bench")?;
    }
    // The instances the calls enter by: 1..N-1, or 0 when alone.
    let entries = if servers.len() > 1 {
        &servers[1..]
    } else {
        &servers[..]
    };
    let llms: Vec<LlmClient> = entries
        .iter()
        .map(|s| {
            LlmClient::new("bench-key")
                .with_base_url(&s.base)
                .with_protocol(protocol)
                .with_timeout(Duration::from_secs(30))
        })
        .collect();

    match args.instances {
        None => println!(
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
        ),
        Some(n) => {
            let route = if n > 1 {
                format!(
                    "the LLM clients' calls go through instances 1..{} round robin (each \
                     crosses NATS to instance 0)",
                    n - 1
                )
            } else {
                "the LLM client's calls go through instance 0 too (no hop)".into()
            };
            let infra_pinning = match pinning.server_cpu {
                Some(cpu) => format!("; NATS and PostgreSQL pinned to CPU {cpu} with the servers"),
                None => String::new(),
            };
            println!(
                "## Through atp-server, {n} instance(s) on PostgreSQL + NATS ({} LLM client)\n\n\
                 Servers: {n} processes, {server_threads} worker thread(s) each, sharing one \
                 PostgreSQL database and one NATS server. The toolkit connects to instance 0; \
                 {route}. Toolkit runtime and LLM client(s): one process, {client_threads} \
                 worker thread(s). {}{infra_pinning}. Server CPU is summed over all {n} \
                 server processes. Load average before: {}. {} s measured per run after {} s \
                 of warm-up; the run with the median calls/s of {} is shown.\n",
                args.protocol,
                pinning.describe(),
                load_average(),
                args.duration,
                args.warmup,
                args.repeat.max(1),
            );
        }
    }
    let shared = args.instances.is_some();
    if shared {
        println!(
            "| concurrent calls | calls/s | p50 ms | p99 ms | server CPU µs/call | user | kernel | NATS CPU µs/call | PostgreSQL CPU µs/call | toolkit + LLM client CPU µs/call | failed |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    } else {
        println!(
            "| concurrent calls | calls/s | p50 ms | p99 ms | server CPU µs/call | user | kernel | toolkit + LLM client CPU µs/call | failed |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    let mut by_instance = Vec::new();
    for &c in &args.concurrency {
        calls(&llms, c, args.warmup).await;
        let mut runs = Vec::new();
        for _ in 0..args.repeat.max(1) {
            runs.push(measure(&llms, &pids, c, args.duration).await);
        }
        runs.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
        let failed: usize = runs.iter().map(|r| r.failed).sum();
        let r = &runs[runs.len() / 2];
        let infra_columns = if shared {
            format!(
                " {:.1} | {:.1} |",
                r.per_call_us(r.nats),
                r.per_call_us(r.pg)
            )
        } else {
            String::new()
        };
        println!(
            "| {c} | {:.0} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} |{infra_columns} {:.1} | {failed} |",
            r.per_second(),
            percentile(&r.latencies, 0.50),
            percentile(&r.latencies, 0.99),
            r.per_call_us(r.server.total()),
            r.per_call_us(r.server.user),
            r.per_call_us(r.server.system),
            r.per_call_us(r.clients),
        );
        let each: Vec<String> = r
            .per_server
            .iter()
            .enumerate()
            .map(|(i, d)| format!("#{i} {:.1}", r.per_call_us(*d)))
            .collect();
        by_instance.push(format!("{c}: {}", each.join(", ")));
    }

    if shared {
        println!(
            "\nServer CPU µs/call by instance (#0 holds the toolkit), same runs: {}.",
            by_instance.join("; ")
        );
        println!("\nMemory per connected toolkit: not measured with --instances (run without it).");
        tk.stop();
        let _ = runtime.await;
        drop(llms);
        // The servers before the database and NATS they use.
        drop(servers);
        drop(infra);
        return Ok(());
    }

    // Memory per connected toolkit, in the server process alone.
    let server = &mut servers[0];
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
    drop(llms);
    drop(servers);
    Ok(())
}
