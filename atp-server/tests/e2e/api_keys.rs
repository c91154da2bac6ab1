//! API keys made, listed and revoked with the `atp-server keys` commands
//! while servers run: a new key is accepted, a scope is enforced, and a
//! revoked key is refused and its open WebSockets are closed — on SQLite,
//! and on two servers sharing PostgreSQL and NATS.

use std::{process::Stdio, time::Duration};

use atp_server::{Config, DbLocation};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;

use crate::{
    apps::{Ws, llm_ws, process, register_params, toolkit_ws},
    common::*,
    infra::{Nats, Postgres},
};

/// Runs `atp-server keys ARGS…`: whether it succeeded, its stdout and
/// its stderr.
async fn keys(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_atp-server"))
        .arg("keys")
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("ATP_DB_URL")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .expect("the command ends in time")
        .expect("the command runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A key made with `keys create ARGS… --db DB`: (id, key).
async fn create(db: &str, args: &[&str]) -> (String, String) {
    let mut all = vec!["create", "--db", db];
    all.extend_from_slice(args);
    let (ok, out, err) = keys(&all).await;
    assert!(ok, "keys create failed: {err}");
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name:?} in {out:?}"))
            .to_owned()
    };
    let (id, key) = (field("id: "), field("key: "));
    assert!(id.starts_with("kid_") && id.len() == 16, "{id}");
    assert!(
        key.starts_with("atpk_") && key.len() > 40,
        "a long random key"
    );
    assert!(!err.contains(&key), "the key is printed on stdout only");
    (id, key)
}

async fn revoke(db: &str, id: &str) {
    let (ok, out, err) = keys(&["revoke", id, "--db", db]).await;
    assert!(ok, "keys revoke failed: {err}");
    assert_eq!(out.trim(), format!("revoked {id}"));
}

/// `get_toolkit_context` of `app` over HTTP with `key`: the status.
async fn context_status(server: &TestServer, key: &str, app: &str) -> u16 {
    let body = json!({"type": "get_toolkit_context", "toolkit_id": app, "request_id": "c1"});
    process(server, key, &body).await.0
}

/// Reads a WebSocket until the server closes it (within [`WAIT`]): the
/// JSON of the text frames that came first; checks the close frame says
/// the key was revoked.
async fn until_closed(ws: &mut Ws) -> Vec<Value> {
    let mut texts = Vec::new();
    let read = async {
        while let Some(frame) = ws.next().await {
            match frame.expect("a frame") {
                Message::Text(t) => texts.push(serde_json::from_str(t.as_str()).expect("JSON")),
                Message::Close(frame) => return frame,
                _ => {}
            }
        }
        None
    };
    let close = tokio::time::timeout(WAIT, read)
        .await
        .expect("the server closes the socket in time")
        .expect("a close frame");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1008, "API key revoked")
    );
    texts
}

