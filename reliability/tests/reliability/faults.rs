//! Faults: `atp-server` killed (SIGKILL) and restarted mid-call, a toolkit
//! process killed mid-call, connections cut by a proxy that asks no one,
//! and the server killed while SQLite is writing. Every caller gets an
//! answer or a clear error in bounded time, and every acknowledged write is
//! there after the restart.
//!
//! `ATP_FAULT_CYCLES` (default 3) sets how many rounds each test runs (each
//! kill test kills once per round for an HTTP and once for a WebSocket
//! caller).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use atp_registry::llm::{LlmClient, LlmError, LlmProtocol};
use atp_reliability::{
    http::{self, Conn, request},
    node::{self, Node, test_runtime_options, test_toolkit_with},
    proxy::CutProxy,
};
use atp_server::{AtpServer, Config, DbLocation};
use serde_json::{Value, json};
use tokio::sync::Notify;

const TK: &str = "fault-toolkit-key";
const LLM: &str = "fault-llm-key";
/// The bound of every wait.
const WAIT: Duration = Duration::from_secs(20);
/// How soon a caller must hear of a fault.
const PROMPT: Duration = Duration::from_secs(5);

fn node_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atp-reliability-node"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("atp-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

async fn server_node(db: &Path, addr: &str) -> Node {
    Node::start(node_bin(), &node::server_args(addr, db, TK, LLM, 60_000))
        .await
        .expect("the server starts")
}

fn llm(base: &str, protocol: LlmProtocol) -> LlmClient {
    LlmClient::new(LLM)
        .with_base_url(base)
        .with_protocol(protocol)
        .with_timeout(Duration::from_secs(60))
}

fn call(name: &str, input: Value) -> Value {
    json!({"type": "tool_use", "id": "t1", "name": name, "input": input})
}

/// Polls the server (every 20 ms, at most [`WAIT`]) until `app` is served
/// by a connected toolkit.
async fn wait_connected(base: &str, app: &str) {
    let client = llm(base, LlmProtocol::Http);
    let deadline = Instant::now() + WAIT;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while Instant::now() < deadline {
        tick.tick().await;
        if let Ok(ctx) = client.get_toolkit_context(app, "openai", "").await
            && ctx["toolkit_connected"] == json!(true)
        {
            return;
        }
    }
    panic!("{app} never got connected to {base}");
}

async fn echo_works(client: &LlmClient, app: &str) {
    let out = client
        .call_tool(app, &call("echo", json!({"text": "hi"})), "anthropic", "")
        .await
        .expect("an answer");
    assert_eq!(
        out[0]["content"][0]["content"], r#"{"echo":"hi"}"#,
        "{out:?}"
    );
}

/// A toolkit in this process whose `slow` calls say when they start.
fn toolkit(app: &str, base: &str) -> (atp_registry::ToolKitClient, Arc<Notify>) {
    let started = Arc::new(Notify::new());
    let notify = started.clone();
    let client = test_toolkit_with(TK, app, base, move |_| notify.notify_one())
        .with_runtime_options(test_runtime_options());
    (client, started)
}

