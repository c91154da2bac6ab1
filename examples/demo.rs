#![doc = include_str!("../README.md")]
//!
//! The demo toolkit the examples serve: the Python SDK's `hello_world` and
//! `echo`, `add`, `get_weather`, and `get_contacts`, which needs an OAuth
//! token — each a plain function under `#[tool]`.

use std::net::SocketAddr;

use atp_registry::{AuthToken, RegisterError, ToolError, ToolKitClient, register_client, tool};
use serde_json::{Value, json};

/// The toolkit's name in URLs.
pub const TOOLKIT: &str = "demo";

/// What `hello_world` answers; its schema is the tool's output schema
/// (MCP clients see it as `outputSchema`).
#[derive(serde::Serialize, atp_registry::schemars::JsonSchema)]
#[schemars(crate = "atp_registry::schemars")]
pub struct Greeting {
    /// The greeting.
    pub message: String,
}

/// Returns a greeting.
#[tool]
pub async fn hello_world(
    /// Who to greet.
    name: String,
) -> Greeting {
    Greeting {
        message: format!("Hello, {name}!"),
    }
}

/// Echoes the input text.
#[tool]
pub async fn echo(
    /// The text to echo.
    text: String,
) -> Value {
    json!({"echo": text})
}

/// Adds two integers.
#[tool]
pub async fn add(
    /// The first addend.
    a: i64,
    /// The second addend.
    b: i64,
) -> Result<Value, ToolError> {
    a.checked_add(b)
        .map(|sum| json!({"sum": sum}))
        .ok_or_else(|| ToolError::new("the sum overflows"))
}

/// Returns today's forecast for a city.
#[tool]
pub async fn get_weather(
    /// The city.
    city: String,
) -> Value {
    // A stand-in weather service (no network).
    json!({"city": city, "forecast": "sunny", "temperature_c": 21})
}

/// Fetches contacts from HubSpot.
#[tool(
    auth_provider = "hubspot",
    auth_type = "OAuth2",
    auth_with = "access_token"
)]
pub async fn get_contacts(token: AuthToken) -> Value {
    // Stands in for the Python SDK's HubSpot call: it shows only the
    // token's length (a token is never echoed).
    json!({"contacts": [], "token_length": token.expose().len()})
}

/// Builds the demo toolkit.
pub fn demo_client() -> Result<ToolKitClient, RegisterError> {
    let client = ToolKitClient::new("YOUR_ATP_TOOLKIT_API_KEY", APP_NAME);
    client.register_all([
        hello_world::tool(),
        echo::tool(),
        add::tool(),
        get_weather::tool(),
        get_contacts::tool(),
    ])?;
    Ok(client)
}

/// The app name of the demo toolkit: its `toolkit_id` on an ATP server.
pub const APP_NAME: &str = "Demo";

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

/// The ATP server the client examples use: `$ATP_BASE_URL`, or else an
/// `atp-server` started in this process (dev mode, in memory) on a free
/// loopback port — so that the examples run offline with one command.
///
/// Returns the base URL, and the server when it runs in this process.
pub async fn atp_server()
-> Result<(String, Option<atp_server::AtpServer>), Box<dyn std::error::Error>> {
    if let Ok(url) = std::env::var("ATP_BASE_URL") {
        return Ok((url, None));
    }
    let server = atp_server::AtpServer::open(
        atp_server::Config::dev().with_db(atp_server::DbLocation::Memory),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let serving = server.clone();
    tokio::spawn(async move {
        if let Err(e) = serving.serve(listener).await {
            eprintln!("atp-server stopped: {e}");
        }
    });
    println!("started an in-process atp-server on {base} (set ATP_BASE_URL to use another)");
    Ok((base, Some(server)))
}

/// Serves `toolkit` to the ATP server at its base URL, in the background
/// (`ToolKitClient::start`), and — when that server runs in this process —
/// waits until the toolkit is connected. Stop it with `toolkit.stop()`, then
/// await the handle.
pub async fn serve_in_background(
    toolkit: &ToolKitClient,
    local: Option<&atp_server::AtpServer>,
) -> Result<
    tokio::task::JoinHandle<Result<(), atp_registry::runtime::RuntimeError>>,
    Box<dyn std::error::Error>,
> {
    let runtime = {
        let toolkit = toolkit.clone();
        tokio::spawn(async move { toolkit.start().await })
    };
    if let Some(server) = local
        && !server
            .wait_until_served(toolkit.app_name(), std::time::Duration::from_secs(10))
            .await
    {
        return Err(format!(
            "the toolkit {} did not connect within 10 s",
            toolkit.app_name()
        )
        .into());
    }
    Ok(runtime)
}

/// The whole agent loop for one provider, offline: the demo toolkit
/// connects to the ATP server over the WebSocket runtime; the LLM side
/// fetches the toolkit's context in `provider`'s format; a recorded model
/// output (`recorded`, what the provider's API returned) stands in for the
/// model; `call_tool` runs its tool calls and returns the messages to
/// append to the conversation.
pub async fn llm_demo(provider: &str, recorded: &str) -> Result<(), Box<dyn std::error::Error>> {
    use atp_registry::llm::LlmClient;

    init_logging_quiet();
    let (base, local) = atp_server().await?;
    let toolkit = demo_client()?.with_base_url(&base);
    // The toolkit announces its tools and connects in the background.
    let runtime = serve_in_background(&toolkit, local.as_ref()).await?;

    let atp = LlmClient::new("YOUR_ATP_LLM_CLIENT_API_KEY").with_base_url(&base);
    let prompt = "Greet Ada Lovelace, then tell me the weather in Paris.";
    let context = atp.get_toolkit_context(APP_NAME, provider, prompt).await?;
    println!(
        "\n1. tools for the model ({provider} format):\n{}",
        serde_json::to_string_pretty(&context["tools"])?
    );

    let model_output: Value = serde_json::from_str(recorded)?;
    println!(
        "\n2. the model's answer (recorded): {} tool call(s)",
        atp_registry::llm::parse_tool_calls(provider.parse()?, &model_output).len()
    );

    let messages = atp
        .call_tool(APP_NAME, &model_output, provider, prompt)
        .await?;
    println!(
        "\n3. messages to append to the conversation:\n{}",
        serde_json::to_string_pretty(&messages)?
    );

    toolkit.stop();
    runtime.await??;
    Ok(())
}

fn init_logging_quiet() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
