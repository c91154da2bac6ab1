//! Tool calls as the providers' APIs return them, and tool results as the
//! providers accept them (docs/PROTOCOL.md §6). Pure functions: no I/O.

use serde_json::{Map, Value};

use crate::{
    schema::Provider,
    wire::{ResultMessage, ServerToLlm, TaskOutcome, ToolResultBlock},
};

/// The shape a tool call came in, which decides the shape of its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFormat {
    /// OpenAI Responses: a `function_call` output item.
    OpenAiResponses,
    /// OpenAI Chat Completions: an item of `message.tool_calls`.
    OpenAiChat,
    /// Anthropic Messages: a `tool_use` content block.
    Anthropic,
    /// Mistral chat: an item of `message.tool_calls`.
    Mistral,
}

/// One tool call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The provider's call id (`call_id`, `id`), echoed in the result.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments, or why they could not be read (not JSON, not an
    /// object) — such a call gets an error result and is not run.
    pub arguments: Result<Map<String, Value>, String>,
    /// The shape it came in.
    pub format: CallFormat,
}

/// What running a call gave: the output text, and whether it is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallOutcome {
    /// The result as JSON text, or the error message.
    pub content: String,
    /// Whether the call failed.
    pub is_error: bool,
}

impl CallOutcome {
    /// A successful result (serialized as JSON text).
    pub fn ok(result: &Value) -> Self {
        Self {
            content: result.to_string(),
            is_error: false,
        }
    }

    /// A failure with its message.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            content: message.into(),
            is_error: true,
        }
    }
}

/// Finds the tool calls in whatever the provider returned: a whole API
/// response (`output`, `choices[0].message.tool_calls`, `content`), a
/// message, a list of calls or content blocks, or one call. Items that are
/// not tool calls (text blocks, reasoning items, messages) are skipped.
///
/// `provider` tells Mistral's `tool_calls` from OpenAI Chat's, which have
/// the same shape; OpenAI's two APIs are told apart by the items' shape.
///
/// ```
/// use atp_registry::{Provider, llm::{CallFormat, parse_tool_calls}};
/// use serde_json::json;
///
/// let blocks = json!([
///     {"type": "text", "text": "Let me check."},
///     {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
/// ]);
/// let calls = parse_tool_calls(Provider::Anthropic, &blocks);
/// assert_eq!(calls.len(), 1);
/// assert_eq!(calls[0].format, CallFormat::Anthropic);
/// assert_eq!(calls[0].arguments.as_ref().unwrap()["city"], "Paris");
/// ```
pub fn parse_tool_calls(provider: Provider, raw: &Value) -> Vec<ToolCall> {
    let mut calls = Vec::new();
    collect(provider, raw, &mut calls, 0);
    calls
}

fn collect(provider: Provider, v: &Value, out: &mut Vec<ToolCall>, depth: u8) {
    if depth > 6 {
        return;
    }
    match v {
        Value::Array(items) => items
            .iter()
            .for_each(|i| collect(provider, i, out, depth + 1)),
        Value::Object(m) => {
            if let Some(call) = one_call(provider, m, out.len()) {
                out.push(call);
                return;
            }
            // A response or a message that holds calls.
            if let Some(choices) = m.get("choices").and_then(Value::as_array) {
                if let Some(first) = choices.first() {
                    collect(provider, first, out, depth + 1);
                }
            } else if let Some(message) = m.get("message") {
                collect(provider, message, out, depth + 1);
            } else if let Some(calls) = m.get("tool_calls") {
                collect(provider, calls, out, depth + 1);
            } else if let Some(output) = m.get("output").filter(|o| o.is_array()) {
                collect(provider, output, out, depth + 1);
            } else if let Some(content) = m.get("content").filter(|c| c.is_array()) {
                collect(provider, content, out, depth + 1);
            }
        }
        _ => {}
    }
}

fn str_field<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    m.get(key).and_then(Value::as_str)
}

/// Reads arguments given as a JSON string (OpenAI, Mistral) or an object.
fn arguments(raw: Option<&Value>) -> Result<Map<String, Value>, String> {
    match raw {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(Map::new()),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err("the tool call's arguments are not a JSON object".into()),
            Err(e) => Err(format!("the tool call's arguments are not valid JSON: {e}")),
        },
        Some(_) => Err("the tool call's arguments are not a JSON object".into()),
    }
}

