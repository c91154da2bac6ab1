//! Secrets at rest: every secret the server keeps in its database — users'
//! OAuth access and refresh tokens, OAuth client secrets, webhook signing
//! secrets, toolkits' endpoint keys and the PKCE verifiers of pending
//! flows — is sealed with an AEAD before it is written and opened when it
//! is read (docs/OPERATIONS.md, "Secrets at rest").
//!
//! - **Cipher**: ChaCha20-Poly1305 from `ring` (`ring::aead`), with a
//!   fresh random 96-bit nonce from `ring::rand::SystemRandom` for every
//!   seal. `ring` is already in the tree (rustls, async-nats), so sealing
//!   adds no crate.
//! - **Stored form**: `sealed:v1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>`.
//!   The key id is 8 hex digits of a SHA-256 of the key, so a value names
//!   the key that sealed it and several keys can be configured during a
//!   rotation.
//! - **Owner binding**: the AEAD's associated data is the format version,
//!   the key id, the table, the column and the row's identity (its
//!   primary key: the LLM key hash, platform and user of a connection;
//!   the webhook id of a webhook secret…). A sealed value copied to
//!   another row, column or table does not open.
//!
//! A value that does not open is an error ([`SecretsError`]) naming the
//! column and the key id, never the value.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use atp_registry::Secret;
use ring::{
    aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};
use sha2::{Digest, Sha256};

use crate::config::{Config, DbLocation};

/// How every sealed value starts.
pub(crate) const SEALED_PREFIX: &str = "sealed:";
/// The format this server writes: `sealed:v1:`.
const V1_PREFIX: &str = "sealed:v1:";
/// The length of a key, in bytes.
const KEY_LEN: usize = 32;
/// The length of a key id, in hex digits.
const KEY_ID_LEN: usize = 8;

/// The command that makes a key, named by every error about a missing one.
pub(crate) const GENERATE_HINT: &str = "make one with `atp-server keys generate-secrets-key --out /etc/atp/secrets.key` and give it with --secrets-key-file PATH (or ATP_SECRETS_KEY_FILE, `secrets_key_file` in the configuration file, or the key itself in ATP_SECRETS_KEY); see docs/OPERATIONS.md";

/// Why a secrets key could not be used, or a stored secret could not be
/// sealed or opened. The text never holds a key or a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretsError {
    /// A key is not 32 bytes written in base64 or hex.
    #[error("invalid secrets key ({0}): a key is 32 random bytes in base64 or hex (64 hex digits)")]
    InvalidKey(String),
    /// A key file could not be read or written.
    #[error("secrets key file {path}: {why}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// Two configured keys have the same id.
    #[error("two configured secrets keys have the same id {0}: remove the repeated key")]
    DuplicateKey(String),
    /// No key is configured, and none may be generated.
    #[error("no secrets key configured ({0}): {GENERATE_HINT}")]
    NoKey(&'static str),
    /// A value was sealed under a key that is not configured.
    #[error(
        "{what}: the stored value was sealed under secrets key {key_id}, which is not configured (configure that key, or rotate to one that is: docs/OPERATIONS.md)"
    )]
    UnknownKey {
        /// The column (`table.column`).
        what: &'static str,
        /// The id of the key that sealed it.
        key_id: String,
    },
    /// A value does not open under the key it names.
    #[error(
        "{what}: the stored value does not open under secrets key {key_id}: it was altered, or copied from another row"
    )]
    Unopenable {
        /// The column (`table.column`).
        what: &'static str,
        /// The id of the key that should open it.
        key_id: String,
    },
    /// A stored value is not in a sealed form this server can read.
    #[error("{what}: the stored value is not a sealed value this server can read ({why})")]
    Malformed {
        /// The column (`table.column`).
        what: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A stored value is in plain text.
    #[error(
        "{what}: the stored value is not sealed (written in plain text since this server started?); a restart seals it"
    )]
    NotSealed {
        /// The column (`table.column`).
        what: &'static str,
    },
    /// The system random number generator failed, or the value is too
    /// long to seal.
    #[error("a secret could not be sealed: {0}")]
    Seal(&'static str),
}

