//! The server's settings: address, database, API keys, timeouts and OAuth
//! platforms, from code or from a TOML file.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use atp_registry::Secret;
use serde::Deserialize;

use crate::{error::ServerError, secrets::SecretsKey};

/// The address `atp-server` listens on by default.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);

/// The database file used by default.
pub const DEFAULT_DB: &str = "atp-server.sqlite3";

/// A NATS server's URL (`nats://[user:password@]host:port`, several
/// comma-separated for a cluster). Its credentials never show in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsUrl(pub String);

impl std::fmt::Debug for NatsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self.0.split(',').map(|u| redact_url(u.trim())).collect();
        f.debug_tuple("NatsUrl").field(&shown.join(",")).finish()
    }
}

/// Where the state lives.
#[derive(Clone, PartialEq, Eq)]
pub enum DbLocation {
    /// A SQLite file (created if absent).
    File(PathBuf),
    /// An in-memory database: everything is lost when the server stops.
    Memory,
    /// A PostgreSQL database, by its `postgres://` (or `postgresql://`)
    /// URL, shared by any number of servers. Its password never shows in
    /// `Debug`.
    Postgres(String),
}

impl std::fmt::Debug for DbLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbLocation::File(p) => f.debug_tuple("File").field(p).finish(),
            DbLocation::Memory => f.write_str("Memory"),
            DbLocation::Postgres(url) => f.debug_tuple("Postgres").field(&redact_url(url)).finish(),
        }
    }
}

/// A URL without its password (`user:***@host`), for logs and `Debug`;
/// a key=value connection string is not shown at all.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<connection string>".into();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let tail = if tail.contains("password") {
                "?***"
            } else {
                tail
            };
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None if tail.contains("password") => format!("{scheme}://{authority}?***"),
        None => url.to_owned(),
    }
}

impl DbLocation {
    /// `:memory:` is [`DbLocation::Memory`]; a `postgres://` or
    /// `postgresql://` URL is [`DbLocation::Postgres`]; anything else is a
    /// SQLite file path.
    pub fn parse(s: &str) -> Self {
        if s == ":memory:" {
            DbLocation::Memory
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            DbLocation::Postgres(s.to_owned())
        } else {
            DbLocation::File(PathBuf::from(s))
        }
    }
}

/// An OAuth2 provider the server can connect users to (docs/PROTOCOL.md §6): the
/// `platform_id` of `oauth/confirmation/{platform_id}/`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OAuthPlatform {
    /// The `platform_id` in URLs.
    pub id: String,
    /// The `auth_provider` of the tools whose calls get this platform's
    /// tokens (the platform id when absent).
    #[serde(default)]
    pub provider: Option<String>,
    /// A display name (the provider name when absent).
    #[serde(default)]
    pub name: Option<String>,
    /// The provider's authorization endpoint.
    pub authorize_url: String,
    /// The provider's token endpoint.
    pub token_url: String,
    /// The OAuth client id.
    pub client_id: String,
    /// The OAuth client secret (sent only to `token_url`).
    #[serde(with = "secret_serde")]
    pub client_secret: Secret,
    /// The scopes to ask for.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Extra query parameters for the authorization URL (e.g.
    /// `access_type = "offline"`).
    #[serde(default)]
    pub extra_authorize_params: Vec<(String, String)>,
}

impl OAuthPlatform {
    /// The `auth_provider` this platform serves.
    pub fn provider(&self) -> &str {
        self.provider.as_deref().unwrap_or(&self.id)
    }
}

mod secret_serde {
    use atp_registry::Secret;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret::new)
    }

    pub fn serialize<S: Serializer>(s: &Secret, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s.expose())
    }
}

