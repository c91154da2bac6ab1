//! `atp-bench`: the benchmarks of atp-rs that need sockets or processes.
//!
//! - `atp-bench http`: each ATP adapter against a bare handler in the same
//!   framework, and the Python reference (the Python SDK's FastAPI endpoints
//!   under uvicorn, `django_atp` under gunicorn), under the same load in
//!   the same run.
//! - `atp-bench memory`: RSS of each server idle and under load, and the
//!   registry's bytes per registered tool and per toolkit.
//! - `atp-bench micro`: the tables of `cargo bench -p atp-registry-benches`.
//! - `atp-bench load`: the load generator alone, against a running server.
//!
//! Servers run as separate processes (this binary's hidden `serve`
//! subcommand, or Python), pinned to CPU 0; the load generator runs in
//! this process, pinned to the last CPU. See `docs/BENCHMARKS.md`.

mod http1;
mod load;
mod micro;
mod procfs;
mod report;
mod servers;
mod targets;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, ExitCode},
    time::Duration,
};

use atp_conformance::server::Framework;
use atp_registry::{Call, Registry, Tool, ToolKitClient};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::{
    load::{Load, LoadResult},
    procfs::Pinning,
    report::mib,
    servers::Mode,
    targets::{PythonEnv, ServerProcess, Target},
};

/// Benchmarks of the ATP adapters, the engine's memory, and the Python
/// reference.
#[derive(Parser)]
#[command(name = "atp-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Adapters vs bare handlers vs the Python reference, end to end over
    /// HTTP: req/s, p50, p99, server CPU per request.
    Http(HttpArgs),
    /// RSS of each server idle and under load; registry bytes per tool.
    Memory(MemoryArgs),
    /// The tables of the criterion benchmarks (`cargo bench -p
    /// atp-registry` first), with the engine overhead and lookup ratios.
    Micro(MicroArgs),
    /// Puts the benchmark load on a server that is already running (for
    /// profiling it, or for servers the other commands do not start).
    Load(ExternalLoadArgs),
    /// Serves one server under test (used by `http` and `memory`).
    #[command(hide = true)]
    Serve(ServeArgs),
    /// Measures the RSS a registry grows by (used by `memory`).
    #[command(hide = true)]
    RegistryRss(RegistryArgs),
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds of warm-up (same load, not measured) per run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds measured per run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// The most requests measured per run.
    #[arg(long, default_value_t = 2_000_000)]
    max_requests: u64,
    /// Worker threads of each Rust server (default: 1 when the server is
    /// pinned to one CPU, else the number of CPUs). uvicorn runs one
    /// process; gunicorn one gthread worker with one thread per connection.
    #[arg(long)]
    workers: Option<usize>,
    /// Frameworks to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_values = ["axum", "actix", "rocket"])]
    frameworks: Vec<String>,
    /// Skip the Python reference.
    #[arg(long)]
    no_python: bool,
    /// Do not pin the servers and the load generator to CPUs.
    #[arg(long)]
    no_pin: bool,
}

#[derive(Args)]
struct HttpArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Runs per server, interleaved; the tables show the median of the
    /// runs during which the rest of the machine used at most 10 % of a CPU
    /// (of all runs when none was that quiet).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Also append the tables to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

#[derive(Args)]
struct MemoryArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Tools registered for the bytes-per-tool measurement.
    #[arg(long, default_value_t = 100_000)]
    tools: usize,
    /// Also append the tables to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

