//! The demo toolkit served by axum: `cargo run --example axum_server`.

use atp_axum::Atp;
use axum::Router;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    atp_examples::init_logging();
    atp_examples::register_demo()?;
    let app = Router::new().merge(Atp::new());
    let addr = atp_examples::addr()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    atp_examples::print_try("axum", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
