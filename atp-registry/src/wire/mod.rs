//! The ATP wire protocol, typed once.
//!
//! Every message that crosses a WebSocket or an HTTP body between a
//! toolkit, an ATP server and an LLM-side client is a type here: the
//! toolkit side ([`ServerToToolkit`], [`ToolkitToServer`], the inbox), the
//! LLM side ([`LlmToServer`], [`ServerToLlm`]), the HTTP bodies of
//! announcing a toolkit ([`RegisterTool`], [`VerifyHash`], …), of the
//! endpoints every adapter serves ([`ToolkitTools`], [`ToolResult`],
//! [`ErrorBody`], …) and of OAuth ([`OAuthTokens`], …). The toolkit
//! runtime, `LlmClient` (feature `llm`), `atp-server` and the fuzz
//! oracles all read and write messages through these types; the protocol
//! itself is described in `docs/PROTOCOL.md` of the repository.
//!
//! Reading is tolerant and strict where it matters: unknown fields are
//! ignored, a missing or mistyped field is a [`WireError`] that names it
//! and keeps the message's `request_id` (so that the request can still be
//! answered). Writing is `serde_json::to_string` of a value, or
//! [`to_json`](ServerToToolkit::to_json).
//!
//! ```
//! use atp_registry::wire::{ServerToToolkit, ToolResponse, ToolkitToServer};
//!
//! let frame = r#"{"message_type": "atp_tool_request",
//!                 "payload": {"request_id": "r1", "tool_name": "echo", "params": {"text": "hi"}}}"#;
//! let ServerToToolkit::ToolRequest(request) = ServerToToolkit::parse(frame)? else { unreachable!() };
//! assert_eq!(request.tool_name, "echo");
//! let answer = ToolkitToServer::ToolResponse(ToolResponse::ok(Some(request.request_id), serde_json::json!("hi")));
//! assert_eq!(
//!     answer.to_json(),
//!     r#"{"type":"tool_response","request_id":"r1","result":"hi","is_error":false}"#
//! );
//! # Ok::<(), atp_registry::wire::WireError>(())
//! ```

mod catalog;
mod endpoints;
mod http;
mod llm;
mod provider;
mod toolkit;

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

pub use catalog::{
    DeveloperProfile, Page, StoreToolkit, StoreToolkitDetails, UnknownEvent, Webhook,
    WebhookDelivery, WebhookEvent, WebhookRegistration,
};
pub use endpoints::{
    ErrorBody, OAuthAuthorization, OAuthConfirmation, OAuthConnected, OAuthTokens, Status,
    ToolContext, ToolResult, ToolkitList, ToolkitSummary, ToolkitTools,
};
pub use http::{
    ExecutionReport, InboxReply, RegisterTool, Registered, ToolMetadata, UpToDate, VerifyHash,
    VerifyToolHash,
};
pub use llm::{
    AppActionRequest, AppPayload, AppRequest, AppResponse, AppStart, AppTerminateRequest,
    ContextPayload, ContextRequest, ContextResponse, ErrorFrame, LlmToServer, ProgressBody,
    ServerToLlm, SessionAction, SessionRef, TaskOutcome, TaskPayload, TaskProgress, TaskRequest,
    TaskResponse, TaskResultPayload,
};
pub use provider::{FunctionDef, ProviderTool, ResultMessage, ToolResultBlock};
pub use toolkit::{
    AppAction, ServerToToolkit, ToolLog, ToolProgress, ToolRequest, ToolResponse,
    ToolkitAppResponse, ToolkitToServer,
};

/// A request id: a string or a number, echoed exactly as it was sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    /// A string id (what atp-rs and the Python SDK send).
    Str(String),
    /// A numeric id, kept as its JSON text.
    Num(serde_json::Number),
}

impl RequestId {
    /// The id of a JSON value, if it is a string or a number.
    pub fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::String(s) => Some(Self::Str(s.clone())),
            Value::Number(n) => Some(Self::Num(n.clone())),
            _ => None,
        }
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestId::Str(s) => f.write_str(s),
            RequestId::Num(n) => write!(f, "{n}"),
        }
    }
}

impl From<String> for RequestId {
    fn from(s: String) -> Self {
        Self::Str(s)
    }
}

impl From<&str> for RequestId {
    fn from(s: &str) -> Self {
        Self::Str(s.to_owned())
    }
}

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The text is not a JSON object.
    #[error("messages must be JSON objects")]
    NotAnObject,
    /// The object has no `type` / `message_type`.
    #[error("the message has no \"type\"")]
    NoType,
    /// A type this side does not take.
    #[error("unknown message type {kind:?}")]
    UnknownType {
        /// The type it had.
        kind: String,
        /// Its `request_id`, if it had a usable one.
        request_id: Option<RequestId>,
    },
    /// A known message with a field missing or of the wrong type.
    #[error("{kind}: {reason}")]
    Invalid {
        /// The message type.
        kind: &'static str,
        /// Its `request_id`, when it had a usable one: the request can
        /// still be answered.
        request_id: Option<RequestId>,
        /// What is wrong (the field, and what was expected).
        reason: String,
    },
}