/// A key-less server on `db` that re-reads the keys every 100 ms.
fn config(db: DbLocation) -> Config {
    Config {
        db,
        secrets_keys: vec![secrets_key(0x5a)],
        api_keys_refresh: Duration::from_millis(100),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_the_command_line_work_and_revoking_one_closes_its_sockets() {
    bounded(Duration::from_secs(90), async {
        let dir = std::env::temp_dir().join(format!("atp-api-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("atp.sqlite3");
        let db = path.to_str().expect("a UTF-8 path").to_owned();
        let (llm_id, llm) = create(&db, &["--kind", "llm"]).await;
        let (_, scoped_llm) = create(&db, &["--kind", "llm", "--scope", "other"]).await;
        let (tk_id, tk) = create(&db, &["--kind", "toolkit", "--scope", "demo,demo2"]).await;
        let server = TestServer::start(config(DbLocation::File(path.clone()))).await;

        // The toolkit key registers within its scope only.
        register_params(&server, &tk, "demo", "echo", &["text"]).await;
        let out_of_scope = json!({"function_id": "echo", "api_key": tk, "app_name": "nope",
            "metadata": {"params": ["text"], "required_params": [], "description": "Echo."}});
        let (status, answer) = http_json(
            "POST",
            &format!("{}/api/v1/register_tool/", server.base),
            &[],
            Some(&out_of_scope),
        )
        .await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (403, Some("out_of_scope"))
        );
        // The LLM key sees the toolkit (same, implicit, developer); the
        // scoped one does not, as if it did not exist.
        assert_eq!(context_status(&server, &llm, "demo").await, 200);
        assert_eq!(context_status(&server, &scoped_llm, "demo").await, 404);
        assert_eq!(context_status(&server, "atpk_made-up", "demo").await, 401);

        // A key made while the server runs is accepted within the bound.
        let (_, late) = create(&db, &["--kind", "llm", "--developer", "ada"]).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        while context_status(&server, &late, "nope").await == 401 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the new key is never accepted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Another developer's key does not see the default developer's toolkit.
        assert_eq!(context_status(&server, &late, "demo").await, 404);

        // `list` shows ids, never a key.
        let (ok, listed, _) = keys(&["list", "--db", &db]).await;
        assert!(ok);
        let rows: Vec<Value> = listed
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON lines"))
            .collect();
        assert_eq!(rows.len(), 4, "{listed}");
        assert_eq!(rows[0]["id"], llm_id.as_str());
        assert_eq!(rows[2]["scope"], json!(["demo", "demo2"]));
        assert_eq!(rows[3]["developer"], "ada");
        for key in [&llm, &scoped_llm, &tk, &late] {
            assert!(!listed.contains(key.as_str()), "a key in the listing");
        }

        // Revoking: the live sockets close, the next request is refused.
        let mut llm_socket = llm_ws(&server, &llm).await;
        let mut toolkit_socket = toolkit_ws(&server, &tk).await;
        revoke(&db, &llm_id).await;
        let last = until_closed(&mut llm_socket).await;
        assert!(
            last.iter().any(|m| m["code"] == "key_revoked"),
            "told why: {last:?}"
        );
        assert_eq!(context_status(&server, &llm, "demo").await, 401);
        assert_eq!(
            context_status(&server, &scoped_llm, "other").await,
            404,
            "the other keys still work"
        );
        revoke(&db, &tk_id).await;
        let last = until_closed(&mut toolkit_socket).await;
        assert!(
            last.iter()
                .any(|m| m.to_string().contains("API key revoked")),
            "told why: {last:?}"
        );
        let again = json!({"function_id": "echo", "api_key": tk, "app_name": "demo",
            "metadata": {"params": ["text"], "required_params": [], "description": "Echo."}});
        let (status, _) = http_json(
            "POST",
            &format!("{}/api/v1/register_tool/", server.base),
            &[],
            Some(&again),
        )
        .await;
        assert_eq!(status, 401);
        let (status, _, _) = http(
            "GET",
            &format!("{}/api/v1/toolkit/{tk}/inbox/?wait=0", server.base),
            &[],
            None,
        )
        .await;
        assert_eq!(status, 401, "the inbox refuses it too");

        // Revoking twice, or an unknown id, is an error; so is a bad kind.
        let (ok, _, err) = keys(&["revoke", &llm_id, "--db", &db]).await;
        assert!(!ok && err.contains("no key in force"), "{err}");
        let (ok, _, _) = keys(&["create", "--kind", "admin", "--db", &db]).await;
        assert!(!ok);
        let (ok, _, err) =
            keys(&["create", "--kind", "llm", "--scope", "no way", "--db", &db]).await;
        assert!(!ok && err.contains("not a toolkit name"), "{err}");
        let (ok, listed, _) = keys(&["list", "--db", &db]).await;
        assert!(ok);
        let revoked = listed
            .lines()
            .filter(|l| !l.contains("\"revoked_at\":null"))
            .count();
        assert_eq!(revoked, 2, "{listed}");

        server.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_by_every_server_sharing_the_database() {
    bounded(Duration::from_secs(120), async {
        let (Some(pg), Some(nats)) = (Postgres::start(), Nats::start()) else {
            return;
        };
        let shared = |pg: &Postgres, nats: &Nats| Config {
            nats_url: Some(atp_server::NatsUrl(nats.url.clone())),
            ..config(DbLocation::Postgres(pg.url.clone()))
        };
        let a = TestServer::start_connected(shared(&pg, &nats)).await;
        let b = TestServer::start_connected(shared(&pg, &nats)).await;
        let (llm_id, llm) = create(&pg.url, &["--kind", "llm"]).await;
        for s in [&a, &b] {
            let deadline = tokio::time::Instant::now() + WAIT;
            while context_status(s, &llm, "nope").await == 401 {
                assert!(tokio::time::Instant::now() < deadline, "never accepted");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut on_a = llm_ws(&a, &llm).await;
        let mut on_b = llm_ws(&b, &llm).await;
        revoke(&pg.url, &llm_id).await;
        for ws in [&mut on_a, &mut on_b] {
            let last = until_closed(ws).await;
            assert!(last.iter().any(|m| m["code"] == "key_revoked"), "{last:?}");
        }
        for s in [&a, &b] {
            assert_eq!(context_status(s, &llm, "nope").await, 401);
        }
        a.stop().await;
        b.stop().await;
    })
    .await;
}
