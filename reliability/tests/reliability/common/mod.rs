//! The servers under test, started once per test binary: the three
//! adapters serving the conformance fixture, and an `atp-server` (keys
//! [`TK_KEY`] / [`LLM_KEY`], a 64 KiB message limit).

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::OnceLock,
    time::{Duration, Instant},
};

use atp_conformance::server::{Framework, spawn};
use atp_registry::Engine;
use atp_reliability::http::{self, RawResponse, request};
use atp_server::{AtpServer, Config, DbLocation};

/// The toolkit key of the test `atp-server`.
pub const TK_KEY: &str = "wire-toolkit-key";
/// Another toolkit key it takes: the server routes an app's calls to any
/// socket of the app's key, so tests that run side by side use their own.
pub const TK_KEY_2: &str = "wire-toolkit-key-2";
/// The LLM key of the test `atp-server`.
pub const LLM_KEY: &str = "wire-llm-key";
/// The test `atp-server`'s message limit.
pub const SERVER_LIMIT: usize = 64 * 1024;
/// The test `atp-server`'s header read timeout.
pub const SERVER_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// The adapters' body limit (the fixture's, the default).
pub const ADAPTER_LIMIT: usize = atp_conformance::fixture::BODY_LIMIT;
/// The bound of every wait.
pub const WAIT: Duration = Duration::from_secs(15);

/// A check of an answer.
pub type Check = Box<dyn Fn(&RawResponse) -> bool + Send>;

/// A server under test.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its name in messages.
    pub name: &'static str,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Whether it is `atp-server` (else an adapter).
    pub server: bool,
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn adapter(framework: Framework, cell: &'static OnceLock<SocketAddr>) -> SocketAddr {
    *cell.get_or_init(|| {
        spawn(
            framework,
            Engine::with_registry(atp_conformance::fixture()),
            loopback(),
        )
        .expect("the adapter starts")
    })
}

/// The atp-server of this test binary, on a thread of its own: its
/// handle and address.
pub fn server() -> &'static (AtpServer, SocketAddr) {
    static SERVER: OnceLock<(AtpServer, SocketAddr)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(loopback())
                    .await
                    .expect("bind");
                let server = AtpServer::open(Config {
                    db: DbLocation::Memory,
                    toolkit_api_keys: vec![TK_KEY.into(), TK_KEY_2.into()],
                    llm_api_keys: vec![LLM_KEY.into()],
                    max_message_size: SERVER_LIMIT,
                    header_read_timeout: SERVER_HEADER_TIMEOUT,
                    ..Config::default()
                })
                .expect("open");
                tx.send((server.clone(), listener.local_addr().expect("addr")))
                    .expect("send");
                let _ = server.serve(listener).await;
            });
        });
        rx.recv().expect("the server starts")
    })
}

/// The address of [`server`].
pub fn server_addr() -> SocketAddr {
    server().1
}

/// The target named `name`: `axum`, `actix`, `rocket` or `server`.
pub fn target(name: &'static str) -> Target {
    static AXUM: OnceLock<SocketAddr> = OnceLock::new();
    static ACTIX: OnceLock<SocketAddr> = OnceLock::new();
    static ROCKET: OnceLock<SocketAddr> = OnceLock::new();
    let addr = match name {
        "axum" => adapter(Framework::Axum, &AXUM),
        "actix" => adapter(Framework::Actix, &ACTIX),
        "rocket" => adapter(Framework::Rocket, &ROCKET),
        "server" => server_addr(),
        other => panic!("unknown target {other}"),
    };
    Target {
        name,
        addr,
        server: name == "server",
    }
}

impl Target {
    /// The path a JSON body is posted to.
    pub fn post_path(&self) -> &'static str {
        if self.server {
            "/api/v1/atp/llm-client/process/"
        } else {
            "/atp/conformance/echo/"
        }
    }

    /// The body limit.
    pub fn limit(&self) -> usize {
        if self.server {
            SERVER_LIMIT
        } else {
            ADAPTER_LIMIT
        }
    }

    /// Extra headers a POST needs (the LLM key for the server).
    pub fn post_headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![("Content-Type", "application/json".to_owned())];
        if self.server {
            h.push(("Authorization", format!("ApiKey {LLM_KEY}")));
        }
        h
    }

    /// A POST of `body` with the right headers.
    pub fn post(&self, body: &[u8]) -> Vec<u8> {
        let headers = self.post_headers();
        let refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        request("POST", self.post_path(), &refs, body)
    }

    /// A valid request and a check of its answer.
    pub fn valid(&self, n: usize) -> (Vec<u8>, Check) {
        if self.server {
            (
                request("GET", "/health", &[], b""),
                Box::new(|r: &RawResponse| r.status == 200),
            )
        } else {
            let text = format!("real-{n}");
            let want = format!(r#"{{"result":{{"echo":"{text}"}}}}"#);
            (
                self.post(format!(r#"{{"text": "{text}"}}"#).as_bytes()),
                Box::new(move |r: &RawResponse| {
                    r.status == 200 && String::from_utf8_lossy(&r.body) == want
                }),
            )
        }
    }

    /// Sends a valid request on a fresh connection and checks the answer,
    /// within [`WAIT`]; returns how long it took.
    pub async fn still_serves(&self) -> Duration {
        let started = Instant::now();
        let (bytes, check) = self.valid(0);
        let r = http::once(self.addr, &bytes, false, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{}: a valid request failed: {e}", self.name));
        assert!(check(&r), "{}: {r:?}", self.name);
        started.elapsed()
    }
}

/// The soft limit on open files of this process (`/proc/self/limits`).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