async fn in_flight(started: &Notify) {
    tokio::time::timeout(WAIT, started.notified())
        .await
        .expect("the slow call reached the toolkit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atp_server_killed_mid_call_and_restarted() {
    let dir = scratch("server-kill");
    let db = dir.join("state.sqlite3");
    let mut server = server_node(&db, "127.0.0.1:0").await;
    let addr = server.addr();
    let base = server.url();
    // A registration made before the kill must survive it.
    let register = json!({"function_id": "kept", "api_key": TK, "app_name": "keptkit",
                          "metadata": {"params": [], "required_params": [], "description": "Kept."}});
    let r = http::once(
        addr,
        &request(
            "POST",
            "/api/v1/register_tool/",
            &[("Content-Type", "application/json")],
            register.to_string().as_bytes(),
        ),
        false,
        WAIT,
    )
    .await
    .expect("register");
    assert_eq!(r.status, 200, "{r:?}");
    let (toolkit, started) = toolkit("killkit", &base);
    let runtime = tokio::spawn({
        let toolkit = toolkit.clone();
        async move { toolkit.start().await }
    });
    wait_connected(&base, "killkit").await;
    for protocol in protocols() {
        let client = llm(&base, protocol);
        let pending = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .call_tool(
                        "killkit",
                        &call("slow", json!({"ms": 30_000})),
                        "anthropic",
                        "",
                    )
                    .await
            }
        });
        in_flight(&started).await;
        let killed = Instant::now();
        server.kill().await.expect("kill");
        let outcome = tokio::time::timeout(WAIT, pending)
            .await
            .expect("the caller is answered")
            .expect("no panic");
        let waited = killed.elapsed();
        // The call was on its way: the connection was lost (not "could not
        // connect").
        assert!(
            matches!(outcome, Err(LlmError::ConnectionLost)),
            "{protocol:?}: a server killed mid-call gave {outcome:?}"
        );
        assert!(
            waited < PROMPT,
            "{protocol:?}: the caller waited {waited:?}"
        );
        eprintln!(
            "{protocol:?}: the caller heard {:?} {waited:?} after the kill",
            outcome.err()
        );
        // While the server is down, a call can not connect: it says so at
        // once.
        let down = Instant::now();
        let refused = client
            .call_tool(
                "killkit",
                &call("echo", json!({"text": "hi"})),
                "anthropic",
                "",
            )
            .await;
        assert!(
            matches!(refused, Err(LlmError::Connect(_))),
            "{protocol:?}: a call to a dead server gave {refused:?}"
        );
        assert!(
            down.elapsed() < PROMPT,
            "{protocol:?}: {:?}",
            down.elapsed()
        );
        server = server_node(&db, &addr.to_string()).await;
        // The toolkit comes back by itself; calls work again.
        wait_connected(&base, "killkit").await;
        echo_works(&client, "killkit").await;
        let kept = client
            .get_toolkit_context("keptkit", "anthropic", "")
            .await
            .expect("the registration made before the kill is still there");
        assert_eq!(kept["tools"][0]["name"], "kept", "{kept}");
    }
    toolkit.stop();
    tokio::time::timeout(WAIT, runtime)
        .await
        .expect("stops")
        .expect("no panic")
        .expect("a clean stop");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An in-process `atp-server` (in memory) on a loopback port.