/// A 32-byte key that seals the secrets the server stores
/// (ChaCha20-Poly1305).
///
/// Its `Debug` output shows only its id: the first 8 hex digits of a
/// SHA-256 of the key, which every value it seals carries.
///
/// ```
/// use atp_server::SecretsKey;
///
/// let key = SecretsKey::generate()?;
/// let same = SecretsKey::parse(key.expose())?;
/// assert_eq!(key.id(), same.id());
/// assert!(!format!("{key:?}").contains(key.expose()));
/// # Ok::<(), atp_server::SecretsError>(())
/// ```
#[derive(Clone)]
pub struct SecretsKey {
    key: LessSafeKey,
    /// The key in base64: what a key file holds.
    encoded: Secret,
    id: String,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SecretsKey {
    /// A new random key (from the operating system's generator).
    pub fn generate() -> Result<Self, SecretsError> {
        let mut bytes = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SecretsError::Seal("the system random number generator failed"))?;
        Self::from_bytes(&bytes)
    }

    /// Reads a key written in base64 (standard or URL-safe, with or
    /// without padding) or hex (64 digits); spaces around it are ignored.
    pub fn parse(text: &str) -> Result<Self, SecretsError> {
        let text = text.trim();
        let hex = text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit());
        let decoded = if hex {
            data_encoding::HEXLOWER_PERMISSIVE
                .decode(text.as_bytes())
                .ok()
        } else {
            [
                &data_encoding::BASE64,
                &data_encoding::BASE64_NOPAD,
                &data_encoding::BASE64URL,
                &data_encoding::BASE64URL_NOPAD,
            ]
            .into_iter()
            .find_map(|encoding| encoding.decode(text.as_bytes()).ok())
        };
        match decoded {
            Some(bytes) if bytes.len() == KEY_LEN => Self::from_bytes(&bytes),
            Some(bytes) => Err(SecretsError::InvalidKey(format!(
                "it is {} bytes long",
                bytes.len()
            ))),
            None if text.is_empty() => Err(SecretsError::InvalidKey("it is empty".into())),
            None => Err(SecretsError::InvalidKey(
                "it is neither base64 nor hex".into(),
            )),
        }
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, SecretsError> {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, bytes)
            .map_err(|_| SecretsError::InvalidKey(format!("it is {} bytes long", bytes.len())))?;
        let mut h = Sha256::new();
        h.update(b"atp-server/secrets-key-id/v1\0");
        h.update(bytes);
        let id = crate::keys::hex(&h.finalize()[..KEY_ID_LEN / 2]);
        Ok(Self {
            key: LessSafeKey::new(unbound),
            encoded: Secret::new(data_encoding::BASE64.encode(bytes)),
            id,
        })
    }

    /// The key's id: 8 hex digits, the same for the same key. It is not
    /// secret (it is in every value the key seals, and in the logs).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key in base64, as a key file holds it. Never log it.
    pub fn expose(&self) -> &str {
        self.encoded.expose()
    }

    /// Reads a key file: one key a line (base64 or hex), blank lines and
    /// lines starting with `#` skipped. The first key seals; the others
    /// only open values sealed under them (during a rotation).
    pub fn read_file(path: &Path) -> Result<Vec<Self>, SecretsError> {
        let file_error = |why: String| SecretsError::KeyFile {
            path: path.to_path_buf(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            keys.push(Self::parse(line).map_err(|e| file_error(format!("line {}: {e}", n + 1)))?);
        }
        if keys.is_empty() {
            return Err(file_error("it holds no key".into()));
        }
        Ok(keys)
    }

    /// Writes the key to a new file that only its owner may read (0600 on
    /// Unix); an existing file is never overwritten.
    pub fn write_file(&self, path: &Path) -> Result<(), SecretsError> {
        use std::io::Write;
        let file_error = |e: std::io::Error| SecretsError::KeyFile {
            path: path.to_path_buf(),
            why: e.to_string(),
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(file_error)?;
        writeln!(
            file,
            "# atp-server secrets key {} (docs/OPERATIONS.md)",
            self.id
        )
        .and_then(|()| writeln!(file, "{}", self.expose()))
        .and_then(|()| file.sync_all())
        .map_err(file_error)
    }
}

/// A column that holds sealed values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Field {
    /// `oauth_connections.access_token`
    AccessToken,
    /// `oauth_connections.refresh_token`
    RefreshToken,
    /// `oauth_platforms.config`'s `client_secret`
    ClientSecret,
    /// `webhooks.secret`
    WebhookSecret,
    /// `toolkits.endpoint_key`
    EndpointKey,
    /// `oauth_states.code_verifier`
    CodeVerifier,
}

impl Field {
    /// The columns that are sealed whole (the client secret is a field of
    /// a JSON column).
    pub const COLUMNS: [Field; 5] = [
        Field::AccessToken,
        Field::RefreshToken,
        Field::WebhookSecret,
        Field::EndpointKey,
        Field::CodeVerifier,
    ];

