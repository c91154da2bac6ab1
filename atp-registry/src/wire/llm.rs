//! The LLM side: what an LLM-side client sends an ATP server (over its
//! WebSocket or `POST …/llm-client/process/`), and what it answers.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{RequestId, WireError, error_result, kind_of, legacy_error, object, typed};
use crate::secret::Secret;

/// `strict`: `true` or `"true"` is on; anything else is off.
fn lenient_strict<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Bool(b) => b,
        Value::String(s) => s == "true",
        _ => false,
    })
}

/// `get_toolkit_context`: a toolkit's tools in a provider's format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextRequest {
    /// The toolkit (its `app_name`).
    pub toolkit_id: String,
    /// Echoed in the answer.
    #[serde(default)]
    pub request_id: Option<RequestId>,
    /// `openai` (when absent), `openai_chat`, `anthropic`, `mistral`,
    /// `mistralai`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Echoed in the answer.
    #[serde(default)]
    pub user_prompt: Value,
    /// Strict schemas (OpenAI).
    #[serde(
        default,
        deserialize_with = "lenient_strict",
        skip_serializing_if = "is_false"
    )]
    pub strict: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The call inside a [`TaskRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskPayload {
    /// The tool.
    pub function: String,
    /// Its arguments: an object, or a JSON text of one (as providers give
    /// them); `params` is read too.
    #[serde(default, alias = "params")]
    pub parameters: Value,
    /// An auth token for the call.
    #[serde(default, deserialize_with = "super::token")]
    pub auth_token: Option<Secret>,
    /// The provider's call id, echoed.
    #[serde(default)]
    pub tool_call_id: Value,
    /// The end user whose OAuth token the server injects.
    #[serde(
        default,
        deserialize_with = "super::opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub external_user_id: Option<String>,
}

impl TaskPayload {
    /// The arguments as an object: `null`, absent or blank text is `{}`;
    /// text is parsed; anything else is an error.
    pub fn arguments(&self) -> Result<Map<String, Value>, String> {
        match &self.parameters {
            Value::Null => Ok(Map::new()),
            Value::Object(p) => Ok(p.clone()),
            Value::String(text) if text.trim().is_empty() => Ok(Map::new()),
            Value::String(text) => match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(p)) => Ok(p),
                _ => Err("parameters must be a JSON object".into()),
            },
            _ => Err("parameters must be a JSON object".into()),
        }
    }
}

/// `task_request`: run one tool call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRequest {
    /// The toolkit.
    pub toolkit_id: String,
    /// Echoed in the answer.
    #[serde(default)]
    pub request_id: Option<RequestId>,
    /// The call.
    pub payload: TaskPayload,
    /// The provider the call came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The user's prompt (informative).
    #[serde(default)]
    pub user_prompt: Value,
    /// The end user whose OAuth token the server injects.
    #[serde(
        default,
        deserialize_with = "super::opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub external_user_id: Option<String>,
    /// An auth token for the call (the payload's wins).
    #[serde(
        default,
        deserialize_with = "super::token",
        skip_serializing_if = "Option::is_none"
    )]
    pub auth_token: Option<Secret>,
    /// Ask for `task_progress` messages before the answer.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
    /// The W3C trace context of the call (`00-{trace id}-{span id}-{flags}`):
    /// the span of the call on the other side joins this trace. Absent is
    /// none (a new trace); a malformed one is ignored. Not written when
    /// absent.
    #[serde(
        default,
        deserialize_with = "super::trace_field",
        skip_serializing_if = "Option::is_none"
    )]
    pub traceparent: Option<String>,
    /// The W3C `tracestate` that goes with `traceparent` (vendors' data,
    /// passed on as it is).
    #[serde(
        default,
        deserialize_with = "super::trace_field",
        skip_serializing_if = "Option::is_none"
    )]
    pub tracestate: Option<String>,
}

impl TaskRequest {
    /// The call's auth token: the payload's, else the message's.
    pub fn auth_token(&self) -> Option<&Secret> {
        self.payload
            .auth_token
            .as_ref()
            .or(self.auth_token.as_ref())
    }

    /// The end user: the message's, else the payload's.
    pub fn external_user_id(&self) -> Option<&str> {
        self.external_user_id
            .as_deref()
            .or(self.payload.external_user_id.as_deref())
    }
}

/// `app_request`: start an app session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRequest {
    /// The toolkit.
    pub toolkit_id: String,
    /// Echoed in the answer.
    #[serde(default)]
    pub request_id: Option<RequestId>,
    /// `{"app", "parameters", "auth_token"?}`.
    pub payload: AppStart,
    /// The W3C trace context of the request (`00-{trace id}-{span id}-{flags}`):
    /// the span of the request on the other side joins this trace. Absent
    /// is none (a new trace); a malformed one is ignored. Not written when
    /// absent.
    #[serde(
        default,
        deserialize_with = "super::trace_field",
        skip_serializing_if = "Option::is_none"
    )]
    pub traceparent: Option<String>,
    /// The W3C `tracestate` that goes with `traceparent` (vendors' data,
    /// passed on as it is).
    #[serde(
        default,
        deserialize_with = "super::trace_field",
        skip_serializing_if = "Option::is_none"
    )]
    pub tracestate: Option<String>,
}

/// The payload of [`AppRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppStart {
    /// The app (a tool of the toolkit).
    pub app: String,
    /// Its start parameters.
    #[serde(default, deserialize_with = "super::params")]
    pub parameters: Map<String, Value>,
    /// An auth token.
    #[serde(
        default,
        deserialize_with = "super::token",
        skip_serializing_if = "Option::is_none"
    )]
    pub auth_token: Option<Secret>,
}

