#![doc = include_str!("../README.md")]

mod admin;
mod api_keys;
mod audit;
mod bus;
mod catalog;
mod config;
mod console;
mod error;
mod events;
mod hub;
mod keys;
mod listen;
mod llm;
mod mcp;
mod metrics;
mod oauth;
#[cfg(feature = "otel")]
pub mod otel;
mod rate_limit;
mod secrets;
mod store;
mod toolkit;
mod webhooks;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use atp_registry::net::HttpClient;
use axum::{
    Router,
    body::Body,
    extract::DefaultBodyLimit,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{MethodRouter, get, post},
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Map, Value};
use tokio::{net::TcpListener, sync::watch};

pub use api_keys::{ApiKeyInfo, KeyKind, NewApiKey, create_api_key, list_api_keys, revoke_api_key};
pub use catalog::{Execution, read_executions};
pub use config::{
    Config, DEFAULT_ADDR, DEFAULT_AUDIT_RETENTION_DAYS, DEFAULT_DB, DbLocation, Developer, Limit,
    NatsUrl, OAuthPlatform, RateLimits,
};
pub use error::ServerError;
pub use secrets::{RotationReport, SecretsError, SecretsKey, dev_secrets_key_path, rotate_secrets};

use crate::{
    error::{ApiError, json_response},
    hub::Hub,
    keys::Keys,
    store::{Store, ToolkitRecord},
};

/// How long a stopping server waits for its last audit rows.
const AUDIT_FLUSH_AT_STOP: Duration = Duration::from_secs(5);

/// Records an admin action done outside a running server — a command of
/// `atp-server` such as `keys revoke` — in the audit log of `db`
/// (docs/OPERATIONS.md, "Audit log"): `action` (the command, e.g. `keys
/// revoke`), `target` (what it acted on: a key id, a toolkit; never a key
/// or a token) and, if it failed, its error code. The row's `via` is
/// `cli`. Opening the database runs its migrations.
///
/// ```no_run
/// # async fn demo() -> Result<(), atp_server::ServerError> {
/// use atp_server::DbLocation;
///
/// let db = DbLocation::parse("atp-server.sqlite3");
/// atp_server::audit_admin_action(&db, "keys revoke", Some("3f2a9c1b7d40"), None).await?;
/// # Ok(()) }
/// ```
pub async fn audit_admin_action(
    db: &DbLocation,
    action: &str,
    target: Option<&str>,
    error_code: Option<&str>,
) -> Result<(), ServerError> {
    if matches!(db, DbLocation::Memory) {
        return Err(ServerError::Config(
            "an in-memory database keeps no audit log: give --db FILE or a PostgreSQL URL".into(),
        ));
    }
    // Audit rows hold no secret: a key of this process opens the store.
    let keyring = Arc::new(secrets::Keyring::ephemeral()?);
    let store = Store::connect(db, keyring).await?;
    let entry = audit::Entry::admin(audit::Via::Cli, action, target, error_code);
    audit::record_now(&store, entry).await?;
    Ok(())
}

/// What the database holds at startup.
struct Loaded {
    kits: Vec<ToolkitRecord>,
    platforms: Vec<OAuthPlatform>,
    webhooks: usize,
    api_keys: Vec<api_keys::Row>,
}

/// The shared state behind every endpoint.
pub(crate) struct State {
    config: Config,
    keys: Keys,
    store: Store,
    toolkits: RwLock<HashMap<String, Arc<ToolkitRecord>>>,
    register_lock: tokio::sync::Mutex<()>,
    hub: Hub,
    /// Outgoing HTTP: OAuth token endpoints, toolkits' endpoint URLs.
    outbound: HttpClient,
    platforms: RwLock<HashMap<String, OAuthPlatform>>,
    refresh_lock: tokio::sync::Mutex<()>,
    shutdown: watch::Sender<bool>,
    public_url: RwLock<Option<String>>,
    /// Registered webhooks and their delivery queue.
    webhooks: webhooks::Webhooks,
    /// Developers, the store and the execution log.
    catalog: catalog::Catalog,
    /// The other servers sharing this one's database, over NATS.
    bus: Option<bus::Bus>,
    /// What `GET /metrics` shows.
    metrics: Arc<metrics::Metrics>,
    /// Whether the database's API keys are being re-read.
    keys_refreshing: std::sync::atomic::AtomicBool,
    /// The rate limits' counters.
    limits: rate_limit::Limiter,
    /// Each finished tool call, for live listeners.
    calls: events::CallEvents,
    /// The audit log's queue and writer.
    audit: audit::Audit,
}

