//! The command line of a node process (the `atp-reliability-node` binary,
//! and `soak node …`): one ATP process for the fault and soak tests to
//! start, measure and kill. It prints `listening on http://ADDR` (or
//! `started` for a toolkit) on its first stdout line, then serves until
//! killed.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use atp_server::{AtpServer, Config, DbLocation, SecretsKey};

use crate::node::{test_runtime_options, test_toolkit_with};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "atp-reliability-node")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// An adapter serving the conformance fixture.
    Adapter {
        /// axum, actix or rocket.
        #[arg(long)]
        framework: String,
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
    },
    /// An `atp-server`.
    Server {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
        /// The SQLite file, or `:memory:`. A file's secrets are sealed
        /// under the key file beside it (`<db>.secrets-key`, made the
        /// first time), so a restarted node reads them again.
        #[arg(long)]
        db: String,
        /// A toolkit API key.
        #[arg(long)]
        toolkit_key: String,
        /// An LLM-client API key.
        #[arg(long)]
        llm_key: String,
        /// How long a call waits for its toolkit.
        #[arg(long, default_value_t = 10_000)]
        task_timeout_ms: u64,
        /// How long a connection may take to send a request head.
        #[arg(long, default_value_t = 30_000)]
        header_read_timeout_ms: u64,
    },
    /// A toolkit runtime (`echo`, `slow`, `fails`) connected to a server.
    Toolkit {
        /// The server's base URL.
        #[arg(long)]
        base: String,
        /// The toolkit API key.
        #[arg(long)]
        key: String,
        /// The app name.
        #[arg(long)]
        app: String,
    },
}

#[cfg(feature = "adapters")]
fn quiet_fixture_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str));
        if text == Some("secret panic detail") {
            return;
        }
        previous(info);
    }));
}

#[cfg(feature = "adapters")]
fn adapter(framework: &str, addr: SocketAddr) -> Result<(), String> {
    quiet_fixture_panics();
    let framework: atp_conformance::server::Framework = framework.parse()?;
    let engine = atp_registry::Engine::with_registry(atp_conformance::fixture());
    let addr =
        atp_conformance::server::spawn(framework, engine, addr).map_err(|e| e.to_string())?;
    println!("listening on http://{addr}");
    loop {
        std::thread::park();
    }
}

#[cfg(not(feature = "adapters"))]
fn adapter(_framework: &str, _addr: SocketAddr) -> Result<(), String> {
    Err("built without the `adapters` feature".into())
}

/// Runs a node from its command line (`args` without the program name).
pub fn main(args: impl IntoIterator<Item = String>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // The fixture's `panic` tool panics on purpose, thousands of
                // times in a soak: its error line is not news.
                tracing_subscriber::EnvFilter::new("error,atp_registry::client=off")
            }),
        )
        .init();
    let cli =
        match Cli::try_parse_from(std::iter::once("atp-reliability-node".to_owned()).chain(args)) {
            Ok(cli) => cli,
            Err(e) => {
                let _ = e.print();
                return ExitCode::FAILURE;
            }
        };
    let result = match cli.what {
        What::Adapter { framework, addr } => adapter(&framework, addr),
        What::Server {
            addr,
            db,
            toolkit_key,
            llm_key,
            task_timeout_ms,
            header_read_timeout_ms,
        } => tokio::runtime::Runtime::new()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(async {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|e| e.to_string())?;
                    let local = listener.local_addr().map_err(|e| e.to_string())?;
                    let db = DbLocation::parse(&db);
                    let secrets_key_file = match &db {
                        DbLocation::File(path) => Some(node_secrets_key(path)?),
                        _ => None,
                    };
                    let server = AtpServer::open(Config {
                        db,
                        secrets_key_file,
                        toolkit_api_keys: vec![toolkit_key.into()],
                        llm_api_keys: vec![llm_key.into()],
                        task_timeout: Duration::from_millis(task_timeout_ms),
                        header_read_timeout: Duration::from_millis(header_read_timeout_ms),
                        ..Config::default()
                    })
                    .map_err(|e| e.to_string())?;
                    println!("listening on http://{local}");
                    server.serve(listener).await.map_err(|e| e.to_string())
                })
            }),
        What::Toolkit { base, key, app } => {
            // Each slow call says it started, so a test can kill this
            // process while the call is in flight.
            let client = test_toolkit_with(&key, &app, &base, |ms| {
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "slow started {ms}");
                let _ = out.flush();
            })
            .with_runtime_options(test_runtime_options());
            println!("started");
            client.start_blocking().map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atp-reliability-node: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The secrets key file of a node's database: the one beside it, made the
/// first time.
fn node_secrets_key(db: &std::path::Path) -> Result<std::path::PathBuf, String> {
    let path = atp_server::dev_secrets_key_path(db);
    if !path.exists() {
        let key = SecretsKey::generate().map_err(|e| e.to_string())?;
        if let Err(e) = key.write_file(&path)
            && !path.exists()
        {
            return Err(e.to_string());
        }
    }
    Ok(path)
}
