//! The toolkit side: what an ATP server sends a toolkit over its WebSocket
//! (or its inbox), and what the toolkit answers.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{RequestId, WireError, error_result, kind_of, legacy_error, object, typed};
use crate::secret::Secret;

/// A tool request: the payload of `atp_tool_request` and of
/// `atp_app_request`, and an inbox entry as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolRequest {
    /// The id to answer with.
    pub request_id: RequestId,
    /// The tool (or app) to run.
    pub tool_name: String,
    /// Its params (`null` or absent is `{}`).
    #[serde(default, deserialize_with = "super::params")]
    pub params: Map<String, Value>,
    /// The user's auth token (`null` and `""` are none).
    #[serde(default, deserialize_with = "super::token")]
    pub auth_token: Option<Secret>,
    /// Whether the caller reads the tool's log messages: the toolkit then
    /// sends them as `tool_log` frames. Only atp-server sets it (for an
    /// MCP client); absent is `false`, and a `false` is not written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub logs: bool,
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

/// `atp_app_action`: a user's action in an app session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppAction {
    /// The session (the `request_id` of its `atp_app_request`).
    pub request_id: RequestId,
    /// What the user did (a button, a form's fields).
    #[serde(default)]
    pub action_data: Value,
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

#[derive(Serialize, Deserialize)]
struct Message {
    #[serde(default)]
    message: String,
}

#[derive(Serialize, Deserialize)]
struct SessionId {
    request_id: RequestId,
}

/// A message from the server to a toolkit (`{"message_type", "payload"}`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ServerToToolkit {
    /// `atp_client_connected`, with the server's greeting.
    Connected {
        /// The greeting.
        message: String,
    },
    /// `atp_tool_request` (or a bare inbox entry).
    ToolRequest(ToolRequest),
    /// `atp_app_request`: start an app session (its `request_id` is the
    /// session id).
    AppRequest(ToolRequest),
    /// `atp_app_action`.
    AppAction(AppAction),
    /// `atp_app_terminate`: the session is over.
    AppTerminate {
        /// The session.
        request_id: RequestId,
    },
    /// `error`: the server could not read what the toolkit sent.
    Error {
        /// Why.
        message: String,
    },
    /// `pong`: the answer to a `ping` message.
    Pong,
}

impl ServerToToolkit {
    /// Reads a frame from the server, or an inbox entry (a bare
    /// [`ToolRequest`] object, without a type).
    pub fn parse(text: &str) -> Result<Self, WireError> {
        let mut m = object(text)?;
        let kind = kind_of(&m, ["message_type", "type"]).map(str::to_owned);
        let mut payload = |kind: &'static str| match m.remove("payload") {
            Some(p @ Value::Object(_)) => Ok(p),
            _ => Err(WireError::Invalid {
                kind,
                request_id: None,
                reason: "the payload is not an object".into(),
            }),
        };
        Ok(match kind.as_deref() {
            Some("atp_client_connected") => Self::Connected {
                message: payload("atp_client_connected")
                    .ok()
                    .and_then(|p| typed::<Message>("atp_client_connected", p).ok())
                    .map(|m| m.message)
                    .unwrap_or_default(),
            },
            Some("atp_tool_request") => {
                Self::ToolRequest(typed("atp_tool_request", payload("atp_tool_request")?)?)
            }
            Some("atp_app_request") => {
                Self::AppRequest(typed("atp_app_request", payload("atp_app_request")?)?)
            }
            Some("atp_app_action") => {
                Self::AppAction(typed("atp_app_action", payload("atp_app_action")?)?)
            }
            Some("atp_app_terminate") => Self::AppTerminate {
                request_id: typed::<SessionId>("atp_app_terminate", payload("atp_app_terminate")?)?
                    .request_id,
            },
            Some("error") => Self::Error {
                message: payload("error")
                    .ok()
                    .and_then(|p| typed::<Message>("error", p).ok())
                    .map(|m| m.message)
                    .unwrap_or_default(),
            },
            Some("pong") => Self::Pong,
            None if m.contains_key("tool_name") => {
                Self::ToolRequest(typed("atp_tool_request", Value::Object(m))?)
            }
            Some(other) => return Err(super::unknown(other, m.get("request_id"))),
            None => return Err(WireError::NoType),
        })
    }

    /// The frame's JSON text.
    pub fn to_json(&self) -> String {
        super::to_json(self)
    }
}

impl Serialize for ServerToToolkit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        match self {
            Self::Connected { message } => {
                m.serialize_entry("message_type", "atp_client_connected")?;
                m.serialize_entry(
                    "payload",
                    &Message {
                        message: message.clone(),
                    },
                )?;
            }
            Self::ToolRequest(r) => {
                m.serialize_entry("message_type", "atp_tool_request")?;
                m.serialize_entry("payload", r)?;
            }
            Self::AppRequest(r) => {
                m.serialize_entry("message_type", "atp_app_request")?;
                m.serialize_entry("payload", r)?;
            }
            Self::AppAction(a) => {
                m.serialize_entry("message_type", "atp_app_action")?;
                m.serialize_entry("payload", a)?;
            }
            Self::AppTerminate { request_id } => {
                m.serialize_entry("message_type", "atp_app_terminate")?;
                m.serialize_entry(
                    "payload",
                    &SessionId {
                        request_id: request_id.clone(),
                    },
                )?;
            }
            Self::Error { message } => {
                m.serialize_entry("message_type", "error")?;
                m.serialize_entry(
                    "payload",
                    &Message {
                        message: message.clone(),
                    },
                )?;
            }
            Self::Pong => m.serialize_entry("message_type", "pong")?,
        }
        m.end()
    }
}