impl State {
    fn toolkit(&self, app_name: &str) -> Option<Arc<ToolkitRecord>> {
        self.toolkits
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(app_name)
            .cloned()
    }

    /// The toolkit `app_name` if the LLM key `llm_key_hash` may use it:
    /// it is public, or its key and the LLM key have the same developer.
    /// Any other toolkit is "not found", exactly like an unknown one.
    fn visible_toolkit(&self, llm_key_hash: &str, app_name: &str) -> Option<Arc<ToolkitRecord>> {
        self.toolkit(app_name).filter(|k| {
            self.catalog.can_see(llm_key_hash, &k.key_hash, &k.app_name)
                && api_keys::in_scope(self, llm_key_hash, &k.app_name)
        })
    }

    /// The calling LLM client's key, checked, as its hash: `Authorization:
    /// ApiKey KEY`, else the body's `api_key` (the Python client sends
    /// both); 401 otherwise.
    fn llm_caller(
        &self,
        headers: &axum::http::HeaderMap,
        body: Option<&Map<String, Value>>,
    ) -> Result<String, ApiError> {
        let key =
            keys::api_key_header(headers).or_else(|| body.and_then(|b| str_field(b, "api_key")));
        match key {
            Some(k) if self.keys.check(keys::Role::Llm, k) => Ok(keys::key_hash(k)),
            _ => Err(ApiError::unauthorized()),
        }
    }

    /// Whether a toolkit with this key is connected to this server or
    /// (over NATS) to another.
    fn is_served(&self, key_hash: &str) -> bool {
        self.hub.is_served(key_hash)
            || self
                .bus
                .as_ref()
                .is_some_and(|b| b.served_elsewhere(key_hash))
    }

    /// The toolkits registered with the toolkit key `key_hash`.
    fn apps_of(&self, key_hash: &str) -> Vec<String> {
        self.toolkits
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|k| k.key_hash == key_hash)
            .map(|k| k.app_name.clone())
            .collect()
    }

    fn platform(&self, id: &str) -> Option<OAuthPlatform> {
        self.platforms
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// The URL this server is reached at, for the OAuth callback.
    fn public_url(&self) -> String {
        self.public_url
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.config.addr))
    }
}

/// An ATP server: toolkits connect to it, LLM-side clients run tools
/// through it (docs/PROTOCOL.md §5 and §6).
///
/// A cheap handle: clones share the same server.
///
/// ```no_run
/// # async fn demo() -> Result<(), atp_server::ServerError> {
/// use atp_server::{AtpServer, Config};
///
/// let server = AtpServer::open(Config::dev())?;
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// server.serve(listener).await?; // until `server.shutdown()`
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AtpServer {
    state: Arc<State>,
}

impl std::fmt::Debug for AtpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtpServer")
            .field("config", &self.state.config)
            .finish_non_exhaustive()
    }
}

impl AtpServer {
    /// Opens a SQLite database, loads the registrations and OAuth
    /// platforms it holds, and adds the configured platforms to it.
    ///
    /// A PostgreSQL database, and NATS, need [`connect`](Self::connect).
    pub fn open(config: Config) -> Result<Self, ServerError> {
        config.validate()?;
        if matches!(config.db, DbLocation::Postgres(_)) || config.nats_url.is_some() {
            return Err(ServerError::Config(
                "a PostgreSQL database or NATS is opened with AtpServer::connect".into(),
            ));
        }
        let keyring = Arc::new(secrets::Keyring::for_config(&config)?);
        let store = Store::open(&config.db, keyring.clone())?;
        let Some(sqlite) = store.sqlite() else {
            return Err(ServerError::Config("not a SQLite database".into()));
        };
        sqlite
            .call_now(|c| store::reseal_sqlite(c, &keyring, secrets::Pass::SealPlaintext))?
            .log_startup();
        for p in &config.oauth_platforms {
            let json = store.platform_json(p)?;
            sqlite.call_now(|c| store::save_platform(c, &p.id, &json))?;
        }
        let loaded = Loaded {
            kits: sqlite.call_now(|c| store::load_toolkits(c, &keyring))?,
            platforms: sqlite.call_now(|c| store::load_platforms(c, &keyring))?,
            webhooks: sqlite.call_now(webhooks::count_sqlite)?,
            api_keys: sqlite.call_now(api_keys::load_sqlite)?,
        };
        Ok(Self::assemble(config, store, loaded, None))
    }