async fn memory_server() -> (AtpServer, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = AtpServer::open(Config {
        db: DbLocation::Memory,
        toolkit_api_keys: vec![TK.into()],
        llm_api_keys: vec![LLM.into()],
        task_timeout: Duration::from_secs(60),
        ..Config::default()
    })
    .expect("open");
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener).await });
    (server, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toolkit_killed_mid_call() {
    let (server, addr) = memory_server().await;
    let base = format!("http://{addr}");
    let mut kit = Node::start(node_bin(), &node::toolkit_args(&base, TK, "doomed"))
        .await
        .expect("the toolkit starts");
    assert!(server.wait_until_served("doomed", WAIT).await);
    for protocol in protocols() {
        let client = llm(&base, protocol);
        let pending = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .call_tool(
                        "doomed",
                        &call("slow", json!({"ms": 30_000})),
                        "anthropic",
                        "",
                    )
                    .await
            }
        });
        let line = kit.next_line(WAIT).await.expect("the slow call started");
        assert_eq!(line, "slow started 30000");
        let killed = Instant::now();
        kit.kill().await.expect("kill");
        let out = tokio::time::timeout(WAIT, pending)
            .await
            .expect("the caller is answered")
            .expect("no panic")
            .expect("an error result, not a failed call");
        let waited = killed.elapsed();
        assert_eq!(out[0]["content"][0]["is_error"], true, "{out:?}");
        assert_eq!(
            out[0]["content"][0]["content"], "The toolkit disconnected before answering",
            "{out:?}"
        );
        assert!(
            waited < PROMPT,
            "{protocol:?}: the caller waited {waited:?}"
        );
        eprintln!("{protocol:?}: the caller got its error {waited:?} after the kill");
        kit = Node::start(node_bin(), &node::toolkit_args(&base, TK, "doomed"))
            .await
            .expect("the toolkit restarts");
        assert!(server.wait_until_served("doomed", WAIT).await);
        echo_works(&client, "doomed").await;
    }
    drop(kit);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cuts_the_llm_client_mid_call() {
    let (server, addr) = memory_server().await;
    let base = format!("http://{addr}");
    let (toolkit, started) = toolkit("cutkit", &base);
    let runtime = tokio::spawn({
        let toolkit = toolkit.clone();
        async move { toolkit.start().await }
    });
    assert!(server.wait_until_served("cutkit", WAIT).await);
    let proxy = CutProxy::start(addr).await.expect("proxy");
    for protocol in protocols() {
        let client = llm(&proxy.url(), protocol);
        echo_works(&client, "cutkit").await;
        let pending = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .call_tool(
                        "cutkit",
                        &call("slow", json!({"ms": 30_000})),
                        "anthropic",
                        "",
                    )
                    .await
            }
        });
        in_flight(&started).await;
        let cut = Instant::now();
        proxy.cut_all();
        let outcome = tokio::time::timeout(WAIT, pending)
            .await
            .expect("the caller is answered")
            .expect("no panic");
        assert!(
            matches!(outcome, Err(LlmError::ConnectionLost)),
            "{protocol:?}: {outcome:?}"
        );
        assert!(
            cut.elapsed() < PROMPT,
            "{protocol:?}: the caller waited {:?}",
            cut.elapsed()
        );
        // The same client works again, on a new connection. Over HTTP the
        // first call may still pick a pooled connection the cut killed and
        // fail with a clear error (a POST that may have been sent is not
        // re-sent: a tool call is not idempotent); the one after works.
        let first = client
            .call_tool(
                "cutkit",
                &call("echo", json!({"text": "hi"})),
                "anthropic",
                "",
            )
            .await;
        match &first {
            Ok(out) => assert_eq!(out[0]["content"][0]["content"], r#"{"echo":"hi"}"#),
            Err(LlmError::Connect(_) | LlmError::ConnectionLost)
                if protocol == LlmProtocol::Http =>
            {
                eprintln!("{protocol:?}: the first call after the cut failed: {first:?}")
            }
            Err(e) => panic!("{protocol:?}: {e:?}"),
        }
        echo_works(&client, "cutkit").await;
    }
    assert!(proxy.cuts() >= 2);
    toolkit.stop();
    tokio::time::timeout(WAIT, runtime)
        .await
        .expect("stops")
        .expect("no panic")
        .expect("a clean stop");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cuts_the_toolkit_mid_call() {
    let (server, addr) = memory_server().await;
    let proxy = CutProxy::start(addr).await.expect("proxy");
    let (toolkit, started) = toolkit("cutside", &proxy.url());
    let runtime = tokio::spawn({
        let toolkit = toolkit.clone();
        async move { toolkit.start().await }
    });
    assert!(server.wait_until_served("cutside", WAIT).await);
    let client = llm(&format!("http://{addr}"), LlmProtocol::WebSocket);
    for round in 0..fault_cycles() {
        let pending = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .call_tool(
                        "cutside",
                        &call("slow", json!({"ms": 30_000})),
                        "anthropic",
                        "",
                    )
                    .await
            }
        });
        in_flight(&started).await;
        let accepted = proxy.accepted();
        let cut = Instant::now();
        proxy.cut_all();
        let out = tokio::time::timeout(WAIT, pending)
            .await
            .expect("the caller is answered")
            .expect("no panic")
            .expect("an error result");
        assert_eq!(
            out[0]["content"][0]["content"], "The toolkit disconnected before answering",
            "round {round}: {out:?}"
        );
        assert!(
            cut.elapsed() < PROMPT,
            "round {round}: the caller waited {:?}",
            cut.elapsed()
        );
        // The runtime reconnects through the proxy by itself.
        assert!(server.wait_until_served("cutside", WAIT).await);
        assert!(
            proxy.accepted() > accepted,
            "round {round}: no new connection"
        );
        echo_works(&client, "cutside").await;
    }
    toolkit.stop();
    tokio::time::timeout(WAIT, runtime)
        .await
        .expect("stops")
        .expect("no panic")
        .expect("a clean stop");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cuts_adapters_mid_request_and_mid_answer() {
    use atp_conformance::server::{Framework, spawn};
    for framework in Framework::ALL {
        let addr = spawn(
            framework,
            atp_registry::Engine::with_registry(atp_conformance::fixture()),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )
        .expect("the adapter starts");
        let proxy = CutProxy::start(addr).await.expect("proxy");
        for _ in 0..fault_cycles() {
            // Mid-answer: the client gets an error, not a hang.
            let get = request("GET", "/atp/conformance/?provider=openai", &[], b"");
            proxy.cut_after_downstream(Some(200));
            let mut conn = Conn::connect(proxy.addr()).await.expect("connect");
            let cut_answer = tokio::time::timeout(WAIT, conn.exchange(&get, false))
                .await
                .expect("no hang");
            assert!(cut_answer.is_err(), "{framework}: {cut_answer:?}");
            // Mid-request: half a body, then the cut.
            let before = proxy.accepted();
            let mut conn = Conn::connect(proxy.addr()).await.expect("connect");
            conn.send(b"POST /atp/conformance/echo/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"text\"")
            .await
            .expect("send");
            assert!(proxy.wait_accepted(before + 1, WAIT).await);
            proxy.cut_all();
            assert!(
                conn.closed_within(WAIT).await,
                "{framework}: the cut connection stays open"
            );
            // Both ways, the adapter still serves — directly and through the
            // proxy.
            for via in [addr, proxy.addr()] {
                let r = http::once(via, &get, false, WAIT).await.expect("served");
                assert_eq!(r.status, 200, "{framework}: {r:?}");
            }
        }
        assert!(
            proxy.cuts() >= 2 * fault_cycles(),
            "{framework}: {}",
            proxy.cuts()
        );
    }
}

