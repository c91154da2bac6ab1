//! The HTTP bodies of the toolkit side: announcing a toolkit
//! (`verify_hash`, `verify_tool_hash`, `register_tool`), the inbox reply
//! and the execution report.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{RequestId, toolkit::read_outcome};
use crate::secret::Secret;

/// `POST /api/v1/toolkit/verify_hash`: is the server's copy of the
/// toolkit the one the client has?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyHash {
    /// The toolkit's API key.
    #[serde(default, deserialize_with = "super::token")]
    pub api_key: Option<Secret>,
    /// The toolkit's name.
    #[serde(default, deserialize_with = "super::opt_string")]
    pub app_name: Option<String>,
    /// The hash over all its tools.
    #[serde(default, deserialize_with = "super::opt_string")]
    pub toolkit_hash: Option<String>,
}

/// `POST /api/v1/toolkit/verify_tool_hash`: is one tool up to date?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyToolHash {
    /// The toolkit's API key.
    #[serde(default, deserialize_with = "super::token")]
    pub api_key: Option<Secret>,
    /// The tool's hash.
    #[serde(default, deserialize_with = "super::opt_string")]
    pub tool_hash: Option<String>,
    /// The tool's name.
    #[serde(default, deserialize_with = "super::opt_string")]
    pub tool_name: Option<String>,
    /// The toolkit's name (the Python client does not send it).
    #[serde(
        default,
        deserialize_with = "super::opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub app_name: Option<String>,
}

/// The answer to both hash checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UpToDate {
    /// Whether nothing needs announcing.
    #[serde(default)]
    pub up_to_date: bool,
}

/// What a toolkit announces about one tool (`metadata` of
/// [`RegisterTool`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ToolMetadata {
    /// All param names.
    #[serde(default, deserialize_with = "list")]
    pub params: Vec<String>,
    /// The required ones.
    #[serde(default, deserialize_with = "list")]
    pub required_params: Vec<String>,
    /// The description.
    #[serde(default, deserialize_with = "super::opt_string")]
    pub description: Option<String>,
    /// The auth provider.
    #[serde(default, deserialize_with = "super::opt_string")]
    pub auth_provider: Option<String>,
    /// The auth type.
    #[serde(default, deserialize_with = "super::opt_string")]
    pub auth_type: Option<String>,
    /// The token's param name.
    #[serde(default, deserialize_with = "super::opt_string")]
    pub auth_with: Option<String>,
    /// The input's JSON Schema (atp-rs sends it; the Python SDK does not,
    /// and a server then describes every param as a string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    /// The Python SDK's sample response (empty from atp-rs).
    #[serde(default)]
    pub sample_response: Value,
    /// The Python SDK's source code (empty from atp-rs).
    #[serde(default)]
    pub source_code: Value,
    /// An endpoint URL given inside the metadata.
    #[serde(
        default,
        deserialize_with = "super::double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint_url: Option<Option<String>>,
}

/// A list of strings; `null` is empty.
fn list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// `POST /api/v1/register_tool`: announces one tool of a toolkit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterTool {
    /// The tool's name.
    #[serde(default, deserialize_with = "super::opt_string")]
    pub function_id: Option<String>,
    /// The toolkit's API key.
    #[serde(default, deserialize_with = "super::token")]
    pub api_key: Option<Secret>,
    /// The toolkit's name.
    #[serde(default, deserialize_with = "super::opt_string")]
    pub app_name: Option<String>,
    /// `"Rust"`, `"Python"`, …
    #[serde(default, deserialize_with = "super::opt_string")]
    pub programming_language: Option<String>,
    /// The tool's hash.
    #[serde(default, deserialize_with = "super::opt_string")]
    pub code_hash: Option<String>,
    /// The hash over all the toolkit's tools.
    #[serde(default, deserialize_with = "super::opt_string")]
    pub toolkit_hash: Option<String>,
    /// The tool's description.
    #[serde(default, deserialize_with = "metadata")]
    pub metadata: ToolMetadata,
    /// Where the toolkit serves the ATP HTTP endpoints, if it does:
    /// absent keeps the stored one, `null` removes it.
    #[serde(
        default,
        deserialize_with = "super::double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint_url: Option<Option<String>>,
    /// The endpoint key to send to `endpoint_url`.
    #[serde(
        default,
        deserialize_with = "super::token",
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint_key: Option<Secret>,
}

fn metadata<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ToolMetadata, D::Error> {
    Ok(Option::<ToolMetadata>::deserialize(d)?.unwrap_or_default())
}

/// The answer to [`RegisterTool`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    /// `"registered"`.
    pub status: String,
    /// The toolkit.
    pub app_name: String,
    /// The tool.
    pub function_id: String,
    /// The token that authorises [`ExecutionReport`]s of this tool's
    /// executions. It can be used for any number of reports while it is
    /// among the newest 16 tokens issued for the tool (and the toolkit is
    /// still registered with the same key).
    pub exchange_token: Secret,
}

/// `POST /api/v1/toolkit/{api_key}/inbox/respond`: the answer to a request
/// taken from the inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboxReply {
    /// The request's id.
    pub request_id: RequestId,
    /// The result, or `{"error": MESSAGE}` (`result` is read too).
    #[serde(default, alias = "result")]
    pub response: Value,
    /// Whether it is a failure (a Rust toolkit sends it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
    /// The failure's code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl InboxReply {
    /// The result, or the failure's code and message (the flag decides
    /// when present, else the legacy `{"error": MESSAGE}` rule).
    pub fn outcome(self) -> Result<Value, (Option<String>, String)> {
        read_outcome(self.response, self.is_error, self.code)
    }
}

impl From<super::ToolResponse> for InboxReply {
    fn from(r: super::ToolResponse) -> Self {
        Self {
            request_id: r
                .request_id
                .unwrap_or_else(|| RequestId::Str(String::new())),
            response: r.result,
            is_error: r.is_error,
            code: r.code,
        }
    }
}

/// `POST /api/v1/execute_function`: a toolkit reports a tool's execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionReport {
    /// The token `register_tool` returned for the tool.
    #[serde(default, deserialize_with = "super::token")]
    pub exchange_token: Option<Secret>,
    /// What the tool returned.
    #[serde(default)]
    pub result: Value,
    /// The tool's name.
    #[serde(default, deserialize_with = "super::opt_string")]
    pub function_id: Option<String>,
}
