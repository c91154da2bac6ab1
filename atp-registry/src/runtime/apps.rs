//! The app sessions of one connection (docs/PROTOCOL.md §9, "Interactive
//! apps"): `atp_app_request` starts a session (its `request_id` is the
//! session id), `atp_app_action` continues it, `atp_app_terminate` ends it.
//!
//! A session holds its app, the auth token it started with and the state
//! the app returned last. Its actions run one at a time. Sessions are
//! bounded in number (the least recently used one is ended to make room)
//! and end with their connection.
//!
//! A start or an action runs in an `atp.app` span (fields `toolkit`,
//! `app`, `session`, `trace_id`) that joins the request's trace
//! (`traceparent`), see [`crate::trace`].

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::{Map, Value};
use tokio::sync::OwnedMutexGuard;
use tracing::Instrument;

use crate::{
    AppCall, AuthToken,
    client::{RegisteredTool, ToolKitClient},
    wire::{self, AppAction, RequestId, ToolRequest, ToolkitAppResponse},
};

/// The longest an action waits for the one before it in its session.
const ACTION_WAIT: Duration = Duration::from_secs(120);

/// The app sessions of a connection.
pub(crate) struct Sessions {
    inner: Mutex<Open>,
    max: usize,
}

#[derive(Default)]
struct Open {
    by_id: HashMap<RequestId, Arc<Session>>,
    clock: u64,
}

pub(crate) struct Session {
    app: Arc<RegisteredTool>,
    auth_token: Option<AuthToken>,
    state: Arc<tokio::sync::Mutex<Value>>,
    last_used: AtomicU64,
}

/// What to do for an app message: answer at once, or run the app.
pub(crate) enum AppJob {
    /// Answer this (an unknown app or session, bad params).
    Answer(ToolkitAppResponse),
    /// Run the app's start.
    Start {
        id: RequestId,
        session: Arc<Session>,
        params: Map<String, Value>,
        /// The session's state, held until the start has set it, so that
        /// an early action waits.
        state: OwnedMutexGuard<Value>,
        /// Its `atp.app` span.
        span: tracing::Span,
    },
    /// Run a user action.
    Action {
        id: RequestId,
        session: Arc<Session>,
        action_data: Value,
        /// Its `atp.app` span.
        span: tracing::Span,
    },
}

/// The `atp.app` span of a start or an action of `session` in `app`,
/// joined to the request's trace.
fn app_span(
    client: &ToolKitClient,
    app: &str,
    session: &RequestId,
    trace: Option<crate::trace::TraceContext>,
) -> tracing::Span {
    let span = tracing::info_span!(
        "atp.app",
        toolkit = client.app_name(),
        app,
        session = %session,
        trace_id = tracing::field::Empty,
    );
    crate::trace::link(&span, trace.as_ref());
    span
}

fn ok(id: RequestId, ui: Value, terminated: bool) -> ToolkitAppResponse {
    ToolkitAppResponse {
        request_id: id,
        result: ui,
        is_error: Some(false),
        terminated: Some(terminated),
    }
}

fn error(id: RequestId, message: impl Into<String>, terminated: bool) -> ToolkitAppResponse {
    ToolkitAppResponse {
        request_id: id,
        result: wire::error_result(message),
        is_error: Some(true),
        terminated: Some(terminated),
    }
}