/// HTTP then WebSocket, [`fault_cycles`] times over.
fn protocols() -> Vec<LlmProtocol> {
    [LlmProtocol::Http, LlmProtocol::WebSocket].repeat(fault_cycles())
}

/// How many rounds each fault test runs: `ATP_FAULT_CYCLES`, 3 by default.
fn fault_cycles() -> usize {
    std::env::var("ATP_FAULT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn integrity(db: &Path) -> String {
    let conn = rusqlite::Connection::open(db).expect("the database opens");
    conn.query_row("PRAGMA integrity_check", [], |row| row.get::<_, String>(0))
        .expect("an integrity answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_killed_during_writes_loses_nothing_acknowledged() {
    let dir = scratch("sqlite-kill");
    let db = dir.join("state.sqlite3");
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut in_doubt = 0usize;
    for cycle in 0..fault_cycles() {
        let server = server_node(&db, "127.0.0.1:0").await;
        let addr = server.addr();
        let count = Arc::new(AtomicUsize::new(0));
        let enough = Arc::new(Notify::new());
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..8 {
            let (acked, count, enough) = (acked.clone(), count.clone(), enough.clone());
            writers.spawn(async move {
                let Ok(mut conn) = Conn::connect(addr).await else { return 0 };
                let mut sent_unanswered = 0;
                for k in 0.. {
                    let app = format!("c{cycle}w{w}n{k}");
                    let body = json!({"function_id": "echo", "api_key": TK, "app_name": app,
                                      "metadata": {"params": ["text"], "required_params": ["text"], "description": "Echoes."}});
                    let bytes = request("POST", "/api/v1/register_tool/", &[("Content-Type", "application/json")], body.to_string().as_bytes());
                    sent_unanswered = 1;
                    match conn.exchange(&bytes, false).await {
                        Ok(r) if r.status == 200 => {
                            sent_unanswered = 0;
                            acked.lock().expect("lock").push(app);
                            if count.fetch_add(1, Ordering::SeqCst) + 1 == 150 {
                                enough.notify_one();
                            }
                        }
                        Ok(r) => panic!("a registration was refused: {r:?}"),
                        Err(_) => break,
                    }
                }
                sent_unanswered
            });
        }
        tokio::time::timeout(WAIT, enough.notified())
            .await
            .expect("150 registrations acknowledged");
        server.kill().await.expect("kill");
        while let Some(r) = writers.join_next().await {
            in_doubt += r.expect("no panic");
        }
        assert_eq!(
            integrity(&db),
            "ok",
            "cycle {cycle}: the database is damaged"
        );
        // Restart on the same file: every acknowledged registration is there.
        let server = server_node(&db, "127.0.0.1:0").await;
        let acked_now = acked.lock().expect("lock").clone();
        let mut conn = Conn::connect(server.addr()).await.expect("connect");
        for app in &acked_now {
            let ask =
                json!({"type": "get_toolkit_context", "toolkit_id": app, "provider": "anthropic"});
            let r = conn
                .exchange(
                    &request(
                        "POST",
                        "/api/v1/atp/llm-client/process/",
                        &[
                            ("Authorization", &format!("ApiKey {LLM}")),
                            ("Content-Type", "application/json"),
                        ],
                        ask.to_string().as_bytes(),
                    ),
                    false,
                )
                .await
                .expect("an answer");
            assert_eq!(
                r.status, 200,
                "cycle {cycle}: {app} was acknowledged, then lost: {r:?}"
            );
        }
        eprintln!(
            "cycle {cycle}: killed with writes in flight; {} acknowledged registrations so far, all present after the restart",
            acked_now.len()
        );
        server.kill().await.expect("kill");
    }
    eprintln!("{in_doubt} writes were in flight (unacknowledged) at the kills");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Slowloris at the open-file limit: `atp-server` may open 128 files, 200
/// connections sit idle (nothing sent, or half a request head) — more than
/// it can accept. A real request must still be served: the server closes
/// the idle ones when its header read timeout (1 s here) passes, and so
/// gets to it. (Before the timeout existed the server never closed them
/// and the real request waited as long as the idle ones stayed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_at_the_open_file_limit_is_outlasted() {
    let mut args = vec![
        "-c".to_owned(),
        "ulimit -n 128 && exec \"$0\" \"$@\"".to_owned(),
        node_bin().display().to_string(),
    ];
    args.extend(node::server_args(
        "127.0.0.1:0",
        Path::new(":memory:"),
        TK,
        LLM,
        60_000,
    ));
    args.extend(["--header-read-timeout-ms".to_owned(), "1000".to_owned()]);
    let server = Node::start(Path::new("sh"), &args)
        .await
        .expect("the server starts");
    let addr = server.addr();
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut c = Conn::connect(addr)
            .await
            .expect("connect (the backlog takes it)");
        if i % 2 == 1 {
            c.send(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                .await
                .expect("send");
        }
        idle.push(c);
    }
    let started = Instant::now();
    let r = http::once(addr, &request("GET", "/health", &[], b""), false, WAIT)
        .await
        .expect("the real request is served while the idle connections stay open");
    assert_eq!(r.status, 200, "{r:?}");
    eprintln!(
        "a real request beside 200 idle connections (open-file limit 128) was served after {:?}",
        started.elapsed()
    );
    drop(idle);
    drop(server);
}

/// A black-holed route (the proxy stops carrying anything and closes
/// nothing): a WebSocket `LlmClient` notices through its pings, fails the
/// call waiting on it, and connects anew for the next call — instead of
/// sending every later call down the dead connection until each times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_llm_connection_is_noticed_and_replaced() {
    let (server, addr) = memory_server().await;
    let base = format!("http://{addr}");
    let (toolkit, started) = toolkit("holekit", &base);
    let runtime = tokio::spawn({
        let toolkit = toolkit.clone();
        async move { toolkit.start().await }
    });
    assert!(server.wait_until_served("holekit", WAIT).await);
    let proxy = CutProxy::start(addr).await.expect("proxy");
    let client = LlmClient::new(LLM)
        .with_base_url(proxy.url())
        .with_protocol(LlmProtocol::WebSocket)
        .with_timeout(Duration::from_secs(10))
        .with_ping_interval(Duration::from_millis(500));
    for round in 0..fault_cycles() {
        echo_works(&client, "holekit").await;
        let pending = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .call_tool(
                        "holekit",
                        &call("slow", json!({"ms": 30_000})),
                        "anthropic",
                        "",
                    )
                    .await
            }
        });
        in_flight(&started).await;
        let frozen = Instant::now();
        proxy.freeze_all();
        let outcome = tokio::time::timeout(WAIT, pending)
            .await
            .expect("the caller is answered")
            .expect("no panic");
        assert!(
            matches!(outcome, Err(LlmError::ConnectionLost)),
            "round {round}: {outcome:?}"
        );
        // Two ping intervals and a bit, well before the call's own timeout.
        assert!(
            frozen.elapsed() < PROMPT,
            "round {round}: noticed after {:?}",
            frozen.elapsed()
        );
        eprintln!(
            "round {round}: a black-holed connection noticed after {:?}",
            frozen.elapsed()
        );
    }
    echo_works(&client, "holekit").await;
    toolkit.stop();
    tokio::time::timeout(WAIT, runtime)
        .await
        .expect("stops")
        .expect("no panic")
        .expect("a clean stop");
    server.shutdown();
}

