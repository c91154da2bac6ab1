//! Webhooks, the store and the execution log on PostgreSQL (a throwaway
//! server from `infra`), with two atp-server instances sharing the
//! database: a webhook registered on either is listed on both, and events
//! emitted on either are delivered exactly once each, although both
//! servers' delivery tasks take from the one queue.
//!
//! Each test skips (saying so) where PostgreSQL is not installed.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use atp_registry::webhook;
use atp_server::{Config, DbLocation};
use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::{
    apps::toolkit_ws,
    common::*,
    hooks::{Hook, Receiver},
    infra::{self, blocking},
    store::{executions, get, ids, register, report, run_executions, two_developers},
};

const LLM: &str = "/api/v1/atp/llm-client";

/// Dev mode (any key) on the database, with fast retries.
fn dev_config(pg: &infra::Postgres) -> Config {
    let mut c = Config::dev().with_db(DbLocation::Postgres(pg.url.clone()));
    c.secrets_keys = vec![secrets_key(0x5a)];
    c.webhook_retry_base = Duration::from_millis(50);
    c.webhook_timeout = Duration::from_secs(2);
    c.webhook_max_attempts = 1000;
    c
}

async fn register_hook(base: &str, key: &str, url: &str) -> Value {
    let (status, w) = http_json(
        "POST",
        &format!("{base}{LLM}/webhooks/register/"),
        &[("authorization", &format!("ApiKey {key}"))],
        Some(&json!({"url": url, "events": ["toolkit_connected"]})),
    )
    .await;
    assert_eq!(status, 201, "{w}");
    w
}

async fn list_hooks(base: &str, key: &str) -> Vec<String> {
    let (status, l) = http_json(
        "GET",
        &format!("{base}{LLM}/webhooks/"),
        &[("authorization", &format!("ApiKey {key}"))],
        None,
    )
    .await;
    assert_eq!(status, 200, "{l}");
    l.as_array()
        .expect("a list")
        .iter()
        .map(|w| {
            assert!(w.get("secret").is_none(), "{w}");
            w["webhook_id"].as_str().expect("webhook_id").to_owned()
        })
        .collect()
}