/// `app_action`: a user's action in a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppActionRequest {
    /// Echoed in the answer.
    #[serde(default)]
    pub request_id: Option<RequestId>,
    /// `{"session_id", "action_data"}`.
    pub payload: SessionAction,
    /// The W3C trace context of the request (`00-{trace id}-{span id}-{flags}`):
    /// the span of the request on the other side joins this trace. Absent
    /// is none (a new trace); a malformed one is ignored. Not written when
    /// absent.
    #[serde(
        default,
        deserialize_with = "super::trace_field",
        skip_serializing_if = "Option::is_none"
    )]
    pub traceparent: Option<String>,
    /// The W3C `tracestate` that goes with `traceparent` (vendors' data,
    /// passed on as it is).
    #[serde(
        default,
        deserialize_with = "super::trace_field",
        skip_serializing_if = "Option::is_none"
    )]
    pub tracestate: Option<String>,
}

/// The payload of [`AppActionRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionAction {
    /// The session.
    pub session_id: String,
    /// What the user did.
    #[serde(default)]
    pub action_data: Value,
}

/// `app_terminate`: end a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppTerminateRequest {
    /// Echoed in the answer.
    #[serde(default)]
    pub request_id: Option<RequestId>,
    /// `{"session_id"}`.
    pub payload: SessionRef,
}

/// A session id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRef {
    /// The session.
    pub session_id: String,
}

#[derive(Deserialize)]
struct Auth {
    #[serde(default, deserialize_with = "super::token")]
    api_key: Option<Secret>,
}

#[derive(Deserialize)]
struct Ping {
    #[serde(default)]
    request_id: Option<RequestId>,
}

/// A message from an LLM-side client to the server (`{"type", …}`).
// A message lives for one exchange; boxing the large variants would cost
// an allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum LlmToServer {
    /// `auth`: the first message on a WebSocket.
    Auth {
        /// The LLM API key (`None` when absent or empty).
        api_key: Option<Secret>,
    },
    /// `get_toolkit_context`.
    GetToolkitContext(ContextRequest),
    /// `task_request`.
    TaskRequest(TaskRequest),
    /// `app_request`.
    AppRequest(AppRequest),
    /// `app_action`.
    AppAction(AppActionRequest),
    /// `app_terminate`.
    AppTerminate(AppTerminateRequest),
    /// `ping`, answered with `pong`.
    Ping {
        /// Echoed.
        request_id: Option<RequestId>,
    },
}