/// A toolkit's answer to a tool request.
///
/// A Rust toolkit always sends `is_error` (and, on a failure, the error's
/// `code`); a server trusts the flag when it is there. Without it (the
/// Python toolkit), a result of exactly `{"error": MESSAGE}` is a failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolResponse {
    /// The request's id (`null` when the request had none).
    pub request_id: Option<RequestId>,
    /// The tool's result, or `{"error": MESSAGE}`.
    #[serde(default)]
    pub result: Value,
    /// Whether the call failed (absent from the Python toolkit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
    /// The failure's error code (`tool_error`, `missing_params`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl ToolResponse {
    /// A result, flagged as one (so `{"error": …}` is data).
    pub fn ok(request_id: Option<RequestId>, result: Value) -> Self {
        Self {
            request_id,
            result,
            is_error: Some(false),
            code: None,
        }
    }

    /// A failure: `{"error": message}` with the flag and the code.
    pub fn error(request_id: Option<RequestId>, code: &str, message: impl Into<String>) -> Self {
        Self {
            request_id,
            result: error_result(message),
            is_error: Some(true),
            code: Some(code.to_owned()),
        }
    }

    /// The `tool_response` frame's JSON text.
    pub fn to_json(&self) -> String {
        super::tagged("tool_response", self)
    }

    /// The result, or the failure's code (if the toolkit sent one) and
    /// message: the flag decides when present, else the legacy
    /// `{"error": MESSAGE}` rule.
    pub fn outcome(self) -> Result<Value, (Option<String>, String)> {
        read_outcome(self.result, self.is_error, self.code)
    }
}

pub(crate) fn read_outcome(
    result: Value,
    is_error: Option<bool>,
    code: Option<String>,
) -> Result<Value, (Option<String>, String)> {
    match is_error {
        Some(false) => Ok(result),
        Some(true) => {
            let message =
                legacy_error(&result)
                    .map(str::to_owned)
                    .unwrap_or_else(|| match &result {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    });
            Err((code, message))
        }
        None => match legacy_error(&result) {
            Some(message) => Err((code, message.to_owned())),
            None => Ok(result),
        },
    }
}

/// `tool_progress`: a tool's progress on a request, from the toolkit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolProgress {
    /// The request the progress is about.
    pub request_id: RequestId,
    /// How far along (in units of `total`, when given).
    pub progress: f64,
    /// The whole, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<f64>,
    /// A line for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `tool_log`: a tool's log message on a request, from the toolkit; sent
/// only when the request asked for logs ([`ToolRequest::logs`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolLog {
    /// The request the message is about.
    pub request_id: RequestId,
    /// Its level (`"debug"` … `"emergency"`, MCP's names).
    pub level: crate::LogLevel,
    /// What it says: a string or any JSON value.
    #[serde(default)]
    pub data: Value,
}

/// `app_response`: an app session's UI (or `{"error": MESSAGE}`), from the
/// toolkit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolkitAppResponse {
    /// The session.
    pub request_id: RequestId,
    /// The UI content, or `{"error": MESSAGE}`.
    #[serde(default)]
    pub result: Value,
    /// Whether it is an error (a Rust toolkit sends it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
    /// Whether the app ended the session itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<bool>,
}

/// A message from a toolkit to the server (`{"type", …}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ToolkitToServer {
    /// The answer to a tool request.
    ToolResponse(ToolResponse),
    /// Progress on a request.
    ToolProgress(ToolProgress),
    /// A log message on a request.
    ToolLog(ToolLog),
    /// An app session's UI.
    AppResponse(ToolkitAppResponse),
    /// A keep-alive the server answers with `pong`.
    Ping,
}

impl ToolkitToServer {
    /// Reads a frame from a toolkit (`type`, or `message_type`).
    pub fn parse(text: &str) -> Result<Self, WireError> {
        let m = object(text)?;
        let kind = kind_of(&m, ["type", "message_type"]).map(str::to_owned);
        let v = Value::Object(m);
        Ok(match kind.as_deref() {
            Some("tool_response") => Self::ToolResponse(typed("tool_response", v)?),
            Some("tool_progress") => Self::ToolProgress(typed("tool_progress", v)?),
            Some("tool_log") => Self::ToolLog(typed("tool_log", v)?),
            Some("app_response") => Self::AppResponse(typed("app_response", v)?),
            Some("ping") => Self::Ping,
            Some(other) => return Err(super::unknown(other, v.get("request_id"))),
            None => return Err(WireError::NoType),
        })
    }

    /// The frame's JSON text.
    pub fn to_json(&self) -> String {
        super::to_json(self)
    }
}