/// Everything the server needs to run.
///
/// ```
/// use atp_server::{Config, DbLocation};
///
/// let config = Config::dev().with_db(DbLocation::Memory);
/// assert!(config.dev);
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    /// The address to listen on (`127.0.0.1:8080` by default).
    pub addr: SocketAddr,
    /// The database: a SQLite file (`atp-server.sqlite3` by default) or a
    /// PostgreSQL URL, which several servers may share.
    pub db: DbLocation,
    /// The NATS server that servers sharing a PostgreSQL database route
    /// calls over (`nats://host:4222`); `None`: this server is alone. Its
    /// password or token never shows in `Debug`.
    pub nats_url: Option<NatsUrl>,
    /// Dev mode: any API key is accepted, and the server only binds to a
    /// loopback address.
    pub dev: bool,
    /// The accepted toolkit API keys (when not in dev mode).
    pub toolkit_api_keys: Vec<Secret>,
    /// The accepted LLM-client API keys (when not in dev mode).
    pub llm_api_keys: Vec<Secret>,
    /// The admin keys: the admin API (`/admin/...`) and the console
    /// (`/console`) ask for one as `Authorization: Bearer KEY`. With none,
    /// both are off outside dev mode; in dev mode (loopback only) they are
    /// open.
    pub admin_api_keys: Vec<Secret>,
    /// How long a `task_request` waits for the toolkit (120 s by default).
    pub task_timeout: Duration,
    /// How long an inbox poll is held open while the inbox is empty
    /// (10 s by default; a client may ask for less with `?wait=SECONDS`).
    pub inbox_wait: Duration,
    /// How long after its last poll an inbox toolkit still counts as
    /// connected (90 s by default: the Python client polls every 30 s).
    pub inbox_presence: Duration,
    /// How often toolkit WebSockets are pinged (30 s by default); one
    /// silent for two intervals is closed.
    pub ping_interval: Duration,
    /// The largest request body or WebSocket message (16 MiB by default).
    pub max_message_size: usize,
    /// How long a connection may take to send a whole request head (30 s
    /// by default); a slower or silent one is closed (slowloris).
    pub header_read_timeout: Duration,
    /// The URL the server is reached at, for the OAuth callback
    /// (`http://{addr}` by default).
    pub public_url: Option<String>,
    /// The OAuth platforms (added to the ones already in the database).
    pub oauth_platforms: Vec<OAuthPlatform>,
    /// How long after it started an OAuth flow's callback is still
    /// accepted (an hour by default; whole seconds, at least one). A later
    /// callback is refused (400 `invalid_state`), and the user starts
    /// again.
    pub oauth_flow_lifetime: Duration,
    /// The developers: who owns which toolkit and LLM keys, and which of
    /// their toolkits are public in the store (docs/PROTOCOL.md §9). Their
    /// keys are accepted keys too.
    ///
    /// The top-level `toolkit_api_keys` and `llm_api_keys` belong to an
    /// implicit developer named `default` (`dev` in dev mode), so a
    /// single-tenant configuration keeps seeing its own toolkits in
    /// `developers/toolkits/` and `store/toolkits/{id}/`; configure a
    /// developer with that `display_name` to give it a name, a bio and
    /// public toolkits (it then owns the top-level keys as well as its
    /// own; unconfigured, it has none public). In
    /// dev mode every key that no configured developer owns (with none
    /// configured: every key) belongs to one developer named `dev`, so
    /// everything is "mine".
    ///
    /// [`validate`](Self::validate) refuses empty or repeated display
    /// names, a key owned by two developers (the top-level lists count as
    /// the implicit developer's), and `public_toolkits` that are not valid
    /// toolkit names.
    pub developers: Vec<Developer>,
    /// Webhook deliveries: how long to wait for a receiver (10 s by
    /// default).
    pub webhook_timeout: Duration,
    /// Webhook deliveries: the first wait before a retry (1 s by default;
    /// it doubles on each failure, up to 10 minutes, with jitter).
    pub webhook_retry_base: Duration,
    /// Webhook deliveries: how many attempts before a delivery is given up
    /// (12 by default).
    pub webhook_max_attempts: u32,
    /// The bearer token `GET /metrics` asks for. Unset, the endpoint is
    /// off (404) — except in dev mode, where it is open (loopback only).
    pub metrics_token: Option<Secret>,
    /// The keys that seal the secrets the server stores (OAuth tokens and
    /// client secrets, webhook secrets, endpoint keys): the first seals,
    /// every one opens (docs/OPERATIONS.md, "Secrets at rest"). The keys
    /// of [`secrets_key_file`](Self::secrets_key_file) come after these.
    ///
    /// With none at all, an in-memory database gets a key that lives only
    /// in the process; in dev mode, a SQLite file gets a generated key
    /// file beside it (`<db>.secrets-key`, logged at WARN); otherwise the
    /// server refuses to start. `Debug` shows only the keys' ids.
    pub secrets_keys: Vec<SecretsKey>,
    /// A file of secrets keys, one a line (base64 or hex of 32 bytes; the
    /// first seals, the others only open), read when the server starts.
    pub secrets_key_file: Option<PathBuf>,
    /// How many days the audit log keeps its rows (30 by default, 1 to
    /// 36500): older ones are purged every hour (docs/OPERATIONS.md,
    /// "Audit log").
    pub audit_retention_days: u32,
    /// The toolkits (by `app_name`) whose calls' arguments and results
    /// the audit log keeps (none by default: only who called what, when,
    /// and how it ended). Even for these, an `auth_token` is never kept.
    pub audit_payloads: Vec<String>,
    /// Dev mode when no API key is configured and the database holds
    /// none in force either (what `atp-server` does without keys; false
    /// by default). Decided once, when the server starts.
    pub dev_without_keys: bool,
    /// How often the database's API keys (`atp-server keys create`) are
    /// read again (1 s by default): a key made or revoked from the
    /// command line takes effect on every server within this bound.
    pub api_keys_refresh: Duration,
    /// The rate limits of tool calls (none by default).
    pub rate_limits: RateLimits,
}

