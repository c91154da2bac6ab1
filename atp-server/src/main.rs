//! `atp-server`: the embedded ATP server, from the command line.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use atp_registry::Secret;
use atp_server::{AtpServer, Config, DbLocation};
use clap::Parser;

/// An Agent Tool Protocol server: toolkits connect to it, LLM-side clients
/// fetch tool schemas from it and run tools through it.
///
/// With no API keys configured (no --config keys, no ATP_TOOLKIT_API_KEYS /
/// ATP_LLM_API_KEYS) it runs in dev mode: any API key is accepted and it
/// listens on loopback only.
#[derive(Debug, Parser)]
#[command(name = "atp-server", version)]
struct Cli {
    /// The address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// The SQLite database file, or `:memory:` [default: atp-server.sqlite3].
    #[arg(long)]
    db: Option<String>,
    /// A TOML configuration file (keys, timeouts, OAuth platforms).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Dev mode: accept any API key; listen on loopback only.
    #[arg(long)]
    dev: bool,
    /// How long a tool call waits for its toolkit, in seconds [default: 120].
    #[arg(long)]
    task_timeout: Option<u64>,
    /// The URL this server is reached at (for the OAuth callback).
    #[arg(long)]
    public_url: Option<String>,
    /// Toolkit API keys, comma-separated.
    #[arg(
        long,
        env = "ATP_TOOLKIT_API_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    toolkit_api_keys: Vec<String>,
    /// LLM-client API keys, comma-separated.
    #[arg(
        long,
        env = "ATP_LLM_API_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    llm_api_keys: Vec<String>,
}

fn config(cli: Cli) -> Result<Config, atp_server::ServerError> {
    let mut c = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(a) = cli.addr {
        c.addr = a;
    }
    if let Some(db) = &cli.db {
        c.db = DbLocation::parse(db);
    }
    if let Some(t) = cli.task_timeout {
        c.task_timeout = Duration::from_secs(t.max(1));
    }
    if cli.public_url.is_some() {
        c.public_url = cli.public_url;
    }
    let keep = |k: &String| !k.trim().is_empty();
    c.toolkit_api_keys.extend(
        cli.toolkit_api_keys
            .iter()
            .filter(|k| keep(k))
            .map(|k| Secret::new(k.trim())),
    );
    c.llm_api_keys.extend(
        cli.llm_api_keys
            .iter()
            .filter(|k| keep(k))
            .map(|k| Secret::new(k.trim())),
    );
    if cli.dev {
        c.dev = true;
    } else if !c.dev && !c.has_keys() {
        tracing::warn!(
            "no API keys configured: starting in DEV MODE (any key accepted, loopback only); configure toolkit_api_keys / llm_api_keys to leave it"
        );
        c.dev = true;
    }
    c.validate()?;
    Ok(c)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let run = async {
        let config = config(cli)?;
        let addr = config.addr;
        let server = AtpServer::open(config)?;
        server.run(addr).await
    };
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("atp-server: {e}");
            ExitCode::FAILURE
        }
    }
}