impl LlmToServer {
    /// The message's type, as sent in `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Auth { .. } => "auth",
            Self::GetToolkitContext(_) => "get_toolkit_context",
            Self::TaskRequest(_) => "task_request",
            Self::AppRequest(_) => "app_request",
            Self::AppAction(_) => "app_action",
            Self::AppTerminate(_) => "app_terminate",
            Self::Ping { .. } => "ping",
        }
    }

    /// The message's `request_id`, if it has one.
    pub fn request_id(&self) -> Option<&RequestId> {
        match self {
            Self::GetToolkitContext(r) => r.request_id.as_ref(),
            Self::TaskRequest(r) => r.request_id.as_ref(),
            Self::AppRequest(r) => r.request_id.as_ref(),
            Self::AppAction(r) => r.request_id.as_ref(),
            Self::AppTerminate(r) => r.request_id.as_ref(),
            Self::Ping { request_id } => request_id.as_ref(),
            Self::Auth { .. } => None,
        }
    }

    /// The trace context fields (`traceparent`, `tracestate`) of a
    /// message that carries them (`task_request`, `app_request`,
    /// `app_action`).
    pub fn trace_fields_mut(&mut self) -> Option<(&mut Option<String>, &mut Option<String>)> {
        match self {
            Self::TaskRequest(r) => Some((&mut r.traceparent, &mut r.tracestate)),
            Self::AppRequest(r) => Some((&mut r.traceparent, &mut r.tracestate)),
            Self::AppAction(r) => Some((&mut r.traceparent, &mut r.tracestate)),
            _ => None,
        }
    }

    /// The trace context fields (`traceparent`, `tracestate`) as sent, of
    /// a message that carries them.
    pub fn trace_fields(&self) -> Option<(Option<&str>, Option<&str>)> {
        let (parent, state) = match self {
            Self::TaskRequest(r) => (&r.traceparent, &r.tracestate),
            Self::AppRequest(r) => (&r.traceparent, &r.tracestate),
            Self::AppAction(r) => (&r.traceparent, &r.tracestate),
            _ => return None,
        };
        Some((parent.as_deref(), state.as_deref()))
    }

    /// The message's trace context, if it carries a valid one.
    pub fn trace(&self) -> Option<crate::trace::TraceContext> {
        let (parent, state) = self.trace_fields()?;
        crate::trace::TraceContext::from_fields(parent, state)
    }

    /// Reads a message from an LLM-side client.
    pub fn parse(text: &str) -> Result<Self, WireError> {
        Self::from_object(object(text)?)
    }

    /// Reads a message already parsed as a JSON object.
    pub fn from_object(m: Map<String, Value>) -> Result<Self, WireError> {
        let kind = kind_of(&m, ["type", "message_type"]).map(str::to_owned);
        let v = Value::Object(m);
        Ok(match kind.as_deref() {
            Some("auth") => Self::Auth {
                api_key: typed::<Auth>("auth", v)?.api_key,
            },
            Some("get_toolkit_context") => {
                Self::GetToolkitContext(typed("get_toolkit_context", v)?)
            }
            Some("task_request") => Self::TaskRequest(typed("task_request", v)?),
            Some("app_request") => Self::AppRequest(typed("app_request", v)?),
            Some("app_action") => Self::AppAction(typed("app_action", v)?),
            Some("app_terminate") => Self::AppTerminate(typed("app_terminate", v)?),
            Some("ping") => Self::Ping {
                request_id: typed::<Ping>("ping", v)?.request_id,
            },
            Some(other) => return Err(super::unknown(other, v.get("request_id"))),
            None => return Err(WireError::NoType),
        })
    }

    /// The message's JSON text.
    pub fn to_json(&self) -> String {
        super::to_json(self)
    }
}