    /// Opens the database — SQLite, or PostgreSQL (its migrations run
    /// first) — and, with [`Config::nats_url`], connects to NATS: the
    /// server then serves calls for toolkits connected to any server
    /// sharing the database (docs/DEPLOY.md).
    pub async fn connect(config: Config) -> Result<Self, ServerError> {
        config.validate()?;
        let keyring = Arc::new(secrets::Keyring::for_config(&config)?);
        let store = Store::connect(&config.db, keyring).await?;
        store
            .reseal(secrets::Pass::SealPlaintext)
            .await?
            .log_startup();
        for p in &config.oauth_platforms {
            store.save_platform(p).await?;
        }
        let loaded = Loaded {
            kits: store.load_toolkits().await?,
            platforms: store.load_platforms().await?,
            webhooks: store.count_webhooks().await?,
            api_keys: store.api_keys().await?,
        };
        let bus = match &config.nats_url {
            Some(url) => Some(bus::Bus::connect(url, &config).await?),
            None => None,
        };
        let server = Self::assemble(config, store, loaded, bus);
        if let Some(bus) = &server.state.bus {
            bus.start(&server.state);
        }
        Ok(server)
    }

    fn assemble(mut config: Config, store: Store, loaded: Loaded, bus: Option<bus::Bus>) -> Self {
        let Loaded {
            kits,
            platforms,
            webhooks,
            api_keys: stored_keys,
        } = loaded;
        if config.dev_without_keys
            && !config.dev
            && !config.has_keys()
            && !api_keys::any_in_force(&stored_keys)
        {
            tracing::warn!(
                "no API keys configured nor in the database: starting in DEV MODE (any key accepted, loopback only); configure toolkit_api_keys / llm_api_keys or make keys with `atp-server keys create` (then restart) to leave it"
            );
            config.dev = true;
        }
        let webhooks = webhooks::Webhooks::new(webhooks);
        let catalog = catalog::Catalog::new(&config);
        let metrics = Arc::new(metrics::Metrics::default());
        let audit = audit::Audit::new(&config, store.clone(), metrics.clone());
        let (shutdown, shutdown_rx) = watch::channel(false);
        tracing::info!(
            toolkits = kits.len(),
            oauth_platforms = platforms.len(),
            "state loaded"
        );
        let state = State {
            keys: Keys::new(&config),
            store,
            toolkits: RwLock::new(
                kits.into_iter()
                    .map(|k| (k.app_name.clone(), Arc::new(k)))
                    .collect(),
            ),
            register_lock: tokio::sync::Mutex::new(()),
            hub: Hub::new(
                shutdown_rx,
                config.inbox_presence,
                bus.as_ref().map(bus::Bus::id),
            ),
            outbound: HttpClient::new(),
            platforms: RwLock::new(platforms.into_iter().map(|p| (p.id.clone(), p)).collect()),
            refresh_lock: tokio::sync::Mutex::new(()),
            shutdown,
            public_url: RwLock::new(config.public_url.clone()),
            metrics,
            keys_refreshing: std::sync::atomic::AtomicBool::new(false),
            limits: rate_limit::Limiter::new(config.rate_limits.clone()),
            calls: events::CallEvents::default(),
            audit,
            webhooks,
            catalog,
            bus,
            config,
        };
        api_keys::apply(&state, stored_keys);
        Self {
            state: Arc::new(state),
        }
    }

    /// The settings the server runs with.
    pub fn config(&self) -> &Config {
        &self.state.config
    }

