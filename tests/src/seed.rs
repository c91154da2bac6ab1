//! The Python SDK's four example tools (`hello_world`, `echo`,
//! `create_company` with OAuth, `get_contacts` with an API key) and a few
//! more of each kind (typed, optional params, an output schema, blocking,
//! failing), registered twice: with `#[tool]` ([`macro_toolkit`]) and
//! with the builder ([`builder_toolkit`]). Both must be described with the
//! same bytes and answer the same bytes on every transport
//! (`tests/tests/conformance/macro_parity.rs`).
//!
//! The HubSpot calls are stand-ins: they echo what they would send and
//! the token's length, never the token.

use atp_registry::{AuthToken, Call, Progress, Tool, ToolError, ToolKitClient, schemars, tool};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The toolkit's app name (both versions).
pub const APP_NAME: &str = "Seed";

/// Every tool of the seed toolkits, in registration order.
pub const TOOLS: [&str; 8] = [
    "hello_world",
    "echo",
    "create_company",
    "get_contacts",
    "add",
    "greet",
    "sum",
    "fail",
];

/// What `create_company` would send to HubSpot, and the token's length.
fn company(name: &Value, domain: &Value, industry: &Value, token: &AuthToken) -> Value {
    json!({
        "properties": {"name": name, "domain": domain, "industry": industry},
        "token_length": token.expose().len(),
    })
}

/// What `get_contacts` would answer.
fn contacts(token: &AuthToken) -> Value {
    json!({"results": [], "token_length": token.expose().len()})
}

/// What `greet` answers: an object, so its schema is an output schema.
#[derive(Serialize, schemars::JsonSchema)]
pub struct Greeting {
    /// The greeting.
    pub message: String,
}

fn greeting(name: &str, greeting: Option<&str>) -> Greeting {
    Greeting {
        message: format!("{}, {name}!", greeting.unwrap_or("Hello")),
    }
}

// ---------------------------------------------------------------------
// With the macro.
// ---------------------------------------------------------------------

/// Returns a greeting.
#[tool]
async fn hello_world(name: String) -> Value {
    json!({"message": format!("Hello, {name}!")})
}

/// Echoes the input text.
#[tool]
async fn echo(text: String) -> Value {
    json!({"echo": text})
}

/// Creates a company in HubSpot.
#[tool(
    auth_provider = "hubspot",
    auth_type = "OAuth2",
    auth_with = "access_token"
)]
async fn create_company(
    name: String,
    domain: String,
    industry: String,
    token: AuthToken,
) -> Result<Value, ToolError> {
    Ok(company(
        &name.into(),
        &domain.into(),
        &industry.into(),
        &token,
    ))
}

/// Fetches contacts from HubSpot.
#[tool(auth_provider = "hubspot", auth_type = "apiKey", auth_with = "api_key")]
async fn get_contacts(token: AuthToken) -> Result<Value, ToolError> {
    Ok(contacts(&token))
}

/// Adds two integers.
#[tool]
async fn add(
    /// The first addend.
    a: i64,
    /// The second addend.
    b: i64,
) -> Result<Value, ToolError> {
    a.checked_add(b)
        .map(|sum| json!({"sum": sum}))
        .ok_or_else(|| ToolError::new("the sum overflows"))
}

/// Greets someone, with a greeting of one's choice.
#[tool]
async fn greet(
    /// Who to greet.
    name: String,
    /// The greeting (Hello if none).
    greeting: Option<String>,
    progress: Progress,
) -> Greeting {
    progress.report(1.0, Some(1.0), None);
    self::greeting(&name, greeting.as_deref())
}

/// Adds a list of integers, on the blocking pool.
#[tool]
fn sum(values: Vec<i64>) -> Result<i64, ToolError> {
    values
        .iter()
        .try_fold(0i64, |acc, v| acc.checked_add(*v))
        .ok_or_else(|| ToolError::new("the sum overflows"))
}

/// Always fails.
#[tool]
async fn fail() -> Result<Value, ToolError> {
    Err(ToolError::new("boom"))
}

/// The seed tools, registered with `#[tool]`.
pub fn macro_toolkit() -> ToolKitClient {
    let client = ToolKitClient::new("seed-toolkit-key", APP_NAME);
    client
        .register_all([
            hello_world::tool(),
            echo::tool(),
            create_company::tool(),
            get_contacts::tool(),
            add::tool(),
            greet::tool(),
            sum::tool(),
            fail::tool(),
        ])
        .expect("the seed tools are valid");
    client
}

