//! ATP-SPEC §9's fault runs, against real `atp-server` processes sharing
//! one PostgreSQL database and routing calls over NATS: an instance killed
//! mid-call (its callers elsewhere are answered `toolkit_disconnected`
//! within seconds, not at the task timeout, and its toolkits reconnect to
//! another instance), a caller's instance killed, NATS killed and brought
//! back, PostgreSQL restarted — and nothing acknowledged is lost.
//!
//! Every server is a child process (`kill_on_drop`, SIGKILL on a fault);
//! toolkits and LLM clients are Rust peers in this process. Each run
//! prints one `FAULT …` summary line.

use std::{
    future::Future,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use atp_registry::{
    Call, Tool, ToolError, ToolKitClient,
    llm::{LlmClient, LlmError, LlmProtocol},
    runtime::Transport,
    wire::WebhookEvent,
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    task::{JoinHandle, JoinSet},
};

use crate::{
    common::*,
    infra::{Nats, Postgres, blocking, free_port},
};

/// The task timeout the servers run with: every answer asserted here
/// must come far sooner.
const TASK_TIMEOUT_SECS: u64 = 60;
/// How long a caller whose toolkit's instance died may wait for its answer.
const ANSWERED_WITHIN: Duration = Duration::from_secs(10);
/// The client-side bound of one call: a call without an answer by then is
/// lost (far below the task timeout, so a caller left to it shows up).
const CALL_BOUND: Duration = Duration::from_secs(25);
/// How long a server process may take to be ready.
const START_BOUND: Duration = Duration::from_secs(20);
/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(50);
/// How long one of a slow call's waits lasts: far longer than any run.
const SLOW_MS: u64 = 20_000;

// ---------------------------------------------------------------------------
// Processes.

/// An `atp-server` process on a loopback port, killed when dropped; its
/// log (stderr) is kept and printed when a test fails.
struct Proc {
    name: &'static str,
    base: String,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts one on the shared database and bus and waits until its
    /// `GET /ready` says 200.
    async fn start(name: &'static str, pg: &Postgres, nats: &Nats) -> Self {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_atp-server"))
            .arg("--addr")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--db", &pg.url, "--nats", &nats.url])
            .args(["--task-timeout", &TASK_TIMEOUT_SECS.to_string()])
            .args(["--toolkit-api-keys", TK_KEY, "--llm-api-keys", LLM_KEY])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .env("ATP_SECRETS_KEY", secrets_key_hex())
            .env_remove("ATP_SECRETS_KEY_FILE")
            .env_remove("ATP_DB_URL")
            .env_remove("ATP_NATS_URL")
            .env_remove("ATP_TOOLKIT_API_KEYS")
            .env_remove("ATP_LLM_API_KEYS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start atp-server");
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    log.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(line);
                }
            });
        }
        let mut p = Self {
            name,
            base: format!("http://127.0.0.1:{port}"),
            child: Some(child),
            log,
        };
        p.wait_ready().await;
        p
    }

    /// Polls `GET /ready` until 200 (bounded); panics with the log if the
    /// process exits first.
    async fn wait_ready(&mut self) {
        let t0 = Instant::now();
        loop {
            if let Ok((200, _)) = ready(&self.base).await {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "atp-server {} exited at start ({status}):\n{}",
                    self.name,
                    self.log_text()
                );
            }
            assert!(
                t0.elapsed() < START_BOUND,
                "atp-server {} not ready within {START_BOUND:?}:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILL: a crash, no shutdown. Returns when it is dead.
    async fn kill(&mut self) -> Instant {
        let at = Instant::now();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        at
    }

    fn log_text(&self) -> String {
        let log = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let from = log.len().saturating_sub(60);
        log[from..].join("\n")
    }

    fn llm(&self, protocol: LlmProtocol) -> LlmClient {
        llm(&self.base, protocol)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- log of atp-server {} ({}) ---\n{}\n--- end of log ---",
                self.name,
                self.base,
                self.log_text()
            );
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// PostgreSQL, NATS and `names.len()` servers sharing them (`None`: not
/// installed, and the harness said so).
async fn cluster(names: &[&'static str]) -> Option<(Postgres, Nats, Vec<Proc>)> {
    let pg = blocking(Postgres::start)?;
    let nats = blocking(Nats::start)?;
    let mut servers = Vec::new();
    for name in names {
        servers.push(Proc::start(name, &pg, &nats).await);
    }
    Some((pg, nats, servers))
}

// ---------------------------------------------------------------------------
// HTTP that may fail (a dead server is no panic here).

/// A JSON exchange within `bound`: status and body (text in a string when
/// not JSON), or why there is none.
async fn try_http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
    bound: Duration,
) -> Result<(u16, Value), String> {
    let exchange = async {
        let resp = send(method, url, headers, body.map(Value::to_string))
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, value))
    };
    tokio::time::timeout(bound, exchange)
        .await
        .map_err(|_| format!("no answer within {bound:?}"))?
}