/// Limits on tool calls, per instance (docs/OPERATIONS.md, "Rate
/// limits"): each LLM key and each toolkit has its own counters; a
/// limit left unset does not apply.
///
/// ```
/// let config = atp_server::Config::from_toml(r#"
///     [rate_limits.per_key]
///     calls_per_second = 10
///     burst = 20
///     max_concurrent = 4
///     [rate_limits.toolkits.crm]
///     max_request_bytes = 65536
/// "#).unwrap();
/// let limits = &config.rate_limits;
/// assert_eq!(limits.for_key(Some("kid_0123456789ab")).burst, Some(20));
/// assert_eq!(limits.for_toolkit("crm").max_request_bytes, Some(65536));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// The limits of each LLM key's calls, all toolkits together.
    #[serde(default)]
    pub per_key: Limit,
    /// The limits of each toolkit's calls, all callers together.
    #[serde(default)]
    pub per_toolkit: Limit,
    /// Per-key overrides, by key id (`atp-server keys list`): a field set
    /// here replaces `per_key`'s.
    #[serde(default)]
    pub keys: std::collections::BTreeMap<String, Limit>,
    /// Per-toolkit overrides, by toolkit name: a field set here replaces
    /// `per_toolkit`'s.
    #[serde(default)]
    pub toolkits: std::collections::BTreeMap<String, Limit>,
}

/// One set of limits; unset fields do not limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Calls a second, sustained (a fraction for fewer than one).
    pub calls_per_second: Option<f64>,
    /// Calls that may come at once above the rate (the bucket's size;
    /// `calls_per_second` rounded up, at least 1, by default).
    pub burst: Option<u32>,
    /// Calls in flight at once.
    pub max_concurrent: Option<u32>,
    /// The largest arguments of a call, in bytes of JSON.
    pub max_request_bytes: Option<usize>,
}

impl Limit {
    /// This limit with the fields `over` sets replaced.
    fn with(self, over: &Limit) -> Limit {
        Limit {
            calls_per_second: over.calls_per_second.or(self.calls_per_second),
            burst: over.burst.or(self.burst),
            max_concurrent: over.max_concurrent.or(self.max_concurrent),
            max_request_bytes: over.max_request_bytes.or(self.max_request_bytes),
        }
    }

    fn validate(&self, name: &str) -> Result<(), ServerError> {
        if let Some(r) = self.calls_per_second
            && !(r.is_finite() && r > 0.0 && r <= 1_000_000.0)
        {
            return Err(ServerError::Config(format!(
                "{name}.calls_per_second must be above 0 and at most 1000000"
            )));
        }
        if self.burst.is_some() && self.calls_per_second.is_none() {
            return Err(ServerError::Config(format!(
                "{name}.burst needs calls_per_second"
            )));
        }
        if self.burst == Some(0)
            || self.max_concurrent == Some(0)
            || self.max_request_bytes == Some(0)
        {
            return Err(ServerError::Config(format!(
                "{name}: burst, max_concurrent and max_request_bytes must be at least 1"
            )));
        }
        Ok(())
    }
}

