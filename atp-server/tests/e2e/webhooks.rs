//! Webhooks: registration and ownership, signed deliveries of OAuth
//! events to a receiver started by the test, retries while the receiver
//! fails or is down, and deliveries that wait through a server restart.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use atp_registry::webhook;
use atp_server::{Config, DbLocation, OAuthPlatform};
use axum::{
    Router,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    common::*,
    hooks::{Hook, Received, Receiver},
};

const OTHER_KEY: &str = "llm-other-key";
pub(crate) const ACCESS_TOKEN: &str = "AT-do-not-leak-4242";
pub(crate) const REFRESH_TOKEN: &str = "RT-do-not-leak-4343";
const CLIENT_SECRET: &str = "client-secret-4444";
const LLM: &str = "/api/v1/atp/llm-client";

fn auth(key: &str) -> String {
    format!("ApiKey {key}")
}

// ---------------------------------------------------------------------
// An OAuth provider's token endpoint: "good-code" is exchanged for tokens.

async fn token(body: String) -> Response {
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let answer = |status: StatusCode, v: Value| {
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            v.to_string(),
        )
            .into_response()
    };
    if form.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET) {
        return answer(StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}));
    }
    if form.get("code").map(String::as_str) == Some("good-code") {
        answer(
            StatusCode::OK,
            json!({"access_token": ACCESS_TOKEN, "refresh_token": REFRESH_TOKEN,
                   "expires_in": 3600, "token_type": "Bearer"}),
        )
    } else {
        answer(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_grant", "error_description": "the code is not valid"}),
        )
    }
}

pub(crate) async fn start_provider() -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let app = Router::new().route("/token", post(token));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (base, task)
}

pub(crate) fn platform(provider: &str) -> OAuthPlatform {
    OAuthPlatform {
        id: "local-app".into(),
        provider: Some("localprov".into()),
        name: None,
        authorize_url: format!("{provider}/authorize"),
        token_url: format!("{provider}/token"),
        client_id: "cid".into(),
        client_secret: CLIENT_SECRET.into(),
        scopes: vec!["read".into()],
        extra_authorize_params: Vec::new(),
    }
}

/// Two LLM keys, fast retries, an OAuth platform, a database file.
fn config(db: &Path, provider: &str) -> Config {
    let mut c = keyed_config();
    c.db = DbLocation::File(db.to_path_buf());
    c.llm_api_keys = vec![LLM_KEY.into(), OTHER_KEY.into()];
    c.oauth_platforms = vec![platform(provider)];
    c.webhook_retry_base = Duration::from_millis(50);
    c.webhook_timeout = Duration::from_secs(2);
    c.webhook_max_attempts = 1000;
    c
}

struct TempDb(PathBuf);

