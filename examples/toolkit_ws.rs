//! The demo toolkit served to an ATP server over the WebSocket runtime:
//! `cargo run --example toolkit_ws`.
//!
//! Start a local server first (`cargo run -p atp-server`), or set
//! `ATP_BASE_URL`. Stops on Ctrl-C.

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    atp_examples::init_logging();
    let base = std::env::var("ATP_BASE_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let client = atp_examples::demo_client()?.with_base_url(&base);
    println!(
        "serving toolkit {:?} ({} tools) to {base}; Ctrl-C to stop",
        atp_examples::APP_NAME,
        client.tool_count()
    );
    client.start().await?;
    Ok(())
}