impl RateLimits {
    /// The limits of a key: `per_key`, with the overrides of its id (a
    /// key of the configuration has none).
    pub fn for_key(&self, key_id: Option<&str>) -> Limit {
        match key_id.and_then(|id| self.keys.get(id)) {
            Some(over) => self.per_key.with(over),
            None => self.per_key,
        }
    }

    /// The limits of a toolkit: `per_toolkit`, with its overrides.
    pub fn for_toolkit(&self, toolkit: &str) -> Limit {
        match self.toolkits.get(toolkit) {
            Some(over) => self.per_toolkit.with(over),
            None => self.per_toolkit,
        }
    }

    /// Checks every limit, and the names of the overrides.
    pub fn validate(&self) -> Result<(), ServerError> {
        self.per_key.validate("rate_limits.per_key")?;
        self.per_toolkit.validate("rate_limits.per_toolkit")?;
        for id in self.keys.keys() {
            let is_id = id.len() == 16
                && id.starts_with("kid_")
                && id[4..].bytes().all(|b| b.is_ascii_hexdigit());
            if !is_id {
                return Err(ServerError::Config(format!(
                    "rate_limits.keys: {id:?} is not a key id (kid_ and 12 hex digits, see `atp-server keys list`)"
                )));
            }
            self.for_key(Some(id))
                .validate(&format!("rate_limits.keys.{id}"))?;
        }
        for name in self.toolkits.keys() {
            if !atp_registry::is_valid_toolkit_name(name) {
                return Err(ServerError::Config(format!(
                    "rate_limits.toolkits: {name:?} is not a toolkit name"
                )));
            }
            self.for_toolkit(name)
                .validate(&format!("rate_limits.toolkits.{name}"))?;
        }
        Ok(())
    }
}

/// How many days the audit log keeps its rows by default.
pub const DEFAULT_AUDIT_RETENTION_DAYS: u32 = 30;

/// The longest audit retention, in days (a hundred years).
const MAX_AUDIT_RETENTION_DAYS: u32 = 36_500;

/// The developer who owns the top-level `toolkit_api_keys` and
/// `llm_api_keys` (see [`Config::developers`]).
pub(crate) const IMPLICIT_DEVELOPER: &str = "default";

/// In dev mode, the developer who owns every key no configured developer
/// owns (see [`Config::developers`]).
pub(crate) const DEV_DEVELOPER: &str = "dev";

/// The longest developer display name, in characters.
const MAX_DISPLAY_NAME_LEN: usize = 128;

/// A developer: the owner of toolkit and LLM keys (docs/PROTOCOL.md §9).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Developer {
    /// The name in store URLs (`store/developers/{display_name}/`):
    /// unique, 1-128 characters, no `/`, no control characters, no spaces
    /// at either end.
    pub display_name: String,
    /// Their full name.
    #[serde(default)]
    pub name: String,
    /// A line about them.
    #[serde(default)]
    pub bio: String,
    /// Their toolkits' API keys.
    #[serde(default, deserialize_with = "secrets")]
    pub toolkit_api_keys: Vec<Secret>,
    /// Their LLM-client API keys.
    #[serde(default, deserialize_with = "secrets")]
    pub llm_api_keys: Vec<Secret>,
    /// Their toolkits (by `app_name`) that every key may see in the store;
    /// the others are private.
    #[serde(default)]
    pub public_toolkits: Vec<String>,
}

fn secrets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    Vec::<String>::deserialize(d).map(|v| v.into_iter().map(Secret::new).collect())
}

impl Default for Config {
    fn default() -> Self {
        Self {
            addr: DEFAULT_ADDR,
            db: DbLocation::File(PathBuf::from(DEFAULT_DB)),
            nats_url: None,
            dev: false,
            toolkit_api_keys: Vec::new(),
            llm_api_keys: Vec::new(),
            admin_api_keys: Vec::new(),
            task_timeout: Duration::from_secs(120),
            inbox_wait: Duration::from_secs(10),
            inbox_presence: Duration::from_secs(90),
            ping_interval: Duration::from_secs(30),
            max_message_size: 16 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(30),
            public_url: None,
            oauth_platforms: Vec::new(),
            oauth_flow_lifetime: Duration::from_secs(3600),
            developers: Vec::new(),
            webhook_timeout: Duration::from_secs(10),
            webhook_retry_base: Duration::from_secs(1),
            webhook_max_attempts: 12,
            metrics_token: None,
            secrets_keys: Vec::new(),
            secrets_key_file: None,
            audit_retention_days: DEFAULT_AUDIT_RETENTION_DAYS,
            audit_payloads: Vec::new(),
            dev_without_keys: false,
            api_keys_refresh: Duration::from_secs(1),
            rate_limits: RateLimits::default(),
        }
    }
}

