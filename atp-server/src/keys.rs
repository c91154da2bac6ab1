//! API keys, random tokens and small helpers shared by the endpoints.

use std::{
    collections::HashMap,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use atp_registry::Secret;
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::config::Config;

/// The longest API key accepted, in bytes.
const MAX_KEY_LEN: usize = 512;

/// Which side a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Toolkit,
    Llm,
    /// The admin API and the console.
    Admin,
}

impl Role {
    /// The kind's name, as `atp-server keys create --kind` takes it and
    /// the database stores it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Toolkit => "toolkit",
            Role::Llm => "llm",
            Role::Admin => "admin",
        }
    }

    /// The kind of this name: `toolkit` or `llm` (admin keys are
    /// configured only).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "toolkit" => Some(Role::Toolkit),
            "llm" => Some(Role::Llm),
            _ => None,
        }
    }
}

/// A key kept in the database (`atp-server keys create`), as the server
/// holds it: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredKey {
    /// Its short public id.
    pub id: String,
    /// Which side it is for.
    pub role: Role,
    /// Its developer (the implicit developer when absent).
    pub developer: Option<String>,
    /// The toolkits it may call (an LLM key) or register (a toolkit key);
    /// empty: no restriction.
    pub scope: Vec<String>,
    /// Whether it was revoked.
    pub revoked: bool,
}

impl StoredKey {
    /// Whether its scope lets it reach the toolkit `app_name`.
    pub fn allows(&self, app_name: &str) -> bool {
        self.scope.is_empty() || self.scope.iter().any(|t| t == app_name)
    }
}

/// The accepted keys, or dev mode (any key).
#[derive(Debug)]
pub(crate) struct Keys {
    dev: bool,
    toolkit: Vec<Secret>,
    llm: Vec<Secret>,
    /// The database's keys by key hash, revoked ones included.
    stored: RwLock<HashMap<String, Arc<StoredKey>>>,
    /// Bumped whenever `stored` changes (sockets watch it for revocations).
    changes: watch::Sender<u64>,
    admin: Vec<Secret>,
}

impl Keys {
    /// The keys of `config`: its top-level `toolkit_api_keys` and
    /// `llm_api_keys`, and every developer's keys.
    pub fn new(config: &Config) -> Self {
        let devs = &config.developers;
        let mut keys = Self::from_lists(
            config.dev,
            config
                .toolkit_api_keys
                .iter()
                .chain(devs.iter().flat_map(|d| &d.toolkit_api_keys))
                .cloned()
                .collect(),
            config
                .llm_api_keys
                .iter()
                .chain(devs.iter().flat_map(|d| &d.llm_api_keys))
                .cloned()
                .collect(),
        );
        keys.admin = config.admin_api_keys.clone();
        keys
    }

    fn from_lists(dev: bool, toolkit: Vec<Secret>, llm: Vec<Secret>) -> Self {
        Self {
            dev,
            toolkit,
            llm,
            stored: RwLock::default(),
            changes: watch::Sender::new(0),
            admin: Vec::new(),
        }
    }

    /// Whether `presented` is a valid key for `role`: compared in constant
    /// time against every configured key, and looked up by its hash among
    /// the database's keys (a revoked one is refused, in dev mode too).
    pub fn check(&self, role: Role, presented: &str) -> bool {
        if presented.is_empty() || presented.len() > MAX_KEY_LEN {
            return false;
        }
        if let Some(k) = self.stored(&key_hash(presented)) {
            return k.role == role && !k.revoked;
        }
        if self.dev {
            return true;
        }
        let list = match role {
            Role::Toolkit => &self.toolkit,
            Role::Llm => &self.llm,
            Role::Admin => &self.admin,
        };
        list.iter()
            .fold(false, |ok, k| ok | k.matches(presented.as_bytes()))
    }