impl Sessions {
    /// No sessions; at most `max` at once.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            inner: Mutex::default(),
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many sessions are open.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether `session` is still the open session of its id.
    fn is_open(&self, id: &RequestId, session: &Arc<Session>) -> bool {
        self.lock()
            .by_id
            .get(id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
    }

    /// Ends `session` if it is still the open session of its id.
    fn end(&self, id: &RequestId, session: &Arc<Session>) {
        let mut map = self.lock();
        if map.by_id.get(id).is_some_and(|s| Arc::ptr_eq(s, session)) {
            map.by_id.remove(id);
        }
    }

    /// `atp_app_terminate`: ends the session, if it is open.
    pub(crate) fn terminate(&self, id: &RequestId) {
        if self.lock().by_id.remove(id).is_some() {
            tracing::debug!(session = %id, "app session terminated by the server");
        }
    }

    /// `atp_app_request`: checks the app and its params and opens the
    /// session (a start with the id of an open session replaces it, as the
    /// Python SDK does).
    pub(crate) fn start(&self, client: &ToolKitClient, req: ToolRequest) -> AppJob {
        let span = app_span(client, &req.tool_name, &req.request_id, req.trace());
        let id = req.request_id;
        let Some(app) = client.tool(&req.tool_name) else {
            return AppJob::Answer(error(
                id,
                format!("{} is not an app of this toolkit", req.tool_name),
                true,
            ));
        };
        if !app.is_app() {
            return AppJob::Answer(error(
                id,
                format!("{} is a tool of this toolkit, not an app", req.tool_name),
                true,
            ));
        }
        let auth_token = req.auth_token.filter(|t| !t.is_empty());
        if let Err(e) = app.check(&req.params, auth_token.as_ref()) {
            return AppJob::Answer(error(id, e.to_string(), true));
        }
        let state = Arc::new(tokio::sync::Mutex::new(Value::Null));
        let Ok(guard) = state.clone().try_lock_owned() else {
            return AppJob::Answer(error(id, "the session could not be opened", true));
        };
        let session = Arc::new(Session {
            app,
            auth_token,
            state,
            last_used: AtomicU64::new(0),
        });
        let mut map = self.lock();
        map.clock += 1;
        session.last_used.store(map.clock, Ordering::Relaxed);
        if !map.by_id.contains_key(&id) && map.by_id.len() >= self.max {
            // Make room: end the session used least recently.
            let oldest = map
                .by_id
                .iter()
                .min_by_key(|(_, s)| s.last_used.load(Ordering::Relaxed))
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                map.by_id.remove(&oldest);
                tracing::warn!(
                    session = %oldest,
                    max = self.max,
                    "too many app sessions: ending the one used least recently"
                );
            }
        }
        map.by_id.insert(id.clone(), session.clone());
        drop(map);
        AppJob::Start {
            id,
            session,
            params: req.params,
            state: guard,
            span,
        }
    }

    /// `atp_app_action`: finds the session.
    pub(crate) fn action(&self, client: &ToolKitClient, action: AppAction) -> AppJob {
        let trace = action.trace();
        let id = action.request_id;
        let mut map = self.lock();
        map.clock += 1;
        let now = map.clock;
        let Some(session) = map.by_id.get(&id).cloned() else {
            return AppJob::Answer(error(id, "Unknown app session", true));
        };
        drop(map);
        session.last_used.store(now, Ordering::Relaxed);
        let span = app_span(client, session.app.name(), &id, trace);
        AppJob::Action {
            id,
            session,
            action_data: action.action_data,
            span,
        }
    }
}