/// The TOML file's shape; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    addr: Option<SocketAddr>,
    db: Option<String>,
    nats_url: Option<String>,
    dev: Option<bool>,
    #[serde(default)]
    toolkit_api_keys: Vec<String>,
    #[serde(default)]
    llm_api_keys: Vec<String>,
    #[serde(default)]
    admin_api_keys: Vec<String>,
    task_timeout_secs: Option<f64>,
    inbox_wait_secs: Option<f64>,
    inbox_presence_secs: Option<f64>,
    ping_interval_secs: Option<f64>,
    max_message_size: Option<usize>,
    header_read_timeout_secs: Option<f64>,
    public_url: Option<String>,
    #[serde(default)]
    oauth_platforms: Vec<OAuthPlatform>,
    oauth_flow_lifetime_secs: Option<u64>,
    #[serde(default)]
    developers: Vec<Developer>,
    webhook_timeout_secs: Option<f64>,
    webhook_retry_base_secs: Option<f64>,
    webhook_max_attempts: Option<u32>,
    metrics_token: Option<String>,
    secrets_key_file: Option<PathBuf>,
    audit_retention_days: Option<u32>,
    #[serde(default)]
    audit_payloads: Vec<String>,
    api_keys_refresh_secs: Option<f64>,
    #[serde(default)]
    rate_limits: RateLimits,
}

/// The longest duration a setting may have (a year): far beyond any
/// sensible timeout, and far from where `Instant + Duration` overflows.
const MAX_SETTING: Duration = Duration::from_secs(365 * 24 * 3600);

fn secs(name: &str, v: f64) -> Result<Duration, ServerError> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero() && *d <= MAX_SETTING)
        .ok_or_else(|| {
            ServerError::Config(format!(
                "{name} must be a positive number of seconds, at most a year"
            ))
        })
}

impl Config {
    /// Dev mode with the defaults: any API key, loopback only.
    pub fn dev() -> Self {
        Self {
            dev: true,
            ..Self::default()
        }
    }

    /// Sets the database.
    pub fn with_db(mut self, db: DbLocation) -> Self {
        self.db = db;
        self
    }