    /// The routes, to serve with `axum::serve` or merge into an app.
    pub fn router(&self) -> Router {
        fn both(
            r: Router<Arc<State>>,
            path: &str,
            m: MethodRouter<Arc<State>>,
        ) -> Router<Arc<State>> {
            r.route(path, m.clone()).route(&format!("{path}/"), m)
        }
        let mut r = Router::new();
        r = both(r, "/api/v1/register_tool", post(toolkit::register_tool));
        r = both(r, "/api/v1/toolkit/verify_hash", post(toolkit::verify_hash));
        r = both(
            r,
            "/api/v1/toolkit/verify_tool_hash",
            post(toolkit::verify_tool_hash),
        );
        r = both(r, "/api/v1/toolkit/{api_key}/inbox", get(toolkit::inbox));
        r = both(
            r,
            "/api/v1/toolkit/{api_key}/inbox/respond",
            post(toolkit::inbox_respond),
        );
        r = both(
            r,
            "/ws/v1/atp/toolkit-client/{api_key}",
            get(toolkit::socket),
        );
        r = both(r, "/ws/v1/atp/llm-client/{api_key}", get(llm::socket));
        r = both(r, "/api/v1/atp/llm-client/process", post(llm::process));
        r = both(
            r,
            "/api/v1/atp/llm-client/oauth/confirmation/{platform_id}",
            post(oauth::confirmation),
        );
        r = both(
            r,
            "/api/v1/atp/llm-client/oauth/callback",
            get(oauth::callback),
        );
        r = both(
            r,
            "/api/v1/atp/llm-client/oauth/tokens/{platform_id}/{external_user_id}",
            get(oauth::tokens),
        );
        const LLM: &str = "/api/v1/atp/llm-client";
        r = both(
            r,
            &format!("{LLM}/webhooks/register"),
            post(webhooks::register),
        );
        r = both(r, &format!("{LLM}/webhooks"), get(webhooks::list));
        // The Python client's `delete_webhook` sends a GET (its HTTP helper
        // only knows POST and GET): every method deletes.
        r = both(
            r,
            &format!("{LLM}/webhooks/{{webhook_id}}/delete"),
            axum::routing::delete(webhooks::delete)
                .post(webhooks::delete)
                .get(webhooks::delete),
        );
        r = both(
            r,
            &format!("{LLM}/store/toolkits/list"),
            get(catalog::store_toolkits),
        );
        r = both(
            r,
            &format!("{LLM}/store/toolkits/{{toolkit_id}}"),
            get(catalog::toolkit_details),
        );
        r = both(
            r,
            &format!("{LLM}/developers/toolkits"),
            get(catalog::my_toolkits),
        );
        r = both(
            r,
            &format!("{LLM}/store/developers/{{display_name}}"),
            get(catalog::developer_profile),
        );
        r = both(
            r,
            "/api/v1/execute_function",
            post(catalog::execute_function),
        );
        r = both(
            r,
            "/mcp/{toolkit}",
            post(mcp::post)
                .get(mcp::not_allowed)
                .delete(mcp::not_allowed),
        );
        r = both(r, "/health", get(health));
        r = both(r, "/ready", get(ready));
        r = r.route("/metrics", get(metrics::get));
        r = r.route("/admin/calls/live", get(admin::live_calls));
        r = r.route("/admin/toolkits", get(console::toolkits));
        r = r.route(
            "/admin/toolkits/{toolkit}/tools/{tool}/formats",
            get(console::formats),
        );
        r = r.route(
            "/admin/toolkits/{toolkit}/tools/{tool}/call",
            post(console::call),
        );
        r = r.route(
            "/admin/toolkits/{toolkit}/tools/{tool}/app",
            post(console::app_start),
        );
        r = r.route("/admin/apps/{session_id}/action", post(console::app_action));
        r = r.route(
            "/admin/apps/{session_id}",
            axum::routing::delete(console::app_end),
        );
        r = r.route("/admin/oauth", get(console::oauth));
        r = r.route(
            "/admin/oauth/platforms/{platform_id}/connect",
            post(console::oauth_connect),
        );
        r = r.route(
            "/admin/oauth/connections/{id}",
            axum::routing::delete(console::oauth_revoke),
        );
        r = r.route("/admin/webhooks", get(console::webhooks));
        r = r.route(
            "/admin/webhooks/deliveries/{id}/resend",
            post(console::resend),
        );
        r = both(r, "/console", get(console::page));
        r = r.route("/console/console.js", get(console::script));
        r = r.route("/console/console.css", get(console::style));
        r = r.route("/admin/audit", get(audit::get));
        r.fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::disable())
            .with_state(self.state.clone())
    }

    /// Serves on `listener` until [`shutdown`](Self::shutdown): open
    /// WebSockets are closed with "going away", inbox polls and waiting
    /// requests are answered, then it returns.
    ///
    /// In dev mode the listener must be on a loopback address.
    pub async fn serve(&self, listener: TcpListener) -> Result<(), ServerError> {
        let addr = listener.local_addr()?;
        if self.state.config.dev && !addr.ip().is_loopback() {
            return Err(ServerError::DevModeNotLoopback(addr));
        }
        {
            let mut public = self
                .state
                .public_url
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if public.is_none() {
                *public = Some(format!("http://{addr}"));
            }
        }
        let has_platforms = !self
            .state
            .platforms
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        if has_platforms && self.state.config.public_url.is_none() && addr.ip().is_unspecified() {
            tracing::warn!(
                %addr,
                "OAuth callbacks will point at this unspecified address: set public_url"
            );
        }
        if self.state.config.dev {
            tracing::warn!(
                %addr,
                "DEV MODE: any API key is accepted; listening on loopback only"
            );
        }
        tracing::info!(%addr, "atp-server listening");
        webhooks::ensure_delivering(&self.state);
        self.state.audit.start();
        api_keys::ensure_refreshing(&self.state);
        listen::serve(
            listener,
            self.router(),
            self.state.shutdown.subscribe(),
            self.state.config.header_read_timeout,
        )
        .await?;
        // The audit rows of the calls served are written before `serve`
        // returns (5 s at most).
        if !self.state.audit.flush(AUDIT_FLUSH_AT_STOP).await {
            tracing::warn!("the audit log's last rows were not written within 5 s of stopping");
        }
        tracing::info!("atp-server stopped");
        Ok(())
    }

    /// Stops [`serve`](Self::serve).
    pub fn shutdown(&self) {
        self.state.shutdown.send_replace(true);
    }

    /// Waits until a toolkit named `app_name` is registered and a toolkit
    /// with its API key is connected (a WebSocket, or an inbox poll that is
    /// waiting now) to this server or, over NATS, to another — or
    /// `timeout` passes. Returns whether it is.
    pub async fn wait_until_served(&self, app_name: &str, timeout: Duration) -> bool {
        let mut changes = self.state.hub.subscribe();
        let check = || {
            self.state.toolkit(app_name).is_some_and(|k| {
                self.state.hub.is_live(&k.key_hash)
                    || self
                        .state
                        .bus
                        .as_ref()
                        .is_some_and(|b| b.served_elsewhere(&k.key_hash))
            })
        };
        tokio::time::timeout(timeout, async {
            loop {
                if check() {
                    return;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .is_ok()
    }

    /// Whether a toolkit named `app_name` is registered.
    pub fn is_registered(&self, app_name: &str) -> bool {
        self.state.toolkit(app_name).is_some()
    }

    /// Runs until Ctrl-C or SIGTERM: a convenience for `main`.
    pub async fn serve_until_ctrl_c(&self, listener: TcpListener) -> Result<(), ServerError> {
        let me = self.clone();
        tokio::spawn(async move {
            #[cfg(unix)]
            let term = async {
                use tokio::signal::unix::{SignalKind, signal};
                match signal(SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let term = std::future::pending::<()>();
            tokio::pin!(term);
            let why = tokio::select! {
                r = tokio::signal::ctrl_c() => match r {
                    Ok(()) => "Ctrl-C",
                    // No Ctrl-C handler here: SIGTERM still works.
                    Err(_) => {
                        (&mut term).await;
                        "SIGTERM"
                    }
                },
                () = &mut term => "SIGTERM",
            };
            tracing::info!("{why}: shutting down");
            me.shutdown();
        });
        self.serve(listener).await
    }

    /// Binds `addr` and serves until Ctrl-C or SIGTERM.
    pub async fn run(&self, addr: SocketAddr) -> Result<(), ServerError> {
        if self.state.config.dev && !addr.ip().is_loopback() {
            return Err(ServerError::DevModeNotLoopback(addr));
        }
        let listener = TcpListener::bind(addr).await?;
        self.serve_until_ctrl_c(listener).await
    }
}

async fn health() -> Response {
    json_response(StatusCode::OK, &atp_registry::wire::Status::ok())
}

/// Re-reads every registration from the database (another server may
/// have changed them).
pub(crate) async fn reload_toolkits(s: &Arc<State>) {
    match s.store.load_toolkits().await {
        Ok(kits) => {
            let fresh: HashMap<String, Arc<ToolkitRecord>> = kits
                .into_iter()
                .map(|k| (k.app_name.clone(), Arc::new(k)))
                .collect();
            *s.toolkits.write().unwrap_or_else(PoisonError::into_inner) = fresh;
            s.hub.touch();
        }
        Err(e) => tracing::warn!("could not re-read the registrations: {e}"),
    }
}

/// Re-reads one toolkit's registration from the database.
pub(crate) async fn reload_toolkit(s: &Arc<State>, app_name: &str) {
    match s.store.load_toolkit(app_name).await {
        Ok(kit) => {
            let mut kits = s.toolkits.write().unwrap_or_else(PoisonError::into_inner);
            match kit {
                Some(k) => kits.insert(app_name.to_owned(), Arc::new(k)),
                None => kits.remove(app_name),
            };
            drop(kits);
            s.hub.touch();
        }
        Err(e) => tracing::warn!(app = %app_name, "could not re-read a registration: {e}"),
    }
}

/// `GET /ready`: whether the database answers and (with NATS) the bus is
/// connected: 200 `{"status": "ok", "database": "ok", "bus": …}`, else
/// 503 with what is wrong. Each check is bounded by two seconds.
async fn ready(axum::extract::State(s): axum::extract::State<Arc<State>>) -> Response {
    let bound = Duration::from_secs(2);
    let database = match tokio::time::timeout(bound, s.store.ping()).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "the database did not answer within 2 s".to_owned(),
    };
    let bus = match &s.bus {
        None => "none".to_owned(),
        Some(b) => match b.ready(bound).await {
            Ok(()) => "ok".to_owned(),
            Err(e) => e,
        },
    };
    let ok = database == "ok" && (bus == "ok" || bus == "none");
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "unavailable" },
        "database": database,
        "bus": bus,
    });
    json_response(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &body,
    )
}

async fn not_found() -> Response {
    ApiError::not_found("not_found", "Not found").into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "Method not allowed",
    )
    .into_response()
}