/// The same black hole between a toolkit and `atp-server`: the server
/// notices through its pings and answers the waiting caller; the runtime
/// notices through its own and reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_toolkit_connection_is_noticed_by_both_sides() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = AtpServer::open(Config {
        db: DbLocation::Memory,
        toolkit_api_keys: vec![TK.into()],
        llm_api_keys: vec![LLM.into()],
        task_timeout: Duration::from_secs(60),
        ping_interval: Duration::from_millis(500),
        ..Config::default()
    })
    .expect("open");
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener).await });
    let proxy = CutProxy::start(addr).await.expect("proxy");
    let started = Arc::new(Notify::new());
    let notify = started.clone();
    let toolkit = test_toolkit_with(TK, "holeside", &proxy.url(), move |_| notify.notify_one())
        .with_runtime_options(
            test_runtime_options()
                .ping_interval(Duration::from_millis(500))
                // Its re-announcement may first pick a pooled HTTP connection
                // the freeze caught: that call waits this long.
                .request_timeout(Duration::from_secs(1)),
        );
    let runtime = tokio::spawn({
        let toolkit = toolkit.clone();
        async move { toolkit.start().await }
    });
    assert!(server.wait_until_served("holeside", WAIT).await);
    let client = llm(&format!("http://{addr}"), LlmProtocol::WebSocket);
    for round in 0..fault_cycles() {
        let pending = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .call_tool(
                        "holeside",
                        &call("slow", json!({"ms": 30_000})),
                        "anthropic",
                        "",
                    )
                    .await
            }
        });
        in_flight(&started).await;
        let accepted = proxy.accepted();
        let frozen = Instant::now();
        proxy.freeze_all();
        let out = tokio::time::timeout(WAIT, pending)
            .await
            .expect("the caller is answered")
            .expect("no panic")
            .expect("an error result");
        assert_eq!(
            out[0]["content"][0]["is_error"], true,
            "round {round}: {out:?}"
        );
        assert!(
            frozen.elapsed() < PROMPT,
            "round {round}: the caller waited {:?}",
            frozen.elapsed()
        );
        eprintln!(
            "round {round}: the caller got {:?} {:?} after the freeze",
            out[0]["content"][0]["content"],
            frozen.elapsed()
        );
        assert!(
            proxy.wait_accepted(accepted + 1, WAIT).await,
            "round {round}: the runtime never reconnected"
        );
        assert!(server.wait_until_served("holeside", WAIT).await);
        echo_works(&client, "holeside").await;
    }
    toolkit.stop();
    tokio::time::timeout(WAIT, runtime)
        .await
        .expect("stops")
        .expect("no panic")
        .expect("a clean stop");
    server.shutdown();
}