#[derive(Args)]
struct MicroArgs {
    /// Criterion's output directory (default: `target/criterion`).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Args)]
struct ExternalLoadArgs {
    /// The server's address.
    #[arg(long)]
    addr: SocketAddr,
    /// The path to `POST` to.
    #[arg(long, default_value = servers::HELLO_PATH)]
    path: String,
    /// The JSON body.
    #[arg(long, default_value = servers::HELLO_BODY)]
    body: String,
    /// The server's process id, for its CPU time and memory.
    #[arg(long)]
    pid: Option<u32>,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds of warm-up.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// The most requests measured.
    #[arg(long, default_value_t = 2_000_000)]
    max_requests: u64,
    /// Do not pin the load generator to the last CPU.
    #[arg(long)]
    no_pin: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// `axum`, `actix` or `rocket`.
    #[arg(long)]
    framework: Framework,
    /// The ATP adapter over the fixture, or the bare handler.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Layout {
    /// One toolkit with N tools.
    OneToolkit,
    /// N toolkits with one tool each.
    ManyToolkits,
}

#[derive(Args)]
struct RegistryArgs {
    /// How many tools (or toolkits).
    #[arg(long)]
    tools: usize,
    /// How they are laid out.
    #[arg(long, value_enum)]
    layout: Layout,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Cmd::Http(args) => http(args),
        Cmd::Memory(args) => memory(args),
        Cmd::Micro(args) => {
            micro::tables(&args.dir.unwrap_or_else(micro::default_dir)).map(|t| print!("{t}"))
        }
        Cmd::Load(args) => external_load(args),
        Cmd::Serve(args) => servers::serve(args.framework, args.mode, args.addr, args.workers)
            .map_err(|e| format!("serve: {e}")),
        Cmd::RegistryRss(args) => registry_rss(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atp-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---- Shared setup ----

/// What the runs share: pinning, the Python stack, the targets.
struct Setup {
    pinning: Pinning,
    python: Option<PythonEnv>,
    targets: Vec<Target>,
    workers: usize,
    connections: usize,
    log_dir: tempdir::Dir,
}

mod tempdir {
    //! A directory removed when dropped.
    use std::path::{Path, PathBuf};

    /// A temporary directory.
    pub struct Dir(PathBuf);

    impl Dir {
        /// Creates `$TMPDIR/atp-bench-NAME-PID`.
        pub fn new(name: &str) -> std::io::Result<Dir> {
            let p = std::env::temp_dir().join(format!("atp-bench-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&p)?;
            Ok(Dir(p))
        }

        /// Its path.
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Setup {
    fn new(args: &LoadArgs) -> Result<Setup, String> {
        // Before any thread is started: threads inherit the affinity.
        let pinning = Pinning::setup(!args.no_pin);
        let mut frameworks = Vec::new();
        for name in &args.frameworks {
            frameworks.push(name.parse::<Framework>()?);
        }
        let python = if args.no_python {
            None
        } else {
            let env = PythonEnv::detect().map_err(|e| format!("writing the Python apps: {e}"))?;
            env.warn_missing();
            Some(env)
        };
        let mut targets = Vec::new();
        for fw in frameworks {
            targets.push(Target::Rust(fw, Mode::Bare));
            targets.push(Target::Rust(fw, Mode::Atp));
        }
        if let Some(py) = &python {
            targets.extend(
                [Target::FastApi, Target::Django]
                    .into_iter()
                    .filter(|t| py.available(*t)),
            );
        }
        let workers = args.workers.unwrap_or(if pinning.server_cpu.is_some() {
            1
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        });
        Ok(Setup {
            pinning,
            python,
            targets,
            workers,
            connections: args.connections,
            log_dir: tempdir::Dir::new("logs").map_err(|e| e.to_string())?,
        })
    }

    fn start(&self, target: Target) -> Result<ServerProcess, String> {
        ServerProcess::start(
            target,
            &self.pinning,
            self.python.as_ref(),
            self.workers,
            self.connections,
            self.log_dir.path(),
        )
    }

    fn load(&self, args: &LoadArgs, server: &ServerProcess) -> Load {
        Load {
            addr: server.addr,
            requests: vec![targets::hello_request()],
            connections: args.connections,
            warmup: Duration::from_secs_f64(args.warmup.max(0.0)),
            duration: Duration::from_secs_f64(args.duration.max(0.01)),
            max_requests: args.max_requests,
            server_pid: Some(server.pid()),
        }
    }

    /// The header of a report: machine, load, settings.
    fn header(&self, title: &str, args: &LoadArgs, extra: &str) -> String {
        let mut h = format!("\n### {title}\n\n");
        h.push_str(&format!("- machine: {}\n", machine()));
        h.push_str(&format!("- load average before: {}\n", loadavg()));
        h.push_str(&format!("- placement: {}\n", self.pinning.describe()));
        h.push_str(&format!(
            "- load: {} keep-alive connections, {} s warm-up, {} s measured, at most {} requests per run{extra}\n",
            args.connections, args.warmup, args.duration, args.max_requests
        ));
        h.push_str(&format!(
            "- Rust servers: {} worker thread(s); Python: uvicorn 1 process, gunicorn 1 worker (gthread, {} threads)\n",
            self.workers,
            self.connections
        ));
        if let Some(py) = &self.python {
            for (name, state) in [("FastAPI", &py.fastapi), ("Django", &py.django)] {
                match state {
                    Ok(v) => h.push_str(&format!("- {name} stack: {v}\n")),
                    Err(e) => h.push_str(&format!("- {name} stack: **MISSING** ({e})\n")),
                }
            }
        } else {
            h.push_str("- Python reference: skipped (--no-python)\n");
        }
        h.push('\n');
        h
    }
}

fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpus = info.lines().filter(|l| l.starts_with("processor")).count();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or_else(String::new, |kb| {
            format!(", {:.0} GiB", kb / 1024.0 / 1024.0)
        });
    format!("{cpus} × {model}{mem}")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn run_one(setup: &Setup, args: &LoadArgs, target: Target) -> Result<LoadResult, String> {
    let server = setup.start(target)?;
    let result = load::run(setup.load(args, &server)).map_err(|e| e.to_string());
    server.stop();
    result
}

// ---- load ----

fn external_load(args: ExternalLoadArgs) -> Result<(), String> {
    let pinning = Pinning::setup(!args.no_pin);
    eprintln!("{}", pinning.describe());
    let r = load::run(Load {
        addr: args.addr,
        requests: vec![load::RequestSpec::post_json(args.path, args.body)],
        connections: args.connections,
        warmup: Duration::from_secs_f64(args.warmup.max(0.0)),
        duration: Duration::from_secs_f64(args.duration.max(0.01)),
        max_requests: args.max_requests,
        server_pid: args.pid,
    })
    .map_err(|e| e.to_string())?;
    println!("{}", describe(&r));
    Ok(())
}

/// One line about a run.
fn describe(r: &LoadResult) -> String {
    let us = |v: Option<f64>| v.map_or_else(|| "–".into(), |c| format!("{c:.2}"));
    format!(
        "{:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, server CPU {} µs/req, load generator {} µs/req, others {}% of a CPU{}",
        r.rps(),
        r.percentile_ms(50.0),
        r.percentile_ms(99.0),
        us(r.cpu_us_per_request()),
        us(r.client_cpu_us_per_request()),
        r.interference_percent()
            .map_or_else(|| "–".into(), |p| format!("{p:.0}")),
        if r.errors + r.bad_status > 0 {
            format!(", {} FAILED", r.errors + r.bad_status)
        } else {
            String::new()
        }
    )
}

// ---- http ----

fn http(args: HttpArgs) -> Result<(), String> {
    let setup = Setup::new(&args.load)?;
    let repeat = args.repeat.max(1);
    let mut text = setup.header(
        "HTTP: adapters, bare handlers, Python",
        &args.load,
        &format!(
            "; {repeat} runs per server, interleaved; median of the runs with others' CPU ≤ {} %",
            report::MAX_INTERFERENCE
        ),
    );
    print!("{text}");
    let mut results: BTreeMap<String, Vec<LoadResult>> = BTreeMap::new();
    for round in 1..=repeat {
        for &target in &setup.targets {
            eprint!("run {round}/{repeat}: {target} … ");
            match run_one(&setup, &args.load, target) {
                Ok(r) => {
                    eprintln!("{}", describe(&r));
                    results.entry(target.to_string()).or_default().push(r);
                }
                Err(e) => eprintln!("FAILED: {e}"),
            }
        }
    }
    let tables = report::http_tables(&setup.targets, &results);
    // Again at the end, where it is seen.
    if let Some(py) = &setup.python {
        py.warn_missing();
    }
    let tail = format!("\n{tables}\n- load average after: {}\n", loadavg());
    print!("{tail}");
    if let Some(path) = &args.markdown {
        text.push_str(&tail);
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

// ---- memory ----

fn memory(args: MemoryArgs) -> Result<(), String> {
    let setup = Setup::new(&args.load)?;
    let mut text = setup.header("Memory", &args.load, "");
    print!("{text}");
    let mut table = String::from(
        "| server | RSS idle MiB | peak RSS under load MiB | RSS after load MiB | req/s during |\n|---|---:|---:|---:|---:|\n",
    );
    for &target in &setup.targets {
        eprint!("{target} … ");
        let server = match setup.start(target) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("FAILED: {e}");
                continue;
            }
        };
        // Started and answered one request: lazily built state is in.
        let idle = procfs::tree_rss(server.pid());
        let result = load::run(setup.load(&args.load, &server)).map_err(|e| e.to_string())?;
        let after = procfs::tree_rss(server.pid());
        server.stop();
        let peak = result.server_peak_rss.unwrap_or(0).max(after);
        eprintln!(
            "idle {} MiB, peak {} MiB",
            mib(idle as f64),
            mib(peak as f64)
        );
        table.push_str(&format!(
            "| {target} | {} | {} | {} | {:.0} |\n",
            mib(idle as f64),
            mib(peak as f64),
            mib(after as f64),
            result.rps()
        ));
    }

    table.push_str(
        "\n| registry | entries | RSS growth MiB | bytes per entry |\n|---|---:|---:|---:|\n",
    );
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let counts = [args.tools / 10, args.tools];
    for layout in [Layout::OneToolkit, Layout::ManyToolkits] {
        for n in counts.into_iter().filter(|&n| n > 0) {
            let name = match layout {
                Layout::OneToolkit => "one toolkit, N tools (bytes per tool)",
                Layout::ManyToolkits => "N toolkits of one tool (bytes per toolkit)",
            };
            let out = Command::new(&exe)
                .args([
                    "registry-rss",
                    "--tools",
                    &n.to_string(),
                    "--layout",
                    match layout {
                        Layout::OneToolkit => "one-toolkit",
                        Layout::ManyToolkits => "many-toolkits",
                    },
                ])
                .output()
                .map_err(|e| format!("registry-rss: {e}"))?;
            let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
                format!(
                    "registry-rss answered {:?}: {e}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
            let growth = v["growth"].as_f64().unwrap_or(0.0);
            table.push_str(&format!(
                "| {name} | {n} | {} | {:.0} |\n",
                mib(growth),
                growth / n as f64
            ));
        }
    }
    let tail = format!("{table}\n- load average after: {}\n", loadavg());
    print!("{tail}");
    if let Some(path) = &args.markdown {
        text.push_str(&tail);
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The tool every registry entry gets: like the fixture's `hello_world`.
fn hello_tool(name: &str) -> Tool {
    Tool::new(name)
        .description("Returns a greeting.")
        .params(["name"])
        .required_params(["name"])
}

async fn hello(call: Call) -> Result<Value, String> {
    Ok(json!({"message": format!("Hello, {}!", call.str("name").unwrap_or("World"))}))
}

fn registry_rss(args: RegistryArgs) -> Result<(), String> {
    let registry = Registry::new();
    let before = procfs::self_rss();
    match args.layout {
        Layout::OneToolkit => {
            let client = ToolKitClient::new("key", "bench");
            for i in 0..args.tools {
                client
                    .register_tool(hello_tool(&format!("tool_{i}")), hello)
                    .map_err(|e| e.to_string())?;
            }
            registry
                .register_client("bench", client)
                .map_err(|e| e.to_string())?;
        }
        Layout::ManyToolkits => {
            for i in 0..args.tools {
                let client = ToolKitClient::new("key", format!("app {i}"));
                client
                    .register_tool(hello_tool("hello_world"), hello)
                    .map_err(|e| e.to_string())?;
                registry
                    .register_client(format!("kit_{i}"), client)
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    let after = procfs::self_rss();
    std::hint::black_box(&registry);
    println!(
        "{}",
        json!({"entries": args.tools, "before": before, "after": after, "growth": after.saturating_sub(before)})
    );
    Ok(())
}
