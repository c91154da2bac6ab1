//! The demo toolkit served by Rocket: `cargo run --example rocket_server`.

use atp_rocket::Atp;
use rocket::fairing::AdHoc;

#[rocket::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    atp_examples::init_logging();
    atp_examples::register_demo()?;
    let addr = atp_examples::addr()?;
    let config = rocket::Config {
        address: addr.ip(),
        port: addr.port(),
        log_level: rocket::config::LogLevel::Critical,
        ..rocket::Config::release_default()
    };
    rocket::custom(config)
        .mount("/", Atp::new())
        .attach(AdHoc::on_liftoff("print the curl commands", |rocket| {
            Box::pin(async move {
                let c = rocket.config();
                atp_examples::print_try("Rocket", std::net::SocketAddr::new(c.address, c.port));
            })
        }))
        .launch()
        .await?;
    Ok(())
}
