//! `atp-server`: the embedded ATP server, from the command line.

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use atp_registry::Secret;
use atp_server::{AtpServer, Config, DbLocation, ServerError};
use clap::{Parser, Subcommand};

/// An Agent Tool Protocol server: toolkits connect to it, LLM-side clients
/// fetch tool schemas from it and run tools through it.
///
/// With no API keys configured (no --config keys, no ATP_TOOLKIT_API_KEYS /
/// ATP_LLM_API_KEYS) it runs in dev mode: any API key is accepted and it
/// listens on loopback only.
#[derive(Debug, Parser)]
#[command(name = "atp-server", version)]
struct Cli {
    /// What to do instead of serving.
    #[command(subcommand)]
    command: Option<Command>,
    /// The address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// The database: a SQLite file, `:memory:`, or a PostgreSQL URL
    /// (postgres://user:password@host/db) that several servers share
    /// [default: atp-server.sqlite3].
    #[arg(long, env = "ATP_DB_URL", hide_env_values = true)]
    db: Option<String>,
    /// The NATS server that servers sharing a PostgreSQL database route
    /// calls over (nats://host:4222).
    #[arg(long, env = "ATP_NATS_URL", hide_env_values = true)]
    nats: Option<String>,
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
    /// The bearer token `GET /metrics` asks for (at least 16 characters);
    /// without it the endpoint is off, except in dev mode.
    #[arg(long, env = "ATP_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints the execution log (the reports toolkits sent to
    /// /api/v1/execute_function), oldest first, one JSON object a line:
    /// {"id", "app_name", "function_id", "result", "reported_at"}.
    Executions {
        /// The database: a SQLite file or a postgres:// URL [default:
        /// --config's db, else atp-server.sqlite3]. Only read; the server
        /// may be running.
        #[arg(long)]
        db: Option<String>,
        /// A TOML configuration file, for its `db`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the newest N reports.
        #[arg(long, default_value_t = 100)]
        limit: u64,
        /// Only the reports of this toolkit (app_name).
        #[arg(long)]
        app: Option<String>,
    },
}

/// `atp-server executions`: the newest reports as JSON lines on stdout,
/// from a SQLite file or a PostgreSQL database.
fn print_executions(
    db: Option<String>,
    config: Option<&Path>,
    limit: u64,
    app: Option<&str>,
) -> Result<(), ServerError> {
    let location = match (db, config) {
        (Some(db), _) => DbLocation::parse(&db),
        (None, Some(path)) => Config::load(path)?.db,
        (None, None) => Config::default().db,
    };
    let rows = match &location {
        DbLocation::File(path) => {
            if !path.exists() {
                return Err(ServerError::Config(format!(
                    "no database at {}",
                    path.display()
                )));
            }
            atp_server::read_executions(path, app, limit)?
        }
        DbLocation::Memory => {
            return Err(ServerError::Config(
                "an in-memory database keeps no execution log to read: give --db FILE or a PostgreSQL URL".into(),
            ));
        }
        DbLocation::Postgres(_) => {
            // This runs within `main`'s runtime, which can not be blocked
            // on: the query gets a thread and a runtime of its own.
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()?
                            .block_on(atp_server::Execution::read_log(&location, app, limit))
                    })
                    .join()
                    .unwrap_or_else(|_| Err(ServerError::Db("reading the log failed".into())))
            })?
        }
    };
    let mut out = std::io::stdout().lock();
    for row in rows {
        let line = serde_json::to_string(&row).unwrap_or_default();
        // A closed pipe (`| head`) ends the listing quietly.
        if writeln!(out, "{line}").is_err() {
            return Ok(());
        }
    }
    let _ = out.flush();
    Ok(())
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
    if let Some(url) = &cli.nats {
        c.nats_url = Some(atp_server::NatsUrl(url.clone()));
    }
    if let Some(t) = cli.task_timeout {
        c.task_timeout = Duration::from_secs(t.max(1));
    }
    if cli.public_url.is_some() {
        c.public_url = cli.public_url;
    }
    if let Some(t) = cli
        .metrics_token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        c.metrics_token = Some(Secret::new(t));
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
    let mut cli = Cli::parse();
    if let Some(Command::Executions {
        db,
        config,
        limit,
        app,
    }) = cli.command.take()
    {
        let db = db.or_else(|| cli.db.clone());
        let config = config.or_else(|| cli.config.clone());
        return match print_executions(db, config.as_deref(), limit, app.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("atp-server executions: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let run = async {
        let config = config(cli)?;
        let addr = config.addr;
        let server = AtpServer::connect(config).await?;
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