/// Reads a body that must be a JSON object, within the message size
/// limit, and within the header read timeout: a client that sends a head
/// and then stalls its body is answered 408 instead of holding the
/// connection for ever.
pub(crate) async fn read_object(
    body: Body,
    config: &Config,
) -> Result<Map<String, Value>, ApiError> {
    let limit = config.max_message_size;
    let read = tokio::time::timeout(
        config.header_read_timeout,
        Limited::new(body, limit).collect(),
    );
    let Ok(read) = read.await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "The body did not arrive in time",
        ));
    };
    let bytes = match read {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("The body is larger than {limit} bytes"),
            ));
        }
        Err(_) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "The body could not be read",
            ));
        }
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request(
            "invalid_body",
            "The body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(
            "invalid_body",
            format!("The body is not valid JSON: {e}"),
        )),
    }
}

/// The frames of axum's WebSockets, for the session driver.
pub(crate) struct AxumFrames;

impl atp_registry::net::session::Frames for AxumFrames {
    type Message = axum::extract::ws::Message;
    type Text = axum::extract::ws::Utf8Bytes;

    fn text(text: String) -> Self::Message {
        Self::Message::Text(text.into())
    }

    fn ping() -> Self::Message {
        Self::Message::Ping(Default::default())
    }

    fn close(code: u16, reason: &'static str) -> Self::Message {
        Self::Message::Close(Some(axum::extract::ws::CloseFrame {
            code,
            reason: reason.into(),
        }))
    }

