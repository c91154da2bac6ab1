//! The agent loop with OpenAI (Responses API) tool calls, offline: `cargo run --example llm_openai`.
//!
//! Context → (recorded model output) → `call_tool` → messages to append.
//! Runs an in-process `atp-server` unless `ATP_BASE_URL` is set.

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    atp_examples::llm_demo(
        "openai",
        include_str!("recorded/openai_responses_response.json"),
    )
    .await
}
