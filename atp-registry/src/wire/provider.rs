//! The providers' own formats that ATP carries: a tool described for each
//! provider's API (the `tools` of a `toolkit_context`, of
//! `GET /atp/{toolkit}/?provider=P`), and a tool's result as each
//! provider takes it back (what `LlmClient::call_tool` returns).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A tool as a provider's API takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ProviderTool {
    /// OpenAI Responses: `{"type": "function", "name", "description",
    /// "parameters", "strict"}` (flat; `strict` always present).
    OpenAi {
        /// `function`.
        #[serde(rename = "type")]
        kind: String,
        /// The tool's name.
        name: String,
        /// Its description.
        description: String,
        /// Its input schema.
        parameters: Value,
        /// Strict mode.
        strict: bool,
    },
    /// OpenAI Chat Completions and Mistral: `{"type": "function",
    /// "function": {…}}`.
    Function {
        /// `function`.
        #[serde(rename = "type")]
        kind: String,
        /// The function.
        function: FunctionDef,
    },
    /// Anthropic: `{"name", "description", "input_schema"}`.
    Anthropic {
        /// The tool's name.
        name: String,
        /// Its description.
        description: String,
        /// Its input schema.
        input_schema: Value,
    },
}

/// The `function` of [`ProviderTool::Function`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDef {
    /// The tool's name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Its input schema.
    pub parameters: Value,
    /// Strict mode (OpenAI Chat only, and only when asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// A tool result, ready to append to the conversation in the provider's
/// format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResultMessage {
    /// OpenAI Responses: `{"type": "function_call_output", "call_id",
    /// "output"}`.
    FunctionCallOutput {
        /// `function_call_output`.
        #[serde(rename = "type")]
        kind: String,
        /// The call's id.
        call_id: String,
        /// The result as JSON text, or the error message.
        output: String,
    },
    /// Anthropic: one user message holding every result of the turn.
    User {
        /// `user`.
        role: String,
        /// One block per call, in call order.
        content: Vec<ToolResultBlock>,
    },
    /// OpenAI Chat (`{"role": "tool", "tool_call_id", "content"}`) and
    /// Mistral (with the tool's `name`).
    Tool {
        /// `tool`.
        role: String,
        /// The tool's name (Mistral).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// The result as JSON text, or the error message.
        content: String,
        /// The call's id.
        tool_call_id: String,
    },
}

/// An Anthropic `tool_result` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolResultBlock {
    /// `tool_result`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The `tool_use` block's id.
    pub tool_use_id: String,
    /// The result as JSON text, or the error message.
    pub content: String,
    /// `true` on a failure (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
}