/// The `payload` of a successful [`ContextResponse`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ContextPayload {
    /// The toolkit.
    #[serde(default)]
    pub toolkit_id: String,
    /// Its name.
    #[serde(default)]
    pub toolkit_name: String,
    /// A line for people.
    #[serde(default)]
    pub caption: String,
    /// The provider, as asked.
    #[serde(default)]
    pub provider: String,
    /// Whether the schemas are strict.
    #[serde(default)]
    pub strict: bool,
    /// Whether the toolkit can be reached now.
    #[serde(default)]
    pub toolkit_connected: bool,
    /// The tools, in the provider's format.
    #[serde(default)]
    pub tools: Vec<Value>,
    /// The prompt, echoed.
    #[serde(default)]
    pub user_prompt: Value,
    /// What else a server sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `toolkit_context`: the answer to `get_toolkit_context`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextResponse {
    /// The request's id.
    #[serde(default)]
    pub request_id: Option<RequestId>,
    /// `success` or `error`.
    #[serde(default)]
    pub status: Option<String>,
    /// The context, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<ContextPayload>,
    /// The error message, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The same message (where the Python client reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The error code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl ContextResponse {
    /// A successful answer.
    pub fn ok(request_id: Option<RequestId>, payload: ContextPayload) -> Self {
        Self {
            request_id,
            status: Some("success".into()),
            payload: Some(payload),
            error: None,
            message: None,
            code: None,
        }
    }

    /// A failure.
    pub fn error(request_id: Option<RequestId>, code: &str, message: &str) -> Self {
        Self {
            request_id,
            status: Some("error".into()),
            payload: None,
            error: Some(message.to_owned()),
            message: Some(message.to_owned()),
            code: Some(code.to_owned()),
        }
    }
}

/// Where the result sits in a [`TaskResponse`]: `payload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResultPayload {
    /// The tool's result, or `{"error": MESSAGE}`.
    #[serde(default)]
    pub result: Value,
    /// The tool.
    #[serde(default)]
    pub function: Option<String>,
    /// The provider's call id, echoed.
    #[serde(default)]
    pub tool_call_id: Value,
}

/// `task_response`: the answer to `task_request`.
///
/// atp-server puts the result at `payload.result` and at
/// `result.tool.result` (where the Python client reads it), with
/// `status` `success` or `failed`; on a failure the result is
/// `{"error": MESSAGE}` and `error` and `code` are beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResponse {
    /// The request's id.
    #[serde(default)]
    pub request_id: Option<RequestId>,
    /// `success`, `failed`, or `error`.
    #[serde(default)]
    pub status: Option<String>,
    /// The result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<TaskResultPayload>,
    /// The result as the Python client reads it: `{"tool": {"name", "result"}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The failure's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The failure's message, where a Python server puts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The failure's code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// What a [`TaskResponse`] says happened.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskOutcome {
    /// The tool's result.
    Ok(Value),
    /// A failure: its code (if the server sent one) and message.
    Failed {
        /// The error code.
        code: Option<String>,
        /// The message.
        message: String,
    },
}

impl TaskResponse {
    /// A result.
    pub fn ok(
        request_id: Option<RequestId>,
        function: Option<String>,
        tool_call_id: Value,
        result: Value,
    ) -> Self {
        let tool = tool_result(function.as_deref(), &result);
        Self {
            request_id,
            status: Some("success".into()),
            payload: Some(TaskResultPayload {
                result,
                function,
                tool_call_id,
            }),
            result: Some(tool),
            error: None,
            message: None,
            code: None,
        }
    }

    /// A failure.
    pub fn failed(
        request_id: Option<RequestId>,
        function: Option<String>,
        tool_call_id: Value,
        code: &str,
        message: &str,
    ) -> Self {
        let result = error_result(message);
        let tool = tool_result(function.as_deref(), &result);
        Self {
            request_id,
            status: Some("failed".into()),
            payload: Some(TaskResultPayload {
                result,
                function,
                tool_call_id,
            }),
            result: Some(tool),
            error: Some(message.to_owned()),
            message: None,
            code: Some(code.to_owned()),
        }
    }

