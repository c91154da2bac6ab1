//! The agent loop with Anthropic tool calls, offline: `cargo run --example llm_anthropic`.
//!
//! Context → (recorded model output) → `call_tool` → messages to append.
//! Runs an in-process `atp-server` unless `ATP_BASE_URL` is set.

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    atp_examples::llm_demo(
        "anthropic",
        include_str!("recorded/anthropic_message_response.json"),
    )
    .await
}
