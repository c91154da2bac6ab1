//! The demo toolkit as an MCP server over stdio, for desktop agents
//! (Claude Desktop, Cursor, VS Code): `cargo run --example mcp_stdio`.
//!
//! The agent starts this program and speaks JSON-RPC to it, one message
//! per line on stdin and stdout; logs go to stderr (`RUST_LOG` filters).
//! Besides the demo tools (`hello_world`, `echo`, `add`, `get_weather`,
//! `get_contacts`) it serves `download`, which reports its progress and
//! logs each step.
//!
//! Claude Desktop (`claude_desktop_config.json`; Cursor's `mcp.json` has
//! the same shape), from a checkout of atp-rs:
//!
//! ```json
//! {"mcpServers": {"atp-demo": {"command": "cargo", "args": ["run", "-q", "--example", "mcp_stdio"]}}}
//! ```
//!
//! or with the binary built by `cargo build --release --example mcp_stdio`
//! (an absolute path; the token of `get_contacts` in `env`):
//!
//! ```json
//! {"mcpServers": {"atp-demo": {
//!   "command": "/path/to/atp-rs/target/release/examples/mcp_stdio",
//!   "env": {"ATP_MCP_AUTH_TOKEN": "USER_ACCESS_TOKEN"}
//! }}}
//! ```
//!
//! Try it by hand:
//!
//! ```text
//! printf '%s\n' '{"jsonrpc":"2.0","id":1,"method":"tools/list"}' | cargo run -q --example mcp_stdio
//! ```

use std::time::Duration;

use atp_registry::{LogLevel, Progress, ToolError, tool};
use serde_json::{Value, json};

/// Downloads some files (pretend), reporting each.
#[tool]
async fn download(
    /// How many files, at most 100 (3 if not given).
    files: Option<u32>,
    /// How long each file takes, in milliseconds (100 if not given).
    delay_ms: Option<u64>,
    progress: Progress,
) -> Result<Value, ToolError> {
    let files = files.unwrap_or(3);
    if files > 100 {
        return Err(ToolError::new("at most 100 files"));
    }
    let delay = delay_ms.unwrap_or(100);
    for i in 1..=files {
        tokio::time::sleep(Duration::from_millis(delay.min(10_000))).await;
        progress.log(LogLevel::Info, format!("downloaded file {i}"));
        progress.report(
            i.into(),
            Some(files.into()),
            Some(&format!("file {i} of {files}")),
        );
    }
    Ok(json!({"downloaded": files}))
}

/// Serves the demo toolkit over stdin and stdout until stdin ends (`pub`:
/// the example's test runs it as its child process).
#[tokio::main]
pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // stdout is the protocol's: logs go to stderr.
    atp_examples::init_logging();
    let toolkit = atp_examples::demo_client()?;
    toolkit.register(download::tool())?;
    toolkit.serve_stdio().await?;
    Ok(())
}
