//! A webhook receiver for the tests: records every request it gets and
//! answers 200 or 500 as told (shared by the webhook, PostgreSQL, Python
//! and console tests).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use bytes::Bytes;
use serde_json::Value;
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};

use crate::common::WAIT;

// ---------------------------------------------------------------------
// A webhook receiver: records every request, answers 200 or 500.

pub(crate) struct Received {
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) answered: u16,
}

impl Received {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON delivery")
    }

    pub(crate) fn delivery_id(&self) -> String {
        self.json()["delivery_id"]
            .as_str()
            .expect("delivery_id")
            .to_owned()
    }
}

#[derive(Default)]
pub(crate) struct Inbox {
    pub(crate) got: Vec<Received>,
    /// Answer 500 (a failing receiver) instead of 200.
    pub(crate) failing: bool,
}

impl Inbox {
    pub(crate) fn accepted(&self) -> Vec<&Received> {
        self.got.iter().filter(|r| r.answered == 200).collect()
    }
}

/// What a receiver saw, kept across its restarts.
#[derive(Clone)]
pub(crate) struct Hook {
    pub(crate) inbox: Arc<Mutex<Inbox>>,
    pub(crate) changes: Arc<watch::Sender<usize>>,
}

impl Hook {
    pub(crate) fn new() -> Self {
        Self {
            inbox: Arc::default(),
            changes: Arc::new(watch::channel(0).0),
        }
    }

    pub(crate) fn set_failing(&self, failing: bool) {
        self.inbox.lock().expect("lock").failing = failing;
    }

    /// Waits (bounded) until `cond` holds for what was received.
    pub(crate) async fn wait_until(&self, what: &str, cond: impl Fn(&Inbox) -> bool) {
        let mut rx = self.changes.subscribe();
        tokio::time::timeout(
            WAIT,
            rx.wait_for(|_| cond(&self.inbox.lock().expect("lock"))),
        )
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("the receiver's state is there");
    }

    /// Each request received: its `delivery_id` and the status answered.
    pub(crate) fn deliveries(&self) -> Vec<(String, u16)> {
        self.with(|i| {
            i.got
                .iter()
                .map(|r| (r.delivery_id(), r.answered))
                .collect()
        })
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&Inbox) -> T) -> T {
        f(&self.inbox.lock().expect("lock"))
    }
}

async fn receive(State(hook): State<Hook>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let status = {
        let mut inbox = hook.inbox.lock().expect("lock");
        let status = if inbox.failing {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        };
        inbox.got.push(Received {
            headers,
            body,
            answered: status.as_u16(),
        });
        status
    };
    hook.changes.send_modify(|n| *n += 1);
    status
}

/// A receiver serving `hook` on a port (0: any).
pub(crate) struct Receiver {
    pub(crate) addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Receiver {
    pub(crate) async fn start(hook: &Hook, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind the receiver");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(hook.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self { addr, stop, task }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Stops listening and closes its connections: the receiver is down.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the receiver stops in time")
            .expect("no panic");
    }
}
