//! The toolkit the official MCP conformance suite
//! (`@modelcontextprotocol/conformance`) calls: its tools return MCP
//! content (text, an image, audio, embedded resources, several at once),
//! log, report progress and fail, with the values the suite's reference
//! server uses.

use std::time::Duration;

use atp_registry::{Call, LogLevel, Tool, ToolKitClient, mcp::Content};
use serde_json::{Value, json};

/// How many tools the toolkit has.
pub const TOOL_COUNT: usize = 9;
/// The app name of the toolkit.
pub const APP_NAME: &str = "MCP Conformance";
/// A 1×1 red PNG, base64.
pub const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==";
/// A tiny WAV, base64.
pub const WAV: &str = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA=";
/// The message of `test_error_handling`.
pub const ERROR_MESSAGE: &str = "This tool intentionally returns an error for testing";

type Out = Result<Content, String>;

/// The toolkit (`mcp_conformance`).
pub fn mcp_toolkit() -> ToolKitClient {
    mcp_toolkit_named("", APP_NAME)
}

/// The same toolkit with its ATP key and app name, to connect it to an
/// ATP server (which routes toolkits by app name).
pub fn mcp_toolkit_named(api_key: &str, app_name: &str) -> ToolKitClient {
    let client = ToolKitClient::new(api_key, app_name);
    let step = Duration::from_millis(50);
    let registered = [
        client.register_tool(
            Tool::new("test_simple_text").description("Returns simple text content."),
            |_call: Call| async move {
                Out::Ok(Content::new().text("This is a simple text response for testing."))
            },
        ),
        client.register_tool(
            Tool::new("test_image_content").description("Returns an image."),
            |_call: Call| async move { Out::Ok(Content::new().image(PNG, "image/png")) },
        ),
        client.register_tool(
            Tool::new("test_audio_content").description("Returns audio."),
            |_call: Call| async move { Out::Ok(Content::new().audio(WAV, "audio/wav")) },
        ),
        client.register_tool(
            Tool::new("test_embedded_resource").description("Returns an embedded resource."),
            |_call: Call| async move {
                Out::Ok(Content::new().resource(
                    "test://embedded-resource",
                    "text/plain",
                    "This is an embedded resource content.",
                ))
            },
        ),
        client.register_tool(
            Tool::new("test_multiple_content_types")
                .description("Returns text, an image and a resource."),
            |_call: Call| async move {
                Out::Ok(
                    Content::new()
                        .text("Multiple content types test:")
                        .image(PNG, "image/png")
                        .resource(
                            "test://mixed-content-resource",
                            "application/json",
                            r#"{"test":"data","value":123}"#,
                        ),
                )
            },
        ),
        client.register_tool(
            Tool::new("test_tool_with_logging").description("Logs three messages."),
            move |call: Call| async move {
                call.log(LogLevel::Info, "Tool execution started");
                tokio::time::sleep(step).await;
                call.log(LogLevel::Info, "Tool processing data");
                tokio::time::sleep(step).await;
                call.log(LogLevel::Info, "Tool execution completed");
                Out::Ok(Content::new().text("Tool with logging executed successfully"))
            },
        ),
        client.register_tool(
            Tool::new("test_error_handling").description("Always fails."),
            |_call: Call| async move { Out::Err(ERROR_MESSAGE.to_owned()) },
        ),
        client.register_tool(
            Tool::new("test_tool_with_progress").description("Reports its progress three times."),
            move |call: Call| async move {
                for (i, done) in [0.0, 50.0, 100.0].into_iter().enumerate() {
                    if i > 0 {
                        tokio::time::sleep(step).await;
                    }
                    let message = format!("Completed step {done} of 100");
                    call.progress(done, Some(100.0), Some(&message));
                }
                Out::Ok(Content::new().text("Progress tool executed successfully"))
            },
        ),
        client.register_tool(
            Tool::new("json_schema_2020_12_tool")
                .description("Tool with JSON Schema 2020-12 features")
                .schema(schema_2020_12()),
            |call: Call| async move {
                Ok::<Value, String>(json!({"received": Value::Object(call.params().clone())}))
            },
        ),
    ];
    for outcome in registered {
        outcome.expect("the MCP fixture's tools are valid");
    }
    client
}

/// The input schema of `json_schema_2020_12_tool`: `$schema`, `$defs`,
/// `$ref`, `additionalProperties` and the conditional keywords.
fn schema_2020_12() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "$defs": {"address": {"$anchor": "addressDef", "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}}}},
        "properties": {
            "name": {"type": "string"},
            "address": {"$ref": "#/$defs/address"},
            "contactMethod": {"type": "string", "enum": ["phone", "email"]},
            "phone": {"type": "string"},
            "email": {"type": "string"}
        },
        "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
        "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
        "then": {"required": ["phone"]},
        "else": {"required": ["email"]},
        "additionalProperties": false
    })
}
