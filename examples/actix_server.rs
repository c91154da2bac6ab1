//! The demo toolkit served by actix-web: `cargo run --example actix_server`.

use actix_web::{App, HttpServer};
use atp_actix::Atp;

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    atp_examples::init_logging();
    atp_examples::register_demo()?;
    let addr = atp_examples::addr()?;
    let server = HttpServer::new(|| App::new().service(Atp::new())).bind(addr)?;
    let bound = server.addrs().first().copied().unwrap_or(addr);
    atp_examples::print_try("actix-web", bound);
    server.run().await?;
    Ok(())
}
