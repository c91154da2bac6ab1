//! `rmcp-baseline --addr 127.0.0.1:0`: one MCP tool, `hello_world(name)`
//! → `{"message": "Hello, NAME!"}`, served by rmcp's `StreamableHttpService`
//! on axum, stateless with JSON responses, so that a bare `tools/call` POST
//! works without `initialize`. The baseline of `atp-bench-mcp`.

use std::sync::Arc;

use rmcp::handler::server::wrapper::{Json, Parameters};
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::never::NeverSessionManager,
};
use rmcp::{schemars, tool, tool_router};
use serde::{Deserialize, Serialize};

#[derive(Clone, Default)]
struct Hello;

#[derive(Deserialize, schemars::JsonSchema, Default)]
struct HelloInput {
    /// Who to greet.
    name: String,
}

#[derive(Serialize, schemars::JsonSchema)]
struct HelloOutput {
    message: String,
}

#[tool_router(server_handler)]
impl Hello {
    #[tool(name = "hello_world", description = "Say hello")]
    fn hello_world(
        &self,
        Parameters(HelloInput { name }): Parameters<HelloInput>,
    ) -> Json<HelloOutput> {
        Json(HelloOutput {
            message: format!("Hello, {name}!"),
        })
    }
}

fn main() -> std::io::Result<()> {
    let mut addr = "127.0.0.1:0".to_owned();
    let mut threads = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => addr = args.next().unwrap_or(addr),
            "--threads" => threads = args.next().and_then(|t| t.parse().ok()).unwrap_or(0),
            other => {
                eprintln!(
                    "usage: rmcp-baseline [--addr HOST:PORT] [--threads N] (unknown: {other})"
                );
                std::process::exit(2);
            }
        }
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if threads > 0 {
        rt.worker_threads(threads);
    }
    rt.build()?.block_on(async move {
        let config = StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(true)
            .with_sse_keep_alive(None)
            .with_allowed_hosts(["127.0.0.1", "localhost"]);
        let service = StreamableHttpService::new(
            || Ok(Hello),
            Arc::new(NeverSessionManager::default()),
            config,
        );
        let app = axum::Router::new().nest_service("/mcp", service);
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        println!("listening on http://{}", listener.local_addr()?);
        axum::serve(listener, app).await
    })
}
