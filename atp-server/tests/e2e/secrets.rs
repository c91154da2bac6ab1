//! Secrets at rest (docs/OPERATIONS.md): after a real OAuth flow (the
//! local provider), a webhook registration and an endpoint toolkit's
//! registration, the raw database — SQLite's files, PostgreSQL's columns
//! and data directory — holds no token, client secret, webhook secret,
//! endpoint key, PKCE verifier or API key; a sealed token moved to another
//! user's row does not open; `atp-server keys rotate-secrets` moves every
//! secret to a new key, after which a server with only the new key reads
//! them and one with only the old key fails clearly; and the binary's key
//! handling (no key, dev mode, `keys generate-secrets-key`).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use atp_registry::llm::LlmProtocol;
use atp_server::{Config, DbLocation, SecretsKey};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::{
    common::*,
    infra::{self, blocking},
    oauth_provider::{self, Provider, location},
};

/// The prefix of every token the provider issues here, and of its client
/// secret: distinct bytes to grep for.
const TAG: &str = "SECRET-51e7-";
const LLM: &str = "/api/v1/atp/llm-client";
const PLATFORM: &str = "local-app";

async fn provider() -> Provider {
    Provider::start(oauth_provider::Options {
        scopes: &["read"],
        tag: TAG,
        ..Default::default()
    })
    .await
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "atp-server-secrets-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn llm_auth() -> String {
    format!("ApiKey {LLM_KEY}")
}

/// Connects `user` to the provider's platform through `server`: the
/// authorization URL, the provider's redirect, the server's callback.
async fn connect(server: &TestServer, user: &str) {
    let started = server
        .llm(LlmProtocol::Http)
        .initiate_oauth_connection(PLATFORM, user, None)
        .await
        .expect("initiate");
    let auth_url = started["authorization_url"].as_str().expect("url");
    let (status, headers, _) = http("GET", auth_url, &[], None).await;
    assert_eq!(status, 302);
    let (status, _, body) = http("GET", &location(&headers), &[], None).await;
    assert_eq!(status, 200, "{body}");
}

/// `user`'s tokens: status and body.
async fn tokens(server: &TestServer, user: &str) -> (u16, Value) {
    http_json(
        "GET",
        &format!("{}{LLM}/oauth/tokens/{PLATFORM}/{user}/", server.base),
        &[("authorization", &llm_auth())],
        None,
    )
    .await
}

/// Makes `server` store one of each secret: a user's OAuth tokens (the
/// first expired at once, so reading them refreshes them: two access
/// tokens), the platform's client secret, a webhook's secret, an endpoint
/// toolkit's key and a PKCE verifier. Returns every secret, with the API
/// keys (stored hashed).
async fn store_one_of_each(server: &TestServer, provider: &Provider) -> Vec<String> {
    connect(server, "ada").await;
    let (status, t) = tokens(server, "ada").await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["access_token"], format!("{TAG}access-2"));
    assert_eq!(t["refresh_token"], format!("{TAG}refresh-1"));
    let (status, hook) = http_json(
        "POST",
        &format!("{}{LLM}/webhooks/register/", server.base),
        &[("authorization", &llm_auth())],
        Some(&json!({"url": "http://127.0.0.1:9/hook", "events": ["connection_success"]})),
    )
    .await;
    assert_eq!(status, 201, "{hook}");
    let webhook_secret = hook["secret"].as_str().expect("a secret").to_owned();
    let endpoint_key = format!("{TAG}endpoint-key");
    let (status, answer) = http_json(
        "POST",
        &format!("{}/api/v1/register_tool", server.base),
        &[],
        Some(&json!({
            "function_id": "echo", "api_key": TK_KEY, "app_name": "endpoint-kit",
            "programming_language": "Rust", "code_hash": "h", "toolkit_hash": "th",
            "endpoint_url": "http://127.0.0.1:9", "endpoint_key": endpoint_key,
            "metadata": {"params": [], "required_params": [], "description": "Echoes."},
        })),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let mut secrets = vec![
        format!("{TAG}access-1"),
        format!("{TAG}access-2"),
        format!("{TAG}refresh-1"),
        provider.client_secret(),
        webhook_secret,
        endpoint_key,
        TK_KEY.to_owned(),
        LLM_KEY.to_owned(),
    ];
    let verifiers = provider.verifiers();
    assert!(!verifiers.is_empty());
    secrets.extend(verifiers);
    secrets
}