/// The database's webhook deliveries: delivery id → (webhook id, status).
async fn deliveries(pg: &infra::Postgres) -> HashMap<String, (String, String)> {
    let (client, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    let connection = tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT delivery_id, webhook_id, status FROM webhook_deliveries",
            &[],
        )
        .await
        .expect("the deliveries");
    drop(client);
    let _ = connection.await;
    rows.iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Toolkits per server; each connects once: one `toolkit_connected` each.
const KITS_PER_SERVER: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_share_webhooks_and_deliver_each_event_once() {
    let Some(pg) = blocking(infra::Postgres::start) else {
        return;
    };
    bounded(Duration::from_secs(90), async {
        let hook = Hook::new();
        let receiver = Receiver::start(&hook, "127.0.0.1:0".parse().expect("addr")).await;
        let one = TestServer::start_connected(dev_config(&pg)).await;

        // Two webhooks registered on the first server, one on the second
        // (started since): each server lists all three, oldest first.
        let mut secrets = HashMap::new();
        let mut registered = Vec::new();
        for _ in 0..2 {
            let w = register_hook(&one.base, LLM_KEY, &receiver.url()).await;
            registered.push(w["webhook_id"].as_str().expect("id").to_owned());
            secrets.insert(
                registered[registered.len() - 1].clone(),
                w["secret"].clone(),
            );
        }
        let two = TestServer::start_connected(dev_config(&pg)).await;
        assert_eq!(list_hooks(&two.base, LLM_KEY).await, registered);
        let w = register_hook(&two.base, LLM_KEY, &receiver.url()).await;
        registered.push(w["webhook_id"].as_str().expect("id").to_owned());
        secrets.insert(registered[2].clone(), w["secret"].clone());
        assert_eq!(list_hooks(&one.base, LLM_KEY).await, registered);
        assert_eq!(list_hooks(&two.base, LLM_KEY).await, registered);
        assert!(list_hooks(&two.base, "another-key").await.is_empty());

        // Toolkits, each under its own key, registered on the server they
        // will connect to; then all connect at once, so that both servers
        // queue and deliver at the same time from the one queue.
        let mut kits = Vec::new();
        for (n, server) in [&one, &two].into_iter().enumerate() {
            for i in 0..KITS_PER_SERVER {
                let (key, app) = (format!("tk-{n}-{i}"), format!("kit-{n}-{i}"));
                register(&server.base, &key, &app, "alpha").await;
                kits.push((server, key, app));
            }
        }
        let sockets = join_all(kits.iter().map(|(server, key, _)| toolkit_ws(server, key))).await;
        let apps: Vec<String> = kits.into_iter().map(|(_, _, app)| app).collect();
        let want = apps.len() * registered.len();
        hook.wait_until("every delivery", |inbox| {
            let ids: HashSet<String> = inbox
                .accepted()
                .iter()
                .map(|r| {
                    r.json()["delivery_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect();
            ids.len() >= want
        })
        .await;
        // Stopping the servers ends their delivery tasks: a second copy of
        // a delivery would have been sent by now (a double claim sends both
        // copies at once).
        one.stop().await;
        two.stop().await;
        drop(sockets);

        hook.with(|inbox| {
            let accepted = inbox.accepted();
            let mut seen = HashSet::new();
            let mut pairs = HashSet::new();
            for r in &accepted {
                let d = r.json();
                let delivery_id = d["delivery_id"].as_str().expect("delivery_id");
                assert!(seen.insert(delivery_id.to_owned()), "delivered twice: {d}");
                let webhook_id = d["webhook_id"].as_str().expect("webhook_id");
                let secret = secrets[webhook_id].as_str().expect("secret");
                webhook::verify(secret.as_bytes(), r.header("x-atp-signature"), &r.body)
                    .expect("signed with its webhook's secret");
                assert_eq!(d["event"], "toolkit_connected");
                let kit = d["data"]["toolkit_id"].as_str().expect("toolkit_id");
                assert!(
                    pairs.insert((webhook_id.to_owned(), kit.to_owned())),
                    "two deliveries of one event to one webhook: {d}"
                );
            }
            assert_eq!(accepted.len(), want, "each event once to each webhook");
            for webhook_id in &registered {
                for app in &apps {
                    assert!(pairs.contains(&(webhook_id.clone(), app.clone())));
                }
            }
        });
        // The queue holds exactly what was delivered.
        let queued = deliveries(&pg).await;
        assert_eq!(queued.len(), want);
        hook.with(|inbox| {
            for r in inbox.accepted() {
                let d = r.json();
                let (webhook_id, _) = &queued[d["delivery_id"].as_str().expect("id")];
                assert_eq!(d["webhook_id"], webhook_id.as_str());
            }
        });
        receiver.stop().await;
    })
    .await;
}

/// An execution report to `base`: `result` of `tool`, with `token`.
async fn report_result(base: &str, token: &str, tool: &str, result: Value) -> (u16, Value) {
    report(
        base,
        &json!({"exchange_token": token, "result": result, "function_id": tool}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_and_execution_reports_work_on_postgres() {
    let Some(pg) = blocking(infra::Postgres::start) else {
        return;
    };
    bounded(Duration::from_secs(90), async {
        let config = || two_developers(DbLocation::Postgres(pg.url.clone()));
        let one = TestServer::start_connected(config()).await;
        let token = |answer: &Value| {
            answer["exchange_token"]
                .as_str()
                .expect("a token")
                .to_owned()
        };
        let alpha = token(&register(&one.base, "ada-tk", "ada-public", "alpha").await);
        let beta = token(&register(&one.base, "ada-tk", "ada-public", "beta").await);
        register(&one.base, "ada-tk", "ada-private", "secret").await;
        register(&one.base, "bob-tk", "bob-public", "alpha").await;
        // A second server on the database knows them.
        let two = TestServer::start_connected(config()).await;

        for b in [&one.base, &two.base] {
            let (status, page) = get(b, "store/toolkits/list/", "bob-llm").await;
            assert_eq!(status, 200, "{page}");
            assert_eq!(ids(&page), ["ada-public", "bob-public"]);
            assert_eq!(page["results"][0]["tools_count"], 2);
            assert_eq!(page["results"][0]["description"], "2 tools: alpha, beta");
            let (status, page) = get(b, "store/toolkits/list/?page=2&page_size=1", "ada-llm").await;
            assert_eq!((status, ids(&page)), (200, vec!["bob-public"]));
            let (status, kit) = get(b, "store/toolkits/ada-private/", "ada-llm").await;
            assert_eq!(status, 200, "{kit}");
            assert_eq!(kit["tools"][0]["function"], "secret");
            let (status, hidden) = get(b, "store/toolkits/ada-private/", "bob-llm").await;
            assert_eq!(
                (status, hidden["code"].as_str()),
                (404, Some("toolkit_not_found"))
            );
            let (_, mine) = get(b, "developers/toolkits/", "ada-llm").await;
            assert_eq!(ids(&mine), ["ada-private", "ada-public"]);
            let (status, profile) = get(b, "store/developers/ada/", "bob-llm").await;
            assert_eq!(status, 200, "{profile}");
            assert_eq!(ids(&profile), ["ada-public"]);
        }

        // Reports: to either server, with a token either issued.
        let hello = json!({"message": "Hello, Ada!"});
        assert_eq!(
            report_result(&one.base, &alpha, "alpha", hello.clone()).await,
            (200, json!({"status": "ok"}))
        );
        assert_eq!(
            report_result(&two.base, &alpha, "alpha", hello.clone())
                .await
                .0,
            200
        );
        assert_eq!(
            report_result(&two.base, &beta, "beta", json!([1, 2]))
                .await
                .0,
            200
        );
        for (t, tool) in [("forged-token", "alpha"), (beta.as_str(), "alpha")] {
            for b in [&one.base, &two.base] {
                let (status, answer) = report_result(b, t, tool, json!(1)).await;
                assert_eq!(
                    (status, answer["code"].as_str()),
                    (403, Some("invalid_exchange_token"))
                );
            }
        }
        // The newest 16 tokens of a tool stay valid, however fast they are
        // issued (most within one second here).
        let first = token(&register(&one.base, "ada-tk", "ada-public", "alpha").await);
        for _ in 0..14 {
            register(&one.base, "ada-tk", "ada-public", "alpha").await;
        }
        assert_eq!(
            report_result(&two.base, &alpha, "alpha", json!({"n": 1}))
                .await
                .0,
            200,
            "the 16th newest token"
        );
        register(&one.base, "ada-tk", "ada-public", "alpha").await;
        let (status, answer) = report_result(&two.base, &alpha, "alpha", json!({"n": 0})).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (403, Some("invalid_exchange_token")),
            "the 17th newest token"
        );
        assert_eq!(
            report_result(&one.base, &first, "alpha", json!({"n": 2}))
                .await
                .0,
            200
        );

        // The log, read by the operator's CLI from PostgreSQL.
        let log = executions(&["--db", &pg.url]).await;
        let rows: Vec<(&str, &Value)> = log
            .iter()
            .map(|r| (r["function_id"].as_str().expect("tool"), &r["result"]))
            .collect();
        assert_eq!(
            rows,
            [
                ("alpha", &hello),
                ("alpha", &hello),
                ("beta", &json!([1, 2])),
                ("alpha", &json!({"n": 1})),
                ("alpha", &json!({"n": 2})),
            ]
        );
        assert!(log.iter().all(|r| r["app_name"] == "ada-public"));
        assert!(log[0]["reported_at"].as_str().expect("time").ends_with('Z'));
        assert!(
            log.windows(2)
                .all(|w| w[0]["id"].as_i64() < w[1]["id"].as_i64())
        );
        let newest = executions(&["--db", &pg.url, "--limit", "1"]).await;
        assert_eq!(newest.len(), 1);
        assert_eq!(newest[0]["result"], json!({"n": 2}));
        assert!(
            executions(&["--db", &pg.url, "--app", "bob-public"])
                .await
                .is_empty()
        );
        // A database that is not atp-server's: a clear error.
        let other = pg.url.replace("/atp", "/postgres");
        let out = run_executions(&["--db", &other]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("holds no execution log"), "{stderr}");
        one.stop().await;
        two.stop().await;
    })
    .await;
}

/// The console's admin endpoints on PostgreSQL: a webhook's deliveries
/// (a failed one, resent, delivered) and the OAuth connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_endpoints_work_on_postgres() {
    let Some(pg) = blocking(infra::Postgres::start) else {
        return;
    };
    bounded(Duration::from_secs(90), async {
        let hook = Hook::new();
        hook.set_failing(true);
        let receiver = Receiver::start(&hook, "127.0.0.1:0".parse().expect("addr")).await;
        let mut config = dev_config(&pg);
        config.webhook_max_attempts = 1;
        let server = TestServer::start_connected(config).await;
        let w = register_hook(&server.base, LLM_KEY, &receiver.url()).await;
        let toolkit = demo_toolkit(TK_KEY, "pgconsole", &server.base);
        let runtime = serve_toolkit(&toolkit, atp_registry::runtime::Transport::WebSocket);
        let _stop = StopOnDrop(toolkit.clone());
        server.wait_served("pgconsole").await;

        // Polls the console's list until the delivery has `status`.
        let delivery = async |status: &str| -> Value {
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                let (code, list) =
                    http_json("GET", &format!("{}/admin/webhooks", server.base), &[], None).await;
                assert_eq!(code, 200, "{list}");
                let hooks = list["webhooks"].as_array().expect("webhooks");
                assert_eq!(hooks.len(), 1, "{list}");
                assert_eq!(hooks[0]["id"], w["webhook_id"]);
                let d = &hooks[0]["deliveries"][0];
                if d["status"] == status {
                    return d.clone();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "never {status}: {list}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let failed = delivery("failed").await;
        assert_eq!(failed["event"], "toolkit_connected");
        assert_eq!(failed["last_status"], 500);
        assert_eq!(failed["attempts"], 1);
        hook.set_failing(false);
        let id = failed["id"].as_str().expect("id");
        let (code, _) = http_json(
            "POST",
            &format!("{}/admin/webhooks/deliveries/{id}/resend", server.base),
            &[],
            Some(&json!({})),
        )
        .await;
        assert_eq!(code, 202);
        let delivered = delivery("delivered").await;
        assert_eq!(delivered["id"], failed["id"]);
        assert_eq!(delivered["last_status"], 200);
        let (code, _) = http_json(
            "POST",
            &format!("{}/admin/webhooks/deliveries/no-such/resend", server.base),
            &[],
            Some(&json!({})),
        )
        .await;
        assert_eq!(code, 404);

        let (code, oauth) =
            http_json("GET", &format!("{}/admin/oauth", server.base), &[], None).await;
        assert_eq!(code, 200, "{oauth}");
        assert_eq!(oauth["connections"], json!([]));
        let (code, _) = http_json(
            "DELETE",
            &format!("{}/admin/oauth/connections/no-such", server.base),
            &[],
            None,
        )
        .await;
        assert_eq!(code, 404);
        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;
        receiver.stop().await;
    })
    .await;
}