    /// The table.
    pub fn table(self) -> &'static str {
        match self {
            Field::AccessToken | Field::RefreshToken => "oauth_connections",
            Field::ClientSecret => "oauth_platforms",
            Field::WebhookSecret => "webhooks",
            Field::EndpointKey => "toolkits",
            Field::CodeVerifier => "oauth_states",
        }
    }

    /// The column.
    pub fn column(self) -> &'static str {
        match self {
            Field::AccessToken => "access_token",
            Field::RefreshToken => "refresh_token",
            Field::ClientSecret => "config",
            Field::WebhookSecret => "secret",
            Field::EndpointKey => "endpoint_key",
            Field::CodeVerifier => "code_verifier",
        }
    }

    /// `table.column`, for errors and logs.
    pub fn name(self) -> &'static str {
        match self {
            Field::AccessToken => "oauth_connections.access_token",
            Field::RefreshToken => "oauth_connections.refresh_token",
            Field::ClientSecret => "oauth_platforms.config.client_secret",
            Field::WebhookSecret => "webhooks.secret",
            Field::EndpointKey => "toolkits.endpoint_key",
            Field::CodeVerifier => "oauth_states.code_verifier",
        }
    }

    /// The columns that name a row (its primary key): the owner a sealed
    /// value is bound to.
    pub fn row_key(self) -> &'static [&'static str] {
        match self {
            Field::AccessToken | Field::RefreshToken => {
                &["llm_key_hash", "platform_id", "external_user_id"]
            }
            Field::ClientSecret => &["id"],
            Field::WebhookSecret => &["webhook_id"],
            Field::EndpointKey => &["app_name"],
            Field::CodeVerifier => &["state"],
        }
    }
}