    /// Reads a TOML file (see the README for its keys) over the defaults.
    pub fn load(path: &Path) -> Result<Self, ServerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServerError::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    /// Parses TOML settings over the defaults.
    ///
    /// ```
    /// let config = atp_server::Config::from_toml(r#"
    ///     addr = "127.0.0.1:9000"
    ///     db = ":memory:"
    ///     toolkit_api_keys = ["tk-1"]
    ///     llm_api_keys = ["llm-1"]
    ///     task_timeout_secs = 30
    /// "#).unwrap();
    /// assert_eq!(config.addr.port(), 9000);
    /// assert_eq!(config.task_timeout.as_secs(), 30);
    /// ```
    pub fn from_toml(text: &str) -> Result<Self, ServerError> {
        let file: FileConfig =
            toml::from_str(text).map_err(|e| ServerError::Config(e.message().to_owned()))?;
        let mut c = Self::default();
        if let Some(a) = file.addr {
            c.addr = a;
        }
        if let Some(db) = file.db {
            c.db = DbLocation::parse(&db);
        }
        c.dev = file.dev.unwrap_or(false);
        c.toolkit_api_keys = file.toolkit_api_keys.into_iter().map(Secret::new).collect();
        c.llm_api_keys = file.llm_api_keys.into_iter().map(Secret::new).collect();
        c.admin_api_keys = file.admin_api_keys.into_iter().map(Secret::new).collect();
        if let Some(v) = file.task_timeout_secs {
            c.task_timeout = secs("task_timeout_secs", v)?;
        }
        if let Some(v) = file.inbox_wait_secs {
            c.inbox_wait = secs("inbox_wait_secs", v)?;
        }
        if let Some(v) = file.inbox_presence_secs {
            c.inbox_presence = secs("inbox_presence_secs", v)?;
        }
        if let Some(v) = file.ping_interval_secs {
            c.ping_interval = secs("ping_interval_secs", v)?;
        }
        if let Some(v) = file.header_read_timeout_secs {
            c.header_read_timeout = secs("header_read_timeout_secs", v)?;
        }
        if let Some(v) = file.max_message_size {
            c.max_message_size = v.max(1024);
        }
        c.public_url = file.public_url;
        c.nats_url = file.nats_url.map(NatsUrl);
        c.oauth_platforms = file.oauth_platforms;
        if let Some(v) = file.oauth_flow_lifetime_secs {
            let d = Duration::from_secs(v);
            if v == 0 || d > MAX_SETTING {
                return Err(ServerError::Config(
                    "oauth_flow_lifetime_secs must be a whole number of seconds, from 1 to a year"
                        .into(),
                ));
            }
            c.oauth_flow_lifetime = d;
        }
        c.developers = file.developers;
        if let Some(v) = file.webhook_timeout_secs {
            c.webhook_timeout = secs("webhook_timeout_secs", v)?;
        }
        if let Some(v) = file.webhook_retry_base_secs {
            c.webhook_retry_base = secs("webhook_retry_base_secs", v)?;
        }
        if let Some(v) = file.webhook_max_attempts {
            c.webhook_max_attempts = v.max(1);
        }
        c.metrics_token = file.metrics_token.map(Secret::new);
        c.secrets_key_file = file.secrets_key_file;
        if let Some(days) = file.audit_retention_days {
            c.audit_retention_days = days;
        }
        c.audit_payloads = file.audit_payloads;
        if let Some(v) = file.api_keys_refresh_secs {
            c.api_keys_refresh = secs("api_keys_refresh_secs", v)?;
        }
        c.rate_limits = file.rate_limits;
        c.validate()?;
        Ok(c)
    }

    /// Checks the settings that can be checked before starting.
    pub fn validate(&self) -> Result<(), ServerError> {
        if let Some(url) = &self.nats_url
            && url.0.split(',').any(|u| {
                let u = u.trim();
                !(u.starts_with("nats://") || u.starts_with("tls://") || !u.contains("://"))
            })
        {
            return Err(ServerError::Config(
                "nats_url must be nats://host:port (or several, comma-separated)".into(),
            ));
        }
        if self.nats_url.is_some() && !matches!(self.db, DbLocation::Postgres(_)) {
            return Err(ServerError::Config(
                "servers that share work over NATS must share their state too: give a postgres:// database with nats_url".into(),
            ));
        }
        for (name, d) in [
            ("task_timeout", self.task_timeout),
            ("inbox_wait", self.inbox_wait),
            ("inbox_presence", self.inbox_presence),
            ("ping_interval", self.ping_interval),
            ("header_read_timeout", self.header_read_timeout),
            ("webhook_timeout", self.webhook_timeout),
            ("webhook_retry_base", self.webhook_retry_base),
            ("api_keys_refresh", self.api_keys_refresh),
        ] {
            if d > MAX_SETTING {
                return Err(ServerError::Config(format!("{name} is longer than a year")));
            }
        }
        for key in self.toolkit_api_keys.iter().chain(&self.llm_api_keys) {
            if key.is_empty() {
                return Err(ServerError::Config("an API key is empty".into()));
            }
        }
        if self.admin_api_keys.iter().any(|k| k.expose().len() < 16) {
            return Err(ServerError::Config(
                "admin_api_keys must be at least 16 characters each".into(),
            ));
        }
        let api_keys = || {
            self.toolkit_api_keys
                .iter()
                .chain(&self.llm_api_keys)
                .chain(
                    self.developers
                        .iter()
                        .flat_map(|d| d.toolkit_api_keys.iter().chain(&d.llm_api_keys)),
                )
        };
        if self
            .admin_api_keys
            .iter()
            .any(|a| api_keys().any(|k| k.expose() == a.expose()))
        {
            return Err(ServerError::Config(
                "an admin key is also a toolkit or LLM key: give admins keys of their own".into(),
            ));
        }
        if self
            .metrics_token
            .as_ref()
            .is_some_and(|t| t.expose().len() < 16)
        {
            return Err(ServerError::Config(
                "metrics_token must be at least 16 characters".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.oauth_platforms {
            if p.id.is_empty() || !seen.insert(p.id.as_str()) {
                return Err(ServerError::Config(format!(
                    "OAuth platform ids must be unique and non-empty: {:?}",
                    p.id
                )));
            }
            for url in [&p.authorize_url, &p.token_url] {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(ServerError::Config(format!(
                        "OAuth platform {:?}: {url:?} is not an http(s) URL",
                        p.id
                    )));
                }
            }
        }
        self.validate_developers()?;
        if !(1..=MAX_AUDIT_RETENTION_DAYS).contains(&self.audit_retention_days) {
            return Err(ServerError::Config(format!(
                "audit_retention_days must be 1 to {MAX_AUDIT_RETENTION_DAYS}, not {}",
                self.audit_retention_days
            )));
        }
        if let Some(bad) = self
            .audit_payloads
            .iter()
            .find(|t| !atp_registry::is_valid_toolkit_name(t))
        {
            return Err(ServerError::Config(format!(
                "audit_payloads entry {bad:?} is not a toolkit name (1-128 characters from A-Z a-z 0-9 _ - .)"
            )));
        }
        self.rate_limits.validate()?;
        if self.api_keys_refresh.is_zero() {
            return Err(ServerError::Config(
                "api_keys_refresh must be above zero".into(),
            ));
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ServerError::Config(
                "public_url must start with http:// or https://".into(),
            ));
        }
        Ok(())
    }

    /// The name of the developer who owns the top-level keys (and, in dev
    /// mode, every key no configured developer owns).
    pub(crate) fn implicit_developer(&self) -> &'static str {
        if self.dev {
            DEV_DEVELOPER
        } else {
            IMPLICIT_DEVELOPER
        }
    }