// ---------------------------------------------------------------------
// With the builder.
// ---------------------------------------------------------------------

// Not a doc comment: schemars would put it in the schema.
// The arguments of the typed `add`.
#[derive(Deserialize, schemars::JsonSchema)]
struct AddArgs {
    /// The first addend.
    a: i64,
    /// The second addend.
    b: i64,
}

/// The seed tools, registered with the builder: the same tools, spelled
/// out.
pub fn builder_toolkit() -> ToolKitClient {
    let client = ToolKitClient::new("seed-toolkit-key", APP_NAME);
    let registered = [
        client.register_tool(
            Tool::new("hello_world")
                .description("Returns a greeting.")
                .params(["name"])
                .required_params(["name"]),
            |call: Call| async move {
                let name = call.str("name").unwrap_or_default();
                Ok::<_, ToolError>(json!({"message": format!("Hello, {name}!")}))
            },
        ),
        client.register_tool(
            Tool::new("echo")
                .description("Echoes the input text.")
                .params(["text"])
                .required_params(["text"]),
            |call: Call| async move { Ok::<_, ToolError>(json!({"echo": call.param("text")})) },
        ),
        client.register_tool(
            Tool::new("create_company")
                .description("Creates a company in HubSpot.")
                .params(["name", "domain", "industry"])
                .required_params(["name", "domain", "industry"])
                .auth_provider("hubspot")
                .auth_type("OAuth2")
                .auth_with("access_token"),
            |call: Call| async move {
                let token = call.auth_token().ok_or_else(|| ToolError::new("no token"))?;
                let field = |name| call.param(name).cloned().unwrap_or_default();
                Ok::<_, ToolError>(company(
                    &field("name"),
                    &field("domain"),
                    &field("industry"),
                    token,
                ))
            },
        ),
        client.register_tool(
            Tool::new("get_contacts")
                .description("Fetches contacts from HubSpot.")
                .auth_provider("hubspot")
                .auth_type("apiKey")
                .auth_with("api_key"),
            |call: Call| async move {
                let token = call.auth_token().ok_or_else(|| ToolError::new("no token"))?;
                Ok::<_, ToolError>(contacts(token))
            },
        ),
        client.register_typed_tool(
            Tool::new("add").description("Adds two integers."),
            |args: AddArgs, _token| async move {
                args.a
                    .checked_add(args.b)
                    .map(|sum| json!({"sum": sum}))
                    .ok_or_else(|| ToolError::new("the sum overflows"))
            },
        ),
        client.register_tool(
            Tool::new("greet")
                .description("Greets someone, with a greeting of one's choice.")
                .params(["name", "greeting"])
                .required_params(["name"])
                .param_schema(
                    "name",
                    json!({"type": "string", "description": "Who to greet."}),
                )
                .param_schema(
                    "greeting",
                    json!({"type": ["string", "null"], "description": "The greeting (Hello if none)."}),
                )
                .output_schema(json!({
                    "type": "object",
                    "properties": {"message": {"type": "string", "description": "The greeting."}},
                    "required": ["message"]
                })),
            |call: Call| async move {
                call.progress(1.0, Some(1.0), None);
                let name = call.str("name").unwrap_or_default();
                Ok::<_, ToolError>(greeting(name, call.str("greeting")))
            },
        ),
        client.register_blocking_tool(
            Tool::new("sum")
                .description("Adds a list of integers, on the blocking pool.")
                .params(["values"])
                .required_params(["values"])
                .param_schema(
                    "values",
                    json!({"type": "array", "items": {"type": "integer", "format": "int64"}}),
                ),
            |call: Call| {
                let values: Vec<i64> = call
                    .param("values")
                    .and_then(Value::as_array)
                    .map(|v| v.iter().filter_map(Value::as_i64).collect())
                    .unwrap_or_default();
                values
                    .iter()
                    .try_fold(0i64, |acc, v| acc.checked_add(*v))
                    .ok_or_else(|| ToolError::new("the sum overflows"))
            },
        ),
        client.register_tool(
            Tool::new("fail").description("Always fails."),
            |_call: Call| async { Err::<Value, _>(ToolError::new("boom")) },
        ),
    ];
    for outcome in registered {
        outcome.expect("the seed tools are valid");
    }
    client
}