/// The associated data of a value: what it is bound to. Every part is
/// length-prefixed, so no two owners give the same bytes.
fn aad(key_id: &str, field: Field, row: &[&str]) -> Vec<u8> {
    let mut out = b"atp-server/sealed/v1\0".to_vec();
    for part in [key_id, field.table(), field.name()]
        .into_iter()
        .chain(row.iter().copied())
    {
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out
}

/// Whether a stored value is sealed (of any version).
pub(crate) fn is_sealed(stored: &str) -> bool {
    stored.starts_with(SEALED_PREFIX)
}

/// The id of the key a `v1` value names, if it is one.
pub(crate) fn key_id_of(stored: &str) -> Option<&str> {
    let id = stored.strip_prefix(V1_PREFIX)?.split(':').next()?;
    (id.len() == KEY_ID_LEN && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// What a pass over the stored secrets does with each value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Seals the values stored in plain text (by a server from before
    /// sealing); sealed ones stay as they are.
    SealPlaintext,
    /// Seals every value under the sealing key: values sealed under
    /// another configured key are opened and sealed again, plain ones
    /// sealed.
    Rotate,
}

/// The keys a server seals and opens with: the first seals, every one
/// opens.
pub(crate) struct Keyring {
    sealing: SecretsKey,
    others: Vec<SecretsKey>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("sealing", &self.sealing.id)
            .field(
                "others",
                &self.others.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Keyring {
    /// A keyring of `keys`: the first seals. Refuses none, and two keys
    /// with one id.
    pub fn new(keys: Vec<SecretsKey>) -> Result<Self, SecretsError> {
        let mut keys = keys.into_iter();
        let Some(sealing) = keys.next() else {
            return Err(SecretsError::NoKey("an empty list of keys"));
        };
        let mut others: Vec<SecretsKey> = Vec::new();
        for k in keys {
            if k.id == sealing.id || others.iter().any(|o| o.id == k.id) {
                // The same key twice (a key file that also lists the
                // current key) is harmless; two keys with one id are not.
                if k.expose() == sealing.expose() || others.iter().any(|o| o.expose() == k.expose())
                {
                    continue;
                }
                return Err(SecretsError::DuplicateKey(k.id));
            }
            others.push(k);
        }
        Ok(Self {
            sealing,
            others,
            rng: SystemRandom::new(),
        })
    }

    /// A keyring of one key that exists only in this process (an
    /// in-memory database, whose secrets die with it).
    pub fn ephemeral() -> Result<Self, SecretsError> {
        Self::new(vec![SecretsKey::generate()?])
    }

    /// The keys of a configuration: [`Config::secrets_keys`], then the
    /// keys of [`Config::secrets_key_file`]. Without any: an in-memory
    /// database gets a key of this process; in dev mode a SQLite database
    /// gets a generated key file beside it (logged at WARN); otherwise
    /// the server can not start.
    pub fn for_config(config: &Config) -> Result<Self, SecretsError> {
        let mut keys = config.secrets_keys.clone();
        if let Some(path) = &config.secrets_key_file {
            warn_if_readable_by_others(path);
            keys.extend(SecretsKey::read_file(path)?);
        }
        if !keys.is_empty() {
            let ring = Self::new(keys)?;
            tracing::info!(
                sealing_key = %ring.sealing.id,
                opening_keys = ring.others.len() + 1,
                "secrets at rest are sealed (ChaCha20-Poly1305)"
            );
            return Ok(ring);
        }
        match &config.db {
            DbLocation::Memory => {
                tracing::debug!(
                    "in-memory database: its secrets are sealed under a key that lives only in this process"
                );
                Self::ephemeral()
            }
            DbLocation::File(db) if config.dev => Self::new(dev_key(db)?),
            DbLocation::File(_) => Err(SecretsError::NoKey(
                "outside dev mode a SQLite database needs one",
            )),
            DbLocation::Postgres(_) => Err(SecretsError::NoKey(
                "a PostgreSQL database needs one, the same on every server sharing it",
            )),
        }
    }

    /// The id of the sealing key.
    pub fn sealing_id(&self) -> &str {
        &self.sealing.id
    }

    /// Whether a key with this id is configured.
    pub fn knows(&self, key_id: &str) -> bool {
        self.key(key_id).is_some()
    }

    fn key(&self, key_id: &str) -> Option<&SecretsKey> {
        std::iter::once(&self.sealing)
            .chain(&self.others)
            .find(|k| k.id == key_id)
    }

    /// Seals `plaintext`, bound to `field` of the row `row` (its primary
    /// key's values, in [`Field::row_key`] order).
    pub fn seal(
        &self,
        field: Field,
        row: &[&str],
        plaintext: &str,
    ) -> Result<String, SecretsError> {
        let key = &self.sealing;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| SecretsError::Seal("the system random number generator failed"))?;
        let mut sealed = plaintext.as_bytes().to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(&key.id, field, row)),
                &mut sealed,
            )
            .map_err(|_| SecretsError::Seal("the value is too long"))?;
        let mut data = Vec::with_capacity(NONCE_LEN + sealed.len());
        data.extend_from_slice(&nonce);
        data.extend_from_slice(&sealed);
        Ok(format!(
            "{V1_PREFIX}{}:{}",
            key.id,
            data_encoding::BASE64URL_NOPAD.encode(&data)
        ))
    }

    /// Opens a value [`seal`](Self::seal)ed for `field` of the row `row`.
    pub fn open(&self, field: Field, row: &[&str], stored: &str) -> Result<Secret, SecretsError> {
        let what = field.name();
        let malformed = |why| SecretsError::Malformed { what, why };
        if !is_sealed(stored) {
            return Err(SecretsError::NotSealed { what });
        }
        let Some(rest) = stored.strip_prefix(V1_PREFIX) else {
            return Err(malformed("an unknown format version"));
        };
        let Some(key_id) = key_id_of(stored) else {
            return Err(malformed("no key id"));
        };
        let data = rest
            .get(KEY_ID_LEN..)
            .and_then(|d| d.strip_prefix(':'))
            .ok_or_else(|| malformed("no data after the key id"))?;
        let Some(key) = self.key(key_id) else {
            return Err(SecretsError::UnknownKey {
                what,
                key_id: key_id.to_owned(),
            });
        };
        let data = data_encoding::BASE64URL_NOPAD
            .decode(data.as_bytes())
            .map_err(|_| malformed("its data is not base64url"))?;
        if data.len() < NONCE_LEN + aead::CHACHA20_POLY1305.tag_len() {
            return Err(malformed("its data is too short"));
        }
        let (nonce, sealed) = data.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| malformed("no nonce"))?;
        let mut sealed = sealed.to_vec();
        let opened = key
            .key
            .open_in_place(nonce, Aad::from(aad(key_id, field, row)), &mut sealed)
            .map_err(|_| SecretsError::Unopenable {
                what,
                key_id: key_id.to_owned(),
            })?;
        let text = std::str::from_utf8(opened).map_err(|_| malformed("it is not UTF-8 text"))?;
        Ok(Secret::new(text))
    }

    /// [`seal`](Self::seal) of an optional value.
    pub fn seal_opt(
        &self,
        field: Field,
        row: &[&str],
        plaintext: Option<&Secret>,
    ) -> Result<Option<String>, SecretsError> {
        plaintext
            .map(|p| self.seal(field, row, p.expose()))
            .transpose()
    }

    /// [`open`](Self::open) of an optional value.
    pub fn open_opt(
        &self,
        field: Field,
        row: &[&str],
        stored: Option<&str>,
    ) -> Result<Option<Secret>, SecretsError> {
        stored.map(|s| self.open(field, row, s)).transpose()
    }

    /// What `pass` makes of a stored value: its new stored form, or `None`
    /// when it stays.
    pub fn reseal(
        &self,
        pass: Pass,
        field: Field,
        row: &[&str],
        stored: &str,
    ) -> Result<Option<String>, SecretsError> {
        match pass {
            Pass::SealPlaintext if is_sealed(stored) => Ok(None),
            Pass::SealPlaintext => self.seal(field, row, stored).map(Some),
            Pass::Rotate if key_id_of(stored) == Some(self.sealing_id()) => Ok(None),
            Pass::Rotate if is_sealed(stored) => {
                let plain = self.open(field, row, stored)?;
                self.seal(field, row, plain.expose()).map(Some)
            }
            Pass::Rotate => self.seal(field, row, stored).map(Some),
        }
    }
}