    fn validate_developers(&self) -> Result<(), ServerError> {
        let mut names = std::collections::HashSet::new();
        for d in &self.developers {
            let n = &d.display_name;
            let valid = (1..=MAX_DISPLAY_NAME_LEN).contains(&n.chars().count())
                && n.trim() == n
                && !n.chars().any(|c| c == '/' || c.is_control());
            if !valid {
                return Err(ServerError::Config(format!(
                    "developer display names must be 1-{MAX_DISPLAY_NAME_LEN} characters without '/', control characters or surrounding spaces: {n:?}"
                )));
            }
            if !names.insert(n.as_str()) {
                return Err(ServerError::Config(format!(
                    "developer display names must be unique: {n:?} is used twice"
                )));
            }
            if d.toolkit_api_keys
                .iter()
                .chain(&d.llm_api_keys)
                .any(Secret::is_empty)
            {
                return Err(ServerError::Config(format!(
                    "developer {n:?}: an API key is empty"
                )));
            }
            if let Some(bad) = d
                .public_toolkits
                .iter()
                .find(|t| !atp_registry::is_valid_toolkit_name(t))
            {
                return Err(ServerError::Config(format!(
                    "developer {n:?}: public_toolkits entry {bad:?} is not a toolkit name (1-128 characters from A-Z a-z 0-9 _ - .)"
                )));
            }
        }
        // Each key has one owner: compared by value, named in errors only
        // by its owners.
        let implicit = self.implicit_developer();
        let mut owners: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
        let top = self
            .toolkit_api_keys
            .iter()
            .chain(&self.llm_api_keys)
            .map(|k| (implicit, k));
        let listed = self.developers.iter().flat_map(|d| {
            d.toolkit_api_keys
                .iter()
                .chain(&d.llm_api_keys)
                .map(move |k| (d.display_name.as_str(), k))
        });
        for (owner, key) in top.chain(listed) {
            match owners.insert(key.expose(), owner) {
                Some(other) if other != owner => {
                    return Err(ServerError::Config(format!(
                        "an API key is owned by two developers, {other:?} and {owner:?} (the top-level key lists belong to {implicit:?})"
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether any API key is configured.
    pub fn has_keys(&self) -> bool {
        !self.toolkit_api_keys.is_empty()
            || !self.llm_api_keys.is_empty()
            || self
                .developers
                .iter()
                .any(|d| !d.toolkit_api_keys.is_empty() || !d.llm_api_keys.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_platforms() {
        let c = Config::from_toml(
            r#"
            toolkit_api_keys = ["a"]
            [[oauth_platforms]]
            id = "hub"
            provider = "hubspot"
            authorize_url = "https://example.com/auth"
            token_url = "https://example.com/token"
            client_id = "cid"
            client_secret = "very-secret"
            scopes = ["x", "y"]
            "#,
        )
        .expect("valid");
        assert_eq!(c.oauth_platforms[0].provider(), "hubspot");
        assert!(!format!("{c:?}").contains("very-secret"));
        assert!(Config::from_toml("nope = 1").is_err());
        assert!(Config::from_toml("task_timeout_secs = -1").is_err());
        assert!(Config::from_toml("task_timeout_secs = 1e19").is_err());
        let huge = Config {
            inbox_presence: Duration::from_secs(u64::MAX / 4),
            ..Config::default()
        };
        assert!(huge.validate().is_err());
        assert!(Config::from_toml("toolkit_api_keys = [\"\"]").is_err());
        assert_eq!(
            Config::default().oauth_flow_lifetime,
            Duration::from_secs(3600)
        );
        let short = Config::from_toml("oauth_flow_lifetime_secs = 5").expect("valid");
        assert_eq!(short.oauth_flow_lifetime, Duration::from_secs(5));
        for bad in ["0", "-1", "1.5", "99999999999"] {
            assert!(
                Config::from_toml(&format!("oauth_flow_lifetime_secs = {bad}")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn audit_settings() {
        let c = Config::from_toml("audit_retention_days = 7\naudit_payloads = [\"crm.v2\"]")
            .expect("valid");
        assert_eq!(c.audit_retention_days, 7);
        assert_eq!(c.audit_payloads, ["crm.v2"]);
        assert_eq!(
            Config::default().audit_retention_days,
            DEFAULT_AUDIT_RETENTION_DAYS
        );
        for bad in [
            "audit_retention_days = 0",
            "audit_retention_days = 40000",
            "audit_payloads = [\"no way\"]",
        ] {
            let e = Config::from_toml(bad).expect_err(bad).to_string();
            assert!(e.contains("audit_"), "{bad}: {e}");
        }
    }

    #[test]
    fn developers_are_checked() {
        let ok = Config::from_toml(
            r#"
            toolkit_api_keys = ["top-tk"]
            [[developers]]
            display_name = "ada"
            toolkit_api_keys = ["ada-tk"]
            llm_api_keys = ["ada-llm"]
            public_toolkits = ["crm.v2"]
            [[developers]]
            display_name = "default"
            toolkit_api_keys = ["top-tk"]
            "#,
        )
        .expect("valid");
        assert_eq!(ok.developers.len(), 2);
        assert!(!format!("{ok:?}").contains("ada-tk"));
        let refused = |toml: &str, needle: &str| {
            let e = Config::from_toml(toml).expect_err(toml).to_string();
            assert!(e.contains(needle), "{e}");
            assert!(!e.contains("shared-key"), "{e}");
        };
        refused(
            "[[developers]]\ndisplay_name = \"\"",
            "display names must be 1-128",
        );
        refused(
            "[[developers]]\ndisplay_name = \"a/b\"",
            "display names must be 1-128",
        );
        refused(
            "[[developers]]\ndisplay_name = \"a\"\n[[developers]]\ndisplay_name = \"a\"",
            "unique",
        );
        refused(
            "[[developers]]\ndisplay_name = \"a\"\nllm_api_keys = [\"\"]",
            "empty",
        );
        refused(
            "[[developers]]\ndisplay_name = \"a\"\npublic_toolkits = [\"no way\"]",
            "public_toolkits",
        );
        refused(
            "[[developers]]\ndisplay_name = \"a\"\ntoolkit_api_keys = [\"shared-key\"]\n[[developers]]\ndisplay_name = \"b\"\nllm_api_keys = [\"shared-key\"]",
            "owned by two developers",
        );
        refused(
            "llm_api_keys = [\"shared-key\"]\n[[developers]]\ndisplay_name = \"a\"\nllm_api_keys = [\"shared-key\"]",
            "owned by two developers",
        );
    }
}
