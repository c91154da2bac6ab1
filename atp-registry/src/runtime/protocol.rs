//! The messages of ATP-SPEC §4, parsed without trusting the server.

use std::fmt;

use serde_json::{Map, Value, json};

use crate::secret::{AuthToken, Secret};

/// A tool request from the server.
pub struct ToolRequest {
    /// The id to answer with (a string or a number, echoed as sent).
    pub request_id: Value,
    /// The tool to run.
    pub tool_name: String,
    /// Its params (a JSON object; `null` when absent).
    pub params: Value,
    /// The user's auth token, if any.
    pub auth_token: Option<AuthToken>,
}

impl fmt::Debug for ToolRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolRequest")
            .field("request_id", &self.request_id)
            .field("tool_name", &self.tool_name)
            .field("params", &self.params)
            .field("auth_token", &self.auth_token)
            .finish()
    }
}

/// A message from the server, as the runtime understands it.
#[derive(Debug)]
pub enum Incoming {
    /// `atp_client_connected`, with its message.
    Connected(String),
    /// `atp_tool_request` (or an inbox entry).
    ToolRequest(ToolRequest),
    /// A tool request that can not be run; answer it with an error when it
    /// has a request id (`Some(Value::Null)` when it had none).
    Malformed {
        /// The id to answer with, if the message is a tool request.
        request_id: Option<Value>,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other message type.
    Other(String),
}

fn malformed(request_id: Option<Value>, reason: impl Into<String>) -> Incoming {
    Incoming::Malformed {
        request_id,
        reason: reason.into(),
    }
}

/// Parses a text frame from the server (or an inbox entry: a bare
/// request object).
pub fn parse_message(text: &str) -> Incoming {
    let Ok(Value::Object(msg)) = serde_json::from_str::<Value>(text) else {
        return malformed(None, "not a JSON object");
    };
    let kind = msg
        .get("message_type")
        .or_else(|| msg.get("type"))
        .and_then(Value::as_str);
    match kind {
        Some("atp_client_connected") => Incoming::Connected(
            msg.get("payload")
                .and_then(|p| p.get("message"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        ),
        Some("atp_tool_request") => match msg.get("payload") {
            Some(Value::Object(payload)) => parse_request(payload),
            _ => malformed(Some(Value::Null), "the payload is not an object"),
        },
        None if msg.contains_key("tool_name") => parse_request(&msg),
        Some(other) => Incoming::Other(other.to_owned()),
        None => Incoming::Other(String::new()),
    }
}

fn parse_request(payload: &Map<String, Value>) -> Incoming {
    let request_id = match payload.get("request_id") {
        Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
        _ => return malformed(Some(Value::Null), "request_id is missing or not a string"),
    };
    let Some(tool_name) = payload.get("tool_name").and_then(Value::as_str) else {
        return malformed(Some(request_id), "tool_name is missing or not a string");
    };
    let params = match payload.get("params") {
        None | Some(Value::Null) => Value::Null,
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => return malformed(Some(request_id), "params is not an object"),
    };
    let auth_token = match payload.get("auth_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(Secret::new(s.as_str())),
        Some(_) => return malformed(Some(request_id), "auth_token is not a string"),
    };
    Incoming::ToolRequest(ToolRequest {
        request_id,
        tool_name: tool_name.to_owned(),
        params,
        auth_token,
    })
}

/// The answer to a tool request: `{"type": "tool_response", "request_id",
/// "result"}`, with `{"error": message}` as the result of a failure.
pub fn tool_response(request_id: &Value, outcome: Result<Value, String>) -> Value {
    let result = match outcome {
        Ok(v) => v,
        Err(message) => json!({ "error": message }),
    };
    json!({"type": "tool_response", "request_id": request_id, "result": result})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        let m = parse_message(
            r#"{"message_type": "atp_tool_request", "payload": {"request_id": "r1", "tool_name": "echo", "params": {"text": "hi"}, "auth_token": "tok"}}"#,
        );
        let Incoming::ToolRequest(r) = m else {
            panic!("{m:?}")
        };
        assert_eq!(
            (r.request_id, r.tool_name.as_str(), r.params),
            (json!("r1"), "echo", json!({"text": "hi"}))
        );
        assert_eq!(
            r.auth_token.map(|t| t.expose().to_owned()).as_deref(),
            Some("tok")
        );
        let inbox = parse_message(
            r#"{"request_id": 7, "tool_name": "echo", "params": null, "auth_token": ""}"#,
        );
        let Incoming::ToolRequest(r) = inbox else {
            panic!()
        };
        assert_eq!(
            (r.request_id, r.params, r.auth_token.is_none()),
            (json!(7), Value::Null, true)
        );
    }

    #[test]
    fn malformed_requests_keep_their_id() {
        for (text, id) in [
            (
                r#"{"message_type": "atp_tool_request", "payload": {"request_id": "r", "params": {}}}"#,
                Some(json!("r")),
            ),
            (
                r#"{"message_type": "atp_tool_request", "payload": {"request_id": "r", "tool_name": "t", "params": [1]}}"#,
                Some(json!("r")),
            ),
            (
                r#"{"message_type": "atp_tool_request", "payload": {"request_id": "r", "tool_name": "t", "auth_token": 5}}"#,
                Some(json!("r")),
            ),
            (
                r#"{"message_type": "atp_tool_request", "payload": {"tool_name": "t"}}"#,
                Some(Value::Null),
            ),
            (
                r#"{"message_type": "atp_tool_request", "payload": 3}"#,
                Some(Value::Null),
            ),
            ("not json", None),
            ("[1]", None),
        ] {
            match parse_message(text) {
                Incoming::Malformed { request_id, .. } => assert_eq!(request_id, id, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_messages() {
        assert!(matches!(
            parse_message(r#"{"message_type": "atp_client_connected", "payload": {"message": "hi"}}"#),
            Incoming::Connected(m) if m == "hi"
        ));
        assert!(matches!(
            parse_message(r#"{"message_type": "atp_app_request"}"#),
            Incoming::Other(_)
        ));
    }

    #[test]
    fn responses() {
        assert_eq!(
            tool_response(&json!("r"), Ok(json!({"a": 1}))),
            json!({"type": "tool_response", "request_id": "r", "result": {"a": 1}})
        );
        assert_eq!(
            tool_response(&json!(1), Err("boom".into())),
            json!({"type": "tool_response", "request_id": 1, "result": {"error": "boom"}})
        );
    }

    #[test]
    fn debug_hides_the_token() {
        let Incoming::ToolRequest(r) =
            parse_message(r#"{"request_id": "r", "tool_name": "t", "auth_token": "hunter2"}"#)
        else {
            panic!()
        };
        assert!(!format!("{r:?}").contains("hunter2"));
    }
}
