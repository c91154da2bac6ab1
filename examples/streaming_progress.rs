//! A tool's progress, streamed to the agent as it runs:
//! `cargo run --example streaming_progress`.
//!
//! The tool reports each step through its call handle; the agent gets the
//! steps as a `Stream`, then the result messages — over the WebSocket
//! (`"stream": true`) and over HTTP (server-sent events). Runs an
//! in-process `atp-server` unless `ATP_BASE_URL` is set.

use std::time::Duration;

use atp_registry::{
    Progress, ToolKitClient,
    llm::{LlmClient, LlmProtocol, StreamEvent},
    tool,
};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Downloads some files, reporting each.
#[tool]
async fn download(
    /// How many files (3 if not given).
    files: Option<u32>,
    // The call's progress handle: not a param.
    progress: Progress,
) -> Value {
    let files = files.unwrap_or(3);
    for i in 1..=files {
        tokio::time::sleep(Duration::from_millis(100)).await;
        progress.report(
            i.into(),
            Some(files.into()),
            Some(&format!("file {i} of {files}")),
        );
    }
    json!({"downloaded": files})
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (base, local) = atp_examples::atp_server().await?;

    let toolkit = ToolKitClient::new("YOUR_ATP_TOOLKIT_API_KEY", "Files").with_base_url(&base);
    toolkit.register(download::tool())?;
    let runtime = atp_examples::serve_in_background(&toolkit, local.as_ref()).await?;

    // What a model asked for (OpenAI Responses API function calls).
    let model_output = json!([
        {"type": "function_call", "call_id": "call_1", "name": "download", "arguments": "{\"files\": 4}"}
    ]);
    for protocol in [LlmProtocol::WebSocket, LlmProtocol::Http] {
        println!("over {protocol:?}:");
        let atp = LlmClient::new("YOUR_ATP_LLM_CLIENT_API_KEY")
            .with_base_url(&base)
            .with_protocol(protocol);
        let mut events = atp.call_tool_streaming("Files", &model_output, "openai", "Get my files");
        while let Some(event) = events.next().await {
            match event? {
                StreamEvent::Progress(p) => println!(
                    "  {}: {} / {} {}",
                    p.tool,
                    p.progress.progress,
                    p.progress.total.unwrap_or(f64::NAN),
                    p.progress.message.unwrap_or_default()
                ),
                StreamEvent::Finished(f) => println!("  {} finished", f.tool),
                StreamEvent::Messages(m) => {
                    println!("  messages to append: {}", serde_json::to_string(&m)?)
                }
                other => println!("  {other:?}"),
            }
        }
    }

    toolkit.stop();
    runtime.await??;
    Ok(())
}
