//! The fixture every server under test serves.

use std::time::Duration;

use atp_registry::{Call, Registry, Tool, ToolKitClient, schemars};
use serde::Deserialize;
use serde_json::{Value, json};

/// The open toolkit's name.
pub const TOOLKIT: &str = "conformance";
/// The open toolkit's app name.
pub const APP_NAME: &str = "Conformance";
/// The MCP conformance toolkit's name: the tools the official MCP
/// conformance suite calls, served at `/mcp/mcp_conformance`.
pub const MCP_TOOLKIT: &str = "mcp_conformance";
/// The locked toolkit's name.
pub const LOCKED_TOOLKIT: &str = "locked";
/// The locked toolkit's app name.
pub const LOCKED_APP_NAME: &str = "Locked";
/// The endpoint key the locked toolkit requires (`X-ATP-Key`).
pub const ENDPOINT_KEY: &str = "conformance-key";
/// The open toolkit's tool timeout.
pub const TIMEOUT: Duration = Duration::from_millis(1000);
/// The body limit the fixture's toolkits keep: the default, 1 MiB.
pub const BODY_LIMIT: usize = 1_048_576;
/// The longest `ms` the `slow` and `blocking` tools accept.
pub const MAX_SLEEP_MS: u64 = 60_000;

// Not a doc comment: schemars would put it in the schema.
// The typed `add` tool's arguments.
#[derive(Deserialize, schemars::JsonSchema)]
struct AddArgs {
    a: i64,
    b: i64,
}

/// The conformance fixture: a registry with three toolkits.
///
/// - `conformance` (app name `Conformance`, tool timeout 1000 ms), with,
///   in this order:
///   - `echo(text*)` → `{"echo": text}`
///   - `hello_world(name*)` → `{"message": "Hello, NAME!"}`
///   - `add` (typed, `{a: i64, b: i64}`) → `{"sum": a + b}`
///   - `optional(a*, b)` → `{"a": a, "b": b or null}`
///   - `fail()` → the error `boom`
///   - `panic()` → panics with `secret panic detail`
///   - `slow(ms*)` → sleeps `ms` ms without blocking (a JSON number or a
///     numeric string), then `{"slept": ms}`
///   - `blocking(ms*)` → a blocking handler that sleeps its thread, then
///     `{"slept": ms}`
///   - `secure()` (auth provider `demo`, type `OAuth2`, with
///     `access_token`) → `{"token_length": N}`
/// - `mcp_conformance` (app name `MCP Conformance`): the tools the
///   official MCP conformance suite calls (see `mcp_fixture.rs`).
/// - `locked` (app name `Locked`), which requires `X-ATP-Key:
///   conformance-key`, with the same `echo`.
///
/// Both keep the default body limit of 1 MiB. (`*` = required.)
///
/// ```
/// let registry = atp_conformance::fixture();
/// let toolkit = registry.get_client("conformance").unwrap();
/// assert_eq!(toolkit.tool_count(), 9);
/// assert!(registry.get_client("locked").unwrap().endpoint_key().is_some());
/// ```
pub fn fixture() -> Registry {
    let registry = Registry::new();
    registry
        .register_client(TOOLKIT, conformance_toolkit())
        .expect("the fixture's toolkit name is valid");
    registry
        .register_client(MCP_TOOLKIT, crate::mcp_fixture::mcp_toolkit())
        .expect("the fixture's toolkit name is valid");
    registry
        .register_client(LOCKED_TOOLKIT, locked_toolkit())
        .expect("the fixture's toolkit name is valid");
    registry
}

fn echo_tool() -> Tool {
    Tool::new("echo")
        .description("Echoes the text back.")
        .params(["text"])
        .required_params(["text"])
}

async fn echo(call: Call) -> Result<Value, String> {
    Ok(json!({"echo": call.param("text")}))
}

fn conformance_toolkit() -> ToolKitClient {
    let client = ToolKitClient::new("conformance-api-key", APP_NAME).with_timeout(TIMEOUT);
    let registered = [
        client.register_tool(echo_tool(), echo),
        client.register_tool(
            Tool::new("hello_world")
                .description("Returns a greeting.")
                .params(["name"])
                .required_params(["name"]),
            |call: Call| async move {
                let name = match call.param("name") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                Ok::<_, String>(json!({"message": format!("Hello, {name}!")}))
            },
        ),
        client.register_typed_tool(
            Tool::new("add").description("Adds two integers."),
            |args: AddArgs, _token| async move {
                args.a
                    .checked_add(args.b)
                    .map(|sum| json!({"sum": sum}))
                    .ok_or_else(|| "the sum overflows a 64-bit integer".to_owned())
            },
        ),
        client.register_tool(
            Tool::new("optional")
                .description("Echoes a required and an optional param.")
                .params(["a", "b"])
                .required_params(["a"]),
            |call: Call| async move {
                Ok::<_, String>(json!({
                    "a": call.param("a"),
                    "b": call.param("b").cloned().unwrap_or(Value::Null),
                }))
            },
        ),
        client.register_tool(
            Tool::new("fail").description("Always fails with the error boom."),
            |_call: Call| async { Err::<Value, _>("boom") },
        ),
        client.register_tool(Tool::new("panic").description("Always panics."), panics),
        client.register_tool(
            Tool::new("slow")
                .description("Sleeps ms milliseconds without blocking, then answers.")
                .params(["ms"])
                .required_params(["ms"]),
            |call: Call| async move {
                let ms = sleep_ms(&call)?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, String>(json!({"slept": ms}))
            },
        ),
        client.register_blocking_tool(
            Tool::new("blocking")
                .description("Blocks its thread for ms milliseconds, then answers.")
                .params(["ms"])
                .required_params(["ms"]),
            |call: Call| {
                let ms = sleep_ms(&call)?;
                std::thread::sleep(Duration::from_millis(ms));
                Ok::<_, String>(json!({"slept": ms}))
            },
        ),
        client.register_tool(
            Tool::new("secure")
                .description("Needs an auth token; answers its length.")
                .auth_provider("demo")
                .auth_type("OAuth2")
                .auth_with("access_token"),
            |call: Call| async move {
                let length = call.auth_token().map_or(0, |t| t.expose().len());
                Ok::<_, String>(json!({"token_length": length}))
            },
        ),
    ];
    for outcome in registered {
        outcome.expect("the fixture's tools are valid");
    }
    client
}

fn locked_toolkit() -> ToolKitClient {
    let client =
        ToolKitClient::new("locked-api-key", LOCKED_APP_NAME).with_endpoint_key(ENDPOINT_KEY);
    client
        .register_tool(echo_tool(), echo)
        .expect("the fixture's tools are valid");
    client
}

async fn panics(_call: Call) -> Result<Value, String> {
    panic!("secret panic detail")
}

/// The `ms` param of `slow` and `blocking`: a JSON number or a numeric
/// string, at most [`MAX_SLEEP_MS`].
fn sleep_ms(call: &Call) -> Result<u64, String> {
    let ms = match call.param("ms") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| "ms must be a non-negative integer (a number or a numeric string)".to_owned())?;
    if ms > MAX_SLEEP_MS {
        return Err(format!("ms must be at most {MAX_SLEEP_MS}"));
    }
    Ok(ms)
}
