//! atp-server on PostgreSQL (a throwaway server from `infra`): a toolkit's
//! registration outlives the server; an OAuth flow started on one server
//! finishes on another sharing the database, and a token two servers want
//! refreshed at once is refreshed once; a PostgreSQL restart under a
//! running server.
//!
//! Each test skips (saying so) where PostgreSQL is not installed.

use std::time::{Duration, Instant};

use atp_registry::{llm::LlmProtocol, runtime::Transport};
use atp_server::{Config, DbLocation, OAuthPlatform};
use serde_json::{Value, json};

use crate::{
    common::*,
    infra::{self, blocking},
    oauth_provider::{self, Provider, location},
};

fn pg_config(pg: &infra::Postgres) -> Config {
    Config {
        db: DbLocation::Postgres(pg.url.clone()),
        ..keyed_config()
    }
}

fn llm_auth() -> String {
    format!("ApiKey {LLM_KEY}")
}

// ---------------------------------------------------------------------------
// (a) Registrations live in PostgreSQL.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_toolkit_registered_on_postgres_outlives_the_server() {
    let Some(pg) = blocking(infra::Postgres::start) else {
        return;
    };
    bounded(Duration::from_secs(90), async {
        let server = TestServer::start_connected(pg_config(&pg)).await;
        let toolkit = demo_toolkit(TK_KEY, "pgkit", &server.base);
        let _stop = StopOnDrop(toolkit.clone());
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        server.wait_served("pgkit").await;
        for protocol in [LlmProtocol::WebSocket, LlmProtocol::Http] {
            assert_eq!(
                echo(&server, protocol, "pgkit", "hi").await,
                json!({"app": "pgkit", "echo": "hi"}),
                "{protocol:?}"
            );
        }
        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;

        // A new server on the same database knows the toolkit and its tools.
        let server = TestServer::start_connected(pg_config(&pg)).await;
        assert!(server.server.is_registered("pgkit"));
        assert!(!server.server.is_registered("other"));
        demo_context(&server, "pgkit").await;
        server.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// (b) OAuth across servers: a small provider over real HTTP that rotates
// refresh tokens (a refresh token works once, as many providers do).

/// The URL both servers put in their OAuth callbacks: the load balancer
/// in front of them (never contacted: the test delivers each redirect to
/// the server it chooses).
const PUBLIC: &str = "http://atp.invalid";
const CALLBACK: &str = "/api/v1/atp/llm-client/oauth/callback/";

/// The provider of these tests (`oauth_provider`): scope `read`, refresh
/// tokens that rotate; each refresh held until released when `hold`.
async fn rotating_provider(hold: bool) -> Provider {
    Provider::start(oauth_provider::Options {
        scopes: &["read"],
        rotate_refresh_tokens: true,
        hold_refreshes: hold,
        ..Default::default()
    })
    .await
}

fn oauth_config(pg: &infra::Postgres, platform: OAuthPlatform) -> Config {
    Config {
        public_url: Some(PUBLIC.into()),
        oauth_platforms: vec![platform],
        ..pg_config(pg)
    }
}

/// Two servers (A, B) on the database with `provider`'s platform.
async fn two_servers(pg: &infra::Postgres, provider: &Provider) -> (TestServer, TestServer) {
    (
        TestServer::start_connected(oauth_config(pg, provider.platform())).await,
        TestServer::start_connected(oauth_config(pg, provider.platform())).await,
    )
}

/// `user` connects: the flow started on `start`, the user's browser comes
/// back through `finish`. The callback (used) and its answer.
async fn connect_across(start: &TestServer, finish: &TestServer, user: &str) -> (String, Value) {
    let callback = authorize_on(start, user).await;
    let (status, connected) = callback_on(finish, &callback).await;
    assert_eq!(status, 200, "{connected}");
    (callback, connected)
}

/// Starting an OAuth flow for `user` (a write): status and body.
async fn start_flow(server: &TestServer, user: &str) -> (u16, Value) {
    http_json(
        "POST",
        &format!(
            "{}/api/v1/atp/llm-client/oauth/confirmation/local-app/",
            server.base
        ),
        &[("authorization", &llm_auth())],
        Some(&json!({"external_user_id": user})),
    )
    .await
}

/// The provider's redirect to the callback, as the user's browser gets it
/// after starting the flow on `start`.
async fn authorize_on(start: &TestServer, user: &str) -> String {
    let (status, started) = start_flow(start, user).await;
    assert_eq!(status, 200, "{started}");
    let auth_url = started["authorization_url"]
        .as_str()
        .expect("authorization_url");
    let (status, headers, body) = http("GET", auth_url, &[], None).await;
    assert_eq!(status, 302, "{body}");
    let callback = location(&headers);
    assert!(
        callback.starts_with(&format!("{PUBLIC}{CALLBACK}?")),
        "{callback}"
    );
    callback
}

/// Delivers the callback (addressed to the load balancer) to `server`.
async fn callback_on(server: &TestServer, callback: &str) -> (u16, Value) {
    let url = callback.replacen(PUBLIC, &server.base, 1);
    http_json("GET", &url, &[], None).await
}

/// `user`'s tokens, read from the server at `base`.
async fn tokens_at(base: &str, user: &str) -> (u16, Value) {
    http_json(
        "GET",
        &format!("{base}/api/v1/atp/llm-client/oauth/tokens/local-app/{user}/"),
        &[("authorization", &llm_auth())],
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oauth_flow_started_on_one_server_finishes_on_another() {
    let Some(pg) = blocking(infra::Postgres::start) else {
        return;
    };
    bounded(Duration::from_secs(90), async {
        let provider = rotating_provider(false).await;
        let (a, b) = two_servers(&pg, &provider).await;
        // Started on A, the user comes back through B.
        let (callback, connected) = connect_across(&a, &b, "ada").await;
        assert_eq!(connected["status"], "connected");
        let integration_id = connected["integration_id"]
            .as_str()
            .expect("integration_id")
            .to_owned();
        // The state is used: on neither server does it work again.
        for server in [&a, &b] {
            let (status, answer) = callback_on(server, &callback).await;
            assert_eq!(
                (status, answer["code"].as_str()),
                (400, Some("invalid_state")),
                "{answer}"
            );
        }

        // The tokens, from either server: A refreshes the expired one; B
        // reads what A saved.
        let (status, from_a) = tokens_at(&a.base, "ada").await;
        assert_eq!(status, 200, "{from_a}");
        let (status, from_b) = tokens_at(&b.base, "ada").await;
        assert_eq!(status, 200, "{from_b}");
        for t in [&from_a, &from_b] {
            assert_eq!(t["access_token"], "access-2", "{t}");
            assert_eq!(t["refresh_token"], "refresh-2", "{t}");
            assert_eq!(t["integration_id"], integration_id.as_str(), "{t}");
            assert_eq!(t["scope"], "read", "{t}");
        }
        assert_eq!(provider.refreshes(), 1);

        // Connecting again (started on B, finished on A) keeps the
        // integration id.
        let (_, again) = connect_across(&b, &a, "ada").await;
        assert_eq!(again["integration_id"], integration_id.as_str());

        // An unknown state is refused.
        let (status, answer) = callback_on(
            &a,
            &format!("{PUBLIC}{CALLBACK}?code=code-1&state=nonesuch"),
        )
        .await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (400, Some("invalid_state"))
        );

        a.stop().await;
        b.stop().await;
    })
    .await;
}

/// A refresh token the provider refuses removes the connection from the
/// shared database: on the other server too it reads as not connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_refresh_token_removes_the_connection_for_every_server() {
    let Some(pg) = blocking(infra::Postgres::start) else {
        return;
    };
    bounded(Duration::from_secs(90), async {
        let provider = rotating_provider(false).await;
        let (a, b) = two_servers(&pg, &provider).await;
        connect_across(&a, &b, "ada").await;
        provider.revoke_refresh_tokens();
        let (status, answer) = tokens_at(&a.base, "ada").await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (502, Some("oauth_refresh_failed")),
            "{answer}"
        );
        for server in [&a, &b] {
            let (status, answer) = tokens_at(&server.base, "ada").await;
            assert_eq!(
                (status, answer["code"].as_str()),
                (404, Some("not_connected")),
                "{answer}"
            );
        }
        // Connected again, the user's tokens work on both.
        connect_across(&b, &a, "ada").await;
        let (status, answer) = tokens_at(&b.base, "ada").await;
        assert_eq!(status, 200, "{answer}");
        a.stop().await;
        b.stop().await;
    })
    .await;
}

/// How many sessions wait for an advisory lock in the database now.
async fn advisory_waiters(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        &[],
    )
    .await
    .expect("pg_locks")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_refreshing_one_token_at_once_refresh_it_once() {
    let Some(pg) = blocking(infra::Postgres::start) else {
        return;
    };
    bounded(Duration::from_secs(90), async {
        let provider = rotating_provider(true).await;
        let (a, b) = two_servers(&pg, &provider).await;
        connect_across(&a, &b, "ada").await;

        // Both servers find the token expired at the same time. One
        // refreshes it (the provider holds that refresh until told to
        // answer); the other must wait for it rather than spend the
        // refresh token a second time (this provider, like many, refuses
        // a refresh token used twice).
        let started = provider.refresh_started();
        let from_a = tokio::spawn({
            let base = a.base.clone();
            async move { tokens_at(&base, "ada").await }
        });
        let from_b = tokio::spawn({
            let base = b.base.clone();
            async move { tokens_at(&base, "ada").await }
        });
        tokio::time::timeout(WAIT, started)
            .await
            .expect("a refresh reaches the provider");
        let (db, conn) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
        let conn = tokio::spawn(conn);
        // The other server is seen waiting for the connection's lock
        // (polled, with a bound).
        let deadline = Instant::now() + WAIT;
        while advisory_waiters(&db).await < 1 {
            assert!(
                Instant::now() < deadline,
                "the second server never waited for the first one's refresh \
                 (refreshes so far: {})",
                provider.refreshes()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        provider.release_refreshes();
        for answer in [from_a, from_b] {
            let (status, tokens) = tokio::time::timeout(WAIT, answer)
                .await
                .expect("answered in time")
                .expect("no panic");
            assert_eq!(status, 200, "{tokens}");
            assert_eq!(tokens["access_token"], "access-2", "{tokens}");
            assert_eq!(tokens["refresh_token"], "refresh-2", "{tokens}");
        }
        assert_eq!(provider.refreshes(), 1);
        // The lock was released: nobody waits, and a pooled connection is
        // not left inside a transaction.
        assert_eq!(advisory_waiters(&db).await, 0);
        let held: i64 = db
            .query_one(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory'",
                &[],
            )
            .await
            .expect("pg_locks")
            .get(0);
        assert_eq!(held, 0);
        drop(db);
        let _ = conn.await;

        a.stop().await;
        b.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// (c) PostgreSQL restarts under a running server.

/// The longest a call may take while the database is down (the pool's
/// waits are 5 s).
const DOWN_BOUND: Duration = Duration::from_secs(12);

/// `GET /ready`: status and body.
async fn ready(server: &TestServer) -> (u16, Value) {
    http_json("GET", &format!("{}/ready", server.base), &[], None).await
}

/// Registering a tool over HTTP (a write): status and body.
async fn register(server: &TestServer) -> (u16, Value) {
    http_json(
        "POST",
        &format!("{}/api/v1/register_tool", server.base),
        &[],
        Some(&json!({
            "api_key": TK_KEY,
            "app_name": "restarts",
            "function_id": "ping",
            "metadata": {"description": "Pings.", "params": [], "required_params": []},
        })),
    )
    .await
}

/// `f`'s answer, which must come within [`DOWN_BOUND`].
async fn quickly<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DOWN_BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {DOWN_BOUND:?}"))
}

/// The process ids of the database's client connections (this one's
/// aside).
async fn client_backends(url: &str) -> Vec<i32> {
    let (db, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    let conn = tokio::spawn(conn);
    let pids = db
        .query(
            "SELECT pid FROM pg_stat_activity
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(db);
    let _ = conn.await;
    pids
}

/// Whether process `pid` runs (a zombie does not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        !matches!(state.and_then(|r| r.chars().next()), Some('Z' | 'X') | None)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_under_a_running_server() {
    let Some(mut pg) = blocking(infra::Postgres::start) else {
        return;
    };
    bounded(Duration::from_secs(120), async {
        // The provider is never reached: flows are only started.
        let platform = oauth_provider::platform("http://127.0.0.1:9", &["read"]);
        let server = TestServer::start_connected(oauth_config(&pg, platform)).await;
        let toolkit = demo_toolkit(TK_KEY, "pgkit", &server.base);
        let _stop = StopOnDrop(toolkit.clone());
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        server.wait_served("pgkit").await;
        let call = || echo(&server, LlmProtocol::Http, "pgkit", "hi");

        let (status, body) = ready(&server).await;
        assert_eq!((status, &body["database"]), (200, &json!("ok")), "{body}");
        assert_eq!(tokens_at(&server.base, "ada").await.0, 404);
        assert_eq!(start_flow(&server, "ada").await.0, 200);

        let backends = client_backends(&pg.url).await;
        assert!(!backends.is_empty(), "the server holds connections");
        blocking(|| pg.kill());
        // The postmaster is gone at once, its backends a moment later
        // (polled, with a bound): until then the server's pooled
        // connections still answer.
        let deadline = Instant::now() + WAIT;
        while let Some(pid) = backends.iter().find(|p| alive(**p)) {
            assert!(
                Instant::now() < deadline,
                "backend {pid} outlived the postmaster"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Down: what needs the database answers a clear error, in time.
        let (status, body) = quickly("ready", ready(&server)).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["status"], "unavailable");
        assert_ne!(body["database"], "ok");
        let (status, body) = quickly("tokens", tokens_at(&server.base, "ada")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (500, Some("The connection could not be read")),
            "{body}"
        );
        let (status, body) = quickly("confirmation", start_flow(&server, "ada")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (500, Some("The OAuth flow could not be stored")),
            "{body}"
        );
        let (status, body) = quickly("register_tool", register(&server)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (500, Some("The registration could not be stored")),
            "{body}"
        );
        assert!(!server.server.is_registered("restarts"));
        // What does not need it goes on working.
        assert_eq!(
            quickly("a tool call", call()).await,
            json!({"app": "pgkit", "echo": "hi"})
        );

        blocking(|| pg.restart());

        // Back: the same server recovers (its pool reconnects); polled,
        // with a bound.
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, body) = quickly("ready", ready(&server)).await;
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not ready again within {WAIT:?}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            quickly("tokens", tokens_at(&server.base, "ada")).await.0,
            404
        );
        let (status, body) = quickly("confirmation", start_flow(&server, "ada")).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = quickly("register_tool", register(&server)).await;
        assert_eq!(status, 200, "{body}");
        assert!(server.server.is_registered("restarts"));
        assert_eq!(
            quickly("a tool call", call()).await,
            json!({"app": "pgkit", "echo": "hi"})
        );

        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;
    })
    .await;
}
