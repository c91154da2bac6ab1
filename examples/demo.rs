//! The demo toolkit the examples serve: the seed's `hello_world` and
//! `echo`, a typed `add`, and `get_contacts`, which needs an OAuth token.

use std::net::SocketAddr;

use atp_registry::{Call, RegisterError, Tool, ToolError, ToolKitClient, register_client};
use serde_json::{Value, json};

/// The toolkit's name in URLs.
pub const TOOLKIT: &str = "demo";

/// Returns a greeting (the seed's `hello_world`).
pub async fn hello_world(call: Call) -> Result<Value, ToolError> {
    let name = call.str("name").unwrap_or("World");
    Ok(json!({"message": format!("Hello, {name}!")}))
}

/// Echoes the input text (the seed's `echo`).
pub async fn echo(call: Call) -> Result<Value, ToolError> {
    Ok(json!({"echo": call.param("text")}))
}

/// Stands in for the seed's HubSpot `get_contacts`: it needs the user's
/// OAuth token, and shows only its length (a token is never echoed).
pub async fn get_contacts(call: Call) -> Result<Value, ToolError> {
    let token = call
        .auth_token()
        .ok_or_else(|| ToolError::new("no token"))?;
    Ok(json!({"contacts": [], "token_length": token.expose().len()}))
}

/// The arguments of `add`.
#[derive(serde::Deserialize, atp_registry::schemars::JsonSchema)]
#[schemars(crate = "atp_registry::schemars")]
pub struct AddArgs {
    /// The first addend.
    pub a: i64,
    /// The second addend.
    pub b: i64,
}

/// Builds the demo toolkit.
pub fn demo_client() -> Result<ToolKitClient, RegisterError> {
    let client = ToolKitClient::new("YOUR_ATP_TOOLKIT_API_KEY", "Demo");
    client.register_tool(
        Tool::new("hello_world")
            .description("Returns a greeting.")
            .params(["name"])
            .required_params(["name"]),
        hello_world,
    )?;
    client.register_tool(
        Tool::new("echo")
            .description("Echoes the input text.")
            .params(["text"])
            .required_params(["text"]),
        echo,
    )?;
    client.register_typed_tool(
        Tool::new("add").description("Adds two integers."),
        |args: AddArgs, _token| async move {
            args.a
                .checked_add(args.b)
                .map(|sum| json!({"sum": sum}))
                .ok_or_else(|| ToolError::new("the sum overflows"))
        },
    )?;
    client.register_tool(
        Tool::new("get_contacts")
            .description("Fetches contacts from HubSpot.")
            .auth_provider("hubspot")
            .auth_type("OAuth2")
            .auth_with("access_token"),
        get_contacts,
    )?;
    Ok(client)
}

/// Registers the demo toolkit in the global registry.
pub fn register_demo() -> Result<(), Box<dyn std::error::Error>> {
    register_client(TOOLKIT, demo_client()?)?;
    Ok(())
}

/// Logs to stderr (`RUST_LOG` filters; `info` by default).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `127.0.0.1:8000`, or `127.0.0.1:$PORT`.
pub fn addr() -> Result<SocketAddr, Box<dyn std::error::Error>> {
    let port = match std::env::var("PORT") {
        Ok(p) => p
            .parse::<u16>()
            .map_err(|_| format!("PORT must be a port number, not {p:?}"))?,
        Err(_) => 8000,
    };
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Prints where the server listens and what to try.
pub fn print_try(framework: &str, addr: SocketAddr) {
    let base = format!("http://{addr}/atp");
    println!("{framework}: ATP endpoints on {base}/ — try:");
    println!("  curl {base}/");
    println!("  curl {base}/{TOOLKIT}/");
    println!("  curl '{base}/{TOOLKIT}/?provider=openai'");
    println!("  curl {base}/{TOOLKIT}/hello_world/");
    println!(
        "  curl -X POST {base}/{TOOLKIT}/hello_world/ -H 'Content-Type: application/json' -d '{{\"name\": \"Ada\"}}'"
    );
    println!("  curl -X POST {base}/{TOOLKIT}/echo/ -d 'text=hi'");
    println!(
        "  curl -X POST {base}/{TOOLKIT}/add/ -H 'Content-Type: application/json' -d '{{\"a\": 2, \"b\": 3}}'"
    );
    println!("  curl -X POST {base}/{TOOLKIT}/get_contacts/ -H 'Authorization: Bearer MY_TOKEN'");
}