    /// How the call went, read as tolerantly as the servers write it:
    /// `status` `error` / `failed` is a failure (message from `error`,
    /// `message`, or the result's `{"error"}`); `success` is a result,
    /// whatever its shape; without a status, a result of exactly
    /// `{"error": MESSAGE}` is a failure (the legacy rule). The result is
    /// `payload.result`, else `result.tool.result`, else `result`.
    pub fn outcome(&self) -> TaskOutcome {
        let result = self
            .payload
            .as_ref()
            .map(|p| &p.result)
            .or_else(|| {
                self.result
                    .as_ref()
                    .map(|r| r.get("tool").and_then(|t| t.get("result")).unwrap_or(r))
            })
            .unwrap_or(&Value::Null);
        match self.status.as_deref() {
            Some("error" | "failed") => TaskOutcome::Failed {
                code: self.code.clone(),
                message: self
                    .error
                    .clone()
                    .or_else(|| self.message.clone())
                    .or_else(|| legacy_error(result).map(str::to_owned))
                    .unwrap_or_else(|| "Unknown error".into()),
            },
            Some("success") => TaskOutcome::Ok(result.clone()),
            _ => match legacy_error(result) {
                Some(message) => TaskOutcome::Failed {
                    code: self.code.clone(),
                    message: message.to_owned(),
                },
                None => TaskOutcome::Ok(result.clone()),
            },
        }
    }
}

fn tool_result(function: Option<&str>, result: &Value) -> Value {
    let mut tool = Map::with_capacity(2);
    tool.insert(
        "name".into(),
        function.map_or(Value::Null, |f| Value::String(f.to_owned())),
    );
    tool.insert("result".into(), result.clone());
    let mut outer = Map::with_capacity(1);
    outer.insert("tool".into(), Value::Object(tool));
    Value::Object(outer)
}

/// `task_progress`: a tool's progress, before its `task_response`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskProgress {
    /// The request's id.
    #[serde(default)]
    pub request_id: Option<RequestId>,
    /// `{"progress", "total"?, "message"?}`.
    pub payload: ProgressBody,
}

/// How far a tool is: the payload of [`TaskProgress`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressBody {
    /// How far along (in units of `total`, when given).
    pub progress: f64,
    /// The whole, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<f64>,
    /// A line for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// An `app_response` to an LLM-side client: the answer to `app_request`,
/// `app_action` and `app_terminate`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AppResponse {
    /// The request's id.
    #[serde(default)]
    pub request_id: Option<RequestId>,
    /// `{"session_id", "ui_content"?, "terminated"?}` or `{"error", "code"}`.
    #[serde(default)]
    pub payload: AppPayload,
}

impl AppResponse {
    /// A session's UI (or its end).
    pub fn ok(
        request_id: Option<RequestId>,
        session_id: impl Into<String>,
        ui_content: Option<Value>,
        terminated: Option<bool>,
    ) -> Self {
        Self {
            request_id,
            payload: AppPayload {
                session_id: Some(session_id.into()),
                ui_content,
                terminated,
                ..AppPayload::default()
            },
        }
    }

    /// A failure: its code and message (and the session, when known).
    pub fn error(
        request_id: Option<RequestId>,
        session_id: Option<String>,
        code: &str,
        message: &str,
    ) -> Self {
        Self {
            request_id,
            payload: AppPayload {
                session_id,
                error: Some(message.to_owned()),
                code: Some(code.to_owned()),
                ..AppPayload::default()
            },
        }
    }
}

/// The payload of an [`AppResponse`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AppPayload {
    /// The session (the id the toolkit knows it by).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The app's UI, as the app returned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ui_content: Option<Value>,
    /// Whether the session is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<bool>,
    /// Why the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The failure's stable code (`app_not_found`, `session_not_found`,
    /// `session_ended`, `toolkit_disconnected`, `toolkit_timeout`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// An `error` frame: a message the server could not take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// The message's `request_id`, if it had one.
    #[serde(default)]
    pub request_id: Option<RequestId>,
    /// `"error"`.
    #[serde(default)]
    pub status: Option<String>,
    /// The message.
    #[serde(default)]
    pub error: Option<String>,
    /// The same message.
    #[serde(default)]
    pub message: Option<String>,
    /// The error code.
    #[serde(default)]
    pub code: Option<String>,
}

