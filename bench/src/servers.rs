//! The servers under test, one process each (`atp-bench serve …`): the
//! conformance fixture through an ATP adapter, or a *bare* handler in the
//! same framework that does the same work without ATP.

use std::{io, net::SocketAddr};

use atp_conformance::server::Framework;
use atp_registry::Engine;
use serde::Deserialize;
use serde_json::json;

/// The path both kinds of server answer, and the body sent to it.
pub const HELLO_PATH: &str = "/atp/conformance/hello_world/";
/// The request body of the benchmarks.
pub const HELLO_BODY: &str = r#"{"name": "World"}"#;
/// What every server must answer to [`HELLO_BODY`] (as JSON).
pub const HELLO_ANSWER: &str = r#"{"result": {"message": "Hello, World!"}}"#;

/// What a server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The fixture registry through the framework's ATP adapter.
    Atp,
    /// A bare handler on [`HELLO_PATH`]: parse `{"name": …}`, answer
    /// `{"result": {"message": …}}`.
    Bare,
}

impl Mode {
    /// The name used on the command line and in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Atp => "atp",
            Mode::Bare => "bare",
        }
    }
}

#[derive(Deserialize)]
struct HelloArgs {
    name: String,
}

/// The bare handlers' work: parse the params, build the result, serialize
/// it — what the fixture's `hello_world` and the engine do around it,
/// without the engine.
pub fn bare_hello(body: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let args: HelloArgs = serde_json::from_slice(body)?;
    let message = format!("Hello, {}!", args.name);
    serde_json::to_vec(&json!({"result": {"message": message}}))
}

const BAD_REQUEST: &str = r#"{"error": "bad request"}"#;

/// Serves `mode` with `framework` on `addr` with `workers` threads, until
/// the process is killed. Prints `listening on ADDR` once bound.
pub fn serve(framework: Framework, mode: Mode, addr: SocketAddr, workers: usize) -> io::Result<()> {
    let workers = workers.max(1);
    match framework {
        Framework::Axum => serve_axum(mode, addr, workers),
        Framework::Actix => serve_actix(mode, addr, workers),
        Framework::Rocket => serve_rocket(mode, addr, workers),
    }
}

fn fixture_engine() -> Engine {
    Engine::with_registry(atp_conformance::fixture())
}

fn announce(addr: SocketAddr) {
    println!("listening on {addr}");
}

// ---- axum ----

async fn axum_bare(body: axum::body::Bytes) -> axum::response::Response {
    use axum::{
        http::{StatusCode, header::CONTENT_TYPE},
        response::IntoResponse,
    };
    match bare_hello(&body) {
        Ok(out) => ([(CONTENT_TYPE, "application/json")], out).into_response(),
        Err(_) => (
            StatusCode::BAD_REQUEST,
            [(CONTENT_TYPE, "application/json")],
            BAD_REQUEST,
        )
            .into_response(),
    }
}

fn serve_axum(mode: Mode, addr: SocketAddr, workers: usize) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app: axum::Router = match mode {
            Mode::Atp => atp_axum::Atp::from(fixture_engine()).into(),
            Mode::Bare => axum::Router::new().route(HELLO_PATH, axum::routing::post(axum_bare)),
        };
        let listener = tokio::net::TcpListener::bind(addr).await?;
        announce(listener.local_addr()?);
        axum::serve(listener, app).await
    })
}

// ---- actix-web ----

async fn actix_bare(body: actix_web::web::Bytes) -> actix_web::HttpResponse {
    match bare_hello(&body) {
        Ok(out) => actix_web::HttpResponse::Ok()
            .content_type("application/json")
            .body(out),
        Err(_) => actix_web::HttpResponse::BadRequest()
            .content_type("application/json")
            .body(BAD_REQUEST),
    }
}

fn serve_actix(mode: Mode, addr: SocketAddr, workers: usize) -> io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    actix_web::rt::System::new().block_on(async move {
        let server = match mode {
            Mode::Atp => {
                let engine = fixture_engine();
                actix_web::HttpServer::new(move || {
                    actix_web::App::new().service(atp_actix::Atp::from(engine.clone()))
                })
                .workers(workers)
                .disable_signals()
                .listen(listener)?
                .run()
            }
            Mode::Bare => actix_web::HttpServer::new(|| {
                actix_web::App::new().route(HELLO_PATH, actix_web::web::post().to(actix_bare))
            })
            .workers(workers)
            .disable_signals()
            .listen(listener)?
            .run(),
        };
        announce(local);
        server.await
    })
}

// ---- Rocket ----

#[rocket::post("/atp/conformance/hello_world", data = "<body>")]
fn rocket_bare(body: Vec<u8>) -> (rocket::http::Status, (rocket::http::ContentType, Vec<u8>)) {
    use rocket::http::{ContentType, Status};
    match bare_hello(&body) {
        Ok(out) => (Status::Ok, (ContentType::JSON, out)),
        Err(_) => (
            Status::BadRequest,
            (ContentType::JSON, BAD_REQUEST.as_bytes().to_vec()),
        ),
    }
}

fn serve_rocket(mode: Mode, addr: SocketAddr, workers: usize) -> io::Result<()> {
    // Rocket binds itself; take a free port first when asked for port 0.
    let addr = if addr.port() == 0 {
        std::net::TcpListener::bind(addr)?.local_addr()?
    } else {
        addr
    };
    let config = rocket::Config {
        address: addr.ip(),
        port: addr.port(),
        workers,
        log_level: rocket::config::LogLevel::Off,
        cli_colors: false,
        // No signal handlers: a signal ends the process, as for the other
        // frameworks here.
        shutdown: rocket::config::Shutdown {
            ctrlc: false,
            #[cfg(unix)]
            signals: Default::default(),
            ..Default::default()
        },
        ..rocket::Config::release_default()
    };
    let rocket = rocket::custom(config);
    let rocket = match mode {
        Mode::Atp => rocket.mount("/", atp_rocket::Atp::from(fixture_engine())),
        Mode::Bare => rocket.mount("/", rocket::routes![rocket_bare]),
    };
    let rocket = rocket.attach(rocket::fairing::AdHoc::on_liftoff("announce", |r| {
        Box::pin(async move {
            let c = r.config();
            announce(SocketAddr::new(c.address, c.port));
        })
    }));
    rocket::execute(rocket.launch())
        .map(drop)
        .map_err(|e| io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_work_answers_like_the_fixture() {
        let out = bare_hello(HELLO_BODY.as_bytes()).expect("valid body");
        let out: serde_json::Value = serde_json::from_slice(&out).expect("json");
        let want: serde_json::Value = serde_json::from_str(HELLO_ANSWER).expect("json");
        assert_eq!(out, want);
        assert!(bare_hello(b"[]").is_err());
    }
}