impl TempDb {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "atp-server-webhooks-{name}-{}.sqlite3",
            std::process::id()
        ));
        let db = Self(path);
        db.remove();
        db
    }

    fn remove(&self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }

    /// A delivery's row: status, attempts, last HTTP status.
    fn delivery(&self, delivery_id: &str) -> (String, i64, Option<i64>) {
        let c = rusqlite::Connection::open(&self.0).expect("open the database");
        c.query_row(
            "SELECT status, attempts, last_status FROM webhook_deliveries WHERE delivery_id = ?1",
            [delivery_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("the delivery's row")
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        self.remove();
    }
}

async fn register(base: &str, key: &str, body: Value) -> (u16, Value) {
    http_json(
        "POST",
        &format!("{base}{LLM}/webhooks/register/"),
        &[("authorization", &auth(key))],
        Some(&body),
    )
    .await
}

async fn list(base: &str, key: &str) -> (u16, Value) {
    http_json(
        "GET",
        &format!("{base}{LLM}/webhooks/"),
        &[("authorization", &auth(key))],
        None,
    )
    .await
}

/// Starts an OAuth flow as `key` for `user` and returns its state.
pub(crate) async fn start_flow(base: &str, key: &str, user: &str) -> String {
    let (status, v) = http_json(
        "POST",
        &format!("{base}{LLM}/oauth/confirmation/local-app/"),
        &[("authorization", &auth(key))],
        Some(&json!({"external_user_id": user})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let url = v["authorization_url"].as_str().expect("authorization_url");
    form_urlencoded::parse(url.split_once('?').expect("a query").1.as_bytes())
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .expect("a state")
}

/// The provider sends the user back to the server's callback with `query`.
pub(crate) async fn callback(base: &str, state: &str, query: &str) -> u16 {
    let url = format!("{base}{LLM}/oauth/callback/?state={state}&{query}");
    http("GET", &url, &[], None).await.0
}

// ---------------------------------------------------------------------

#[tokio::test]
async fn webhooks_register_list_delete_with_ownership() {
    bounded(Duration::from_secs(60), async {
        let db = TempDb::new("crud");
        let server = TestServer::start(config(&db.0, "http://127.0.0.1:9")).await;
        let base = server.base.clone();

        // Registration: 201, the secret only here, default events.
        let (status, a) = register(
            &base,
            LLM_KEY,
            json!({"url": "http://127.0.0.1:9/a", "events": ["connection_success", "connection_failed"]}),
        )
        .await;
        assert_eq!(status, 201, "{a}");
        let first = a["webhook_id"].as_str().expect("webhook_id").to_owned();
        assert_eq!(a["url"], "http://127.0.0.1:9/a");
        assert_eq!(a["events"], json!(["connection_success", "connection_failed"]));
        assert!(a["secret"].as_str().is_some_and(|s| s.len() >= 32), "{a}");
        assert!(a["created_at"].as_str().is_some_and(|t| t.ends_with('Z')));
        // The key in the body alone, as the Python client also sends it.
        let (status, b) = http_json(
            "POST",
            &format!("{base}{LLM}/webhooks/register/"),
            &[],
            Some(&json!({"url": "https://example.com/b", "api_key": LLM_KEY})),
        )
        .await;
        assert_eq!(status, 201, "{b}");
        assert_eq!(b["events"], json!(["connection_success"]));
        // An empty list means the default too; deleting through POST with
        // the key in the body.
        let (status, c) = register(
            &base,
            LLM_KEY,
            json!({"url": "https://example.com/c", "events": []}),
        )
        .await;
        assert_eq!((status, &c["events"]), (201, &json!(["connection_success"])));
        let third = c["webhook_id"].as_str().expect("webhook_id");
        let (status, ok) = http_json(
            "POST",
            &format!("{base}{LLM}/webhooks/{third}/delete/"),
            &[],
            Some(&json!({"api_key": LLM_KEY})),
        )
        .await;
        assert_eq!((status, ok), (200, json!({"status": "ok"})));
        let second = b["webhook_id"].as_str().expect("webhook_id").to_owned();
        assert_ne!(first, second);
        assert_ne!(a["secret"], b["secret"]);

        // Refusals.
        for (key, body, want) in [
            ("wrong-key", json!({"url": "http://127.0.0.1:9/"}), (401, "unauthorized")),
            (LLM_KEY, json!({"url": "ftp://example.com/"}), (400, "invalid_url")),
            (LLM_KEY, json!({"url": "example.com"}), (400, "invalid_url")),
            (
                LLM_KEY,
                json!({"url": "http://127.0.0.1:9/", "events": ["connection_success", "nope"]}),
                (400, "unknown_event"),
            ),
            (LLM_KEY, json!({"events": ["connection_success"]}), (400, "invalid_body")),
        ] {
            let (status, e) = register(&base, key, body.clone()).await;
            assert_eq!((status, e["code"].as_str()), (want.0, Some(want.1)), "{body} → {e}");
        }
        let (status, _) = http_json(
            "POST",
            &format!("{base}{LLM}/webhooks/register/"),
            &[],
            Some(&json!({"url": "http://127.0.0.1:9/"})),
        )
        .await;
        assert_eq!(status, 401);

        // The list: this key's, without secrets.
        let (status, l) = list(&base, LLM_KEY).await;
        assert_eq!(status, 200);
        let ids: Vec<&str> = l
            .as_array()
            .expect("an array")
            .iter()
            .map(|w| w["webhook_id"].as_str().expect("id"))
            .collect();
        assert_eq!(ids, [first.as_str(), second.as_str()]);
        assert!(!l.to_string().contains("secret"), "{l}");
        assert_eq!(l[0]["events"], json!(["connection_success", "connection_failed"]));
        // Another key sees none of them and can not delete them.
        assert_eq!(list(&base, OTHER_KEY).await, (200, json!([])));
        let delete = |id: &str| format!("{base}{LLM}/webhooks/{id}/delete/");
        for method in ["DELETE", "GET", "POST"] {
            let (status, e) =
                http_json(method, &delete(&first), &[("authorization", &auth(OTHER_KEY))], None)
                    .await;
            assert_eq!((status, e["code"].as_str()), (404, Some("webhook_not_found")));
        }
        let (status, _) = http_json("GET", &format!("{base}{LLM}/webhooks/"), &[], None).await;
        assert_eq!(status, 401);
        let (status, _) = http_json("GET", &delete(&first), &[], None).await;
        assert_eq!(status, 401);

        // Deleting through GET, as the Python client does; then through
        // DELETE with the key in the body.
        let (status, ok) =
            http_json("GET", &delete(&first), &[("authorization", &auth(LLM_KEY))], None).await;
        assert_eq!((status, ok), (200, json!({"status": "ok"})));
        let (status, e) =
            http_json("GET", &delete(&first), &[("authorization", &auth(LLM_KEY))], None).await;
        assert_eq!((status, e["code"].as_str()), (404, Some("webhook_not_found")));
        let (_, l) = list(&base, LLM_KEY).await;
        assert_eq!(l.as_array().map(Vec::len), Some(1));
        assert_eq!(l[0]["webhook_id"], second.as_str());
        let (status, _) = http_json(
            "DELETE",
            &delete(&second),
            &[],
            Some(&json!({"api_key": LLM_KEY})),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(list(&base, LLM_KEY).await, (200, json!([])));

        // At most 100 webhooks per key.
        for i in 0..100 {
            let (status, _) = register(
                &base,
                OTHER_KEY,
                json!({"url": format!("http://127.0.0.1:9/{i}")}),
            )
            .await;
            assert_eq!(status, 201);
        }
        let (status, e) = register(&base, OTHER_KEY, json!({"url": "http://127.0.0.1:9/x"})).await;
        assert_eq!((status, e["code"].as_str()), (409, Some("too_many_webhooks")));
        assert_eq!(list(&base, LLM_KEY).await, (200, json!([])));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn oauth_events_are_delivered_signed_and_without_tokens() {
    bounded(Duration::from_secs(60), async {
        let db = TempDb::new("signed");
        let (provider, provider_task) = start_provider().await;
        let server = TestServer::start(config(&db.0, &provider)).await;
        let base = server.base.clone();
        let both = Hook::new();
        let both_rx = Receiver::start(&both, "127.0.0.1:0".parse().expect("addr")).await;
        let failed_only = Hook::new();
        let failed_rx = Receiver::start(&failed_only, "127.0.0.1:0".parse().expect("addr")).await;
        let others = Hook::new();
        let others_rx = Receiver::start(&others, "127.0.0.1:0".parse().expect("addr")).await;

        let (status, w) = register(
            &base,
            LLM_KEY,
            json!({"url": both_rx.url(), "events": ["connection_success", "connection_failed"]}),
        )
        .await;
        assert_eq!(status, 201, "{w}");
        let secret = w["secret"].as_str().expect("secret").to_owned();
        let webhook_id = w["webhook_id"].as_str().expect("id").to_owned();
        let (status, f) = register(
            &base,
            LLM_KEY,
            json!({"url": failed_rx.url(), "events": ["connection_failed"]}),
        )
        .await;
        assert_eq!(status, 201, "{f}");
        // Another key's webhook: its key started no flow, so it gets nothing.
        let (status, _) = register(
            &base,
            OTHER_KEY,
            json!({"url": others_rx.url(), "events": ["connection_success", "connection_failed"]}),
        )
        .await;
        assert_eq!(status, 201);

        // A user connects: connection_success.
        let state = start_flow(&base, LLM_KEY, "ada@example.com").await;
        assert_eq!(callback(&base, &state, "code=good-code").await, 200);
        both.wait_until("connection_success", |i| !i.got.is_empty())
            .await;
        let tokens = http_json(
            "GET",
            &format!("{base}{LLM}/oauth/tokens/local-app/ada@example.com/"),
            &[("authorization", &auth(LLM_KEY))],
            None,
        )
        .await;
        assert_eq!(
            tokens.1["access_token"], ACCESS_TOKEN,
            "the flow stored the token"
        );
        let integration_id = tokens.1["integration_id"].as_str().expect("id").to_owned();

        // A user refuses; another's code exchange fails: connection_failed.
        let state = start_flow(&base, LLM_KEY, "bob").await;
        assert_eq!(
            callback(
                &base,
                &state,
                "error=access_denied&error_description=no+thanks"
            )
            .await,
            400
        );
        let state = start_flow(&base, LLM_KEY, "cy").await;
        assert_eq!(callback(&base, &state, "code=bad-code").await, 502);
        both.wait_until("three events", |i| i.got.len() == 3).await;
        failed_only
            .wait_until("two failures", |i| i.got.len() == 2)
            .await;

        let events = both.with(|inbox| {
            let mut seen = Vec::new();
            for r in &inbox.got {
                // Signed with the secret the registration returned.
                let delivery = webhook::verify_delivery(
                    secret.as_bytes(),
                    r.header(webhook::SIGNATURE_HEADER),
                    &r.body,
                )
                .expect("a valid signature");
                assert!(
                    webhook::verify(b"another secret", r.header("x-atp-signature"), &r.body)
                        .is_err()
                );
                assert_eq!(r.header("content-type"), Some("application/json"));
                assert_eq!(r.header("x-atp-event"), Some(delivery.event.as_str()));
                assert_eq!(
                    r.header("x-atp-delivery"),
                    Some(delivery.delivery_id.as_str())
                );
                assert_eq!(delivery.webhook_id, webhook_id);
                assert!(delivery.created_at.ends_with('Z') && delivery.created_at.len() == 20);
                // Never a token, a client secret or an API key.
                let text = String::from_utf8_lossy(&r.body);
                for secret in [
                    ACCESS_TOKEN,
                    REFRESH_TOKEN,
                    CLIENT_SECRET,
                    LLM_KEY,
                    "good-code",
                ] {
                    assert!(!text.contains(secret), "{secret} in {text}");
                }
                for (name, value) in &r.headers {
                    let value = value.to_str().unwrap_or_default();
                    assert!(
                        !value.contains(ACCESS_TOKEN) && !value.contains(LLM_KEY),
                        "{name}"
                    );
                }
                seen.push((delivery.event, delivery.data, delivery.delivery_id));
            }
            seen
        });
        let by_user = |user: &str| {
            events
                .iter()
                .find(|(_, d, _)| d["external_user_id"] == user)
                .unwrap_or_else(|| panic!("an event for {user}: {events:?}"))
        };
        let (event, data, _) = by_user("ada@example.com");
        assert_eq!(event, "connection_success");
        assert_eq!(
            data,
            &json!({"platform_id": "local-app", "external_user_id": "ada@example.com",
                    "integration_id": integration_id})
        );
        let (event, data, _) = by_user("bob");
        assert_eq!(event, "connection_failed");
        assert_eq!(data["platform_id"], "local-app");
        assert_eq!(data["code"], "oauth_denied");
        assert!(
            data["error"]
                .as_str()
                .is_some_and(|e| e.contains("no thanks")),
            "{data}"
        );
        let (event, data, _) = by_user("cy");
        assert_eq!(event, "connection_failed");
        assert_eq!(data["code"], "oauth_exchange_failed");
        assert!(
            data["error"]
                .as_str()
                .is_some_and(|e| e.contains("the code is not valid")),
            "{data}"
        );
        let ids: std::collections::HashSet<&String> = events.iter().map(|(_, _, id)| id).collect();
        assert_eq!(ids.len(), 3, "one delivery_id per delivery");

        // The webhook subscribed to failures got just those, signed with its
        // own secret.
        failed_only.with(|inbox| {
            for r in &inbox.got {
                let d = webhook::verify_delivery(
                    f["secret"].as_str().expect("secret").as_bytes(),
                    r.header("x-atp-signature"),
                    &r.body,
                )
                .expect("signed with its own secret");
                assert_eq!(d.event, "connection_failed");
            }
        });
        assert!(
            others.with(|i| i.got.is_empty()),
            "another key's webhook got an event"
        );

        server.stop().await;
        for r in [both_rx, failed_rx, others_rx] {
            r.stop().await;
        }
        provider_task.abort();
    })
    .await;
}

#[tokio::test]
async fn a_failing_then_down_receiver_gets_each_delivery_once() {
    bounded(Duration::from_secs(60), async {
        let db = TempDb::new("retry");
        let server = TestServer::start(config(&db.0, "http://127.0.0.1:9")).await;
        let base = server.base.clone();
        let hook = Hook::new();
        hook.set_failing(true);
        let receiver = Receiver::start(&hook, "127.0.0.1:0".parse().expect("addr")).await;
        let addr = receiver.addr;
        let (status, w) = register(
            &base,
            LLM_KEY,
            json!({"url": receiver.url(), "events": ["connection_failed"]}),
        )
        .await;
        assert_eq!(status, 201, "{w}");
        let secret = w["secret"].as_str().expect("secret").to_owned();

        // Answered 500 twice, then the receiver is down for a while.
        let state = start_flow(&base, LLM_KEY, "bob").await;
        assert_eq!(callback(&base, &state, "error=access_denied").await, 400);
        hook.wait_until("two failed attempts", |i| i.got.len() >= 2)
            .await;
        receiver.stop().await;
        let first_id = hook.with(|i| i.got[0].delivery_id());
        let (status, attempts, _) = db.delivery(&first_id);
        assert_eq!(status, "pending");
        assert!(attempts >= 2, "{attempts}");

        // It comes back on the same port and answers 200.
        hook.set_failing(false);
        let receiver = Receiver::start(&hook, addr).await;
        hook.wait_until("the delivery", |i| !i.accepted().is_empty())
            .await;
        // A later event arrives too; the first is not sent again.
        let state = start_flow(&base, LLM_KEY, "cy").await;
        assert_eq!(callback(&base, &state, "error=access_denied").await, 400);
        hook.wait_until("the second delivery", |i| i.accepted().len() >= 2)
            .await;
        hook.with(|inbox| {
            let first: Vec<&Received> = inbox
                .got
                .iter()
                .filter(|r| r.delivery_id() == first_id)
                .collect();
            assert!(first.len() >= 3, "retried: {}", first.len());
            // Every retry carried the same bytes, validly signed.
            for r in &first {
                assert_eq!(r.body, first[0].body);
                webhook::verify(secret.as_bytes(), r.header("x-atp-signature"), &r.body)
                    .expect("signed");
            }
            assert_eq!(first.iter().filter(|r| r.answered == 200).count(), 1);
            assert_eq!(first.last().map(|r| r.answered), Some(200));
            assert_eq!(inbox.accepted().len(), 2);
            assert_ne!(inbox.accepted()[1].delivery_id(), first_id);
        });
        let (status, attempts, last) = db.delivery(&first_id);
        assert_eq!((status.as_str(), last), ("delivered", Some(200)));
        assert!(attempts >= 3, "{attempts}");

        server.stop().await;
        receiver.stop().await;
    })
    .await;
}

#[tokio::test]
async fn pending_deliveries_survive_a_restart() {
    bounded(Duration::from_secs(60), async {
        let db = TempDb::new("restart");
        let (provider, provider_task) = start_provider().await;
        let server = TestServer::start(config(&db.0, &provider)).await;
        let hook = Hook::new();
        hook.set_failing(true);
        let receiver = Receiver::start(&hook, "127.0.0.1:0".parse().expect("addr")).await;
        let addr = receiver.addr;
        let (status, w) = register(&server.base, LLM_KEY, json!({"url": receiver.url()})).await;
        assert_eq!(status, 201, "{w}");
        let secret = w["secret"].as_str().expect("secret").to_owned();

        // The event is attempted once (500), then the receiver is down and
        // the server stops.
        let state = start_flow(&server.base, LLM_KEY, "ada").await;
        assert_eq!(callback(&server.base, &state, "code=good-code").await, 200);
        hook.wait_until("the first attempt", |i| !i.got.is_empty())
            .await;
        receiver.stop().await;
        server.stop().await;
        let (first_id, first_body) = hook.with(|i| (i.got[0].delivery_id(), i.got[0].body.clone()));
        assert_eq!(db.delivery(&first_id).0, "pending");

        // A new server on the same database; the receiver comes back.
        let server = TestServer::start(config(&db.0, &provider)).await;
        hook.set_failing(false);
        let receiver = Receiver::start(&hook, addr).await;
        hook.wait_until("the delivery after the restart", |i| {
            !i.accepted().is_empty()
        })
        .await;
        hook.with(|inbox| {
            let accepted = inbox.accepted();
            assert_eq!(accepted.len(), 1);
            assert_eq!(accepted[0].delivery_id(), first_id, "the same delivery_id");
            assert_eq!(accepted[0].body, first_body, "the same bytes");
            let d = webhook::verify_delivery(
                secret.as_bytes(),
                accepted[0].header("x-atp-signature"),
                &accepted[0].body,
            )
            .expect("signed with the secret given before the restart");
            assert_eq!(d.event, "connection_success");
            assert!(!String::from_utf8_lossy(&accepted[0].body).contains(ACCESS_TOKEN));
        });
        let (_, l) = list(&server.base, LLM_KEY).await;
        assert_eq!(l[0]["webhook_id"], w["webhook_id"]);
        // A webhook has one attempt in flight at a time: once a later event
        // has arrived, the first delivery's outcome is recorded.
        let state = start_flow(&server.base, LLM_KEY, "bob").await;
        assert_eq!(callback(&server.base, &state, "code=good-code").await, 200);
        hook.wait_until("a later delivery", |i| i.accepted().len() == 2)
            .await;
        assert_eq!(db.delivery(&first_id).0, "delivered");

        // Deleting the webhook drops what still waits for it.
        hook.set_failing(true);
        let state = start_flow(&server.base, LLM_KEY, "cy").await;
        assert_eq!(callback(&server.base, &state, "code=good-code").await, 200);
        hook.wait_until("a failed attempt", |i| {
            i.got.last().is_some_and(|r| r.answered == 500)
        })
        .await;
        let id = w["webhook_id"].as_str().expect("id");
        let (status, _) = http_json(
            "DELETE",
            &format!("{}{LLM}/webhooks/{id}/delete/", server.base),
            &[("authorization", &auth(LLM_KEY))],
            None,
        )
        .await;
        assert_eq!(status, 200);
        let c = rusqlite::Connection::open(&db.0).expect("open");
        let left: i64 = c
            .query_row("SELECT COUNT(*) FROM webhook_deliveries", [], |r| r.get(0))
            .expect("count");
        assert_eq!(left, 0, "the webhook's deliveries are gone with it");

        server.stop().await;
        receiver.stop().await;
        provider_task.abort();
    })
    .await;
}