impl WireError {
    /// The `request_id` of the message that could not be read, if it had one.
    pub fn request_id(&self) -> Option<&RequestId> {
        match self {
            WireError::Invalid { request_id, .. } | WireError::UnknownType { request_id, .. } => {
                request_id.as_ref()
            }
            _ => None,
        }
    }

    /// The message type, when the message was of a known type.
    pub fn kind(&self) -> Option<&'static str> {
        match self {
            WireError::Invalid { kind, .. } => Some(kind),
            _ => None,
        }
    }
}

/// Parses `text` as a JSON object.
pub(crate) fn object(text: &str) -> Result<Map<String, Value>, WireError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(WireError::NotAnObject),
    }
}

/// The message type of an object: `type`, else `message_type` (or the
/// other way round), as a string.
pub(crate) fn kind_of<'a>(m: &'a Map<String, Value>, keys: [&str; 2]) -> Option<&'a str> {
    keys.iter().find_map(|k| m.get(*k).and_then(Value::as_str))
}

/// The error for a message of an unknown type.
pub(crate) fn unknown(kind: &str, request_id: Option<&Value>) -> WireError {
    WireError::UnknownType {
        kind: kind.to_owned(),
        request_id: request_id.and_then(RequestId::from_value),
    }
}

/// Reads a typed message (or payload) out of a JSON value; a failure keeps
/// the value's `request_id`.
pub(crate) fn typed<T: DeserializeOwned>(kind: &'static str, v: Value) -> Result<T, WireError> {
    let request_id = v.get("request_id").and_then(RequestId::from_value);
    T::deserialize(v).map_err(|e| WireError::Invalid {
        kind,
        request_id,
        reason: e.to_string(),
    })
}

/// An auth token: a string; `null` and `""` are no token.
pub(crate) fn token<'de, D: Deserializer<'de>>(d: D) -> Result<Option<crate::Secret>, D::Error> {
    Ok(Option::<String>::deserialize(d)?
        .filter(|s| !s.is_empty())
        .map(crate::Secret::new))
}

/// Params: a JSON object; `null` is `{}`.
pub(crate) fn params<'de, D: Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    Ok(Option::<Map<String, Value>>::deserialize(d)?.unwrap_or_default())
}

/// A string field where `null` and `""` are absent.
pub(crate) fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|s| !s.is_empty()))
}

/// `trace()` for the messages that carry a trace context (`traceparent`
/// and `tracestate` fields).
macro_rules! traced {
    ($($message:ty),+) => {$(
        impl $message {
            /// The message's trace context, if it carries a valid one.
            pub fn trace(&self) -> Option<crate::trace::TraceContext> {
                crate::trace::TraceContext::from_fields(
                    self.traceparent.as_deref(),
                    self.tracestate.as_deref(),
                )
            }
        }
    )+};
}

traced!(
    TaskRequest,
    AppRequest,
    AppActionRequest,
    ToolRequest,
    AppAction
);

/// A trace context field (`traceparent`, `tracestate`): a string is
/// kept as it is (it is checked where it is used, see
/// [`crate::trace::TraceContext`]); anything else is absent, never an
/// error — a bad trace context must not cost the call.
pub(crate) fn trace_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) if !s.is_empty() => Some(s),
        _ => None,
    })
}

/// A field that may be absent (`None`), `null` (`Some(None)`) or a value.
pub(crate) fn double_option<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Serializes a message (or a body) as JSON text; the types of this module
/// always serialize.
pub fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Serializes `inner` with a `"type": kind` first, as the enums of this
/// module do (for a message held outside its enum).
pub(crate) fn tagged<T: Serialize>(kind: &'static str, inner: &T) -> String {
    #[derive(Serialize)]
    struct Tagged<'a, T> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(flatten)]
        inner: &'a T,
    }
    to_json(&Tagged { kind, inner })
}

/// A failure result as every toolkit sends it: `{"error": MESSAGE}`.
pub fn error_result(message: impl Into<String>) -> Value {
    let mut m = Map::with_capacity(1);
    m.insert("error".into(), Value::String(message.into()));
    Value::Object(m)
}

/// The legacy reading of a result without an error flag (what the Python
/// toolkit sends): an object whose only key is `error`, holding a string,
/// is a failure with that message.
pub fn legacy_error(result: &Value) -> Option<&str> {
    match result {
        Value::Object(o) if o.len() == 1 => o.get("error").and_then(Value::as_str),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