impl AppJob {
    /// Runs the app (if there is anything to run): the `app_response`.
    pub(crate) async fn run(
        self,
        sessions: &Sessions,
        client: &ToolKitClient,
    ) -> ToolkitAppResponse {
        match self {
            AppJob::Answer(r) => r,
            AppJob::Start {
                id,
                session,
                params,
                mut state,
                span,
            } => {
                let call = AppCall::Start {
                    session_id: id.to_string(),
                    params,
                    auth_token: session.auth_token.clone(),
                };
                match session.app.run_app(client, call).instrument(span).await {
                    Ok(reply) => {
                        *state = reply.app_state.unwrap_or(Value::Null);
                        drop(state);
                        if reply.terminate {
                            sessions.end(&id, &session);
                            ok(id, reply.ui_content, true)
                        } else {
                            // Terminated by the server while it started?
                            let open = sessions.is_open(&id, &session);
                            ok(id, reply.ui_content, !open)
                        }
                    }
                    Err(message) => {
                        sessions.end(&id, &session);
                        error(id, message, true)
                    }
                }
            }
            AppJob::Action {
                id,
                session,
                action_data,
                span,
            } => {
                let Ok(mut state) =
                    tokio::time::timeout(ACTION_WAIT, session.state.clone().lock_owned()).await
                else {
                    return error(id, "The app session is busy with another action", false);
                };
                if !sessions.is_open(&id, &session) {
                    return error(id, "The app session has ended", true);
                }
                let call = AppCall::Action {
                    session_id: id.to_string(),
                    action_data,
                    state: state.clone(),
                    auth_token: session.auth_token.clone(),
                };
                match session.app.run_app(client, call).instrument(span).await {
                    Ok(reply) => {
                        if let Some(next) = reply.app_state {
                            *state = next;
                        }
                        drop(state);
                        if reply.terminate {
                            sessions.end(&id, &session);
                            ok(id, reply.ui_content, true)
                        } else {
                            let open = sessions.is_open(&id, &session);
                            ok(id, reply.ui_content, !open)
                        }
                    }
                    // The session goes on, with its state as it was.
                    Err(message) => error(id, message, false),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{AppReply, Tool, ToolError};

    fn toolkit() -> ToolKitClient {
        let c = ToolKitClient::new("k", "a");
        c.register_app(
            Tool::new("counter").params(["start"]),
            |call: AppCall| async move {
                let n = match call {
                    AppCall::Start { params, .. } => {
                        params.get("start").and_then(Value::as_i64).unwrap_or(0)
                    }
                    AppCall::Action {
                        state, action_data, ..
                    } => {
                        if action_data == json!("fail") {
                            return Err(ToolError::new("no"));
                        }
                        if action_data == json!("boom") {
                            panic!("app panic");
                        }
                        let n = state["n"].as_i64().unwrap_or(0) + 1;
                        if action_data == json!("stop") {
                            return Ok(AppReply::new(json!({"bye": n})).terminate());
                        }
                        n
                    }
                };
                Ok(AppReply::new(json!({"n": n})).state(json!({"n": n})))
            },
        )
        .expect("valid");
        c.register_tool(Tool::new("plain"), |_c: crate::Call| async {
            Ok::<_, String>(1)
        })
        .expect("valid");
        c
    }

    fn start(id: &str, name: &str, params: Value) -> ToolRequest {
        ToolRequest {
            request_id: id.into(),
            tool_name: name.into(),
            params: params.as_object().cloned().unwrap_or_default(),
            auth_token: None,
            logs: false,
            traceparent: None,
            tracestate: None,
        }
    }

    fn action(id: &str, data: Value) -> AppAction {
        AppAction {
            request_id: id.into(),
            action_data: data,
            traceparent: None,
            tracestate: None,
        }
    }

    #[tokio::test]
    async fn a_session_keeps_its_state_until_it_ends() {
        let c = toolkit();
        let s = Sessions::new(8);
        let r = s
            .start(&c, start("s1", "counter", json!({"start": 5})))
            .run(&s, &c)
            .await;
        assert_eq!((r.result, r.terminated), (json!({"n": 5}), Some(false)));
        let r = s.action(&c, action("s1", json!("+"))).run(&s, &c).await;
        assert_eq!(r.result, json!({"n": 6}));
        let r = s.action(&c, action("s1", json!("fail"))).run(&s, &c).await;
        assert_eq!(
            (r.result, r.is_error, r.terminated),
            (json!({"error": "no"}), Some(true), Some(false))
        );
        let r = s.action(&c, action("s1", json!("boom"))).run(&s, &c).await;
        assert_eq!(
            (r.result, r.terminated),
            (json!({"error": "The app panicked"}), Some(false))
        );
        let r = s.action(&c, action("s1", json!("stop"))).run(&s, &c).await;
        assert_eq!(
            (r.result, r.is_error, r.terminated),
            (json!({"bye": 7}), Some(false), Some(true))
        );
        let r = s.action(&c, action("s1", json!("+"))).run(&s, &c).await;
        assert_eq!((r.is_error, r.terminated), (Some(true), Some(true)));
        assert_eq!(s.len(), 0);
    }

    #[tokio::test]
    async fn unknown_apps_tools_and_bad_params_are_refused() {
        let c = toolkit();
        let s = Sessions::new(8);
        for (name, params) in [
            ("nope", json!({})),
            ("plain", json!({})),
            ("counter", json!({"x": 1})),
        ] {
            let r = s.start(&c, start("s", name, params)).run(&s, &c).await;
            assert_eq!(
                (r.is_error, r.terminated),
                (Some(true), Some(true)),
                "{name}"
            );
            assert!(r.result["error"].is_string());
        }
        assert_eq!(s.len(), 0);
        // A terminated session is gone.
        s.start(&c, start("t", "counter", json!({})))
            .run(&s, &c)
            .await;
        s.terminate(&"t".into());
        assert_eq!(s.len(), 0);
    }

    #[tokio::test]
    async fn sessions_are_bounded() {
        let c = toolkit();
        let s = Sessions::new(2);
        for id in ["a", "b"] {
            s.start(&c, start(id, "counter", json!({})))
                .run(&s, &c)
                .await;
        }
        // "a" is used, so "b" is the least recently used one.
        s.action(&c, action("a", json!("+"))).run(&s, &c).await;
        s.start(&c, start("c", "counter", json!({})))
            .run(&s, &c)
            .await;
        assert_eq!(s.len(), 2);
        let r = s.action(&c, action("b", json!("+"))).run(&s, &c).await;
        assert_eq!(r.is_error, Some(true));
        let r = s.action(&c, action("a", json!("+"))).run(&s, &c).await;
        assert_eq!(r.result, json!({"n": 2}));
    }
}
