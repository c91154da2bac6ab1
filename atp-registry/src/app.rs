//! Interactive apps: a tool that keeps a session with its user — it shows
//! a UI, the user acts on it, the app answers with the next UI — as the
//! Python SDK's app functions do (`f(action="start", **params)`, then
//! `f(action="user_action", action_data=…, current_state=…)`).
//!
//! Register one with [`ToolKitClient::register_app`](crate::ToolKitClient::register_app)
//! (state as JSON) or
//! [`ToolKitClient::register_typed_app`](crate::ToolKitClient::register_typed_app)
//! (state as your own serde type). The toolkit runtime keeps the sessions.

use std::{fmt, future::Future, sync::Arc};

use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

use crate::{secret::AuthToken, tool::BoxFuture};

/// What an app's handler is called with: the start of a session, or a
/// user's action in it. `S` is the session's state: JSON for
/// [`register_app`](crate::ToolKitClient::register_app), your type for
/// [`register_typed_app`](crate::ToolKitClient::register_typed_app).
#[derive(Debug, Clone, PartialEq)]
pub enum AppCall<S = Value> {
    /// A session starts (the Python SDK's `action="start"`).
    Start {
        /// The session's id (the `request_id` of its `atp_app_request`).
        session_id: String,
        /// The start params, checked against the app's `params` and
        /// `required_params` as a tool call's are.
        params: Map<String, Value>,
        /// The user's auth token, if any. The session keeps it for its
        /// actions.
        auth_token: Option<AuthToken>,
    },
    /// The user acted (the Python SDK's `action="user_action"`).
    Action {
        /// The session's id.
        session_id: String,
        /// What the user did (a button, a form's fields): as the caller
        /// sent it.
        action_data: Value,
        /// The state the app returned last (`current_state`).
        state: S,
        /// The auth token the session started with.
        auth_token: Option<AuthToken>,
    },
}

impl<S> AppCall<S> {
    /// The session's id.
    pub fn session_id(&self) -> &str {
        match self {
            AppCall::Start { session_id, .. } | AppCall::Action { session_id, .. } => session_id,
        }
    }

    /// The session's auth token, if any.
    pub fn auth_token(&self) -> Option<&AuthToken> {
        match self {
            AppCall::Start { auth_token, .. } | AppCall::Action { auth_token, .. } => {
                auth_token.as_ref()
            }
        }
    }

    /// Whether this is the start of the session.
    pub fn is_start(&self) -> bool {
        matches!(self, AppCall::Start { .. })
    }
}

/// What an app answers: the UI to show, the state to keep for the next
/// action, and whether the session is over — the Python SDK's
/// `{"ui_content", "app_state", "terminate"}`.
///
/// ```
/// use atp_registry::AppReply;
/// use serde_json::json;
///
/// let reply: AppReply = AppReply::new(json!({"text": "Bye"})).state(json!({"n": 1})).terminate();
/// assert!(reply.terminate);
/// assert_eq!(reply.app_state, Some(json!({"n": 1})));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AppReply<S = Value> {
    /// The UI, as JSON (whatever your UI format is).
    pub ui_content: Value,
    /// The state for the next action. `None` keeps the current one (at
    /// the start: no state, JSON `null`).
    pub app_state: Option<S>,
    /// Whether the app ends the session.
    pub terminate: bool,
}

impl<S> AppReply<S> {
    /// A reply showing `ui_content`, keeping the state, not ending the
    /// session.
    pub fn new(ui_content: Value) -> Self {
        Self {
            ui_content,
            app_state: None,
            terminate: false,
        }
    }

    /// Sets the state the next action gets.
    pub fn state(mut self, state: S) -> Self {
        self.app_state = Some(state);
        self
    }

    /// Ends the session after this reply.
    pub fn terminate(mut self) -> Self {
        self.terminate = true;
        self
    }
}

/// What the type-erased app handler produces.
pub(crate) type AppOutput = Result<AppReply, String>;

/// An app's handler, type-erased.
pub(crate) type AppHandler = Arc<dyn Fn(AppCall) -> BoxFuture<AppOutput> + Send + Sync>;

pub(crate) fn handler<F, Fut, E>(f: F) -> AppHandler
where
    F: Fn(AppCall) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<AppReply, E>> + Send + 'static,
    E: fmt::Display,
{
    Arc::new(move |call| {
        let fut = f(call);
        Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
    })
}

pub(crate) fn typed_handler<S, F, Fut, E>(f: F) -> AppHandler
where
    S: Serialize + DeserializeOwned + Send + 'static,
    F: Fn(AppCall<S>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<AppReply<S>, E>> + Send + 'static,
    E: fmt::Display,
{
    Arc::new(move |call| {
        let call = match call {
            AppCall::Start {
                session_id,
                params,
                auth_token,
            } => AppCall::Start {
                session_id,
                params,
                auth_token,
            },
            AppCall::Action {
                session_id,
                action_data,
                state,
                auth_token,
            } => match S::deserialize(&state) {
                Ok(state) => AppCall::Action {
                    session_id,
                    action_data,
                    state,
                    auth_token,
                },
                Err(e) => {
                    let message = format!(
                        "the session's state could not be read ({e}); a typed app sets its state when it starts"
                    );
                    return Box::pin(std::future::ready(Err(message))) as BoxFuture<_>;
                }
            },
        };
        let fut = f(call);
        Box::pin(async move {
            let reply = fut.await.map_err(|e| e.to_string())?;
            let app_state = match reply.app_state {
                None => None,
                Some(s) => Some(
                    serde_json::to_value(s)
                        .map_err(|e| format!("the app's state could not be serialized: {e}"))?,
                ),
            };
            Ok(AppReply {
                ui_content: reply.ui_content,
                app_state,
                terminate: reply.terminate,
            })
        })
    })
}
