//! The agent loop with Mistral tool calls, offline: `cargo run --example llm_mistral`.
//!
//! Context → (recorded model output) → `call_tool` → messages to append.
//! Runs an in-process `atp-server` unless `ATP_BASE_URL` is set.

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    atp_examples::llm_demo(
        "mistral",
        include_str!("recorded/mistral_chat_completion_response.json"),
    )
    .await
}