/// What a pass over the stored secrets did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PassReport {
    /// How many values it wrote, by column.
    pub resealed: BTreeMap<Field, usize>,
    /// How many values are sealed under keys that are not configured, by
    /// key id (counted by the start-up pass only).
    pub unknown_keys: BTreeMap<String, usize>,
}

impl PassReport {
    /// How many values it wrote.
    pub fn total(&self) -> usize {
        self.resealed.values().sum()
    }

    /// Counts one value written.
    pub fn wrote(&mut self, field: Field) {
        *self.resealed.entry(field).or_default() += 1;
    }

    /// Counts `n` values sealed under `key_id`, if that key is unknown.
    pub fn sealed_under(&mut self, keyring: &Keyring, key_id: &str, n: usize) {
        if n > 0 && !keyring.knows(key_id) {
            *self.unknown_keys.entry(key_id.to_owned()).or_default() += n;
        }
    }

    /// Logs what the start-up pass found: a count, never a value.
    pub fn log_startup(&self) {
        if self.total() > 0 {
            tracing::info!(
                sealed = self.total(),
                "sealed the secrets an earlier version stored in plain text (a one-time pass)"
            );
        }
        for (key_id, n) in &self.unknown_keys {
            tracing::error!(
                key_id = %key_id,
                values = n,
                "stored secrets are sealed under a secrets key that is not configured: they can not be opened (configure that key; docs/OPERATIONS.md)"
            );
        }
    }
}

/// What [`rotate_secrets`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RotationReport {
    /// The id of the key every stored secret is sealed under now.
    pub key_id: String,
    /// How many values were sealed again, by column (`table.column`);
    /// values already sealed under the new key stay as they are.
    pub resealed: Vec<(&'static str, usize)>,
}

impl RotationReport {
    /// How many values were sealed again.
    pub fn total(&self) -> usize {
        self.resealed.iter().map(|(_, n)| n).sum()
    }
}

/// Seals every secret stored in `db` again under the first key of `new`,
/// opening them with the `current` keys (and `new`'s), in one
/// transaction: either every value is under the new key afterwards, or
/// nothing changed (a value that does not open is an error naming its
/// column and key id). Values stored in plain text are sealed too.
///
/// Afterwards the server needs only `new`: the old keys can be removed.
/// Servers running meanwhile must already have `new` among their keys
/// (docs/OPERATIONS.md, "Rotating the key").
///
/// `atp-server keys rotate-secrets` runs this.
pub async fn rotate_secrets(
    db: &DbLocation,
    current: Vec<SecretsKey>,
    new: Vec<SecretsKey>,
) -> Result<RotationReport, crate::ServerError> {
    if matches!(db, DbLocation::Memory) {
        return Err(crate::ServerError::Config(
            "an in-memory database keeps no secrets to rotate: give --db FILE or a PostgreSQL URL"
                .into(),
        ));
    }
    if new.is_empty() {
        return Err(SecretsError::NoKey("no new key given").into());
    }
    let keyring = std::sync::Arc::new(Keyring::new(new.into_iter().chain(current).collect())?);
    let store = crate::store::Store::connect(db, keyring.clone()).await?;
    let resealed = store.reseal(Pass::Rotate).await;
    let entry = crate::audit::Entry::admin(
        crate::audit::Via::Cli,
        "keys rotate-secrets",
        Some(keyring.sealing_id()),
        resealed.as_ref().err().map(|_| "rotation_failed"),
    );
    if let Err(e) = crate::audit::record_now(&store, entry).await {
        tracing::warn!("the rotation could not be recorded in the audit log: {e}");
    }
    let report = resealed?;
    tracing::info!(
        key_id = %keyring.sealing_id(),
        resealed = report.total(),
        "stored secrets sealed under the new key"
    );
    Ok(RotationReport {
        key_id: keyring.sealing_id().to_owned(),
        resealed: report
            .resealed
            .iter()
            .map(|(field, n)| (field.name(), *n))
            .collect(),
    })
}

