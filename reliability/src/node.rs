//! Child processes for the fault and soak tests: an adapter, an
//! `atp-server` or a toolkit, each in a process of its own (the
//! `atp-reliability-node` binary), so that it can be killed with SIGKILL —
//! no destructor, no flush, no goodbye — and its memory measured alone.

use std::{io, net::SocketAddr, path::Path, process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

/// How long a child may take to say it is listening.
pub const STARTUP: Duration = Duration::from_secs(30);

/// A running child. Killed when dropped.
#[derive(Debug)]
pub struct Node {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// The address it listens on (`None` for a toolkit).
    pub addr: Option<SocketAddr>,
}

impl Node {
    /// Starts `binary` with `args` and waits (at most [`STARTUP`]) for its
    /// first stdout line: `listening on http://ADDR` or `started`.
    pub async fn start(binary: &Path, args: &[String]) -> io::Result<Self> {
        let mut child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(STARTUP, lines.next_line())
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "the child did not start in time")
            })??
            .ok_or_else(|| io::Error::other("the child ended before it started"))?;
        // Keep draining stdout so that the child never blocks on it; the
        // lines are kept for `next_line`.
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
        let addr = match first.strip_prefix("listening on http://") {
            Some(a) => Some(
                a.trim()
                    .parse()
                    .map_err(|_| io::Error::other(format!("bad address line {first:?}")))?,
            ),
            None if first.trim() == "started" => None,
            None => return Err(io::Error::other(format!("unexpected first line {first:?}"))),
        };
        Ok(Self {
            child,
            lines: rx,
            addr,
        })
    }

    /// The next line the child prints (after its first), waiting at most
    /// `limit`.
    pub async fn next_line(&mut self, limit: Duration) -> Option<String> {
        tokio::time::timeout(limit, self.lines.recv())
            .await
            .ok()
            .flatten()
    }

    /// The child's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The listening address (panics for a toolkit).
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("this child listens")
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// SIGKILL, then waits for the process to be gone.
    pub async fn kill(mut self) -> io::Result<()> {
        self.child.kill().await
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// The arguments that start an adapter serving the conformance fixture.
pub fn adapter_args(framework: &str) -> Vec<String> {
    vec!["adapter".into(), "--framework".into(), framework.into()]
}

/// The arguments that start an `atp-server` on `addr` with this database
/// and keys.
pub fn server_args(
    addr: &str,
    db: &Path,
    toolkit_key: &str,
    llm_key: &str,
    task_timeout_ms: u64,
) -> Vec<String> {
    vec![
        "server".into(),
        "--addr".into(),
        addr.into(),
        "--db".into(),
        db.display().to_string(),
        "--toolkit-key".into(),
        toolkit_key.into(),
        "--llm-key".into(),
        llm_key.into(),
        "--task-timeout-ms".into(),
        task_timeout_ms.to_string(),
    ]
}

/// The arguments that start a toolkit runtime (`echo`, `slow`) for `app`.
pub fn toolkit_args(base: &str, key: &str, app: &str) -> Vec<String> {
    vec![
        "toolkit".into(),
        "--base".into(),
        base.into(),
        "--key".into(),
        key.into(),
        "--app".into(),
        app.into(),
    ]
}

/// The toolkit the fault and soak tests serve over WebSocket: `echo(text*)`
/// → `{"echo": text}`, `slow(ms*)` → sleeps `ms` (at most 60 s) without
/// blocking, then `{"slept": ms}`, and `fails()` → the error `it failed`.
pub fn test_toolkit(key: &str, app: &str, base: &str) -> atp_registry::ToolKitClient {
    test_toolkit_with(key, app, base, |_| {})
}

/// [`test_toolkit`], calling `on_slow(ms)` when a `slow` call starts (so
/// that a test knows a call is in flight).
pub fn test_toolkit_with(
    key: &str,
    app: &str,
    base: &str,
    on_slow: impl Fn(u64) + Send + Sync + 'static,
) -> atp_registry::ToolKitClient {
    use atp_registry::{Call, Tool};
    use serde_json::{Value, json};
    let on_slow = std::sync::Arc::new(on_slow);
    let client = atp_registry::ToolKitClient::new(key, app).with_base_url(base);
    let outcomes = [
        client.register_tool(
            Tool::new("echo").params(["text"]).required_params(["text"]),
            |call: Call| async move { Ok::<_, String>(json!({"echo": call.param("text")})) },
        ),
        client.register_tool(
            Tool::new("slow").params(["ms"]).required_params(["ms"]),
            move |call: Call| {
                let on_slow = on_slow.clone();
                async move {
                    let ms = call
                        .param("ms")
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                        .min(60_000);
                    on_slow(ms);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok::<_, String>(json!({"slept": ms}))
                }
            },
        ),
        client.register_tool(Tool::new("fails"), |_call: Call| async {
            Err::<Value, _>("it failed")
        }),
    ];
    for outcome in outcomes {
        outcome.expect("valid tools");
    }
    client
}

/// The runtime options of the test toolkits: quick reconnects, no Ctrl-C
/// handler, a short grace period.
pub fn test_runtime_options() -> atp_registry::runtime::RuntimeOptions {
    atp_registry::runtime::RuntimeOptions::default()
        .handle_ctrl_c(false)
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .grace_period(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(10))
}