/// The files of a SQLite database: the file, its WAL and its shared
/// memory, as they are now.
fn sqlite_files(db: &Path) -> Vec<(String, Vec<u8>)> {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| {
            let path = format!("{}{suffix}", db.display());
            std::fs::read(&path).ok().map(|bytes| (path, bytes))
        })
        .collect()
}

/// Every readable file under `dir`.
fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => todo.push(path),
                Ok(t) if t.is_file() => {
                    if let Ok(bytes) = std::fs::read(&path) {
                        out.push((path.display().to_string(), bytes));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    let needle = needle.as_bytes();
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let mut from = 0;
    while let Some(i) = haystack[from..].iter().position(|&b| b == first) {
        let at = from + i + 1;
        if haystack.get(at..at + rest.len()) == Some(rest) {
            return true;
        }
        from = at;
    }
    false
}

/// Asserts that the files hold sealed values (so that the search sees the
/// tables' bytes) and none of the secrets.
fn assert_sealed_only(files: &[(String, Vec<u8>)], secrets: &[String], what: &str) {
    assert!(
        files.iter().any(|(_, bytes)| contains(bytes, "sealed:v1:")),
        "{what}: no sealed value found: is the search looking at the right files?"
    );
    for (path, bytes) in files {
        for secret in secrets {
            assert!(
                !contains(bytes, secret),
                "{what}: {secret:?} is in plain text in {path}"
            );
        }
    }
}

#[tokio::test]
async fn no_secret_reaches_the_sqlite_files_and_a_moved_token_does_not_open() {
    bounded(Duration::from_secs(90), async {
        let provider = provider().await;
        let dir = temp_dir("sqlite");
        let db = dir.join("atp.sqlite3");
        let key_file = dir.join("secrets.key");
        SecretsKey::generate()
            .expect("a key")
            .write_file(&key_file)
            .expect("write");
        let config = || Config {
            db: DbLocation::File(db.clone()),
            oauth_platforms: vec![provider.platform()],
            secrets_keys: Vec::new(),
            secrets_key_file: Some(key_file.clone()),
            ..keyed_config()
        };
        let server = TestServer::start(config()).await;
        let secrets = store_one_of_each(&server, &provider).await;
        connect(&server, "bob").await;
        let files = sqlite_files(&db);
        assert!(
            files.iter().any(|(p, _)| p.ends_with("-wal")),
            "the WAL is searched too"
        );
        assert_sealed_only(&files, &secrets, "SQLite, running");
        server.stop().await;
        assert_sealed_only(&sqlite_files(&db), &secrets, "SQLite, stopped");

        // Someone with write access to the file gives Bob Ada's token.
        {
            let c = rusqlite::Connection::open(&db).expect("open");
            let moved = c
                .execute(
                    "UPDATE oauth_connections SET access_token =
                         (SELECT access_token FROM oauth_connections WHERE external_user_id = 'ada')
                     WHERE external_user_id = 'bob'",
                    [],
                )
                .expect("update");
            assert_eq!(moved, 1);
        }
        let server = TestServer::start(config()).await;
        let (status, answer) = tokens(&server, "bob").await;
        assert_eq!(status, 500, "{answer}");
        assert_eq!(answer["code"], "internal_error");
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("could not be opened with the server's secrets key")),
            "{answer}"
        );
        assert!(!answer.to_string().contains(TAG), "{answer}");
        // Ada's own row still opens.
        let (status, t) = tokens(&server, "ada").await;
        assert_eq!(status, 200, "{t}");
        assert_eq!(t["access_token"], format!("{TAG}access-2"));
        server.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

/// What `atp-server` stores instead of an API key.
fn key_hash(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"atp-server/key/v1\0");
    h.update(key.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_database_from_before_is_sealed_at_start_and_keeps_no_plain_copy() {
    bounded(Duration::from_secs(60), async {
        let dir = temp_dir("old");
        let db = dir.join("atp.sqlite3");
        // What an earlier atp-server left: its schema, in WAL mode, with
        // tokens and webhook secrets in plain text.
        let users: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();
        let plain = |what: &str, user: &str| format!("{TAG}{what}-{user}");
        {
            let c = rusqlite::Connection::open(&db).expect("open");
            c.pragma_update(None, "journal_mode", "WAL").expect("WAL");
            c.execute_batch(
                "CREATE TABLE oauth_connections (llm_key_hash TEXT NOT NULL, platform_id TEXT NOT NULL,
                     external_user_id TEXT NOT NULL, integration_id TEXT NOT NULL, access_token TEXT NOT NULL,
                     refresh_token TEXT, token_type TEXT, scope TEXT, expires_at INTEGER,
                     created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
                     PRIMARY KEY (llm_key_hash, platform_id, external_user_id));
                 CREATE TABLE webhooks (webhook_id TEXT PRIMARY KEY, llm_key_hash TEXT NOT NULL, url TEXT NOT NULL,
                     events TEXT NOT NULL, secret TEXT NOT NULL, created_at INTEGER NOT NULL);",
            )
            .expect("schema");
            for user in &users {
                c.execute(
                    "INSERT INTO oauth_connections VALUES (?1, ?2, ?3, 'i', ?4, ?5, 'Bearer', 'read', NULL, 0, 0)",
                    [
                        key_hash(LLM_KEY),
                        PLATFORM.to_owned(),
                        user.clone(),
                        plain("access", user),
                        plain("refresh", user),
                    ],
                )
                .expect("a connection");
                c.execute(
                    "INSERT INTO webhooks VALUES (?1, ?2, 'http://127.0.0.1:9/', '[]', ?3, 0)",
                    [format!("w-{user}"), key_hash(LLM_KEY), plain("whsec", user)],
                )
                .expect("a webhook");
            }
        }
        let secrets: Vec<String> = users
            .iter()
            .flat_map(|u| [plain("access", u), plain("refresh", u), plain("whsec", u)])
            .collect();
        let server = TestServer::start(Config {
            db: DbLocation::File(db.clone()),
            oauth_platforms: vec![oauth_provider::platform("http://127.0.0.1:9", &["read"])],
            ..keyed_config()
        })
        .await;
        // Sealed at start, and read back as they were.
        assert_sealed_only(&sqlite_files(&db), &secrets, "SQLite, sealed at start");
        for user in &users {
            let (status, t) = tokens(&server, user).await;
            assert_eq!(status, 200, "{t}");
            assert_eq!(t["access_token"], plain("access", user));
            assert_eq!(t["refresh_token"], plain("refresh", user));
        }
        server.stop().await;
        assert_sealed_only(&sqlite_files(&db), &secrets, "SQLite, stopped");
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_reaches_postgres_and_rotation_moves_them_to_the_new_key() {
    let Some(pg) = blocking(infra::Postgres::start) else {
        return;
    };
    bounded(Duration::from_secs(120), async {
        let provider = provider().await;
        let (a, b) = (secrets_key(0xa1), secrets_key(0xb2));
        let config = |key: &SecretsKey| Config {
            db: DbLocation::Postgres(pg.url.clone()),
            oauth_platforms: vec![provider.platform()],
            secrets_keys: vec![key.clone()],
            ..keyed_config()
        };
        let server = TestServer::start_connected(config(&a)).await;
        let secrets = store_one_of_each(&server, &provider).await;
        server.stop().await;

        // The columns, as PostgreSQL holds them.
        let (client, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        let connection = tokio::spawn(connection);
        let columns = [
            ("SELECT access_token FROM oauth_connections", 1),
            ("SELECT refresh_token FROM oauth_connections", 1),
            ("SELECT config FROM oauth_platforms", 1),
            ("SELECT secret FROM webhooks", 1),
            (
                "SELECT endpoint_key FROM toolkits WHERE endpoint_key IS NOT NULL",
                1,
            ),
        ];
        for (sql, count) in columns {
            let rows = client.query(sql, &[]).await.expect("query");
            assert_eq!(rows.len(), count, "{sql}");
            for row in rows {
                let value: String = row.get(0);
                assert!(
                    value.contains(&format!("sealed:v1:{}:", a.id())),
                    "{sql}: {value}"
                );
                for secret in &secrets {
                    assert!(!value.contains(secret.as_str()), "{sql}: {value}");
                }
            }
        }
        // Its files, WAL included, once everything is written out.
        client
            .batch_execute("CHECKPOINT")
            .await
            .expect("checkpoint");
        let files = blocking(|| files_under(&pg.data_dir()));
        assert_sealed_only(&files, &secrets, "PostgreSQL's data directory");

        // Rotation: A → B, in one transaction, then B alone reads them.
        let report = atp_server::rotate_secrets(
            &DbLocation::Postgres(pg.url.clone()),
            vec![a.clone()],
            vec![b.clone()],
        )
        .await
        .expect("rotate");
        assert_eq!(report.key_id, b.id());
        assert!(report.total() >= 5, "{report:?}");
        for (sql, _) in columns {
            for row in client.query(sql, &[]).await.expect("query") {
                let value: String = row.get(0);
                assert!(
                    value.contains(&format!("sealed:v1:{}:", b.id())),
                    "{sql}: {value}"
                );
            }
        }
        drop(client);
        let _ = connection.await;
        let only_b = TestServer::start_connected(Config {
            oauth_platforms: Vec::new(),
            ..config(&b)
        })
        .await;
        let (status, t) = tokens(&only_b, "ada").await;
        assert_eq!(status, 200, "{t}");
        assert_eq!(t["access_token"], format!("{TAG}access-2"));
        only_b.stop().await;
        // Only A (the platform configured again, so its client secret is
        // sealed under A again): the user's tokens do not open.
        let only_a = TestServer::start_connected(config(&a)).await;
        let (status, answer) = tokens(&only_a, "ada").await;
        assert_eq!(status, 500, "{answer}");
        only_a.stop().await;
    })
    .await;
}

/// The binary, with no key, API keys or database from the environment.
fn binary() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_atp-server"));
    c.env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .env_remove("ATP_TOOLKIT_API_KEYS")
        .env_remove("ATP_LLM_API_KEYS")
        .env_remove("ATP_DB_URL")
        .env_remove("ATP_SECRETS_KEY")
        .env_remove("ATP_SECRETS_KEY_FILE")
        .env_remove("ATP_NEW_SECRETS_KEY")
        .env_remove("ATP_NEW_SECRETS_KEY_FILE")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Runs the binary to its end: status, stdout, stderr.
async fn run(c: &mut Command) -> (bool, String, String) {
    let out = tokio::time::timeout(WAIT, c.output())
        .await
        .expect("in time")
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reads a serving binary's log until it listens: its address, and the
/// lines before. The rest of the log is read (and dropped) in the
/// background, so the server never writes to a closed pipe.
async fn log_until_listening(child: &mut Child) -> (String, Vec<String>) {
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = BufReader::new(stderr).lines();
    let read = async {
        let mut seen = Vec::new();
        while let Some(line) = lines.next_line().await.expect("read the log") {
            if line.contains("atp-server listening")
                && let Some(at) = line.find("127.0.0.1:")
            {
                let port: String = line[at + 10..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                return (format!("127.0.0.1:{port}"), seen);
            }
            seen.push(line);
        }
        panic!("the server exited before listening:\n{}", seen.join("\n"))
    };
    let found = tokio::time::timeout(WAIT, read)
        .await
        .expect("listening in time");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found
}

#[tokio::test]
async fn rotating_the_secrets_key_with_the_command_line() {
    bounded(Duration::from_secs(90), async {
        let provider = provider().await;
        let dir = temp_dir("rotate");
        let db = dir.join("atp.sqlite3");
        let (old, new) = (dir.join("old.key"), dir.join("new.key"));
        for path in [&old, &new] {
            let (ok, _, err) = run(binary()
                .args(["keys", "generate-secrets-key", "--out"])
                .arg(path))
            .await;
            assert!(ok, "{err}");
        }
        let key_id = |path: &Path| {
            SecretsKey::read_file(path).expect("read")[0]
                .id()
                .to_owned()
        };
        let (old_id, new_id) = (key_id(&old), key_id(&new));
        let config = |key: &Path| Config {
            db: DbLocation::File(db.clone()),
            oauth_platforms: vec![provider.platform()],
            secrets_keys: Vec::new(),
            secrets_key_file: Some(key.to_path_buf()),
            ..keyed_config()
        };
        let server = TestServer::start(config(&old)).await;
        let secrets = store_one_of_each(&server, &provider).await;
        server.stop().await;

        // Without the current key the rotation refuses and changes nothing.
        let (ok, _, err) = run(binary()
            .args(["keys", "rotate-secrets", "--db"])
            .arg(&db)
            .arg("--new-key-file")
            .arg(&new))
        .await;
        assert!(!ok);
        assert!(
            err.contains(&old_id) && err.contains("not configured"),
            "{err}"
        );
        let (ok, out, err) = run(binary()
            .args(["keys", "rotate-secrets", "--db"])
            .arg(&db)
            .arg("--new-key-file")
            .arg(&new)
            .env("ATP_SECRETS_KEY_FILE", &old))
        .await;
        assert!(ok, "{out}\n{err}");
        assert!(out.contains(&new_id), "{out}");
        assert!(
            out.contains("oauth_connections.access_token: 1 sealed again"),
            "{out}"
        );
        assert!(out.contains("webhooks.secret: 1 sealed again"), "{out}");
        assert_sealed_only(&sqlite_files(&db), &secrets, "SQLite, rotated");

        // Only the new key: everything opens.
        let server = TestServer::start(Config {
            oauth_platforms: Vec::new(),
            ..config(&new)
        })
        .await;
        let (status, t) = tokens(&server, "ada").await;
        assert_eq!(status, 200, "{t}");
        assert_eq!(t["access_token"], format!("{TAG}access-2"));
        server.stop().await;

        // Only the old key: the server says at start which key it lacks,
        // and each read of those rows fails clearly (the platform is in
        // its configuration file, so its client secret is sealed again).
        let p = provider.platform();
        let toml = dir.join("atp.toml");
        std::fs::write(
            &toml,
            format!(
                "[[oauth_platforms]]\nid = {:?}\nprovider = \"localprov\"\nauthorize_url = {:?}\ntoken_url = {:?}\nclient_id = \"cid\"\nclient_secret = {:?}\nscopes = [\"read\"]\n",
                p.id,
                p.authorize_url,
                p.token_url,
                p.client_secret.expose()
            ),
        )
        .expect("write");
        let mut child = binary()
            .args(["--addr", "127.0.0.1:0", "--config"])
            .arg(&toml)
            .arg("--db")
            .arg(&db)
            .args(["--toolkit-api-keys", TK_KEY, "--llm-api-keys", LLM_KEY])
            .env("ATP_SECRETS_KEY_FILE", &old)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starts");
        let (addr, log) = log_until_listening(&mut child).await;
        let log = log.join("\n");
        assert!(
            log.contains("ERROR")
                && log.contains("not configured")
                && log.contains(&format!("key_id={new_id}")),
            "{log}"
        );
        let (status, answer) = http_json(
            "GET",
            &format!("http://{addr}{LLM}/oauth/tokens/{PLATFORM}/ada/"),
            &[("authorization", &llm_auth())],
            None,
        )
        .await;
        assert_eq!(status, 500, "{answer}");
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("secrets key")),
            "{answer}"
        );
        let _ = child.kill().await;
        let secret_text = |path: &Path| {
            SecretsKey::read_file(path).expect("read")[0]
                .expose()
                .to_owned()
        };
        for key in [secret_text(&old), secret_text(&new)] {
            assert!(!log.contains(&key), "a key in the log:\n{log}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test]
async fn the_binary_needs_a_key_outside_dev_mode_and_makes_one_in_dev_mode() {
    bounded(Duration::from_secs(60), async {
        let dir = temp_dir("cli");
        let db = dir.join("atp.sqlite3");
        // Outside dev mode, no key: refused, saying how to make one.
        let (ok, _, err) = run(binary()
            .args(["--addr", "127.0.0.1:0", "--db"])
            .arg(&db)
            .args(["--toolkit-api-keys", TK_KEY]))
        .await;
        assert!(!ok);
        assert!(
            err.contains("no secrets key configured")
                && err.contains("atp-server keys generate-secrets-key"),
            "{err}"
        );
        // A key given twice, or a bad one: refused, the key not shown.
        let key = SecretsKey::generate().expect("a key");
        let key_file = dir.join("k.key");
        key.write_file(&key_file).expect("write");
        let (ok, _, err) = run(binary()
            .args(["--addr", "127.0.0.1:0", "--db"])
            .arg(&db)
            .args(["--toolkit-api-keys", TK_KEY, "--secrets-key-file"])
            .arg(&key_file)
            .env("ATP_SECRETS_KEY", key.expose()))
        .await;
        assert!(!ok && err.contains("given twice"), "{err}");
        assert!(!err.contains(key.expose()), "{err}");
        let (ok, _, err) = run(binary()
            .args(["--addr", "127.0.0.1:0", "--db"])
            .arg(&db)
            .args(["--toolkit-api-keys", TK_KEY])
            .env("ATP_SECRETS_KEY", "not-a-key-SECRET"))
        .await;
        assert!(
            !ok && err.contains("ATP_SECRETS_KEY: invalid secrets key"),
            "{err}"
        );
        assert!(!err.contains("not-a-key-SECRET"), "{err}");

        // Dev mode: a key file beside the database, made once and said so.
        let dev_db = dir.join("dev.sqlite3");
        let mut child = binary()
            .args(["--dev", "--addr", "127.0.0.1:0", "--db"])
            .arg(&dev_db)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starts");
        let (_, log) = log_until_listening(&mut child).await;
        let _ = child.kill().await;
        let log = log.join("\n");
        let key_path = atp_server::dev_secrets_key_path(&dev_db);
        assert!(key_path.is_file());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key_path)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(
            log.contains("WARN")
                && log.contains("generated a key file")
                && log.contains(&key_path.display().to_string()),
            "{log}"
        );
        let dev_key = SecretsKey::read_file(&key_path).expect("read")[0].clone();
        assert!(!log.contains(dev_key.expose()), "{log}");

        // `generate-secrets-key` prints a new key each time; `--out` never
        // overwrites.
        let (ok, out, _) = run(binary().args(["keys", "generate-secrets-key"])).await;
        assert!(ok);
        let printed = SecretsKey::parse(&out).expect("a key");
        let (_, again, _) = run(binary().args(["keys", "generate-secrets-key"])).await;
        assert_ne!(SecretsKey::parse(&again).expect("a key").id(), printed.id());
        let (ok, _, err) = run(binary()
            .args(["keys", "generate-secrets-key", "--out"])
            .arg(&key_file))
        .await;
        assert!(!ok, "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}
