//! `atp-server`: the embedded ATP server, from the command line.

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use atp_registry::Secret;
use atp_server::{AtpServer, Config, DbLocation, KeyKind, SecretsKey, ServerError};
use clap::{Parser, Subcommand};

/// The environment variable that may hold the secrets key itself (base64
/// or hex; several comma-separated during a rotation, the first sealing).
const SECRETS_KEY_ENV: &str = "ATP_SECRETS_KEY";
/// The environment variable that may hold the new key of a rotation.
const NEW_SECRETS_KEY_ENV: &str = "ATP_NEW_SECRETS_KEY";

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
    /// Admin keys (at least 16 characters each), comma-separated: the
    /// admin API and the console ask for one; without any they are off,
    /// except in dev mode.
    #[arg(
        long,
        env = "ATP_ADMIN_API_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    admin_api_keys: Vec<String>,
    /// The bearer token `GET /metrics` asks for (at least 16 characters);
    /// without it the endpoint is off, except in dev mode.
    #[arg(long, env = "ATP_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// The file of the key that seals the secrets stored in the database
    /// (OAuth tokens and client secrets, webhook secrets): one key a line,
    /// the first sealing (make one with `atp-server keys
    /// generate-secrets-key`). Or the key itself in ATP_SECRETS_KEY.
    #[arg(long, env = "ATP_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    /// Rate limit of each LLM key: calls a second (overrides the
    /// config's rate_limits.per_key.calls_per_second).
    #[arg(long, env = "ATP_KEY_CALLS_PER_SECOND")]
    key_calls_per_second: Option<f64>,
    /// Rate limit of each LLM key: the burst above the rate.
    #[arg(long, env = "ATP_KEY_BURST")]
    key_burst: Option<u32>,
    /// Rate limit of each LLM key: calls in flight at once.
    #[arg(long, env = "ATP_KEY_MAX_CONCURRENT")]
    key_max_concurrent: Option<u32>,
    /// Rate limit of each LLM key: the largest arguments of a call, in
    /// bytes of JSON.
    #[arg(long, env = "ATP_KEY_MAX_REQUEST_BYTES")]
    key_max_request_bytes: Option<usize>,
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
    /// Manages keys: API keys kept in the database (create, list, revoke;
    /// docs/OPERATIONS.md, "API keys") and the secrets key that seals the
    /// secrets stored in the database ("Secrets at rest").
    Keys {
        /// What to do.
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Makes a new random secrets key (32 bytes, base64) and writes it to
    /// a new file that only its owner may read, or prints it.
    GenerateSecretsKey {
        /// The file to write (never overwritten); without it the key is
        /// printed on standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Seals every secret stored in the database again under a new key,
    /// in one transaction, opening them with the current key(s). The
    /// server then needs only the new key. Servers running meanwhile must
    /// have the new key among theirs (docs/OPERATIONS.md).
    RotateSecrets {
        /// The file of the new key (its first key seals; made with
        /// `generate-secrets-key`). Or the key itself in
        /// ATP_NEW_SECRETS_KEY.
        #[arg(long, env = "ATP_NEW_SECRETS_KEY_FILE")]
        new_key_file: Option<PathBuf>,
        /// The database: a SQLite file or a postgres:// URL [default:
        /// --config's db, else atp-server.sqlite3].
        #[arg(long)]
        db: Option<String>,
        /// A TOML configuration file, for its `db` and `secrets_key_file`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The file of the current key(s) [default: --config's
        /// secrets_key_file; or the key itself in ATP_SECRETS_KEY; or, for
        /// a SQLite file, the dev-mode key file beside it].
        #[arg(long, env = "ATP_SECRETS_KEY_FILE")]
        secrets_key_file: Option<PathBuf>,
    },
    /// Makes an API key, kept in the database as a hash, and prints it
    /// once with its id (`id: kid_…` and `key: atpk_…` on stdout).
    /// Running servers accept it within api_keys_refresh_secs (1 s).
    Create {
        /// toolkit or llm.
        #[arg(long, value_parser = ["toolkit", "llm"])]
        kind: String,
        /// The developer who owns it [default: the implicit developer,
        /// `default`].
        #[arg(long)]
        developer: Option<String>,
        /// The toolkits it may reach, comma-separated or repeated: for an
        /// llm key, the toolkits it may see and call; for a toolkit key,
        /// the toolkit names it may register [default: any].
        #[arg(long, value_delimiter = ',')]
        scope: Vec<String>,
        /// The database: a SQLite file or a postgres:// URL [default:
        /// --config's db, else atp-server.sqlite3].
        #[arg(long)]
        db: Option<String>,
        /// A TOML configuration file, for its `db`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Lists the database's API keys, oldest first, one JSON object a
    /// line: {"id", "kind", "developer", "scope", "created_at",
    /// "revoked_at"}. Never a key.
    List {
        /// The database: a SQLite file or a postgres:// URL [default:
        /// --config's db, else atp-server.sqlite3].
        #[arg(long)]
        db: Option<String>,
        /// A TOML configuration file, for its `db`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Revokes an API key by its id: every server sharing the database
    /// refuses it within api_keys_refresh_secs (1 s) and closes the
    /// WebSockets that use it.
    Revoke {
        /// The key's id (`kid_…`, from `keys list` or `keys create`).
        id: String,
        /// The database: a SQLite file or a postgres:// URL [default:
        /// --config's db, else atp-server.sqlite3].
        #[arg(long)]
        db: Option<String>,
        /// A TOML configuration file, for its `db`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// The database of a command: `--db`, else the config file's, else the
/// default.
fn db_location(db: Option<String>, config: Option<&Path>) -> Result<DbLocation, ServerError> {
    Ok(match (db, config) {
        (Some(db), _) => DbLocation::parse(&db),
        (None, Some(path)) => Config::load(path)?.db,
        (None, None) => Config::default().db,
    })
}

/// `atp-server keys create`.
async fn create_key(
    kind: &str,
    developer: Option<&str>,
    scope: &[String],
    db: &DbLocation,
) -> Result<(), ServerError> {
    let kind: KeyKind = kind.parse()?;
    let scope: Vec<String> = scope
        .iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    let made = atp_server::create_api_key(db, kind, developer, &scope).await?;
    println!("id: {}", made.id);
    println!("key: {}", made.key.expose());
    eprintln!(
        "the key is shown only this once: the database keeps its hash; revoke it with `atp-server keys revoke {}`",
        made.id
    );
    Ok(())
}

/// `atp-server keys list`.
async fn list_keys(db: &DbLocation) -> Result<(), ServerError> {
    let keys = atp_server::list_api_keys(db).await?;
    let mut out = std::io::stdout().lock();
    for k in keys {
        let line = serde_json::to_string(&k).unwrap_or_default();
        if writeln!(out, "{line}").is_err() {
            return Ok(());
        }
    }
    let _ = out.flush();
    Ok(())
}

/// The keys in an environment variable (comma-separated), if it is set.
fn env_keys(name: &str) -> Result<Vec<SecretsKey>, ServerError> {
    let Ok(text) = std::env::var(name) else {
        return Ok(Vec::new());
    };
    text.split(',')
        .filter(|k| !k.trim().is_empty())
        .map(|k| SecretsKey::parse(k).map_err(|e| ServerError::Config(format!("{name}: {e}"))))
        .collect()
}

/// The current secrets keys of a command: the key file given, else the
/// environment's keys; never both.
fn current_keys(file: Option<&Path>) -> Result<(Vec<SecretsKey>, Option<PathBuf>), ServerError> {
    let from_env = env_keys(SECRETS_KEY_ENV)?;
    match file {
        Some(_) if !from_env.is_empty() => Err(ServerError::Config(format!(
            "the secrets key is given twice, in {SECRETS_KEY_ENV} and in a key file: give one"
        ))),
        Some(path) => Ok((Vec::new(), Some(path.to_path_buf()))),
        None => Ok((from_env, None)),
    }
}

/// `atp-server keys generate-secrets-key`.
fn generate_secrets_key(out: Option<&Path>) -> Result<(), ServerError> {
    let key = SecretsKey::generate()?;
    match out {
        Some(path) => {
            key.write_file(path)?;
            eprintln!(
                "wrote secrets key {} to {} (mode 0600); give it to the server with --secrets-key-file {}",
                key.id(),
                path.display(),
                path.display()
            );
        }
        None => println!("{}", key.expose()),
    }
    Ok(())
}

/// `atp-server keys rotate-secrets`.
async fn rotate_secrets(
    new_key_file: Option<&Path>,
    db: Option<String>,
    config: Option<&Path>,
    secrets_key_file: Option<PathBuf>,
) -> Result<(), ServerError> {
    let file_config = config.map(Config::load).transpose()?;
    let location = match (db, &file_config) {
        (Some(db), _) => DbLocation::parse(&db),
        (None, Some(c)) => c.db.clone(),
        (None, None) => Config::default().db,
    };
    if let DbLocation::File(path) = &location
        && !path.exists()
    {
        return Err(ServerError::Config(format!(
            "no database at {}",
            path.display()
        )));
    }
    let key_file = secrets_key_file.or_else(|| {
        file_config
            .as_ref()
            .and_then(|c| c.secrets_key_file.clone())
    });
    let (mut current, key_file) = current_keys(key_file.as_deref())?;
    if let Some(path) = &key_file {
        current.extend(SecretsKey::read_file(path)?);
    }
    if current.is_empty()
        && let DbLocation::File(db) = &location
    {
        let dev = atp_server::dev_secrets_key_path(db);
        if dev.exists() {
            eprintln!(
                "using the dev-mode key file {} as the current key",
                dev.display()
            );
            current.extend(SecretsKey::read_file(&dev)?);
        }
    }
    let new = match (new_key_file, env_keys(NEW_SECRETS_KEY_ENV)?) {
        (Some(_), keys) if !keys.is_empty() => {
            return Err(ServerError::Config(format!(
                "the new key is given twice, in {NEW_SECRETS_KEY_ENV} and --new-key-file: give one"
            )));
        }
        (Some(path), _) => SecretsKey::read_file(path)?,
        (None, keys) if !keys.is_empty() => keys,
        (None, _) => {
            return Err(ServerError::Config(format!(
                "no new key: give --new-key-file FILE (made with `atp-server keys generate-secrets-key --out FILE`) or {NEW_SECRETS_KEY_ENV}"
            )));
        }
    };
    let report = atp_server::rotate_secrets(&location, current, new).await?;
    for (column, n) in &report.resealed {
        println!("{column}: {n} sealed again");
    }
    println!(
        "every stored secret is sealed under key {} ({} values sealed again); the server now needs only the new key",
        report.key_id,
        report.total()
    );
    Ok(())
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
    let key_file = cli.secrets_key_file.or(c.secrets_key_file.take());
    let (keys, key_file) = current_keys(key_file.as_deref())?;
    c.secrets_keys = keys;
    c.secrets_key_file = key_file;
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
    c.admin_api_keys.extend(
        cli.admin_api_keys
            .iter()
            .filter(|k| keep(k))
            .map(|k| Secret::new(k.trim())),
    );
    if cli.dev {
        c.dev = true;
    } else if !c.dev && !c.has_keys() {
        // Dev mode, unless the database holds keys (`keys create`).
        c.dev_without_keys = true;
    }
    let limit = &mut c.rate_limits.per_key;
    limit.calls_per_second = cli.key_calls_per_second.or(limit.calls_per_second);
    limit.burst = cli.key_burst.or(limit.burst);
    limit.max_concurrent = cli.key_max_concurrent.or(limit.max_concurrent);
    limit.max_request_bytes = cli.key_max_request_bytes.or(limit.max_request_bytes);
    c.validate()?;
    Ok(c)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A closed stderr must not end the server: the subscriber would
        // report the failed write with `eprintln!`, which panics on it.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut cli = Cli::parse();
    match cli.command.take() {
        Some(Command::Executions {
            db,
            config,
            limit,
            app,
        }) => {
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
        Some(Command::Keys { command }) => {
            let (name, result) = match command {
                KeysCommand::GenerateSecretsKey { out } => {
                    ("generate-secrets-key", generate_secrets_key(out.as_deref()))
                }
                KeysCommand::RotateSecrets {
                    new_key_file,
                    db,
                    config,
                    secrets_key_file,
                } => {
                    let db = db.or_else(|| cli.db.clone());
                    let config = config.or_else(|| cli.config.clone());
                    let key_file = secrets_key_file.or_else(|| cli.secrets_key_file.clone());
                    let done =
                        rotate_secrets(new_key_file.as_deref(), db, config.as_deref(), key_file)
                            .await;
                    ("rotate-secrets", done)
                }
                KeysCommand::Create {
                    kind,
                    developer,
                    scope,
                    db,
                    config,
                } => {
                    let config = config.or_else(|| cli.config.clone());
                    let done = match db_location(db.or_else(|| cli.db.clone()), config.as_deref()) {
                        Ok(db) => create_key(&kind, developer.as_deref(), &scope, &db).await,
                        Err(e) => Err(e),
                    };
                    ("create", done)
                }
                KeysCommand::List { db, config } => {
                    let config = config.or_else(|| cli.config.clone());
                    let done = match db_location(db.or_else(|| cli.db.clone()), config.as_deref()) {
                        Ok(db) => list_keys(&db).await,
                        Err(e) => Err(e),
                    };
                    ("list", done)
                }
                KeysCommand::Revoke { id, db, config } => {
                    let config = config.or_else(|| cli.config.clone());
                    let done = match db_location(db.or_else(|| cli.db.clone()), config.as_deref()) {
                        Ok(db) => atp_server::revoke_api_key(&db, &id).await.map(|()| {
                            println!("revoked {id}");
                        }),
                        Err(e) => Err(e),
                    };
                    ("revoke", done)
                }
            };
            return match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("atp-server keys {name}: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        None => {}
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