impl ErrorFrame {
    /// An error frame.
    pub fn new(request_id: Option<RequestId>, code: &str, message: &str) -> Self {
        Self {
            request_id,
            status: Some("error".into()),
            error: Some(message.to_owned()),
            message: Some(message.to_owned()),
            code: Some(code.to_owned()),
        }
    }

    /// The message.
    pub fn text(&self) -> &str {
        self.error
            .as_deref()
            .or(self.message.as_deref())
            .unwrap_or("Unknown error")
    }
}

#[derive(Deserialize)]
struct AuthAnswer {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    error: Option<String>,
}

/// A message from the server to an LLM-side client (`{"type", …}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerToLlm {
    /// `auth_response`.
    AuthResponse {
        /// Whether the key was taken.
        success: bool,
        /// Why not.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// `toolkit_context`.
    ToolkitContext(ContextResponse),
    /// `task_response`.
    TaskResponse(TaskResponse),
    /// `task_progress`.
    TaskProgress(TaskProgress),
    /// `app_response`.
    AppResponse(AppResponse),
    /// `error`.
    Error(ErrorFrame),
    /// `pong`.
    Pong {
        /// Echoed.
        request_id: Option<RequestId>,
    },
}

impl ServerToLlm {
    /// Reads a message from the server.
    pub fn parse(text: &str) -> Result<Self, WireError> {
        Self::from_object(object(text)?)
    }

    /// Reads a message already parsed as a JSON object (an HTTP answer).
    pub fn from_object(m: Map<String, Value>) -> Result<Self, WireError> {
        let kind = kind_of(&m, ["type", "message_type"]).map(str::to_owned);
        let v = Value::Object(m);
        Ok(match kind.as_deref() {
            Some("auth_response") => {
                let a = typed::<AuthAnswer>("auth_response", v)?;
                Self::AuthResponse {
                    success: a.success,
                    error: a.error,
                }
            }
            Some("toolkit_context") => Self::ToolkitContext(typed("toolkit_context", v)?),
            Some("task_response") => Self::TaskResponse(typed("task_response", v)?),
            Some("task_progress") => Self::TaskProgress(typed("task_progress", v)?),
            Some("app_response") => Self::AppResponse(typed("app_response", v)?),
            Some("error") => Self::Error(typed("error", v)?),
            Some("pong") => Self::Pong {
                request_id: typed::<Ping>("pong", v)?.request_id,
            },
            // A Python server's answers may come without a type.
            None if ["status", "result", "payload"]
                .iter()
                .any(|k| v.get(*k).is_some()) =>
            {
                Self::TaskResponse(typed("task_response", v)?)
            }
            Some(other) => return Err(super::unknown(other, v.get("request_id"))),
            None => return Err(WireError::NoType),
        })
    }

    /// The message's type, as sent in `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AuthResponse { .. } => "auth_response",
            Self::ToolkitContext(_) => "toolkit_context",
            Self::TaskResponse(_) => "task_response",
            Self::TaskProgress(_) => "task_progress",
            Self::AppResponse(_) => "app_response",
            Self::Error(_) => "error",
            Self::Pong { .. } => "pong",
        }
    }

    /// The `request_id` the message answers.
    pub fn request_id(&self) -> Option<&RequestId> {
        match self {
            Self::ToolkitContext(c) => c.request_id.as_ref(),
            Self::TaskResponse(t) => t.request_id.as_ref(),
            Self::TaskProgress(p) => p.request_id.as_ref(),
            Self::AppResponse(a) => a.request_id.as_ref(),
            Self::Error(e) => e.request_id.as_ref(),
            Self::Pong { request_id } => request_id.as_ref(),
            Self::AuthResponse { .. } => None,
        }
    }

    /// The message's JSON text.
    pub fn to_json(&self) -> String {
        super::to_json(self)
    }
}
