//! Interactive apps (docs/PROTOCOL.md §9): start a session of a toolkit's
//! app, send the user's actions, end it — over the WebSocket or
//! `POST process/`.

use serde_json::{Map, Value};
use tracing::Instrument;

use super::{LlmClient, LlmError};
use crate::{
    secret::Secret,
    trace::TraceContext,
    wire::{
        AppActionRequest, AppPayload, AppRequest, AppStart, AppTerminateRequest, LlmToServer,
        ServerToLlm, SessionAction, SessionRef,
    },
};

/// A started app session: what [`LlmClient::start_app`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct AppSession {
    /// The session, for [`LlmClient::app_action`] and
    /// [`LlmClient::terminate_app`].
    pub session_id: String,
    /// The app's first UI, as the app returned it (`null` if none).
    pub ui_content: Value,
}

/// The answer to a user's action: what [`LlmClient::app_action`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct AppUpdate {
    /// The session.
    pub session_id: String,
    /// The app's new UI (`null` if none).
    pub ui_content: Value,
    /// Whether the app ended the session: further actions fail with
    /// [`LlmError::App`].
    pub terminated: bool,
}

impl LlmClient {
    /// Starts a session of the app `app` of a toolkit, with its start
    /// parameters (a JSON object; `null` is none) and, when given, the
    /// user's auth token: the app's first UI and the session's id.
    ///
    /// A failure the server reports (unknown app, toolkit gone, timeout)
    /// is [`LlmError::App`] with its code.
    ///
    /// The start runs in an `atp.llm.app` span (fields `toolkit`, `app`,
    /// `trace_id`) whose trace the server and the toolkit's app join (see
    /// [`crate::trace`]); so does each [`app_action`](Self::app_action).
    ///
    /// ```no_run
    /// # async fn demo(atp: atp_registry::llm::LlmClient) -> Result<(), atp_registry::llm::LlmError> {
    /// use serde_json::json;
    ///
    /// let session = atp.start_app("Demo", "counter", &json!({"start": 1}), None).await?;
    /// // … show session.ui_content; on a click:
    /// let update = atp.app_action(&session.session_id, &json!({"button": "plus"})).await?;
    /// if !update.terminated {
    ///     atp.terminate_app(&session.session_id).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn start_app(
        &self,
        toolkit_id: &str,
        app: &str,
        params: &Value,
        auth_token: Option<&Secret>,
    ) -> Result<AppSession, LlmError> {
        let parameters = match params {
            Value::Null => Map::new(),
            Value::Object(m) => m.clone(),
            _ => {
                return Err(LlmError::InvalidArgument(
                    "an app's parameters must be a JSON object".into(),
                ));
            }
        };
        let request_id = self.request_id("app");
        let span = tracing::info_span!(
            "atp.llm.app",
            toolkit = toolkit_id,
            app,
            trace_id = tracing::field::Empty,
        );
        let (traceparent, tracestate) =
            TraceContext::into_fields(Some(crate::trace::link(&span, None)));
        let message = LlmToServer::AppRequest(AppRequest {
            toolkit_id: toolkit_id.to_owned(),
            request_id: Some(request_id.clone()),
            payload: AppStart {
                app: app.to_owned(),
                parameters,
                auth_token: auth_token.cloned(),
            },
            traceparent,
            tracestate,
        });
        let payload = app_payload(
            self.exchange(&request_id, &message, self.inner.timeout)
                .instrument(span)
                .await?,
        )?;
        let session_id = payload.session_id.ok_or_else(|| {
            LlmError::InvalidResponse("an app_response to app_request without a session_id".into())
        })?;
        Ok(AppSession {
            session_id,
            ui_content: payload.ui_content.unwrap_or(Value::Null),
        })
    }

    /// Sends a user's action (a button, a form's fields) to an app
    /// session: the app's new UI, and whether it ended the session.
    pub async fn app_action(
        &self,
        session_id: &str,
        action_data: &Value,
    ) -> Result<AppUpdate, LlmError> {
        let request_id = self.request_id("app_action");
        let span = tracing::info_span!(
            "atp.llm.app",
            session = session_id,
            trace_id = tracing::field::Empty,
        );
        let (traceparent, tracestate) =
            TraceContext::into_fields(Some(crate::trace::link(&span, None)));
        let message = LlmToServer::AppAction(AppActionRequest {
            request_id: Some(request_id.clone()),
            payload: SessionAction {
                session_id: session_id.to_owned(),
                action_data: action_data.clone(),
            },
            traceparent,
            tracestate,
        });
        let payload = app_payload(
            self.exchange(&request_id, &message, self.inner.timeout)
                .instrument(span)
                .await?,
        )?;
        Ok(AppUpdate {
            session_id: payload.session_id.unwrap_or_else(|| session_id.to_owned()),
            ui_content: payload.ui_content.unwrap_or(Value::Null),
            terminated: payload.terminated.unwrap_or(false),
        })
    }

    /// Ends an app session (the toolkit is told; later actions fail).
    pub async fn terminate_app(&self, session_id: &str) -> Result<(), LlmError> {
        let request_id = self.request_id("app_terminate");
        let message = LlmToServer::AppTerminate(AppTerminateRequest {
            request_id: Some(request_id.clone()),
            payload: SessionRef {
                session_id: session_id.to_owned(),
            },
        });
        app_payload(
            self.exchange(&request_id, &message, self.inner.timeout)
                .await?,
        )
        .map(|_| ())
    }
}

/// Reads an `app_response`: its payload, or its error as
/// [`LlmError::App`].
fn app_payload(answer: ServerToLlm) -> Result<AppPayload, LlmError> {
    match answer {
        ServerToLlm::AppResponse(a) if a.payload.error.is_some() || a.payload.code.is_some() => {
            Err(LlmError::App {
                code: a.payload.code.unwrap_or_else(|| "app_error".into()),
                message: a.payload.error.unwrap_or_else(|| "Unknown error".into()),
            })
        }
        ServerToLlm::AppResponse(a) => Ok(a.payload),
        ServerToLlm::Error(e) => Err(LlmError::Server {
            status: None,
            message: e.text().to_owned(),
        }),
        other => Err(LlmError::InvalidResponse(format!(
            "a {} answer to an app request",
            other.kind()
        ))),
    }
}