/// `GET /ready` (the server's checks take at most 2 s each).
async fn ready(base: &str) -> Result<(u16, Value), String> {
    try_http(
        "GET",
        &format!("{base}/ready"),
        &[],
        None,
        Duration::from_secs(6),
    )
    .await
}

/// Polls `f` until it gives a value; panics after `bound`. Returns the
/// value and how long it took.
async fn poll_until<T, Fut: Future<Output = Option<T>>>(
    what: &str,
    bound: Duration,
    mut f: impl FnMut() -> Fut,
) -> (T, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return (v, t0.elapsed());
        }
        assert!(t0.elapsed() < bound, "{what}: not within {bound:?}");
        tokio::time::sleep(POLL).await;
    }
}

async fn ready_status_is(base: &str, want: u16) -> Option<Value> {
    match ready(base).await {
        Ok((status, body)) if status == want => Some(body),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Peers.

fn llm(base: &str, protocol: LlmProtocol) -> LlmClient {
    LlmClient::new(LLM_KEY)
        .with_base_url(base)
        .with_protocol(protocol)
        .with_timeout(CALL_BOUND)
}

/// The toolkit of the runs, served (WebSocket) until dropped.
struct FaultKit {
    /// How many `counted_slow` calls have started.
    started: Arc<AtomicUsize>,
    _stop: StopOnDrop,
    _runtime: JoinHandle<()>,
}

impl FaultKit {
    /// Serves toolkit `app`, given every server's URL (its runtime
    /// connects to the first), and waits until each server sees it
    /// connected.
    async fn serve(servers: &[Proc], app: &str) -> Self {
        let started = Arc::new(AtomicUsize::new(0));
        let urls: Vec<&str> = servers.iter().map(|p| p.base.as_str()).collect();
        let toolkit = fault_toolkit(app, &urls, &started);
        let kit = Self {
            started,
            _runtime: serve_toolkit(&toolkit, Transport::WebSocket),
            _stop: StopOnDrop(toolkit),
        };
        wait_connected(servers, app).await;
        kit
    }

    /// Waits until `n` `counted_slow` calls are in the toolkit's hands.
    async fn wait_started(&self, n: usize) {
        poll_until(
            &format!("{n} calls in the toolkit's hands"),
            START_BOUND,
            || async { (self.started.load(Ordering::SeqCst) >= n).then_some(()) },
        )
        .await;
    }
}

/// The demo toolkit, given several servers, with `counted_slow`: `slow`
/// that counts its calls as they start (the runs kill something once all
/// their calls are in the toolkit's hands).
fn fault_toolkit(app: &str, urls: &[&str], started: &Arc<AtomicUsize>) -> ToolKitClient {
    let client = demo_toolkit(TK_KEY, app, urls[0]).with_base_urls(urls.iter().copied());
    let started = started.clone();
    client
        .register_tool(
            Tool::new("counted_slow")
                .description("Sleeps for ms milliseconds (counted).")
                .params(["ms"])
                .param_schema("ms", json!({"type": "integer"})),
            move |call: Call| {
                started.fetch_add(1, Ordering::SeqCst);
                async move {
                    let ms = call.param("ms").and_then(Value::as_u64).unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok::<_, ToolError>(json!({"slept": ms}))
                }
            },
        )
        .expect("valid");
    client
}

/// What a caller got.
#[derive(Debug, Clone)]
enum Outcome {
    /// The tool's result.
    Ok(Value),
    /// An error result from the server (its message).
    Failed(String),
    /// The client's call failed: the connection broke or was refused.
    ConnError(String),
    /// No answer within the bound.
    Lost,
}

impl Outcome {
    fn is_answer(&self) -> bool {
        !matches!(self, Outcome::Lost)
    }
}

/// One call and when its answer came.
#[derive(Debug, Clone)]
struct Answered {
    via: String,
    protocol: LlmProtocol,
    outcome: Outcome,
    at: Instant,
}

/// Calls `tool` of `app` through `base` over `protocol` (Anthropic's
/// format, which keeps `is_error`); never panics.
async fn call(
    via: &str,
    base: &str,
    protocol: LlmProtocol,
    app: &str,
    tool: &str,
    input: Value,
) -> Answered {
    let client = llm(base, protocol);
    let calls = json!({"type": "tool_use", "id": "toolu_1", "name": tool, "input": input});
    let result = tokio::time::timeout(
        CALL_BOUND + Duration::from_secs(2),
        client.call_tool(app, &calls, "anthropic", ""),
    )
    .await;
    let at = Instant::now();
    let outcome = match result {
        Err(_) | Ok(Err(LlmError::Timeout(_))) => Outcome::Lost,
        Ok(Err(e)) => Outcome::ConnError(e.to_string()),
        Ok(Ok(messages)) => {
            let block = &messages[0]["content"][0];
            let content = block["content"].as_str().unwrap_or_default().to_owned();
            if block["is_error"] == json!(true) {
                Outcome::Failed(content)
            } else {
                Outcome::Ok(serde_json::from_str(&content).unwrap_or(Value::String(content)))
            }
        }
    };
    Answered {
        via: via.to_owned(),
        protocol,
        outcome,
        at,
    }
}

/// Echoes `text` through `p`; whether the right answer came.
async fn echo_ok(p: &Proc, protocol: LlmProtocol, app: &str, text: &str) -> Answered {
    call(
        p.name,
        &p.base,
        protocol,
        app,
        "echo",
        json!({"text": text}),
    )
    .await
}

fn echoed(a: &Answered, app: &str, text: &str) -> bool {
    matches!(&a.outcome, Outcome::Ok(v) if *v == json!({"echo": text, "app": app}))
}

/// Whether `base` says the toolkit `app` is connected (to it or to another
/// server).
async fn connected_through(base: &str, app: &str) -> bool {
    llm(base, LlmProtocol::Http)
        .get_toolkit_context(app, "openai", "")
        .await
        .is_ok_and(|c| c["toolkit_connected"] == json!(true))
}

async fn wait_connected(servers: &[Proc], app: &str) {
    for p in servers {
        poll_until(
            &format!("{app} connected through {}", p.name),
            START_BOUND,
            || async { connected_through(&p.base, app).await.then_some(()) },
        )
        .await;
    }
}

const PROTOCOLS: [LlmProtocol; 2] = [LlmProtocol::Http, LlmProtocol::WebSocket];

/// Starts `n` `counted_slow` calls, through `via` in turn, over HTTP and
/// WebSocket in turn.
fn slow_calls(via: &[&Proc], n: usize, app: &str, ms: u64) -> JoinSet<Answered> {
    let mut set = JoinSet::new();
    for i in 0..n {
        let p = via[i % via.len()];
        let protocol = PROTOCOLS[(i / via.len()) % 2];
        let (name, base, app) = (p.name, p.base.clone(), app.to_owned());
        set.spawn(async move {
            call(
                name,
                &base,
                protocol,
                &app,
                "counted_slow",
                json!({"ms": ms}),
            )
            .await
        });
    }
    set
}

async fn all(mut set: JoinSet<Answered>) -> Vec<Answered> {
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.expect("no panic"));
    }
    out
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// The longest wait after `since` among `answers`.
fn max_wait(answers: &[Answered], since: Instant) -> Duration {
    answers
        .iter()
        .filter(|a| a.outcome.is_answer())
        .map(|a| a.at.saturating_duration_since(since))
        .max()
        .unwrap_or_default()
}

fn lost(answers: &[Answered]) -> usize {
    answers.iter().filter(|a| !a.outcome.is_answer()).count()
}

/// A batch of echo calls through each of `via` over both protocols: how
/// many got their right answer, and the others.
async fn echo_batch(via: &[&Proc], app: &str, per: usize) -> (usize, Vec<Answered>) {
    let mut set = JoinSet::new();
    for p in via {
        for i in 0..per {
            let (name, base, app) = (p.name, p.base.clone(), app.to_owned());
            let protocol = PROTOCOLS[i % 2];
            set.spawn(async move {
                let text = format!("{name}-{i}");
                let a = call(name, &base, protocol, &app, "echo", json!({"text": text})).await;
                let ok = echoed(&a, &app, &text);
                (ok, a)
            });
        }
    }
    let mut ok = 0;
    let mut bad = Vec::new();
    while let Some(r) = set.join_next().await {
        match r.expect("no panic") {
            (true, _) => ok += 1,
            (false, a) => bad.push(a),
        }
    }
    (ok, bad)
}

// ---------------------------------------------------------------------------
// 1. The toolkit's instance killed mid-call.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_toolkits_instance_mid_call() {
    bounded(Duration::from_secs(80), async {
        let Some((_pg, _nats, mut servers)) = cluster(&["A", "B", "C"]).await else {
            return;
        };
        let app = "fault-kill-holder";
        let kit = FaultKit::serve(&servers, app).await;
        // The runtime connects to A, its first URL.
        assert!(echoed(
            &echo_ok(&servers[0], LlmProtocol::Http, app, "on A").await,
            app,
            "on A"
        ));

        // N slow calls from B and C, HTTP and WebSocket; A dies meanwhile.
        const N: usize = 20;
        let calls = slow_calls(&[&servers[1], &servers[2]], N, app, SLOW_MS);
        kit.wait_started(N).await;
        let killed = servers[0].kill().await;
        let answers = all(calls).await;

        let disconnected = answers
            .iter()
            .filter(|a| matches!(&a.outcome, Outcome::Failed(m) if m.contains("disconnected")))
            .count();
        let max_after_kill = max_wait(&answers, killed);

        // The toolkit, given [A, B, C], reconnects to B or C: calls through
        // the live servers succeed again (polled, bounded).
        let (b, c) = (&servers[1], &servers[2]);
        poll_until("a call through B after the kill", START_BOUND, || async {
            echoed(
                &echo_ok(b, LlmProtocol::Http, app, "again").await,
                app,
                "again",
            )
            .then_some(())
        })
        .await;
        let reconnected_after = killed.elapsed();
        let (ok_after, bad_after) = echo_batch(&[b, c], app, 6).await;

        eprintln!(
            "FAULT kill-toolkit-instance: sent={N} answered={} lost={} disconnected={disconnected} \
             max_wait_after_kill={} reconnected_within={} calls_after={ok_after}/12",
            N - lost(&answers),
            lost(&answers),
            secs(max_after_kill),
            secs(reconnected_after),
        );
        for a in answers
            .iter()
            .filter(|a| !matches!(&a.outcome, Outcome::Failed(m) if m.contains("disconnected")))
        {
            eprintln!(
                "  unexpected: through {} over {:?}: {:?}",
                a.via, a.protocol, a.outcome
            );
        }
        assert_eq!(lost(&answers), 0, "calls without an answer: {answers:#?}");
        assert_eq!(
            disconnected, N,
            "every caller is answered that the toolkit disconnected: {answers:#?}"
        );
        assert!(
            max_after_kill < ANSWERED_WITHIN,
            "answered {max_after_kill:?} after the kill (task timeout {TASK_TIMEOUT_SECS} s)"
        );
        assert!(
            bad_after.is_empty(),
            "calls after the reconnect: {bad_after:#?}"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------
// 2. A caller's instance killed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_a_callers_instance() {
    bounded(Duration::from_secs(80), async {
        let Some((_pg, _nats, mut servers)) = cluster(&["A", "B", "C"]).await else {
            return;
        };
        let app = "fault-kill-caller";
        let kit = FaultKit::serve(&servers, app).await;

        // Half the calls through B (which dies), half through C; all still
        // in the toolkit's hands (10 s each: the kill may be slow on a
        // loaded machine) when B dies.
        const N: usize = 20;
        const MS: u64 = 10_000;
        let calls = slow_calls(&[&servers[1], &servers[2]], N, app, MS);
        kit.wait_started(N).await;
        let killed = servers[1].kill().await;
        let answers = all(calls).await;

        let (through_b, through_c): (Vec<_>, Vec<_>) =
            answers.iter().cloned().partition(|a| a.via == "B");
        let b_errors = through_b
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::ConnError(_) | Outcome::Failed(_)))
            .count();
        let c_ok = through_c
            .iter()
            .filter(|a| matches!(&a.outcome, Outcome::Ok(v) if *v == json!({"slept": MS})))
            .count();
        let b_max = max_wait(&through_b, killed);
        eprintln!(
            "FAULT kill-caller-instance: sent={N} via_killed={} answered_with_error={b_errors} \
             via_live={} ok={c_ok} lost={} max_wait_after_kill(killed)={}",
            through_b.len(),
            through_c.len(),
            lost(&answers),
            secs(b_max),
        );
        for protocol in PROTOCOLS {
            if let Some(a) = through_b.iter().find(|a| a.protocol == protocol) {
                let what = match &a.outcome {
                    Outcome::ConnError(e) | Outcome::Failed(e) => e.clone(),
                    other => format!("{other:?}"),
                };
                eprintln!("  through B over {protocol:?}: e.g. {what}");
            }
        }
        assert_eq!(lost(&answers), 0, "calls without an answer: {answers:#?}");
        assert_eq!(
            b_errors,
            through_b.len(),
            "the callers through B get a connection error: {through_b:#?}"
        );
        assert!(b_max < ANSWERED_WITHIN, "B's callers waited {b_max:?}");
        assert_eq!(
            c_ok,
            through_c.len(),
            "the calls through C are unaffected: {through_c:#?}"
        );

        // A and C go on serving.
        let (ok, bad) = echo_batch(&[&servers[0], &servers[2]], app, 4).await;
        assert_eq!(ok, 8, "{bad:#?}");
    })
    .await;
}

// ---------------------------------------------------------------------------
// 3. NATS killed mid-traffic, then back.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nats_mid_traffic_then_restart_it() {
    bounded(Duration::from_secs(85), async {
        let Some((_pg, mut nats, servers)) = cluster(&["A", "B", "C"]).await else {
            return;
        };
        let app = "fault-nats";
        let kit = FaultKit::serve(&servers, app).await;
        let [a, b, c] = &servers[..] else {
            unreachable!()
        };
        assert!(echoed(&echo_ok(b, LlmProtocol::Http, app, "before").await, app, "before"));

        // Calls in flight from B and C to the toolkit on A; NATS dies.
        const N: usize = 10;
        let inflight = slow_calls(&[b, c], N, app, SLOW_MS);
        kit.wait_started(N).await;
        let killed = Instant::now();
        blocking(|| nats.kill());

        // `/ready` says 503 on every server.
        let mut ready_503_after = Duration::ZERO;
        for p in [a, b, c] {
            let (body, _) = poll_until(
                &format!("{} /ready 503 with NATS down", p.name),
                ANSWERED_WITHIN,
                || ready_status_is(&p.base, 503),
            )
            .await;
            assert_ne!(body["bus"], "ok", "{body}");
            ready_503_after = ready_503_after.max(killed.elapsed());
        }
        // New calls across servers fail with a clear error, in time.
        let mut down = Vec::new();
        for p in [b, c] {
            for protocol in PROTOCOLS {
                let t0 = Instant::now();
                let answer = echo_ok(p, protocol, app, "down").await;
                down.push((answer, t0.elapsed()));
            }
        }
        // A call through A, the toolkit's own server, needs no bus.
        let local = echo_ok(a, LlmProtocol::Http, app, "local").await;
        let answers = all(inflight).await;
        let max_after_kill = max_wait(&answers, killed);
        let max_down_call = down.iter().map(|(_, d)| *d).max().unwrap_or_default();
        let down_failed = down
            .iter()
            .filter(|(a, d)| matches!(&a.outcome, Outcome::Failed(m) if !m.is_empty()) && *d < ANSWERED_WITHIN)
            .count();

        // NATS back (same port): the same servers route again.
        let restarted = Instant::now();
        blocking(|| nats.restart());
        poll_until(
            "a call through B after NATS is back",
            Duration::from_secs(20),
            || async { echoed(&echo_ok(b, LlmProtocol::Http, app, "back").await, app, "back").then_some(()) },
        )
        .await;
        let recovered_after = restarted.elapsed();
        let (ok_after, bad_after) = echo_batch(&[b, c], app, 6).await;
        for p in [a, b, c] {
            poll_until(
                &format!("{} /ready 200 with NATS back", p.name),
                ANSWERED_WITHIN,
                || ready_status_is(&p.base, 200),
            )
            .await;
        }

        eprintln!(
            "FAULT kill-nats: inflight={N} answered={} lost={} max_wait_after_kill={} \
             ready_503_within={} calls_while_down={} failed_clearly={down_failed} max_call_while_down={} \
             local_call_ok={} recovered_within={} calls_after={ok_after}/12",
            N - lost(&answers),
            lost(&answers),
            secs(max_after_kill),
            secs(ready_503_after),
            down.len(),
            secs(max_down_call),
            echoed(&local, app, "local"),
            secs(recovered_after),
        );
        for (a, d) in &down {
            eprintln!("  while down: through {} over {:?} after {}: {:?}", a.via, a.protocol, secs(*d), a.outcome);
        }
        if let Some(a) = answers.first() {
            eprintln!("  in flight: e.g. through {} over {:?}: {:?}", a.via, a.protocol, a.outcome);
        }
        assert_eq!(lost(&answers), 0, "in-flight calls without an answer: {answers:#?}");
        assert!(
            answers.iter().all(|a| matches!(a.outcome, Outcome::Failed(_))),
            "in-flight calls get an error result: {answers:#?}"
        );
        assert!(
            max_after_kill < ANSWERED_WITHIN,
            "in-flight calls answered {max_after_kill:?} after the kill"
        );
        assert_eq!(down_failed, down.len(), "calls while NATS is down: {down:#?}");
        assert!(echoed(&local, app, "local"), "a call on the toolkit's own server: {local:?}");
        assert!(bad_after.is_empty(), "calls after NATS is back: {bad_after:#?}");
    })
    .await;
}