/// The key file dev mode generates beside a SQLite database without a
/// configured secrets key: `<database>.secrets-key`.
///
/// ```
/// let path = atp_server::dev_secrets_key_path(std::path::Path::new("/var/lib/atp/atp.sqlite3"));
/// assert_eq!(path, std::path::Path::new("/var/lib/atp/atp.sqlite3.secrets-key"));
/// ```
pub fn dev_secrets_key_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".secrets-key");
    db.with_file_name(name)
}

/// Dev mode without a key: the key file beside the database, made the
/// first time.
fn dev_key(db: &Path) -> Result<Vec<SecretsKey>, SecretsError> {
    let path = dev_secrets_key_path(db);
    if path.exists() {
        let keys = SecretsKey::read_file(&path)?;
        tracing::warn!(
            path = %path.display(),
            "DEV MODE: no secrets key configured; sealing stored secrets with the generated key file beside the database"
        );
        return Ok(keys);
    }
    let key = SecretsKey::generate()?;
    match key.write_file(&path) {
        Ok(()) => {
            tracing::warn!(
                path = %path.display(),
                key_id = %key.id(),
                "DEV MODE: no secrets key configured; generated a key file beside the database to seal stored secrets (keep it with the database; outside dev mode configure secrets_key_file)"
            );
            Ok(vec![key])
        }
        // Made by another process meanwhile: use theirs.
        Err(_) if path.exists() => SecretsKey::read_file(&path),
        Err(e) => Err(e),
    }
}

