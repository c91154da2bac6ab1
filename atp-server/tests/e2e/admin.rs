//! Admin access (`admin_api_keys`) and the live list of calls
//! (`GET /admin/calls/live`): off without admin keys, refused without the
//! right one, and each finished call arrives as an event, without any key
//! in it.

use std::time::Duration;

use atp_registry::{llm::LlmProtocol, runtime::Transport};
use atp_server::Config;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

const ADMIN_KEY: &str = "admin-key-0123456789";

/// Opens the live stream with `auth`, returning the connection once the
/// answer's head has arrived (so the server is subscribed).
async fn open_live(server: &TestServer, auth: &str) -> (tokio::net::TcpStream, String) {
    let addr = server.base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "GET /admin/calls/live HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {auth}\r\naccept: text/event-stream\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.expect("write");
    let mut seen = String::new();
    read_until(&mut conn, &mut seen, "\r\n\r\n").await;
    (conn, seen)
}

/// Reads from `conn` into `seen` until it contains `needle` (10 s at most).
async fn read_until(conn: &mut tokio::net::TcpStream, seen: &mut String, needle: &str) {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !seen.contains(needle) {
            let n = conn.read(&mut buf).await.expect("read");
            assert!(n > 0, "the stream ended before {needle:?}: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} within 10 s: {seen}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_calls_are_admin_only_and_show_each_call() {
    bounded(Duration::from_secs(60), async {
        // Off without admin keys (outside dev mode).
        let off = TestServer::start(keyed_config()).await;
        let url = format!("{}/admin/calls/live", off.base);
        let auth = format!("Bearer {ADMIN_KEY}");
        let (status, _, _) = http("GET", &url, &[("authorization", auth.as_str())], None).await;
        assert_eq!(status, 404);
        off.stop().await;

        let server = TestServer::start(Config {
            admin_api_keys: vec![ADMIN_KEY.into()],
            ..keyed_config()
        })
        .await;
        let url = format!("{}/admin/calls/live", server.base);
        let llm_auth = format!("Bearer {LLM_KEY}");
        for auth in [
            None,
            Some("Bearer wrong-admin-key-0123"),
            Some(llm_auth.as_str()),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
            let (status, headers, body) = http("GET", &url, &headers, None).await;
            assert_eq!(status, 401, "{auth:?}: {body}");
            assert_eq!(headers["www-authenticate"], "Bearer");
        }

        let toolkit = demo_toolkit(TK_KEY, "watched", &server.base);
        let runtime = serve_toolkit(&toolkit, Transport::WebSocket);
        let _stop = StopOnDrop(toolkit.clone());
        server.wait_served("watched").await;

        let (mut live, mut seen) = open_live(&server, ADMIN_KEY).await;
        assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
        assert!(
            seen.to_ascii_lowercase().contains("text/event-stream"),
            "{seen}"
        );
        echo(&server, LlmProtocol::Http, "watched", "hello").await;
        let llm = server.llm(LlmProtocol::Http);
        let fails = json!({"type": "tool_use", "id": "f1", "name": "fails", "input": {}});
        llm.call_tool("watched", &fails, "anthropic", "")
            .await
            .expect("an answer");
        read_until(&mut live, &mut seen, "\"tool\":\"fails\"").await;
        let events: Vec<serde_json::Value> = seen
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).expect("JSON data"))
            .collect();
        assert_eq!(events.len(), 2, "{seen}");
        assert_eq!(events[0]["toolkit"], "watched");
        assert_eq!(events[0]["tool"], "echo");
        assert_eq!(events[0]["outcome"], "ok");
        assert_eq!(events[0]["transport"], "websocket");
        assert!(events[0]["duration_ms"].as_f64().is_some_and(|d| d >= 0.0));
        assert_eq!(events[1]["outcome"], "tool_error");
        for secret in [TK_KEY, LLM_KEY, ADMIN_KEY] {
            assert!(!seen.contains(secret), "{secret} in the stream");
        }

        drop(live);
        stop_toolkit(&toolkit, runtime).await;
        server.stop().await;
    })
    .await;
}