    fn read(message: Self::Message) -> atp_registry::net::session::Frame<Self::Text> {
        use atp_registry::net::session::Frame;
        match message {
            Self::Message::Text(t) => Frame::Text(t),
            Self::Message::Binary(_) => Frame::Binary,
            Self::Message::Close(c) => {
                Frame::Close(c.map(|c| c.reason.to_string()).unwrap_or_default())
            }
            _ => Frame::Control,
        }
    }
}

/// How the server's WebSockets run: its ping interval; on shutdown, no
/// grace (waiting callers are answered by the hub) and "going away".
pub(crate) fn session_options(config: &Config) -> atp_registry::net::session::SessionOptions {
    atp_registry::net::session::SessionOptions {
        ping_interval: config.ping_interval,
        grace_period: Duration::ZERO,
        stop_close: (1001, "server shutting down"),
    }
}

/// The close frame of a WebSocket whose API key was revoked (policy
/// violation).
pub(crate) const REVOKED_CLOSE: (u16, &str) = (1008, "API key revoked");

/// Completes when `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// A string field of a message, if it is one and not empty.
pub(crate) fn str_field<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    m.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// The answer to a WebSocket upgrade that is not one.
pub(crate) fn not_a_websocket() -> Response {
    let mut r = ApiError::bad_request(
        "websocket_required",
        "This endpoint takes a WebSocket upgrade",
    )
    .into_response();
    r.headers_mut().insert(
        header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    r
}