/// Warns when a key file may be read by other users (Unix).
fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                "the secrets key file may be read by other users: chmod 600 it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SecretsKey {
        SecretsKey::from_bytes(&[byte; KEY_LEN]).expect("a key")
    }

    fn ring(keys: &[u8]) -> Keyring {
        Keyring::new(keys.iter().map(|b| key(*b)).collect()).expect("a keyring")
    }

    const ROW: [&str; 3] = ["llm-hash", "hubspot", "ada@example.com"];

    #[test]
    fn seals_and_opens() {
        let k = ring(&[1]);
        let sealed = k
            .seal(Field::AccessToken, &ROW, "tok-SECRET-1")
            .expect("seal");
        assert!(
            sealed.starts_with(&format!("sealed:v1:{}:", k.sealing_id())),
            "{sealed}"
        );
        assert!(!sealed.contains("tok-SECRET-1"));
        assert_eq!(key_id_of(&sealed), Some(k.sealing_id()));
        let opened = k.open(Field::AccessToken, &ROW, &sealed).expect("open");
        assert_eq!(opened.expose(), "tok-SECRET-1");
        // Fresh nonces: the same value seals differently each time.
        let again = k
            .seal(Field::AccessToken, &ROW, "tok-SECRET-1")
            .expect("seal");
        assert_ne!(sealed, again);
        // The empty string and long or non-ASCII text round-trip.
        for text in ["", "é ✓", &"x".repeat(10_000)] {
            let s = k.seal(Field::WebhookSecret, &["w1"], text).expect("seal");
            assert_eq!(
                k.open(Field::WebhookSecret, &["w1"], &s)
                    .expect("open")
                    .expose(),
                text
            );
        }
    }

    #[test]
    fn a_value_opens_only_for_its_owner() {
        let k = ring(&[1]);
        let sealed = k
            .seal(Field::AccessToken, &ROW, "tok-SECRET-2")
            .expect("seal");
        let unopenable = |field: Field, row: &[&str]| {
            let e = k.open(field, row, &sealed).expect_err("must not open");
            assert!(
                matches!(e, SecretsError::Unopenable { .. }),
                "{field:?} {row:?}: {e}"
            );
            let text = format!("{e} {e:?}");
            assert!(
                !text.contains("tok-SECRET-2") && !text.contains(&sealed),
                "{text}"
            );
        };
        // Another user, platform or LLM key; another column; another table.
        unopenable(Field::AccessToken, &["llm-hash", "hubspot", "bob"]);
        unopenable(
            Field::AccessToken,
            &["llm-hash", "github", "ada@example.com"],
        );
        unopenable(Field::AccessToken, &["other", "hubspot", "ada@example.com"]);
        unopenable(Field::RefreshToken, &ROW);
        unopenable(Field::WebhookSecret, &["llm-hash"]);
        // Parts are length-prefixed: moving a byte between them is another owner.
        unopenable(
            Field::AccessToken,
            &["llm-hashh", "ubspot", "ada@example.com"],
        );
        unopenable(Field::AccessToken, &["llm-hash", "hubspot"]);
    }

    #[test]
    fn tampering_is_detected() {
        let k = ring(&[1]);
        let sealed = k.seal(Field::EndpointKey, &["crm"], "ek").expect("seal");
        let (head, data) = sealed.rsplit_once(':').expect("data");
        let bytes = data_encoding::BASE64URL_NOPAD
            .decode(data.as_bytes())
            .expect("base64");
        // Every byte: nonce, ciphertext and tag.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            let forged = format!("{head}:{}", data_encoding::BASE64URL_NOPAD.encode(&b));
            assert!(
                matches!(
                    k.open(Field::EndpointKey, &["crm"], &forged),
                    Err(SecretsError::Unopenable { .. })
                ),
                "byte {i}"
            );
        }
        let cases = [
            (format!("{head}:{}", &data[..data.len() - 4]), "truncated"),
            (format!("{head}:{data}!"), "not base64"),
            (format!("{head}:"), "empty"),
            (format!("{head}:AAAA"), "too short"),
            (sealed.replacen("v1", "v2", 1), "unknown version"),
            (sealed.replacen(k.sealing_id(), "zzzzzzzz", 1), "bad id"),
            ("sealed:v1".into(), "no id"),
        ];
        for (forged, what) in cases {
            let e = k
                .open(Field::EndpointKey, &["crm"], &forged)
                .expect_err(what);
            assert!(
                matches!(
                    e,
                    SecretsError::Malformed { .. } | SecretsError::Unopenable { .. }
                ),
                "{what}: {e}"
            );
        }
        assert!(matches!(
            k.open(Field::EndpointKey, &["crm"], "ek"),
            Err(SecretsError::NotSealed { .. })
        ));
    }

    #[test]
    fn keys_are_found_by_id() {
        let a = ring(&[1]);
        let b = ring(&[2]);
        let sealed = a.seal(Field::CodeVerifier, &["st"], "v").expect("seal");
        let e = b
            .open(Field::CodeVerifier, &["st"], &sealed)
            .expect_err("not B's");
        assert!(
            matches!(&e, SecretsError::UnknownKey { key_id, .. } if key_id == a.sealing_id()),
            "{e}"
        );
        assert!(e.to_string().contains("oauth_states.code_verifier"), "{e}");
        // B seals, A still opens: the rotation window.
        let both = ring(&[2, 1]);
        assert_eq!(
            both.open(Field::CodeVerifier, &["st"], &sealed)
                .expect("open")
                .expose(),
            "v"
        );
        assert_eq!(both.sealing_id(), b.sealing_id());
        // A key with a forged id (another key's id in the value) fails.
        let forged = sealed.replacen(a.sealing_id(), b.sealing_id(), 1);
        assert!(matches!(
            both.open(Field::CodeVerifier, &["st"], &forged),
            Err(SecretsError::Unopenable { .. })
        ));
    }

    #[test]
    fn passes_seal_plain_values_and_rotate_sealed_ones() {
        let a = ring(&[1]);
        let sealed_a = a.seal(Field::RefreshToken, &ROW, "r").expect("seal");
        assert_eq!(
            a.reseal(Pass::SealPlaintext, Field::RefreshToken, &ROW, &sealed_a)
                .expect("pass"),
            None
        );
        let plain = a
            .reseal(Pass::SealPlaintext, Field::RefreshToken, &ROW, "r")
            .expect("pass")
            .expect("sealed");
        assert_eq!(
            a.open(Field::RefreshToken, &ROW, &plain)
                .expect("open")
                .expose(),
            "r"
        );
        let b_then_a = ring(&[2, 1]);
        let rotated = b_then_a
            .reseal(Pass::Rotate, Field::RefreshToken, &ROW, &sealed_a)
            .expect("rotate")
            .expect("resealed");
        assert_eq!(key_id_of(&rotated), Some(b_then_a.sealing_id()));
        assert_eq!(
            b_then_a
                .reseal(Pass::Rotate, Field::RefreshToken, &ROW, &rotated)
                .expect("rotate"),
            None,
            "already under the new key"
        );
        let b = ring(&[2]);
        assert_eq!(
            b.open(Field::RefreshToken, &ROW, &rotated)
                .expect("open")
                .expose(),
            "r"
        );
        // A value under a key not given can not be rotated.
        assert!(matches!(
            b.reseal(Pass::Rotate, Field::RefreshToken, &ROW, &sealed_a),
            Err(SecretsError::UnknownKey { .. })
        ));
    }

    #[test]
    fn keys_parse_from_base64_and_hex_and_never_show() {
        let k = key(7);
        let hex = crate::keys::hex(&[7; KEY_LEN]);
        for text in [
            k.expose().to_owned(),
            format!("  {}\n", k.expose()),
            k.expose().trim_end_matches('=').to_owned(),
            data_encoding::BASE64URL.encode(&[7; KEY_LEN]),
            hex.clone(),
            hex.to_uppercase(),
        ] {
            assert_eq!(SecretsKey::parse(&text).expect(&text).id(), k.id());
        }
        assert_eq!(k.id().len(), 8);
        assert_ne!(k.id(), key(8).id());
        let short = data_encoding::BASE64.encode(&[7; 16]);
        for bad in ["", "not a key at all!", short.as_str(), &hex[..62]] {
            let e = SecretsKey::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("32 random bytes"), "{e}");
            if !bad.is_empty() {
                assert!(!e.contains(bad), "{e}");
            }
        }
        let debug = format!("{k:?} {:?}", ring(&[7, 8]));
        assert!(debug.contains(k.id()), "{debug}");
        assert!(
            !debug.contains(k.expose()) && !debug.contains(&hex),
            "{debug}"
        );
        // A key repeated is harmless; another key with the same id is not
        // constructible here, but the same key twice is skipped.
        assert!(Keyring::new(vec![key(1), key(1), key(2)]).is_ok());
        assert!(matches!(
            Keyring::new(Vec::new()),
            Err(SecretsError::NoKey(_))
        ));
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "atp-secrets-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn key_files() {
        let dir = temp_dir("files");
        let path = dir.join("secrets.key");
        let k = key(3);
        k.write_file(&path).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(
            k.write_file(&path).is_err(),
            "an existing file is never overwritten"
        );
        let read = SecretsKey::read_file(&path).expect("read");
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].id(), k.id());
        // Several keys: the first seals.
        let two = dir.join("two.key");
        std::fs::write(
            &two,
            format!("# new\n{}\n\n# old\n{}\n", key(4).expose(), k.expose()),
        )
        .expect("write");
        let keys = SecretsKey::read_file(&two).expect("read");
        assert_eq!(
            keys.iter().map(SecretsKey::id).collect::<Vec<_>>(),
            [key(4).id(), k.id()]
        );
        std::fs::write(&two, "# nothing\n").expect("write");
        assert!(SecretsKey::read_file(&two).is_err());
        std::fs::write(&two, format!("{}\nnope\n", k.expose())).expect("write");
        let e = SecretsKey::read_file(&two).expect_err("line 2").to_string();
        assert!(e.contains("line 2") && !e.contains(k.expose()), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn which_key_a_configuration_gets() {
        let dir = temp_dir("config");
        let db = dir.join("atp.sqlite3");
        // Outside dev mode, no key: a clear refusal naming the command.
        let file = Config::default().with_db(DbLocation::File(db.clone()));
        let e = Keyring::for_config(&file).expect_err("no key").to_string();
        assert!(e.contains("atp-server keys generate-secrets-key"), "{e}");
        let pg = Config::dev().with_db(DbLocation::Postgres("postgres://x@h/db".into()));
        assert!(matches!(
            Keyring::for_config(&pg),
            Err(SecretsError::NoKey(_))
        ));
        // In memory: a key of this process.
        assert!(Keyring::for_config(&Config::default().with_db(DbLocation::Memory)).is_ok());
        // Dev mode: a key file beside the database, made once, then reused.
        let dev = Config::dev().with_db(DbLocation::File(db.clone()));
        let first = Keyring::for_config(&dev).expect("dev key");
        let path = dev_secrets_key_path(&db);
        assert_eq!(path, dir.join("atp.sqlite3.secrets-key"));
        assert!(path.is_file());
        let again = Keyring::for_config(&dev).expect("dev key");
        assert_eq!(first.sealing_id(), again.sealing_id());
        // Configured keys: listed ones first, then the file's.
        let configured = Config {
            secrets_keys: vec![key(5)],
            secrets_key_file: Some(path),
            ..file
        };
        let ring = Keyring::for_config(&configured).expect("keys");
        assert_eq!(ring.sealing_id(), key(5).id());
        assert!(ring.knows(first.sealing_id()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