fn one_call(provider: Provider, m: &Map<String, Value>, index: usize) -> Option<ToolCall> {
    match str_field(m, "type") {
        Some("function_call") => {
            let name = str_field(m, "name")?.to_owned();
            let id = str_field(m, "call_id")
                .or_else(|| str_field(m, "id"))
                .map(str::to_owned)
                .unwrap_or_else(|| invented_id(provider, index));
            Some(ToolCall {
                id,
                name,
                arguments: arguments(m.get("arguments")),
                format: CallFormat::OpenAiResponses,
            })
        }
        Some("tool_use") => Some(ToolCall {
            id: str_field(m, "id")
                .map(str::to_owned)
                .unwrap_or_else(|| invented_id(provider, index)),
            name: str_field(m, "name")?.to_owned(),
            arguments: match m.get("input") {
                None | Some(Value::Null) => Ok(Map::new()),
                Some(Value::Object(o)) => Ok(o.clone()),
                Some(_) => Err("the tool call's input is not a JSON object".into()),
            },
            format: CallFormat::Anthropic,
        }),
        Some("function") | None => {
            let function = m.get("function")?.as_object()?;
            let name = str_field(function, "name")?.to_owned();
            let format = if provider == Provider::Mistral {
                CallFormat::Mistral
            } else {
                CallFormat::OpenAiChat
            };
            let id = str_field(m, "id")
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
                .unwrap_or_else(|| invented_id(provider, index));
            Some(ToolCall {
                id,
                name,
                arguments: arguments(function.get("arguments")),
                format,
            })
        }
        _ => None,
    }
}

/// An id for a call that has none: Mistral's rule (9 characters from
/// `[A-Za-z0-9]`) for Mistral, `call_…` otherwise.
fn invented_id(provider: Provider, index: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        | 1;
    let id: String = (0..9)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ALPHABET[(seed % ALPHABET.len() as u64) as usize] as char
        })
        .collect();
    if provider == Provider::Mistral {
        id
    } else {
        format!("call_{id}")
    }
}

/// The result messages for `calls` (with their `outcomes`, in the same
/// order), ready to append to the conversation in each call's own
/// provider format. Anthropic results are gathered into ONE user message
/// (the API wants all results of a turn there); the others get one message
/// each.
///
/// ```
/// use atp_registry::{Provider, llm::{CallOutcome, parse_tool_calls, result_messages}};
/// use serde_json::json;
///
/// let calls = parse_tool_calls(Provider::OpenAi, &json!([
///     {"type": "function_call", "call_id": "call_1", "name": "hello_world", "arguments": "{\"name\": \"Ada\"}"}
/// ]));
/// let messages = result_messages(&calls, &[CallOutcome::ok(&json!({"message": "Hello, Ada!"}))]);
/// assert_eq!(messages, [json!({"type": "function_call_output", "call_id": "call_1",
///                              "output": "{\"message\":\"Hello, Ada!\"}"})]);
/// ```
pub fn result_messages(calls: &[ToolCall], outcomes: &[CallOutcome]) -> Vec<Value> {
    let mut messages = Vec::new();
    let mut anthropic_blocks = Vec::new();
    let mut anthropic_at = None;
    for (call, outcome) in calls.iter().zip(outcomes) {
        let message = match call.format {
            CallFormat::OpenAiResponses => ResultMessage::FunctionCallOutput {
                kind: "function_call_output".into(),
                call_id: call.id.clone(),
                output: outcome.content.clone(),
            },
            CallFormat::OpenAiChat | CallFormat::Mistral => ResultMessage::Tool {
                role: "tool".into(),
                name: (call.format == CallFormat::Mistral).then(|| call.name.clone()),
                content: outcome.content.clone(),
                tool_call_id: call.id.clone(),
            },
            CallFormat::Anthropic => {
                anthropic_at.get_or_insert(messages.len());
                anthropic_blocks.push(ToolResultBlock {
                    kind: "tool_result".into(),
                    tool_use_id: call.id.clone(),
                    content: outcome.content.clone(),
                    is_error: outcome.is_error.then_some(true),
                });
                continue;
            }
        };
        messages.push(message);
    }
    if let Some(at) = anthropic_at {
        messages.insert(
            at,
            ResultMessage::User {
                role: "user".into(),
                content: anthropic_blocks,
            },
        );
    }
    messages
        .iter()
        .map(|m| serde_json::to_value(m).unwrap_or(Value::Null))
        .collect()
}

/// What an answer to a `task_request` says: the result, or the failure's
/// message (read as [`TaskResponse::outcome`](crate::wire::TaskResponse::outcome)
/// does, from every shape servers write); an `error` frame is a failure.
pub fn task_outcome(answer: &ServerToLlm) -> CallOutcome {
    match answer {
        ServerToLlm::TaskResponse(t) => match t.outcome() {
            TaskOutcome::Ok(result) => CallOutcome::ok(&result),
            TaskOutcome::Failed { message, .. } => CallOutcome::error(message),
        },
        ServerToLlm::Error(e) => CallOutcome::error(e.text()),
        _ => CallOutcome::error("The ATP server answered with another message type"),
    }
}

#[cfg(test)]
mod tests;