    /// The database's key with this hash, if it is one (revoked or not).
    pub fn stored(&self, key_hash: &str) -> Option<Arc<StoredKey>> {
        self.stored
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key_hash)
            .cloned()
    }

    /// Whether the key with this hash is a database key that was revoked.
    pub fn is_revoked(&self, key_hash: &str) -> bool {
        self.stored(key_hash).is_some_and(|k| k.revoked)
    }

    /// Replaces the database's keys (by key hash); tells the watchers when
    /// anything changed. Returns whether it did.
    pub fn set_stored(&self, keys: HashMap<String, StoredKey>) -> bool {
        let mut stored = self.stored.write().unwrap_or_else(PoisonError::into_inner);
        let same = stored.len() == keys.len()
            && keys
                .iter()
                .all(|(h, k)| stored.get(h).is_some_and(|old| **old == *k));
        if same {
            return false;
        }
        *stored = keys.into_iter().map(|(h, k)| (h, Arc::new(k))).collect();
        drop(stored);
        self.changes.send_modify(|n| *n += 1);
        true
    }

    /// Completes once the key with this hash is revoked (for a socket that
    /// authenticated with it); never for a key of the configuration.
    pub async fn revoked(&self, key_hash: &str) {
        let mut changes = self.changes.subscribe();
        loop {
            if self.is_revoked(key_hash) {
                return;
            }
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// What is stored and compared instead of a key: a SHA-256 of it, in hex.
pub(crate) fn key_hash(key: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"atp-server/key/v1\0");
    h.update(key.as_bytes());
    hex(&h.finalize())
}

/// How many hex digits of a key's hash make its key id.
const KEY_ID_LEN: usize = 12;

/// A key's id in the audit log and the admin API: the first 12 hex digits
/// of its [`key_hash`] (48 bits of a SHA-256: enough to tell keys apart,
/// and nothing to find the key from). `hash` is a [`key_hash`].
pub(crate) fn key_id(hash: &str) -> String {
    hash.get(..KEY_ID_LEN).unwrap_or(hash).to_owned()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` random bytes from the OS.
pub(crate) fn random_bytes(n: usize) -> Result<Vec<u8>, getrandom::Error> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf)?;
    Ok(buf)
}

/// A random URL-safe token of `n` random bytes (for OAuth states, PKCE
/// verifiers, exchange tokens).
pub(crate) fn random_token(n: usize) -> Result<String, getrandom::Error> {
    Ok(data_encoding::BASE64URL_NOPAD.encode(&random_bytes(n)?))
}

/// A UUID v4 (random; falls back to a unique time-and-counter id should the
/// OS refuse randomness).
pub(crate) fn uuid4() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        b[..8].copy_from_slice(&t.to_be_bytes());
        b[8..].copy_from_slice(&n.to_be_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A Unix time as RFC 3339 in UTC (`2025-01-31T12:00:00Z`).
pub(crate) fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since the Unix epoch of a civil date (Howard Hinnant's
/// days-from-civil), the inverse of [`rfc3339`]'s.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A time given as RFC 3339 in UTC (`2025-01-31T12:00:00Z`, with an
/// optional fraction of a second), in milliseconds since the Unix epoch;
/// `None` if it is not one.
pub(crate) fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let text = text.strip_suffix(['Z', 'z'])?;
    let (date, time) = text.split_once(['T', 't'])?;
    let num = |s: &str, len: usize| -> Option<i64> {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let mut d = date.split('-');
    let (year, month, day) = (num(d.next()?, 4)?, num(d.next()?, 2)?, num(d.next()?, 2)?);
    let (time, fraction) = match time.split_once('.') {
        Some((t, f)) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => (t, f),
        Some(_) => return None,
        None => (time, ""),
    };
    let mut t = time.split(':');
    let (hour, minute, second) = (num(t.next()?, 2)?, num(t.next()?, 2)?, num(t.next()?, 2)?);
    if d.next().is_some()
        || t.next().is_some()
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let millis: i64 = format!("{fraction:0<3}").get(..3)?.parse().ok()?;
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some(secs * 1000 + millis)
}

/// The key of `Authorization: Bearer KEY` (the scheme without regard to
/// case), as admins send it.
pub(crate) fn bearer_header(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, key) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

/// The key of `Authorization: ApiKey KEY` (the scheme without regard to
/// case).
pub(crate) fn api_key_header(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, key) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("apikey")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let k = Keys::from_lists(false, vec![Secret::new("tk")], vec![Secret::new("llm")]);
        assert!(k.check(Role::Toolkit, "tk"));
        assert!(!k.check(Role::Toolkit, "llm"));
        assert!(k.check(Role::Llm, "llm"));
        assert!(!k.check(Role::Llm, ""));
        let dev = Keys::from_lists(true, vec![], vec![]);
        assert!(dev.check(Role::Llm, "anything"));
        assert!(!dev.check(Role::Llm, ""));
        assert!(!dev.check(Role::Llm, &"x".repeat(600)));
        assert!(!k.check(Role::Admin, "tk"), "no admin keys: none accepted");
        assert!(dev.check(Role::Admin, "anything"));
        assert_ne!(key_hash("a"), key_hash("b"));
        assert_eq!(key_hash("a").len(), 64);
    }

    #[tokio::test]
    async fn database_keys_are_checked_and_revocations_are_watched() {
        let stored = |revoked| {
            HashMap::from([(
                key_hash("atpk_x"),
                StoredKey {
                    id: "kid_0123456789ab".into(),
                    role: Role::Llm,
                    developer: None,
                    scope: vec!["crm".into()],
                    revoked,
                },
            )])
        };
        for dev in [false, true] {
            let k = Keys::from_lists(dev, vec![], vec![]);
            assert!(k.set_stored(stored(false)));
            assert!(!k.set_stored(stored(false)), "no change, no news");
            assert!(k.check(Role::Llm, "atpk_x"));
            assert!(!k.check(Role::Toolkit, "atpk_x"), "its own kind only");
            assert!(
                k.stored(&key_hash("atpk_x"))
                    .is_some_and(|s| s.allows("crm") && !s.allows("hr"))
            );
            let hash = key_hash("atpk_x");
            let watching = k.revoked(&hash);
            tokio::pin!(watching);
            assert!(
                futures_util::FutureExt::now_or_never(&mut watching).is_none(),
                "not revoked yet"
            );
            assert!(k.set_stored(stored(true)));
            watching.await;
            assert!(
                !k.check(Role::Llm, "atpk_x"),
                "refused once revoked, dev mode too"
            );
        }
    }

    #[test]
    fn developers_keys_are_accepted() {
        let config = Config {
            toolkit_api_keys: vec![Secret::new("tk")],
            developers: vec![crate::config::Developer {
                display_name: "ada".into(),
                name: String::new(),
                bio: String::new(),
                toolkit_api_keys: vec![Secret::new("ada-tk")],
                llm_api_keys: vec![Secret::new("ada-llm")],
                public_toolkits: Vec::new(),
            }],
            ..Config::default()
        };
        let k = Keys::new(&config);
        assert!(k.check(Role::Toolkit, "tk"));
        assert!(k.check(Role::Toolkit, "ada-tk"));
        assert!(k.check(Role::Llm, "ada-llm"));
        assert!(!k.check(Role::Llm, "ada-tk"));
        assert!(!k.check(Role::Toolkit, "ada-llm"));
    }

    #[test]
    fn ids_and_times() {
        let u = uuid4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(uuid4(), u);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(random_token(32).expect("rng").len(), 43);
        for secs in [0, 951_782_400, 1_735_689_599, 4_102_444_800] {
            assert_eq!(parse_rfc3339_ms(&rfc3339(secs)), Some(secs * 1000));
        }
        assert_eq!(
            parse_rfc3339_ms("2024-12-31T23:59:59.25Z"),
            Some(1_735_689_599_250)
        );
        for bad in [
            "",
            "2024-12-31",
            "2024-12-31T23:59:59",
            "2024-13-01T00:00:00Z",
            "2024-12-31T24:00:00Z",
            "2024-12-31T23:59:59.Z",
            "+024-12-31T23:59:59Z",
            "2024-12-31T23:59:59+01:00",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
        assert_eq!(key_id(&key_hash("a")), key_hash("a")[..12]);
    }

    #[test]
    fn api_key_headers() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "apikey  k1 ".parse().expect("valid"));
        assert_eq!(api_key_header(&h), Some("k1"));
        h.insert("authorization", "Bearer k1".parse().expect("valid"));
        assert_eq!(api_key_header(&h), None);
    }
}