// ---------------------------------------------------------------------------
// 4. PostgreSQL restarted.

/// Registers one tool of `app` over HTTP, as the Python client does.
async fn register_tool(base: &str, app: &str) -> Result<(u16, Value), String> {
    let body = json!({
        "api_key": TK_KEY,
        "app_name": app,
        "function_id": "ping",
        "code_hash": "h",
        "metadata": {"description": "Pings.", "params": [], "required_params": []},
    });
    try_http(
        "POST",
        &format!("{base}/api/v1/register_tool"),
        &[],
        Some(&body),
        Duration::from_secs(15),
    )
    .await
}

async fn webhook_ids(p: &Proc) -> Vec<String> {
    p.llm(LlmProtocol::Http)
        .list_webhooks()
        .await
        .unwrap_or_else(|e| panic!("webhooks through {}: {e}", p.name))
        .into_iter()
        .map(|w| w.webhook_id)
        .collect()
}

/// Whether `app` is registered, as `p` sees it: its tool names.
async fn tools_of(p: &Proc, app: &str) -> Option<Vec<String>> {
    let context = p
        .llm(LlmProtocol::Http)
        .get_toolkit_context(app, "openai", "")
        .await
        .ok()?;
    Some(
        context["tools"]
            .as_array()?
            .iter()
            .filter_map(|t| t["name"].as_str().map(str::to_owned))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_postgres_under_the_servers() {
    bounded(Duration::from_secs(85), async {
        let Some((mut pg, nats, servers)) = cluster(&["A", "B", "C"]).await else {
            return;
        };
        let app = "fault-pg";
        let _kit = FaultKit::serve(&servers, app).await;
        let [a, b, c] = &servers[..] else {
            unreachable!()
        };
        let tools_before = tools_of(c, app).await.expect("registered");

        // Acknowledged before the restart: the toolkit's registration and a
        // webhook (registered through B).
        let hook = b
            .llm(LlmProtocol::Http)
            .register_webhook("http://127.0.0.1:9/hook", &[WebhookEvent::ConnectionSuccess])
            .await
            .expect("webhook registered");
        assert!(echoed(&echo_ok(c, LlmProtocol::Http, app, "before").await, app, "before"));

        // Kill it; the servers see it down; start it again (same data).
        blocking(|| pg.kill());
        let killed = Instant::now();
        poll_until("B /ready 503 with PostgreSQL down", ANSWERED_WITHIN, || {
            ready_status_is(&b.base, 503)
        })
        .await;
        blocking(|| pg.restart());
        let mut ready_again = Duration::ZERO;
        for p in [a, b, c] {
            poll_until(
                &format!("{} /ready 200 after the restart", p.name),
                START_BOUND,
                || ready_status_is(&p.base, 200),
            )
            .await;
            ready_again = ready_again.max(killed.elapsed());
        }

        let mut lost_items = Vec::new();
        // Nothing acknowledged is lost, as every server sees it…
        for p in [a, b, c] {
            if !webhook_ids(p).await.contains(&hook.webhook_id) {
                lost_items.push(format!("the webhook, through {}", p.name));
            }
            if tools_of(p, app).await.as_ref() != Some(&tools_before) {
                lost_items.push(format!("the toolkit, through {}", p.name));
            }
        }
        // …and calls go on.
        let (calls_ok, bad_calls) = echo_batch(&[a, b, c], app, 2).await;

        // New registrations work: a toolkit (through C) and a webhook
        // (through A), seen by the others.
        let (status, body) = register_tool(&c.base, "fault-pg-after")
            .await
            .expect("register_tool answered");
        assert_eq!(status, 200, "register_tool after the restart: {body}");
        let hook2 = a
            .llm(LlmProtocol::Http)
            .register_webhook("http://127.0.0.1:9/hook2", &[WebhookEvent::ConnectionSuccess])
            .await
            .expect("a webhook registered after the restart");
        poll_until("the new toolkit seen through A", ANSWERED_WITHIN, || async {
            tools_of(a, "fault-pg-after").await
        })
        .await;
        poll_until("the new webhook seen through B", ANSWERED_WITHIN, || async {
            webhook_ids(b)
                .await
                .contains(&hook2.webhook_id)
                .then_some(())
        })
        .await;

        // A server started now reads it all from the database.
        let d = Proc::start("D", &pg, &nats).await;
        let d_hooks = webhook_ids(&d).await;
        for (what, id) in [("webhook", &hook.webhook_id), ("webhook after", &hook2.webhook_id)] {
            if !d_hooks.contains(id) {
                lost_items.push(format!("the {what}, in the database (through D)"));
            }
        }
        if tools_of(&d, app).await.as_ref() != Some(&tools_before) {
            lost_items.push("the toolkit, in the database (through D)".into());
        }
        if tools_of(&d, "fault-pg-after").await.is_none() {
            lost_items.push("the toolkit registered after, in the database (through D)".into());
        }
        let through_d = echo_ok(&d, LlmProtocol::WebSocket, app, "via D").await;

        eprintln!(
            "FAULT restart-postgres: acknowledged_before=2 (toolkit, webhook) lost={} \
             ready_again_within={} calls_after={calls_ok}/6 registrations_after=2 new_server_call_ok={}",
            lost_items.len(),
            secs(ready_again),
            echoed(&through_d, app, "via D"),
        );
        assert!(lost_items.is_empty(), "lost: {lost_items:?}");
        assert!(bad_calls.is_empty(), "calls after the restart: {bad_calls:#?}");
        assert!(echoed(&through_d, app, "via D"), "a call through D: {through_d:?}");
    })
    .await;
}
